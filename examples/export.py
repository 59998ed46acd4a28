"""Export a trained checkpoint as a folder a person can share (model.safetensors, config.json, a model card),
and optionally push it to the Hugging Face Hub.

    python examples/export.py --checkpoint runs/demo/best.pt --output runs/demo/export-best
    python examples/export.py --checkpoint runs/demo/export --push-to-hub you/masksd-tiny-demo

The trainer already writes <output>/export from its last step; this exports any checkpoint (best.pt, an
earlier last.pt) or pushes an existing export. Needs masksd[hub].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.cli import ScriptParser, run_script  # noqa: E402


def main(argv: list[str] | None = None) -> Path | str:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by train_cris_masksd.py, or an export folder")
    parser.add_argument("--output", help="the export folder to write (required unless --push-to-hub)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    parser.add_argument("--evaluation", help="a JSON report (evaluate.py's, or the trainer's eval_<split>.json) for the model card's "
                                             "table; default: the run's eval_<split>.json if it evaluated this checkpoint's step")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hugging Face Hub repository (owner/name)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    if not args.output and not args.push_to_hub:
        parser.error("pass --output DIR, --push-to-hub REPO_ID, or both")

    from examples.pipeline.export import SegmenterExport, checkpoint_export, save_export

    evaluation = None
    if args.evaluation:
        try:
            evaluation = json.loads(Path(args.evaluation).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--evaluation {args.evaluation} is not JSON: {error}") from None
    if Path(args.checkpoint).is_dir():
        export = SegmenterExport.from_pretrained(args.checkpoint)
        if evaluation is not None:
            export.export_config["evaluation"] = evaluation
    else:
        export = checkpoint_export(args.checkpoint, evaluation)
    result: Path | str = ""
    if args.output:
        result = save_export(export, args.output, args.overwrite)
        print(f"wrote {result}: {export.export_config['description']}, step {export.export_config['step']}")
    if args.push_to_hub:
        try:
            result = export.push_to_hub(args.push_to_hub, private=args.private or None)
        except Exception as error:  # no network, no token, no access: huggingface_hub's and its HTTP client's errors
            raise OSError(f"--push-to-hub {args.push_to_hub} failed: {type(error).__name__}: {error}") from error
        print(f"pushed to {result}")
    return result


if __name__ == "__main__":
    run_script(main)
