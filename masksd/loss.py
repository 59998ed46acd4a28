"""Losses: BCE of the main branch against ground truth and of each masked branch against the main branch (Eq. 9).

Shapes, dtypes and empty batches are checked on every call. Values (a mask in [0, 1], no NaN or ±inf in
masks and teacher logits) are read only where a caller asks, since reading them waits for the device:
the loss functions do by default (``check_values=True``), :func:`check_mask_values` on request, and
MaskSD's training step not at all (it passes ``check_values=False``; :meth:`masksd.MaskSD.check_inputs`
checks a batch's values, on the first batch of each epoch in the example trainer).
"""

from __future__ import annotations

import contextlib
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from masksd._checks import check_choice, check_finite_values, check_nonempty, check_nonnegative, check_open_fraction, check_tensor
from masksd.config import Supervision, Target, TeacherGradient

__all__ = ["SelfDistillLoss", "segmentation_loss", "as_mask_batch", "check_mask_values"]


def as_mask_batch(name: str, mask: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Check the shape and dtype of a float ground-truth mask (B, H, W) or (B, 1, H, W); return it as
    (B, 1, H, W). Its values are not read here (that would wait for the device): see :func:`check_mask_values`."""
    check_tensor(name, mask, dims=(3, 4), floating=True)
    check_nonempty(name, mask)
    if mask.dim() == 4 and mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}")
    if batch is not None and mask.shape[0] != batch:
        raise ValueError(f"{name} has batch size {mask.shape[0]}, expected {batch}")
    return mask if mask.dim() == 4 else mask[:, None]


def check_mask_values(name: str, mask: torch.Tensor) -> None:
    """Raise a ValueError naming ``name``, the samples and the range found unless every value of ``mask``
    (B, ...) is finite and lies in [0, 1] (a mask read from an 8-bit PNG holds {0, 255}: the error says to
    divide by 255). Reads the values (one wait for the device): call it on request, not in every step."""
    check_tensor(name, mask, dims=(3, 4), floating=True)
    check_finite_values(name, mask)
    if mask.numel() == 0:
        return
    bad = ((mask < 0) | (mask > 1)).flatten(1).any(dim=1)  # (B,)
    if bool(bad.any()):
        low, high = mask.min().item(), mask.max().item()
        hint = "; an 8-bit image mask? divide it by 255" if high > 1 and high <= 255 and low >= 0 else ""
        raise ValueError(
            f"{name} values must lie in [0, 1] (a binary or soft mask), got values in [{low:g}, {high:g}] in samples "
            f"{bad.nonzero().flatten().tolist()}{hint}"
        )


def _check_logits(name: str, logits: torch.Tensor) -> None:
    check_tensor(name, logits, dims=4, floating=True)
    if logits.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, h, w), got {tuple(logits.shape)}")
    check_nonempty(name, logits)


def _resize(target: torch.Tensor, size: torch.Size, soft: bool, name: str = "ground_truth") -> torch.Tensor:
    """Resize a (B, 1, H, W) target to ``size``: bilinear for soft probabilities, nearest for binary masks.
    A target of another aspect ratio than the logits is refused (ValueError naming both shapes): a
    resize would stretch it silently."""
    if target.shape[-2:] == size:
        return target
    height, width = target.shape[-2:]
    if height * size[1] != width * size[0]:
        raise ValueError(
            f"{name} of size {height}x{width} has another aspect ratio than the logits' {size[0]}x{size[1]}: "
            f"resize or letterbox the mask with its image (masksd.data.InputTransform) instead of stretching it"
        )
    if soft:
        return F.interpolate(target, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(target, size=size, mode="nearest")


def segmentation_loss(logits: torch.Tensor, ground_truth: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """BCE-with-logits of (B, 1, h, w) logits against a (B, [1,] H, W) mask, averaged over pixels.

    The mask is resized to the logits' size with nearest neighbour, as CRIS does. With ``check_values``
    (the default) a mask outside [0, 1] or holding NaN/±inf is refused (:func:`check_mask_values`: one wait
    for the device); a training loop that checked its data once passes False.
    """
    _check_logits("logits", logits)
    target = as_mask_batch("ground_truth", ground_truth, logits.shape[0])
    if check_values:
        check_mask_values("ground_truth", target)
    target = _resize(target.to(logits.dtype), logits.shape[-2:], soft=False)
    return F.binary_cross_entropy_with_logits(logits, target)


class SelfDistillLoss(nn.Module):
    """``weight * BCE(student, target)`` averaged over pixels, where the target is

    * ``supervision="distill"``, ``target="soft"``: sigmoid(teacher), detached unless
      ``teacher_gradient="flow"``;
    * ``supervision="distill"``, ``target="hard"``: sigmoid(teacher) > threshold, detached;
    * ``supervision="ground_truth"``: the ground-truth mask (the paper's Table VI ablation).

    A target of another size than the student is resized to it (bilinear for
    the soft target, nearest for binary ones). No gradient reaches the teacher, except
    with ``teacher_gradient="flow"``, where the loss differentiates its soft target too (Eq. 9
    read literally); that needs the soft distillation target, else a ValueError names it.
    """

    def __init__(
        self,
        weight: float,
        target: Target = "soft",
        threshold: float = 0.5,
        supervision: Supervision = "distill",
        teacher_gradient: TeacherGradient = "detach",
    ):
        super().__init__()
        check_nonnegative("weight", weight)
        check_choice("target", target, get_args(Target))
        check_choice("supervision", supervision, get_args(Supervision))
        check_open_fraction("threshold", threshold)
        check_choice("teacher_gradient", teacher_gradient, get_args(TeacherGradient))
        if teacher_gradient == "flow" and (supervision, target) != ("distill", "soft"):
            raise ValueError(
                f"teacher_gradient='flow' needs supervision='distill' and target='soft', got {supervision=!r}, {target=!r}"
            )
        self.weight = float(weight)
        self.target = target
        self.threshold = float(threshold)
        self.supervision = supervision
        self.teacher_gradient = teacher_gradient

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, target={self.target!r}, threshold={self.threshold}, "
            f"supervision={self.supervision!r}, teacher_gradient={self.teacher_gradient!r}"
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        ground_truth: torch.Tensor | None = None,
        *,
        check_values: bool = True,
    ) -> torch.Tensor:
        """student_logits, teacher_logits: (B, 1, h, w); ground_truth: (B, [1,] H, W) float.

        Returns the weighted scalar loss. With ``check_values`` (the default) the target's values are read
        first (one wait for the device): NaN/±inf teacher logits, or a ground truth outside [0, 1], raise a
        ValueError naming them; MaskSD's training step passes False.
        """
        _check_logits("student_logits", student_logits)
        if self.supervision == "ground_truth":
            if ground_truth is None:
                raise ValueError("ground_truth is required when supervision='ground_truth'")
            return self.weight * segmentation_loss(student_logits, ground_truth, check_values=check_values)

        if teacher_logits is None:
            raise ValueError("teacher_logits is required when supervision='distill'")
        _check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"teacher_logits has batch size {teacher_logits.shape[0]}, "
                f"student_logits has {student_logits.shape[0]}"
            )
        if check_values:
            check_finite_values("teacher_logits", teacher_logits)
        with torch.no_grad() if self.teacher_gradient == "detach" else contextlib.nullcontext():
            target = torch.sigmoid(teacher_logits.float())  # (B, 1, h', w')
            if self.target == "hard":
                target = (target > self.threshold).float()
            target = _resize(target, student_logits.shape[-2:], soft=self.target == "soft", name="teacher_logits")
        return self.weight * F.binary_cross_entropy_with_logits(student_logits, target.to(student_logits.dtype))
