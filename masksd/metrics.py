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

No-target samples (generalised RIS). gRefCOCO has expressions that refer to
nothing: their ground truth is empty. GRES (Liu, Ding and Jiang, "GRES: Generalized
Referring Expression Segmentation", CVPR 2023, arXiv:2306.00968, Sec. "Evaluation
Metrics") reports, with no-target samples as the positive class of a detection of
"nothing here" (TP: no target, predicted empty; FN: no target, predicted non-empty;
TN: target, predicted non-empty; FP: target, predicted empty):

- gIoU = mean per-sample IoU, where a no-target sample counts 1 if its prediction
  is empty (TP) and 0 otherwise (FN). That is exactly our empty-mask convention
  above, so gIoU equals mIoU.
- cIoU = Σ_i |P_i ∩ G_i| / Σ_i |P_i ∪ G_i| (cumulative), which equals oIoU: a
  no-target sample adds its predicted area to the union and nothing to the
  intersection.
- N-acc = TP / (TP + FN): share of no-target samples predicted empty.
- T-acc = TN / (TN + FP): share of target samples predicted non-empty (NaN when
  every sample had no target).

Here "predicted empty" means the binarised mask has no positive pixel. (The GRES
reference code, ReLA's ``gres_model/evaluation/refer_evaluation.py``, decides it by
a separate no-target head, adds 1 to both accuracy denominators and counts Pr@X over
target samples only; we follow the paper's ratios and keep Prec@X over all samples.)
:meth:`RISMetrics.compute` adds these four keys only when a no-target sample was
seen, so RefCOCO tables keep their columns.

:meth:`RISMetrics.compute` reports all of them as percentages (0–100), like the
papers; :func:`iou` returns a fraction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["NO_TARGET_KEYS", "PRECISION_THRESHOLDS", "RISMetrics", "format_table", "intersection_union", "iou", "sum_over_ranks"]

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
NO_TARGET_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc")
"""The GRES metrics :meth:`RISMetrics.compute` adds once a sample with an empty ground truth was seen."""


def _as_bool_tensor(x, name: str) -> torch.Tensor:
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or numpy array, got {type(x).__name__}")
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be bool (threshold probabilities first, e.g. probs > 0.35), got {t.dtype}")
    return t


def _pixel_counts(pred, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample |P ∩ G|, |P ∪ G|, |P| and |G| as float64 CPU tensors (B,); see :func:`intersection_union`."""
    if isinstance(pred, (torch.Tensor, np.ndarray)) and isinstance(target, (torch.Tensor, np.ndarray)):
        p, t = _as_bool_tensor(pred, "pred"), _as_bool_tensor(target, "target")
        if p.ndim != 3 or p.shape != t.shape:
            raise ValueError(f"pred and target must both be (B, H, W), got pred {tuple(p.shape)} and target {tuple(t.shape)}")
        p, t = p.flatten(1), t.to(p.device).flatten(1)  # (B, H*W)
        counts = torch.stack([(p & t).sum(1), (p | t).sum(1), p.sum(1), t.sum(1)])  # (4, B)
        return tuple(counts.double().cpu())
    if not isinstance(pred, Sequence) or not isinstance(target, Sequence):
        raise TypeError(f"pred and target must both be (B, H, W) tensors/arrays or sequences of (H, W) masks, got {type(pred).__name__} and {type(target).__name__}")
    if len(pred) != len(target):
        raise ValueError(f"pred and target must hold as many masks, got {len(pred)} and {len(target)}")
    counts = torch.zeros(4, len(pred), dtype=torch.float64)
    for i, (p, t) in enumerate(zip(pred, target)):
        p, t = _as_bool_tensor(p, f"pred[{i}]"), _as_bool_tensor(t, f"target[{i}]")
        if p.ndim != 2 or p.shape != t.shape:
            raise ValueError(f"pred[{i}] and target[{i}] must both be (H, W), got {tuple(p.shape)} and {tuple(t.shape)}")
        t = t.to(p.device)
        counts[:, i] = torch.stack([(p & t).sum(), (p | t).sum(), p.sum(), t.sum()]).double().cpu()
    return tuple(counts)


def intersection_union(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample pixel counts |P ∩ G| and |P ∪ G|.

    ``pred``, ``target``: bool tensors or arrays (B, H, W), or equal-length
    sequences of bool (H_i, W_i) masks whose sizes may differ between samples.
    Returns two float64 CPU tensors (B,).
    """
    inter, union, _, _ = _pixel_counts(pred, target)
    return inter, union


def _iou_from_counts(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    # both masks empty: union is 0 and the sample counts as a perfect match
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def iou(pred, target) -> float:
    """IoU of one bool (H, W) prediction against its (H, W) target, as a fraction.
    Both empty gives 1.0; exactly one empty gives 0.0."""
    inter, union = intersection_union([pred], [target])
    return _iou_from_counts(inter, union).item()


def sum_over_ranks(state: torch.Tensor) -> torch.Tensor:
    """A copy of the CPU tensor ``state`` summed over all ranks when ``torch.distributed`` is initialised
    (a collective: every rank must call it; through the GPU for nccl), else a plain copy."""
    state = state.clone()
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        state = state.to(device)
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
        state = state.cpu()
    return state


class RISMetrics:
    """Accumulates mIoU, overall IoU and Prec@X (and, once a no-target sample came, the
    GRES metrics) over batches and DDP ranks.

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
        # [samples, Σ IoU_i, Σ |P ∩ G|, Σ |P ∪ G|, #no-target, #no-target predicted empty,
        #  #target predicted non-empty, #(IoU_i > X) for each X]
        self.state = torch.zeros(7 + len(thresholds), dtype=torch.float64)

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self.state.zero_()

    def update(self, pred, target) -> torch.Tensor:
        """Add a batch of bool predictions and targets; returns its IoUs, float64 (B,)."""
        inter, union, pred_area, target_area = _pixel_counts(pred, target)
        ious = _iou_from_counts(inter, union)  # (B,)
        no_target, predicted = target_area == 0, pred_area > 0  # (B,) each
        hits = [(ious > x).sum() for x in self.thresholds]
        counts = [len(ious), ious.sum(), inter.sum(), union.sum(), no_target.sum(), (no_target & ~predicted).sum(), (~no_target & predicted).sum(), *hits]
        self.state += torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in counts])
        return ious

    def global_state(self) -> torch.Tensor:
        """The state summed over ranks when ``torch.distributed`` is initialised
        (a collective), else a copy of the local state. float64 (7 + #thresholds,)."""
        return sum_over_ranks(self.state)

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "oIoU", "Prec@0.5", ..., "samples"}``: float percentages, and the int sample
        count; with ``gIoU, cIoU, N-acc, T-acc`` (:data:`NO_TARGET_KEYS`) before ``samples`` when
        any rank saw a sample with an empty ground truth."""
        state = self.global_state()
        samples, iou_sum, inter_sum, union_sum, no_target, no_target_empty, target_found = state[:7].tolist()
        if samples == 0:
            raise ValueError("RISMetrics.compute() needs at least one sample; update() was never called (on any rank)")
        results = {
            "mIoU": 100.0 * iou_sum / samples,
            "oIoU": 100.0 * (inter_sum / union_sum if union_sum > 0 else 1.0),
        }
        for x, hits in zip(self.thresholds, state[7:].tolist()):
            results[f"Prec@{x:g}"] = 100.0 * hits / samples
        if no_target > 0:
            targets = samples - no_target
            results["gIoU"] = results["mIoU"]  # the same sum: an empty prediction on an empty target scores 1
            results["cIoU"] = results["oIoU"]
            results["N-acc"] = 100.0 * no_target_empty / no_target
            results["T-acc"] = 100.0 * target_found / targets if targets > 0 else float("nan")
        results["samples"] = int(samples)
        return results


def format_table(results: Mapping[str, float] | Mapping[str, Mapping[str, float]], digits: int = 2) -> str:
    """A markdown table of :meth:`RISMetrics.compute` results.

    ``results``: one result dict (one row), or ``{row name: result dict}`` (for
    example one row per split), all with the same keys, except that rows without
    no-target samples may lack :data:`NO_TARGET_KEYS` (their cells show ``-``).
    Numbers are printed with ``digits`` decimals; ints (the sample count) as they are.
    """
    if not results:
        raise ValueError("results must hold at least one result")
    rows = {"": results} if all(isinstance(v, (int, float)) for v in results.values()) else dict(results)
    columns = max((list(row.keys()) for row in rows.values()), key=len)
    optional = set(NO_TARGET_KEYS) & set(columns)
    for name, row in rows.items():
        if list(row.keys()) not in (columns, [c for c in columns if c not in optional]):
            raise ValueError(f"results[{name!r}] has columns {list(row.keys())}, expected {columns}")

    def cell(row: Mapping[str, float], column: str) -> str:
        if column not in row:
            return "-"
        v = row[column]
        return str(v) if isinstance(v, int) else f"{v:.{digits}f}"

    header = ["split", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(cell(row, c) for c in columns)]) + " |")
    return "\n".join(lines)
