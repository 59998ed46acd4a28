"""Run folders: a folder that holds a run is never replaced unasked, and what an interrupted run left
behind (temporary checkpoint files) is cleared at the next start."""

from __future__ import annotations

from pathlib import Path

from examples.pipeline.checkpoint import remove_stale_temporaries

__all__ = ["RUN_FILES", "prepare_run_folder", "run_files"]

RUN_FILES = ("last.pt", "best.pt", "train_log.csv", "eval_log.csv")
"""What the training loop writes into its folder: finding any of them there means the folder holds a run."""


def run_files(folder: Path) -> list[str]:
    """The :data:`RUN_FILES` that ``folder`` holds."""
    return [name for name in RUN_FILES if (folder / name).is_file()]


def prepare_run_folder(folder: str | Path, resume: str | None, overwrite: bool, create: bool = True) -> None:
    """Check that a run may write into ``folder`` (``--output``), then (``create``: the process that writes,
    rank 0) create it, remove the temporary files of interrupted checkpoint writes, and with ``overwrite``
    the previous run's files.

    A folder that holds a run (:data:`RUN_FILES`) is refused with one ValueError naming it and what it
    holds, unless ``resume`` is ``"auto"`` or a checkpoint inside it (the run continues), or ``overwrite``
    (a new run replaces it). A ``folder`` that is a file is refused too (NotADirectoryError)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output {folder} is a file, not a run folder")
    found = run_files(folder) if folder.is_dir() else []
    continues = resume == "auto" or (resume is not None and Path(resume).resolve().parent == folder.resolve())
    if found and not (continues or overwrite):
        raise ValueError(
            f"--output {folder} holds a run ({_describe(folder, found)}): pass --resume auto to continue it, or "
            f"--overwrite to replace it with a new run"
        )
    if not create:
        return
    folder.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(folder)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of interrupted checkpoint writes from {folder}: "
              f"{', '.join(p.name for p in stale)}")
    if overwrite and found:
        for name in found:
            (folder / name).unlink()
        print(f"--overwrite: removed the previous run's {', '.join(found)} from {folder}")


def _describe(folder: Path, found: list[str]) -> str:
    """What a run folder holds, with the last step its train_log.csv recorded."""
    text = ", ".join(found)
    log = folder / "train_log.csv"
    if log.is_file():
        lines = log.read_text(errors="replace").strip().splitlines()
        last = lines[-1].split(",", 1)[0] if len(lines) > 1 else ""
        if last.isdigit():
            text += f"; logged up to step {last}"
    return text
