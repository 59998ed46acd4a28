import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from masksd.data import SAMPLE_KEYS, Frame, collate
from masksd.data.synthetic import COLOURS, SHAPES, SyntheticConfig, SyntheticReferDataset

_C, _S = "|".join(COLOURS), "|".join(SHAPES)
EXPRESSION = re.compile(rf"^the (?:(small|large) )?({_C}) ({_S})(?: (left of|right of|above|below) the (?:(small|large) )?({_C}) ({_S}))?$")


def denoted(objects, size, colour, shape):
    return [i for i, o in enumerate(objects) if o.colour == colour and o.shape == shape and size in (None, o.size)]


def pixel_extent(labels, k):
    """(x0, y0, x1, y1) of object k's drawn pixels, inclusive."""
    ys, xs = np.nonzero(labels == k)
    return xs.min(), ys.min(), xs.max(), ys.max()


def strictly(labels, a, relation, b):
    """a's drawn pixels all lie on the relation's side of all of b's."""
    ax0, ay0, ax1, ay1 = pixel_extent(labels, a)
    bx0, by0, bx1, by1 = pixel_extent(labels, b)
    return {"left of": ax1 < bx0, "right of": ax0 > bx1, "above": ay1 < by0, "below": ay0 > by1}[relation]


def loosely(a, relation, b):
    return {"left of": a.cx < b.cx, "right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}[relation]


def check_expression(scene, labels):
    """Parse the expression and evaluate it against the scene: it must mean the target and nothing else,
    and be the shortest form the grammar allows."""
    m = EXPRESSION.match(scene.text)
    assert m, scene.text
    size, colour, shape, relation, r_size, r_colour, r_shape = m.groups()
    objects = scene.objects
    candidates = denoted(objects, size, colour, shape)
    assert scene.target in candidates, scene.text
    if relation is None:
        assert candidates == [scene.target], scene.text
        if size is not None:  # size only when colour and shape are not enough
            assert len(denoted(objects, None, colour, shape)) > 1, scene.text
        return "size" if size else "colour+shape"
    refs = denoted(objects, r_size, r_colour, r_shape)
    assert len(refs) == 1, scene.text
    ref = refs[0]
    assert ref != scene.target
    assert strictly(labels, scene.target, relation, ref), scene.text
    for other in candidates:
        if other != scene.target:
            assert not loosely(objects[other], relation, objects[ref]), scene.text
    t = objects[scene.target]
    assert len(denoted(objects, None, t.colour, t.shape)) > 1 and len(denoted(objects, t.size, t.colour, t.shape)) > 1, scene.text
    return "relation"


def check_pixels(ds, index):
    image, labels, scene = ds.render(index)
    s = ds.config.image_size
    assert image.shape == (s, s, 3) and image.dtype == np.uint8 and labels.shape == (s, s)
    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    is_palette = (image[:, :, None, :] == palette[None, None]).all(-1).any(-1)  # (S, S)
    assert not is_palette[labels == -1].any()  # the background never takes an object colour
    for k, obj in enumerate(scene.objects):
        drawn = labels == k
        assert drawn.any(), (index, obj)
        assert (image[drawn] == COLOURS[obj.colour]).all()  # flat-coloured
        x0, y0, x1, y1 = pixel_extent(labels, k)
        bx0, by0, bx1, by1 = obj.box
        assert bx0 <= x0 + 0.5 and x1 + 0.5 <= bx1 and by0 <= y0 + 0.5 and y1 + 0.5 <= by1  # pixel centres inside the box
    # every pixel with the target's colour lies in the target's mask or in an object of the same colour
    target = scene.objects[scene.target]
    same_colour = (image == COLOURS[target.colour]).all(-1)
    owners = {k for k, o in enumerate(scene.objects) if o.colour == target.colour}
    assert np.isin(labels[same_colour], list(owners)).all()
    sample = ds[index]
    assert np.array_equal(sample["target"], labels == scene.target)
    assert torch.equal(sample["mask"][0], torch.from_numpy(labels == scene.target).float())
    assert sample["text"] == scene.text and sample["frame"] == Frame.identity(s)
    return scene, labels


def test_same_index_is_bit_identical_and_order_free():
    a = SyntheticReferDataset(SyntheticConfig(num_samples=50, seed=3))
    b = SyntheticReferDataset(SyntheticConfig(num_samples=50, seed=3))
    for i in [7, 0, 49, 7]:
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) and x["text"] == y["text"]
        assert a.scene(i) == b.scene(i)


@pytest.mark.parametrize("other", [dict(split="val"), dict(split="test"), dict(seed=1)])
def test_splits_and_seeds_draw_different_scenes(other):
    base = SyntheticReferDataset(SyntheticConfig(num_samples=20))
    diff = SyntheticReferDataset(SyntheticConfig(num_samples=20, **other))
    same_image = sum(torch.equal(base[i]["image"], diff[i]["image"]) for i in range(20))
    same_scene = sum(base.scene(i) == diff.scene(i) for i in range(20))
    assert same_image == 0 and same_scene == 0


@pytest.mark.parametrize("split", ["train", "val", "compositional"])
def test_every_expression_identifies_exactly_one_object(split):
    ds = SyntheticReferDataset(SyntheticConfig(num_samples=300, split=split, image_size=48))
    kinds = [check_expression(ds.scene(i), ds.render(i)[1]) for i in range(300)]
    # all three forms occur, so size and relations are really needed
    assert {"colour+shape", "size", "relation"} <= set(kinds)
    assert kinds.count("relation") > 20


def test_masks_match_drawn_pixels():
    ds = SyntheticReferDataset(SyntheticConfig(num_samples=40, image_size=64))
    for i in range(40):
        check_pixels(ds, i)


def test_distractors_share_attributes_with_the_target():
    ds = SyntheticReferDataset(SyntheticConfig(num_samples=200))
    same_colour = same_shape = same_both = 0
    for i in range(200):
        scene = ds.scene(i)
        t = scene.objects[scene.target]
        others = [o for k, o in enumerate(scene.objects) if k != scene.target]
        same_colour += any(o.colour == t.colour and o.shape != t.shape for o in others)
        same_shape += any(o.shape == t.shape and o.colour != t.colour for o in others)
        same_both += any(o.shape == t.shape and o.colour == t.colour for o in others)
        assert 3 <= len(scene.objects) <= 6
    assert min(same_colour, same_shape, same_both) > 40


def test_compositional_combinations_are_never_train_targets():
    held_out = {("red", "triangle"), ("green", "circle"), ("blue", "square")}
    seen_as_distractor = set()
    for split in ("train", "val", "test"):
        ds = SyntheticReferDataset(SyntheticConfig(num_samples=300, split=split))
        assert set(ds.config.held_out) == held_out
        for i in range(300):
            scene = ds.scene(i)
            t = scene.objects[scene.target]
            assert (t.colour, t.shape) not in held_out, (split, i, scene.text)
            seen_as_distractor |= {(o.colour, o.shape) for o in scene.objects} & held_out
    assert seen_as_distractor == held_out  # the parts and the combinations still appear, just never as targets
    comp = SyntheticReferDataset(SyntheticConfig(num_samples=300, split="compositional"))
    targets = {(comp.scene(i).objects[comp.scene(i).target].colour, comp.scene(i).objects[comp.scene(i).target].shape) for i in range(300)}
    assert targets == held_out


def test_sample_format_and_collate():
    ds = SyntheticReferDataset(SyntheticConfig(num_samples=8, image_size=32))
    sample = ds[0]
    assert set(sample) == set(SAMPLE_KEYS)
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 32, 32)
    assert sample["target"].dtype == bool and sample["index"] == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["index"] == [0, 1, 2, 3] and len(batch["text"]) == 4


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticConfig(split="holdout")
    with pytest.raises(ValueError, match="image_size must be an int >= 32"):
        SyntheticConfig(image_size=16)
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        SyntheticConfig(min_objects=5, max_objects=3)
    with pytest.raises(ValueError, match="held_out entries must be"):
        SyntheticConfig(held_out=(("pink", "circle"),))
    with pytest.raises(ValueError, match="needs a non-empty held_out"):
        SyntheticConfig(split="compositional", held_out=())
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        SyntheticConfig(seed=-1)
    with pytest.raises(ValueError, match="background_noise must be in"):
        SyntheticConfig(background_noise=60)
    with pytest.raises(IndexError, match=r"index must be in \[0, 4\)"):
        SyntheticReferDataset(SyntheticConfig(num_samples=4))[4]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(32, 96),
    objects=st.tuples(st.integers(2, 8), st.integers(2, 8)).map(sorted),
    split=st.sampled_from(["train", "test", "compositional"]),
    index=st.integers(0, 999),
)
def test_scene_invariants_over_seeds_and_sizes(seed, size, objects, split, index):
    # more than 4 objects only fit at smaller sizes (those of masksd 0.1)
    sizes = {} if objects[1] <= 4 else {"small_radius": (0.055, 0.075), "large_radius": (0.11, 0.14)}
    ds = SyntheticReferDataset(SyntheticConfig(image_size=size, num_samples=1000, min_objects=objects[0], max_objects=objects[1], seed=seed, split=split, **sizes))
    scene, labels = check_pixels(ds, index)
    check_expression(scene, labels)
    assert objects[0] <= len(scene.objects) <= objects[1]


def test_object_sizes_are_settings_and_the_default_referent_is_large():
    ds = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=200))
    shares = np.array([ds[i]["mask"].mean().item() for i in range(200)])
    assert 0.06 < shares.mean() < 0.13 and shares.min() > 0.02  # RefCOCO-like, not 2-3 % as in masksd 0.1
    small = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=200, small_radius=(0.055, 0.075), large_radius=(0.11, 0.14), max_objects=6))
    assert np.mean([small[i]["mask"].mean().item() for i in range(200)]) < 0.04
    for scene in (ds.scene(i) for i in range(50)):
        for obj in scene.objects:
            low, high = {"small": (0.13, 0.17), "large": (0.22, 0.30)}[obj.size]
            assert low * 64 <= obj.radius <= high * 64
    with pytest.raises(ValueError, match="small_radius"):
        SyntheticConfig(small_radius=(0.2, 0.25))  # overlaps the large range
    with pytest.raises(ValueError, match="large_radius"):
        SyntheticConfig(large_radius=(0.3, 0.6))
