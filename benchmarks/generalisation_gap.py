"""Is there a generalisation gap for MaskSD to close? Scores finished ablation runs on scenes like the ones
they trained on and on held-out ones.

    python -m benchmarks.generalisation_gap --tag pretrained --rows baseline CM-MaskSD

For each stored checkpoint ``<work>/<tag>/<row>/<seed>/last.pt`` (written by ``benchmarks/ablation.py``;
``--checkpoint best`` reads ``best.pt``) it reports the main branch's mIoU on the first ``--scenes`` synthetic
``train`` scenes of the run's seed (the scenes it trained on, each seen once per epoch; never more than
the run's ``synthetic_train_size``, so a run on a small fixed set is scored on that set alone), on
``--scenes`` ``val`` scenes (new scenes, the same distribution) and on ``compositional`` scenes
(colour-shape pairs never trained on); ``--splits`` adds ``test`` (where settings are chosen). MaskSD is a
regulariser: its masked branches can only help where the model does worse on new inputs than on
its training data. Writes benchmarks/results/generalisation_gap_<tag>.{md,json}.
"""

from __future__ import annotations

import statistics

from benchmarks.ablation import run_folder, score
from benchmarks.common import command_line, markdown_table, write_results
from examples.pipeline.cli import ScriptParser, run_script

SPLITS = ("train", "val", "compositional")
"""The default splits: the gap is train − val."""


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="pretrained", help="the ablation's --tag")
    parser.add_argument("--work", default="runs/ablation", help="the ablation's --work folder")
    parser.add_argument("--rows", nargs="+", default=["baseline", "CM-MaskSD"])
    parser.add_argument("--scenes", type=int, default=2000, help="scenes per split")
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test", "compositional"), default=list(SPLITS))
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last", help="score last.pt or best.pt")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: every seed with a --checkpoint file; while the ablation runs, name the finished ones)")
    args = parser.parse_args(argv)
    splits = list(dict.fromkeys(args.splits))
    from examples.pipeline.factory import load_segmenter

    results: dict[str, dict[int, dict[str, float]]] = {}
    for row in args.rows:
        folder = run_folder(args.work, args.tag, row)
        checkpoints = sorted(folder.glob(f"*/{args.checkpoint}.pt"), key=lambda p: int(p.parent.name))
        checkpoints = [p for p in checkpoints if args.seeds is None or int(p.parent.name) in args.seeds]
        if not checkpoints:
            parser.error(f"--rows: no checkpoints {folder}/<seed>/{args.checkpoint}.pt (run benchmarks/ablation.py first)")
        for path in checkpoints:
            segmenter, run = load_segmenter(path)
            seed = int(path.parent.name)  # the run trained on the train stream of its own seed
            trained = min(args.scenes, int(run.get("synthetic_train_size", args.scenes)))  # its own scenes only
            scores = {split: score(segmenter, split, trained if split == "train" else args.scenes, seed if split == "train" else 0)["mIoU"]
                      for split in splits}
            results.setdefault(row, {})[int(path.parent.name)] = scores
            print(f"{row} seed {path.parent.name}: " + "  ".join(f"{s} {v:.2f}" for s, v in scores.items()), flush=True)

    gaps = [(f"train − {other}", other) for other in ("val", "compositional") if "train" in splits and other in splits]
    lines = []
    for row, seeds in results.items():
        mean = {s: statistics.mean(v[s] for v in seeds.values()) for s in splits}
        gap = [statistics.mean(v["train"] - v[other] for v in seeds.values()) for _, other in gaps]
        lines.append([row, ", ".join(map(str, seeds)), *(f"{mean[s]:.2f}" for s in splits), *(f"{g:+.2f}" for g in gap)])
    described = {"train": "the run's own training scenes", "val": "new scenes, same distribution",
                 "test": "new scenes, where settings are chosen", "compositional": "held-out colour-shape pairs"}
    markdown = (
        f"# Generalisation gap of the ablation runs ({args.tag})\n\n"
        f"Main-branch mIoU of each run's {args.checkpoint}.pt on up to {args.scenes} scenes per split, mean over seeds: "
        + ", ".join(f"`{s}` ({described[s]})" for s in splits) + ".\n\n"
        + markdown_table(["row", "seeds", *splits, *(name for name, _ in gaps)], lines)
    )
    print("\n" + markdown)
    command = command_line("benchmarks.generalisation_gap", argv)
    paths = write_results(f"generalisation_gap_{args.tag}", markdown, {"scenes": args.scenes, "runs": results}, command)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
