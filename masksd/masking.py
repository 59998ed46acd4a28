"""Cross-modality guided masking: replace a random share of the selected tokens with a learnable token (Eq. 4 and 7)."""

from __future__ import annotations

import torch
from torch import nn

from masksd._checks import check_fraction, check_mask, check_tensor

__all__ = ["GuidedMasker", "mask_counts"]


def mask_counts(ratio: float, n_candidates: torch.Tensor, min_count: int = 0) -> torch.Tensor:
    """round(ratio * n_candidates) per sample, halves rounded up (0.5 -> 1, 2.5 -> 3), and, unless
    ratio is 0 (no masking asked for), at least min(min_count, n_candidates).

    n_candidates: (B,) integer counts. Returns (B,) int64.
    """
    # floor(x + 0.5) with slack so that 0.1 * 5 = 0.5 counts as a half, not just below it.
    counts = torch.floor(ratio * n_candidates.double() + 0.5 + 1e-9).long()
    return torch.maximum(counts, n_candidates.long().clamp(max=min_count)) if min_count and ratio > 0 else counts


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
        # Truncate at two standard deviations (torch's default bounds are ±2 absolute, i.e. no truncation here).
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

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

        # A uniform random order over the candidates: non-candidates get keys above every candidate's.
        keys = torch.rand((batch, length), generator=generator, device=embeddings.device)  # (B, N) in [0, 1)
        keys = keys.masked_fill(~candidates, 2.0)
        order = keys.argsort(dim=1)  # (B, N)
        counts = mask_counts(self.ratio, candidates.sum(dim=1), self.min_count)  # (B,)
        take = torch.arange(length, device=embeddings.device) < counts[:, None]  # (B, N) by rank
        applied = torch.zeros_like(candidates).scatter(1, order, take)  # (B, N)

        token = self.mask_token.to(embeddings.dtype).expand_as(embeddings)  # (B, N, C)
        masked = torch.where(applied[..., None], token, embeddings)
        return masked, applied
