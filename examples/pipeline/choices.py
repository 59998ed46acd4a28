"""The scripts' runtime choices, as Literals importable without torch (``--help`` is built from them)."""

from __future__ import annotations

from typing import Literal

__all__ = ["Amp", "Device"]

Device = Literal["auto", "cuda", "cpu"]
"""Where to run: auto (CUDA when available), cuda or cpu."""

Amp = Literal["none", "bf16", "fp16"]
"""Autocast precision on top of fp32 weights: none, bf16, or fp16 (training adds a gradient scaler)."""
