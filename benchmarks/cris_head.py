"""The CRIS head's changes measured on the CPU: the trainer's step and its parts with each change alone and together.

    python -m benchmarks.cris_head                   # ViT-B-16 @ 480, batch 2, fp32, random init (QuickGELU)
    python -m benchmarks.cris_head --preset demo     # the tiny model

One segmenter, one TrainStep (the trainer's, from the preset with autocast off), the baseline's step (the head
runs once) or another --variant's. Each head variant is the same modules with other switches (so the same
weights): the reference arithmetic of the stored runs, the projector's dynamic convolution as a batched matmul,
CoordConv's coordinate channels convolved once, and both (``CRISConfig.fast_head``). The variants run in
alternating rounds, one profiled step each per round (benchmarks.step_profile: CPU time per part); the table
gives the medians over rounds. Also each variant's largest eval-logit difference to the reference in float32.
Writes benchmarks/results/cris_head_<device>_<model>_<size>.{md,json}.
"""

from __future__ import annotations

import shlex
import statistics
import sys
from typing import get_args

import torch

from benchmarks.common import TABLE_VII, markdown_table, write_results
from benchmarks.step_profile import profile_step
from benchmarks.train_step import Bench, run_config
from examples.pipeline.cli import ScriptParser, run_script
from examples.pipeline.config import PRESETS
from examples.pipeline.distributed import Device, resolve_device

HEAD_VARIANTS: dict[str, tuple[bool, bool]] = {
    "reference": (False, False),
    "dynamic conv as matmul": (True, False),
    "CoordConv coordinates once": (False, True),
    "fast_head (both)": (True, True),
}
"""Head variant -> (Projector.fast, CoordConv.fast); the last is ``CRISConfig(fast_head=True)``."""


def logit_differences(bench: Bench) -> dict[str, float]:
    """Each head variant's largest |eval logit - reference's| on the bench's inputs (no autocast)."""
    segmenter, head = bench.segmenter, bench.segmenter.decode_head
    was_training = segmenter.training
    segmenter.eval()
    outputs = {}
    with torch.no_grad():
        for name, switches in HEAD_VARIANTS.items():
            head.set_fast(*switches)
            outputs[name] = segmenter(bench.images, bench.tokens).float()
    segmenter.train(was_training)
    return {name: (out - outputs["reference"]).abs().max().item() for name, out in outputs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ablation-vitb", help="whose model and step (default: ablation-vitb, ViT-B-16 @ 480)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--variant", choices=list(TABLE_VII), default="baseline", help="the MaskSD variant stepped (default: baseline, one head pass)")
    parser.add_argument("--device", choices=get_args(Device), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (one profiled step of each head variant)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per head variant first")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error(f"--batch must be >= 2 (CRIS's BatchNorm trains on 2 samples or more), got {args.batch}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device = resolve_device(args.device)
    train = run_config(args.preset, amp="none")  # float32: the arithmetic the equality is stated in

    torch.manual_seed(0)
    bench = Bench(train, args.batch, device, {args.variant: TABLE_VII[args.variant]})
    head, model = bench.segmenter.decode_head, bench.models[args.variant]
    differences = logit_differences(bench)
    names = list(HEAD_VARIANTS)
    for name in names:
        head.set_fast(*HEAD_VARIANTS[name])
        for _ in range(args.warmup):
            bench.run(args.variant)
    profiles: dict[str, list] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated, so that none always runs first
            head.set_fast(*HEAD_VARIANTS[name])
            profiles[name].append(profile_step(lambda: bench.run(args.variant), model, device, steps=1, warmup=0))
            print(f"round {r + 1}, {name}: {profiles[name][-1].wall_ms / 1000:.2f} s", flush=True)
    head.set_fast(*HEAD_VARIANTS["reference"])

    head_parts = ("pyramid", "neck", "decoder", "projector")
    medians = {}
    for name, runs in profiles.items():
        both = {part: statistics.median(p.parts_ms.get(part, 0.0) + p.backward_ms.get(part, 0.0) for p in runs) / 1000
                for part in head_parts}
        medians[name] = {"step_s": statistics.median(p.wall_ms for p in runs) / 1000,
                         "head_forward_s": statistics.median(sum(p.parts_ms.get(h, 0.0) for h in head_parts) for p in runs) / 1000,
                         "head_backward_s": statistics.median(sum(p.backward_ms.get(h, 0.0) for h in head_parts) for p in runs) / 1000,
                         "rest_s": statistics.median(p.total_ms - sum(p.parts_ms.get(h, 0.0) + p.backward_ms.get(h, 0.0)
                                                                      for h in head_parts) for p in runs) / 1000,
                         **both}
    base = medians["reference"]["step_s"]
    rows = [
        [name, f"{m['step_s']:.2f}", f"{m['step_s'] / base:.3f}", f"{m['head_forward_s']:.2f}", f"{m['head_backward_s']:.2f}",
         *(f"{m[p]:.2f}" for p in head_parts), f"{m['rest_s']:.2f}", f"{differences[name]:.1e}"]
        for name, m in medians.items()
    ]
    cris = bench.segmenter.config
    header = ["head", "step (s)", "× reference", "head forward (s)", "head backward (s)",
              *(f"{p}, fwd + bwd (s)" for p in head_parts), "rest of the step (s)", "max |Δ logit| (fp32 eval)"]
    markdown = (
        f"# CRIS head variants: {cris.model_name} @ {cris.image_size} px, batch {args.batch}, {device.type}, float32\n\n"
        f"The trainer's step (preset `{args.preset}`, autocast off, random weights, "
        f"{'QuickGELU' if cris.quick_gelu else 'GELU'}) of `{args.variant}`, median of {args.rounds} alternating rounds "
        f"after {args.warmup} warm-up step(s) per variant; the step's wall time profiled, its parts the CPU time of their "
        f"operators (forward) and of the backward nodes they recorded (benchmarks/step_profile.py). "
        f"Torch threads: {torch.get_num_threads()}; the 2-core machine was shared with other jobs.\n\n"
        + markdown_table(header, rows)
    )
    print(markdown)
    label = f"cris_head_{device.type}_{cris.model_name}_{cris.image_size}"
    command = shlex.join(["python", "-m", "benchmarks.cris_head", *(argv if argv is not None else sys.argv[1:])])
    record = {"preset": args.preset, "batch": args.batch, "variant": args.variant, "rounds": args.rounds,
              "medians": medians, "max_logit_difference": differences,
              "profiles": {name: [p.record() for p in runs] for name, runs in profiles.items()}}
    paths = write_results(label, markdown, record, command)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
