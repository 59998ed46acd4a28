"""DETRIS-style DINOv2 + CLIP text, tiny and random: independent towers with no joint space.

The model: transformers' ``Dinov2Model`` for the image and open_clip's CLIP text tower for the
words, both frozen (DETRIS trains adapters and a decoder around frozen encoders), and a decoder that
gates the DINOv2 patch map by the sentence and lets it attend to the words.
The adapter: masks DINOv2's patch embeddings (before its class token and position embedding) and
re-runs the rest of its embedding and its encoder; the text through
:class:`masksd.integrations.OpenCLIPTowers` (its image tower frozen and unused).

Guidance: DINOv2's features and CLIP's text share no space (the decoder's fusion is learned), so no
``"joint"``: LMVSD ranks patches by the main branch's own predicted mask (``"prediction"``), VMLSD
masks words at random (K = 1, as MaskRIS).
"""

from __future__ import annotations

import open_clip
import torch
import transformers
from einops import rearrange
from torch import nn

from masksd import BranchConfig, Embeddings, Features, MaskSDConfig, SegmenterAdapter
from masksd.integrations import DecoderHead, OpenCLIPTowers

CONFIG = MaskSDConfig(lmvsd=BranchConfig.lmvsd(guidance="prediction"), vmlsd=BranchConfig.vmlsd(top_k=1.0))


# -- the model's own code -----------------------------------------------------------------------------


class Decoder(nn.Module):
    """The patch map projected and gated by the sentence, one cross-attention to the words, a 1x1 conv: (B, 1, h, w)."""

    def __init__(self, image_width: int, joint: int, width: int = 32):
        super().__init__()
        self.image, self.gate, self.words = nn.Linear(image_width, width), nn.Linear(joint, width), nn.Linear(joint, width)
        self.attend = nn.MultiheadAttention(width, 4, batch_first=True)
        self.out = nn.Linear(width, 1)

    def forward(self, patches, grid, words, sentence, padding):
        query, keys = self.image(patches) * self.gate(sentence)[:, None], self.words(words)  # (B, N, W), (B, L, W)
        query = query + self.attend(query, keys, keys, key_padding_mask=padding, need_weights=False)[0]
        return rearrange(self.out(query), "b (h w) 1 -> b 1 h w", h=grid[0])


class DETRIS(nn.Module):
    """Frozen DINOv2 and CLIP text encoders, a trained decoder."""

    def __init__(self, dino: transformers.Dinov2Model, clip: open_clip.CLIP):
        super().__init__()
        self.dino, self.clip = dino.requires_grad_(False), clip.requires_grad_(False)
        self.decoder = Decoder(dino.config.hidden_size, clip.text_projection.shape[1])

    def forward(self, pixel_values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        patches = self.dino(pixel_values).last_hidden_state[:, 1:]  # (B, N, C), class token dropped
        grid = (pixel_values.shape[2] // self.dino.config.patch_size, pixel_values.shape[3] // self.dino.config.patch_size)
        clip, length = self.clip, ids.shape[1]
        t = clip.transformer(clip.token_embedding(ids) + clip.positional_embedding[:length], attn_mask=clip.attn_mask[:length, :length])
        t, end = clip.ln_final(t), ids.argmax(dim=-1)  # the end-of-text token: CLIP's highest id
        sentence = t[torch.arange(t.shape[0], device=t.device), end] @ clip.text_projection
        padding = torch.arange(length, device=ids.device) > end[:, None]
        return self.decoder(patches, grid, t @ clip.text_projection, sentence, padding)


def tiny_detris(seed: int = 0) -> DETRIS:
    """DINOv2 at 32 px (8-px patches: 4x4), two layers, width 32; CLIP's text tower, two blocks, width 32."""
    torch.manual_seed(seed)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
    ))
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=16, head_width=16, patch_size=16, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
    return DETRIS(dino, open_clip.model.CLIP(24, vision, text))


# -- adapter ------------------------------------------------------------------------------------------


class DETRISAdapter(SegmenterAdapter):
    """DETRIS for MaskSD: DINOv2 split at its patch embeddings, CLIP's text split by OpenCLIPTowers."""

    def __init__(self, model: DETRIS, tokenizer):
        super().__init__()
        self.dino, self.text = model.dino, OpenCLIPTowers(model.clip, tokenizer)
        self.decode_head = DecoderHead(model.decoder, lambda v, t: (*v.context, t.tokens, t.pooled, t.context.padding))
        self.image_embed_dim, self.text_embed_dim = model.dino.config.hidden_size, self.text.text_embed_dim
        self.special_token_ids = self.text.special_token_ids

    def embed_image(self, pixel_values: torch.Tensor) -> Embeddings:
        patch = self.dino.config.patch_size
        grid = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
        return Embeddings(self.dino.embeddings.patch_embeddings(pixel_values), grid=grid, context=pixel_values.shape[2:])

    def encode_image(self, image: Embeddings) -> Features:
        embeddings = self.dino.embeddings  # the rest of Dinov2Embeddings.forward: class token, positions, dropout
        x = torch.cat([embeddings.cls_token.expand(image.tokens.shape[0], -1, -1), image.tokens], dim=1)
        x = embeddings.dropout(x + embeddings.interpolate_pos_encoding(x, *image.context))
        x = self.dino.layernorm(self.dino.encoder(x).last_hidden_state)
        return Features(None, None, context=(x[:, 1:], image.grid))  # no joint space: no tokens or pooled feature

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return self.text.embed_text(ids)

    def encode_text(self, text: Embeddings) -> Features:
        return self.text.encode_text(text)


# -- end of adapter -----------------------------------------------------------------------------------


def build(seed: int = 0):
    """(segmenter, images, texts, reference): the tiny model adapted, a batch of two, the model itself as reference."""
    model = tiny_detris(seed)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return DETRISAdapter(model, tokenizer), images, tokenizer(["the red car on the left", "a man"], context_length=16), model
