"""DataLoader workers that end with the process that started them.

A worker whose parent is killed (``kill -9``, the OOM killer, a torchrun restart) is reparented and can
stay blocked on a pipe for good; under ``torchrun --max-restarts`` such orphans pile up. Each loader of
the pipeline passes ``worker_init_fn=exit_with_parent()``: on Linux the kernel kills the worker when its
parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); on other POSIX systems (macOS) a daemon thread in the
worker checks its parent once a second and exits when it has changed. (On Windows a process's parent id
does not change when the parent dies; there the worker relies on PyTorch's own watchdog.)
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["exit_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_INTERVAL_S = 1.0
"""How often a worker without PR_SET_PDEATHSIG (not Linux) looks for its parent."""


def exit_with_parent() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable, for any start method) that makes each worker exit when the
    process calling this now, its parent, dies."""
    return functools.partial(_exit_with, os.getpid())


def _exit_with(parent: int, worker_id: int) -> None:
    if sys.platform.startswith("linux") and _set_parent_death_signal():
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)
        return
    if sys.platform == "win32":
        return
    threading.Thread(target=_watch, args=(parent,), name="exit-with-parent", daemon=True).start()


def _set_parent_death_signal() -> bool:
    """SIGKILL this process when the thread that forked it dies (True when armed). The DataLoader forks its
    workers from the thread that iterates it: the main thread of every script here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc prctl: fall back on the watcher thread
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)
