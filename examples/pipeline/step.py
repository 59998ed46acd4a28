"""One training step, as the trainer takes it and as every benchmark times it.

:class:`TrainStep` is the optimisation of a run (fused Adam with warm-up and cosine decay, autocast, fp16
gradient scaling, clipping) and the GPU-side settings it runs under; :func:`masksd_losses` is what one
MaskSD step computes. ``TrainingLoop`` and ``benchmarks/train_step.py`` (with ``benchmarks/gpu_check``)
both build a ``TrainStep`` from the run's config, so a speed-up of the trainer shows in the benchmark.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function

from examples.pipeline.config import LoopConfig
from examples.pipeline.evaluation import autocast
from examples.pipeline.optim import build_optimizer, warmup_cosine

__all__ = ["PHASES", "GraphBreaks", "TrainStep", "masksd_losses", "use_device_settings"]

PHASES = ("forward", "backward", "optimizer step")
"""The profiler ranges (torch.profiler record_function names) one step is split into."""

Losses = dict[str, "torch.Tensor | None"]


def use_device_settings(model: nn.Module, device: torch.device) -> None:
    """The GPU-side settings every run trains under: cuDNN autotuning (the input size is fixed) and the 4-D
    weights in channels_last, so that convolutions, BatchNorm and the (B, C, h, w) <-> (B, hw, C) views of
    the CRIS head stay in one layout without copies. Nothing changes on a CPU: its runs stay bit-identical
    to the stored ones."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    model.to(memory_format=torch.channels_last)


class TrainStep:
    """One optimiser step of ``model``: ``step(compute_loss)`` runs ``compute_loss()`` under the run's
    autocast (a dict with the scalar ``"loss"`` to minimise and any other parts), zeroes the gradients,
    back-propagates (scaled under fp16), clips the gradient norm (``grad_clip`` > 0), steps the optimiser
    and the learning-rate schedule, and returns the dict. Reads no tensor value (no host sync of its own).

    Built from a :class:`LoopConfig` (``lr``, ``weight_decay``, ``backbone_lr_scale``, ``grad_clip``, ``amp``)
    over ``model``'s trainable parameters: those named with one of ``backbone_prefixes`` get
    ``lr * backbone_lr_scale``; the schedule warms up over ``warmup_steps`` and decays to 0 at
    ``total_steps``. Puts ``model`` in the layout it trains in first (:func:`use_device_settings`).
    The three phases are profiler ranges (:data:`PHASES`).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LoopConfig,
        device: torch.device,
        warmup_steps: int,
        total_steps: int,
        backbone_prefixes: tuple[str, ...] = (),
    ):
        use_device_settings(model, device)
        self.model, self.device, self.amp, self.grad_clip = model, device, cfg.amp, cfg.grad_clip
        prefixes = backbone_prefixes if cfg.backbone_lr_scale != 1.0 else ()
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale, prefixes)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def forward(self, compute_loss: Callable[[], Losses]) -> Losses:
        """``compute_loss()`` under the run's autocast (the step's forward alone: FLOP counts, memory)."""
        with record_function(PHASES[0]), autocast(self.device, self.amp):
            return compute_loss()

    def __call__(self, compute_loss: Callable[[], Losses]) -> Losses:
        losses = self.forward(compute_loss)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function(PHASES[1]):
            self.scaler.scale(losses["loss"]).backward()
        with record_function(PHASES[2]):
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        return losses


def masksd_losses(
    model: Any,
    images: torch.Tensor,
    tokens: Any,
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    distill_scale: float = 1.0,
) -> Losses:
    """MaskSD's training forward (``model``: MaskSD, or DDP around it) as a loss dict: ``loss`` (the total),
    ``seg``, ``lmvsd``, ``vmlsd`` and ``combined`` (None for a branch or view that is off)."""
    out = model(images, tokens, masks, generator=generator, distill_scale=distill_scale)
    return {"loss": out.loss, "seg": out.seg_loss, "lmvsd": out.lmvsd_loss, "vmlsd": out.vmlsd_loss, "combined": out.combined_loss}


class GraphBreaks(logging.Handler):
    """The graph breaks torch.compile meets while the block runs (``with GraphBreaks() as breaks:``), read from
    dynamo's ``graph_breaks`` log without printing it: :attr:`sites` counts them by "file:line: reason", and
    :meth:`summary` is one line with the number of graphs dynamo made."""

    LOGGERS = ("torch._dynamo.symbolic_convert.__graph_breaks", "torch._dynamo.convert_frame.__graph_breaks")
    """The loggers of dynamo's graph_breaks artifact (its internal names: if they move, nothing is collected)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.sites: Counter[str] = Counter()
        self.counted = 0
        """Graph breaks dynamo's own counters recorded within the block (a check on the log, whose format is internal)."""
        self._saved: list[tuple[logging.Logger, int, bool]] = []
        self._counted_before = 0

    def emit(self, record: logging.LogRecord) -> None:
        lines = [line.strip() for line in record.getMessage().splitlines()]
        if not lines or not lines[0].startswith("Graph break"):
            return
        where = lines[0].rsplit(" at ", 1)[-1]
        with_root = Path(where.rsplit(":", 1)[0])
        root = Path(__file__).resolve().parents[2]
        if with_root.is_absolute() and with_root.is_relative_to(root):
            where = str(Path(where).relative_to(root))
        reasons = [line for line in lines[1:] if line and not line.startswith(("Graph Break Reason", "Encountered graph break"))]
        self.sites[f"{where}: {reasons[0] if reasons else 'unknown reason'}"] += 1

    def __enter__(self) -> "GraphBreaks":
        self._counted_before = self._breaks_counted()
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(logging.DEBUG)
            logger.propagate = False  # collected here, not printed
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.counted = self._breaks_counted() - self._counted_before
        for logger, level, propagate in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved.clear()

    @staticmethod
    def _breaks_counted() -> int:
        try:
            import torch._dynamo.utils

            return sum(torch._dynamo.utils.counters["graph_break"].values())
        except Exception:
            return 0

    @property
    def count(self) -> int:
        """Graph breaks met in the block: those logged, or dynamo's count where the log said less."""
        return max(sum(self.sites.values()), self.counted)

    @staticmethod
    def graphs() -> int | None:
        """Graphs dynamo has compiled in this process (its internal counters: None if they move)."""
        try:
            import torch._dynamo.utils

            return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        except Exception:
            return None

    def summary(self) -> str:
        """"torch.compile: G graphs, N graph breaks (where: why ×n; ...)"."""
        count = self.count
        sites = "; ".join(f"{site} ×{n}" for site, n in self.sites.most_common())
        return f"torch.compile: {self.graphs()} graphs, {count} graph breaks" + (f" ({sites})" if sites else "")
