"""What every benchmark shares: the machine description and writing results as Markdown + JSON (torch is
imported where it is used, so that a script's ``--help`` needs none)."""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

from masksd import BranchConfig, MaskSDConfig

_OFF = BranchConfig(enabled=False)
TABLE_VII: dict[str, MaskSDConfig] = {
    "baseline": MaskSDConfig.baseline(),
    "LMVSD, shared": MaskSDConfig(vmlsd=_OFF),
    "VMLSD, shared": MaskSDConfig(lmvsd=_OFF),
    "both, shared": MaskSDConfig(),
    "LMVSD, separate": MaskSDConfig(vmlsd=_OFF, share_weights=False),
    "VMLSD, separate": MaskSDConfig(lmvsd=_OFF, share_weights=False),
    "both, separate": MaskSDConfig(share_weights=False),
}
"""The MaskSD variants of the paper's Tables II and VII (paper defaults otherwise)."""


@contextlib.contextmanager
def countable_attention() -> Iterator[None]:
    """Route attention through plain matmuls that FlopCounterMode sees: the fused fast paths
    (nn.MultiheadAttention's, SDPA's CPU kernel) are not counted."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def count_flops(run: Callable[[], object]) -> tuple[int, dict[str, int], object]:
    """FLOPs of ``run()`` (FlopCounterMode: 2 per multiply-add) in total and per module name, and what it returned."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with countable_attention(), counter:
        result = run()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module, result


def machine() -> dict[str, Any]:
    """CPU/GPU, threads and library versions, for the results files."""
    import torch  # here, not at the top: the scripts' --help needs no torch

    import open_clip

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():  # what a GPU figure depends on beyond torch itself
        props = torch.cuda.get_device_properties(0)
        info.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=_nccl_version(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
        )
    return info


def _nccl_version() -> str | None:
    import torch

    try:
        version = torch.cuda.nccl.version()  # (major, minor, patch) in recent torch, an int in older ones
    except Exception:  # a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def machine_line(info: dict[str, Any]) -> str:
    device = info["gpu"] or "no GPU"
    return (
        f"{info['cpu']}, {info['torch_threads']} torch threads, {device}; Python {info['python']}, "
        f"torch {info['torch']}, open_clip {info['open_clip']}; {info['date']}"
    )


def command_line(module: str, argv: list[str] | None) -> str:
    """How to type the command that ran the benchmark ``module`` (``benchmarks.ablation``) with ``argv`` (default:
    this process's), from the repository root: quoted for a shell, so that row names with spaces and commas survive
    being copied from a results file."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_results(
    name: str, markdown: str, data: dict[str, Any], command: str, folder: Path | None = None
) -> tuple[Path, Path]:
    """<folder>/<name>.md (with the command and machine) and <name>.json; folder: benchmarks/results/."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = machine()
    md = folder / f"{name}.md"
    md.write_text(f"{markdown.rstrip()}\n\nCommand: `{command}`\n\nMachine: {machine_line(info)}\n")
    js = folder / f"{name}.json"
    js.write_text(json.dumps({"command": command, "machine": info, **data}, indent=2, default=str) + "\n")
    return md, js


def markdown_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
