"""Section 7: where the time of the small preset's step goes (torch.profiler, benchmarks.step_profile): GPU time
per part (embeddings, image and text encoders, the CRIS head's pyramid, neck, decoder and projector, masking,
losses, backward, optimizer step) and the top kernels, baseline vs CM-MaskSD, and the baseline once more with the
other setting of ``CRISConfig.fast_head`` (same weights), so its GPU effect shows part by part. On a CPU (the
--tiny stand-in) the operators' CPU time instead."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import markdown_table
from benchmarks.gpu_check.section import Section, free_memory
from benchmarks.step_profile import PARTS, profile_step
from benchmarks.train_step import Bench
from masksd import MaskSDConfig

if TYPE_CHECKING:
    from benchmarks.gpu_check.check import GpuCheck

__all__ = ["SECTION", "VARIANTS"]

VARIANTS = {"baseline": MaskSDConfig.baseline(), "CM-MaskSD": MaskSDConfig()}
TOP = 15
"""Kernels (operators on a CPU) listed per variant."""


def run(check: "GpuCheck", end: float) -> dict[str, Any]:
    plan = check.plan
    train = plan.small
    torch.manual_seed(0)
    bench = Bench(train, plan.batch, check.device, VARIANTS)
    cris = bench.segmenter.config
    head = bench.segmenter.decode_head
    other = "baseline, reference head" if cris.fast_head else "baseline, fast head"  # the head switch the preset does not use
    profiles = {}
    for label, name in (*((v, v) for v in VARIANTS), (other, "baseline")):
        fast = cris.fast_head != (label == other)
        head.set_fast(fast, fast)
        check.log(f"profile: {plan.profile_steps} steps of {label} after {plan.warmup} warm-up")
        profiles[label] = profile_step(lambda: bench.run(name), bench.models[name], check.device, plan.profile_steps,
                                       plan.warmup, TOP).record()
        free_memory()
    head.set_fast(cris.fast_head, cris.fast_head)
    return {"model": cris.model_name, "image_size": cris.image_size, "batch": plan.batch, "amp": train.amp,
            "fast_head": cris.fast_head, "quick_gelu": cris.quick_gelu, "variants": profiles}


def _both(p: dict[str, Any], part: str) -> float:
    """A part's forward and backward milliseconds per step."""
    return p["parts_ms"].get(part, 0.0) + p["backward_ms"].get(part, 0.0)


def headline(f: dict[str, Any]) -> str:
    def biggest(p: dict[str, Any]) -> str:
        parts = sorted(((part, _both(p, part)) for part in PARTS), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{k} {v:.0f}" for k, v in parts)

    clock = next(iter(f["variants"].values()))["clock"]
    return f"{clock} ms/step, largest parts (forward + backward): " + "; ".join(f"{name}: {biggest(p)}" for name, p in f["variants"].items())


def markdown(f: dict[str, Any]) -> str:
    variants = f["variants"]
    first = next(iter(variants.values()))
    unit = "GPU" if first["clock"] == "cuda" else "CPU"
    parts = [p for p in PARTS if any(p in v["parts_ms"] or p in v["backward_ms"] for v in variants.values())]

    def cells(v: dict[str, Any], part: str) -> tuple[str, str, str]:
        forward, backward = v["parts_ms"].get(part, 0.0), v["backward_ms"].get(part, 0.0)
        return f"{forward:.1f}", f"{backward:.1f}" if part in v["backward_ms"] else "", f"{100 * (forward + backward) / v['total_ms']:.1f} %"

    rows = [[part, *(c for v in variants.values() for c in cells(v, part))] for part in parts]
    rows.append(["total", *(c for v in variants.values() for c in (f"{v['total_ms']:.1f}", "", "100 %"))])
    rows.append(["wall (profiled)", *(c for v in variants.values() for c in (f"{v['wall_ms']:.1f}", "", ""))])
    header = ["part", *(h for name in variants for h in (f"{name}: forward", "backward", "share"))]
    text = [
        f"{f['model']} @ {f['image_size']} px, batch {f['batch']}, amp {f['amp']}, fast head {f['fast_head']}: the trainer's "
        f"step under torch.profiler, {unit} ms per step (mean of {first['steps']} steps). Each operator's own {unit} time goes "
        f"to the innermost part it ran in, each backward node's to the part whose forward recorded it (\"backward\" alone: "
        f"gradient accumulation and what no part recorded); the branches' passes are summed into their parts.",
        "", markdown_table(header, rows, align="l" + "r" * (len(header) - 1)),
    ]
    for name, v in variants.items():
        top = [[t["name"].replace("|", "/"), f"{t['calls']:.0f}", f"{t['ms']:.2f}", f"{100 * t['share']:.1f} %"] for t in v["top"]]
        text += ["", f"Top {'kernels' if first['clock'] == 'cuda' else 'operators'}, {name}:", "",
                 markdown_table(["name", "calls / step", "ms / step", "share"], top)]
    return "\n".join(text)


SECTION = Section("profile", "7. Where the step's time goes (torch.profiler)", 90, run, headline, markdown)
