"""LAVT's simple multi-scale decoder as a masksd decode head: the four stages' multimodal maps, fused top-down."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from examples.lavt.fusion import WordAttention
from masksd import Features

__all__ = ["LAVTDecodeHead", "LAVTVisualContext"]


class LAVTVisualContext(NamedTuple):
    """``Features.context`` of the visual features :meth:`LAVT.encode` returns."""

    maps: tuple[torch.Tensor, ...]
    """(B, C_s, h_s, w_s) each stage's normalised multimodal features, stage 1 (1/4 of the input) first."""
    attention: tuple[WordAttention, ...]
    """Each stage's pixel-word attention (detached), for :meth:`LAVT.relevance`."""
    words: torch.Tensor
    """(B, L) bool: the real words (not [CLS], [SEP] or padding), whose attention relevance reads."""
    image_size: tuple[int, int]
    """(H, W) of the input, the size of the logits."""


def _block(channels_in: int, channels: int) -> nn.Sequential:
    """Two 3x3 convolutions, each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
    )


class LAVTDecodeHead(nn.Module):
    """``head(visual, text)`` -> (B, 1, H, W) mask logits at the input size, from ``visual.context``
    (a :class:`LAVTVisualContext`); ``text`` is not read (LAVT's words act inside the encoder).

    Stage 4 is upsampled to stage 3 and the two concatenated through two 3x3 conv-BN-ReLU layers of
    ``stage_dims[3] // 2`` channels; that result joins stage 2, then stage 1, the same way; a 1x1 convolution
    gives the logit map, bilinearly upsampled to the input (LAVT's ``SimpleDecoding``; LAVT's two-class
    softmax output is one logit here, trained with masksd's binary cross-entropy).
    """

    def __init__(self, stage_dims: tuple[int, int, int, int]):
        super().__init__()
        c1, c2, c3, c4 = stage_dims
        hidden = c4 // 2
        self.fuse = nn.ModuleList([_block(c4 + c3, hidden), _block(hidden + c2, hidden), _block(hidden + c1, hidden)])
        self.classify = nn.Conv2d(hidden, 1, 1)

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        return self.decode_maps(self.feature_maps(visual), visual, text)

    def feature_maps(self, visual: Features) -> tuple[torch.Tensor, ...]:
        """The four stages' (B, C_s, h_s, w_s) multimodal maps, what the rest of the head decodes (masksd's
        ``FeatureMapHead``: LMVSD's features site replaces positions of these)."""
        context = visual.context
        if not isinstance(context, LAVTVisualContext) or len(context.maps) != 4:
            raise TypeError(f"visual.context must be a LAVTVisualContext with four stage maps (from LAVT.encode), got {type(context).__name__}")
        return context.maps

    def decode_maps(self, maps: Sequence[torch.Tensor], visual: Features, text: Features) -> torch.Tensor:
        """(B, 1, H, W) logits from the four stage maps (``visual`` gives the input size only)."""
        x = maps[3]  # (B, C4, H/32, W/32)
        for block, skip in zip(self.fuse, (maps[2], maps[1], maps[0])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skip], dim=1))  # (B, hidden, h_s, w_s)
        logits = self.classify(x)  # (B, 1, H/4, W/4)
        return F.interpolate(logits, size=visual.context.image_size, mode="bilinear", align_corners=True)  # (B, 1, H, W)
