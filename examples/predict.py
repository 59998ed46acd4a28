"""Segment the object a sentence refers to in one image, with a trained checkpoint or an export.

    python examples/predict.py --checkpoint runs/demo/last.pt --image photo.jpg --text "the dog on the left"
    python examples/predict.py --checkpoint runs/demo/export --image photo.jpg --text "the dog on the left"

Writes <output-dir>/<image stem>_mask.png (the binary mask at the image's size) and
<image stem>_overlay.png (the image with the mask tinted red).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.choices import Device  # noqa: E402
from examples.pipeline.cli import ScriptParser, run_script  # noqa: E402
from examples.pipeline.config import TrainConfig  # noqa: E402
from masksd.data.config import RESIZE_MODES, RESTORE_METHODS  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="a last.pt or best.pt written by train_cris_masksd.py, an export folder (<output>/export, "
                             "examples/export.py) or the Hugging Face Hub id of one")
    parser.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--text", required=True, help="the referring expression")
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
    from PIL import Image

    from examples.pipeline.factory import load_segmenter
    from examples.pipeline.distributed import resolve_device
    from examples.pipeline.inference import segment, tint
    from masksd.data import read_rgb

    image_path = Path(args.image)
    if not image_path.is_file():
        parser.error(f"--image not found: {image_path}")
    try:
        rgb = read_rgb(image_path)  # (H0, W0, 3) uint8; refuses images over MAX_IMAGE_PIXELS, as the dataset does
    except ValueError as error:
        parser.error(f"--image: {error}")

    device = resolve_device(args.device)
    segmenter, run = load_segmenter(args.checkpoint, device)
    run_cfg = TrainConfig.from_dict(run, source=args.checkpoint)
    mask = segment(segmenter, rgb, args.text, args.resize or run_cfg.resize, args.restore or run_cfg.restore, args.threshold).mask  # (H0, W0)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path = out_dir / f"{image_path.stem}_mask.png"
    overlay_path = out_dir / f"{image_path.stem}_overlay.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
    Image.fromarray(tint(rgb, mask)).save(overlay_path)
    print(f"{args.text!r}: {int(mask.sum())} of {mask.size} pixels; wrote {mask_path} and {overlay_path}")
    return mask_path, overlay_path


if __name__ == "__main__":
    run_script(main)
