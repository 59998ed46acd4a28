import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from masksd.data import Frame, collate


def sample(size=8, index=0):
    return {
        "image": torch.zeros(3, size, size), "mask": torch.zeros(1, size, size), "text": f"t{index}",
        "target": np.zeros((5, 7 + index), bool), "frame": Frame.fit(5, 7 + index, size), "index": index,
    }


def test_collate_stacks_tensors_and_keeps_lists():
    batch = collate([sample(index=0), sample(index=1)])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["mask"].shape == (2, 1, 8, 8)
    assert batch["text"] == ["t0", "t1"] and batch["index"] == [0, 1]
    assert [t.shape for t in batch["target"]] == [(5, 7), (5, 8)]
    assert batch["frame"][1].orig_width == 8


def test_collate_errors_name_the_sample():
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match=r"batch\[1\]\['image'\] has shape \(3, 16, 16\) but batch\[0\] has \(3, 8, 8\)"):
        collate([sample(8), sample(16)])
    bad = sample()
    del bad["frame"]
    with pytest.raises(ValueError, match=r"batch\[0\] must have keys"):
        collate([bad])


def test_importing_masksd_data_needs_neither_pillow_nor_pycocotools():
    # they are optional dependencies, needed only when a ReferDataset is built
    code = "import sys, masksd.data; sys.exit(int('PIL' in sys.modules or 'pycocotools' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1]).returncode == 0
