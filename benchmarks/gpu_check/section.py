"""What every section of the GPU check shares: its description, time limits, errors, processes and paths."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import ROOT

if TYPE_CHECKING:
    from benchmarks.gpu_check.check import GpuCheck

__all__ = ["MIN_SECTION_S", "NotApplicable", "ROOT", "Section", "SectionTimeout", "child_environment", "free_memory", "in_repo", "relative", "run_process",
           "synchronize", "time_limit"]


MIN_SECTION_S = 5
"""A section with less time left than this is not started (it records "out of budget")."""


@dataclass(frozen=True)
class Section:
    """One section of the check: ``run(check, end)`` measures (``end``: the time.perf_counter value it must finish
    by) and returns its figures, a JSON-able dict; ``headline`` and ``markdown`` render them."""

    name: str
    """Its key in the results and in ``--only``."""
    title: str
    """Its numbered title in the report."""
    budget_s: float
    """Most seconds it may take before it is stopped (it records a timeout)."""
    run: Callable[["GpuCheck", float], dict[str, Any]]
    headline: Callable[[dict[str, Any]], str]
    """One line for the summary table."""
    markdown: Callable[[dict[str, Any]], str]
    """Its part of the report."""


class NotApplicable(Exception):
    """A section that has nothing to measure on this device (recorded as "not applicable")."""


class SectionTimeout(Exception):
    """A section ran past its budget."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout after ``seconds`` (SIGALRM, main thread only; elsewhere a no-op). Bounds Python-level
    work such as compilation; a single hung CUDA call is only interrupted when it returns."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"stopped after its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory() -> None:
    """Collect cycles and return cached CUDA blocks (between sections and between batch-size tries)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports ``benchmarks`` and ``examples`` from this checkout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_process(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own process group from the repository root; on timeout (or any interruption)
    kill that group. Returns (exit status, output)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(1.0, timeout))
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process.returncode, output


def in_repo(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(ROOT)


def relative(filename: str) -> str:
    path = Path(filename).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else filename
