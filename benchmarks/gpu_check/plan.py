"""What the GPU check's sections run: the presets' steps on a GPU, or the --tiny stand-in on a CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.pipeline.config import TrainConfig, preset
from examples.pipeline.factory import random_init

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan:
    """What the sections run: the GPU check, or its --tiny stand-in."""

    small_preset: str
    """The run of sections 1, 3, 4, 5 and 7 (random init): ``ablation-vitb``, ViT-B-16 @ 480."""
    large_preset: str
    """The run of section 2: ``refcoco-vitl``, ViT-L-14 @ 532."""
    batch: int
    """Batch of sections 1, 3, 4 and 7."""
    large_batches: tuple[int, ...]
    """Section 2's candidates, largest first: the first that fits is measured."""
    sync_batch: int
    """Batch of section 5 (only which operations run matters)."""
    warmup: int
    """Untimed steps per variant before measuring."""
    rounds: int
    """Measured alternating rounds (fewer when the section's time runs short)."""
    profile_steps: int
    """Steps section 7 profiles per variant (after ``warmup``)."""
    steps: int
    """Training steps of the torchrun run."""
    eval_size: int
    """Synthetic scenes the torchrun run evaluates."""
    workers: int
    """DataLoader workers of the torchrun run."""
    compile_backend: str
    """torch.compile backend of section 4."""
    compile_scope: str = "step"
    """What section 4 compiles: the trainer's ``--compile-scope`` (step: the whole MaskSD step)."""
    amp: str | None = None
    """Autocast instead of the presets' (their bf16); None keeps theirs."""
    threads: int | None = None
    """torch CPU threads here and in the torchrun run; None leaves torch's default."""
    stand_in: bool = False
    """The --tiny stand-in (passed on to section 4's process)."""

    @classmethod
    def gpu(cls, compile_backend: str | None = None, compile_scope: str | None = None) -> "Plan":
        return cls(
            small_preset="ablation-vitb", large_preset="refcoco-vitl",
            batch=32, large_batches=(32, 24, 16, 12, 8), sync_batch=4, warmup=3, rounds=10, profile_steps=3,
            steps=20, eval_size=256, workers=min(8, max(1, (os.cpu_count() or 2) // 2)),
            compile_backend=compile_backend or "inductor", compile_scope=compile_scope or "step",
        )

    @classmethod
    def tiny(cls, device: torch.device, compile_backend: str | None = None, compile_scope: str | None = None) -> "Plan":
        return cls(
            small_preset="demo", large_preset="demo", batch=4, large_batches=(4, 2), sync_batch=2,
            warmup=1, rounds=1, profile_steps=1, steps=3, eval_size=8, workers=0,
            compile_backend=compile_backend or "eager",  # dynamo's capture without codegen: inductor takes minutes on a CPU
            compile_scope=compile_scope or "step",
            amp="bf16" if device.type == "cuda" else "none",
            threads=1 if device.type == "cpu" else None,  # the tiny model gains nothing from more; a shared CPU loses a lot
            stand_in=True,
        )

    @property
    def small(self) -> TrainConfig:
        """The small run's config: its preset from random weights (with its weights' activation), at ``amp``."""
        return self._run(self.small_preset)

    @property
    def large(self) -> TrainConfig:
        return self._run(self.large_preset)

    def _run(self, name: str) -> TrainConfig:
        return random_init(preset(name, **({"amp": self.amp} if self.amp else {})))

    def train_args(self, device: torch.device, output: Path) -> list[str]:
        """examples/train_cris_masksd.py flags of section 3: the small preset from random weights, on synthetic
        scenes (nothing to download), ``steps`` steps, no validation or checkpoints in between."""
        small = self.small
        return [
            "--preset", self.small_preset, "--dataset", "synthetic", "--pretrained", "none",
            "--quick-gelu" if small.quick_gelu else "--no-quick-gelu", "--image-size", str(small.image_size),
            "--batch-size", str(self.batch), "--max-steps", str(self.steps), "--epochs", "1", "--warmup-epochs", "0",
            "--synthetic-train-size", str(self.batch * self.steps), "--synthetic-eval-size", str(self.eval_size),
            "--amp", small.amp, "--workers", str(self.workers), "--log-every", "1", "--eval-every", "0",
            "--save-every", "0", "--overlays", "0", "--no-eval-untrained", "--no-tensorboard", "--no-export", "--no-progress",
            "--device", device.type, "--output", str(output),
        ]
