"""Wall time and memory of one training step: baseline vs MaskSD and each branch alone.

    python -m benchmarks.train_step                                       # CPU: the demo's tiny model, batch 32
    python -m benchmarks.train_step --preset ablation-vitb --batch 32     # on a GPU: ViT-B-16 @ 480, bf16

The step timed is the trainer's own (examples.pipeline.step.TrainStep, built from the preset's TrainConfig:
fused Adam, the warm-up/cosine schedule, clipping, autocast, the GPU-side settings), on random weights that
build the network the preset's weights would (QuickGELU for OpenAI's CLIP). All variants wrap one segmenter
(same weights) and are measured in one process, alternating (one step of each variant per round, order rotated
every round), after warm-up; the median over rounds is reported, and its ratio to the baseline beside the FLOP
ratio (FlopCounterMode, the same step, counted on two samples and scaled to the batch). Memory: the bytes
autograd saves for backward (every device), and on a GPU also torch.cuda.max_memory_allocated over the step.
With bf16 autocast on a GPU also the model FLOP utilisation (achieved FLOP/s over the device's dense bf16
peak). Bench and the figures are shared with benchmarks/gpu_check.
Writes benchmarks/results/train_step_<device>_<model>_<size>.{md,json}.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import get_args

import torch
from torch import nn

from benchmarks.common import TABLE_VII, command_line, count_flops, markdown_table, write_results
from examples.cris import CRISConfig
from examples.pipeline.cli import ScriptParser, run_script
from examples.pipeline.config import PRESETS, TrainConfig, preset
from examples.pipeline.distributed import Device, resolve_device
from examples.pipeline.evaluation import Amp
from examples.pipeline.factory import backbone_prefixes, build_segmenter, random_init
from examples.pipeline.step import TrainStep, masksd_losses
from masksd import MaskSD, MaskSDConfig

VARIANTS = {name: TABLE_VII[name] for name in ("baseline", "LMVSD, shared", "VMLSD, shared", "both, shared")}
VARIANTS["both, checkpointed"] = replace(TABLE_VII["both, shared"], checkpoint_branches=True)  # recomputes the branches
BF16_PEAK_TFLOPS = {
    "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H200 NVL": 835.0, "GH200": 989.0,
    "A100": 312.0, "L40S": 362.0, "4090": 165.0,
}
"""Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by device-name fragment: the longest fragment in
the name wins ("NVIDIA H100 PCIe" -> "H100 PCIe", "NVIDIA H100 80GB HBM3" and "NVIDIA H200" -> the SXM parts)."""
FLOP_SAMPLES = 2
"""FLOPs are counted on this many samples and scaled to the batch: every counted op (matmul, convolution,
attention) works per sample, and CRIS's BatchNorm cannot train on one sample."""


def bf16_peak(device: torch.device) -> tuple[str, float] | None:
    """(matched name fragment, dense bf16 peak FLOP/s) of a CUDA device; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> tuple[str, float] | None:
    """The BF16_PEAK_TFLOPS entry whose fragment is the longest one in ``name``, in FLOP/s."""
    matches = [key for key in BF16_PEAK_TFLOPS if key in name]
    if not matches:
        return None
    key = max(matches, key=len)
    return key, BF16_PEAK_TFLOPS[key] * 1e12


def mfu_peak(device: torch.device, amp: str) -> float | None:
    """The peak FLOP/s model FLOP utilisation is measured against: the dense bf16 peak, with bf16 autocast
    on a known GPU only (fp32 or fp16 steps have other peaks)."""
    found = bf16_peak(device) if amp == "bf16" else None
    return found[1] if found else None


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


@dataclass
class Timing:
    """Measured training steps of one variant."""

    seconds: list[float] = field(default_factory=list)
    """Wall time of each measured step (synchronised on a GPU)."""
    peak_bytes: list[int] = field(default_factory=list)
    """torch.cuda.max_memory_allocated over each step; empty on a CPU."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak(self) -> int | None:
        return max(self.peak_bytes) if self.peak_bytes else None


SCHEDULE_STEPS = 10_000
"""The learning-rate schedule's length in the benchmark's TrainStep (its value does not change the step's work)."""


class Bench:
    """The trainer's step (:class:`~examples.pipeline.step.TrainStep` built from ``train``, a TrainConfig such as
    ``preset("ablation-vitb")``) of one segmenter wrapped in MaskSD once per variant (the same weights), on one
    batch of random inputs: timed training steps, their FLOPs and their memory.

    ``variants``: name -> MaskSDConfig (default: VARIANTS, the baseline and each branch alone and together).
    ``segmenter``: default ``build_segmenter(random_init(train))``. ``schedule``: (warm-up steps, total steps)
    of the learning-rate schedule (the trainer's depend on the dataset's length). One TrainStep covers every variant's
    parameters under MaskSD's own names (so ``--backbone-lr-scale`` finds the backbone as in training); a
    variant's step updates only the parameters its loss reaches, as the trainer's optimiser over that
    variant alone would (Adam skips parameters without a gradient), and keeps one optimiser state.
    """

    def __init__(
        self,
        train: TrainConfig,
        batch: int,
        device: torch.device,
        variants: dict[str, MaskSDConfig] | None = None,
        segmenter: nn.Module | None = None,
        schedule: tuple[int, int] = (0, SCHEDULE_STEPS),
    ):
        self.train, self.device, self.amp = train, device, train.amp
        self.segmenter = build_segmenter(random_init(train)) if segmenter is None else segmenter
        variants = VARIANTS if variants is None else variants
        self.models = {name: MaskSD(self.segmenter, cfg).to(device).train() for name, cfg in variants.items()}
        holder = nn.Module()  # every variant's parameters once, named as inside MaskSD ("segmenter.backbone....")
        holder.segmenter = self.segmenter
        holder.branches = nn.ModuleList(m.branches for m in self.models.values())
        self.train_step = TrainStep(holder, train, device, *schedule, backbone_prefixes(self.segmenter))
        self.optimizer = self.train_step.optimizer
        self.generator = torch.Generator(device).manual_seed(0)
        self.set_batch(batch)

    def set_batch(self, batch: int) -> None:
        """New random inputs of ``batch`` samples (the old ones are released first)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.images = self.tokens = self.masks = None
        self.batch = batch
        size = self.segmenter.config.image_size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, size, size, generator=g).to(self.device)  # (B, 3, S, S)
        sentences = ["the small red circle left of the large blue square behind the green triangle"] * batch
        self.tokens = self.segmenter.tokenize(sentences).to(self.device)  # (B, L)
        self.masks = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float().to(self.device)  # (B, 1, S, S)

    def losses(self, name: str, samples: int | None = None) -> dict[str, torch.Tensor | None]:
        """The trainer's loss dict (examples.pipeline.step.masksd_losses) of ``name`` on the first ``samples``
        inputs (all by default), without autocast (TrainStep adds it)."""
        n = self.batch if samples is None else samples
        return masksd_losses(self.models[name], self.images[:n], self.tokens[:n], self.masks[:n], self.generator)

    def loss(self, name: str, samples: int | None = None) -> torch.Tensor:
        """The training loss of ``name`` on the first ``samples`` inputs, under the run's autocast."""
        return self.train_step.forward(lambda: self.losses(name, samples))["loss"]

    def run(self, name: str) -> None:
        """One training step of ``name``: the trainer's TrainStep. Reads no tensor value (no host sync of its own)."""
        self.train_step(lambda: self.losses(name))

    def step(self, name: str) -> tuple[float, int | None]:
        """One timed training step; returns (seconds, peak allocated bytes on a GPU or None)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.run(name)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated() if cuda else None

    def measure(
        self, names: list[str], warmup: int, rounds: int, deadline: float | None = None
    ) -> dict[str, Timing]:
        """``warmup`` untimed steps per variant, then up to ``rounds`` alternating rounds (one step of each
        variant, order rotated every round so none always runs first). ``deadline`` (time.perf_counter
        value): stop starting rounds after it, keeping at least one."""
        for _ in range(warmup):
            for name in names:
                self.step(name)
        timings = {name: Timing() for name in names}
        for r in range(rounds):
            if r and deadline is not None and time.perf_counter() > deadline:
                break
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                seconds, peak = self.step(name)
                timings[name].seconds.append(seconds)
                if peak is not None:
                    timings[name].peak_bytes.append(peak)
        return timings

    def saved_activations(self, name: str) -> int:
        """Bytes saved for backward by one forward of ``name`` (not timed)."""
        saved = SavedActivations()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = self.loss(name)
        del loss
        return saved.bytes

    def flops(self, name: str, samples: int = FLOP_SAMPLES) -> int:
        """FLOPs (FlopCounterMode, 2 per multiply-add) of forward + backward of ``name`` over the whole batch,
        counted on ``samples`` of it and scaled: the work is per sample, but FlopCounterMode ignores ``groups``
        in convolution_backward, so the projector's dynamic convolution (one grouped conv over the whole batch)
        would count B-fold at the full batch; a small count also keeps the unfused attention it routes through
        small on big models."""
        n = min(samples, self.batch)
        total, _, _ = count_flops(lambda: self.loss(name, n).backward())
        self.optimizer.zero_grad(set_to_none=True)
        return total * self.batch // n


def step_figures(timing: Timing, batch: int, flops: int, peak_flops: float | None) -> dict:
    """The figures of one variant: median step, images/s, FLOPs, achieved TFLOP/s, MFU, peak memory."""
    t = timing.median
    achieved = flops / t
    return {
        "median_s": t, "all_s": timing.seconds, "images_per_s": batch / t, "flops": flops,
        "achieved_tflops": achieved / 1e12, "mfu": achieved / peak_flops if peak_flops else None,
        "peak_allocated_bytes": timing.peak,
    }


def run_config(name: str, model: str | None = None, size: int | None = None, amp: str | None = None) -> TrainConfig:
    """Preset ``name`` with another model (at its CRIS size), image size or autocast: the run whose step is timed."""
    overrides: dict = {}
    if model:
        overrides.update(model=model, image_size=CRISConfig.for_model(model).image_size)
    if size:
        overrides["image_size"] = size
    if amp:
        overrides["amp"] = amp
    return preset(name, **overrides)


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="the run whose step is timed (its model, size, optimiser and amp; random weights): demo (default, "
                        "the tiny model), ablation-vitb (ViT-B-16 @ 480), refcoco-vitl (ViT-L-14 @ 532), ...")
    parser.add_argument("--model", help="another open_clip model than the preset's (masksd-tiny, ViT-B-16, ViT-L-14), at its CRIS size")
    parser.add_argument("--size", type=int, help="another image size than the preset's (or --model's)")
    parser.add_argument("--batch", type=int, help="batch (default: the preset's, 32)")
    parser.add_argument("--amp", choices=get_args(Amp), help="another autocast than the preset's (demo: none; the paper's: bf16)")
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to measure (the baseline is always one: the ratios are to it)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    try:
        train = run_config(args.preset, args.model, args.size, args.amp)
    except ValueError as error:
        parser.error(str(error))
    batch = args.batch or train.batch_size

    torch.manual_seed(0)
    bench = Bench(train, batch, device)
    cris = bench.segmenter.config
    names = ["baseline"] + [name for name in VARIANTS if name in args.variants and name != "baseline"]
    timings = bench.measure(names, args.warmup, args.rounds)
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    flops = {name: bench.flops(name) for name in names}
    activations = {name: bench.saved_activations(name) for name in names}

    peak = mfu_peak(device, train.amp)
    figures = {name: step_figures(timings[name], batch, flops[name], peak) for name in names}
    base = figures["baseline"]
    rows, data = [], {}
    for name in names:
        f = figures[name]
        t, m = f["median_s"], f["peak_allocated_bytes"]
        time_ratio, flop_ratio = t / base["median_s"], flops[name] / base["flops"]
        row = [
            name, f"{1000 * t:.1f}", f"{f['images_per_s']:.1f}", f"{time_ratio:.2f}", f"{flop_ratio:.2f}",
            f"{100 * (time_ratio / flop_ratio - 1):+.1f} %", f"{flops[name] / 1e9:.1f}", f"{f['achieved_tflops']:.2f}",
            f"{activations[name] / 2**20:.0f}", f"{activations[name] / activations['baseline']:.2f}",
        ]
        if device.type == "cuda":
            row += [f"{m / 2**20:.0f}", f"{m / base['peak_allocated_bytes']:.2f}"]
        if peak:
            row.append(f"{100 * f['mfu']:.1f} %")
        rows.append(row)
        data[name] = {**f, "time_ratio": time_ratio, "flop_ratio": flop_ratio, "saved_activation_bytes": activations[name]}
    header = ["variant", "ms / step", "images / s", "time × baseline", "FLOPs × baseline", "time vs FLOP ratio",
              "GFLOPs / step", "achieved TFLOP/s", "saved activations (MiB)", "activations × baseline"]
    if device.type == "cuda":
        header += ["peak allocated (MiB)", "peak × baseline"]
    if peak:
        header.append("MFU (bf16 peak)")
    title = (f"# Training step: {cris.model_name} @ {cris.image_size} px, batch {batch}, {device.type}"
             f"{', ' + train.amp if train.amp != 'none' else ''}")
    markdown = (
        f"{title}\n\nMedian of {args.rounds} alternating rounds after {args.warmup} warm-up steps per variant "
        f"(the trainer's step of preset `{args.preset}`: forward, backward, fused Adam, schedule; random weights, "
        f"{'QuickGELU' if cris.quick_gelu else 'GELU'}). FLOPs: FlopCounterMode, 2 per multiply-add, same step.\n\n"
        + markdown_table(header, rows)
    )
    print(markdown)
    label = f"train_step_{device.type}_{cris.model_name}_{cris.image_size}" + (f"_{train.amp}" if train.amp != "none" else "")
    command = command_line("benchmarks.train_step", argv)
    record = {"preset": args.preset, "batch": batch, "amp": train.amp, "quick_gelu": cris.quick_gelu, "variants": data}
    paths = write_results(label, markdown, record, command)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
