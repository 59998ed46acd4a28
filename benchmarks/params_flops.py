"""Tables II and VII for our reference model: parameters, inference FLOPs and training FLOPs per step,
and LMVSD at the features site (the pyramid's maps replaced after the encoder) beside its embedding site.

    python -m benchmarks.params_flops                       # ViT-B-16 @ 480, the paper's ablation setting
    python -m benchmarks.params_flops --tiny                # the tiny CPU model (seconds)

Random init, per image (inference at batch 1; training at batch 2, halved), one sentence
filling every text position. FLOPs from
torch.utils.flop_counter.FlopCounterMode (2 per multiply-add; GMACs = half). Training FLOPs are
one forward and backward of MaskSD in training mode with every enabled branch (the masks are
drawn; their positions do not change the count). Writes benchmarks/results/params_flops[_tiny].{md,json}.
"""

from __future__ import annotations


import torch

from benchmarks.common import TABLE_VII, command_line, count_flops, markdown_table, write_results
from examples.pipeline.cli import ScriptParser, run_script
from benchmarks.cris_summary import PAPER, PAPER_MASKSD_PARAMS_M
from examples.cris import CRIS, CRISConfig
from masksd import BranchConfig, MaskSD, MaskSDConfig

_FEATURES, _OFF = BranchConfig(site="features"), BranchConfig(enabled=False)
FEATURE_SITE: dict[str, tuple[MaskSDConfig, str]] = {
    "LMVSD at features, shared": (MaskSDConfig(lmvsd=_FEATURES, vmlsd=_OFF), "LMVSD, shared"),
    "both, LMVSD at features, shared": (MaskSDConfig(lmvsd=_FEATURES), "both, shared"),
}
"""The features-site rows, each with the Table VII variant it is a reading of (whose paper figure it is shown beside)."""

PAPER_GFLOPS = PAPER[("ViT-B-16", 480)]["gflops"]  # every row of Tables II and VII


def measure(segmenter: CRIS, config: MaskSDConfig) -> dict[str, float]:
    model = MaskSD(segmenter, config)
    size, words = segmenter.config.image_size, segmenter.config.max_words - 2
    # Batch 2 (CRIS's BatchNorm cannot train on one sample); FLOPs are linear in the batch, so halve them.
    images = torch.randn(2, 3, size, size)
    token_ids = segmenter.tokenize([" ".join(["word"] * words)] * 2)
    ground_truth = (torch.rand(2, 1, size, size) > 0.5).float()

    with torch.no_grad():
        inference, _, _ = count_flops(lambda: model.eval()(images[:1], token_ids[:1]))

    def step() -> None:
        model.train()(images, token_ids, ground_truth).loss.backward()

    training, _, _ = count_flops(step)
    model.zero_grad(set_to_none=True)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "inference_flops": inference,
        "training_flops": training // 2,
    }


def run(cris: CRISConfig) -> tuple[str, dict]:
    torch.manual_seed(0)
    segmenter = CRIS(cris)
    rows, data = [], {}
    baseline = None
    paper_params = PAPER_MASKSD_PARAMS_M.get((cris.model_name, cris.image_size), {})
    variants = {name: (config, name) for name, config in TABLE_VII.items()} | FEATURE_SITE
    for name, (config, paper_name) in variants.items():
        m = measure(segmenter, config)
        baseline = baseline or m
        data[name] = m
        paper = paper_params.get(paper_name)
        rows.append([
            name,
            f"{m['params'] / 1e6:.2f}",
            f"{m['params'] - baseline['params']:+,}",
            f"{m['inference_flops'] / 1e9:.2f}",
            f"{m['training_flops'] / 1e9:.2f}",
            f"{m['training_flops'] / baseline['training_flops']:.2f}",
            "—" if paper is None else f"{paper}",
            "—" if paper is None else f"{PAPER_GFLOPS}",
        ])
    header = ["variant", "params (M)", "added", "inference GFLOPs", "training GFLOPs / image", "× baseline",
              "paper params (M)", "paper FLOPs (G)"]
    title = f"## {cris.model_name} @ {cris.image_size} px, per image, max_words {cris.max_words}"
    return f"{title}\n\n{markdown_table(header, rows)}", {"model": cris.model_name, "image_size": cris.image_size, "rows": data}


NOTES = """
- Inference FLOPs are the same for every variant: eval runs the bare segmenter (MaskSD adds nothing).
- Training FLOPs per image of a step: the main branch plus each enabled branch's re-encoded modality and decode,
  forward and backward. Sharing the decode head does not change the count, only the parameters.
- "at features": LMVSD replaces the selected positions of the pyramid's three maps (what the neck reads) with
  per-position learnable values and decodes them: no second image encode, only the pyramid, neck, decoder and
  projector again. Its paper columns are those of the Table VII variant it reads (LMVSD / both, shared).
"""
NOTES_VIT_B_480 = """- FLOPs count 2 per multiply-add; the paper's 165.96 "FLOPs" matches our multiply-adds (half the
  inference column) within 6 %; see benchmarks/results/params_flops_summary.md for the per-part gap.
- Parameters: CLIP ViT-B/16 (150.2 M) plus our 50.5 M decode head vs the paper's ~57 M; a separate
  head per branch adds exactly one copy of it. The paper's +3 M for shared LMVSD cannot be one
  768-d mask token; ours adds exactly Cv + Ct numbers. The features site's maps add
  512·60² + 1024·30² + 1024·15² = 2,995,200: Table VII's 3 M.
"""


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=CRISConfig.variant("vitb-480").model_name)
    parser.add_argument("--size", type=int, default=CRISConfig.variant("vitb-480").image_size)
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU model instead")
    args = parser.parse_args(argv)
    cris = CRISConfig.tiny() if args.tiny else CRISConfig(model_name=args.model, pretrained=None, image_size=args.size)
    table, data = run(cris)
    notes = NOTES + (NOTES_VIT_B_480 if (cris.model_name, cris.image_size) == ("ViT-B-16", 480) else "")
    markdown = f"# Parameters and FLOPs per MaskSD variant (Tables II and VII)\n\n{table}\n{notes}"
    print(markdown)
    name = "params_flops_tiny" if args.tiny else f"params_flops_{args.model}_{args.size}"
    paths = write_results(name, markdown, data, command_line("benchmarks.params_flops", argv))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
