"""A Gradio demo of a referring segmenter and of what CM-MaskSD's correlation filters see.

    python examples/app.py                              # the shipped tiny model (what `make app` serves before `make demo`)
    python examples/app.py --model runs/demo/export     # an export folder, a checkpoint, or a Hub id owner/name

Upload an image (or draw a synthetic scene), type an expression and see the mask over the image, the mask
itself, the LMVSD correlation map over the patches (p_i = v_i · w), the patches LMVSD would replace by its mask
token and the words VMLSD would, and the segmenter's inference time. The page listens on 127.0.0.1 only
(--host 0.0.0.0 serves the network); images over masksd.data.MAX_IMAGE_PIXELS and empty expressions are
refused with a message in the page. The API (``gradio_client``): ``predict(handle_file(path), text,
api_name="/segment")``. Needs masksd[app].
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from examples.pipeline.choices import Device  # noqa: E402
from examples.pipeline.cli import ScriptParser, run_script  # noqa: E402

SHIPPED = "masksd-tiny-synthetic"
"""``--model``'s default: the tiny CRIS-style model on the shipped pretrained tiny CLIP (examples/cris/pretrained/)."""
DISPLAY_SIDE = 256
"""Panels of smaller images are scaled up (nearest neighbour, whole factors) to at least this side."""
MASKED = "masked"
MASK_TOKEN_GREY = (25, 25, 25)
"""How the page shows a patch replaced by LMVSD's mask token (darkened: the scenes' objects take every bright colour)."""


@dataclass
class DemoModel:
    """What the page serves: a segmenter in eval mode and how it was trained."""

    segmenter: Any
    run: Any
    """The TrainConfig of the run that trained it (its resize, restore, threshold and MaskSD's K and α)."""
    description: str
    trained: bool
    """False for the shipped model: its CLIP is pretrained, its decoder is not."""


def load_model(source: str, device: str = "cpu") -> DemoModel:
    """``source``: :data:`SHIPPED`, a checkpoint (last.pt, best.pt), an export folder or a Hub id."""
    import torch

    from examples.pipeline.checkpoint import describe_model
    from examples.pipeline.config import TrainConfig
    from examples.pipeline.factory import build_segmenter, checkpoint_architecture, load_segmenter

    if source == SHIPPED:
        torch.manual_seed(0)  # the untrained decoder, the same on every start
        run = TrainConfig(pretrained=SHIPPED)
        segmenter = build_segmenter(run).to(device).eval()
        return DemoModel(segmenter, run, f"{describe_model(checkpoint_architecture(segmenter))}, CLIP pretrained on the "
                                         "synthetic scenes, decoder untrained", trained=False)
    segmenter, run = load_segmenter(source, device)
    return DemoModel(segmenter, TrainConfig.from_dict(run, source=""), describe_model(checkpoint_architecture(segmenter)), trained=True)


def segment_request(model: DemoModel, image_path: str | None, text: str | None) -> tuple:
    """The page's one action: (overlay, mask, correlation map, masked patches, masked words, status). Bad input
    gives empty panels and the reason in the status."""
    import numpy as np

    from examples.pipeline.inference import explain, heatmap, segment, tint, to_image_frame
    from masksd.data import read_rgb

    def refused(reason: str) -> tuple:
        return None, None, None, None, None, f"**Refused:** {reason}"

    if not image_path:
        return refused("upload an image (or draw a synthetic scene) first.")
    if not text or not text.strip():
        return refused("the referring expression is empty: type what to segment, e.g. *the red circle*.")
    try:
        rgb = read_rgb(image_path)  # checks the header against MAX_IMAGE_PIXELS before decoding anything
    except (ValueError, FileNotFoundError) as error:
        return refused(str(error).replace(str(image_path), "the uploaded image"))
    run = model.run
    result = segment(model.segmenter, rgb, text.strip(), run.resize, run.restore, run.eval_threshold)
    start = time.perf_counter()
    seen = explain(model.segmenter, result.image, result.tokens, run.masksd, seed=run.seed)
    explain_ms = 1000 * (time.perf_counter() - start)

    factor = max(1, math.ceil(DISPLAY_SIDE / max(rgb.shape[:2])))
    enlarge = lambda a: np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)  # noqa: E731
    correlation = to_image_frame(seen.correlation, result.frame, nearest=True)
    patches = to_image_frame(seen.masked_patches, result.frame, nearest=True) > 0.5
    words = [(f"{w} ", MASKED if m else None) for w, m in zip(seen.words, seen.masked_words)]
    device = next(model.segmenter.parameters()).device
    status = [
        f"**{int(result.mask.sum()):,} of {result.mask.size:,} pixels** for *{text.strip()}*; inference "
        f"{1000 * result.seconds:.1f} ms on {device.type} (the segmenter's forward; the explanation took {explain_ms:.0f} ms more).",
        f"Model: {model.description}. LMVSD would mask {int(seen.masked_patches.sum())} of {seen.masked_patches.size} patches "
        f"(α={run.masksd.lmvsd.ratio} of the top K={run.masksd.lmvsd.top_k}), VMLSD {sum(seen.masked_words)} word(s) "
        f"(α={run.masksd.vmlsd.ratio} of the top K={run.masksd.vmlsd.top_k}); training only: inference masks nothing.",
    ]
    if not model.trained:
        status.append("*The shipped model's decoder is untrained, so its mask is noise; its correlation map is the pretrained "
                      "CLIP's. Train one with `make demo` and serve it with `make app`.*")
    return (enlarge(tint(rgb, result.mask)), (result.mask * 255).astype(np.uint8), enlarge(heatmap(rgb, correlation)),
            enlarge(tint(rgb, patches, MASK_TOKEN_GREY, 0.8)), words, "\n\n".join(status))


def synthetic_scene(model: DemoModel, folder: Path, index: int | None = None) -> tuple[str, str]:
    """A synthetic referring scene (the ``val`` split, at the model's input size) as a PNG in ``folder``, and its expression."""
    import random

    from PIL import Image

    from masksd.data.synthetic import SyntheticConfig, SyntheticReferDataset

    scenes = SyntheticReferDataset(SyntheticConfig(image_size=model.segmenter.config.image_size, split="val", num_samples=10_000))
    index = random.randrange(len(scenes)) if index is None else index
    image, _, scene = scenes.render(index)
    path = Path(folder) / f"scene_{index}.png"
    Image.fromarray(image).save(path)
    return str(path), scene.text


def build_app(model: DemoModel) -> Any:
    """The page (a ``gradio.Blocks``); ``.launch()`` serves it."""
    gradio = _gradio()
    scenes = Path(tempfile.mkdtemp(prefix="masksd-app-"))
    with gradio.Blocks(title="masksd: referring image segmentation", analytics_enabled=False) as app:
        gradio.Markdown(f"## masksd: referring image segmentation with CM-MaskSD\n{model.description}.")
        with gradio.Row():
            with gradio.Column():
                image = gradio.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", elem_id="image")
                text = gradio.Textbox(label="Referring expression", placeholder="the red circle left of the blue square", elem_id="text")
                with gradio.Row():
                    run = gradio.Button("Segment", variant="primary", elem_id="segment")
                    draw = gradio.Button("Draw a synthetic scene", elem_id="draw")
                status = gradio.Markdown(elem_id="status")
            with gradio.Column():
                overlay = gradio.Image(label="Mask overlay", format="png", interactive=False, elem_id="overlay")
                mask = gradio.Image(label="Mask (at the image's size)", format="png", image_mode="L", interactive=False, elem_id="mask")
        with gradio.Row():
            correlation = gradio.Image(label="LMVSD correlation over the patches (yellow: high p = v·w)", format="png", interactive=False, elem_id="correlation")
            patches = gradio.Image(label="Patches LMVSD would mask (darkened)", format="png", interactive=False, elem_id="patches")
        words = gradio.HighlightedText(label="Words VMLSD would mask", color_map={MASKED: "blue"}, elem_id="words")
        outputs = [overlay, mask, correlation, patches, words, status]
        handler = lambda image_path, expression: segment_request(model, image_path, expression)  # noqa: E731
        run.click(handler, [image, text], outputs, api_name="segment")
        text.submit(handler, [image, text], outputs, api_name=False)
        draw.click(lambda: synthetic_scene(model, scenes), None, [image, text], api_name=False)
    return app


def _gradio() -> Any:
    try:
        import gradio
    except ImportError as error:
        raise ImportError("the demo needs gradio: pip install 'masksd[app]'") from error
    return gradio


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--model", default=SHIPPED, help=f"an export folder, a checkpoint (last.pt, best.pt), a Hub id owner/name, "
                                                         f"or {SHIPPED} (default: the shipped tiny CLIP with an untrained decoder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    args = parser.parse_args(argv)

    from PIL import Image

    from examples.pipeline.distributed import resolve_device

    _gradio()
    model = load_model(args.model, str(resolve_device(args.device)))
    # read_rgb refuses an image over masksd's limit from its header; PIL's own check would answer first (with its
    # message, in gradio's upload handling) for images over twice that, so it is left to read_rgb here.
    Image.MAX_IMAGE_PIXELS = None
    build_app(model).launch(server_name=args.host, server_port=args.port, max_file_size="50mb", show_error=True)


if __name__ == "__main__":
    run_script(main)
