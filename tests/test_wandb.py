"""--wandb: the run's config, losses, validation metrics, overlays and final results logged to W&B, in offline mode
(no network), read back from the run folder; a resumed run continues the same W&B run; training computes the same."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from examples.pipeline.config import TrainConfig  # noqa: E402
from examples.pipeline.trainer import train  # noqa: E402
from tests.wandb_records import OfflineRun  # noqa: E402


def tiny(output: Path, **overrides) -> TrainConfig:
    base = TrainConfig(synthetic_train_size=32, synthetic_eval_size=8, batch_size=8, epochs=2, warmup_epochs=0.5, workers=0,
                       log_every=1, progress=False, overlays=2, eval_every=4, eval_untrained=False, eval_guidance=False,
                       export=False, output=str(output))
    return replace(base, **overrides)


def rows(path: Path) -> dict[int, dict[str, float]]:
    with open(path, newline="") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no settings from the machine
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_the_flags_name_the_run(tmp_path):
    from examples.train_cris_masksd import parse_args

    cfg = parse_args(["--wandb", "--wandb-project", "ris", "--wandb-entity", "lab", "--wandb-run-name", "tiny-1"])
    assert (cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_run_name) == (True, "ris", "lab", "tiny-1")
    assert parse_args([]).wandb is False


def test_wandb_logs_config_losses_metrics_overlays_offline_and_a_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    named = dict(wandb=True, wandb_project="ris", wandb_entity="lab", wandb_run_name="tiny-1")
    train(tiny(out, max_steps=4, **named), evaluate_at_end=False)  # stopped at step 4 (of 8)
    result = train(tiny(out, resume="auto", **named))  # resumed to the end, then the final evaluation and overlays

    first, second = sorted((out / "wandb").glob("offline-run-*"), key=lambda p: p.name)
    a, b = OfflineRun.read(first), OfflineRun.read(second)
    assert a.run.run_id == b.run.run_id == (out / "wandb" / "masksd-run-id").read_text().strip()  # one W&B run
    assert (a.run.project, a.run.entity, a.run.display_name) == ("ris", "lab", "tiny-1")
    assert a.config["lr"] == 0.002 and a.config["masksd"]["lmvsd"]["ratio"] == 0.25 and a.config["wandb"] is True

    train_log, eval_log = rows(out / "train_log.csv"), rows(out / "eval_log.csv")
    logged = {**a.series("train/loss"), **b.series("train/loss")}
    assert logged == {step: row["loss"] for step, row in train_log.items()} and sorted(logged) == list(range(1, 9))
    assert {**a.series("train/lmvsd"), **b.series("train/lmvsd")} == {s: r["lmvsd"] for s, r in train_log.items()}
    assert a.series("val/mIoU") == {4: eval_log[4]["mIoU"]} and b.series("val/mIoU") == {8: eval_log[8]["mIoU"]}

    (overlays,) = b.series("overlays").values()
    assert overlays["count"] == 2 and len(list((second / "files" / "media" / "images").glob("overlays_8_*.png"))) == 2
    assert b.summary["final/mIoU"] == result.metrics["mIoU"] and b.summary["final/oIoU"] == result.metrics["oIoU"]
    assert a.exit_code == b.exit_code == 0


def test_logging_to_wandb_changes_nothing_that_training_computes(tmp_path):
    train(tiny(tmp_path / "plain", max_steps=3, overlays=0), evaluate_at_end=False)
    train(tiny(tmp_path / "logged", max_steps=3, overlays=0, wandb=True, export=True), evaluate_at_end=False)
    assert rows(tmp_path / "plain" / "train_log.csv").keys() == {1, 2, 3}
    strip = lambda log: {s: {k: v for k, v in r.items() if k not in ("step_time", "images_per_s")} for s, r in log.items()}  # noqa: E731
    assert strip(rows(tmp_path / "plain" / "train_log.csv")) == strip(rows(tmp_path / "logged" / "train_log.csv"))


def test_without_the_wandb_extra_the_run_stops_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"--wandb needs the wandb package: pip install 'masksd\[wandb\]'"):
        train(tiny(tmp_path / "run", wandb=True))
    assert not (tmp_path / "run" / "train_log.csv").exists()
