"""Sections 1 and 2: the trainer's step of a preset (ViT-B-16 @ 480, ViT-L-14 @ 532), baseline vs CM-MaskSD (and
CM-MaskSD with ``checkpoint_branches``, section 6): ms/step, images/s, peak memory, FLOPs and MFU."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import markdown_table
from benchmarks.gpu_check.section import Section, free_memory
from benchmarks.train_step import Bench, bf16_peak, mfu_peak, step_figures
from examples.pipeline.config import TrainConfig
from masksd import MaskSDConfig

if TYPE_CHECKING:
    from benchmarks.gpu_check.check import GpuCheck

__all__ = ["CHECKPOINT_BRANCHES", "VIT_B16", "VIT_L14", "checkpoint_option", "largest_batch", "measure_model"]

MODEL_FLOPS_OF = {"CM-MaskSD, checkpointed": "CM-MaskSD"}
"""Recomputation is not model work: MFU of a checkpointed variant uses the FLOPs of the same model without it."""
OOM_MESSAGES = ("out of memory", "ALLOC_FAILED")
"""What cuBLAS/cuDNN workspace allocations that fail near the limit say (plain RuntimeErrors)."""


def checkpoint_option() -> tuple[MaskSDConfig, str]:
    """CM-MaskSD with ``checkpoint_branches=True`` (section 6 records it; sections 1 and 2 measure it)."""
    return replace(MaskSDConfig(), checkpoint_branches=True), "measured in sections 1 and 2 as 'CM-MaskSD, checkpointed'"


def largest_batch(
    candidates: tuple[int, ...], try_batch: Callable[[int], object], release: Callable[[], None]
) -> tuple[int, dict[int, str]]:
    """The first of ``candidates`` (largest first) for which ``try_batch`` raises no torch.OutOfMemoryError,
    and the OOM message of each larger one. ``release`` frees memory after a failed try (called outside
    the except block, so the exception's frames and the activations they hold are already gone)."""
    failed: dict[int, str] = {}
    for batch in candidates:
        try:
            try_batch(batch)
            return batch, failed
        except RuntimeError as error:  # torch.OutOfMemoryError, or a library's failed workspace allocation
            message = str(error).strip()
            if not isinstance(error, torch.OutOfMemoryError) and not any(m in message for m in OOM_MESSAGES):
                raise
            failed[batch] = message.splitlines()[0][:300]
        release()
    raise torch.OutOfMemoryError(f"none of the batch sizes {list(candidates)} fits: {failed}")


def measure_model(check: "GpuCheck", train: TrainConfig, batches: tuple[int, ...], end: float) -> dict[str, Any]:
    """Baseline, CM-MaskSD and CM-MaskSD checkpointed, the trainer's step of ``train``, at the first batch of
    ``batches`` that fits."""
    plan = check.plan
    variants = {"baseline": MaskSDConfig.baseline(), "CM-MaskSD": MaskSDConfig(), "CM-MaskSD, checkpointed": checkpoint_option()[0]}
    check.log(f"building {train.model} @ {train.image_size} (random init, quick_gelu={train.quick_gelu})")
    torch.manual_seed(0)
    bench = Bench(train, batches[0], check.device, variants)

    def try_batch(batch: int) -> None:
        check.log(f"trying batch {batch}")
        bench.set_batch(batch)
        bench.step("CM-MaskSD")  # the variant that needs the most memory

    def release() -> None:
        bench.optimizer.zero_grad(set_to_none=True)
        free_memory()

    batch, failed = largest_batch(batches, try_batch, release) if len(batches) > 1 else (batches[0], {})
    names = list(variants)
    check.log(f"batch {batch}: {plan.warmup} warm-up steps and up to {plan.rounds} rounds of {names}")
    measure_end = time.perf_counter() + 0.6 * (end - time.perf_counter())  # the rest for FLOP counting
    timings = bench.measure(names, plan.warmup, plan.rounds, deadline=measure_end)
    check.log("counting FLOPs")
    counted = {name: bench.flops(name) for name in names}
    peak = mfu_peak(check.device, train.amp)
    figures = {}
    for name in names:
        model_flops = counted[MODEL_FLOPS_OF.get(name, name)]
        figures[name] = {**step_figures(timings[name], batch, model_flops, peak), "counted_flops": counted[name]}
    found = bf16_peak(check.device)
    cris = bench.segmenter.config
    return {
        "model": cris.model_name, "image_size": cris.image_size, "batch": batch, "amp": train.amp,
        "quick_gelu": cris.quick_gelu, "fast_head": cris.fast_head, "oom": failed, "warmup": plan.warmup,
        "rounds": len(timings[names[0]].seconds), "peak_tflops": peak / 1e12 if peak else None,
        "peak_entry": found[0] if found else None, "checkpoint_branches": checkpoint_option()[1], "variants": figures,
    }


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def headline(f: dict[str, Any]) -> str:
    return f"batch {f['batch']}: " + ", ".join(f"{k} {1000 * x['median_s']:.0f} ms" for k, x in f["variants"].items())


def markdown(f: dict[str, Any]) -> str:
    oom = f" (OOM at {', '.join(str(b) for b in f['oom'])})" if f["oom"] else ""
    base = f["variants"]["baseline"]
    rows = [
        [variant, f"{1000 * v['median_s']:.1f}", f"{v['images_per_s']:.1f}", _gib(v["peak_allocated_bytes"]),
         f"{v['median_s'] / base['median_s']:.2f}", f"{v['flops'] / base['flops']:.2f}",
         f"{v['flops'] / 1e9:.1f}", f"{v['achieved_tflops']:.2f}", _percent(v["mfu"])]
        for variant, v in f["variants"].items()
    ]
    peak = f"{f['peak_tflops']:.0f} TFLOP/s ({f['peak_entry']})" if f["peak_tflops"] else "n/a (bf16 on a known GPU only)"
    return (
        f"{f['model']} @ {f['image_size']} px, batch {f['batch']}{oom}, amp {f['amp']}, QuickGELU {f['quick_gelu']}, "
        f"fast head {f['fast_head']}; the trainer's step (fused Adam, schedule); median of {f['rounds']} alternating rounds "
        f"after {f['warmup']} warm-up steps per variant. FLOPs: FlopCounterMode, 2 per multiply-add, forward + backward; "
        f"peak {peak}. checkpoint_branches: {f['checkpoint_branches']}.\n\n"
        + markdown_table(["variant", "ms / step", "images / s", "peak allocated (GiB)", "time × baseline", "FLOPs × baseline",
                          "GFLOPs / step", "achieved TFLOP/s", "MFU"], rows)
    )


VIT_B16 = Section(
    "vit_b16", "1. ViT-B-16 training step", 75,
    lambda check, end: measure_model(check, check.plan.small, (check.plan.batch,), end), headline, markdown,
)
VIT_L14 = Section(
    "vit_l14", "2. ViT-L-14 training step at the largest batch", 130,
    lambda check, end: measure_model(check, check.plan.large, check.plan.large_batches, end), headline, markdown,
)
CHECKPOINT_BRANCHES = Section(
    "checkpoint_branches", "6. MaskSDConfig.checkpoint_branches", 0,
    lambda check, end: {"available": True, "note": checkpoint_option()[1]},
    lambda f: f["note"], lambda f: f["note"],
)
"""Not run on its own: sections 1 and 2 measure it."""
