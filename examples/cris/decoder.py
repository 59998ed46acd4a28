"""CRIS's vision-language Transformer decoder and its text-to-pixel projector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from examples.cris.neck import conv_bn_relu

__all__ = ["VisionLanguageDecoder", "DecoderLayer", "Projector", "sine_positions_1d", "sine_positions_2d"]


def sine_positions_1d(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(length, dim) fixed sine/cosine encoding of positions 0..length-1 (dim even)."""
    if dim % 2:
        raise ValueError(f"sine positions need an even dim, got {dim}")
    frequencies = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * frequencies  # (L, dim/2)
    return rearrange(torch.stack([angles.sin(), angles.cos()], dim=-1), "l f two -> l (f two)")


def sine_positions_2d(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(height * width, dim) encoding, row-major: the first dim/2 channels encode x, the rest y (dim % 4 == 0)."""
    if dim % 4:
        raise ValueError(f"2D sine positions need dim divisible by 4, got {dim}")
    xs = sine_positions_1d(width, dim // 2, device)[None].expand(height, width, dim // 2)  # (h, w, dim/2)
    ys = sine_positions_1d(height, dim // 2, device)[:, None].expand(height, width, dim // 2)
    return rearrange(torch.cat([xs, ys], dim=-1), "h w c -> (h w) c")


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention over pixels, cross-attention to words, FFN (CRIS's layout,
    with an extra LayerNorm on each attention output and inside the FFN)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, text_dim: int):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_out_norm = nn.LayerNorm(dim)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(
            dim, heads, dropout=dropout, kdim=text_dim, vdim=text_dim, batch_first=True
        )
        self.cross_out_norm = nn.LayerNorm(dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.LayerNorm(ffn), nn.Linear(ffn, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        pixels: torch.Tensor,
        pixel_pos: torch.Tensor,
        words: torch.Tensor,
        word_pos: torch.Tensor,
        padding: torch.Tensor,
    ) -> torch.Tensor:
        """pixels (B, N, dim), pixel_pos (N, dim), words (B, L, text_dim), word_pos (L, text_dim),
        padding (B, L) bool True at padded words. Returns (B, N, dim)."""
        # Each update is cast to the stream's dtype: under autocast the LayerNorms return float32, which would turn
        # the (B, N, dim) residual stream float32 from the first layer on (as the ViT's stays in the autocast dtype).
        # Without autocast the casts are no-ops.
        x = self.self_norm(pixels)
        query = x + pixel_pos
        attended = self.self_attn(query, query, x, need_weights=False)[0]
        pixels = pixels + self.dropout(self.self_out_norm(attended)).to(pixels.dtype)

        x = self.cross_norm(pixels)
        attended = self.cross_attn(x + pixel_pos, words + word_pos, words, key_padding_mask=padding, need_weights=False)[0]
        pixels = pixels + self.dropout(self.cross_out_norm(attended)).to(pixels.dtype)

        return pixels + self.dropout(self.ffn(self.ffn_norm(pixels))).to(pixels.dtype)


class VisionLanguageDecoder(nn.Module):
    """A stack of :class:`DecoderLayer` over a (B, dim, h, w) map with 2D sine positions; words
    carry 1D sine positions as keys. Returns the refined (B, dim, h, w) map."""

    def __init__(self, layers: int, dim: int, heads: int, ffn: int, dropout: float, text_dim: int):
        super().__init__()
        if text_dim % 2:
            raise ValueError(f"the word features' dim must be even for sine positions, got {text_dim}")
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn, dropout, text_dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor, words: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """pixels (B, dim, h, w); words (B, L, text_dim); padding (B, L) bool. Returns (B, dim, h, w)."""
        _, dim, height, width = pixels.shape
        pixel_pos = sine_positions_2d(height, width, dim, pixels.device).to(pixels.dtype)  # (N, dim)
        word_pos = sine_positions_1d(words.shape[1], words.shape[2], words.device).to(words.dtype)  # (L, text_dim)
        x = rearrange(pixels, "b c h w -> b (h w) c")
        for layer in self.layers:
            x = layer(x, pixel_pos, words, word_pos, padding)
        return rearrange(self.norm(x), "b (h w) c -> b c h w", h=height)


class Projector(nn.Module):
    """Upsamples the decoded map 4x and convolves it with a kernel generated from the sentence state.

    (B, dim, h, w), (B, text_dim) -> (B, 1, 4h, 4w) mask logits.

    ``fast``: the per-sample (one output channel) k x k convolution as one batched matmul, the k² per-offset
    channel sums (B, k², 4h, 4w), then a fixed one-hot k x k convolution that shifts and adds them: the same
    function (both are linear in the map, and zero padding of the sums is zero padding of the map),
    reassociated, instead of one grouped convolution of B groups. Off: the grouped convolution every
    stored run computed.
    """

    def __init__(self, dim: int, text_dim: int, kernel_size: int = 3, fast: bool = False):
        super().__init__()
        half = dim // 2
        self.kernel_size = kernel_size
        self.fast = fast
        self.visual = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(dim, dim, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(dim, half, 3),
            nn.Conv2d(half, half, 1),
        )
        self.dynamic = nn.Linear(text_dim, half * kernel_size * kernel_size + 1)  # kernel weights and a bias

    def forward(self, pixels: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        x = self.visual(pixels)  # (B, C, 4h, 4w)
        batch, channels, height, width = x.shape
        params = self.dynamic(sentence)  # (B, C k k + 1)
        k = self.kernel_size
        if self.fast:
            weight = rearrange(params[:, :-1], "b (c q) -> b c q", c=channels)  # (B, C, k²)
            taps = _channel_sums(x, weight)  # (B, k², 4h, 4w)
            shift = torch.eye(k * k, device=taps.device, dtype=taps.dtype).view(1, k * k, k, k)  # offset q -> its kernel cell
            out = F.conv2d(taps, shift, padding=k // 2)  # (B, 1, 4h, 4w)
            return out + params[:, -1].view(batch, 1, 1, 1).to(out.dtype)
        weight = rearrange(params[:, :-1], "b (c kh kw) -> b c kh kw", c=channels, kh=k)
        # One group per sample: sample b's channels meet only sample b's kernel.
        out = F.conv2d(
            rearrange(x, "b c h w -> 1 (b c) h w"), weight, params[:, -1], padding=k // 2, groups=batch
        )  # (1, B, 4h, 4w)
        return rearrange(out, "1 b h w -> b 1 h w")


def _channel_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, Q, h, w) maps sum_c weight[b, c, q] * x[b, c] for a (B, C, h, w) map and (B, C, Q) weights: one batched
    matmul over the layout ``x`` is in (channels_last on GPUs, so that no copy of ``x`` is made)."""
    height = x.shape[2]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        sums = torch.bmm(rearrange(x, "b c h w -> b (h w) c"), weight)  # (B, hw, Q): x read as it lies
        return rearrange(sums, "b (h w) q -> b q h w", h=height)
    sums = torch.bmm(weight.transpose(1, 2), rearrange(x, "b c h w -> b c (h w)"))  # (B, Q, hw)
    return rearrange(sums, "b q (h w) -> b q h w", h=height)
