"""Resize images and masks to the model's S×S input, and map predictions back.

Two resize modes:

``letterbox`` (default, what CRIS does)
    Keep the aspect ratio: scale so the longer side is S, centre the result in an
    S×S canvas and pad the rest with the CLIP mean colour (which is 0 after
    normalisation, so padding carries no signal).
``resize``
    Stretch the image to S×S, ignoring the aspect ratio. No padding.

Either way a :class:`Frame` records where the image content sits inside the S×S
input, and :func:`restore` uses it to bring a prediction back to the original
image size, one of :data:`RESTORE_METHODS`:

``bilinear`` (default)
    Upsample to S×S (bilinear), crop the content box, resize to (H0, W0) (bilinear).
``cris``
    What CRIS's evaluation does (``engine.inference``): upsample to S×S (bicubic,
    ``align_corners=True``), then warp back with the inverse of the image's affine map
    like ``cv2.warpAffine(..., flags=INTER_CUBIC, borderValue=0)``, in torch.

The paper (and CRIS) threshold the restored sigmoid probabilities at 0.35.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from masksd.data.config import RESIZE_MODES, RESTORE_METHODS, ResizeMode, RestoreMethod  # re-exported here

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "RESIZE_MODES", "RESTORE_METHODS", "Frame", "InputTransform", "Renormalise", "ResizeMode",
    "RestoreMethod", "normalize_uint8", "restore",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# the normalised value of every uint8 level per channel: (x / 255 - mean) / std
_LEVELS = ((np.arange(256)[None, :] / 255.0 - np.array(CLIP_MEAN)[:, None]) / np.array(CLIP_STD)[:, None]).astype(np.float32)  # (3, 256)


def normalize_uint8(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> CLIP-normalised float32 (3, H, W) by table lookup
    (several times faster than float arithmetic in numpy or torch, for data pipelines)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    out = np.empty((3, *image.shape[:2]), dtype=np.float32)  # (3, H, W)
    for c in range(3):
        np.take(_LEVELS[c], image[:, :, c], out=out[c])
    return torch.from_numpy(out)


class Renormalise(torch.nn.Module):
    """Images normalised with CLIP's statistics (what the data here gives) -> normalised with another ``mean`` and
    ``std`` (a model's image processor, e.g. ImageNet's for Swin or CLIPSeg), exactly: the per-channel affine map
    ``x * (CLIP_STD / std) + (CLIP_MEAN - mean) / std``; the identity for CLIP's own statistics. Its buffers are
    not persistent: state dicts do not change."""

    def __init__(self, mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD):
        super().__init__()
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must give 3 channels, std > 0; got mean={mean}, std={std}")
        self.mean, self.std = mean, std  # what an export records beside the weights
        self.identity = (mean, std) == (CLIP_MEAN, CLIP_STD)
        target_mean, target_std = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", (torch.tensor(CLIP_STD) / target_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((torch.tensor(CLIP_MEAN) - target_mean) / target_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) CLIP-normalised -> (B, 3, H, W) normalised with this module's statistics."""
        return images if self.identity or not torch.is_tensor(images) else images * self.scale + self.shift


@dataclass(frozen=True)
class Frame:
    """Where an image of size (orig_height, orig_width) sits inside the S×S model input."""

    orig_height: int
    """H0: height of the original image in pixels."""
    orig_width: int
    """W0: width of the original image in pixels."""
    top: int
    """First input row holding image content (0 for ``resize``)."""
    left: int
    """First input column holding image content (0 for ``resize``)."""
    height: int
    """Rows of image content in the input (S for ``resize``)."""
    width: int
    """Columns of image content in the input (S for ``resize``)."""
    size: int
    """S: side of the square model input."""

    def __post_init__(self) -> None:
        for name in ("orig_height", "orig_width", "height", "width", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Frame.{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.top and self.top + self.height <= self.size):
            raise ValueError(f"Frame rows [top={self.top}, top+height={self.top + self.height}) must lie in [0, size={self.size}]")
        if not (0 <= self.left and self.left + self.width <= self.size):
            raise ValueError(f"Frame columns [left={self.left}, left+width={self.left + self.width}) must lie in [0, size={self.size}]")

    @classmethod
    def fit(cls, orig_height: int, orig_width: int, size: int, mode: ResizeMode = "letterbox") -> "Frame":
        """The frame that ``mode`` gives an (orig_height, orig_width) image in an S×S input."""
        if mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
        if mode == "resize":
            return cls(orig_height, orig_width, 0, 0, size, size, size)
        scale = size / max(orig_height, orig_width)
        # the longer side is exactly S; the shorter one rounds, never to zero
        height = max(1, min(size, round(orig_height * scale)))
        width = max(1, min(size, round(orig_width * scale)))
        return cls(orig_height, orig_width, (size - height) // 2, (size - width) // 2, height, width, size)

    @classmethod
    def identity(cls, size: int) -> "Frame":
        """The frame of an image rendered at the input size directly (S×S, no padding)."""
        return cls(size, size, 0, 0, size, size, size)

    def affine(self) -> np.ndarray:
        """The map :class:`InputTransform` applied, as a float64 (2, 3) matrix ``A``: the centre of
        original pixel (x, y) lands at input position ``A @ (x, y, 1)``, in OpenCV's convention
        (pixel centres at integer coordinates, as ``cv2.warpAffine`` takes it).

        Our resize is half-pixel centred (``align_corners=False``): the image's edges [0, W0)
        land on the content box's edges [left, left + width), so x goes to
        ``left + (x + 0.5) * width / W0 - 0.5``. CRIS's own letterbox maps corner to corner in
        that convention and centres with float offsets ((S - new_w) / 2); ours are integers."""
        sx, sy = self.width / self.orig_width, self.height / self.orig_height
        return np.array([[sx, 0.0, self.left + 0.5 * sx - 0.5], [0.0, sy, self.top + 0.5 * sy - 0.5]])


class InputTransform:
    """Turns an RGB image (and optionally its mask) into the normalised S×S model input.

    ``__call__(image, mask=None)`` takes

    - ``image``: uint8 RGB, a numpy array (H0, W0, 3) or a PIL image;
    - ``mask``: bool or {0, 1} numpy array (H0, W0), or None;

    and returns ``(image, mask, frame)``: float32 (3, S, S) normalised with the
    CLIP mean/std; float32 (1, S, S) in {0, 1} resized with nearest neighbour into
    the same frame (None if no mask came); the :class:`Frame`.
    """

    def __init__(self, size: int, mode: ResizeMode = "letterbox") -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
        self.size = size
        self.mode = mode

    def __repr__(self) -> str:
        return f"InputTransform(size={self.size}, mode={self.mode!r})"

    def __call__(self, image, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Frame]:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        h0, w0 = image.shape[:2]
        frame = Frame.fit(h0, w0, self.size, self.mode)

        # normalising first gives the same input: a per-channel affine map commutes with interpolation (weights sum to 1)
        pixels = normalize_uint8(image)  # (3, H0, W0)
        pixels = F.interpolate(pixels[None], size=(frame.height, frame.width), mode="bilinear", align_corners=False, antialias=True)[0]
        out = torch.zeros(3, self.size, self.size)  # zero is the CLIP mean colour after normalisation
        out[:, frame.top : frame.top + frame.height, frame.left : frame.left + frame.width] = pixels

        if mask is None:
            return out, None, frame
        mask = np.asarray(mask)
        if mask.shape != (h0, w0):
            raise ValueError(f"mask must have the image's shape {(h0, w0)}, got {mask.shape}")
        if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"mask must be bool or hold only 0 and 1, got {mask.dtype} with other values")
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]  # (1, 1, H0, W0)
        # nearest-exact samples pixel centres, so the mask lines up with the bilinear image
        m = F.interpolate(m, size=(frame.height, frame.width), mode="nearest-exact")[0]
        out_mask = torch.zeros(1, self.size, self.size)
        out_mask[:, frame.top : frame.top + frame.height, frame.left : frame.left + frame.width] = m
        return out, out_mask, frame


# OpenCV's warpAffine rounds the matrix terms to 1/1024 pixel (AB_BITS = 10) and the source coordinates
# to 1/32 pixel (INTER_BITS = 5), and reads cubic weights from a table at those 32 fractions
_CV_AB_SCALE = 1 << 10
_CV_TAB_SIZE = 1 << 5
_CUBIC_A = -0.75  # the cubic convolution coefficient of both OpenCV's INTER_CUBIC and torch's bicubic


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution weights (A = -0.75) of the taps at -1, 0, 1, 2 for fractions t (n,) -> (n, 4)."""
    a = _CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return torch.stack([w0, w1, w2, 1 - w0 - w1 - w2], dim=-1)


def _cv_fixed_coords(scale: float, offset: float, n: int, split: bool) -> torch.Tensor:
    """Source coordinates of destination pixels 0..n-1 under ``scale * i + offset`` in OpenCV's fixed
    point (units of 1/32 pixel), rounded as its warpAffine rounds them. ``split``: columns, whose offset
    and per-pixel step OpenCV rounds separately; rows round ``scale * i + offset`` as one term."""
    i = torch.arange(n, dtype=torch.float64)
    if split:
        units = torch.round(torch.tensor(offset * _CV_AB_SCALE, dtype=torch.float64)) + torch.round(scale * i * _CV_AB_SCALE)
    else:
        units = torch.round((scale * i + offset) * _CV_AB_SCALE)  # torch.round, like cvRound, rounds half to even
    half_step = _CV_AB_SCALE // _CV_TAB_SIZE // 2  # rounds to the nearest 1/32 rather than down
    return torch.div(units.long() + half_step, _CV_AB_SCALE // _CV_TAB_SIZE, rounding_mode="floor")  # (n,)


def _cubic_rows(x: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Resample the rows of ``x`` (..., h, w) at the fixed-point coordinates ``fixed`` (n,) -> (..., n, w):
    4 cubic taps each, taps outside the input reading 0 (OpenCV's BORDER_CONSTANT with borderValue 0)."""
    h = x.shape[-2]
    base = torch.div(fixed, _CV_TAB_SIZE, rounding_mode="floor")  # (n,) integer part
    t = (fixed - base * _CV_TAB_SIZE).double() / _CV_TAB_SIZE  # (n,) fraction, a multiple of 1/32
    taps = base[:, None] + torch.arange(-1, 3)  # (n, 4)
    weights = _cubic_weights(t) * ((taps >= 0) & (taps < h))  # (n, 4)
    taps, weights = taps.clamp(0, h - 1).to(x.device), weights.to(x.device, x.dtype)
    picked = x.index_select(-2, taps.flatten()).unflatten(-2, (len(fixed), 4))  # (..., n, 4, w)
    return torch.einsum("...nkw,nk->...nw", picked, weights)  # (..., n, w)


def _restore_cris(x: torch.Tensor, frame: Frame) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, H0, W0) the CRIS way, see :func:`restore`."""
    if x.shape[-2:] != (frame.size, frame.size):
        x = F.interpolate(x, size=(frame.size, frame.size), mode="bicubic", align_corners=True)  # (B, 1, S, S)
    (sx, _, tx), (_, sy, ty) = frame.affine().tolist()
    cols = _cv_fixed_coords(sx, tx, frame.orig_width, split=True)  # (W0,)
    rows = _cv_fixed_coords(sy, ty, frame.orig_height, split=False)  # (H0,)
    x = _cubic_rows(x, rows)  # (B, 1, H0, S)
    x = _cubic_rows(x.transpose(-1, -2).contiguous(), cols)  # (B, 1, W0, H0): rows gather fast, strided columns do not
    return x.transpose(-1, -2)  # (B, 1, H0, W0)


def restore(logits: torch.Tensor, frame: Frame, method: RestoreMethod = "bilinear") -> torch.Tensor:
    """Bring a prediction in the model-input frame back to the original image size.

    ``logits``: float (B, 1, h, w) or (1, h, w), at any resolution of the S×S input
    (the decoder's output or the input itself); logits or probabilities alike, restored as
    they come (our evaluation, like CRIS, passes sigmoid probabilities). ``method``:

    - ``bilinear``: upsample to S×S (bilinear), crop the content box of ``frame`` and resize
      it to (H0, W0) (bilinear).
    - ``cris``: CRIS's ``engine.inference``: upsample to S×S (bicubic, ``align_corners=True``),
      then warp back to (H0, W0) with the inverse of :meth:`Frame.affine` (the map our
      :class:`InputTransform` applied, not CRIS's own float-offset one) as
      ``cv2.warpAffine(x, inverse, (W0, H0), flags=INTER_CUBIC, borderValue=0)`` does: cubic
      taps (A = -0.75), source coordinates rounded to 1/32 pixel like OpenCV, taps outside
      the input read 0. Pure torch; it matches OpenCV to float32 rounding.

    Returns (B, 1, H0, W0) or (1, H0, W0), matching the input. Every item of a batch is
    restored with the same ``frame``.
    """
    if not isinstance(frame, Frame):
        raise TypeError(f"frame must be a Frame, got {type(frame).__name__}")
    if method not in RESTORE_METHODS:
        raise ValueError(f"method must be one of {RESTORE_METHODS}, got {method!r}")
    if logits.ndim not in (3, 4) or logits.shape[-3] != 1:
        raise ValueError(f"logits must be (B, 1, h, w) or (1, h, w), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    x = logits if logits.ndim == 4 else logits[None]  # (B, 1, h, w)
    if method == "cris":
        x = _restore_cris(x, frame)  # (B, 1, H0, W0)
        return x if logits.ndim == 4 else x[0]
    if x.shape[-2:] != (frame.size, frame.size):
        x = F.interpolate(x, size=(frame.size, frame.size), mode="bilinear", align_corners=False)  # (B, 1, S, S)
    x = x[..., frame.top : frame.top + frame.height, frame.left : frame.left + frame.width]  # (B, 1, height, width)
    if x.shape[-2:] != (frame.orig_height, frame.orig_width):
        x = F.interpolate(x, size=(frame.orig_height, frame.orig_width), mode="bilinear", align_corners=False)  # (B, 1, H0, W0)
    return x if logits.ndim == 4 else x[0]
