"""RefCOCO, RefCOCO+, G-Ref (RefCOCOg), RefClef and gRefCOCO read from the standard refer files.

Layout (the refer repo's ``data/`` folder, https://github.com/lichengunc/refer, and ReLA's
``datasets/`` for gRefCOCO, https://github.com/henghuiding/ReLA)::

    <root>/
      refcoco/   refs(unc).p  instances.json
      refcoco+/  refs(unc).p  instances.json
      refcocog/  refs(umd).p  refs(google).p  instances.json
      refclef/   refs(berkeley).p  refs(unc).p  instances.json
      grefcoco/  grefs(unc).json  instances.json
      images/mscoco/images/train2014/COCO_train2014_000000000009.jpg ...
      images/saiapr_tc-12/25/images/25008.jpg ...                       (RefClef)

``refs(<split_by>).p`` is a pickle: a list of refs, each a dict with ``ref_id,
ann_id, image_id, split, sentences`` (dicts with ``sent_id, sent, raw, tokens``),
``sent_ids, category_id, file_name``. ``instances.json`` is COCO-style:
``images`` (``id, file_name, height, width``) and ``annotations`` (``id,
image_id, segmentation``: polygons, compressed RLE or uncompressed RLE; RefClef's
are lists of compressed RLEs, merged).

RefClef's images are the SAIAPR TC-12 archive's: ``file_name`` ``25008.jpg`` lies at
``<image_root>/25/images/25008.jpg`` (:func:`~masksd.data.config.saiapr_image_path`).

gRefCOCO (GRES, Liu, Ding and Jiang, CVPR 2023) writes its refs as JSON with the same keys,
but ``ann_id`` is a list: several annotations (a multi-target expression; their masks are
merged, crowd annotations left out as ReLA's loader leaves them out) or ``[-1]`` (a
no-target expression: an all-empty mask). A ``no_target`` flag, where a file has one, must
agree with ``ann_id``.

The refs pickle is read without running code: the published files hold only lists, dicts,
strings and numbers, so every Python global a file names (a class, a function, a ``copy_reg``
reconstructor) is refused unless ``ReferConfig(trust_pickle=True)``.

The index (pickle and json) is read once at construction; images and masks are
read and decoded per item. Needs ``pillow`` and ``pycocotools``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
from torch.utils.data import Dataset

from masksd.data.images import read_rgb
from masksd.data.config import (  # re-exported: masksd.data.refer keeps its names
    DEFAULT_SPLIT_BY, SPLIT_COUNTS, SPLITS, ReferConfig, ReferDatasetName, SplitBy, SplitCounts, SplitCountWarning, TextKey,
    saiapr_image_path,
)
from masksd.data.transforms import InputTransform

__all__ = [
    "DEFAULT_SPLIT_BY", "NO_TARGET", "SPLITS", "SPLIT_COUNTS", "ReferConfig", "ReferDataset", "ReferDatasetName", "SplitBy",
    "SplitCountWarning", "SplitCounts", "TextKey", "decode_segmentation", "draw_sentence", "target_ann_ids",
]

NO_TARGET = -1
"""The ``ann_id`` gRefCOCO gives a no-target expression (as ``[-1]``)."""

_MISSING_DEPS = "ReferDataset needs pillow and pycocotools (pip install pillow pycocotools, or masksd[examples])"


def _coco_mask():
    try:
        from pycocotools import mask
    except ImportError as e:
        raise ImportError(_MISSING_DEPS) from e
    return mask


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` as a bool (height, width) mask.

    Accepts a list of polygons (flat ``[x0, y0, x1, y1, ...]`` lists of at least 3 points; the
    parts are merged), an uncompressed RLE (``counts`` a list of ints), a compressed RLE
    (``counts`` a str or bytes), or a list of RLEs (RefClef's form; merged). Everything is checked
    before pycocotools sees it, since its C code trusts its input: polygon coordinates must be finite
    numbers within one image size of the image (the parts of a polygon past the image's edge are cut
    at the edge, as COCO's API does), an RLE's ``size`` must be ``[height, width]`` and its counts
    non-negative and summing to height x width. Raises ``ValueError`` naming the field.
    """
    mask_utils = _coco_mask()
    if isinstance(segmentation, list) and segmentation and all(isinstance(part, dict) for part in segmentation):
        masks = []
        for i, part in enumerate(segmentation):
            try:
                masks.append(decode_segmentation(part, height, width))
            except ValueError as e:
                raise ValueError(f"RLE part {i}: {e}") from None
        return np.logical_or.reduce(masks)  # (H, W)
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("polygon segmentation is an empty list (expected [[x0, y0, x1, y1, ...], ...])")
        if any(isinstance(part, dict) for part in segmentation):
            raise ValueError("segmentation mixes polygons and RLE dicts (expected a list of one kind)")
        for i, polygon in enumerate(segmentation):
            _check_polygon(polygon, i, height, width)
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in segmentation], height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, (list, tuple)) or [v for v in size] != [height, width] or not all(_is_int(v) for v in size):
            raise ValueError(f"RLE size {size!r} does not match the image's [height, width] [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                raise ValueError("uncompressed RLE counts must be non-negative ints")
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            counts = _rle_string_counts(counts)
            rle = {"size": [height, width], "counts": segmentation["counts"]}
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        else:
            raise ValueError(f"RLE counts must be a list of ints or a compressed str, got {type(counts).__name__}")
        if sum(counts) != height * width:
            raise ValueError(f"RLE counts cover {sum(counts)} pixels, not the image's {height}x{width} = {height * width}")
    else:
        raise ValueError(f"segmentation must be a polygon list or an RLE dict with 'counts' and 'size', got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)  # (H, W)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_polygon(polygon, i: int, height: int, width: int) -> None:
    if not isinstance(polygon, list):
        raise ValueError(f"polygon {i} must be a [x0, y0, x1, y1, ...] list, got {type(polygon).__name__}")
    if len(polygon) % 2 or len(polygon) < 6:
        raise ValueError(f"polygon {i} has {len(polygon)} coordinates; expected an even count of at least 6 (3 points)")
    for j, v in enumerate(polygon):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
            raise ValueError(f"polygon {i} coordinate {j} must be a finite number, got {v!r}")
        side = width if j % 2 == 0 else height
        if not -side <= v <= 2 * side:  # far outside is a corrupt file (and makes pycocotools allocate without bound)
            raise ValueError(f"polygon {i} coordinate {j} = {v} lies more than the image's {'width' if j % 2 == 0 else 'height'} {side} outside it")


def _rle_string_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString, checked): 6 bits per
    character from '0', 5 of value and a continuation bit, counts after the second as deltas."""
    if isinstance(counts, str):
        if not counts.isascii():
            raise ValueError("compressed RLE counts must be ASCII")
        counts = counts.encode("ascii")
    if not counts:
        raise ValueError("compressed RLE counts are empty")
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p == len(counts):
                raise ValueError("compressed RLE counts end inside a number (truncated)")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE counts hold {chr(counts[p])!r}, outside the code's '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            raise ValueError(f"compressed RLE counts decode to a negative run ({x})")
        out.append(x)
    return out


class _RefusedGlobal(Exception):
    """A refs pickle named a Python global; the argument is its ``module.name``."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Builds what pickle's own opcodes make (lists, dicts, tuples, sets, str, bytes, numbers, bools, None)
    and refuses every global a file names: classes, functions and ``copy_reg`` reconstructors are how a
    pickle runs code, and the published refs name none."""

    def find_class(self, module: str, name: str):
        raise _RefusedGlobal(f"{module}.{name}")


def _load_refs(path: str, trust_pickle: bool = False) -> list[dict]:
    """The refs of a refer pickle, or of gRefCOCO's JSON (a path ending in ``.json``)."""
    if not os.path.isfile(path):
        layout = "<root>/grefcoco/grefs(unc).json" if path.endswith(".json") else "<root>/<dataset>/refs(<split_by>).p"
        raise FileNotFoundError(f"refs file not found: {path} (expected the refer repo's data layout {layout})")
    if path.endswith(".json"):
        refs = _load_json(path)
        if not isinstance(refs, list):
            raise ValueError(f"refs file {path} must hold a list of dicts, got {type(refs).__name__}")
        return refs
    unpickler = pickle.Unpickler if trust_pickle else _NoGlobalsUnpickler
    try:
        with open(path, "rb") as f:
            # the published refs are Python 2 pickles whose str objects hold UTF-8 bytes
            refs = unpickler(f, encoding="utf-8").load()
    except _RefusedGlobal as e:
        raise ValueError(
            f"refs pickle {path} names the Python global {e.args[0]}, which could run code when loaded; the published refs "
            "hold only lists, dicts, strings and numbers, so this file is refused. If you trust its source, allow it with "
            "ReferConfig(trust_pickle=True) (--trust-refs-pickle in the example scripts)"
        ) from None
    except Exception as e:
        raise ValueError(f"could not read refs pickle {path}: {type(e).__name__}: {e}") from e
    if not isinstance(refs, list):
        raise ValueError(f"refs pickle {path} must hold a list of dicts, got {type(refs).__name__}")
    return refs


_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def target_ann_ids(ref: dict, multi_target: bool) -> list[int]:
    """The annotation ids a (checked) ref refers to: ``[ann_id]``; for gRefCOCO (``multi_target``) its list,
    or ``[]`` for a no-target ref (``ann_id`` ``[-1]`` or ``-1``). Elsewhere -1 is an id like any other (one
    that no annotation has, which the loader refuses by name)."""
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [] if multi_target and ids == [NO_TARGET] else ids


def _check_ann_id(ref: dict, i: int, path: str, multi_target: bool) -> None:
    """``ann_id``: an int; for gRefCOCO also a non-empty list of distinct ints, or ``[-1]`` (no target),
    which a ``no_target`` flag, if present, must agree with."""
    ann_id = ref["ann_id"]
    if not multi_target or not isinstance(ann_id, list):
        if not _is_int(ann_id):
            kind = "an int or a list of ints" if multi_target else "an int"
            raise ValueError(f"ref #{i} in {path}: ann_id must be {kind}, got {ann_id!r}")
        return
    if not ann_id or not all(_is_int(a) for a in ann_id):
        raise ValueError(f"ref #{i} in {path}: ann_id must be a non-empty list of ints (or [-1] for no target), got {ann_id!r}")
    if NO_TARGET in ann_id and ann_id != [NO_TARGET]:
        raise ValueError(f"ref #{i} in {path}: ann_id {ann_id!r} mixes -1 (no target) with annotation ids")
    if len(set(ann_id)) != len(ann_id):
        raise ValueError(f"ref #{i} in {path}: ann_id {ann_id!r} lists an annotation twice")
    if "no_target" in ref:
        flag = ref["no_target"]
        if not isinstance(flag, bool):
            raise ValueError(f"ref #{i} in {path}: no_target must be true or false, got {flag!r}")
        if flag != (ann_id == [NO_TARGET]):
            raise ValueError(f"ref #{i} in {path}: no_target is {flag} but ann_id is {ann_id!r}")


def _check_refs(refs: list, path: str, splits: tuple[str, ...], multi_target: bool = False) -> None:
    """Every ref of the file (not only the split's): a dict with int ids (``ann_id`` a list for
    gRefCOCO, ``multi_target``), a split of the partition, a sentence list; ref_ids unique. A file
    failing this is not the partition it is named for."""
    first: dict[int, int] = {}
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"ref #{i} in {path} must be a dict, got {type(ref).__name__}")
        missing = set(_REF_KEYS) - ref.keys()
        if missing:
            raise ValueError(f"ref #{i} in {path} lacks keys {sorted(missing)}")
        for key in ("ref_id", "image_id"):
            if not _is_int(ref[key]):
                raise ValueError(f"ref #{i} in {path}: {key} must be an int, got {ref[key]!r}")
        _check_ann_id(ref, i, path, multi_target)
        if not isinstance(ref["split"], str) or ref["split"] not in splits:
            raise ValueError(f"ref_id {ref['ref_id']} in {path}: split must be one of {list(splits)} (this partition's), got {ref['split']!r}")
        if not isinstance(ref["sentences"], list):
            raise ValueError(f"ref_id {ref['ref_id']} in {path}: sentences must be a list, got {type(ref['sentences']).__name__}")
        if ref["ref_id"] in first:
            raise ValueError(f"ref_id {ref['ref_id']} appears twice in {path} (refs #{first[ref['ref_id']]} and #{i})")
        first[ref["ref_id"]] = i


def _check_sentences(ref: dict, path: str, text_key: str) -> None:
    """A ref of the split read: at least one sentence, each a dict whose ``text_key`` is a non-blank str."""
    if not ref["sentences"]:
        raise ValueError(f"ref_id {ref['ref_id']} in {path} has no sentences")
    for j, sentence in enumerate(ref["sentences"]):
        if not isinstance(sentence, dict) or text_key not in sentence:
            raise ValueError(f"ref_id {ref['ref_id']} in {path} has a sentence without the text_key field {text_key!r} (sentence #{j})")
        text = sentence[text_key]
        if not isinstance(text, str):
            raise ValueError(f"ref_id {ref['ref_id']} in {path}: sentence #{j}'s {text_key!r} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"ref_id {ref['ref_id']} in {path}: sentence #{j}'s {text_key!r} is empty or whitespace ({text!r})")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"could not parse {path} as JSON: {type(e).__name__}: {e}") from e


def _load_instances(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instances file not found: {path} (expected COCO-style <root>/<dataset>/instances.json)")
    instances = _load_json(path)
    if not isinstance(instances, dict) or not {"images", "annotations"} <= instances.keys():
        raise ValueError(f"{path} must be a COCO-style dict with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(instances[key], list):
            raise ValueError(f"{path}: {key!r} must be a list, got {type(instances[key]).__name__}")
    return instances


def _index(entries: list, section: str, noun: str, path: str, keep: set[int]) -> dict[int, dict]:
    """{id: entry} of the entries of ``instances[section]`` whose id is in ``keep``; every entry must be a
    dict with a unique int ``id`` (the index is built from all of them)."""
    out: dict[int, dict] = {}
    first: dict[int, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            got = entry.get("id") if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{section}[{i}] in {path} must be a dict with an int 'id', got {got!r}")
        if entry["id"] in first:
            raise ValueError(f"{path}: {noun} id {entry['id']} appears twice ({section}[{first[entry['id']]}] and {section}[{i}])")
        first[entry["id"]] = i
        if entry["id"] in keep:
            out[entry["id"]] = entry
    return out


def _crowd(ann: dict, path: str) -> bool:
    """An annotation's ``iscrowd`` (absent: 0) as a bool; anything but 0, 1 or a bool is refused by name."""
    flag = ann.get("iscrowd", 0)
    if flag not in (0, 1) or not isinstance(flag, (int, bool)):
        raise ValueError(f"annotation id {ann['id']} in {path}: iscrowd must be 0 or 1, got {flag!r}")
    return bool(flag)


def _check_image(image: dict, path: str) -> None:
    """An image entry that a ref uses: a relative ``file_name`` inside image_root, positive int height and width."""
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"image id {image['id']} in {path}: file_name must be a non-empty str, got {name!r}")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"image id {image['id']} in {path}: file_name {name!r} must be a path inside image_root")
    for key in ("height", "width"):
        if not _is_int(image.get(key)) or image[key] < 1:
            raise ValueError(f"image id {image['id']} in {path}: {key} must be a positive int, got {image.get(key)!r}")


def draw_sentence(seed: int, epoch: int, index: int, count: int) -> int:
    """Train mode's draw: which of ``count`` sentences item ``index`` shows in ``epoch``, from (seed, epoch,
    index) only (not from DataLoader workers or access order; the manifest reader draws the same way)."""
    return int(np.random.default_rng((seed, epoch, index)).integers(count))


class ReferDataset(Dataset):
    """One split of RefCOCO / RefCOCO+ / G-Ref / RefClef / gRefCOCO as model-ready samples.

    Items are dicts (see ``masksd.data`` for the format shared with
    :class:`~masksd.data.synthetic.SyntheticReferDataset`): ``image`` float32
    (3, S, S), ``mask`` float32 (1, S, S), ``text`` str, ``target`` bool numpy
    (H0, W0), ``frame`` :class:`~masksd.data.transforms.Frame`, ``index`` int.

    In ``train`` mode the sentence of a ref is drawn at random per epoch: item i of
    epoch e (see :meth:`set_epoch`) takes the sentence that (config.seed, e, i) picks.
    """

    def __init__(self, config: ReferConfig) -> None:
        _coco_mask()  # fail now, not in the first __getitem__, if pycocotools is missing
        self.config = config
        self.epoch = 0
        self.transform = InputTransform(config.image_size, config.resize_mode)

        refs_path, instances_path = config.refs_path, config.instances_path
        all_refs = _load_refs(refs_path, config.trust_pickle)
        instances = _load_instances(instances_path)

        multi_target = config.dataset == "grefcoco"
        _check_refs(all_refs, refs_path, SPLITS[(config.dataset, config.split_by)], multi_target)
        self.refs: list[dict] = [ref for ref in all_refs if ref["split"] == config.split]  # in pickle order
        for ref in self.refs:
            _check_sentences(ref, refs_path, config.text_key)
        if not self.refs:
            present = sorted({r["split"] for r in all_refs})
            raise ValueError(f"no refs with split {config.split!r} in {refs_path}; the file has splits {present}")
        if config.check_counts:
            self._check_counts()

        # keep only the images and annotations this split refers to
        ann_ids = {a for r in self.refs for a in self.target_ids(r)}
        self.annotations: dict[int, dict] = _index(instances["annotations"], "annotations", "annotation", instances_path, ann_ids)
        image_ids = {r["image_id"] for r in self.refs}
        self.images: dict[int, dict] = _index(instances["images"], "images", "image", instances_path, image_ids)
        for image in self.images.values():
            _check_image(image, instances_path)
        for ref in self.refs:
            if ref["image_id"] not in self.images:
                raise ValueError(f"ref_id {ref['ref_id']} points to image_id {ref['image_id']}, which is not in {instances_path}")
            for ann_id in self.target_ids(ref):
                self._check_annotation(ref, ann_id)
            if multi_target and self.target_ids(ref) and all(_crowd(self.annotations[a], instances_path) for a in self.target_ids(ref)):
                raise ValueError(
                    f"ref_id {ref['ref_id']} in {refs_path} refers to crowd annotations only (ann_id {ref['ann_id']}), which "
                    "gRefCOCO's masks leave out: its target would be empty without being a no-target ref"
                )

        # per item: (position in refs, position in its sentences, or -1 to draw one at random)
        if config.mode == "train":
            self.items = [(r, -1) for r in range(len(self.refs))]
        else:
            self.items = [(r, s) for r, ref in enumerate(self.refs) for s in range(len(ref["sentences"]))]

    def target_ids(self, ref: dict) -> list[int]:
        """The annotation ids ``ref`` refers to; ``[]`` for a gRefCOCO no-target ref (:func:`target_ann_ids`)."""
        return target_ann_ids(ref, multi_target=self.config.dataset == "grefcoco")

    def _check_annotation(self, ref: dict, ann_id: int) -> None:
        """An annotation a ref of the split refers to exists, has an image_id (the ref's) and a segmentation."""
        refs_path, instances_path = self.config.refs_path, self.config.instances_path
        ann = self.annotations.get(ann_id)
        if ann is None:
            raise ValueError(f"ref_id {ref['ref_id']} points to ann_id {ann_id}, which is not in {instances_path}")
        missing = {"image_id", "segmentation"} - ann.keys()
        if missing:
            raise ValueError(f"annotation id {ann['id']} (ann_id of ref_id {ref['ref_id']}) in {instances_path} lacks keys {sorted(missing)}")
        if not _is_int(ann["image_id"]) or ann["image_id"] != ref["image_id"]:
            raise ValueError(
                f"ref_id {ref['ref_id']} in {refs_path} has image_id {ref['image_id']}, but its ann_id {ann_id} "
                f"has image_id {ann['image_id']!r} in {instances_path}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> SplitCounts:
        """The split's refs and sentences as read from the refs file (``len(self)`` is refs in
        train mode, sentences in eval mode)."""
        return SplitCounts(len(self.refs), sum(len(ref["sentences"]) for ref in self.refs))

    def _check_counts(self) -> None:
        c = self.config
        key = (c.dataset, c.split_by, c.split)
        found, expected = self.counts(), SPLIT_COUNTS[key]
        if expected is not None and found != expected:  # None: no published count to check against
            warnings.warn(
                f"{c.refs_path}: {c.dataset}/{c.split_by} {c.split} holds {found.refs} refs and {found.sentences} sentences, "
                f"but the published split has {expected.refs} refs and {expected.sentences} sentences: a refs file of "
                "another partition or a truncated download? (ReferConfig(check_counts=False) for a deliberate subset)",
                SplitCountWarning,
                stacklevel=3,
            )

    def set_epoch(self, epoch: int) -> None:
        """Train mode: draw the sentences of ``epoch`` (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        c = self.config
        return f"ReferDataset({c.dataset}/{c.split_by} {c.split}, mode={c.mode}, refs={len(self.refs)}, items={len(self)})"

    def image_path(self, image_id: int) -> str:
        """Path of an image's JPEG: ``image_root`` / the ``file_name`` from instances.json; for RefClef
        the SAIAPR TC-12 folder of the image (:func:`~masksd.data.config.saiapr_image_path`).
        (A ref's own ``file_name`` carries an annotation suffix and names no file.)"""
        file_name = self.images[image_id]["file_name"]
        if self.config.dataset == "refclef":
            return saiapr_image_path(self.config.image_root, image_id, file_name)
        return os.path.join(self.config.image_root, file_name)

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as uint8 RGB (H0, W0, 3), read by :func:`masksd.data.images.read_rgb` (which refuses images
        over ``MAX_IMAGE_PIXELS`` and says how other modes become RGB); errors name the file."""
        path = self.image_path(image_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image for image_id {image_id} not found: {path} (image_root={self.config.image_root})")
        image = read_rgb(path)
        info = self.images[image_id]
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"image {path} is {image.shape[0]}x{image.shape[1]} but {self.config.instances_path} says {info['height']}x{info['width']}")
        return image

    def load_target(self, ann_id: int) -> np.ndarray:
        """An annotation's mask as bool (H0, W0)."""
        ann = self.annotations[ann_id]
        info = self.images[ann["image_id"]]
        try:
            return decode_segmentation(ann["segmentation"], info["height"], info["width"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"bad segmentation of ann_id {ann_id} in {self.config.instances_path}: {e}") from e

    def ref_target(self, ref: dict) -> np.ndarray:
        """What a ref refers to, as bool (H0, W0): its annotation's mask; for gRefCOCO the union of its
        annotations' masks without the crowd ones (ReLA's merge), all False for a no-target ref."""
        info = self.images[ref["image_id"]]
        target = np.zeros((info["height"], info["width"]), dtype=bool)
        multi_target = self.config.dataset == "grefcoco"
        for ann_id in self.target_ids(ref):
            if multi_target and _crowd(self.annotations[ann_id], self.config.instances_path):
                continue
            target |= self.load_target(ann_id)
        return target

    def describe(self, index: int) -> dict:
        """Identifiers of an item: ``ref_id, ann_id`` (a list for gRefCOCO), ``image_id, sent_id`` (None in
        train mode), ``image_path`` and ``no_target`` (True for a gRefCOCO ref that refers to nothing)."""
        r, s = self.items[index]
        ref = self.refs[r]
        return {
            "ref_id": ref["ref_id"],
            "ann_id": ref["ann_id"],
            "image_id": ref["image_id"],
            "sent_id": ref["sentences"][s].get("sent_id") if s >= 0 else None,
            "image_path": self.image_path(ref["image_id"]),
            "no_target": not self.target_ids(ref),
        }

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index must be in [0, {len(self.items)}), got {index}")
        r, s = self.items[index]
        ref = self.refs[r]
        if s < 0:
            s = draw_sentence(self.config.seed, self.epoch, index, len(ref["sentences"]))
        text = ref["sentences"][s][self.config.text_key]
        image = self.load_image(ref["image_id"])  # (H0, W0, 3)
        target = self.ref_target(ref)  # (H0, W0)
        image_t, mask_t, frame = self.transform(image, target)  # (3, S, S), (1, S, S)
        return {"image": image_t, "mask": mask_t, "text": text, "target": target, "frame": frame, "index": index}
