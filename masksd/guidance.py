"""Guidance diagnostics: does the correlation filter pick the patches and words that matter?

CM-MaskSD masks what CLIP's image–text alignment ranks highest: LMVSD scores patch i by
``p_i = v_i · w`` (projected patch token against the sentence's pooled feature), VMLSD scores
word j by ``w_j · v`` (projected word token against the image's pooled feature), and each keeps
the top ``K`` fraction (:class:`~masksd.correlation.CorrelationFilter`). This module measures
that ranking against ground truth:

- :func:`correlation_scores` computes both score maps from a model, with the features the
  branches use, without running the branches;
- :func:`patch_targets` turns a ground-truth mask into per-patch on-target labels;
- :class:`GuidanceMeter` accumulates, over batches and DDP ranks, how well the scores single
  out the target's patches (ROC AUC, share of target patches the filter keeps, top-1 hit) and
  the target's own words (precision of the words the filter keeps), each beside its chance level.

Diagnostics, not the training hot path: these functions read tensor values.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from masksd._checks import check_fraction, check_tensor
from masksd.correlation import CorrelationFilter, token_scores
from masksd.metrics import sum_over_ranks
from masksd.wrapper import MaskSD, check_segmenter, encode_pair, joint_features

__all__ = ["GuidanceMeter", "correlation_scores", "patch_targets"]


def patch_targets(masks: torch.Tensor, grid: tuple[int, int], min_share: float = 0.5) -> torch.Tensor:
    """Which patches of a (gh, gw) grid lie mostly inside the ground-truth mask.

    masks: (B, 1, H, W) or (B, H, W), bool or float in [0, 1] (a float pixel counts by its
    value); H and W must be multiples of gh and gw. Returns (B, gh·gw) bool, True where the
    mask's share of the patch's pixels is greater than ``min_share``, in row-major patch
    order (that of ``rearrange(x, "b c h w -> b (h w) c")``, the order of ViT patch tokens).
    """
    check_tensor("masks", masks, dims=(3, 4))
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W) or (B, H, W), got shape {tuple(masks.shape)}")
        masks = masks[:, 0]  # (B, H, W)
    if masks.dtype != torch.bool and not masks.is_floating_point():
        raise TypeError(f"masks must be bool or floating point, got dtype {masks.dtype}")
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be two positive ints (gh, gw), got {grid!r}")
    check_fraction("min_share", min_share, low_open=False)
    if min_share == 1:
        raise ValueError("min_share must be in [0, 1): no patch can hold more than all of its pixels")
    gh, gw = grid
    height, width = masks.shape[-2:]
    if height % gh or width % gw:
        raise ValueError(
            f"masks of size (H, W)={(height, width)} must be multiples of grid={(gh, gw)}; "
            "resize the masks to the model input first"
        )
    patches = rearrange(masks.double(), "b (gh ph) (gw pw) -> b (gh gw) (ph pw)", gh=gh, gw=gw)  # (B, N, P)
    return patches.mean(dim=-1) > min_share  # (B, N)


@torch.no_grad()
def correlation_scores(model: nn.Module, images: Any, texts: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scores CM-MaskSD's correlation filters rank, for one batch.

    ``model``: a :class:`~masksd.MaskSD` or a bare :class:`~masksd.MaskableSegmenter` (never
    wrapped, e.g. a pretrained CLIP before training); ``images``, ``texts``: what the segmenter
    takes. Embeds and encodes each modality once, in the model's current train/eval mode, and
    scores local tokens against the other modality's pooled token exactly as
    :class:`~masksd.CorrelationFilter` does (float32 dot products). Returns

    - patch_scores (B, N) float32: ``visual.tokens · text.pooled`` (LMVSD's ranking);
    - word_scores (B, L) float32: ``text.tokens · visual.pooled`` (VMLSD's ranking);
    - word_candidates (B, L) bool: the text tokens VMLSD may select (``embed_text``'s candidates;
      all True when it marks none).
    """
    segmenter = model.segmenter if isinstance(model, MaskSD) else model
    check_segmenter(segmenter)
    _, text_embedded, visual, text = encode_pair(segmenter, images, texts)
    patches, sentence = joint_features("lmvsd", visual, text)  # (B, N, D), (B, D)
    words, image = joint_features("vmlsd", text, visual)  # (B, L, D), (B, D)
    patch_scores = token_scores(sentence, patches)  # (B, N): what LMVSD ranks
    word_scores = token_scores(image, words)  # (B, L): what VMLSD ranks
    candidates = text_embedded.candidates
    if candidates is None:
        candidates = torch.ones(word_scores.shape, dtype=torch.bool, device=word_scores.device)
    return patch_scores, word_scores, candidates


# Layout of GuidanceMeter.state (float64 sums over samples).
_FIELDS = (
    "patch_seen",  # samples passed to update_patches
    "lmvsd_samples",  # ... with at least one on-target patch: count toward kept and top-1
    "kept",  # Σ share of on-target patches the filter keeps
    "kept_chance",  # Σ count / N (expected kept share of a random selection of that count)
    "top1",  # Σ [top-1 patch is on target]
    "top1_chance",  # Σ n_on / N
    "lmvsd_auc_samples",  # samples with at least one on- and one off-target patch
    "auc",  # Σ ROC AUC
    "word_seen",  # samples passed to update_words
    "vmlsd_samples",  # ... with at least one candidate word
    "precision",  # Σ share of selected words that are relevant
    "precision_chance",  # Σ relevant / candidates
)
_INDEX = {name: i for i, name in enumerate(_FIELDS)}


class GuidanceMeter:
    """Accumulates how well the correlation scores pick the target's patches and words.

    ``update_patches(scores, on_target)`` (LMVSD side) and ``update_words(scores, candidates,
    relevant)`` (VMLSD side) add a batch; ``compute()`` returns the means over samples, each
    beside its chance level. Scores are compared in float32, as :class:`CorrelationFilter`
    compares them, and the filter's own selection (``ceil(K·n)`` tokens, ties to the lower
    index) decides what counts as kept. Sums are float64; when ``torch.distributed`` is
    initialised, ``compute()`` sums them over ranks (a collective: every rank must call it)
    without changing the local state.
    """

    def __init__(self, top_k_image: float = 0.5, top_k_text: float = 0.5) -> None:
        self.image_filter = CorrelationFilter(top_k_image)  # checks top_k_image in (0, 1]
        self.text_filter = CorrelationFilter(top_k_text)
        self.state = torch.zeros(len(_FIELDS), dtype=torch.float64)

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self.state.zero_()

    def _add(self, **sums: float) -> None:
        for name, value in sums.items():
            self.state[_INDEX[name]] += value

    def update_patches(self, scores: torch.Tensor, on_target: torch.Tensor) -> None:
        """scores: (B, N) float, one per patch (e.g. from :func:`correlation_scores`);
        on_target: (B, N) bool (e.g. from :func:`patch_targets`).

        Per sample: the ROC AUC of on- against off-target scores (ties count 1/2; only samples
        with both kinds of patch), the share of on-target patches among the ``ceil(K·N)`` the
        filter keeps, and whether the top-scoring patch is on target (only samples with an
        on-target patch).
        """
        scores = _check_scores("scores", scores)
        on_target = _check_labels("on_target", on_target, scores)
        batch, length = scores.shape
        n_on = on_target.sum(dim=1).double()  # (B,)
        kept = self.image_filter.select_scores(scores)  # (B, N)
        count = kept.sum(dim=1).double()  # (B,) = ceil(K·N)
        has_target = n_on > 0
        kept_share = (kept & on_target).sum(dim=1).double() / n_on.clamp(min=1)  # (B,)
        top1 = on_target.gather(1, scores.argmax(dim=1, keepdim=True))[:, 0].double()  # argmax: first of ties
        auc, has_both = _roc_auc(scores, on_target)  # (B,), (B,)
        self._add(
            patch_seen=batch,
            lmvsd_samples=has_target.sum().item(),
            kept=kept_share[has_target].sum().item(),
            kept_chance=(count / length)[has_target].sum().item(),
            top1=top1[has_target].sum().item(),
            top1_chance=(n_on / length)[has_target].sum().item(),
            lmvsd_auc_samples=has_both.sum().item(),
            auc=auc[has_both].sum().item(),
        )

    def update_words(self, scores: torch.Tensor, candidates: torch.Tensor, relevant: torch.Tensor) -> None:
        """scores: (B, L) float, one per text token; candidates: (B, L) bool, the tokens the
        filter may select (real words); relevant: (B, L) bool within ``candidates``, the tokens of
        the target's own phrase. A sample without relevant tokens still counts (precision 0,
        chance 0); one without candidates does not.

        Per sample: the share of relevant tokens among the ``ceil(K·n)`` candidates the filter
        keeps, against chance = relevant / candidates.
        """
        scores = _check_scores("scores", scores)
        candidates = _check_labels("candidates", candidates, scores)
        relevant = _check_labels("relevant", relevant, scores)
        outside = (relevant & ~candidates).any(dim=1).nonzero().flatten().tolist()
        if outside:
            raise ValueError(f"relevant must lie within candidates; samples {outside} mark non-candidate tokens relevant")
        n_candidates = candidates.sum(dim=1).double()  # (B,)
        kept = self.text_filter.select_scores(scores, candidates)  # (B, L)
        precision = (kept & relevant).sum(dim=1).double() / kept.sum(dim=1).double().clamp(min=1)  # (B,)
        chance = relevant.sum(dim=1).double() / n_candidates.clamp(min=1)  # (B,)
        has_words = n_candidates > 0
        self._add(
            word_seen=scores.shape[0],
            vmlsd_samples=has_words.sum().item(),
            precision=precision[has_words].sum().item(),
            precision_chance=chance[has_words].sum().item(),
        )

    def global_state(self) -> torch.Tensor:
        """The state summed over ranks when ``torch.distributed`` is initialised (a
        collective), else a copy of the local state. float64 (12,)."""
        return sum_over_ranks(self.state)

    def compute(self) -> dict[str, float]:
        """Means over samples as fractions in [0, 1], and the sample counts (ints).

        After ``update_patches``: ``lmvsd_auc`` (chance 0.5), ``lmvsd_kept`` beside
        ``lmvsd_kept_chance`` (≈ K), ``lmvsd_top1`` beside ``lmvsd_top1_chance`` (the mean
        on-target share), ``lmvsd_samples`` and ``lmvsd_auc_samples``. After ``update_words``:
        ``vmlsd_precision`` beside ``vmlsd_chance``, ``vmlsd_samples``. Only the sides that were
        updated appear; a mean without a counted sample is NaN.
        """
        s = dict(zip(_FIELDS, self.global_state().tolist()))
        if s["patch_seen"] == 0 and s["word_seen"] == 0:
            raise ValueError("GuidanceMeter.compute() needs data; update_patches/update_words were never called (on any rank)")

        def mean(name: str, samples: str) -> float:
            return s[name] / s[samples] if s[samples] > 0 else float("nan")

        out: dict[str, float] = {}
        if s["patch_seen"] > 0:
            out.update(
                lmvsd_auc=mean("auc", "lmvsd_auc_samples"),
                lmvsd_kept=mean("kept", "lmvsd_samples"),
                lmvsd_kept_chance=mean("kept_chance", "lmvsd_samples"),
                lmvsd_top1=mean("top1", "lmvsd_samples"),
                lmvsd_top1_chance=mean("top1_chance", "lmvsd_samples"),
                lmvsd_samples=int(s["lmvsd_samples"]),
                lmvsd_auc_samples=int(s["lmvsd_auc_samples"]),
            )
        if s["word_seen"] > 0:
            out.update(
                vmlsd_precision=mean("precision", "vmlsd_samples"),
                vmlsd_chance=mean("precision_chance", "vmlsd_samples"),
                vmlsd_samples=int(s["vmlsd_samples"]),
            )
        return out


def _roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ROC AUC of positive against negative scores, ties counting 1/2 (Mann–Whitney U
    from mid-ranks). scores: (B, N); positive: (B, N) bool. Returns AUC float64 (B,) (0 where
    undefined) and (B,) bool, True where a row has both a positive and a negative."""
    values = scores.double()
    ordered = values.sort(dim=1).values  # (B, N)
    below = torch.searchsorted(ordered, values, side="left").double()  # (B, N) scores strictly lower
    not_above = torch.searchsorted(ordered, values, side="right").double()  # (B, N) scores lower or equal
    midrank = (below + not_above + 1) / 2  # (B, N) 1-based rank, ties averaged
    n_pos = positive.sum(dim=1).double()
    n_neg = positive.shape[1] - n_pos
    u = (midrank * positive).sum(dim=1) - n_pos * (n_pos + 1) / 2  # (B,) pairs won, ties 1/2
    defined = (n_pos > 0) & (n_neg > 0)
    return torch.where(defined, u / (n_pos * n_neg).clamp(min=1), torch.zeros_like(u)), defined


def _check_scores(name: str, scores: torch.Tensor) -> torch.Tensor:
    check_tensor(name, scores, dims=2, floating=True)
    if scores.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token per sample, got shape {tuple(scores.shape)}")
    scores = scores.detach().float()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} must be finite (as float32), got NaN or infinite values")
    return scores


def _check_labels(name: str, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(labels) or labels.dtype != torch.bool:
        got = f"dtype {labels.dtype}" if torch.is_tensor(labels) else type(labels).__name__
        raise TypeError(f"{name} must be a bool tensor of shape {tuple(scores.shape)} like scores, got {got}")
    if labels.shape != scores.shape:
        raise ValueError(f"{name} must have the shape of scores {tuple(scores.shape)}, got {tuple(labels.shape)}")
    return labels.to(scores.device)
