"""Build datasets, the segmenter and MaskSD from a TrainConfig."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch.utils.data import Dataset

from examples.clipseg import CLIPSEG, CLIPSegRISConfig
from examples.cris import CRIS, CRISConfig
from examples.cris.backbone import resolve_quick_gelu
from examples.cris.config import SHIPPED_WEIGHTS
from examples.lavt.config import LAVT_MODEL, SNAPSHOT_HINT, LAVTConfig
from examples.pipeline.checkpoint import describe_model, load_checkpoint, load_weights
from examples.pipeline.cli import dataclass_from_dict
from examples.pipeline.choices import CompileScope
from examples.pipeline.config import TrainConfig
from masksd import InputSpec, MaskSD, MaskSDConfig
from masksd.data import ManifestConfig, ManifestDataset, ReferConfig, ReferDataset
from masksd.data.synthetic import SyntheticConfig, SyntheticReferDataset

__all__ = [
    "ARCHITECTURES", "BACKBONE_PREFIXES", "Segmenter", "architecture_name", "backbone_prefixes", "compile_masksd", "compile_segmenter",
    "build_dataset", "build_segmenter", "build_model", "checkpoint_architecture", "check_guidance", "cris_config", "clipseg_config",
    "checkpoint_cris_config", "input_patch_size", "input_spec", "is_export_source", "lavt_config", "load_segmenter", "random_init",
    "segmenter_from_entries",
]

Segmenter = Any
"""CRIS, examples.clipseg.CLIPSegRIS or examples.lavt.LAVT (the last two imported only for their --model: they need
transformers)."""


ARCHITECTURES: dict[str, str] = {"cris": "cris_config", CLIPSEG: "clipseg_config", LAVT_MODEL: "lavt_config"}
"""The pipeline's segmenter kinds, by the name an export's config.json stores, each with the checkpoint entry
holding its architecture: :func:`checkpoint_architecture` writes that entry, :func:`segmenter_from_entries`
rebuilds the segmenter from it. A new reference model adds its name here and a branch in both."""

BACKBONE_PREFIXES = ("segmenter.backbone.",)
"""Parameter-name prefixes of CLIP's two towers inside MaskSD(CRIS): what --backbone-lr-scale scales."""


def build_dataset(cfg: TrainConfig, split: str, train: bool) -> Dataset:
    """The ``split`` of the configured dataset; ``train`` draws one sentence per ref (refer, manifest)."""
    if cfg.dataset == "synthetic":
        size = cfg.synthetic_train_size if train else cfg.synthetic_eval_size
        return SyntheticReferDataset(SyntheticConfig(image_size=cfg.image_size, num_samples=size, split=split, seed=cfg.seed))
    if cfg.dataset == "manifest":
        return ManifestDataset(ManifestConfig(
            cfg.manifest, split, root=cfg.image_root, image_size=cfg.image_size, resize_mode=cfg.resize,
            mode="train" if train else "eval", seed=cfg.seed,
        ))
    return ReferDataset(
        ReferConfig(
            root=cfg.data_root,
            dataset=cfg.dataset,
            split=split,
            split_by=cfg.split_by,
            image_root=cfg.image_root,
            image_size=cfg.image_size,
            resize_mode=cfg.resize,
            mode="train" if train else "eval",
            seed=cfg.seed,
            text_key=cfg.text_key,
            trust_pickle=cfg.trust_refs_pickle,
        )
    )


def cris_config(cfg: TrainConfig) -> CRISConfig:
    """The segmenter a run trains: the architecture of ``cfg.model``'s CRIS variant, at the run's size and weights."""
    return CRISConfig.for_model(
        cfg.model, pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words, deep_level=cfg.deep_level,
        quick_gelu=cfg.quick_gelu, fast_head=cfg.fast_head,
    )


def random_init(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` from random weights (``pretrained`` None), building the network its weights would build
    (QuickGELU for OpenAI's CLIP): what a benchmark times of a preset, with nothing to download."""
    if cfg.model in (CLIPSEG, LAVT_MODEL):
        return replace(cfg, pretrained=None)
    return replace(cfg, pretrained=None, quick_gelu=resolve_quick_gelu(cfg.model, cfg.pretrained, cfg.quick_gelu))


def clipseg_config(cfg: TrainConfig) -> CLIPSegRISConfig:
    """The CLIPSeg segmenter of ``--model clipseg``: a local snapshot (``--pretrained DIR``) or the random tiny one."""
    refuse_cris_switches(cfg, "a local CLIPSeg snapshot, e.g. of CIDAS/clipseg-rd64-refined", "CLIPSeg", "its own layers")
    return CLIPSegRISConfig(pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words)


def lavt_config(cfg: TrainConfig) -> LAVTConfig:
    """The LAVT segmenter of ``--model lavt``: local Swin and BERT snapshots (``--pretrained DIR``) or the random tiny one."""
    refuse_cris_switches(cfg, SNAPSHOT_HINT, "LAVT", "its four fused Swin stages")
    return LAVTConfig(pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words)


def refuse_cris_switches(cfg: TrainConfig, snapshot: str, name: str, decoder_reads: str) -> None:
    """Refuse, naming the flag, what only CRIS has for a transformers model (``--model clipseg``, ``lavt``): CLIP weights
    shipped here, ``--deep-level``, ``--quick-gelu`` and ``--fast-head``. ``snapshot`` says what its ``--pretrained DIR``
    holds."""
    if cfg.pretrained in SHIPPED_WEIGHTS:
        raise ValueError(
            f"--pretrained {cfg.pretrained} holds CLIP weights for CRIS; with --model {cfg.model} pass --pretrained DIR "
            f"({snapshot}) or --pretrained none (a random tiny {name})"
        )
    if cfg.deep_level != "block":
        raise ValueError(f"--deep-level {cfg.deep_level} is CRIS's switch; {name}'s decoder reads {decoder_reads}")
    if cfg.quick_gelu is not None:
        raise ValueError(f"--quick-gelu is CRIS's switch (its open_clip CLIP); {name}'s activations come with its snapshot")
    if cfg.fast_head:
        raise ValueError(f"--fast-head is CRIS's switch (its decode head); {name}'s decoder is its own")


def build_segmenter(cfg: TrainConfig) -> Segmenter:
    """The segmenter a run trains: CRIS on ``cfg.model``'s CLIP, CLIPSeg for ``--model clipseg`` or LAVT for ``--model lavt``."""
    if cfg.model == CLIPSEG:
        from examples.clipseg import CLIPSegRIS

        return CLIPSegRIS(clipseg_config(cfg))
    if cfg.model == LAVT_MODEL:
        from examples.lavt import LAVT

        return LAVT(lavt_config(cfg))
    return CRIS(cris_config(cfg))


def backbone_prefixes(segmenter: Segmenter) -> tuple[str, ...]:
    """Parameter-name prefixes of the pretrained encoders inside MaskSD(segmenter): what --backbone-lr-scale scales
    (CRIS's CLIP, CLIPSeg's CLIP towers, LAVT's Swin and BERT but not its fusion modules)."""
    if isinstance(segmenter, CRIS):
        return BACKBONE_PREFIXES
    if isinstance(segmenter.config, LAVTConfig):
        return ("segmenter.swin.", "segmenter.bert.")
    return ("segmenter.towers.",)


def compile_segmenter(segmenter: Segmenter, backend: str = "inductor") -> None:
    """``--compile --compile-scope parts``: compile the pieces MaskSD calls (in place: both encoders, or the fused
    ``encode``, and the decode head); the wrapper's own glue stays eager."""
    from masksd.adapter import is_fused

    for name in ("encode",) if is_fused(segmenter) else ("encode_image", "encode_text"):
        setattr(segmenter, name, torch.compile(getattr(segmenter, name), backend=backend))
    segmenter.decode_head.compile(backend=backend)


MASKRIS_PATCH = (32, 480)
"""MaskRIS's pixel patch side at ``site="input"`` and the input size it was chosen for (naver-ai/maskris)."""


def input_patch_size(image_size: int) -> int:
    """The pixel patch side of ``site="input"`` at ``image_size``: MaskRIS's 32 px at 480, the same share of the
    image at any other size (4 px at the tiny models' 64)."""
    patch, size = MASKRIS_PATCH
    return max(1, round(patch * image_size / size))


def input_spec(segmenter: Segmenter, image_size: int) -> InputSpec:
    """How ``site="input"`` finds and masks this segmenter's inputs: its tokenizer's mask id, vocabulary and special
    ids (CLIP's tokenizer has no mask id: VMLSD at the input site is then refused by name), patches of
    :func:`input_patch_size`."""
    tokenizer = getattr(segmenter, "tokenizer", None) or segmenter._tokenizer  # LAVT's is public; CRIS's and CLIPSeg's not
    return InputSpec.from_tokenizer(tokenizer, patch_size=input_patch_size(image_size))
def compile_masksd(model: MaskSD, scope: CompileScope, backend: str = "inductor") -> None:
    """``--compile``: the pieces (:func:`compile_segmenter`) or, for ``scope="step"``, MaskSD itself (in place): its
    whole training forward, the branches' masking and losses included, and so its backward."""
    if scope not in get_args(CompileScope):
        raise ValueError(f"compile scope must be one of {get_args(CompileScope)}, got {scope!r}")
    if scope == "step":
        model.compile(backend=backend)
    else:
        compile_segmenter(model.segmenter, backend)


def build_model(cfg: TrainConfig) -> MaskSD:
    """The run's segmenter wrapped in MaskSD (branches off for ``--baseline``)."""
    segmenter, config = build_segmenter(cfg), cfg.masksd_config()
    check_guidance(segmenter, config)
    return MaskSD(segmenter, config, inputs=input_spec(segmenter, cfg.image_size))


def check_guidance(segmenter: Segmenter, config: MaskSDConfig) -> None:
    """Refuse, by its flags, a branch that ranks in a joint image-text space (``guidance="joint"``, K < 1, the default)
    for a model without one (LAVT), here rather than at the first training step."""
    if not isinstance(getattr(segmenter, "config", None), LAVTConfig):
        return
    for name in ("lmvsd", "vmlsd"):
        branch = config.branch(name)
        if branch.enabled and branch.guidance == "joint" and branch.top_k < 1 and branch.site != "input":
            other = "segmenter (PWAM's attention) or prediction" if name == "lmvsd" else "segmenter (PWAM's attention)"
            raise ValueError(
                f"--{name}-guidance joint (the default) ranks tokens in a joint image-text space, which --model {LAVT_MODEL} "
                f"lacks: pass --{name}-guidance {other}, or --{name}-top-k 1 (random masking), or --no-{name}"
            )


def checkpoint_cris_config(segmenter: CRIS) -> dict[str, Any]:
    """The segmenter's architecture as stored in checkpoints: no ``pretrained`` (the weights are in the
    checkpoint) and the QuickGELU setting actually built, so rebuilding needs no download."""
    return asdict(replace(segmenter.config, pretrained=None))


def checkpoint_architecture(segmenter: Segmenter) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``segmenter`` without its pretrained weights: ``cris_config``,
    or ``clipseg_config`` / ``lavt_config`` with the transformers architecture (``hf_config``: CLIPSeg's, or LAVT's
    Swin and BERT as ``{"swin": ..., "bert": ...}``)."""
    if isinstance(segmenter, CRIS):
        return {"cris_config": checkpoint_cris_config(segmenter)}
    if isinstance(segmenter.config, LAVTConfig):
        return {"lavt_config": asdict(segmenter.config), "hf_config": segmenter.hf_configs()}
    return {"clipseg_config": asdict(segmenter.config), "hf_config": segmenter.hf_config()}


def architecture_name(entries: dict[str, Any]) -> str | None:
    """The :data:`ARCHITECTURES` name of the segmenter that checkpoint entries (or an export's config) describe; None if none."""
    return next((name for name, key in ARCHITECTURES.items() if key in entries), None)


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """The trained segmenter (main branch only: CRIS, CLIPSeg or LAVT) from a training checkpoint, an export folder
    (``examples/pipeline/export.py``) or the Hub id of one, in eval mode, and the run's TrainConfig as a dict.
    Checkpoints load with ``weights_only=True``, exports from safetensors and JSON; a checkpoint of
    another model (another family, such as a CLIP pretraining run, or weights that do not fit the
    architecture it records) raises one ValueError naming both and the number of mismatched tensors."""
    if is_export_source(path):
        from examples.pipeline.export import load_export  # needs masksd[hub]

        exported = load_export(path, device)
        return exported.segmenter, exported.training
    checkpoint = load_checkpoint(path, map_location="cpu")
    run = checkpoint.get("config", {})
    try:
        cfg = TrainConfig.from_dict(run, source="")  # silently: another family's config has other keys
    except (TypeError, ValueError):
        cfg = None
    with weights_follow():
        model, architecture = _segmenter_for(checkpoint, cfg, path)
    load_weights(model, checkpoint, path, {"family": type(model).__name__, **architecture}, "evaluate.py / predict.py")
    return model.segmenter.to(device).eval(), run


def is_export_source(path: str | Path) -> bool:
    """Whether ``path`` names an export rather than a checkpoint file: a folder (not a run folder holding
    checkpoints), or (nothing by that name
    here) a Hugging Face Hub id ``owner/name`` not ending in .pt."""
    local = Path(path)
    if local.is_dir():  # a run folder (checkpoints, no config.json) is refused as a folder by load_checkpoint
        return (local / "config.json").is_file() or not any(local.glob("*.pt"))
    return not local.exists() and local.suffix not in (".pt", ".pth") and _HUB_ID.fullmatch(str(path)) is not None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@contextlib.contextmanager
def weights_follow() -> Iterator[None]:
    """Within the block, open_clip's warning that a model built without pretrained weights is initialised
    randomly is dropped: the caller loads a checkpoint's weights into it next."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    drop, root = _Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _segmenter_for(checkpoint: dict[str, Any], cfg: TrainConfig | None, path: str | Path) -> tuple[MaskSD, dict[str, Any]]:
    """MaskSD around the segmenter a checkpoint records (CRIS, CLIPSeg or LAVT), and the architecture entries it expects."""
    if architecture_name(checkpoint) is not None:
        segmenter, architecture = segmenter_from_entries(checkpoint, f"checkpoint {path}")
    elif cfg is not None:  # not written by train_cris_masksd.py: rebuild what its config names, so the error can count
        cris = replace(cris_config(cfg), pretrained=None)
        segmenter, architecture = CRIS(cris), {"cris_config": asdict(cris)}
    else:
        raise ValueError(f"checkpoint {path} holds {describe_model(checkpoint)} and no cris_config: not written by examples/train_cris_masksd.py")
    inputs = input_spec(segmenter, segmenter.config.image_size)
    return MaskSD(segmenter, (cfg or TrainConfig()).masksd_config(), inputs=inputs), architecture  # the whole state is checked


def segmenter_from_entries(entries: dict[str, Any], source: str) -> tuple[Segmenter, dict[str, Any]]:
    """The segmenter that :func:`checkpoint_architecture`'s entries describe (a checkpoint's, or an export's
    config.json), built without pretrained weights (no download; the caller loads the trained ones), and the
    architecture entries it expects. ``source`` names the file in errors."""
    name = architecture_name(entries)
    if name == LAVT_MODEL:
        from examples.lavt import LAVT
        from examples.lavt.text import load_tokenizer

        try:
            config = dataclass_from_dict(LAVTConfig, entries["lavt_config"], source=f"{source} lavt_config")
        except FileNotFoundError as error:  # the snapshot holds the tokenizer and the image processor's normalisation
            raise FileNotFoundError(
                f"{source} was trained from the LAVT snapshots in {entries['lavt_config'].get('pretrained')!r}, "
                f"which are gone: the tokenizer and image normalisation are read from there again ({error})"
            ) from None
        saved = entries.get("lavt_processor")  # an export's tokenizer folder (snapshot layout) and image statistics
        kept = {} if saved is None else {"tokenizer": load_tokenizer(saved["tokenizer"]), "image_statistics": (saved["mean"], saved["std"])}
        return LAVT(config, hf_configs=entries["hf_config"], **kept), {"lavt_config": asdict(config)}
    if name == CLIPSEG:
        from examples.clipseg import CLIPSegRIS, CLIPSegRISConfig

        try:
            config = dataclass_from_dict(CLIPSegRISConfig, entries["clipseg_config"], source=f"{source} clipseg_config")
        except FileNotFoundError as error:  # the snapshot holds the tokenizer and the processor's normalisation
            raise FileNotFoundError(
                f"{source} was trained from the CLIPSeg snapshot {entries['clipseg_config'].get('pretrained')!r}, "
                f"which is gone: its tokenizer and image normalisation are read from there again ({error})"
            ) from None
        return CLIPSegRIS(config, hf_config=entries["hf_config"]), {"clipseg_config": asdict(config)}  # the tokenizer from config.pretrained
    if name == "cris":
        cris = dataclass_from_dict(CRISConfig, entries["cris_config"], source=f"{source} cris_config")
        return CRIS(cris), {"cris_config": asdict(cris)}
    raise ValueError(f"{source} names no segmenter architecture of the pipeline (one of the entries {sorted(ARCHITECTURES.values())})")
