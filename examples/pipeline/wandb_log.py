"""``--wandb``: the run's config, losses, validation metrics, overlays and final results in Weights & Biases.

The training loop logs scalars through a TensorBoard-style writer (``add_scalar(tag, value, step)``);
:class:`WandbLog` is one, forwarding each scalar to the W&B run (``train/loss``, ``val/mIoU``, ... at the
optimiser step) and to the TensorBoard writer when ``--tensorboard`` is on too. The run lives under
``<output>/wandb``; its id is kept in ``<output>/wandb/masksd-run-id`` so that ``--resume`` continues the same
W&B run. ``WANDB_MODE=offline`` logs without a network (``wandb sync`` uploads later). Needs ``masksd[wandb]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["WandbLog", "require_wandb", "start_wandb"]

RUN_ID_FILE = "masksd-run-id"


def require_wandb() -> Any:
    """The ``wandb`` module, or an ImportError naming the extra."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError("--wandb needs the wandb package: pip install 'masksd[wandb]'") from error
    return wandb


class WandbLog:
    """A W&B run behind the loop's scalar-writer interface, beside an optional TensorBoard writer."""

    def __init__(self, run: Any, tensorboard: Any = None):
        self.run, self.tensorboard = run, tensorboard

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def log_images(self, key: str, paths: Sequence[Path], captions: Sequence[str], step: int) -> None:
        """The PNGs at ``paths`` as one list of W&B images under ``key``."""
        wandb = require_wandb()
        self.run.log({key: [wandb.Image(str(p), caption=c) for p, c in zip(paths, captions)]}, step=step)

    def summarise(self, prefix: str, metrics: Mapping[str, Any]) -> None:
        """Numeric ``metrics`` into the run's summary as ``<prefix>/<name>`` (the final results)."""
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.run.summary[f"{prefix}/{name}"] = value

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def start_wandb(cfg: Any, output: Path, resumed: bool, tensorboard: Any = None) -> WandbLog:
    """Start (or, for a resumed run, continue) the W&B run of a training run whose folder is ``output``:
    ``cfg`` (a TrainConfig) is the run's config, ``cfg.wandb_project``/``wandb_entity``/``wandb_run_name``
    name it."""
    wandb = require_wandb()
    folder = Path(output) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / RUN_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None  # None: W&B draws a new id
    run = wandb.init(
        project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name or Path(output).resolve().name,
        dir=str(output), config=asdict(cfg), id=run_id, resume="allow" if run_id else None, job_type="train",
    )
    id_file.write_text(run.id + "\n")
    return WandbLog(run, tensorboard)
