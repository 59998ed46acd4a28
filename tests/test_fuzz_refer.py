"""Fuzzing the readers of files: every way a truncated download, a wrong partition or a hand-edited
file can corrupt ``refs(*).p``, ``instances.json`` or the images (RefCOCO, G-Ref), RefClef's RLE lists
and SAIAPR folders, gRefCOCO's ``grefs(unc).json`` target lists, or a manifest (its rows, masks and
images), drawn by hypothesis from the small valid datasets of ``tests/test_refer.py`` and
``tests/test_manifest.py``. Each case must either load correctly (the documented image conversions) or
raise a ValueError / FileNotFoundError whose message names the file and the field (for a manifest, the
line too): never a raw KeyError/IndexError/TypeError, a crash or a hang. The harness counts the
corruption kinds it exercised; docs/data.md states that number."""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from masksd.data import DEFAULT_SPLIT_BY, SPLITS, ManifestConfig, ManifestDataset, ReferConfig, ReferDataset
from tests.test_manifest import CAT, PARK, manifest_rows, write_manifest_folder
from tests.test_refer import IMAGES, clef_folder, clef_masks, compressed_rle, drawn_masks, file_name, png_claiming, write_refer_root

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

README = Path(__file__).resolve().parents[1] / "docs" / "data.md"  # the data section of the docs
EXAMPLES_PER_KIND = 10
PARTITIONS = {"refcoco": ("unc", ("train", "val", "testA", "testB")), "refcocog": ("umd", ("train", "val", "test"))}
COCO_REFER = tuple(PARTITIONS)  # the datasets the first kinds corrupt; RefClef, gRefCOCO and the manifest have their own
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


@dataclass
class Case:
    """What one corrupted dataset must do: load ``split`` correctly (``error_file`` None; ``check`` then tests
    the items), or raise a ValueError/FileNotFoundError naming ``error_file`` and ``field``."""

    dataset: str
    split: str
    error_file: Path | None = None
    field: str = ""
    check: Callable[[ReferDataset, list[dict]], None] | None = None
    error_type: type = ValueError


class Files:
    """A fresh copy of the valid datasets and the parts of one, read and written as the real formats: a refer
    dataset's refs (pickle, or gRefCOCO's JSON), instances and images, or the manifest's rows and files."""

    def __init__(self, root: Path, dataset: str, protocol: int):
        self.root, self.dataset, self.protocol = root, dataset, protocol
        self.names_a_global = False
        if dataset == "manifest":
            self.folder = root / "mine"
            self.manifest_path = self.folder / "manifest.jsonl"
            return
        self.split_by = DEFAULT_SPLIT_BY[dataset]
        config = ReferConfig(str(root), dataset, SPLITS[(dataset, self.split_by)][0])
        self.refs_path, self.image_root = Path(config.refs_path), Path(config.image_root)
        self.instances_path = root / dataset / "instances.json"

    def refs(self) -> list[dict]:
        if self.dataset == "grefcoco":
            return json.loads(self.refs_path.read_text())
        with open(self.refs_path, "rb") as f:
            return pickle.load(f)

    def write_refs(self, refs) -> None:
        if self.dataset == "grefcoco":
            self.refs_path.write_text(json.dumps(refs))
            return
        raw = pickle.dumps(refs, protocol=self.protocol)  # protocol 2: as Python 2 wrote the published files
        self.refs_path.write_bytes(raw)
        # Python 3 writes bytes at protocol 2 as a call of _codecs.encode: a global, refused before any field is read
        self.names_a_global = any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(raw))

    def rows(self) -> list[dict]:
        """The manifest's rows (its blank line dropped: line numbers below count rows from 1)."""
        return [json.loads(line) for line in self.manifest_path.read_text().splitlines() if line.strip()]

    def write_rows(self, rows: list) -> None:
        self.manifest_path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def instances(self) -> dict:
        return json.loads(self.instances_path.read_text())

    def write_instances(self, instances) -> None:
        self.instances_path.write_text(json.dumps(instances))

    def image_path(self, image_id: int) -> Path:
        return self.image_root / (clef_folder(image_id) if self.dataset == "refclef" else file_name(image_id))


KINDS: dict[str, tuple[Callable[[Files, st.DataObject], Case], tuple[str, ...]]] = {}


def kind(name: str, datasets: tuple[str, ...] = COCO_REFER):
    """Register a corruption kind, drawn on a copy of one of ``datasets`` (a refer dataset or ``manifest``)."""
    def register(corrupt):
        assert name not in KINDS
        KINDS[name] = (corrupt, datasets)
        return corrupt

    return register


def draw_ref(f: Files, data) -> tuple[list[dict], int]:
    refs = f.refs()
    return refs, data.draw(st.integers(0, len(refs) - 1), label="ref")


WRONG_TYPES = st.sampled_from([None, "7", 7.5, [7], {"id": 7}, True, b"7"])


# ---- refs(*).p --------------------------------------------------------------------------------

@kind("refs: truncated bytes")
def _(f, data):
    raw = f.refs_path.read_bytes()
    f.refs_path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")])
    return Case(f.dataset, "val", f.refs_path)


@kind("refs: not a list of refs")
def _(f, data):
    f.write_refs(data.draw(st.sampled_from([{"refs": f.refs()}, "refs", 3, None, tuple(f.refs())]), label="top"))
    return Case(f.dataset, "val", f.refs_path, "list")


@kind("refs: a ref that is not a dict")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i] = data.draw(st.sampled_from([None, "ref", [1, 2], 5]), label="value")
    f.write_refs(refs)
    return Case(f.dataset, "val", f.refs_path, f"ref #{i}")


@kind("refs: missing key")
def _(f, data):
    refs, i = draw_ref(f, data)
    key = data.draw(st.sampled_from(REF_KEYS), label="key")
    del refs[i][key]
    f.write_refs(refs)
    return Case(f.dataset, "val", f.refs_path, key)


@kind("refs: renamed key")
def _(f, data):
    refs, i = draw_ref(f, data)
    key = data.draw(st.sampled_from(REF_KEYS), label="key")
    renamed = {key.upper(), key.replace("_id", "Id"), key + "s", " " + key} - {key}
    refs[i][data.draw(st.sampled_from(sorted(renamed)), label="new")] = refs[i].pop(key)
    f.write_refs(refs)
    return Case(f.dataset, "val", f.refs_path, key)


@kind("refs: id of the wrong type")
def _(f, data):
    refs, i = draw_ref(f, data)
    key = data.draw(st.sampled_from(["ref_id", "ann_id", "image_id"]), label="key")
    refs[i][key] = data.draw(WRONG_TYPES, label="value")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, key)


@kind("refs: split of the wrong type")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["split"] = data.draw(st.sampled_from([None, 1, ["val"], b"val"]), label="value")
    f.write_refs(refs)
    return Case(f.dataset, "train", f.refs_path, "split")


@kind("refs: unknown split name")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["split"] = data.draw(st.sampled_from(["testC", "VAL", "", "validation", "test" if f.dataset == "refcoco" else "testA"]), label="split")
    f.write_refs(refs)
    return Case(f.dataset, "train", f.refs_path, "split")


@kind("refs: sentences of the wrong type")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["sentences"] = data.draw(st.sampled_from([None, "a dog", {"raw": "a dog"}, 3]), label="value")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "sentences")


@kind("refs: duplicate ref_id")
def _(f, data):
    refs, i = draw_ref(f, data)
    j = data.draw(st.integers(0, len(refs) - 1).filter(lambda j: j != i), label="other")
    refs[j]["ref_id"] = refs[i]["ref_id"]
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, f"ref_id {refs[i]['ref_id']}")


@kind("refs: dangling ann_id")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["ann_id"] = data.draw(st.sampled_from([0, 999, -1, 10**12]), label="ann_id")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.instances_path, f"ann_id {refs[i]['ann_id']}")


@kind("refs: dangling image_id")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["image_id"] = data.draw(st.sampled_from([0, 999, -1]), label="image_id")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.instances_path, f"image_id {refs[i]['image_id']}")


@kind("refs: image_id that is not its annotation's")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["image_id"] = data.draw(st.sampled_from([im for im in IMAGES if im != refs[i]["image_id"]]), label="image_id")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "image_id")


@kind("refs: empty sentence list")
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["sentences"] = []
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "sentences")


@kind("refs: empty or whitespace sentence")
def _(f, data):
    refs, i = draw_ref(f, data)
    s = data.draw(st.integers(0, len(refs[i]["sentences"]) - 1), label="sentence")
    refs[i]["sentences"][s]["raw"] = data.draw(st.sampled_from(["", " ", "\t\n", "\u3000"]), label="text")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "'raw'")


@kind("refs: sentence without its text or not a dict")
def _(f, data):
    refs, i = draw_ref(f, data)
    s = data.draw(st.integers(0, len(refs[i]["sentences"]) - 1), label="sentence")
    if data.draw(st.booleans(), label="drop"):
        del refs[i]["sentences"][s]["raw"]
    else:
        refs[i]["sentences"][s] = data.draw(st.sampled_from(["a dog", None, ["raw", "a dog"]]), label="value")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "'raw'")


@kind("refs: sentence text of the wrong type")
def _(f, data):
    refs, i = draw_ref(f, data)
    s = data.draw(st.integers(0, len(refs[i]["sentences"]) - 1), label="sentence")
    refs[i]["sentences"][s]["raw"] = data.draw(st.sampled_from([None, 3, ["a", "dog"], b"a dog"]), label="value")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "'raw'")


# ---- instances.json ---------------------------------------------------------------------------

@kind("instances: truncated bytes")
def _(f, data):
    raw = f.instances_path.read_bytes()
    f.instances_path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")])
    return Case(f.dataset, "val", f.instances_path)


@kind("instances: not a COCO dict")
def _(f, data):
    value, field = data.draw(st.sampled_from([([], "images"), ("instances", "images"), (None, "images"),
                                               ({"images": {}, "annotations": []}, "'images'"),
                                               ({"images": [], "annotations": "none"}, "'annotations'")]), label="top")
    f.write_instances(value)
    return Case(f.dataset, "val", f.instances_path, field)


@kind("instances: missing or renamed top-level key")
def _(f, data):
    instances = f.instances()
    key = data.draw(st.sampled_from(["images", "annotations"]), label="key")
    value = instances.pop(key)
    if data.draw(st.booleans(), label="rename"):
        instances[key[:-1]] = value
    f.write_instances(instances)
    return Case(f.dataset, "val", f.instances_path, key)


def draw_entry(f: Files, data, section: str) -> tuple[dict, dict]:
    instances = f.instances()
    return instances, data.draw(st.sampled_from(instances[section]), label=section)


def split_of(f: Files, *, ann_id: int | None = None, image_id: int | None = None) -> str:
    """A split of the (unmodified) refs that uses the annotation or image."""
    return next(r["split"] for r in f.refs() if r["ann_id"] == ann_id or r["image_id"] == image_id)


@kind("instances: image entry missing a key")
def _(f, data):
    instances, image = draw_entry(f, data, "images")
    key = data.draw(st.sampled_from(["id", "file_name", "height", "width"]), label="key")
    del image[key]
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, image_id=image.get("id", -1)) if key != "id" else "val", f.instances_path, key)


@kind("instances: image field of the wrong type or value")
def _(f, data):
    instances, image = draw_entry(f, data, "images")
    key = data.draw(st.sampled_from(["id", "file_name", "height", "width"]), label="key")
    bad = {"id": ["1", 1.5, None, [1]], "file_name": [None, 3, "", ["a.jpg"]], "height": ["40", 40.5, 0, -3, None, True],
           "width": ["60", 0, -1, None, 1e9]}[key]
    split = split_of(f, image_id=image["id"])
    image[key] = data.draw(st.sampled_from(bad), label="value")
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, key)


@kind("instances: file_name outside image_root")
def _(f, data):
    instances, image = draw_entry(f, data, "images")
    split = split_of(f, image_id=image["id"])
    image["file_name"] = data.draw(st.sampled_from(["../" + image["file_name"], "/etc/hostname", "a/../../b.jpg"]), label="file_name")
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, "file_name")


@kind("instances: annotation entry missing a key")
def _(f, data):
    instances, ann = draw_entry(f, data, "annotations")
    key = data.draw(st.sampled_from(["id", "image_id", "segmentation"]), label="key")
    split = split_of(f, ann_id=ann["id"])
    del ann[key]
    f.write_instances(instances)
    return Case(f.dataset, split if key != "id" else "val", f.instances_path, key)


@kind("instances: annotation field of the wrong type")
def _(f, data):
    instances, ann = draw_entry(f, data, "annotations")
    key = data.draw(st.sampled_from(["id", "image_id", "segmentation"]), label="key")
    bad = {"id": ["101", 101.5, None], "image_id": ["1", None, 1.0], "segmentation": [None, 3, "polygon", {"counts": [1]}, {"size": [1, 1]}]}[key]
    split = split_of(f, ann_id=ann["id"])
    ann[key] = data.draw(st.sampled_from(bad), label="value")
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, key)


@kind("instances: duplicate image id")
def _(f, data):
    instances, image = draw_entry(f, data, "images")
    instances["images"].append(dict(image, height=image["height"] + 1))
    f.write_instances(instances)
    return Case(f.dataset, "val", f.instances_path, f"image id {image['id']}")


@kind("instances: duplicate annotation id")
def _(f, data):
    instances, ann = draw_entry(f, data, "annotations")
    instances["annotations"].insert(0, dict(ann))
    f.write_instances(instances)
    return Case(f.dataset, "val", f.instances_path, f"annotation id {ann['id']}")


@kind("instances: annotation on a dangling image_id")
def _(f, data):
    instances, ann = draw_entry(f, data, "annotations")
    split = split_of(f, ann_id=ann["id"])
    ann["image_id"] = data.draw(st.sampled_from([0, 999]), label="image_id")
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, "image_id")


def draw_polygon_ann(f: Files, data) -> tuple[dict, dict, list]:
    instances = f.instances()
    polygons = [a for a in instances["annotations"] if isinstance(a["segmentation"], list)]
    ann = data.draw(st.sampled_from(polygons), label="annotation")
    return instances, ann, ann["segmentation"][data.draw(st.integers(0, len(ann["segmentation"]) - 1), label="part")]


@kind("segmentation: polygon with an odd coordinate count")
def _(f, data):
    instances, ann, polygon = draw_polygon_ann(f, data)
    polygon.pop(data.draw(st.integers(0, len(polygon) - 1), label="dropped"))
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, f"ann_id {ann['id']}")


@kind("segmentation: polygon with fewer than 3 points")
def _(f, data):
    instances, ann, polygon = draw_polygon_ann(f, data)
    del polygon[data.draw(st.sampled_from([0, 2, 4]), label="kept"):]
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, f"ann_id {ann['id']}")


@kind("segmentation: polygon coordinates that are no numbers or far outside the image")
def _(f, data):
    instances, ann, polygon = draw_polygon_ann(f, data)
    polygon[data.draw(st.integers(0, len(polygon) - 1), label="at")] = data.draw(
        st.sampled_from(["10", None, [3], float("nan"), float("inf"), 1e12, -5e3, True]), label="value")
    f.instances_path.write_text(json.dumps(instances))  # NaN and Infinity as Python's json writes them
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, f"ann_id {ann['id']}")


@kind("segmentation: polygon list that is empty or flat")
def _(f, data):
    instances, ann, polygon = draw_polygon_ann(f, data)
    ann["segmentation"] = data.draw(st.sampled_from([[], polygon, [[]]]), label="value")
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, f"ann_id {ann['id']}")


def draw_rle_ann(f: Files, data, compressed: bool | None = None) -> tuple[dict, dict]:
    instances = f.instances()
    rles = [a for a in instances["annotations"] if isinstance(a["segmentation"], dict)
            and (compressed is None or isinstance(a["segmentation"]["counts"], str) == compressed)]
    return instances, data.draw(st.sampled_from(rles), label="annotation")


@kind("segmentation: RLE size that disagrees with the image")
def _(f, data):
    instances, ann = draw_rle_ann(f, data)
    h, w = ann["segmentation"]["size"]
    ann["segmentation"]["size"] = data.draw(st.sampled_from([[w, h], [h + 1, w], [h, w - 1], [h], [h, w, 3], "40x36", None]), label="size")
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, "size")


@kind("segmentation: uncompressed RLE counts that do not cover the image")
def _(f, data):
    instances, ann = draw_rle_ann(f, data, compressed=False)
    counts = ann["segmentation"]["counts"]
    change = data.draw(st.sampled_from(["drop", "extend", "negative", "float", "str"]), label="change")
    if change == "drop":
        counts.pop()
    elif change == "extend":
        counts.append(10**6)
    elif change == "negative":
        counts[1] = -counts[1]
    else:
        counts[1] = float(counts[1]) + 0.5 if change == "float" else str(counts[1])
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, "counts")


@kind("segmentation: compressed RLE string that is corrupt")
def _(f, data):
    instances, ann = draw_rle_ann(f, data, compressed=True)
    counts = ann["segmentation"]["counts"]
    change = data.draw(st.sampled_from(["cut", "append", "char", "empty", "type"]), label="change")
    if change == "cut":
        counts = counts[: data.draw(st.integers(0, len(counts) - 2), label="cut")]
    elif change == "append":
        counts += data.draw(st.sampled_from(["0", "o", "Zo1"]), label="tail")
    elif change == "char":
        at = data.draw(st.integers(0, len(counts) - 1), label="at")
        counts = counts[:at] + data.draw(st.sampled_from(["~", " ", "\u00e9", "\x00"]), label="char") + counts[at + 1:]
    elif change == "empty":
        counts = ""
    else:
        counts = data.draw(st.sampled_from([None, 3, {"c": 1}]), label="value")
    ann["segmentation"]["counts"] = counts
    f.write_instances(instances)
    return Case(f.dataset, split_of(f, ann_id=ann["id"]), f.instances_path, "counts")


# ---- the image files ---------------------------------------------------------------------------

def draw_image(f: Files, data) -> tuple[int, Path, str]:
    image_id = data.draw(st.sampled_from(sorted(IMAGES)), label="image_id")
    return image_id, f.image_path(image_id), split_of(f, image_id=image_id)


@kind("image: missing")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    path.unlink()
    return Case(f.dataset, split, path, f"image_id {image_id}", error_type=FileNotFoundError)


@kind("image: truncated")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    raw = path.read_bytes()
    path.write_bytes(raw[: data.draw(st.integers(1, len(raw) - 3), label="cut")])  # JPEG's end marker is 2 bytes
    return Case(f.dataset, split, path, "decode")


@kind("image: zero bytes")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    path.write_bytes(b"")
    return Case(f.dataset, split, path, "decode")


@kind("image: not an image")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    path.write_bytes(data.draw(st.sampled_from([b"<html>404</html>", b"\xff\xd8\xff\xe0 junk", b"\x89PNG\r\n\x1a\n", bytes(100)]), label="bytes"))
    return Case(f.dataset, split, path, "decode")


@kind("image: size that disagrees with instances.json")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    h, w = IMAGES[image_id]
    Image.new("RGB", data.draw(st.sampled_from([(h, w), (w + 1, h), (w, h - 1)]).filter(lambda s: s != (w, h)), label="size")).save(path, format="JPEG")
    return Case(f.dataset, split, path, f"says {h}x{w}")


@kind("image: over the pixel limit (decompression bomb)")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    png_claiming(path, *data.draw(st.sampled_from([(10_000, 9_000), (100_000, 100_000), (2**31 - 1, 1)]), label="size"))
    return Case(f.dataset, split, path, "MAX_IMAGE_PIXELS")


def converted(expected_of: Callable[[np.ndarray], np.ndarray], image_id: int, source: np.ndarray):
    """A check that the items of ``image_id`` carry ``expected_of(source)`` as their pixels and the drawn masks."""
    def check(ds: ReferDataset, samples: list[dict]) -> None:
        masks = drawn_masks()
        seen = 0
        for i, sample in enumerate(samples):
            info = ds.describe(i)
            assert np.array_equal(sample["target"], masks[info["ann_id"]][1])
            if info["image_id"] == image_id:
                image = ds.load_image(image_id)
                assert image.dtype == np.uint8 and image.shape == (*IMAGES[image_id], 3)
                assert np.array_equal(image, expected_of(source))
                seen += 1
        assert seen > 0
    return check


@kind("image: grayscale")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    grey = np.random.default_rng(image_id).integers(0, 256, IMAGES[image_id], dtype=np.uint8)
    Image.fromarray(grey, "L").save(path, format=data.draw(st.sampled_from(["PNG", "JPEG"]), label="format"))
    with Image.open(path) as im:
        stored = np.asarray(im)  # what the file holds (JPEG is lossy)
    return Case(f.dataset, split, check=converted(lambda g: np.repeat(g[..., None], 3, axis=2), image_id, stored))


@kind("image: 16-bit grayscale")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    grey = np.random.default_rng(image_id).integers(0, 65536, IMAGES[image_id], dtype=np.uint16)
    grey[0, 0], grey[0, 1] = 65535, 256  # the top of the range and a value PIL's own convert would clip
    Image.fromarray(grey).save(path, format="PNG")
    return Case(f.dataset, split, check=converted(lambda g: np.repeat((g >> 8).astype(np.uint8)[..., None], 3, axis=2), image_id, grey))


@kind("image: RGBA")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    rgba = np.random.default_rng(image_id).integers(0, 256, (*IMAGES[image_id], 4), dtype=np.uint8)
    rgba[..., 3] = data.draw(st.sampled_from([0, 128, 255]), label="alpha")
    Image.fromarray(rgba, "RGBA").save(path, format="PNG")
    return Case(f.dataset, split, check=converted(lambda a: a[..., :3], image_id, rgba))


@kind("image: CMYK")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    cmyk = np.random.default_rng(image_id).integers(0, 256, (*IMAGES[image_id], 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(path, format=data.draw(st.sampled_from(["JPEG", "TIFF"]), label="format"))
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        expected = np.asarray(im.convert("RGB"))  # PIL's conversion of what the file holds
    return Case(f.dataset, split, check=converted(lambda e: e, image_id, expected))


@kind("image: 32-bit or float pixels")
def _(f, data):
    image_id, path, split = draw_image(f, data)
    h, w = IMAGES[image_id]
    mode = data.draw(st.sampled_from(["I", "F"]), label="mode")
    Image.fromarray(np.zeros((h, w), np.int32 if mode == "I" else np.float32), mode).save(path, format="TIFF")
    return Case(f.dataset, split, path, "mode")


# ---- RefClef: refs(berkeley).p over SAIAPR TC-12 folders, segmentations as lists of RLEs ----------

def draw_clef_ann(f: Files, data) -> tuple[dict, dict, str]:
    instances = f.instances()
    ann = data.draw(st.sampled_from(instances["annotations"]), label="annotation")
    return instances, ann, split_of(f, ann_id=ann["id"])


@kind("refclef: image outside its SAIAPR folder", ("refclef",))
def _(f, data):
    image_id = data.draw(st.sampled_from(sorted({r["image_id"] for r in f.refs()})), label="image_id")
    path, split = f.image_path(image_id), split_of(f, image_id=image_id)
    place = data.draw(st.sampled_from(["flat", "other folder"]), label="place")
    target = f.image_root / (f"{image_id}.jpg" if place == "flat" else f"{(image_id // 1000 + 1) % 100:02d}/images/{image_id}.jpg")
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    return Case(f.dataset, split, path, f"image_id {image_id}", error_type=FileNotFoundError)


@kind("refclef: an RLE part that is corrupt", ("refclef",))
def _(f, data):
    instances, ann, split = draw_clef_ann(f, data)
    part = ann["segmentation"][data.draw(st.integers(0, len(ann["segmentation"]) - 1), label="part")]
    change = data.draw(st.sampled_from(["size", "cut", "char", "type", "missing"]), label="change")
    if change == "size":
        part["size"] = [part["size"][0] + 1, part["size"][1]]
    elif change == "cut":
        part["counts"] = part["counts"][: data.draw(st.integers(0, len(part["counts"]) - 2), label="cut")]
    elif change == "char":
        part["counts"] = "~" + part["counts"][1:]
    elif change == "type":
        part["counts"] = data.draw(st.sampled_from([None, 3.5, {"c": 1}]), label="value")
    else:
        del part["counts"]
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, f"ann_id {ann['id']}")


@kind("refclef: a segmentation list mixing RLEs and polygons", ("refclef",))
def _(f, data):
    instances, ann, split = draw_clef_ann(f, data)
    ann["segmentation"].insert(data.draw(st.integers(0, len(ann["segmentation"])), label="at"), [0, 0, 5, 0, 5, 5])
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, "mixes polygons and RLE")


@kind("refclef: an RLE list of another image's size", ("refclef",))
def _(f, data):
    instances, ann, split = draw_clef_ann(f, data)
    other = next(m for a, (i, m, _) in clef_masks().items() if i != ann["image_id"])
    ann["segmentation"] = [compressed_rle(other)]
    f.write_instances(instances)
    return Case(f.dataset, split, f.instances_path, "size")


@kind("refclef: a split of the other partition", ("refclef",))
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["split"] = data.draw(st.sampled_from(["testA", "testB", "testC", "Test"]), label="split")
    f.write_refs(refs)
    return Case(f.dataset, "train", f.refs_path, "split")


# ---- gRefCOCO: grefs(unc).json, ann_id lists, [-1] for no target ---------------------------------------

@kind("grefcoco: refs that are not JSON or not a list", ("grefcoco",))
def _(f, data):
    raw = f.refs_path.read_text()
    if data.draw(st.booleans(), label="truncate"):
        f.refs_path.write_text(raw[: data.draw(st.integers(0, len(raw) - 2), label="cut")])
        return Case(f.dataset, "val", f.refs_path, "JSON")
    f.refs_path.write_text(json.dumps(data.draw(st.sampled_from([{"refs": []}, "refs", 3, None]), label="top")))
    return Case(f.dataset, "val", f.refs_path, "list")


@kind("grefcoco: ann_id list of the wrong shape", ("grefcoco",))
def _(f, data):
    refs, i = draw_ref(f, data)
    refs[i]["ann_id"] = data.draw(st.sampled_from([[], ["101"], [101, -1], [-1, -1], [101, 101], [1.5], None, "101", {"id": 101}, [True]]),
                                  label="ann_id")
    refs[i].pop("no_target", None)
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "ann_id")


@kind("grefcoco: no_target flag that disagrees with ann_id", ("grefcoco",))
def _(f, data):
    refs, i = draw_ref(f, data)
    empty = refs[i]["ann_id"] == [-1]
    refs[i]["no_target"] = data.draw(st.sampled_from([not empty, "true", 1, None]), label="no_target")
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "no_target")


@kind("grefcoco: a target list with a dangling or foreign annotation", ("grefcoco",))
def _(f, data):
    refs = f.refs()
    i = data.draw(st.sampled_from([j for j, r in enumerate(refs) if r["ann_id"] != [-1]]), label="ref")
    ids = refs[i]["ann_id"] if isinstance(refs[i]["ann_id"], list) else [refs[i]["ann_id"]]
    foreign = [a for a, (image, _, _) in drawn_masks().items() if image != refs[i]["image_id"]]
    added = data.draw(st.sampled_from([999, 0, *foreign]), label="added")
    refs[i]["ann_id"] = [*ids, added]
    f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path if added in foreign else f.instances_path, f"ann_id {added}")


@kind("grefcoco: a target of crowd annotations only", ("grefcoco",))
def _(f, data):
    refs, i = draw_ref(f, data)
    instances = f.instances()
    if refs[i]["ann_id"] != [-1]:  # make the ref's own annotations crowds
        ids = refs[i]["ann_id"] if isinstance(refs[i]["ann_id"], list) else [refs[i]["ann_id"]]
        for ann in instances["annotations"]:
            if ann["id"] in ids:
                ann["iscrowd"] = 1
        f.write_instances(instances)
    else:  # point a no-target ref at its image's crowd annotation
        crowd = next(a for a in instances["annotations"] if a["iscrowd"])
        refs[i].update(ann_id=[crowd["id"]], image_id=crowd["image_id"], no_target=False)
        f.write_refs(refs)
    return Case(f.dataset, refs[i]["split"], f.refs_path, "crowd annotations only")


@kind("grefcoco: iscrowd of the wrong type", ("grefcoco",))
def _(f, data):
    refs = f.refs()
    ref = data.draw(st.sampled_from([r for r in refs if r["ann_id"] != [-1]]), label="ref")
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    instances = f.instances()
    chosen = data.draw(st.sampled_from(ids), label="ann_id")
    ann = next(a for a in instances["annotations"] if a["id"] == chosen)
    ann["iscrowd"] = data.draw(st.sampled_from(["yes", 2, None, 0.5, [1]]), label="iscrowd")
    f.write_instances(instances)
    return Case(f.dataset, ref["split"], f.instances_path, "iscrowd")


# ---- the manifest: your own rows, masks and images ---------------------------------------------------

def draw_row(f: Files, data, where=lambda row: True) -> tuple[list[dict], int]:
    rows = f.rows()
    return rows, data.draw(st.sampled_from([i for i, r in enumerate(rows) if where(r)]), label="row")


def row_case(f: Files, rows: list, i: int, field: str, error_type: type = ValueError) -> Case:
    """The case of a bad row ``i`` (line i + 1 of the rewritten manifest) in the split it belongs to."""
    split = rows[i]["split"] if isinstance(rows[i], dict) and isinstance(rows[i].get("split"), str) and rows[i]["split"].strip() else "train"
    return Case("manifest", split, f.manifest_path, f":{i + 1}: {field}", error_type=error_type)


@kind("manifest: truncated bytes", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    text = json.dumps(rows[i])
    rows[i] = text[: data.draw(st.integers(1, len(text) - 1), label="cut")]  # inside the object: never valid JSON
    f.write_rows(rows[: i + 1])
    return Case("manifest", "train", f.manifest_path, f":{i + 1}: not a JSON object")


@kind("manifest: a line that is not a JSON object", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    rows[i] = data.draw(st.sampled_from(['["image", "text"]', '"a row"', "3", "null", "image,text,split", "{'image': 'a'}"]), label="line")
    f.write_rows(rows)
    return Case("manifest", "train", f.manifest_path, f":{i + 1}:")


@kind("manifest: missing, unknown or misspelt field", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    field = data.draw(st.sampled_from(["image", "text", "split", "target"]), label="field")
    if field == "target":
        given = next(k for k in ("mask", "polygons", "rle", "no_target") if k in rows[i])
        wrong = {"mask": "maks", "polygons": "polygon", "rle": "RLE", "no_target": "empty"}[given]
        rows[i][wrong] = rows[i].pop(given)
        f.write_rows(rows)
        return row_case(f, rows, i, f"field {wrong!r}")
    if data.draw(st.booleans(), label="rename"):
        rows[i][field.capitalize()] = rows[i].pop(field)
        f.write_rows(rows)
        return row_case(f, rows, i, f"field {field.capitalize()!r}")
    del rows[i][field]
    f.write_rows(rows)
    return row_case(f, rows, i, f"field {field!r}")


@kind("manifest: field of the wrong type or blank", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    field = data.draw(st.sampled_from(["image", "text", "split", "ref", "id", "no_target"]), label="field")
    bad = {"image": [None, 3, "", ["a.png"]], "text": [None, 3, "", " \t"], "split": [None, 1, "", ["train"]],
           "ref": [True, 1.5, None, "", ["a"]], "id": [False, 2.5, None, " ", {"a": 1}], "no_target": ["yes", 1, None]}[field]
    rows[i][field] = data.draw(st.sampled_from(bad), label="value")
    f.write_rows(rows)
    return row_case(f, rows, i, f"field {field!r}")


@kind("manifest: no target or two targets", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    given = next(k for k in ("mask", "polygons", "rle", "no_target") if k in rows[i])
    if data.draw(st.booleans(), label="none"):
        del rows[i][given]
        f.write_rows(rows)
        return row_case(f, rows, i, "field 'mask': the row has no target")
    other = data.draw(st.sampled_from([k for k in ("mask", "polygons", "rle", "no_target") if k != given]), label="second")
    rows[i][other] = {"mask": "masks/dog.png", "polygons": [[0, 0, 5, 0, 5, 5]], "rle": {"size": [1, 1], "counts": [1]}, "no_target": True}[other]
    f.write_rows(rows)
    second = [k for k in ("mask", "polygons", "rle", "no_target") if k in (given, other)][1]  # the field named: the later one
    return row_case(f, rows, i, f"field {second!r}: a row has one target")


@kind("manifest: missing image or mask file", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    f.write_rows(rows)  # without the blank line: line i + 1 is row i
    field = "mask" if "mask" in rows[i] and data.draw(st.booleans(), label="mask") else "image"
    (f.folder / rows[i][field]).unlink()
    first = next(j for j, r in enumerate(rows) if r.get(field) == rows[i][field] and r["split"] == rows[i]["split"])
    return row_case(f, rows, first, f"field {field!r}: file not found", FileNotFoundError)


@kind("manifest: mask file that is no binary mask of its image", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data, lambda r: "mask" in r)
    f.write_rows(rows)  # without the blank line: line i + 1 is row i
    path = f.folder / rows[i]["mask"]
    height, width = PARK
    change = data.draw(st.sampled_from(["size", "grey levels", "colour", "jpeg", "not an image", "bomb"]), label="change")
    values = np.zeros((height, width), np.uint8)
    values[5:20, 5:20] = 255
    if change == "size":
        Image.fromarray(values[:-1]).save(path, format="PNG")
        field = f"is {height - 1}x{width}"
    elif change == "grey levels":
        values[0, :3] = (1, 2, 3)
        Image.fromarray(values).save(path, format="PNG")
        field = "not binary"
    elif change == "colour":
        colour = np.zeros((height, width, 3), np.uint8)
        colour[5:20, 5:20] = (255, 0, 0)
        Image.fromarray(colour).save(path, format="PNG")
        field = "colour image"
    elif change == "jpeg":
        Image.fromarray(values).save(path, format="JPEG", quality=10)
        field = "not binary"
    elif change == "not an image":
        path.write_bytes(b"<html>404</html>")
        field = "could not decode mask"
    else:
        png_claiming(path, 10_000, 9_000)
        field = "MAX_IMAGE_PIXELS"
    first = next(j for j, r in enumerate(rows) if r.get("mask") == rows[i]["mask"])
    return row_case(f, rows, first, f"field 'mask': ") if change != "size" else Case("manifest", rows[first]["split"], f.manifest_path, field)


@kind("manifest: image file that does not decode", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data)
    f.write_rows(rows)  # without the blank line: line i + 1 is row i
    path = f.folder / rows[i]["image"]
    change = data.draw(st.sampled_from(["truncated", "zero bytes", "html", "bomb", "float pixels"]), label="change")
    if change == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(1, len(raw) // 2), label="cut")])
    elif change == "zero bytes":
        path.write_bytes(b"")
    elif change == "html":
        path.write_bytes(b"<html>404</html>")
    elif change == "bomb":
        png_claiming(path, 10_000, 9_000)
    else:
        Image.fromarray(np.zeros(PARK if "park" in rows[i]["image"] else CAT, np.float32), "F").save(path, format="TIFF")
    first = next(j for j, r in enumerate(rows) if r["image"] == rows[i]["image"] and r["split"] == rows[i]["split"])
    return row_case(f, rows, first, "field 'image': ")


@kind("manifest: polygons that are corrupt", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data, lambda r: "polygons" in r)
    polygon = rows[i]["polygons"][data.draw(st.integers(0, len(rows[i]["polygons"]) - 1), label="part")]
    change = data.draw(st.sampled_from(["odd", "short", "value", "empty", "flat"]), label="change")
    if change == "odd":
        polygon.pop()
    elif change == "short":
        del polygon[4:]
    elif change == "value":
        polygon[data.draw(st.integers(0, len(polygon) - 1), label="at")] = data.draw(st.sampled_from(["1", None, 1e9, -1e6, True]), label="value")
    elif change == "empty":
        rows[i]["polygons"] = []
    else:
        rows[i]["polygons"] = polygon
    f.write_rows(rows)
    return row_case(f, rows, i, "field 'polygons'")


@kind("manifest: RLE that is corrupt or of another size", ("manifest",))
def _(f, data):
    rows, i = draw_row(f, data, lambda r: "rle" in r)
    rle = rows[i]["rle"]
    change = data.draw(st.sampled_from(["size", "counts short", "counts type", "no size", "not a dict"]), label="change")
    if change == "size":
        rle["size"] = data.draw(st.sampled_from([[CAT[0] + 1, CAT[1]], [CAT[0]], "30x30"]), label="size")
    elif change == "counts short":
        rle["counts"] = rle["counts"][:-1] if isinstance(rle["counts"], list) else rle["counts"][:-2]
    elif change == "counts type":
        rle["counts"] = data.draw(st.sampled_from([None, 3, {"a": 1}, [1.5, 2]]), label="counts")
    elif change == "no size":
        del rle["size"]
    else:
        rows[i]["rle"] = data.draw(st.sampled_from([[1, 2], "abc", 3]), label="value")
    f.write_rows(rows)
    return row_case(f, rows, i, "field 'rle'")


@kind("manifest: duplicate id, or one ref over two images or splits", ("manifest",))
def _(f, data):
    rows = f.rows()
    change = data.draw(st.sampled_from(["id", "image", "split"]), label="change")
    if change == "id":
        i = data.draw(st.integers(1, len(rows) - 1), label="row")
        j = data.draw(st.integers(0, i - 1), label="first")
        rows[j]["id"] = rows[i]["id"] = data.draw(st.sampled_from(["same", 3]), label="id")
        f.write_rows(rows)
        return Case("manifest", "train", f.manifest_path, f":{i + 1}: field 'id'")
    i = max(k for k, r in enumerate(rows) if r.get("ref") == "dog")
    rows[i][change] = "images/cat.jpg" if change == "image" else "val"
    f.write_rows(rows)
    return Case("manifest", "train", f.manifest_path, f":{i + 1}: field {change!r}: ref 'dog'")


@kind("manifest: CSV with a bad header, cell count or cell", ("manifest",))
def _(f, data):
    path = f.folder / "manifest.csv"
    lines = path.read_text().splitlines()
    change = data.draw(st.sampled_from(["header", "duplicate column", "cells", "json cell", "flag"]), label="change")
    if change == "header":
        lines[0] = lines[0].replace("image", "img")
        line = 1
    elif change == "duplicate column":
        lines[0] = lines[0].replace("text", "image")
        line = 1
    elif change == "cells":
        line = data.draw(st.integers(2, len(lines)), label="line")
        lines[line - 1] += ",extra"
    elif change == "json cell":
        line = 1 + next(k for k, r in enumerate(manifest_rows(), 1) if "polygons" in r)
        lines[line - 1] = lines[line - 1].replace("]]", "]")
    else:
        line = 1 + next(k for k, r in enumerate(manifest_rows(), 1) if "no_target" in r)
        lines[line - 1] = lines[line - 1].replace(",true,", ",maybe,")
    path.write_text("\n".join(lines) + "\n")
    f.manifest_path = path
    return Case("manifest", "train", path, f":{line}:")


# ---- the harness -------------------------------------------------------------------------------

def run_case(f: Files, case: Case) -> str:
    """Build the dataset, load every item, and check the outcome against ``case``; returns the outcome."""
    try:
        if case.dataset == "manifest":
            ds = ManifestDataset(ManifestConfig(str(f.manifest_path), case.split, image_size=16, mode="eval"))
        else:
            ds = ReferDataset(ReferConfig(str(f.root), case.dataset, case.split, image_size=16, mode="eval", check_counts=False))
        samples = [ds[i] for i in range(len(ds))]
    except Exception as error:  # noqa: BLE001 — the type is what is checked
        assert type(error) is case.error_type, f"raised {type(error).__name__}, not {case.error_type.__name__}: {error}"
        assert case.error_file is not None, f"should have loaded, raised {error!r}"
        message = str(error)
        assert str(case.error_file) in message, f"message does not name {case.error_file}: {message}"
        field = "names the Python global" if f.names_a_global else case.field
        assert field in message, f"message does not name the field {field!r}: {message}"
        return "error"
    assert case.error_file is None, f"loaded {len(samples)} items without an error naming {case.error_file} and {case.field!r}"
    case.check(ds, samples)
    return "load"


def test_every_corruption_kind_loads_correctly_or_raises_a_named_error(tmp_path_factory):
    pristine = write_refer_root(tmp_path_factory.mktemp("pristine"))
    write_manifest_folder(pristine / "mine")
    scratch = tmp_path_factory.mktemp("fuzz")
    exercised: Counter[str] = Counter()
    outcomes: dict[str, set[str]] = {}
    failures: dict[str, str] = {}

    for name, (corrupt, datasets) in KINDS.items():
        @settings(max_examples=EXAMPLES_PER_KIND, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one(data):
            dataset = data.draw(st.sampled_from(datasets), label="dataset")
            root = Path(tempfile.mkdtemp(dir=scratch))
            shutil.copytree(pristine, root, dirs_exist_ok=True)
            try:
                f = Files(root, dataset, data.draw(st.sampled_from([2, pickle.HIGHEST_PROTOCOL]), label="protocol"))
                before = snapshot(root)
                case = corrupt(f, data)
                assert snapshot(root) != before, f"{name}: the corruption changed nothing"
                outcomes.setdefault(name, set()).add(run_case(f, case))
                exercised[name] += 1
            finally:
                shutil.rmtree(root)

        try:
            one()
        except Exception as error:  # noqa: BLE001 — collected, so one run reports every kind that fails
            failures[name] = (str(error).strip().splitlines() or [repr(error)])[0]

    assert not failures, "corruption kinds that slip through:\n" + "\n".join(f"- {k}: {v}" for k, v in failures.items())
    assert set(exercised) == set(KINDS) and min(exercised.values()) >= 1
    stated = re.search(r"fuzzing\s+harness\s+\(`tests/test_fuzz_refer\.py`\)\s+exercises\s+(\d+)\s+kinds\s+of\s+corruption", README.read_text())
    assert stated and int(stated.group(1)) == len(exercised), "docs/data.md states another number of corruption kinds"
    per_reader = Counter("manifest" if ds == ("manifest",) else "refclef" if ds == ("refclef",) else "grefcoco" if ds == ("grefcoco",)
                         else "refcoco" for _, ds in KINDS.values())
    assert all(per_reader[r] >= 5 for r in ("refcoco", "refclef", "grefcoco", "manifest")), per_reader
    loads = {name for name, seen in outcomes.items() if "load" in seen}
    assert loads == {"image: grayscale", "image: 16-bit grayscale", "image: RGBA", "image: CMYK"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
