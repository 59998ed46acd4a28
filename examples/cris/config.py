"""CRISConfig: every size and switch of the CRIS-style CLIP segmenter, with the paper's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = ["CRISConfig", "SHIPPED_WEIGHTS", "TINY_CLIP", "VARIANTS"]

TINY_CLIP = "masksd-tiny"
"""The open_clip model config shipped in ``examples/cris/model_configs/``: a 3-block ViT (width 64,
patch 8, 64 px) and a 2-block text transformer (width 64) with CLIP's real 49408-token vocabulary."""

SHIPPED_WEIGHTS: dict[str, tuple[str, Path]] = {
    "masksd-tiny-synthetic": (TINY_CLIP, Path(__file__).with_name("pretrained") / "masksd-tiny-synthetic.pt"),
}
"""CLIP weights that ship with the repository, by name (``pretrained="masksd-tiny-synthetic"``): (the
open_clip model they are for, the file). ``masksd-tiny-synthetic`` is the tiny
CLIP pretrained on the synthetic scenes by ``examples/pretrain_clip.py`` (see the README)."""

DeepLevel = Literal["block", "projected"]

# CLIP's text transformers are built with 77 positions; max_words may use at most that many.
CLIP_CONTEXT_LENGTH = 77

VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_name=TINY_CLIP, pretrained=None, image_size=64, pyramid_channels=(32, 64, 64), neck_channels=(16, 32, 64),
        decoder_layers=2, decoder_dim=32, decoder_heads=4, decoder_ffn=64,
    ),
    "vitb-480": dict(model_name="ViT-B-16", image_size=480),  # the paper's ablations (Tables II-VII)
    "vitb-576": dict(model_name="ViT-B-16", image_size=576),  # Table I, ViT-Base
    "vitl-532": dict(model_name="ViT-L-14", image_size=532),  # Table I, ViT-Large
}
"""The CRIS variants, as overrides of :class:`CRISConfig`'s fields: the one table that the training
presets, the factory and the benchmarks read. ``tiny`` is the CPU model of the tests and the demo."""


@dataclass
class CRISConfig:
    """The CRIS-style segmenter of CM-MaskSD (paper §IV-B; CRIS, CVPR 2022). Defaults: ViT-B-16 @ 480."""

    model_name: str = "ViT-B-16"
    """open_clip model config: "ViT-B-16" (paper's ablations and ViT-Base results), "ViT-L-14",
    or ``TINY_CLIP`` for tests. Any open_clip CLIP with a ViT image tower and a CLIP text tower works."""
    pretrained: str | None = "openai"
    """CLIP weights: an open_clip tag for ``model_name`` ("openai", as in the paper), the name of
    weights shipped here (:data:`SHIPPED_WEIGHTS`), a local checkpoint file in open_clip's format,
    or None for random init (tests, FLOP counts)."""
    quick_gelu: bool | None = None
    """QuickGELU activations. None: what the pretrained tag was trained with (True for "openai");
    False for a local file or random init. Set True when loading OpenAI weights from a file."""
    image_size: int = 480
    """Square input size in pixels; 480 for the ablations, 576 (ViT-B) and 532 (ViT-L) for the main
    results. CLIP's 224-px position embedding is interpolated to it when weights load."""
    max_words: int = 17
    """Text positions used, SOT and EOT included: 17 for RefCOCO/RefCOCO+, 22 for G-Ref. Longer
    sentences are truncated (EOT kept)."""
    feature_layers: tuple[int, int, int] | None = None
    """0-based ViT blocks whose outputs feed the 1/8, 1/16 and 1/32 levels. None: the last block of
    each third of the depth ((3, 7, 11) for 12 blocks, (7, 15, 23) for 24)."""
    pyramid_channels: tuple[int, int, int] = (512, 1024, 1024)
    """Channels of the 1/8, 1/16, 1/32 maps made from the ViT levels: the neck's inputs (CRIS's
    C3, C4, C5 widths for its ResNet-50)."""
    neck_channels: tuple[int, int, int] = (256, 512, 1024)
    """CRIS FPN output channels at 1/8, 1/16, 1/32; the middle one is the fused map's width and
    must equal ``decoder_dim``."""
    decoder_layers: int = 3
    """Vision-language Transformer decoder layers."""
    decoder_dim: int = 512
    """Decoder width d_model (a multiple of 4 for the 2D sine position encoding)."""
    decoder_heads: int = 8
    """Attention heads in the decoder's self- and cross-attention."""
    decoder_ffn: int = 2048
    """Hidden width of the decoder's feed-forward network."""
    decoder_dropout: float = 0.1
    """Dropout in the decoder's attention and feed-forward paths."""
    projector_kernel: int = 3
    """Size of the dynamic convolution kernel that the sentence state generates (odd)."""
    fast_head: bool = False
    """Compute two parts of the decode head in another order: the projector's per-sample dynamic convolution as
    one batched matmul and a fixed shift-and-add (instead of a convolution of B groups), and CoordConv's two
    coordinate channels as one convolution shared by the batch (instead of concatenating them to every
    sample). The same function: outputs equal the reference's within float rounding (tested: 1e-5 relative
    in float32, 2e-2 under bf16 autocast). Off: the arithmetic of every stored run (tiny, synthetic). Ours."""
    deep_level: DeepLevel = "block"
    """What feeds the 1/32 level: "block", the raw output of the last feature block (CRIS on a ViT;
    CLIP's ln_post and proj then only serve MaskSD's correlation and stay frozen), or "projected",
    the final patch tokens through ln_post and proj (as the ETRIS port of CRIS to ViT does), so the
    segmentation loss also trains the tokens the correlation filter ranks. Ours, not the paper's."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty open_clip model name, got {self.model_name!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"pretrained must be None, an open_clip tag or a checkpoint path, got {self.pretrained!r}")
        if self.quick_gelu is not None and not isinstance(self.quick_gelu, bool):
            raise TypeError(f"quick_gelu must be None, True or False, got {self.quick_gelu!r}")
        _check_int("image_size", self.image_size, low=1)
        _check_int("max_words", self.max_words, low=3, high=CLIP_CONTEXT_LENGTH)  # SOT, a word, EOT
        if self.feature_layers is not None:
            layers = tuple(self.feature_layers)
            if len(layers) != 3 or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"feature_layers must be three block indices, got {self.feature_layers!r}")
            if layers[0] < 0 or not layers[0] < layers[1] < layers[2]:
                raise ValueError(f"feature_layers must be increasing and >= 0, got {layers}")
            self.feature_layers = layers
        for name in ("pyramid_channels", "neck_channels"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have three entries (1/8, 1/16, 1/32), got {value!r}")
            for i, c in enumerate(value):
                _check_int(f"{name}[{i}]", c, low=1)
            setattr(self, name, value)
        _check_int("decoder_layers", self.decoder_layers, low=1)
        _check_int("decoder_dim", self.decoder_dim, low=4)
        if self.decoder_dim % 4:
            raise ValueError(f"decoder_dim must be a multiple of 4 (2D sine positions, half-width projector), got {self.decoder_dim}")
        _check_int("decoder_heads", self.decoder_heads, low=1)
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim={self.decoder_dim} must be divisible by decoder_heads={self.decoder_heads}")
        _check_int("decoder_ffn", self.decoder_ffn, low=1)
        if isinstance(self.decoder_dropout, bool) or not isinstance(self.decoder_dropout, (int, float)) or not (
            math.isfinite(self.decoder_dropout) and 0 <= self.decoder_dropout < 1
        ):
            raise ValueError(f"decoder_dropout must be in [0, 1), got {self.decoder_dropout!r}")
        if self.neck_channels[1] != self.decoder_dim:
            raise ValueError(
                f"neck_channels[1]={self.neck_channels[1]} is the decoder's input width and must equal "
                f"decoder_dim={self.decoder_dim}"
            )
        if not isinstance(self.fast_head, bool):
            raise TypeError(f"fast_head must be True or False, got {self.fast_head!r}")
        if self.deep_level not in get_args(DeepLevel):
            raise ValueError(f"deep_level must be one of {get_args(DeepLevel)}, got {self.deep_level!r}")
        _check_int("projector_kernel", self.projector_kernel, low=1)
        if self.projector_kernel % 2 == 0:
            raise ValueError(f"projector_kernel must be odd (same-size output), got {self.projector_kernel}")

    def resolved_feature_layers(self, depth: int) -> tuple[int, int, int]:
        """The three block indices for a ViT of ``depth`` blocks (checked against it)."""
        if depth < 3:
            raise ValueError(f"the ViT has {depth} blocks; CRIS needs at least 3 for its three levels")
        layers = self.feature_layers or (depth // 3 - 1, 2 * depth // 3 - 1, depth - 1)
        if layers[-1] >= depth:
            raise ValueError(f"feature_layers {layers} reach past the ViT's {depth} blocks (0-based indices)")
        return layers

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> "CRISConfig":
        """The configuration :data:`VARIANTS` names, with keyword overrides of its fields."""
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {name!r}")
        return cls(**{**VARIANTS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "CRISConfig":
        """The tiny CPU-test model (``VARIANTS["tiny"]``): ``TINY_CLIP`` at 64 px, random init, a 2-layer
        decoder of width 32. Keyword arguments override fields, e.g. ``CRISConfig.tiny(image_size=96)``."""
        return cls.variant("tiny", **overrides)

    @classmethod
    def for_model(cls, model_name: str, **overrides: Any) -> "CRISConfig":
        """The architecture of the first :data:`VARIANTS` entry built on ``model_name`` (the tiny decoder for
        ``TINY_CLIP``; the paper's widths otherwise), with keyword overrides. Any other open_clip model
        gets the paper's widths."""
        base = next((v for v in VARIANTS.values() if v["model_name"] == model_name), {"model_name": model_name})
        return cls(**{**base, **overrides})


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
