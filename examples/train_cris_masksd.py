"""Train the CRIS-style CLIP segmenter wrapped in MaskSD.

With no arguments: the CPU demo (tiny model, synthetic scenes, a few minutes on 2 cores).
Paper runs: ``--preset refcoco-vitb --data-root data`` (see ``--help`` for every flag); MaskRIS's
recipe instead of CM-MaskSD's: ``--masksd-preset maskris --vmlsd-site embedding`` (combines with ``--preset``;
CLIP's tokenizer has no [MASK] id for MaskRIS's word replacement, see docs/method.md);
several GPUs: ``torchrun --nproc_per_node=8 examples/train_cris_masksd.py --preset ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.cli import ScriptParser, add_dataclass_arguments, dataclass_from_args, run_script  # noqa: E402
from examples.pipeline.config import MASKSD_PRESETS, PRESETS, TrainConfig, masksd_preset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    first.add_argument("--masksd-preset", choices=sorted(MASKSD_PRESETS))
    known, _ = first.parse_known_args(argv)

    parser = ScriptParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="paper settings to start from; later flags override")
    parser.add_argument("--masksd-preset", choices=sorted(MASKSD_PRESETS),
                        help="MaskSD recipe to start from (default: the paper's, or what --preset sets): maskris = MaskRIS as "
                        "published (masksd.MaskSDConfig.maskris: 75%% of the pixel patches, MaskRIS's 32 px at 480 scaled to --image-size, and 15%% "
                        "of words masked at the inputs, one combined view); CLIP's tokenizer has no [MASK], so add --vmlsd-site "
                        "embedding (not with --model lavt: BERT's has one); later flags override")
    add_dataclass_arguments(parser, TrainConfig)
    parser.set_defaults(**PRESETS[known.preset])
    if known.masksd_preset:
        parser.set_defaults(**masksd_preset(known.masksd_preset))
    args = parser.parse_args(argv)
    try:
        return dataclass_from_args(TrainConfig, args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    from examples.pipeline.trainer import train  # heavy imports after --help

    result = train(cfg)
    cut = result.model.segmenter.truncation.summary() if result.model is not None else ""
    if cut:  # the first cut warned; the total, at the end
        print(cut)
    if result.metrics:
        from masksd.metrics import format_table

        rows = {"untrained": result.untrained} if result.untrained else {}
        rows[f"after {result.steps} steps"] = result.metrics
        print(f"\n{cfg.dataset} {cfg.eval_split} ({result.output}):")
        print(format_table(rows))
    if result.guidance:
        from examples.pipeline.guidance import format_guidance

        before = result.untrained_guidance
        print(f"\nguidance after training{' (before: AUC %.3f, kept %.3f)' % (before['lmvsd_auc'], before['lmvsd_kept']) if before else ''}:")
        print(format_guidance(result.guidance))


if __name__ == "__main__":
    run_script(main)
