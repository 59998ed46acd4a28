import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from masksd.metrics import PRECISION_THRESHOLDS, RISMetrics, format_table, intersection_union, iou


def reference(preds, targets):
    """The metrics computed directly with numpy, one sample at a time, as percentages."""
    ious, inters, unions = [], [], []
    for p, t in zip(preds, targets):
        p, t = np.asarray(p, bool), np.asarray(t, bool)
        inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
        ious.append(1.0 if union == 0 else inter / union)
        inters.append(inter)
        unions.append(union)
    ious = np.array(ious)
    out = {"mIoU": 100 * ious.mean(), "oIoU": 100 * sum(inters) / sum(unions)}
    for x in PRECISION_THRESHOLDS:
        out[f"Prec@{x:g}"] = 100 * np.mean(ious > x)
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
