"""``python -m benchmarks.gpu_check``: see the package docstring."""

import os

# before torch starts CUDA: fewer fragmentation OOMs while searching for a batch size
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import sys  # noqa: E402

from benchmarks.gpu_check.check import main  # noqa: E402
from examples.pipeline.cli import run_script  # noqa: E402

sys.exit(run_script(main))
