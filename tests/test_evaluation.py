"""evaluate() and examples/evaluate.py: the restoration choice and the protocol recorded in the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from examples.pipeline.config import TrainConfig
from examples.pipeline.evaluation import evaluate
from examples.pipeline.trainer import train
from masksd.data import Frame, restore
from masksd.data.refer import SplitCountWarning
from masksd.metrics import RISMetrics
from tests.test_refer import root  # noqa: F401  (the refer-format fixture, reused)

# pycocotools' decode trips numpy 2's copy-keyword deprecation inside the library; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


class FixedSegmenter(torch.nn.Module):
    """Returns the same stored logits whatever comes in: (B, 1, h, w)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(images)]


def one_batch():
    """Two letterboxed samples (padding on either axis), logits at a decoder's 8x8 resolution."""
    rng = np.random.default_rng(0)
    frames = [Frame.fit(30, 50, 32, "letterbox"), Frame.fit(45, 20, 32, "letterbox")]
    targets = [rng.random((f.orig_height, f.orig_width)) > 0.6 for f in frames]
    logits = torch.from_numpy(rng.normal(0.0, 2.0, (2, 1, 8, 8)).astype(np.float32))
    batch = {"image": torch.zeros(2, 3, 32, 32), "text": ["a", "b"], "frame": frames, "target": targets}
    return FixedSegmenter(logits), batch


def run_evaluate(segmenter, batch, **kwargs):
    return evaluate(segmenter, [batch], lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), torch.device("cpu"), progress=False, **kwargs)


@pytest.mark.parametrize("method", ["bilinear", "cris"])
def test_evaluate_restores_sigmoid_probabilities_with_the_chosen_method(method):
    segmenter, batch = one_batch()
    expected = RISMetrics()
    probs = torch.sigmoid(segmenter.logits)  # CRIS's order too: sigmoid first, then restore
    expected.update([restore(p, f, method)[0] > 0.35 for p, f in zip(probs, batch["frame"])], [torch.from_numpy(t) for t in batch["target"]])
    assert run_evaluate(segmenter, batch, restore=method) == expected.compute()


def test_the_two_methods_give_different_masks_here_and_a_bad_one_is_named():
    segmenter, batch = one_batch()
    assert run_evaluate(segmenter, batch, restore="cris") != run_evaluate(segmenter, batch, restore="bilinear")
    with pytest.raises(ValueError, match=r"restore must be one of \('bilinear', 'cris'\), got 'nearest'"):
        run_evaluate(segmenter, batch, restore="nearest")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(synthetic_train_size=16, synthetic_eval_size=8, batch_size=8, epochs=1, warmup_epochs=0.5,
                      workers=0, log_every=1, progress=False, overlays=0, output=str(out))
    assert train(cfg, evaluate_at_end=False).steps == 2
    return out / "last.pt"


def test_evaluate_script_with_cris_restore_records_the_protocol(tiny_run, tmp_path):
    from examples.evaluate import main as evaluate_main

    report = evaluate_main(["--checkpoint", str(tiny_run), "--split", "val", "--workers", "0", "--no-progress",
                            "--restore", "cris", "--threshold", "0.4", "--output", str(tmp_path / "val.json")])
    written = json.loads((tmp_path / "val.json").read_text())
    assert written == report
    assert (report["restore"], report["threshold"], report["text_key"], report["samples"]) == ("cris", 0.4, None, 8)  # synthetic: no text field
    assert "refs" not in report and "sentences" not in report  # synthetic scenes have no refs file
    assert set(report) >= {"mIoU", "oIoU", "Prec@0.5"}
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tiny_run), "--restore", "nearest"])


def test_evaluate_script_on_a_refer_split_records_its_counts(tiny_run, root, tmp_path):  # noqa: F811
    from examples.evaluate import main as evaluate_main

    with pytest.warns(SplitCountWarning, match=r"refcoco/unc val holds 1 refs and 2 sentences"):  # the fixture is tiny
        report = evaluate_main(["--checkpoint", str(tiny_run), "--dataset", "refcoco", "--data-root", str(root), "--split", "val",
                                "--workers", "0", "--no-progress", "--output", str(tmp_path / "refcoco.json")])
    assert (report["dataset"], report["split_by"], report["restore"], report["text_key"]) == ("refcoco", "unc", "bilinear", "raw")
    assert (report["refs"], report["sentences"], report["samples"]) == (1, 2, 2)
