"""The training pipeline end to end on the tiny model: the main job, exact resume (after a kill: see
tests/test_faults.py), two-process DDP, evaluate.py and predict.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.pipeline.checkpoint import load_checkpoint
from examples.pipeline.config import TrainConfig
from examples.pipeline.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(output: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        synthetic_train_size=64, synthetic_eval_size=16, batch_size=8, epochs=2, warmup_epochs=0.5,
        workers=0, log_every=1, progress=False, overlays=2, output=str(output),
    )
    return replace(base, **overrides)


def read_log(path: Path) -> dict[int, dict[str, float]]:
    with open(path, newline="") as f:
        return {int(row["step"]): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def losses(log: dict[int, dict[str, float]]) -> dict[int, tuple[float, ...]]:
    return {step: (row["loss"], row["seg"], row["lmvsd"], row["vmlsd"]) for step, row in log.items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("main_job")
    result = train(tiny(out, epochs=3))
    return out, result


def test_main_job_lowers_the_loss_and_writes_checkpoint_log_metrics_and_overlays(finished_run):
    out, result = finished_run
    assert result.steps == 24
    log = read_log(out / "train_log.csv")
    assert sorted(log) == list(range(1, 25))
    first, last = np.mean([log[s]["seg"] for s in (1, 2, 3)]), np.mean([log[s]["seg"] for s in (22, 23, 24)])
    assert last < 0.5 * first, (first, last)
    assert all(np.isfinite(row["lmvsd"]) and np.isfinite(row["vmlsd"]) for row in log.values())

    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 24
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config", "cris_config"}
    assert "branches.lmvsd.masker.mask_token" in checkpoint["model"]

    report = json.loads((out / "eval_val.json").read_text())
    assert report["samples"] == 16 and report == {**report, **result.metrics}
    assert set(result.metrics) >= {"mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9"}
    for i in range(2):
        with Image.open(out / f"overlay_{i:02d}.png") as im:
            assert im.width > 4 * 64 and im.height > 64  # four panels side by side, caption below
    assert not (out / "overlay_02.png").exists()


def test_resume_continues_exactly(tmp_path):
    uninterrupted = train(tiny(tmp_path / "a"), evaluate_at_end=False)
    stopped = train(tiny(tmp_path / "b", max_steps=5), evaluate_at_end=False)
    assert stopped.steps == 5 and load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 5
    resumed = train(tiny(tmp_path / "b", resume="auto"), evaluate_at_end=False)
    assert resumed.steps == uninterrupted.steps == 16
    assert losses(read_log(tmp_path / "b" / "train_log.csv")) == losses(read_log(tmp_path / "a" / "train_log.csv"))
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


# Resuming after kill -9 (inside a checkpoint write), SIGTERM and Ctrl-C: tests/test_faults.py.


DDP_SCRIPT = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_training import tiny
from examples.pipeline.trainer import train
torch.set_num_threads(1)
result = train(tiny(Path({out!r}), epochs=1, overlays=0))
params = {{k: v.detach() for k, v in result.model.named_parameters()}}
torch.save({{"params": params, "metrics": result.metrics}}, Path({out!r}) / f"rank{{os.environ['RANK']}}.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_run_keeps_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "run")))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["samples"] == 16  # each item once
    log = read_log(tmp_path / "run" / "train_log.csv")
    assert sorted(log) == list(range(1, 9))  # 64 samples / global batch 8, logged once (rank 0)


def test_evaluate_script_reproduces_the_runs_metrics_and_writes_json(finished_run, tmp_path):
    from examples.evaluate import main as evaluate_main

    out, result = finished_run
    report = evaluate_main(["--checkpoint", str(out / "last.pt"), "--split", "val", "--workers", "0",
                            "--no-progress", "--output", str(tmp_path / "val.json")])
    assert {k: report[k] for k in result.metrics} == pytest.approx(result.metrics)
    assert json.loads((tmp_path / "val.json").read_text())["split"] == "val"
    other = evaluate_main(["--checkpoint", str(out / "last.pt"), "--split", "compositional", "--workers", "0", "--no-progress"])
    assert other["split"] == "compositional" and (out / "eval_synthetic_compositional.json").is_file()


def test_evaluate_script_names_a_missing_checkpoint(tmp_path):
    from examples.evaluate import main as evaluate_main

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evaluate_main(["--checkpoint", str(tmp_path / "nope.pt")])


def test_predict_script_writes_a_mask_at_the_image_size(finished_run, tmp_path):
    from examples.predict import main as predict_main

    out, _ = finished_run
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 80, 3), dtype=np.uint8)).save(image)
    mask_path, overlay_path = predict_main(["--checkpoint", str(out / "last.pt"), "--image", str(image),
                                            "--text", "the red circle", "--output-dir", str(tmp_path / "pred")])
    with Image.open(mask_path) as mask, Image.open(overlay_path) as overlay:
        assert mask.size == overlay.size == (80, 45)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def test_predict_script_rejects_bad_input_by_name(finished_run, tmp_path, capsys):
    from examples.predict import main as predict_main

    out, _ = finished_run
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    for argv, message in [
        (["--image", str(tmp_path / "missing.png"), "--text", "a dog"], "missing.png"),
        (["--image", str(corrupt), "--text", "a dog"], "corrupt.jpg"),
        (["--image", str(corrupt), "--text", "  "], "--text"),
    ]:
        with pytest.raises(SystemExit):
            predict_main(["--checkpoint", str(out / "last.pt"), *argv])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_paths_train_with_finite_losses(tmp_path, amp):
    result = train(tiny(tmp_path, amp=amp, epochs=1, max_steps=3, eval_untrained=False, overlays=1))
    log = read_log(tmp_path / "train_log.csv")
    assert sorted(log) == [1, 2, 3] and all(np.isfinite(v) for row in log.values() for v in row.values())
    assert result.model.branches["lmvsd"].masker.mask_token.dtype == torch.float32  # weights stay fp32
    assert np.isfinite(result.metrics["mIoU"])


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (not a dependency): records the scalars."""

    scalars: list = []

    def __init__(self, folder):
        self.folder = folder

    def add_scalar(self, tag, value, step):
        _FakeWriter.scalars.append((tag, value, step))

    def flush(self):
        pass


def test_validation_keeps_the_eval_log_the_best_checkpoint_and_tensorboard_scalars(tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    _FakeWriter.scalars = []
    train(tiny(tmp_path, eval_every=4, tensorboard=True, eval_untrained=False, overlays=0))  # 16 steps
    with open(tmp_path / "eval_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16]
    best_row = max(rows, key=lambda r: float(r["mIoU"]))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"] == {"value": float(best_row["mIoU"]), "step": int(best_row["step"])} and best["step"] == int(best_row["step"])
    assert load_checkpoint(tmp_path / "last.pt")["best"] == best["best"]  # a resumed run knows the best so far

    from examples.evaluate import main as evaluate_main

    report = evaluate_main(["--checkpoint", str(tmp_path / "best.pt"), "--workers", "0", "--no-progress"])
    assert report["mIoU"] == pytest.approx(float(best_row["mIoU"]))  # the same val scenes
    tags = {tag for tag, _, _ in _FakeWriter.scalars}
    assert {"train/loss", "train/lmvsd", "val/mIoU", "val/oIoU"} <= tags
    assert ("val/mIoU", float(best_row["mIoU"]), int(best_row["step"])) in _FakeWriter.scalars


def test_tensorboard_missing_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.warns(UserWarning, match="tensorboard"):
        train(tiny(tmp_path, tensorboard=True, max_steps=2, eval_untrained=False, overlays=0), evaluate_at_end=False)
    assert (tmp_path / "train_log.csv").is_file()


def test_the_final_evaluation_records_the_guidance_before_and_after(finished_run):
    out, result = finished_run
    report = json.loads((out / "eval_val.json").read_text())
    for key in ("guidance", "untrained_guidance"):
        assert {"lmvsd_auc", "lmvsd_kept", "lmvsd_kept_chance", "vmlsd_precision"} <= set(report[key]), key
        assert 0 <= report[key]["lmvsd_auc"] <= 1
    assert report["guidance"] == pytest.approx(result.guidance)


def test_distill_ramp_grows_the_branch_losses_from_zero(tmp_path):
    train(tiny(tmp_path, distill_ramp=0.5, epochs=1, eval_untrained=False, overlays=0), evaluate_at_end=False)  # 8 steps
    log = read_log(tmp_path / "train_log.csv")
    assert log[1]["lmvsd"] == 0 and log[1]["vmlsd"] == 0  # step 0 of a 4-step ramp
    assert log[2]["lmvsd"] > 0 and abs(log[1]["loss"] - log[1]["seg"]) < 1e-6


def test_generalisation_gap_scores_each_stored_run_on_its_training_scenes(finished_run, tmp_path, monkeypatch):
    import shutil

    from benchmarks import ablation
    from benchmarks import common
    from benchmarks import generalisation_gap
    from examples.pipeline.factory import load_segmenter

    out, _ = finished_run
    seed_dir = tmp_path / "work" / "t" / "CM-MaskSD" / "3"
    seed_dir.mkdir(parents=True)
    shutil.copy(out / "last.pt", seed_dir / "last.pt")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    generalisation_gap.main(["--work", str(tmp_path / "work"), "--tag", "t", "--rows", "CM-MaskSD", "--scenes", "8"])
    runs = json.loads((tmp_path / "generalisation_gap_t.json").read_text())["runs"]
    segmenter, _ = load_segmenter(out / "last.pt")
    segmenter.eval()
    expected = {"train": ablation.score(segmenter, "train", 8, seed=3)["mIoU"], "val": ablation.score(segmenter, "val", 8)["mIoU"]}
    assert list(runs) == ["CM-MaskSD"] and list(runs["CM-MaskSD"]) == ["3"]
    assert {k: runs["CM-MaskSD"]["3"][k] for k in expected} == pytest.approx(expected)  # train scenes from the run's seed
    with pytest.raises(SystemExit):
        generalisation_gap.main(["--work", str(tmp_path / "work"), "--tag", "t", "--rows", "baseline"])
    # more scenes than the run trained on (64): `train` is its 64 scenes alone; `test` on request
    generalisation_gap.main(["--work", str(tmp_path / "work"), "--tag", "t", "--rows", "CM-MaskSD", "--scenes", "80",
                             "--splits", "train", "test"])
    scores = json.loads((tmp_path / "generalisation_gap_t.json").read_text())["runs"]["CM-MaskSD"]["3"]
    assert scores == pytest.approx({"train": ablation.score(segmenter, "train", 64, seed=3)["mIoU"],
                                    "test": ablation.score(segmenter, "test", 80)["mIoU"]})
    assert "train − val" not in (tmp_path / "generalisation_gap_t.md").read_text()
    with pytest.raises(SystemExit):  # no best.pt: the run validated never
        generalisation_gap.main(["--work", str(tmp_path / "work"), "--tag", "t", "--rows", "CM-MaskSD", "--checkpoint", "best"])


def test_the_maskris_substitute_trains_logs_its_combined_loss_and_draws_input_patches(tmp_path):
    """--masksd-preset maskris --vmlsd-site embedding: pixel patches at the inputs, words by the mask token, one view."""
    from examples.train_cris_masksd import parse_args

    masksd = parse_args(["--masksd-preset", "maskris", "--vmlsd-site", "embedding"]).masksd
    train(tiny(tmp_path, masksd=masksd, epochs=1, max_steps=2, eval_untrained=False, eval_guidance=False, overlays=1))
    log = read_log(tmp_path / "train_log.csv")
    assert sorted(log) == [1, 2] and all(np.isfinite(row["combined"]) and np.isnan(row["lmvsd"]) for row in log.values())
    assert (tmp_path / "overlay_00.png").is_file()  # drawn on the 2x2 grid of 32-px pixel patches
