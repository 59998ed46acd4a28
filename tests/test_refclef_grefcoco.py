"""RefClef and gRefCOCO through ReferDataset, from fixtures written in their real formats (tests/test_refer.py):
RefClef's refs(berkeley).p / refs(unc).p over SAIAPR TC-12 folders with lists of RLEs; gRefCOCO's
grefs(unc).json with ann_id lists, [-1] for no target, crowd annotations left out of the merge. Then gRefCOCO
trained and evaluated end to end with the GRES metrics."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

from masksd.data import SPLIT_COUNTS, SPLITS, Frame, ReferConfig, ReferDataset, collate
from masksd.data.refer import decode_segmentation, target_ann_ids
from masksd.metrics import NO_TARGET_KEYS, RISMetrics
from tests.test_refer import (
    BERKELEY_REFS, CLEF_IMAGES, CLEF_UNC_REFS, GREFS, IMAGES, clef_folder, clef_masks, compressed_rle, drawn_masks, gref_mask,
    root,  # noqa: F401  (the refer-format fixture, every dataset)
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def copy_root(root, tmp_path):  # noqa: F811
    shutil.copytree(root, tmp_path / "root")
    return tmp_path / "root"


# ---- RefClef ---------------------------------------------------------------------------------

@pytest.mark.parametrize("split_by,split,refs", [
    *[("berkeley", s, BERKELEY_REFS) for s in ("train", "val", "test")],
    *[("unc", s, CLEF_UNC_REFS) for s in ("train", "val", "testA", "testB", "testC")],
])
def test_refclef_reads_every_split_with_saiapr_folders_and_merged_rle_lists(root, split_by, split, refs):  # noqa: F811
    ds = ReferDataset(ReferConfig(str(root), "refclef", split, split_by=split_by, image_size=24, mode="eval"))
    expected = [(r["ref_id"], s["raw"]) for r in refs if r["split"] == split for s in r["sentences"]]
    assert [(ds.describe(i)["ref_id"], ds[i]["text"]) for i in range(len(ds))] == expected
    for i in range(len(ds)):
        info, sample = ds.describe(i), ds[i]
        image_id, drawn, _ = clef_masks()[info["ann_id"]]
        assert np.array_equal(sample["target"], drawn) and sample["target"].any()
        assert info["image_path"] == str(root / "images" / "saiapr_tc-12" / clef_folder(image_id))
        assert sample["frame"] == Frame.fit(*CLEF_IMAGES[image_id], 24, "letterbox") and not info["no_target"]


def test_refclef_defaults_to_berkeley_and_the_saiapr_folder_and_checks_no_unverified_count(root, tmp_path):  # noqa: F811
    config = ReferConfig(str(root), "refclef", "test")
    assert (config.split_by, config.image_root) == ("berkeley", str(root / "images" / "saiapr_tc-12"))
    assert config.refs_path == str(root / "refclef" / "refs(berkeley).p")
    assert SPLITS[("refclef", "berkeley")] == ("train", "val", "test")
    assert all(SPLIT_COUNTS[("refclef", "berkeley", s)] is None for s in ("train", "val", "test"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check_counts is on, but there is no verified count to differ from
        assert ReferDataset(config).counts() == (1, 1)
    # a file_name that names its folder is taken as given; a missing image names the SAIAPR path expected
    r = copy_root(root, tmp_path)
    (r / "images" / "saiapr_tc-12" / clef_folder(7)).unlink()
    with pytest.raises(FileNotFoundError, match=r"image for image_id 7 not found: .*saiapr_tc-12/00/images/7\.jpg"):
        ReferDataset(ReferConfig(str(r), "refclef", "test"))[0]
    instances = json.loads((r / "refclef" / "instances.json").read_text())
    for image in instances["images"]:
        image["file_name"] = clef_folder(image["id"])
    (r / "refclef" / "instances.json").write_text(json.dumps(instances))
    ds = ReferDataset(ReferConfig(str(r), "refclef", "val"))
    assert ds.image_path(25008) == str(r / "images" / "saiapr_tc-12" / "25" / "images" / "25008.jpg")


def test_a_list_of_rles_decodes_to_their_union_and_bad_parts_are_named():
    image_id, drawn, segmentation = clef_masks()[202]
    h, w = CLEF_IMAGES[image_id]
    assert len(segmentation) == 2 and np.array_equal(decode_segmentation(segmentation, h, w), drawn)
    bad = [segmentation[0], {"size": [h + 1, w], "counts": segmentation[1]["counts"]}]
    with pytest.raises(ValueError, match=r"RLE part 1: RLE size \[37, 48\] does not match"):
        decode_segmentation(bad, h, w)
    with pytest.raises(ValueError, match="mixes polygons and RLE dicts"):
        decode_segmentation([[0, 0, 5, 0, 5, 5], segmentation[0]], h, w)


# ---- gRefCOCO --------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_grefcoco_merges_several_targets_and_gives_no_target_refs_an_empty_mask(root, split):  # noqa: F811
    ds = ReferDataset(ReferConfig(str(root), "grefcoco", split, image_size=32, mode="eval"))
    refs = {r["ref_id"]: r for r in GREFS if r["split"] == split}
    assert [ds.describe(i)["ref_id"] for i in range(len(ds))] == [r for r, ref in refs.items() for _ in ref["sentences"]]
    for i in range(len(ds)):
        info, sample = ds.describe(i), ds[i]
        ref = refs[info["ref_id"]]
        assert np.array_equal(sample["target"], gref_mask(ref))
        assert sample["target"].shape == IMAGES[ref["image_id"]]
        assert info["no_target"] == (ref["ann_id"] == [-1]) == (not sample["target"].any()) == (sample["mask"].sum() == 0)
    if split == "train":  # the multi-target ref is the union of its two annotations; the crowd one is left out
        masks = drawn_masks()
        assert np.array_equal(ds[0]["target"], masks[101][1] | masks[102][1])
        assert np.array_equal(ds[len(ds) - 1]["target"], masks[103][1]) and not masks[104][1][~masks[103][1]].all()
    assert ReferConfig(str(root), "grefcoco", split).refs_path == str(root / "grefcoco" / "grefs(unc).json")


def test_grefcoco_targets_batch_and_score_the_gres_metrics(root):  # noqa: F811
    ds = ReferDataset(ReferConfig(str(root), "grefcoco", "val", image_size=32))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["mask"].shape == (3, 1, 32, 32) and batch["mask"][1].sum() == 0  # ref 35: no target
    metrics = RISMetrics()
    empty = [np.zeros_like(t) for t in batch["target"]]
    metrics.update(batch["target"], batch["target"])  # perfect: every target found, the empty one predicted empty
    metrics.update(empty, batch["target"])  # nothing predicted: only the no-target sample is right
    result = metrics.compute()
    assert set(NO_TARGET_KEYS) <= result.keys()
    assert (result["N-acc"], result["T-acc"], result["samples"]) == (100.0, 50.0, 6)
    assert result["gIoU"] == pytest.approx(100 * 4 / 6)  # 3 perfect, then 1 of 3


@pytest.mark.parametrize("change,message", [
    (lambda refs: refs[1].update(no_target=False), r"ref #1 in .*grefs\(unc\)\.json: no_target is False but ann_id is \[-1\]"),
    (lambda refs: refs[0].update(no_target=True), r"ref #0 .*: no_target is True but ann_id is \[101, 102\]"),
    (lambda refs: refs[0].update(ann_id=[101, -1]), r"ref #0 .*: ann_id \[101, -1\] mixes -1"),
    (lambda refs: refs[0].update(ann_id=[]), r"ref #0 .*: ann_id must be a non-empty list of ints"),
    (lambda refs: refs[0].update(ann_id=[101, 101]), r"ref #0 .*: ann_id \[101, 101\] lists an annotation twice"),
    (lambda refs: refs[0].update(ann_id=[101, "102"]), r"ref #0 .*: ann_id must be a non-empty list of ints"),
    (lambda refs: refs[0].update(ann_id=[101, 999]), r"ref_id 31 points to ann_id 999, which is not in .*grefcoco/instances\.json"),
    (lambda refs: refs[0].update(ann_id=[101, 103]), r"ref_id 31 .* has image_id 1, but its ann_id 103 has image_id 2"),
    (lambda refs: refs[2].update(ann_id=[104]), r"ref_id 33 .* refers to crowd annotations only"),
])
def test_grefcoco_refuses_inconsistent_targets_by_name(root, tmp_path, change, message):  # noqa: F811
    r = copy_root(root, tmp_path)
    refs = json.loads((r / "grefcoco" / "grefs(unc).json").read_text())
    change(refs)
    (r / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(ValueError, match=message):
        ReferDataset(ReferConfig(str(r), "grefcoco", "train"))


def test_an_ann_id_list_is_grefcocos_only_and_its_refs_are_json(root, tmp_path):  # noqa: F811
    r = copy_root(root, tmp_path)
    with open(r / "refcoco" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    refs[0]["ann_id"] = [101]
    with open(r / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(ValueError, match=r"ref #0 in .*refs\(unc\)\.p: ann_id must be an int, got \[101\]"):
        ReferDataset(ReferConfig(str(r), "refcoco", "train", check_counts=False))
    (r / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*grefs\(unc\)\.json \(expected .*<root>/grefcoco/grefs\(unc\)\.json\)"):
        ReferDataset(ReferConfig(str(r), "grefcoco", "val"))
    assert target_ann_ids({"ann_id": [-1]}, multi_target=True) == target_ann_ids({"ann_id": -1}, multi_target=True) == []
    assert target_ann_ids({"ann_id": -1}, multi_target=False) == [-1] and target_ann_ids({"ann_id": 7}, multi_target=False) == [7]


# ---- gRefCOCO end to end: training with empty targets, evaluation with the GRES metrics -------------

@pytest.fixture(scope="module")
def grefcoco_run(root, tmp_path_factory):  # noqa: F811
    from examples.pipeline.trainer import train
    from tests.test_training import tiny

    out = tmp_path_factory.mktemp("grefcoco_run")
    cfg = tiny(out, dataset="grefcoco", data_root=str(root), batch_size=2, epochs=2, warmup_epochs=0.5, overlays=1)
    return out, train(cfg)


def test_grefcoco_trains_with_no_target_expressions_and_reports_the_gres_metrics(grefcoco_run):
    from tests.test_training import read_log

    out, result = grefcoco_run
    log = read_log(out / "train_log.csv")
    assert result.steps == 2 and len(log) == 2  # 3 train refs (one with no target) in batches of 2, twice
    assert all(np.isfinite([row["loss"], row["seg"], row["lmvsd"], row["vmlsd"]]).all() for row in log.values())
    report = json.loads((out / "eval_val.json").read_text())
    assert set(NO_TARGET_KEYS) <= set(result.metrics) and set(NO_TARGET_KEYS) <= set(report)
    assert report["samples"] == 3 and all(np.isfinite(report[k]) for k in NO_TARGET_KEYS)
    # the guidance diagnostics count target samples only: the no-target sample has no patch to find
    assert result.guidance["lmvsd_samples"] == 2 and np.isfinite(result.guidance["lmvsd_auc"])


def test_evaluate_script_reports_the_gres_metrics_on_grefcoco(grefcoco_run, root, tmp_path):  # noqa: F811
    from examples.evaluate import main as evaluate_main

    out, _ = grefcoco_run
    report = evaluate_main(["--checkpoint", str(out / "last.pt"), "--dataset", "grefcoco", "--data-root", str(root),
                            "--split", "testB", "--workers", "0", "--no-progress", "--output", str(tmp_path / "g.json")])
    assert (report["dataset"], report["split_by"], report["split"], report["refs"], report["samples"]) == ("grefcoco", "unc", "testB", 2, 2)
    assert set(NO_TARGET_KEYS) <= set(report)
    report = evaluate_main(["--checkpoint", str(out / "last.pt"), "--dataset", "refclef", "--data-root", str(root),
                            "--split", "val", "--workers", "0", "--no-progress", "--output", str(tmp_path / "c.json")])
    assert (report["split_by"], report["samples"]) == ("berkeley", 3) and "N-acc" not in report  # no empty target


def test_an_all_empty_ground_truth_gives_a_finite_loss_and_gradients():
    """What a no-target batch does to training: BCE against an all-zero mask is finite (a positive loss that
    pushes every logit down), in the main loss and, with ground-truth supervision, in the branch losses."""
    from dataclasses import replace

    from examples.cris import CRIS, CRISConfig
    from masksd import MaskSD, MaskSDConfig

    torch.manual_seed(0)
    segmenter = CRIS(CRISConfig.tiny(image_size=32))
    images = torch.randn(2, 3, 32, 32)
    tokens = segmenter.tokenize(["the zebra", "nothing here"])
    empty = torch.zeros(2, 1, 32, 32)
    for config in (MaskSDConfig(), replace(MaskSDConfig(), supervision="ground_truth")):
        model = MaskSD(segmenter, config).train()
        model.zero_grad()
        out = model(images, tokens, empty, generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(v) and v > 0 for v in (out.loss, out.seg_loss, out.lmvsd_loss, out.vmlsd_loss))
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert (out.image_masked.sum(dim=1) > 0).all()  # LMVSD masked patches: its guidance is the sentence's, not the mask's


def test_an_empty_or_constant_guidance_map_gives_a_defined_deterministic_ranking():
    """What guidance from a mask meets on a no-target sample: an empty mask (or a constant prediction) pools
    to a constant score per patch. The correlation filter must still keep ceil(K·n) patches, the same ones on
    every call: ties go to the lower index (a stable sort), in either direction, and no score is NaN. The
    guidance diagnostics count such a sample toward no patch mean (it has no target patch to find)."""
    import torch.nn.functional as F

    from masksd.correlation import CorrelationFilter
    from masksd.guidance import GuidanceMeter, patch_targets

    empty = torch.zeros(3, 1, 32, 32)
    pooled = F.avg_pool2d(empty, 8).flatten(1)  # (3, 16): what an empty mask pools to on a 4x4 patch grid
    undecided = torch.sigmoid(torch.zeros(3, 16))  # a constant prediction: 0.5 everywhere
    saturated = torch.sigmoid(torch.full((3, 16), -40.0))  # an all-background prediction, 4e-18 everywhere
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2, :4] = False  # padding is never chosen
    for scores in (pooled, undecided, saturated):
        assert torch.isfinite(scores).all()
        for direction in ("top", "bottom"):
            f = CorrelationFilter(0.5, direction)
            chosen = f.select_scores(scores, valid)
            assert torch.equal(chosen, f.select_scores(scores.clone(), valid))
            assert chosen.sum(dim=1).tolist() == [8, 8, 6]  # ceil(0.5 * 16), ceil(0.5 * 12)
            assert torch.equal(chosen[0], torch.arange(16) < 8)  # a tie keeps the lowest indices
            assert torch.equal(chosen[2], (torch.arange(16) >= 4) & (torch.arange(16) < 10))

    target = torch.zeros(2, 1, 32, 32)
    target[1, :, :16, :16] = 1  # one sample with a target (4 patches), one without
    meter = GuidanceMeter(0.5)
    meter.update_patches(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), patch_targets(target, (4, 4)))
    result = meter.compute()
    assert (result["lmvsd_samples"], result["lmvsd_auc_samples"]) == (1, 1)
    assert all(np.isfinite(v) for v in result.values())
