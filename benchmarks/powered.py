"""Evidence with power: the comparisons that decide, over 20 paired seeds (issue 28; the analysis is fixed in
docs/benchmarks.md, "Evidence with power", written before the new seeds ran).

    python -m benchmarks.powered                                  # the report, from the stored runs files
    python -m benchmarks.powered --run --jobs 2                   # runs what is missing (CPU, resumable), then reports
    python -m benchmarks.powered --run --device cuda --jobs 16 --budget 420   # on one GPU (make gpu-table)

Two ablation tables hold the runs: 3,000 scenes (baseline, CM-MaskSD, CM-MaskSD with ground-truth supervision,
CM-MaskSD without masking) and 200 scenes, the overfit regime (baseline, CM-MaskSD), each run scored from its best
`test` checkpoint (``ablation.py --best-of test``). On CPU they are the stored tables ``regime_3000`` and
``overfit`` (seeds 0-4 stored, 5-19 added); on CUDA their own tags ``gpu_regime_3000`` and ``gpu_overfit`` (GPU runs
never pair with CPU runs). Each comparison is a paired difference by seed on `val` and compositional mIoU: mean, 95 %
t-interval, its half-width and the seeds ahead, over every seed and over the confirmation seeds (those that did not
suggest the leads, 5-19). Writes benchmarks/results/powered[_gpu].{md,json}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from benchmarks.ablation import paired_difference
from benchmarks.common import RESULTS, command_line, markdown_table, write_results
from benchmarks.runs import RunsFile
from examples.pipeline.cli import ScriptParser, run_script

ROWS_3000 = ("baseline", "CM-MaskSD", "CM-MaskSD, ground-truth supervision", "CM-MaskSD, no masking")
ROWS_200 = ("baseline", "CM-MaskSD")


@dataclass(frozen=True)
class Table:
    """One ablation table the comparisons read: its size and rows, and how ``ablation.py`` runs it."""

    size: int
    tag: str
    rows: tuple[str, ...]
    paper_tables: bool
    """The rows need ``--paper-tables`` (the Table V/VI rows)."""


TABLES = (Table(3000, "regime_3000", ROWS_3000, True), Table(200, "overfit", ROWS_200, False))
"""The two tables, with their CPU tags (CUDA: ``gpu_`` before each)."""


@dataclass(frozen=True)
class Comparison:
    number: int
    better: str
    worse: str
    size: int
    role: str


COMPARISONS = (
    Comparison(1, "CM-MaskSD", "baseline", 3000, "primary: does the method help at the chosen size?"),
    Comparison(2, "CM-MaskSD", "baseline", 200, "primary: does it help where the baseline overfits?"),
    Comparison(3, "CM-MaskSD, ground-truth supervision", "baseline", 3000, "lead: +2.33 [+0.32, +4.34] on val at seeds 0-4"),
    Comparison(4, "CM-MaskSD, no masking", "baseline", 3000, "lead: +2.87 [+0.36, +5.38] on compositional at seeds 0-4"),
    Comparison(5, "CM-MaskSD", "CM-MaskSD, ground-truth supervision", 3000, "the paper's Table VI ordering (paper +0.73)"),
)
"""The five comparisons, fixed before the new seeds ran (docs/benchmarks.md)."""

PARTS = ("val", "compositional")
SEEDS = tuple(range(20))
CONFIRMATION_SEEDS = tuple(range(5, 20))
"""The seeds that did not suggest the leads (which were found on seeds 0-4): only there is a lead tested."""
BORDERLINE = 0.1
"""A resolved interval ending within this many mIoU of zero is called borderline."""


# ----------------------------------------------------------------------------------------------- statistics
def compare(store: RunsFile, comparison: Comparison, part: str, seeds: tuple[int, ...]) -> dict[str, Any] | None:
    """``better − worse`` mIoU on ``part``, paired on the ``seeds`` both rows have: paired_difference's figures, the
    interval's half-width, the seeds (better) ahead and behind; None while fewer than 2 such seeds are stored."""
    better, worse = store.by_seed(comparison.better), store.by_seed(comparison.worse)
    shared = [s for s in seeds if s in better and s in worse]
    if len(shared) < 2:
        return None
    diffs = [better[s].miou(part) - worse[s].miou(part) for s in shared]
    d = paired_difference(diffs, [0.0] * len(diffs))
    return {**d, "half_width": (d["high"] - d["low"]) / 2, "seeds": shared, "ahead": sum(x > 0 for x in diffs),
            "behind": sum(x < 0 for x in diffs)}


def verdict(d: dict[str, Any] | None) -> str:
    """resolved (its interval excludes zero; borderline within BORDERLINE of it) or unresolved."""
    if d is None:
        return "not run"
    if d["low"] > 0 or d["high"] < 0:
        side = "above" if d["low"] > 0 else "below"
        edge = d["low"] if d["low"] > 0 else -d["high"]
        return f"resolved, {side} zero" + (" (borderline)" if edge < BORDERLINE else "")
    return "unresolved"


def lead_verdict(d: dict[str, Any] | None, direction: float) -> str:
    """A lead of sign ``direction`` on the confirmation seeds: confirmed only when the interval excludes zero its way."""
    if d is None:
        return "not run"
    if (d["low"] > 0 and direction > 0) or (d["high"] < 0 and direction < 0):
        return "confirmed"
    if (d["low"] > 0 and direction < 0) or (d["high"] < 0 and direction > 0):
        return "reversed"
    return "not confirmed"


def analyse(stores: dict[int, RunsFile]) -> list[dict[str, Any]]:
    """Every comparison on every part, over all seeds and over the confirmation seeds."""
    out = []
    for c in COMPARISONS:
        store = stores[c.size]
        entry: dict[str, Any] = {"number": c.number, "better": c.better, "worse": c.worse, "size": c.size, "role": c.role}
        for part in PARTS:
            every, confirm = compare(store, c, part, SEEDS), compare(store, c, part, CONFIRMATION_SEEDS)
            entry[part] = {"all": every, "confirmation": confirm, "verdict": verdict(every)}
            if c.role.startswith("lead"):
                entry[part]["lead"] = lead_verdict(confirm, +1.0)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------- report
def ci(d: dict[str, Any] | None) -> str:
    if d is None:
        return "—"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def render(results: list[dict[str, Any]], stores: dict[int, RunsFile], tags: dict[int, str]) -> str:
    lines = []
    for r in results:
        for part in PARTS:
            e = r[part]
            every, confirm = e["all"], e["confirmation"]
            lines.append([r["number"], f"{r['better']} − {r['worse']}", f"{r['size']:,}", part, ci(every),
                          f"±{every['half_width']:.2f}" if every else "—",
                          f"{every['ahead']}/{len(every['seeds'])}" if every else "—", e["verdict"],
                          ci(confirm), e.get("lead", "—")])
    table = markdown_table(["#", "comparison", "scenes", "split", "Δ mIoU, all seeds [95 % CI]", "half-width",
                            "seeds ahead", "verdict", "Δ, seeds 5–19 [95 % CI]", "lead (seeds 5–19)"], lines, "rlrlrrrlrl")
    counts = "; ".join(f"`ablation_{tags[t.size]}`: " + ", ".join(f"{name} {len(stores[t.size].by_seed(name))}" for name in t.rows)
                       for t in TABLES)
    settings = stores[3000].settings
    counted = [len(stores[t.size].by_seed(name)) for t in TABLES for name in t.rows]
    span = f"{min(counted)}" if min(counted) == max(counted) else f"{min(counted)}–{max(counted)}"
    title = "20 paired seeds" if min(counted) >= len(SEEDS) else f"partial: {span} of the 20 planned paired seeds per row"
    return (
        f"# Evidence with power ({title}) for the comparisons that decide\n\n"
        f"Tiny CRIS-style model from the region-aligned CLIP, {settings.steps} optimiser steps of batch 32, each run scored "
        f"from its best `{settings.best_of}` checkpoint on {settings.eval_scenes} `{settings.split}` and compositional scenes; "
        "Δ: paired difference by seed, mean [95 % t-interval]; seeds ahead: seeds where the first row scored higher. "
        "A comparison is resolved when its interval excludes zero (borderline: it ends within "
        f"{BORDERLINE} mIoU of zero); a lead (found on seeds 0–4) is confirmed only on seeds 5–19. The analysis was "
        "fixed before seeds 5–19 ran (docs/benchmarks.md). Runs per row: " + counts + ".\n\n" + table
    )


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the rows' missing seeds first (resumable), then report")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where --run trains; cuda uses the gpu_ tags, so that GPU runs never pair with CPU runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (ablation.py --jobs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (ablation.py --threads)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="with --run: start no run after this many seconds (the rest on the next call)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the seeds --run runs")
    parser.add_argument("--work", default="runs/ablation", help="folder for the runs' checkpoints (ablation.py --work)")
    parser.add_argument("--stand-in", action="store_true",
                        help="a CPU stand-in of the same command: tiny runs (4 steps, 64 scenes) under standin_ tags")
    args = parser.parse_args(argv)
    prefix = "standin_" if args.stand_in else "gpu_" if args.device == "cuda" else ""
    tags = {t.size: prefix + t.tag for t in TABLES}
    if args.run:
        from benchmarks import ablation

        start = time.perf_counter()
        for t in TABLES:
            left = None if args.budget is None else args.budget - (time.perf_counter() - start)
            if left is not None and left <= 0:
                print(f"--budget spent before {tags[t.size]}: run again to go on", flush=True)
                break
            steps, scenes, every = (4, 64 if t.size == 3000 else 32, 2) if args.stand_in else (400, t.size, 40)
            ablation.main(["--mode", "pretrained", *(["--paper-tables"] if t.paper_tables else []), "--only", *t.rows,
                           "--tag", tags[t.size], "--scenes", str(scenes), "--steps", str(steps), "--eval-every", str(every),
                           "--best-of", "test", *(["--eval-scenes", "16"] if args.stand_in else []),
                           "--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), "--threads", str(args.threads),
                           "--device", args.device, "--work", args.work,
                           *(["--budget", f"{left:.0f}"] if left is not None else [])])
    stores = {size: RunsFile.of_tag(tag, RESULTS) for size, tag in tags.items()}
    missing = [store.path.name for store in stores.values() if store.settings is None]
    if missing:
        parser.error(f"no runs stored yet in {missing}: run with --run first")
    if stores[3000].numerics != stores[200].numerics:
        parser.error(f"{tags[3000]} and {tags[200]} were made under other numerics: their seeds do not pair alike")
    results = analyse(stores)
    markdown = render(results, stores, tags)
    if stores[3000].numerics:
        markdown += "\n\nRuns made under: " + ", ".join(f"{k} {v}" for k, v in stores[3000].numerics.items()) + "."
    print(markdown)
    name = "powered" + ("_standin" if args.stand_in else "_gpu" if args.device == "cuda" else "")
    paths = write_results(name, markdown, {"tags": {str(k): v for k, v in tags.items()}, "comparisons": results},
                          command_line("benchmarks.powered", argv))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
