"""Cross-modality guided masking: replace a random share of the selected tokens with a learnable token (Eq. 4 and 7),
or, at LMVSD's features site, the selected positions of the decode head's visual maps with learnable values, or, at
the input site (MaskRIS's), square pixel patches of the images with a fill value and word ids with the mask id, a
random id or themselves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from masksd._checks import check_choice, check_fraction, check_mask, check_tensor
from masksd.config import Draw

__all__ = ["FeatureMapMasker", "GuidedMasker", "PixelPatchMasker", "WordIdMasker", "choose_masked", "mask_counts", "patch_grid"]


def mask_counts(ratio: float, n_candidates: torch.Tensor, min_count: int = 0) -> torch.Tensor:
    """round(ratio * n_candidates) per sample, halves rounded up (0.5 -> 1, 2.5 -> 3), and, unless
    ratio is 0 (no masking asked for), at least min(min_count, n_candidates).

    n_candidates: (B,) integer counts. Returns (B,) int64.
    """
    # floor(x + 0.5) with slack so that 0.1 * 5 = 0.5 counts as a half, not just below it.
    counts = torch.floor(ratio * n_candidates.double() + 0.5 + 1e-9).long()
    return torch.maximum(counts, n_candidates.long().clamp(max=min_count)) if min_count and ratio > 0 else counts


def choose_masked(
    candidates: torch.Tensor,
    ratio: float,
    min_count: int = 0,
    generator: torch.Generator | None = None,
    draw: Draw = "count",
) -> torch.Tensor:
    """Which candidates a branch masks. ``draw="count"``: a uniformly random ``mask_counts(ratio, n_candidates,
    min_count)`` of each sample's candidates. ``draw="bernoulli"``: each candidate independently with probability
    ``ratio``, and, unless ratio is 0, at least ``min(min_count, n_candidates)`` (the lowest-keyed ones, so the
    extra ones are uniformly random too).

    candidates: (B, N) bool. Returns (B, N) bool, True at the chosen positions (draws one (B, N) uniform).
    """
    if draw == "bernoulli":
        return _choose_bernoulli(candidates, ratio, min_count, generator)
    batch, length = candidates.shape
    # A uniform random order over the candidates: non-candidates get keys above every candidate's.
    keys = torch.rand((batch, length), generator=generator, device=candidates.device)  # (B, N) in [0, 1)
    keys = keys.masked_fill(~candidates, 2.0)
    order = keys.argsort(dim=1)  # (B, N)
    counts = mask_counts(ratio, candidates.sum(dim=1), min_count)  # (B,)
    take = torch.arange(length, device=candidates.device) < counts[:, None]  # (B, N) by rank
    return torch.zeros_like(candidates).scatter(1, order, take)  # (B, N)


def _choose_bernoulli(candidates: torch.Tensor, ratio: float, min_count: int, generator: torch.Generator | None) -> torch.Tensor:
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device)  # (B, N) in [0, 1)
    chosen = candidates & (keys < ratio)  # (B, N)
    if not min_count or ratio == 0:
        return chosen
    # the min_count lowest keys among the candidates: those a larger ratio would have drawn first
    order = keys.masked_fill(~candidates, 2.0).argsort(dim=1)  # (B, N)
    least = candidates.sum(dim=1).clamp(max=min_count)  # (B,)
    take = torch.arange(candidates.shape[1], device=candidates.device) < least[:, None]  # (B, N) by rank
    return chosen | torch.zeros_like(candidates).scatter(1, order, take)


def _check_ratio_and_count(ratio: float, min_count: int, draw: str) -> None:
    check_fraction("ratio", ratio, low_open=False)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
    check_choice("draw", draw, get_args(Draw))


def _init_like_mask_token(x: torch.Tensor) -> None:
    # Truncate at two standard deviations (torch's default bounds are ±2 absolute, i.e. no truncation here).
    nn.init.trunc_normal_(x, std=0.02, a=-0.04, b=0.04)


class GuidedMasker(nn.Module):
    """Replaces ``round(ratio * n_candidates)`` randomly chosen candidate tokens
    per sample (at least ``min_count`` where a sample has that many, unless ratio
    is 0) with one learnable mask token of size ``dim`` (with ``draw="bernoulli"``:
    each candidate with probability ``ratio``, see :func:`choose_masked`).

    All other positions are returned bit-identical. The token is initialised
    from a normal (std 0.02) truncated at ±2 std and receives gradient through every
    position it replaces.
    """

    def __init__(self, dim: int, ratio: float, min_count: int = 0, draw: Draw = "count"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        _check_ratio_and_count(ratio, min_count, draw)
        self.dim = dim
        self.ratio = float(ratio)
        self.min_count = min_count
        self.draw = draw
        self.mask_token = nn.Parameter(torch.empty(dim))
        _init_like_mask_token(self.mask_token)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}, min_count={self.min_count}" + _draw_repr(self.draw)

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
        applied = choose_masked(candidates, self.ratio, self.min_count, generator, self.draw)  # (B, N)

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

    def __init__(
        self, grid: tuple[int, int], shapes: Sequence[tuple[int, int, int]], ratio: float, min_count: int = 0, draw: Draw = "count"
    ):
        super().__init__()
        grid = tuple(grid)
        if len(grid) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
            raise ValueError(f"grid must be (h, w) of positive ints, got {grid!r}")
        shapes = tuple(tuple(shape) for shape in shapes)
        if not shapes or any(len(s) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in s) for s in shapes):
            raise ValueError(f"shapes must be a non-empty sequence of (C, h, w) of positive ints, got {shapes!r}")
        _check_ratio_and_count(ratio, min_count, draw)
        self.grid, self.shapes = grid, shapes
        self.ratio = float(ratio)
        self.min_count = min_count
        self.draw = draw
        self.maps = nn.ParameterList([nn.Parameter(torch.empty(shape)) for shape in shapes])
        for values in self.maps:
            _init_like_mask_token(values)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, shapes={self.shapes}, ratio={self.ratio}, min_count={self.min_count}" + _draw_repr(self.draw)

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
        applied = choose_masked(candidates, self.ratio, self.min_count, generator, self.draw)  # (B, N)
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


def _draw_repr(draw: str) -> str:
    return "" if draw == "count" else f", draw={draw!r}"


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """(h, w) of the square pixel patches covering an image of ``height`` x ``width`` pixels (the last row and
    column cut to the image where the size is not a multiple)."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


class PixelPatchMasker(nn.Module):
    """LMVSD at the input site (MaskRIS's image masking): fills square ``patch_size`` pixel patches of the images
    with ``fill`` (0.0: the mean colour of normalised images, as MaskRIS). Which patches: :func:`choose_masked`
    among the selected ones (all, at K = 1). No parameters; every other pixel is returned bit-identical."""

    def __init__(self, patch_size: int, fill: float, ratio: float, min_count: int = 0, draw: Draw = "count"):
        super().__init__()
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
            raise ValueError(f"fill must be a finite number, got {fill!r}")
        _check_ratio_and_count(ratio, min_count, draw)
        self.patch_size, self.fill = patch_size, float(fill)
        self.ratio, self.min_count, self.draw = float(ratio), min_count, draw

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, fill={self.fill}, ratio={self.ratio}, min_count={self.min_count}" + _draw_repr(self.draw)

    def grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the patch grid of (B, C, H, W) ``pixels``."""
        return patch_grid(pixels.shape[-2], pixels.shape[-1], self.patch_size)

    def mask(
        self, pixels: torch.Tensor, selected: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels: (B, C, H, W) float; selected: (B, h·w) bool patches that may be masked (None: all).

        Returns ``(masked pixels (B, C, H, W), applied (B, h·w) bool)``, patches in row-major order."""
        check_tensor("pixels", pixels, dims=4, floating=True)
        height, width = self.grid(pixels)
        selected = check_mask("selected", selected, (pixels.shape[0], height * width), pixels.device)
        applied = choose_masked(selected, self.ratio, self.min_count, generator, self.draw)  # (B, h·w)
        return self.replace(pixels, applied), applied

    def replace(self, pixels: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, C, H, W) with the ``applied`` (B, h·w) patches filled."""
        return pixels.masked_fill(self.cover(pixels, applied), self.fill)

    def cover(self, pixels: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool: the pixels of the ``applied`` (B, h·w) patches of ``pixels`` (B, C, H, W)."""
        height, width = self.grid(pixels)
        cover = repeat(applied.view(-1, height, width), "b h w -> b 1 (h p) (w q)", p=self.patch_size, q=self.patch_size)
        return cover[..., : pixels.shape[-2], : pixels.shape[-1]]  # (B, 1, H, W)


class WordIdMasker(nn.Module):
    """VMLSD at the input site (MaskRIS's text masking, BERT's recipe): of the drawn words (:func:`choose_masked`
    among the candidates), a share ``replacement[0]`` becomes ``mask_token_id``, a share ``replacement[1]`` a
    uniformly random id in [0, vocab_size) other than the ``special_ids``, the rest keep their id. No parameters.

    A random [SEP], [PAD] or CLIP end-of-text id would change the sentence's structure (CLIP pools at the first
    end-of-text id; a model may derive its padding mask from the ids), not just one word, so none is drawn.
    """

    def __init__(
        self,
        mask_token_id: int | None,
        vocab_size: int | None,
        replacement: tuple[float, float],
        ratio: float,
        min_count: int = 0,
        draw: Draw = "count",
        special_ids: Sequence[int] = (),
    ):
        super().__init__()
        to_mask, to_random = replacement
        check_fraction("replacement[0]", to_mask, low_open=False)
        check_fraction("replacement[1]", to_random, low_open=False)
        if to_mask + to_random > 1 + 1e-9:
            raise ValueError(f"replacement shares must add up to at most 1, got {tuple(replacement)}")
        for name, value, needed in (("mask_token_id", mask_token_id, to_mask > 0), ("vocab_size", vocab_size, to_random > 0)):
            if needed and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 when its replacement share is above 0, got {value!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in special_ids):
            raise ValueError(f"special_ids must be ints, got {special_ids!r}")
        # the special ids inside the vocabulary, ascending: random draws step over them (see mask)
        self.special_ids = tuple(sorted({i for i in special_ids if vocab_size and 0 <= i < vocab_size}))
        if to_random > 0 and vocab_size - len(self.special_ids) <= 0:
            raise ValueError(f"vocab_size must leave a word that is not special to draw random words, got vocab_size={vocab_size} "
                             f"with {len(self.special_ids)} special ids in it")
        _check_ratio_and_count(ratio, min_count, draw)
        self.mask_token_id, self.vocab_size = mask_token_id, vocab_size
        self.replacement = (float(to_mask), float(to_random))
        self.ratio, self.min_count, self.draw = float(ratio), min_count, draw

    def extra_repr(self) -> str:
        return (f"mask_token_id={self.mask_token_id}, vocab_size={self.vocab_size}, replacement={self.replacement}, "
                f"ratio={self.ratio}, min_count={self.min_count}" + _draw_repr(self.draw))

    def mask(
        self, ids: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: (B, L) integer token ids; candidates: (B, L) bool words that may be drawn.

        Returns ``(new ids (B, L), drawn (B, L) bool)``: ``drawn`` marks every drawn word, including the share
        that kept its id. Draws three (B, L) tensors from ``generator``: the choice, the share, the random ids."""
        check_tensor("ids", ids, dims=2)
        if ids.is_floating_point():
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        candidates = check_mask("candidates", candidates, tuple(ids.shape), ids.device)
        drawn = choose_masked(candidates, self.ratio, self.min_count, generator, self.draw)  # (B, L)
        share = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, L): which replacement
        to_mask, to_random = self.replacement
        out = ids
        if to_mask > 0:
            out = out.masked_fill(drawn & (share < to_mask), self.mask_token_id)
        if to_random > 0:
            random_ids = self._random_words(ids, generator)  # (B, L)
            chosen = drawn & (share >= to_mask) & (share < to_mask + to_random)
            out = torch.where(chosen, random_ids, out)
        return out, drawn

    def _random_words(self, ids: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, L) ids drawn uniformly from the vocabulary without the special ids: the r-th non-special id is
        r stepped past each special id at or below it (ascending; Python ints, so no tensor is copied per step)."""
        high = self.vocab_size - len(self.special_ids)
        words = torch.randint(high, ids.shape, generator=generator, device=ids.device, dtype=ids.dtype)  # (B, L)
        for special in self.special_ids:
            words = words + (words >= special).to(words.dtype)
        return words
