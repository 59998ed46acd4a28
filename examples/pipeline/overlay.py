"""Overlay panels: the image, its ground truth, the prediction, and what the branches masked."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from masksd.data.transforms import CLIP_MEAN, CLIP_STD

__all__ = ["render_overlay"]

_GT = np.array([0, 200, 0], dtype=np.float32)
_PRED = np.array([230, 40, 40], dtype=np.float32)
_MASKED = np.array([40, 90, 255], dtype=np.float32)


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) CLIP-normalised -> (S, S, 3) float32 in [0, 255]."""
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return rgb.permute(1, 2, 0).numpy() * 255.0


def _tint(rgb: np.ndarray, where: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = rgb.copy()
    out[where] = (1 - alpha) * out[where] + alpha * colour
    return out


def render_overlay(
    image: torch.Tensor,
    ground_truth: torch.Tensor,
    probability: torch.Tensor,
    text: str,
    masked_patches: torch.Tensor | None = None,
    words: list[str] | None = None,
    masked_words: list[bool] | None = None,
    threshold: float = 0.35,
    scale: int = 3,
) -> Image.Image:
    """One panel row: image | ground truth | prediction (probability > threshold) | LMVSD-masked patches,
    with the sentence below and the VMLSD-masked words in [brackets].

    image: (3, S, S) normalised; ground_truth: (1, S, S); probability: (1, h, w) in [0, 1];
    masked_patches: (gh, gw) bool or None.
    """
    size = image.shape[-1]
    rgb = _to_rgb(image)
    gt = ground_truth.detach().float().cpu().reshape(size, size).numpy() > 0.5
    prob = F.interpolate(probability.detach().float().cpu()[None], size=(size, size), mode="bilinear", align_corners=False)
    pred = prob[0, 0].numpy() > threshold
    tiles = [rgb, _tint(rgb, gt, _GT), _tint(rgb, pred, _PRED)]
    if masked_patches is not None:
        grid = masked_patches.detach().float().cpu()[None, None]
        patches = F.interpolate(grid, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5
        tiles.append(_tint(rgb, patches, _MASKED, alpha=0.7))
    row = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1)
    panel = Image.fromarray(row.astype(np.uint8)).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)

    caption = text
    if words is not None and masked_words is not None:
        caption = " ".join(f"[{w}]" if m else w for w, m in zip(words, masked_words))
    labels = "image | ground truth | prediction" + (" | masked patches (LMVSD)" if masked_patches is not None else "")
    canvas = Image.new("RGB", (panel.width, panel.height + 34), "white")
    canvas.paste(panel, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, panel.height + 2), labels, fill=(90, 90, 90))
    draw.text((4, panel.height + 18), caption, fill=(0, 0, 0))
    return canvas
