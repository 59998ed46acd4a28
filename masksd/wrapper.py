"""MaskSD: wraps a segmenter with the LMVSD and VMLSD masked self-distillation branches."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from masksd.adapter import (
    Embeddings,
    FeatureMapLayout,
    Features,
    check_decode_head,
    check_embeddings,
    check_feature_maps,
    check_features,
    check_head_logits,
    missing_feature_maps,
)
from masksd._checks import check_finite_values, check_nonempty
from masksd.config import BranchConfig, MaskSDConfig
from masksd.correlation import CorrelationFilter
from masksd.loss import SelfDistillLoss, check_mask_values, segmentation_loss
from masksd.masking import FeatureMapMasker, GuidedMasker, choose_masked

__all__ = ["MaskSDOutput", "MaskSD", "DistillBranch", "bare_state_dict", "check_segmenter", "encode_pair", "frozen_norm_stats"]


@dataclass
class MaskSDOutput:
    """What a training step of :class:`MaskSD` returns."""

    loss: torch.Tensor
    """Scalar total: seg + λ1·lmvsd + λ2·vmlsd (the λ are inside the branch losses)."""
    seg_loss: torch.Tensor
    """Scalar BCE of the main prediction against the ground truth."""
    logits: torch.Tensor
    """(B, 1, h, w) main-branch mask logits."""
    lmvsd_loss: torch.Tensor | None = None
    """Scalar λ1-weighted LMVSD loss; None when the branch is off."""
    vmlsd_loss: torch.Tensor | None = None
    """Scalar λ2-weighted VMLSD loss; None when the branch is off."""
    image_masked: torch.Tensor | None = None
    """(B, N) bool: image tokens the LMVSD branch replaced by the mask token."""
    text_masked: torch.Tensor | None = None
    """(B, L) bool: text tokens the VMLSD branch replaced by the mask token."""

    def parts(self) -> dict[str, float]:
        """The losses as Python floats, for logging (synchronises with the device)."""
        named = {"loss": self.loss, "seg": self.seg_loss, "lmvsd": self.lmvsd_loss, "vmlsd": self.vmlsd_loss}
        return {k: float(v.detach()) for k, v in named.items() if v is not None}


class DistillBranch(nn.Module):
    """Correlation filter, masker, loss and (when weights are not shared) decode head of one branch.

    At ``site="embedding"`` the masker is a :class:`GuidedMasker` (one mask token of size ``dim``); at
    ``site="features"`` a :class:`FeatureMapMasker` of the maps ``layout`` describes (then required).
    """

    def __init__(
        self,
        config: BranchConfig,
        dim: int,
        wrapper: MaskSDConfig,
        head: nn.Module | None,
        layout: FeatureMapLayout | None = None,
    ):
        super().__init__()
        config.require_resolved()
        self.site = config.site
        if self.site == "features" and not isinstance(layout, FeatureMapLayout):
            raise TypeError(f"site='features' needs the segmenter's FeatureMapLayout as layout, got {type(layout).__name__}")
        self.layout = layout if self.site == "features" else None
        self.filter = CorrelationFilter(config.top_k, config.select)
        if not wrapper.masking:
            self.masker = None
        elif self.site == "features":
            self.masker = FeatureMapMasker(layout.grid, layout.shapes, config.ratio, config.min_masked)
        else:
            self.masker = GuidedMasker(dim, config.ratio, config.min_masked)
        self.criterion = SelfDistillLoss(
            config.weight, target=wrapper.target, threshold=wrapper.threshold, supervision=wrapper.supervision,
            teacher_gradient=wrapper.teacher_gradient,
        )
        self.head = head

    def perturb(
        self,
        embedded: Embeddings,
        query: torch.Tensor,
        features: Features,
        generator: torch.Generator | None,
    ) -> tuple[Embeddings, torch.Tensor]:
        """Mask the embeddings at the tokens whose features correlate most with ``query`` (B, D).

        Returns the masked embeddings and the (B, N) bool mask of replaced tokens. A sample without
        candidates is left unmasked (:meth:`MaskSD.check_inputs` reports such samples on request).
        """
        selected = self.filter.select(query, features.tokens, embedded.candidates)  # (B, N)
        if self.masker is None:
            return embedded, torch.zeros_like(selected)
        tokens, applied = self.masker.mask(embedded.tokens, selected, generator=generator)
        return replace(embedded, tokens=tokens), applied

    def choose_positions(
        self,
        candidates: torch.Tensor | None,
        query: torch.Tensor,
        features: Features,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The features site's draw: the (B, N) bool image tokens whose positions :meth:`replace_maps` fills,
        chosen among those the filter keeps for ``query`` (B, D) (``candidates``: the image embeddings'
        (B, N) mask or None); none without masking. The same draw as :meth:`perturb` makes."""
        selected = self.filter.select(query, features.tokens, candidates)  # (B, N)
        if self.masker is None:
            return torch.zeros_like(selected)
        return choose_masked(selected, self.masker.ratio, self.masker.min_count, generator)

    def replace_maps(self, maps: object, applied: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decode head's (B, C, h, w) ``maps`` (checked against the layout) with the ``applied`` tokens'
        positions holding the branch's learnable values (unchanged without masking)."""
        maps = check_feature_maps(maps, self.layout, applied.shape[0], "segmenter.decode_head.feature_maps")
        return maps if self.masker is None else self.masker.replace(maps, applied)


class MaskSD(nn.Module):
    """Cross-modality masked self-distillation around a :class:`~masksd.adapter.MaskableSegmenter`.

    Training (``model.train()``): ``forward(images, texts, ground_truth)`` runs
    the main branch once and each enabled branch on masked embeddings, reusing
    every unmasked feature: the image encoder runs twice (main, LMVSD), the
    text encoder twice (main, VMLSD), the decode head three times. Returns a
    :class:`MaskSDOutput`.

    With ``lmvsd.site="features"`` LMVSD re-encodes nothing: it replaces the selected positions of the
    decode head's visual maps (:class:`~masksd.adapter.FeatureMapHead`, which the segmenter must
    implement; a TypeError says so at construction) and decodes them, so the image encoder runs once.

    Inference (``model.eval()``): ``forward(images, texts)`` returns exactly
    ``segmenter(images, texts)``; the branches cost nothing.
    """

    def __init__(self, segmenter: nn.Module, config: MaskSDConfig | None = None):
        super().__init__()
        check_segmenter(segmenter)
        config = MaskSDConfig() if config is None else config
        if not isinstance(config, MaskSDConfig):
            raise TypeError(f"config must be a MaskSDConfig, got {type(config).__name__}")
        self.segmenter = segmenter
        self.config = config
        self.branches = nn.ModuleDict()
        for name, branch, dim in (
            ("lmvsd", config.lmvsd, segmenter.image_embed_dim),
            ("vmlsd", config.vmlsd, segmenter.text_embed_dim),
        ):
            if not branch.enabled:
                continue
            layout = None
            if branch.site == "features":
                missing = missing_feature_maps(segmenter)
                if missing:
                    raise TypeError(
                        f"{name}.site='features' needs a segmenter whose decode head exposes the visual maps it reads "
                        f"(masksd.adapter.FeatureMapHead); {type(segmenter).__name__} lacks {missing}. "
                        f"Use {name}.site='embedding' for it."
                    )
                layout = segmenter.feature_map_layout
            head = None if config.share_weights else copy.deepcopy(segmenter.decode_head)
            self.branches[name] = DistillBranch(branch, dim, config, head, layout)

    def forward(
        self,
        images: Any,
        texts: Any,
        ground_truth: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        distill_scale: float = 1.0,
    ) -> MaskSDOutput | torch.Tensor:
        """images, texts: whatever the segmenter takes; ground_truth: (B, [1,] H, W) float mask.

        ``generator`` (optional) drives the random choice of masked tokens. ``distill_scale`` (ours,
        not the paper's) multiplies both branch losses, for a schedule that ramps them up once the
        main branch is a useful teacher; 1 is the paper's constant λ.
        """
        if not self.training:
            return self.segmenter(images, texts)
        if ground_truth is None:
            raise ValueError("ground_truth is required in training mode (call .eval() for inference)")
        seg = self.segmenter
        image_embedded, text_embedded, visual, text = self._encode(images, texts)

        batch = image_embedded.tokens.shape[0]
        logits = check_head_logits(seg.decode_head(visual, text), "segmenter.decode_head", batch)  # (B, 1, h, w)
        seg_loss = segmentation_loss(logits, ground_truth, check_values=False)  # values: check_inputs
        out = MaskSDOutput(loss=seg_loss, seg_loss=seg_loss, logits=logits)

        if "lmvsd" in self.branches and self.branches["lmvsd"].site == "features":  # masked maps; nothing re-encoded
            branch = self.branches["lmvsd"]
            head = self._head(branch)
            out.image_masked = branch.choose_positions(image_embedded.candidates, text.pooled, visual, generator)
            # the maps are recomputed inside the branch's pass: its BatchNorm and checkpointing settings cover them;
            # head and branch bound now, as a checkpoint recomputes after the names below are rebound
            decode = lambda a, head=head, branch=branch: head.decode_maps(  # noqa: E731
                branch.replace_maps(head.feature_maps(visual), a), visual, text
            )
            student = self._run_branch(decode, out.image_masked, batch)
            out.lmvsd_loss = distill_scale * branch.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.lmvsd_loss
        elif "lmvsd" in self.branches:  # sentence-guided masking of image patches; text features reused
            branch = self.branches["lmvsd"]
            masked, out.image_masked = branch.perturb(image_embedded, text.pooled, visual, generator)
            head = self._head(branch)
            student = self._run_branch(lambda m, head=head: head(seg.encode_image(m), text), masked, batch)  # head bound now
            out.lmvsd_loss = distill_scale * branch.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.lmvsd_loss

        if "vmlsd" in self.branches:  # image-guided masking of words; visual features reused
            branch = self.branches["vmlsd"]
            masked, out.text_masked = branch.perturb(text_embedded, visual.pooled, text, generator)
            head = self._head(branch)
            student = self._run_branch(lambda m: head(visual, seg.encode_text(m)), masked, batch)
            out.vmlsd_loss = distill_scale * branch.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.vmlsd_loss

        return out

    def _run_branch(self, decode: Callable[[Any], torch.Tensor], masked: Any, batch: int) -> torch.Tensor:
        logits = self._decode_branch(decode, masked)
        return check_head_logits(logits, "segmenter.decode_head", batch)  # (B, 1, h, w)

    def _decode_branch(self, decode: Callable[[Any], torch.Tensor], masked: Any) -> torch.Tensor:
        """A masked branch's encoder pass (none at the features site) and decode: ``decode(masked)`` ->
        (B, 1, h, w) logits for masked embeddings or maps, with
        BatchNorm statistics left alone under ``branch_norm_stats="freeze"``, and recomputed in the
        backward pass (dropout replayed, statistics not updated twice) under ``checkpoint_branches``."""
        freeze = self.config.branch_norm_stats == "freeze"
        with frozen_norm_stats(self) if freeze else contextlib.nullcontext():
            if not self.config.checkpoint_branches:
                return decode(masked)
            # The recomputation must save what the forward saved (same BatchNorm mode) and leave the
            # running statistics as the forward left them.
            recompute = (lambda: frozen_norm_stats(self)) if freeze else (lambda: restored_norm_stats(self))
            return checkpoint(
                decode, masked, use_reentrant=False, preserve_rng_state=True,
                context_fn=lambda: (contextlib.nullcontext(), recompute()),
            )

    @torch.no_grad()
    def check_inputs(self, images: Any, texts: Any, ground_truth: torch.Tensor | None = None) -> None:
        """The checks of tensor values that a training step skips, so that it never waits for the device.

        Raises a ValueError naming the argument (and the samples) when ``images`` (a tensor) is an empty
        batch or holds NaN or ±inf, when ``ground_truth`` holds NaN or lies outside [0, 1] (a {0, 255} mask:
        divide by 255), when an enabled branch has samples without a candidate token (an empty text?), or
        when the segmenter's own ``check_inputs(images, texts)`` (if it defines one) finds a problem.
        Call it on the first batch of each epoch and whenever inputs come from a new source: the training
        forward checks shapes only (reading values would wait for the device in every step).
        """
        seg = self.segmenter
        if torch.is_tensor(images):
            check_nonempty("images", images)
            check_finite_values("images", images)
        if callable(getattr(seg, "check_inputs", None)):
            seg.check_inputs(images, texts)
        if ground_truth is not None:
            check_mask_values("ground_truth", ground_truth)
        for name, embed in (("lmvsd", seg.embed_image), ("vmlsd", seg.embed_text)):
            if name not in self.branches:
                continue
            candidates = embed(images if name == "lmvsd" else texts).candidates
            if candidates is not None and not bool(candidates.any(dim=1).all()):
                empty = (~candidates.any(dim=1)).nonzero().flatten().tolist()
                raise ValueError(
                    f"samples {empty} have no candidate token for {name} to mask (an empty text?): "
                    f"the segmenter's embed_{'image' if name == 'lmvsd' else 'text'} marked none"
                )

    @torch.no_grad()
    def masked_tokens(
        self, images: Any, texts: Any, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which image tokens (B, N) and text tokens (B, L) the LMVSD and VMLSD branches would
        replace for this batch (None for a branch that is off), without running the branches.
        For inspection and figures; runs in the module's current train/eval mode."""
        image_embedded, text_embedded, visual, text = self._encode(images, texts)
        image_masked = text_masked = None
        if "lmvsd" in self.branches and self.branches["lmvsd"].site == "features":
            image_masked = self.branches["lmvsd"].choose_positions(image_embedded.candidates, text.pooled, visual, generator)
        elif "lmvsd" in self.branches:
            image_masked = self.branches["lmvsd"].perturb(image_embedded, text.pooled, visual, generator)[1]
        if "vmlsd" in self.branches:
            text_masked = self.branches["vmlsd"].perturb(text_embedded, visual.pooled, text, generator)[1]
        return image_masked, text_masked

    def _encode(self, images: Any, texts: Any) -> tuple[Embeddings, Embeddings, Features, Features]:
        return encode_pair(self.segmenter, images, texts)

    def _head(self, branch: DistillBranch) -> Callable[[Features, Features], torch.Tensor]:
        return self.segmenter.decode_head if branch.head is None else branch.head


def encode_pair(segmenter: nn.Module, images: Any, texts: Any) -> tuple[Embeddings, Embeddings, Features, Features]:
    """Embed and encode both modalities once, checking what the segmenter returns (errors name the method).

    Returns (image embeddings, text embeddings, visual features, text features).
    """
    image_embedded = segmenter.embed_image(images)
    check_embeddings(image_embedded, segmenter.image_embed_dim, "segmenter.embed_image")
    text_embedded = segmenter.embed_text(texts)
    check_embeddings(text_embedded, segmenter.text_embed_dim, "segmenter.embed_text")
    batch = image_embedded.tokens.shape[0]
    if text_embedded.tokens.shape[0] != batch:
        raise ValueError(f"images and texts have different batch sizes: {batch} and {text_embedded.tokens.shape[0]}")

    visual = segmenter.encode_image(image_embedded)
    check_features(visual, image_embedded.tokens, "segmenter.encode_image")
    text = segmenter.encode_text(text_embedded)
    check_features(text, text_embedded.tokens, "segmenter.encode_text")
    if visual.pooled.shape[-1] != text.pooled.shape[-1]:
        raise ValueError(
            f"visual and text features must share the joint dim D for the correlation, "
            f"got {visual.pooled.shape[-1]} and {text.pooled.shape[-1]}"
        )
    return image_embedded, text_embedded, visual, text


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s BatchNorm layers (SyncBatchNorm included) normalise training
    batches with their batch statistics, as usual, but leave the running statistics and
    ``num_batches_tracked`` untouched (``track_running_stats`` is off, then restored)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


@contextlib.contextmanager
def restored_norm_stats(module: nn.Module) -> Iterator[None]:
    """Within the block BatchNorm layers update their running statistics as usual; afterwards
    ``module``'s are put back as they were (for a recomputation that must not count twice)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        for norm, mean, var, count in saved:  # through .data: the recomputed graph may still hold the buffers
            norm.running_mean.data.copy_(mean)
            norm.running_var.data.copy_(var)
            norm.num_batches_tracked.data.copy_(count)


def bare_state_dict(state: Mapping[str, torch.Tensor], prefix: str = "segmenter.") -> dict[str, torch.Tensor]:
    """The bare segmenter's weights from a MaskSD state dict (``model.state_dict()``, or a training
    checkpoint's ``"model"``): the entries under ``prefix``, without it. The branches' mask tokens (or
    feature-site maps) and separate heads are dropped: inference never uses them. Load the result with
    ``segmenter.load_state_dict(...)``; ``prefix="segmenter.towers."`` gives the towers' own model keys."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state dict (a mapping of names to tensors), got {type(state).__name__}")
    bare = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not bare:
        raise ValueError(f"state holds no key under {prefix!r} (first keys: {list(state)[:3]}): not a MaskSD state dict?")
    return bare


def check_segmenter(segmenter: object) -> None:
    """Raise a TypeError/ValueError unless ``segmenter`` implements :class:`~masksd.MaskableSegmenter`."""
    if not isinstance(segmenter, nn.Module):
        raise TypeError(f"segmenter must be an nn.Module, got {type(segmenter).__name__}")
    required = ("image_embed_dim", "text_embed_dim", "decode_head", "embed_image", "encode_image", "embed_text", "encode_text")
    missing = [name for name in required if not hasattr(segmenter, name)]
    if missing:
        raise TypeError(
            f"segmenter {type(segmenter).__name__} does not implement masksd.MaskableSegmenter; missing: {missing}"
        )
    check_decode_head(segmenter.decode_head, "segmenter.decode_head")
    for name in ("image_embed_dim", "text_embed_dim"):
        value = getattr(segmenter, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"segmenter.{name} must be a positive int, got {value!r}")

