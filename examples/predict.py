"""Segment the object a sentence refers to in one image, with a trained checkpoint.

    python examples/predict.py --checkpoint runs/demo/last.pt --image photo.jpg --text "the dog on the left"

Writes <output-dir>/<image stem>_mask.png (the binary mask at the image's size) and
<image stem>_overlay.png (the image with the mask tinted red).
"""

from __future__ import annotations

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
    parser.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--text", required=True, type=utf8_text, help="the referring expression (UTF-8)")
    parser.add_argument("--output-dir", default=".", help="where the PNGs go (default: .)")
    parser.add_argument("--threshold", type=float, default=TrainConfig().eval_threshold, help="sigmoid threshold (default: %(default)s)")
    parser.add_argument("--resize", choices=RESIZE_MODES, help="default: the run's")
    parser.add_argument("--restore", choices=RESTORE_METHODS, help="bilinear or cris (CRIS's bicubic + inverse warp); default: the run's")
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if not args.text.strip():
        parser.error("--text is empty")

    import numpy as np
    import torch
    from PIL import Image

    from examples.pipeline.factory import load_segmenter
    from examples.pipeline.distributed import resolve_device
    from masksd.data import InputTransform, read_rgb, restore

    image_path = Path(args.image)
    if image_path.is_dir():
        parser.error(f"--image {image_path} is a folder, not an image file")
    if not image_path.is_file():
        parser.error(f"--image not found: {image_path}")
    try:
        rgb = read_rgb(image_path)  # (H0, W0, 3) uint8; refuses images over MAX_IMAGE_PIXELS, as the dataset does
    except ValueError as error:
        parser.error(f"--image: {error}")

    device = resolve_device(args.device)
    segmenter, run = load_segmenter(args.checkpoint, device)
    run_cfg = TrainConfig.from_dict(run, source=args.checkpoint)
    transform = InputTransform(segmenter.config.image_size, args.resize or run_cfg.resize)
    image, _, frame = transform(rgb)
    tokens = segmenter.tokenize([args.text])  # a text longer than the context is cut: said below
    with torch.no_grad():
        logits = segmenter(image[None].to(device), tokens.to(device))  # (1, 1, h, w)
    probs = torch.sigmoid(logits.float()).cpu()[0]  # (1, h, w)
    mask = (restore(probs, frame, args.restore or run_cfg.restore)[0] > args.threshold).numpy()  # (H0, W0)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path = out_dir / f"{image_path.stem}_mask.png"
    overlay_path = out_dir / f"{image_path.stem}_overlay.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
    tinted = rgb.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array([230, 40, 40], dtype=np.float32)
    Image.fromarray(tinted.astype(np.uint8)).save(overlay_path)
    read = ""
    if segmenter.truncation.cut:  # say what the model read, not only what was typed
        ids = tokens["input_ids"] if isinstance(tokens, Mapping) else tokens  # CLIPSeg's tokenizer gives a mapping
        read = f" (read as {' '.join(segmenter.token_strings(ids[0])[1:-1])!r}: cut to {segmenter.config.max_words} token positions)"
    print(f"{args.text!r}{read}: {int(mask.sum())} of {mask.size} pixels; wrote {mask_path} and {overlay_path}")
    return mask_path, overlay_path


if __name__ == "__main__":
    run_script(main)
