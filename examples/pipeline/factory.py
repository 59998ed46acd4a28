"""Build datasets, the segmenter and MaskSD from a TrainConfig."""

from __future__ import annotations

from torch.utils.data import Dataset

from examples.cris import CRIS, CRISConfig
from examples.pipeline.config import TrainConfig
from masksd import MaskSD
from masksd.data import ReferConfig, ReferDataset
from masksd.data.synthetic import SyntheticConfig, SyntheticReferDataset

__all__ = ["build_dataset", "build_segmenter", "build_model", "cris_config"]


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
        )
    )


def cris_config(cfg: TrainConfig) -> CRISConfig:
    if cfg.model == "masksd-tiny":
        return CRISConfig.tiny(pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words)
    return CRISConfig(model_name=cfg.model, pretrained=cfg.pretrained, image_size=cfg.image_size, max_words=cfg.max_words)


def build_segmenter(cfg: TrainConfig) -> CRIS:
    return CRIS(cris_config(cfg))


def build_model(cfg: TrainConfig) -> MaskSD:
    """The CRIS-style segmenter wrapped in MaskSD (branches off for ``--baseline``)."""
    return MaskSD(build_segmenter(cfg), cfg.masksd_config())
