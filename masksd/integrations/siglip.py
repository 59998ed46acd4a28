"""HFSiglipTowers: a transformers ``SiglipModel`` split at the patch and token embeddings.

The sibling of :class:`~masksd.integrations.HFCLIPTowers` for SigLIP, which differs from CLIP where
MaskSD reads it: no class token, images pooled by an attention-pooling head (a learned probe
attending over the patches, then a residual MLP: "MAP"), text pooled at the last position (whatever
token is there: SigLIP is tokenized to ``padding="max_length"``) through a linear head, a
bidirectional text encoder. As for CLIP, the module holds the model's own submodules under the
model's own names and calls them in the library's order, so that

    encode_image(embed_image(pixel_values)).pooled == model.get_image_features(pixel_values).pooler_output
    encode_text(embed_text(texts)).pooled == model.get_text_features(**texts).pooler_output

hold bit for bit (``torch.equal``).

**The per-token reading.** CLIP's patch tokens go through the same ``ln_post`` and ``proj`` as its
class token, so each lies in the joint space. SigLIP's pooled image feature is not a per-patch map:
the MAP head mixes the patches by attention before its MLP. ``Features.tokens`` of an image are
therefore the head's *value path* at each patch: ``v_i = out_proj(W_v x_i + b_v)``, then the head's
own residual MLP, ``t_i = v_i + mlp(layernorm(v_i))``; this is exactly the pooled feature the head
would give if its probe attended to patch i alone (the pooled feature is the same map applied to
the attention-weighted mix of the ``v_i``). Text tokens are each position's final state through the
text head, the map the pooled last position takes (as CLIP's words go through ``text_projection``).
Both are in the pooled features' space, but no loss trained them per token: guidance ``"joint"`` is
computable, and how well it ranks patches on a pretrained SigLIP is not measured here; guidance
``"prediction"`` (the model's own predicted mask) and K = 1 assume nothing about the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from masksd.adapter import Embeddings, Features
from masksd.integrations.hfclip import (
    TokenInputs, check_layers, check_pixel_values, check_vocabulary, mask_helper, read_token_inputs, require_transformers,
    resolve_interpolation,
)
from masksd.integrations.towers import ImageContext, TextContext

__all__ = ["HFSiglipTowers"]


class HFSiglipTowers(nn.Module):
    """The image and text towers of a transformers ``SiglipModel``, split for MaskSD.

    Args:
        model: a ``transformers.SiglipModel`` whose vision model has its pooling head (``vision_use_head``).
        layers: 0-based vision encoder layers whose outputs :meth:`encode_image` returns in
            ``ImageContext.levels`` (B, Cv, h, w), in the order given.
        tokenizer: the model's tokenizer (or processor): its ``all_special_ids`` are never candidates and
            its ``pad_token_id`` marks where a text ends (SigLIP pads with its end-of-text token).
        special_token_ids: instead of ``tokenizer``, the ids that are never candidates (the text then ends
            at the config's ``pad_token_id``).
        interpolate_pos_encoding: as the library's argument; None takes ``get_image_features``' default.

    Text candidates are the real words: not a special id, before the text's end (the first pad id;
    never the last position, which the model pools), and where the attention mask, if given, is 1.
    ``TextContext.padding`` marks the positions after that end (or where the mask is 0): what a decoder
    should skip, though SigLIP's own encoder, tokenized without an attention mask, attends to them.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] = (),
        *,
        tokenizer: Any = None,
        special_token_ids: Iterable[int] | None = None,
        interpolate_pos_encoding: bool | None = None,
    ):
        super().__init__()
        transformers = require_transformers()
        if not isinstance(model, transformers.SiglipModel):
            raise TypeError(f"model must be a transformers SiglipModel (with both towers), got {type(model).__name__}")
        if not getattr(model.vision_model, "use_head", False):
            raise ValueError(
                "model's vision model has no pooling head (vision_use_head=False): it gives no pooled image feature to match"
            )
        self.vision_model = model.vision_model
        self.text_model = model.text_model
        self.layers = check_layers(layers, len(self.vision_model.encoder.layers), "layers")
        self.interpolate_pos_encoding = resolve_interpolation(interpolate_pos_encoding, model.get_image_features)

        text_config = self.text_model.config
        self.special_token_ids, self.pad_token_id = _special_ids(text_config, tokenizer, special_token_ids)
        self.register_buffer("_special", torch.tensor(sorted(self.special_token_ids), dtype=torch.long), persistent=False)
        self._create_mask = mask_helper(self.text_model, "create_bidirectional_mask")

        self.image_embed_dim = int(self.vision_model.config.hidden_size)
        self.text_embed_dim = int(text_config.hidden_size)
        self.embed_dim = int(self.text_model.head.out_features)  # D, the joint space
        if self.embed_dim != self.image_embed_dim:
            raise ValueError(
                f"model's text head projects to {self.embed_dim} but its image features have {self.image_embed_dim}: "
                f"not a SigLIP joint space"
            )
        self.image_size = int(self.vision_model.config.image_size)
        self.max_length = int(self.text_model.embeddings.position_embedding.num_embeddings)

    # -- image ----------------------------------------------------------------------------------

    def embed_image(self, pixel_values: torch.Tensor) -> Embeddings:
        """(B, 3, H, W) float pixel values -> Embeddings: (B, N, Cv) patch embeddings before the position
        embedding, on ``grid``; every patch a candidate; context = the pixel size (H, W)."""
        embeddings = self.vision_model.embeddings
        size = check_pixel_values(pixel_values, embeddings.patch_embedding.in_channels, self.image_size, self.interpolate_pos_encoding)
        patches = embeddings.patch_embedding(pixel_values.to(dtype=embeddings.patch_embedding.weight.dtype))  # (B, Cv, h, w)
        grid = (int(patches.shape[2]), int(patches.shape[3]))
        return Embeddings(rearrange(patches, "b c h w -> b (h w) c"), candidates=None, context=size, grid=grid)  # (B, N, Cv)

    def encode_image(self, embedded: Embeddings) -> Features:
        """Patch embeddings -> Features: pooled (B, D) the MAP head's output (equals
        ``model.get_image_features``'s), tokens (B, N, D) the head's value path at each patch (module
        docstring), context = :class:`ImageContext` with the requested layers' outputs (B, Cv, h, w)."""
        vision, embeddings = self.vision_model, self.vision_model.embeddings
        x = embedded.tokens  # (B, N, Cv)
        if self.interpolate_pos_encoding:
            x = x + embeddings.interpolate_pos_encoding(x, *embedded.context)
        else:
            x = x + embeddings.position_embedding(embeddings.position_ids)
        levels = {}
        for index, layer in enumerate(vision.encoder.layers):
            x = layer(x, None)  # as SiglipEncoder.forward calls it for images: no attention mask
            if index in self.layers:
                levels[index] = rearrange(x, "b (h w) c -> b c h w", h=embedded.grid[0])
        x = vision.post_layernorm(x)  # (B, N, Cv)
        pooled = vision.head(x)  # (B, D)
        context = ImageContext(tuple(levels[i] for i in self.layers), embedded.grid)
        return Features(tokens=self.head_value_path(x), pooled=pooled, context=context)

    def head_value_path(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, Cv) normed patch states -> (B, N, D): what the MAP head would pool if its probe attended
        to each patch alone (value and output projections, then the head's residual MLP)."""
        head = self.vision_model.head
        attention, width = head.attention, x.shape[-1]
        values = F.linear(x, attention.in_proj_weight[2 * width :], attention.in_proj_bias[2 * width :])  # (B, N, Cv)
        values = attention.out_proj(values)  # (B, N, D)
        return values + head.mlp(head.layernorm(values))

    # -- text -----------------------------------------------------------------------------------

    def embed_text(self, texts: Mapping[str, torch.Tensor]) -> Embeddings:
        """The tokenizer's mapping (``input_ids`` (B, L), optional ``attention_mask``/``position_ids``) ->
        Embeddings: (B, L, Ct) token embeddings before the position embedding; candidates (B, L) True at
        real words only; context = :class:`~masksd.integrations.hfclip.TokenInputs` (its ``eos`` the
        position where each text ends, not the pooled one: SigLIP pools the last position)."""
        input_ids, attention_mask, position_ids = read_token_inputs(texts, self.max_length)
        tokens = self.text_model.embeddings.token_embedding(input_ids)  # (B, L, Ct)
        end = self.text_end(input_ids)  # (B,)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        candidates = (positions[None, :] < end[:, None]) & ~torch.isin(input_ids, self._special.to(input_ids.device))
        if attention_mask is not None:
            candidates = candidates & attention_mask.bool()
        return Embeddings(tokens=tokens, candidates=candidates, context=TokenInputs(input_ids, attention_mask, position_ids, end))

    def encode_text(self, embedded: Embeddings) -> Features:
        """Token embeddings -> Features: pooled (B, D) the last position through the text head (equals
        ``model.get_text_features(**texts)``'s), tokens (B, L, D) every position through that head,
        context = :class:`TextContext`."""
        inputs = embedded.context
        if not isinstance(inputs, TokenInputs):
            raise TypeError(f"embedded must come from embed_text (its context a TokenInputs), got context {type(inputs).__name__}")
        text = self.text_model
        hidden = text.embeddings(inputs_embeds=embedded.tokens, position_ids=inputs.position_ids)  # (B, L, Ct)
        mask = self._create_mask(config=text.config, inputs_embeds=hidden, attention_mask=inputs.attention_mask)
        last = text.final_layer_norm(text.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state)  # (B, L, Ct)
        pooled = text.head(last[:, -1, :])  # (B, D), the library's own op order
        words = text.head(last)  # (B, L, D)
        positions = torch.arange(last.shape[1], device=last.device)
        padding = positions[None, :] > inputs.eos.to(last.device)[:, None]  # (B, L)
        if inputs.attention_mask is not None:
            padding = padding | ~inputs.attention_mask.to(last.device).bool()
        return Features(tokens=words, pooled=pooled, context=TextContext(words, padding))

    def text_end(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) the position of each text's first pad id (its end-of-text token), at most L - 1."""
        is_pad = input_ids == self.pad_token_id  # (B, L)
        last = torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        return torch.where(is_pad.any(dim=1), is_pad.int().argmax(dim=1), last)

    @torch.no_grad()
    def check_inputs(self, images: torch.Tensor, texts: Mapping[str, torch.Tensor]) -> None:
        """The value checks :meth:`embed_text` skips: every id in the vocabulary (a ValueError naming
        ``texts`` and the samples). ``MaskSD.check_inputs`` calls it."""
        self.embed_image(images)
        input_ids, _, _ = read_token_inputs(texts, self.max_length)
        check_vocabulary(input_ids, self.text_model.embeddings.token_embedding.num_embeddings)


def _special_ids(text_config: Any, tokenizer: Any, special_token_ids: Iterable[int] | None) -> tuple[frozenset[int], int]:
    """(the ids never masked, the pad id where a text ends) from ``special_token_ids``, else the tokenizer's
    ``all_special_ids``; the pad id from the tokenizer, else the config. SigLIP's configs carry CLIP's
    bos/eos ids (49406/49407, outside its vocabulary), so those are never read."""
    if special_token_ids is not None and tokenizer is not None:
        raise ValueError("pass tokenizer or special_token_ids, not both")
    if special_token_ids is None and tokenizer is None:
        raise ValueError(
            "pass the model's tokenizer (or special_token_ids): a SigLIP config's bos/eos ids are not its tokenizer's"
        )
    pad = text_config.pad_token_id
    if tokenizer is not None:
        source = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        special_token_ids = getattr(source, "all_special_ids", None)
        if not special_token_ids:
            raise TypeError(f"tokenizer must be a transformers tokenizer or processor (with all_special_ids), got {type(tokenizer).__name__}")
        pad = source.pad_token_id if getattr(source, "pad_token_id", None) is not None else pad
    if pad is None:
        raise ValueError("the text config has no pad_token_id and the tokenizer none: where a text ends is unknown")
    return frozenset(int(i) for i in special_token_ids) | {int(pad)}, int(pad)
