"""Batching of the samples that every masksd dataset returns."""

from __future__ import annotations

import torch

__all__ = ["SAMPLE_KEYS", "collate"]

SAMPLE_KEYS = ("image", "mask", "text", "target", "frame", "index")
"""Keys of a sample dict, the format :class:`ReferDataset`, :class:`ManifestDataset` and :class:`SyntheticReferDataset` share."""


def collate(batch: list[dict]) -> dict:
    """Stack ``image`` (B, 3, S, S) and ``mask`` (B, 1, S, S); keep ``text``,
    ``target`` (original sizes differ), ``frame`` and ``index`` as lists."""
    if not batch:
        raise ValueError("collate needs at least one sample, got an empty batch")
    for i, sample in enumerate(batch):
        if set(sample) != set(SAMPLE_KEYS):
            raise ValueError(f"batch[{i}] must have keys {list(SAMPLE_KEYS)}, got {sorted(sample)}")
        for key in ("image", "mask"):
            if sample[key].shape != batch[0][key].shape:
                raise ValueError(f"batch[{i}]['{key}'] has shape {tuple(sample[key].shape)} but batch[0] has {tuple(batch[0][key].shape)}; samples need one input size")
    out = {key: torch.stack([s[key] for s in batch]) for key in ("image", "mask")}
    out.update({key: [s[key] for s in batch] for key in ("text", "target", "frame", "index")})
    return out
