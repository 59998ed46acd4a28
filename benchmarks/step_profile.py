"""Where a MaskSD training step spends its time: torch.profiler over the trainer's step, per part and per kernel.

:func:`labelled_parts` marks the parts of a MaskSD(CRIS) step as profiler ranges (embeddings, image encoder,
text encoder, the decode head's pyramid, neck, decoder and projector, masking, losses; the step's own
forward, backward and optimizer-step ranges come from examples.pipeline.step.TrainStep); :func:`profile_step`
profiles a few steps and attributes every operator's time to the innermost part it ran in, and every backward
node's to the part whose forward recorded it: GPU kernel time on CUDA, CPU time on a CPU. The parts of every
branch are summed (the image encoder's time is the main branch's and LMVSD's). Used by benchmarks/gpu_check (the profile section) and benchmarks/cris_head.py.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function

from examples.pipeline.step import PHASES

__all__ = ["PARTS", "StepProfile", "labelled_parts", "profile_step"]

SEGMENTER_PARTS = {"embed_image": "embeddings", "embed_text": "embeddings", "encode_image": "image encoder",
                   "encode_text": "text encoder"}
"""The segmenter's protocol methods and the part each one's time is reported under."""
HEAD_PARTS = ("pyramid", "neck", "decoder", "projector")
"""CRIS's decode-head modules, reported under their own names (another head is reported as "decode head")."""
PARTS = ("embeddings", "image encoder", "text encoder", *HEAD_PARTS, "decode head", "masking", "losses",
         "forward, other", "backward", "optimizer step", "outside the step")
"""Every part a profile reports, in order. "forward, other": MaskSD's own glue (checks, correlation outside the
masking, the branches' arithmetic); "outside the step": what ran in no range (zeroing the gradients, the caller)."""
_LABEL = {"forward": "forward, other", "backward": "backward", "optimizer step": "optimizer step"}
"""TrainStep's phase ranges and the parts their otherwise unlabelled time goes to."""
assert set(_LABEL) == set(PHASES)


@contextlib.contextmanager
def labelled_parts(model: nn.Module) -> Iterator[None]:
    """Within the block, the parts of ``model`` (MaskSD around a segmenter) run inside profiler ranges named
    after :data:`PARTS`; outside it they are as they were (instance attributes set here are removed)."""
    import masksd.wrapper

    patched: list[tuple[Any, str, bool, Any]] = []  # (owner, attribute, had its own, previous)

    def label(owner: Any, attribute: str, name: str) -> None:
        own = attribute in vars(owner)
        previous = getattr(owner, attribute)

        def labelled(*args: Any, **kwargs: Any) -> Any:
            with record_function(name):
                return previous(*args, **kwargs)

        patched.append((owner, attribute, own, vars(owner).get(attribute)))
        setattr(owner, attribute, labelled)

    segmenter = model.segmenter
    for method, name in SEGMENTER_PARTS.items():
        label(segmenter, method, name)
    heads = [segmenter.decode_head] + [b.head for b in model.branches.values() if b.head is not None]
    for head in heads:
        parts = [p for p in HEAD_PARTS if isinstance(getattr(head, p, None), nn.Module)]
        for part in parts:
            label(getattr(head, part), "forward", part)
        if not parts:
            label(head, "forward", "decode head")
    label(model, "_perturb", "masking")  # a branch's ranking, selection and masking of its input
    label(model, "_feature_positions", "masking")  # the same at the features site
    for branch in model.branches.values():
        label(branch.criterion, "forward", "losses")
    label(masksd.wrapper, "segmentation_loss", "losses")  # the main branch's BCE, a function the wrapper looks up per call
    try:
        yield
    finally:
        for owner, attribute, own, previous in reversed(patched):
            if own:
                setattr(owner, attribute, previous)
            else:
                delattr(owner, attribute)


@dataclass
class StepProfile:
    """Per-step times of a profiled training step."""

    clock: str
    """"cuda" (GPU kernel time) or "cpu" (CPU time of the operators)."""
    steps: int
    """Steps profiled; every figure is their mean."""
    parts_ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds per step by part (:data:`PARTS`; parts that took no time are left out): the forward parts'
    forward time, and "backward" for the backward no forward part recorded (gradient accumulation, the engine)."""
    backward_ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds per step of each forward part's backward (the nodes its operators recorded)."""
    top: list[dict[str, Any]] = field(default_factory=list)
    """The operators (CPU) or kernels (CUDA) with the most time: name, calls and ms per step, share of the total."""
    wall_ms: float = 0.0
    """Median wall time of the profiled steps (the profiler's overhead included)."""

    @property
    def total_ms(self) -> float:
        return sum(self.parts_ms.values()) + sum(self.backward_ms.values())

    def record(self) -> dict[str, Any]:
        return {"clock": self.clock, "steps": self.steps, "parts_ms": self.parts_ms, "backward_ms": self.backward_ms,
                "total_ms": self.total_ms, "wall_ms": self.wall_ms, "top": self.top}


def profile_step(step: Callable[[], None], model: nn.Module, device: torch.device, steps: int = 3, warmup: int = 1,
                 top: int = 15) -> StepProfile:
    """Profile ``steps`` calls of ``step`` (a TrainStep of ``model``, which labels its phases) after ``warmup``
    unprofiled ones, with :func:`labelled_parts`; each operator's own time goes to the innermost part whose
    range contains its start (on CUDA the kernels an operator launched, the autograd thread's included), and
    each backward node's to the part whose forward recorded it."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(warmup):
        step()
    _synchronize(device)
    walls = []
    with labelled_parts(model), profile(activities=activities) as prof:
        for _ in range(steps):
            start = _now(device)
            step()
            walls.append(_elapsed(start, device))
    parts, backward = _parts(prof.events(), cuda, steps)
    return StepProfile("cuda" if cuda else "cpu", steps, parts, backward, _top(prof, cuda, steps, top), statistics.median(walls))


def _now(device: torch.device) -> float:
    import time

    _synchronize(device)
    return time.perf_counter()


def _elapsed(start: float, device: torch.device) -> float:
    import time

    _synchronize(device)
    return 1000 * (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FORWARD_PARTS = PARTS[: PARTS.index("forward, other") + 1]
"""The parts a forward operator can run in; the backward of each is timed apart (:attr:`StepProfile.backward_ms`)."""
_ENGINE = "autograd::engine::evaluate_function"
"""The autograd engine's range around each backward node (its sequence number is the forward operator's)."""


def _parts(events: Any, cuda: bool, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per step (forward parts and phases; backward by the forward part of each node): each CPU-side
    event's own time (its own kernels' on CUDA) goes to the innermost labelled range containing its start; a
    backward node's range is labelled with the part whose forward operator recorded it (same sequence number)."""
    names = set(PARTS) | set(_LABEL)
    cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU), key=lambda e: e.time_range.start)
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in cpu if e.name in names and e.is_user_annotation]
    labels = _innermost(cpu, ranges)
    forward = {}  # sequence number -> the forward part whose operator recorded that autograd node
    for e, label in zip(cpu, labels):
        if e.sequence_nr >= 0 and label in FORWARD_PARTS and not e.name.startswith(_ENGINE):
            forward.setdefault(e.sequence_nr, label)
    nodes = [(e.time_range.start, e.time_range.end, f"backward of {forward[e.sequence_nr]}") for e in cpu
             if e.name.startswith(_ENGINE) and e.sequence_nr in forward]
    totals: dict[str, float] = {}
    for e, label in zip(cpu, _innermost(cpu, ranges + nodes)):
        own = e.self_device_time_total if cuda else e.self_cpu_time_total  # microseconds
        if own:
            totals[label] = totals.get(label, 0.0) + own / 1000 / steps
    parts = {part: totals[part] for part in PARTS if part in totals}
    backward = {part: totals[f"backward of {part}"] for part in FORWARD_PARTS if f"backward of {part}" in totals}
    return parts, backward


def _innermost(events: list, ranges: list[tuple[float, float, str]]) -> list[str]:
    """For each event (sorted by start) the part of the innermost of the (nested) ``ranges`` containing its start:
    one sweep; TrainStep's phase ranges name their otherwise unlabelled time (:data:`_LABEL`)."""
    ranges = sorted(ranges, key=lambda r: (r[0], -r[1]))
    labels, open_ranges, following = [], [], 0  # open_ranges: those containing the sweep's position, innermost last
    for e in events:
        start = e.time_range.start
        while following < len(ranges) and ranges[following][0] <= start:
            while open_ranges and open_ranges[-1][1] <= ranges[following][0]:
                open_ranges.pop()
            open_ranges.append(ranges[following])
            following += 1
        while open_ranges and open_ranges[-1][1] <= start:
            open_ranges.pop()
        label = open_ranges[-1][2] if open_ranges else "outside the step"
        labels.append(_LABEL.get(label, label))
    return labels


def _top(prof: Any, cuda: bool, steps: int, count: int) -> list[dict[str, Any]]:
    """The operators (CPU) or kernels (CUDA) with the most own time per step."""
    averages = [a for a in prof.key_averages() if not a.is_user_annotation]
    if cuda:
        averages = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
        own = lambda a: a.self_device_time_total  # noqa: E731
    else:
        averages = [a for a in averages if a.device_type == torch.autograd.DeviceType.CPU]
        own = lambda a: a.self_cpu_time_total  # noqa: E731
    total = sum(own(a) for a in averages) or 1.0
    ranked = sorted(averages, key=own, reverse=True)[:count]
    return [{"name": a.key[:120], "calls": a.count / steps, "ms": own(a) / 1000 / steps, "share": own(a) / total} for a in ranked]
