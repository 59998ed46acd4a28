"""The one prepared GPU check (issue 12): every figure a short, rare GPU session should bring back, in one run.

    make gpu-check                                                        # on a GPU: under 8 minutes on one H200
    python -m benchmarks.gpu_check --device cpu --tiny --output /tmp/gc   # every section's code path, CPU, ~1 min

Sections (run in the order 1, 2, 5, 3, 4, the slowest to compile last), each within its own time budget
and the whole within --budget; a section that fails (OOM, compile error, timeout) records its error and
the check goes on:

1. ``vit_b16``: ViT-B-16 @ 480, batch 32, bf16 autocast: ms/step, images/s, peak memory and model FLOP
   utilisation, baseline vs CM-MaskSD (train_step.Bench: same step, timing, FLOP and memory code).
2. ``vit_l14``: ViT-L-14 @ 532 at the largest batch of 32, 24, 16, 12, 8 that fits: the same figures.
3. ``torchrun``: a one-process ``torchrun`` run of the training pipeline (nccl, SyncBatchNorm, DDP):
   20 steps and one evaluation pass, train and eval images/s.
4. ``compile``: torch.compile of the pieces the trainer's ``--compile`` compiles: first-step (compile)
   time and the steady-state speed-up of the CM-MaskSD step over eager.
5. ``sync_debug``: the CM-MaskSD step under ``torch.cuda.set_sync_debug_mode("error")``: "no host sync",
   or the first synchronising operation and the repository frames above it.
6. ``checkpoint_branches``: sections 1 and 2 also
   measure CM-MaskSD with it on.

Random init everywhere (nothing is downloaded). ``--tiny`` runs every section on ``CRISConfig.tiny()``
(batch 4, a few steps, gloo instead of nccl, dynamo's "eager" backend instead of inductor) so the script
is tested on CPUs. Writes benchmarks/results/gpu_check.{md,json} (gpu_check_tiny with --tiny).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before torch starts CUDA: fewer fragmentation OOMs while searching for a batch size
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import contextlib
import csv
import gc
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import torch
import torch._dynamo

from benchmarks.common import ROOT, RESULTS, markdown_table, write_results
from examples.pipeline.cli import ScriptParser, run_script
from examples.cris import CRIS, CRISConfig
from examples.pipeline.distributed import Device, resolve_device
from examples.pipeline.factory import compile_segmenter
from masksd import MaskSDConfig
from benchmarks.train_step import Bench, bf16_peak, mfu_peak, step_figures, use_tf32

SECTIONS = ("vit_b16", "vit_l14", "torchrun", "compile", "sync_debug", "checkpoint_branches")
"""Every section, numbered 1-6 in this order in the results."""
RUN_ORDER = ("vit_b16", "vit_l14", "sync_debug", "torchrun", "compile")
"""The sections that run, in the order they run (compile, the likeliest to overrun, last)."""
BUDGET_S = {"vit_b16": 75, "vit_l14": 130, "sync_debug": 30, "torchrun": 120, "compile": 200}
"""Most seconds each section may take before it is stopped (it records a timeout). Expected on one
H200: about 25, 45, 10, 40 and 120 s (compile: inductor on a fresh cache)."""
DEFAULT_BUDGET_S = 420
"""The sections' limit: 7 minutes, leaving start-up (imports, CUDA) and writing inside the 8 an H200 session allows."""
MIN_SECTION_S = 5
"""A section with less time left than this is not started (it records "out of budget")."""
FAILED = ("error", "timeout", "out of budget")
"""Statuses that make the check exit 1 (after writing its results)."""
MODEL_FLOPS_OF = {"CM-MaskSD, checkpointed": "CM-MaskSD"}
"""Recomputation is not model work: MFU of a checkpointed variant uses the FLOPs of the same model without it."""
OOM_MESSAGES = ("out of memory", "ALLOC_FAILED")
"""What cuBLAS/cuDNN workspace allocations that fail near the limit say (plain RuntimeErrors)."""
WORKER = "--torchrun-worker"
"""Hidden first argument: this script as the process torchrun starts in section 3."""
CHILD_START_S = 30
"""Seconds section 4's process is given for importing torch and starting CUDA before its own clock starts."""
COMPILE_HERE = "--compile-in-this-process"
"""Hidden flag: run section 4 inline. Without it section 4 runs in a child process (this script with
``--only compile`` and this flag), because inductor once segfaulted on the H200 after sections 1-3 had run
in the same process (2026-12-04): a crash then costs that section, not the whole check's results."""


@dataclass(frozen=True)
class Plan:
    """What the sections run: the GPU check, or its --tiny stand-in."""

    small: CRISConfig
    """Sections 1, 4 and 5."""
    large: CRISConfig
    """Section 2."""
    batch: int
    """Batch of sections 1, 3 and 4."""
    large_batches: tuple[int, ...]
    """Section 2's candidates, largest first: the first that fits is measured."""
    sync_batch: int
    """Batch of section 5 (only which operations run matters)."""
    warmup: int
    """Untimed steps per variant before measuring."""
    rounds: int
    """Measured alternating rounds (fewer when the section's time runs short)."""
    amp: str
    """Autocast of sections 1-5."""
    steps: int
    """Training steps of the torchrun run."""
    eval_size: int
    """Synthetic scenes the torchrun run evaluates."""
    workers: int
    """DataLoader workers of the torchrun run."""
    compile_backend: str
    """torch.compile backend of section 4."""
    threads: int | None = None
    """torch CPU threads here and in the torchrun run; None leaves torch's default."""
    stand_in: bool = False
    """The --tiny stand-in (passed on to section 4's process)."""

    @classmethod
    def gpu(cls, compile_backend: str | None = None) -> "Plan":
        return cls(
            small=CRISConfig(model_name="ViT-B-16", pretrained=None, image_size=480),
            large=CRISConfig(model_name="ViT-L-14", pretrained=None, image_size=532),
            batch=32, large_batches=(32, 24, 16, 12, 8), sync_batch=4, warmup=3, rounds=10, amp="bf16",
            steps=20, eval_size=256, workers=min(8, max(1, (os.cpu_count() or 2) // 2)),
            compile_backend=compile_backend or "inductor",
        )

    @classmethod
    def tiny(cls, device: torch.device, compile_backend: str | None = None) -> "Plan":
        return cls(
            small=CRISConfig.tiny(), large=CRISConfig.tiny(), batch=4, large_batches=(4, 2), sync_batch=2,
            warmup=1, rounds=1, amp="bf16" if device.type == "cuda" else "none", steps=3, eval_size=8, workers=0,
            compile_backend=compile_backend or "eager",  # dynamo's capture without codegen: inductor takes minutes on a CPU
            threads=1 if device.type == "cpu" else None,  # the tiny model gains nothing from more; a shared CPU loses a lot
            stand_in=True,
        )

    def train_args(self, device: torch.device, output: Path) -> list[str]:
        """examples/train_cris_masksd.py flags of section 3 (synthetic scenes, so nothing to download)."""
        return [
            "--dataset", "synthetic", "--model", self.small.model_name, "--pretrained", str(self.small.pretrained).lower(),
            "--image-size", str(self.small.image_size),
            "--batch-size", str(self.batch), "--max-steps", str(self.steps), "--epochs", "1", "--warmup-epochs", "0",
            "--synthetic-train-size", str(self.batch * self.steps), "--synthetic-eval-size", str(self.eval_size),
            "--lr", "1e-5", "--amp", self.amp, "--workers", str(self.workers), "--log-every", "1", "--overlays", "0",
            "--no-eval-untrained", "--no-progress", "--device", device.type, "--output", str(output),
        ]


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


def largest_batch(
    candidates: tuple[int, ...], try_batch: Callable[[int], object], release: Callable[[], None]
) -> tuple[int, dict[int, str]]:
    """The first of ``candidates`` (largest first) for which ``try_batch`` raises no torch.OutOfMemoryError,
    and the OOM message of each larger one. ``release`` frees memory after a failed try (called outside
    the except block, so the exception's frames and the activations they hold are already gone)."""
    failed: dict[int, str] = {}
    for batch in candidates:
        try:
            try_batch(batch)
            return batch, failed
        except RuntimeError as error:  # torch.OutOfMemoryError, or a library's failed workspace allocation
            message = str(error).strip()
            if not isinstance(error, torch.OutOfMemoryError) and not any(m in message for m in OOM_MESSAGES):
                raise
            failed[batch] = message.splitlines()[0][:300]
        release()
    raise torch.OutOfMemoryError(f"none of the batch sizes {list(candidates)} fits: {failed}")


def checkpoint_option() -> tuple[MaskSDConfig, str]:
    """CM-MaskSD with ``checkpoint_branches=True`` (section 6 records it; sections 1 and 2 measure it)."""
    return replace(MaskSDConfig(), checkpoint_branches=True), "measured in sections 1 and 2 as 'CM-MaskSD, checkpointed'"


def describe_sync(error: BaseException) -> dict[str, Any]:
    """The operation that synchronised (the innermost repository frame outside benchmarks/) and the
    repository frames above it, innermost last, from the error set_sync_debug_mode("error") raised. A sync
    with no such frame (in backward or the optimiser, say) is described by the innermost three frames."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if _in_repo(f.filename) and not _relative(f.filename).startswith("benchmarks/")]
    stack = [f"{_relative(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in ours or frames[-3:]]
    return {
        "host_sync": True,
        "operation": stack[-1],
        "stack": stack,
        "error": str(error).strip().splitlines()[0],
        "result": f"host sync at {stack[-1]}",
    }


def host_syncs(step: Callable[[], None]) -> dict[str, Any]:
    """Run ``step`` under set_sync_debug_mode("error"): {"host_sync": False, "result": "no host sync"} or the
    first synchronising operation (describe_sync). When one is found, ``step`` runs once more under "warn"
    to list every synchronising line of the step ("sites")."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        found: dict[str, Any] = {"host_sync": False, "result": "no host sync"}
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        found = describe_sync(error)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if found["host_sync"]:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sites = [f"{_relative(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        found["sites"] = list(dict.fromkeys(sites))  # each line once, in the order the step reached them
    return found


def _in_repo(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(ROOT)


def _relative(filename: str) -> str:
    path = Path(filename).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else filename


def _dynamo_counts() -> dict[str, int | None]:
    """Graphs and graph breaks dynamo recorded (its counters are internal: None when they move)."""
    try:
        counters = torch._dynamo.utils.counters
        return {"graphs": counters["stats"].get("unique_graphs"), "graph_breaks": sum(counters["graph_break"].values())}
    except Exception:
        return {"graphs": None, "graph_breaks": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuCheck:
    """Runs the sections within their budgets, logging progress with timestamps; ``results`` holds each
    section's status, seconds, figures and error."""

    def __init__(self, device: torch.device, plan: Plan, budget: float, argv: list[str], compile_here: bool = False):
        self.device, self.plan = device, plan
        self.compile_here = compile_here
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.checkpointed, self.checkpoint_note = checkpoint_option()
        self.commands = {"check": shlex.join(["python", "-m", "benchmarks.gpu_check", *argv])}
        self.results: dict[str, dict[str, Any]] = {}

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)

    def run(self, sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        runners: dict[str, Callable[[float], dict[str, Any]]] = {
            "vit_b16": lambda end: self.measure_model(self.plan.small, (self.plan.batch,), end),
            "vit_l14": lambda end: self.measure_model(self.plan.large, self.plan.large_batches, end),
            "sync_debug": self.sync_debug,
            "torchrun": self.torchrun,
            "compile": self.compile if self.compile_here else self.compile_in_child,
        }
        for name in RUN_ORDER:
            if name in sections:
                self.results[name] = self.run_section(name, runners[name])
            else:
                self.results[name] = {"status": "not run", "seconds": 0.0, "figures": {}, "error": None}
        self.results["checkpoint_branches"] = {
            "status": "ok" if self.checkpointed is not None else "unavailable", "seconds": 0.0, "error": None,
            "figures": {"available": self.checkpointed is not None, "note": self.checkpoint_note},
        }
        self.log("done: " + ", ".join(f"{n} {r['status']}" for n, r in self.results.items()))
        return {name: self.results[name] for name in SECTIONS}

    def run_section(self, name: str, runner: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        timeout = min(BUDGET_S[name], self.deadline - start)
        if timeout < MIN_SECTION_S:
            self.log(f"{name}: not started, {self.deadline - start:.0f} s of the budget left")
            return {"status": "out of budget", "seconds": 0.0, "figures": {}, "error": None}
        self.log(f"{name}: start (budget {timeout:.0f} s)")
        figures: dict[str, Any] = {}
        error = None
        try:
            with time_limit(timeout):
                figures = runner(start + timeout)
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

    # --------------------------------------------------------------- sections 1 and 2
    def measure_model(self, cris: CRISConfig, batches: tuple[int, ...], end: float) -> dict[str, Any]:
        """Baseline, CM-MaskSD (and CM-MaskSD checkpointed) at the first batch of ``batches`` that fits."""
        plan = self.plan
        variants = {"baseline": MaskSDConfig.baseline(), "CM-MaskSD": MaskSDConfig()}
        if self.checkpointed is not None:
            variants["CM-MaskSD, checkpointed"] = self.checkpointed
        self.log(f"building {cris.model_name} @ {cris.image_size} (random init)")
        torch.manual_seed(0)
        bench = Bench(CRIS(cris), batches[0], self.device, plan.amp, variants)

        def try_batch(batch: int) -> None:
            self.log(f"trying batch {batch}")
            bench.set_batch(batch)
            bench.step("CM-MaskSD")  # the variant that needs the most memory

        def release() -> None:
            bench.optimizer.zero_grad(set_to_none=True)
            free_memory()

        batch, failed = largest_batch(batches, try_batch, release) if len(batches) > 1 else (batches[0], {})
        names = list(variants)
        self.log(f"batch {batch}: {plan.warmup} warm-up steps and up to {plan.rounds} rounds of {names}")
        measure_end = time.perf_counter() + 0.6 * (end - time.perf_counter())  # the rest for FLOP counting
        timings = bench.measure(names, plan.warmup, plan.rounds, deadline=measure_end)
        self.log("counting FLOPs")
        counted = {name: bench.flops(name) for name in names}
        peak = mfu_peak(self.device, plan.amp)
        figures = {}
        for name in names:
            model_flops = counted[MODEL_FLOPS_OF.get(name, name)]
            figures[name] = {**step_figures(timings[name], batch, model_flops, peak), "counted_flops": counted[name]}
        found = bf16_peak(self.device)
        return {
            "model": cris.model_name, "image_size": cris.image_size, "batch": batch, "amp": plan.amp,
            "oom": failed, "warmup": plan.warmup, "rounds": len(timings[names[0]].seconds),
            "peak_tflops": peak / 1e12 if peak else None, "peak_entry": found[0] if found else None,
            "checkpoint_branches": self.checkpoint_note, "variants": figures,
        }

    # --------------------------------------------------------------- section 5
    def sync_debug(self, end: float) -> dict[str, Any]:
        if self.device.type != "cuda":
            raise NotApplicable("torch.cuda.set_sync_debug_mode needs CUDA; a CPU step has no host sync to find")
        plan = self.plan
        torch.manual_seed(0)
        bench = Bench(CRIS(plan.small), plan.sync_batch, self.device, plan.amp, {"CM-MaskSD": MaskSDConfig()})
        bench.run("CM-MaskSD")  # warm: Adam's state, library handles
        torch.cuda.synchronize()
        found = host_syncs(lambda: bench.run("CM-MaskSD"))
        self.log(f"sync debug: {found['result']}")
        return {"model": plan.small.model_name, "image_size": plan.small.image_size, "batch": plan.sync_batch, **found}

    # --------------------------------------------------------------- section 3
    def torchrun(self, end: float) -> dict[str, Any]:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        with tempfile.TemporaryDirectory(prefix="gpu_check_torchrun_") as tmp:
            run_dir, report_path = Path(tmp) / "run", Path(tmp) / "report.json"
            train_args = self.plan.train_args(self.device, run_dir)
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
            self.commands["torchrun"] = shlex.join(  # what the worker runs, as one would type it
                ["torchrun", "--standalone", "--nproc_per_node=1", "examples/train_cris_masksd.py",
                 *self.plan.train_args(self.device, Path("RUN"))]
            )
            command = [*launcher, "-m", "benchmarks.gpu_check", WORKER, str(report_path), *train_args]
            self.log(f"torchrun: {self.plan.steps} steps of {self.plan.small.model_name} and one evaluation ({backend})")
            env = {**os.environ, **({"OMP_NUM_THREADS": str(self.plan.threads)} if self.plan.threads else {})}
            returncode, output = _run_process(command, env, timeout=end - time.perf_counter() - 2)
            if returncode != 0:
                raise RuntimeError(f"torchrun exited with {returncode}; its output ends:\n{output[-3000:]}")
            report = json.loads(report_path.read_text())
            with open(run_dir / "train_log.csv", newline="") as f:
                rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        skip = min(5, len(rows) // 2)  # start-up: data workers, cuBLAS/cuDNN handles, the first allocations
        if not report.get("in_group") or report.get("backend") != backend:
            raise RuntimeError(f"the one-process torchrun run was not in a {backend} process group: {report}")
        return {
            "backend": report["backend"], "world_size": report["world_size"], "in_group": report["in_group"],
            "ddp_wrapped": report["ddp_wrapped"], "sync_batchnorm_modules": report["sync_batchnorm"],
            "batchnorm_modules": report["batchnorm"], "steps": len(rows), "batch": self.plan.batch,
            "train_images_per_s": statistics.median(r["images_per_s"] for r in rows[skip:]),
            "train_images_per_s_from_step": skip + 1, "first_step_s": rows[0]["step_time"],
            "eval_images_per_s": report["eval_samples"] / report["eval_seconds"],
            "eval_samples": report["eval_samples"], "eval_seconds": report["eval_seconds"],
            "run_seconds": report["run_seconds"], "losses_finite": all(r["loss"] == r["loss"] for r in rows),
        }

    # --------------------------------------------------------------- section 4
    def compile_in_child(self, end: float) -> dict[str, Any]:
        """Section 4 in a child process (see COMPILE_HERE): its figures, or its error, a timeout or the
        signal that killed it as this section's error."""
        with tempfile.TemporaryDirectory(prefix="gpu_check_compile_") as tmp:
            command = [sys.executable, "-m", "benchmarks.gpu_check", "--only", "compile", COMPILE_HERE,
                       "--device", self.device.type, "--output", tmp, "--compile-backend", self.plan.compile_backend,
                       "--budget", f"{max(MIN_SECTION_S, end - time.perf_counter() - CHILD_START_S):.0f}"]
            if self.plan.stand_in:
                command.append("--tiny")
            self.log(f"compile: in its own process ({self.plan.compile_backend})")
            try:
                returncode, output = _run_process(command, {**os.environ, "PYTHONFAULTHANDLER": "1"}, end - time.perf_counter() - 2)
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
            section = json.loads(reports[0].read_text())["sections"]["compile"]
        if section["status"] == "timeout":
            raise SectionTimeout(section["error"])
        if section["status"] != "ok":
            raise RuntimeError(f"section 4's process: {section['status']}: {section['error']}")
        return section["figures"]

    def compile(self, end: float) -> dict[str, Any]:
        plan, name = self.plan, "CM-MaskSD"
        torch.manual_seed(0)
        bench = Bench(CRIS(plan.small), plan.batch, self.device, plan.amp, {name: MaskSDConfig()})
        self.log(f"compile: eager {name} steps first")
        eager = bench.measure([name], plan.warmup, plan.rounds, deadline=time.perf_counter() + 0.1 * (end - time.perf_counter()))[name]
        with contextlib.suppress(Exception):  # dynamo's counters are internal (_dynamo_counts)
            torch._dynamo.utils.counters.clear()
        compile_segmenter(bench.segmenter, plan.compile_backend)
        try:
            self.log(f"compile: first step with backend {plan.compile_backend!r} (compiles)")
            first, _ = bench.step(name)
            second, _ = bench.step(name)  # a recompile would show here
            self.log(f"compile: first step {first:.1f} s, second {second:.2f} s; measuring")
            deadline = end - 0.1 * (end - time.perf_counter())
            compiled = bench.measure([name], max(0, plan.warmup - 2), plan.rounds, deadline=deadline)[name]
            graphs = _dynamo_counts()
        finally:  # also after a timeout: later runs in this process start from a clean dynamo
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        return {
            "backend": plan.compile_backend, "model": plan.small.model_name, "image_size": plan.small.image_size,
            "batch": plan.batch, "amp": plan.amp, "eager_median_s": eager.median, "first_step_s": first,
            "second_step_s": second, "compile_overhead_s": first - eager.median, "compiled_median_s": compiled.median,
            "speedup": eager.median / compiled.median, "rounds": len(compiled.seconds), **graphs,
        }


def _run_process(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own process group; on timeout (or any interruption) kill that group."""
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


def torchrun_worker(report: Path, train_args: list[str]) -> None:
    """Section 3 inside torchrun: examples/train_cris_masksd.py's flags into the pipeline's ``train``, with its
    final evaluation timed and what the run was part of (process group, DDP, SyncBatchNorm) recorded."""
    import torch.distributed as dist
    from torch import nn

    from examples.pipeline import loop, trainer
    from examples.train_cris_masksd import parse_args

    cfg = parse_args(train_args)
    seen: dict[str, Any] = {"ddp_wrapped": 0}
    evaluate = trainer.evaluate

    def timed_evaluate(segmenter: nn.Module, loader: Any, tokenize: Any, device: torch.device, *args: Any, **kwargs: Any):
        seen.update(
            in_group=dist.is_initialized(),
            backend=dist.get_backend() if dist.is_initialized() else None,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            sync_batchnorm=sum(isinstance(m, nn.SyncBatchNorm) for m in segmenter.modules()),
            batchnorm=sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in segmenter.modules()),
        )
        _sync(device)
        start = time.perf_counter()
        metrics = evaluate(segmenter, loader, tokenize, device, *args, **kwargs)
        _sync(device)
        seen.update(eval_seconds=time.perf_counter() - start, eval_samples=int(metrics["samples"]))
        return metrics

    class CountedDDP(loop.DistributedDataParallel):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            seen["ddp_wrapped"] += 1

    trainer.evaluate = timed_evaluate  # the trainer and the loop look these names up when they run
    loop.DistributedDataParallel = CountedDDP
    start = time.perf_counter()
    trainer.train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        report.write_text(json.dumps({**seen, "run_seconds": time.perf_counter() - start}))


# ------------------------------------------------------------------- results
def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def render(results: dict[str, dict[str, Any]], header: str) -> str:
    """The Markdown report: a summary table, then one part per section."""
    titles = {
        "vit_b16": "1. ViT-B-16 training step", "vit_l14": "2. ViT-L-14 training step at the largest batch",
        "torchrun": "3. One-process torchrun (process group, SyncBatchNorm, DDP)",
        "compile": "4. torch.compile vs eager, CM-MaskSD step", "sync_debug": "5. Host syncs in the CM-MaskSD step",
        "checkpoint_branches": "6. MaskSDConfig.checkpoint_branches",
    }
    summary = [[titles[name], r["status"], f"{r['seconds']:.1f}", _headline(name, r)] for name, r in results.items()]
    parts = [header, markdown_table(["section", "status", "seconds", "result"], summary, align="llrl")]
    for name, r in results.items():
        parts.append(f"## {titles[name]}: {r['status']}")
        if r["error"]:
            parts.append("```\n" + r["error"].strip() + "\n```")
        if r["status"] == "ok":
            parts.append(_section_markdown(name, r["figures"]))
        elif r["figures"]:
            parts.append(", ".join(f"{k}: {v}" for k, v in r["figures"].items()))
    return "\n\n".join(p for p in parts if p)


def _headline(name: str, r: dict[str, Any]) -> str:
    f = r["figures"]
    if r["status"] != "ok":
        text = r["error"] or f.get("reason") or f.get("note") or ""
        return text.splitlines()[0][:120] if text else ""
    if name in ("vit_b16", "vit_l14"):
        v = f["variants"]
        return f"batch {f['batch']}: " + ", ".join(f"{k} {1000 * x['median_s']:.0f} ms" for k, x in v.items())
    if name == "torchrun":
        return f"{f['backend']}: train {f['train_images_per_s']:.1f} img/s, eval {f['eval_images_per_s']:.1f} img/s"
    if name == "compile":
        return f"{f['backend']}: first step {f['first_step_s']:.1f} s, speed-up {f['speedup']:.2f}×"
    if name == "sync_debug":
        return f["result"]
    return f.get("note", "")


def _section_markdown(name: str, f: dict[str, Any]) -> str:
    if name in ("vit_b16", "vit_l14"):
        oom = f" (OOM at {', '.join(str(b) for b in f['oom'])})" if f["oom"] else ""
        rows = [
            [variant, f"{1000 * v['median_s']:.1f}", f"{v['images_per_s']:.1f}", _gib(v["peak_allocated_bytes"]),
             f"{v['flops'] / 1e9:.1f}", f"{v['achieved_tflops']:.2f}", _percent(v["mfu"])]
            for variant, v in f["variants"].items()
        ]
        peak = f"{f['peak_tflops']:.0f} TFLOP/s ({f['peak_entry']})" if f["peak_tflops"] else "n/a (bf16 on a known GPU only)"
        return (
            f"{f['model']} @ {f['image_size']} px, batch {f['batch']}{oom}, amp {f['amp']}; median of {f['rounds']} "
            f"alternating rounds after {f['warmup']} warm-up steps per variant. FLOPs: FlopCounterMode, 2 per "
            f"multiply-add, forward + backward; peak {peak}. checkpoint_branches: {f['checkpoint_branches']}.\n\n"
            + markdown_table(["variant", "ms / step", "images / s", "peak allocated (GiB)", "GFLOPs / step",
                              "achieved TFLOP/s", "MFU"], rows)
        )
    if name == "torchrun":
        rows = [
            ["process group", f"{f['backend']}, world size {f['world_size']}"],
            ["DDP wrapped", str(f["ddp_wrapped"])],
            ["SyncBatchNorm / BatchNorm modules", f"{f['sync_batchnorm_modules']} / {f['batchnorm_modules']}"],
            ["train images / s", f"{f['train_images_per_s']:.1f} (median of steps {f['train_images_per_s_from_step']}-{f['steps']}, batch {f['batch']})"],
            ["first step (s)", f"{f['first_step_s']:.2f}"],
            ["eval images / s", f"{f['eval_images_per_s']:.1f} ({f['eval_samples']} scenes in {f['eval_seconds']:.2f} s)"],
            ["whole run (s)", f"{f['run_seconds']:.1f}"],
            ["losses finite", str(f["losses_finite"])],
        ]
        return markdown_table(["figure", "value"], rows)
    if name == "compile":
        rows = [
            ["eager ms / step", f"{1000 * f['eager_median_s']:.1f}"],
            ["first compiled step (s)", f"{f['first_step_s']:.2f}"],
            ["second compiled step (s)", f"{f['second_step_s']:.3f}"],
            ["compiled ms / step", f"{1000 * f['compiled_median_s']:.1f}"],
            ["speed-up over eager", f"{f['speedup']:.2f}×"],
            ["graphs / graph breaks", f"{f['graphs']} / {f['graph_breaks']}"],
        ]
        return (f"{f['model']} @ {f['image_size']} px, batch {f['batch']}, amp {f['amp']}, backend {f['backend']}: "
                "encode_image, encode_text and decode_head compiled as the trainer's --compile does.\n\n"
                + markdown_table(["figure", "value"], rows))
    if name == "sync_debug":
        lines = [f"{f['model']} @ {f['image_size']} px, batch {f['batch']}: **{f['result']}**"]
        if f["host_sync"]:
            lines += ["", "First sync, repository frames (innermost last):", ""] + [f"- `{s}`" for s in f["stack"]]
            lines += ["", "Every synchronising line of the step (mode \"warn\"): " + (", ".join(f"`{s}`" for s in f.get("sites", [])) or "none recorded")]
        return "\n".join(lines)
    return f["note"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER]:
        if len(argv) < 2:
            raise SystemExit(f"{WORKER} needs the report path, then examples/train_cris_masksd.py's flags")
        torchrun_worker(Path(argv[1]), argv[2:])
        return 0
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=get_args(Device), default="auto")
    parser.add_argument("--tiny", action="store_true", help="every section on the tiny model, batch 4: the CPU test of this script")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for gpu_check[_tiny].{md,json} (default: benchmarks/results)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=RUN_ORDER, metavar="SECTION",
                        help=f"run only these sections ({', '.join(RUN_ORDER)}); e.g. to redo one that failed")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend of section 4 (default: inductor; eager with --tiny)")
    parser.add_argument(COMPILE_HERE, dest="compile_here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    if device.type != "cuda" and not args.tiny:
        parser.error("the full check (ViT-B-16 and ViT-L-14 at batch 32) needs CUDA; on a CPU add --tiny")
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    use_tf32(device)
    plan = Plan.tiny(device, args.compile_backend) if args.tiny else Plan.gpu(args.compile_backend)
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
        f"{elapsed:.0f} s); random init, nothing downloaded. Torchrun: `{check.commands.get('torchrun', 'not run')}`."
    )
    markdown = render(results, header)
    print(markdown)
    data = {
        "mode": "tiny" if args.tiny else "full", "device": str(device), "device_name": name, "amp": plan.amp,
        "budget_s": args.budget, "elapsed_s": elapsed, "run_order": list(RUN_ORDER),
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "commands": check.commands, "sections": results,
    }
    paths = write_results("gpu_check_tiny" if args.tiny else "gpu_check", markdown, data, check.commands["check"], args.output)
    print(f"wrote {paths[0]} and {paths[1]}")
    failed = [n for n, r in results.items() if r["status"] in FAILED]
    if failed:
        print(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
