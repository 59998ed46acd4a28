"""The protocol a segmenter implements so that MaskSD can wrap it.

MaskSD needs to reach inside a segmenter at four points: the token embeddings
(to mask them), the two encoders (to re-run them on masked embeddings), and
the decode head (to decode the masked branches). A segmenter exposes them by
implementing :class:`MaskableSegmenter`; subclassing :class:`SegmenterAdapter`
gives the inference ``forward`` for free, so that the wrapped model's eval
output is the segmenter's own by construction.

    images --embed_image--> Embeddings --encode_image--> Features (visual) --+
                                                                             +--> decode_head --> (B, 1, h, w)
    texts  --embed_text---> Embeddings --encode_text---> Features (text) ----+

A model whose encoders read each other (LAVT fuses words into each Swin stage, ETRIS bridges its two CLIP
towers) implements one ``encode`` instead of the two (:class:`FusedSegmenter`): MaskSD then re-runs it for each
branch with exactly one modality masked.

    (image Embeddings, text Embeddings) --encode--> (Features (visual), Features (text)) --> decode_head

Optionally (for LMVSD at ``site="features"``) the decode head splits in two around the visual maps
it reads, and the segmenter says where those maps are (:class:`FeatureMapHead`,
:class:`FeatureMapLayout`):

    decode_head(visual, text) == decode_head.decode_maps(decode_head.feature_maps(visual), visual, text)

At ``site="input"`` (MaskRIS's) no part of this protocol is needed: MaskSD masks pixels and word ids and
re-runs the model's own ``forward(images, texts)`` (:class:`masksd.InputSpec`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Embeddings", "FeatureMapHead", "FeatureMapLayout", "Features", "FusedSegmenter", "MaskableSegmenter", "SegmenterAdapter",
    "check_decode_head", "check_embeddings", "check_feature_maps", "check_features", "check_grid", "check_head_logits",
    "is_fused", "missing_feature_maps", "missing_protocol",
]

Grid = tuple[int, int]


@dataclass
class Embeddings:
    """A token sequence at the embedding level: after the patch or word embedding,
    before position embedding, which is where MaskSD puts its mask token."""

    tokens: torch.Tensor
    """(B, N, C) float embeddings."""
    candidates: torch.Tensor | None = None
    """(B, N) bool, True where a token may be selected and masked (real words; not
    padding, SOT or EOT). None means every token is a candidate (image patches)."""
    context: Any = None
    """Whatever the encoder needs besides the tokens (token ids, padding mask).
    MaskSD passes it through untouched."""
    grid: Grid | None = None
    """(h, w) when ``tokens`` are image positions in row-major order (N == h·w). Needed by
    LMVSD's ``guidance="prediction"`` and by features or relevance on a coarser grid."""


@dataclass
class Features:
    """An encoder's output."""

    tokens: torch.Tensor | None
    """(B, N, D) local tokens (patches or words) in the joint image-text space, aligned one to one with the
    :class:`Embeddings` tokens they came from, or, for image features on a coarser grid (a CNN's C5 map read at
    its stem's tokens), (B, h'·w', D) on ``grid``. Used only for the correlation that guides masking
    (``guidance="joint"`` with K < 1); None for a model without a joint space."""
    pooled: torch.Tensor | None
    """(B, D) global token in the joint space (image [class] token, sentence EOT token). Guides the other
    modality's masking (``guidance="joint"``); the decode head may use it too. None where there is none."""
    context: Any = None
    """Whatever the decode head needs (multi-level feature maps, word features,
    padding masks). MaskSD passes it through untouched."""
    grid: Grid | None = None
    """(h', w') of ``tokens`` when they lie on another grid than the embeddings' (then both grids are
    declared and h' divides h, w' divides w: each coarse cell's score spreads to the tokens it covers)."""


@runtime_checkable
class MaskableSegmenter(Protocol):
    """What MaskSD requires of a segmenter (an ``nn.Module``).

    The composition ``decode_head(encode_image(embed_image(x)), encode_text(embed_text(t)))``
    must equal ``forward(x, t)``; :class:`SegmenterAdapter` provides that ``forward``.
    """

    image_embed_dim: int
    """C of ``embed_image(...).tokens``: the size of the LMVSD mask token."""
    text_embed_dim: int
    """C of ``embed_text(...).tokens``: the size of the VMLSD mask token."""
    decode_head: nn.Module
    """Called as ``decode_head(visual: Features, text: Features)`` and returns mask
    logits (B, 1, h, w). With ``share_weights=False`` MaskSD deep-copies it for each
    distillation branch, so it must hold every parameter the decoding uses."""

    def embed_image(self, images: Any) -> Embeddings: ...

    def encode_image(self, embedded: Embeddings) -> Features: ...

    def embed_text(self, texts: Any) -> Embeddings: ...

    def encode_text(self, embedded: Embeddings) -> Features: ...

    def __call__(self, images: Any, texts: Any) -> torch.Tensor: ...


@runtime_checkable
class FusedSegmenter(Protocol):
    """What MaskSD requires of a segmenter whose encoders read each other (LAVT, CARIS, ETRIS): one ``encode``
    of both modalities instead of ``encode_image`` and ``encode_text``. MaskSD calls ``encode(ie, te)`` for the
    main pass, ``encode(masked ie, te)`` for LMVSD and ``encode(ie, masked te)`` for VMLSD, so no branch sees
    the unmasked form of what it masks. ``decode_head(*encode(embed_image(x), embed_text(t)))`` must equal
    ``forward(x, t)`` (:class:`SegmenterAdapter` provides that ``forward``)."""

    image_embed_dim: int
    text_embed_dim: int
    decode_head: nn.Module

    def embed_image(self, images: Any) -> Embeddings: ...

    def embed_text(self, texts: Any) -> Embeddings: ...

    def encode(self, image_embedded: Embeddings, text_embedded: Embeddings) -> tuple[Features, Features]: ...

    def __call__(self, images: Any, texts: Any) -> torch.Tensor: ...


def is_fused(segmenter: object) -> bool:
    """True when ``segmenter`` encodes both modalities in one ``encode`` (:class:`FusedSegmenter`): a
    :class:`SegmenterAdapter` subclass that overrides ``encode``, or another module with ``encode`` and
    without ``encode_image``/``encode_text``."""
    if isinstance(segmenter, SegmenterAdapter):
        return type(segmenter).encode is not SegmenterAdapter.encode
    return callable(getattr(segmenter, "encode", None)) and not (
        hasattr(segmenter, "encode_image") or hasattr(segmenter, "encode_text")
    )


def missing_protocol(segmenter: object) -> list[str]:
    """The members of :class:`MaskableSegmenter` (or, for a fused segmenter, :class:`FusedSegmenter`) that
    ``segmenter`` lacks; empty when it implements the protocol."""
    required = ["image_embed_dim", "text_embed_dim", "decode_head", "embed_image", "embed_text"]
    required += ["encode"] if is_fused(segmenter) else ["encode_image", "encode_text"]
    return [name for name in required if not hasattr(segmenter, name)]


class FeatureMapLayout(NamedTuple):
    """Where a segmenter's decode head reads its visual maps: ``segmenter.feature_map_layout``."""

    grid: tuple[int, int]
    """(h, w) of the image token grid: the (B, N) patch tokens of ``embed_image`` in row-major order."""
    shapes: tuple[tuple[int, int, int], ...]
    """(C, h, w) of each map ``decode_head.feature_maps`` returns, in its order (batch dim left out)."""


@runtime_checkable
class FeatureMapHead(Protocol):
    """The optional part of the protocol that LMVSD's ``site="features"`` needs: a decode head split
    around the visual maps it reads, and, on the segmenter, ``feature_map_layout`` (a
    :class:`FeatureMapLayout`). ``decode_maps(feature_maps(visual), visual, text)`` must equal
    ``decode_head(visual, text)``."""

    def feature_maps(self, visual: Features) -> tuple[torch.Tensor, ...]:
        """The (B, C, h, w) maps, shaped as the layout says, that the rest of the head decodes."""
        ...

    def decode_maps(self, maps: Sequence[torch.Tensor], visual: Features, text: Features) -> torch.Tensor:
        """(B, 1, h, w) mask logits from those maps (possibly replaced at some positions) and the features."""
        ...


def missing_feature_maps(segmenter: nn.Module) -> list[str]:
    """What ``segmenter`` lacks of :class:`FeatureMapHead` (empty when it implements it)."""
    missing = []
    layout = getattr(segmenter, "feature_map_layout", None)
    if not isinstance(layout, FeatureMapLayout):
        missing.append("feature_map_layout (a masksd.adapter.FeatureMapLayout)")
    head = getattr(segmenter, "decode_head", None)
    missing += [f"decode_head.{name}" for name in ("feature_maps", "decode_maps") if not callable(getattr(head, name, None))]
    return missing


def check_feature_maps(maps: object, layout: FeatureMapLayout, batch: int, source: str) -> tuple[torch.Tensor, ...]:
    """Return ``maps`` as a tuple if it holds one (batch, C, h, w) float tensor per ``layout.shapes`` entry,
    else raise a ValueError naming ``source`` (shapes only: no value is read)."""
    expected = tuple((batch, *shape) for shape in layout.shapes)
    if isinstance(maps, (list, tuple)) and all(torch.is_tensor(m) and m.is_floating_point() for m in maps):
        if tuple(tuple(m.shape) for m in maps) == expected:
            return tuple(maps)
        got = [tuple(m.shape) for m in maps]
    else:
        got = type(maps).__name__
    raise ValueError(f"{source} must return float maps of shapes {list(expected)} (its segmenter's feature_map_layout), got {got}")


class SegmenterAdapter(nn.Module):
    """Base class for segmenters that MaskSD wraps: implement the four
    embed/encode methods (or, for encoders that read each other, ``embed_image``,
    ``embed_text`` and ``encode``), set ``decode_head``, ``image_embed_dim`` and
    ``text_embed_dim``, and inherit the inference ``forward``."""

    image_embed_dim: int
    text_embed_dim: int
    decode_head: nn.Module

    def embed_image(self, images: Any) -> Embeddings:
        raise NotImplementedError

    def encode_image(self, embedded: Embeddings) -> Features:
        raise NotImplementedError

    def embed_text(self, texts: Any) -> Embeddings:
        raise NotImplementedError

    def encode_text(self, embedded: Embeddings) -> Features:
        raise NotImplementedError

    def encode(self, image_embedded: Embeddings, text_embedded: Embeddings) -> tuple[Features, Features]:
        """(visual, text) features. Independent towers: ``(encode_image(ie), encode_text(te))``; override it
        (and leave the two alone) for encoders that read each other (:class:`FusedSegmenter`)."""
        return self.encode_image(image_embedded), self.encode_text(text_embedded)

    def forward(self, images: Any, texts: Any) -> torch.Tensor:
        """Mask logits (B, 1, h, w) for a batch of images and referring texts."""
        return self.decode_head(*self.encode(self.embed_image(images), self.embed_text(texts)))


def check_embeddings(embedded: Embeddings, dim: int, source: str) -> None:
    """Raise a ValueError/TypeError naming ``source`` if ``embedded`` is not
    (B, N, dim) float tokens with an optional (B, N) bool candidate mask."""
    if not isinstance(embedded, Embeddings):
        raise TypeError(f"{source} must return masksd.Embeddings, got {type(embedded).__name__}")
    tokens = embedded.tokens
    if not torch.is_tensor(tokens) or tokens.dim() != 3 or not tokens.is_floating_point():
        raise ValueError(f"{source} must return float tokens of shape (B, N, C), got {describe(tokens)}")
    if tokens.shape[-1] != dim:
        raise ValueError(f"{source} returned tokens with C={tokens.shape[-1]}, expected the declared embed dim {dim}")
    candidates = embedded.candidates
    if candidates is not None:
        if not torch.is_tensor(candidates) or candidates.dtype != torch.bool:
            raise TypeError(f"{source} candidates must be a bool tensor (B, N), got {describe(candidates)}")
        if candidates.shape != tokens.shape[:2]:
            raise ValueError(
                f"{source} candidates have shape {tuple(candidates.shape)}, expected {tuple(tokens.shape[:2])}"
            )
    if embedded.grid is not None:
        height, width = check_grid(f"{source} grid", embedded.grid)
        if height * width != tokens.shape[1]:
            raise ValueError(f"{source} grid {(height, width)} has {height * width} positions for N={tokens.shape[1]} tokens")


def check_grid(name: str, grid: object) -> Grid:
    """Return ``grid`` as (h, w) if it is two positive ints, else raise a ValueError naming ``name``."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid)
    ):
        raise ValueError(f"{name} must be (h, w) of two positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_tiling(name: str, coarse: object, fine: object, source: str) -> tuple[Grid, Grid]:
    """Both grids checked, and ``coarse`` (h', w') tiling ``fine`` (h, w): h % h' == 0 and w % w' == 0.
    Errors name ``name`` and ``source``."""
    if coarse is None or fine is None:
        raise ValueError(
            f"{source} gives {name} on another grid than the image embeddings: declare both grids (Features.grid "
            f"and Embeddings.grid, (h, w) in row-major order), got Features.grid={coarse!r}, Embeddings.grid={fine!r}"
        )
    coarse, fine = check_grid(f"{source} {name} grid", coarse), check_grid(f"{source} embeddings grid", fine)
    if fine[0] % coarse[0] or fine[1] % coarse[1]:
        raise ValueError(f"{source} {name} grid {coarse} does not tile the embeddings' grid {fine} (h % h' and w % w' must be 0)")
    return coarse, fine


def check_features(features: Features, embedded: Embeddings | torch.Tensor, source: str) -> None:
    """Raise a ValueError naming ``source`` unless ``features`` has (B, N, D) local tokens aligned with the
    (B, N, C) embeddings ``embedded`` (or on a declared coarser grid that tiles theirs) and a (B, D) pooled
    token; either may be None (a model without a joint space)."""
    if not isinstance(features, Features):
        raise TypeError(f"{source} must return masksd.Features, got {type(features).__name__}")
    tokens_like = embedded.tokens if isinstance(embedded, Embeddings) else embedded
    local, pooled = features.tokens, features.pooled
    batch = tokens_like.shape[0]
    if local is not None:
        if not torch.is_tensor(local) or local.dim() != 3 or local.shape[0] != batch:
            raise ValueError(
                f"{source} must return local tokens (B, N, D) aligned with its input embeddings "
                f"(B, N)={tuple(tokens_like.shape[:2])} (or None), got {describe(local)}"
            )
        if local.shape[1] != tokens_like.shape[1] or features.grid is not None:
            fine = embedded.grid if isinstance(embedded, Embeddings) else None
            coarse, _ = check_tiling("tokens", features.grid, fine, source)
            if coarse[0] * coarse[1] != local.shape[1]:
                raise ValueError(f"{source} Features.grid {coarse} has {coarse[0] * coarse[1]} positions for {local.shape[1]} tokens")
    if pooled is not None:
        dim = local.shape[2] if local is not None else (pooled.shape[-1] if torch.is_tensor(pooled) else None)
        if not torch.is_tensor(pooled) or pooled.shape != (batch, dim):
            raise ValueError(f"{source} must return a pooled token of shape (B, D)={(batch, dim)} (or None), got {describe(pooled)}")


def check_decode_head(head: object, source: str = "decode_head") -> None:
    """Raise a TypeError naming ``source`` unless ``head`` is an nn.Module callable as ``head(visual, text)``."""
    contract = f"{source} must be an nn.Module called as {source}(visual: masksd.Features, text: masksd.Features) -> (B, 1, h, w) logits"
    if not isinstance(head, nn.Module):
        raise TypeError(f"{contract}; got {type(head).__name__}")
    try:
        inspect.signature(head.forward).bind(None, None)
    except TypeError as error:
        raise TypeError(f"{contract}; its forward{inspect.signature(head.forward)} cannot take those two ({error})") from None
    except ValueError:  # a builtin without a signature: nothing to check before the first call
        pass


def check_head_logits(logits: object, source: str = "decode_head", batch: int | None = None) -> torch.Tensor:
    """Return ``logits`` if it is a float (B, 1, h, w) tensor, else raise a ValueError naming ``source``
    and the contract. A (B, h, w) map is refused rather than guessed at: add the channel with ``unsqueeze(1)``."""
    expected = f"{source} must return float mask logits of shape (B, 1, h, w)"
    if not torch.is_tensor(logits):
        raise ValueError(f"{expected}, got {type(logits).__name__}")
    if logits.dim() == 3:
        raise ValueError(f"{expected}, got shape {tuple(logits.shape)}: for one channel, return logits.unsqueeze(1)")
    if logits.dim() != 4 or logits.shape[1] != 1 or not logits.is_floating_point():
        raise ValueError(f"{expected}, got shape {tuple(logits.shape)} and dtype {logits.dtype}")
    if batch is not None and logits.shape[0] != batch:
        raise ValueError(f"{expected} with B={batch}, got shape {tuple(logits.shape)}")
    return logits


def describe(x: Any) -> str:
    """A value in an error message: a tensor by its shape and dtype, anything else by its type."""
    if torch.is_tensor(x):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
