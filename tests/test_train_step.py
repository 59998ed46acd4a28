"""The training step the trainer takes is the step every benchmark times (examples.pipeline.step), and the
benchmark's figures obey what they claim (tiny model; nothing is timed here)."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import common, train_step
from examples.cris import CRISConfig
from examples.pipeline import trainer
from examples.pipeline.config import TrainConfig, preset
from examples.pipeline.distributed import process_group
from examples.pipeline.factory import build_segmenter, cris_config, random_init
from examples.pipeline.step import GraphBreaks, TrainStep
from masksd import MaskSDConfig


def _tiny(output: Path, **overrides) -> TrainConfig:
    return TrainConfig(synthetic_train_size=64, synthetic_eval_size=16, batch_size=8, epochs=2, warmup_epochs=0.5, workers=0,
                       log_every=1, progress=False, overlays=0, output=str(output), **overrides)


def test_the_benchmark_times_the_trainers_step(tmp_path):
    """From the same weights, batch and random state, two steps of benchmarks.train_step.Bench leave exactly the
    weights, optimiser state and losses two steps of the trainer leave, with a backbone learning-rate scale,
    gradient clipping and bf16 autocast in play: the benchmark's step is the trainer's."""
    cfg = _tiny(tmp_path, amp="bf16", grad_clip=0.5, backbone_lr_scale=0.1, pretrained=None)
    with process_group("cpu") as env:
        run = trainer._Run(cfg, env)
        batches = [next(iter(run._loader(0))), next(iter(run._loader(1)))]
        warmup = round(cfg.warmup_epochs * run.steps_per_epoch)
        bench = train_step.Bench(cfg, cfg.batch_size, torch.device("cpu"), {"CM-MaskSD": run.model.config},
                                 segmenter=copy.deepcopy(run.model.segmenter), schedule=(warmup, run.total_steps))
        model = bench.models["CM-MaskSD"]
        model.load_state_dict(run.model.state_dict())
        assert type(bench.train_step) is type(run.train_step) is TrainStep
        groups = lambda opt: [{k: v for k, v in g.items() if k != "params"} | {"size": len(g["params"])}  # noqa: E731
                              for g in opt.param_groups]
        assert groups(bench.optimizer) == groups(run.optimizer) and len(run.optimizer.param_groups) == 2  # backbone at 0.1x
        assert run.optimizer.param_groups[0]["fused"] is True

        for batch in batches:
            bench.images, bench.tokens, bench.masks = run._inputs(batch)
            bench.generator = torch.Generator().set_state(run.generator.get_state())
            torch.manual_seed(7)  # dropout
            trained = run._train_step(batch)  # the trainer's own step: (loss, seg, lmvsd, vmlsd, guard's count), logged every step
            trained, nonfinite = trained[:-1], trained[-1]
            assert nonfinite == 0  # the divergence guard saw only finite losses
            run.step += 1
            torch.manual_seed(7)
            benched = bench.train_step(lambda: bench.losses("CM-MaskSD"))
            assert torch.equal(trained, torch.stack([benched[k].detach().float() for k in run.log_fields]))
        ours, theirs = model.state_dict(), run.model.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert bench.train_step.scheduler.get_last_lr() == run.scheduler.get_last_lr()
        first = next(p for p in run.model.parameters() if p.requires_grad)
        mine = dict(model.named_parameters())[next(n for n, p in run.model.named_parameters() if p is first)]
        assert torch.equal(bench.optimizer.state[mine]["exp_avg"], run.optimizer.state[first]["exp_avg"])


def test_random_init_builds_what_the_presets_weights_build():
    """A benchmark of a preset builds its network from random weights with the activation its weights were trained
    with: QuickGELU for OpenAI's CLIP, GELU for the shipped tiny one; --quick-gelu reaches the segmenter."""
    vitb = random_init(preset("ablation-vitb"))
    assert vitb.pretrained is None and vitb.quick_gelu is True and cris_config(vitb).quick_gelu is True
    demo = random_init(preset("demo"))
    assert demo.pretrained is None and demo.quick_gelu is False
    assert build_segmenter(replace(demo, quick_gelu=True)).config.quick_gelu is True
    assert cris_config(preset("demo", quick_gelu=True, fast_head=True)).fast_head is True


def test_clipseg_refuses_cris_switches():
    for flag in ({"quick_gelu": True}, {"fast_head": True}):
        cfg = TrainConfig(model="clipseg", pretrained=None, **flag)
        with pytest.raises(ValueError, match="CRIS's switch"):
            from examples.pipeline.factory import clipseg_config

            clipseg_config(cfg)


def test_graph_breaks_are_collected_with_their_site_and_not_printed(capsys):
    def draw(x, generator):
        return x.sin() + torch.rand(3, generator=generator)  # a generator is a graph break for dynamo

    with GraphBreaks() as breaks:
        torch.compile(draw, backend="eager")(torch.ones(3), torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    assert sum(breaks.sites.values()) == 1
    site = next(iter(breaks.sites))
    assert site.startswith("tests/test_train_step.py:") and "generator" not in capsys.readouterr().err.lower()
    assert "1 graph breaks" in breaks.summary()


def test_the_trainer_reports_what_compile_made_of_its_first_step(tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(trainer._Run, "compile_model", lambda self: compiled.append(self.cfg.compile_scope))
    trainer.train(_tiny(tmp_path, compile=True, compile_scope="step", max_steps=2, eval_untrained=False), evaluate_at_end=False)
    assert compiled == ["step"]
    assert capsys.readouterr().out.count("torch.compile:") == 1  # after the first step only


def test_train_step_measures_every_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    train_step.main(["--batch", "4", "--warmup", "1", "--rounds", "2", "--device", "cpu"])
    written = list(tmp_path.glob("train_step_cpu_masksd-tiny_64.*"))
    assert sorted(p.suffix for p in written) == [".json", ".md"]
    text = (tmp_path / "train_step_cpu_masksd-tiny_64.md").read_text()
    for name in train_step.VARIANTS:
        assert f"| {name} |" in text
    data = json.loads((tmp_path / "train_step_cpu_masksd-tiny_64.json").read_text())
    assert data["preset"] == "demo" and data["quick_gelu"] is False and "benchmarks.train_step" in data["command"]


def test_train_step_variants_keep_the_baseline_and_drop_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    train_step.main(["--batch", "2", "--warmup", "1", "--rounds", "1", "--device", "cpu", "--variants", "both, checkpointed"])
    data = json.loads((tmp_path / "train_step_cpu_masksd-tiny_64.json").read_text())
    assert list(data["variants"]) == ["baseline", "both, checkpointed"]


def test_train_step_flops_scale_with_the_batch():
    cfg, variants = preset("demo", pretrained=None), {"baseline": MaskSDConfig.baseline()}
    segmenter = build_segmenter(cfg)
    small, large = (train_step.Bench(cfg, b, torch.device("cpu"), variants, segmenter=segmenter) for b in (4, 8))
    assert large.flops("baseline") == 2 * small.flops("baseline") > 0


def test_train_step_run_config_overrides_the_preset():
    cfg = train_step.run_config("ablation-vitb", model="ViT-L-14", amp="none")
    assert (cfg.model, cfg.image_size, cfg.amp, cfg.lr) == ("ViT-L-14", CRISConfig.variant("vitl-532").image_size, "none", 1e-5)
    assert train_step.run_config("demo", size=96).image_size == 96


def test_bf16_peak_lookup_takes_the_most_specific_name():
    from benchmarks.train_step import peak_for_name

    assert peak_for_name("NVIDIA H200") == ("H200", 989e12)
    assert peak_for_name("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert peak_for_name("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert peak_for_name("NVIDIA GH200 480GB") == ("GH200", 989e12)
    assert peak_for_name("Tesla T4") is None
