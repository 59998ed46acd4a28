"""Where does MaskSD help? CM-MaskSD's paired gain against the training-set size, and against the baseline's
generalisation gap.

    python -m benchmarks.regime_map --sizes 300 1000 3000 16000      # runs them (resumable), then draws the map
    python -m benchmarks.regime_map --sizes 1000 --also 200=overfit --report   # the map from the runs stored so far

Each size is one ``benchmarks/ablation.py`` table under the tag ``regime_<size>`` (its runs file holds the
runs; running again resumes them): baseline and CM-MaskSD from the region-aligned CLIP, ``--steps``
optimiser steps whatever the size (a smaller set is seen for more epochs), each run scored from its best
``test`` checkpoint (``--best-of test``, validated every ``--eval-every`` steps) on ``val``, ``compositional``
and its own training scenes. ``--also SIZE=TAG`` adds a table made with the same settings under another tag
(``200=overfit``: the overfit table of ``ablation.py --tag overfit``). Per size: the baseline's ``val``
mIoU, its generalisation gap (training-scene minus ``val`` mIoU) and CM-MaskSD's paired difference with its
95 % interval on ``val`` and compositional; and the trend: per seed, the least-squares slope of the gain against
log10 of the size, averaged over seeds with its 95 % interval (does the gain depend on the size at all?).
Writes benchmarks/results/regime_map.{md,json,png}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.ablation import mean_std, paired_difference
from benchmarks.common import RESULTS, command_line, markdown_table, write_results
from benchmarks.runs import RunsFile
from examples.pipeline.cli import ScriptParser, run_script

ROWS = ("baseline", "CM-MaskSD")
"""The two rows every size runs."""
SHARED = ("steps", "split", "eval_scenes", "lr", "backbone_lr_scale", "best_of", "eval_every")
"""Settings every size's table must share (only ``scenes`` differs)."""


def size_tag(item: str, flag: str, example: str) -> tuple[int, str]:
    """``SIZE=TAG`` (a training-set size and the ablation tag of its table), or a ValueError naming ``flag``."""
    size, sep, tag = item.partition("=")
    if not sep or not size.isdigit() or not tag:
        raise ValueError(f"{flag}: expected SIZE=TAG (e.g. {example}), got {item!r}")
    return int(size), tag


def size_row(size: int, store: RunsFile) -> dict[str, Any]:
    """One size's figures from its ablation runs file: the baseline's ``val`` mIoU (mean, std), its gap
    train − ``val`` (mean, std), and CM-MaskSD − baseline paired by seed on ``val`` and compositional."""
    split = store.settings.split
    base, ours = store.by_seed("baseline"), store.by_seed("CM-MaskSD")
    seeds = sorted(base.keys() & ours.keys())
    if not seeds:
        raise ValueError(f"size {size}: no seed has both a baseline and a CM-MaskSD run yet")
    if any("train" not in base[s].scores for s in seeds):
        raise ValueError(f"size {size}: its runs were not scored on their training scenes (ablation.py --best-of)")
    return {
        "size": size, "seeds": seeds, "split": split,
        "steps_taken": sorted({r.steps for r in (*base.values(), *ours.values()) if r.steps is not None}),
        "baseline": mean_std([base[s].miou(split) for s in seeds]),
        "gap": mean_std([base[s].miou("train") - base[s].miou(split) for s in seeds]),
        "masksd_gap": mean_std([ours[s].miou("train") - ours[s].miou(split) for s in seeds]),
        "gain": {part: paired_difference([ours[s].miou(part) for s in seeds], [base[s].miou(part) for s in seeds])
                 for part in (split, "compositional")},
    }


def trend(stores: dict[int, RunsFile], part: str) -> dict[str, Any] | None:
    """Does the gain depend on the size? Per seed, the least-squares slope of CM-MaskSD − baseline (on ``part``)
    against log10(training scenes) over every size; then the mean slope over seeds with its 95 % t-interval (mIoU
    per tenfold more scenes). A seed missing both rows at any size is left out (a slope over fewer sizes estimates
    another quantity: seeds added to some sizes only, as the powered table's, do not enter); None with fewer than
    two sizes or no complete seed."""
    slopes = {}
    seeds = sorted({seed for store in stores.values() for seed in store.by_seed("baseline")})
    for seed in seeds:
        points = []
        for size, store in stores.items():
            base, ours = store.by_seed("baseline").get(seed), store.by_seed("CM-MaskSD").get(seed)
            if base and ours:
                points.append((math.log10(size), ours.miou(part) - base.miou(part)))
        if len(points) == len(stores) >= 2:
            mx = sum(x for x, _ in points) / len(points)
            my = sum(y for _, y in points) / len(points)
            slopes[seed] = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    if not slopes:
        return None
    values = [slopes[s] for s in sorted(slopes)]
    return {**paired_difference(values, [0.0] * len(values)), "seeds": sorted(slopes), "slopes": values}


def check_comparable(stores: dict[int, tuple[str, RunsFile]]) -> None:
    """Every size's table must differ from the others in its scene count alone (and in it)."""
    first_size, (first_tag, first) = next(iter(stores.items()))
    for size, (tag, store) in stores.items():
        settings = store.settings.record()
        if settings.get("scenes") != size:
            raise ValueError(f"{tag}: its runs trained on {settings.get('scenes')} scenes, not {size}")
        differ = [k for k in SHARED if settings.get(k) != first.settings.record().get(k)]
        if differ:
            raise ValueError(f"{tag} and {first_tag} differ in {differ}: their gains cannot share one map")
        if store.numerics != first.numerics:
            raise ValueError(f"{tag} and {first_tag} were made under other numerics: their seeds do not pair alike")


def render(rows: list[dict[str, Any]]) -> str:
    def ci(d: dict[str, float]) -> str:
        return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d["n"] > 1 else f"{d['mean']:+.2f} (one pair)"

    split = rows[0]["split"]
    lines = [[f"{r['size']:,}", ", ".join(map(str, r["steps_taken"])) or "—", len(r["seeds"]), f"{r['baseline'][0]:.2f} ± {r['baseline'][1]:.2f}",
              f"{r['gap'][0]:+.2f} ± {r['gap'][1]:.2f}", f"{r['masksd_gap'][0]:+.2f}", ci(r["gain"][split]),
              ci(r["gain"]["compositional"])] for r in rows]
    return markdown_table(["training scenes", "steps taken", "seeds", f"baseline {split} mIoU", f"baseline gap (train − {split})",
                           "CM-MaskSD gap", f"CM-MaskSD − baseline, {split} [95 % CI]", "CM-MaskSD − baseline, compositional [95 % CI]"],
                          lines)


def render_trend(trends: dict[str, dict[str, Any] | None], split: str) -> str:
    if trends[split] is None:
        return "Trend: needs a seed run at two sizes or more (--sizes, --also)."

    def ci(d: dict[str, Any]) -> str:
        return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d["n"] > 1 else f"{d['mean']:+.2f} (one seed)"

    first = trends[split]
    return (f"Trend (per seed, the least-squares slope of the gain against log10 of the training scenes; mean over "
            f"{first['n']} seeds [95 % CI]): {ci(first)} mIoU per tenfold more scenes on `{split}`, "
            f"{ci(trends['compositional'])} on compositional. A negative slope: the gain shrinks as the set grows.")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = rows[0]["split"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label, log in ((axes[0], [r["size"] for r in rows], "training scenes", True),
                              (axes[1], [r["gap"][0] for r in rows], f"baseline gap, train − {split} mIoU", False)):
        for part, colour, shift in ((split, "#3465a4", 0.0), ("compositional", "#cc0000", 0.02)):
            gains = [r["gain"][part] for r in rows]
            means = [g["mean"] for g in gains]
            low = [g["mean"] - g["low"] if g["n"] > 1 else 0.0 for g in gains]
            high = [g["high"] - g["mean"] if g["n"] > 1 else 0.0 for g in gains]
            xs = [v * (1 + shift) if log else v + 10 * shift for v in x]
            ax.errorbar(xs, means, yerr=[low, high], fmt="o-", capsize=4, color=colour, label=part)
        ax.axhline(0, color="#888888", lw=1)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("CM-MaskSD − baseline mIoU (95 % CI)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000, 16000], help="training-set sizes (scenes)")
    parser.add_argument("--also", nargs="+", default=[], metavar="SIZE=TAG", help="more sizes from ablation tables of another tag")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps at every size")
    parser.add_argument("--eval-every", type=int, default=40, help="validation on `test` every N steps (picks best.pt)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see ablation.py)")
    parser.add_argument("--report", action="store_true", help="only draw the map from the runs stored so far")
    args = parser.parse_args(argv)
    if any(n < 32 for n in args.sizes):
        parser.error(f"--sizes: each size must hold at least one batch of 32 scenes, got {args.sizes}")
    tags = {n: f"regime_{n}" for n in args.sizes}
    try:
        tags.update(size_tag(item, "--also", "200=overfit") for item in args.also)
    except ValueError as error:
        parser.error(str(error))
    if not args.report:
        from benchmarks import ablation

        for size in args.sizes:  # size by size: each table resumes where it stopped
            ablation.main(["--mode", "pretrained", "--only", *ROWS, "--tag", tags[size], "--scenes", str(size),
                           "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--best-of", "test",
                           "--seeds", *map(str, args.seeds), "--threads", str(args.threads)])
    stores = {}
    for size in sorted(tags):
        store = RunsFile.of_tag(tags[size], RESULTS)
        if store.settings is None:
            parser.error(f"--sizes/--also: no runs for size {size} ({store.path}); run without --report first")
        stores[size] = (tags[size], store)
    try:
        check_comparable(stores)
        rows = [size_row(size, store) for size, (_, store) in stores.items()]
        split = rows[0]["split"]
        trends = {part: trend({size: store for size, (_, store) in stores.items()}, part) for part in (split, "compositional")}
    except ValueError as error:
        parser.error(str(error))
    settings = next(iter(stores.values()))[1].settings.record()
    markdown = (
        "# Where does MaskSD help? The gain against the training-set size\n\n"
        f"Tiny CRIS-style model from the region-aligned CLIP, at most {settings['steps']} optimiser steps of batch 32 at every size "
        "(whole epochs of full batches: a small set may take a few less, see the steps column), "
        f"each run scored from its best `{settings.get('best_of')}` checkpoint on {settings['eval_scenes']} `{settings['split']}` "
        "and compositional scenes and on its own training scenes; seeds paired within each size; tables: "
        + ", ".join(f"`ablation_{tag}`" for tag, _ in stores.values()) + ".\n\n" + render(rows)
        + "\n\n" + render_trend(trends, split)
        + "\n\n![gain against size and gap](regime_map.png)"
    )
    print(markdown)
    plot(rows, RESULTS / "regime_map.png")
    paths = write_results("regime_map", markdown, {"tags": {str(k): v for k, v in tags.items()}, "rows": rows, "trend": trends},
                          command_line("benchmarks.regime_map", argv))
    print(f"wrote {paths[0]}, {paths[1]} and {RESULTS / 'regime_map.png'}")


if __name__ == "__main__":
    run_script(main)
