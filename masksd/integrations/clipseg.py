"""CLIPSegSegmenter: transformers ``CLIPSegForImageSegmentation`` as a segmenter MaskSD wraps.

CLIPSeg runs its CLIP under ``torch.no_grad`` and trains only its decoder. Here the CLIP towers run
through :class:`~masksd.integrations.HFCLIPTowers` with gradients enabled, so that MaskSD's mask
tokens (upstream of the encoders) learn, while CLIP's weights stay frozen (``requires_grad=False``)
as CLIPSeg keeps them. The decode head is the model's own decoder, fed the activations of
``model.extract_layers`` and the projected text embedding, as ``CLIPSegForImageSegmentation.forward``
feeds it; ``segmenter(pixel_values, texts)`` equals ``model(pixel_values=..., **texts).logits``
bit for bit, with the channel axis added: (B, 1, H, W).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from masksd.adapter import Embeddings, Features, SegmenterAdapter, check_head_logits
from masksd.integrations.hfclip import HFCLIPTowers, library_default, require_transformers

__all__ = ["CLIPSegDecodeHead", "CLIPSegImageContext", "CLIPSegSegmenter"]


class CLIPSegImageContext(NamedTuple):
    """``Features.context`` of :meth:`CLIPSegSegmenter.encode_image`."""

    activations: tuple[torch.Tensor, ...]
    """(B, 1 + N, Cv) outputs of the vision layers ``model.extract_layers``, class token first, in that
    order: what CLIPSeg's forward gives its decoder (``hidden_states[i + 1]``)."""
    grid: tuple[int, int]
    """(h, w) of the patch grid (square: the decoder reshapes to it)."""


class CLIPSegDecodeHead(nn.Module):
    """CLIPSeg's decoder as a masksd decode head: ``head(visual, text)`` -> (B, 1, H, W) logits.

    ``visual.context`` is a :class:`CLIPSegImageContext`; ``text.pooled`` (B, D) the projected text
    embedding (CLIPSeg's ``conditional_embeddings``). Holds ``decoder`` (the model's
    ``CLIPSegDecoder``), every parameter the decoding uses.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        context = visual.context
        if not isinstance(context, CLIPSegImageContext):
            raise TypeError(
                f"decode_head's visual.context must be a CLIPSegImageContext (from CLIPSegSegmenter.encode_image), "
                f"got {type(context).__name__}"
            )
        conditional = text.pooled  # (B, D)
        logits = self.decoder(list(context.activations), conditional).logits  # (B, H, W)
        return logits.reshape(conditional.shape[0], 1, *logits.shape[-2:])  # (B, 1, H, W), also if a squeeze took B=1


class CLIPSegSegmenter(SegmenterAdapter):
    """A ``CLIPSegForImageSegmentation`` as a :class:`~masksd.SegmenterAdapter`.

    Called as ``segmenter(pixel_values, texts)``: pixel_values (B, 3, H, W) (the processor's
    ``pixel_values``), texts the tokenizer's mapping (``input_ids``, ``attention_mask``) -> (B, 1, H, W)
    logits equal to ``model(pixel_values=..., input_ids=..., attention_mask=...).logits.unsqueeze(1)``.

    Args:
        model: a transformers ``CLIPSegForImageSegmentation``.
        freeze_clip: set ``requires_grad=False`` on ``model.clip`` (in place), as CLIPSeg trains only
            its decoder. With False, CLIP's weights train too (not CLIPSeg's recipe); its
            ``post_layernorm``, ``visual_projection``, ``logit_scale`` and the vision layers after the
            last extract layer then get no gradient (DDP needs ``find_unused_parameters``).
        tokenizer, special_token_ids: where the special token ids come from, as for
            :class:`~masksd.integrations.HFCLIPTowers` (a tokenizer is required for checkpoints with the
            legacy ``eos_token_id=2``, as ``CIDAS/clipseg-rd64-refined``).
        interpolate_pos_encoding: None takes ``CLIPSegForImageSegmentation.forward``'s default (True).

    Attributes: ``towers`` (HFCLIPTowers on ``model.clip``), ``decode_head`` (:class:`CLIPSegDecodeHead`
    holding ``model.decoder``), ``model`` (the wrapped model itself, its weights shared, not registered a
    second time: ``segmenter.model.save_pretrained(dir)`` exports the trained segmenter).
    """

    def __init__(
        self,
        model: nn.Module,
        freeze_clip: bool = True,
        *,
        tokenizer: Any = None,
        special_token_ids: Iterable[int] | None = None,
        interpolate_pos_encoding: bool | None = None,
    ):
        super().__init__()
        transformers = require_transformers()
        if not isinstance(model, transformers.CLIPSegForImageSegmentation):
            hint = (
                ": it has no decoder; wrap HFCLIPTowers(model) and your head in TowerSegmenter"
                if isinstance(model, transformers.CLIPSegModel)
                else ""
            )
            raise TypeError(f"model must be a transformers CLIPSegForImageSegmentation, got {type(model).__name__}{hint}")
        if not isinstance(freeze_clip, bool):
            raise TypeError(f"freeze_clip must be a bool, got {freeze_clip!r}")
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = library_default(model.forward, "interpolate_pos_encoding", True)
        self.towers = HFCLIPTowers(
            model.clip,
            tokenizer=tokenizer,
            special_token_ids=special_token_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        depth = len(model.clip.vision_model.encoder.layers)
        self.extract_layers = _check_extract_layers(model.extract_layers, depth)
        self.decode_head = CLIPSegDecodeHead(model.decoder)
        object.__setattr__(self, "model", model)  # a plain reference: its parts are registered above
        if freeze_clip:
            model.clip.requires_grad_(False)
        self.freeze_clip = freeze_clip
        self.image_embed_dim = self.towers.image_embed_dim
        self.text_embed_dim = self.towers.text_embed_dim
        self.special_token_ids = self.towers.special_token_ids

    def embed_image(self, pixel_values: torch.Tensor) -> Embeddings:
        """(B, 3, H, W) pixel values -> (B, N, Cv) patch embeddings (see :meth:`HFCLIPTowers.embed_image`);
        the patch grid must be square, since CLIPSeg's decoder reshapes its tokens to one."""
        embedded = self.towers.embed_image(pixel_values)
        grid = embedded.context.grid
        if grid[0] != grid[1]:
            raise ValueError(
                f"pixel_values of {tuple(pixel_values.shape[-2:])} px give a {grid[0]}x{grid[1]} patch grid; "
                f"CLIPSeg's decoder reshapes the patch tokens to a square grid: pass square images"
            )
        return embedded

    def encode_image(self, embedded: Embeddings) -> Features:
        """Patch embeddings -> Features: tokens (B, N, D), pooled (B, D) (as ``model.clip.get_image_features``),
        context = :class:`CLIPSegImageContext` (the extract layers' activations, class token included)."""
        activations, features = self.towers.run_vision(embedded, self.extract_layers)
        features.context = CLIPSegImageContext(tuple(activations), embedded.context.grid)
        return features

    def embed_text(self, texts: Mapping[str, torch.Tensor]) -> Embeddings:
        """The tokenizer's mapping -> (B, L, Ct) token embeddings, candidates the real words
        (see :meth:`HFCLIPTowers.embed_text`)."""
        return self.towers.embed_text(texts)

    def encode_text(self, embedded: Embeddings) -> Features:
        """Token embeddings -> Features: words (B, L, D), pooled (B, D) = CLIPSeg's conditional
        embeddings, context = :class:`~masksd.integrations.TextContext`."""
        return self.towers.encode_text(embedded)

    def forward(self, pixel_values: torch.Tensor, texts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, 1, H, W) mask logits for pixel values (B, 3, H, W) and the tokenizer's mapping: the
        composition of the four methods and the decode head, as :class:`~masksd.SegmenterAdapter`'s."""
        image, text = self.embed_image(pixel_values), self.embed_text(texts)
        batch = image.tokens.shape[0]
        if text.tokens.shape[0] != batch:  # CLIPSeg's FiLM would broadcast one text over every image
            raise ValueError(
                f"pixel_values and texts['input_ids'] must hold as many samples, got {batch} and {text.tokens.shape[0]}"
            )
        logits = self.decode_head(self.encode_image(image), self.encode_text(text))
        return check_head_logits(logits, batch=batch)

    @torch.no_grad()
    def check_inputs(self, pixel_values: torch.Tensor, texts: Mapping[str, torch.Tensor]) -> None:
        """The value checks a training step skips (see :meth:`HFCLIPTowers.check_inputs`); ``MaskSD.check_inputs`` calls it."""
        self.embed_image(pixel_values)
        self.towers.check_inputs(pixel_values, texts)


def _check_extract_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    resolved = tuple(int(i) for i in layers)
    if not resolved or any(not 0 <= i < depth for i in resolved):
        raise ValueError(
            f"model.extract_layers must be 0-based vision layer indices below the depth {depth}, got {resolved}"
        )
    return resolved
