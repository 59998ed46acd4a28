"""Measure how well a model's guidance picks the referred patches and words: CLIP's joint-space correlation (CRIS,
CLIPSeg), or the segmenter's own relevance where it has no joint space (LAVT's pixel-word attention)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from examples.pipeline.evaluation import autocast
from masksd import MaskSD
from masksd.data.synthetic import target_words
from masksd.guidance import GuidanceMeter, correlation_scores, patch_targets
from masksd.wrapper import encode_pair, relevance_scores

__all__ = ["format_guidance", "guidance_scores", "measure_guidance"]


@torch.no_grad()
def measure_guidance(
    model: torch.nn.Module,
    loader: Iterable[dict],
    tokenize: Callable[[list[str]], torch.Tensor],
    device: torch.device,
    top_k_image: float = 0.5,
    top_k_text: float = 0.5,
    amp: str = "none",
    progress: bool = False,
) -> dict[str, float]:
    """Guidance of ``model`` (``MaskSD(CRIS(...))`` or a bare ``CRIS``) over ``loader``.

    ``loader`` yields collated samples (``masksd.data.collate``, in ``masksd/data/batching.py``: ``image`` (B, 3, S, S),
    ``mask`` (B, 1, S, S), ``text``); ``tokenize`` is ``CRIS.tokenize``. Runs in eval mode
    (restored afterwards) under ``amp`` ("none", "bf16", "fp16") and returns
    :meth:`masksd.guidance.GuidanceMeter.compute` summed over DDP ranks:

    - LMVSD: patches whose pixels lie mostly in ``batch["mask"]`` (at the backbone's patch grid)
      are on target; ``lmvsd_auc``, ``lmvsd_kept`` (vs ``lmvsd_kept_chance`` ≈ ``top_k_image``),
      ``lmvsd_top1`` (vs ``lmvsd_top1_chance``), sample counts;
    - VMLSD, for samples whose text is a synthetic expression (``target_words`` parses it): the
      target's own words are relevant; ``vmlsd_precision`` vs ``vmlsd_chance``, ``vmlsd_samples``.
      Absent when no text in the loader parses.
    """
    segmenter = model.segmenter if isinstance(model, MaskSD) else model
    grid = tuple(segmenter.grid_size)  # (gh, gw) of the ViT's patch tokens
    meter = GuidanceMeter(top_k_image, top_k_text)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="guidance", disable=not progress, leave=False):
            images = batch["image"].to(device, non_blocking=True)
            texts = list(batch["text"])
            tokens = tokenize(texts).to(device, non_blocking=True)
            with autocast(device, amp):
                patch_scores, word_scores, candidates = guidance_scores(segmenter, images, tokens)
            meter.update_patches(patch_scores, patch_targets(batch["mask"], grid).to(patch_scores.device))

            flags = [_target_words_or_none(t) for t in texts] if hasattr(segmenter, "word_mask") else []
            if any(f is not None for f in flags):  # word guidance needs the segmenter's word_mask (CRIS has one)
                # A text outside the grammar has no relevant words: drop its candidates so it does not count.
                parsed = torch.tensor([f is not None for f in flags], device=candidates.device)
                filled = [f if f is not None else [False] * len(t.split()) for f, t in zip(flags, texts)]
                relevant = segmenter.word_mask(texts, tokens, filled).to(candidates.device)  # (B, L)
                meter.update_words(word_scores, candidates & parsed[:, None], relevant)
    finally:
        model.train(was_training)
    return meter.compute()  # VMLSD keys only where some rank saw a synthetic expression


@torch.no_grad()
def guidance_scores(segmenter: torch.nn.Module, images, tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the filters rank, as :func:`masksd.guidance.correlation_scores` returns it: the joint-space correlation,
    or, for a segmenter without a joint space that scores its own tokens (LAVT), its ``relevance`` (patch scores on
    the patch grid, word scores per position) with the text's candidates."""
    if not callable(getattr(segmenter, "relevance", None)):
        return correlation_scores(segmenter, images, tokens)
    image_embedded, text_embedded, visual, text = encode_pair(segmenter, images, tokens)
    if visual.tokens is not None and text.pooled is not None:
        return correlation_scores(segmenter, images, tokens)
    patches = relevance_scores("lmvsd", segmenter.relevance("lmvsd", visual, text), tuple(image_embedded.tokens.shape[:2]),
                               image_embedded.grid)  # (B, N)
    words = relevance_scores("vmlsd", segmenter.relevance("vmlsd", visual, text), tuple(text_embedded.tokens.shape[:2]), None)
    candidates = text_embedded.candidates if text_embedded.candidates is not None else torch.ones_like(words, dtype=torch.bool)
    return patches.float(), words.float(), candidates


def _target_words_or_none(text: str) -> list[bool] | None:
    try:
        return target_words(text)
    except ValueError:
        return None


def format_guidance(guidance: dict[str, float]) -> str:
    """A Markdown table of :func:`measure_guidance`'s result, each value beside its chance level."""
    rows = [("LMVSD ROC AUC, target vs other patches", "lmvsd_auc", None),
            ("LMVSD share of the target's patches kept", "lmvsd_kept", "lmvsd_kept_chance"),
            ("LMVSD top-1 patch on the target", "lmvsd_top1", "lmvsd_top1_chance"),
            ("VMLSD share of kept words that are the target's", "vmlsd_precision", "vmlsd_chance")]
    lines = ["| guidance | value | chance |", "| --- | ---: | ---: |"]
    for label, key, chance in rows:
        if key in guidance:
            level = "0.500" if chance is None else f"{guidance[chance]:.3f}"
            lines.append(f"| {label} | {guidance[key]:.3f} | {level} |")
    samples = ", ".join(f"{k} {guidance[k]}" for k in ("lmvsd_samples", "vmlsd_samples") if k in guidance)
    return "\n".join(lines) + f"\n\n({samples})"
