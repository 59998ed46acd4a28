"""How often VMLSD masks a word at all, with and without ``min_masked``, on realistic sentence lengths.

    python -m benchmarks.vmlsd_masking

VMLSD keeps ceil(K·n) of a sentence's n candidate tokens and masks round(α·kept) of them (paper
Eq. 6-7), at least ``min_masked``. With the paper's K = 0.5 and α = 0.1 that is 0 below 9 tokens.
Counts come from masksd's own ``topk_counts`` and ``mask_counts``; the sentence lengths from

- the synthetic val split, tokenized by the tiny CRIS model's tokenizer (the candidates it marks);
- RefCOCO- and G-Ref-like lengths: 1 + Poisson(m - 1) tokens with m = 3.6 and 8.4, the datasets'
  published mean expression lengths in words (Yu et al. 2016; Mao et al. 2016). An assumption: the
  real histograms are not available here; one word is one token for most of their words.

Writes benchmarks/results/vmlsd_masking.{md,json}.
"""

from __future__ import annotations


import numpy as np
import torch

from benchmarks.common import command_line, markdown_table, write_results
from examples.pipeline.cli import run_script
from examples.cris import CRIS, CRISConfig
from masksd.config import PAPER_BRANCHES
from masksd.correlation import topk_counts
from masksd.data import SyntheticConfig, SyntheticReferDataset
from masksd.masking import mask_counts

SAMPLES = 4000


def masked_words(lengths: torch.Tensor, top_k: float, ratio: float, min_masked: int) -> torch.Tensor:
    """Masked tokens per sentence of ``lengths`` candidate tokens (the branch's exact counts)."""
    return mask_counts(ratio, topk_counts(top_k, lengths), min_masked)


def lengths() -> dict[str, torch.Tensor]:
    cris = CRIS(CRISConfig.tiny())
    data = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=SAMPLES))
    texts = [data.scene(i).text for i in range(SAMPLES)]
    synthetic = cris.embed_text(cris.tokenize(texts)).candidates.sum(dim=1)
    rng = np.random.default_rng(0)
    return {
        "synthetic val (tokenized)": synthetic,
        "RefCOCO-like (mean 3.6)": torch.from_numpy(1 + rng.poisson(2.6, SAMPLES)),
        "G-Ref-like (mean 8.4)": torch.from_numpy(1 + rng.poisson(7.4, SAMPLES)),
    }


def main(argv: list[str] | None = None) -> None:
    paper = PAPER_BRANCHES["vmlsd"]
    settings = {
        "paper, min_masked 0": (paper["top_k"], paper["ratio"], 0),
        "paper, min_masked 1 (default)": (paper["top_k"], paper["ratio"], 1),
        "K 1, α 0.25, min_masked 0": (1.0, 0.25, 0),
    }
    data, rows = {}, []
    for source, n in lengths().items():
        for name, (top_k, ratio, minimum) in settings.items():
            masked = masked_words(n, top_k, ratio, minimum).double()
            share = (masked > 0).double().mean().item()
            data.setdefault(source, {})[name] = {"share_masked": share, "mean_masked": masked.mean().item(),
                                                 "mean_candidates": n.double().mean().item()}
            rows.append([source, f"{n.double().mean():.2f}", name, f"{100 * share:.1f} %", f"{masked.mean():.2f}"])
    table = markdown_table(["sentences", "mean tokens", "VMLSD setting", "sentences with a masked word", "masked words / sentence"], rows)
    markdown = f"# How often VMLSD masks a word\n\n{SAMPLES} sentences per source.\n\n{table}"
    print(markdown)
    write_results("vmlsd_masking", markdown, {"samples": SAMPLES, "sources": data},
                  command_line("benchmarks.vmlsd_masking", argv))


if __name__ == "__main__":
    run_script(main)
