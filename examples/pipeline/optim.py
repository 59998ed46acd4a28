"""The paper's optimisation: Adam with weight decay, linear warm-up, then cosine decay (per step)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["build_optimizer", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float = 1.0,
    backbone_prefixes: tuple[str, ...] = (),
) -> torch.optim.Adam:
    """Adam (L2 weight decay, as the paper states "Adam ... weight decay of 0.0005") over the trainable
    parameters; parameters whose name starts with one of ``backbone_prefixes`` get ``lr * backbone_lr_scale``."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith(backbone_prefixes) and backbone_prefixes else rest).append(param)
    if backbone_prefixes and not backbone:
        raise ValueError(f"backbone_prefixes {backbone_prefixes} match no trainable parameter of the model")
    groups = [{"params": rest, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_scale})
    # fused: one kernel per step instead of a dozen elementwise passes, 10x faster on a CPU for the
    # tiny model (whose 49408 x 64 token embedding dominates its parameters)
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=True)
