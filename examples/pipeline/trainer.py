"""Training MaskSD around the CRIS-style segmenter (or CLIPSeg): the shared loop's step, evaluation, overlays."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from examples.pipeline.config import TrainConfig
from examples.pipeline.distributed import Dist, process_group
from examples.pipeline.evaluation import evaluate
from examples.pipeline.factory import backbone_prefixes, build_dataset, build_model, checkpoint_architecture, compile_masksd
from examples.pipeline.loop import TrainingLoop, seed_everything
from examples.pipeline.overlay import render_overlay
from examples.pipeline.sampling import ShardSampler
from examples.pipeline.step import masksd_losses
from examples.pipeline.workers import exit_with_parent
from masksd import MaskSD
from masksd.data import collate

__all__ = ["train", "TrainResult", "check_norm_batch"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    steps: int
    """Optimiser steps taken in total (including those before a resume)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final evaluation (mIoU, oIoU, Prec@X in %); empty when evaluation was skipped."""
    untrained: dict[str, float] = field(default_factory=dict)
    """The same evaluation before the first step (``eval_untrained``, fresh runs only)."""
    untrained_guidance: dict[str, float] = field(default_factory=dict)
    """The guidance before the first step (``eval_untrained`` and ``eval_guidance``, fresh runs only)."""
    guidance: dict[str, float] = field(default_factory=dict)
    """The guidance after training (``eval_guidance``; masksd.guidance's keys)."""
    output: Path = Path(".")
    """The run folder."""
    model: MaskSD | None = None
    """The trained model (MaskSD around the segmenter), on its device."""
    export: Path | None = None
    """The export folder written at the end (``<output>/export``; ``export``), or None."""


def train(cfg: TrainConfig, evaluate_at_end: bool = True) -> TrainResult:
    """Train per ``cfg``; under torchrun every rank calls this. Returns on every rank."""
    with process_group(cfg.device) as env:
        return _Run(cfg, env).run(evaluate_at_end)


def check_norm_batch(model: torch.nn.Module, batch_size: int, world_size: int) -> None:
    """Raise a ValueError naming --batch-size unless each device gets at least 2 samples when the model has
    BatchNorm (CRIS's neck and projector do): BatchNorm cannot normalise a batch of one in training."""
    per_device = batch_size // world_size
    if per_device < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            f"--batch-size {batch_size} over {world_size} rank(s) gives {per_device} sample(s) per device, but the "
            f"segmenter has BatchNorm (CRIS's neck and projector), which needs at least 2 per device in training: "
            f"use --batch-size {2 * world_size} or more"
        )


class _Run(TrainingLoop):
    """MaskSD around the CRIS-style segmenter: the loop's step is MaskSD's training forward."""

    log_fields = ("loss", "seg", "lmvsd", "vmlsd")
    best_metric = "mIoU"

    def __init__(self, cfg: TrainConfig, env: Dist):
        if cfg.export and env.is_main:
            import examples.pipeline.export  # noqa: F401  a missing masksd[hub] fails now, not after training
        if cfg.masksd.views == "combined":  # MaskRIS's one masked view has its own loss column
            self.log_fields = (*type(self).log_fields, "combined")
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        check_norm_batch(model, cfg.batch_size, env.world_size)
        eval_unit = "step" if cfg.dataset == "synthetic" else "epoch"
        super().__init__(cfg, env, model, build_dataset(cfg, cfg.train_split, train=True), backbone_prefixes(model.segmenter), eval_unit)
        self.segmenter = self.model.segmenter
        self.tokenize = self.segmenter.tokenize
        self._eval_set = None  # built at the first evaluation, then reused
        self.wandb = None
        if cfg.wandb and env.is_main:  # the loop's scalar writer becomes W&B, with TensorBoard (if any) behind it
            from examples.pipeline.wandb_log import start_wandb

            self.wandb = self.tensorboard = start_wandb(cfg, self.out, resumed=self.step > 0, tensorboard=self.tensorboard)

    def compile_model(self) -> None:
        compile_masksd(self.model, self.cfg.compile_scope)

    def checkpoint_extra(self) -> dict:
        return checkpoint_architecture(self.model.segmenter)  # also called while resuming, before self.segmenter is set

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        tokens = self.tokenize(batch["text"]).to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        return images, tokens, masks

    def check_batch(self, batch: dict) -> None:
        self.model.check_inputs(*self._inputs(batch))

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor | None]:
        images, tokens, masks = self._inputs(batch)
        ramp = self.cfg.distill_ramp * self.total_steps
        scale = min(1.0, self.step / ramp) if ramp > 0 else 1.0  # ours: λ grows with the teacher
        return masksd_losses(self.train_model, images, tokens, masks, self.generator, scale)

    def validate(self) -> dict[str, float]:
        return self._evaluate(write=False)

    def run(self, evaluate_at_end: bool) -> TrainResult:
        """The untrained evaluation (fresh runs), training, the final evaluation and figures, the export."""
        try:
            result = self._train_and_evaluate(evaluate_at_end)
            if self.cfg.export and self.env.is_main:
                from examples.pipeline.export import export_run, run_evaluation

                evaluation = run_evaluation(self.out, self.cfg.eval_split, self.step)
                result.export = export_run(self.model.segmenter, self.cfg, self.step, self.out / "export", evaluation)
        except BaseException:
            if self.wandb is not None:
                self.wandb.finish(failed=True)
            raise
        if self.wandb is not None:
            for prefix, values in (("final", result.metrics), ("guidance", result.guidance), ("untrained", result.untrained)):
                self.wandb.summarise(prefix, values)
            self.wandb.finish()
        return result

    def _train_and_evaluate(self, evaluate_at_end: bool) -> TrainResult:
        result = TrainResult(steps=self.step, output=self.out, model=self.model)
        if evaluate_at_end and self.cfg.eval_untrained and self.step == 0:
            result.untrained = self._evaluate(write=False)
            if self.cfg.eval_guidance:
                result.untrained_guidance = self._guidance()
        result.steps = self.fit()
        if evaluate_at_end:
            if self.cfg.eval_guidance:
                result.guidance = self._guidance()
            extra = {"guidance": result.guidance, "untrained": result.untrained, "untrained_guidance": result.untrained_guidance}
            result.metrics = self._evaluate(extra={k: v for k, v in extra.items() if v})
        return result

    def _guidance(self) -> dict[str, float]:
        """The correlation filters' guidance (masksd.guidance) on the eval split, summed over ranks."""
        from examples.pipeline.guidance import measure_guidance

        m = self.model.config
        return measure_guidance(self.model, self._eval_loader(), self.tokenize, self.device, m.lmvsd.top_k, m.vmlsd.top_k,
                                self.cfg.amp, self.cfg.progress and self.env.is_main)

    # --------------------------------------------------------------- evaluation and figures
    def _eval_loader(self) -> DataLoader:
        """This rank's shard of the eval split (the dataset is built once: reading a refer index is slow)."""
        cfg, env = self.cfg, self.env
        if self._eval_set is None:
            self._eval_set = build_dataset(cfg, cfg.eval_split, train=False)
        return DataLoader(
            self._eval_set,
            batch_size=max(1, cfg.batch_size // env.world_size),
            sampler=ShardSampler(len(self._eval_set), env.rank, env.world_size),
            num_workers=cfg.workers,
            worker_init_fn=exit_with_parent(),
            collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed),  # leave the global RNG to training
        )

    def _evaluate(self, write: bool = True, extra: dict[str, dict] | None = None) -> dict[str, float]:
        """Main-branch metrics on the eval split; with ``write`` rank 0 writes them (and ``extra``) to
        eval_<split>.json, and the overlays."""
        cfg, env = self.cfg, self.env
        metrics = evaluate(
            self.segmenter, self._eval_loader(), self.tokenize, self.device, cfg.eval_threshold, cfg.amp,
            cfg.progress and env.is_main, cfg.restore,
        )
        if env.is_main and write:
            report = {"split": cfg.eval_split, "step": self.step, "threshold": cfg.eval_threshold, "restore": cfg.restore,
                      "text_key": cfg.text_key if cfg.dataset != "synthetic" else None, **metrics, **(extra or {})}
            (self.out / f"eval_{cfg.eval_split}.json").write_text(json.dumps(report, indent=2) + "\n")
            if cfg.overlays:
                self._write_overlays(self._eval_set)
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
        grid = self.model.image_grid(images) or self.segmenter.grid_size  # the pixel patches at the input site
        ids = tokens["input_ids"] if isinstance(tokens, Mapping) else tokens  # CLIPSeg's tokenizer gives a mapping
        paths = [self.out / f"overlay_{i:02d}.png" for i in range(count)]
        for i in range(count):
            words = self.segmenter.token_strings(ids[i])
            panel = render_overlay(
                batch["image"][i], batch["mask"][i], probs[i], batch["text"][i],
                masked_patches=None if image_masked is None else image_masked[i].view(grid),
                words=words,
                masked_words=None if text_masked is None else text_masked[i, : len(words)].tolist(),
                threshold=self.cfg.eval_threshold,
            )
            panel.save(paths[i])
        if self.wandb is not None:
            self.wandb.log_images("overlays", paths, list(batch["text"]), self.step)
