"""Correlation filtering: keep the tokens most related to the other modality (paper Eq. 3 and 6), ranked by
the joint-space dot product (:func:`token_scores`), by the main branch's own prediction (:func:`prediction_scores`)
or by scores a segmenter gives, on the tokens' grid or a coarser one that tiles it (:func:`spread_scores`)."""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from masksd._checks import check_choice, check_fraction, check_mask, check_tensor
from masksd.config import Select

__all__ = ["CorrelationFilter", "prediction_scores", "spread_scores", "token_scores", "topk_counts"]

# Slack for products like 0.1 * 30 = 3.0000000000000004, which must count as 3, not 4.
_COUNT_EPS = 1e-6


def topk_counts(fraction: float, n_valid: torch.Tensor) -> torch.Tensor:
    """ceil(fraction * n_valid) per sample, at least 1 where n_valid > 0 and 0 where n_valid == 0.

    n_valid: (B,) integer counts. Returns (B,) int64.
    """
    counts = torch.ceil(fraction * n_valid.double() - _COUNT_EPS).long()
    return torch.where(n_valid > 0, counts.clamp(min=1), torch.zeros_like(counts))


class CorrelationFilter(nn.Module):
    """Selects, per sample, the ``top_k`` fraction of valid tokens with the highest
    (``select="top"``, the paper) or lowest (``select="bottom"``, AMLRIS's direction)
    dot product with a query from the other modality.

    The score of token i is ``p_i = tokens_i · query``. Exactly
    ``ceil(top_k * n_valid)`` valid tokens are selected (at least one when
    ``n_valid > 0``, none when ``n_valid == 0``); ties are broken towards the
    lower index. Selection is a discrete choice: no gradient flows through it.
    """

    def __init__(self, top_k: float, select: Select = "top"):
        super().__init__()
        check_fraction("top_k", top_k, low_open=True)
        check_choice("select", select, get_args(Select))
        self.top_k = float(top_k)
        self.direction = select  # not `select`: that name is the method

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, select={self.direction!r}"

    @torch.no_grad()
    def select(self, query: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """query: (B, C); tokens: (B, N, C); valid: (B, N) bool or None (all valid).

        Returns a (B, N) bool tensor, True at the selected tokens.
        """
        check_tensor("tokens", tokens, dims=3, floating=True)
        check_tensor("query", query, dims=2, floating=True)
        batch, length, channels = tokens.shape
        if query.shape != (batch, channels):
            raise ValueError(
                f"query must have shape (B, C)={(batch, channels)} to match tokens {tuple(tokens.shape)}, "
                f"got {tuple(query.shape)}"
            )
        return self.select_scores(token_scores(query, tokens), valid)

    @torch.no_grad()
    def select_scores(self, scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The same selection on precomputed scores: scores (B, N) float; valid (B, N) bool or None.

        Returns a (B, N) bool tensor, True at the ``ceil(top_k * n_valid)`` highest-scoring valid tokens
        (lowest-scoring for ``select="bottom"``). A NaN score ranks last among the valid tokens, in either
        direction, and an invalid token is never selected, whatever the valid ones score (-inf included).
        """
        check_tensor("scores", scores, dims=2, floating=True)
        batch, length = scores.shape
        valid = check_mask("valid", valid, (batch, length), scores.device)
        scores = scores.float() if self.direction == "top" else -scores.float()  # the least correlated rank first
        # NaN and -inf (a hook's "never") rank below every finite score but above the invalid tokens' -inf:
        # sorted first, a NaN would be chosen before real scores; tied with -inf, an invalid token could be chosen
        lowest = torch.finfo(torch.float32).min
        scores = scores.nan_to_num(nan=lowest, posinf=float("inf"), neginf=lowest).masked_fill(~valid, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)  # (B, N) token indices, chosen first
        counts = topk_counts(self.top_k, valid.sum(dim=1))  # (B,)
        take = torch.arange(length, device=scores.device) < counts[:, None]  # (B, N) by rank
        return torch.zeros_like(valid).scatter(1, order, take)


def token_scores(query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p_i = tokens_i · query in float32 (paper Eq. 3 and 6): query (B, C), tokens (B, N, C) -> (B, N)."""
    return torch.einsum("bnc,bc->bn", tokens.float(), query.float())


def spread_scores(scores: torch.Tensor, coarse: tuple[int, int], fine: tuple[int, int]) -> torch.Tensor:
    """Scores on a coarse grid spread to the fine grid's tokens each coarse cell covers (nearest, i.e. repeat).

    scores: (B, h'·w') or (B, h', w') on ``coarse`` (h', w'), which must tile ``fine`` (h, w).
    Returns (B, h·w) in row-major order of the fine grid."""
    (hc, wc), (hf, wf) = coarse, fine
    if hf % hc or wf % wc:
        raise ValueError(f"coarse grid {coarse} does not tile the fine grid {fine} (h % h' and w % w' must be 0)")
    if scores.shape[1:] not in ((hc * wc,), (hc, wc)):
        raise ValueError(f"scores must have shape (B, {hc * wc}) or (B, {hc}, {wc}) on the grid {coarse}, got {tuple(scores.shape)}")
    on_grid = scores.reshape(-1, hc, wc)  # (B, h', w')
    return repeat(on_grid, "b h w -> b (h p w q)", p=hf // hc, q=wf // wc)  # (B, h·w)


def prediction_scores(
    logits: torch.Tensor, grid: tuple[int, int], patch_size: int | None = None, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The main branch's predicted mask as scores for LMVSD's ``guidance="prediction"``: sigmoid of the detached
    (B, 1, h, w) logits, average-pooled onto the token ``grid`` (gh, gw). Returns (B, gh·gw) float32, row-major.

    With ``patch_size`` and ``image_size`` (H, W) (the input site's pixel patches, whose last row and column are cut
    to the image): the prediction resized to the image (bilinear, as the loss resizes), then averaged over each
    patch's own pixels, so that a cut patch is scored by what lies on it and not by an even split of the map."""
    check_tensor("logits", logits, dims=4, floating=True)
    probs = torch.sigmoid(logits.detach().float())  # (B, 1, h, w)
    if patch_size is None:
        return F.adaptive_avg_pool2d(probs, grid).flatten(1)  # (B, gh·gw)
    (height, width), (gh, gw) = image_size, grid
    if tuple(probs.shape[-2:]) != (height, width):
        probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)  # (B, 1, H, W)
    pad = (0, gw * patch_size - width, 0, gh * patch_size - height)  # up to whole patches, with zeros
    sums = F.avg_pool2d(F.pad(probs, pad), patch_size)  # (B, 1, gh, gw): patch sums / patch area
    share = F.avg_pool2d(F.pad(torch.ones_like(probs[:1]), pad), patch_size)  # (1, 1, gh, gw): real pixels / area
    return (sums / share).flatten(1)  # (B, gh·gw)
