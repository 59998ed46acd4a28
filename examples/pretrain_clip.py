"""Pretrain the tiny CLIP contrastively on synthetic referring scenes (the paper's regime in miniature).

    python examples/pretrain_clip.py                                  # region-aligned (the shipped checkpoint)
    python examples/pretrain_clip.py --region-weight 0 --output runs/pretrain-global   # global ClipLoss only
    python examples/train_cris_masksd.py --pretrained runs/pretrain/clip.pt          # fine-tune from it

Writes <output>/clip.pt (an open_clip state dict), report.json (guidance and retrieval before and
after), eval_log.csv (the same every --eval-every steps), train_log.csv and last.pt / best.pt
(resumable with --resume auto). Several processes: torchrun --nproc_per_node=N examples/pretrain_clip.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.cli import ScriptParser, add_dataclass_arguments, dataclass_from_args, run_script  # noqa: E402
from examples.pipeline.config import PretrainConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    parser = ScriptParser(description=__doc__)
    add_dataclass_arguments(parser, PretrainConfig)
    args = parser.parse_args(argv)
    try:
        return dataclass_from_args(PretrainConfig, args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    from examples.pipeline.pretrain import pretrain

    report = pretrain(cfg)
    print(json.dumps({k: report[k] for k in ("steps", "final")}, indent=2))
    return report


if __name__ == "__main__":
    run_script(main)
