import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from masksd.metrics import NO_TARGET_KEYS, PRECISION_THRESHOLDS, RISMetrics, format_table, intersection_union, iou


def reference(preds, targets):
    """The metrics computed directly with numpy, one sample at a time, as percentages
    (with GRES's gIoU, cIoU, N-acc and T-acc when some target is empty)."""
    ious, inters, unions, empty_target, empty_pred = [], [], [], [], []
    for p, t in zip(preds, targets):
        p, t = np.asarray(p, bool), np.asarray(t, bool)
        inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
        ious.append(1.0 if union == 0 else inter / union)
        inters.append(inter)
        unions.append(union)
        empty_target.append(not t.any())
        empty_pred.append(not p.any())
    ious, empty_target, empty_pred = np.array(ious), np.array(empty_target), np.array(empty_pred)
    out = {"mIoU": 100 * ious.mean(), "oIoU": 100 * sum(inters) / sum(unions)}
    for x in PRECISION_THRESHOLDS:
        out[f"Prec@{x:g}"] = 100 * np.mean(ious > x)
    if empty_target.any():
        # GRES: a no-target sample scores IoU 1 if predicted empty, else 0; the rest as usual
        giou = np.where(empty_target, empty_pred.astype(float), ious)
        out["gIoU"] = 100 * giou.mean()
        out["cIoU"] = 100 * sum(inters) / sum(unions)
        out["N-acc"] = 100 * np.mean(empty_pred[empty_target])
        out["T-acc"] = 100 * np.mean(~empty_pred[~empty_target])
    out["samples"] = len(ious)
    return out, ious


def random_masks(n, h=12, w=10, seed=0):
    """Pairs with varied overlap, plus an empty prediction, an empty target and both empty."""
    rng = np.random.default_rng(seed)
    targets = rng.random((n, h, w)) < rng.uniform(0.1, 0.6, (n, 1, 1))
    flip = rng.random((n, h, w)) < rng.uniform(0.0, 0.5, (n, 1, 1))
    preds = targets ^ flip
    preds[0] = False  # empty prediction, non-empty target: IoU 0
    targets[1] = False  # empty target, non-empty prediction: IoU 0
    preds[2] = targets[2] = False  # both empty: IoU 1
    assert preds[1].any() and targets[0].any()
    return preds, targets


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_matches_numpy_including_empty_masks():
    preds, targets = random_masks(40)
    metrics = RISMetrics()
    ious = metrics.update(torch.from_numpy(preds), torch.from_numpy(targets))
    expected, expected_ious = reference(preds, targets)
    np.testing.assert_allclose(ious.numpy(), expected_ious)
    assert ious[0] == 0 and ious[1] == 0 and ious[2] == 1
    assert_close(metrics.compute(), expected)


def test_empty_mask_convention():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, full) == 0.0 and iou(full, empty) == 0.0
    m = RISMetrics()
    m.update([empty], [empty])
    assert m.compute()["oIoU"] == 100.0 and m.compute()["mIoU"] == 100.0


def test_precision_is_strictly_greater_than_the_threshold():
    p = np.zeros((1, 2, 2), bool)
    t = np.zeros((1, 2, 2), bool)
    p[0, 0, :] = True
    t[0, 0, 0] = True  # IoU exactly 0.5
    m = RISMetrics()
    m.update(p, t)
    out = m.compute()
    assert out["mIoU"] == 50.0 and out["Prec@0.5"] == 0.0


def test_batches_accumulate_like_one_big_batch_and_lists_of_sizes_work():
    preds, targets = random_masks(30, seed=3)
    whole = RISMetrics()
    whole.update(preds, targets)
    parts = RISMetrics()
    for lo, hi in [(0, 7), (7, 8), (8, 30)]:
        parts.update(torch.from_numpy(preds[lo:hi]), torch.from_numpy(targets[lo:hi]))
    assert_close(parts.compute(), whole.compute())

    # samples of different sizes, as evaluation at the original image size gives
    rng = np.random.default_rng(4)
    sizes = [(5, 7), (12, 3), (9, 9), (1, 1)]
    lp = [rng.random(s) > 0.5 for s in sizes]
    lt = [rng.random(s) > 0.5 for s in sizes]
    m = RISMetrics()
    m.update([torch.from_numpy(x) for x in lp], lt)
    assert_close(m.compute(), reference(lp, lt)[0])


def test_reset_and_bad_inputs():
    m = RISMetrics()
    with pytest.raises(ValueError, match="needs at least one sample"):
        m.compute()
    with pytest.raises(ValueError, match=r"pred must be bool \(threshold"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must both be \(B, H, W\), got pred \(1, 2, 2\) and target \(1, 2, 3\)"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pred\[1\] and target\[1\] must both be \(H, W\)"):
        m.update([np.zeros((2, 2), bool)] * 2, [np.zeros((2, 2), bool), np.zeros((3, 2), bool)])
    with pytest.raises(ValueError, match="as many masks, got 2 and 1"):
        m.update([np.zeros((2, 2), bool)] * 2, [np.zeros((2, 2), bool)])
    with pytest.raises(ValueError, match="thresholds must lie in"):
        RISMetrics(thresholds=(0.5, 1.5))
    m.update([np.ones((2, 2), bool)], [np.ones((2, 2), bool)])
    assert m.compute()["samples"] == 1
    m.reset()
    assert m.state.sum() == 0


def test_intersection_union_counts():
    p = np.array([[[1, 1, 0], [0, 0, 0]]], bool)
    t = np.array([[[0, 1, 1], [0, 0, 1]]], bool)
    inter, union = intersection_union(p, t)
    assert inter.tolist() == [1.0] and union.tolist() == [4.0]


def hand_case():
    """Five 2x2 samples, three of them with no target (empty ground truth):

    s0: target {(0,0), (0,1)}, pred {(0,0)}             -> I=1, U=2, IoU 0.5; target found (TN)
    s1: target {(1,1)},        pred empty               -> I=0, U=1, IoU 0;   target missed (FP)
    s2: no target,             pred empty               -> I=0, U=0, IoU 1;   TP
    s3: no target,             pred {(0,0), (1,0), (1,1)} -> I=0, U=3, IoU 0; FN
    s4: no target,             pred empty               -> I=0, U=0, IoU 1;   TP

    mIoU = gIoU = (0.5 + 0 + 1 + 0 + 1) / 5 = 50 %; oIoU = cIoU = (1 + 0 + 0 + 0 + 0) / (2 + 1 + 0 + 3 + 0)
    = 1/6 = 16.67 %; N-acc = TP / (TP + FN) = 2/3 = 66.67 %; T-acc = TN / (TN + FP) = 1/2 = 50 %;
    Prec@X = 2/5 = 40 % for every X in 0.5..0.9 (the two IoU-1 samples; 0.5 is not > 0.5).
    """
    target = np.zeros((5, 2, 2), bool)
    pred = np.zeros((5, 2, 2), bool)
    target[0, 0, :] = True
    pred[0, 0, 0] = True
    target[1, 1, 1] = True
    pred[3, 0, 0] = pred[3, 1, 0] = pred[3, 1, 1] = True
    return pred, target


def test_no_target_metrics_by_hand():
    pred, target = hand_case()
    m = RISMetrics()
    assert m.update(pred, target).tolist() == [0.5, 0.0, 1.0, 0.0, 1.0]
    out = m.compute()
    assert list(out) == ["mIoU", "oIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9", *NO_TARGET_KEYS, "samples"]
    assert out["mIoU"] == out["gIoU"] == pytest.approx(50.0)
    assert out["oIoU"] == out["cIoU"] == pytest.approx(100 / 6)
    assert out["N-acc"] == pytest.approx(200 / 3) and out["T-acc"] == pytest.approx(50.0)
    assert all(out[f"Prec@{x:g}"] == pytest.approx(40.0) for x in PRECISION_THRESHOLDS)
    assert out["samples"] == 5
    # the same samples as a list of masks, one at a time
    one_by_one = RISMetrics()
    for p, t in zip(pred, target):
        one_by_one.update([p], [t])
    assert_close(one_by_one.compute(), out)


def test_without_no_target_samples_the_keys_are_the_classic_ones():
    pred, target = hand_case()
    m = RISMetrics()
    m.update(pred[:2], target[:2])  # both have a target
    out = m.compute()
    assert list(out) == ["mIoU", "oIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9", "samples"]
    assert out["mIoU"] == pytest.approx(25.0) and out["oIoU"] == pytest.approx(100 / 3)


def test_only_no_target_samples_leave_t_acc_undefined():
    pred, target = hand_case()
    m = RISMetrics()
    m.update(pred[2:], target[2:])
    out = m.compute()
    assert out["N-acc"] == pytest.approx(200 / 3) and out["gIoU"] == pytest.approx(200 / 3)
    assert out["cIoU"] == 0.0 and np.isnan(out["T-acc"])


def test_format_table():
    a = {"mIoU": 70.456, "oIoU": 68.0, "Prec@0.5": 80.0, "samples": 10}
    table = format_table({"val": a, "testA": a})
    lines = table.splitlines()
    assert lines[0] == "| split | mIoU | oIoU | Prec@0.5 | samples |"
    assert lines[2] == "| val | 70.46 | 68.00 | 80.00 | 10 |"
    assert len(lines) == 4
    assert format_table(a).splitlines()[2] == "|  | 70.46 | 68.00 | 80.00 | 10 |"
    with pytest.raises(ValueError, match=r"results\['b'\] has columns"):
        format_table({"a": a, "b": {"mIoU": 1.0}})


def test_format_table_with_no_target_rows():
    pred, target = hand_case()
    g, plain = RISMetrics(thresholds=(0.5,)), RISMetrics(thresholds=(0.5,))
    g.update(pred, target)
    plain.update(pred[:2], target[:2])
    lines = format_table({"grefcoco val": g.compute(), "refcoco val": plain.compute()}, digits=1).splitlines()
    assert lines[0] == "| split | mIoU | oIoU | Prec@0.5 | gIoU | cIoU | N-acc | T-acc | samples |"
    assert lines[2] == "| grefcoco val | 50.0 | 16.7 | 40.0 | 50.0 | 16.7 | 66.7 | 50.0 | 5 |"
    assert lines[3] == "| refcoco val | 25.0 | 33.3 | 0.0 | - | - | - | - | 2 |"
    # a row may lack the no-target columns, not others
    broken = dict(g.compute())
    del broken["oIoU"]
    with pytest.raises(ValueError, match=r"results\['b'\] has columns"):
        format_table({"a": g.compute(), "b": broken})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        preds, targets = random_masks(25, seed=7)
        m = RISMetrics()
        # uneven shards: rank 0 sees 10 samples in two batches, rank 1 sees 15 as a list
        if rank == 0:
            m.update(preds[:4], targets[:4])
            m.update(preds[4:10], targets[4:10])
        else:
            m.update(list(preds[10:]), list(targets[10:]))
        local = m.state.clone()
        torch.save({"global": m.compute(), "local_after": m.state.clone(), "local_before": local}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_all_reduce_equals_one_rank_seeing_everything():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(2)]
    preds, targets = random_masks(25, seed=7)
    single = RISMetrics()
    single.update(preds, targets)
    for r in results:
        assert_close(r["global"], single.compute())
        assert torch.equal(r["local_after"], r["local_before"])  # compute() leaves the local sums alone
    assert results[0]["local_before"][0] == 10 and results[1]["local_before"][0] == 15
    # only rank 0 saw no-target samples (random_masks empties targets 1 and 2), yet both ranks report GRES's metrics
    assert results[0]["local_before"][4] == 2 and results[1]["local_before"][4] == 0
    for r in results:
        assert set(NO_TARGET_KEYS) <= r["global"].keys()
