"""The data configurations and their choices, importable without torch (the scripts build their
``--help`` from them): the refer partitions and their published counts, :class:`ReferConfig`,
:class:`ManifestConfig`, and the resize and restore modes of :mod:`masksd.data.transforms`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

__all__ = [
    "DEFAULT_SPLIT_BY", "RESIZE_MODES", "RESTORE_METHODS", "SPLITS", "SPLIT_COUNTS", "ManifestConfig", "ReferConfig", "ReferDatasetName",
    "ResizeMode", "RestoreMethod", "SplitBy", "SplitCountWarning", "SplitCounts", "TextKey", "saiapr_image_path",
]

ResizeMode = Literal["letterbox", "resize"]
"""How an image is fitted to the S×S input (see the module docstring)."""
RESIZE_MODES = get_args(ResizeMode)

RestoreMethod = Literal["bilinear", "cris"]
"""How :func:`restore` maps a prediction back to the original image size (see the module docstring)."""
RESTORE_METHODS: tuple[str, ...] = get_args(RestoreMethod)

ReferDatasetName = Literal["refcoco", "refcoco+", "refcocog", "refclef", "grefcoco"]
"""The refer-format datasets: RefCOCO, RefCOCO+, G-Ref (RefCOCOg), RefClef (ReferItGame) and gRefCOCO (GRES)."""
SplitBy = Literal["unc", "umd", "google", "berkeley"]
"""The refs partitions: UNC (RefCOCO, RefCOCO+, RefClef, gRefCOCO), UMD and Google (G-Ref), UC Berkeley (RefClef)."""
TextKey = Literal["raw", "sent"]
"""Sentence field: ``raw`` (as typed by the annotator) or ``sent`` (lower-cased and tokenised; CRIS uses it)."""


class SplitCounts(NamedTuple):
    """How many refs (referred objects) and sentences (referring expressions) a split holds."""

    refs: int
    sentences: int


# Sources. Refs of every split: the TFDS ref_coco catalogue's table (tensorflow_datasets/
# vision_language/refcoco/refcoco.py), counted from the refer repo's pickles.
# Sentences: RefCOCO and RefCOCO+ (unc): Yu et al., "Modeling Context in Referring Expressions",
# ECCV 2016 (RefCOCO's also in BAAI FlagEval's RefCOCO page; RefCOCO+'s four add up to its
# published total of 141,564). RefCOCOg umd: Nagaraja et al., "Modeling Context Between Objects
# for Referring Expression Understanding", ECCV 2016: their 85,408-expression training partition
# is refer's train + val (80,512 + 4,896) and their 9,602 expressions over 5,023 objects are
# refer's test (the author's correction in github.com/varun-nagaraja/referring-expressions
# issue 2). RefCOCOg google: Mao et al., "Generation and Comprehension of Unambiguous Object
# Descriptions", CVPR 2016, whose test set was never released; 85,474 train and 9,536 val
# expressions as counted from refs(google).p (github.com/kdwonn/SaG issue 4). Both RefCOCOg
# partitions split the same refs: 49,822 refs and 95,010 sentences either way
# (github.com/luogen1996/MCN issue 7 counts 95,010 for umd).
#
# None: the split exists (its name is in the files the field reads) but no count of its refs and
# sentences could be verified from a source we can cite, so nothing is checked rather than a
# number invented. RefClef berkeley: train / val / test, as refer's README
# (github.com/lichengunc/refer) and the grounding codebases that read refs(berkeley).p name them;
# the ReferItGame paper's totals (Kazemzadeh et al., EMNLP 2014) are for the collected data, not
# for refer's cleaned partition (19,997 images). RefClef unc: train / val / testA / testB / testC,
# as a third-party task list of refer's refclef_unc names them (its split counts unverified).
# gRefCOCO unc: train / val / testA / testB (ReLA's register_refcoco.py, github.com/henghuiding/ReLA);
# GRES (Liu, Ding and Jiang, CVPR 2023) publishes the dataset's totals, not per-split counts.
SPLIT_COUNTS: dict[tuple[str, str, str], SplitCounts | None] = {
    ("refcoco", "unc", "train"): SplitCounts(42_404, 120_624),
    ("refcoco", "unc", "val"): SplitCounts(3_811, 10_834),
    ("refcoco", "unc", "testA"): SplitCounts(1_975, 5_657),
    ("refcoco", "unc", "testB"): SplitCounts(1_810, 5_095),
    ("refcoco+", "unc", "train"): SplitCounts(42_278, 120_191),
    ("refcoco+", "unc", "val"): SplitCounts(3_805, 10_758),
    ("refcoco+", "unc", "testA"): SplitCounts(1_975, 5_726),
    ("refcoco+", "unc", "testB"): SplitCounts(1_798, 4_889),
    ("refcocog", "umd", "train"): SplitCounts(42_226, 80_512),
    ("refcocog", "umd", "val"): SplitCounts(2_573, 4_896),
    ("refcocog", "umd", "test"): SplitCounts(5_023, 9_602),
    ("refcocog", "google", "train"): SplitCounts(44_822, 85_474),
    ("refcocog", "google", "val"): SplitCounts(5_000, 9_536),
    **{("refclef", "berkeley", split): None for split in ("train", "val", "test")},
    **{("refclef", "unc", split): None for split in ("train", "val", "testA", "testB", "testC")},
    **{("grefcoco", "unc", split): None for split in ("train", "val", "testA", "testB")},
}
"""The published refs and sentences of every (dataset, split_by, split) this loader reads; None where no
published count could be verified (RefClef, gRefCOCO: see the sources above), which :class:`ReferDataset`
then does not check."""

SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    partition: tuple(key[2] for key in SPLIT_COUNTS if key[:2] == partition) for partition in dict.fromkeys(key[:2] for key in SPLIT_COUNTS)
}
"""The (dataset, split_by) partitions this loader reads, and their splits (the keys of :data:`SPLIT_COUNTS`)."""


class SplitCountWarning(UserWarning):
    """A split read from a refs file holds other counts than the published ones (see :data:`SPLIT_COUNTS`)."""


DEFAULT_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "berkeley", "grefcoco": "unc"}
"""The partition each dataset is usually reported on (the paper uses UMD for G-Ref; RIS reports RefClef
(ReferIt) on Berkeley's split; gRefCOCO has only UNC's)."""

COCO_IMAGES = os.path.join("images", "mscoco", "images", "train2014")
SAIAPR_IMAGES = os.path.join("images", "saiapr_tc-12")


def saiapr_image_path(image_root: str, image_id: int, file_name: str) -> str:
    """Where the SAIAPR TC-12 archive (RefClef's images) keeps image ``image_id``: 1,000 images per
    two-digit folder, ``<image_root>/<image_id // 1000:02d>/images/<file name>`` (``25008.jpg`` lies in
    ``25/images/``). A ``file_name`` that already names a folder is taken as it is, relative to image_root."""
    if "/" in file_name.replace("\\", "/"):
        return os.path.join(image_root, file_name)
    return os.path.join(image_root, f"{image_id // 1000:02d}", "images", file_name)


@dataclass
class ReferConfig:
    """Which refer dataset and split to read, and how to turn it into model input."""

    root: str
    """Folder holding ``<dataset>/refs(<split_by>).p`` (gRefCOCO: ``grefcoco/grefs(unc).json``) and
    ``<dataset>/instances.json`` (the refer repo's ``data/``)."""
    dataset: ReferDatasetName = "refcoco"
    """One of ``refcoco``, ``refcoco+``, ``refcocog``, ``refclef``, ``grefcoco``."""
    split: str = "val"
    """A split of the (dataset, split_by) partition, see :data:`SPLITS` (e.g. ``testA`` for RefCOCO, ``test`` for G-Ref UMD)."""
    split_by: SplitBy | None = None
    """``unc`` (RefCOCO, RefCOCO+, gRefCOCO; RefClef), ``umd`` or ``google`` (G-Ref), ``berkeley`` (RefClef);
    None takes :data:`DEFAULT_SPLIT_BY`."""
    image_root: str | None = None
    """Folder with the images: COCO train2014 JPEGs, None meaning ``<root>/images/mscoco/images/train2014``;
    for RefClef the SAIAPR TC-12 folder, None meaning ``<root>/images/saiapr_tc-12``."""
    image_size: int = 480
    """S: side of the square model input (the paper: 480 for ablations, 576 ViT-B, 532 ViT-L)."""
    resize_mode: ResizeMode = "letterbox"
    """``letterbox`` (keep aspect, pad with the CLIP mean; CRIS) or ``resize`` (stretch), see :mod:`masksd.data.transforms`."""
    mode: str | None = None
    """``train``: one item per ref, with one of its sentences drawn at random on every access;
    ``eval``: one item per (ref, sentence). None: ``train`` for the ``train`` split, ``eval`` otherwise."""
    seed: int = 0
    """Train mode: the sentence of item i in epoch e is drawn from (seed, e, i), so it does not
    depend on DataLoader workers and a resumed run draws what an uninterrupted one would."""
    text_key: TextKey = "raw"
    """Sentence field used as ``text``: ``raw`` (as typed by the annotator) or ``sent`` (lower-cased, tokenised; CRIS uses this)."""
    check_counts: bool = True
    """Warn (:class:`SplitCountWarning`, a ``UserWarning``) when the split's refs and sentences differ from
    the published :data:`SPLIT_COUNTS` (a refs file of another partition, a truncated download); False
    for a deliberate subset such as a cut-down refs file."""
    trust_pickle: bool = False
    """Read the refs pickle with Python's full unpickler, which runs whatever code the file names. False
    (the default) builds only lists, dicts, tuples, strings, numbers and None, and refuses a file that names
    any Python global (class, function, ``copy_reg`` reconstructor) with a ``ValueError`` naming it. Set True
    only for a file from a source you trust."""

    def __post_init__(self) -> None:
        if self.split_by is None and self.dataset in DEFAULT_SPLIT_BY:
            self.split_by = DEFAULT_SPLIT_BY[self.dataset]
        if self.dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"dataset must be one of {sorted(DEFAULT_SPLIT_BY)}, got {self.dataset!r}")
        partitions = sorted(s for d, s in SPLITS if d == self.dataset)
        if (self.dataset, self.split_by) not in SPLITS:
            raise ValueError(f"split_by for dataset {self.dataset!r} must be one of {partitions}, got {self.split_by!r}")
        allowed = SPLITS[(self.dataset, self.split_by)]
        if self.split not in allowed:
            raise ValueError(f"split for dataset {self.dataset!r} split_by {self.split_by!r} must be one of {list(allowed)}, got {self.split!r}")
        _check_input(self)
        if self.text_key not in get_args(TextKey):
            raise ValueError(f"text_key must be one of {get_args(TextKey)}, got {self.text_key!r}")
        if not isinstance(self.trust_pickle, bool):
            raise TypeError(f"trust_pickle must be True or False, got {self.trust_pickle!r}")
        if self.image_root is None:
            self.image_root = os.path.join(self.root, SAIAPR_IMAGES if self.dataset == "refclef" else COCO_IMAGES)

    @property
    def refs_path(self) -> str:
        """``<root>/<dataset>/refs(<split_by>).p``; gRefCOCO's refs are JSON: ``grefs(<split_by>).json``."""
        if self.dataset == "grefcoco":
            return os.path.join(self.root, self.dataset, f"grefs({self.split_by}).json")
        return os.path.join(self.root, self.dataset, f"refs({self.split_by}).p")

    @property
    def instances_path(self) -> str:
        return os.path.join(self.root, self.dataset, "instances.json")


def _check_input(config, modes=("train", "eval")) -> None:
    """The input settings :class:`ReferConfig` and :class:`ManifestConfig` share: ``mode`` (None becomes
    ``train`` for the ``train`` split, else ``eval``), ``resize_mode``, ``image_size``."""
    if config.mode is None:
        config.mode = "train" if config.split == "train" else "eval"
    if config.mode not in modes:
        raise ValueError(f"mode must be 'train', 'eval' or None, got {config.mode!r}")
    if config.resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {config.resize_mode!r}")
    if not isinstance(config.image_size, int) or isinstance(config.image_size, bool) or config.image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {config.image_size!r}")


@dataclass
class ManifestConfig:
    """Which split of a manifest (your own images, masks and expressions; :mod:`masksd.data.manifest`) to
    read, and how to turn it into model input."""

    path: str
    """The manifest: a JSON Lines file (``.jsonl``), or a CSV file (``.csv``) with a header row."""
    split: str = "val"
    """The rows whose ``split`` field holds this value (any name the manifest uses: train, val, test...)."""
    root: str | None = None
    """Folder that relative ``image`` and ``mask`` paths are resolved against; None: the manifest's own folder."""
    image_size: int = 480
    """S: side of the square model input."""
    resize_mode: ResizeMode = "letterbox"
    """``letterbox`` (keep aspect, pad; CRIS) or ``resize`` (stretch), see :mod:`masksd.data.transforms`."""
    mode: str | None = None
    """``train``: one item per referent (rows sharing a ``ref``; a row without one is its own), showing one of
    its expressions drawn per epoch from (seed, epoch, index) as :class:`ReferConfig` draws them; ``eval``: one
    item per row. None: ``train`` for the ``train`` split, ``eval`` otherwise."""
    seed: int = 0
    """Train mode: the seed of the expression drawn for each referent (see :class:`ReferConfig`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"path must name the manifest file, got {self.path!r}")
        self.path = os.fspath(self.path)
        if not isinstance(self.split, str) or not self.split.strip():
            raise ValueError(f"split must be a non-empty str, got {self.split!r}")
        _check_input(self)
        if self.root is None:
            self.root = os.path.dirname(os.path.abspath(self.path))
