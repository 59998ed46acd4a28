"""What the example scripts refuse from files a user did not make: checkpoints of another model (in
evaluate.py, predict.py and --resume), decompression-bomb images (predict.py), and refs pickles that
name Python globals unless --trust-refs-pickle."""

from __future__ import annotations

import collections
import pickle
from dataclasses import replace

import pytest
import torch

from examples.pipeline.checkpoint import describe_model, load_checkpoint, save_atomic
from examples.pipeline.config import TrainConfig
from examples.pipeline.factory import build_model, load_segmenter
from examples.pipeline.trainer import train
from tests.test_refer import UNC_REFS, png_claiming, write_refer_root

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def tiny(output, **overrides) -> TrainConfig:
    base = TrainConfig(synthetic_train_size=16, synthetic_eval_size=8, batch_size=8, epochs=1, warmup_epochs=0.5, workers=0,
                       progress=False, overlays=0, eval_untrained=False, eval_guidance=False, output=str(output))
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny(out, max_steps=1), evaluate_at_end=False)
    return out / "last.pt"


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    from examples.pipeline.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrain_run")
    pretrain(PretrainConfig(synthetic_train_size=16, synthetic_eval_size=8, batch_size=8, max_steps=1, eval_every=0,
                            workers=0, progress=False, output=str(out)))
    return out / "last.pt"


def mismatch(a: dict, b: dict) -> tuple[int, int, int]:
    """(missing, unexpected, reshaped) tensors of state ``b`` loaded into a model whose state is ``a``: the oracle."""
    return (len(a.keys() - b.keys()), len(b.keys() - a.keys()), sum(a[k].shape != b[k].shape for k in a.keys() & b.keys()))


def test_checkpoints_name_their_family_and_variant(tiny_run, pretrain_run):
    assert describe_model(load_checkpoint(tiny_run)) == "MaskSD around CRIS variant 'tiny' (masksd-tiny, 64 px)"
    assert describe_model(load_checkpoint(pretrain_run)) == "CLIPPretrainer (masksd-tiny at 64 px)"
    assert describe_model({"cris_config": {"model_name": "ViT-B-16", "image_size": 576}}) == "CRIS variant 'vitb-576' (ViT-B-16, 576 px)"
    assert describe_model({"model": {}}) == "a model whose family and architecture are not recorded"


def test_resume_of_another_cris_variant_is_one_error_naming_both_and_the_count(tiny_run, tmp_path):
    own, other = build_model(tiny(tmp_path)).state_dict(), build_model(tiny(tmp_path, image_size=32, pretrained=None)).state_dict()
    missing, unexpected, reshaped = mismatch(other, own)
    assert (missing, unexpected) == (0, 0) and reshaped > 0
    with pytest.raises(ValueError) as error:
        train(tiny(tmp_path / "b", image_size=32, pretrained=None, resume=str(tiny_run)), evaluate_at_end=False)
    message = str(error.value)
    assert message.startswith(
        f"checkpoint {tiny_run} holds MaskSD around CRIS variant 'tiny' (masksd-tiny, 64 px), but --resume into this run "
        f"needs MaskSD around CRIS (masksd-tiny, 32 px): {reshaped} of {len(own)} tensors do not match "
        f"(0 missing, 0 unexpected, {reshaped} of another shape; e.g. "
    )
    assert len(message) < 600  # a few examples, not a wall of state-dict keys


def test_resume_of_a_pretraining_checkpoint_names_the_other_family(pretrain_run, tmp_path):
    from examples.pipeline.pretrain import CLIPPretrainer

    own = build_model(tiny(tmp_path)).state_dict()
    theirs = CLIPPretrainer(build_model(tiny(tmp_path)).segmenter).state_dict()
    missing, unexpected, reshaped = mismatch(own, theirs)
    assert (missing, unexpected, reshaped) == (2, 1, 0)  # MaskSD's two mask tokens; CLIP's logit_scale
    total = len(own.keys() | theirs.keys())
    with pytest.raises(ValueError, match=(
        rf"checkpoint .*pretrain_run.*last\.pt holds CLIPPretrainer \(masksd-tiny at 64 px\), but --resume into this run needs "
        rf"MaskSD around CRIS variant 'tiny' \(masksd-tiny, 64 px\): 3 of {total} tensors do not match "
        rf"\(2 missing, 1 unexpected, 0 of another shape; e\.g\. branches\.lmvsd\.masker\.mask_token \(missing\)"
    )):
        train(tiny(tmp_path / "b", resume=str(pretrain_run)), evaluate_at_end=False)


@pytest.mark.parametrize("script", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_a_pretraining_checkpoint_by_name(pretrain_run, tmp_path, script):
    from examples.evaluate import main as evaluate_main
    from examples.predict import main as predict_main

    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (20, 10)).save(image)
    argv = {"evaluate": ["--workers", "0", "--no-progress"], "predict": ["--image", str(image), "--text", "a dog", "--output-dir", str(tmp_path)]}
    main = evaluate_main if script == "evaluate" else predict_main
    with pytest.raises(ValueError, match=r"holds CLIPPretrainer \(masksd-tiny at 64 px\), but evaluate\.py / predict\.py needs"
                                         r" MaskSD around CRIS variant 'tiny' \(masksd-tiny, 64 px\): 3 of \d+ tensors do not match"):
        main(["--checkpoint", str(pretrain_run), *argv[script]])
    assert not list(tmp_path.glob("*_mask.png"))


def test_weights_that_do_not_fit_their_own_cris_config_are_named(tiny_run, tmp_path):
    checkpoint = load_checkpoint(tiny_run)
    checkpoint["cris_config"]["image_size"] = 32  # a hand-edited or mixed-up checkpoint
    save_atomic(checkpoint, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"mixed\.pt holds weights that do not fit the model it records, MaskSD around CRIS "
                                         r"\(masksd-tiny, 32 px\): [1-9]\d* of \d+ tensors do not match \(0 missing, 0 unexpected"):
        load_segmenter(tmp_path / "mixed.pt")


def test_a_checkpoint_from_before_families_were_recorded_still_loads(tiny_run, tmp_path):
    checkpoint = load_checkpoint(tiny_run)
    del checkpoint["family"]
    save_atomic(checkpoint, tmp_path / "old.pt")
    segmenter, _ = load_segmenter(tmp_path / "old.pt")
    state = {k.removeprefix("segmenter."): v for k, v in checkpoint["model"].items() if k.startswith("segmenter.")}
    assert all(torch.equal(v, state[k]) for k, v in segmenter.state_dict().items())


def test_predict_refuses_a_decompression_bomb_by_name(tiny_run, tmp_path, capsys):
    from examples.predict import main as predict_main

    bomb = tmp_path / "bomb.png"
    png_claiming(bomb, 100_000, 100_000)
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", str(tiny_run), "--image", str(bomb), "--text", "a dog", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--image: image {bomb} is refused" in err and "MAX_IMAGE_PIXELS = 89,478,485" in err
    assert not list(tmp_path.glob("*_mask.png"))


def test_trust_refs_pickle_reaches_the_dataset_from_train_and_evaluate_flags(tiny_run, tmp_path, capsys):
    from examples.evaluate import main as evaluate_main
    from examples.pipeline.cli import field_help
    from examples.pipeline.factory import build_dataset
    from examples.train_cris_masksd import parse_args

    root = write_refer_root(tmp_path / "refer")
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:  # harmless, but a global all the same
        pickle.dump([collections.OrderedDict(ref) for ref in UNC_REFS], f)
    flags = ["--dataset", "refcoco", "--data-root", str(root)]
    assert parse_args(flags).trust_refs_pickle is False
    with pytest.raises(ValueError, match=r"names the Python global collections\.OrderedDict"):
        build_dataset(parse_args(flags), "val", train=False)
    with pytest.warns(UserWarning, match="published split"):  # the fixture's tiny split: loaded, and its counts warned about
        assert len(build_dataset(parse_args([*flags, "--trust-refs-pickle"]), "val", train=False)) == 2

    argv = ["--checkpoint", str(tiny_run), "--split", "val", "--workers", "0", "--no-progress", "--output", str(tmp_path / "e.json"), *flags]
    with pytest.raises(ValueError, match=r"names the Python global collections\.OrderedDict"):
        evaluate_main(argv)
    checkpoint = load_checkpoint(tiny_run)  # a run trained with the flag does not pass its trust on to other files
    checkpoint["config"]["trust_refs_pickle"] = True
    save_atomic(checkpoint, tmp_path / "trusting.pt")
    with pytest.raises(ValueError, match=r"names the Python global collections\.OrderedDict"):
        evaluate_main([*argv[:1], str(tmp_path / "trusting.pt"), *argv[2:]])
    with pytest.warns(UserWarning, match="published split"):
        assert evaluate_main([*argv, "--trust-refs-pickle"])["samples"] == 2
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--trust-refs-pickle" in shown and " ".join(field_help(TrainConfig, "trust_refs_pickle").split()) in shown
