"""MaskSD: wraps a segmenter with the LMVSD and VMLSD masked self-distillation branches."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from masksd._checks import check_mask
from masksd.adapter import (
    Embeddings,
    FeatureMapLayout,
    Features,
    check_decode_head,
    check_embeddings,
    check_feature_maps,
    check_features,
    check_head_logits,
    check_tiling,
    is_fused,
    missing_feature_maps,
    missing_protocol,
)
from masksd._checks import check_finite_values, check_nonempty
from masksd.config import BranchConfig, BranchName, MaskSDConfig
from masksd.correlation import CorrelationFilter, prediction_scores, spread_scores, token_scores
from masksd.inputs import InputSpec
from masksd.loss import SelfDistillLoss, check_mask_values, segmentation_loss
from masksd.masking import FeatureMapMasker, GuidedMasker, PixelPatchMasker, WordIdMasker, choose_masked, patch_grid

__all__ = [
    "MaskSDOutput", "MaskSD", "DistillBranch", "MainPass", "bare_state_dict", "check_segmenter", "encode_pair",
    "frozen_norm_stats", "joint_features",
]

ADAPTER_HINT = (
    "write an adapter: subclass masksd.SegmenterAdapter and implement embed_image/embed_text and "
    "encode_image/encode_text (or encode, for encoders that read each other), see docs/integrations.md"
)
"""Where every refusal of a segmenter that lacks a part of the protocol points."""


@dataclass
class MaskSDOutput:
    """What a training step of :class:`MaskSD` returns."""

    loss: torch.Tensor
    """Scalar total: seg + λ1·lmvsd + λ2·vmlsd (the λ are inside the branch losses); with ``views="combined"``,
    seg + (λ1 + λ2)·combined."""
    seg_loss: torch.Tensor
    """Scalar BCE of the main prediction against the ground truth."""
    logits: torch.Tensor
    """(B, 1, h, w) main-branch mask logits."""
    lmvsd_loss: torch.Tensor | None = None
    """Scalar λ1-weighted LMVSD loss; None when the branch is off (or its view is the combined one)."""
    vmlsd_loss: torch.Tensor | None = None
    """Scalar λ2-weighted VMLSD loss; None when the branch is off (or its view is the combined one)."""
    image_masked: torch.Tensor | None = None
    """(B, N) bool: image tokens the LMVSD branch replaced by the mask token (at ``site="input"``: the
    (B, h·w) pixel patches it filled, row-major)."""
    text_masked: torch.Tensor | None = None
    """(B, L) bool: text tokens the VMLSD branch replaced by the mask token (at ``site="input"``: the words
    it drew, including the share that kept its id)."""
    combined_loss: torch.Tensor | None = None
    """Scalar (λ1 + λ2)-weighted loss of the combined view (``views="combined"``); None otherwise."""

    def parts(self) -> dict[str, float]:
        """The losses as Python floats, for logging (synchronises with the device)."""
        named = {"loss": self.loss, "seg": self.seg_loss, "lmvsd": self.lmvsd_loss, "vmlsd": self.vmlsd_loss,
                 "combined": self.combined_loss}
        return {k: float(v.detach()) for k, v in named.items() if v is not None}


@dataclass
class MainPass:
    """What the main branch computed once and the masked branches reuse."""

    images: Any
    texts: Any
    image_embedded: Embeddings | None
    """None for a segmenter wrapped at the input site only (no adapter)."""
    text_embedded: Embeddings | None
    visual: Features | None
    text: Features | None
    logits: torch.Tensor | None
    """(B, 1, h, w); None where it was not needed (:meth:`MaskSD.masked_tokens` without prediction guidance)."""


class DistillBranch(nn.Module):
    """Correlation filter, masker, loss and (when weights are not shared) decode head of one branch.

    The masker follows the site: ``"embedding"`` a :class:`GuidedMasker` (one mask token of size ``dim``),
    ``"features"`` a :class:`FeatureMapMasker` of the maps ``layout`` describes (then required), ``"input"`` a
    :class:`PixelPatchMasker` (LMVSD) or :class:`WordIdMasker` (VMLSD) from ``inputs``. None without masking.
    """

    def __init__(
        self,
        config: BranchConfig,
        dim: int | None,
        wrapper: MaskSDConfig,
        head: nn.Module | None,
        layout: FeatureMapLayout | None = None,
        inputs: InputSpec | None = None,
        name: BranchName = "lmvsd",
    ):
        super().__init__()
        config.require_resolved()
        self.site, self.guidance = config.site, config.guidance
        if self.site == "features" and not isinstance(layout, FeatureMapLayout):
            raise TypeError(f"site='features' needs the segmenter's FeatureMapLayout as layout, got {type(layout).__name__}")
        self.layout = layout if self.site == "features" else None
        self.filter = CorrelationFilter(config.top_k, config.select)
        masking = (config.ratio, config.min_masked, config.draw)
        if not wrapper.masking:
            self.masker = None
        elif self.site == "features":
            self.masker = FeatureMapMasker(layout.grid, layout.shapes, *masking)
        elif self.site == "input":
            inputs = InputSpec() if inputs is None else inputs
            self.masker = (PixelPatchMasker(inputs.patch_size, inputs.fill, *masking) if name == "lmvsd" else
                           WordIdMasker(inputs.mask_token_id, inputs.vocab_size, inputs.word_replacement, *masking,
                                        special_ids=inputs.special_token_ids))
        else:
            self.masker = GuidedMasker(dim, *masking)
        self.criterion = SelfDistillLoss(
            config.weight, target=wrapper.target, threshold=wrapper.threshold, supervision=wrapper.supervision,
            teacher_gradient=wrapper.teacher_gradient,
        )
        self.head = head

    @property
    def reads_scores(self) -> bool:
        """Whether selection ranks tokens at all: K = 1 keeps every candidate and reads no score."""
        return self.filter.top_k < 1

    def replace_maps(self, maps: object, applied: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decode head's (B, C, h, w) ``maps`` (checked against the layout) with the ``applied`` tokens'
        positions holding the branch's learnable values (unchanged without masking)."""
        maps = check_feature_maps(maps, self.layout, applied.shape[0], "segmenter.decode_head.feature_maps")
        return maps if self.masker is None else self.masker.replace(maps, applied)


class CombinedView(nn.Module):
    """MaskRIS's one masked view (``views="combined"``): both enabled branches' modalities masked in one pass,
    distilled at the sum of their λ, decoded with the segmenter's head or (``share_weights=False``) ``head``."""

    def __init__(self, weight: float, wrapper: MaskSDConfig, head: nn.Module | None):
        super().__init__()
        self.criterion = SelfDistillLoss(
            weight, target=wrapper.target, threshold=wrapper.threshold, supervision=wrapper.supervision,
            teacher_gradient=wrapper.teacher_gradient,
        )
        self.head = head


class MaskSD(nn.Module):
    """Cross-modality masked self-distillation around a :class:`~masksd.adapter.MaskableSegmenter`.

    Training (``model.train()``): ``forward(images, texts, ground_truth)`` runs
    the main branch once and each enabled branch on masked embeddings, reusing
    every unmasked feature: the image encoder runs twice (main, LMVSD), the
    text encoder twice (main, VMLSD), the decode head three times. Returns a
    :class:`MaskSDOutput`.

    A fused segmenter (:class:`~masksd.adapter.FusedSegmenter`, whose ``encode`` reads both modalities) is
    re-encoded whole in each branch with only that branch's modality masked: ``encode`` runs three times.

    With ``lmvsd.site="features"`` LMVSD re-encodes nothing: it replaces the selected positions of the
    decode head's visual maps (:class:`~masksd.adapter.FeatureMapHead`, which the segmenter must
    implement; a TypeError says so at construction) and decodes them, so the image encoder runs once.

    At ``site="input"`` a branch masks pixel patches or word ids of the inputs (found and replaced as
    ``inputs``, a :class:`~masksd.InputSpec`, says) and re-runs the model on them; where every enabled branch
    masks at the inputs, the segmenter needs no adapter, only ``forward(images, texts) -> (B, 1, h, w)``.
    ``config.views="combined"`` runs one extra pass with both modalities masked instead of one per branch.

    Inference (``model.eval()``): ``forward(images, texts)`` returns exactly
    ``segmenter(images, texts)``; the branches cost nothing.
    """

    def __init__(self, segmenter: nn.Module, config: MaskSDConfig | None = None, inputs: InputSpec | None = None):
        super().__init__()
        config = MaskSDConfig() if config is None else config
        if not isinstance(config, MaskSDConfig):
            raise TypeError(f"config must be a MaskSDConfig, got {type(config).__name__}")
        if inputs is not None and not isinstance(inputs, InputSpec):
            raise TypeError(f"inputs must be a masksd.InputSpec, got {type(inputs).__name__}")
        enabled = {name: config.branch(name) for name in ("lmvsd", "vmlsd") if config.branch(name).enabled}
        at_inputs_only = all(branch.site == "input" for branch in enabled.values())
        # with the adapter protocol MaskSD runs the segmenter's pieces, even at the input site; without, only its forward
        self.adapted = check_segmenter(segmenter, required=not at_inputs_only)
        self.fused = self.adapted and is_fused(segmenter)
        self.segmenter = segmenter
        self.config = config
        self.inputs = InputSpec() if inputs is None else inputs
        if not self.adapted and not config.share_weights:
            raise TypeError(f"share_weights=False copies segmenter.decode_head for each branch, and {type(segmenter).__name__} "
                            f"exposes none: keep share_weights=True, or {ADAPTER_HINT}")
        combined = config.views == "combined" and bool(enabled)
        self.branches = nn.ModuleDict()
        for name, branch in enabled.items():
            self._check_branch(name, branch)
            layout = segmenter.feature_map_layout if branch.site == "features" else None
            dim = getattr(segmenter, "image_embed_dim" if name == "lmvsd" else "text_embed_dim", None)
            head = None if config.share_weights or combined else copy.deepcopy(segmenter.decode_head)
            self.branches[name] = DistillBranch(branch, dim, config, head, layout, self.inputs, name)
        if combined:
            head = None if config.share_weights else copy.deepcopy(segmenter.decode_head)
            self.combined = CombinedView(sum(branch.weight for branch in enabled.values()), config, head)
        else:
            self.combined = None

    def _check_branch(self, name: BranchName, branch: BranchConfig) -> None:
        """Refuse, by name, a branch the segmenter or the inputs cannot support."""
        segmenter = self.segmenter
        if branch.site == "features":
            missing = missing_feature_maps(segmenter)
            if missing:
                raise TypeError(
                    f"{name}.site='features' needs a segmenter whose decode head exposes the visual maps it reads "
                    f"(masksd.adapter.FeatureMapHead); {type(segmenter).__name__} lacks {missing}. "
                    f"Use {name}.site='embedding' for it."
                )
        if branch.guidance == "segmenter" and branch.top_k < 1 and not callable(getattr(segmenter, "relevance", None)):
            raise TypeError(
                f"{name}.guidance='segmenter' needs segmenter.relevance(branch, visual, text) -> per-token scores, which "
                f"{type(segmenter).__name__} lacks: implement it in your adapter (docs/integrations.md), or use "
                f"{name}.guidance='joint'" + (" or 'prediction'" if name == "lmvsd" else "") + f", or {name}.top_k=1"
            )
        if branch.site == "input" and name == "vmlsd" and self.config.masking:
            spec, (to_mask, to_random) = self.inputs, self.inputs.word_replacement
            if to_mask > 0 and spec.mask_token_id is None:
                raise ValueError(
                    f"vmlsd.site='input' replaces {to_mask:.0%} of the drawn words by the tokenizer's mask id, and "
                    "inputs.mask_token_id is None (CLIP's tokenizer has no mask token): pass "
                    "inputs=masksd.InputSpec.from_tokenizer(tokenizer) for a tokenizer with one (BERT's [MASK]), give "
                    "InputSpec(mask_token_id=...) an id to stand for it, or mask the words with a learnable mask token "
                    "at vmlsd.site='embedding' (docs/method.md)"
                )
            if to_random > 0 and not spec.vocab_size:
                raise ValueError(f"vmlsd.site='input' replaces {to_random:.0%} of the drawn words by random ids, and "
                                 "inputs.vocab_size is not set: use InputSpec.from_tokenizer(tokenizer) or give vocab_size")
            if not spec.special_token_ids:
                raise ValueError("vmlsd.site='input' needs inputs.special_token_ids: with none, [CLS], [SEP] and padding "
                                 "ids would be masked like words; use InputSpec.from_tokenizer(tokenizer) or list them")

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
        main = self._main_pass(images, texts)
        logits = main.logits
        batch = logits.shape[0]
        seg_loss = segmentation_loss(logits, ground_truth, check_values=False)  # values: check_inputs
        out = MaskSDOutput(loss=seg_loss, seg_loss=seg_loss, logits=logits)

        if self.combined is not None:  # MaskRIS: one pass with every enabled branch's modality masked
            image, out.image_masked = self._perturb("lmvsd", main, generator) if "lmvsd" in self.branches else (None, None)
            text, out.text_masked = self._perturb("vmlsd", main, generator) if "vmlsd" in self.branches else (None, None)
            decode = partial(self._decode_view, self._head(self.combined), main)
            student = self._run_branch(decode, (image, text), batch)
            out.combined_loss = distill_scale * self.combined.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.combined_loss
            return out

        if "lmvsd" in self.branches and self.branches["lmvsd"].site == "features":  # masked maps; nothing re-encoded
            branch = self.branches["lmvsd"]
            head = self._head(branch)
            out.image_masked = self._feature_positions(main, generator)
            visual, text = main.visual, main.text
            # the maps are recomputed inside the branch's pass: its BatchNorm and checkpointing settings cover them;
            # head and branch bound now, as a checkpoint recomputes after the names below are rebound
            decode = lambda a, head=head, branch=branch: head.decode_maps(  # noqa: E731
                branch.replace_maps(head.feature_maps(visual), a), visual, text
            )
            student = self._run_branch(decode, (out.image_masked,), batch)
            out.lmvsd_loss = distill_scale * branch.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.lmvsd_loss
        elif "lmvsd" in self.branches:  # sentence-guided masking of image patches; text features reused (towers)
            branch = self.branches["lmvsd"]
            masked, out.image_masked = self._perturb("lmvsd", main, generator)
            student = self._run_branch(partial(self._decode_view, self._head(branch), main), (masked, None), batch)
            out.lmvsd_loss = distill_scale * branch.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.lmvsd_loss

        if "vmlsd" in self.branches:  # image-guided masking of words; visual features reused (towers)
            branch = self.branches["vmlsd"]
            masked, out.text_masked = self._perturb("vmlsd", main, generator)
            student = self._run_branch(partial(self._decode_view, self._head(branch), main), (None, masked), batch)
            out.vmlsd_loss = distill_scale * branch.criterion(student, logits, ground_truth, check_values=False)
            out.loss = out.loss + out.vmlsd_loss

        return out

    # -- the main pass and the masked views
    def _main_pass(self, images: Any, texts: Any, decode: bool = True) -> MainPass:
        """Embed, encode and (``decode``) decode both modalities once; a segmenter wrapped at the inputs only
        runs its own forward."""
        if not self.adapted:
            logits = check_head_logits(self.segmenter(images, texts), type(self.segmenter).__name__)  # (B, 1, h, w)
            return MainPass(images, texts, None, None, None, None, logits)
        image_embedded, text_embedded, visual, text = encode_pair(self.segmenter, images, texts)
        logits = None
        if decode:
            batch = image_embedded.tokens.shape[0]
            logits = check_head_logits(self.segmenter.decode_head(visual, text), "segmenter.decode_head", batch)  # (B, 1, h, w)
        return MainPass(images, texts, image_embedded, text_embedded, visual, text, logits)

    def _decode_view(self, head: Callable | None, main: MainPass, image: Any, text: Any) -> torch.Tensor:
        """(B, 1, h, w) logits of one masked view. ``image``/``text``: None (the main pass's, reused), masked
        Embeddings (embedding site) or masked inputs (input site: embedded here, inside the branch's pass)."""
        seg = self.segmenter
        if not self.adapted:
            return seg(main.images if image is None else image, main.texts if text is None else text)
        if image is not None and not isinstance(image, Embeddings):
            image = seg.embed_image(image)
        if text is not None and not isinstance(text, Embeddings):
            text = seg.embed_text(text)
        if self.fused:  # encoders that read each other re-run whole, with only this view's modalities masked
            visual, words = seg.encode(main.image_embedded if image is None else image, main.text_embedded if text is None else text)
        else:
            visual = main.visual if image is None else seg.encode_image(image)
            words = main.text if text is None else seg.encode_text(text)
        return head(visual, words)

    def _perturb(self, name: BranchName, main: MainPass, generator: torch.Generator | None) -> tuple[Any, torch.Tensor]:
        """Branch ``name``'s masked input: (masked Embeddings or masked inputs, (B, N) bool of what it replaced).
        A sample without candidates is left unmasked (:meth:`check_inputs` reports such samples on request)."""
        branch = self.branches[name]
        if branch.site == "input" and name == "lmvsd":
            pixels = self.inputs.pixels(main.images)  # (B, C, H, W)
            grid = patch_grid(pixels.shape[-2], pixels.shape[-1], self.inputs.patch_size)
            selected = self._select(name, main, None, (pixels.shape[0], grid[0] * grid[1]), grid, pixels.device,
                                    image_size=tuple(pixels.shape[-2:]))
            if branch.masker is None:
                return main.images, torch.zeros_like(selected)
            masked, applied = branch.masker.mask(pixels, selected, generator)
            return self.inputs.with_pixels(main.images, masked), applied
        if branch.site == "input":
            ids = self.inputs.ids(main.texts)  # (B, L)
            candidates = self.inputs.word_candidates(main.texts)  # (B, L); K = 1 at the input site
            if branch.masker is None:
                return main.texts, torch.zeros_like(candidates)
            masked, drawn = branch.masker.mask(ids, candidates, generator)
            return self.inputs.with_ids(main.texts, masked), drawn
        embedded = main.image_embedded if name == "lmvsd" else main.text_embedded
        tokens = embedded.tokens
        selected = self._select(name, main, embedded.candidates, tuple(tokens.shape[:2]), embedded.grid, tokens.device)
        if branch.masker is None:
            return embedded, torch.zeros_like(selected)
        tokens, applied = branch.masker.mask(tokens, selected, generator=generator)
        return replace(embedded, tokens=tokens), applied

    def _feature_positions(self, main: MainPass, generator: torch.Generator | None) -> torch.Tensor:
        """The features site's draw: the (B, N) bool image tokens whose positions the branch's maps replace,
        chosen among the selected ones (the same draw an embedding-site branch makes); none without masking."""
        branch = self.branches["lmvsd"]
        embedded = main.image_embedded
        tokens = embedded.tokens
        selected = self._select("lmvsd", main, embedded.candidates, tuple(tokens.shape[:2]), branch.layout.grid, tokens.device)
        if branch.masker is None:
            return torch.zeros_like(selected)
        return choose_masked(selected, branch.masker.ratio, branch.masker.min_count, generator, branch.masker.draw)

    def _select(
        self,
        name: BranchName,
        main: MainPass,
        candidates: torch.Tensor | None,
        shape: tuple[int, int],
        grid: tuple[int, int] | None,
        device: torch.device,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The (B, N) bool tokens branch ``name`` keeps, ranked by its guidance among ``candidates`` (B, N) or
        all; ``grid``: the image tokens' (h, w), where known; ``image_size``: (H, W) of the pixels where the tokens
        are the input site's pixel patches. K = 1 keeps every candidate and reads no score."""
        branch = self.branches[name]
        if not branch.reads_scores:
            return check_mask("candidates", candidates, shape, device)
        if branch.guidance == "joint":
            own, other = (main.visual, main.text) if name == "lmvsd" else (main.text, main.visual)
            tokens, query = joint_features(name, own, other)
            if tokens.shape[1] == shape[1]:
                return branch.filter.select(query, tokens, candidates)  # (B, N)
            scores = spread_scores(token_scores(query, tokens), own.grid, grid)  # a coarser grid's scores, spread
        elif branch.guidance == "prediction":
            if grid is None:
                raise ValueError("lmvsd.guidance='prediction' pools the predicted mask onto the image tokens' grid: return "
                                 "Embeddings(..., grid=(h, w)) from embed_image (tokens in row-major order)")
            logits = main.logits if main.logits is not None else self._decode_main(main)
            patch = None if image_size is None else self.inputs.patch_size
            scores = prediction_scores(logits, grid, patch, image_size)  # (B, N)
        else:
            with torch.no_grad():
                scores = self.segmenter.relevance(name, main.visual, main.text)
            scores = relevance_scores(name, scores, shape, grid)
        return branch.filter.select_scores(scores, candidates)

    def _decode_main(self, main: MainPass) -> torch.Tensor:
        main.logits = self.segmenter.decode_head(main.visual, main.text) if self.adapted else self.segmenter(main.images, main.texts)
        return main.logits

    def _run_branch(self, decode: Callable[..., torch.Tensor], masked: tuple, batch: int) -> torch.Tensor:
        logits = self._decode_branch(decode, masked)
        source = "segmenter.decode_head" if self.adapted else type(self.segmenter).__name__
        return check_head_logits(logits, source, batch)  # (B, 1, h, w)

    def _decode_branch(self, decode: Callable[..., torch.Tensor], masked: tuple) -> torch.Tensor:
        """A masked branch's encoder pass (none at the features site) and decode: ``decode(*masked)`` ->
        (B, 1, h, w) logits for masked embeddings, inputs or maps, with
        BatchNorm statistics left alone under ``branch_norm_stats="freeze"``, and recomputed in the
        backward pass (dropout replayed, statistics not updated twice) under ``checkpoint_branches``."""
        freeze = self.config.branch_norm_stats == "freeze"
        with frozen_norm_stats(self) if freeze else contextlib.nullcontext():
            if not self.config.checkpoint_branches:
                return decode(*masked)
            # The recomputation must save what the forward saved (same BatchNorm mode) and leave the
            # running statistics as the forward left them.
            recompute = (lambda: frozen_norm_stats(self)) if freeze else (lambda: restored_norm_stats(self))
            return checkpoint(
                decode, *masked, use_reentrant=False, preserve_rng_state=True,
                context_fn=lambda: (contextlib.nullcontext(), recompute()),
            )

    @torch.no_grad()
    def check_inputs(self, images: Any, texts: Any, ground_truth: torch.Tensor | None = None) -> None:
        """The checks of tensor values that a training step skips, so that it never waits for the device.

        Raises a ValueError naming the argument (and the samples) when ``images`` (a tensor) is an empty
        batch or holds NaN or ±inf, when ``ground_truth`` holds NaN or lies outside [0, 1] (a {0, 255} mask:
        divide by 255), when an enabled branch has samples without a candidate token (an empty text?), when
        input-site word ids lie outside ``inputs.vocab_size``, or when the segmenter's own
        ``check_inputs(images, texts)`` (if it defines one) finds a problem.
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
        for name, branch in self.branches.items():
            if branch.site == "input" and name == "lmvsd":
                self.inputs.pixels(images)  # found where the branch looks for them
                continue
            if branch.site == "input":
                candidates, source = self.inputs.word_candidates(texts), "inputs.special_token_ids and attention mask"
                ids, vocab = self.inputs.ids(texts), self.inputs.vocab_size
                if vocab is not None and bool(((ids < 0) | (ids >= vocab)).any()):
                    rows = ((ids < 0) | (ids >= vocab)).any(dim=1).nonzero().flatten().tolist()
                    raise ValueError(f"texts rows {rows} hold token ids outside [0, inputs.vocab_size={vocab})")
            else:
                embed = seg.embed_image if name == "lmvsd" else seg.embed_text
                candidates = embed(images if name == "lmvsd" else texts).candidates
                source = f"the segmenter's embed_{'image' if name == 'lmvsd' else 'text'}"
            if candidates is not None and not bool(candidates.any(dim=1).all()):
                empty = (~candidates.any(dim=1)).nonzero().flatten().tolist()
                raise ValueError(f"samples {empty} have no candidate token for {name} to mask (an empty text?): {source} marked none")

    @torch.no_grad()
    def masked_tokens(
        self, images: Any, texts: Any, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which image tokens (B, N) and text tokens (B, L) the LMVSD and VMLSD branches would
        replace for this batch (None for a branch that is off), without running the branches.
        For inspection and figures; runs in the module's current train/eval mode. At the input site:
        the (B, h·w) pixel patches (:meth:`image_grid` gives (h, w)) and the drawn words."""
        main = self._main_pass(images, texts, decode=not self.adapted)
        image_masked = text_masked = None
        if "lmvsd" in self.branches and self.branches["lmvsd"].site == "features":
            image_masked = self._feature_positions(main, generator)
        elif "lmvsd" in self.branches:
            image_masked = self._perturb("lmvsd", main, generator)[1]
        if "vmlsd" in self.branches:
            text_masked = self._perturb("vmlsd", main, generator)[1]
        return image_masked, text_masked

    def image_grid(self, images: Any) -> tuple[int, int] | None:
        """(h, w) of the grid :meth:`masked_tokens`' image mask lies on: the pixel patches at the input site, the
        image embeddings' declared grid otherwise (None where undeclared or LMVSD is off)."""
        if "lmvsd" not in self.branches:
            return None
        if self.branches["lmvsd"].site == "input":
            pixels = self.inputs.pixels(images)
            return patch_grid(pixels.shape[-2], pixels.shape[-1], self.inputs.patch_size)
        if self.branches["lmvsd"].site == "features":
            return self.branches["lmvsd"].layout.grid
        return self.segmenter.embed_image(images).grid

    def _head(self, branch: DistillBranch | CombinedView) -> Callable[[Features, Features], torch.Tensor] | None:
        if branch.head is not None:
            return branch.head
        return self.segmenter.decode_head if self.adapted else None


def joint_features(name: str, own: Features, other: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(own tokens (B, N, D), other's pooled (B, D)) for a joint-space correlation, or a ValueError naming
    ``name`` when either is missing or the two spaces have different dims (shapes only: no value is read)."""
    modality, other_modality = ("visual", "text") if name == "lmvsd" else ("text", "visual")
    alternatives = f"{name}.guidance='prediction' or 'segmenter'" if name == "lmvsd" else "vmlsd.guidance='segmenter'"
    if own.tokens is None or other.pooled is None:
        absent = f"{modality} Features.tokens" if own.tokens is None else f"{other_modality} Features.pooled"
        raise ValueError(f"{name}.guidance='joint' correlates {modality} tokens with the {other_modality} pooled feature, and "
                         f"the segmenter gives no {absent}: a model without a joint space needs {alternatives}, or {name}.top_k=1")
    if own.tokens.shape[-1] != other.pooled.shape[-1]:
        raise ValueError(
            f"{name}.guidance='joint' needs visual and text features in one joint space (equal D), got {modality} D="
            f"{own.tokens.shape[-1]} and {other_modality} D={other.pooled.shape[-1]}: for encoders without a joint space "
            f"use {alternatives}, or {name}.top_k=1 (no ranking)"
        )
    return own.tokens, other.pooled


def relevance_scores(name: str, scores: object, shape: tuple[int, int], grid: tuple[int, int] | None) -> torch.Tensor:
    """``segmenter.relevance(name, ...)``'s scores as (B, N) float on the branch's tokens: LMVSD's (B, N), or
    (B, h', w') on a grid that tiles the image embeddings' ``grid`` (spread to the tokens each cell covers);
    VMLSD's (B, L). A ValueError names the hook and the expected shapes (shapes only: no value is read)."""
    batch, length = shape
    expected = f"(B, N)={shape}" + (" or (B, h', w') on a grid tiling the image embeddings' grid" if name == "lmvsd" else "")
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise ValueError(f"segmenter.relevance({name!r}, ...) must return float scores {expected}, got {type(scores).__name__}")
    if tuple(scores.shape) == shape:
        return scores
    if name == "lmvsd" and scores.dim() == 3 and scores.shape[0] == batch:
        coarse, fine = check_tiling("relevance", tuple(scores.shape[1:]), grid, f"segmenter.relevance({name!r}, ...)")
        return spread_scores(scores, coarse, fine)
    raise ValueError(f"segmenter.relevance({name!r}, ...) must return float scores {expected}, got shape {tuple(scores.shape)}")


def encode_pair(segmenter: nn.Module, images: Any, texts: Any) -> tuple[Embeddings, Embeddings, Features, Features]:
    """Embed and encode both modalities once (``encode(ie, te)`` for a fused segmenter), checking what the
    segmenter returns (errors name the method).

    Returns (image embeddings, text embeddings, visual features, text features).
    """
    image_embedded = segmenter.embed_image(images)
    check_embeddings(image_embedded, segmenter.image_embed_dim, "segmenter.embed_image")
    text_embedded = segmenter.embed_text(texts)
    check_embeddings(text_embedded, segmenter.text_embed_dim, "segmenter.embed_text")
    batch = image_embedded.tokens.shape[0]
    if text_embedded.tokens.shape[0] != batch:
        raise ValueError(f"images and texts have different batch sizes: {batch} and {text_embedded.tokens.shape[0]}")

    if is_fused(segmenter):
        encoded = segmenter.encode(image_embedded, text_embedded)
        if not isinstance(encoded, tuple) or len(encoded) != 2:
            raise TypeError(f"segmenter.encode must return (visual, text) masksd.Features, got {type(encoded).__name__}")
        visual, text = encoded
        check_features(visual, image_embedded, "segmenter.encode (visual)")
        check_features(text, text_embedded, "segmenter.encode (text)")
        return image_embedded, text_embedded, visual, text
    visual = segmenter.encode_image(image_embedded)
    check_features(visual, image_embedded, "segmenter.encode_image")
    text = segmenter.encode_text(text_embedded)
    check_features(text, text_embedded, "segmenter.encode_text")
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


def check_segmenter(segmenter: object, required: bool = True) -> bool:
    """Whether ``segmenter`` implements :class:`~masksd.MaskableSegmenter` (or, fused, :class:`~masksd.FusedSegmenter`).
    Raises a TypeError/ValueError when it is not an nn.Module, when it implements part of the protocol wrongly
    (a decode head or embed dims of the wrong kind), or, if ``required``, when it lacks a member; without
    ``required`` a module with none of the protocol (wrapped at the input site only) gives False."""
    if not isinstance(segmenter, nn.Module):
        raise TypeError(f"segmenter must be an nn.Module, got {type(segmenter).__name__}")
    missing = missing_protocol(segmenter)
    if missing:
        if required:
            protocol = "masksd.FusedSegmenter" if is_fused(segmenter) else "masksd.MaskableSegmenter"
            raise TypeError(f"segmenter {type(segmenter).__name__} does not implement {protocol}; missing: {missing}. "
                            f"To wrap it, {ADAPTER_HINT}; or mask at the inputs only (site='input', masksd.InputSpec), "
                            "which needs just forward(images, texts)")
        return False
    check_decode_head(segmenter.decode_head, "segmenter.decode_head")
    for name in ("image_embed_dim", "text_embed_dim"):
        value = getattr(segmenter, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"segmenter.{name} must be a positive int, got {value!r}")
    return True
