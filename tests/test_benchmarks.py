"""The benchmark scripts' numbers obey what they claim (tiny model, seconds): they are not timed here."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from examples.cris import CRISConfig  # noqa: E402


def test_params_flops_rows_add_what_the_branches_add():
    import params_flops

    _, data = params_flops.run(CRISConfig.tiny())
    rows = data["rows"]
    base = rows["baseline"]
    assert len({r["inference_flops"] for r in rows.values()}) == 1, "eval costs the same for every variant"
    for name in ("LMVSD", "VMLSD", "both"):
        shared, separate = rows[f"{name}, shared"], rows[f"{name}, separate"]
        assert shared["training_flops"] == separate["training_flops"]  # sharing changes weights, not work
        assert separate["params"] > shared["params"] > base["params"]
    assert base["training_flops"] < rows["VMLSD, shared"]["training_flops"] < rows["both, shared"]["training_flops"]
    assert rows["LMVSD, shared"]["training_flops"] < rows["both, shared"]["training_flops"]
    # both branches add exactly what each adds alone (the main branch is computed once)
    extra = rows["LMVSD, shared"]["training_flops"] + rows["VMLSD, shared"]["training_flops"] - 2 * base["training_flops"]
    assert rows["both, shared"]["training_flops"] - base["training_flops"] == pytest.approx(extra, rel=0.02)


def test_train_step_measures_every_variant(tmp_path, monkeypatch):
    import common
    import train_step

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    train_step.main(["--batch", "4", "--warmup", "1", "--rounds", "2", "--device", "cpu"])
    written = list(tmp_path.glob("train_step_cpu_masksd-tiny_64.*"))
    assert sorted(p.suffix for p in written) == [".json", ".md"]
    text = (tmp_path / "train_step_cpu_masksd-tiny_64.md").read_text()
    for name in train_step.VARIANTS:
        assert f"| {name} |" in text
