"""CRIS on CLIP RN50 (CRIS.pytorch's backbones), tiny and random: independent towers, late fusion.

The model: open_clip's ``ModifiedResNet`` CLIP and CRIS's decoder in miniature (its C5 is the
attention pool's output at every position plus a residual conv of the raw map; a sentence-gated
top-down neck over C5, C4, C3; cross-attention to the words; a kernel generated from the sentence).
The adapter: :class:`masksd.integrations.OpenCLIPTowers` masks the stem's output (16x16 tokens at
64 px) and gives the C3, C4, C5 maps and the pool's per-position tokens on the 2x2 C5 grid.

Guidance: the paper's (``"joint"``): CLIP's joint space; the C5 scores spread to the 8x8 stem tokens
each C5 cell covers.
"""

from __future__ import annotations

import open_clip
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from masksd import Features, MaskSDConfig
from masksd.integrations import DecoderHead, OpenCLIPTowers, TowerSegmenter

CONFIG = MaskSDConfig()  # the paper's: joint-space guidance for both branches


# -- the model's own code -----------------------------------------------------------------------------


class CRISDecoder(nn.Module):
    """CRIS's neck, decoder and projector in miniature: (C3, C4, C5, pooled C5, words, sentence, padding) -> (B, 1, h3, w3)."""

    def __init__(self, c3: int, c4: int, c5: int, joint: int, width: int = 32):
        super().__init__()
        self.connect = nn.Sequential(nn.Conv2d(c5, joint, 1, bias=False), nn.BatchNorm2d(joint))  # CRIS's pool residual
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in (c3, c4, joint)])
        self.gate = nn.Linear(joint, width)
        self.words = nn.Linear(joint, width)
        self.attend = nn.MultiheadAttention(width, 4, batch_first=True)
        self.kernel = nn.Linear(joint, width + 1)  # a 1x1 kernel and its bias, from the sentence

    def forward(self, c3, c4, c5, pooled_c5, words, sentence, padding):
        c5 = F.relu(pooled_c5 + self.connect(c5))  # (B, D, h5, w5)
        x = self.lateral[2](c5) * self.gate(sentence)[:, :, None, None]  # (B, W, h5, w5)
        for lateral, level in ((self.lateral[1], c4), (self.lateral[0], c3)):
            x = lateral(level) + F.interpolate(x, size=level.shape[-2:], mode="nearest")
        height = x.shape[2]
        query = rearrange(x, "b c h w -> b (h w) c")
        keys = self.words(words)  # (B, L, W)
        query = query + self.attend(query, keys, keys, key_padding_mask=padding, need_weights=False)[0]
        kernel = self.kernel(sentence)  # (B, W + 1)
        logits = torch.einsum("bnc,bc->bn", query, kernel[:, :-1]) + kernel[:, -1:]  # (B, h3 * w3)
        return rearrange(logits, "b (h w) -> b 1 h w", h=height)


def tiny_clip_rn50(seed: int = 0) -> open_clip.CLIP:
    """open_clip's CLIP with a ModifiedResNet image tower at 64 px (RN50's layout, one block per stage, width 8)."""
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=16, image_size=64)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(32, vision, text)


# -- adapter ------------------------------------------------------------------------------------------


def decoder_inputs(visual: Features, text: Features) -> tuple:
    pooled_c5 = rearrange(visual.tokens, "b (h w) d -> b d h w", h=visual.grid[0])  # the pool's per-position output
    return (*visual.context.levels, pooled_c5, text.tokens, text.pooled, text.context.padding)  # C3, C4, C5, ...


def adapt(clip: open_clip.CLIP, tokenizer, decoder: CRISDecoder) -> TowerSegmenter:
    return TowerSegmenter(OpenCLIPTowers(clip, tokenizer, layers=(1, 2, 3)), DecoderHead(decoder, decoder_inputs))


# -- end of adapter -----------------------------------------------------------------------------------


def build(seed: int = 0):
    """(segmenter, images, texts, reference): the tiny model adapted, a batch of two, no separate reference."""
    clip = tiny_clip_rn50(seed)
    tokenizer = open_clip.get_tokenizer("RN50")
    segmenter = adapt(clip, tokenizer, CRISDecoder(c3=64, c4=128, c5=256, joint=32))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return segmenter, images, tokenizer(["the red car on the left", "a man"], context_length=16), None
