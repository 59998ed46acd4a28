"""--model clipseg: transformers' CLIPSeg through the same training, validation, evaluation and prediction
scripts as CRIS, and the trained weights exported to a plain CLIPSeg that needs no masksd."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from examples.clipseg import CLIPSegRIS, CLIPSegRISConfig
from examples.pipeline.checkpoint import load_checkpoint
from examples.pipeline.config import TrainConfig
from examples.pipeline.factory import load_segmenter
from examples.pipeline.trainer import train
from masksd import bare_state_dict, verify_segmenter

transformers = pytest.importorskip("transformers")


def tiny(output: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        model="clipseg", pretrained=None, synthetic_train_size=64, synthetic_eval_size=16, batch_size=8, epochs=2,
        warmup_epochs=0.5, workers=0, log_every=1, progress=False, overlays=1, eval_every=8, output=str(output),
    )
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def clipseg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clipseg_job")
    return out, train(tiny(out))


def test_clipseg_trains_validates_and_checkpoints_its_architecture(clipseg_run):
    out, result = clipseg_run
    assert result.steps == 16
    checkpoint = load_checkpoint(out / "last.pt")
    assert {"clipseg_config", "hf_config"} <= set(checkpoint) and "cris_config" not in checkpoint
    assert "branches.vmlsd.masker.mask_token" in checkpoint["model"]
    assert (out / "best.pt").is_file() and len((out / "eval_log.csv").read_text().splitlines()) == 3  # header + 2
    assert set(result.metrics) >= {"mIoU", "oIoU"} and "lmvsd_auc" in result.guidance
    assert "vmlsd_precision" not in result.guidance  # word guidance needs a word_mask, which only CRIS has
    model = result.model.segmenter
    frozen = [n for n, p in model.named_parameters() if n.startswith("towers.")]
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("towers."))
    with Image.open(out / "overlay_00.png") as im:
        assert im.width > 4 * 64


def test_clipseg_checkpoint_evaluates_and_predicts_through_the_scripts(clipseg_run, tmp_path):
    from tests.checkpoint_scripts import check_evaluate_and_predict

    out, result = clipseg_run
    check_evaluate_and_predict(out / "last.pt", result.metrics, tmp_path)


def test_trained_clipseg_exports_to_a_plain_clipseg_without_masksd(clipseg_run, tmp_path):
    out, result = clipseg_run
    trained, _ = load_segmenter(out / "last.pt")
    # The documented export: load the bare weights into the adapter, whose .model is the plain CLIPSeg.
    fresh = CLIPSegRIS(CLIPSegRISConfig(), hf_config=load_checkpoint(out / "last.pt")["hf_config"])
    fresh.load_state_dict(bare_state_dict(load_checkpoint(out / "last.pt")["model"]))
    fresh.model.save_pretrained(tmp_path / "export")
    plain = transformers.CLIPSegForImageSegmentation.from_pretrained(tmp_path / "export").eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = trained.tokenize(["the red cube", "a small ball on the left"])
    with torch.no_grad():
        expected = result.model.eval()(images, texts)  # MaskSD's eval output of the trained model
        assert torch.equal(trained(images, texts), expected)
        assert torch.equal(plain(pixel_values=images, **texts).logits[:, None], expected)


def test_clipseg_ris_passes_the_checker_and_refuses_crisis_weights(tmp_path):
    torch.manual_seed(0)
    segmenter = CLIPSegRIS()
    texts = segmenter.tokenize(["the red cube on the left", "a ball"])
    images = torch.randn(2, 3, 64, 64)
    report = verify_segmenter(segmenter, images, texts, reference=lambda x, t: segmenter.model(pixel_values=x, **t).logits)
    assert not report.skipped
    assert segmenter.token_strings(texts["input_ids"][1]) == ["<start_of_text>", "a", "ball", "<end_of_text>"]
    from examples.pipeline.factory import build_segmenter

    with pytest.raises(ValueError, match="--pretrained masksd-tiny-synthetic holds CLIP weights for CRIS"):
        build_segmenter(tiny(tmp_path, pretrained="masksd-tiny-synthetic"))
    with pytest.raises(FileNotFoundError, match="not a folder: pass a local CLIPSeg snapshot"):
        build_segmenter(tiny(tmp_path, pretrained=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="texts\\[1\\] must be a non-empty string"):
        segmenter.tokenize(["ok", "  "])


def test_a_local_snapshot_trains_through_the_script_and_keeps_its_processors_normalisation(tmp_path):
    from tests.hf_snapshot import IMAGENET_MEAN, IMAGENET_STD, write_clipseg_snapshot

    snapshot = write_clipseg_snapshot(tmp_path / "clipseg-snapshot")
    segmenter = CLIPSegRIS(CLIPSegRISConfig(pretrained=str(snapshot)))
    plain = transformers.CLIPSegForImageSegmentation.from_pretrained(snapshot).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # in [0, 1]
    clip_normalised = (pixels - torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]) / torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    imagenet_normalised = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    texts = segmenter.tokenize(["the red cube", "a ball"])
    assert texts["input_ids"][1, :4].tolist() == [49406, 320, 1069, 49407]  # the snapshot's own CLIPTokenizer
    with torch.no_grad():
        ours = segmenter.eval()(clip_normalised, texts)
        theirs = plain(pixel_values=imagenet_normalised, **texts).logits[:, None]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # the pipeline's CLIP statistics mapped to the processor's

    cfg = tiny(tmp_path / "run", pretrained=str(snapshot), synthetic_train_size=16, synthetic_eval_size=8, epochs=1,
               eval_every=0, overlays=0, eval_untrained=False, eval_guidance=False)
    result = train(cfg)
    assert result.steps == 2 and "mIoU" in result.metrics
    reloaded, run = load_segmenter(tmp_path / "run" / "last.pt")
    assert run["pretrained"] == str(snapshot) and reloaded.config.pretrained == str(snapshot)
