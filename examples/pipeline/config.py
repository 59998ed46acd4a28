"""TrainConfig: the dataclass behind every flag of ``examples/train_cris_masksd.py``, and the paper presets.

The MaskSD settings are a nested :class:`masksd.MaskSDConfig`, so their defaults (the paper's K, α, λ
per branch) and their documentation are written once, in ``masksd.config``; the CRIS variants come
from ``examples.cris.config.VARIANTS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Literal, get_args

from examples.cris.config import VARIANTS, CRISConfig, DeepLevel
from examples.lavt.config import LAVT_MODEL
from examples.pipeline.choices import Amp, CompileScope, Device
from examples.pipeline.cli import check_choices, dataclass_from_dict, flatten, unflatten
from masksd.config import MaskSDConfig, documented
from masksd.data.config import DEFAULT_SPLIT_BY, ReferConfig, ReferDatasetName, ResizeMode, RestoreMethod, SplitBy, TextKey

__all__ = [
    "LoopConfig", "PretrainConfig", "TrainConfig", "PRESETS", "MASKSD_PRESETS", "DATASETS", "DatasetName", "masksd_preset", "preset",
    "runtime_fields",
]

DatasetName = Literal["synthetic", ReferDatasetName, "manifest"]
"""The built-in synthetic referring scenes, a refer dataset read from files, or your own data as a manifest."""
DATASETS = get_args(DatasetName)

_DEMO = VARIANTS["tiny"]


@dataclass
class LoopConfig:
    """What every training script here shares: optimisation and runtime (see ``examples.pipeline.loop``).
    Defaults: the CPU demo's."""

    # optimisation (paper: Adam, wd 5e-4, batch 32, 100 epochs, 10 warm-up, lr 1e-5, cosine)
    epochs: int = documented(1, help="Training epochs.")
    warmup_epochs: float = documented(0.1, help="Linear warm-up, in epochs (may be fractional).")
    batch_size: int = documented(32, help="Global batch size, split evenly across ranks.")
    lr: float = documented(2e-3, help="Peak learning rate.")
    weight_decay: float = documented(5e-4, help="Adam L2 weight decay.")
    backbone_lr_scale: float = documented(1.0, help="Learning-rate factor for the CLIP encoders (CRIS trains them at 0.1x).")
    grad_clip: float = documented(0.0, help="Clip the gradient norm to this value; 0 disables.")
    max_steps: int | None = documented(None, runtime=True, help="Stop after this many optimiser steps in total (the schedule still spans all epochs).")

    # runtime
    device: Device = documented("auto", runtime=True, help="auto (CUDA when available), cuda or cpu.")
    amp: Amp = documented("none", help="Autocast precision on top of fp32 weights: none, bf16 or fp16 (with a gradient scaler).")
    compile: bool = documented(False, help="torch.compile the model's heavy parts.")
    seed: int = documented(0, help="Seed of weights, data order, dropout and masking; runs with equal seeds repeat exactly on CPU.")
    output: str = documented("runs/demo", runtime=True, help="Run folder: last.pt, best.pt, train_log.csv, eval_log.csv, results.")
    resume: str | None = documented(None, runtime=True, help='Continue exactly from a checkpoint: a path, or "auto" for <output>/last.pt when it exists.')
    overwrite: bool = documented(False, runtime=True, help="Start a new run in an --output folder that holds one (last.pt, best.pt or the logs), removing that run's files first; without it (or --resume auto) such a folder is refused.")
    save_every: int = documented(0, runtime=True, help="Also checkpoint every N optimiser steps; 0: at epoch ends only.")
    log_every: int = documented(10, runtime=True, help="Write a log row every N steps.")
    eval_every: int = documented(0, runtime=True, help="Validate every N epochs (refer datasets) or N steps (synthetic data), keep the metrics in eval_log.csv and the best checkpoint as best.pt; 0: only at the end.")
    tensorboard: bool = documented(False, runtime=True, help="Also write the logged losses and validation metrics as TensorBoard scalars under <output>/tensorboard (needs tensorboard).")
    workers: int = documented(2, runtime=True, help="DataLoader worker processes per rank.")
    progress: bool = documented(True, runtime=True, help="Show tqdm progress bars.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.overwrite and self.resume:
            raise ValueError(f"overwrite and resume={self.resume!r} contradict each other: --overwrite starts a new run, --resume continues one")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "backbone_lr_scale", "grad_clip", "warmup_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        check_choices(self)  # amp, device, and every choice a subclass adds


_LEGACY_MASKSD = {
    "lmvsd": "masksd.lmvsd.enabled", "vmlsd": "masksd.vmlsd.enabled", "share_weights": "masksd.share_weights",
    "masking": "masksd.masking", "supervision": "masksd.supervision", "target": "masksd.target",
    **{f"{b}_{k}": f"masksd.{b}.{k}" for b in ("lmvsd", "vmlsd") for k in ("top_k", "ratio", "weight")},
}
"""masksd 0.1's flat TrainConfig keys for MaskSD's settings, and where they live now."""


def runtime_fields(cls: type) -> frozenset[str]:
    """The fields of a config marked ``runtime=True``: settings a resumed run may change without changing
    what training computes (where files go, what is logged and evaluated, how many workers load data)."""
    return frozenset(f.name for f in fields(cls) if f.metadata.get("runtime"))


@dataclass
class TrainConfig(LoopConfig):
    """Defaults: the CPU demo (tiny CRIS-style model, synthetic scenes, a few minutes on 2 cores).
    ``--preset`` switches to the paper's settings; flags given after it override it."""

    # data
    dataset: DatasetName = documented("synthetic", help="synthetic (built-in referring scenes, no files), refcoco, refcoco+, refcocog, refclef (ReferItGame), grefcoco (GRES: multi- and no-target expressions), or manifest (your own data, --manifest FILE).")
    split_by: SplitBy | None = documented(None, help="Refer split scheme: unc (RefCOCO/RefCOCO+/gRefCOCO, RefClef), umd or google (G-Ref), berkeley (RefClef). None: the dataset's usual one (unc, unc, umd, berkeley, unc).")
    data_root: str = documented("data", runtime=True, help="Folder holding <dataset>/refs(<split_by>).p (gRefCOCO: grefcoco/grefs(unc).json) and <dataset>/instances.json.")
    image_root: str | None = documented(None, runtime=True, help="The images: COCO train2014 (None: <data_root>/images/mscoco/images/train2014, the refer layout), RefClef's SAIAPR TC-12 folder (None: <data_root>/images/saiapr_tc-12), or the folder a manifest's relative paths resolve against (None: the manifest's folder).")
    manifest: str | None = documented(None, runtime=True, help="With --dataset manifest: the manifest file, a JSON Lines or CSV file with a row per expression (image, text, split, and a PNG mask, polygons, an RLE or no_target; see docs/data.md).")
    train_split: str = documented("train", help="Split to train on.")
    eval_split: str = documented("val", runtime=True, help="Split validated during training and evaluated at the end (synthetic: val, test or compositional).")
    text_key: TextKey = documented(ReferConfig.text_key, help="Refer sentence field: raw (as typed) or sent (lower-cased and tokenised, what CRIS reads; the paper presets use it).")
    trust_refs_pickle: bool = documented(ReferConfig.trust_pickle, runtime=True, help="Read the refs pickle with Python's full unpickler, which runs whatever code the file names; without this flag a refs file that names any Python global (the published ones name none) is refused. Only for a file from a source you trust.")
    resize: ResizeMode = documented(ReferConfig.resize_mode, help="How images are fitted to the square input: letterbox (keep aspect, pad; CRIS) or resize (stretch).")
    synthetic_train_size: int = documented(16000, help="Scenes per synthetic training epoch.")
    synthetic_eval_size: int = documented(500, runtime=True, help="Synthetic scenes evaluated.")

    # model
    model: str = documented(_DEMO["model_name"], help="open_clip model of CRIS: masksd-tiny (CPU demo), ViT-B-16 or ViT-L-14; or clipseg (transformers' CLIPSeg), or lavt (a LAVT-style Swin + BERT segmenter, docs/lavt.md), each with --pretrained DIR or none.")
    pretrained: str | None = documented("masksd-tiny-synthetic", help="CLIP weights: an open_clip tag (openai), shipped weights by name (masksd-tiny-synthetic: the tiny CLIP pretrained on the synthetic scenes), a local checkpoint path, or none for random init; with --model clipseg or lavt: a folder of transformers snapshots, or none.")
    image_size: int = documented(_DEMO["image_size"], help="Input size: 480 (ablations), 576 (ViT-B-16), 532 (ViT-L-14), 64 (tiny).")
    max_words: int = documented(CRISConfig.max_words, help="Text positions incl. SOT/EOT: 17 for RefCOCO/RefCOCO+, 22 for G-Ref.")
    quick_gelu: bool | None = documented(CRISConfig.quick_gelu, help="QuickGELU activations in CLIP's towers; default: what --pretrained's tag was trained with (on for openai). Pass --quick-gelu for OpenAI weights loaded from a file, or to time a random-init model as the openai presets build it.")
    fast_head: bool = documented(CRISConfig.fast_head, help="CRIS's decode head with its dynamic convolution as a batched matmul and CoordConv's coordinates convolved once: the same function in another order (equal within float rounding), without a B-group convolution or a 514-channel input; off keeps the arithmetic of the stored runs.")
    deep_level: DeepLevel = documented(CRISConfig.deep_level, help="What feeds CRIS's 1/32 level: block (the last feature block's output, CRIS on a ViT) or projected (CLIP's projected final tokens, ETRIS-style, so segmentation trains the tokens MaskSD correlates; ours).")
    compile_scope: CompileScope = documented("parts", help="What --compile compiles: parts (the segmenter's image and text encoders and its decode head; MaskSD's glue stays eager) or step (MaskSD's whole training forward, branches, masking and losses included, and so its backward: one torch.compile of the model); the graph breaks are printed after the first step.")

    # MaskSD
    baseline: bool = documented(False, help="Train the bare segmenter: both MaskSD branches off (overrides --lmvsd/--vmlsd).")
    masksd: MaskSDConfig = documented(default_factory=MaskSDConfig, help="MaskSD's switches (paper defaults).", flatten=True)
    distill_ramp: float = documented(0.0, help="Ramp both branch losses linearly from 0 to their full weight over this fraction of the training steps, so that the main branch teaches once it is a useful teacher (ours, beyond the paper; 0: the paper's constant λ).")

    # evaluation
    eval_threshold: float = documented(0.35, runtime=True, help="Binarisation threshold of the sigmoid output at evaluation (the paper's 0.35).")
    restore: RestoreMethod = documented("bilinear", runtime=True, help="How evaluation brings predictions back to the image size: bilinear, or cris (CRIS's bicubic upsampling and inverse letterbox warp).")
    overlays: int = documented(6, runtime=True, help="Overlay PNGs written after the final evaluation.")
    eval_untrained: bool = documented(True, runtime=True, help="Also evaluate the freshly initialised model before training, for comparison.")
    eval_guidance: bool = documented(True, runtime=True, help="The final evaluation (and the untrained one) also measures the correlation filters' guidance (masksd.guidance) on the eval split.")

    # sharing and tracking
    export: bool = documented(True, runtime=True, help="At the end of training write <output>/export: the bare segmenter as model.safetensors, config.json and a model card, which from_pretrained, evaluate.py, predict.py and app.py load (needs masksd[hub]).")
    wandb: bool = documented(False, runtime=True, help="Also log the config, losses, validation metrics and overlays to Weights & Biases under <output>/wandb (needs masksd[wandb]; WANDB_MODE=offline logs without a network).")
    wandb_project: str = documented("masksd", runtime=True, help="W&B project of --wandb.")
    wandb_entity: str | None = documented(None, runtime=True, help="W&B entity (user or team) of --wandb; None: your default.")
    wandb_run_name: str | None = documented(None, runtime=True, help="W&B run name of --wandb; None: the run folder's name.")

    def masksd_config(self) -> MaskSDConfig:
        """The MaskSD configuration to train with: ``masksd``, with both branches off for ``baseline``."""
        if not self.baseline:
            return self.masksd
        m = self.masksd
        return replace(m, lmvsd=replace(m.lmvsd, enabled=False), vmlsd=replace(m.vmlsd, enabled=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """The config stored in a checkpoint (``dataclasses.asdict``); unknown keys are dropped with a warning.
        A masksd 0.1 checkpoint's flat MaskSD keys are read into ``masksd``, with VMLSD's literal rounding
        (``min_masked=0``) that those runs trained with."""
        if "masksd" not in values and _LEGACY_MASKSD.keys() & values.keys():
            flat = {k: v for k, v in values.items() if k not in _LEGACY_MASKSD}
            flat.update({_LEGACY_MASKSD[k]: v for k, v in values.items() if k in _LEGACY_MASKSD})
            flat.setdefault("masksd.vmlsd.min_masked", 0)
            values = unflatten(flat)
        return dataclass_from_dict(cls, values, source=source)

    def __post_init__(self) -> None:
        super().__post_init__()  # also every choice: dataset, split_by, resize, text_key, deep_level, restore...
        if self.dataset == "manifest":
            if not self.manifest:
                raise ValueError("dataset 'manifest' needs a manifest file: --manifest FILE (JSON Lines or CSV, see docs/data.md)")
            if self.split_by is not None:
                raise ValueError(f"split_by is a refer partition; dataset 'manifest' has none, got split_by={self.split_by!r}")
        elif self.manifest is not None:
            raise ValueError(f"manifest {self.manifest!r} is read only with --dataset manifest, got dataset {self.dataset!r}")
        elif self.split_by is None and self.dataset != "synthetic":
            self.split_by = DEFAULT_SPLIT_BY[self.dataset]
        if not isinstance(self.masksd, MaskSDConfig):
            raise TypeError(f"masksd must be a MaskSDConfig, got {type(self.masksd).__name__}")
        for name in ("synthetic_train_size", "synthetic_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be >= 0, got {self.overlays}")
        if not 0 < self.eval_threshold < 1:
            raise ValueError(f"eval_threshold must be in (0, 1), got {self.eval_threshold}")
        if not 0 <= self.distill_ramp <= 1:
            raise ValueError(f"distill_ramp must be a fraction of the training in [0, 1], got {self.distill_ramp}")
        vmlsd = self.masksd_config().vmlsd
        if vmlsd.enabled and vmlsd.site == "input" and self.masksd.masking and self.model != LAVT_MODEL:  # BERT has [MASK]
            raise ValueError(
                f"masksd.vmlsd.site='input' (the maskris preset's) replaces words by the tokenizer's [MASK] id, and {self.model} "
                "tokenizes with CLIP's tokenizer, which has none: add --vmlsd-site embedding to mask the drawn words with a "
                f"learnable mask token at the word embeddings instead (docs/method.md, MaskRIS's recipe), or train --model {LAVT_MODEL}"
            )


def _model(variant: str) -> dict[str, Any]:
    """TrainConfig's model fields for a CRIS variant."""
    return {"model": VARIANTS[variant]["model_name"], "image_size": VARIANTS[variant]["image_size"]}


_PAPER = dict(
    pretrained="openai", epochs=100, warmup_epochs=10, batch_size=32, lr=1e-5, weight_decay=5e-4,
    amp="bf16", workers=8, log_every=50, save_every=2000, overlays=8, eval_untrained=False,
    eval_every=1, tensorboard=True, text_key="sent",
)
_REFCOCO, _GREF = dict(max_words=17), dict(dataset="refcocog", split_by="umd", max_words=22)

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "refcoco-vitb": dict(_PAPER, **_model("vitb-576"), **_REFCOCO, dataset="refcoco", output="runs/refcoco-vitb"),
    "refcoco+-vitb": dict(_PAPER, **_model("vitb-576"), **_REFCOCO, dataset="refcoco+", output="runs/refcoco+-vitb"),
    "refcocog-vitb": dict(_PAPER, **_model("vitb-576"), **_GREF, output="runs/refcocog-vitb"),
    "refcoco-vitl": dict(_PAPER, **_model("vitl-532"), **_REFCOCO, dataset="refcoco", output="runs/refcoco-vitl"),
    "refcoco+-vitl": dict(_PAPER, **_model("vitl-532"), **_REFCOCO, dataset="refcoco+", output="runs/refcoco+-vitl"),
    "refcocog-vitl": dict(_PAPER, **_model("vitl-532"), **_GREF, output="runs/refcocog-vitl"),
    "ablation-vitb": dict(_PAPER, **_model("vitb-480"), **_REFCOCO, dataset="refcoco", output="runs/ablation-vitb"),
}
"""The paper's runs (§IV-B): ViT-B at 576 and ViT-L at 532 for Table I, ViT-B at 480 for the ablations.
Keys are TrainConfig fields (dotted paths for nested ones, e.g. ``masksd.vmlsd.ratio``)."""


MASKSD_PRESETS: dict[str, Callable[[], MaskSDConfig]] = {"paper": MaskSDConfig, "maskris": MaskSDConfig.maskris}
"""MaskSD's named recipes (``--masksd-preset``), each the ``MaskSDConfig`` constructor that defines it: the paper's
CM-MaskSD (the defaults) and MaskRIS as published (:meth:`MaskSDConfig.maskris`: pixel patches and word ids masked at
the inputs, one combined view). The pipeline's CLIP tokenizers have no [MASK] id, so ``maskris`` is refused unless
``--vmlsd-site embedding`` replaces that part (TrainConfig says so)."""


def masksd_preset(name: str) -> dict[str, Any]:
    """The TrainConfig overrides (``masksd.*`` dotted paths) of MaskSD recipe ``name``: the fields where it
    differs from the paper's defaults; they combine with any run preset and flags override them."""
    if name not in MASKSD_PRESETS:
        raise ValueError(f"masksd preset must be one of {sorted(MASKSD_PRESETS)}, got {name!r}")
    default, chosen = flatten(MaskSDConfig()), flatten(MASKSD_PRESETS[name]())
    return {f"masksd.{k}": v for k, v in chosen.items() if v != default[k]}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """TrainConfig of preset ``name``, with overrides by field name (dotted paths for nested fields,
    passed as ``**{"masksd.vmlsd.ratio": 0.2}``)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    values = flatten(TrainConfig())
    unknown = sorted(set(PRESETS[name]) - set(values)) + sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {unknown}; known: {sorted(values)}")
    values.update({**PRESETS[name], **overrides})
    return dataclass_from_dict(TrainConfig, unflatten(values))


_TINY = VARIANTS["tiny"]


@dataclass
class PretrainConfig(LoopConfig):
    """Defaults: region-aligned pretraining of the tiny CLIP (a few minutes on 2 CPU cores)."""

    # overrides of the loop's defaults
    epochs: int = documented(1, help="Training epochs over synthetic_train_size scenes.")
    warmup_epochs: float = documented(0.05, help="Linear warm-up, in epochs (may be fractional).")
    batch_size: int = documented(128, help="Global batch size: the contrastive negatives of each pair.")
    lr: float = documented(1e-3, help="Peak learning rate.")
    weight_decay: float = documented(0.0, help="Adam L2 weight decay.")
    output: str = documented("runs/pretrain", runtime=True, help="Run folder: clip.pt (the open_clip weights), last.pt, best.pt, logs, report.json.")
    eval_every: int = documented(250, runtime=True, help="Measure guidance and retrieval every N steps (eval_log.csv); 0: only at the end.")

    # model and data
    model: str = documented(_TINY["model_name"], help="open_clip model config to pretrain (masksd-tiny).")
    pretrained: str | None = documented(None, help="Initial weights: none (random), an open_clip tag or a checkpoint path.")
    image_size: int = documented(_TINY["image_size"], help="Input size in pixels (the synthetic scenes are rendered at it).")
    max_words: int = documented(CRISConfig.max_words, help="Text positions incl. SOT/EOT.")
    synthetic_train_size: int = documented(64000, help="Scenes per pretraining epoch (train split).")
    synthetic_eval_size: int = documented(512, runtime=True, help="Synthetic val scenes for the guidance and retrieval measurements.")

    # losses
    region_weight: float = documented(1.0, help="Weight of the region-text ClipLoss (referent's mask-pooled patch tokens vs its expression); 0: global ClipLoss only.")
    region_negatives: Literal["batch", "background"] = documented("background", help="What each expression's region must beat: batch (the other samples' regions, plain ClipLoss) or background (also every sample's rest of the image, pooled the same way).")
    export: Literal["last", "best"] = documented("last", help="Which weights clip.pt holds: the last step's, or best.pt's (highest LMVSD guidance AUC).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 2:  # one pair has no negatives: ClipLoss is exactly 0 and nothing trains
            raise ValueError(f"batch_size must be >= 2 for contrastive pretraining (each pair's negatives are the "
                             f"batch's other pairs; with 1 the loss is exactly 0), got {self.batch_size}")
        if not (math.isfinite(self.region_weight) and self.region_weight >= 0):
            raise ValueError(f"region_weight must be a finite number >= 0, got {self.region_weight}")
        for name in ("synthetic_train_size", "synthetic_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def cris_config(self) -> CRISConfig:
        """The CRIS segmenter whose backbone is pretrained (its decode head is not used)."""
        return CRISConfig.for_model(self.model, pretrained=self.pretrained, image_size=self.image_size, max_words=self.max_words)
