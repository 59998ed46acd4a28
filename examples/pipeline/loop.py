"""The training loop every script here shares, whatever it trains.

:class:`TrainingLoop` owns seeding per rank, DDP (and SyncBatchNorm on GPUs), Adam with warm-up and
cosine decay, the resumable epoch sampler, autocast and fp16 gradient scaling (the step itself is
:class:`~examples.pipeline.step.TrainStep`, which the benchmarks time), atomic checkpoints
(``last.pt``, ``best.pt``) holding every rank's RNG states, exact resume, periodic validation, the
CSV logs, TensorBoard scalars and the progress bar; a run folder is never overwritten unasked
(:mod:`examples.pipeline.runfolder`) and a diverging loss stops the run before any checkpoint holds
non-finite weights (:mod:`examples.pipeline.guard`). A subclass says what one step computes
(:meth:`~TrainingLoop.compute_loss`) and, optionally, how to validate (:meth:`~TrainingLoop.validate`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from examples.pipeline.checkpoint import latest_checkpoint, load_checkpoint, load_weights, rng_state, save_atomic, set_rng_state
from examples.pipeline.cli import flatten
from examples.pipeline.config import LoopConfig, runtime_fields
from examples.pipeline.distributed import Dist
from examples.pipeline.guard import DivergenceGuard
from examples.pipeline.runfolder import prepare_run_folder
from examples.pipeline.sampling import EpochSampler
from examples.pipeline.step import GraphBreaks, TrainStep
from examples.pipeline.workers import exit_with_parent
from masksd.data import collate

__all__ = ["CsvLog", "TrainingLoop", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CsvLog:
    """A CSV file of rows with fixed columns, resumable (rows after the resume step are dropped), with an
    optional TensorBoard writer that gets every numeric column under ``<prefix>/<column>``."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int, tensorboard: Any = None, prefix: str = "train"):
        self.path, self.fields, self.tensorboard, self.prefix = path, list(fields), tensorboard, prefix
        kept = []
        if resume_step > 0 and path.is_file():  # drop rows logged after the checkpoint a resumed run restarts from
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()

    def write(self, **row: Any) -> None:
        try:
            self.writer.writerow({k: row.get(k, "") for k in self.fields})
            self.file.flush()
        except OSError as error:  # a full disk: name the file (a write error carries no file name)
            raise OSError(error.errno, f"{error.strerror}: writing {self.path}") from error
        if self.tensorboard is not None:
            for k in self.fields:
                value = row.get(k)
                if k not in ("step", "epoch") and isinstance(value, (int, float)) and not math.isnan(value):
                    self.tensorboard.add_scalar(f"{self.prefix}/{k}", value, int(row["step"]))

    def close(self) -> None:
        self.file.close()


def _tensorboard_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # an optional extra: say so once and go on with the CSV logs
        warnings.warn("--tensorboard: the tensorboard package is not installed (pip install tensorboard); logging to CSV only")
        return None
    return SummaryWriter(str(folder))


class TrainingLoop:
    """A resumable, distributed training run of ``model`` on ``train_set``; see the module docstring.

    Subclasses implement :meth:`compute_loss`; they may override :meth:`validate` (metrics kept in
    ``eval_log.csv``, and ``best.pt`` when ``best_metric`` is set), :meth:`checkpoint_extra` (more
    entries in each checkpoint) and :meth:`compile_model` (what ``--compile`` compiles).
    """

    log_fields: tuple[str, ...] = ("loss",)
    """The loss parts :meth:`compute_loss` returns, in the order train_log.csv lists them."""
    best_metric: str | None = None
    """The validation metric whose highest value is kept as ``best.pt``; None keeps no best checkpoint."""
    collate_fn: Callable[[list], Any] = staticmethod(collate)

    def __init__(
        self,
        cfg: LoopConfig,
        env: Dist,
        model: nn.Module,
        train_set: Dataset,
        backbone_prefixes: tuple[str, ...] = (),
        eval_unit: Literal["step", "epoch"] = "step",
    ):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out = Path(cfg.output)
        prepare_run_folder(self.out, cfg.resume, cfg.overwrite, create=env.is_main)  # refuses to replace a run unasked
        self.model = model.to(self.device)
        if env.enabled and self.device.type == "cuda":  # BatchNorm statistics over the global batch, as one GPU would see
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.train_set, self.eval_unit = train_set, eval_unit

        self.sampler = EpochSampler(len(train_set), cfg.batch_size, env.rank, env.world_size, cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        # the step the benchmarks time too (examples.pipeline.step): optimiser, schedule, autocast, clipping
        self.train_step = TrainStep(self.model, cfg, self.device, warmup, self.total_steps, backbone_prefixes)
        self.optimizer, self.scheduler, self.scaler = self.train_step.optimizer, self.train_step.scheduler, self.train_step.scaler
        # The run's own random draws (e.g. which tokens to mask) differ per rank; dropout too (global RNG re-seeded below).
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + 7919 * env.rank + 1)
        self.step = 0
        self.best: dict[str, float] = {}  # {"value", "step"} of the best validation so far
        self.guard = DivergenceGuard(self.log_fields, self.device, env.enabled)
        self.saved_step: int | None = None  # the step last.pt holds, None before the first save

        if cfg.resume and self._resume(cfg.resume):
            self.saved_step = self.step
        else:
            seed_everything(cfg.seed + 104_729 * env.rank + 1)  # a fresh run: dropout differs per rank
        if cfg.compile:
            self.compile_model()
        self.train_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if env.enabled
            else self.model
        )
        self.tensorboard = _tensorboard_writer(self.out / "tensorboard") if cfg.tensorboard and env.is_main else None

    # --------------------------------------------------------------- what subclasses define
    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor | None]:
        """One batch's scalar losses: ``"loss"`` (what is minimised) and the other ``log_fields``
        (None for a part that does not apply, logged as NaN). Runs under autocast in training mode."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Metrics on the validation data, the same on every rank (a collective under DDP); {} for none."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """More entries for every checkpoint (e.g. the architecture to rebuild the model from)."""
        return {}

    def compile_model(self) -> None:
        """``--compile``: compile what is worth it (default: the whole model, in place)."""
        self.model.compile()

    # --------------------------------------------------------------- checkpoints
    def _identity(self) -> dict:
        """What a checkpoint says about the model it holds: its family (the model's class, so that another
        script's checkpoint is named as such), the run's config and the subclass's extra entries."""
        return {"family": type(self.model).__name__, "config": asdict(self.cfg), **self.checkpoint_extra()}

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._rng_states(),
            "step": self.step,
            "best": dict(self.best),
            **self._identity(),
        }

    def _rng_states(self) -> list[dict]:
        """Every rank's RNG states (dropout, the run's generator), gathered on all ranks."""
        state = rng_state(self.generator)
        if not self.env.enabled:
            return [state]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self, name: str = "last.pt") -> None:
        """Rank 0 writes ``<output>/<name>`` atomically (temp file + rename) unless the weights hold NaN or
        ±inf (then :class:`~examples.pipeline.guard.TrainingDiverged`, on every rank); every rank takes part in
        gathering the RNG states, so every rank must call this."""
        state = self._state()
        self.guard.check_weights(state["model"], self.step, self._kept())
        if self.env.is_main:
            save_atomic(state, self.out / name)
        if name == "last.pt":
            self.saved_step = self.step
        if self.env.enabled:
            dist.barrier()

    def _kept(self) -> str:
        """In words, the checkpoint a stopped run leaves (for the errors that stop it)."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"{self.out / 'last.pt'} (step {self.saved_step}) is kept"

    def _resume(self, resume: str) -> bool:
        """Load a checkpoint ("auto": <output>/last.pt if any); False when there was nothing to resume."""
        path = latest_checkpoint(self.out) if resume == "auto" else Path(resume)
        if path is None:
            return False
        state = load_checkpoint(path, map_location="cpu")  # RNG states must stay CPU tensors; load_state_dict copies the rest
        load_weights(self.model, state, path, self._identity(), "--resume into this run")  # another model: one error, first
        # a setting the checkpoint predates reads as its default (what that code did), as when a checkpoint is loaded
        saved, now = {**flatten(type(self.cfg)()), **flatten(state.get("config", {}))}, flatten(self.cfg)
        runtime = runtime_fields(type(self.cfg))
        changed = sorted(k for k in saved.keys() | now.keys() if k not in runtime and saved.get(k) != now.get(k))
        if changed and self.env.is_main:
            print(f"warning: resuming {path} with changed settings {changed}: the run will not repeat the original")
        states = state["rng"]
        if len(states) != self.env.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {len(states)} ranks; resuming it exactly needs the same "
                f"number of ranks, got {self.env.world_size}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = dict(state.get("best", {}))
        set_rng_state(states[self.env.rank], self.generator)
        return True

    # --------------------------------------------------------------- the loop
    def _loader(self, epoch: int) -> DataLoader:
        skip = self.step - epoch * self.steps_per_epoch if self.step > epoch * self.steps_per_epoch else 0
        self.sampler.set_epoch(epoch, skip)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        return DataLoader(
            self.train_set,
            batch_size=self.sampler.per_rank,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            worker_init_fn=exit_with_parent(),  # a killed run leaves no worker behind
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            # worker seeds from (seed, epoch), not the global RNG, so a resumed run draws the same dropout
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch),
        )

    def fit(self) -> int:
        """Train from the current step to the stop step, validating every ``eval_every`` steps or epochs
        and checkpointing at epoch ends and every ``save_every`` steps. Returns the steps taken in all.

        Logged losses are copied off the device without waiting and written one log row later, so no
        step waits for the device; ``step_time`` is the mean over the steps since the previous row."""
        cfg, env = self.cfg, self.env
        log = eval_log = None
        if env.is_main:
            log = CsvLog(self.out / "train_log.csv", ["step", "epoch", "lr", *self.log_fields, "step_time", "images_per_s"],
                         self.step, self.tensorboard, "train")
        pending: list[tuple[dict, torch.Tensor, Any]] = []  # rows whose losses are still on their way to the host
        bar = tqdm(total=self.stop_step, initial=self.step, desc="train", disable=not (cfg.progress and env.is_main))
        self.resumed_at = self.step
        self.train_model.train()
        report_compile = cfg.compile  # what torch.compile made of the step: graphs and graph breaks, after the first
        try:
            for epoch in range(self.step // self.steps_per_epoch, cfg.epochs):
                if self.step >= self.stop_step:
                    break
                tick, ticked = time.perf_counter(), self.step
                for index, batch in enumerate(self._loader(epoch)):
                    if index == 0:
                        self.check_batch(batch)  # value checks once per epoch, not in every step
                    with GraphBreaks() if report_compile else contextlib.nullcontext() as breaks:
                        parts = self._train_step(batch)
                    if report_compile and env.is_main:
                        print(breaks.summary())
                    report_compile = False
                    self.step += 1
                    if parts is not None:
                        now = time.perf_counter()
                        step_time, tick, ticked = (now - tick) / (self.step - ticked), now, self.step
                        row = dict(step=self.step, epoch=epoch, lr=self.scheduler.get_last_lr()[0],
                                   step_time=step_time, images_per_s=cfg.batch_size / step_time)
                        pending.append((row, *_to_host(parts)))
                        written, pending[:] = pending[:-1], pending[-1:]
                        self._write_rows(written, log, bar)
                    bar.update(1)
                    last_of_epoch = self.step % self.steps_per_epoch == 0
                    stopping = self.step >= self.stop_step
                    validating = self._validation_due(epoch, last_of_epoch)
                    saving = (cfg.save_every and self.step % cfg.save_every == 0) or last_of_epoch or stopping
                    if saving or validating:
                        written, pending[:] = pending[:], []
                        self._write_rows(written, log, bar)  # a checkpoint never precedes its log rows
                        self.guard.check(self.step, self._kept())  # the loop waits here anyway
                    if validating:  # first, so that last.pt knows the best so far
                        eval_log = self._validate_and_keep_best(epoch, eval_log)
                        tick, ticked = time.perf_counter(), self.step  # validation time is not step time
                    if saving:
                        self.save()
                    if stopping:
                        break
        finally:
            self._write_rows(pending, log, bar, stop_on_divergence=False)  # rows of an interrupted run, as evidence
            bar.close()
            for f in (log, eval_log):
                if f is not None:
                    f.close()
            if self.tensorboard is not None:
                self.tensorboard.flush()
        return self.step

    def check_batch(self, batch: Any) -> None:
        """Checks that read tensor values, run on the first batch of every epoch (default: none)."""

    def _write_rows(self, rows: list[tuple[dict, torch.Tensor, Any]], log: CsvLog | None, bar: tqdm,
                    stop_on_divergence: bool = True) -> None:
        """Write the logged rows; if a row's step had seen a non-finite loss (on any rank), stop the run after
        writing them all (the rows are the evidence)."""
        diverged = False
        for row, parts, ready in rows:
            if ready is not None:
                ready.synchronize()  # recorded a log interval ago: long done
            *losses, nonfinite = parts.tolist()  # the loss parts, then the guard's count (its mean over ranks)
            values = dict(zip(self.log_fields, losses))
            diverged = diverged or nonfinite > 0
            if log is not None:
                log.write(**row, **values)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
        if diverged and stop_on_divergence:
            self.guard.stop(self.step, self._kept())

    def _validation_due(self, epoch: int, last_of_epoch: bool) -> bool:
        every = self.cfg.eval_every
        if not every:
            return False
        if self.eval_unit == "step":
            return self.step % every == 0
        return last_of_epoch and (epoch + 1) % every == 0

    def _validate_and_keep_best(self, epoch: int, eval_log: CsvLog | None) -> CsvLog | None:
        metrics = self.validate()
        self.train_model.train()
        if not metrics:
            return eval_log
        if self.env.is_main:
            if eval_log is None:
                eval_log = CsvLog(self.out / "eval_log.csv", ["step", "epoch", *metrics], self.resumed_at, self.tensorboard, "val")
            eval_log.write(step=self.step, epoch=epoch, **metrics)
        if self.best_metric is not None:
            value = float(metrics[self.best_metric])
            if not math.isnan(value) and (not self.best or value > self.best["value"]):
                self.best = {"value": value, "step": self.step}
                self.save("best.pt")
        return eval_log

    def _train_step(self, batch: Any) -> torch.Tensor | None:
        """One optimiser step; on log steps the (len(log_fields) + 1,) loss parts, mean over ranks, and the
        guard's count of non-finite steps (its mean over ranks), still on the device; else None."""
        losses = self.train_step(lambda: self.compute_loss(batch))
        self.guard.observe(losses, self.step + 1)  # on the device: no wait
        if (self.step + 1) % self.cfg.log_every:
            return None
        nan = losses["loss"].new_full((), float("nan"))  # filled on the device: no copy from the host
        parts = torch.stack([losses[k].detach().float() if losses.get(k) is not None else nan for k in self.log_fields])
        parts = torch.cat([parts, self.guard.count[None]])  # the non-finite steps so far travel with the losses
        if self.env.enabled:  # the logged losses are means over ranks (gloo has no AVG)
            dist.all_reduce(parts, op=dist.ReduceOp.SUM)
            parts /= self.env.world_size
        return parts


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``values`` to the host without waiting: (the host tensor, a CUDA event to wait on
    before reading it, or None on the CPU)."""
    if values.device.type != "cuda":
        return values.detach().clone(), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
