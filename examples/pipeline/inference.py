"""One image and one expression through a trained segmenter: the mask at the image's size (what predict.py
writes and the demo app shows) and what the correlation filters see (the app's explanation panels)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from masksd import InputSpec, MaskSD, MaskSDConfig
from masksd.data import Frame, InputTransform, RestoreMethod, ResizeMode, restore
from masksd.guidance import correlation_scores

__all__ = ["Segmentation", "Explanation", "segment", "explain", "heatmap", "tint", "to_image_frame", "PREDICTION_COLOUR"]

PREDICTION_COLOUR = (230, 40, 40)
"""The red of predicted pixels in overlays (examples/pipeline/overlay.py's prediction colour)."""


@dataclass
class Segmentation:
    """A prediction for one image, back at the image's size."""

    probability: np.ndarray
    """(H0, W0) float32 in [0, 1]: sigmoid of the logits, restored to the image."""
    mask: np.ndarray
    """(H0, W0) bool: ``probability > threshold``."""
    image: torch.Tensor
    """(3, S, S): the model input (CLIP-normalised)."""
    tokens: object
    """What ``segmenter.tokenize([text])`` gave (a (1, L) tensor, or a mapping for CLIPSeg)."""
    frame: Frame
    """Where the image sits in the input."""
    seconds: float
    """Wall time of the segmenter's forward (the model alone: no reading, resizing or restoring)."""


@torch.no_grad()
def segment(segmenter: torch.nn.Module, rgb: np.ndarray, text: str, resize: ResizeMode = "letterbox",
            restore_method: RestoreMethod = "bilinear", threshold: float = 0.35) -> Segmentation:
    """Segment what ``text`` refers to in ``rgb`` ((H0, W0, 3) uint8) with ``segmenter`` (CRIS, CLIPSeg: anything
    with ``config.image_size`` and ``tokenize``) in eval mode, on the segmenter's device."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty referring expression, got {text!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    device = next(segmenter.parameters()).device
    image, _, frame = InputTransform(segmenter.config.image_size, resize)(rgb)  # (3, S, S)
    tokens = segmenter.tokenize([text]).to(device)
    segmenter.eval()
    start = time.perf_counter()
    logits = segmenter(image[None].to(device), tokens)  # (1, 1, h, w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    probability = restore(torch.sigmoid(logits.float()).cpu()[0], frame, restore_method)[0].numpy()  # (H0, W0)
    return Segmentation(probability, probability > threshold, image, tokens, frame, seconds)


@dataclass
class Explanation:
    """What CM-MaskSD's correlation filters make of one image and expression (training-time guidance; inference
    never masks anything)."""

    correlation: np.ndarray
    """(gh, gw) float32: LMVSD's ranking p_i = v_i · w of each patch token against the sentence."""
    masked_patches: np.ndarray
    """(h, w) bool: the patches LMVSD would replace by its mask token (α of the top K, drawn with ``seed``); the
    patch tokens' grid, or the pixel patches' for masking at the input site."""
    words: list[str]
    """The text's tokens, SOT and EOT included."""
    masked_words: list[bool]
    """Per token: whether VMLSD would replace it (α of the top K real words by w_j · v)."""


@torch.no_grad()
def explain(segmenter: torch.nn.Module, image: torch.Tensor, tokens: object, config: MaskSDConfig | None = None,
            seed: int = 0) -> Explanation:
    """The correlation map and the patches and words each branch would mask for one (3, S, S) input and its
    tokens (what :func:`segment` returns), with the K and α of ``config`` (the run's; the paper's by default;
    a branch switched off in training is shown as it would have masked)."""
    config = config or MaskSDConfig()
    config = replace(config, lmvsd=replace(config.lmvsd, enabled=True), vmlsd=replace(config.vmlsd, enabled=True))
    device = next(segmenter.parameters()).device
    images = image[None].to(device)
    model = MaskSD(segmenter, config, inputs=InputSpec()).to(device).eval()  # the factory's; fresh mask tokens: where they go does not depend on them
    patch_scores, _, _ = correlation_scores(segmenter, images, tokens)  # (1, N)
    image_masked, text_masked = model.masked_tokens(images, tokens, generator=torch.Generator(device).manual_seed(seed))
    grid = tuple(segmenter.grid_size)
    masked_grid = tuple(model.image_grid(images) or grid)
    ids = tokens["input_ids"] if isinstance(tokens, Mapping) else tokens  # CLIPSeg's tokenizer gives a mapping
    words = segmenter.token_strings(ids[0])
    return Explanation(
        correlation=patch_scores[0].view(grid).float().cpu().numpy(),
        masked_patches=image_masked[0].view(masked_grid).cpu().numpy(),
        words=words,
        masked_words=text_masked[0, : len(words)].cpu().tolist(),
    )


def to_image_frame(grid_map: np.ndarray, frame: Frame, nearest: bool = False) -> np.ndarray:
    """A (gh, gw) map over the input's patches -> (H0, W0) over the original image (bilinear, or nearest for masks)."""
    mode = {"mode": "nearest"} if nearest else {"mode": "bilinear", "align_corners": False}
    x = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]  # (1, 1, gh, gw)
    x = F.interpolate(x, size=(frame.size, frame.size), **mode)  # (1, 1, S, S)
    crop = x[..., frame.top: frame.top + frame.height, frame.left: frame.left + frame.width]
    return F.interpolate(crop, size=(frame.orig_height, frame.orig_width), **mode)[0, 0].numpy()  # (H0, W0)


def tint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int] = PREDICTION_COLOUR, alpha: float = 0.55) -> np.ndarray:
    """``rgb`` ((H, W, 3) uint8) with the pixels ``where`` ((H, W) bool) blended towards ``colour``."""
    out = rgb.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * np.array(colour, dtype=np.float32)
    return out.astype(np.uint8)


def heatmap(rgb: np.ndarray, values: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``rgb`` with ``values`` ((H, W), any range; scaled to [0, 1]) blended in as a dark-blue-to-yellow map."""
    low, high = float(values.min()), float(values.max())
    v = (values - low) / (high - low) if high > low else np.zeros_like(values)
    colour = np.stack([255 * v, 255 * np.sqrt(v), 255 * (1 - v) * 0.6], axis=-1)  # (H, W, 3)
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * colour).clip(0, 255).astype(np.uint8)
