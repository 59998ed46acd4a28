"""What every CLIP-style integration shares: the contexts its encoders return,
:class:`TowerSegmenter`, which makes a segmenter from a pair of towers and the user's decode head, and
:class:`DecoderHead`, which makes a model's own decoder a decode head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from masksd.adapter import Embeddings, Features, SegmenterAdapter, check_decode_head, check_head_logits

__all__ = ["DecoderHead", "ImageContext", "TextContext", "Towers", "TowerSegmenter"]


class ImageContext(NamedTuple):
    """``Features.context`` of a tower's ``encode_image``."""

    levels: tuple[torch.Tensor, ...]
    """(B, C, h, w) outputs of the requested encoder blocks (a ViT's, class token dropped) or residual
    stages (a ResNet's), in the order asked."""
    grid: tuple[int, int]
    """(h, w) of ``Features.tokens``: a ViT's patch grid, a ResNet's C5 grid."""


class TextContext(NamedTuple):
    """``Features.context`` of a tower's ``encode_text``."""

    words: torch.Tensor
    """(B, L, D) word features in the joint space (the same tensor as ``Features.tokens``)."""
    padding: torch.Tensor
    """(B, L) bool, True after the end-of-text token (or where the attention mask is 0): the
    positions a decoder must not attend to."""


class DecoderHead(nn.Module):
    """A model's own decoder as MaskSD's decode head: ``head(visual, text) == decoder(*inputs(visual, text))``.

    Args:
        decoder: the ``nn.Module`` that turns the model's features into (B, 1, h, w) mask logits, with its own
            signature (CRIS's neck, decoder and projector; LAVT's decoder).
        inputs: a function of (visual: Features, text: Features) returning the decoder's positional arguments
            as a tuple, e.g. ``lambda visual, text: (visual.context.levels, text.pooled)``. It must read only its
            arguments: with ``share_weights=False`` MaskSD copies the head per branch, each copy calling its own
            decoder through the same function. (A lambda cannot be pickled; define a function to save whole modules.)
    """

    def __init__(self, decoder: nn.Module, inputs: Callable[[Features, Features], tuple[Any, ...]]):
        super().__init__()
        if not isinstance(decoder, nn.Module):
            raise TypeError(f"decoder must be an nn.Module (the model's own decoder), got {type(decoder).__name__}")
        if not callable(inputs):
            raise TypeError(f"inputs must be a function of (visual, text) returning the decoder's arguments, got {type(inputs).__name__}")
        self.decoder, self.inputs = decoder, inputs

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        arguments = self.inputs(visual, text)
        if not isinstance(arguments, tuple):
            raise TypeError(f"DecoderHead's inputs(visual, text) must return a tuple of the decoder's arguments, got {type(arguments).__name__}")
        return check_head_logits(self.decoder(*arguments))


@runtime_checkable
class Towers(Protocol):
    """The image and text towers of a CLIP-style model, split at the patch and token embeddings.

    ``encode_image(embed_image(images))`` gives :class:`~masksd.Features` whose ``pooled`` equals the
    library's own image features and whose ``tokens`` are the patch tokens in the same joint space;
    ``encode_text(embed_text(texts))`` the same for text. Integrations: :class:`OpenCLIPTowers`,
    :class:`HFCLIPTowers`.
    """

    image_embed_dim: int
    text_embed_dim: int
    special_token_ids: frozenset[int]

    def embed_image(self, images: Any) -> Embeddings: ...

    def encode_image(self, embedded: Embeddings) -> Features: ...

    def embed_text(self, texts: Any) -> Embeddings: ...

    def encode_text(self, embedded: Embeddings) -> Features: ...


class TowerSegmenter(SegmenterAdapter):
    """A :class:`~masksd.SegmenterAdapter` from CLIP towers and the user's decode head.

    ``decode_head(visual: Features, text: Features)`` must return (B, 1, h, w) mask logits;
    ``visual.context`` is an :class:`ImageContext`, ``text.context`` a :class:`TextContext`.
    ``segmenter(images, texts)`` takes what the towers take (images (B, 3, H, W); token ids or the
    tokenizer's mapping).
    """

    def __init__(self, towers: nn.Module, decode_head: nn.Module):
        super().__init__()
        if not isinstance(towers, nn.Module) or not isinstance(towers, Towers):
            raise TypeError(
                f"towers must be an nn.Module with embed_image/encode_image/embed_text/encode_text and the embed dims "
                f"(e.g. masksd.integrations.OpenCLIPTowers), got {type(towers).__name__}"
            )
        check_decode_head(decode_head)
        self.towers = towers
        self.decode_head = decode_head
        self.image_embed_dim = towers.image_embed_dim
        self.text_embed_dim = towers.text_embed_dim
        self.special_token_ids = towers.special_token_ids

    def embed_image(self, images: Any) -> Embeddings:
        return self.towers.embed_image(images)

    def encode_image(self, embedded: Embeddings) -> Features:
        return self.towers.encode_image(embedded)

    def embed_text(self, texts: Any) -> Embeddings:
        return self.towers.embed_text(texts)

    def encode_text(self, embedded: Embeddings) -> Features:
        return self.towers.encode_text(embedded)

    def check_inputs(self, images: Any, texts: Any) -> None:
        """The towers' value checks (``MaskSD.check_inputs`` calls this), where they have any."""
        check = getattr(self.towers, "check_inputs", None)
        if callable(check):
            check(images, texts)

    def forward(self, images: Any, texts: Any) -> torch.Tensor:
        """Mask logits (B, 1, h, w), checked against the decode-head contract."""
        return check_head_logits(super().forward(images, texts))
