"""The manifest: your own images, masks and expressions, one JSON Lines or CSV row per expression. Every target
form, every refusal named by file, line and field, the refer converter, and the proof that a refer split and
its converted manifest train identically (same losses to the last bit, same weights)."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from masksd.data import ManifestConfig, ManifestDataset, ReferConfig, ReferDataset, read_manifest, read_mask
from masksd.data.manifest import MANIFEST_FIELDS, check_manifest, convert_refer, main as manifest_main
from masksd.data.refer import SplitCountWarning, draw_sentence
from tests.test_refer import compressed_rle, uncompressed_rle, write_refer_root

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

PARK, CAT = (40, 56), (30, 30)  # image sizes (height, width)


def drawn() -> dict[str, np.ndarray]:
    """The masks the fixture rows refer to, by name."""
    dog = np.zeros(PARK, bool)
    dog[10:30, 4:20] = True
    both = dog.copy()
    both[12:28, 30:50] = True  # the polygon [30, 12, 50, 12, 50, 28, 30, 28] fills rows 12..27, columns 30..49
    cat = np.zeros(CAT, bool)
    cat[5:25, 8:22] = True
    crowd = np.random.default_rng(1).random(CAT) < 0.4
    return {"dog": dog, "both": both, "cat": cat, "crowd": crowd, "none": np.zeros(CAT, bool)}


def manifest_rows() -> list[dict]:
    m = drawn()
    return [
        {"image": "images/park.png", "text": "the dog on the left", "split": "train", "mask": "masks/dog.png", "ref": "dog"},
        {"image": "images/park.png", "text": "the brown dog", "split": "train", "mask": "masks/dog.png", "ref": "dog", "id": "dog-2"},
        {"image": "images/park.png", "text": "both dogs", "split": "train", "polygons": [[4, 10, 20, 10, 20, 30, 4, 30], [30, 12, 50, 12, 50, 28, 30, 28]]},
        {"image": "images/cat.jpg", "text": "the cat", "split": "train", "rle": compressed_rle(m["cat"])},
        {"image": "images/cat.jpg", "text": "the zebra", "split": "train", "no_target": True},
        {"image": "images/cat.jpg", "text": "the speckles", "split": "val", "rle": uncompressed_rle(m["crowd"])},
        {"image": "images/cat.jpg", "text": "a unicorn", "split": "val", "no_target": True, "id": 7},
        {"image": "images/park.png", "text": "the left dog", "split": "val", "mask": "masks/dog_p.png"},
    ]


EXPECTED = ["dog", "dog", "both", "cat", "none", "crowd", "none", "dog"]  # the mask each row refers to


def write_manifest_folder(folder):
    """Images, masks (an 8-bit grey PNG of 0/255 and a palette PNG of indices 0/1) and manifest.jsonl /
    manifest.csv holding :func:`manifest_rows` under ``folder``."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*PARK, 3), dtype=np.uint8)).save(folder / "images" / "park.png")
    Image.fromarray(rng.integers(0, 256, (*CAT, 3), dtype=np.uint8)).save(folder / "images" / "cat.jpg", quality=95)
    m = drawn()
    Image.fromarray(m["dog"].astype(np.uint8) * 255).save(folder / "masks" / "dog.png")
    palette = Image.fromarray(m["dog"].astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(folder / "masks" / "dog_p.png")
    rows = manifest_rows()
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + "\n" + "".join(json.dumps(r) + "\n" for r in rows[4:]))
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for r in rows:
            writer.writerow([json.dumps(r[k]) if k in ("polygons", "rle") and k in r else str(r[k]).lower() if k == "no_target" and k in r
                             else r.get(k, "") for k in MANIFEST_FIELDS])
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_manifest_folder(tmp_path_factory.mktemp("mine"))


@pytest.mark.parametrize("name", ["manifest.jsonl", "manifest.csv"])
def test_every_target_form_loads_as_the_drawn_mask(folder, name):
    masks = drawn()
    seen = []
    for split in ("train", "val"):
        ds = ManifestDataset(ManifestConfig(str(folder / name), split, image_size=32, mode="eval"))
        for i in range(len(ds)):
            sample, info = ds[i], ds.describe(i)
            seen.append((info["line"], info["id"], sample["text"]))
            expected = masks[EXPECTED[[r["text"] for r in manifest_rows()].index(sample["text"])]]
            assert sample["target"].dtype == bool and np.array_equal(sample["target"], expected)
            assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
            assert info["no_target"] == (not expected.any())
            assert info["image_path"] == str(folder / ("images/park.png" if expected.shape == PARK else "images/cat.jpg"))
    texts = [r["text"] for r in manifest_rows()]
    assert [t for _, _, t in seen] == texts  # eval: every row, referent by referent, in file order
    if name.endswith(".jsonl"):  # line numbers count the blank line; ids default to them
        assert [(line, ident) for line, ident, _ in seen][:6] == [(1, "1"), (2, "dog-2"), (3, "3"), (4, "4"), (6, "6"), (7, "7")]


def test_train_mode_draws_one_expression_per_referent_as_the_refer_loader_does(folder):
    ds = ManifestDataset(ManifestConfig(str(folder / "manifest.jsonl"), "train", image_size=16, seed=3))
    assert ds.config.mode == "train" and len(ds) == 4 and ds.counts() == (4, 5)  # "dog" has two rows
    for epoch in range(6):
        ds.set_epoch(epoch)
        expected = ["the dog on the left", "the brown dog"][draw_sentence(3, epoch, 0, 2)]
        assert ds[0]["text"] == expected and ds[1]["text"] == "both dogs"
    drawn_texts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        drawn_texts.add(ds.row(0).text)
    assert drawn_texts == {"the dog on the left", "the brown dog"}  # both of the referent's expressions over 8 epochs


def test_relative_paths_resolve_against_root(folder, tmp_path):
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(folder / "manifest.jsonl", moved)
    with pytest.raises(FileNotFoundError, match=rf"{moved}:1: field 'image': file not found: {tmp_path}/images/park\.png"):
        ManifestDataset(ManifestConfig(str(moved), "train"))
    ds = ManifestDataset(ManifestConfig(str(moved), "train", root=str(folder), image_size=16))
    assert ds.describe(1)["image_path"] == str(folder / "images" / "park.png")


def test_mask_files_are_read_as_binary_and_anything_else_is_refused(tmp_path):
    mask = np.zeros((6, 5), bool)
    mask[1:4, 2:] = True
    forms = {
        "grey.png": Image.fromarray(mask.astype(np.uint8) * 255),
        "one.png": Image.fromarray(mask.astype(np.uint8) * 255).convert("1"),
        "ones.png": Image.fromarray(mask.astype(np.uint8)),
        "rgb.png": Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 200, 3, axis=2)),
        "rgba.png": Image.fromarray(np.concatenate([np.repeat(mask[..., None].astype(np.uint8) * 9, 3, axis=2),
                                                    np.full((6, 5, 1), 128, np.uint8)], axis=2)),
        "16bit.png": Image.fromarray(mask.astype(np.uint16) * 65535),
    }
    for name, image in forms.items():
        image.save(tmp_path / name)
        assert np.array_equal(read_mask(tmp_path / name), mask), name
    Image.new("L", (5, 6), 0).save(tmp_path / "empty.png")
    assert not read_mask(tmp_path / "empty.png").any()
    soft = (mask * 255).astype(np.uint8)
    soft[0, 0] = 128
    Image.fromarray(soft).save(tmp_path / "soft.png")
    colour = np.zeros((6, 5, 3), np.uint8)
    colour[mask] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "lossy.jpg", quality=20)
    for name, message in [("soft.png", r"not binary: it holds 3 pixel values \(0, 128, 255\)"),
                          ("colour.png", r"is a colour image \(mode RGB, channels differ\)"),
                          ("lossy.jpg", "not binary"), ("missing.png", "mask not found")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            read_mask(tmp_path / name)


# ---- refusals: file, line and field --------------------------------------------------------------

def rewrite(folder, tmp_path, change, name="manifest.jsonl"):
    """A copy of the fixture folder whose manifest rows went through ``change(rows)``."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    rows = manifest_rows()
    change(rows)
    (copy / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return copy / name


@pytest.mark.parametrize("change,error", [
    (lambda rows: rows[2].update(maks="masks/dog.png"), r":3: field 'maks': is not a manifest field"),
    (lambda rows: rows[0].pop("image"), r":1: field 'image': is missing"),
    (lambda rows: rows[1].update(text="  "), r":2: field 'text': must be a non-blank string"),
    (lambda rows: rows[3].update(split=None), r":4: field 'split': must be a non-blank string"),
    (lambda rows: rows[3].update(mask="masks/dog.png"), r":4: field 'rle': a row has one target, got mask and rle"),
    (lambda rows: rows[3].pop("rle"), r":4: field 'mask': the row has no target"),
    (lambda rows: rows[4].update(no_target="yes"), r":5: field 'no_target': must be true or false"),
    (lambda rows: rows[2].update(polygons=[1, 2, 3, 4, 5, 6]), r":3: field 'polygons': must be a non-empty list of \["),
    (lambda rows: rows[3].update(rle={"counts": "abc"}), r":4: field 'rle': must be a COCO RLE dict"),
    (lambda rows: rows[0].update(mask=""), r":1: field 'mask': must be the path of a mask file"),
    (lambda rows: rows[2].update(ref=True), r":3: field 'ref': must be a non-blank string or an int"),
    (lambda rows: rows[2].update(id="dog-2"), r":3: field 'id': 'dog-2' is also the id of line 2"),
    (lambda rows: rows[1].update(image="images/cat.jpg"), r":2: field 'image': ref 'dog' has image .*park\.png' on line 1"),
    (lambda rows: rows[1].update(split="val"), r":2: field 'split': ref 'dog' has split 'train' on line 1 and 'val' here"),
    (lambda rows: rows.insert(2, '{"image": "a.png", "text": "x"'), r":3: not a JSON object"),
    (lambda rows: rows.insert(0, '["image", "text"]'), r":1: a row must be a JSON object of fields, got list"),
    (lambda rows: rows.clear(), r"manifest\.jsonl holds no rows"),
])
def test_a_bad_row_is_refused_naming_file_line_and_field(folder, tmp_path, change, error):
    path = rewrite(folder, tmp_path, change)
    with pytest.raises(ValueError, match=rf"{path}{error}" if error.startswith(":") else error):
        ManifestDataset(ManifestConfig(str(path), "train"))


@pytest.mark.parametrize("change,split,error", [
    (lambda rows: rows[2].update(image="images/gone.png"), "train", FileNotFoundError),
    (lambda rows: rows[0].update(mask="masks/gone.png"), "train", FileNotFoundError),
    (lambda rows: rows[2].update(polygons=[[4, 10, 20, 10, float("nan"), 30]]), "train", ValueError),
    (lambda rows: rows[3].update(rle=compressed_rle(np.zeros((31, 30), bool))), "train", ValueError),
    (lambda rows: rows[7].update(mask="masks/dog.png", image="images/cat.jpg"), "val", ValueError),
])
def test_a_bad_file_or_target_is_named_when_its_split_is_read(folder, tmp_path, change, split, error):
    path = rewrite(folder, tmp_path, change)
    line = next(i for i, (a, b) in enumerate(zip(manifest_rows(), [json.loads(x) for x in path.read_text().splitlines()]), 1) if a != b)
    with pytest.raises(error, match=rf"{path}:{line}: field '(image|mask|polygons|rle)'"):
        ds = ManifestDataset(ManifestConfig(str(path), split, image_size=16, mode="eval"))
        [ds[i] for i in range(len(ds))]


def test_csv_errors_name_the_line_and_the_split_must_exist(folder, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("image,text,split,mask,colour\n")
    with pytest.raises(ValueError, match=rf"{path}:1: field 'colour' is not a manifest field"):
        read_manifest(path)
    path.write_text("image,text,split,no_target\nimages/cat.jpg,a cat,val,true\nimages/cat.jpg,a dog,val\n")
    with pytest.raises(ValueError, match=rf"{path}:3: the row has 3 cells, the header 4"):
        read_manifest(path)
    path.write_text('image,text,split,polygons\nimages/cat.jpg,a cat,val,"[[1, 2,"\n')
    with pytest.raises(ValueError, match=rf"{path}:2: field 'polygons': the cell must hold JSON"):
        read_manifest(path)
    with pytest.raises(ValueError, match=r"no rows with split 'test' in .*manifest\.jsonl; the manifest has splits \['train', 'val'\]"):
        ManifestDataset(ManifestConfig(str(folder / "manifest.jsonl"), "test"))
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    assert [r.target for r in read_manifest(folder / "manifest.csv")] == [r.target for r in read_manifest(folder / "manifest.jsonl")]


# ---- the converter and the checker --------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["refcoco", "refcocog", "refclef", "grefcoco"])
def test_a_converted_refer_dataset_gives_the_same_items(tmp_path, dataset):
    root = write_refer_root(tmp_path / "data")
    output = tmp_path / f"{dataset}.jsonl"
    counts = convert_refer(ReferConfig(str(root), dataset, check_counts=False), str(output))
    for split, count in counts.items():
        for mode in ("train", "eval"):
            a = ReferDataset(ReferConfig(str(root), dataset, split, image_size=24, mode=mode, check_counts=False))
            b = ManifestDataset(ManifestConfig(str(output), split, image_size=24, mode=mode))
            assert len(a) == len(b) and a.counts() == b.counts() == count
            for epoch in (0, 1, 2):
                a.set_epoch(epoch), b.set_epoch(epoch)
                for i in range(len(a)):
                    x, y = a[i], b[i]
                    assert x["text"] == y["text"] and x["frame"] == y["frame"] and np.array_equal(x["target"], y["target"])
                    assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert not json.loads(output.read_text().splitlines()[0])["image"].startswith("/")  # relative to the manifest
    with pytest.raises(FileExistsError, match="does not replace a manifest"):
        convert_refer(ReferConfig(str(root), dataset, check_counts=False), str(output))


def test_the_command_line_converts_and_checks_and_names_errors(tmp_path, folder, capsys):
    root = write_refer_root(tmp_path / "data")
    out = tmp_path / "refclef.jsonl"
    assert manifest_main(["convert", "--data-root", str(root), "--dataset", "refclef", "--splits", "train", "test",
                          "--text-key", "sent", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train: 2 referents, 3 expressions" in printed and "test: 1 referents, 1 expressions" in printed
    assert {json.loads(line)["split"] for line in out.read_text().splitlines()} == {"train", "test"}
    assert manifest_main(["check", str(out)]) == 0 and "checked" in capsys.readouterr().out
    assert check_manifest(str(folder / "manifest.csv")) == {"train": (4, 5), "val": (3, 3)}
    assert manifest_main(["convert", "--data-root", str(root), "--dataset", "refcoco", "--splits", "testC", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "split 'testC' is not one of refcoco/unc's" in capsys.readouterr().err
    bad = rewrite(folder, tmp_path, lambda rows: rows[5].update(rle=compressed_rle(np.zeros((3, 3), bool))))
    assert manifest_main(["check", str(bad)]) == 2
    assert f"{bad}:6: field 'rle'" in capsys.readouterr().err


# ---- training, evaluation and prediction ---------------------------------------------------------

@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """The refcoco fixture trained for 3 steps twice: from its refs, and from the manifest it converts to."""
    from examples.pipeline.trainer import train
    from tests.test_training import tiny

    base = tmp_path_factory.mktemp("twins")
    root = write_refer_root(base / "data")
    manifest = base / "refcoco.jsonl"
    convert_refer(ReferConfig(str(root), "refcoco", check_counts=False), str(manifest))
    common = dict(batch_size=2, epochs=3, warmup_epochs=0.5, eval_untrained=False, eval_guidance=False, overlays=0, eval_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SplitCountWarning)  # the fixture's splits are tiny
        refer = train(tiny(base / "refer", dataset="refcoco", data_root=str(root), **common), evaluate_at_end=False)
    mine = train(tiny(base / "manifest", dataset="manifest", manifest=str(manifest), **common), evaluate_at_end=False)
    return base, manifest, refer, mine


def test_a_refer_split_and_its_converted_manifest_train_identically(twin_runs):
    from examples.pipeline.checkpoint import load_checkpoint

    base, _, refer, mine = twin_runs
    logs = [(base / name / "train_log.csv").read_text().splitlines() for name in ("refer", "manifest")]
    columns = logs[0][0].split(",")
    keep = [columns.index(c) for c in ("step", "epoch", "lr", "loss", "seg", "lmvsd", "vmlsd")]  # not the timings
    rows = [[[line.split(",")[k] for k in keep] for line in log[1:]] for log in logs]
    assert refer.steps == mine.steps == len(rows[0]) == 3
    assert rows[0] == rows[1]  # the losses as logged (repr of the float: every bit)
    a, b = (load_checkpoint(base / name / "last.pt")["model"] for name in ("refer", "manifest"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_and_predict_read_a_manifest(twin_runs, folder, tmp_path):
    from examples.evaluate import main as evaluate_main
    from examples.predict import main as predict_main

    base, manifest, _, _ = twin_runs
    checkpoint = str(base / "manifest" / "last.pt")
    report = evaluate_main(["--checkpoint", checkpoint, "--workers", "0", "--no-progress", "--output", str(tmp_path / "own.json")])
    assert (report["dataset"], report["split_by"], report["split"], report["refs"], report["samples"]) == ("manifest", None, "val", 1, 2)
    report = evaluate_main(["--checkpoint", checkpoint, "--manifest", str(folder / "manifest.csv"), "--split", "val", "--workers", "0",
                            "--no-progress", "--output", str(tmp_path / "other.json")])
    assert (report["sentences"], report["samples"]) == (3, 3) and "N-acc" in report  # a no-target row
    unlabelled = tmp_path / "to_predict.jsonl"
    unlabelled.write_text("".join(json.dumps({"image": str(folder / "images" / name), "text": text, "split": "new", "id": ident}) + "\n"
                                  for name, text, ident in [("park.png", "the dog", "a/1"), ("cat.jpg", "the cat", "a:1")]))
    predict_main(["--checkpoint", checkpoint, "--manifest", str(unlabelled), "--output-dir", str(tmp_path / "pred")])
    listed = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [(p["id"], p["line"], p["text"]) for p in listed] == [("a/1", 1, "the dog"), ("a:1", 2, "the cat")]
    for p, size in zip(listed, [PARK, CAT]):
        with Image.open(p["mask"]) as mask:
            assert mask.size == size[::-1]  # at the image's size
    assert sorted(x.name for x in (tmp_path / "pred").iterdir()) == [  # two ids that collide once made file-safe
        "a_1_line1_mask.png", "a_1_line1_overlay.png", "a_1_line2_mask.png", "a_1_line2_overlay.png", "predictions.jsonl"]


def test_the_training_config_names_a_missing_or_stray_manifest():
    from examples.pipeline.config import TrainConfig

    with pytest.raises(ValueError, match=r"dataset 'manifest' needs a manifest file: --manifest FILE"):
        TrainConfig(dataset="manifest")
    with pytest.raises(ValueError, match=r"manifest 'x\.jsonl' is read only with --dataset manifest, got dataset 'synthetic'"):
        TrainConfig(manifest="x.jsonl")
    with pytest.raises(ValueError, match=r"split_by is a refer partition; dataset 'manifest' has none"):
        TrainConfig(dataset="manifest", manifest="x.jsonl", split_by="unc")
    assert (TrainConfig(dataset="grefcoco").split_by, TrainConfig(dataset="refclef").split_by) == ("unc", "berkeley")


def test_the_docs_recipe_turns_a_folder_of_images_and_masks_into_a_manifest(tmp_path, monkeypatch):
    """docs/data.md's <!-- manifest-folder --> block, run on such a folder: one row per expression, a referent per
    mask, every tenth referent in val; the manifest it writes loads with every mask where it was drawn."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = re.search(r"<!-- manifest-folder -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/data.md lost its manifest-folder block"
    folder = tmp_path / "my_data"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    drawn_masks = {}
    for k in range(11):  # 11 referents over 4 images
        image = f"img{k % 4}"
        if k < 4:
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / "images" / f"{image}.jpg")
        mask = np.zeros((24, 32), bool)
        mask[k:k + 8, 2 * k:2 * k + 10] = True
        drawn_masks[f"{image}_obj{k:02d}"] = mask
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{image}_obj{k:02d}.png")
        (folder / "masks" / f"{image}_obj{k:02d}.txt").write_text(f"object {k}\n\nthing number {k}\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "docs/data.md (manifest-folder)", "exec"), {"__name__": "docs_manifest"})
    rows = read_manifest(folder / "manifest.jsonl")
    assert len(rows) == 22 and [r.text for r in rows[:2]] == ["object 0", "thing number 0"]  # the blank line is skipped
    assert {r.ref for r in rows if r.split == "val"} == {sorted(drawn_masks)[9]}  # the tenth mask file in name order
    for split, count in (("train", (10, 20)), ("val", (1, 2))):
        ds = ManifestDataset(ManifestConfig(str(folder / "manifest.jsonl"), split, image_size=16, mode="eval"))
        assert ds.counts() == count
        for i in range(len(ds)):
            row = ds.row(i)
            assert row.image == str(folder / "images" / (row.ref.rsplit("_", 1)[0] + ".jpg"))
            assert np.array_equal(ds[i]["target"], drawn_masks[row.ref])
