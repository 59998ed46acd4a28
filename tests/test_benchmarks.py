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


# --- the summary command ---------------------------------------------------------------------------


def test_summary_of_the_tiny_model(capsys):
    from cris_summary import main

    main(["--tiny"])
    report = capsys.readouterr().out
    assert "| **total** | **3.64** |" in report and "| both, shared | 3.64 | +128 |" in report
    assert "Machine:" in report


@pytest.mark.slow
def test_summary_of_vit_b16_at_480_is_near_the_paper():
    from cris_summary import PAPER, summarize

    summary = summarize(CRISConfig(pretrained=None))  # about 10 s on 2 cores
    paper = PAPER[("ViT-B-16", 480)]
    params, macs = sum(summary.params.values()) / 1e6, sum(summary.flops.values()) / 2e9
    assert abs(params - paper["params_m"]) / paper["params_m"] < 0.10, params
    assert abs(macs - paper["gflops"]) / paper["gflops"] < 0.10, macs  # the paper's "FLOPs" are multiply-adds
    assert summary.masksd_params["both, shared"] - summary.masksd_params["baseline"] == 768 + 512
