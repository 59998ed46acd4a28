"""The paper's ablations on the synthetic referring scenes, with paired seeds.

    python -m benchmarks.ablation --mode pretrained       # the paper's regime in miniature (7 rows x 5 seeds, ~7 min a run on 2 CPU cores)
    python -m benchmarks.ablation --mode scratch          # the tiny model from random init (masksd 0.1's setting)
    python -m benchmarks.ablation --mode pretrained --split test --only baseline CM-MaskSD --seeds 0 1 --tag choose
    python -m benchmarks.ablation --mode pretrained --policies --only baseline CM-MaskSD "MaskRIS recipe" --tag policies

Every run fine-tunes the tiny CRIS-style model with the demo's settings (``TrainConfig()``), from the
CLIP weights its row names: ``region`` (region-aligned pretraining: the premise of CM-MaskSD holds),
``global`` (open_clip's ClipLoss alone: the correlation filter ranks the referent near chance) or
``scratch`` (random init). Seeds are paired: for one seed every row starts from the same weights
and sees the same data order; every run is scored on the same scenes (``--split``, 2000 by
default, and the compositional split). Rows run seed by seed, so an interrupted table still has
complete seeds; finished runs are kept in ``benchmarks/results/ablation_<tag>_runs.json`` and
skipped when the script runs again (a run in progress resumes from its last checkpoint);
``--report`` writes the tables from what is stored without training; ``--eval-every N`` also scores
every run on 500 scenes every N steps, and the report gains a table of those curves (has the
baseline plateaued?). Choose settings with
``--split test``; report with ``--split val``.

Reports per row the mean ± sample std over seeds, the paired difference to the baseline of the
same premise with its 95 % t-interval, and the LMVSD guidance (masksd.guidance) of the weights
before and after fine-tuning. Writes benchmarks/results/ablation_<tag>.{md,json,png}.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, command_line, machine, markdown_table, write_results
from benchmarks.lavt_rows import lavt_rows
from benchmarks.runs import METRICS, Run, RunsFile, Settings, runs_path
from examples.pipeline.cli import ScriptParser, run_script
from examples.pipeline.config import masksd_preset

GUIDANCE = ("lmvsd_auc", "lmvsd_kept", "lmvsd_top1", "vmlsd_precision")
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
        40: 2.021, 60: 2.000}
"""Two-sided 95 % quantiles of Student's t by degrees of freedom (between and beyond them: the next lower df's, conservative)."""


@dataclass(frozen=True)
class Row:
    """One row of the table: where its weights come from and how it differs from the default CM-MaskSD."""

    premise: str
    """"region", "global" (pretrained checkpoints, see --region/--global) or "scratch" (random init)."""
    table: str
    """The paper's table the row belongs to."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields (dotted for MaskSD's: ``masksd.vmlsd.enabled``)."""
    versus: str | None = None
    """The row its paired difference is taken against; None: the baseline row of the same premise."""


BASELINE = {"baseline": True}
NO_LMVSD, NO_VMLSD = {"masksd.lmvsd.enabled": False}, {"masksd.vmlsd.enabled": False}
ROWS: dict[str, dict[str, Row]] = {
    "pretrained": {
        "baseline": Row("region", "II", BASELINE),
        "+LMVSD": Row("region", "II", NO_VMLSD),
        "+VMLSD": Row("region", "II", NO_LMVSD),
        "CM-MaskSD": Row("region", "II"),
        "CM-MaskSD, BN frozen in branches": Row("region", "—", {"masksd.branch_norm_stats": "freeze"}),
        "baseline, weak premise": Row("global", "II", BASELINE),
        "CM-MaskSD, weak premise": Row("global", "II"),
    },
    "scratch": {
        "baseline": Row("scratch", "II", BASELINE),
        "+LMVSD": Row("scratch", "II", NO_VMLSD),
        "+VMLSD": Row("scratch", "II", NO_LMVSD),
        "CM-MaskSD": Row("scratch", "II"),
        "no masking": Row("scratch", "V", {"masksd.masking": False}),
        "ground-truth supervision": Row("scratch", "VI", {"masksd.supervision": "ground_truth"}),
        "separate heads": Row("scratch", "VII", {"masksd.share_weights": False}),
    },
}
ROWS["lavt"] = lavt_rows(Row, masksd_preset("maskris"))  # issue 30: the LAVT-style model's rows (benchmarks/lavt_rows.py)
"""The rows of each mode."""

EXTRA_ROWS: dict[str, Row] = {
    "LMVSD K=1 (no filtering)": Row("region", "III", {"masksd.lmvsd.top_k": 1.0}),
    "λ1=0.25, λ2=0.025": Row("region", "III", {"masksd.lmvsd.weight": 0.25, "masksd.vmlsd.weight": 0.025}),
    "distillation ramp (ours)": Row("region", "—", {"distill_ramp": 0.5}),
    "hard target": Row("region", "—", {"masksd.target": "hard"}),
    "LMVSD α=0.5": Row("region", "III", {"masksd.lmvsd.ratio": 0.5}),
    "VMLSD literal (min_masked 0)": Row("region", "IV", {"masksd.vmlsd.min_masked": 0}),
    "baseline, projected deep level": Row("region", "—", {**BASELINE, "deep_level": "projected"}),
    "CM-MaskSD, projected deep level": Row("region", "—", {"deep_level": "projected"}, versus="baseline, projected deep level"),
}
"""Sweep rows (--extra), all from the region-aligned weights: the knobs to try when the defaults do not help.
The ramp (the branch losses grow from 0 over the first half of the steps) and the projected deep level
(the decoder reads the tokens the filter ranks, ETRIS-style) go beyond the paper."""

POLICY_ROWS: dict[str, Row] = {
    "CM-MaskSD, teacher gradient flows": Row("region", "—", {"masksd.teacher_gradient": "flow"}),
    "+LMVSD at the features site": Row("region", "VII", {**NO_VMLSD, "masksd.lmvsd.site": "features"}),
    "CM-MaskSD, LMVSD at the features site": Row("region", "VII", {"masksd.lmvsd.site": "features"}),
    "CM-MaskSD, LMVSD selects the bottom K": Row("region", "—", {"masksd.lmvsd.select": "bottom"}),
    "MaskRIS recipe": Row("region", "—", {
        "masksd.lmvsd.top_k": 1.0, "masksd.lmvsd.ratio": 0.75, "masksd.lmvsd.weight": 0.5,
        "masksd.vmlsd.top_k": 1.0, "masksd.vmlsd.ratio": 0.15, "masksd.vmlsd.weight": 0.5,
    }),  # masksd 0.1's maskris preset, as this row ran; MaskSDConfig.maskris() is now MaskRIS as published
}
"""Policy rows (--policies; issue 18's ``--tag policies`` table), from the region-aligned weights: Eq. 9 with the
gradient flowing through the teacher's soft target; LMVSD masking the pyramid's maps after the encoder (Table
VII's +3 M reading), alone and with VMLSD; LMVSD masking the least sentence-correlated patches (AMLRIS's
direction; VMLSD unchanged); MaskRIS's random 75 % / 15 % masking at λ 0.5 read into our branches (the mask token
at the patch and word embeddings, one masked view per modality: what ``--masksd-preset maskris`` was before issue 26
made it MaskRIS as published, at the inputs, in one combined view)."""

PAPER_TABLE_ROWS: dict[str, Row] = {
    "CM-MaskSD, no masking": Row("region", "V", {"masksd.masking": False}),
    "CM-MaskSD, ground-truth supervision": Row("region", "VI", {"masksd.supervision": "ground_truth"}),
    "CM-MaskSD, separate heads": Row("region", "VII", {"masksd.share_weights": False}),
    "+LMVSD, K=1 (no filtering)": Row("region", "III", {**NO_VMLSD, "masksd.lmvsd.top_k": 1.0}),
    "+LMVSD, α=0.75": Row("region", "III", {**NO_VMLSD, "masksd.lmvsd.ratio": 0.75}),
}
"""The rows of Tables III, V, VI and VII from the region-aligned weights (--paper-tables; issue 21's regime tables,
``benchmarks/regime_tables.py``), each as the paper ran it: Tables V–VII switch one thing of both branches
together, Table III's K and α rows change LMVSD alone (VMLSD off), so each pairs with ``+LMVSD``. Table II's rows
are the pretrained mode's own (baseline, +LMVSD, +VMLSD, CM-MaskSD)."""

PREMISES = {"region": "masksd-tiny-synthetic", "global": "runs/pretrain-global/clip.pt", "scratch": None}
"""Default weights per premise: the shipped region-aligned checkpoint (by name) and the ClipLoss-only one that
``python examples/pretrain_clip.py --region-weight 0 --output runs/pretrain-global`` writes."""


# ----------------------------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(values: list[float], baseline: list[float]) -> dict[str, float]:
    """Per-seed differences ``values[i] - baseline[i]``: their mean, sample std, and the two-sided 95 %
    Student-t interval of the mean (``n`` pairs, ``n - 1`` degrees of freedom)."""
    if len(values) != len(baseline) or not values:
        raise ValueError(f"paired samples must have the same nonzero length, got {len(values)} and {len(baseline)}")
    diffs = [a - b for a, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return {"mean": mean, "std": 0.0, "low": float("nan"), "high": float("nan"), "n": n}
    df = n - 1
    t = T_95.get(df) or T_95[max(k for k in T_95 if k <= df)]  # the next lower df: a slightly wider interval
    half = t * std / math.sqrt(n)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


# ----------------------------------------------------------------------------------------------- runs
def current_numerics(device: str = "cpu") -> dict[str, Any]:
    """What decides how a run rounds besides the code: torch's version, its CPU kernel set and thread count, and on
    ``device="cuda"`` the GPU, CUDA, cuDNN and the precision and determinism switches. Runs pair exactly only when
    these agree (a stored table made elsewhere does not reproduce bit for bit); a CPU record has no GPU keys, so CPU
    and GPU runs never pair."""
    import torch

    numerics = {"torch": torch.__version__, "cpu": machine()["cpu"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        numerics.update(
            gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            deterministic="warn_only" if torch.is_deterministic_algorithms_warn_only_enabled()
            else torch.are_deterministic_algorithms_enabled(), cudnn_tf32=torch.backends.cudnn.allow_tf32,
            matmul_precision=torch.get_float32_matmul_precision(),
        )
    return numerics


def start_worker(threads: int, device: str) -> None:
    """Pin a run's process to ``threads`` CPU threads and, on CUDA, to deterministic kernels where torch has them
    (cuBLAS needs its workspace setting before the first CUDA call), so that a run rounds alike in any process and in
    any order. CUDA has no deterministic backward for bilinear upsampling (CRIS's projector): those kernels still add
    atomically, so a GPU run reproduces only to that rounding (``warn_only``, recorded in the numerics)."""
    import os
    import warnings

    import torch

    torch.set_num_threads(threads)
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
        torch.backends.cudnn.benchmark = False


def run_job(row: Row, seed: int, s: Settings, folder: Path, premises: dict[str, str | None], eval_every: int,
            device: str) -> tuple[Run, dict[str, Any]]:
    """One run in a worker process (``--jobs N``): what :func:`run_one` returns, and the numerics it was made under."""
    return run_one(row, seed, s, folder, premises, eval_every, device), current_numerics(device)


def run_folder(work: str | Path, tag: str, name: str) -> Path:
    """Where a row's runs keep their checkpoints: ``<work>/<tag>/<row name>/<seed>/``."""
    return Path(work) / tag / name.replace(" ", "_").replace(",", "")


def epochs_for(steps: int, scenes: int) -> int:
    """Epochs over ``scenes`` a run of ``steps`` optimiser steps is given (it stops at ``steps``)."""
    from examples.pipeline.config import TrainConfig

    return max(1, math.ceil(steps * TrainConfig().batch_size / scenes))


def train_config(row: Row, seed: int, s: Settings, folder: Path, premises: dict[str, str | None], eval_every: int = 0,
                 device: str = "cpu"):
    from examples.pipeline.config import preset

    epochs = epochs_for(s.steps, s.scenes)
    return preset(
        "demo", pretrained=premises[row.premise], seed=seed, epochs=epochs, synthetic_train_size=s.scenes,
        max_steps=s.steps, lr=s.lr, backbone_lr_scale=s.backbone_lr_scale, workers=1, progress=False, overlays=0,
        eval_untrained=False, export=False, log_every=50, save_every=250, output=str(folder), resume="auto",
        eval_every=eval_every, eval_split=s.best_of or s.split, device=device, **row.overrides,
    )


def score(segmenter, split: str, scenes: int, seed: int = 0) -> dict[str, float]:
    """Main-branch metrics on ``scenes`` synthetic scenes of ``split`` (seed 0: the same scenes for every run)."""
    from torch.utils.data import DataLoader

    from examples.pipeline.evaluation import evaluate
    from masksd.data import SyntheticConfig, SyntheticReferDataset, collate

    data = SyntheticReferDataset(SyntheticConfig(split=split, num_samples=scenes, image_size=segmenter.config.image_size, seed=seed))
    device = next(segmenter.parameters()).device
    loader = DataLoader(data, batch_size=125, collate_fn=collate)
    return evaluate(segmenter, loader, segmenter.tokenize, device, progress=False)


def guidance(model, split: str, scenes: int = 512) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from examples.pipeline.guidance import measure_guidance
    from masksd.data import SyntheticConfig, SyntheticReferDataset, collate

    data = SyntheticReferDataset(SyntheticConfig(split=split, num_samples=scenes, image_size=model.segmenter.config.image_size))
    device = next(model.parameters()).device
    return measure_guidance(model, DataLoader(data, batch_size=128, collate_fn=collate), model.segmenter.tokenize, device)


def read_curve(folder: Path) -> dict[str, float]:
    """The main branch's mIoU by step from a run's ``eval_log.csv`` (empty without one)."""
    log = folder / "eval_log.csv"
    if not log.is_file():
        return {}
    with log.open() as f:
        return {row["step"]: float(row["mIoU"]) for row in csv.DictReader(f)}


def run_one(row: Row, seed: int, s: Settings, folder: Path, premises: dict[str, str | None], eval_every: int = 0,
            device: str = "cpu") -> Run:
    from examples.pipeline.trainer import train

    cfg = train_config(row, seed, s, folder, premises, eval_every, device)
    start = time.perf_counter()
    result = train(cfg, evaluate_at_end=False)
    seconds = time.perf_counter() - start
    scores: dict[str, dict[str, float]] = {}
    best_step = None
    if s.best_of is not None:  # score the weights that validated best on `best_of`, not the last step's
        from examples.pipeline.checkpoint import load_checkpoint

        best = load_checkpoint(folder / "best.pt")
        result.model.load_state_dict(best["model"])
        best_step = str(best["best"]["step"])  # the checkpoint's own record (a resume may have trimmed the log)
        scores["train"] = score(result.model.segmenter, "train", min(s.scenes, s.eval_scenes), seed)  # its own scenes
    segmenter = result.model.segmenter
    scores = {s.split: score(segmenter, s.split, s.eval_scenes), "compositional": score(segmenter, "compositional", s.eval_scenes),
              **scores}
    return Run(seed=seed, steps=result.steps, seconds=seconds, scores=scores, guidance_after=guidance(result.model, s.split),
               curve=read_curve(folder),  # mIoU on cfg.synthetic_eval_size scenes of `best_of or split` every --eval-every steps
               best_step=best_step)


def initial_guidance(premise: str, s: Settings, premises: dict[str, str | None], model: dict[str, str] | None = None) -> dict[str, float]:
    """The LMVSD/VMLSD guidance of a premise's weights before fine-tuning (the decode head plays no part), from seed 0's
    initial weights (``scratch``: random ones, the same whatever ran before in this process); ``model``: the rows'
    ``model`` override, if they train another model than the tiny CRIS."""
    from examples.pipeline.factory import build_model
    from examples.pipeline.loop import seed_everything

    cfg = train_config(Row(premise, "", {**BASELINE, **model} if model else {}), 0, s, Path("."), premises)  # no branch to refuse
    seed_everything(cfg.seed)
    return guidance(build_model(cfg), s.split)


# ----------------------------------------------------------------------------------------------- report
def summarise(rows: dict[str, Row], runs: dict[str, list[Run]], split: str) -> dict[str, dict]:
    summary = {}
    baselines: dict[str, str] = {}  # premise -> its first plain baseline row (later ones are sweep baselines)
    for name, row in rows.items():
        if row.overrides == BASELINE:
            baselines.setdefault(row.premise, name)
    for name, row in rows.items():
        done = runs.get(name, [])
        if not done:
            continue
        versus = row.versus or baselines.get(row.premise, "")
        entry = {"premise": row.premise, "seeds": [r.seed for r in done], "versus": versus}
        for part in (split, "compositional"):
            entry[part] = {m: mean_std([r.scores[part][m] for r in done]) for m in METRICS}
        entry["guidance_after"] = {g: mean_std([r.guidance_after[g] for r in done]) for g in GUIDANCE if g in done[0].guidance_after}
        base = {r.seed: r for r in runs.get(versus, [])}
        paired = [(r, base[r.seed]) for r in done if r.seed in base]
        if paired and name != versus:
            entry["vs_baseline"] = {
                part: paired_difference([r.miou(part) for r, _ in paired], [b.miou(part) for _, b in paired])
                for part in (split, "compositional")
            }
        if all("train" in r.scores for r in done):  # scored from best.pt (Settings.best_of): the generalisation gap
            entry["train"] = mean_std([r.miou("train") for r in done])
            entry["gap"] = mean_std([r.miou("train") - r.miou(split) for r in done])
            entry["best_step"] = [r.best_step for r in done]
        entry["seconds"] = statistics.mean(r.seconds for r in done)
        entry["steps_taken"] = sorted({r.steps for r in done if r.steps is not None})
        steps = set.intersection(*(set(r.curve or {}) for r in done))  # steps every seed logged
        entry["curve"] = {k: statistics.mean(r.curve[k] for r in done) for k in sorted(steps, key=int)}
        summary[name] = entry
    return summary


def render(rows: dict[str, Row], summary: dict, initial: dict, split: str, s: Settings, minutes: float) -> str:
    def pm(x: tuple[float, float], n: int = 2) -> str:
        return f"{x[0]:.2f} ± {x[1]:.2f}" if n > 1 else f"{x[0]:.2f}"  # one seed has no spread to show

    def diff(d: dict | None) -> str:
        if d is None:
            return "—"
        if d["n"] < 2:
            return f"{d['mean']:+.2f} (one pair: no interval)"
        return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

    header = ["row", "weights", "paper table", f"{split} mIoU", "Δ vs baseline [95 % CI]", "oIoU", "Prec@0.5", "Prec@0.9",
              "compositional mIoU", "Δ compositional [95 % CI]", "seeds", "s / run"]
    gapped = any("gap" in e for e in summary.values())
    if gapped:
        header[-2:-2] = ["train-scene mIoU", f"train − {split}", "best step"]
    lines = []
    for name, e in summary.items():
        vs, n = e.get("vs_baseline", {}), len(e["seeds"])
        line = [name, e["premise"], rows[name].table, pm(e[split]["mIoU"], n), diff(vs.get(split)), pm(e[split]["oIoU"], n),
                pm(e[split]["Prec@0.5"], n), pm(e[split]["Prec@0.9"], n), pm(e["compositional"]["mIoU"], n),
                diff(vs.get("compositional")), len(e["seeds"]), f"{e['seconds']:.0f}"]
        if gapped:
            line[-2:-2] = ([pm(e["train"], n), pm(e["gap"], n), ", ".join(str(b) for b in e["best_step"])] if "gap" in e else ["—"] * 3)
        lines.append(line)
    g_lines = []
    for premise, g in initial.items():
        for name, e in summary.items():
            if e["premise"] != premise:
                continue
            ga = e["guidance_after"]
            n = len(e["seeds"])
            g_lines.append([name, premise, f"{g['lmvsd_auc']:.3f}", pm(ga["lmvsd_auc"], n) if "lmvsd_auc" in ga else "—",
                            f"{g['lmvsd_kept']:.3f}", pm(ga["lmvsd_kept"], n) if "lmvsd_kept" in ga else "—"])
    from examples.pipeline.config import TrainConfig

    curves = {name: e["curve"] for name, e in summary.items() if e.get("curve")}
    steps = sorted({k for c in curves.values() for k in c}, key=int)
    curve_split = s.best_of or split
    curve_text = (
        f"\n\nMain-branch mIoU on {TrainConfig().synthetic_eval_size} `{curve_split}` scenes during training (mean over seeds), by step:\n\n"
        + markdown_table(["row", *steps], [[name, *(f"{c[k]:.2f}" if k in c else "—" for k in steps)] for name, c in curves.items()])
        if curves else ""
    )
    taken = sorted({n for e in summary.values() for n in e.get("steps_taken", [])})
    model, encoders = ("LAVT-style", "Swin and BERT") if any(r.overrides.get("model") == "lavt" for r in rows.values()) else ("CRIS-style", "CLIP")
    step_text = f"{s.steps} steps" if taken in ([], [s.steps]) else (
        f"{s.steps} steps ({', '.join(map(str, taken))} taken: whole epochs of full batches)")
    return (
        f"Tiny {model} model, {step_text} of batch 32 (lr {s.lr:g}, {encoders} at {s.backbone_lr_scale:g}×), "
        f"{s.scenes} training scenes; scored on {s.eval_scenes} `{split}` and {s.eval_scenes} `compositional` scenes "
        f"(the same for every run)"
        + (f", each run from its best.pt (the step whose main-branch mIoU on {TrainConfig().synthetic_eval_size} `{s.best_of}` "
           f"scenes was highest; train-scene mIoU on its first {min(s.scenes, s.eval_scenes)} training scenes)" if s.best_of else "")
        + f"; mean ± sample std over seeds; Δ: paired difference to the baseline of the same "
        f"weights, mean [95 % t-interval]; {minutes:.0f} min of runs in all (wall time per run in the last column).\n\n"
        + markdown_table(header, lines)
        + "\n\nLMVSD guidance (masksd.guidance, 512 scenes, K = 0.5) before fine-tuning and after it, per row "
        "(AUC chance 0.5, kept chance 0.5):\n\n"
        + markdown_table(["row", "weights", "AUC before", "AUC after", "kept before", "kept after"], g_lines)
        + curve_text
    )


def plot(summary: dict, split: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, part in zip(axes, (split, "compositional")):
        means = [summary[n][part]["mIoU"][0] for n in names]
        stds = [summary[n][part]["mIoU"][1] for n in names]
        colours = ["#888888" if n.startswith("baseline") else "#3465a4" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"synthetic {part}")
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0, low - 5), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(summary: dict, split: str, path: Path) -> bool:
    """The main branch's validation mIoU by step, mean over seeds, one line per row with a curve; False
    (and no file) when no row has one."""
    curves = {name: e["curve"] for name, e in summary.items() if e.get("curve")}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        steps = sorted(curve, key=int)
        ax.plot([int(k) for k in steps], [curve[k] for k in steps], marker="o", label=name,
                color="#888888" if name.startswith("baseline") else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"mIoU on `{split}` (%)")
    ax.set_title("validation during training (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- runs at a time
def run_jobs(jobs: list[tuple[str, tuple]], processes: int, threads: int, device: str, budget: float | None = None):
    """Yield ``(name, run_job(*arguments))`` for each ``(name, arguments)`` of ``jobs`` as it finishes: in this
    process, in order, when ``processes`` is 1; else in that many worker processes (spawned, each pinned by
    :func:`start_worker`), submitted in order and yielded as they finish. No job starts after ``budget`` seconds
    (None: no limit); the running ones finish. A failing job stops the rest and raises its error."""
    start = time.perf_counter()

    def in_time() -> bool:
        return budget is None or time.perf_counter() - start < budget

    if processes == 1:
        for index, (name, arguments) in enumerate(jobs):
            if not in_time():
                print(f"--budget {budget:g} s spent: {len(jobs) - index} runs left for the next call", flush=True)
                return
            yield name, run_job(*arguments)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no CUDA or thread-pool state inherited from this process
    queue = list(jobs)
    with ProcessPoolExecutor(processes, mp_context=context, initializer=start_worker, initargs=(threads, device)) as pool:
        running: dict = {}
        try:
            while queue or running:
                while queue and len(running) < processes and in_time():  # one per free process: the budget stays exact
                    name, arguments = queue.pop(0)
                    running[pool.submit(run_job, *arguments)] = name
                if not running:
                    print(f"--budget {budget:g} s spent: {len(queue)} runs left for the next call", flush=True)
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(ROWS), default="pretrained")
    parser.add_argument("--only", nargs="+", help="row names to run (default: every row of the mode)")
    parser.add_argument("--extra", action="store_true", help="also the sweep rows (target kind, α, K, λ, min_masked)")
    parser.add_argument("--policies", action="store_true",
                        help="also the policy rows (teacher gradient, features site, bottom-K selection, MaskRIS's recipe)")
    parser.add_argument("--paper-tables", action="store_true",
                        help="also the rows of Tables III, V, VI and VII from the region-aligned weights (no masking, ground-truth "
                        "supervision, separate heads, LMVSD's K=1 and α=0.75)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    from examples.pipeline.config import TrainConfig

    demo = TrainConfig()
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps per run (batch %d)" % demo.batch_size)
    parser.add_argument("--scenes", type=int, default=demo.synthetic_train_size, help="training scenes per epoch")
    parser.add_argument("--lr", type=float, default=demo.lr)
    parser.add_argument("--backbone-lr-scale", type=float, default=demo.backbone_lr_scale)
    parser.add_argument("--split", choices=("val", "test"), default="val", help="test: for choosing settings; val: for the table")
    parser.add_argument("--eval-scenes", type=int, default=2000)
    parser.add_argument("--region", default=PREMISES["region"], help="region-aligned CLIP weights (the shipped checkpoint)")
    parser.add_argument("--global", dest="global_", default=PREMISES["global"], help="ClipLoss-only CLIP weights (examples/pretrain_clip.py --region-weight 0)")
    parser.add_argument("--tag", help="results name (default: the mode)")
    parser.add_argument("--work", default="runs/ablation", help="folder for the runs' checkpoints")
    parser.add_argument("--eval-every", type=int, default=0,
                        help=f"also score the main branch on {demo.synthetic_eval_size} --split scenes every N steps of each run (eval_log.csv; "
                        "the report's curve table shows whether the baseline has plateaued); training is unchanged")
    parser.add_argument("--best-of", choices=("val", "test"),
                        help="score each run from its best.pt, the checkpoint whose --eval-every validation on this split was "
                        "highest (another split than --split), and on its own training scenes too (the generalisation gap)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for every run (default 1, what the stored tables used): the thread count "
                        "changes how reductions round, so runs pair exactly only at one count on one kind of machine")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process at --threads threads (results identical to --jobs 1; "
                        "on a 2-core machine use 2 with --threads 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the runs train; cuda records the GPU's numerics (CUDA runs never pair with CPU runs: use "
                        "another --tag) and runs them with deterministic kernels; many --jobs share the one GPU")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no run after this many seconds (the ones started finish and are stored; run again to go on)")
    parser.add_argument("--report", action="store_true",
                        help="only write the tables from the runs stored so far (an interrupted or partial table)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")

    rows = dict(ROWS[args.mode])
    if args.extra:
        rows.update(EXTRA_ROWS)
    if args.policies:
        rows.update(POLICY_ROWS)
    if args.paper_tables:
        rows.update(PAPER_TABLE_ROWS)
    if args.only:
        unknown = set(args.only) - set(rows)
        if unknown:
            parser.error(f"--only: unknown rows {sorted(unknown)}; choose from {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in args.only}
    premises = {"region": args.region, "global": args.global_, "scratch": None}
    from examples.cris.config import SHIPPED_WEIGHTS

    for premise in {r.premise for r in rows.values()} - {"scratch"} if not args.report else ():  # --report reads no weights
        path = SHIPPED_WEIGHTS[premises[premise]][1] if premises[premise] in SHIPPED_WEIGHTS else premises[premise]
        if not Path(path).is_file():
            parser.error(f"--{premise}: the {premise} weights {path} do not exist (see examples/pretrain_clip.py)")
    if args.best_of is not None:
        if args.best_of == args.split:
            parser.error(f"--best-of: the split that picks best.pt must not be the reported --split ({args.split}); use the other")
        if args.eval_every < 1:
            parser.error("--best-of needs --eval-every N (N >= 1): best.pt is kept from those validations")
        batches = args.scenes // demo.batch_size  # full batches an epoch
        taken = min(args.steps, epochs_for(args.steps, args.scenes) * batches)
        if args.eval_every > taken:
            parser.error(f"--eval-every {args.eval_every} exceeds the {taken} steps a run takes: no validation would keep a best.pt")
    settings = Settings(args.steps, args.scenes, args.split, args.eval_scenes, args.lr, args.backbone_lr_scale, args.best_of,
                        args.eval_every if args.best_of else None)
    tag = args.tag or args.mode
    store = RunsFile.read(runs_path(tag, RESULTS))
    if store.settings is not None and store.settings.record() != settings.record():
        parser.error(f"{store.path} holds runs with other settings {store.settings.record()}: pass another --tag, or delete it and "
                     f"the runs' folder {Path(args.work) / tag} (its checkpoints would be resumed)")
    store.settings = settings
    runs = store.runs
    if not args.report:
        import torch

        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: torch finds no CUDA device here")
        start_worker(args.threads, args.device)
        here = current_numerics(args.device)
        if store.numerics is not None and store.numerics != here:
            parser.error(f"{store.path} holds runs made under other numerics {store.numerics}, this run's are {here}: runs would "
                         f"not pair exactly; pass another --tag (and re-run its baseline), or run where {store.numerics} holds")
        if store.numerics is None and (runs or store.initial):
            parser.error(f"{store.path} predates the record of the numerics its runs were made under (another machine; re-running "
                         f"its baseline seed 0 elsewhere changed val mIoU by up to 2.4, see benchmarks/results/reproducibility.md): "
                         f"new runs would not pair with them exactly; pass another --tag, or --report to render it")
        store.numerics = here

    if args.report:
        if not runs:
            parser.error(f"--report: {store.path} holds no runs")
        args.seeds = []  # run nothing; summarise what is stored
    for premise in sorted({r.premise for r in rows.values()} if not args.report else ()):
        if premise not in store.initial:
            models = {r.overrides["model"] for r in rows.values() if r.premise == premise and "model" in r.overrides}
            store.initial[premise] = initial_guidance(premise, settings, premises, {"model": models.pop()} if models else None)
            store.write()
    pending = [(seed, name) for seed in args.seeds for name in rows  # seed by seed: an interrupted table has whole seeds
               if not store.has(name, seed)]
    jobs = [(name, (rows[name], seed, settings, run_folder(args.work, tag, name) / str(seed), premises, args.eval_every,
                    args.device)) for seed, name in pending]
    for name, (run, there) in run_jobs(jobs, args.jobs, args.threads, args.device, args.budget):
        if there != store.numerics:
            raise RuntimeError(f"a worker made its run under numerics {there}, not {store.numerics}: not stored")
        store.add(name, run)
        store.write()
        print(f"{name:36s} seed {run.seed}: {args.split} mIoU {run.miou(args.split):6.2f}  compositional "
              f"{run.miou('compositional'):6.2f}  AUC after {run.guidance_after.get('lmvsd_auc', float('nan')):.3f} "
              f"({run.steps} steps, {run.seconds:.0f} s)", flush=True)
    minutes = sum(r.seconds for name in rows for r in runs.get(name, [])) / 60
    initial, numerics = store.initial, store.numerics

    summary = summarise(rows, runs, args.split)
    markdown = f"# Ablations on synthetic referring scenes ({tag})\n\n" + render(rows, summary, initial, args.split, settings, minutes)
    if numerics:  # the machine line below is where the table was written, perhaps only rendered (--report)
        markdown += "\n\nRuns made under: " + ", ".join(f"{k} {v}" for k, v in numerics.items()) + "."
    print("\n" + markdown)
    png = RESULTS / f"ablation_{tag}.png"
    plot(summary, args.split, png)
    markdown += f"\n\n![mIoU per row]({png.name})"
    curves_png = RESULTS / f"ablation_{tag}_curves.png"
    if plot_curves(summary, settings.best_of or args.split, curves_png):
        markdown += f"\n\n![validation during training]({curves_png.name})"
    command = command_line("benchmarks.ablation", argv)
    paths = write_results(f"ablation_{tag}", markdown, {"settings": settings.record(), "summary": summary, "initial": initial,
                                                         "rows": {n: r.__dict__ for n, r in rows.items()}}, command)
    print(f"wrote {paths[0]}, {paths[1]} and {png}")


if __name__ == "__main__":
    run_script(main)
