"""OpenCLIPTowers: an open_clip ``CLIP`` (or OpenAI CLIP's module layout) split at the embeddings.

open_clip's ``encode_image`` and ``encode_text`` each run embedding, position embedding, encoder,
final norm, pooling and projection in one call; MaskSD must put its mask token between the first
two steps. This module holds the model's own submodules under the model's own attribute names (so
its state dict is the model's, less ``logit_scale``) and runs the same steps in the same order, so
that ``encode_image(embed_image(x)).pooled`` equals ``clip.encode_image(x)`` and
``encode_text(embed_text(ids)).pooled`` equals ``clip.encode_text(ids)`` exactly.

Two layouts are read, by their attributes (open_clip itself is not imported):

- open_clip's ``CLIP`` (``text_pool_type``, ``attn_mask`` on the model, ``batch_first`` transformers);
- OpenAI's CLIP layout (the causal mask stored in each text block, sequence-first transformers,
  argmax pooling): the ViT of the ``clip.py`` that CRIS.pytorch and ETRIS vendor (their ResNets load
  into open_clip's ``ModifiedResNet``).

and two image towers:

- a ``VisionTransformer``: masked at the patch embeddings, before the class token and the position
  embedding; ``Features.tokens`` are the patch tokens through ``ln_post`` and ``proj``;
- open_clip's ``ModifiedResNet`` (CLIP RN50/RN101, CRIS's backbones): masked at the stem's output
  (after conv1..3 and the average pool, before ``layer1``), one token per 4x4 pixels on a declared
  ``Embeddings.grid``; ``Features.tokens`` are the attention pool's output at every C5 position (the
  pool's own call computes a query per position and keeps the first, the mean token, as the pooled
  feature), on the C5 grid (``Features.grid``), 1/8 of the stem grid each way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from masksd.adapter import Embeddings, Features, describe
from masksd.integrations.towers import ImageContext, TextContext

__all__ = ["OpenCLIPTowers", "special_ids_of"]

_VIT_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
_RESNET_PARTS = ("stem", "conv3", "layer1", "layer2", "layer3", "layer4", "attnpool")
_POOL_PARTS = ("positional_embedding", "q_proj", "k_proj", "v_proj", "c_proj", "num_heads")
RESNET_STAGES = 4
"""Residual stages of a ``ModifiedResNet`` (``layer1`` ... ``layer4``: C2, C3, C4, C5)."""
RESNET_REDUCTION = 8
"""How much smaller the C5 grid is than the stem's, each way (three stride-2 stages)."""
_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class OpenCLIPTowers(nn.Module):
    """The image and text towers of a CLIP, split at the patch and token embeddings for MaskSD.

    Args:
        clip: an open_clip ``CLIP`` with a ViT image tower (``open_clip.create_model("ViT-B-16", ...)``)
            or a ``ModifiedResNet`` one (``open_clip.create_model("RN50", ...)``), or a module with OpenAI
            CLIP's attributes (``visual.conv1`` ... ``visual.proj``, ``token_embedding`` ... ``text_projection``).
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(name)``, or any object with
            ``all_special_ids``, ``sot_token_id``/``eot_token_id`` or an ``encoder`` dict holding
            ``<|startoftext|>``/``<|endoftext|>``): where the special token ids come from.
        layers: whose outputs :meth:`encode_image` returns in ``ImageContext.levels``: 0-based blocks of a
            ViT (e.g. ``(3, 7, 11)`` for CRIS's three levels of ViT-B), 0-based residual stages of a
            ResNet (``(1, 2, 3)``: ``layer2``..``layer4``, the C3, C4, C5 maps CRIS reads).
        special_token_ids: instead of ``tokenizer``, the ids that are never words.

    Refuses (ValueError naming the reason) what it cannot split exactly: an image tower that is neither
    a ViT nor open_clip's ``ModifiedResNet`` (timm), a ViT's attention pooling, ``final_ln_after_pool``,
    patch dropout, a separate text tower (``CustomTextCLIP``), text pooling other than the end-of-text token.
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
        self.layout, self.image_tower = _check_splittable(clip)
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

        if self.image_tower == "vit":
            depth, unit = len(visual.transformer.resblocks), "block indices below the image tower's depth"
            self.image_embed_dim = visual.conv1.out_channels
            patch = visual.conv1.kernel_size
        else:
            depth, unit = RESNET_STAGES, "residual stage indices (layer1..layer4) below"
            self.image_embed_dim = visual.conv3.out_channels  # the stem's width
            patch = (4, 4)  # the stem's stride-2 conv1 and 2x2 average pool
        layers = tuple(int(i) for i in layers)
        if any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct 0-based {unit} {depth}, got {layers}")
        self.layers = layers
        self.text_embed_dim = self.token_embedding.embedding_dim
        self.patch_size = (int(patch[0]), int(patch[1]))

    # -- image ----------------------------------------------------------------------------------

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        """(B, 3, H, W) float images -> Embeddings: (B, N, Cv) tokens where MaskSD masks (a ViT's patch
        embeddings before the class token and the position embedding; a ResNet's stem output, one token
        per 4x4 pixels), on ``grid`` (h, w); every token a candidate; context = the grid."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got {describe(images)}")
        self._check_image_size(images.shape[2], images.shape[3])
        images = images.to(self.visual.conv1.weight.dtype)
        x = self.visual.conv1(images) if self.image_tower == "vit" else self.visual.stem(images)  # (B, Cv, h, w)
        grid = (int(x.shape[2]), int(x.shape[3]))
        return Embeddings(rearrange(x, "b c h w -> b (h w) c"), candidates=None, context=grid, grid=grid)  # (B, N, Cv)

    def _check_image_size(self, height: int, width: int) -> None:
        """A ValueError unless (height, width) give the grid the image tower's position embedding holds."""
        if self.image_tower == "vit":
            stride, positions, embedding = self.patch_size, self.visual.positional_embedding.shape[0] - 1, "image tower's"
        else:
            side = self.patch_size[0] * RESNET_REDUCTION
            stride, positions, embedding = (side, side), self.visual.attnpool.positional_embedding.shape[0] - 1, "attention pool's"
        grid = (height // stride[0], width // stride[1])
        if grid[0] * grid[1] != positions or height % stride[0] or width % stride[1]:
            raise ValueError(
                f"images of {height}x{width} px give a {grid[0]}x{grid[1]} grid of {stride[0]}x{stride[1]} px cells, "
                f"but the {embedding} position embedding holds {positions} positions: resize the images, or build the "
                f"model at this size (open_clip.create_model(..., force_image_size=...) interpolates a ViT's position embedding)"
            )

    def encode_image(self, embedded: Embeddings) -> Features:
        """Image embeddings -> Features: tokens (B, N, D) and pooled (B, D) in the joint space (pooled equals
        ``clip.encode_image``), context = :class:`ImageContext`. A ViT's tokens are its patch tokens through
        ``ln_post`` and ``proj``; a ResNet's are the attention pool's outputs at the C5 positions, on
        ``Features.grid`` (see :meth:`attention_pool`)."""
        if self.image_tower == "resnet":
            return self._encode_resnet(embedded)
        x, levels = self._image_start(embedded), {}
        batch_first = _batch_first(self.visual.transformer)
        x = x if batch_first else x.transpose(0, 1)  # OpenAI layout: (1 + N, B, Cv)
        for index, block in enumerate(self.visual.transformer.resblocks):
            x = block(x)
            if index in self.layers:  # the map is made here, as every stored CRIS run made it (autograd's order)
                levels[index] = self._level_map(x if batch_first else x.transpose(0, 1), embedded.context)
        return self._image_finish(x if batch_first else x.transpose(0, 1), levels, embedded.context)

    def encode_pair(
        self, image_embedded: Embeddings, text_embedded: Embeddings, exchange: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[Features, Features]:
        """Both ViT towers block by block, for a model whose towers read each other between blocks (ETRIS's
        bridges): after block i of each (in lockstep; the deeper tower's last blocks run alone),
        ``v, t = exchange(i, v, t)`` with v (B, 1 + N, Cv) the image sequence and t (B, L, Ct) the text's,
        batch first. Returns what :meth:`encode_image` and :meth:`encode_text` return; with an ``exchange``
        that returns its inputs, exactly those (visual, text) features."""
        if self.image_tower != "vit":
            raise ValueError("encode_pair runs ViT towers block by block; this CLIP's image tower is a ResNet")
        v, t, levels = self._image_start(image_embedded), self._text_start(text_embedded), {}
        image_blocks, text_blocks = self.visual.transformer.resblocks, self.transformer.resblocks
        length = t.shape[1]
        for index in range(max(len(image_blocks), len(text_blocks))):
            if index < len(image_blocks):
                v = _run_block(image_blocks[index], v, _batch_first(self.visual.transformer), {})
            if index < len(text_blocks):
                mask = {"attn_mask": self.attn_mask[:length, :length]} if self.layout == "open_clip" else {}
                t = _run_block(text_blocks[index], t, _batch_first(self.transformer), mask)
            if index < min(len(image_blocks), len(text_blocks)):
                v, t = exchange(index, v, t)
            if index in self.layers:
                levels[index] = self._level_map(v, image_embedded.context)
        return self._image_finish(v, levels, image_embedded.context), self._text_finish(t, text_embedded)

    def _image_start(self, embedded: Embeddings) -> torch.Tensor:
        """(B, N, Cv) patch embeddings -> (B, 1 + N, Cv): the class token, the position embedding, ``ln_pre``."""
        visual, patches = self.visual, embedded.tokens
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], -1, -1)  # (B, 1, Cv)
        x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)  # (B, 1 + N, Cv)
        return visual.ln_pre(x)

    @staticmethod
    def _level_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """A block's (B, 1 + N, Cv) output -> its (B, Cv, h, w) patch map, class token dropped."""
        return rearrange(x[:, 1:], "b (h w) c -> b c h w", h=grid[0]).contiguous()

    def _image_finish(self, x: torch.Tensor, levels: dict[int, torch.Tensor], grid: tuple[int, int]) -> Features:
        """The last block's (B, 1 + N, Cv) output and the requested blocks' maps -> Features."""
        pooled, tokens = self.project_image(self.visual.ln_post(x))
        maps = tuple(levels[i] for i in self.layers)  # (B, Cv, h, w) each, in the order asked
        return Features(tokens=tokens, pooled=pooled, context=ImageContext(maps, tuple(grid)))

    def _encode_resnet(self, embedded: Embeddings) -> Features:
        """Stem tokens (B, N, Cv) -> the residual stages, the requested stages' maps, the attention pool."""
        grid = embedded.context
        x = rearrange(embedded.tokens, "b (h w) c -> b c h w", h=grid[0]).contiguous()  # (B, Cv, h, w), as the stem left it
        levels = {}
        for index in range(RESNET_STAGES):
            x = getattr(self.visual, f"layer{index + 1}")(x)  # (B, C_i, h / 2^i, w / 2^i)
            if index in self.layers:
                levels[index] = x
        pooled, tokens = self.attention_pool(x)
        c5 = (int(x.shape[2]), int(x.shape[3]))
        context = ImageContext(tuple(levels[i] for i in self.layers), c5)
        return Features(tokens=tokens, pooled=pooled, context=context, grid=c5)

    def attention_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) C5 map -> pooled (B, D), tokens (B, h*w, D): the attention pool's one call, as
        ``AttentionPool2d.forward`` makes it (the mean token prepended, the position embedding added, every
        position a query), keeping every output: the mean token's is the pooled feature (equal to
        ``clip.encode_image``), each position's the joint-space token there (CRIS reads the same per-position
        outputs, from a pool without the mean token and with a residual conv of its own)."""
        pool = self.visual.attnpool
        x = rearrange(x, "b c h w -> (h w) b c")  # (N5, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)  # (1 + N5, B, C)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=pool.training, need_weights=False,
        )  # (1 + N5, B, D)
        return x[0], rearrange(x[1:], "n b d -> b n d")

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
        x = self._text_start(embedded)
        length = x.shape[1]
        if self.layout == "open_clip":
            x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])  # causal: padding never leaks back
        else:
            x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # sequence-first, mask inside the blocks
        return self._text_finish(x, embedded)

    def _text_start(self, embedded: Embeddings) -> torch.Tensor:
        """(B, L, Ct) token embeddings -> the same plus the position embedding."""
        x = embedded.tokens
        return x + self.positional_embedding[: x.shape[1]].to(x.dtype)  # (B, L, Ct)

    def _text_finish(self, x: torch.Tensor, embedded: Embeddings) -> Features:
        """The last block's (B, L, Ct) output -> Features, the sentence read at the end-of-text token."""
        index = self.pool_index(embedded.context)  # (B,)
        pooled, words = self.project_text(self.ln_final(x), index)
        padding = torch.arange(x.shape[1], device=x.device) > index[:, None]  # (B, L)
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


def _check_splittable(clip: nn.Module) -> tuple[str, str]:
    """(layout, image tower): 'open_clip' or 'openai', 'vit' or 'resnet'; or a ValueError naming every
    reason the split would not be exact."""
    name = type(clip).__name__
    if hasattr(clip, "text") and not hasattr(clip, "token_embedding"):
        raise ValueError(
            f"{name} has a separate text tower (open_clip CustomTextCLIP: SigLIP, CoCa, HF text towers): "
            f"its pooling and padding masks are not reproduced; use a model with CLIP's own text tower "
            f"(for SigLIP, transformers' SiglipModel with masksd.integrations.HFSiglipTowers)"
        )
    visual = getattr(clip, "visual", None)
    problems, tower = [], "vit"
    missing = [part for part in _VIT_PARTS if not hasattr(visual, part)] if visual is not None else ["visual"]
    if missing and visual is not None and hasattr(visual, "attnpool"):  # a ResNet: CLIP RN50/RN101
        tower = "resnet"
        missing = [part for part in _RESNET_PARTS if not hasattr(visual, part)]
        missing += [f"attnpool.{part}" for part in _POOL_PARTS if not hasattr(visual.attnpool, part)]
        if missing:
            problems.append(
                f"image tower {type(visual).__name__} is a ResNet but not open_clip's ModifiedResNet (missing {missing}): "
                f"build it with open_clip (open_clip.create_model('RN50', pretrained=...) loads OpenAI's weights)"
            )
    elif missing:
        problems.append(
            f"image tower {type(visual).__name__} is neither a ViT nor open_clip's ModifiedResNet (missing {missing}; "
            f"e.g. timm): write an adapter for it (docs/families.md)"
        )
    missing_text = [part for part in _TEXT_PARTS if not hasattr(clip, part)]
    if missing_text:
        problems.append(f"text tower attributes missing: {missing_text}")
    if not missing and tower == "vit":
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
    return layout, tower


def _run_block(block: nn.Module, x: torch.Tensor, batch_first: bool, kwargs: dict[str, Any]) -> torch.Tensor:
    """One residual block on a batch-first (B, L, C) sequence, whatever layout the block takes."""
    if batch_first:
        return block(x, **kwargs)
    return block(x.transpose(0, 1), **kwargs).transpose(0, 1)  # OpenAI layout: sequence first


def _batch_first(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "batch_first", False))  # OpenAI's transformers are sequence-first
