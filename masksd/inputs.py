"""InputSpec: what masking at the inputs (``site="input"``, MaskRIS's site) needs to know about a model's inputs.

    model = MaskSD(my_model, MaskSDConfig.maskris(), inputs=InputSpec.from_tokenizer(tokenizer))

Images are a (B, C, H, W) float tensor or a mapping holding one under ``image_key``; texts are a (B, L) integer
tensor of token ids or a mapping holding one under ``text_key`` (a transformers ``BatchEncoding``), whose
``attention_mask`` marks padding. A word is a candidate for masking unless it is padding or a special id.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from masksd._checks import check_fraction

__all__ = ["InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """How to find and mask a model's inputs (MaskRIS's defaults)."""

    patch_size: int = 32
    """Side of the square pixel patches LMVSD fills at the input site (MaskRIS: 32)."""
    fill: float = 0.0
    """Value the masked pixels get: 0.0 is the mean colour of normalised images (MaskRIS zeroes them)."""
    mask_token_id: int | None = None
    """The tokenizer's mask id ([MASK], 103 in BERT's vocabulary); None where it has none (CLIP)."""
    vocab_size: int | None = None
    """Random replacement words are drawn uniformly from [0, vocab_size) (MaskRIS: ``tokenizer.vocab_size``)."""
    special_token_ids: tuple[int, ...] = ()
    """Ids never masked: [CLS], [SEP], [PAD], [MASK], [UNK]... (a mapping's ``attention_mask`` excludes padding too)."""
    word_replacement: tuple[float, float] = (0.8, 0.1)
    """Shares of the drawn words that become the mask id and a random id (never one of ``special_token_ids``); the
    rest keep their id (MaskRIS, BERT)."""
    image_key: str = "pixel_values"
    """Where the pixels are when images come as a mapping."""
    text_key: str = "input_ids"
    """Where the token ids are when texts come as a mapping."""
    attention_key: str = "attention_mask"
    """Where a texts mapping marks real tokens (1) and padding (0)."""

    def __post_init__(self) -> None:
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size <= 0:
            raise ValueError(f"InputSpec.patch_size must be a positive int, got {self.patch_size!r}")
        if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)):
            raise ValueError(f"InputSpec.fill must be a number, got {self.fill!r}")
        for name in ("mask_token_id", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"InputSpec.{name} must be an int >= 0 or None, got {value!r}")
        special = tuple(self.special_token_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in special):
            raise ValueError(f"InputSpec.special_token_ids must be ints, got {self.special_token_ids!r}")
        object.__setattr__(self, "special_token_ids", tuple(sorted(set(special))))
        replacement = tuple(self.word_replacement)
        if len(replacement) != 2:
            raise ValueError(f"InputSpec.word_replacement must be two shares (mask id, random id), got {self.word_replacement!r}")
        for i, share in enumerate(replacement):
            check_fraction(f"InputSpec.word_replacement[{i}]", share, low_open=False)
        if sum(replacement) > 1 + 1e-9:
            raise ValueError(f"InputSpec.word_replacement shares must add up to at most 1, got {replacement}")
        object.__setattr__(self, "word_replacement", replacement)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, patch_size: int = 32, **overrides: Any) -> InputSpec:
        """The spec of a tokenizer's ids: ``mask_token_id`` (None where it has none), ``vocab_size`` and
        ``all_special_ids`` plus ``pad_token_id`` (transformers tokenizers; open_clip's ``SimpleTokenizer``,
        which pads with 0, gets 0 as well). Keyword overrides set any other field."""
        if not hasattr(tokenizer, "all_special_ids"):
            raise TypeError(
                f"tokenizer must be a transformers or open_clip tokenizer (with all_special_ids), got {type(tokenizer).__name__}; "
                "build masksd.InputSpec(mask_token_id=..., vocab_size=..., special_token_ids=...) by hand"
            )
        special = set(tokenizer.all_special_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None and hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "eot_token_id"):
            pad = 0  # open_clip's SimpleTokenizer pads with id 0 (also "!": never masked then)
        if pad is not None:
            special.add(pad)
        values = dict(
            patch_size=patch_size,
            mask_token_id=getattr(tokenizer, "mask_token_id", None),
            vocab_size=getattr(tokenizer, "vocab_size", None),
            special_token_ids=tuple(special),
        )
        return cls(**{**values, **overrides})

    # -- pixels
    def find_pixels(self, images: Any) -> torch.Tensor | None:
        """The (B, C, H, W) float pixels in ``images`` (a tensor, or a mapping's ``image_key``), or None."""
        pixels = images.get(self.image_key) if isinstance(images, Mapping) else images
        return pixels if torch.is_tensor(pixels) and pixels.dim() == 4 and pixels.is_floating_point() else None

    def pixels(self, images: Any) -> torch.Tensor:
        """:meth:`find_pixels`, or a ValueError saying what was expected."""
        pixels = self.find_pixels(images)
        if pixels is None:
            raise ValueError(
                f"images must be a (B, C, H, W) float tensor or a mapping with one under {self.image_key!r} "
                f"(InputSpec.image_key) for site='input', got {_describe(images)}"
            )
        return pixels

    def with_pixels(self, images: Any, pixels: torch.Tensor) -> Any:
        """``images`` with its pixels replaced by ``pixels`` (a tensor, or a shallow copy of the mapping)."""
        return pixels if torch.is_tensor(images) else _with_entry(images, self.image_key, pixels)

    # -- token ids
    def find_ids(self, texts: Any) -> torch.Tensor | None:
        """The (B, L) integer token ids in ``texts`` (a tensor, or a mapping's ``text_key``), or None."""
        ids = texts.get(self.text_key) if isinstance(texts, Mapping) else texts
        return ids if torch.is_tensor(ids) and ids.dim() == 2 and not ids.is_floating_point() and ids.dtype != torch.bool else None

    def ids(self, texts: Any) -> torch.Tensor:
        """:meth:`find_ids`, or a ValueError saying what was expected."""
        ids = self.find_ids(texts)
        if ids is None:
            raise ValueError(
                f"texts must be a (B, L) integer tensor of token ids or a mapping with one under {self.text_key!r} "
                f"(InputSpec.text_key) for vmlsd.site='input', got {_describe(texts)}"
            )
        return ids

    def with_ids(self, texts: Any, ids: torch.Tensor) -> Any:
        """``texts`` with its token ids replaced by ``ids`` (a tensor, or a shallow copy of the mapping)."""
        return ids if torch.is_tensor(texts) else _with_entry(texts, self.text_key, ids)

    def word_candidates(self, texts: Any) -> torch.Tensor:
        """(B, L) bool: the words that may be masked: neither a special id nor padding (``attention_key`` == 0)."""
        ids = self.ids(texts)
        words = torch.ones_like(ids, dtype=torch.bool)
        for special in self.special_token_ids:  # Python ints: no tensor of them copied to the device in every step
            words &= ids != special
        attention = texts.get(self.attention_key) if isinstance(texts, Mapping) else None
        if torch.is_tensor(attention):
            if attention.shape != ids.shape:
                raise ValueError(f"texts[{self.attention_key!r}] has shape {tuple(attention.shape)}, expected {tuple(ids.shape)}")
            words = words & attention.bool()
        return words


def _with_entry(mapping: Mapping, key: str, value: torch.Tensor) -> Any:
    updated = copy.copy(mapping)  # a BatchEncoding stays one
    updated[key] = value
    return updated


def _describe(x: Any) -> str:
    if torch.is_tensor(x):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, Mapping):
        return f"a mapping with keys {sorted(map(str, x))}"
    return type(x).__name__
