"""Building blocks of the training pipeline: config/flags, sampling, schedule, checkpoints."""

import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.pipeline.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from examples.pipeline.config import PRESETS, TrainConfig, masksd_preset, preset
from examples.pipeline.optim import build_optimizer, warmup_cosine
from examples.pipeline.sampling import EpochSampler, ShardSampler
from masksd import BranchConfig, MaskSDConfig
from masksd.config import MASKRIS_BRANCHES
from examples.train_cris_masksd import parse_args


def test_no_arguments_is_the_demo_and_presets_hold_the_paper_settings():
    demo = parse_args([])
    assert demo == TrainConfig()
    assert demo.dataset == "synthetic" and demo.model == "masksd-tiny"

    paper = parse_args(["--preset", "refcoco-vitb"])
    assert (paper.dataset, paper.split_by, paper.model, paper.pretrained) == ("refcoco", "unc", "ViT-B-16", "openai")
    assert (paper.image_size, paper.max_words, paper.batch_size, paper.epochs, paper.warmup_epochs) == (576, 17, 32, 100, 10)
    assert (paper.lr, paper.weight_decay) == (1e-5, 5e-4)
    assert parse_args(["--preset", "refcocog-vitb"]).max_words == 22
    assert parse_args(["--preset", "refcoco-vitl"]).image_size == 532
    assert parse_args(["--preset", "ablation-vitb"]).image_size == 480
    assert parse_args(["--preset", "refcoco-vitb", "--lr", "2e-5"]).lr == 2e-5  # flags after a preset win
    assert preset("refcoco-vitb", image_size=480).image_size == 480
    assert set(PRESETS) >= {"demo", "refcoco-vitb", "refcoco+-vitb", "refcocog-vitb", "refcoco-vitl"}


def test_every_ablation_switch_is_a_flag():
    cfg = parse_args(["--no-lmvsd", "--no-share-weights", "--no-masking", "--supervision", "ground_truth",
                      "--vmlsd-top-k", "0.75", "--vmlsd-ratio", "0.25", "--vmlsd-weight", "0.5", "--target", "hard"])
    m = cfg.masksd_config()
    assert not m.lmvsd.enabled and m.vmlsd.enabled
    assert (m.vmlsd.top_k, m.vmlsd.ratio, m.vmlsd.weight) == (0.75, 0.25, 0.5)
    assert not m.share_weights and not m.masking and m.supervision == "ground_truth" and m.target == "hard"
    baseline = parse_args(["--baseline"]).masksd_config()
    assert not baseline.lmvsd.enabled and not baseline.vmlsd.enabled
    assert parse_args(["--pretrained", "none"]).pretrained is None


def test_issue_18_switches_are_flags_and_the_maskris_recipe_a_masksd_preset():
    cfg = parse_args(["--teacher-gradient", "flow", "--lmvsd-select", "bottom", "--lmvsd-site", "features", "--vmlsd-select", "bottom"])
    m = cfg.masksd_config()
    assert (m.teacher_gradient, m.lmvsd.select, m.lmvsd.site, m.vmlsd.select, m.vmlsd.site) == ("flow", "bottom", "features", "bottom", "embedding")
    d = parse_args([]).masksd_config()
    assert (d.teacher_gradient, d.lmvsd.select, d.lmvsd.site) == ("detach", "top", "embedding")
    with pytest.raises(SystemExit):  # MaskRIS replaces words by [MASK]; CLIP's tokenizer has none
        parse_args(["--masksd-preset", "maskris"])
    maskris = parse_args(["--masksd-preset", "maskris", "--vmlsd-site", "embedding"])  # the documented substitute
    assert maskris.masksd_config() == MaskSDConfig.maskris(vmlsd=BranchConfig.vmlsd(**{**MASKRIS_BRANCHES["vmlsd"], "site": "embedding"}))
    assert maskris.model == TrainConfig().model
    assert masksd_preset("maskris") == {
        "masksd.lmvsd.site": "input", "masksd.lmvsd.top_k": 1.0, "masksd.lmvsd.ratio": 0.75, "masksd.lmvsd.weight": 0.5,
        "masksd.vmlsd.site": "input", "masksd.vmlsd.top_k": 1.0, "masksd.vmlsd.ratio": 0.15, "masksd.vmlsd.weight": 0.5,
        "masksd.vmlsd.min_masked": 0, "masksd.vmlsd.draw": "bernoulli", "masksd.views": "combined",
    }
    assert masksd_preset("paper") == {}
    paper_run = parse_args(["--preset", "ablation-vitb", "--masksd-preset", "maskris", "--vmlsd-site", "embedding", "--lmvsd-ratio", "0.5"])
    assert paper_run.image_size == 480 and paper_run.masksd.lmvsd.ratio == 0.5 and paper_run.masksd.vmlsd.ratio == 0.15  # flags win
    with pytest.raises(SystemExit):
        parse_args(["--vmlsd-site", "features"])  # VMLSD has no feature maps
    with pytest.raises(SystemExit):
        parse_args(["--teacher-gradient", "flow", "--target", "hard"])
    with pytest.raises(ValueError, match="masksd preset must be one of"):
        masksd_preset("amlris")


def test_bad_flags_exit_with_a_message_naming_them(capsys):
    for argv, name in [(["--lmvsd-top-k", "0"], "lmvsd.top_k"), (["--epochs", "0"], "epochs"),
                       (["--dataset", "coco"], "--dataset"), (["--batch-size", "x"], "--batch-size")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert name in capsys.readouterr().err


def test_epoch_sampler_splits_batches_across_ranks_and_resumes_mid_epoch():
    full = EpochSampler(50, batch_size=8, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert len(order) == 6 * 8 and len(set(order)) == 48  # whole batches, no repeats
    ranks = [EpochSampler(50, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    for step in range(6):  # the two ranks' halves make up exactly the single-process batch
        assert per_rank[0][4 * step : 4 * step + 4] + per_rank[1][4 * step : 4 * step + 4] == order[8 * step : 8 * step + 8]
    full.set_epoch(2, skip_batches=4)
    assert list(full) == order[32:]
    full.set_epoch(3)
    assert list(full) != order
    with pytest.raises(ValueError, match="divisible"):
        EpochSampler(50, 7, world_size=2)


def test_shard_sampler_covers_everything_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_warmup_then_cosine():
    factors = [warmup_cosine(s, 10, 110) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5) and factors[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_optimizer_scales_backbone_lr_and_skips_frozen_parameters():
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1), "frozen": torch.nn.Linear(2, 2)})
    model["frozen"].requires_grad_(False)
    opt = build_optimizer(model, 1e-3, 5e-4, backbone_lr_scale=0.1, backbone_prefixes=("backbone.",))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    with pytest.raises(ValueError, match="match no trainable"):
        build_optimizer(model, 1e-3, 0.0, 0.1, ("visual.",))


def test_backbone_lr_scale_reaches_clips_towers():
    from examples.cris import CRIS, CRISConfig
    from examples.pipeline.factory import BACKBONE_PREFIXES
    from masksd import MaskSD

    model = MaskSD(CRIS(CRISConfig.tiny()))
    opt = build_optimizer(model, 1e-3, 0.0, 0.1, BACKBONE_PREFIXES)
    backbone = {id(p) for p in model.segmenter.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in opt.param_groups[1]["params"]} == backbone and opt.param_groups[1]["lr"] == 1e-4
    assert not backbone & {id(p) for p in opt.param_groups[0]["params"]}


def test_atomic_checkpoint_round_trip_with_rng_states(tmp_path: Path):
    g = torch.Generator().manual_seed(1)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    state = {"model": {"w": torch.arange(3.0)}, "step": 4, "rng": rng_state(g)}
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g))
    save_atomic(state, tmp_path / "run" / "last.pt")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pt"]  # no temp file left
    loaded = load_checkpoint(tmp_path / "run" / "last.pt")
    set_rng_state(loaded["rng"], g)
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g)) == expected
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["step"] == 4


def test_checkpoint_errors_name_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)

    evil = tmp_path / "evil.pt"
    torch.save({"model": argparse.Namespace(x=1)}, evil)  # arbitrary objects are refused by weights_only loading
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(evil)


def test_resolve_device_names_the_argument():
    from examples.pipeline.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_masksd_flags_take_their_defaults_and_help_from_masksd_config(monkeypatch):
    import masksd.config
    from examples.pipeline.cli import flatten

    flat = flatten(parse_args([]))
    assert flat["masksd.vmlsd.ratio"] == 0.1 and flat["masksd.lmvsd.ratio"] == 0.25 and flat["masksd.threshold"] == 0.5
    assert parse_args(["--threshold", "0.3", "--target", "hard"]).masksd_config().threshold == 0.3
    # one place: a paper default changed in masksd.config changes the flag's default
    monkeypatch.setitem(masksd.config.PAPER_BRANCHES, "vmlsd", {**masksd.config.PAPER_BRANCHES["vmlsd"], "ratio": 0.2})
    assert parse_args([]).masksd.vmlsd.ratio == 0.2
    assert parse_args(["--vmlsd-top-k", "0.7"]).masksd.vmlsd.ratio == 0.2


def test_flag_choices_and_help_come_from_the_configs():
    from typing import get_args

    from examples.pipeline.cli import add_dataclass_arguments
    from examples.pipeline.config import DATASETS
    from examples.pipeline.distributed import Device
    from examples.pipeline.evaluation import Amp
    from masksd.config import Supervision, Target
    from masksd.data import RESIZE_MODES, SplitBy

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    by_flag = {flag: a for a in parser._actions for flag in a.option_strings}
    expected = {"--supervision": get_args(Supervision), "--target": get_args(Target), "--amp": get_args(Amp),
                "--device": get_args(Device), "--dataset": DATASETS, "--resize": RESIZE_MODES,
                "--split-by": (*get_args(SplitBy), None)}
    for flag, choices in expected.items():
        assert tuple(by_flag[flag].choices) == tuple(choices), flag
    # every flag documents itself from field metadata (no source files needed)
    assert all(a.help and not a.help.startswith(" (default") for a in by_flag.values())
    for flag in ("--no-lmvsd", "--lmvsd-top-k", "--vmlsd-weight", "--no-share-weights", "--threshold", "--baseline"):
        assert flag in by_flag, flag


def test_checkpointed_config_round_trips_and_unknown_keys_warn():
    from dataclasses import asdict

    cfg = parse_args(["--no-vmlsd", "--lmvsd-ratio", "0.5", "--preset", "refcoco-vitb"])
    assert TrainConfig.from_dict(asdict(cfg)) == cfg
    with pytest.warns(UserWarning, match="lmvsd_top_k"):
        TrainConfig.from_dict({**asdict(cfg), "lmvsd_top_k": 0.5})


def test_presets_and_the_factory_read_one_table_of_cris_variants():
    from examples.cris import CRISConfig
    from examples.cris.config import VARIANTS
    from examples.pipeline.factory import cris_config

    assert cris_config(TrainConfig()) == CRISConfig.tiny(max_words=17, pretrained="masksd-tiny-synthetic")
    for name, variant in (("refcoco-vitb", "vitb-576"), ("refcoco-vitl", "vitl-532"), ("ablation-vitb", "vitb-480")):
        cfg = preset(name)
        assert (cfg.model, cfg.image_size) == (VARIANTS[variant]["model_name"], VARIANTS[variant]["image_size"])
        assert cris_config(cfg) == CRISConfig.variant(variant, pretrained="openai", max_words=cfg.max_words)
    assert preset("demo", **{"masksd.vmlsd.ratio": 0.3}).masksd.vmlsd.ratio == 0.3
    with pytest.raises(ValueError, match="variant"):
        CRISConfig.variant("vit-huge")


def test_version_is_written_once():
    from importlib.metadata import version

    import masksd

    assert version("masksd") == masksd.__version__
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]


def test_a_flag_can_undo_what_a_preset_switched():
    cfg = parse_args(["--preset", "refcoco-vitb", "--no-tensorboard", "--eval-untrained", "--no-eval-guidance"])
    assert (cfg.tensorboard, cfg.eval_untrained, cfg.eval_guidance) == (False, True, False)
    assert parse_args(["--lmvsd", "--no-vmlsd"]).masksd_config().vmlsd.enabled is False


def test_every_choice_flag_and_field_is_checked_against_its_literal():
    from typing import get_args

    from examples.cris.config import DeepLevel
    from masksd.config import NormStats
    from masksd.data import RESTORE_METHODS, TextKey

    parser = argparse.ArgumentParser()
    from examples.pipeline.cli import add_dataclass_arguments

    add_dataclass_arguments(parser, TrainConfig)
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for flag, choices in {"--text-key": get_args(TextKey), "--restore": RESTORE_METHODS, "--deep-level": get_args(DeepLevel),
                          "--branch-norm-stats": get_args(NormStats)}.items():
        assert tuple(by_flag[flag].choices) == tuple(choices), flag
    for name, bad in (("restore", "nearest"), ("resize", "crop"), ("split_by", "other"), ("text_key", "tokens"),
                      ("deep_level", "last"), ("amp", "fp8"), ("device", "tpu"), ("dataset", "coco")):
        with pytest.raises(ValueError, match=name):
            preset("demo", **{name: bad})
    for name, bad in (("lr", float("nan")), ("weight_decay", -1.0), ("grad_clip", float("inf")), ("distill_ramp", 2.0)):
        with pytest.raises(ValueError, match=name):
            preset("demo", **{name: bad})


def test_a_masksd_01_checkpoint_config_keeps_its_masksd_settings():
    from dataclasses import asdict

    old = {k: v for k, v in asdict(TrainConfig()).items() if k != "masksd"}
    old.update(lmvsd=True, vmlsd=False, lmvsd_top_k=0.7, lmvsd_ratio=0.5, lmvsd_weight=0.25, vmlsd_top_k=0.5,
               vmlsd_ratio=0.1, vmlsd_weight=0.1, share_weights=False, masking=True, supervision="distill", target="hard")
    cfg = TrainConfig.from_dict(old)
    m = cfg.masksd_config()
    assert (m.lmvsd.top_k, m.lmvsd.ratio, m.lmvsd.weight, m.vmlsd.enabled) == (0.7, 0.5, 0.25, False)
    assert (m.share_weights, m.target, m.vmlsd.min_masked) == (False, "hard", 0)  # those runs masked literally


def test_runtime_fields_are_marked_in_the_configs():
    from examples.pipeline.config import runtime_fields
    from examples.pipeline.pretrain import PretrainConfig

    train = runtime_fields(TrainConfig)
    assert {"output", "resume", "eval_every", "restore", "eval_guidance", "workers"} <= train
    assert not {"lr", "seed", "epochs", "dataset", "masksd", "pretrained"} & train
    assert {"output", "eval_every"} <= runtime_fields(PretrainConfig)


def test_shipped_weights_refuse_another_model_by_name():
    from examples.cris import CRIS, CRISConfig

    with pytest.raises(ValueError, match="masksd-tiny-synthetic.*ViT-B-16"):
        CRIS(CRISConfig(model_name="ViT-B-16", pretrained="masksd-tiny-synthetic", image_size=64))
