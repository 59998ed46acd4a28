"""Parameters and inference FLOPs of the CRIS-style segmenter, beside the paper's Table II / VII figures.

    python -m benchmarks.cris_summary --model ViT-B-16 --size 480
    python -m benchmarks.cris_summary --model ViT-L-14 --size 532
    python -m benchmarks.cris_summary --tiny

Random init on the CPU, batch 1, one sentence of ``max_words`` tokens. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add as 2 FLOPs and only
matmuls, convolutions and attention (no norms, activations or resampling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.common import TABLE_VII, count_flops, machine, machine_line
from examples.pipeline.cli import ScriptParser, run_script
from examples.cris.config import CRISConfig
from examples.cris.model import CRIS
from masksd import MaskSD

__all__ = ["PAPER", "PAPER_MASKSD_PARAMS_M", "Summary", "summarize", "main"]

PAPER = {("ViT-B-16", 480): {"params_m": 207.0, "gflops": 165.96}}
"""Table II of the paper: the baseline at 480 px (its FLOPs(G) column; the same for every variant)."""

PAPER_MASKSD_PARAMS_M = {
    ("ViT-B-16", 480): {
        "baseline": 207,
        "LMVSD, shared": 210,
        "VMLSD, shared": 207,
        "both, shared": 210,
        "LMVSD, separate": 266,
        "VMLSD, separate": 264,
        "both, separate": 323,
    }
}
"""Table VII of the paper: parameters (M) with and without shared decoding weights."""

PARTS = ("image encoder", "text encoder", "pyramid + neck", "decoder", "projector")


@dataclass
class Summary:
    """Parameter and FLOP counts of one configuration."""

    config: CRISConfig
    params: dict[str, int]
    """Total parameters per part (see PARTS)."""
    trainable: dict[str, int]
    """Parameters with requires_grad per part."""
    flops: dict[str, int]
    """FlopCounterMode FLOPs (2 per multiply-add) per part, batch 1."""
    masksd_params: dict[str, int]
    """Total parameters of the MaskSD-wrapped model per Table VII variant."""
    seconds: float


def _param_parts(model: CRIS, trainable_only: bool) -> dict[str, int]:
    def count(module: nn.Module | list[nn.Parameter]) -> int:
        params = module.parameters() if isinstance(module, nn.Module) else module
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

    visual = {id(p) for p in model.backbone.visual.parameters()}
    head = model.decode_head
    return {
        "image encoder": count(model.backbone.visual),
        "text encoder": count([p for p in model.backbone.parameters() if id(p) not in visual]),
        "pyramid + neck": count(head.pyramid) + count(head.neck),
        "decoder": count(head.decoder),
        "projector": count(head.projector),
    }


def _masksd_params(model: CRIS) -> dict[str, int]:
    variants = TABLE_VII
    head = sum(p.numel() for p in model.decode_head.parameters())
    bare = sum(p.numel() for p in model.parameters())
    counts = {}
    for name, config in variants.items():
        branches = [b for b in (config.lmvsd, config.vmlsd) if b.enabled]
        dims = [d for b, d in ((config.lmvsd, model.image_embed_dim), (config.vmlsd, model.text_embed_dim)) if b.enabled]
        counts[name] = bare + sum(dims) + (0 if config.share_weights else head * len(branches))
    # Check the arithmetic against the wrapper once (the separate heads are deep copies).
    assert sum(p.numel() for p in MaskSD(model, variants["both, separate"]).parameters()) == counts["both, separate"]
    return counts


@torch.no_grad()
def summarize(config: CRISConfig) -> Summary:
    """Build ``config`` (random init) and count its parameters and batch-1 inference FLOPs."""
    start = time.perf_counter()
    model = CRIS(config).eval()
    size = config.image_size
    images = torch.randn(1, 3, size, size)
    sentence = " ".join(["word"] * (config.max_words - 2))  # fills every text position
    token_ids = model.tokenize([sentence])

    image_flops, _, visual = count_flops(lambda: model.encode_image(model.embed_image(images)))
    text_flops, _, text = count_flops(lambda: model.encode_text(model.embed_text(token_ids)))
    head_flops, per_module, _ = count_flops(lambda: model.decode_head(visual, text))
    total_flops, _, _ = count_flops(lambda: model(images, token_ids))
    assert total_flops == image_flops + text_flops + head_flops, "the parts must add up to the forward"

    head = type(model.decode_head).__name__
    flops = {
        "image encoder": image_flops,
        "text encoder": text_flops,
        "pyramid + neck": per_module.get(f"{head}.pyramid", 0) + per_module.get(f"{head}.neck", 0),
        "decoder": per_module.get(f"{head}.decoder", 0),
        "projector": per_module.get(f"{head}.projector", 0),
    }
    assert sum(flops.values()) == total_flops, "every decode-head FLOP belongs to one of its parts"
    return Summary(
        config=config,
        params=_param_parts(model, trainable_only=False),
        trainable=_param_parts(model, trainable_only=True),
        flops=flops,
        masksd_params=_masksd_params(model),
        seconds=time.perf_counter() - start,
    )


def format_summary(summary: Summary) -> str:
    """A Markdown report: the parts table, totals beside the paper, and the Table VII comparison."""
    config = summary.config
    key = (config.model_name, config.image_size)
    paper = PAPER.get(key)
    lines = [
        f"### {config.model_name} @ {config.image_size} px, max_words {config.max_words}, batch 1",
        "",
        "| part | params (M) | trainable (M) | GFLOPs (2/MAC) | GMACs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for part in PARTS:
        lines.append(
            f"| {part} | {summary.params[part] / 1e6:.2f} | {summary.trainable[part] / 1e6:.2f} "
            f"| {summary.flops[part] / 1e9:.2f} | {summary.flops[part] / 2e9:.2f} |"
        )
    params, trainable, flops = (sum(d.values()) for d in (summary.params, summary.trainable, summary.flops))
    lines.append(f"| **total** | **{params / 1e6:.2f}** | **{trainable / 1e6:.2f}** | **{flops / 1e9:.2f}** | **{flops / 2e9:.2f}** |")
    if paper:
        lines.append(f"| paper (Table II) | {paper['params_m']:.0f} | | {paper['gflops']:.2f} (unit not stated) | |")
        lines += [
            "",
            f"Gap to the paper: params {_gap(params / 1e6, paper['params_m'])}; "
            f"FLOPs {_gap(flops / 1e9, paper['gflops'])} counting 2 per multiply-add, "
            f"{_gap(flops / 2e9, paper['gflops'])} counting multiply-adds.",
        ]
    else:
        lines += ["", "The paper reports no parameter or FLOP figures for this configuration."]
    paper_masksd = PAPER_MASKSD_PARAMS_M.get(key)
    bare = summary.masksd_params["baseline"]
    lines += [
        "",
        "| MaskSD variant | params (M) | added to the bare model | paper, Table VII (M) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, count in summary.masksd_params.items():
        ref = f"{paper_masksd[name]}" if paper_masksd else "—"
        lines.append(f"| {name} | {count / 1e6:.2f} | {count - bare:+,} | {ref} |")
    lines += ["", f"Built and counted in {summary.seconds:.1f} s."]
    return "\n".join(lines)


def _gap(ours: float, paper: float) -> str:
    return f"{ours:.2f} vs {paper:.2f} ({100 * (ours - paper) / paper:+.1f} %)"


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=CRISConfig.variant("vitb-480").model_name, help="open_clip model config (ViT-B-16, ViT-L-14)")
    parser.add_argument("--size", type=int, default=CRISConfig.variant("vitb-480").image_size, help="input image size in pixels")
    parser.add_argument("--max-words", type=int, default=CRISConfig.max_words, help="text positions (22 for G-Ref)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (ignores --model and --size)")
    args = parser.parse_args(argv)
    if args.tiny:
        config = CRISConfig.tiny(max_words=args.max_words)
    else:
        config = CRISConfig(model_name=args.model, pretrained=None, image_size=args.size, max_words=args.max_words)
    print(format_summary(summarize(config)))
    print(f"\nMachine: {machine_line(machine())}")


if __name__ == "__main__":
    run_script(main)
