"""Section 4: what the trainer's ``--compile`` compiles (``--compile-scope``, default step: the whole MaskSD step),
on the CM-MaskSD step: first-step (compile) time, the graphs and graph breaks dynamo made, and the steady-state
speed-up over eager. Runs in a child process (the check again, ``--only compile`` and ``COMPILE_HERE``): inductor
once segfaulted on the H200 after sections 1-3 had run in the same process (2026-12-04); a crash then costs this
section, not the whole check's results."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo

from benchmarks.common import markdown_table
from benchmarks.gpu_check import section
from benchmarks.gpu_check.section import MIN_SECTION_S, Section, SectionTimeout, child_environment
from benchmarks.train_step import Bench
from examples.pipeline.factory import compile_masksd
from examples.pipeline.step import GraphBreaks
from masksd import MaskSDConfig

if TYPE_CHECKING:
    from benchmarks.gpu_check.check import GpuCheck

__all__ = ["COMPILE_HERE", "SECTION"]

COMPILE_HERE = "--compile-in-this-process"
"""Hidden flag of the check: run this section inline (what its child process is started with)."""
CHILD_START_S = 30
"""Seconds the child process is given for importing torch and starting CUDA before its own clock starts."""


def run(check: "GpuCheck", end: float) -> dict[str, Any]:
    return run_here(check, end) if check.compile_here else run_in_child(check, end)


def run_in_child(check: "GpuCheck", end: float) -> dict[str, Any]:
    """This section in a child process: its figures, or its error, a timeout or the signal that killed it as
    this section's error."""
    plan = check.plan
    with tempfile.TemporaryDirectory(prefix="gpu_check_compile_") as tmp:
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--only", "compile", COMPILE_HERE,
                   "--device", check.device.type, "--output", tmp, "--compile-backend", plan.compile_backend,
                   "--compile-scope", plan.compile_scope,
                   "--budget", f"{max(MIN_SECTION_S, end - time.perf_counter() - CHILD_START_S):.0f}"]
        if plan.stand_in:
            command.append("--tiny")
        check.log(f"compile: in its own process ({plan.compile_backend}, scope {plan.compile_scope})")
        try:
            returncode, output = section.run_process(command, child_environment(PYTHONFAULTHANDLER="1"), end - time.perf_counter() - 2)
        except subprocess.TimeoutExpired as stop:  # killed: keep what it printed
            printed = stop.output.decode(errors="replace") if isinstance(stop.output, bytes) else (stop.output or "")
            raise SectionTimeout(f"section 4's process ran past its budget; its output ends:\n{printed[-3000:]}") from None
        for line in output.splitlines():
            print(f"    | {line}", flush=True)
        if returncode < 0:
            raise RuntimeError(f"section 4's process died of {signal.Signals(-returncode).name}; its output ends:\n{output[-3000:]}")
        reports = list(Path(tmp).glob("gpu_check*.json"))
        if not reports:
            raise RuntimeError(f"section 4's process exited with {returncode} and wrote no results; its output ends:\n{output[-3000:]}")
        found = json.loads(reports[0].read_text())["sections"]["compile"]
    if found["status"] == "timeout":
        raise SectionTimeout(found["error"])
    if found["status"] != "ok":
        raise RuntimeError(f"section 4's process: {found['status']}: {found['error']}")
    return found["figures"]


def run_here(check: "GpuCheck", end: float) -> dict[str, Any]:
    plan, name = check.plan, "CM-MaskSD"
    train = plan.small
    torch.manual_seed(0)
    bench = Bench(train, plan.batch, check.device, {name: MaskSDConfig()})
    check.log(f"compile: eager {name} steps first")
    eager = bench.measure([name], plan.warmup, plan.rounds, deadline=time.perf_counter() + 0.1 * (end - time.perf_counter()))[name]
    with contextlib.suppress(Exception):  # dynamo's counters are internal (GraphBreaks.graphs)
        torch._dynamo.utils.counters.clear()
    compile_masksd(bench.models[name], plan.compile_scope, plan.compile_backend)
    try:
        check.log(f"compile: first step with backend {plan.compile_backend!r}, scope {plan.compile_scope!r} (compiles)")
        with GraphBreaks() as breaks:
            first, _ = bench.step(name)
            second, _ = bench.step(name)  # a recompile would show here
        check.log(f"compile: first step {first:.1f} s, second {second:.2f} s; {breaks.summary()}; measuring")
        deadline = end - 0.1 * (end - time.perf_counter())
        compiled = bench.measure([name], max(0, plan.warmup - 2), plan.rounds, deadline=deadline)[name]
        graphs = breaks.graphs()
    finally:  # also after a timeout: later runs in this process start from a clean dynamo
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    return {
        "backend": plan.compile_backend, "scope": plan.compile_scope, "model": train.model, "image_size": train.image_size,
        "batch": plan.batch, "amp": train.amp, "eager_median_s": eager.median, "first_step_s": first,
        "second_step_s": second, "compile_overhead_s": first - eager.median, "compiled_median_s": compiled.median,
        "speedup": eager.median / compiled.median, "rounds": len(compiled.seconds), "graphs": graphs,
        "graph_breaks": breaks.count, "graph_break_sites": dict(breaks.sites),
    }


def headline(f: dict[str, Any]) -> str:
    return (f"{f['backend']}, scope {f['scope']}: first step {f['first_step_s']:.1f} s, speed-up {f['speedup']:.2f}×, "
            f"{f['graph_breaks']} graph breaks")


def markdown(f: dict[str, Any]) -> str:
    rows = [
        ["eager ms / step", f"{1000 * f['eager_median_s']:.1f}"],
        ["first compiled step (s)", f"{f['first_step_s']:.2f}"],
        ["second compiled step (s)", f"{f['second_step_s']:.3f}"],
        ["compiled ms / step", f"{1000 * f['compiled_median_s']:.1f}"],
        ["speed-up over eager", f"{f['speedup']:.2f}×"],
        ["graphs / graph breaks", f"{f['graphs']} / {f['graph_breaks']}"],
    ]
    sites = "".join(f"\n- `{site}` ×{n}" for site, n in f["graph_break_sites"].items())
    scope = ("the whole MaskSD step (MaskSD.compile(): branches, masking, losses, and so the backward)" if f["scope"] == "step"
             else "encode_image, encode_text and the decode head")
    return (f"{f['model']} @ {f['image_size']} px, batch {f['batch']}, amp {f['amp']}, backend {f['backend']}: "
            f"{scope}, as the trainer's `--compile --compile-scope {f['scope']}` does.\n\n"
            + markdown_table(["figure", "value"], rows) + (f"\n\nGraph breaks (where: why):{sites}" if sites else ""))


SECTION = Section("compile", "4. torch.compile vs eager, CM-MaskSD step", 200, run, headline, markdown)
