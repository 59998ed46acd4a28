"""Build datasets, the segmenter and MaskSD from a TrainConfig."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from examples.clipseg import CLIPSEG, CLIPSegRISConfig
from examples.cris import CRIS, CRISConfig
from examples.cris.config import SHIPPED_WEIGHTS
from examples.pipeline.checkpoint import describe_model, load_checkpoint, load_weights
from examples.pipeline.cli import dataclass_from_dict
from examples.pipeline.config import TrainConfig
from masksd import InputSpec, MaskSD
from masksd.data import ManifestConfig, ManifestDataset, ReferConfig, ReferDataset
from masksd.data.synthetic import SyntheticConfig, SyntheticReferDataset

__all__ = [
    "ARCHITECTURES", "BACKBONE_PREFIXES", "Segmenter", "architecture_name", "backbone_prefixes", "compile_segmenter", "build_dataset",
    "build_segmenter", "build_model", "checkpoint_architecture", "cris_config", "clipseg_config", "checkpoint_cris_config",
    "is_export_source", "load_segmenter", "segmenter_from_entries",
]

Segmenter = Any
"""CRIS or examples.clipseg.CLIPSegRIS (imported only for --model clipseg: it needs transformers)."""


ARCHITECTURES: dict[str, str] = {"cris": "cris_config", CLIPSEG: "clipseg_config"}
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
        cfg.model, pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words, deep_level=cfg.deep_level
    )


def clipseg_config(cfg: TrainConfig) -> CLIPSegRISConfig:
    """The CLIPSeg segmenter of ``--model clipseg``: a local snapshot (``--pretrained DIR``) or the random tiny one."""
    if cfg.pretrained in SHIPPED_WEIGHTS:
        raise ValueError(
            f"--pretrained {cfg.pretrained} holds CLIP weights for CRIS; with --model {CLIPSEG} pass --pretrained DIR "
            f"(a local CLIPSeg snapshot, e.g. of CIDAS/clipseg-rd64-refined) or --pretrained none (a random tiny CLIPSeg)"
        )
    if cfg.deep_level != "block":
        raise ValueError(f"--deep-level {cfg.deep_level} is CRIS's switch; CLIPSeg's decoder reads its own layers")
    return CLIPSegRISConfig(pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words)


def build_segmenter(cfg: TrainConfig) -> Segmenter:
    """The segmenter a run trains: CRIS on ``cfg.model``'s CLIP, or CLIPSeg for ``--model clipseg``."""
    if cfg.model == CLIPSEG:
        from examples.clipseg import CLIPSegRIS

        return CLIPSegRIS(clipseg_config(cfg))
    return CRIS(cris_config(cfg))


def backbone_prefixes(segmenter: Segmenter) -> tuple[str, ...]:
    """Parameter-name prefixes of the CLIP towers inside MaskSD(segmenter): what --backbone-lr-scale scales."""
    return BACKBONE_PREFIXES if isinstance(segmenter, CRIS) else ("segmenter.towers.",)


def compile_segmenter(segmenter: Segmenter, backend: str = "inductor") -> None:
    """``--compile``: compile the four pieces MaskSD calls (in place); the wrapper's own glue stays eager."""
    for name in ("encode_image", "encode_text"):
        setattr(segmenter, name, torch.compile(getattr(segmenter, name), backend=backend))
    segmenter.decode_head.compile(backend=backend)


def build_model(cfg: TrainConfig) -> MaskSD:
    """The CRIS-style segmenter wrapped in MaskSD (branches off for ``--baseline``). Masking at the inputs finds the
    images as the pipeline passes them, a (B, 3, S, S) tensor, in MaskRIS's 32-px patches; the pipeline's models
    tokenize with CLIP, which has no mask id, so TrainConfig refuses ``--vmlsd-site input``."""
    return MaskSD(build_segmenter(cfg), cfg.masksd_config(), inputs=InputSpec())


def checkpoint_cris_config(segmenter: CRIS) -> dict[str, Any]:
    """The segmenter's architecture as stored in checkpoints: no ``pretrained`` (the weights are in the
    checkpoint) and the QuickGELU setting actually built, so rebuilding needs no download."""
    return asdict(replace(segmenter.config, pretrained=None))


def checkpoint_architecture(segmenter: Segmenter) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``segmenter`` without its pretrained weights: ``cris_config``,
    or ``clipseg_config`` with the transformers architecture (``hf_config``)."""
    if isinstance(segmenter, CRIS):
        return {"cris_config": checkpoint_cris_config(segmenter)}
    return {"clipseg_config": asdict(segmenter.config), "hf_config": segmenter.hf_config()}


def architecture_name(entries: dict[str, Any]) -> str | None:
    """The :data:`ARCHITECTURES` name of the segmenter that checkpoint entries (or an export's config) describe; None if none."""
    return next((name for name, key in ARCHITECTURES.items() if key in entries), None)


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """The trained segmenter (main branch only: CRIS or CLIPSeg) from a training checkpoint, an export folder
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
    """Whether ``path`` names an export rather than a checkpoint file: a folder, or (nothing by that name
    here) a Hugging Face Hub id ``owner/name`` not ending in .pt."""
    local = Path(path)
    if local.is_dir():
        return True
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
    """MaskSD around the segmenter a checkpoint records (CRIS or CLIPSeg), and the architecture entries it expects."""
    if architecture_name(checkpoint) is not None:
        segmenter, architecture = segmenter_from_entries(checkpoint, f"checkpoint {path}")
    elif cfg is not None:  # not written by train_cris_masksd.py: rebuild what its config names, so the error can count
        cris = replace(cris_config(cfg), pretrained=None)
        segmenter, architecture = CRIS(cris), {"cris_config": asdict(cris)}
    else:
        raise ValueError(f"checkpoint {path} holds {describe_model(checkpoint)} and no cris_config: not written by examples/train_cris_masksd.py")
    return MaskSD(segmenter, (cfg or TrainConfig()).masksd_config()), architecture  # the whole state is checked


def segmenter_from_entries(entries: dict[str, Any], source: str) -> tuple[Segmenter, dict[str, Any]]:
    """The segmenter that :func:`checkpoint_architecture`'s entries describe (a checkpoint's, or an export's
    config.json), built without pretrained weights (no download; the caller loads the trained ones), and the
    architecture entries it expects. ``source`` names the file in errors."""
    name = architecture_name(entries)
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
