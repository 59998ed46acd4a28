"""Process-group set-up for ``torchrun``: nccl on GPUs, gloo on CPUs, also for one process; a no-op for a plain
``python`` run."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, get_args

import torch
import torch.distributed as dist

from examples.pipeline.choices import Device  # re-exported

__all__ = ["Device", "Dist", "process_group", "init_distributed", "cleanup_distributed", "resolve_device", "launched_by_torchrun"]

@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job."""

    rank: int = 0
    """Global rank; rank 0 alone writes checkpoints, logs and images."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine: the GPU this process uses."""
    device: torch.device = torch.device("cpu")
    """The device this process trains on."""
    in_group: bool = False
    """This process is in a torch.distributed process group: every torchrun launch, one process included."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """In a process group: collectives, DDP and SyncBatchNorm apply (even with world_size 1)."""
        return self.in_group


def resolve_device(device: Device = "auto") -> torch.device:
    """"auto" (CUDA when available), "cuda" or "cpu" -> the device type to run on; errors name the argument."""
    if device not in get_args(Device):
        raise ValueError(f"device must be one of {get_args(Device)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def launched_by_torchrun() -> bool:
    """torchrun (or another env:// launcher) started this process: it sets RANK, even for one process."""
    return "RANK" in os.environ


def init_distributed(device: Device = "auto") -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group: under torchrun
    always (a one-process run then exercises the same nccl/gloo, DDP and SyncBatchNorm path as a multi-GPU one),
    and whenever WORLD_SIZE > 1; a plain ``python`` run stays out of any group.

    ``device``: "auto" (CUDA if available), "cuda" or "cpu".
    """
    use_cuda = resolve_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if (world_size > 1 or launched_by_torchrun()) and not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun --max-restarts keeps one store across restarts: without a prefix per attempt a restarted
        # rank would read the dead ranks' addresses (gloo) or the old unique id (nccl) and fail to connect.
        store = dist.PrefixStore(f"masksd/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                device_id=target if use_cuda else None)
    if dist.is_initialized():  # the group's own view, also when the caller had created it
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=target, in_group=dist.is_initialized())


def cleanup_distributed(finished: bool = True) -> None:
    """Leave the process group: after a barrier when every rank ``finished``; at once after an error, when
    the other ranks may be waiting in another collective (a barrier would hang until the timeout and
    hold up torchrun's restart)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: Device = "auto") -> Iterator[Dist]:
    """``init_distributed(device)`` for the block; on leaving it, :func:`cleanup_distributed`, without the
    barrier when the block raised."""
    env = init_distributed(device)
    try:
        yield env
    except BaseException:
        cleanup_distributed(finished=False)
        raise
    cleanup_distributed()
