"""The ablation runs files, ``benchmarks/results/ablation_<tag>_runs.json``: one typed record, read and written here
alone, which ``ablation.py`` extends and the report scripts (``regime_map.py``, ``regime_tables.py``, ``powered.py``)
read. The JSON layout is the one every stored table already has, so old files read unchanged and are written back
in the same order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from benchmarks import common

__all__ = ["METRICS", "Run", "RunsFile", "Settings", "runs_path"]

METRICS = ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9")
"""The metrics each scored split holds (masksd.metrics' names; the files hold more, e.g. Prec@0.6)."""
SPLITS = ("train", "val", "test", "compositional")
"""The keys of a stored run that hold a split's scores."""


def runs_path(tag: str, folder: Path | None = None) -> Path:
    """Where the runs of ablation ``--tag tag`` are kept (``folder``: benchmarks/results/ by default)."""
    return (common.RESULTS if folder is None else Path(folder)) / f"ablation_{tag}_runs.json"


@dataclass
class Settings:
    """What every run of one table shares besides its row and seed; a file's runs pair only under one."""

    steps: int
    scenes: int
    split: str
    """The reported split (``val``, or ``test`` when choosing settings)."""
    eval_scenes: int
    lr: float
    backbone_lr_scale: float
    best_of: str | None = None
    """The split whose validation during training (every --eval-every steps) picks each run's ``best.pt``; the run
    is then scored from best.pt, on its own training scenes too (the generalisation gap). None: from the last step."""
    eval_every: int | None = None
    """With ``best_of``: the validation interval, which decides the candidates for best.pt (None otherwise)."""

    def record(self) -> dict[str, Any]:
        """What the runs file stores and compares: every field, less the unset ones (so that files written before
        a field existed still match)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Settings:
        return cls(**record)


@dataclass
class Run:
    """One finished run: a row's training at one seed, scored."""

    seed: int
    seconds: float
    """Wall time of the training and scoring (the one figure that differs between re-runs)."""
    scores: dict[str, dict[str, float]]
    """Split -> main-branch metrics (METRICS and more): the reported split and ``compositional``, and with
    ``Settings.best_of`` ``train`` (the run's own training scenes), each from the weights the run reports."""
    guidance_after: dict[str, float] = field(default_factory=dict)
    """masksd.guidance figures of the trained weights."""
    steps: int | None = None
    """Optimiser steps taken (whole epochs of full batches may stop short of Settings.steps)."""
    curve: dict[str, float] | None = None
    """Main-branch mIoU by step (as a string) of the validation during training; None where not recorded."""
    best_step: str | None = None
    """With ``best_of``: the step whose weights (best.pt) the scores are from."""

    def miou(self, split: str) -> float:
        """The run's mIoU on ``split``; a KeyError names the splits it has."""
        if split not in self.scores:
            raise KeyError(f"seed {self.seed} has no {split!r} scores (it has {sorted(self.scores)})")
        return self.scores[split]["mIoU"]

    @property
    def best_validation(self) -> float:
        """The mIoU of best.pt's own validation during training (``best_of``'s split): a ValueError where the run
        kept no best.pt."""
        if self.best_step is None or self.curve is None or self.best_step not in self.curve:
            raise ValueError(f"seed {self.seed}: no validation at a best step (its table must be run with ablation.py --best-of)")
        return self.curve[self.best_step]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        known = {f.name for f in fields(cls)} - {"scores"}
        unknown = set(data) - known - set(SPLITS)
        if unknown or "seed" not in data:
            raise ValueError(f"not a stored run: keys {sorted(data)} (unknown {sorted(unknown)})")
        return cls(scores={k: data[k] for k in SPLITS if k in data}, **{k: data[k] for k in known if k in data})

    def to_json(self, split: str) -> dict[str, Any]:
        """The stored layout, in the order ablation.py has always written it (``split``: the reported one first)."""
        data: dict[str, Any] = {"seed": self.seed}
        if self.steps is not None:
            data["steps"] = self.steps
        data["seconds"] = self.seconds
        data.update({k: self.scores[k] for k in (split, "compositional") if k in self.scores})
        data["guidance_after"] = self.guidance_after
        if self.curve is not None:
            data["curve"] = self.curve
        if self.best_step is not None:
            data["best_step"] = self.best_step
        data.update({k: v for k, v in self.scores.items() if k not in (split, "compositional")})
        return data


@dataclass
class RunsFile:
    """An ablation table's stored runs: its settings, the numerics its runs were made under, the runs per row and the
    premises' guidance before fine-tuning."""

    path: Path
    settings: Settings | None = None
    numerics: dict[str, Any] | None = None
    """torch, CPU, threads (and the GPU's figures for CUDA runs): runs pair exactly only under equal numerics. None:
    a file from before they were recorded."""
    runs: dict[str, list[Run]] = field(default_factory=dict)
    """Row name -> its runs, in seed order."""
    initial: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> RunsFile:
        """The file at ``path`` (an empty record where there is none yet); a ValueError names a file that is not one."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        try:
            return cls.from_json(json.loads(path.read_text()), path)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not an ablation runs file ({error})") from None

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | str = "-") -> RunsFile:
        """The record a runs file's parsed JSON holds (``path``: where it would be written)."""
        return cls(
            Path(path),
            Settings.from_record(data["settings"]) if "settings" in data else None,
            data.get("numerics"),
            {name: [Run.from_json(r) for r in done] for name, done in data.get("runs", {}).items()},
            data.get("initial", {}),
        )

    @classmethod
    def of_tag(cls, tag: str, folder: Path | None = None) -> RunsFile:
        return cls.read(runs_path(tag, folder))

    def write(self) -> None:
        """Write atomically (a temporary file, then a rename), every row's runs in seed order."""
        for done in self.runs.values():
            done.sort(key=lambda r: r.seed)
        split = self.settings.split if self.settings is not None else "val"
        stored = {"settings": None if self.settings is None else self.settings.record(), "numerics": self.numerics,
                  "runs": {name: [r.to_json(split) for r in done] for name, done in self.runs.items()},
                  "initial": self.initial}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in stored.items() if v is not None}, indent=1))
        tmp.replace(self.path)

    def add(self, name: str, run: Run) -> None:
        self.runs.setdefault(name, []).append(run)

    def by_seed(self, name: str) -> dict[int, Run]:
        """Row ``name``'s runs by seed (empty for a row with none)."""
        return {r.seed: r for r in self.runs.get(name, [])}

    def has(self, name: str, seed: int) -> bool:
        return seed in self.by_seed(name)
