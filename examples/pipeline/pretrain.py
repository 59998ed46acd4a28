"""Contrastive image–text pretraining of a (tiny) open_clip CLIP on the synthetic referring scenes.

The paper fine-tunes CLIP weights whose image–text alignment already makes the correlation filter
pick the patches and words a sentence is about. This builds that starting point in miniature:

- the global term is open_clip's own ``ClipLoss`` between each scene's image (class token) and its
  referring expression (EOT token), both in CLIP's joint space;
- the optional region term (``region_weight``) is the same loss between the referent's mask-pooled
  projected patch tokens and its expression: it aligns the patch tokens the filter correlates,
  which global contrastive learning alone does not do reliably.

The model is the CRIS segmenter's own backbone (``CRIS.encode_image`` / ``encode_text``), so the
guidance logged during pretraining is exactly what fine-tuning starts from; the result is written
as an open_clip state dict (``clip.pt``) that ``CRISConfig(pretrained=PATH)`` / ``--pretrained PATH``
load like any open_clip checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from examples.cris import CRIS
from examples.pipeline.checkpoint import load_checkpoint, save_atomic
from examples.pipeline.config import PretrainConfig  # re-exported: defined with the other script configs
from examples.pipeline.distributed import Dist, process_group
from examples.pipeline.evaluation import autocast
from examples.pipeline.guidance import measure_guidance
from examples.pipeline.loop import TrainingLoop, seed_everything
from examples.pipeline.sampling import ShardSampler
from masksd.data import SyntheticConfig, SyntheticReferDataset, collate

__all__ = ["CLIPPretrainer", "PretrainConfig", "background_contrast", "pretrain", "export_clip", "retrieval_at_1"]

class CLIPPretrainer(nn.Module):
    """A CRIS segmenter's CLIP backbone with a learnable temperature, trained contrastively.

    Every backbone weight trains (CRIS freezes ``ln_post``/``proj`` for fine-tuning; here they are
    what aligns the patch tokens); the decode head is frozen and never run.
    ``forward(images (B, 3, S, S), token_ids (B, L), masks (B, 1, S, S))`` returns the L2-normalised
    image, text, region (the referent's mask-pooled patch tokens) and background (the rest of the
    image, pooled the same way) features, each (B, D), and the logit scale (a scalar, at most 100).
    """

    def __init__(self, segmenter: CRIS):
        super().__init__()
        self.segmenter = segmenter
        segmenter.backbone.requires_grad_(True)
        segmenter.decode_head.requires_grad_(False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seg = self.segmenter
        visual = seg.encode_image(seg.embed_image(images))  # tokens (B, N, D), pooled (B, D)
        text = seg.encode_text(seg.embed_text(token_ids))  # pooled (B, D): the EOT sentence state
        grid = seg.backbone.grid_size
        inside = F.adaptive_avg_pool2d(masks.float(), grid).flatten(1)  # (B, N): share of each patch inside the mask
        region, background = (
            (w[..., None] * visual.tokens).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6) for w in (inside, 1 - inside)
        )  # (B, D) each
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # open_clip caps the temperature at 100
        image, text, region, background = (F.normalize(x, dim=-1) for x in (visual.pooled, text.pooled, region, background))
        return image, text, region, background, scale


@torch.no_grad()
def retrieval_at_1(model: CLIPPretrainer, loader: DataLoader, device: torch.device, amp: str = "none") -> dict[str, float]:
    """Zero-shot image→text and text→image R@1 over the scenes of ``loader`` (one rank's share is not
    enough: call it on the full set). A retrieved text (image) counts as a hit when it is the query's
    own expression or the same words: synthetic expressions repeat ("the red circle"), so the pair's
    own index would make identical texts count as misses."""
    was_training = model.training
    model.eval()
    images, texts, strings = [], [], []
    for batch in loader:
        tokens = model.segmenter.tokenize(batch["text"]).to(device)
        with autocast(device, amp):
            image, text, *_ = model(batch["image"].to(device), tokens, batch["mask"].to(device))
        images.append(image.float())
        texts.append(text.float())
        strings += batch["text"]
    model.train(was_training)
    similarity = torch.cat(images) @ torch.cat(texts).T  # (N, N): image i against text j
    ids = {s: i for i, s in enumerate(dict.fromkeys(strings))}
    label = torch.tensor([ids[s] for s in strings], device=similarity.device)  # (N,) expression id per pair
    i2t = (label[similarity.argmax(dim=1)] == label).double().mean().item()
    t2i = (label[similarity.argmax(dim=0)] == label).double().mean().item()
    return {"i2t_r1": i2t, "t2i_r1": t2i, "retrieval_pairs": len(strings), "distinct_texts": len(ids)}


class _Pretrain(TrainingLoop):
    log_fields = ("loss", "global", "region", "logit_scale")
    best_metric = "lmvsd_auc"

    def __init__(self, cfg: PretrainConfig, env: Dist):
        seed_everything(cfg.seed)
        model = CLIPPretrainer(CRIS(cfg.cris_config()))
        train_set = SyntheticReferDataset(
            SyntheticConfig(image_size=cfg.image_size, num_samples=cfg.synthetic_train_size, split="train", seed=cfg.seed)
        )
        super().__init__(cfg, env, model, train_set, backbone_prefixes=("segmenter.backbone.",))  # not logit_scale
        self.segmenter: CRIS = self.model.segmenter
        distributed = dict(rank=env.rank, world_size=env.world_size, gather_with_grad=True) if env.enabled else {}
        self.clip_loss = open_clip.ClipLoss(cache_labels=True, **distributed)
        self.eval_set = SyntheticReferDataset(
            SyntheticConfig(image_size=cfg.image_size, num_samples=cfg.synthetic_eval_size, split="val", seed=cfg.seed)
        )

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor | None]:
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        tokens = self.segmenter.tokenize(batch["text"]).to(self.device, non_blocking=True)
        image, text, region, background, scale = self.train_model(images, tokens, masks)
        global_loss = self.clip_loss(image, text, scale)
        region_loss = None
        if self.cfg.region_weight > 0:
            region_loss = self.clip_loss(region, text, scale)
            if self.cfg.region_negatives == "background":
                region_loss = (region_loss + background_contrast(region, background, text, scale)) / 2
        loss = global_loss if region_loss is None else global_loss + self.cfg.region_weight * region_loss
        return {"loss": loss, "global": global_loss, "region": region_loss, "logit_scale": scale}

    def validate(self) -> dict[str, float]:
        """LMVSD/VMLSD guidance (each rank a shard, summed) and retrieval R@1 (every rank, the whole set)."""
        cfg, env = self.cfg, self.env
        sharded = DataLoader(self.eval_set, batch_size=128, sampler=ShardSampler(len(self.eval_set), env.rank, env.world_size),
                             collate_fn=collate)
        guidance = measure_guidance(self.segmenter, sharded, self.segmenter.tokenize, self.device, amp=cfg.amp)
        whole = DataLoader(self.eval_set, batch_size=128, collate_fn=collate)
        return {**guidance, **retrieval_at_1(self.model, whole, self.device, cfg.amp)}

    def run(self) -> dict:
        """Pretrain, export clip.pt and write report.json; returns the report."""
        before = self.validate() if self.step == 0 else None
        self.fit()
        if self.cfg.export == "best" and (self.out / "best.pt").is_file():
            self.model.load_state_dict(load_checkpoint(self.out / "best.pt", map_location="cpu")["model"])
        after = self.validate()
        report = {"steps": self.step, "export": self.cfg.export, "best": self.best, "final": after}
        if before is not None:
            report["initial"] = before
        if self.env.is_main:
            export_clip(self.model, self.out / "clip.pt")
            (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def background_contrast(region: torch.Tensor, background: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each expression against every region and every background of the batch, (B, D)
    normalised features each: its own region must beat the rest of its own image too, which the
    batch-wise ClipLoss never asks (so the patch tokens off the referent stay unaligned with it).
    Single-process only; under DDP each rank contrasts its own share."""
    candidates = torch.cat([region, background])  # (2B, D)
    logits = scale * text @ candidates.T  # (B, 2B)
    return F.cross_entropy(logits, torch.arange(len(text), device=text.device))


def export_clip(model: CLIPPretrainer, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the backbone as an open_clip CLIP state dict (with the trained temperature), floats as
    ``dtype``, atomically. ``open_clip.create_model(name, pretrained=path)`` loads it."""
    state = model.segmenter.backbone.clip_state_dict()
    state["logit_scale"] = model.logit_scale.detach().clone()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return save_atomic(state, path)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run :class:`PretrainConfig`; under torchrun every rank calls this. Returns the report on every rank."""
    with process_group(cfg.device) as env:
        return _Pretrain(cfg, env).run()
