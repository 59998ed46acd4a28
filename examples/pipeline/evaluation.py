"""Evaluate a segmenter's main branch: predictions restored to each original image size, thresholded, scored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import get_args

import torch
from tqdm import tqdm

from examples.pipeline.choices import Amp  # re-exported
from masksd.data import RESTORE_METHODS, RestoreMethod
from masksd.data import restore as restore_prediction
from masksd.metrics import RISMetrics

__all__ = ["Amp", "evaluate", "autocast"]

def autocast(device: torch.device, amp: Amp) -> contextlib.AbstractContextManager:
    """torch.autocast for ``amp`` in {"bf16", "fp16"}; a no-op for "none"."""
    if amp not in get_args(Amp):
        raise ValueError(f"amp must be one of {get_args(Amp)}, got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    segmenter: torch.nn.Module,
    loader: Iterable[dict],
    tokenize: Callable[[list[str]], torch.Tensor],
    device: torch.device,
    threshold: float = 0.35,
    amp: Amp = "none",
    progress: bool = True,
    restore: RestoreMethod = "bilinear",
) -> dict[str, float]:
    """Run ``segmenter(images, tokens)`` over ``loader`` (collated sample dicts), take the sigmoid,
    bring each probability map back to its original image size with ``restore`` (``bilinear``, or
    ``cris``: CRIS's bicubic + inverse-affine warp, see :func:`masksd.data.restore`), binarise
    ``> threshold`` and return mIoU / oIoU / Prec@X (percentages; GRES's metrics too when a target
    is empty) summed over all DDP ranks."""
    if restore not in RESTORE_METHODS:
        raise ValueError(f"restore must be one of {RESTORE_METHODS}, got {restore!r}")
    was_training = segmenter.training
    segmenter.eval()
    metrics = RISMetrics()
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        tokens = tokenize(batch["text"]).to(device, non_blocking=True)
        with autocast(device, amp):
            logits = segmenter(images, tokens)  # (B, 1, h, w)
        probs = torch.sigmoid(logits.float()).cpu()
        preds = [restore_prediction(p, frame, restore)[0] > threshold for p, frame in zip(probs, batch["frame"])]  # each (H0, W0)
        metrics.update(preds, [torch.as_tensor(t) for t in batch["target"]])
    segmenter.train(was_training)
    return metrics.compute()
