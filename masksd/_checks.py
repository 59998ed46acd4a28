"""Argument checks shared by the core modules: each error names the argument and says what was expected."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are checked: masksd.config stays importable without it
    import torch


def check_fraction(name: str, value: float, *, low_open: bool) -> None:
    """Raise unless ``value`` is a finite number in (0, 1] (``low_open``) or [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if (value <= 0 if low_open else value < 0) or value > 1:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_open_fraction(name: str, value: float) -> None:
    """Raise unless ``value`` is a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor(name: str, x: object, *, dims: int | tuple[int, ...], floating: bool = False) -> None:
    """Raise TypeError/ValueError unless ``x`` is a tensor of the given rank(s) (and float dtype)."""
    import torch

    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if x.dim() not in allowed:
        ranks = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must have rank {ranks}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_nonempty(name: str, x: torch.Tensor) -> None:
    """Raise a ValueError unless the batch ``x`` (B, ...) holds at least one sample: a mean over none is NaN."""
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): a loss over no samples is NaN")


def check_finite_values(name: str, x: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` and the samples unless the floating-point batch ``x`` (B, ...) is
    free of NaN and ±inf. Reads the values (one wait for the device): call it on request, not per step."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    bad = ~x.isfinite().flatten(1).all(dim=1)  # (B,)
    if bool(bad.any()):
        raise ValueError(f"{name} holds NaN or infinite values in samples {bad.nonzero().flatten().tolist()}")


def check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Return ``mask`` (or an all-True mask when None) after checking it is bool with ``shape``."""
    import torch

    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if torch.is_tensor(mask) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape {shape}, got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask
