"""A script's user errors are one line on stderr naming the argument or file, with exit status 2;
--debug shows the traceback. Also the model-level errors a script user meets first."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.pipeline.cli import run_script

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_script(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    return path


def test_predict_names_a_missing_truncated_or_foreign_checkpoint(capsys, tmp_path, image):
    from examples.predict import main

    base = ["--image", str(image), "--text", "the cat"]
    err = one_line_error(capsys, main, ["--checkpoint", str(tmp_path / "missing.pt"), *base])
    assert "checkpoint not found" in err and "missing.pt" in err
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    err = one_line_error(capsys, main, ["--checkpoint", str(tmp_path / "notes.pt"), *base])
    assert "notes.pt" in err and "not a file torch.save wrote" in err and "issue" not in err
    torch.save({"model": {"w": torch.zeros(4096)}}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    err = one_line_error(capsys, main, ["--checkpoint", str(tmp_path / "half.pt"), *base])
    assert "half.pt" in err and "truncated" in err


def test_predict_names_a_bad_image_and_an_empty_text(capsys, tmp_path, image):
    from examples.predict import main

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    err = one_line_error(capsys, main, ["--checkpoint", "x.pt", "--image", str(tmp_path / "broken.png"), "--text", "a"])
    assert "--image" in err and "broken.png" in err
    err = one_line_error(capsys, main, ["--checkpoint", "x.pt", "--image", str(image), "--text", "  "])
    assert "--text is empty" in err


def test_train_names_a_bad_flag_value_a_wrong_data_root_and_a_batch_of_one(capsys, tmp_path):
    from examples.train_cris_masksd import main

    out = ["--output", str(tmp_path / "run"), "--no-progress", "--workers", "0"]
    err = one_line_error(capsys, main, ["--lr", "-1", *out])
    assert "lr must be a finite number > 0, got -1.0" in err
    err = one_line_error(capsys, main, ["--amp", "fp8", *out])
    assert "--amp" in err and "fp8" in err
    err = one_line_error(capsys, main, ["--dataset", "refcoco", "--data-root", str(tmp_path / "nowhere"), *out])
    assert "refs file not found" in err and "nowhere" in err
    err = one_line_error(capsys, main, ["--batch-size", "1", *out])
    assert "--batch-size 1" in err and "BatchNorm" in err and "at least 2 per device" in err


def test_debug_shows_the_traceback(tmp_path):
    from examples.train_cris_masksd import main

    with pytest.raises(ValueError, match="at least 2 per device"):
        run_script(main, ["--batch-size", "1", "--debug", "--output", str(tmp_path), "--no-progress"])


def test_a_script_run_from_the_shell_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "evaluate.py"), "--checkpoint", str(tmp_path / "gone.pt")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"evaluate.py: error: checkpoint not found: {tmp_path / 'gone.pt'} (--debug shows the traceback)"]


def test_loading_a_checkpoint_does_not_warn_of_random_weights(tmp_path, caplog):
    from examples.cris import CRIS, CRISConfig
    from examples.pipeline.factory import checkpoint_architecture, load_segmenter
    from masksd import MaskSD

    torch.manual_seed(0)
    model = MaskSD(CRIS(CRISConfig.tiny()))
    torch.save({"model": model.state_dict(), "family": "MaskSD", **checkpoint_architecture(model.segmenter)}, tmp_path / "c.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        segmenter, _ = load_segmenter(tmp_path / "c.pt")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert torch.equal(segmenter.backbone.token_embedding.weight, model.segmenter.backbone.token_embedding.weight)
    with caplog.at_level(logging.WARNING):
        CRIS(CRISConfig.tiny())  # outside a checkpoint load, open_clip's warning stays
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_bare_cris_names_both_batch_sizes():
    from examples.cris import CRIS, CRISConfig

    model = CRIS(CRISConfig.tiny()).eval()
    with pytest.raises(ValueError, match="got 2 images and 3 texts"):
        model(torch.randn(2, 3, 64, 64), model.tokenize(["a", "b", "c"]))


def test_a_ground_truth_of_another_aspect_ratio_is_refused_not_stretched():
    from masksd import segmentation_loss

    logits = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="ground_truth of size 64x48 has another aspect ratio than the logits' 16x16"):
        segmentation_loss(logits, torch.zeros(2, 1, 64, 48))
    assert torch.isfinite(segmentation_loss(logits, torch.zeros(2, 1, 64, 64)))  # same ratio: resized as before


@pytest.mark.parametrize("script", ["train_cris_masksd.py", "evaluate.py", "predict.py", "pretrain_clip.py", "export.py", "app.py"])
def test_help_imports_neither_torch_nor_open_clip(script):
    """--help is built from the torch-free configs, so it prints at once (torch's import alone takes ~2 s here)."""
    code = (
        "import contextlib, io, runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        runpy.run_path({str(ROOT / 'examples' / script)!r}, run_name='__main__')\n"
        "    except SystemExit as exit_:\n"
        "        assert exit_.code in (0, None)\n"
        "assert '--debug' in out.getvalue(), out.getvalue()[:200]\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
