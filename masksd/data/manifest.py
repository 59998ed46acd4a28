"""Your own data as a manifest: one file, a row per referring expression.

JSON Lines (``.jsonl``, one JSON object per line; blank lines are skipped)::

    {"image": "images/park.jpg", "text": "the dog on the left", "split": "train", "mask": "masks/dog_left.png"}
    {"image": "images/park.jpg", "text": "the brown dog", "split": "train", "mask": "masks/dog_left.png", "ref": "dog1"}
    {"image": "images/park.jpg", "text": "both dogs", "split": "train", "polygons": [[10, 20, 80, 20, 80, 90, 10, 90]]}
    {"image": "images/cat.jpg", "text": "the cat", "split": "val", "rle": {"size": [480, 640], "counts": "..."}}
    {"image": "images/cat.jpg", "text": "the zebra", "split": "val", "no_target": true}

or CSV (``.csv``) with a header row naming the same fields, an empty cell for an absent field and
``polygons`` / ``rle`` cells holding their JSON text.

Fields (:data:`MANIFEST_FIELDS`; any other is refused, so a misspelt field is named, not ignored):

- ``image`` (required): the image file; a relative path is resolved against ``root`` (default: the
  manifest's folder).
- ``text`` (required): the referring expression, a non-blank string.
- ``split`` (required): any name (``train``, ``val``, ``test``...); a dataset reads one split.
- the target, exactly one of: ``mask``, a binary mask file (PNG: 0 background, one other value for
  the target; resolved like ``image``; the image's size); ``polygons``, COCO polygons in pixels
  (``[[x0, y0, x1, y1, ...], ...]``, merged); ``rle``, a COCO RLE (``{"size": [h, w], "counts": ...}``,
  compressed string or uncompressed list); or ``no_target: true`` for an expression that refers to
  nothing (an all-empty mask, as gRefCOCO's no-target expressions).
- ``ref`` (optional, str or int): rows with the same ``ref`` describe one referent (same image, same
  split): training draws one of its expressions per epoch, as the refer loaders do. A row without
  ``ref`` is a referent of its own.
- ``id`` (optional, str or int, unique among the rows that give one): how :meth:`ManifestDataset.describe`
  and ``predict.py`` name the row (default: its line number).

Every row of the file is checked when a dataset is built, and the image and mask files of the split
read exist; each item's files are decoded when it loads. Every error names the file, the line and the
field (``ValueError``; ``FileNotFoundError`` for a missing file). Polygons and RLEs need
``pycocotools`` (the ``examples`` extra); PNG masks only ``pillow``.

Commands (``python -m masksd.data.manifest --help``)::

    python -m masksd.data.manifest convert --data-root data --dataset refcoco --output refcoco.jsonl
    python -m masksd.data.manifest check my_data.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from masksd.data.config import SPLITS, ManifestConfig, ReferConfig, SplitCounts
from masksd.data.images import read_mask, read_rgb
from masksd.data.transforms import InputTransform

__all__ = [
    "MANIFEST_FIELDS", "TARGET_FIELDS", "ManifestConfig", "ManifestDataset", "ManifestRow", "convert_refer", "main", "read_manifest",
]

MANIFEST_FIELDS = ("image", "text", "split", "mask", "polygons", "rle", "no_target", "ref", "id")
"""Every field a manifest row may have."""
TARGET_FIELDS = ("mask", "polygons", "rle", "no_target")
"""The fields that give a row's target; a row has exactly one (``no_target`` only when true)."""
_REQUIRED = ("image", "text", "split")


@dataclass(frozen=True)
class ManifestRow:
    """One checked row of a manifest."""

    line: int
    """The row's line in the file (1-based; a CSV's header is line 1)."""
    image: str
    """The image file, resolved against the manifest's root."""
    text: str
    """The referring expression."""
    split: str
    """The split the row belongs to."""
    target: str
    """Which field gives the target: ``mask``, ``polygons``, ``rle`` or ``no_target``."""
    value: Any
    """The target: the mask file (resolved), the polygon list, the RLE dict, or None (no target)."""
    ref: str | int | None
    """The referent the row describes (rows sharing it are one referent); None: the row alone."""
    id: str
    """The row's name: its ``id`` field, else its line number."""


class _RowError(ValueError):
    """A bad row; :func:`read_manifest` prefixes the file and line."""


def _field_error(field: str, message: str) -> _RowError:
    return _RowError(f"field {field!r}: {message}")


def _check_row(values: dict, root: str, require_target: bool) -> dict:
    """The checked fields of one parsed row (a dict of field -> value, absent fields left out)."""
    unknown = sorted(set(values) - set(MANIFEST_FIELDS))
    if unknown:
        raise _field_error(unknown[0], f"is not a manifest field (fields: {', '.join(MANIFEST_FIELDS)})")
    for field in _REQUIRED:
        if field not in values:
            raise _field_error(field, "is missing (every row needs image, text and split)")
    for field in ("image", "text", "split"):
        value = values[field]
        if not isinstance(value, str) or not value.strip():
            raise _field_error(field, f"must be a non-blank string, got {value!r}")
    given = [f for f in TARGET_FIELDS if f in values and not (f == "no_target" and values[f] is False)]
    if "no_target" in values and not isinstance(values["no_target"], bool):
        raise _field_error("no_target", f"must be true or false, got {values['no_target']!r}")
    if len(given) > 1:
        raise _field_error(given[1], f"a row has one target, got {' and '.join(given)}")
    if not given and require_target:
        raise _field_error("mask", "the row has no target: give one of mask (a PNG), polygons, rle, or no_target: true")
    target = given[0] if given else "no_target"
    value = values.get(target)
    if target == "mask":
        if not isinstance(value, str) or not value.strip():
            raise _field_error("mask", f"must be the path of a mask file, got {value!r}")
        value = os.path.join(root, value)
    elif target == "polygons":
        if not isinstance(value, list) or not value or not all(isinstance(p, list) for p in value):
            raise _field_error("polygons", f"must be a non-empty list of [x0, y0, x1, y1, ...] lists, got {_short(value)}")
    elif target == "rle":
        if not isinstance(value, dict) or not {"size", "counts"} <= value.keys():
            raise _field_error("rle", f"must be a COCO RLE dict with 'size' and 'counts', got {_short(value)}")
    else:
        value = None
    for field in ("ref", "id"):
        if field in values and (isinstance(values[field], bool) or not isinstance(values[field], (str, int))
                                or (isinstance(values[field], str) and not values[field].strip())):
            raise _field_error(field, f"must be a non-blank string or an int, got {values[field]!r}")
    return {"image": os.path.join(root, values["image"]), "text": values["text"], "split": values["split"],
            "target": target, "value": value, "ref": values.get("ref"), "id": values.get("id")}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonl_rows(path: str):
    """(line, dict of fields) of each non-blank line of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                values = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{line}: not a JSON object ({type(e).__name__}: {e})") from None
            if not isinstance(values, dict):
                raise ValueError(f"{path}:{line}: a row must be a JSON object of fields, got {type(values).__name__}")
            yield line, values


def _csv_value(field: str, cell: str):
    """A CSV cell as the value the JSON Lines field holds."""
    if field in ("polygons", "rle"):
        try:
            return json.loads(cell)
        except (json.JSONDecodeError, RecursionError) as e:
            raise _field_error(field, f"the cell must hold JSON ({type(e).__name__}: {e})") from None
    if field == "no_target":
        flag = cell.strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise _field_error(field, f"must be true or false, got {cell!r}")
        return flag in ("true", "1")
    return cell


def _next_cells(reader, path: str) -> list[str] | None:
    """The next row of a ``csv.reader``, None at the end; a malformed row names its line."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not CSV ({e})") from None


def _csv_rows(path: str):
    """(line, dict of fields) of each data row of a CSV file with a header; empty cells are absent fields."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = _next_cells(reader, path)
        if header is None:
            return
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise ValueError(f"{path}:1: the header names a column twice: {header}")
        unknown = sorted(set(header) - set(MANIFEST_FIELDS))
        if unknown:
            raise ValueError(f"{path}:1: field {unknown[0]!r} is not a manifest field (fields: {', '.join(MANIFEST_FIELDS)})")
        while (cells := _next_cells(reader, path)) is not None:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path}:{line}: the row has {len(cells)} cells, the header {len(header)}")
            values = {}
            for field, cell in zip(header, cells):
                if cell.strip():
                    try:
                        values[field] = _csv_value(field, cell)
                    except _RowError as e:
                        raise ValueError(f"{path}:{line}: {e}") from None
            yield line, values


def read_manifest(path: str, root: str | None = None, require_target: bool = True) -> list[ManifestRow]:
    """Every row of the manifest at ``path`` (``.csv``: CSV, anything else: JSON Lines), checked: the
    fields, one target per row (``require_target=False`` lets rows without one through, as
    ``predict.py`` reads them), unique ``id`` values, one image and split per ``ref``. Relative paths resolve
    against ``root`` (default: the manifest's folder). Files are not opened here. Raises ``ValueError``
    naming the file, the line and the field (``FileNotFoundError`` if the manifest is missing)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
    rows: list[ManifestRow] = []
    ids: dict[str, int] = {}
    refs: dict[Any, ManifestRow] = {}
    reader = _csv_rows if path.lower().endswith(".csv") else _jsonl_rows
    try:
        for line, values in reader(path):
            try:
                row = _check_row(values, root, require_target)
            except _RowError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            name = str(row["id"]) if row["id"] is not None else str(line)
            if row["id"] is not None:
                if name in ids:
                    raise ValueError(f"{path}:{line}: field 'id': {name!r} is also the id of line {ids[name]}")
                ids[name] = line
            row = ManifestRow(line=line, image=row["image"], text=row["text"], split=row["split"], target=row["target"],
                              value=row["value"], ref=row["ref"], id=name)
            if row.ref is not None:
                first = refs.setdefault(row.ref, row)
                for field in ("image", "split"):
                    if getattr(first, field) != getattr(row, field):
                        raise ValueError(f"{path}:{line}: field {field!r}: ref {row.ref!r} has {field} {getattr(first, field)!r} "
                                         f"on line {first.line} and {getattr(row, field)!r} here (a referent lies in one image and split)")
            rows.append(row)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


class ManifestDataset(Dataset):
    """One split of a manifest as model-ready samples, in the sample format every masksd dataset shares
    (``image, mask, text, target, frame, index``; see ``masksd.data``).

    ``train`` mode: one item per referent (in the order referents first appear), its expression drawn per
    epoch from (seed, epoch, index) exactly as :class:`~masksd.data.ReferDataset` draws a ref's sentence,
    so a refer split and its converted manifest give the same items. ``eval`` mode: one item per row,
    referent by referent.
    """

    def __init__(self, config: ManifestConfig) -> None:
        if not isinstance(config, ManifestConfig):
            raise TypeError(f"config must be a ManifestConfig, got {type(config).__name__}")
        self.config = config
        self.epoch = 0
        self.transform = InputTransform(config.image_size, config.resize_mode)
        all_rows = read_manifest(config.path, config.root)
        rows = [row for row in all_rows if row.split == config.split]
        if not rows:
            present = sorted({row.split for row in all_rows})
            raise ValueError(f"no rows with split {config.split!r} in {config.path}; the manifest has splits {present}")
        groups: dict[Any, list[ManifestRow]] = {}
        for row in rows:
            groups.setdefault(("ref", row.ref) if row.ref is not None else ("line", row.line), []).append(row)
        self.refs: list[list[ManifestRow]] = list(groups.values())
        for row in rows:
            for field, file in (("image", row.image), ("mask", row.value if row.target == "mask" else None)):
                if file is not None and not os.path.isfile(file):
                    raise FileNotFoundError(f"{config.path}:{row.line}: field {field!r}: file not found: {file}")
        if any(row.target in ("polygons", "rle") for row in rows):
            from masksd.data.refer import _coco_mask

            _coco_mask()  # polygons and RLEs decode with pycocotools: say so now, not in the first item
        if config.mode == "train":
            self.items = [(r, -1) for r in range(len(self.refs))]
        else:
            self.items = [(r, s) for r, ref in enumerate(self.refs) for s in range(len(ref))]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        c = self.config
        return f"ManifestDataset({c.path} {c.split}, mode={c.mode}, refs={len(self.refs)}, items={len(self)})"

    def counts(self) -> SplitCounts:
        """The split's referents and rows (expressions)."""
        return SplitCounts(len(self.refs), sum(len(ref) for ref in self.refs))

    def set_epoch(self, epoch: int) -> None:
        """Train mode: draw the expressions of ``epoch`` (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def row(self, index: int) -> ManifestRow:
        """The row item ``index`` shows (in train mode, the one drawn for the current epoch)."""
        from masksd.data.refer import draw_sentence

        r, s = self.items[index]
        ref = self.refs[r]
        return ref[draw_sentence(self.config.seed, self.epoch, index, len(ref)) if s < 0 else s]

    def describe(self, index: int) -> dict:
        """Identifiers of an item: ``line, id, ref, split, image_path``, and ``no_target``."""
        row = self.row(index)
        return {"line": row.line, "id": row.id, "ref": row.ref, "split": row.split, "image_path": row.image,
                "no_target": row.target == "no_target"}

    def load_image(self, row: ManifestRow) -> np.ndarray:
        """A row's image as uint8 RGB (H0, W0, 3); errors name the manifest, the line and the field."""
        try:
            return read_rgb(row.image)
        except ValueError as e:
            raise ValueError(f"{self.config.path}:{row.line}: field 'image': {e}") from None

    def load_target(self, row: ManifestRow, height: int, width: int) -> np.ndarray:
        """A row's target as bool (height, width), the size of its image; errors name the manifest, the line
        and the field."""
        where = f"{self.config.path}:{row.line}: field {row.target!r}"
        if row.target == "no_target":
            return np.zeros((height, width), dtype=bool)
        if row.target == "mask":
            try:
                mask = read_mask(row.value)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if mask.shape != (height, width):
                raise ValueError(f"{where}: mask {row.value} is {mask.shape[0]}x{mask.shape[1]}, its image {row.image} {height}x{width}")
            return mask
        from masksd.data.refer import decode_segmentation

        try:
            return decode_segmentation(row.value, height, width)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e} (image {row.image} is {height}x{width})") from None

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index must be in [0, {len(self.items)}), got {index}")
        row = self.row(index)
        image = self.load_image(row)  # (H0, W0, 3)
        target = self.load_target(row, *image.shape[:2])  # (H0, W0)
        image_t, mask_t, frame = self.transform(image, target)  # (3, S, S), (1, S, S)
        return {"image": image_t, "mask": mask_t, "text": row.text, "target": target, "frame": frame, "index": index}


# ---------------------------------------------------------------- the converter and the checker

def convert_refer(config: ReferConfig, output: str, splits: tuple[str, ...] | None = None, relative: bool = True) -> dict[str, SplitCounts]:
    """Write the refer-format dataset ``config`` names (its root, dataset, split_by, image_root, text_key;
    its split and mode are ignored) as a JSON Lines manifest at ``output``: every sentence of ``splits``
    (default: all of the partition's) a row, in the refs file's order, with ``ref`` the ref_id and ``id``
    ``<ref_id>:<sentence>``, so training on the manifest draws what training on the refs draws. A target
    keeps its segmentation (polygons or RLE) where it is one annotation; a merged one (gRefCOCO's several
    annotations, RefClef's RLE list) is written as the RLE of the merged mask; a no-target ref as
    ``no_target: true``. Image paths are relative to the manifest's folder (``relative=False``: absolute).
    An existing ``output`` is not replaced. Returns the (refs, rows) written per split."""
    from dataclasses import replace

    from masksd.data.refer import ReferDataset, _coco_mask

    output = os.fspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; the converter does not replace a manifest (remove it or choose another --output)")
    partition = SPLITS[(config.dataset, config.split_by)]
    splits = partition if splits is None else tuple(splits)
    for split in splits:
        if split not in partition:
            raise ValueError(f"split {split!r} is not one of {config.dataset}/{config.split_by}'s {list(partition)}")
    mask_utils = _coco_mask()
    folder = os.path.dirname(os.path.abspath(output))
    rows, counts = [], {}
    for split in splits:
        ds = ReferDataset(replace(config, split=split, mode="eval", check_counts=False))
        for ref in ds.refs:
            image = os.path.abspath(ds.image_path(ref["image_id"]))
            image = os.path.relpath(image, folder) if relative else image
            ann_ids = ds.target_ids(ref)
            if not ann_ids:
                target = {"no_target": True}
            else:
                segmentation = ds.annotations[ann_ids[0]]["segmentation"]
                if len(ann_ids) == 1 and (isinstance(segmentation, dict) or not any(isinstance(p, dict) for p in segmentation)):
                    target = {"rle" if isinstance(segmentation, dict) else "polygons": segmentation}
                else:  # merged: gRefCOCO's several annotations (without crowds), RefClef's list of RLEs
                    rle = mask_utils.encode(np.asfortranarray(ds.ref_target(ref).astype(np.uint8)))
                    target = {"rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}
            for j, sentence in enumerate(ref["sentences"]):
                rows.append({"image": image, "text": sentence[config.text_key], "split": split, **target,
                             "ref": ref["ref_id"], "id": f"{ref['ref_id']}:{j}"})
        counts[split] = ds.counts()
    temporary = f"{output}.part"
    with open(temporary, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, output)
    return counts


def check_manifest(path: str, root: str | None = None) -> dict[str, SplitCounts]:
    """Build every split of the manifest and load every item (images and targets decoded): the (referents,
    rows) per split, or the first error, naming the file, the line and the field."""
    splits = sorted({row.split for row in read_manifest(path, root)})
    counts = {}
    for split in splits:
        ds = ManifestDataset(ManifestConfig(path, split, root=root, image_size=8, mode="eval"))
        for i in range(len(ds)):
            row = ds.row(i)
            image = ds.load_image(row)
            ds.load_target(row, *image.shape[:2])
        counts[split] = ds.counts()
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m masksd.data.manifest convert|check``; a user error is one line on stderr, exit status 2."""
    from typing import get_args

    from masksd.data.config import DEFAULT_SPLIT_BY, ReferDatasetName, SplitBy, TextKey

    parser = argparse.ArgumentParser(prog="python -m masksd.data.manifest", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write a refer-format dataset as a manifest")
    convert.add_argument("--data-root", required=True, help="the refer repo's data/ folder (<dataset>/refs(...).p, instances.json)")
    convert.add_argument("--dataset", required=True, choices=get_args(ReferDatasetName))
    convert.add_argument("--split-by", choices=get_args(SplitBy), help=f"default: the dataset's usual one {DEFAULT_SPLIT_BY}")
    convert.add_argument("--image-root", help="the images (default: the refer layout under --data-root)")
    convert.add_argument("--splits", nargs="+", help="splits to write (default: all of the partition's)")
    convert.add_argument("--text-key", choices=get_args(TextKey), default="raw", help="sentence field written as text (default: raw)")
    convert.add_argument("--absolute", action="store_true", help="write absolute image paths (default: relative to the manifest)")
    convert.add_argument("--output", required=True, help="the manifest to write (.jsonl); never replaced")
    convert.add_argument("--trust-refs-pickle", action="store_true", help="read a refs pickle that names Python globals (see ReferConfig.trust_pickle)")
    check = commands.add_parser("check", help="check every row of a manifest and decode every image and target")
    check.add_argument("manifest")
    check.add_argument("--root", help="folder relative paths resolve against (default: the manifest's folder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            first = SPLITS.get((args.dataset, args.split_by or DEFAULT_SPLIT_BY[args.dataset]), ("val",))[0]  # ignored: convert reads every split
            config = ReferConfig(args.data_root, args.dataset, first, split_by=args.split_by, image_root=args.image_root,
                                 text_key=args.text_key, trust_pickle=args.trust_refs_pickle)
            counts = convert_refer(config, args.output, args.splits, relative=not args.absolute)
            verb = "wrote"
        else:
            counts = check_manifest(args.manifest, args.root)
            verb = "checked"
    except (ValueError, OSError, ImportError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    total = Counter()
    for split, c in counts.items():
        print(f"{split}: {c.refs} referents, {c.sentences} expressions")
        total.update(c._asdict())
    print(f"{verb} {args.output if args.command == 'convert' else args.manifest}: {total['sentences']} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
