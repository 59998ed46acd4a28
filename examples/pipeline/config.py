"""TrainConfig: one flat dataclass behind every flag of ``examples/train_cris_masksd.py``, and the paper presets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from masksd import BranchConfig, MaskSDConfig

__all__ = ["TrainConfig", "PRESETS", "DATASETS", "SPLIT_BY_DEFAULT"]

DATASETS = ("synthetic", "refcoco", "refcoco+", "refcocog")
SPLIT_BY_DEFAULT = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


@dataclass
class TrainConfig:
    """Defaults: the CPU demo (tiny CRIS-style model, synthetic scenes, a few minutes on 2 cores).
    ``--preset`` switches to the paper's settings; flags given after it override it."""

    # data
    dataset: str = "synthetic"
    """synthetic (built-in referring scenes, no files), refcoco, refcoco+ or refcocog."""
    split_by: str | None = None
    """Refer split scheme: unc (RefCOCO/RefCOCO+), umd or google (G-Ref). None: unc, unc, umd."""
    data_root: str = "data"
    """Folder holding <dataset>/refs(<split_by>).p and <dataset>/instances.json."""
    image_root: str | None = None
    """COCO train2014 images; None: <data_root>/images/mscoco/images/train2014 (the refer layout)."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "val"
    """Split evaluated at the end of training (synthetic: val, test or compositional)."""
    resize: str = "letterbox"
    """How images are fitted to the square input: letterbox (keep aspect, pad; CRIS) or resize (stretch)."""
    synthetic_train_size: int = 16000
    """Scenes per synthetic training epoch."""
    synthetic_eval_size: int = 500
    """Synthetic scenes evaluated."""
    workers: int = 2
    """DataLoader worker processes per rank."""

    # model
    model: str = "masksd-tiny"
    """open_clip model: masksd-tiny (CPU demo), ViT-B-16 or ViT-L-14."""
    pretrained: str | None = None
    """CLIP weights: an open_clip tag (openai), a local checkpoint path, or none for random init."""
    image_size: int = 64
    """Input size: 480 (ablations), 576 (ViT-B-16), 532 (ViT-L-14), 64 (tiny)."""
    max_words: int = 17
    """Text positions incl. SOT/EOT: 17 for RefCOCO/RefCOCO+, 22 for G-Ref."""

    # MaskSD (paper defaults)
    baseline: bool = False
    """Train the bare segmenter: no MaskSD branches (overrides the branch switches)."""
    lmvsd: bool = True
    """Language-guided masked visual self-distillation branch."""
    vmlsd: bool = True
    """Visual-guided masked language self-distillation branch."""
    share_weights: bool = True
    """Branches share the decode head with the main branch (Table VII)."""
    masking: bool = True
    """Mask the selected tokens (Table V)."""
    supervision: str = "distill"
    """Branch targets: distill (main prediction) or ground_truth (Table VI)."""
    target: str = "soft"
    """Distillation target: soft (sigmoid of the main logits) or hard (thresholded)."""
    lmvsd_top_k: float = 0.5
    """LMVSD K: fraction of patches kept by correlation filtering."""
    lmvsd_ratio: float = 0.25
    """LMVSD α: fraction of kept patches masked."""
    lmvsd_weight: float = 0.75
    """λ1."""
    vmlsd_top_k: float = 0.5
    """VMLSD K: fraction of words kept by correlation filtering."""
    vmlsd_ratio: float = 0.1
    """VMLSD α: fraction of kept words masked."""
    vmlsd_weight: float = 0.1
    """λ2."""

    # optimisation (paper: Adam, wd 5e-4, batch 32, 100 epochs, 10 warm-up, lr 1e-5, cosine)
    epochs: int = 2
    """Training epochs."""
    warmup_epochs: float = 0.2
    """Linear warm-up, in epochs (may be fractional)."""
    batch_size: int = 32
    """Global batch size, split evenly across ranks."""
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 5e-4
    """Adam L2 weight decay."""
    backbone_lr_scale: float = 1.0
    """Learning-rate factor for the CLIP encoders (CRIS trains them at 0.1x)."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value; 0 disables."""
    max_steps: int | None = None
    """Stop after this many optimiser steps in total (the schedule still spans all epochs)."""

    # runtime
    device: str = "auto"
    """auto (CUDA when available), cuda or cpu."""
    amp: str = "none"
    """Autocast precision on top of fp32 weights: none, bf16 or fp16 (with a gradient scaler)."""
    compile: bool = False
    """torch.compile the segmenter's encoders and decode head."""
    seed: int = 0
    """Seed of weights, data order, dropout and masking; runs with equal seeds repeat exactly on CPU."""
    output: str = "runs/demo"
    """Run folder: last.pt, best metrics, train_log.csv, eval JSON, overlay PNGs."""
    resume: str | None = None
    """Continue exactly from a checkpoint: a path, or "auto" for <output>/last.pt when it exists."""
    save_every: int = 0
    """Also checkpoint every N optimiser steps; 0: at epoch ends only."""
    log_every: int = 10
    """Write a log row every N steps."""
    eval_threshold: float = 0.35
    """Binarisation threshold of the sigmoid output at evaluation (the paper's 0.35)."""
    overlays: int = 6
    """Overlay PNGs written after the final evaluation."""
    eval_untrained: bool = True
    """Also evaluate the freshly initialised model before training, for comparison."""
    progress: bool = True
    """Show tqdm progress bars."""

    def masksd_config(self) -> MaskSDConfig:
        if self.baseline:
            return MaskSDConfig.baseline()
        return MaskSDConfig(
            lmvsd=BranchConfig(self.lmvsd, self.lmvsd_top_k, self.lmvsd_ratio, self.lmvsd_weight),
            vmlsd=BranchConfig(self.vmlsd, self.vmlsd_top_k, self.vmlsd_ratio, self.vmlsd_weight),
            share_weights=self.share_weights,
            masking=self.masking,
            supervision=self.supervision,
            target=self.target,
        )

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.split_by is None and self.dataset != "synthetic":
            self.split_by = SPLIT_BY_DEFAULT[self.dataset]
        for name in ("epochs", "batch_size", "synthetic_train_size", "synthetic_eval_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "save_every", "overlays"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.lr <= 0 or self.weight_decay < 0 or self.backbone_lr_scale < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0; weight_decay, backbone_lr_scale and grad_clip must be >= 0")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if not 0 < self.eval_threshold < 1:
            raise ValueError(f"eval_threshold must be in (0, 1), got {self.eval_threshold}")
        self.masksd_config()  # validates K, α, λ, supervision and target with named errors


_PAPER = dict(
    pretrained="openai", epochs=100, warmup_epochs=10, batch_size=32, lr=1e-5, weight_decay=5e-4,
    amp="bf16", workers=8, log_every=50, save_every=2000, overlays=8, eval_untrained=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "refcoco-vitb": dict(_PAPER, dataset="refcoco", model="ViT-B-16", image_size=576, max_words=17, output="runs/refcoco-vitb"),
    "refcoco+-vitb": dict(_PAPER, dataset="refcoco+", model="ViT-B-16", image_size=576, max_words=17, output="runs/refcoco+-vitb"),
    "refcocog-vitb": dict(_PAPER, dataset="refcocog", split_by="umd", model="ViT-B-16", image_size=576, max_words=22, output="runs/refcocog-vitb"),
    "refcoco-vitl": dict(_PAPER, dataset="refcoco", model="ViT-L-14", image_size=532, max_words=17, output="runs/refcoco-vitl"),
    "refcoco+-vitl": dict(_PAPER, dataset="refcoco+", model="ViT-L-14", image_size=532, max_words=17, output="runs/refcoco+-vitl"),
    "refcocog-vitl": dict(_PAPER, dataset="refcocog", split_by="umd", model="ViT-L-14", image_size=532, max_words=22, output="runs/refcocog-vitl"),
    "ablation-vitb": dict(_PAPER, dataset="refcoco", model="ViT-B-16", image_size=480, max_words=17, output="runs/ablation-vitb"),
}
"""The paper's runs (§IV-B): ViT-B at 576 and ViT-L at 532 for Table I, ViT-B at 480 for the ablations."""


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    return replace(TrainConfig(), **{**PRESETS[name], **overrides})
