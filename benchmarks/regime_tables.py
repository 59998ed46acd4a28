"""The paper's ablation tables (II, III, V, VI, VII) in miniature, at the training-set size of the regime map chosen
on `test` (the highest lower 95 % bound of CM-MaskSD's gain), each row beside the paper's own difference to its baseline.

    python -m benchmarks.regime_tables --sizes 200=overfit 1000=regime_1000 3000=regime_3000 16000=regime_16000
    python -m benchmarks.regime_tables --sizes 200=overfit 1000=regime_1000 3000=regime_3000 16000=regime_16000 --report

The size is chosen on `test`, never on the reported `val`: among the regime map's sizes (``SIZE=TAG``, the ablation
tables ``benchmarks/regime_map.py`` made; every one complete for ``--seeds``), the one whose paired CM-MaskSD −
baseline difference on `test` has the highest lower 95 % bound (the most evidence of a gain). A run's `test`
score is that of its best.pt, the best of its `test` validations during training (500 scenes every 40 steps),
for both rows alike. At that size the table's rows run into the size's own runs file (``ablation.py
--paper-tables``, same settings, so baseline and CM-MaskSD are the map's runs, paired by seed), and the report
gives each row's paired difference to the baseline on `val` and compositional beside the paper's (RefCOCO val,
ViT-B-16, one run each), and for each of the paper's orderings (LMVSD beats VMLSD, masking beats no masking,
...) whether it holds in miniature: its interval above zero (holds), below zero (reversed) or across it
(unresolved, with the sign of the point estimate). Writes benchmarks/results/ablation_regime_tables.{md,json,png}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.ablation import mean_std, paired_difference
from benchmarks.common import RESULTS, command_line, markdown_table, write_results
from examples.pipeline.cli import ScriptParser, run_script
from benchmarks.regime_map import check_comparable, size_tag
from benchmarks.runs import Run, RunsFile

PAPER_BASELINE = 70.45
"""The paper's baseline: RefCOCO val mIoU, ViT-B-16 CLIP (Tables II, V, VI, VII)."""
PAPER_TABLE_III_LMVSD = 71.45
"""Table III's own LMVSD row (α 0.25, K 0.5, λ1 0.75): the same run as Table II's +LMVSD, whose 266 M parameters
say that it decodes with a separate head (Table VII's "not shared" row)."""


@dataclass(frozen=True)
class PaperRow:
    table: str
    miou: float
    """The paper's RefCOCO val mIoU for the configuration the row runs."""
    note: str = ""


TABLE_III_NOTE = (
    "the paper's Table III ran LMVSD with a separate head (its default row, 71.45, is Table II's 266 M +LMVSD); ours "
    "shares the weights, so the paper Δ describes another model: compare the effect of K and α (the orderings below, "
    "each within its own table), not this row's Δ")

PAPER: dict[str, PaperRow] = {
    "baseline": PaperRow("II", 70.45),
    "+LMVSD": PaperRow("VII", 71.13, "shared weights, as ours; Table II's 71.45 (+1.00) is with a separate head (266 M)"),
    "+VMLSD": PaperRow("VII", 70.88, "shared weights, as ours; Table II's 70.98 (+0.53) is with a separate head (264 M)"),
    "CM-MaskSD": PaperRow("II", 71.68),
    "CM-MaskSD, no masking": PaperRow("V", 71.12),
    "CM-MaskSD, ground-truth supervision": PaperRow("VI", 70.95),
    "CM-MaskSD, separate heads": PaperRow("VII", 71.26),
    "+LMVSD, K=1 (no filtering)": PaperRow("III(c)", 71.01, TABLE_III_NOTE),
    "+LMVSD, α=0.75": PaperRow("III(b)", 70.79, TABLE_III_NOTE),
}
"""Each row of the miniature table and the paper's figure for the same configuration."""

ROW_NAMES = tuple(PAPER)


@dataclass(frozen=True)
class Ordering:
    claim: str
    better: str
    worse: str
    better_paper: float | None = None
    """The paper's mIoU of ``better`` where the comparison is made within another table than PAPER's row (None:
    PAPER[better].miou)."""

    @property
    def paper(self) -> float:
        """The paper's mIoU difference better − worse."""
        better = PAPER[self.better].miou if self.better_paper is None else self.better_paper
        return better - PAPER[self.worse].miou


ORDERINGS: tuple[Ordering, ...] = (
    Ordering("LMVSD helps (II/VII)", "+LMVSD", "baseline"),
    Ordering("VMLSD helps (II/VII)", "+VMLSD", "baseline"),
    Ordering("both branches help (II)", "CM-MaskSD", "baseline"),
    Ordering("both beat LMVSD alone (II/VII)", "CM-MaskSD", "+LMVSD"),
    Ordering("LMVSD beats VMLSD (II/VII)", "+LMVSD", "+VMLSD"),
    Ordering("masking beats no masking (V)", "CM-MaskSD", "CM-MaskSD, no masking"),
    Ordering("distillation beats ground-truth supervision (VI)", "CM-MaskSD", "CM-MaskSD, ground-truth supervision"),
    Ordering("shared weights beat separate heads (VII)", "CM-MaskSD", "CM-MaskSD, separate heads"),
    Ordering("the correlation filter (K=0.5) beats K=1 (III)", "+LMVSD", "+LMVSD, K=1 (no filtering)", PAPER_TABLE_III_LMVSD),
    Ordering("α=0.25 beats α=0.75 (III)", "+LMVSD", "+LMVSD, α=0.75", PAPER_TABLE_III_LMVSD),
)
"""The paper's orderings the table can test; Table III's within Table III (against its own LMVSD row)."""


# ----------------------------------------------------------------------------------------------- statistics
def best_test(run: Run, where: str = "") -> float:
    """A run's `test` mIoU at its best.pt: the best of its `test` validations during training. ``where`` names the
    run's table and row in the error."""
    try:
        return run.best_validation
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None


def paired(runs: dict[str, list[Run]], a: str, b: str, value) -> dict[str, float] | None:
    """``value(run)`` of row ``a`` minus row ``b``, paired on the seeds both have; None while no seed has both."""
    ra, rb = ({r.seed: r for r in runs.get(name, [])} for name in (a, b))
    seeds = sorted(ra.keys() & rb.keys())
    if not seeds:
        return None
    return {**paired_difference([value(ra[s]) for s in seeds], [value(rb[s]) for s in seeds]), "seeds": seeds}


def choose_size(stores: dict[int, RunsFile], seeds: list[int]) -> tuple[int, dict[int, dict[str, float]]]:
    """The size whose CM-MaskSD − baseline on `test` (best.pt's) has the highest lower 95 % bound, and each size's
    difference, over ``seeds``. Every size must hold both rows for every seed of ``seeds``: a choice among partial
    sizes would change as they fill."""
    if len(seeds) < 2:
        raise ValueError(f"--choice-seeds: choosing a size needs an interval, so at least 2 seeds, got {seeds}")
    gains = {}
    for size, store in stores.items():
        for name in ("baseline", "CM-MaskSD"):
            missing = sorted(set(seeds) - set(store.by_seed(name)))
            if missing:
                raise ValueError(f"size {size}: {name} has no run for seeds {missing} yet (run benchmarks/regime_map.py first)")
        only = {name: [r for r in store.runs[name] if r.seed in seeds] for name in ("baseline", "CM-MaskSD")}
        gains[size] = paired(only, "CM-MaskSD", "baseline",
                             lambda r, size=size: best_test(r, f"size {size}, CM-MaskSD or baseline: "))
    return max(gains, key=lambda size: (gains[size]["low"], -size)), gains


def verdict(d: dict[str, float] | None) -> str:
    """Whether a paired difference better − worse supports the paper's ordering."""
    if d is None:
        return "not run"
    if d["n"] < 2:
        return "one pair: no interval"
    if d["low"] > 0:
        return "holds"
    if d["high"] < 0:
        return "reversed"
    if d["mean"] == 0:
        return "unresolved (no difference)"
    return f"unresolved ({'same' if d['mean'] > 0 else 'opposite'} sign)"


def table_rows(runs: dict[str, list[Run]], split: str) -> dict[str, dict[str, Any]]:
    """Per row run so far: the paper's figure and difference, ours on `split` (over the row's own seeds) and its
    difference to the baseline on `split` and compositional, paired on the seeds both have."""
    out = {}
    for name, paper in PAPER.items():
        done = runs.get(name, [])
        if not done:
            continue
        entry = {"paper_table": paper.table, "paper_miou": paper.miou, "paper_delta": paper.miou - PAPER_BASELINE,
                 "seeds": sorted(r.seed for r in done), split: mean_std([r.miou(split) for r in done])}
        if name != "baseline":
            for part in (split, "compositional"):
                entry[f"delta_{part}"] = paired(runs, name, "baseline", lambda r, p=part: r.miou(p))
        out[name] = entry
    return out


def orderings(runs: dict[str, list[Run]], split: str) -> list[dict[str, Any]]:
    """Each of the paper's orderings, paired on the seeds both its rows have (rows may hold different seed counts)."""
    out = []
    for o in ORDERINGS:
        d = paired(runs, o.better, o.worse, lambda r: r.miou(split))
        c = paired(runs, o.better, o.worse, lambda r: r.miou("compositional"))
        out.append({"claim": o.claim, "better": o.better, "worse": o.worse, "paper": o.paper, split: d, "compositional": c,
                    "verdict": verdict(d), "verdict_compositional": verdict(c)})
    return out


# ----------------------------------------------------------------------------------------------- report
def ci(d: dict[str, float] | None) -> str:
    if d is None:
        return "—"
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (one pair)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def render(chosen: int, gains: dict[int, dict], rows: dict[str, dict], orders: list[dict], split: str, tag: str,
           settings: dict[str, Any]) -> str:
    choice = markdown_table(
        ["training scenes", "seeds", "CM-MaskSD − baseline, test (best.pt) [95 % CI]", "chosen"],
        [[f"{size:,}", len(g["seeds"]), ci(g), "✓" if size == chosen else ""] for size, g in sorted(gains.items())])
    main = markdown_table(
        ["row", "paper table", "paper mIoU", "paper Δ", f"ours {split} mIoU", f"ours Δ {split} [95 % CI]",
         "ours Δ compositional [95 % CI]", "seeds"],
        [[name, e["paper_table"], f"{e['paper_miou']:.2f}", f"{e['paper_delta']:+.2f}",
          f"{e[split][0]:.2f} ± {e[split][1]:.2f}", ci(e.get(f"delta_{split}")), ci(e.get("delta_compositional")),
          len(e["seeds"])] for name, e in rows.items()])
    by_note: dict[str, list[str]] = {}  # rows that share a note get it once
    for name in rows:
        if PAPER[name].note:
            by_note.setdefault(PAPER[name].note, []).append(name)
    notes = "".join(f"- {' and '.join(names)}: {note}.\n" for note, names in by_note.items())
    notes += "\n" if notes else ""  # a list under the table, then a blank line
    order = markdown_table(
        ["the paper's ordering", "paper Δ", f"ours Δ {split} [95 % CI]", f"in miniature ({split})",
         "ours Δ compositional [95 % CI]", "in miniature (compositional)"],
        [[f"{o['claim']}: {o['better']} − {o['worse']}", f"{o['paper']:+.2f}", ci(o[split]), o["verdict"], ci(o["compositional"]),
          o["verdict_compositional"]] for o in orders])
    return (
        "# The paper's ablation tables in miniature, at the training-set size chosen on `test`\n\n"
        f"Size chosen on `test` (the highest lower 95 % bound of CM-MaskSD − baseline, each run's best.pt): "
        f"**{chosen:,} training scenes** (`ablation_{tag}`).\n\n{choice}\n\n"
        f"At {chosen:,} scenes: tiny CRIS-style model from the region-aligned CLIP, at most {settings['steps']} optimiser steps "
        f"of batch 32, each run scored from its best `{settings.get('best_of')}` checkpoint on {settings['eval_scenes']} "
        f"`{split}` and compositional scenes, each row over its own seeds (the seeds column); Δ: paired "
        f"difference to the baseline on the seeds both have, mean [95 % t-interval]. "
        f"The paper's figures are RefCOCO val mIoU with ViT-B-16, one run each (no interval), Δ to its baseline "
        f"{PAPER_BASELINE:.2f}.\n\n{main}\n\n{notes}"
        "Each ordering the paper reports, paired by seed (holds: interval above zero; reversed: below; unresolved: "
        f"across zero):\n\n{order}\n\n![paper against miniature](ablation_regime_tables.png)"
    )


def plot(rows: dict[str, dict], split: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if n != "baseline"]
    fig, ax = plt.subplots(figsize=(10, 4.4))
    xs = range(len(names))
    ax.scatter([x - 0.15 for x in xs], [rows[n]["paper_delta"] for n in names], marker="s", color="#888888",
               label="paper (RefCOCO val, one run)", zorder=3)
    for part, colour, shift in ((split, "#3465a4", 0.0), ("compositional", "#cc0000", 0.15)):
        ds = [rows[n].get(f"delta_{part}") for n in names]
        for x, d in zip(xs, ds):
            if d is None:
                continue
            err = [[d["mean"] - d["low"]], [d["high"] - d["mean"]]] if d["n"] > 1 else None
            ax.errorbar([x + shift], [d["mean"]], yerr=err, fmt="o", capsize=4, color=colour)
        ax.plot([], [], "o", color=colour, label=f"miniature, {part} (95 % CI)")
    ax.axhline(0, color="#888888", lw=1)
    ax.set_xticks(list(xs), names, rotation=25, ha="right")
    ax.set_ylabel("Δ mIoU vs baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", required=True, metavar="SIZE=TAG",
                        help="the regime map's sizes and their ablation tags (e.g. 200=overfit 3000=regime_3000)")
    parser.add_argument("--choice-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="the seeds the size is chosen over (every size must hold both rows for each: the map's 5)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="the seeds the table runs and reports (default: to run, the choice seeds; to report, every stored "
                        "seed, each row over its own and each difference over the seeds both rows have)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see ablation.py)")
    parser.add_argument("--report", action="store_true", help="only write the tables from the runs stored so far")
    args = parser.parse_args(argv)
    tags: dict[int, str] = {}
    try:
        tags.update(size_tag(item, "--sizes", "3000=regime_3000") for item in args.sizes)
    except ValueError as error:
        parser.error(str(error))
    stores: dict[int, RunsFile] = {}
    for size, tag in sorted(tags.items()):
        stores[size] = RunsFile.of_tag(tag, RESULTS)
        if stores[size].settings is None:
            parser.error(f"--sizes: no runs for size {size} ({stores[size].path}); run benchmarks/regime_map.py first")
    try:
        check_comparable({size: (tags[size], store) for size, store in stores.items()})
        chosen, gains = choose_size(stores, args.choice_seeds)
    except ValueError as error:
        parser.error(str(error))
    tag, settings = tags[chosen], stores[chosen].settings.record()
    print(f"chosen on test: {chosen} scenes ({tag}); CM-MaskSD − baseline on test: "
          + ", ".join(f"{s}: {ci(g)}" for s, g in sorted(gains.items())), flush=True)
    if not args.report:
        from benchmarks import ablation

        ablation.main(["--mode", "pretrained", "--paper-tables", "--only", *ROW_NAMES, "--tag", tag,
                       "--scenes", str(chosen), "--steps", str(settings["steps"]), "--eval-every", str(settings["eval_every"]),
                       "--best-of", settings["best_of"], "--split", settings["split"], "--eval-scenes", str(settings["eval_scenes"]),
                       "--lr", str(settings["lr"]), "--backbone-lr-scale", str(settings["backbone_lr_scale"]),
                       "--seeds", *map(str, args.seeds or args.choice_seeds), "--threads", str(args.threads)])
        stores[chosen] = RunsFile.of_tag(tag, RESULTS)
    split = settings["split"]
    runs = {name: [r for r in done if args.seeds is None or r.seed in args.seeds] for name, done in stores[chosen].runs.items()}
    rows, orders = table_rows(runs, split), orderings(runs, split)
    markdown = render(chosen, gains, rows, orders, split, tag, settings)
    print(markdown)
    plot(rows, split, RESULTS / "ablation_regime_tables.png")
    paths = write_results("ablation_regime_tables", markdown,
                          {"chosen": chosen, "tag": tag, "choice_on_test": {str(k): v for k, v in gains.items()},
                           "rows": rows, "orderings": orders, "settings": settings},
                          command_line("benchmarks.regime_tables", argv))
    print(f"wrote {paths[0]}, {paths[1]} and {RESULTS / 'ablation_regime_tables.png'}")


if __name__ == "__main__":
    run_script(main)
