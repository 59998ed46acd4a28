"""Process-group set-up for ``torchrun``: nccl on GPUs, gloo on CPUs; a no-op for a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist

__all__ = ["Device", "Dist", "init_distributed", "cleanup_distributed", "resolve_device"]

Device = Literal["auto", "cuda", "cpu"]
"""Where to run: auto (CUDA when available), cuda or cpu."""


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: Device = "auto") -> torch.device:
    """"auto" (CUDA when available), "cuda" or "cpu" -> the device type to run on; errors name the argument."""
    if device not in get_args(Device):
        raise ValueError(f"device must be one of {get_args(Device)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def init_distributed(device: Device = "auto") -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group.

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
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
