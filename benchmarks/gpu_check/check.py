"""Runs the GPU check's sections (one module each) within their budgets and writes the report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, get_args

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from benchmarks.gpu_check import compile as compile_section
from benchmarks.gpu_check import model_step, profile, sync_debug, torchrun
from benchmarks.gpu_check import section as shared
from benchmarks.gpu_check.plan import Plan
from benchmarks.gpu_check.section import NotApplicable, Section, SectionTimeout, free_memory, time_limit
from examples.pipeline.choices import CompileScope
from examples.pipeline.cli import ScriptParser
from examples.pipeline.distributed import Device, resolve_device

__all__ = ["DEFAULT_BUDGET_S", "FAILED", "GpuCheck", "RUN_ORDER", "SECTIONS", "main", "render"]

SECTIONS: dict[str, Section] = {s.name: s for s in (
    model_step.VIT_B16, model_step.VIT_L14, torchrun.SECTION, compile_section.SECTION, sync_debug.SECTION,
    model_step.CHECKPOINT_BRANCHES, profile.SECTION,
)}
"""Every section, numbered 1-7 in this order in the results."""
RUN_ORDER = ("vit_b16", "vit_l14", "sync_debug", "profile", "torchrun", "compile")
"""The sections that run, in the order they run (compile, the likeliest to overrun, last)."""
DEFAULT_BUDGET_S = 420
"""The sections' limit: 7 minutes, leaving start-up (imports, CUDA) and writing inside the 8 a GPU session allows.
Expected on one H200 (2026-12-04, before the profile section): about 25, 45, 10, 40 and 120 s for sections 1, 2,
5, 3 and 4 (compile: inductor on a fresh cache, then of the pieces; the whole step compiles more); the profile
section is expected to take 30-60 s (three variants, the CUDA trace parsed in Python)."""
FAILED = ("error", "timeout", "out of budget")
"""Statuses that make the check exit 1 (after writing its results)."""


class GpuCheck:
    """Runs the sections within their budgets, logging progress with timestamps; ``results`` holds each
    section's status, seconds, figures and error. What a section reads of it: ``device``, ``plan``, ``log``,
    ``commands`` (the commands the report names) and ``compile_here``."""

    def __init__(self, device: torch.device, plan: Plan, budget: float, argv: list[str], compile_here: bool = False):
        self.device, self.plan = device, plan
        self.compile_here = compile_here
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.commands = {"check": shlex.join(["python", "-m", "benchmarks.gpu_check", *argv])}
        self.results: dict[str, dict[str, Any]] = {}

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)

    def run(self, sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        for name in RUN_ORDER:
            if name in sections:
                self.results[name] = self.run_section(name, SECTIONS[name].run)
            else:
                self.results[name] = {"status": "not run", "seconds": 0.0, "figures": {}, "error": None}
        notes = SECTIONS["checkpoint_branches"]
        self.results["checkpoint_branches"] = {"status": "ok", "seconds": 0.0, "error": None, "figures": notes.run(self, 0.0)}
        self.log("done: " + ", ".join(f"{n} {r['status']}" for n, r in self.results.items()))
        return {name: self.results[name] for name in SECTIONS}

    def run_section(self, name: str, runner: Any) -> dict[str, Any]:
        start = time.perf_counter()
        timeout = min(SECTIONS[name].budget_s, self.deadline - start)
        if timeout < shared.MIN_SECTION_S:
            self.log(f"{name}: not started, {self.deadline - start:.0f} s of the budget left")
            return {"status": "out of budget", "seconds": 0.0, "figures": {}, "error": None}
        self.log(f"{name}: start (budget {timeout:.0f} s)")
        figures: dict[str, Any] = {}
        error = None
        try:
            with time_limit(timeout):
                figures = runner(self, start + timeout)
            status = "ok"
        except NotApplicable as reason:
            status, figures = "not applicable", {"reason": str(reason)}
        except SectionTimeout as stop:
            status, error = "timeout", str(stop)
        except Exception as failure:  # OOM, compile errors, a failed subprocess: recorded, the check goes on
            status = "error"
            error = f"{type(failure).__name__}: {str(failure).strip()[:2000]}"
            error += "\n" + "".join(traceback.format_tb(failure.__traceback__)[-4:])
        free_memory()  # outside the except blocks: the failure's frames are released
        seconds = time.perf_counter() - start
        self.log(f"{name}: {status} after {seconds:.1f} s" + (f": {error.splitlines()[0]}" if error else ""))
        return {"status": status, "seconds": seconds, "figures": figures, "error": error}


def render(results: dict[str, dict[str, Any]], header: str) -> str:
    """The Markdown report: a summary table, then one part per section (each section renders its own)."""
    summary = [[SECTIONS[name].title, r["status"], f"{r['seconds']:.1f}", _headline(name, r)] for name, r in results.items()]
    parts = [header, markdown_table(["section", "status", "seconds", "result"], summary, align="llrl")]
    for name, r in results.items():
        parts.append(f"## {SECTIONS[name].title}: {r['status']}")
        if r["error"]:
            parts.append("```\n" + r["error"].strip() + "\n```")
        if r["status"] == "ok":
            parts.append(SECTIONS[name].markdown(r["figures"]))
        elif r["figures"]:
            parts.append(", ".join(f"{k}: {v}" for k, v in r["figures"].items()))
    return "\n\n".join(p for p in parts if p)


def _headline(name: str, r: dict[str, Any]) -> str:
    f = r["figures"]
    if r["status"] != "ok":
        text = r["error"] or f.get("reason") or f.get("note") or ""
        return text.splitlines()[0][:120] if text else ""
    return SECTIONS[name].headline(f)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ScriptParser(prog="python -m benchmarks.gpu_check", description="The one prepared GPU check (benchmarks/gpu_check).")
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    parser.add_argument("--tiny", action="store_true", help="every section on the tiny model, batch 4: the CPU test of this check")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for gpu_check[_tiny].{md,json} (default: benchmarks/results)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=RUN_ORDER, metavar="SECTION",
                        help=f"run only these sections ({', '.join(RUN_ORDER)}); e.g. to redo one that failed")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend of section 4 (default: inductor; eager with --tiny)")
    parser.add_argument("--compile-scope", choices=get_args(CompileScope),
                        help="what section 4 compiles, as the trainer's --compile-scope (default: step, the whole MaskSD step)")
    parser.add_argument(compile_section.COMPILE_HERE, dest="compile_here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    if device.type != "cuda" and not args.tiny:
        parser.error("the full check (ViT-B-16 and ViT-L-14 at batch 32) needs CUDA; on a CPU add --tiny")
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    plan = (Plan.tiny(device, args.compile_backend, args.compile_scope) if args.tiny
            else Plan.gpu(args.compile_backend, args.compile_scope))
    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        return run_check(device, plan, args, argv)
    finally:
        torch.set_num_threads(threads)


def run_check(device: torch.device, plan: Plan, args: argparse.Namespace, argv: list[str]) -> int:
    """Run the sections, print the report, write it; 1 when a section failed, else 0."""
    check = GpuCheck(device, plan, args.budget, argv, compile_here=args.compile_here)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    check.log(f"gpu_check on {name}, {'tiny' if args.tiny else 'full'} mode, budget {args.budget:.0f} s")
    results = check.run(tuple(args.only or RUN_ORDER))
    elapsed = time.perf_counter() - check.start
    title = f"# GPU check: {name}{' (--tiny)' if args.tiny else ''}"
    header = (
        f"{title}\n\nSections ran in the order {', '.join(RUN_ORDER)} (budget {args.budget:.0f} s, took "
        f"{elapsed:.0f} s); random init (presets `{plan.small_preset}` and `{plan.large_preset}`, their weights' "
        f"activation), nothing downloaded; every step is the trainer's (examples.pipeline.step.TrainStep). "
        f"Torchrun: `{check.commands.get('torchrun', 'not run')}`."
    )
    markdown = render(results, header)
    print(markdown)
    data = {
        "mode": "tiny" if args.tiny else "full", "device": str(device), "device_name": name, "amp": plan.small.amp,
        "budget_s": args.budget, "elapsed_s": elapsed, "run_order": list(RUN_ORDER),
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "commands": check.commands, "sections": results,
    }
    paths = write_results("gpu_check_tiny" if args.tiny else "gpu_check", markdown, data, check.commands["check"], args.output)
    print(f"wrote {paths[0]} and {paths[1]}")
    failed = [n for n, r in results.items() if r["status"] in FAILED]
    if failed:
        print(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0
