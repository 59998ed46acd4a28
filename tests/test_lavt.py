"""The LAVT-style segmenter (examples/lavt) at its tiny size: the fused protocol, MaskSD on it, its snapshot loading,
and --model lavt through the training, evaluation and prediction scripts."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from examples.lavt import LAVT, LAVTConfig  # noqa: E402
from examples.pipeline.checkpoint import load_checkpoint, save_atomic  # noqa: E402
from examples.pipeline.config import TrainConfig  # noqa: E402
from masksd import BranchConfig, MaskSD, MaskSDConfig, verify_segmenter  # noqa: E402

SENTENCES = ["the red circle left of the large blue square", "a dog"]
SEGMENTER_GUIDED = MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter"), vmlsd=BranchConfig(guidance="segmenter"))


@pytest.fixture(scope="module")
def built() -> LAVT:
    torch.manual_seed(0)
    return LAVT(LAVTConfig())


def tiny(built: LAVT) -> LAVT:
    """A fresh copy of the tiny LAVT (building one costs more than copying it)."""
    return copy.deepcopy(built)


def batch(model: LAVT, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    truth = torch.zeros(2, 1, 64, 64)
    truth[0, :, :32, :32] = 1
    truth[1, :, 16:, 32:] = 1
    return images, model.tokenize(SENTENCES), truth


def test_fused_protocol_shapes_and_forward(built):
    model = tiny(built).eval()
    images, texts, _ = batch(model)
    assert model.token_strings(texts["input_ids"][1]) == ["[CLS]", "a", "d", "##o", "##g", "[SEP]"]  # any text spells out
    with torch.no_grad():  # as the forward below: kernels may differ with autograd on
        image_embedded, text_embedded = model.embed_image(images), model.embed_text(texts)
        visual, text = model.encode(image_embedded, text_embedded)
        logits = model(images, texts)
        assert torch.equal(logits, model.decode_head(visual, text))
    assert logits.shape == (2, 1, 64, 64)  # LAVT upsamples to the input
    assert image_embedded.tokens.shape == (2, 256, 16) and image_embedded.grid == (16, 16)  # patch 4 on 64 px
    assert text_embedded.tokens.shape == (2, 20, 32)
    assert text_embedded.candidates[1].tolist() == [False] + [True] * 4 + [False] * 15  # not [CLS], [SEP], padding
    assert [tuple(m.shape) for m in visual.context.maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert visual.tokens is None and visual.pooled is None and text.tokens.shape == (2, 20, 32)
    relevance = model.relevance("vmlsd", visual, text)
    assert relevance.shape == (2, 20) and torch.all(relevance[1, 6:] == 0)  # padding gets no attention
    assert model.relevance("lmvsd", visual, text).shape == (2, 256)  # stage 1 among the stages: the patch grid
    model.config = replace(model.config, relevance_stages=(3, 4))  # coarser stages only: their grid, which tiles the patches'
    assert model.relevance("lmvsd", visual, text).shape == (2, 4, 4)


def test_verify_segmenter_passes(built):
    model = tiny(built)
    images, texts, _ = batch(model)
    report = verify_segmenter(model, images, texts, config=SEGMENTER_GUIDED)
    assert report.skipped == ["reference"], report  # no library model of LAVT to compare with
    assert {"composition", "eval_parity", "leak", "relevance", "feature_maps", "unused_parameters"} <= {c.name for c in report.checks}


def test_the_wrapped_eval_output_is_the_bare_one(built):
    model = tiny(built)
    images, texts, _ = batch(model)
    prediction = MaskSDConfig(lmvsd=BranchConfig(guidance="prediction"), vmlsd=BranchConfig(top_k=1.0))
    for config in (SEGMENTER_GUIDED, prediction, MaskSDConfig.maskris()):
        wrapped = MaskSD(model, config, inputs=InputSpec_for(model)).eval()
        with torch.no_grad():
            assert torch.equal(wrapped(images, texts), model.eval()(images, texts))


def InputSpec_for(model: LAVT):
    from masksd import InputSpec

    return InputSpec.from_tokenizer(model.tokenizer, patch_size=8)


def test_one_masksd_step_reaches_every_trainable_parameter_and_both_mask_tokens(built):
    model = tiny(built)  # verify_segmenter checks the same under PWAM's guidance; here LMVSD follows the prediction
    images, texts, truth = batch(model)
    config = MaskSDConfig(lmvsd=BranchConfig(guidance="prediction"), vmlsd=BranchConfig(guidance="segmenter"))
    wrapped = MaskSD(model, config).train()
    out = wrapped(images, texts, truth, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.image_masked.sum(dim=1).tolist() == [32, 32]  # α 0.25 of K 0.5 of 256 patches
    assert out.text_masked.sum(dim=1).tolist() == [1, 1]  # VMLSD masks at least one word
    dead = [n for n, p in wrapped.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert dead == []
    assert wrapped.branches["lmvsd"].masker.mask_token.grad.abs().sum() > 0
    assert wrapped.branches["vmlsd"].masker.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("config", [
    MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter", site="features"), vmlsd=BranchConfig(guidance="segmenter")),
    replace(SEGMENTER_GUIDED, share_weights=False, branch_norm_stats="freeze", checkpoint_branches=True),
    replace(SEGMENTER_GUIDED, supervision="ground_truth", target="hard"),
    MaskSDConfig(lmvsd=BranchConfig(top_k=1.0, draw="bernoulli"), vmlsd=BranchConfig(top_k=1.0), views="combined"),
    MaskSDConfig.maskris(),
], ids=["features-site", "separate-heads-frozen-bn-checkpointed", "ground-truth", "random-combined", "maskris"])
def test_every_masksd_switch_trains_a_step_on_lavt(built, config):
    from examples.pipeline.factory import input_spec

    model = tiny(built)
    images, texts, truth = batch(model)
    wrapped = MaskSD(model, config, inputs=input_spec(model, 64)).train()
    out = wrapped(images, texts, truth, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss > out.seg_loss  # a masked view added its loss
    assert all(p.grad is not None for p in wrapped.segmenter.decode_head.parameters())


def test_relevance_guides_lmvsd_to_the_patches_pwam_scores_highest(built):
    model = tiny(built).eval()
    images, texts, truth = batch(model)
    wrapped = MaskSD(model, MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter", ratio=1.0), vmlsd=BranchConfig(enabled=False)))
    with torch.no_grad():
        scores = model.relevance("lmvsd", *model.encode(model.embed_image(images), model.embed_text(texts)))  # (B, N)
        image_masked, _ = wrapped.masked_tokens(images, texts)
    top = scores.argsort(dim=1, descending=True, stable=True)[:, :128]  # K = 0.5 of 256, α = 1: exactly the top half
    expected = torch.zeros_like(image_masked).scatter_(1, top, True)
    assert torch.equal(image_masked, expected)


def test_config_and_inputs_are_checked_by_name(built, tmp_path):
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        LAVTConfig(image_size=48)
    with pytest.raises(ValueError, match="smaller than Swin's window 4: use image_size >= 128"):
        LAVT(LAVTConfig(tiny_window=4))
    with pytest.raises(FileNotFoundError, match=r"lacks \['swin', 'bert'\]"):
        LAVTConfig(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="relevance_stages must be distinct stages among 1-4"):
        LAVTConfig(relevance_stages=(2, 2))
    model = tiny(built)
    with pytest.raises(ValueError, match="texts\\[1\\] must be a non-empty string"):
        model.tokenize(["ok", " "])
    with pytest.warns(UserWarning, match="1 of 2 expressions in this batch need more than the 20 token positions"):
        cut = model.tokenize(["a dog", "the " * 30])  # [CLS] 30 words [SEP]: 32 positions
    assert cut["input_ids"][1, -1] == model.tokenizer.sep_token_id and model.truncation.summary().startswith("1 of 2 expressions")
    with pytest.raises(TypeError, match="texts must be the tokenizer's mapping"):
        model.embed_text(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 64 px"):
        model.embed_image(torch.randn(1, 3, 32, 32))


def test_a_local_snapshot_loads_its_weights_tokenizer_and_normalisation(tmp_path):
    from tests.hf_snapshot import IMAGENET_MEAN, IMAGENET_STD, write_lavt_snapshot

    snapshot = write_lavt_snapshot(tmp_path / "lavt-snapshot")
    model = LAVT(LAVTConfig(pretrained=str(snapshot))).eval()
    swin = transformers.SwinModel.from_pretrained(snapshot / "swin").eval()
    bert = transformers.BertModel.from_pretrained(snapshot / "bert", add_pooling_layer=False).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from masksd.data import CLIP_MEAN, CLIP_STD

    clip = (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    texts = model.tokenize(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_image(clip).tokens, swin.embeddings(imagenet)[0])  # the processor's statistics
        words = model.encode(model.embed_image(clip), model.embed_text(texts))[1].tokens
        assert torch.equal(words, bert(**texts).last_hidden_state)  # BERT's own forward, bit for bit
    assert model.swin_config.drop_path_rate == 0.3  # LAVT's, over the snapshot's

    from examples.pipeline.factory import load_segmenter
    from examples.pipeline.trainer import train

    result = train(run_config(tmp_path / "run", pretrained=str(snapshot), max_steps=1, eval_every=0, overlays=0, eval_guidance=False))
    assert result.steps == 1 and "mIoU" in result.metrics
    reloaded, run = load_segmenter(tmp_path / "run" / "last.pt")  # the architecture from the checkpoint, the tokenizer from the snapshot
    assert run["pretrained"] == str(snapshot) and reloaded.config.pretrained == str(snapshot)
    assert reloaded.renormalise.scale.flatten().tolist() == pytest.approx((torch.tensor(CLIP_STD) / torch.tensor(IMAGENET_STD)).tolist())
    # the trainer's export keeps the tokenizer and image statistics beside the weights: it predicts the same with the
    # snapshots gone
    snapshot.rename(tmp_path / "gone")
    from_export, _ = load_segmenter(tmp_path / "run" / "export")
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["lavt_config"]["pretrained"] is None
    with torch.no_grad():
        assert torch.equal(from_export(clip, from_export.tokenize(SENTENCES)), reloaded(clip, texts))


# ------------------------------------------------------------------------------------------------ the pipeline
def run_config(output: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        model="lavt", pretrained=None, synthetic_train_size=16, synthetic_eval_size=8, batch_size=8, epochs=1,
        warmup_epochs=0.5, workers=0, log_every=1, progress=False, overlays=1, eval_every=1, eval_untrained=False,
        output=str(output), masksd=SEGMENTER_GUIDED,
    )
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def lavt_run(tmp_path_factory):
    from examples.pipeline.trainer import train

    out = tmp_path_factory.mktemp("lavt_job")
    return out, train(run_config(out))


def test_lavt_trains_validates_checkpoints_and_measures_its_guidance(lavt_run):
    out, result = lavt_run
    assert result.steps == 2
    checkpoint = load_checkpoint(out / "last.pt")
    assert {"lavt_config", "hf_config"} <= set(checkpoint) and set(checkpoint["hf_config"]) == {"swin", "bert"}
    assert {"branches.lmvsd.masker.mask_token", "branches.vmlsd.masker.mask_token"} <= set(checkpoint["model"])
    assert (out / "best.pt").is_file() and len((out / "eval_log.csv").read_text().splitlines()) == 3  # header + 2
    assert set(result.metrics) >= {"mIoU", "oIoU"}
    assert {"lmvsd_auc", "vmlsd_precision"} <= set(result.guidance)  # PWAM's relevance, against the targets
    with Image.open(out / "overlay_00.png") as im:
        assert im.width > 4 * 64


def test_lavt_checkpoint_evaluates_and_predicts_through_the_scripts(lavt_run, tmp_path):
    from tests.checkpoint_scripts import check_evaluate_and_predict

    out, result = lavt_run
    check_evaluate_and_predict(out / "last.pt", result.metrics, tmp_path)
    (tmp_path / "export").mkdir()
    check_evaluate_and_predict(out / "export", result.metrics, tmp_path / "export")  # the random tiny LAVT's export


def test_a_checkpoint_of_another_model_is_refused_by_name(lavt_run, tmp_path):
    from dataclasses import asdict

    from examples.pipeline.factory import build_model, checkpoint_architecture, load_segmenter
    from examples.pipeline.trainer import train

    cris = TrainConfig(pretrained=None, output=str(tmp_path / "cris"))
    model = build_model(cris)  # a CRIS run's checkpoint, as the trainer writes it (no training needed)
    save_atomic({"model": model.state_dict(), "family": "MaskSD", "config": asdict(cris), **checkpoint_architecture(model.segmenter)},
                tmp_path / "cris.pt")
    with pytest.raises(ValueError, match=r"holds MaskSD around CRIS variant 'tiny' \(masksd-tiny, 64 px\), but --resume into "
                                         r"this run needs MaskSD around LAVT \(random tiny, 64 px\): \d+ of \d+ tensors do not match"):
        train(run_config(tmp_path / "b", resume=str(tmp_path / "cris.pt")), evaluate_at_end=False)
    out, _ = lavt_run
    trained, run = load_segmenter(out / "last.pt")
    assert isinstance(trained, LAVT) and run["model"] == "lavt"


def test_pipeline_options_cris_alone_has_are_refused_by_name(tmp_path):
    from examples.pipeline.factory import build_segmenter

    with pytest.raises(ValueError, match="--pretrained masksd-tiny-synthetic holds CLIP weights for CRIS; with --model lavt"):
        build_segmenter(run_config(tmp_path, pretrained="masksd-tiny-synthetic"))
    with pytest.raises(ValueError, match="--deep-level projected is CRIS's switch"):
        build_segmenter(run_config(tmp_path, deep_level="projected"))
    with pytest.raises(FileNotFoundError, match="lacks"):
        build_segmenter(run_config(tmp_path, pretrained=str(tmp_path)))


def test_the_tables_rows_train_lavt_from_scratch_each_paired_with_its_baseline(tmp_path):
    from benchmarks.ablation import ROWS, Settings, train_config
    from benchmarks.lavt_rows import LAVT_BASELINE

    settings = Settings(steps=400, scenes=200, split="val", eval_scenes=2000, lr=2e-3, backbone_lr_scale=1.0, best_of="test", eval_every=40)
    rows = ROWS["lavt"]
    configs = {name: train_config(row, 0, settings, tmp_path, {"scratch": None}) for name, row in rows.items()}
    assert all(c.model == "lavt" and c.pretrained is None and c.eval_split == "test" for c in configs.values())
    assert all(row.versus == LAVT_BASELINE for row in rows.values())
    m = {name: c.masksd_config() for name, c in configs.items()}
    assert not m[LAVT_BASELINE].lmvsd.enabled and not m[LAVT_BASELINE].vmlsd.enabled
    assert m["LAVT, MaskRIS recipe (input site)"] == MaskSDConfig.maskris()
    assert (m["LAVT, CM-MaskSD, guided by PWAM's attention"].lmvsd.guidance, m["LAVT, CM-MaskSD, guided by PWAM's attention"].vmlsd.guidance) == ("segmenter", "segmenter")
    assert m["LAVT, CM-MaskSD, LMVSD guided by the prediction"].lmvsd.guidance == "prediction"
    assert (m["LAVT, CM-MaskSD, K=1 (random)"].lmvsd.top_k, m["LAVT, CM-MaskSD, K=1 (random)"].vmlsd.top_k) == (1.0, 1.0)
    assert m["LAVT, CM-MaskSD, ground-truth supervision"].supervision == "ground_truth"
