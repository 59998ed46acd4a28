import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from masksd.data.transforms import CLIP_MEAN, CLIP_STD, RESTORE_METHODS, Frame, InputTransform, restore


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def ellipse_and_box(h: int, w: int) -> np.ndarray:
    """A non-trivial shape: an ellipse plus a rectangle, both a good fraction of the image."""
    y, x = np.mgrid[:h, :w]
    ellipse = ((y - 0.45 * h) / (0.3 * h)) ** 2 + ((x - 0.4 * w) / (0.25 * w)) ** 2 <= 1
    box = (y > 0.6 * h) & (y < 0.9 * h) & (x > 0.65 * w) & (x < 0.95 * w)
    return ellipse | box


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["letterbox", "resize"])
@pytest.mark.parametrize("shape", [(120, 200), (200, 120), (37, 53), (300, 90)], ids=["landscape", "portrait", "odd", "tall"])
def test_mask_round_trip(mode, shape):
    h, w = shape
    mask = ellipse_and_box(h, w)
    transform = InputTransform(128, mode)
    image, m, frame = transform(random_image(h, w), mask)
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert m.shape == (1, 128, 128) and set(m.unique().tolist()) <= {0.0, 1.0}
    back = restore(m, frame)
    assert back.shape == (1, h, w)
    assert iou(back[0].numpy() > 0.5, mask) > 0.95
    # the same through a batch and at a decoder's stride-4 resolution (coarser, so a looser bound)
    low = torch.nn.functional.interpolate(m[None], size=(32, 32), mode="bilinear", align_corners=False)
    back_low = restore(low.repeat(2, 1, 1, 1), frame)
    assert back_low.shape == (2, 1, h, w)
    assert iou(back_low[1, 0].numpy() > 0.5, mask) > 0.85


@pytest.mark.parametrize("shape", [(16, 32), (32, 16), (8, 64), (64, 64)])
def test_resize_mode_is_exact_at_integer_upscale(shape):
    h, w = shape
    mask = np.random.default_rng(1).random((h, w)) > 0.5  # every pixel independent: the hardest case
    _, m, frame = InputTransform(64, "resize")(random_image(h, w), mask)
    back = restore(m, frame)[0]
    # bilinear downsampling by an integer factor reads inside one replicated block, so values come back exactly
    assert torch.equal(back, torch.from_numpy(mask).float())


def test_resize_mode_is_exact_at_integer_downscale_for_block_masks():
    blocks = np.random.default_rng(2).random((32, 32)) > 0.5
    mask = blocks.repeat(2, axis=0).repeat(2, axis=1)  # (64, 64), constant on the 2×2 cells one input pixel covers
    _, m, frame = InputTransform(32, "resize")(random_image(64, 64), mask)
    assert torch.equal(m[0], torch.from_numpy(blocks).float())
    # bilinear ×2 upsampling weighs the nearer input pixel 0.75, so thresholding at 0.5 gives the blocks back
    assert np.array_equal((restore(m, frame)[0] > 0.5).numpy(), mask)


def test_letterbox_frame_and_padding():
    h, w = 100, 200
    image, m, frame = InputTransform(64, "letterbox")(np.full((h, w, 3), 255, np.uint8), np.ones((h, w), bool))
    assert frame == Frame(orig_height=100, orig_width=200, top=16, left=0, height=32, width=64, size=64)
    white = torch.tensor([(1 - mu) / sd for mu, sd in zip(CLIP_MEAN, CLIP_STD)])
    content = image[:, 16:48, :]
    assert torch.allclose(content, white.view(3, 1, 1).expand_as(content), atol=1e-5)
    # the padding is the CLIP mean colour, i.e. exactly zero after normalisation
    assert torch.all(image[:, :16] == 0) and torch.all(image[:, 48:] == 0)
    assert m[0, 16:48].all() and m[0, :16].sum() == 0 and m[0, 48:].sum() == 0
    portrait = Frame.fit(200, 100, 64, "letterbox")
    assert (portrait.top, portrait.left, portrait.height, portrait.width) == (0, 16, 64, 32)


def test_resize_mode_fills_the_input():
    frame = Frame.fit(100, 300, 48, "resize")
    assert (frame.top, frame.left, frame.height, frame.width) == (0, 0, 48, 48)
    assert Frame.identity(32) == Frame(32, 32, 0, 0, 32, 32, 32)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(8, 400), w=st.integers(8, 400), size=st.integers(8, 128))
def test_letterbox_frame_keeps_aspect_and_centres(h, w, size):
    f = Frame.fit(h, w, size, "letterbox")
    assert max(f.height, f.width) == size
    # the shorter side is the exact scaled length rounded to the nearest pixel (at least one)
    assert abs(min(f.height, f.width) - max(1.0, min(h, w) * size / max(h, w))) <= 0.5
    assert (f.height >= f.width) == (h >= w) or f.height == f.width
    assert abs(f.top - (size - f.height - f.top)) <= 1 and abs(f.left - (size - f.width - f.left)) <= 1


def test_pil_image_is_accepted():
    from PIL import Image

    array = random_image(20, 30)
    a, _, _ = InputTransform(32)(array)
    b, _, _ = InputTransform(32)(Image.fromarray(array))
    assert torch.equal(a, b)


def test_bad_inputs_name_the_argument():
    t = InputTransform(32)
    with pytest.raises(ValueError, match="image must be uint8"):
        t(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="image must be uint8"):
        t(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"mask must have the image's shape \(10, 10\)"):
        t(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11), bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        t(np.zeros((10, 10, 3), np.uint8), np.full((10, 10), 2, np.uint8))
    with pytest.raises(ValueError, match="mode must be one of"):
        InputTransform(32, "crop")
    with pytest.raises(ValueError, match="size must be a positive int"):
        InputTransform(0)
    with pytest.raises(ValueError, match=r"logits must be \(B, 1, h, w\)"):
        restore(torch.zeros(2, 8, 8), Frame.identity(8))
    with pytest.raises(TypeError, match="frame must be a Frame"):
        restore(torch.zeros(1, 8, 8), (8, 8))
    with pytest.raises(ValueError, match=r"method must be one of \('bilinear', 'cris'\), got 'bicubic'"):
        restore(torch.zeros(1, 8, 8), Frame.identity(8), method="bicubic")
    with pytest.raises(ValueError, match="Frame rows"):
        Frame(10, 10, 5, 0, 8, 8, 8)


def test_normalize_uint8_is_the_clip_normalisation():
    from masksd.data.transforms import normalize_uint8

    image = random_image(9, 7)
    expected = (torch.from_numpy(image).permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    out = normalize_uint8(image)
    assert out.shape == (3, 9, 7) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


# ---- restore(method="cris"): CRIS's bicubic upsampling + cv2.warpAffine(INTER_CUBIC), in torch ----------

def test_restore_methods_are_the_two_documented():
    assert RESTORE_METHODS == ("bilinear", "cris")


def test_frame_affine_is_the_half_pixel_map_our_resize_applies():
    frame = Frame.fit(100, 200, 64, "letterbox")  # content rows [16, 48), all 64 columns: scale 0.32
    np.testing.assert_allclose(frame.affine(), [[0.32, 0, 0.16 - 0.5], [0, 0.32, 16 + 0.16 - 0.5]])
    # the image's outer edges (-0.5 and W0 - 0.5 in pixel-centre coordinates) land on the content box's edges
    (sx, _, tx), (_, sy, ty) = frame.affine()
    assert sx * -0.5 + tx == pytest.approx(frame.left - 0.5) and sx * 199.5 + tx == pytest.approx(frame.left + frame.width - 0.5)
    assert sy * -0.5 + ty == pytest.approx(frame.top - 0.5) and sy * 99.5 + ty == pytest.approx(frame.top + frame.height - 0.5)


def test_cris_restore_of_an_identity_frame_at_the_input_size_is_exact():
    x = torch.rand(2, 1, 24, 24)
    # integer source coordinates: the cubic weights are (0, 1, 0, 0), so every value comes back as it was
    assert torch.equal(restore(x, Frame.identity(24), "cris"), x)


# frames with padding above and below (landscape), left and right (portrait), none (square, resize),
# odd sizes whose offsets round, and a one-pixel-high image
CRIS_CASES = [
    (Frame.fit(40, 60, 32, "letterbox"), 32), (Frame.fit(64, 36, 32, "letterbox"), 8), (Frame.fit(30, 30, 32, "letterbox"), 32),
    (Frame.fit(123, 77, 64, "letterbox"), 16), (Frame.fit(375, 500, 96, "letterbox"), 24), (Frame.fit(1, 50, 32, "letterbox"), 32),
    (Frame.fit(40, 60, 32, "resize"), 8), (Frame.fit(77, 123, 64, "resize"), 64), (Frame.fit(20, 90, 48, "resize"), 12),
]


@pytest.mark.parametrize("frame,low", CRIS_CASES, ids=[f"{f.orig_height}x{f.orig_width}@{f.size}-{'pad' if f.height < f.size or f.width < f.size else 'fill'}-{low}" for f, low in CRIS_CASES])
def test_cris_restore_matches_opencv(frame, low):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the dev extra) is the oracle")
    rng = np.random.default_rng(frame.orig_height * 1000 + frame.orig_width)
    probs = torch.from_numpy(rng.random((2, 1, low, low), dtype=np.float32))  # a decoder-resolution map (or S×S)
    out = restore(probs, frame, "cris")
    assert out.shape == (2, 1, frame.orig_height, frame.orig_width) and out.dtype == torch.float32
    assert torch.equal(restore(probs[1], frame, "cris"), out[1])  # (1, h, w) in, (1, H0, W0) out
    # what CRIS's engine does: bicubic (align_corners=True) to the input size, then warpAffine by the inverse map
    up = torch.nn.functional.interpolate(probs, size=(frame.size, frame.size), mode="bicubic", align_corners=True)
    inverse = cv2.invertAffineTransform(frame.affine())
    for i in range(2):
        expected = cv2.warpAffine(up[i, 0].numpy(), inverse, (frame.orig_width, frame.orig_height), flags=cv2.INTER_CUBIC, borderValue=0.0)
        np.testing.assert_allclose(out[i, 0].numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(90, 150), (150, 90), (37, 53)], ids=["landscape", "portrait", "odd"])
def test_cris_restore_brings_masks_back_like_bilinear(shape):
    mask = ellipse_and_box(*shape)
    _, m, frame = InputTransform(96, "letterbox")(random_image(*shape), mask)
    cris, bilinear = restore(m, frame, "cris")[0].numpy() > 0.5, restore(m, frame)[0].numpy() > 0.5
    assert iou(cris, mask) > 0.95 and iou(cris, bilinear) > 0.99
