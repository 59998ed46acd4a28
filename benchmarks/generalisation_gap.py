"""Is there a generalisation gap for MaskSD to close? Scores finished ablation runs on scenes like the ones
they trained on and on held-out ones.

    python benchmarks/generalisation_gap.py --tag pretrained --rows baseline CM-MaskSD

For each stored checkpoint ``<work>/<tag>/<row>/<seed>/last.pt`` (written by ``benchmarks/ablation.py``)
it reports the main branch's mIoU on the first ``--scenes`` synthetic ``train`` scenes of the run's
seed (the scenes it trained on, each seen once per epoch), on as many ``val`` scenes (new scenes, the same
distribution) and on ``compositional`` scenes (colour-shape pairs never trained on). MaskSD is a
regulariser: its masked branches can only help where the model does worse on new inputs than on
its training data. Writes benchmarks/results/generalisation_gap_<tag>.{md,json}.
"""

from __future__ import annotations

import statistics
import sys

import common  # noqa: F401  (puts the repository on sys.path)
from ablation import run_folder, score
from common import markdown_table, write_results
from examples.pipeline.cli import ScriptParser, run_script

SPLITS = ("train", "val", "compositional")


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="pretrained", help="the ablation's --tag")
    parser.add_argument("--work", default="runs/ablation", help="the ablation's --work folder")
    parser.add_argument("--rows", nargs="+", default=["baseline", "CM-MaskSD"])
    parser.add_argument("--scenes", type=int, default=2000, help="scenes per split")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: every seed with a last.pt; while the ablation runs, name the finished ones)")
    args = parser.parse_args(argv)
    from examples.pipeline.factory import load_segmenter

    results: dict[str, dict[int, dict[str, float]]] = {}
    for row in args.rows:
        folder = run_folder(args.work, args.tag, row)
        checkpoints = sorted(folder.glob("*/last.pt"), key=lambda p: int(p.parent.name))
        checkpoints = [p for p in checkpoints if args.seeds is None or int(p.parent.name) in args.seeds]
        if not checkpoints:
            parser.error(f"--rows: no checkpoints {folder}/<seed>/last.pt (run benchmarks/ablation.py first)")
        for path in checkpoints:
            segmenter, _ = load_segmenter(path)
            segmenter.eval()
            seed = int(path.parent.name)  # the run trained on the train stream of its own seed
            scores = {split: score(segmenter, split, args.scenes, seed if split == "train" else 0)["mIoU"] for split in SPLITS}
            results.setdefault(row, {})[int(path.parent.name)] = scores
            print(f"{row} seed {path.parent.name}: " + "  ".join(f"{s} {v:.2f}" for s, v in scores.items()), flush=True)

    lines = []
    for row, seeds in results.items():
        mean = {s: statistics.mean(v[s] for v in seeds.values()) for s in SPLITS}
        gap = statistics.mean(v["train"] - v["val"] for v in seeds.values())
        comp_gap = statistics.mean(v["train"] - v["compositional"] for v in seeds.values())
        lines.append([row, ", ".join(map(str, seeds)), *(f"{mean[s]:.2f}" for s in SPLITS), f"{gap:+.2f}", f"{comp_gap:+.2f}"])
    markdown = (
        f"# Generalisation gap of the ablation runs ({args.tag})\n\n"
        f"Main-branch mIoU on {args.scenes} scenes per split, mean over seeds: `train` (the training stream's own "
        f"scenes), `val` (new scenes, same distribution), `compositional` (held-out colour-shape pairs).\n\n"
        + markdown_table(["row", "seeds", "train", "val", "compositional", "train − val", "train − compositional"], lines)
    )
    print("\n" + markdown)
    command = "python benchmarks/generalisation_gap.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = write_results(f"generalisation_gap_{args.tag}", markdown, {"scenes": args.scenes, "runs": results}, command)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
