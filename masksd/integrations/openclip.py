"""OpenCLIPTowers: an open_clip ``CLIP`` (or OpenAI CLIP's module layout) split at the embeddings.

open_clip's ``encode_image`` and ``encode_text`` each run embedding, position embedding, encoder,
final norm, pooling and projection in one call; MaskSD must put its mask token between the first
two steps. This module holds the model's own submodules under the model's own attribute names (so
its state dict is the model's, less ``logit_scale``) and runs the same steps in the same order, so
that ``encode_image(embed_image(x)).pooled`` equals ``clip.encode_image(x)`` and
``encode_text(embed_text(ids)).pooled`` equals ``clip.encode_text(ids)`` exactly.

Two layouts are read, by their attributes (open_clip itself is not imported):

- open_clip's ``CLIP`` with a ``VisionTransformer`` image tower (``text_pool_type``, ``attn_mask``
  on the model, ``batch_first`` transformers);
- OpenAI's CLIP layout, as vendored in CRIS.pytorch and ETRIS (the causal mask stored in each text
  block, sequence-first transformers, argmax pooling).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from masksd.adapter import Embeddings, Features, describe
from masksd.integrations.towers import ImageContext, TextContext

__all__ = ["OpenCLIPTowers", "special_ids_of"]

_VIT_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class OpenCLIPTowers(nn.Module):
    """The image and text towers of a CLIP, split at the patch and token embeddings for MaskSD.

    Args:
        clip: an open_clip ``CLIP`` with a ViT image tower (``open_clip.create_model("ViT-B-16", ...)``),
            or a module with OpenAI CLIP's attributes (``visual.conv1`` ... ``visual.proj``,
            ``token_embedding`` ... ``text_projection``).
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(name)``, or any object with
            ``all_special_ids``, ``sot_token_id``/``eot_token_id`` or an ``encoder`` dict holding
            ``<|startoftext|>``/``<|endoftext|>``): where the special token ids come from.
        layers: 0-based image blocks whose outputs :meth:`encode_image` returns in
            ``ImageContext.levels`` (e.g. ``(3, 7, 11)`` for CRIS's three levels of ViT-B).
        special_token_ids: instead of ``tokenizer``, the ids that are never words.

    Refuses (ValueError naming the reason) what it cannot split exactly: a non-ViT image tower
    (``ModifiedResNet``, timm), attention pooling, ``final_ln_after_pool``, patch dropout, a
    separate text tower (``CustomTextCLIP``), text pooling other than the end-of-text token.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any = None,
        layers: Sequence[int] = (),
        special_token_ids: Iterable[int] | None = None,
    ):
        super().__init__()
        if not isinstance(clip, nn.Module):
            raise TypeError(f"clip must be an nn.Module (an open_clip CLIP), got {type(clip).__name__}")
        self.layout = _check_splittable(clip)
        visual = clip.visual
        self.visual = visual
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        if self.layout == "open_clip":
            self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # (Lmax, Lmax) causal
            self.text_pool_type = clip.text_pool_type
            self.text_eos_id = getattr(clip, "text_eos_id", None)
        else:
            self.attn_mask = None  # the OpenAI layout keeps it in each block
            self.text_pool_type, self.text_eos_id = "argmax", None

        if special_token_ids is None:
            if tokenizer is None:
                raise ValueError("pass the model's tokenizer (or special_token_ids) so that SOT/EOT are never candidates")
            special_token_ids = special_ids_of(tokenizer)
        self.special_token_ids = frozenset(int(i) for i in special_token_ids)
        # on the model's device, so that embed_text copies nothing from the host (gpu_check's sync finding)
        self.register_buffer(
            "_special", torch.tensor(sorted(self.special_token_ids), dtype=torch.long, device=self.token_embedding.weight.device),
            persistent=False,
        )
        if self.text_pool_type == "eos" and self.text_eos_id is None:
            raise ValueError("clip pools text at 'eos' but has no text_eos_id")

        depth = len(visual.transformer.resblocks)
        layers = tuple(int(i) for i in layers)
        if any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct 0-based block indices below the image tower's depth {depth}, got {layers}")
        self.layers = layers
        self.image_embed_dim = visual.conv1.out_channels
        self.text_embed_dim = self.token_embedding.embedding_dim
        patch = visual.conv1.kernel_size
        self.patch_size = (int(patch[0]), int(patch[1]))

    # -- image ----------------------------------------------------------------------------------

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        """(B, 3, H, W) float images -> Embeddings: (B, N, Cv) patch embeddings before the class token
        and the position embedding; every patch a candidate; context = the (h, w) grid."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got {describe(images)}")
        grid = (images.shape[2] // self.patch_size[0], images.shape[3] // self.patch_size[1])
        positions = self.visual.positional_embedding.shape[0] - 1
        if grid[0] * grid[1] != positions or images.shape[2] % self.patch_size[0] or images.shape[3] % self.patch_size[1]:
            raise ValueError(
                f"images of {images.shape[2]}x{images.shape[3]} px give a {grid[0]}x{grid[1]} grid of "
                f"{self.patch_size[0]}x{self.patch_size[1]} patches, but the image tower's position embedding holds "
                f"{positions} patch positions: resize the images, or build the model at this size "
                f"(open_clip.create_model(..., force_image_size=...) interpolates the position embedding)"
            )
        x = self.visual.conv1(images.to(self.visual.conv1.weight.dtype))  # (B, Cv, h, w)
        return Embeddings(rearrange(x, "b c h w -> b (h w) c"), candidates=None, context=grid)  # (B, N, Cv)

    def encode_image(self, embedded: Embeddings) -> Features:
        """Patch embeddings -> Features: tokens (B, N, D) and pooled (B, D) in the joint space (through
        ``ln_post`` and ``proj``; pooled equals ``clip.encode_image``), context = :class:`ImageContext`."""
        visual, patches = self.visual, embedded.tokens
        grid = embedded.context
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], -1, -1)  # (B, 1, Cv)
        x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)  # (B, 1 + N, Cv)
        x = visual.ln_pre(x)
        levels, batch_first = [], _batch_first(visual.transformer)
        x = x if batch_first else x.transpose(0, 1)  # OpenAI layout: (1 + N, B, Cv)
        for index, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if index in self.layers:
                level = x if batch_first else x.transpose(0, 1)
                levels.append((index, rearrange(level[:, 1:], "b (h w) c -> b c h w", h=grid[0]).contiguous()))  # (B, Cv, h, w)
        x = x if batch_first else x.transpose(0, 1)  # (B, 1 + N, Cv)
        pooled, tokens = self.project_image(visual.ln_post(x))
        ordered = tuple(level for _, level in sorted(levels, key=lambda item: self.layers.index(item[0])))
        return Features(tokens=tokens, pooled=pooled, context=ImageContext(ordered, tuple(grid)))

    # -- text -----------------------------------------------------------------------------------

    def embed_text(self, token_ids: torch.Tensor) -> Embeddings:
        """(B, L) long token ids (the tokenizer's output, any ``context_length``) -> Embeddings:
        (B, L, Ct) token embeddings before the position embedding; candidates True at real words only
        (not a special id, not at or after the end-of-text token); context = the token ids."""
        if not torch.is_tensor(token_ids) or token_ids.dim() != 2 or token_ids.dtype != torch.long:
            raise ValueError(f"token_ids must be a (B, L) long tensor from the model's tokenizer, got {describe(token_ids)}")
        max_length = self.positional_embedding.shape[0]
        if self.layout == "openai" and token_ids.shape[1] != max_length:
            raise ValueError(
                f"token_ids must have {max_length} columns (this OpenAI-layout text tower's causal mask is built "
                f"for its full context), got {token_ids.shape[1]}"
            )
        if not 2 <= token_ids.shape[1] <= max_length:
            raise ValueError(f"token_ids must have 2..{max_length} columns (the text tower's context), got {token_ids.shape[1]}")
        # open_clip casts to its blocks' dtype; OpenAI's CLIP to conv1's (its fp16 conversion leaves the embedding fp32)
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else self.visual.conv1.weight.dtype
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        special = self._special.to(token_ids.device)  # (S,)
        candidates = (positions < self.pool_index(token_ids)[:, None]) & ~torch.isin(token_ids, special)  # (B, L)
        return Embeddings(self.token_embedding(token_ids).to(cast), candidates=candidates, context=token_ids)

    def encode_text(self, embedded: Embeddings) -> Features:
        """Token embeddings -> Features: tokens (B, L, D) word features and pooled (B, D) sentence
        feature at the end-of-text token (equals ``clip.encode_text``), both through ``ln_final`` and
        ``text_projection``; context = :class:`TextContext`."""
        token_ids, x = embedded.context, embedded.tokens
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)  # (B, L, Ct)
        if self.layout == "open_clip":
            x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])  # causal: padding never leaks back
        else:
            x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # sequence-first, mask inside the blocks
        index = self.pool_index(token_ids)  # (B,)
        pooled, words = self.project_text(self.ln_final(x), index)
        padding = torch.arange(length, device=x.device) > index[:, None]  # (B, L)
        return Features(tokens=words, pooled=pooled, context=TextContext(words, padding))

    def project_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + N, Cv) normed tokens -> pooled (B, D), patch tokens (B, N, D): pooled as the model
        pools, then projected, as ``encode_image`` computes it."""
        pooled = x[:, 1:].mean(dim=1) if getattr(self.visual, "pool_type", "tok") == "avg" else x[:, 0]  # (B, Cv)
        tokens = x[:, 1:]  # (B, N, Cv)
        if self.visual.proj is None:
            return pooled, tokens
        return pooled @ self.visual.proj, tokens @ self.visual.proj

    def project_text(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, Ct) normed tokens, (B,) pooling positions -> sentence (B, D), words (B, L, D): the
        sentence pooled, then projected, as ``encode_text`` computes it."""
        pooled = x[torch.arange(x.shape[0], device=x.device), index]  # (B, Ct)
        return self._project(pooled), self._project(x)

    def pool_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B,) position of the token the sentence feature is read from, as the model pools."""
        if self.text_pool_type == "eos":
            return (token_ids == self.text_eos_id).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)  # CLIP's vocabulary puts EOT at the highest id

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the CLIP's own keys (without ``logit_scale``, which the towers do not hold)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


def special_ids_of(tokenizer: Any) -> frozenset[int]:
    """The special token ids of a CLIP tokenizer: open_clip's ``SimpleTokenizer`` (``all_special_ids``),
    its ``HFTokenizer`` (the wrapped tokenizer's), or OpenAI's (the ``encoder`` entries of SOT and EOT)."""
    for source in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        ids = getattr(source, "all_special_ids", None)
        if ids:
            return frozenset(int(i) for i in ids)
    ids = [getattr(tokenizer, name, None) for name in ("sot_token_id", "eot_token_id")]
    if all(isinstance(i, int) for i in ids):
        return frozenset(ids)
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict) and "<|startoftext|>" in encoder and "<|endoftext|>" in encoder:
        return frozenset((encoder["<|startoftext|>"], encoder["<|endoftext|>"]))
    raise ValueError(
        f"cannot read the special token ids of tokenizer {type(tokenizer).__name__} (no all_special_ids, "
        f"sot_token_id/eot_token_id or encoder): pass special_token_ids"
    )


def _check_splittable(clip: nn.Module) -> str:
    """'open_clip' or 'openai' (the layout), or a ValueError naming every reason the split would not be exact."""
    name = type(clip).__name__
    if hasattr(clip, "text") and not hasattr(clip, "token_embedding"):
        raise ValueError(
            f"{name} has a separate text tower (open_clip CustomTextCLIP: SigLIP, CoCa, HF text towers): "
            f"its pooling and padding masks are not reproduced; use a model with CLIP's own text tower"
        )
    visual = getattr(clip, "visual", None)
    problems = []
    missing = [part for part in _VIT_PARTS if not hasattr(visual, part)] if visual is not None else ["visual"]
    if missing:
        problems.append(f"image tower {type(visual).__name__} is not a ViT (missing {missing}; e.g. ModifiedResNet, timm)")
    missing_text = [part for part in _TEXT_PARTS if not hasattr(clip, part)]
    if missing_text:
        problems.append(f"text tower attributes missing: {missing_text}")
    if not missing:
        if getattr(visual, "attn_pool", None) is not None:
            problems.append("attention pooling in the image tower (not reproduced)")
        if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
            problems.append(f"image pooling {visual.pool_type!r} (expected 'tok' or 'avg')")
        if getattr(visual, "final_ln_after_pool", False):
            problems.append("final_ln_after_pool (the patch tokens would not be in the joint space)")
        dropout = getattr(visual, "patch_dropout", None)
        if dropout is not None and not isinstance(dropout, nn.Identity):
            problems.append(f"patch dropout (prob {getattr(dropout, 'prob', '?')}) drops tokens and breaks their alignment: build with patch_dropout=0")
    layout = "open_clip" if hasattr(clip, "text_pool_type") else "openai"
    if layout == "open_clip" and getattr(clip, "text_pool_type", None) not in ("argmax", "eos"):
        problems.append(f"text pooling {clip.text_pool_type!r} (expected the end-of-text token: 'argmax' or 'eos')")
    if layout == "open_clip" and getattr(clip, "attn_mask", None) is None:
        problems.append("a text tower without a causal mask")
    if problems:
        raise ValueError(f"{name} cannot be split exactly at the embeddings: " + "; ".join(problems))
    return layout


def _batch_first(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "batch_first", False))  # OpenAI's transformers are sequence-first
