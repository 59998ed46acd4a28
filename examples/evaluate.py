"""Evaluate a trained checkpoint's main branch on a split: mIoU, overall IoU, Prec@0.5..0.9.

Predictions are restored to each original image size (--restore bilinear, or cris: CRIS's
bicubic + inverse-affine warp) and binarised at --threshold (the paper's 0.35).
The data settings default to the checkpoint's own; e.g.

    python examples/evaluate.py --checkpoint runs/refcoco-vitb/last.pt --split testA
    python examples/evaluate.py --checkpoint runs/demo/last.pt --split compositional
    python examples/evaluate.py --checkpoint runs/mine/last.pt --manifest my_data.jsonl --split test

gRefCOCO and any split with expressions that refer to nothing also report gIoU, cIoU, N-acc and T-acc.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.choices import Amp, Device  # noqa: E402
from examples.pipeline.cli import ScriptParser, field_help, run_script  # noqa: E402
from examples.pipeline.config import DATASETS, TrainConfig  # noqa: E402
from masksd.data.config import RESTORE_METHODS, SplitBy, TextKey  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a last.pt written by train_cris_masksd.py")
    parser.add_argument("--split", help="split to evaluate (default: the run's eval split)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the run's")
    parser.add_argument("--manifest", help="evaluate on a manifest (implies --dataset manifest); default: the run's, if it trained on one")
    parser.add_argument("--split-by", choices=get_args(SplitBy), help="default: the run's")
    parser.add_argument("--data-root", help="default: the run's")
    parser.add_argument("--text-key", choices=get_args(TextKey), help="refer sentence field, raw or sent (default: the run's)")
    parser.add_argument("--image-root", help="default: the run's")
    parser.add_argument("--trust-refs-pickle", action="store_true",  # never the run's: trust is given per file, per call
                        help=field_help(TrainConfig, "trust_refs_pickle").replace("%", "%%"))
    parser.add_argument("--threshold", type=float, default=TrainConfig().eval_threshold, help="sigmoid threshold (default: %(default)s)")
    parser.add_argument("--restore", choices=RESTORE_METHODS,
                        help="how predictions go back to the image size: bilinear or cris (CRIS's bicubic + warpAffine); default: the run's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    parser.add_argument("--amp", choices=get_args(Amp), default="none")
    parser.add_argument("--output", help="JSON file for the results (default: eval_<dataset>_<split>.json beside the checkpoint)")
    parser.add_argument("--guidance", action="store_true",
                        help="also measure the correlation filters' guidance (masksd.guidance) with the run's K: "
                             "LMVSD ROC AUC, kept share and top-1 hit of the target's patches; VMLSD precision of "
                             "the target's words (synthetic scenes)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")

    from torch.utils.data import DataLoader

    from examples.pipeline.evaluation import evaluate
    from examples.pipeline.distributed import resolve_device
    from examples.pipeline.factory import build_dataset, load_segmenter
    from examples.pipeline.workers import exit_with_parent
    from masksd.data import ManifestDataset, ReferDataset, collate
    from masksd.metrics import format_table

    if args.manifest and args.dataset not in (None, "manifest"):
        parser.error(f"--manifest evaluates a manifest; it does not combine with --dataset {args.dataset}")
    device = resolve_device(args.device)
    segmenter, run = load_segmenter(args.checkpoint, device)
    dataset_name = "manifest" if args.manifest else args.dataset
    overrides = {k: v for k, v in {"dataset": dataset_name, "split_by": args.split_by, "data_root": args.data_root,
                                   "image_root": args.image_root, "workers": args.workers, "text_key": args.text_key,
                                   "restore": args.restore, "manifest": args.manifest}.items() if v is not None}
    overrides["trust_refs_pickle"] = args.trust_refs_pickle
    if "dataset" in overrides and "split_by" not in overrides:
        overrides["split_by"] = None  # the new dataset's default, not the run's
    if overrides.get("dataset", "manifest") != "manifest":
        overrides["manifest"] = None  # the run's manifest is not read for another dataset
    cfg = replace(TrainConfig.from_dict(run, source=str(args.checkpoint)), **overrides)
    split = args.split or cfg.eval_split
    dataset = build_dataset(cfg, split, train=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
                        worker_init_fn=exit_with_parent())
    metrics = evaluate(segmenter, loader, segmenter.tokenize, device, args.threshold, args.amp, args.progress, cfg.restore)
    cut, cut_summary = segmenter.truncation.cut, segmenter.truncation.summary()  # longer than the text context

    name = f"{cfg.dataset}" + (f"({cfg.split_by})" if cfg.split_by else "") + f" {split}"
    print(format_table({name: metrics}))
    guidance = {}
    if args.guidance:
        from examples.pipeline.guidance import format_guidance, measure_guidance

        guidance = measure_guidance(segmenter, loader, segmenter.tokenize, device, cfg.masksd.lmvsd.top_k,
                                    cfg.masksd.vmlsd.top_k, args.amp, args.progress)
        print(format_guidance(guidance))
    # the protocol behind the numbers; "samples" (from metrics) is how many were evaluated
    text_key = dataset.config.text_key if isinstance(dataset, ReferDataset) else None  # synthetic scenes have one text
    counts = dataset.counts()._asdict() if isinstance(dataset, (ReferDataset, ManifestDataset)) else {}  # refs, sentences read
    report = {"checkpoint": str(args.checkpoint), "dataset": cfg.dataset, "split_by": cfg.split_by, "split": split,
              "threshold": args.threshold, "restore": cfg.restore, "text_key": text_key, **counts, **metrics,
              "expressions_cut": cut}
    if cut:
        print(cut_summary)
    if guidance:
        report["guidance"] = guidance
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name(f"eval_{cfg.dataset}_{split}.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    run_script(main)
