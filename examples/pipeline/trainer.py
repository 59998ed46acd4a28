"""The training loop: MaskSD around the CRIS-style segmenter, DDP, autocast, exact resume, logs and figures."""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from examples.pipeline.cli import flatten
from examples.pipeline.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_atomic, set_rng_state
from examples.pipeline.config import TrainConfig
from examples.pipeline.distributed import Dist, cleanup_distributed, init_distributed
from examples.pipeline.evaluation import autocast, evaluate
from examples.pipeline.factory import BACKBONE_PREFIXES, build_dataset, build_model, checkpoint_cris_config
from examples.pipeline.optim import build_optimizer, warmup_cosine
from examples.pipeline.overlay import render_overlay
from examples.pipeline.sampling import EpochSampler, ShardSampler
from masksd import MaskSD
from masksd.data import collate

__all__ = ["train", "TrainResult"]

# Settings a resumed run may change without changing what it computes.
_RUNTIME_FIELDS = {"resume", "output", "workers", "progress", "log_every", "save_every", "max_steps", "overlays", "device", "data_root", "image_root"}
LOG_FIELDS = ["step", "epoch", "lr", "loss", "seg", "lmvsd", "vmlsd", "step_time", "images_per_s"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    steps: int
    """Optimiser steps taken in total (including those before a resume)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final evaluation (mIoU, oIoU, Prec@X in %); empty when evaluation was skipped."""
    untrained: dict[str, float] = field(default_factory=dict)
    """The same evaluation before the first step (``eval_untrained``, fresh runs only)."""
    output: Path = Path(".")
    """The run folder."""
    model: MaskSD | None = None
    """The trained model (MaskSD around the segmenter), on its device."""


def train(cfg: TrainConfig, evaluate_at_end: bool = True) -> TrainResult:
    """Train per ``cfg``; under torchrun every rank calls this. Returns on every rank."""
    env = init_distributed(cfg.device)
    try:
        return _Run(cfg, env).fit(evaluate_at_end)
    finally:
        cleanup_distributed()


class _Run:
    def __init__(self, cfg: TrainConfig, env: Dist):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out = Path(cfg.output)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        _seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model: MaskSD = build_model(cfg).to(self.device)
        if env.enabled and self.device.type == "cuda":  # BatchNorm statistics over the global batch, as one GPU would see
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.segmenter = self.model.segmenter
        self.tokenize = self.segmenter.tokenize

        self.train_set = build_dataset(cfg, cfg.train_split, train=True)
        self.sampler = EpochSampler(len(self.train_set), cfg.batch_size, env.rank, env.world_size, cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)

        backbone = BACKBONE_PREFIXES if cfg.backbone_lr_scale != 1.0 else ()
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale, backbone)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # Masking randomness differs per rank; dropout too (the global RNG is re-seeded per rank below).
        self.masking_rng = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + 7919 * env.rank + 1)
        self.step = 0

        if not (cfg.resume and self._resume(cfg.resume)):
            _seed_everything(cfg.seed + 104_729 * env.rank + 1)  # a fresh run: dropout differs per rank

        if cfg.compile:  # the four pieces MaskSD calls; the wrapper's own glue stays eager
            for name in ("encode_image", "encode_text"):
                setattr(self.segmenter, name, torch.compile(getattr(self.segmenter, name)))
            self.segmenter.decode_head.compile()
        self.train_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if env.enabled
            else self.model
        )

    # --------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._rng_states(),
            "step": self.step,
            "config": asdict(self.cfg),
            "cris_config": checkpoint_cris_config(self.segmenter),
        }

    def _rng_states(self) -> list[dict]:
        """Every rank's RNG states (dropout, masking, workers' seeds), gathered on all ranks."""
        state = rng_state(self.masking_rng)
        if not self.env.enabled:
            return [state]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, state)
        return states

    def _save(self) -> None:
        """rank 0 writes last.pt atomically (temp file + rename); all ranks take part in gathering RNG states."""
        state = self._state()
        if self.env.is_main:
            save_atomic(state, self.out / "last.pt")
        if self.env.enabled:
            dist.barrier()

    def _resume(self, resume: str) -> bool:
        """Load a checkpoint ("auto": <output>/last.pt if any); False when there was nothing to resume."""
        path = latest_checkpoint(self.out) if resume == "auto" else Path(resume)
        if path is None:
            return False
        state = load_checkpoint(path, map_location=self.device)
        saved, now = flatten(state.get("config", {})), flatten(self.cfg)
        changed = sorted(k for k in saved.keys() | now.keys() if k not in _RUNTIME_FIELDS and saved.get(k) != now.get(k))
        if changed and self.env.is_main:
            print(f"warning: resuming {path} with changed settings {changed}: the run will not repeat the original")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        states = state["rng"]
        if len(states) != self.env.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {len(states)} ranks; resuming it exactly needs the same "
                f"number of ranks, got {self.env.world_size}"
            )
        set_rng_state(states[self.env.rank], self.masking_rng)
        return True

    # --------------------------------------------------------------- loop
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
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            # worker seeds from (seed, epoch), not the global RNG, so a resumed run draws the same dropout
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch),
        )

    def fit(self, evaluate_at_end: bool) -> TrainResult:
        cfg, env = self.cfg, self.env
        result = TrainResult(steps=self.step, output=self.out, model=self.model)
        if evaluate_at_end and cfg.eval_untrained and self.step == 0:
            result.untrained = self._evaluate(write=False)
        log = _CsvLog(self.out / "train_log.csv", resume_step=self.step) if env.is_main else None
        bar = tqdm(total=self.stop_step, initial=self.step, desc="train", disable=not (cfg.progress and env.is_main))
        self.train_model.train()
        start_epoch = self.step // self.steps_per_epoch
        for epoch in range(start_epoch, cfg.epochs):
            if self.step >= self.stop_step:
                break
            tick = time.perf_counter()
            for batch in self._loader(epoch):
                parts = self._train_step(batch)
                self.step += 1
                now = time.perf_counter()
                step_time, tick = now - tick, now
                if parts is not None and log is not None:
                    log.write(
                        step=self.step, epoch=epoch, lr=self.scheduler.get_last_lr()[0], **parts,
                        step_time=step_time, images_per_s=cfg.batch_size / step_time,
                    )
                    bar.set_postfix(loss=f"{parts['loss']:.4f}")
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save()
                if self.step >= self.stop_step:
                    break
            self._save()  # epoch end (or the stop step)
        bar.close()
        if log is not None:
            log.close()

        result.steps = self.step
        if evaluate_at_end:
            result.metrics = self._evaluate(untrained=result.untrained)
        return result

    def _train_step(self, batch: dict) -> dict[str, float] | None:
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        tokens = self.tokenize(batch["text"]).to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.amp):
            out = self.train_model(images, tokens, masks, generator=self.masking_rng)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if (self.step + 1) % self.cfg.log_every:
            return None
        nan = out.loss.new_tensor(float("nan"))
        parts = torch.stack([l.detach() if l is not None else nan for l in (out.loss, out.seg_loss, out.lmvsd_loss, out.vmlsd_loss)])
        if self.env.enabled:  # the logged losses are means over ranks (gloo has no AVG)
            dist.all_reduce(parts, op=dist.ReduceOp.SUM)
            parts /= self.env.world_size
        return dict(zip(("loss", "seg", "lmvsd", "vmlsd"), parts.float().tolist()))

    # --------------------------------------------------------------- evaluation and figures
    def _evaluate(self, write: bool = True, untrained: dict[str, float] | None = None) -> dict[str, float]:
        """Main-branch metrics on the eval split; rank 0 writes eval_<split>.json and the overlays."""
        cfg, env = self.cfg, self.env
        eval_set = build_dataset(cfg, cfg.eval_split, train=False)
        loader = DataLoader(
            eval_set,
            batch_size=max(1, cfg.batch_size // env.world_size),
            sampler=ShardSampler(len(eval_set), env.rank, env.world_size),
            num_workers=cfg.workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed),  # leave the global RNG to training
        )
        metrics = evaluate(
            self.segmenter, loader, self.tokenize, self.device, cfg.eval_threshold, cfg.amp, cfg.progress and env.is_main
        )
        if env.is_main and write:
            report = {"split": cfg.eval_split, "step": self.step, "threshold": cfg.eval_threshold, **metrics}
            if untrained:
                report["untrained"] = untrained
            (self.out / f"eval_{cfg.eval_split}.json").write_text(json.dumps(report, indent=2) + "\n")
            if cfg.overlays:
                self._write_overlays(eval_set)
        return metrics

    @torch.no_grad()
    def _write_overlays(self, dataset) -> None:
        count = min(self.cfg.overlays, len(dataset))
        batch = collate([dataset[i] for i in range(count)])
        images = batch["image"].to(self.device)
        tokens = self.tokenize(batch["text"]).to(self.device)
        self.model.eval()
        probs = torch.sigmoid(self.model(images, tokens).float())
        image_masked, text_masked = self.model.masked_tokens(
            images, tokens, generator=torch.Generator(self.device).manual_seed(self.cfg.seed)
        )
        grid = self.segmenter.backbone.grid_size
        for i in range(count):
            words = self.segmenter.token_strings(tokens[i])
            panel = render_overlay(
                batch["image"][i], batch["mask"][i], probs[i], batch["text"][i],
                masked_patches=None if image_masked is None else image_masked[i].view(grid),
                words=words,
                masked_words=None if text_masked is None else text_masked[i, : len(words)].tolist(),
                threshold=self.cfg.eval_threshold,
            )
            panel.save(self.out / f"overlay_{i:02d}.png")


class _CsvLog:
    """train_log.csv (and TensorBoard scalars when tensorboard is installed)."""

    def __init__(self, path: Path, resume_step: int):
        kept = []
        if resume_step > 0 and path.is_file():  # drop rows logged after the checkpoint a resumed run restarts from
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def write(self, **row: float) -> None:
        self.writer.writerow({k: row[k] for k in LOG_FIELDS})
        self.file.flush()
        if self.tensorboard is not None:
            for k in LOG_FIELDS[2:]:
                if not math.isnan(row[k]):
                    self.tensorboard.add_scalar(f"train/{k}", row[k], int(row["step"]))

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
