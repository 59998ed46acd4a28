"""What every model's training checkpoint must do through examples/evaluate.py and examples/predict.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def check_evaluate_and_predict(checkpoint: Path, metrics: dict[str, float], folder: Path) -> None:
    """evaluate.py reproduces the run's final ``metrics`` on its eval split; predict.py writes a mask at the image's size."""
    from examples.evaluate import main as evaluate_main
    from examples.predict import main as predict_main

    report = evaluate_main(["--checkpoint", str(checkpoint), "--split", "val", "--workers", "0",
                            "--no-progress", "--output", str(folder / "val.json")])
    assert {k: report[k] for k in metrics} == pytest.approx(metrics)
    image = folder / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image)
    mask_path, _ = predict_main(["--checkpoint", str(checkpoint), "--image", str(image), "--text", "the red cube",
                                 "--output-dir", str(folder)])
    with Image.open(mask_path) as mask:
        assert mask.size == (80, 48)
