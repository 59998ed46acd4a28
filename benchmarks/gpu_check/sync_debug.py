"""Section 5: the CM-MaskSD step (the trainer's) under ``torch.cuda.set_sync_debug_mode("error")``: "no host sync",
or the first synchronising operation and the repository frames above it."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.gpu_check.section import NotApplicable, Section, in_repo, relative
from benchmarks.train_step import Bench
from masksd import MaskSDConfig

if TYPE_CHECKING:
    from benchmarks.gpu_check.check import GpuCheck

__all__ = ["SECTION", "describe_sync", "host_syncs"]


def describe_sync(error: BaseException) -> dict[str, Any]:
    """The operation that synchronised (the innermost repository frame outside benchmarks/) and the
    repository frames above it, innermost last, from the error set_sync_debug_mode("error") raised. A sync
    with no such frame (in backward or the optimiser, say) is described by the innermost three frames."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if in_repo(f.filename) and not relative(f.filename).startswith("benchmarks/")]
    stack = [f"{relative(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in ours or frames[-3:]]
    return {
        "host_sync": True,
        "operation": stack[-1],
        "stack": stack,
        "error": str(error).strip().splitlines()[0],
        "result": f"host sync at {stack[-1]}",
    }


def host_syncs(step: Callable[[], None]) -> dict[str, Any]:
    """Run ``step`` under set_sync_debug_mode("error"): {"host_sync": False, "result": "no host sync"} or the
    first synchronising operation (describe_sync). When one is found, ``step`` runs once more under "warn"
    to list every synchronising line of the step ("sites")."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        found: dict[str, Any] = {"host_sync": False, "result": "no host sync"}
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        found = describe_sync(error)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if found["host_sync"]:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sites = [f"{relative(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        found["sites"] = list(dict.fromkeys(sites))  # each line once, in the order the step reached them
    return found


def run(check: "GpuCheck", end: float) -> dict[str, Any]:
    if check.device.type != "cuda":
        raise NotApplicable("torch.cuda.set_sync_debug_mode needs CUDA; a CPU step has no host sync to find")
    plan = check.plan
    train = plan.small
    torch.manual_seed(0)
    bench = Bench(train, plan.sync_batch, check.device, {"CM-MaskSD": MaskSDConfig()})
    bench.run("CM-MaskSD")  # warm: Adam's state, library handles, cuDNN's autotuning
    torch.cuda.synchronize()
    found = host_syncs(lambda: bench.run("CM-MaskSD"))
    check.log(f"sync debug: {found['result']}")
    return {"model": train.model, "image_size": train.image_size, "batch": plan.sync_batch, **found}


def headline(f: dict[str, Any]) -> str:
    return f["result"]


def markdown(f: dict[str, Any]) -> str:
    lines = [f"{f['model']} @ {f['image_size']} px, batch {f['batch']}, the trainer's step: **{f['result']}**"]
    if f["host_sync"]:
        lines += ["", "First sync, repository frames (innermost last):", ""] + [f"- `{s}`" for s in f["stack"]]
        lines += ["", "Every synchronising line of the step (mode \"warn\"): " + (", ".join(f"`{s}`" for s in f.get("sites", [])) or "none recorded")]
    return "\n".join(lines)


SECTION = Section("sync_debug", "5. Host syncs in the CM-MaskSD step", 30, run, headline, markdown)
