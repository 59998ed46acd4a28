"""Cross-modality guided masking: replace a random share of the selected tokens with a learnable token (Eq. 4 and 7),
or, at LMVSD's features site, the selected positions of the decode head's visual maps with learnable values."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from masksd._checks import check_fraction, check_mask, check_tensor

__all__ = ["FeatureMapMasker", "GuidedMasker", "choose_masked", "mask_counts"]


def mask_counts(ratio: float, n_candidates: torch.Tensor, min_count: int = 0) -> torch.Tensor:
    """round(ratio * n_candidates) per sample, halves rounded up (0.5 -> 1, 2.5 -> 3), and, unless
    ratio is 0 (no masking asked for), at least min(min_count, n_candidates).

    n_candidates: (B,) integer counts. Returns (B,) int64.
    """
    # floor(x + 0.5) with slack so that 0.1 * 5 = 0.5 counts as a half, not just below it.
    counts = torch.floor(ratio * n_candidates.double() + 0.5 + 1e-9).long()
    return torch.maximum(counts, n_candidates.long().clamp(max=min_count)) if min_count and ratio > 0 else counts


def choose_masked(
    candidates: torch.Tensor, ratio: float, min_count: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniformly random ``mask_counts(ratio, n_candidates, min_count)`` of each sample's candidates.

    candidates: (B, N) bool. Returns (B, N) bool, True at the chosen positions (draws one (B, N) uniform).
    """
    batch, length = candidates.shape
    # A uniform random order over the candidates: non-candidates get keys above every candidate's.
    keys = torch.rand((batch, length), generator=generator, device=candidates.device)  # (B, N) in [0, 1)
    keys = keys.masked_fill(~candidates, 2.0)
    order = keys.argsort(dim=1)  # (B, N)
    counts = mask_counts(ratio, candidates.sum(dim=1), min_count)  # (B,)
    take = torch.arange(length, device=candidates.device) < counts[:, None]  # (B, N) by rank
    return torch.zeros_like(candidates).scatter(1, order, take)  # (B, N)


def _init_like_mask_token(x: torch.Tensor) -> None:
    # Truncate at two standard deviations (torch's default bounds are ±2 absolute, i.e. no truncation here).
    nn.init.trunc_normal_(x, std=0.02, a=-0.04, b=0.04)


class GuidedMasker(nn.Module):
    """Replaces ``round(ratio * n_candidates)`` randomly chosen candidate tokens
    per sample (at least ``min_count`` where a sample has that many, unless ratio
    is 0) with one learnable mask token of size ``dim``.

    All other positions are returned bit-identical. The token is initialised
    from a normal (std 0.02) truncated at ±2 std and receives gradient through every
    position it replaces.
    """

    def __init__(self, dim: int, ratio: float, min_count: int = 0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        check_fraction("ratio", ratio, low_open=False)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
        self.dim = dim
        self.ratio = float(ratio)
        self.min_count = min_count
        self.mask_token = nn.Parameter(torch.empty(dim))
        _init_like_mask_token(self.mask_token)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}, min_count={self.min_count}"

    def mask(
        self,
        embeddings: torch.Tensor,
        candidates: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings: (B, N, C=dim); candidates: (B, N) bool or None (all).

        Returns ``(masked_embeddings (B, N, C), applied (B, N) bool)`` where
        ``applied`` marks the positions that now hold the mask token.
        """
        check_tensor("embeddings", embeddings, dims=3, floating=True)
        batch, length, channels = embeddings.shape
        if channels != self.dim:
            raise ValueError(f"embeddings must have C={self.dim} (the mask token size), got shape {tuple(embeddings.shape)}")
        candidates = check_mask("candidates", candidates, (batch, length), embeddings.device)
        applied = choose_masked(candidates, self.ratio, self.min_count, generator)  # (B, N)

        token = self.mask_token.to(embeddings.dtype).expand_as(embeddings)  # (B, N, C)
        masked = torch.where(applied[..., None], token, embeddings)
        return masked, applied


class FeatureMapMasker(nn.Module):
    """LMVSD at the features site: replaces, in each visual map the decode head reads, the positions of
    ``round(ratio * n_candidates)`` randomly chosen candidate tokens (at least ``min_count``, as
    :class:`GuidedMasker`) with learnable values, one (C, h, w) map of them per level.

    The (B, N) choice lies on the token grid ``grid`` (h0, w0), row-major; each level sees it resized
    to its own (h, w) by nearest neighbour. Every other value is returned bit-identical. The values are
    initialised as the mask token is (normal, std 0.02, truncated at ±2 std) and receive gradient
    through every position they replace.
    """

    def __init__(self, grid: tuple[int, int], shapes: Sequence[tuple[int, int, int]], ratio: float, min_count: int = 0):
        super().__init__()
        grid = tuple(grid)
        if len(grid) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
            raise ValueError(f"grid must be (h, w) of positive ints, got {grid!r}")
        shapes = tuple(tuple(shape) for shape in shapes)
        if not shapes or any(len(s) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in s) for s in shapes):
            raise ValueError(f"shapes must be a non-empty sequence of (C, h, w) of positive ints, got {shapes!r}")
        check_fraction("ratio", ratio, low_open=False)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
        self.grid, self.shapes = grid, shapes
        self.ratio = float(ratio)
        self.min_count = min_count
        self.maps = nn.ParameterList([nn.Parameter(torch.empty(shape)) for shape in shapes])
        for values in self.maps:
            _init_like_mask_token(values)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, shapes={self.shapes}, ratio={self.ratio}, min_count={self.min_count}"

    def mask(
        self,
        maps: Sequence[torch.Tensor],
        candidates: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """maps: one (B, C, h, w) float tensor per level, shaped as ``shapes``; candidates: (B, N) bool,
        N = h0 * w0 of ``grid``.

        Returns ``(masked maps, applied (B, N) bool)``: ``applied`` marks the tokens whose positions now
        hold the learnable values (the same draw :class:`GuidedMasker` makes for these candidates).
        """
        height, width = self.grid
        if not torch.is_tensor(candidates) or candidates.dim() != 2:
            got = f"shape {tuple(candidates.shape)}" if torch.is_tensor(candidates) else type(candidates).__name__
            raise ValueError(f"candidates must be a (B, N={height * width}) bool tensor, got {got}")
        candidates = check_mask("candidates", candidates, (candidates.shape[0], height * width), candidates.device)
        self._check_maps(maps, candidates.shape[0])
        applied = choose_masked(candidates, self.ratio, self.min_count, generator)  # (B, N)
        return self.replace(maps, applied), applied

    def replace(self, maps: Sequence[torch.Tensor], applied: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The maps with the positions of the (B, N) bool ``applied`` tokens, resized to each level, holding the values."""
        batch = applied.shape[0]
        self._check_maps(maps, batch)
        on_grid = applied.view(batch, 1, *self.grid).float()  # (B, 1, h0, w0)
        masked = []
        for x, values in zip(maps, self.maps):
            where = F.interpolate(on_grid, size=x.shape[-2:], mode="nearest").bool()  # (B, 1, h, w)
            masked.append(torch.where(where, values.to(x.dtype), x))  # (B, C, h, w)
        return tuple(masked)

    def _check_maps(self, maps: Sequence[torch.Tensor], batch: int) -> None:
        if isinstance(maps, torch.Tensor) or len(maps) != len(self.shapes):
            raise ValueError(f"maps must be {len(self.shapes)} tensors (B, C, h, w), one per level of {self.shapes}")
        for level, (x, shape) in enumerate(zip(maps, self.shapes)):
            check_tensor(f"maps[{level}]", x, dims=4, floating=True)
            if tuple(x.shape) != (batch, *shape):
                raise ValueError(f"maps[{level}] must have shape (B, C, h, w)={(batch, *shape)}, got {tuple(x.shape)}")
