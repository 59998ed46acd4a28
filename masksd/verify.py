"""verify_segmenter: the checks of an adapter that a new user cannot see by reading its output.

An adapter can return the right shapes and still be wrong for MaskSD: SOT/EOT offered as
candidates, the position embedding added before the mask token goes in, an encoder run under
``torch.no_grad`` (the mask tokens never learn), a forward that is not the composition of the four
methods (the wrapped model's eval output would not be the trained one), a branch that still sees the
unmasked input through a cache (the masked words leak to the student). Each check here raises one
:class:`SegmenterCheckError` naming the check and what to fix; when all pass, a short report (with a
warning where the sample batch suggests the "joint" space is no joint space).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from masksd.adapter import check_feature_maps, is_fused, missing_feature_maps
from masksd.config import MaskSDConfig
from masksd.inputs import InputSpec
from masksd.masking import patch_grid
from masksd.wrapper import ADAPTER_HINT, MaskSD, check_segmenter, encode_pair, joint_features, relevance_scores

__all__ = ["CheckResult", "SegmenterCheckError", "VerifyReport", "verify_segmenter"]


class SegmenterCheckError(ValueError):
    """One failed check of :func:`verify_segmenter`: ``check`` names it; the message says what to fix."""

    def __init__(self, check: str, problem: str, fix: str):
        self.check = check
        super().__init__(f"verify_segmenter: check '{check}' failed: {problem}. Fix: {fix}")


@dataclass
class CheckResult:
    name: str
    passed: bool
    """False only for a skipped check (a failed one raises)."""
    detail: str
    warning: bool = False
    """The check passed with a warning (also issued with ``warnings.warn``): a likely problem it cannot prove."""


@dataclass
class VerifyReport:
    """What :func:`verify_segmenter` checked; ``str(report)`` is a short table."""

    checks: list[CheckResult] = field(default_factory=list)

    @property
    def skipped(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    @property
    def warnings(self) -> list[str]:
        return [c.name for c in self.checks if c.warning]

    def __str__(self) -> str:
        passed = sum(c.passed for c in self.checks)
        warned = f", {len(self.warnings)} with a warning" if self.warnings else ""
        lines = [f"verify_segmenter: {passed} checks passed{warned}, {len(self.checks) - passed} skipped"]
        width = max(len(c.name) for c in self.checks)
        status = lambda c: "warn" if c.warning else "ok  " if c.passed else "skip"  # noqa: E731
        lines += [f"  {status(c)}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        return "\n".join(lines)


def verify_segmenter(
    segmenter: nn.Module,
    images: Any,
    texts: Any,
    reference: Callable[[Any, Any], Any] | None = None,
    config: MaskSDConfig | None = None,
    inputs: InputSpec | None = None,
) -> VerifyReport:
    """Check that ``segmenter`` implements the MaskSD protocol correctly on a sample batch.

    images, texts: a batch the segmenter takes (B >= 2 if it has BatchNorm). reference: optionally,
    the bare model's own callable ``reference(images, texts)`` returning logits (or an output with
    ``.logits``), which the segmenter's forward must equal exactly. config: the MaskSD configuration
    for the training-step checks (default: the paper's); inputs: the :class:`~masksd.InputSpec` MaskSD gets
    (for ``site="input"``).

    The checks: ``protocol`` (attributes, the decode head's signature; a segmenter without the adapter
    protocol passes only where every enabled branch masks at the inputs, and then only the checks marked *
    below run); ``shapes`` (what the methods return); ``composition`` (forward equals
    decode_head(*encode(embed_image(x), embed_text(t))) exactly, encode being encode_image and encode_text
    for independent towers, both in eval mode without gradients); ``eval_parity``* (``MaskSD(segmenter).eval()``
    returns the same logits); ``reference``*; ``embedding_level`` (identical patches, and one word repeated,
    embed identically: no position term before the mask token; on a declared or square grid, cells within a
    few of the border may differ, as a conv stem's zero padding makes them, where the interior is identical);
    ``upstream`` (changing one candidate embedding changes the encoder's output); ``special_tokens`` (no
    special or padding token is a candidate, where the segmenter has ``special_token_ids``); ``feature_maps``
    (where the segmenter implements any of :class:`~masksd.adapter.FeatureMapHead`: all of it, one map per
    layout shape, a grid of as many positions as patch tokens, and decode_maps(feature_maps(v), v, t) equal to
    decode_head(v, t) exactly); ``relevance`` (where the segmenter has ``relevance``: per-token scores whose
    shape or grid lines up with the tokens); ``joint_space`` (where a branch ranks by ``guidance="joint"``:
    equal dims, and a warning when matched image-text pairs of the batch correlate no more than mismatched
    ones); ``leak``* (in each masked view, changing the original inputs at the masked positions leaves the
    view's output unchanged: no branch sees what it masks); ``mask_token_gradient`` (one training step gives
    each branch's mask token a non-zero gradient); ``unused_parameters``* (every trainable parameter gets a
    gradient, as DDP without ``find_unused_parameters`` needs).

    Raises :class:`SegmenterCheckError` at the first failure. The segmenter is left as it was
    (training steps run on a copy; train/eval modes and the RNG state are restored).
    """
    report = VerifyReport()
    config = MaskSDConfig() if config is None else config
    inputs = InputSpec() if inputs is None else inputs
    enabled = [config.branch(name) for name in ("lmvsd", "vmlsd") if config.branch(name).enabled]
    try:
        adapted = check_segmenter(segmenter, required=not all(branch.site == "input" for branch in enabled))
    except (TypeError, ValueError) as error:
        raise SegmenterCheckError("protocol", str(error), ADAPTER_HINT) from None
    fused = adapted and is_fused(segmenter)
    detail = ("attributes present (fused: encode), decode_head(visual, text) callable" if fused else
              "attributes present, decode_head(visual, text) callable" if adapted else
              "no adapter: every enabled branch masks at the inputs, forward(images, texts) is all MaskSD calls")
    report.checks.append(CheckResult("protocol", True, detail))

    with _eval_mode(segmenter), _forked_rng(segmenter), torch.no_grad():
        if adapted:
            try:
                image_embedded, text_embedded, visual, text = encode_pair(segmenter, images, texts)
            except (TypeError, ValueError) as error:
                raise SegmenterCheckError("shapes", str(error), "return masksd.Embeddings/Features of the documented shapes") from None
            composed = segmenter.decode_head(visual, text)
            report.checks.append(CheckResult("shapes", True, _shapes(image_embedded, visual, text_embedded, text)))
        forward = segmenter(images, texts)
        if adapted:
            pieces = "decode_head(*encode(embed_image(x), embed_text(t)))" if fused else \
                "decode_head(encode_image(embed_image(x)), encode_text(embed_text(t)))"
            _require_equal("composition", forward, composed, "forward", "the composition of the methods",
                           f"make forward exactly {pieces} (subclass masksd.SegmenterAdapter and do not override forward, "
                           "or call the same methods)")
            report.checks.append(CheckResult("composition", True, f"forward == {pieces} exactly, logits {tuple(forward.shape)}"))

        try:
            wrapped = MaskSD(segmenter, config, inputs).eval()(images, texts)
        except (TypeError, ValueError) as error:
            raise SegmenterCheckError("protocol", str(error), ADAPTER_HINT) from None
        _require_equal("eval_parity", wrapped, forward, "MaskSD(segmenter).eval()", "segmenter(images, texts)",
                       "remove randomness or hidden state from the eval forward (dropout in eval, a counter, a cache)")
        report.checks.append(CheckResult("eval_parity", True, "MaskSD(segmenter).eval() returns the bare logits exactly"))

        if reference is None:
            report.checks.append(CheckResult("reference", False, "no reference callable given"))
        else:
            expected = reference(images, texts)
            expected = getattr(expected, "logits", expected)
            if torch.is_tensor(expected) and expected.numel() == forward.numel():
                expected = expected.reshape(forward.shape)
            _require_equal("reference", forward, expected, "segmenter(images, texts)", "reference(images, texts)",
                           "the split must reproduce the bare model's own forward step by step (same order, same pooling and projection)")
            report.checks.append(CheckResult("reference", True, "segmenter(images, texts) equals the bare model's own output exactly"))

        if adapted:
            report.checks.append(_check_embedding_level(segmenter, images, texts, image_embedded, text_embedded))
            _check_upstream(segmenter, image_embedded, text_embedded, visual, text, composed, "image")
            _check_upstream(segmenter, image_embedded, text_embedded, visual, text, composed, "text")
            report.checks.append(CheckResult("upstream", True, "one changed candidate embedding changes each encoder's output"))
            report.checks.append(_check_special_tokens(segmenter, texts, text_embedded))
            for check in (_check_feature_maps(segmenter, image_embedded, visual, text, composed),
                          _check_relevance(segmenter, image_embedded, text_embedded, visual, text),
                          _check_joint_space(config, visual, text)):
                if check is not None:
                    report.checks.append(check)
        report.checks.append(_check_leak(segmenter, images, texts, config, inputs))

    with _forked_rng(segmenter):  # MaskSD draws its mask tokens' initial values
        report.checks.extend(_check_training_step(segmenter, images, texts, forward, config, inputs))
    return report


def _check_embedding_level(segmenter: nn.Module, images: Any, texts: Any, image_embedded, text_embedded) -> CheckResult:
    """Identical patches must embed identically, and so must one word id repeated: a per-position term
    (the position embedding) before MaskSD's mask token would be erased with the token it replaces. On a known
    grid, a band of cells at the border may differ where the interior is identical: the zero padding of a conv
    stem (the first conv makes a flat image a constant map, the next one's padding differs from it)."""
    checked = []
    pixels = _LOOKUP.find_pixels(images)
    if pixels is not None:
        flat = torch.zeros_like(pixels)  # every patch the same, and equal to a zero-padded border
        embedded = segmenter.embed_image(_LOOKUP.with_pixels(images, flat))
        tokens = embedded.tokens[0]  # (N, C)
        if embedded.candidates is not None:  # a class or register token need not look like a patch
            tokens = tokens[embedded.candidates[0]]
        if _rows_equal(tokens):
            checked.append("identical patches")
        else:
            grid = _image_grid(embedded)
            band = None if grid is None else _border_band(embedded.tokens[0].reshape(*grid, -1))
            if band is None:
                known = "" if grid is not None else " (and declares no Embeddings.grid on which a conv stem's border cells could be told apart)"
                raise SegmenterCheckError(
                    "embedding_level", "embed_image gives different embeddings to identical patches, also away from the image "
                    f"borders{known}: it adds a per-position term (the position embedding?) before MaskSD's mask token, which "
                    "would erase that position too",
                    "return the patch embeddings before the class token and position embedding; add those in encode_image")
            checked.append(f"identical patches (all but the {band}-cell border band, which differs as a conv stem's zero "
                           f"padding makes it on the {grid[0]}x{grid[1]} grid; the interior is identical, so no position term)")
    ids = _LOOKUP.find_ids(texts)
    candidates = text_embedded.candidates
    if ids is not None and candidates is not None and bool(candidates.any()):
        row = int(candidates.any(dim=1).int().argmax())
        positions = candidates[row].nonzero().flatten()
        if len(positions) >= 2:
            repeated = ids.clone()
            repeated[row, positions] = ids[row, positions[0]]  # one word at every candidate position
            tokens = segmenter.embed_text(_LOOKUP.with_ids(texts, repeated)).tokens[row, positions]  # (n, C)
            if not _rows_equal(tokens):
                raise SegmenterCheckError(
                    "embedding_level", "embed_text gives one word id different embeddings at different positions: it adds "
                    "the position embedding (or another per-position term) before MaskSD's mask token",
                    "return the token embeddings before the position embedding; add it in encode_text")
            checked.append("a repeated word")
    if not checked:
        return CheckResult("embedding_level", False, "images are not a tensor or pixel_values mapping and texts carry no token ids")
    return CheckResult("embedding_level", True, " and ".join(checked) + " embed identically (no position term before masking)")


def _image_grid(embedded) -> tuple[int, int] | None:
    """The image tokens' (h, w): declared, or a square of all N tokens when none is a non-candidate."""
    if embedded.grid is not None:
        return tuple(embedded.grid)
    n = embedded.tokens.shape[1]
    side = round(n**0.5)
    return (side, side) if embedded.candidates is None and side * side == n else None


def _border_band(tokens: torch.Tensor) -> int | None:
    """(h, w, C) embeddings of a flat image: the narrowest border band outside which every cell is identical
    (an interior of at least 2x2 cells), or None when there is none (a per-position term everywhere)."""
    height, width = tokens.shape[:2]
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    depth = torch.minimum(torch.minimum(rows, height - 1 - rows), torch.minimum(cols, width - 1 - cols))  # (h, w)
    for band in range(1, (min(height, width) - 2) // 2 + 1):
        if _rows_equal(tokens[depth.to(tokens.device) >= band]):
            return band
    return None


def _check_upstream(segmenter: nn.Module, image_embedded, text_embedded, visual, text, composed, modality: str) -> None:
    embedded = image_embedded if modality == "image" else text_embedded
    candidates = embedded.candidates
    if candidates is None:
        candidates = torch.ones(embedded.tokens.shape[:2], dtype=torch.bool, device=embedded.tokens.device)
    row = int(candidates.any(dim=1).int().argmax())
    if not bool(candidates[row].any()):
        raise SegmenterCheckError("upstream", f"embed_{modality} marked no token of the batch as a candidate",
                                  "mark the real words (texts) as candidates; pass a batch with at least one word")
    position = int(candidates[row].int().argmax())
    tokens = embedded.tokens.clone()
    tokens[row, position] = tokens[row, position] + _wave(tokens)
    changed = replace(embedded, tokens=tokens)
    if is_fused(segmenter):
        new_visual, new_text = segmenter.encode(*((changed, text_embedded) if modality == "image" else (image_embedded, changed)))
        encoder = "encode"
    else:
        encode = segmenter.encode_image if modality == "image" else segmenter.encode_text
        new_visual, new_text = (encode(changed), text) if modality == "image" else (visual, encode(changed))
        encoder = f"encode_{modality}"
    same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))  # noqa: E731
    unchanged = all(same(getattr(a, part), getattr(b, part)) for a, b in ((new_visual, visual), (new_text, text))
                    for part in ("tokens", "pooled"))
    if unchanged and torch.equal(segmenter.decode_head(new_visual, new_text), composed):  # features and logits alike
        raise SegmenterCheckError(
            "upstream", f"changing a candidate {modality} embedding did not change {encoder}'s output: it does not encode "
            f"Embeddings.tokens (it recomputes them, or reads another input)",
            f"make {encoder} run its encoder on embedded.tokens, the tensor MaskSD masks")


def _check_relevance(segmenter: nn.Module, image_embedded, text_embedded, visual, text) -> CheckResult | None:
    """A segmenter's relevance hook must give scores that line up with the tokens each branch masks. None
    for a segmenter without one."""
    if not callable(getattr(segmenter, "relevance", None)):
        return None
    shapes = []
    for name, embedded in (("lmvsd", image_embedded), ("vmlsd", text_embedded)):
        try:
            scores = relevance_scores(name, segmenter.relevance(name, visual, text), tuple(embedded.tokens.shape[:2]), embedded.grid)
        except (TypeError, ValueError) as error:
            raise SegmenterCheckError("relevance", str(error), f"return per-token scores for {name}: (B, N) on the embeddings' "
                                      "tokens, or for LMVSD (B, h', w') on a grid tiling Embeddings.grid (declare it)") from None
        shapes.append(f"{name} {tuple(scores.shape)}")
    return CheckResult("relevance", True, "segmenter.relevance lines up with the tokens: " + ", ".join(shapes))


def _check_joint_space(config: MaskSDConfig, visual, text) -> CheckResult | None:
    """Where a branch ranks tokens in the joint space: its features exist with equal dims, and the sample
    batch's matched image-text pairs correlate more than its mismatched ones, as in a trained joint space (CLIP's);
    otherwise a warning (untrained towers, or two spaces that only share a width). None where no branch ranks so."""
    joint = [name for name in ("lmvsd", "vmlsd") if (b := config.branch(name)).enabled and b.guidance == "joint" and b.top_k < 1]
    if not joint:
        return None
    for name in joint:
        own, other = (visual, text) if name == "lmvsd" else (text, visual)
        try:
            joint_features(name, own, other)
        except ValueError as error:
            raise SegmenterCheckError("joint_space", str(error), f"give the config {name}.guidance='prediction' or 'segmenter', "
                                      f"or {name}.top_k=1, or return joint-space Features") from None
    if visual.pooled is None or text.pooled is None or visual.pooled.shape[0] < 2:
        return CheckResult("joint_space", True, f"{', '.join(joint)}: equal joint dims (a batch of 2+ with pooled features "
                           "would also compare matched and mismatched pairs)")
    similarity = F.normalize(visual.pooled.float(), dim=-1) @ F.normalize(text.pooled.float(), dim=-1).T  # (B, B)
    matched = similarity.diagonal().mean()
    mismatched = similarity.masked_fill(torch.eye(len(similarity), dtype=torch.bool, device=similarity.device), 0).sum()
    mismatched = mismatched / (similarity.numel() - len(similarity))
    detail = f"mean cosine of matched image-text pairs {float(matched):.3f}, of mismatched pairs {float(mismatched):.3f}"
    if matched > mismatched:
        return CheckResult("joint_space", True, f"{', '.join(joint)} rank in the joint space: {detail}")
    message = (f"guidance='joint' ({', '.join(joint)}) ranks tokens by image-text correlation, but in the sample batch "
               f"{detail}: matched pairs are no closer than mismatched ones, so the two features may share a width but "
               "not a space (untrained towers, or encoders without a joint space such as Swin + BERT): the ranking would "
               "be noise. Use guidance='prediction' or 'segmenter', or top_k=1, unless the towers are CLIP-aligned")
    warnings.warn(message, UserWarning, stacklevel=3)
    return CheckResult("joint_space", True, "WARNING: " + message, warning=True)


def _check_feature_maps(segmenter: nn.Module, image_embedded, visual, text, composed: torch.Tensor) -> CheckResult | None:
    """LMVSD's features site replaces the maps ``feature_maps`` returns and decodes them with ``decode_maps``: a head
    whose split is not its own forward, or a layout that is not its maps', would train another model than it runs.
    None for a segmenter that implements no part of the protocol."""
    head = segmenter.decode_head
    parts = (hasattr(segmenter, "feature_map_layout"), hasattr(head, "feature_maps"), hasattr(head, "decode_maps"))
    if not any(parts):
        return None
    missing = missing_feature_maps(segmenter)
    if missing:
        raise SegmenterCheckError("feature_maps", f"{type(segmenter).__name__} implements part of masksd.adapter.FeatureMapHead "
                                  f"and lacks {', '.join(missing)}", "implement all of it (LMVSD's site='features' needs each part) or none")
    layout = segmenter.feature_map_layout
    patches = image_embedded.tokens.shape[1]  # the grid is the patch embeddings' (visual tokens may be None or coarser)
    if layout.grid[0] * layout.grid[1] != patches:
        raise SegmenterCheckError("feature_maps", f"feature_map_layout.grid {tuple(layout.grid)} has {layout.grid[0] * layout.grid[1]} "
                                  f"positions for {patches} patch tokens", "give the (h, w) of the patch-token grid, row-major")
    try:
        maps = check_feature_maps(head.feature_maps(visual), layout, composed.shape[0], "decode_head.feature_maps")
    except ValueError as error:
        raise SegmenterCheckError("feature_maps", str(error), "return one (B, C, h, w) map per feature_map_layout.shapes entry") from None
    _require_equal("feature_maps", head.decode_maps(maps, visual, text), composed,
                   "decode_head.decode_maps(decode_head.feature_maps(visual), visual, text)", "decode_head(visual, text)",
                   "make the decode head's forward exactly decode_maps(feature_maps(visual), visual, text)")
    return CheckResult("feature_maps", True, "decode_maps(feature_maps(v), v, t) == decode_head(v, t) exactly, maps "
                       + ", ".join(str(tuple(m.shape[1:])) for m in maps))


def _check_special_tokens(segmenter: nn.Module, texts: Any, text_embedded) -> CheckResult:
    special_ids = getattr(segmenter, "special_token_ids", None)
    ids = _LOOKUP.find_ids(texts)
    if special_ids is None or ids is None:
        why = "the segmenter has no special_token_ids" if special_ids is None else "texts carry no token ids"
        return CheckResult("special_tokens", False, why)
    candidates = text_embedded.candidates
    if candidates is None:
        candidates = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device))  # (B, L)
    positions = torch.arange(ids.shape[1], device=ids.device)
    ended = torch.cumsum((special & (positions > 0)).int(), dim=1) > 0  # from the end-of-text token on
    not_words = special | ended
    attention = texts.get("attention_mask") if isinstance(texts, Mapping) else None
    if attention is not None:
        not_words = not_words | (attention == 0)
    wrong = candidates & not_words
    if bool(wrong.any()):
        rows, cols = wrong.nonzero(as_tuple=True)
        found = [(int(r), int(c), int(ids[r, c])) for r, c in zip(rows[:5], cols[:5])]
        raise SegmenterCheckError(
            "special_tokens", f"embed_text marks {int(wrong.sum())} special or padding tokens as candidates "
            f"(row, position, id: {found}); MaskSD would mask SOT/EOT/padding, which the paper never does",
            "set candidates True only strictly between the start and the end-of-text token, and never at special ids")
    return CheckResult("special_tokens", True, f"no special id ({len(special_ids)} known) or padding is a candidate")


def _check_leak(segmenter: nn.Module, images: Any, texts: Any, config: MaskSDConfig, inputs: InputSpec) -> CheckResult:
    """A masked view may see the modality it masks only through its masked input: with the view's masked input
    fixed, changing the original input of that modality in the main pass (other pixels, other word ids, or,
    where no ids are found, other embeddings) must leave the view's logits bit-identical. A stateful adapter that
    caches the main pass's sentence and fuses it into the visual features VMLSD reuses fails here. Runs in eval
    mode on a fresh copy per view."""
    names = [name for name in ("lmvsd", "vmlsd") if config.branch(name).enabled and config.branch(name).site != "features"]
    if not names:  # the features site masks after the encoders: there is nothing upstream to leak
        return CheckResult("leak", False, "no branch masks before an encoder (features site, or branches off)")
    views = [tuple(names)] if config.views == "combined" else [(name,) for name in names]
    checked = []
    for view in views:
        model = MaskSD(copy.deepcopy(segmenter), config, inputs).eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        main = model._main_pass(images, texts)
        generator = torch.Generator(device=device).manual_seed(0)
        masked = {name: model._perturb(name, main, generator)[0] for name in view}
        image, text = masked.get("lmvsd"), masked.get("vmlsd")
        head = model._head(model.combined if model.combined is not None else model.branches[view[0]])
        before = model._decode_view(head, main, image, text)
        other_images, how_image = _other_images(model, images, generator) if "lmvsd" in view else (images, None)
        other_texts, how_text = _other_texts(model, texts) if "vmlsd" in view else (texts, None)
        how = [h for h in (how_image, how_text) if h]
        label = " + ".join(view)
        if len(how) < len(view):
            checked.append(f"{label}: skipped (the {'images' if how_image is None and 'lmvsd' in view else 'texts'} could not be changed)")
            continue
        after = model._decode_view(head, model._main_pass(other_images, other_texts), image, text)
        if not torch.equal(before, after):
            modality = " and ".join("image" if name == "lmvsd" else "text" for name in view)
            diff = float((before.float() - after.float()).abs().max())
            raise SegmenterCheckError(
                "leak", f"the {label.upper()} view's output changed (max abs difference {diff:.3g}) when only the unmasked "
                f"{modality} of the main pass changed, its masked input fixed: the view still sees what it masks (features "
                "of the main pass cached by the adapter and reused, or one encoder reading the other modality's input)",
                "keep no state between calls; if the image encoder reads the text (or the reverse), implement "
                "encode(image_embedded, text_embedded) (masksd.FusedSegmenter) instead of encode_image/encode_text, so that "
                "each branch re-encodes both modalities with only its own masked")
        checked.append(f"{label}: unchanged under {' and '.join(how)}")
    return CheckResult("leak", True, "each masked view sees its modality only through its masked input ("
                       + "; ".join(checked) + ")")


def _other_images(model: MaskSD, images: Any, generator: torch.Generator) -> tuple[Any, str | None]:
    """Other images of the same shape (random pixels), or, without pixels, ``embed_image`` wrapped on the model's
    copy to shift every patch embedding; how, or None where neither is possible."""
    pixels = model.inputs.find_pixels(images)
    if pixels is not None:
        noise = torch.randn(pixels.shape, generator=generator, device=pixels.device).to(pixels.dtype)
        return model.inputs.with_pixels(images, noise), "other pixels"
    return images, _shift_embeddings(model, "embed_image")


def _other_texts(model: MaskSD, texts: Any) -> tuple[Any, str | None]:
    """Other texts of the same shape: each real word swapped for another word of the batch (the structure, SOT,
    EOT and padding kept), or, without token ids, ``embed_text`` wrapped to shift every word embedding."""
    ids = model.inputs.find_ids(texts)
    if ids is not None:
        if "vmlsd" in model.branches and model.branches["vmlsd"].site == "input":
            words = model.inputs.word_candidates(texts)
        else:
            words = model.segmenter.embed_text(texts).candidates if model.adapted else None
        words = torch.ones_like(ids, dtype=torch.bool) if words is None else words
        vocabulary = sorted(set(ids[words].tolist()))
        if len(vocabulary) >= 2:
            swap = {w: vocabulary[(i + 1) % len(vocabulary)] for i, w in enumerate(vocabulary)}
            swapped = ids.clone()
            swapped[words] = torch.tensor([swap[i] for i in ids[words].tolist()], dtype=ids.dtype, device=ids.device)
            return model.inputs.with_ids(texts, swapped), "other word ids"
    return texts, _shift_embeddings(model, "embed_text")


def _shift_embeddings(model: MaskSD, method: str) -> str | None:
    """Wrap ``model.segmenter.<method>`` (MaskSD's own copy) so that every token it returns is shifted. A cache
    the adapter fills inside that method still sees the unshifted tokens: changing inputs is the stronger test."""
    if not model.adapted:
        return None
    original = getattr(model.segmenter, method)

    def shifted(inputs: Any):
        embedded = original(inputs)
        return replace(embedded, tokens=embedded.tokens + _wave(embedded.tokens))

    setattr(model.segmenter, method, shifted)
    return "shifted embeddings"


def _wave(x: torch.Tensor) -> torch.Tensor:
    """A change along the last dim that varies over channels (a constant shift, a LayerNorm would remove)."""
    return (x.std() + 1.0) * torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype)


def _check_training_step(
    segmenter: nn.Module, images: Any, texts: Any, logits: torch.Tensor, config: MaskSDConfig, inputs: InputSpec
) -> list[CheckResult]:
    """One MaskSD training step on a copy: each branch's mask token and every trainable parameter get a gradient."""
    model = MaskSD(copy.deepcopy(segmenter), config, inputs).train()
    generator = torch.Generator(device=logits.device).manual_seed(0)
    ground_truth = (torch.rand(logits.shape, generator=generator, device=logits.device) > 0.5).to(logits.dtype)
    try:
        out = model(images, texts, ground_truth, generator=torch.Generator(device=logits.device).manual_seed(0))
        out.loss.backward()
    except (RuntimeError, ValueError, TypeError) as error:
        raise SegmenterCheckError("training_step", f"MaskSD's training step raised {type(error).__name__}: {error}",
                                  "fix the error above (a batch of 2 or more for BatchNorm?)") from None
    results = []
    for name, masked in (("lmvsd", out.image_masked), ("vmlsd", out.text_masked)):
        branch = model.branches[name] if name in model.branches else None
        if branch is None or branch.masker is None or branch.site == "input":  # pixels and ids hold no mask token
            continue
        if masked is None or not bool(masked.any()):
            results.append(CheckResult("mask_token_gradient", False, f"{name} masked no token in this batch"))
            continue
        grads = [p.grad for p in branch.masker.parameters()]  # the mask token, or the features site's maps
        if any(g is None for g in grads) or not any(bool(g.abs().sum() > 0) for g in grads):
            encoder = "encode_image" if name == "lmvsd" else "encode_text"
            where = "the decode head's feature_maps/decode_maps" if not hasattr(branch.masker, "mask_token") else encoder
            raise SegmenterCheckError(
                "mask_token_gradient", f"the {name.upper()} mask token got no gradient: {where} does not pass gradients "
                f"from its output back to its input (torch.no_grad? a detach?)",
                f"run {where} with gradients enabled; to keep weights fixed use requires_grad_(False)")
        norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        results.append(CheckResult("mask_token_gradient", True, f"{name} mask token gradient norm {norm:.3g}"))
    unused = [n for n, p in model.segmenter.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise SegmenterCheckError(
            "unused_parameters", f"{len(unused)} trainable parameters get no gradient from the MaskSD loss: {unused[:5]}"
            + (" ..." if len(unused) > 5 else ""),
            "freeze them (requires_grad_(False)) or remove them; otherwise DistributedDataParallel needs find_unused_parameters=True")
    trainable = sum(p.requires_grad for p in model.segmenter.parameters())
    results.append(CheckResult("unused_parameters", True, f"all {trainable} trainable parameter tensors get a gradient"))
    return results


def _require_equal(check: str, got: Any, expected: Any, got_name: str, expected_name: str, fix: str) -> None:
    if not torch.is_tensor(got) or not torch.is_tensor(expected) or got.shape != expected.shape:
        shape = lambda x: tuple(x.shape) if torch.is_tensor(x) else type(x).__name__  # noqa: E731
        raise SegmenterCheckError(check, f"{got_name} gives {shape(got)}, {expected_name} {shape(expected)}", fix)
    if not torch.equal(got, expected):
        diff = float((got.float() - expected.float()).abs().max())
        raise SegmenterCheckError(check, f"{got_name} differs from {expected_name} (max abs difference {diff:.3g})", fix)


def _rows_equal(tokens: torch.Tensor) -> bool:
    """(n, C): every row equal to the first, up to float rounding."""
    scale = float(tokens.abs().max()) + 1e-12
    return bool(((tokens - tokens[:1]).abs().max() <= 1e-5 * scale))


_LOOKUP = InputSpec()
"""Where the checks look for pixels and token ids (a tensor, or a mapping's pixel_values / input_ids)."""


def _shapes(image_embedded, visual, text_embedded, text) -> str:
    shape = lambda x: "None" if x is None else str(tuple(x.shape))  # noqa: E731
    dims = "" if visual.pooled is None or text.pooled is None else f", pooled D {visual.pooled.shape[-1]} / {text.pooled.shape[-1]}"
    return (f"image {tuple(image_embedded.tokens.shape)} -> {shape(visual.tokens)}, "
            f"text {tuple(text_embedded.tokens.shape)} -> {shape(text.tokens)}{dims}")


def _forked_rng(module: nn.Module):
    """torch's RNG state forked for the block, on the CPU and on the segmenter's own CUDA device only (not
    every visible GPU, which would start a CUDA context on each)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
