"""ReferDataset against a tiny dataset written in the exact refer format."""

import collections
import functools
import json
import os
import pickle
import shlex
import struct
import shutil
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from masksd.data import SPLITS, Frame, ReferConfig, ReferDataset, collate
from masksd.data.refer import SPLIT_COUNTS, SplitCounts, SplitCountWarning, _load_refs, decode_segmentation

# pycocotools' decode trips numpy 2's copy-keyword deprecation inside the library; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# the fixture's splits are deliberately tiny: their counts are not the published ones
SubsetConfig = functools.partial(ReferConfig, check_counts=False)

IMAGES = {1: (40, 60), 2: (64, 36), 3: (30, 30)}  # image_id: (height, width): landscape, portrait, square


def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def drawn_masks() -> dict[int, tuple[int, np.ndarray, object]]:
    """ann_id: (image_id, the mask we drew, its COCO segmentation)."""
    out = {}
    # a polygon: pycocotools fills [x0, y0, x1, y0, x1, y1, x0, y1] as rows y0..y1-1, columns x0..x1-1
    m = np.zeros(IMAGES[1], bool)
    m[5:20, 10:30] = True
    out[101] = (1, m, [[10, 5, 30, 5, 30, 20, 10, 20]])
    # a two-part polygon
    m = np.zeros(IMAGES[1], bool)
    m[25:35, 5:15] = True
    m[2:8, 40:55] = True
    out[102] = (1, m, [[5, 25, 15, 25, 15, 35, 5, 35], [40.0, 2.0, 55.0, 2.0, 55.0, 8.0, 40.0, 8.0]])
    # a compressed RLE (counts as the str that JSON holds)
    y, x = np.mgrid[: IMAGES[2][0], : IMAGES[2][1]]
    m = ((y - 30) / 20) ** 2 + ((x - 18) / 12) ** 2 <= 1
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    out[103] = (2, m, {"size": rle["size"], "counts": rle["counts"].decode("ascii")})
    # an uncompressed RLE (a crowd annotation) of an irregular blob
    m = np.random.default_rng(0).random(IMAGES[2]) < 0.3
    m[:10] = False
    out[104] = (2, m, uncompressed_rle(m))
    # a polygon touching the image border
    m = np.zeros(IMAGES[3], bool)
    m[:, :10] = True
    out[105] = (3, m, [[0, 0, 10, 0, 10, 30, 0, 30]])
    return out


def make_ref(ref_id, ann_id, split, sentences):
    image_id = drawn_masks()[ann_id][0]
    sents = [
        {"sent_id": ref_id * 10 + i, "sent": s.lower().strip(" ."), "raw": s, "tokens": s.lower().strip(" .").split()}
        for i, s in enumerate(sentences)
    ]
    return {
        "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "sentences": sents,
        "sent_ids": [s["sent_id"] for s in sents], "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",  # the refer repo's ref file_name names no file
    }


UNC_REFS = [
    make_ref(1, 101, "train", ["Man on the LEFT.", "left guy", "person in red"]),
    make_ref(2, 102, "train", ["two boxes", "the split thing"]),
    make_ref(3, 103, "val", ["Oval thing", "the ellipse"]),
    make_ref(4, 104, "testA", ["crowd"]),
    make_ref(5, 105, "testB", ["left strip", "the bar on the left"]),
    make_ref(6, 105, "train", ["a", "b", "c", "d"]),
]
UMD_REFS = [
    make_ref(11, 101, "train", ["the box at the top left of the picture", "a wide rectangle"]),
    make_ref(12, 103, "train", ["an oval shape in the middle"]),
    make_ref(13, 102, "val", ["two separate pieces", "the pair"]),
    make_ref(14, 104, "test", ["a noisy crowd", "many dots", "speckles"]),
    make_ref(15, 105, "test", ["the bar"]),
]


# ---- RefClef: SAIAPR TC-12 images (1,000 per two-digit folder), segmentations as lists of compressed RLEs

CLEF_IMAGES = {25008: (36, 48), 3001: (50, 40), 7: (30, 44)}  # image_id: (height, width); folders 25, 03, 00


def clef_folder(image_id: int) -> str:
    return f"{image_id // 1000:02d}/images/{image_id}.jpg"


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def clef_masks() -> dict[int, tuple[int, np.ndarray, list]]:
    """ann_id: (image_id, the mask we drew, its RefClef segmentation: a list of compressed RLEs)."""
    out = {}
    m = np.zeros(CLEF_IMAGES[25008], bool)
    m[4:20, 6:30] = True
    out[201] = (25008, m, [compressed_rle(m)])
    a, b = np.zeros(CLEF_IMAGES[25008], bool), np.zeros(CLEF_IMAGES[25008], bool)
    a[22:34, 2:12], b[25:30, 30:47] = True, True
    out[202] = (25008, a | b, [compressed_rle(a), compressed_rle(b)])  # two parts, merged
    y, x = np.mgrid[: CLEF_IMAGES[3001][0], : CLEF_IMAGES[3001][1]]
    m = ((y - 25) / 15) ** 2 + ((x - 20) / 10) ** 2 <= 1
    out[203] = (3001, m, [compressed_rle(m)])
    m = np.zeros(CLEF_IMAGES[7], bool)
    m[10:, :] = True
    out[204] = (7, m, [compressed_rle(m)])
    return out


def clef_ref(ref_id, ann_id, split, sentences):
    ref = make_ref(ref_id, 101, split, sentences)  # the sentence layout; ids and file name below are RefClef's
    image_id = clef_masks()[ann_id][0]
    return ref | {"ann_id": ann_id, "image_id": image_id, "file_name": f"{image_id}_{ann_id}.jpg"}


BERKELEY_REFS = [
    clef_ref(21, 201, "train", ["sky on top", "the upper box"]),
    clef_ref(22, 203, "train", ["oval"]),
    clef_ref(23, 202, "val", ["two patches", "bottom bits", "the pair"]),
    clef_ref(24, 204, "test", ["ground"]),
]
CLEF_UNC_REFS = [
    clef_ref(25, 201, "train", ["box"]), clef_ref(26, 202, "val", ["two"]), clef_ref(27, 203, "testA", ["oval"]),
    clef_ref(28, 204, "testB", ["floor"]), clef_ref(29, 201, "testC", ["top"]),
]


# ---- gRefCOCO: JSON refs over COCO's images; ann_id lists, [-1] for no target

def gref(ref_id, ann_id, split, sentences, image_id=None, **extra):
    ids = ann_id if isinstance(ann_id, list) else [ann_id]
    image_id = image_id if image_id is not None else drawn_masks()[ids[0]][0]
    ref = make_ref(ref_id, 101, split, sentences) | {"ann_id": ann_id, "image_id": image_id}
    ref["category_id"] = [1] * len(ids) if isinstance(ann_id, list) else 1
    return ref | extra


GREFS = [
    gref(31, [101, 102], "train", ["both boxes", "the two things on the left"]),  # multi-target: 101 | 102
    gref(32, [-1], "train", ["the zebra", "a purple dog"], image_id=1, no_target=True),
    gref(33, [103, 104], "train", ["the oval and the crowd"], no_target=False),  # 104 is a crowd: left out
    gref(34, [105], "val", ["left strip"]),
    gref(35, [-1], "val", ["the cat"], image_id=2),
    gref(36, [101, 102], "val", ["every box"]),
    gref(37, 103, "testA", ["oval"]),  # an int ann_id, as grefer.py also reads
    gref(38, [-1], "testB", ["nothing here"], image_id=3),
    gref(39, [105], "testB", ["the bar"]),
]


def gref_mask(ref: dict) -> np.ndarray:
    """What a gRefCOCO ref's merged target must be: the union of its non-crowd annotations' masks."""
    masks = drawn_masks()
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    out = np.zeros(IMAGES[ref["image_id"]], bool)
    for a in ids:
        if a != -1 and a != 104:  # 104 is the fixture's crowd annotation
            out |= masks[a][1]
    return out


def write_refer_root(root):
    """The fixture dataset in the refer layout under ``root``: refcoco (unc) and refcocog (umd) over three COCO
    JPEGs, gRefCOCO (unc, JSON refs) over the same images, RefClef (berkeley, unc) over three SAIAPR JPEGs."""
    image_root = root / "images" / "mscoco" / "images" / "train2014"
    image_root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (h, w) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_root / file_name(image_id), quality=90)
    masks = drawn_masks()
    instances = {
        "images": [{"id": i, "file_name": file_name(i), "height": h, "width": w} for i, (h, w) in IMAGES.items()],
        "annotations": [
            {"id": a, "image_id": i, "segmentation": seg, "bbox": [0, 0, 1, 1], "area": int(m.sum()),
             "iscrowd": int(isinstance(seg, dict) and isinstance(seg["counts"], list)), "category_id": 1}
            for a, (i, m, seg) in masks.items()
        ],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    for dataset, refs_name, refs in [("refcoco", "refs(unc).p", UNC_REFS), ("refcocog", "refs(umd).p", UMD_REFS)]:
        (root / dataset).mkdir()
        (root / dataset / "instances.json").write_text(json.dumps(instances))
        with open(root / dataset / refs_name, "wb") as f:
            pickle.dump(refs, f)
    (root / "grefcoco").mkdir()
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(GREFS))

    clef_root = root / "images" / "saiapr_tc-12"
    for image_id, (h, w) in CLEF_IMAGES.items():
        path = clef_root / clef_folder(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    clef_instances = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in CLEF_IMAGES.items()],
        "annotations": [{"id": a, "image_id": i, "segmentation": seg, "bbox": [0, 0, 1, 1], "area": int(m.sum()),
                         "iscrowd": 0, "category_id": 1} for a, (i, m, seg) in clef_masks().items()],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    (root / "refclef").mkdir()
    (root / "refclef" / "instances.json").write_text(json.dumps(clef_instances))
    for refs_name, refs in [("refs(berkeley).p", BERKELEY_REFS), ("refs(unc).p", CLEF_UNC_REFS)]:
        with open(root / "refclef" / refs_name, "wb") as f:
            pickle.dump(refs, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_refer_root(tmp_path_factory.mktemp("refer"))


def png_claiming(path, width: int, height: int) -> None:
    """A few-byte PNG whose header claims width x height RGB pixels (a decompression bomb's shape; never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def ann_of(ds, index):
    return ds.describe(index)["ann_id"]


@pytest.mark.parametrize("dataset,split,refs", [
    ("refcoco", "train", UNC_REFS), ("refcoco", "val", UNC_REFS), ("refcoco", "testA", UNC_REFS), ("refcoco", "testB", UNC_REFS),
    ("refcocog", "train", UMD_REFS), ("refcocog", "val", UMD_REFS), ("refcocog", "test", UMD_REFS),
])
def test_eval_mode_iterates_every_sentence_with_the_drawn_masks(root, dataset, split, refs):
    ds = ReferDataset(SubsetConfig(str(root), dataset, split, image_size=32, mode="eval"))
    expected = [(r["ref_id"], s["sent_id"], s["raw"]) for r in refs if r["split"] == split for s in r["sentences"]]
    assert len(ds) == len(expected)
    assert len(ds.refs) == sum(r["split"] == split for r in refs)
    masks = drawn_masks()
    seen = []
    for i in range(len(ds)):
        sample = ds[i]
        info = ds.describe(i)
        seen.append((info["ref_id"], info["sent_id"], sample["text"]))
        image_id, drawn, _ = masks[info["ann_id"]]
        assert sample["target"].dtype == bool and np.array_equal(sample["target"], drawn)
        assert sample["index"] == i
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["mask"].shape == (1, 32, 32) and sample["mask"].dtype == torch.float32
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0} and sample["mask"].sum() > 0
        assert sample["frame"] == Frame.fit(*IMAGES[image_id], 32, "letterbox")
    assert seen == expected


def test_every_segmentation_form_decodes_to_the_drawn_mask():
    for ann_id, (image_id, drawn, seg) in drawn_masks().items():
        assert np.array_equal(decode_segmentation(seg, *IMAGES[image_id]), drawn), ann_id
    # compressed RLE with bytes counts (pycocotools' own output) too
    image_id, drawn, seg = drawn_masks()[103]
    assert np.array_equal(decode_segmentation(mask_utils.encode(np.asfortranarray(drawn.astype(np.uint8))), *IMAGES[image_id]), drawn)


def test_train_mode_draws_one_sentence_per_ref_reproducibly(root):
    def texts(seed, epochs=8):
        ds = ReferDataset(SubsetConfig(str(root), "refcoco", "train", image_size=16, seed=seed))
        assert ds.config.mode == "train" and len(ds) == 3  # one item per train ref
        out = []
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            out += [ds[i]["text"] for i in range(len(ds))]
        return out

    a, b, c = texts(0), texts(0), texts(1)
    assert a == b
    assert a != c
    # the draw depends on (seed, epoch, index) only: not on access order or repeated access
    ds = ReferDataset(SubsetConfig(str(root), "refcoco", "train", image_size=16, seed=0))
    ds.set_epoch(3)
    assert [ds[i]["text"] for i in reversed(range(3))] == a[9:12][::-1] == [ds[i]["text"] for i in reversed(range(3))]
    sentences = [{s["raw"] for s in r["sentences"]} for r in UNC_REFS if r["split"] == "train"]
    for k, text in enumerate(a):
        assert text in sentences[k % 3]
    # the sentence is drawn per epoch: a ref with 4 sentences shows several over 8 epochs
    assert len({a[k] for k in range(2, len(a), 3)}) > 1


def test_text_key_sent_and_describe(root):
    ds = ReferDataset(SubsetConfig(str(root), "refcoco", "train", image_size=16, mode="eval", text_key="sent"))
    assert ds[0]["text"] == "man on the left"
    info = ds.describe(0)
    assert info == {"ref_id": 1, "ann_id": 101, "image_id": 1, "sent_id": 10, "image_path": os.path.join(ds.config.image_root, file_name(1)),
                    "no_target": False}
    assert ReferDataset(SubsetConfig(str(root), "refcoco", "train", image_size=16)).describe(0)["sent_id"] is None


def test_image_root_override_and_resize_mode(root, tmp_path):
    other = tmp_path / "coco"
    shutil.copytree(root / "images" / "mscoco" / "images" / "train2014", other)
    ds = ReferDataset(SubsetConfig(str(root), "refcocog", "val", image_root=str(other), image_size=24, resize_mode="resize"))
    sample = ds[0]
    assert ds.image_path(1) == str(other / file_name(1))
    assert sample["frame"] == Frame(40, 60, 0, 0, 24, 24, 24)


def test_collate_through_a_dataloader(root):
    ds = ReferDataset(SubsetConfig(str(root), "refcoco", "val", image_size=32))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)
    assert batch["text"] == ["Oval thing", "the ellipse"]
    assert batch["index"] == [0, 1]
    assert all(t.shape == IMAGES[2] for t in batch["target"]) and all(isinstance(f, Frame) for f in batch["frame"])


def test_python2_style_pickle_with_utf8_str_loads(tmp_path):
    # protocol 2 as Python 2 wrote it: SHORT_BINSTRING ('U') holds the UTF-8 bytes of a str
    raw = "café".encode("utf-8")
    data = b"\x80\x02](}(U\x03raw" + b"U" + bytes([len(raw)]) + raw + b"ue."
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    assert _load_refs(str(path)) == [{"raw": "café"}]


class _TouchOnLoad:
    """Unpickling this runs a shell command that creates ``path``: what a hostile refs mirror could ship."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


def test_a_refs_pickle_that_would_run_code_is_refused_and_runs_nothing(root, tmp_path):
    r = copy_root(root, tmp_path)
    marker = tmp_path / "pwned"
    refs_path = r / "refcoco" / "refs(unc).p"
    with open(refs_path, "wb") as f:
        pickle.dump([*UNC_REFS, _TouchOnLoad(marker)], f, protocol=2)
    with pytest.raises(ValueError) as error:
        ReferDataset(SubsetConfig(str(r), "refcoco", "val"))
    message = str(error.value)
    assert str(refs_path) in message and f"names the Python global {os.system.__module__}.system" in message
    assert "ReferConfig(trust_pickle=True)" in message and "--trust-refs-pickle" in message
    assert not marker.exists()
    # the payload is real: the full unpickler that trust_pickle allows runs it (and os.system's 0 is then no ref)
    with pytest.raises(ValueError, match=rf"ref #{len(UNC_REFS)} in .*refs\(unc\)\.p must be a dict, got int"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "val", trust_pickle=True))
    assert marker.exists()


def test_every_global_is_refused_by_name_and_trust_pickle_allows_it(root, tmp_path):
    r = copy_root(root, tmp_path)
    refs_path = r / "refcoco" / "refs(unc).p"
    with open(refs_path, "wb") as f:  # harmless globals, still refused: the reader allows none
        pickle.dump([collections.OrderedDict(ref) for ref in UNC_REFS], f)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p names the Python global collections\.OrderedDict"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "val"))
    trusted = ReferDataset(SubsetConfig(str(r), "refcoco", "val", trust_pickle=True))
    assert trusted.refs == [ref for ref in UNC_REFS if ref["split"] == "val"]
    # a Python 2 copy_reg reconstructor, as written in the file (not Python 3's copyreg)
    refs_path.write_bytes(b"\x80\x02ccopy_reg\n_reconstructor\nq\x00.")
    with pytest.raises(ValueError, match=r"names the Python global copy_reg\._reconstructor"):
        _load_refs(str(refs_path))
    with pytest.raises(TypeError, match="trust_pickle must be True or False, got 'yes'"):
        ReferConfig(str(root), trust_pickle="yes")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_fixture_refs_load_exactly_at_every_pickle_protocol(tmp_path, protocol):
    path = tmp_path / "refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump(UNC_REFS, f, protocol=protocol)
    assert _load_refs(str(path)) == UNC_REFS


def test_a_python2_refs_pickle_with_memo_longs_and_floats_loads_exactly(tmp_path):
    # protocol 2 as Python 2's cPickle writes a ref: str as SHORT_BINSTRING of UTF-8 bytes, unicode as
    # BINUNICODE, repeated strings through the memo (BINPUT/BINGET), a long (LONG1), a float (BINFLOAT)
    def s(text, memo):  # SHORT_BINSTRING + BINPUT
        raw = text.encode("utf-8")
        return b"U" + bytes([len(raw)]) + raw + b"q" + bytes([memo])

    data = (
        b"\x80\x02]q\x00}q\x01("
        + s("ref_id", 2) + b"K\x07"
        + s("split", 3) + s("val", 4)
        + s("sentences", 5) + b"]q\x06(}q\x07(" + s("raw", 8) + s("Caf\u00e9 on the left", 9) + s("sent", 10)
        + b"X\x05\x00\x00\x00caf\xc3\xa9q\x0b" + b"u}q\x0c(h\x08" + s("the other", 13) + b"h\x0a" + s("other", 14) + b"ue"
        + s("ann_id", 15) + b"\x8a\x05\x00\xe4\x0bT\x02"
        + s("bbox", 16) + b"]q\x11(G@\x04\x00\x00\x00\x00\x00\x00K\x03e"
        + b"ua."
    )
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    assert _load_refs(str(path)) == [{
        "ref_id": 7, "split": "val", "ann_id": 10_000_000_000, "bbox": [2.5, 3],
        "sentences": [{"raw": "Café on the left", "sent": "café"}, {"raw": "the other", "sent": "other"}],
    }]


# ---- errors name the file or the argument ----------------------------------------------------

def copy_root(root, tmp_path):
    dst = tmp_path / "root"
    shutil.copytree(root, dst)
    return dst


def test_missing_refs_and_instances(root, tmp_path):
    r = copy_root(root, tmp_path)
    os.remove(r / "refcoco" / "refs(unc).p")
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*refcoco/refs\(unc\)\.p"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "val"))
    os.remove(r / "refcocog" / "instances.json")
    with pytest.raises(FileNotFoundError, match=r"instances file not found: .*refcocog/instances\.json"):
        ReferDataset(SubsetConfig(str(r), "refcocog", "val"))


def test_unreadable_pickle_and_bad_json(root, tmp_path):
    r = copy_root(root, tmp_path)
    (r / "refcoco" / "refs(unc).p").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match=r"could not read refs pickle .*refcoco/refs\(unc\)\.p"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "val"))
    (r / "refcocog" / "instances.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"could not parse .*refcocog/instances\.json as JSON"):
        ReferDataset(SubsetConfig(str(r), "refcocog", "val"))


def test_missing_and_corrupt_images(root, tmp_path):
    r = copy_root(root, tmp_path)
    image_root = r / "images" / "mscoco" / "images" / "train2014"
    os.remove(image_root / file_name(2))
    ds = ReferDataset(SubsetConfig(str(r), "refcoco", "val"))
    with pytest.raises(FileNotFoundError, match=rf"image for image_id 2 not found: .*train2014/{file_name(2)}"):
        ds[0]
    jpeg = (image_root / file_name(1)).read_bytes()
    (image_root / file_name(1)).write_bytes(jpeg[: len(jpeg) // 2])  # truncated JPEG
    (image_root / file_name(3)).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    ds = ReferDataset(SubsetConfig(str(r), "refcoco", "train", mode="eval"))
    with pytest.raises(ValueError, match=rf"could not decode image .*{file_name(1)}"):
        ds[0]
    with pytest.raises(ValueError, match=rf"could not decode image .*{file_name(3)}"):
        ds[len(ds) - 1]


def test_an_image_over_the_pixel_limit_is_refused_by_name_before_decoding(root, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from masksd.data import images

    r = copy_root(root, tmp_path)
    bomb = r / "images" / "mscoco" / "images" / "train2014" / file_name(3)
    width, height = 10_000, 9_000  # 90 M pixels: over the limit, under twice it (where PIL itself only warns)
    assert images.MAX_IMAGE_PIXELS < width * height < 2 * images.MAX_IMAGE_PIXELS
    png_claiming(bomb, width, height)
    ds = ReferDataset(SubsetConfig(str(r), "refcoco", "testB"))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", None)  # PIL's own check off: masksd's limit does not depend on it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one named error, no DecompressionBombWarning on the way
        with pytest.raises(ValueError, match=rf"image .*{file_name(3)} is refused: 10000x9000 = 90,000,000 pixels, over masksd\.data\.images\.MAX_IMAGE_PIXELS = 89,478,485"):
            ds[0]
    png_claiming(bomb, 100_000, 100_000)  # far over: PIL's own DecompressionBombError, under the same named error
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", images.MAX_IMAGE_PIXELS)
    with pytest.raises(ValueError, match=rf"image .*{file_name(3)} is refused: .*over masksd\.data\.images\.MAX_IMAGE_PIXELS"):
        ds[0]
    # the limit is inclusive: a 40x60 image passes at 2,400 and is refused at 2,399
    ds = ReferDataset(SubsetConfig(str(r), "refcoco", "train", mode="eval"))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 2_400)
    assert ds[0]["target"].shape == (40, 60)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 2_399)
    with pytest.raises(ValueError, match=rf"{file_name(1)} is refused: 60x40 = 2,400 pixels, over .*= 2,399"):
        ds[0]


def test_image_size_disagreeing_with_instances(root, tmp_path):
    r = copy_root(root, tmp_path)
    Image.new("RGB", (10, 10)).save(r / "images" / "mscoco" / "images" / "train2014" / file_name(3))
    ds = ReferDataset(SubsetConfig(str(r), "refcoco", "testB"))
    with pytest.raises(ValueError, match=rf"{file_name(3)} is 10x10 but .*instances\.json says 30x30"):
        ds[0]


def test_bad_dataset_split_and_options(root):
    with pytest.raises(ValueError, match=r"dataset must be one of \['grefcoco', 'refclef', 'refcoco', 'refcoco\+', 'refcocog'\], got 'refcoco-m'"):
        ReferConfig(str(root), "refcoco-m", "val")
    with pytest.raises(ValueError, match=r"split for dataset 'refcoco' split_by 'unc' must be one of \['train', 'val', 'testA', 'testB'\], got 'test'"):
        ReferConfig(str(root), "refcoco", "test")
    with pytest.raises(ValueError, match=r"split for dataset 'refcocog' split_by 'google' must be one of \['train', 'val'\], got 'test'"):
        ReferConfig(str(root), "refcocog", "test", split_by="google")
    with pytest.raises(ValueError, match=r"split_by for dataset 'refcoco\+' must be one of \['unc'\], got 'umd'"):
        ReferConfig(str(root), "refcoco+", "val", split_by="umd")
    with pytest.raises(ValueError, match="mode must be 'train', 'eval' or None, got 'test'"):
        ReferConfig(str(root), "refcoco", "val", mode="test")
    with pytest.raises(ValueError, match=r"text_key must be one of \('raw', 'sent'\)"):
        ReferConfig(str(root), "refcoco", "val", text_key="tokens")
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        ReferConfig(str(root), "refcoco", "val", resize_mode="crop")
    assert ReferConfig(str(root), "refcocog", "test").split_by == "umd"


def test_split_absent_from_the_file_and_dangling_ann(root, tmp_path):
    r = copy_root(root, tmp_path)
    with open(r / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump([x for x in UNC_REFS if x["split"] != "testA"] + [make_ref(7, 101, "val", ["x"]) | {"ann_id": 999}], f)
    with pytest.raises(ValueError, match=r"no refs with split 'testA' in .*refs\(unc\)\.p; the file has splits"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "testA"))
    with pytest.raises(ValueError, match=r"ref_id 7 points to ann_id 999, which is not in .*instances\.json"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "val"))


def test_sentence_without_the_text_key(root, tmp_path):
    r = copy_root(root, tmp_path)
    refs = [dict(x) for x in UNC_REFS]
    refs[2] = dict(refs[2], sentences=[{"sent_id": 1, "sent": "no raw field"}])
    with open(r / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(ValueError, match=r"ref_id 3 in .*refs\(unc\)\.p has a sentence without the text_key field 'raw'"):
        ReferDataset(SubsetConfig(str(r), "refcoco", "val"))
    assert len(ReferDataset(SubsetConfig(str(r), "refcoco", "val", text_key="sent"))) == 1


# ---- split counts against the published ones ------------------------------------------------

def test_published_counts_cover_every_split_and_add_up():
    assert {(d, b) for d, b, _ in SPLIT_COUNTS} == set(SPLITS)
    assert all(key[2] in SPLITS[key[:2]] for key in SPLIT_COUNTS)
    assert SPLIT_COUNTS[("refcoco", "unc", "val")] == SplitCounts(3_811, 10_834)

    def total(dataset, split_by):
        return tuple(map(sum, zip(*(SPLIT_COUNTS[(dataset, split_by, s)] for s in SPLITS[(dataset, split_by)]))))

    assert total("refcoco", "unc")[0] == 50_000  # RefCOCO: 50,000 referred objects
    assert total("refcoco+", "unc") == (49_856, 141_564)  # RefCOCO+: 49,856 objects, 141,564 expressions
    assert total("refcocog", "umd") == total("refcocog", "google") == (49_822, 95_010)  # one refs set, two partitions


@pytest.mark.parametrize("dataset,split,refs,sentences", [("refcoco", "val", 1, 2), ("refcoco", "train", 3, 9), ("refcocog", "test", 2, 4)])
def test_counts_and_a_warning_naming_file_split_and_both_counts(root, dataset, split, refs, sentences):
    split_by = "unc" if dataset == "refcoco" else "umd"
    published = SPLIT_COUNTS[(dataset, split_by, split)]
    with pytest.warns(SplitCountWarning) as record:
        ds = ReferDataset(ReferConfig(str(root), dataset, split, image_size=16))
    assert len(record) == 1 and issubclass(record[0].category, UserWarning)
    message = str(record[0].message)
    assert str(root / dataset / f"refs({split_by}).p") in message
    assert f"{dataset}/{split_by} {split} holds {refs} refs and {sentences} sentences" in message
    assert f"published split has {published.refs} refs and {published.sentences} sentences" in message
    assert ds.counts() == SplitCounts(refs, sentences)
    assert len(ds) == (refs if split == "train" else sentences)  # train: one item per ref; eval: per sentence


def test_matching_counts_do_not_warn_and_check_counts_false_silences(root, monkeypatch):
    monkeypatch.setitem(SPLIT_COUNTS, ("refcoco", "unc", "val"), SplitCounts(1, 2))  # the fixture's own counts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ReferDataset(ReferConfig(str(root), "refcoco", "val")).counts() == (1, 2)
        assert ReferDataset(ReferConfig(str(root), "refcoco", "testA", check_counts=False)).counts() == (1, 1)
    monkeypatch.setitem(SPLIT_COUNTS, ("refcoco", "unc", "val"), SplitCounts(1, 3))  # one sentence short: warns
    with pytest.warns(SplitCountWarning, match="holds 1 refs and 2 sentences, but the published split has 1 refs and 3"):
        ReferDataset(ReferConfig(str(root), "refcoco", "val"))


def test_the_literal_choices_and_the_split_tables_agree():
    from typing import get_args

    from masksd.data import DEFAULT_SPLIT_BY, SPLITS, ReferDatasetName, SplitBy

    assert set(DEFAULT_SPLIT_BY) == set(get_args(ReferDatasetName)) == {d for d, _ in SPLITS}
    assert {s for _, s in SPLITS} == set(get_args(SplitBy))
    assert all((d, s) in SPLITS for d, s in DEFAULT_SPLIT_BY.items())
