"""Segment the object a sentence refers to in one image, or in every row of a manifest, with a trained checkpoint.

    python examples/predict.py --checkpoint runs/demo/last.pt --image photo.jpg --text "the dog on the left"
    python examples/predict.py --checkpoint runs/mine/last.pt --manifest my_data.jsonl --split test --output-dir preds

Writes <output-dir>/<image stem>_mask.png (the binary mask at the image's size) and
<image stem>_overlay.png (the image with the mask tinted red). With --manifest, each row (of --split,
or of every split) gets <row id>_mask.png and <row id>_overlay.png, and predictions.jsonl lists them;
the rows need no target (image, text and split suffice).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.choices import Device  # noqa: E402
from examples.pipeline.cli import ScriptParser, run_script, utf8_text  # noqa: E402
from examples.pipeline.config import TrainConfig  # noqa: E402
from masksd.data.config import RESIZE_MODES, RESTORE_METHODS  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a last.pt written by train_cris_masksd.py")
    parser.add_argument("--image", help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--text", type=utf8_text, help="the referring expression (UTF-8)")
    parser.add_argument("--manifest", help="instead of --image/--text: predict every row of this manifest (JSON Lines or CSV)")
    parser.add_argument("--split", help="with --manifest: only the rows of this split (default: every row)")
    parser.add_argument("--output-dir", default=".", help="where the PNGs go (default: .)")
    parser.add_argument("--threshold", type=float, default=TrainConfig().eval_threshold, help="sigmoid threshold (default: %(default)s)")
    parser.add_argument("--resize", choices=RESIZE_MODES, help="default: the run's")
    parser.add_argument("--restore", choices=RESTORE_METHODS, help="bilinear or cris (CRIS's bicubic + inverse warp); default: the run's")
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.manifest is None:
        if args.image is None or args.text is None:
            parser.error("give --image and --text, or --manifest FILE")
        if not args.text.strip():
            parser.error("--text is empty")
    elif args.image is not None or args.text is not None:
        parser.error("--manifest predicts the manifest's rows; it does not combine with --image/--text")
    elif args.split is not None and not args.split.strip():
        parser.error("--split is empty")

    import numpy as np
    import torch
    from PIL import Image

    from examples.pipeline.factory import load_segmenter
    from examples.pipeline.distributed import resolve_device
    from masksd.data import InputTransform, read_rgb, restore

    if args.manifest is None:
        image_path = Path(args.image)
        if image_path.is_dir():
            parser.error(f"--image {image_path} is a folder, not an image file")
        if not image_path.is_file():
            parser.error(f"--image not found: {image_path}")
        try:
            rgb = read_rgb(image_path)  # (H0, W0, 3) uint8; refuses images over MAX_IMAGE_PIXELS, as the dataset does
        except ValueError as error:
            parser.error(f"--image: {error}")
        jobs = [(rgb, args.text, image_path.stem, {})]
    else:
        jobs = manifest_jobs(args.manifest, args.split)

    device = resolve_device(args.device)
    segmenter, run = load_segmenter(args.checkpoint, device)
    run_cfg = TrainConfig.from_dict(run, source=args.checkpoint)
    transform = InputTransform(segmenter.config.image_size, args.resize or run_cfg.resize)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rgb, text, stem, row in jobs:
        if callable(rgb):
            rgb = rgb()  # a manifest row's image, read when its turn comes
        image, _, frame = transform(rgb)
        cut_before = segmenter.truncation.cut
        tokens = segmenter.tokenize([text])  # a text longer than the context is cut: said below
        with torch.no_grad():
            logits = segmenter(image[None].to(device), tokens.to(device))  # (1, 1, h, w)
        probs = torch.sigmoid(logits.float()).cpu()[0]  # (1, h, w)
        mask = (restore(probs, frame, args.restore or run_cfg.restore)[0] > args.threshold).numpy()  # (H0, W0)

        mask_path = out_dir / f"{stem}_mask.png"
        overlay_path = out_dir / f"{stem}_overlay.png"
        Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
        tinted = rgb.astype(np.float32)
        tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array([230, 40, 40], dtype=np.float32)
        Image.fromarray(tinted.astype(np.uint8)).save(overlay_path)
        read = ""
        if segmenter.truncation.cut > cut_before:  # say what the model read, not only what was typed
            ids = tokens["input_ids"] if isinstance(tokens, Mapping) else tokens  # CLIPSeg's tokenizer gives a mapping
            read = f" (read as {' '.join(segmenter.token_strings(ids[0])[1:-1])!r}: cut to {segmenter.config.max_words} token positions)"
        print(f"{text!r}{read}: {int(mask.sum())} of {mask.size} pixels; wrote {mask_path} and {overlay_path}")
        written.append({**row, "text": text, "mask": str(mask_path), "overlay": str(overlay_path), "pixels": int(mask.sum())})
    if args.manifest is not None:
        import json

        index = out_dir / "predictions.jsonl"
        index.write_text("".join(json.dumps(w) + "\n" for w in written))
        print(f"wrote {index} ({len(written)} rows of {args.manifest})")
    return Path(written[-1]["mask"]), Path(written[-1]["overlay"])


def manifest_jobs(path: str, split: str | None) -> list:
    """(a reader of the image, the text, the file stem, the row's id, line and split) of each manifest row of
    ``split`` (None: every row); the stem is the row's id made safe for a file name, with its line added where
    two ids would collide."""
    from masksd.data import read_manifest, read_rgb

    rows = [row for row in read_manifest(path, require_target=False) if split is None or row.split == split]
    if not rows:
        raise ValueError(f"no rows with split {split!r} in {path}")
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_", row.id) for row in rows]
    repeated = {stem for stem in stems if stems.count(stem) > 1}
    stems = [f"{stem}_line{row.line}" if stem in repeated else stem for stem, row in zip(stems, rows)]

    def reader(row):
        def read():
            try:
                return read_rgb(row.image)
            except (ValueError, FileNotFoundError) as error:
                raise ValueError(f"{path}:{row.line}: field 'image': {error}") from None
        return read

    return [(reader(row), row.text, stem, {"id": row.id, "line": row.line, "split": row.split}) for row, stem in zip(rows, stems)]


if __name__ == "__main__":
    run_script(main)
