"""The benchmark scripts' numbers obey what they claim (tiny model, seconds): they are not timed here."""

import json
import math
from pathlib import Path

import pytest

from examples.cris import CRISConfig
from masksd import BranchConfig, MaskSDConfig


def test_params_flops_rows_add_what_the_branches_add():
    from benchmarks import params_flops

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
    # LMVSD at the features site: its maps are the parameters it adds, and it skips the second image encode
    features, embedding = rows["LMVSD at features, shared"], rows["LMVSD, shared"]
    assert features["params"] - base["params"] == 32 * 16**2 + 64 * 8**2 + 64 * 4**2  # the tiny pyramid's maps
    assert features["inference_flops"] == base["inference_flops"]
    assert base["training_flops"] < features["training_flops"] < embedding["training_flops"]
    both = rows["both, LMVSD at features, shared"]
    assert both["training_flops"] - features["training_flops"] == pytest.approx(
        rows["VMLSD, shared"]["training_flops"] - base["training_flops"], rel=0.02
    )


# --- the summary command ---------------------------------------------------------------------------


def test_summary_of_the_tiny_model(capsys):
    from benchmarks.cris_summary import main

    main(["--tiny"])
    report = capsys.readouterr().out
    assert "| **total** | **3.64** |" in report and "| both, shared | 3.64 | +128 |" in report
    assert "Machine:" in report


@pytest.mark.slow
def test_summary_of_vit_b16_at_480_is_near_the_paper():
    from benchmarks.cris_summary import PAPER, summarize

    summary = summarize(CRISConfig(pretrained=None))  # about 10 s on 2 cores
    paper = PAPER[("ViT-B-16", 480)]
    params, macs = sum(summary.params.values()) / 1e6, sum(summary.flops.values()) / 2e9
    assert abs(params - paper["params_m"]) / paper["params_m"] < 0.10, params
    assert abs(macs - paper["gflops"]) / paper["gflops"] < 0.10, macs  # the paper's "FLOPs" are multiply-adds
    assert summary.masksd_params["both, shared"] - summary.masksd_params["baseline"] == 768 + 512


def test_vmlsd_masking_counts_are_the_branch_formula():
    import torch
    from benchmarks.vmlsd_masking import masked_words

    n = torch.arange(0, 21)
    literal = masked_words(n, 0.5, 0.1, 0).tolist()
    assert literal[:9] == [0] * 9 and literal[9] == 1  # round(0.1 * ceil(0.5 * n)) is 0 below 9 tokens
    assert masked_words(n, 0.5, 0.1, 1).tolist() == [0] + [max(1, v) for v in literal[1:]]  # at least one, if any


def test_ablation_paired_statistics_on_fixed_numbers():
    from benchmarks.ablation import mean_std, paired_difference

    # differences 2, 3, 0: mean 5/3, sample std sqrt(42/18), t(2 df) = 4.303
    d = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 4.0])
    half = 4.303 * math.sqrt(42 / 18) / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(5 / 3) and d["std"] == pytest.approx(math.sqrt(42 / 18))
    assert (d["low"], d["high"]) == (pytest.approx(5 / 3 - half), pytest.approx(5 / 3 + half))
    five = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0])  # 4 df: t = 2.776
    assert five["low"] == pytest.approx(3 - 2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
    with pytest.raises(ValueError, match="same nonzero length"):
        paired_difference([1.0], [1.0, 2.0])


def test_ablation_summary_pairs_runs_by_seed_and_against_their_own_baseline():
    from benchmarks.ablation import Row, Settings, render, summarise
    from benchmarks.runs import Run

    def run(seed, val, comp):
        metrics = lambda m: {"mIoU": m, "oIoU": m, "Prec@0.5": m, "Prec@0.7": m, "Prec@0.9": m}  # noqa: E731
        return Run.from_json({"seed": seed, "val": metrics(val), "compositional": metrics(comp), "seconds": 10.0,
                              "guidance_after": {"lmvsd_auc": 0.9, "lmvsd_kept": 1.0}})

    rows = {"baseline": Row("region", "II", {"baseline": True}), "CM-MaskSD": Row("region", "II"),
            "b2": Row("region", "—", {"baseline": True}), "m2": Row("region", "—", versus="b2")}
    runs = {"baseline": [run(0, 50.0, 40.0), run(1, 52.0, 41.0), run(2, 60.0, 50.0)],
            "CM-MaskSD": [run(1, 53.0, 40.0), run(0, 52.0, 41.0)],  # stored out of order; seed 2 missing
            "b2": [run(0, 10.0, 10.0)], "m2": [run(0, 13.0, 12.0)]}
    summary = summarise(rows, runs, "val")
    d = summary["CM-MaskSD"]["vs_baseline"]["val"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(1.5)  # (52 - 50) and (53 - 52): seed 2 has no pair
    assert summary["CM-MaskSD"]["vs_baseline"]["compositional"]["mean"] == pytest.approx(0.0)
    assert summary["m2"]["versus"] == "b2" and summary["m2"]["vs_baseline"]["val"]["mean"] == pytest.approx(3.0)
    assert "vs_baseline" not in summary["baseline"]
    text = render(rows, summary, {"region": {"lmvsd_auc": 0.9, "lmvsd_kept": 1.0}}, "val",
                  Settings(steps=10, scenes=10, split="val", eval_scenes=10, lr=1e-3, backbone_lr_scale=1.0), 1.0)
    assert "| m2 | region | — | 13.00 | +3.00 (one pair: no interval) |" in text  # one seed: no ± and no interval
    assert "| baseline | region | II | 54.00 ± 5.29 |" in text


def test_ablation_training_curves_average_over_seeds_on_the_steps_all_logged(tmp_path):
    from benchmarks.ablation import Row, Settings, read_curve, render, summarise, train_config
    from benchmarks.runs import Run

    cfg = train_config(Row("scratch", ""), 3, Settings(10, 10, "test", 10, 1e-3, 1.0), tmp_path, {"scratch": None}, 250)
    assert (cfg.eval_every, cfg.eval_split, cfg.seed) == (250, "test", 3)  # the curve is scored on the run's own split
    (tmp_path / "eval_log.csv").write_text("step,epoch,mIoU,oIoU\n500,0,40.5,41\n1000,1,61.25,60\n")
    assert read_curve(tmp_path) == {"500": 40.5, "1000": 61.25}
    assert read_curve(tmp_path / "missing") == {}
    metrics = {"mIoU": 50.0, "oIoU": 50.0, "Prec@0.5": 50.0, "Prec@0.7": 50.0, "Prec@0.9": 5.0}
    run = lambda seed, curve: Run.from_json({"seed": seed, "val": metrics, "compositional": metrics,  # noqa: E731
                                             "seconds": 1.0, "guidance_after": {}, "curve": curve})
    rows = {"baseline": Row("region", "II", {"baseline": True})}
    runs = {"baseline": [run(0, {"500": 40.0, "1000": 60.0}), run(1, {"500": 44.0, "1000": 62.0, "1500": 70.0})]}
    summary = summarise(rows, runs, "val")
    assert summary["baseline"]["curve"] == {"500": 42.0, "1000": 61.0}  # 1500: only seed 1 reached it
    text = render(rows, summary, {}, "val", Settings(10, 10, "val", 10, 1e-3, 1.0), 1.0)
    assert "| baseline | 42.00 | 61.00 |" in text
    runs["baseline"][0].curve = None  # runs stored before curves existed: no curve table
    assert "during training" not in render(rows, summarise(rows, runs, "val"), {}, "val", Settings(10, 10, "val", 10, 1e-3, 1.0), 1.0)


def test_ablation_report_writes_the_stored_runs_without_running(tmp_path, monkeypatch):
    from benchmarks import ablation
    from benchmarks import common

    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(ablation, "run_one", lambda *a: pytest.fail("--report must not train"))
    settings = ablation.Settings(steps=500, scenes=16000, split="val", eval_scenes=2000, lr=2e-3, backbone_lr_scale=1.0)
    metrics = {"mIoU": 50.0, "oIoU": 50.0, "Prec@0.5": 50.0, "Prec@0.7": 50.0, "Prec@0.9": 5.0}
    run = {"seed": 0, "val": metrics, "compositional": metrics, "seconds": 60.0, "guidance_after": {"lmvsd_auc": 0.9, "lmvsd_kept": 1.0}}
    store = {"settings": settings.record(), "runs": {"baseline": [run]}, "initial": {"region": {"lmvsd_auc": 0.9, "lmvsd_kept": 1.0}}}
    (tmp_path / "ablation_t_runs.json").write_text(json.dumps(store))
    ablation.main(["--report", "--tag", "t", "--only", "baseline", "CM-MaskSD"])
    text = (tmp_path / "ablation_t.md").read_text()
    assert "| baseline | region | II | 50.00 | — |" in text and "| CM-MaskSD |" not in text  # no runs: no row
    assert "1 min of runs in all" in text
    with pytest.raises(SystemExit):
        ablation.main(["--report", "--tag", "empty"])  # nothing stored


def test_ablation_refuses_to_pair_new_runs_with_runs_made_under_other_numerics(tmp_path, monkeypatch, capsys):
    from benchmarks import ablation
    from benchmarks import common
    import torch

    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(ablation, "initial_guidance", lambda *a: {"lmvsd_auc": 0.9, "lmvsd_kept": 1.0})
    metrics = {"mIoU": 50.0, "oIoU": 50.0, "Prec@0.5": 50.0, "Prec@0.7": 50.0, "Prec@0.9": 5.0}
    trained = []
    monkeypatch.setattr(ablation, "run_one", lambda row, seed, *a: trained.append(seed) or ablation.Run.from_json({
        "seed": seed, "steps": 500, "val": metrics, "compositional": metrics, "seconds": 1.0, "guidance_after": {}}))
    threads = torch.get_num_threads()
    try:
        ablation.main(["--tag", "n", "--only", "baseline", "--seeds", "0"])
        stored = json.loads((tmp_path / "ablation_n_runs.json").read_text())
        assert stored["numerics"] == {**ablation.current_numerics(), "torch_threads": 1}
        assert set(stored["numerics"]) == {"torch", "cpu", "cpu_capability", "torch_threads"}
        with pytest.raises(SystemExit):  # the same store at another thread count: the runs would not pair
            ablation.main(["--tag", "n", "--only", "baseline", "--seeds", "1", "--threads", "2"])
        assert "other numerics" in capsys.readouterr().err
        del stored["numerics"]  # a store from before numerics were recorded
        (tmp_path / "ablation_n_runs.json").write_text(json.dumps(stored))
        with pytest.raises(SystemExit):
            ablation.main(["--tag", "n", "--only", "baseline", "--seeds", "1"])
        assert "predates the record of the numerics" in capsys.readouterr().err
        ablation.main(["--tag", "n", "--only", "baseline", "--report"])  # rendering it stays possible
        assert trained == [0]
    finally:
        torch.set_num_threads(threads)


def test_ablation_rows_are_configs_the_trainer_accepts(tmp_path):
    from benchmarks.ablation import EXTRA_ROWS, PAPER_TABLE_ROWS, POLICY_ROWS, ROWS, Settings, train_config

    settings = Settings(steps=100, scenes=640, split="test", eval_scenes=10, lr=2e-3, backbone_lr_scale=1.0)
    premises = {"region": "masksd-tiny-synthetic", "global": "x.pt", "scratch": None}
    for rows in (*ROWS.values(), EXTRA_ROWS, POLICY_ROWS, PAPER_TABLE_ROWS):
        for name, row in rows.items():
            cfg = train_config(row, 3, settings, tmp_path, premises)
            assert cfg.seed == 3 and cfg.max_steps == 100 and cfg.epochs == 5 and cfg.resume == "auto", name
            m = cfg.masksd_config()
            assert (not m.lmvsd.enabled and not m.vmlsd.enabled) == name.startswith("baseline"), name
    assert train_config(ROWS["pretrained"]["+LMVSD"], 0, settings, tmp_path, premises).masksd_config().vmlsd.enabled is False
    paper = {name: train_config(row, 0, settings, tmp_path, premises).masksd_config() for name, row in PAPER_TABLE_ROWS.items()}
    assert paper["CM-MaskSD, no masking"] == MaskSDConfig(masking=False)
    assert paper["CM-MaskSD, ground-truth supervision"] == MaskSDConfig(supervision="ground_truth")
    assert paper["CM-MaskSD, separate heads"] == MaskSDConfig(share_weights=False)
    assert paper["+LMVSD, K=1 (no filtering)"] == MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(enabled=False))
    assert paper["+LMVSD, α=0.75"] == MaskSDConfig(lmvsd=BranchConfig(ratio=0.75), vmlsd=BranchConfig(enabled=False))


def test_ablation_policy_rows_set_their_switch_and_leave_the_stored_rows_as_they_ran(tmp_path):
    from benchmarks.ablation import EXTRA_ROWS, PAPER_TABLE_ROWS, POLICY_ROWS, ROWS, Settings, run_folder, train_config

    settings = Settings(steps=500, scenes=16000, split="val", eval_scenes=2000, lr=2e-3, backbone_lr_scale=1.0)
    premises = {"region": "masksd-tiny-synthetic", "global": "x.pt", "scratch": None}
    policy = {name: train_config(row, 0, settings, tmp_path, premises).masksd_config() for name, row in POLICY_ROWS.items()}
    assert policy["CM-MaskSD, teacher gradient flows"] == MaskSDConfig(teacher_gradient="flow")
    assert policy["+LMVSD at the features site"].lmvsd.site == "features" and not policy["+LMVSD at the features site"].vmlsd.enabled
    assert policy["CM-MaskSD, LMVSD at the features site"] == MaskSDConfig(lmvsd=BranchConfig(site="features"))
    assert policy["CM-MaskSD, LMVSD selects the bottom K"] == MaskSDConfig(lmvsd=BranchConfig(select="bottom"))
    # the stored row keeps masksd 0.1's maskris preset (MaskSDConfig.maskris() is now MaskRIS as published)
    old_maskris = MaskSDConfig(lmvsd=BranchConfig.lmvsd(top_k=1.0, ratio=0.75, weight=0.5), vmlsd=BranchConfig.vmlsd(top_k=1.0, ratio=0.15, weight=0.5))
    assert policy["MaskRIS recipe"] == old_maskris and old_maskris != MaskSDConfig.maskris()
    assert (old_maskris.lmvsd.site, old_maskris.vmlsd.min_masked, old_maskris.views) == ("embedding", 1, "separate")
    # every stored row still exists under its name and folder, with the new switches where they were before them
    stored = {name for path in (Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("ablation_*_runs.json")
              for name in json.loads(path.read_text())["runs"]}
    lavt = ROWS["lavt"]  # issue 30's LAVT rows: new, with the new switches by design (tests/test_lavt.py)
    known = {name: row for mode, rows in (*ROWS.items(), ("extra", EXTRA_ROWS), ("paper", PAPER_TABLE_ROWS)) if mode != "lavt"
             for name, row in rows.items()}
    assert stored and stored <= set(known) | set(POLICY_ROWS) | set(lavt)
    for name, row in known.items():
        m = train_config(row, 0, settings, tmp_path, premises).masksd_config()
        assert (m.teacher_gradient, m.lmvsd.select, m.vmlsd.select, m.lmvsd.site) == ("detach", "top", "top", "embedding"), name
        assert not any(key.split(".")[-1] in {"teacher_gradient", "select", "site"} for key in row.overrides), name
    folders = [run_folder(tmp_path, "t", name) for name in (*known, *POLICY_ROWS, *lavt)]
    assert len(set(folders)) == len(folders) and not set(POLICY_ROWS) & set(known)  # no policy row reuses a stored run


def test_ablation_t_interval_falls_back_to_the_next_lower_degrees_of_freedom():
    from benchmarks.ablation import T_95, paired_difference

    values = [float(i % 7) for i in range(36)]  # 35 df: not in the table, 30 df's quantile is used
    d = paired_difference(values, [0.0] * 36)
    assert (d["high"] - d["mean"]) == pytest.approx(T_95[30] * d["std"] / math.sqrt(36))
    assert T_95[19] == 2.093  # 20 paired seeds use their own quantile


def test_ablation_best_of_scores_the_best_checkpoint_and_reports_the_gap(tmp_path, monkeypatch, capsys):
    """--best-of: the runs validate on another split than the reported one, are scored from best.pt, and the
    table gains their training-scene mIoU and generalisation gap; stores without the field still match."""
    from benchmarks import ablation
    from benchmarks.ablation import Row, Settings, render, summarise, train_config

    plain = Settings(500, 16000, "val", 2000, 2e-3, 1.0)
    assert "best_of" not in plain.record()  # runs files written before --best-of existed still match
    chosen = Settings(500, 300, "val", 2000, 2e-3, 1.0, best_of="test")
    assert chosen.record()["best_of"] == "test"
    cfg = train_config(Row("scratch", ""), 1, chosen, tmp_path, {"scratch": None}, 50)
    assert (cfg.eval_split, cfg.eval_every, cfg.synthetic_train_size) == ("test", 50, 300)

    def run(seed, train, val):
        metrics = lambda m: {"mIoU": m, "oIoU": m, "Prec@0.5": m, "Prec@0.7": m, "Prec@0.9": m}  # noqa: E731
        return ablation.Run.from_json({"seed": seed, "val": metrics(val), "compositional": metrics(val - 5), "train": metrics(train),
                                       "best_step": str(100 * (seed + 1)), "seconds": 1.0, "guidance_after": {}, "steps": 384})

    rows = {"baseline": Row("region", "II", {"baseline": True}), "CM-MaskSD": Row("region", "II")}
    runs = {"baseline": [run(0, 80.0, 60.0), run(1, 84.0, 62.0)], "CM-MaskSD": [run(0, 70.0, 61.0), run(1, 72.0, 64.0)]}
    summary = summarise(rows, runs, "val")
    assert summary["baseline"]["gap"][0] == pytest.approx(21.0) and summary["CM-MaskSD"]["gap"][0] == pytest.approx(8.5)
    text = render(rows, summary, {}, "val", chosen, 1.0)
    assert "| 82.00 ± 2.83 | 21.00 ± 1.41 | 100, 200 |" in text and "best.pt" in text and "`test` scenes" in text
    assert "500 steps (384 taken: whole epochs of full batches)" in text
    assert Settings(400, 200, "val", 2000, 2e-3, 1.0, "test", 40).record()["eval_every"] == 40  # it picks the candidates
    for args, message in ((["--best-of", "val"], "must not be the reported"), (["--best-of", "test"], "needs --eval-every"),
                          (["--best-of", "test", "--eval-every", "390", "--scenes", "200", "--steps", "400"], "exceeds the 384 steps")):
        with pytest.raises(SystemExit):
            ablation.main(["--tag", "never", "--only", "baseline", *args])
        assert message in capsys.readouterr().err


def test_ablation_run_one_with_best_of_scores_best_pt(tmp_path):
    """A 4-step run validating on `test` every 2 steps: its scores are those of best.pt's weights, not the last step's."""
    import torch
    from benchmarks.ablation import Row, Settings, run_one, score

    from examples.pipeline.factory import load_segmenter

    torch.manual_seed(0)
    s = Settings(steps=4, scenes=32, split="val", eval_scenes=8, lr=2e-2, backbone_lr_scale=1.0, best_of="test")
    run = run_one(Row("scratch", "", {"baseline": True}), 0, s, tmp_path, {"scratch": None}, eval_every=2)
    assert set(run.curve) == {"2", "4"} and run.best_step == max(run.curve, key=run.curve.get)
    best, _ = load_segmenter(tmp_path / "best.pt")
    assert run.scores["val"] == score(best, "val", 8) and run.scores["train"] == score(best, "train", 8, seed=0)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == int(run.best_step)
    assert list(run.to_json("val")) == ["seed", "steps", "seconds", "val", "compositional", "guidance_after", "curve",
                                        "best_step", "train"]  # the layout every stored table has


def test_results_commands_are_quoted_for_a_shell():
    import shlex

    from benchmarks.common import command_line

    line = command_line("benchmarks.ablation", ["--only", "CM-MaskSD, LMVSD selects the bottom K", "baseline"])
    assert shlex.split(line) == ["python", "-m", "benchmarks.ablation", "--only", "CM-MaskSD, LMVSD selects the bottom K", "baseline"]


def test_ablation_curves_plot_only_rows_with_curves(tmp_path):
    from benchmarks.ablation import plot_curves

    assert not plot_curves({"baseline": {"curve": {}}}, "test", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert plot_curves({"baseline": {"curve": {"40": 3.0, "80": 11.5}}, "CM-MaskSD": {}}, "test", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def _regime_store(scenes, pairs, steps=400, numerics="n"):
    """An ablation runs file with baseline and CM-MaskSD runs: pairs = [(seed, (train, val, comp) baseline, (...) CM-MaskSD)]."""
    def run(seed, train, val, comp):
        m = lambda x: {"mIoU": x, "oIoU": x, "Prec@0.5": x, "Prec@0.7": x, "Prec@0.9": x}  # noqa: E731
        return {"seed": seed, "seconds": 1.0, "train": m(train), "val": m(val), "compositional": m(comp)}

    settings = {"steps": steps, "scenes": scenes, "split": "val", "eval_scenes": 2000, "lr": 2e-3, "backbone_lr_scale": 1.0,
                "best_of": "test", "eval_every": 40}
    return {"settings": settings, "numerics": numerics,
            "runs": {"baseline": [run(s, *b) for s, b, _ in pairs], "CM-MaskSD": [run(s, *c) for s, _, c in pairs]}}


def test_regime_map_statistics_on_fixed_numbers(tmp_path, monkeypatch):
    from benchmarks import common
    from benchmarks import regime_map
    from benchmarks.runs import RunsFile

    small = _regime_store(200, [(0, (80, 30, 28), (70, 33, 29)), (1, (82, 34, 30), (71, 35, 30)), (2, (78, 32, 29), (69, 32, 31))])
    row = regime_map.size_row(200, RunsFile.from_json(small))
    assert row["seeds"] == [0, 1, 2] and row["baseline"][0] == pytest.approx(32.0) and row["steps_taken"] == []
    small["runs"]["baseline"][0]["steps"] = 384
    assert regime_map.size_row(200, RunsFile.from_json(small))["steps_taken"] == [384]
    assert row["gap"][0] == pytest.approx(48.0) and row["masksd_gap"][0] == pytest.approx((37 + 36 + 37) / 3)
    gain = row["gain"]["val"]  # differences 3, 1, 0
    assert gain["mean"] == pytest.approx(4 / 3) and gain["n"] == 3
    assert gain["high"] - gain["mean"] == pytest.approx(4.303 * math.sqrt(7 / 3) / math.sqrt(3))
    assert row["gain"]["compositional"]["mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no seed has both"):
        regime_map.size_row(300, RunsFile.from_json({"settings": small["settings"], "runs": {"baseline": small["runs"]["baseline"]}}))
    with pytest.raises(ValueError, match="differ in \\['steps'\\]"):
        regime_map.check_comparable({200: ("a", RunsFile.from_json(small)),
                                     1000: ("b", RunsFile.from_json(_regime_store(1000, [], steps=500)))})
    with pytest.raises(ValueError, match="not 300"):
        regime_map.check_comparable({300: ("a", RunsFile.from_json(small))})
    with pytest.raises(ValueError, match="numerics"):
        regime_map.check_comparable({200: ("a", RunsFile.from_json(small)),
                                     1000: ("b", RunsFile.from_json(_regime_store(1000, [], numerics="other")))})

    monkeypatch.setattr(regime_map, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "ablation_overfit_runs.json").write_text(json.dumps(small))
    big = _regime_store(1000, [(0, (50, 45, 40), (48, 44, 41)), (1, (52, 47, 42), (50, 45, 41))])
    (tmp_path / "ablation_regime_1000_runs.json").write_text(json.dumps(big))
    regime_map.main(["--sizes", "1000", "--report"])  # one size: a map without a trend
    assert "Trend: needs a seed run at two sizes" in (tmp_path / "regime_map.md").read_text()
    regime_map.main(["--sizes", "1000", "--also", "200=overfit", "--report"])
    text = (tmp_path / "regime_map.md").read_text()
    assert "| 200 | 384 | 3 | 32.00 ± 2.00 | +48.00 ± 2.00 |" in text and "| 1,000 | — | 2 | 46.00 ± 1.41 | +5.00 ± 0.00 |" in text
    assert (tmp_path / "regime_map.png").is_file()
    for bad in (["--also", "overfit"], ["--sizes", "16"], ["--sizes", "3000", "--report"]):
        with pytest.raises(SystemExit):
            regime_map.main(bad + (["--report"] if "--report" not in bad else []))


def _table_store(scenes, rows, numerics="n"):
    """An ablation runs file with the given rows: rows = {name: [(seed, val, compositional, best test), ...]}."""
    def run(seed, val, comp, test):
        m = lambda x: {"mIoU": x, "oIoU": x, "Prec@0.5": x, "Prec@0.7": x, "Prec@0.9": x}  # noqa: E731
        return {"seed": seed, "seconds": 1.0, "train": m(val + 10), "val": m(val), "compositional": m(comp), "best_step": "80",
                "curve": {"40": test - 5, "80": test}}

    store = _regime_store(scenes, [], numerics=numerics)
    store["runs"] = {name: [run(*r) for r in rs] for name, rs in rows.items()}
    return store


def test_regime_tables_choose_on_test_and_test_the_papers_orderings_on_fixed_numbers(tmp_path, monkeypatch):
    from benchmarks import common
    from benchmarks import regime_tables
    from benchmarks.runs import Run, RunsFile

    base = [(0, 40, 30, 50), (1, 42, 31, 52), (2, 41, 29, 51)]
    # test (best.pt) gains: size 200 -> +1, +3, +2 (mean 2, low 2 - 4.303/sqrt 3); size 3000 -> +0.5 each (std 0: low 0.5)
    small = _table_store(200, {"baseline": base, "CM-MaskSD": [(s, v - 1, c, t + d) for (s, v, c, t), d in zip(base, (1, 3, 2))]})
    large = _table_store(3000, {"baseline": base, "CM-MaskSD": [(s, v, c, t + 0.5) for s, v, c, t in base]})
    chosen, gains = regime_tables.choose_size({200: RunsFile.from_json(small), 3000: RunsFile.from_json(large)}, [0, 1, 2])
    assert chosen == 3000 and gains[3000]["low"] == pytest.approx(0.5) and gains[200]["mean"] == pytest.approx(2.0)
    assert gains[200]["low"] == pytest.approx(2.0 - 4.303 * 1.0 / math.sqrt(3))
    with pytest.raises(ValueError, match=r"size 200: baseline has no run for seeds \[3\]"):
        regime_tables.choose_size({200: RunsFile.from_json(small), 3000: RunsFile.from_json(large)}, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        regime_tables.choose_size({200: RunsFile.from_json(small)}, [0])
    with pytest.raises(ValueError, match="seed 4: no validation at a best step"):
        regime_tables.best_test(Run.from_json({"seed": 4, "seconds": 1.0, "curve": {"40": 1.0}, "best_step": "80"}))

    assert regime_tables.verdict({"n": 3, "mean": 1.0, "low": 0.2, "high": 1.8}) == "holds"
    assert regime_tables.verdict({"n": 3, "mean": -1.0, "low": -1.8, "high": -0.2}) == "reversed"
    assert regime_tables.verdict({"n": 3, "mean": -0.1, "low": -1.8, "high": 1.6}) == "unresolved (opposite sign)"
    assert regime_tables.verdict(None) == "not run"
    assert set(regime_tables.PAPER) >= {o.better for o in regime_tables.ORDERINGS} | {o.worse for o in regime_tables.ORDERINGS}
    paper = {o.claim: o.paper for o in regime_tables.ORDERINGS}  # RefCOCO val differences, Tables II-VII
    assert paper["LMVSD helps (II/VII)"] == pytest.approx(71.13 - 70.45) and paper["both branches help (II)"] == pytest.approx(1.23)
    assert paper["distillation beats ground-truth supervision (VI)"] == pytest.approx(0.73)
    assert paper["the correlation filter (K=0.5) beats K=1 (III)"] == pytest.approx(0.44)  # within Table III (separate head)
    assert all(d > 0 for d in paper.values())  # each ordering is stated the way the paper found it
    broken = json.loads(json.dumps(large))
    broken["runs"]["CM-MaskSD"][1]["best_step"] = "120"
    with pytest.raises(ValueError, match=r"size 3000, CM-MaskSD or baseline: seed 1: no validation at a best step"):
        regime_tables.choose_size({3000: RunsFile.from_json(broken)}, [0, 1, 2])

    # at the chosen size the table's rows pair with the map's baseline; val differences below are exact
    large["runs"]["+LMVSD"] = [{**r, "val": {**r["val"], "mIoU": r["val"]["mIoU"] + d}}
                               for r, d in zip(large["runs"]["baseline"], (2.0, 2.5, 3.0))]
    large["runs"]["+LMVSD, α=0.75"] = [{**r, "val": {**r["val"], "mIoU": r["val"]["mIoU"] + 4}} for r in large["runs"]["baseline"][:2]]
    runs = RunsFile.from_json(large).runs  # rows of 3, 3 and 2 seeds: each difference on the seeds both rows have
    rows = regime_tables.table_rows(runs, "val")
    assert list(rows) == ["baseline", "+LMVSD", "CM-MaskSD", "+LMVSD, α=0.75"]  # the paper's order, rows run so far
    assert rows["+LMVSD"]["delta_val"]["mean"] == pytest.approx(2.5) and rows["+LMVSD"]["paper_delta"] == pytest.approx(0.68)
    assert rows["+LMVSD, α=0.75"]["delta_val"]["seeds"] == [0, 1] and rows["baseline"]["val"] == pytest.approx((41.0, 1.0))
    orders = {o["claim"]: o for o in regime_tables.orderings(runs, "val")}
    alpha = orders["α=0.25 beats α=0.75 (III)"]  # +LMVSD − the α row on seeds 0, 1: -2, -1.5
    assert alpha["val"]["mean"] == pytest.approx(-1.75) and alpha["paper"] == pytest.approx(0.66)
    assert orders["LMVSD helps (II/VII)"]["verdict"] == "holds" and orders["masking beats no masking (V)"]["verdict"] == "not run"

    monkeypatch.setattr(regime_tables, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "ablation_small_runs.json").write_text(json.dumps(small))
    (tmp_path / "ablation_large_runs.json").write_text(json.dumps(large))
    regime_tables.main(["--sizes", "200=small", "3000=large", "--choice-seeds", "0", "1", "2", "--report"])
    text = (tmp_path / "ablation_regime_tables.md").read_text()
    assert "**3,000 training scenes** (`ablation_large`)" in text and "| 3,000 | 3 | +0.50 [+0.50, +0.50] | ✓ |" in text
    assert "| +LMVSD | VII | 71.13 | +0.68 | 43.50 ± 1.32 | +2.50 [+1.26, +3.74] | +0.00 [+0.00, +0.00] | 3 |" in text  # its own 3 seeds
    assert "| +LMVSD, α=0.75 | III(b) | 70.79 | +0.34 | 45.00 ± 1.41 | +4.00 [+4.00, +4.00] |" in text  # seeds 0, 1 only
    assert (tmp_path / "ablation_regime_tables.png").is_file()
    for bad in (["--sizes", "3000"], ["--sizes", "16000=missing"]):
        with pytest.raises(SystemExit):
            regime_tables.main(bad + ["--report"])


def test_regime_map_trend_is_the_mean_per_seed_slope_against_log_size():
    from benchmarks import regime_map
    from benchmarks.runs import RunsFile

    # seed 0: gains +3 at 100 scenes, +1 at 1,000, -1 at 10,000 -> slope -2 per decade; seed 1: +2, +2, -2 -> -2 as well
    # (least squares over x = 2, 3, 4); seed 2 has one size only and seed 3 two of the three: both are left out
    small = RunsFile.from_json(_regime_store(100, [(0, (0, 50, 40), (0, 53, 43)), (1, (0, 50, 40), (0, 52, 42)), (2, (0, 50, 40), (0, 50, 40)),
                                                   (3, (0, 50, 40), (0, 60, 40))]))
    mid = RunsFile.from_json(_regime_store(1000, [(0, (0, 50, 40), (0, 51, 41)), (1, (0, 50, 40), (0, 52, 40))]))
    large = RunsFile.from_json(_regime_store(10000, [(0, (0, 50, 40), (0, 49, 39)), (1, (0, 50, 40), (0, 48, 39)),
                                                     (3, (0, 50, 40), (0, 40, 40))]))
    t = regime_map.trend({100: small, 1000: mid, 10000: large}, "val")
    assert t["seeds"] == [0, 1] and t["slopes"] == [pytest.approx(-2.0), pytest.approx(-2.0)] and t["mean"] == pytest.approx(-2.0)
    assert t["low"] == pytest.approx(-2.0) and t["high"] == pytest.approx(-2.0)  # no spread between seeds
    comp = regime_map.trend({100: small, 1000: mid, 10000: large}, "compositional")  # seed 1: +2, 0, -1 -> -1.5
    assert comp["slopes"] == [pytest.approx(-2.0), pytest.approx(-1.5)] and comp["mean"] == pytest.approx(-1.75)
    assert comp["high"] - comp["mean"] == pytest.approx(12.706 * math.sqrt(0.125) / math.sqrt(2))
    text = regime_map.render_trend({"val": t, "compositional": comp}, "val")
    assert "-2.00 [-2.00, -2.00] mIoU per tenfold more scenes on `val`" in text and "mean over 2 seeds" in text
    assert regime_map.trend({100: small}, "val") is None  # one size: no slope
    assert "needs a seed run at two sizes" in regime_map.render_trend({"val": None, "compositional": None}, "val")


def test_benchmarks_is_a_package_that_changes_no_import_path():
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    assert (folder / "__init__.py").is_file()
    assert [p.name for p in sorted(folder.glob("*.py")) if "sys.path" in p.read_text()] == []


@pytest.mark.slow
def test_ablation_jobs_2_stores_exactly_what_jobs_1_stores(tmp_path, monkeypatch):
    """Two runs at a time, each in its own spawned process: every stored number equals the sequential table's
    (wall time aside), in the same order."""
    from benchmarks import ablation, common

    args = ["--mode", "scratch", "--only", "baseline", "CM-MaskSD", "--seeds", "0", "1", "--steps", "3", "--scenes", "32",
            "--eval-scenes", "8", "--eval-every", "1", "--best-of", "test", "--lr", "0.05", "--tag", "t"]
    stored = {}
    for jobs in (1, 2):
        results = tmp_path / f"results{jobs}"
        monkeypatch.setattr(ablation, "RESULTS", results)
        monkeypatch.setattr(common, "RESULTS", results)
        ablation.main([*args, "--jobs", str(jobs), "--work", str(tmp_path / f"work{jobs}")])
        stored[jobs] = json.loads((results / "ablation_t_runs.json").read_text())
        for done in stored[jobs]["runs"].values():
            for run in done:
                assert run.pop("seconds") > 0
    assert [r["seed"] for r in stored[2]["runs"]["CM-MaskSD"]] == [0, 1]
    assert stored[2] == stored[1]
    baseline, masksd = (stored[1]["runs"][name][0] for name in ("baseline", "CM-MaskSD"))
    assert baseline["curve"] != masksd["curve"] and baseline["guidance_after"] != masksd["guidance_after"]  # the rows differ


def test_ablation_budget_starts_no_run_after_it_and_jobs_are_checked(tmp_path, monkeypatch, capsys):
    from benchmarks import ablation, common

    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(ablation, "initial_guidance", lambda *a: {"lmvsd_auc": 0.9, "lmvsd_kept": 1.0})
    metrics = {"mIoU": 50.0, "oIoU": 50.0, "Prec@0.5": 50.0, "Prec@0.7": 50.0, "Prec@0.9": 5.0}
    clock = iter(range(0, 1000, 10))  # each look at the clock: 10 s later
    monkeypatch.setattr(ablation.time, "perf_counter", lambda: float(next(clock)))
    trained = []
    monkeypatch.setattr(ablation, "run_one", lambda row, seed, *a: trained.append(seed) or ablation.Run.from_json({
        "seed": seed, "steps": 5, "val": metrics, "compositional": metrics, "seconds": 1.0, "guidance_after": {}}))
    ablation.main(["--tag", "b", "--only", "baseline", "--seeds", "0", "1", "2", "3", "--budget", "25"])
    assert trained == [0, 1] and "2 runs left for the next call" in capsys.readouterr().out
    stored = json.loads((tmp_path / "ablation_b_runs.json").read_text())
    assert [r["seed"] for r in stored["runs"]["baseline"]] == [0, 1]
    for bad, message in ((["--jobs", "0"], "--jobs must be >= 1"), (["--budget", "-1"], "--budget must be a positive")):
        with pytest.raises(SystemExit):
            ablation.main(["--tag", "b", "--only", "baseline", *bad])
        assert message in capsys.readouterr().err


def test_ablation_numerics_of_a_gpu_run_never_equal_a_cpu_runs(monkeypatch):
    from benchmarks import ablation
    import torch

    cpu = ablation.current_numerics("cpu")
    assert set(cpu) == {"torch", "cpu", "cpu_capability", "torch_threads"}  # what every stored CPU table records
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    gpu = ablation.current_numerics("cuda")
    assert gpu["gpu"] == "NVIDIA H100 80GB HBM3" and {"cuda", "cudnn", "deterministic", "matmul_precision"} <= set(gpu)
    assert gpu != cpu and {k: gpu[k] for k in cpu} == cpu


def test_runs_file_reads_and_writes_every_stored_table_unchanged(tmp_path):
    """The typed record round-trips each stored runs file to the same JSON (layout, order, values)."""
    from benchmarks.runs import RunsFile

    stored = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("ablation_*_runs.json"))
    assert len(stored) >= 8
    for path in stored:
        record = RunsFile.read(path)
        assert record.runs and all(r.seed == s for rs in record.runs.values() for r, s in zip(rs, sorted(r.seed for r in rs)))
        record.path = tmp_path / path.name
        record.write()
        assert json.loads(record.path.read_text()) == json.loads(path.read_text()), path.name
    with pytest.raises(ValueError, match="not an ablation runs file"):
        (tmp_path / "bad_runs.json").write_text('{"runs": {"baseline": [{"seeds": 1}]}}')
        RunsFile.read(tmp_path / "bad_runs.json")


def test_powered_comparisons_on_fixed_numbers():
    from benchmarks import powered
    from benchmarks.runs import RunsFile

    def store(rows):
        m = lambda x: {"mIoU": x, "oIoU": x, "Prec@0.5": x, "Prec@0.7": x, "Prec@0.9": x}  # noqa: E731
        return RunsFile.from_json({"settings": {"steps": 400, "scenes": 3000, "split": "val", "eval_scenes": 2000, "lr": 2e-3,
                                                "backbone_lr_scale": 1.0, "best_of": "test", "eval_every": 40},
                                   "runs": {name: [{"seed": s, "seconds": 1.0, "val": m(v), "compositional": m(c)} for s, v, c in rs]
                                            for name, rs in rows.items()}})

    base = [(s, 50.0, 40.0) for s in range(20)]
    # CM-MaskSD: +1 on val at every seed but seed 7 (+3): resolved above zero; compositional ±1 alternating: unresolved
    ours = [(s, 51.0 + (2.0 if s == 7 else 0.0), 40.0 + (1.0 if s % 2 else -1.0)) for s in range(20)]
    # ground truth: +2 on seeds 0-4 only (the lead's seeds), 0 on 5-19 (not confirmed there)
    truth = [(s, 52.0 if s < 5 else 50.0, 40.0) for s in range(20)]
    stores = {3000: store({"baseline": base, "CM-MaskSD": ours, "CM-MaskSD, ground-truth supervision": truth}),
              200: store({"baseline": base[:3], "CM-MaskSD": ours[:1]})}
    results = {r["number"]: r for r in powered.analyse(stores)}
    one = results[1]["val"]["all"]
    assert one["n"] == 20 and one["mean"] == pytest.approx(1.1) and one["ahead"] == 20 and one["behind"] == 0
    assert one["half_width"] == pytest.approx(2.093 * math.sqrt(0.2) / math.sqrt(20))  # t(19 df); sd of 19 ones and a 3
    assert results[1]["val"]["verdict"] == "resolved, above zero"
    assert results[1]["compositional"]["verdict"] == "unresolved" and results[1]["compositional"]["all"]["ahead"] == 10
    assert results[2]["val"]["all"] is None and results[2]["val"]["verdict"] == "not run"  # one pair only
    lead = results[3]["val"]
    assert lead["all"]["mean"] == pytest.approx(0.5) and lead["confirmation"]["seeds"] == list(range(5, 20))
    assert lead["confirmation"]["std"] == 0 and lead["lead"] == "not confirmed"  # exactly 0 on the new seeds
    assert results[4]["val"]["verdict"] == "not run"  # the no-masking row was never run
    assert powered.verdict({"low": 0.05, "high": 1.0}) == "resolved, above zero (borderline)"
    assert powered.verdict({"low": -1.0, "high": -0.5}) == "resolved, below zero"
    assert powered.lead_verdict({"low": -2.0, "high": -0.1}, +1.0) == "reversed"
    assert powered.lead_verdict({"low": 0.2, "high": 1.0}, +1.0) == "confirmed"


@pytest.mark.slow
def test_powered_runs_and_reports_through_its_cpu_stand_in(tmp_path, monkeypatch):
    """The prepared GPU command's code path (--run, both tables, --jobs), on CPU with tiny runs: what make gpu-table runs
    on CUDA, less the device."""
    from benchmarks import ablation, common, powered

    for module in (ablation, common, powered):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    powered.main(["--run", "--stand-in", "--jobs", "2", "--seeds", "0", "1", "--work", str(tmp_path / "work")])
    data = json.loads((tmp_path / "powered_standin.json").read_text())
    assert data["tags"] == {"3000": "standin_regime_3000", "200": "standin_overfit"}
    assert [c["number"] for c in data["comparisons"]] == [1, 2, 3, 4, 5]
    assert all(c["val"]["all"]["seeds"] == [0, 1] for c in data["comparisons"])
    stored = json.loads((tmp_path / "ablation_standin_regime_3000_runs.json").read_text())
    assert sorted(stored["runs"]) == sorted(powered.ROWS_3000) and stored["settings"]["steps"] == 4
    assert "| 1 | CM-MaskSD − baseline | 3,000 | val |" in (tmp_path / "powered_standin.md").read_text()


def test_families_benchmark_times_both_variants_and_counts_more_flops_for_masksd(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from benchmarks import common, families

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    families.main(["--families", "detris", "--warmup", "0", "--rounds", "1"])
    data = json.loads((tmp_path / "families.json").read_text())["families"]["detris"]
    assert set(data["median_s"]) == {"baseline", "MaskSD"} and all(s > 0 for s in data["median_s"].values())
    assert data["flops"]["MaskSD"] > data["flops"]["baseline"]  # the branches' extra encodes and decodes
    assert data["adapter_lines"] <= 25 and "| detris | " in (tmp_path / "families.md").read_text()
