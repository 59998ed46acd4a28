"""LAVT's fusion inside the image encoder: after each Swin stage, a pixel-word attention module (PWAM) turns
the stage's pixels and the sentence's words into multimodal features, and a language gate adds them back
into the visual stream, which the next stage reads.

    x (B, N, C) --+-- project ------------------------------+
                  |                                         * --> project --> m (B, N, C): to the decoder
                  +-- pixel-word attention over the words --+
    x <- x + gate(m) * m                                        (gate: tanh of a two-layer MLP of m)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["LanguageGate", "PixelWordAttention", "PixelWordFusion", "WordAttention"]


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> each sample's channels normalised over its N positions (LAVT's InstanceNorm1d, no affine)."""
    return rearrange(F.instance_norm(rearrange(x, "b n c -> b c n")), "b c n -> b n c")


class WordAttention(NamedTuple):
    """What one stage's pixel-word attention computed, kept for :meth:`LAVT.relevance` (detached)."""

    logits: torch.Tensor
    """(B, heads, N, L) scaled query-key products of each pixel with each word, before the padding mask."""
    weights: torch.Tensor
    """(B, heads, N, L) each pixel's attention over the words (padding 0; rows sum to 1)."""


class PixelWordAttention(nn.Module):
    """Each pixel attends over the sentence's words (LAVT's spatial image-language attention): queries from the
    pixels (instance-normalised), keys and values from the word features (zero at padding), the output projected
    and instance-normalised. Returns the (B, N, value_dim) language feature of each pixel and its attention."""

    def __init__(self, visual_dim: int, text_dim: int, key_dim: int, value_dim: int, heads: int = 1):
        super().__init__()
        if key_dim % heads or value_dim % heads:
            raise ValueError(f"key_dim={key_dim} and value_dim={value_dim} must be multiples of heads={heads}")
        self.heads, self.scale = heads, key_dim**-0.5  # LAVT scales by the whole key width, not per head
        self.query = nn.Linear(visual_dim, key_dim)
        self.key = nn.Linear(text_dim, key_dim)
        self.value = nn.Linear(text_dim, value_dim)
        self.out = nn.Linear(value_dim, value_dim)

    def forward(self, pixels: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, WordAttention]:
        """pixels (B, N, Cv), words (B, L, Ct), word_mask (B, L) bool, True at real tokens ([CLS] and [SEP] included)."""
        keep = word_mask[:, :, None].to(words.dtype)  # (B, L, 1)
        query = rearrange(instance_norm(self.query(pixels)), "b n (h d) -> b h n d", h=self.heads)
        key = rearrange(self.key(words) * keep, "b l (h d) -> b h l d", h=self.heads)
        value = rearrange(self.value(words) * keep, "b l (h d) -> b h l d", h=self.heads)
        logits = torch.einsum("bhnd,bhld->bhnl", query, key) * self.scale  # (B, heads, N, L)
        padding = ~word_mask[:, None, None, :]  # (B, 1, 1, L)
        weights = logits.masked_fill(padding, torch.finfo(logits.dtype).min).softmax(dim=-1)  # (B, heads, N, L)
        out = rearrange(weights @ value, "b h n d -> b n (h d)")  # (B, N, value_dim)
        return instance_norm(self.out(out)), WordAttention(logits.detach(), weights.detach())


class PixelWordFusion(nn.Module):
    """LAVT's PWAM: ``project(pixels) * attention(pixels, words)``, projected again -> (B, N, C) multimodal features."""

    def __init__(self, dim: int, text_dim: int, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.attention = PixelWordAttention(dim, text_dim, dim, dim, heads)
        self.project = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, pixels: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, WordAttention]:
        language, attention = self.attention(pixels, words, word_mask)  # (B, N, C)
        return self.project(self.visual(pixels) * language), attention


class LanguageGate(nn.Module):
    """LAVT's language gate: how much of the multimodal features flows back into the visual stream, per channel
    and position: ``pixels + tanh(MLP(fused)) * fused``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh())

    def forward(self, pixels: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        return pixels + self.gate(fused) * fused
