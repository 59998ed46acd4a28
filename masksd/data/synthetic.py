"""Procedurally generated referring scenes: flat-coloured shapes and expressions
that single one of them out, generated on the fly and deterministic per seed.

A scene holds 3–4 (configurable: count and sizes) objects, each a ``shape`` (circle, square,
triangle), a ``colour`` (6 named RGB colours), a ``size`` (small, large) and a
position, on a grey noise background. Distractors are drawn to share attributes
with the target (same colour, same shape, or both), so an expression has to use
them all and a model can over- or under-segment. Expressions follow one grammar::

    the [small|large] <colour> <shape> [<relation> the [small|large] <colour> <shape>]
    relation: left of | right of | above | below

e.g. "the green triangle", "the large red circle", "the red circle left of the
blue square". Each is the shortest that identifies exactly one object: colour and
shape; then with size; then with a relation to a reference object (itself named
by its shortest unique colour-shape[-size] phrase). Scenes where none of these is
unique are redrawn.

Geometry: an object of radius r at (cx, cy) lies inside its box [cx ± r] × [cy ± r]
(circle of radius r, square of half-side 0.85 r, triangle with apex at the top of
the box and base along its bottom). Boxes never overlap (rejection sampling), so
every object is fully visible and masks are exact. "A left of B" is used for the
target only when A's box lies entirely left of B's box, and only if no other object
the phrase could mean has its centre left of B's centre (likewise for the other
relations; "above" means smaller y, rows grow downwards).

Splits draw from disjoint seed streams, ``(seed, split, index)``. The
``compositional`` split holds out some (colour, shape) combinations: they are never
the target in ``train``, ``val`` or ``test`` (they may still appear as distractors
or reference objects), and are the only targets in ``compositional``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from masksd.data.transforms import Frame, normalize_uint8

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SYNTHETIC_SPLITS",
    "Scene",
    "SceneObject",
    "SyntheticConfig",
    "SyntheticReferDataset",
    "shortest_expression",
    "target_words",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
}
"""Object colours. Each has a channel outside the background's [128 - 32, 128 + 32],
so no background pixel ever has an object's colour."""
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SYNTHETIC_SPLITS = ("train", "val", "test", "compositional")

_SQUARE_HALF_SIDE = 0.85  # of r: a square of half-side r would look much bigger than the circle of radius r
_GAP = 1.0  # pixels between object boxes
_SPLIT_CODE = {name: i for i, name in enumerate(SYNTHETIC_SPLITS)}
_MAX_SCENE_TRIES = 200
_MAX_PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. Pixel coordinates: x to the right, y downwards, pixel (i, j) centred at (j + 0.5, i + 0.5)."""

    shape: str
    """One of :data:`SHAPES`."""
    colour: str
    """A key of :data:`COLOURS`."""
    size: str
    """``small`` or ``large``."""
    cx: float
    """Box centre, x."""
    cy: float
    """Box centre, y."""
    radius: float
    """Half the box side; the shape lies inside [cx ± radius] × [cy ± radius]."""

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the box."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)

    def phrase(self, with_size: bool) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The objects of one item, which of them the expression refers to, and the expression."""

    objects: tuple[SceneObject, ...]
    target: int
    """Index of the referred object in ``objects``; the mask is exactly its pixels."""
    text: str


@dataclass
class SyntheticConfig:
    """A synthetic referring-scene dataset."""

    image_size: int = 64
    """S: images are rendered at the model input size directly (frame = identity). At least 32."""
    num_samples: int = 10_000
    """Items in the dataset; item i is the same scene on every access."""
    min_objects: int = 3
    """Fewest objects per scene (at least 2: a target and a distractor)."""
    max_objects: int = 4
    """Most objects per scene (at most 8; large objects may not fit more than 4 or 5)."""
    small_radius: tuple[float, float] = (0.13, 0.17)
    """Radius range of a ``small`` object, as a fraction of the image side (half its box side)."""
    large_radius: tuple[float, float] = (0.22, 0.30)
    """Radius range of a ``large`` object. With the defaults a target covers 9 % of the image on
    average (median 7 %, 10–90 % range 4–19 %), about 5 of the tiny ViT's 64 patches: closer to
    RefCOCO's people, cars and animals than 2–3 % (the ranges of masksd 0.1: 0.055–0.075 and
    0.11–0.14, with 3–6 objects)."""
    split: str = "train"
    """``train``, ``val``, ``test`` (disjoint seed streams, held-out combinations never targets)
    or ``compositional`` (only held-out combinations as targets)."""
    seed: int = 0
    """Base seed; with the split and the index it fixes each scene."""
    held_out: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
    """(colour, shape) target combinations kept for the ``compositional`` split."""
    background_noise: int = 24
    """Half-range of the uniform grey noise around 128 on the background (0–32; 0 is flat grey)."""

    def __post_init__(self) -> None:
        if self.split not in SYNTHETIC_SPLITS:
            raise ValueError(f"split must be one of {SYNTHETIC_SPLITS}, got {self.split!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an int >= 32 (smaller shapes become unreadable), got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")
        if not 2 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(f"need 2 <= min_objects <= max_objects <= 8, got min_objects={self.min_objects}, max_objects={self.max_objects}")
        for name in ("small_radius", "large_radius"):
            low, high = value = tuple(getattr(self, name))
            if not 0 < low <= high <= 0.45:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 0.45 (fractions of the image side), got {value}")
            setattr(self, name, value)
        if self.small_radius[1] > self.large_radius[0]:
            raise ValueError(f"small_radius {self.small_radius} must lie below large_radius {self.large_radius}, so that the size words mean something")
        if not 0 <= self.background_noise <= 32:
            raise ValueError(f"background_noise must be in [0, 32] to stay clear of the object colours, got {self.background_noise}")
        self.held_out = tuple(tuple(c) for c in self.held_out)
        for combo in self.held_out:
            if len(combo) != 2 or combo[0] not in COLOURS or combo[1] not in SHAPES:
                raise ValueError(f"held_out entries must be (colour, shape) with colour in {list(COLOURS)} and shape in {list(SHAPES)}, got {combo!r}")
        if len(set(self.held_out)) != len(self.held_out):
            raise ValueError(f"held_out has duplicates: {self.held_out}")
        if len(self.held_out) == len(COLOURS) * len(SHAPES):
            raise ValueError("held_out holds every (colour, shape) combination; train/val/test would have no targets")
        if self.split == "compositional" and not self.held_out:
            raise ValueError("split 'compositional' needs a non-empty held_out")

    def target_combinations(self) -> list[tuple[str, str]]:
        """The (colour, shape) combinations a target of this split can have."""
        if self.split == "compositional":
            return list(self.held_out)
        held = set(self.held_out)
        return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]


def _relation_strict(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """a's box lies entirely on the ``relation`` side of b's box."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return {"left of": ax1 < bx0, "right of": ax0 > bx1, "above": ay1 < by0, "below": ay0 > by1}[relation]


def _relation_loose(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """a's centre is on the ``relation`` side of b's centre: what a reader might still accept."""
    return {"left of": a.cx < b.cx, "right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}[relation]


def _matching(objects: tuple[SceneObject, ...], obj: SceneObject, with_size: bool) -> list[int]:
    return [i for i, o in enumerate(objects) if o.colour == obj.colour and o.shape == obj.shape and (not with_size or o.size == obj.size)]


def _unique_phrase(objects: tuple[SceneObject, ...], i: int) -> str | None:
    """The shortest phrase without a relation that means only object i, or None."""
    for with_size in (False, True):
        if _matching(objects, objects[i], with_size) == [i]:
            return objects[i].phrase(with_size)
    return None


def shortest_expression(objects: tuple[SceneObject, ...], target: int, rng: np.random.Generator) -> str | None:
    """The shortest expression that identifies ``objects[target]`` alone, or None if the grammar has none.
    Ties (several reference objects or relations) are broken with ``rng``."""
    phrase = _unique_phrase(objects, target)
    if phrase is not None:
        return f"the {phrase}"
    t = objects[target]
    for with_size in (False, True):
        rivals = [i for i in _matching(objects, t, with_size) if i != target]
        options: list[tuple[int, str, str]] = []  # (length of the reference phrase, relation, reference phrase)
        for j, ref in enumerate(objects):
            if j == target:
                continue
            ref_phrase = _unique_phrase(objects, j)
            if ref_phrase is None:
                continue
            for relation in RELATIONS:
                if _relation_strict(t, relation, ref) and not any(_relation_loose(objects[k], relation, ref) for k in rivals):
                    options.append((len(ref_phrase.split()), relation, ref_phrase))
        if options:
            shortest = min(o[0] for o in options)
            options = [o for o in options if o[0] == shortest]
            _, relation, ref_phrase = options[rng.integers(len(options))]
            return f"the {t.phrase(with_size)} {relation} the {ref_phrase}"
    return None


def _parse_phrase(words: list[str], start: int) -> int:
    """End of the noun phrase ``the [size] <colour> <shape>`` starting at ``words[start]``, or -1."""
    i = start
    if i >= len(words) or words[i] != "the":
        return -1
    i += 1
    if i < len(words) and words[i] in SIZES:
        i += 1
    if i + 1 < len(words) and words[i] in COLOURS and words[i + 1] in SHAPES:
        return i + 2
    return -1


def target_words(text: str) -> list[bool]:
    """Which whitespace-separated words of a synthetic expression name the target itself.

    True for the target's size, colour and shape (the noun phrase after the first "the");
    False for "the", the relation's words and the reference object's phrase. E.g.
    "the red circle left of the large blue square" -> [F, T, T, F, F, F, F, F, F].
    Raises ValueError if ``text`` does not follow the grammar of this module's docstring
    (so it also tells synthetic expressions from others).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words = text.split()
    target_end = end = _parse_phrase(words, 0)
    if 0 < end < len(words):  # a relation and the reference object's phrase must follow
        relation = next((r.split() for r in RELATIONS if words[end : end + len(r.split())] == r.split()), None)
        end = _parse_phrase(words, end + len(relation)) if relation else -1
    if end != len(words):
        raise ValueError(
            f"text {text!r} is not a synthetic expression: expected "
            "'the [size] <colour> <shape> [<relation> the [size] <colour> <shape>]'"
        )
    return [0 < i < target_end for i in range(len(words))]


class SyntheticReferDataset(Dataset):
    """Synthetic referring scenes in the sample format of ``masksd.data``.

    ``__getitem__(i)`` returns ``image`` float32 (3, S, S) CLIP-normalised, ``mask``
    float32 (1, S, S), ``text``, ``target`` bool numpy (S, S) (the same mask:
    images are rendered at the input size), ``frame`` = ``Frame.identity(S)`` and
    ``index``. :meth:`scene` gives the objects and expression behind item i, and
    :meth:`render` the uint8 image with a per-pixel object-index map.
    """

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config if config is not None else SyntheticConfig()
        self._targets = self.config.target_combinations()
        s = self.config.image_size
        self._centres = np.arange(s, dtype=np.float64) + 0.5  # pixel centre coordinates, x or y

    def __len__(self) -> int:
        return self.config.num_samples

    def __repr__(self) -> str:
        c = self.config
        return f"SyntheticReferDataset(split={c.split}, seed={c.seed}, size={c.image_size}, samples={c.num_samples})"

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.config.num_samples:
            raise IndexError(f"index must be in [0, {self.config.num_samples}), got {index}")
        return np.random.default_rng([self.config.seed, _SPLIT_CODE[self.config.split], index])

    def _place(self, rng: np.random.Generator, attributes: list[tuple[str, str, str]]) -> tuple[SceneObject, ...] | None:
        """Positions for (shape, colour, size) triples with non-overlapping boxes, or None if they did not fit."""
        s = self.config.image_size
        ranges = {"small": self.config.small_radius, "large": self.config.large_radius}
        radii = [rng.uniform(*ranges[size]) * s for _, _, size in attributes]
        placed: dict[int, SceneObject] = {}
        for k in sorted(range(len(attributes)), key=lambda k: -radii[k]):  # big ones first pack better
            r = radii[k]
            for _ in range(_MAX_PLACEMENT_TRIES):
                cx, cy = rng.uniform(r, s - r, size=2)
                if all(abs(cx - o.cx) >= r + o.radius + _GAP or abs(cy - o.cy) >= r + o.radius + _GAP for o in placed.values()):
                    shape, colour, size = attributes[k]
                    placed[k] = SceneObject(shape, colour, size, float(cx), float(cy), float(r))
                    break
            else:
                return None
        return tuple(placed[k] for k in range(len(attributes)))

    def _attributes(self, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        """(shape, colour, size) of the target (first) and its distractors, which share its attributes often."""
        c = self.config
        colours, n = list(COLOURS), int(rng.integers(c.min_objects, c.max_objects + 1))
        colour, shape = self._targets[rng.integers(len(self._targets))]
        out = [(shape, colour, SIZES[rng.integers(2)])]
        for _ in range(n - 1):
            kind = rng.choice(4, p=[0.3, 0.3, 0.2, 0.2])
            if kind == 0:  # same colour, other shape
                d_colour, d_shape = colour, rng.choice([x for x in SHAPES if x != shape])
            elif kind == 1:  # same shape, other colour
                d_colour, d_shape = rng.choice([x for x in colours if x != colour]), shape
            elif kind == 2:  # same colour and shape: needs size or a relation
                d_colour, d_shape = colour, shape
            else:
                d_colour, d_shape = rng.choice(colours), rng.choice(SHAPES)
            out.append((str(d_shape), str(d_colour), SIZES[rng.integers(2)]))
        return out

    def _generate(self, index: int) -> tuple[Scene, np.random.Generator]:
        rng = self._rng(index)
        for _ in range(_MAX_SCENE_TRIES):
            attributes = self._attributes(rng)
            objects = self._place(rng, attributes)
            if objects is None:
                continue
            order = rng.permutation(len(objects))  # the target is not always first
            objects = tuple(objects[k] for k in order)
            target = int(np.flatnonzero(order == 0)[0])
            text = shortest_expression(objects, target, rng)
            if text is not None:
                return Scene(objects, target, text), rng
        raise RuntimeError(f"no describable scene in {_MAX_SCENE_TRIES} tries for index {index} of {self.config}; use fewer or smaller objects (max_objects, small_radius, large_radius) or a larger image_size")

    def scene(self, index: int) -> Scene:
        """The objects, target and expression of item ``index``."""
        return self._generate(index)[0]

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, Scene]:
        """Item ``index`` drawn: uint8 RGB (S, S, 3), int8 (S, S) object index per pixel
        (-1 on the background), and its :class:`Scene`."""
        scene, rng = self._generate(index)
        s, noise = self.config.image_size, self.config.background_noise
        image = rng.integers(128 - noise, 128 + noise + 1, size=(s, s, 3), dtype=np.uint8)  # (S, S, 3)
        labels = np.full((s, s), -1, dtype=np.int8)  # (S, S)
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            cols = slice(max(0, int(np.floor(x0))), min(s, int(np.ceil(x1))))
            rows = slice(max(0, int(np.floor(y0))), min(s, int(np.ceil(y1))))
            dx = self._centres[cols][None, :] - obj.cx  # (1, w)
            dy = self._centres[rows][:, None] - obj.cy  # (h, 1)
            r = obj.radius
            if obj.shape == "circle":
                inside = dx**2 + dy**2 <= r**2
            elif obj.shape == "square":
                inside = (np.abs(dx) <= _SQUARE_HALF_SIDE * r) & (np.abs(dy) <= _SQUARE_HALF_SIDE * r)
            else:  # triangle: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
                inside = (dy <= r) & (2 * np.abs(dx) <= dy + r)
            labels[rows, cols][inside] = k
            image[rows, cols][inside] = COLOURS[obj.colour]
        return image, labels, scene

    def __getitem__(self, index: int) -> dict:
        image, labels, scene = self.render(index)
        target = labels == scene.target  # (S, S)
        return {
            "image": normalize_uint8(image),  # (3, S, S)
            "mask": torch.from_numpy(target[None].astype(np.float32)),  # (1, S, S)
            "text": scene.text,
            "target": target,
            "frame": Frame.identity(self.config.image_size),
            "index": index,
        }
