"""Wall time and memory of one training step: baseline vs MaskSD and each branch alone.

    python benchmarks/train_step.py                                # CPU: the tiny model, batch 32
    python benchmarks/train_step.py --model ViT-B-16 --size 480 --batch 32 --amp bf16   # on a GPU

All variants wrap one segmenter (same weights) and are measured in one process, alternating
(one step of each variant per round, order rotated every round), after warm-up; the median over
rounds is reported, and its ratio to the baseline beside the FLOP ratio (FlopCounterMode, the
same step). Memory: the bytes autograd saves for backward (every device), and on a GPU also
torch.cuda.max_memory_allocated over the step. With --amp bf16 on a GPU also the model FLOP
utilisation (achieved FLOP/s over the device's dense bf16 peak).
Writes benchmarks/results/train_step_<device>_<model>_<size>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import get_args

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from common import TABLE_VII, count_flops, markdown_table, write_results
from examples.cris import CRIS, CRISConfig
from examples.pipeline.distributed import Device, resolve_device
from examples.pipeline.evaluation import Amp, autocast
from masksd import MaskSD

VARIANTS = {name: TABLE_VII[name] for name in ("baseline", "LMVSD, shared", "VMLSD, shared", "both, shared")}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
"""Dense bf16 tensor-core peaks (no sparsity) by device-name fragment, for MFU."""


class SavedActivations:
    """Bytes autograd keeps for the backward pass (each storage counted once): the training-memory
    cost of the extra branches, measurable on the CPU too (which has no allocator statistics)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


class Bench:
    def __init__(self, segmenter: CRIS, batch: int, device: torch.device, amp: str):
        self.device, self.amp = device, amp
        size = segmenter.config.image_size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, size, size, generator=g).to(device)
        sentences = ["the small red circle left of the large blue square behind the green triangle"] * batch
        self.tokens = segmenter.tokenize(sentences).to(device)
        self.masks = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float().to(device)
        self.models = {name: MaskSD(segmenter, cfg).to(device).train() for name, cfg in VARIANTS.items()}
        params = {id(p): p for m in self.models.values() for p in m.parameters() if p.requires_grad}
        self.optimizer = torch.optim.Adam(params.values(), lr=1e-6)
        self.generator = torch.Generator(device).manual_seed(0)

    def step(self, name: str) -> tuple[float, int | None]:
        """One timed training step; returns (seconds, peak allocated bytes on a GPU or None)."""
        model = self.models[name]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with autocast(self.device, self.amp):
            out = model(self.images, self.tokens, self.masks, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated() if cuda else None

    def saved_activations(self, name: str) -> int:
        """Bytes saved for backward by one forward of ``name`` (not timed)."""
        saved = SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            with autocast(self.device, self.amp):
                out = self.models[name](self.images, self.tokens, self.masks, generator=self.generator)
        del out
        return saved.bytes

    def flops(self, name: str) -> int:
        model = self.models[name]

        def step() -> None:
            with autocast(self.device, self.amp):
                out = model(self.images, self.tokens, self.masks, generator=self.generator)
            out.loss.backward()

        total, _, _ = count_flops(step)
        self.optimizer.zero_grad(set_to_none=True)
        return total


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=CRISConfig.tiny().model_name, help="masksd-tiny (default), ViT-B-16 or ViT-L-14")
    parser.add_argument("--size", type=int, help="image size (default: the model's first CRIS variant: 64 tiny, 480 ViT-B-16, 532 ViT-L-14)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--amp", choices=get_args(Amp), default="none")
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="measured steps per variant")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    cris = CRISConfig.for_model(args.model, pretrained=None, **({"image_size": args.size} if args.size else {}))
    bench = Bench(CRIS(cris), args.batch, device, args.amp)
    names = list(VARIANTS)

    for _ in range(args.warmup):
        for name in names:
            bench.step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    memory: dict[str, list[int]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so no variant always runs first
        for name in order:
            seconds, mem = bench.step(name)
            times[name].append(seconds)
            if mem is not None:
                memory[name].append(mem)
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    flops = {name: bench.flops(name) for name in names}
    activations = {name: bench.saved_activations(name) for name in names}

    base_t, base_f = statistics.median(times["baseline"]), flops["baseline"]
    base_m = max(memory["baseline"]) if memory["baseline"] else None
    peak = bf16_peak(device) if args.amp == "bf16" else None
    rows, data = [], {}
    for name in names:
        t = statistics.median(times[name])
        m = max(memory[name]) if memory[name] else None
        time_ratio, flop_ratio = t / base_t, flops[name] / base_f
        achieved = flops[name] / t
        row = [
            name, f"{1000 * t:.1f}", f"{args.batch / t:.1f}", f"{time_ratio:.2f}", f"{flop_ratio:.2f}",
            f"{100 * (time_ratio / flop_ratio - 1):+.1f} %", f"{flops[name] / 1e9:.1f}", f"{achieved / 1e12:.2f}",
            f"{activations[name] / 2**20:.0f}", f"{activations[name] / activations['baseline']:.2f}",
        ]
        if device.type == "cuda":
            row += [f"{m / 2**20:.0f}", f"{m / base_m:.2f}"]
        if peak:
            row.append(f"{100 * achieved / peak:.1f} %")
        rows.append(row)
        data[name] = {"median_s": t, "all_s": times[name], "images_per_s": args.batch / t, "time_ratio": time_ratio,
                      "flops": flops[name], "flop_ratio": flop_ratio, "peak_allocated_bytes": m,
                      "saved_activation_bytes": activations[name],
                      "achieved_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None}
    header = ["variant", "ms / step", "images / s", "time × baseline", "FLOPs × baseline", "time vs FLOP ratio",
              "GFLOPs / step", "achieved TFLOP/s", "saved activations (MiB)", "activations × baseline"]
    if device.type == "cuda":
        header += ["peak allocated (MiB)", "peak × baseline"]
    if peak:
        header.append("MFU (bf16 peak)")
    title = (f"# Training step: {cris.model_name} @ {cris.image_size} px, batch {args.batch}, {device.type}"
             f"{', ' + args.amp if args.amp != 'none' else ''}")
    markdown = (
        f"{title}\n\nMedian of {args.rounds} alternating rounds after {args.warmup} warm-up steps per variant "
        f"(forward, backward and Adam step). FLOPs: FlopCounterMode, 2 per multiply-add, same step.\n\n"
        + markdown_table(header, rows)
    )
    print(markdown)
    label = f"train_step_{device.type}_{cris.model_name}_{cris.image_size}" + (f"_{args.amp}" if args.amp != "none" else "")
    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = write_results(label, markdown, {"batch": args.batch, "amp": args.amp, "variants": data}, command)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
