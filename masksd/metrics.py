"""Referring image segmentation metrics: IoU per sample, mIoU, overall IoU and Prec@X.

Definitions (over N samples, prediction P_i and ground truth G_i at the original
image size, the paper's binarised prediction):

- IoU_i = |P_i ∩ G_i| / |P_i ∪ G_i|. Empty-mask convention: if P_i and G_i are
  both empty IoU_i = 1 (nothing to find, nothing found); if only one is empty
  IoU_i = 0.
- mIoU = mean_i IoU_i (what the paper's tables report).
- overall IoU (oIoU) = Σ_i |P_i ∩ G_i| / Σ_i |P_i ∪ G_i| (cumulative; large
  objects weigh more). If every union is empty it is 1, as for a single sample.
- Prec@X = fraction of samples with IoU_i > X, strictly: the paper counts
  samples "with an IoU score higher than the threshold X"; X in 0.5..0.9.

:meth:`RISMetrics.compute` reports all of them as percentages (0–100), like the
paper; :func:`iou` returns a fraction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["PRECISION_THRESHOLDS", "RISMetrics", "format_table", "intersection_union", "iou"]

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _as_bool_tensor(x, name: str) -> torch.Tensor:
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or numpy array, got {type(x).__name__}")
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be bool (threshold probabilities first, e.g. probs > 0.35), got {t.dtype}")
    return t


def intersection_union(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample pixel counts |P ∩ G| and |P ∪ G|.

    ``pred``, ``target``: bool tensors or arrays (B, H, W), or equal-length
    sequences of bool (H_i, W_i) masks whose sizes may differ between samples.
    Returns two float64 CPU tensors (B,).
    """
    if isinstance(pred, (torch.Tensor, np.ndarray)) and isinstance(target, (torch.Tensor, np.ndarray)):
        p, t = _as_bool_tensor(pred, "pred"), _as_bool_tensor(target, "target")
        if p.ndim != 3 or p.shape != t.shape:
            raise ValueError(f"pred and target must both be (B, H, W), got pred {tuple(p.shape)} and target {tuple(t.shape)}")
        t = t.to(p.device)
        inter = (p & t).flatten(1).sum(1)  # (B,)
        union = (p | t).flatten(1).sum(1)  # (B,)
        return inter.double().cpu(), union.double().cpu()
    if not isinstance(pred, Sequence) or not isinstance(target, Sequence):
        raise TypeError(f"pred and target must both be (B, H, W) tensors/arrays or sequences of (H, W) masks, got {type(pred).__name__} and {type(target).__name__}")
    if len(pred) != len(target):
        raise ValueError(f"pred and target must hold as many masks, got {len(pred)} and {len(target)}")
    inter, union = torch.zeros(len(pred), dtype=torch.float64), torch.zeros(len(pred), dtype=torch.float64)
    for i, (p, t) in enumerate(zip(pred, target)):
        p, t = _as_bool_tensor(p, f"pred[{i}]"), _as_bool_tensor(t, f"target[{i}]")
        if p.ndim != 2 or p.shape != t.shape:
            raise ValueError(f"pred[{i}] and target[{i}] must both be (H, W), got {tuple(p.shape)} and {tuple(t.shape)}")
        t = t.to(p.device)
        inter[i] = (p & t).sum().item()
        union[i] = (p | t).sum().item()
    return inter, union


def _iou_from_counts(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    # both masks empty: union is 0 and the sample counts as a perfect match
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def iou(pred, target) -> float:
    """IoU of one bool (H, W) prediction against its (H, W) target, as a fraction.
    Both empty gives 1.0; exactly one empty gives 0.0."""
    inter, union = intersection_union([pred], [target])
    return _iou_from_counts(inter, union).item()


class RISMetrics:
    """Accumulates mIoU, overall IoU and Prec@X over batches and DDP ranks.

    ``update(pred, target)`` adds a batch (see :func:`intersection_union` for the
    accepted forms) and returns its per-sample IoUs; ``compute()`` returns
    percentages. The running sums are float64, so accumulation order does not
    change the result beyond rounding. When ``torch.distributed`` is
    initialised, ``compute()`` sums the state over all ranks (a collective:
    every rank must call it) without changing the local state.
    """

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> None:
        thresholds = tuple(float(x) for x in thresholds)
        if not all(0.0 <= x < 1.0 for x in thresholds):
            raise ValueError(f"thresholds must lie in [0, 1), got {thresholds}")
        self.thresholds = thresholds
        # [samples, Σ IoU_i, Σ |P ∩ G|, Σ |P ∪ G|, #(IoU_i > X) for each X]
        self.state = torch.zeros(4 + len(thresholds), dtype=torch.float64)

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self.state.zero_()

    def update(self, pred, target) -> torch.Tensor:
        """Add a batch of bool predictions and targets; returns its IoUs, float64 (B,)."""
        inter, union = intersection_union(pred, target)
        ious = _iou_from_counts(inter, union)  # (B,)
        hits = [(ious > x).sum().item() for x in self.thresholds]
        self.state += torch.tensor([len(ious), ious.sum().item(), inter.sum().item(), union.sum().item(), *hits], dtype=torch.float64)
        return ious

    def global_state(self) -> torch.Tensor:
        """The state summed over ranks when ``torch.distributed`` is initialised
        (a collective), else a copy of the local state. float64 (4 + #thresholds,)."""
        state = self.state.clone()
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            state = state.to(device)
            dist.all_reduce(state, op=dist.ReduceOp.SUM)
            state = state.cpu()
        return state

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "oIoU", "Prec@0.5", ..., "samples"}``: float percentages, and the int sample count."""
        state = self.global_state()
        samples, iou_sum, inter_sum, union_sum = state[:4].tolist()
        if samples == 0:
            raise ValueError("RISMetrics.compute() needs at least one sample; update() was never called (on any rank)")
        results = {
            "mIoU": 100.0 * iou_sum / samples,
            "oIoU": 100.0 * (inter_sum / union_sum if union_sum > 0 else 1.0),
        }
        for x, hits in zip(self.thresholds, state[4:].tolist()):
            results[f"Prec@{x:g}"] = 100.0 * hits / samples
        results["samples"] = int(samples)
        return results


def format_table(results: Mapping[str, float] | Mapping[str, Mapping[str, float]], digits: int = 2) -> str:
    """A markdown table of :meth:`RISMetrics.compute` results.

    ``results``: one result dict (one row), or ``{row name: result dict}`` (for
    example one row per split), all with the same keys. Numbers are printed with
    ``digits`` decimals; ints (the sample count) as they are.
    """
    if not results:
        raise ValueError("results must hold at least one result")
    rows = {"": results} if all(isinstance(v, (int, float)) for v in results.values()) else dict(results)
    columns = list(next(iter(rows.values())).keys())
    for name, row in rows.items():
        if list(row.keys()) != columns:
            raise ValueError(f"results[{name!r}] has columns {list(row.keys())}, expected {columns}")

    def cell(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:.{digits}f}"

    header = ["split", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(cell(row[c]) for c in columns)]) + " |")
    return "\n".join(lines)
