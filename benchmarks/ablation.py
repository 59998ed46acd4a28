"""The paper's ablations (Tables II, V, VI, VII) on the synthetic referring scenes, several seeds each.

    python benchmarks/ablation.py --quick        # tiny model, 3 seeds, under 30 minutes on 2 CPU cores
    python benchmarks/ablation.py                # full: 5 seeds, 4000 steps per run (meant for a GPU)
    python benchmarks/ablation.py --quick --only baseline "CM-MaskSD" --extra   # a subset, plus the sweep rows

Every run trains the tiny CRIS-style model from scratch with the demo's settings (same data
order and initial weights per seed across rows), then evaluates the main branch on the
synthetic `val` split and on the `compositional` split (held-out colour-shape combinations).
Reports mIoU, oIoU and Prec@0.5/0.7/0.9 as mean ± sample std over seeds, writes
benchmarks/results/ablation_<mode>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
from common import RESULTS, markdown_table, write_results

ROWS: dict[str, tuple[str, dict]] = {
    "baseline": ("II", {"baseline": True}),
    "+LMVSD": ("II", {"vmlsd": False}),
    "+VMLSD": ("II", {"lmvsd": False}),
    "CM-MaskSD": ("II", {}),
    "no masking": ("V", {"masking": False}),
    "ground-truth supervision": ("VI", {"supervision": "ground_truth"}),
    "separate heads": ("VII", {"share_weights": False}),
}
"""Row -> (paper table, TrainConfig overrides on top of the default CM-MaskSD setting)."""

EXTRA_ROWS: dict[str, tuple[str, dict]] = {
    "hard target": ("—", {"target": "hard"}),
    "VMLSD α=0.5": ("IV", {"vmlsd_ratio": 0.5}),
    "LMVSD α=0.5": ("III", {"lmvsd_ratio": 0.5}),
    "LMVSD K=1 (no filtering)": ("III", {"lmvsd_top_k": 1.0}),
    "λ1=0.25": ("III", {"lmvsd_weight": 0.25}),
}
"""Sweep rows (--extra): the knobs to try when the defaults do not help."""

METRICS = ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9")
MODES = {
    "quick": dict(seeds=(0, 1, 2), epochs=1, synthetic_train_size=8000),
    "full": dict(seeds=(0, 1, 2, 3, 4), epochs=8, synthetic_train_size=16000),
}


def run_one(overrides: dict, seed: int, mode: dict, folder: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from examples.pipeline.config import TrainConfig
    from examples.pipeline.evaluation import evaluate
    from examples.pipeline.factory import build_dataset
    from examples.pipeline.trainer import train
    from masksd.data import collate

    cfg = replace(
        TrainConfig(),
        epochs=mode["epochs"], synthetic_train_size=mode["synthetic_train_size"], seed=seed,
        workers=0, progress=False, overlays=0, eval_untrained=False, log_every=50, output=str(folder),
        **overrides,
    )
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    segmenter = result.model.segmenter
    compositional = build_dataset(cfg, "compositional", train=False)
    loader = DataLoader(compositional, batch_size=64, collate_fn=collate)
    device = next(segmenter.parameters()).device
    comp = evaluate(segmenter, loader, segmenter.tokenize, device, cfg.eval_threshold, progress=False)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"val": result.metrics, "compositional": comp, "steps": result.steps, "seconds": seconds}


def summarise(runs: list[dict], split: str) -> dict[str, tuple[float, float]]:
    out = {}
    for metric in METRICS:
        values = [r[split][metric] for r in runs]
        out[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    for ax, split in zip(axes, ("val", "compositional")):
        means = [results[n]["summary"][split]["mIoU"][0] for n in names]
        stds = [results[n]["summary"][split]["mIoU"][1] for n in names]
        colours = ["#888888" if n == "baseline" else "#3465a4" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=4)
        for i, n in enumerate(names):  # the individual seeds
            ax.scatter([i] * len(results[n]["runs"]), [r[split]["mIoU"] for r in results[n]["runs"]], s=8, color="black", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"synthetic {split}")
        ax.axhline(means[0] if names[0] == "baseline" else 0, color="#888888", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 250 steps per run (CPU, < 30 min)")
    parser.add_argument("--only", nargs="+", help="row names to run (default: all of Tables II, V, VI, VII)")
    parser.add_argument("--extra", action="store_true", help="also run the sweep rows (target kind, α, K, λ)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the mode's seeds")
    parser.add_argument("--scenes", type=int, help="override the scenes per run (steps = scenes / 32 per epoch)")
    parser.add_argument("--tag", help="results go to ablation_<mode>_<tag>.* (default: subset runs get _subset)")
    args = parser.parse_args(argv)
    mode_name = "quick" if args.quick else "full"
    mode = dict(MODES[mode_name])
    if args.seeds:
        mode["seeds"] = tuple(args.seeds)
    if args.scenes:
        mode["synthetic_train_size"] = args.scenes
    rows = dict(ROWS)
    if args.extra:
        rows.update(EXTRA_ROWS)
    if args.only:
        unknown = set(args.only) - set(rows)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; choose from {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in args.only}

    results: dict[str, dict] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (table, overrides) in rows.items():
            runs = []
            for seed in mode["seeds"]:
                run = run_one(overrides, seed, mode, Path(tmp) / f"{len(results)}_{seed}")
                runs.append(run)
                print(f"{name:28s} seed {seed}: val mIoU {run['val']['mIoU']:6.2f}  compositional "
                      f"{run['compositional']['mIoU']:6.2f}  ({run['steps']} steps, {run['seconds']:.0f} s)", flush=True)
            results[name] = {"table": table, "overrides": overrides, "runs": runs,
                             "summary": {s: summarise(runs, s) for s in ("val", "compositional")}}
    minutes = (time.perf_counter() - start) / 60

    header = ["row", "paper table", *METRICS, "compositional mIoU", "s / run"]
    lines = []
    for name, r in results.items():
        val, comp = r["summary"]["val"], r["summary"]["compositional"]
        seconds = statistics.mean(x["seconds"] for x in r["runs"])
        lines.append([name, r["table"], *(f"{val[m][0]:.2f} ± {val[m][1]:.2f}" for m in METRICS),
                      f"{comp['mIoU'][0]:.2f} ± {comp['mIoU'][1]:.2f}", f"{seconds:.0f}"])
    steps = results[next(iter(results))]["runs"][0]["steps"]
    markdown = (
        f"# Ablations on synthetic referring scenes ({mode_name} mode)\n\n"
        f"Tiny CRIS-style model from scratch, {steps} steps of batch 32 per run, seeds {list(mode['seeds'])}; "
        f"synthetic `val` (500 scenes) unless noted; mean ± sample std over seeds; {minutes:.0f} min in all.\n\n"
        + markdown_table(header, lines)
    )
    print("\n" + markdown)
    suffix = f"_{args.tag}" if args.tag else "" if not (args.only or args.extra or args.seeds or args.scenes) else "_subset"
    png = RESULTS / f"ablation_{mode_name}{suffix}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    markdown += f"\n\n![mIoU per row]({png.name})"
    command = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = write_results(f"ablation_{mode_name}{suffix}", markdown, {"mode": mode, "rows": results}, command)
    print(f"wrote {paths[0]}, {paths[1]} and {png}")


if __name__ == "__main__":
    main()
