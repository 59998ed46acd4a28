"""From ViT block outputs to one text-conditioned map: the ViT pyramid and CRIS's fusion neck (its "FPN")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["ViTPyramid", "FusionNeck", "CoordConv", "conv_bn_relu"]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU, CRIS's basic unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CoordConv(nn.Module):
    """conv_bn_relu over the input with two extra channels holding its x and y coordinates in [-1, 1].

    ``fast``: the convolution of the coordinate channels is computed once, on one (1, 2, h, w) map, and
    added to the convolution of the input's own channels: the same function (convolution is linear in its
    input channels), reassociated, without concatenating a (B, C + 2, h, w) copy whose C + 2 channels
    misalign tensor-core tiles. Off: the concatenation every stored run computed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, fast: bool = False):
        super().__init__()
        self.conv = conv_bn_relu(in_channels + 2, out_channels, kernel_size)
        self.fast = fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
        coords = torch.stack([grid_x, grid_y])[None]  # (1, 2, h, w)
        if not self.fast:
            return self.conv(torch.cat([x, coords.expand(batch, 2, height, width)], dim=1))
        conv, norm_relu = self.conv[0], self.conv[1:]
        weight = conv.weight  # (out, C + 2, k, k)
        image = F.conv2d(x, weight[:, :channels], padding=conv.padding)  # (B, out, h, w)
        position = F.conv2d(coords, weight[:, channels:], padding=conv.padding)  # (1, out, h, w): the same for every sample
        return norm_relu(image + position)


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, h, w) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(rearrange(x, "b c h w -> b h w c"))
        return rearrange(x, "b h w c -> b c h w")


class ViTPyramid(nn.Module):
    """Three same-resolution ViT levels (B, width, g, g) -> maps at 2g, g and g/2 (rounded up).

    For patch 16 those are CRIS's 1/8, 1/16 and 1/32. Each level is layer-normed (the ViT's
    residual stream is unnormalised) and resampled: transposed conv up, 1x1 conv, strided 3x3 conv down.
    """

    def __init__(self, width: int, channels: Sequence[int], deep_width: int | None = None):
        super().__init__()
        low, mid, high = channels
        deep_width = width if deep_width is None else deep_width  # the projected tokens' D for deep_level="projected"
        self.norms = nn.ModuleList([_ChannelNorm(w) for w in (width, width, deep_width)])
        self.up = nn.ConvTranspose2d(width, low, kernel_size=2, stride=2)
        self.same = nn.Conv2d(width, mid, kernel_size=1)
        self.down = nn.Conv2d(deep_width, high, kernel_size=3, stride=2, padding=1)

    def output_shapes(self, grid: tuple[int, int]) -> tuple[tuple[int, int, int], ...]:
        """(C, h, w) of the three maps :meth:`forward` returns for levels on a ``grid`` (h, w) patch grid."""
        height, width = grid
        half = lambda n: (n - 1) // 2 + 1  # noqa: E731  (3x3, stride 2, padding 1: ceil(n / 2))
        return (
            (self.up.out_channels, 2 * height, 2 * width),
            (self.same.out_channels, height, width),
            (self.down.out_channels, half(height), half(width)),
        )

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """levels: three (B, width, g, g) maps, shallow to deep. Returns (B, C_i, ...) at 2g, g, ceil(g/2)."""
        shallow, middle, deep = (norm(x) for norm, x in zip(self.norms, levels))
        return self.up(shallow), self.same(middle), self.down(deep)


class FusionNeck(nn.Module):
    """CRIS's neck: the sentence state gates the deepest level, then top-down and bottom-up fusion
    over 1/8, 1/16, 1/32, aggregation at 1/16 and a CoordConv.

    Input: maps (B, in_i, ...) at 1/8, 1/16, 1/32 and the sentence state (B, text_dim).
    Output: (B, out_channels[1], h/16, w/16). ``fast``: its CoordConv's (see :class:`CoordConv`).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], text_dim: int, fast: bool = False):
        super().__init__()
        in_low, in_mid, in_high = in_channels
        low, mid, high = out_channels
        self.text_proj = nn.Sequential(nn.Linear(text_dim, high, bias=False), nn.BatchNorm1d(high), nn.ReLU(inplace=True))
        self.high_proj = conv_bn_relu(in_high, high, 1)
        self.gate_norm = nn.Sequential(nn.BatchNorm2d(high), nn.ReLU(inplace=True))
        self.mid_proj = conv_bn_relu(in_mid, mid, 3)
        self.mid_fuse = conv_bn_relu(high + mid, mid, 1)
        self.low_proj = conv_bn_relu(in_low, low, 3)
        self.low_fuse = conv_bn_relu(low + mid, mid, 1)
        self.high_out = conv_bn_relu(high, mid, 3)
        self.mid_out = conv_bn_relu(mid, mid, 3)
        self.low_out = conv_bn_relu(mid, mid, 3)
        self.aggregate = conv_bn_relu(3 * mid, mid, 1)
        self.refine = nn.Sequential(CoordConv(mid, mid, 3, fast=fast), conv_bn_relu(mid, mid, 3))

    def forward(self, levels: Sequence[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        v_low, v_mid, v_high = levels
        size = v_mid.shape[-2:]
        state = rearrange(self.text_proj(sentence), "b c -> b c 1 1")
        f_high = self.gate_norm(self.high_proj(v_high) * state)  # (B, high, h/32, w/32): text-gated
        f_mid = self.mid_fuse(torch.cat([self.mid_proj(v_mid), _resize(f_high, size)], dim=1))  # top-down
        f_low = F.adaptive_avg_pool2d(self.low_proj(v_low), size)  # 1/8 -> 1/16
        f_low = self.low_fuse(torch.cat([f_low, f_mid], dim=1))  # bottom-up
        fused = torch.cat([self.low_out(f_low), self.mid_out(f_mid), _resize(self.high_out(f_high), size)], dim=1)
        return self.refine(self.aggregate(fused))  # (B, mid, h/16, w/16)


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
