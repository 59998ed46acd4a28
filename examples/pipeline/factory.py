"""Build datasets, the segmenter and MaskSD from a TrainConfig."""

from __future__ import annotations

import contextlib
import logging
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
from examples.pipeline.checkpoint import describe_model, load_checkpoint, load_weights
from examples.pipeline.cli import dataclass_from_dict
from examples.pipeline.choices import CompileScope
from examples.pipeline.config import TrainConfig
from masksd import MaskSD
from masksd.data import ReferConfig, ReferDataset
from masksd.data.synthetic import SyntheticConfig, SyntheticReferDataset

__all__ = [
    "BACKBONE_PREFIXES", "Segmenter", "backbone_prefixes", "compile_masksd", "compile_segmenter", "build_dataset", "build_segmenter", "build_model",
    "checkpoint_architecture", "cris_config", "clipseg_config", "checkpoint_cris_config", "load_segmenter", "random_init",
]

Segmenter = Any
"""CRIS or examples.clipseg.CLIPSegRIS (imported only for --model clipseg: it needs transformers)."""


BACKBONE_PREFIXES = ("segmenter.backbone.",)
"""Parameter-name prefixes of CLIP's two towers inside MaskSD(CRIS): what --backbone-lr-scale scales."""


def build_dataset(cfg: TrainConfig, split: str, train: bool) -> Dataset:
    """The ``split`` of the configured dataset; ``train`` draws one sentence per ref (refer)."""
    if cfg.dataset == "synthetic":
        size = cfg.synthetic_train_size if train else cfg.synthetic_eval_size
        return SyntheticReferDataset(SyntheticConfig(image_size=cfg.image_size, num_samples=size, split=split, seed=cfg.seed))
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
    if cfg.model == CLIPSEG:
        return replace(cfg, pretrained=None)
    return replace(cfg, pretrained=None, quick_gelu=resolve_quick_gelu(cfg.model, cfg.pretrained, cfg.quick_gelu))


def clipseg_config(cfg: TrainConfig) -> CLIPSegRISConfig:
    """The CLIPSeg segmenter of ``--model clipseg``: a local snapshot (``--pretrained DIR``) or the random tiny one."""
    if cfg.pretrained in SHIPPED_WEIGHTS:
        raise ValueError(
            f"--pretrained {cfg.pretrained} holds CLIP weights for CRIS; with --model {CLIPSEG} pass --pretrained DIR "
            f"(a local CLIPSeg snapshot, e.g. of CIDAS/clipseg-rd64-refined) or --pretrained none (a random tiny CLIPSeg)"
        )
    if cfg.deep_level != "block":
        raise ValueError(f"--deep-level {cfg.deep_level} is CRIS's switch; CLIPSeg's decoder reads its own layers")
    if cfg.quick_gelu is not None:
        raise ValueError(f"--quick-gelu is CRIS's switch (its open_clip CLIP); CLIPSeg's activations come with its snapshot")
    if cfg.fast_head:
        raise ValueError("--fast-head is CRIS's switch (its decode head); CLIPSeg's decoder is transformers'")
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
    """``--compile --compile-scope parts``: compile the encoders and the decode head MaskSD calls (in place);
    the wrapper's own glue stays eager."""
    for name in ("encode_image", "encode_text"):
        setattr(segmenter, name, torch.compile(getattr(segmenter, name), backend=backend))
    segmenter.decode_head.compile(backend=backend)


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
    """The CRIS-style segmenter wrapped in MaskSD (branches off for ``--baseline``)."""
    return MaskSD(build_segmenter(cfg), cfg.masksd_config())


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


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """The trained segmenter (main branch only: CRIS or CLIPSeg) from a training checkpoint, in eval mode,
    and the checkpoint's TrainConfig as a dict. Loads with ``weights_only=True``; a checkpoint of
    another model (another family, such as a CLIP pretraining run, or weights that do not fit the
    architecture it records) raises one ValueError naming both and the number of mismatched tensors."""
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
    if "clipseg_config" in checkpoint:
        from examples.clipseg import CLIPSegRIS, CLIPSegRISConfig

        try:
            config = dataclass_from_dict(CLIPSegRISConfig, checkpoint["clipseg_config"], source=f"{path} clipseg_config")
        except FileNotFoundError as error:  # the snapshot holds the tokenizer and the processor's normalisation
            raise FileNotFoundError(
                f"checkpoint {path} was trained from the CLIPSeg snapshot {checkpoint['clipseg_config'].get('pretrained')!r}, "
                f"which is gone: its tokenizer and image normalisation are read from there again ({error})"
            ) from None
        segmenter = CLIPSegRIS(config, hf_config=checkpoint["hf_config"])  # the tokenizer from config.pretrained
        architecture = {"clipseg_config": asdict(config)}
    else:
        if "cris_config" in checkpoint:
            cris = dataclass_from_dict(CRISConfig, checkpoint["cris_config"], source=f"{path} cris_config")
        elif cfg is not None:  # not written by train_cris_masksd.py: rebuild what its config names, so the error can count
            cris = replace(cris_config(cfg), pretrained=None)
        else:
            raise ValueError(f"checkpoint {path} holds {describe_model(checkpoint)} and no cris_config: not written by examples/train_cris_masksd.py")
        segmenter, architecture = CRIS(cris), {"cris_config": asdict(cris)}
    return MaskSD(segmenter, (cfg or TrainConfig()).masksd_config()), architecture  # the whole state is checked
