"""How large the referent is in the synthetic scenes: its share of the image and its patch count.

    python -m benchmarks.synthetic_geometry

For the default geometry and masksd 0.1's (3-6 objects of radius 0.055-0.075 / 0.11-0.14 of the
side), on 2000 `val` scenes at 64 px: the referent's area share (mean, median, 10th and 90th
percentiles), how many of the tiny ViT's 8×8 patches it covers by more than half (what
masksd.guidance counts as on-target), the share of referents that cover no patch that much, the
words per expression and the share of expressions with a relation. Writes
benchmarks/results/synthetic_geometry.{md,json}.
"""

from __future__ import annotations


import numpy as np
import torch

from benchmarks.common import command_line, markdown_table, write_results
from examples.pipeline.cli import run_script
from masksd.data import SyntheticConfig, SyntheticReferDataset
from masksd.data.synthetic import RELATIONS
from masksd.guidance import patch_targets

GEOMETRIES = {
    "default (3-4 objects, radius 0.13-0.17 / 0.22-0.30)": {},
    "masksd 0.1 (3-6 objects, radius 0.055-0.075 / 0.11-0.14)": dict(
        max_objects=6, small_radius=(0.055, 0.075), large_radius=(0.11, 0.14)
    ),
}
SCENES = 2000


def measure(overrides: dict) -> dict[str, float]:
    data = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=SCENES, **overrides))
    masks = torch.stack([data[i]["mask"] for i in range(SCENES)])  # (N, 1, 64, 64)
    texts = [data.scene(i).text for i in range(SCENES)]
    share = masks.flatten(1).mean(1).numpy()
    patches = patch_targets(masks, (8, 8)).sum(1).numpy()
    return {
        "share_mean": float(share.mean()), "share_median": float(np.median(share)),
        "share_p10": float(np.quantile(share, 0.1)), "share_p90": float(np.quantile(share, 0.9)),
        "patches_mean": float(patches.mean()), "patches_median": float(np.median(patches)),
        "no_patch": float((patches == 0).mean()),
        "words": float(np.mean([len(t.split()) for t in texts])),
        "relations": float(np.mean([any(r in t for r in RELATIONS) for t in texts])),
    }


def main(argv: list[str] | None = None) -> None:
    data = {name: measure(overrides) for name, overrides in GEOMETRIES.items()}
    rows = [[name, f"{100 * d['share_mean']:.1f} %", f"{100 * d['share_median']:.1f} %",
             f"{100 * d['share_p10']:.1f}–{100 * d['share_p90']:.1f} %", f"{d['patches_mean']:.1f} ({d['patches_median']:.0f})",
             f"{100 * d['no_patch']:.0f} %", f"{d['words']:.2f}", f"{100 * d['relations']:.0f} %"] for name, d in data.items()]
    header = ["geometry", "referent area, mean", "median", "10–90 %", "patches > half covered (of 64), mean (median)",
              "no such patch", "words / expression", "with a relation"]
    markdown = f"# The referent's size in the synthetic scenes\n\n{SCENES} `val` scenes at 64 px.\n\n" + markdown_table(header, rows)
    print(markdown)
    write_results("synthetic_geometry", markdown, {"scenes": SCENES, "geometries": data},
                  command_line("benchmarks.synthetic_geometry", argv))


if __name__ == "__main__":
    run_script(main)
