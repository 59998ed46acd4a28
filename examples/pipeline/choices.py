"""The scripts' runtime choices, as Literals importable without torch (``--help`` is built from them)."""

from __future__ import annotations

from typing import Literal

__all__ = ["Amp", "CompileScope", "Device"]

Device = Literal["auto", "cuda", "cpu"]
"""Where to run: auto (CUDA when available), cuda or cpu."""

Amp = Literal["none", "bf16", "fp16"]
"""Autocast precision on top of fp32 weights: none, bf16, or fp16 (training adds a gradient scaler)."""

CompileScope = Literal["parts", "step"]
"""What ``--compile`` compiles: parts (the segmenter's encoders and decode head) or step (MaskSD's whole training
forward, and so its backward)."""
