"""ETRIS-style bridged CLIP, tiny and random: the image and text towers read each other (fused encode).

The model: an open_clip ViT CLIP, frozen except its position embeddings (as ETRIS), whose two towers
exchange features through a bridge after each of their first blocks (each side projected to a small
width, attending to the other, projected back and added), and a decoder over two image blocks'
maps, the words and the sentence.
The adapter: the towers split by :class:`masksd.integrations.OpenCLIPTowers`, whose ``encode_pair``
runs both towers block by block with the model's bridges between, so LMVSD's masked image reaches
the text through the bridges and VMLSD's masked words reach the image (no branch sees the other's
unmasked input).

Guidance: the paper's (``"joint"``): CLIP's projected tokens, bridged.
"""

from __future__ import annotations

import open_clip
import torch
from einops import rearrange
from torch import nn

from masksd import Embeddings, Features, MaskSDConfig, SegmenterAdapter
from masksd.integrations import DecoderHead, OpenCLIPTowers

CONFIG = MaskSDConfig()  # the paper's: joint-space guidance for both branches


# -- the model's own code -----------------------------------------------------------------------------


class Bridge(nn.Module):
    """ETRIS's bridge in miniature: image tokens attend to the words and words to the image tokens, at a small width."""

    def __init__(self, image_width: int, text_width: int, width: int = 16, heads: int = 2):
        super().__init__()
        self.down_image, self.down_text = nn.Linear(image_width, width), nn.Linear(text_width, width)
        self.image_reads_text = nn.MultiheadAttention(width, heads, batch_first=True)
        self.text_reads_image = nn.MultiheadAttention(width, heads, batch_first=True)
        self.up_image, self.up_text = nn.Linear(width, image_width), nn.Linear(width, text_width)

    def forward(self, image: torch.Tensor, text: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, t = self.down_image(image), self.down_text(text)  # (B, 1 + N, W), (B, L, W)
        image = image + self.up_image(self.image_reads_text(v, t, t, key_padding_mask=padding, need_weights=False)[0])
        text = text + self.up_text(self.text_reads_image(t, v, v, need_weights=False)[0])
        return image, text


class Decoder(nn.Module):
    """Two image levels summed, gated by the sentence, one cross-attention to the words, a 1x1 conv: (B, 1, h, w)."""

    def __init__(self, image_width: int, joint: int, width: int = 32):
        super().__init__()
        self.levels, self.gate, self.words = nn.Conv2d(image_width, width, 1), nn.Linear(joint, width), nn.Linear(joint, width)
        self.attend = nn.MultiheadAttention(width, 4, batch_first=True)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, levels, words, sentence, padding):
        x = self.levels(sum(levels)) * self.gate(sentence)[:, :, None, None]  # (B, W, h, w)
        query, keys = rearrange(x, "b c h w -> b (h w) c"), self.words(words)
        query = query + self.attend(query, keys, keys, key_padding_mask=padding, need_weights=False)[0]
        return self.out(rearrange(query, "b (h w) c -> b c h w", h=x.shape[2]))


class BridgedCLIP(nn.Module):
    """ETRIS-style: CLIP's towers run in lockstep, bridged after blocks ``bridged``; the decoder reads blocks ``levels``."""

    def __init__(self, clip: open_clip.CLIP, bridged=(0, 1), levels=(0, 1)):
        super().__init__()
        for name, parameter in clip.named_parameters():  # ETRIS trains CLIP's position embeddings only
            parameter.requires_grad_("positional_embedding" in name)
        self.clip, self.levels = clip, tuple(levels)
        width, text_width = clip.visual.conv1.out_channels, clip.token_embedding.embedding_dim
        self.bridges = nn.ModuleDict({str(i): Bridge(width, text_width) for i in bridged})
        self.decoder = Decoder(width, clip.text_projection.shape[1])

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        clip, visual = self.clip, self.clip.visual
        v = rearrange(visual.conv1(images), "b c h w -> b (h w) c")
        v = torch.cat([visual.class_embedding.view(1, 1, -1).expand(v.shape[0], -1, -1), v], dim=1)
        v = visual.ln_pre(v + visual.positional_embedding)  # (B, 1 + N, Cv)
        t = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]  # (B, L, Ct)
        end = ids.argmax(dim=-1)  # the end-of-text token: CLIP's highest id
        padding = torch.arange(ids.shape[1], device=ids.device) > end[:, None]
        levels = []
        for index, (image_block, text_block) in enumerate(zip(visual.transformer.resblocks, clip.transformer.resblocks)):
            v, t = image_block(v), text_block(t, attn_mask=clip.attn_mask[: ids.shape[1], : ids.shape[1]])
            if str(index) in self.bridges:
                v, t = self.bridges[str(index)](v, t, padding)
            if index in self.levels:
                levels.append(rearrange(v[:, 1:], "b (h w) c -> b c h w", h=visual.grid_size[0]).contiguous())
        t = clip.ln_final(t)
        sentence = t[torch.arange(t.shape[0], device=t.device), end] @ clip.text_projection
        return self.decoder(levels, t @ clip.text_projection, sentence, padding)


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """open_clip's ViT CLIP at 64 px (16-px patches: a 4x4 grid), two blocks per tower, width 32."""
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=16, image_size=64)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
    return open_clip.model.CLIP(24, vision, text)


# -- adapter ------------------------------------------------------------------------------------------


class ETRISAdapter(SegmenterAdapter):
    """BridgedCLIP for MaskSD: a fused ``encode``, the model's bridges between the towers' blocks."""

    def __init__(self, model: BridgedCLIP, tokenizer):
        super().__init__()
        self.towers, self.bridges = OpenCLIPTowers(model.clip, tokenizer, layers=model.levels), model.bridges
        self.decode_head = DecoderHead(model.decoder, lambda v, t: (v.context.levels, t.tokens, t.pooled, t.context.padding))
        self.image_embed_dim, self.text_embed_dim = self.towers.image_embed_dim, self.towers.text_embed_dim
        self.special_token_ids = self.towers.special_token_ids

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        return self.towers.embed_image(images)

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return self.towers.embed_text(ids)

    def encode(self, image: Embeddings, text: Embeddings) -> tuple[Features, Features]:
        padding = torch.arange(text.tokens.shape[1], device=text.tokens.device) > self.towers.pool_index(text.context)[:, None]

        def bridge(index: int, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.bridges[str(index)](v, t, padding) if str(index) in self.bridges else (v, t)

        return self.towers.encode_pair(image, text, bridge)


# -- end of adapter -----------------------------------------------------------------------------------


def build(seed: int = 0):
    """(segmenter, images, texts, reference): the tiny model adapted, a batch of two, the model itself as reference."""
    model = BridgedCLIP(tiny_clip(seed))
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return ETRISAdapter(model, tokenizer), images, tokenizer(["the red car on the left", "a man"], context_length=16), model
