"""Image files as uint8 RGB arrays: the one reader behind :class:`~masksd.data.ReferDataset`,
:class:`~masksd.data.ManifestDataset` and ``examples/predict.py``, so all refuse the same files and
convert the same modes; and binary mask files (:func:`read_mask`, the manifest's PNG masks).

Refused, with a ``ValueError`` naming the file: an image over :data:`MAX_IMAGE_PIXELS` (checked from
the header, before anything is decoded: a decompression bomb claims gigapixels in a few kilobytes),
a file that does not decode (zero bytes, truncated, not an image), and 32-bit integer or float
pixels (modes ``I`` outside PNG, ``F``), which have no fixed range to map to 8 bits.

Converted: grayscale (``L``, ``1``) is repeated over the three channels; 16-bit grayscale
(``I;16``, a PNG's ``I``) keeps its high byte (``v >> 8``, so 65535 -> 255, not a clip at 255);
16-bit-per-channel RGB PNGs arrive from PIL already at 8 bits (the high byte); an alpha channel
(``RGBA``, ``LA``, ``PA``) is dropped, the colours kept as stored; CMYK, palette and YCbCr images go
through PIL's ``convert("RGB")``. No EXIF rotation is applied: COCO's annotations are drawn on the
pixels as stored. Needs ``pillow`` (imported on the first call, not with ``masksd``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["MAX_IMAGE_PIXELS", "read_mask", "read_rgb"]

MAX_IMAGE_PIXELS = 89_478_485
"""The largest image (width x height) masksd decodes: PIL's own default ``Image.MAX_IMAGE_PIXELS``
(a 256 MiB RGB image), written here so the limit is ours and does not move with PIL's setting.
COCO's train2014 images are at most 640x640 (409,600 pixels)."""


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading images needs pillow (pip install pillow, or masksd[examples])") from e
    return Image


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as uint8 RGB (H, W, 3); see the module docstring for what is refused and
    how other modes are converted. Raises ``FileNotFoundError`` or ``ValueError``, naming the file."""
    return _read(path, _to_rgb, "image")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask file (a PNG from any editor) as bool (H, W), True where the target is.

    Single-channel modes (``1``, ``L``, ``P``: the palette index, ``I;16``) and RGB or RGBA files whose
    colour channels are equal (a grey mask saved as colour; alpha ignored) are read as one value per
    pixel; the pixels must hold at most two values, 0 (background) and one other (the target: 1, 255,
    a palette index...). A mask with more values (a JPEG's ringing, an anti-aliased edge, a colour
    label map) is refused rather than thresholded. Raises ``FileNotFoundError`` or ``ValueError``
    naming the file; images over :data:`MAX_IMAGE_PIXELS` are refused as :func:`read_rgb` refuses them."""
    return _read(path, _to_binary, "mask")


def _read(path: str | os.PathLike, convert, noun: str) -> np.ndarray:
    Image = _pil()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{noun} not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice it; ours refuses with a named error just below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _Refused(_too_large(path, f"{width}x{height} = {width * height:,} pixels"))
                return convert(im, path)
    except _Refused as e:
        raise ValueError(str(e)) from None
    except Image.DecompressionBombError as e:  # PIL's own limit, when someone set it below ours
        raise ValueError(_too_large(path, str(e))) from None
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, EOFError, struct.error... on a bad file
        raise ValueError(f"could not decode {noun} {path}: {type(e).__name__}: {e}") from e


class _Refused(Exception):
    """A file that decodes but is not read (too large, no fixed pixel range); the argument is the message."""


def _too_large(path: str, size: str) -> str:
    return (f"image {path} is refused: {size}, over masksd.data.images.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,} "
            "(a decompression bomb, or no COCO image); raise that constant to read it")


def _to_rgb(im, path: str) -> np.ndarray:
    """A decoded PIL image as uint8 RGB (H, W, 3)."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # 16-bit grey (PNG has no 32-bit)
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)  # (H, W): the high byte
        return np.repeat(grey[..., None], 3, axis=2)  # (H, W, 3)
    if im.mode in ("I", "F"):
        raise _Refused(f"image {path} has mode {im.mode} pixels (32-bit integer or float), which have no fixed range to map to 8-bit RGB")
    return np.asarray(im.convert("RGB"))  # (H, W, 3)


def _to_binary(im, path: str) -> np.ndarray:
    """A decoded PIL image of a binary mask as bool (H, W); see :func:`read_mask`."""
    if im.mode in ("RGB", "RGBA", "LA"):
        channels = np.asarray(im)  # (H, W, C)
        colour = channels[..., :1] if im.mode == "LA" else channels[..., :3]
        if not (colour == colour[..., :1]).all():
            raise _Refused(f"mask {path} is a colour image (mode {im.mode}, channels differ): save it as a grey or 1-bit PNG")
        values = colour[..., 0]  # (H, W)
    elif im.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(im)  # (H, W)
    else:
        raise _Refused(f"mask {path} has mode {im.mode}; expected a grey, 1-bit or palette PNG")
    present = np.unique(values)
    if len(present) > 2 or (len(present) == 2 and present[0] != 0):
        shown = ", ".join(str(v) for v in present[:6]) + (", ..." if len(present) > 6 else "")
        raise _Refused(f"mask {path} is not binary: it holds {len(present)} pixel values ({shown}); expected 0 for the "
                       "background and one other value for the target (save masks as PNG, not JPEG)")
    return values != 0  # (H, W)
