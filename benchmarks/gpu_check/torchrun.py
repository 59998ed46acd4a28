"""Section 3: a one-process ``torchrun`` run of the training pipeline (process group, DDP) on the small preset from
random weights: train and eval images/s. At world size 1 SyncBatchNorm computes plain BatchNorm (no all-reduce),
so these figures are the pipeline's, not SyncBatchNorm's cost across GPUs.

Run as ``python -m benchmarks.gpu_check.torchrun REPORT FLAGS...`` it is the process torchrun starts: the
trainer with examples/train_cris_masksd.py's FLAGS, its final evaluation timed, what it ran in written to REPORT.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import markdown_table
from benchmarks.gpu_check import section
from benchmarks.gpu_check.section import Section, child_environment, synchronize

if TYPE_CHECKING:
    from benchmarks.gpu_check.check import GpuCheck

__all__ = ["SECTION", "worker"]

WORKER = "benchmarks.gpu_check.torchrun"
"""The module torchrun starts (``--module``)."""


def run(check: "GpuCheck", end: float) -> dict[str, Any]:
    plan = check.plan
    backend = "nccl" if check.device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="gpu_check_torchrun_") as tmp:
        run_dir, report_path = Path(tmp) / "run", Path(tmp) / "report.json"
        train_args = plan.train_args(check.device, run_dir)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        check.commands["torchrun"] = shlex.join(  # what the worker runs, as one would type it
            ["torchrun", "--standalone", "--nproc_per_node=1", "examples/train_cris_masksd.py",
             *plan.train_args(check.device, Path("RUN"))]
        )
        command = [*launcher, "--module", WORKER, str(report_path), *train_args]
        check.log(f"torchrun: {plan.steps} steps of {plan.small.model} and one evaluation ({backend})")
        env = child_environment(**({"OMP_NUM_THREADS": str(plan.threads)} if plan.threads else {}))
        returncode, output = section.run_process(command, env, timeout=end - time.perf_counter() - 2)
        if returncode != 0:
            raise RuntimeError(f"torchrun exited with {returncode}; its output ends:\n{output[-3000:]}")
        report = json.loads(report_path.read_text())
        with open(run_dir / "train_log.csv", newline="") as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    skip = min(5, len(rows) // 2)  # start-up: data workers, cuBLAS/cuDNN handles, the first allocations
    if not report.get("in_group") or report.get("backend") != backend:
        raise RuntimeError(f"the one-process torchrun run was not in a {backend} process group: {report}")
    return {
        "backend": report["backend"], "world_size": report["world_size"], "in_group": report["in_group"],
        "ddp_wrapped": report["ddp_wrapped"], "sync_batchnorm_modules": report["sync_batchnorm"],
        "batchnorm_modules": report["batchnorm"], "steps": len(rows), "batch": plan.batch,
        "train_images_per_s": statistics.median(r["images_per_s"] for r in rows[skip:]),
        "train_images_per_s_from_step": skip + 1, "first_step_s": rows[0]["step_time"],
        "eval_images_per_s": report["eval_samples"] / report["eval_seconds"],
        "eval_samples": report["eval_samples"], "eval_seconds": report["eval_seconds"],
        "run_seconds": report["run_seconds"], "losses_finite": all(r["loss"] == r["loss"] for r in rows),
    }


def worker(report: Path, train_args: list[str]) -> None:
    """Inside torchrun: examples/train_cris_masksd.py's flags into the pipeline's ``train``, with its final
    evaluation timed and what the run was part of (process group, DDP, SyncBatchNorm) recorded."""
    import torch.distributed as dist
    from torch import nn

    from examples.pipeline import loop, trainer
    from examples.train_cris_masksd import parse_args

    cfg = parse_args(train_args)
    seen: dict[str, Any] = {"ddp_wrapped": 0}
    evaluate = trainer.evaluate

    def timed_evaluate(segmenter: nn.Module, loader: Any, tokenize: Any, device: torch.device, *args: Any, **kwargs: Any):
        seen.update(
            in_group=dist.is_initialized(),
            backend=dist.get_backend() if dist.is_initialized() else None,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            sync_batchnorm=sum(isinstance(m, nn.SyncBatchNorm) for m in segmenter.modules()),
            batchnorm=sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in segmenter.modules()),
        )
        synchronize(device)
        start = time.perf_counter()
        metrics = evaluate(segmenter, loader, tokenize, device, *args, **kwargs)
        synchronize(device)
        seen.update(eval_seconds=time.perf_counter() - start, eval_samples=int(metrics["samples"]))
        return metrics

    class CountedDDP(loop.DistributedDataParallel):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            seen["ddp_wrapped"] += 1

    trainer.evaluate = timed_evaluate  # the trainer and the loop look these names up when they run
    loop.DistributedDataParallel = CountedDDP
    start = time.perf_counter()
    trainer.train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        report.write_text(json.dumps({**seen, "run_seconds": time.perf_counter() - start}))


def headline(f: dict[str, Any]) -> str:
    return f"{f['backend']}: train {f['train_images_per_s']:.1f} img/s, eval {f['eval_images_per_s']:.1f} img/s"


def markdown(f: dict[str, Any]) -> str:
    rows = [
        ["process group", f"{f['backend']}, world size {f['world_size']}"],
        ["DDP wrapped", str(f["ddp_wrapped"])],
        ["SyncBatchNorm / BatchNorm modules", f"{f['sync_batchnorm_modules']} / {f['batchnorm_modules']}"
         + (" (world size 1: SyncBatchNorm computes plain BatchNorm)" if f["world_size"] == 1 else "")],
        ["train images / s", f"{f['train_images_per_s']:.1f} (median of steps {f['train_images_per_s_from_step']}-{f['steps']}, batch {f['batch']})"],
        ["first step (s)", f"{f['first_step_s']:.2f}"],
        ["eval images / s", f"{f['eval_images_per_s']:.1f} ({f['eval_samples']} scenes in {f['eval_seconds']:.2f} s)"],
        ["whole run (s)", f"{f['run_seconds']:.1f}"],
        ["losses finite", str(f["losses_finite"])],
    ]
    return markdown_table(["figure", "value"], rows)


SECTION = Section("torchrun", "3. One-process torchrun (process group, DDP; SyncBatchNorm as BatchNorm at world size 1)",
                  120, run, headline, markdown)

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(f"python -m {WORKER} REPORT FLAGS...: the report path, then examples/train_cris_masksd.py's flags")
    worker(Path(sys.argv[1]), sys.argv[2:])
