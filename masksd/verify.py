"""verify_segmenter: the checks of an adapter that a new user cannot see by reading its output.

An adapter can return the right shapes and still be wrong for MaskSD: SOT/EOT offered as
candidates, the position embedding added before the mask token goes in, an encoder run under
``torch.no_grad`` (the mask tokens never learn), a forward that is not the composition of the four
methods (the wrapped model's eval output would not be the trained one). Each check here raises one
:class:`SegmenterCheckError` naming the check and what to fix; when all pass, a short report.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from masksd.adapter import check_feature_maps, missing_feature_maps
from masksd.config import MaskSDConfig
from masksd.wrapper import MaskSD, check_segmenter, encode_pair

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


@dataclass
class VerifyReport:
    """What :func:`verify_segmenter` checked; ``str(report)`` is a short table."""

    checks: list[CheckResult] = field(default_factory=list)

    @property
    def skipped(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def __str__(self) -> str:
        passed = sum(c.passed for c in self.checks)
        lines = [f"verify_segmenter: {passed} checks passed, {len(self.checks) - passed} skipped"]
        width = max(len(c.name) for c in self.checks)
        lines += [f"  {'ok  ' if c.passed else 'skip'}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        return "\n".join(lines)


def verify_segmenter(
    segmenter: nn.Module,
    images: Any,
    texts: Any,
    reference: Callable[[Any, Any], Any] | None = None,
    config: MaskSDConfig | None = None,
) -> VerifyReport:
    """Check that ``segmenter`` implements the MaskSD protocol correctly on a sample batch.

    images, texts: a batch the segmenter takes (B >= 2 if it has BatchNorm). reference: optionally,
    the bare model's own callable ``reference(images, texts)`` returning logits (or an output with
    ``.logits``), which the segmenter's forward must equal exactly. config: the MaskSD configuration
    for the training-step checks (default: the paper's).

    The checks: ``protocol`` (attributes, the decode head's signature); ``shapes`` (what the four
    methods return, joint dims equal); ``composition`` (forward equals
    decode_head(encode_image(embed_image(x)), encode_text(embed_text(t))) exactly, both in eval mode
    without gradients); ``eval_parity`` (``MaskSD(segmenter).eval()`` returns the same logits);
    ``reference``; ``embedding_level`` (identical patches, and one word repeated, embed identically:
    no position term before the mask token); ``upstream`` (changing one candidate embedding changes
    the encoder's output); ``special_tokens`` (no special or padding token is a candidate, where the
    segmenter has ``special_token_ids``); ``feature_maps`` (where the segmenter implements any of
    :class:`~masksd.adapter.FeatureMapHead`: all of it, one map per layout shape, a grid of as many
    positions as patch tokens, and decode_maps(feature_maps(v), v, t) equal to decode_head(v, t)
    exactly); ``mask_token_gradient`` (one training step gives each
    branch's mask token a non-zero gradient); ``unused_parameters`` (every trainable parameter gets a
    gradient, as DDP without ``find_unused_parameters`` needs).

    Raises :class:`SegmenterCheckError` at the first failure. The segmenter is left as it was
    (training steps run on a copy; train/eval modes and the RNG state are restored).
    """
    report = VerifyReport()
    try:
        check_segmenter(segmenter)
    except (TypeError, ValueError) as error:
        raise SegmenterCheckError("protocol", str(error), "implement masksd.MaskableSegmenter (subclass masksd.SegmenterAdapter)") from None
    report.checks.append(CheckResult("protocol", True, "attributes present, decode_head(visual, text) callable"))
    config = MaskSDConfig() if config is None else config

    with _eval_mode(segmenter), _forked_rng(segmenter), torch.no_grad():
        try:
            image_embedded, text_embedded, visual, text = encode_pair(segmenter, images, texts)
        except (TypeError, ValueError) as error:
            raise SegmenterCheckError("shapes", str(error), "return masksd.Embeddings/Features of the documented shapes") from None
        composed = segmenter.decode_head(visual, text)
        report.checks.append(CheckResult("shapes", True, _shapes(image_embedded, visual, text_embedded, text)))

        forward = segmenter(images, texts)
        _require_equal("composition", forward, composed, "forward", "the composition of the four methods",
                       "make forward exactly decode_head(encode_image(embed_image(x)), encode_text(embed_text(t))) "
                       "(subclass masksd.SegmenterAdapter and do not override forward, or call the same methods)")
        report.checks.append(CheckResult("composition", True, f"forward == decode_head(encode_*(embed_*(...))) exactly, logits {tuple(forward.shape)}"))

        wrapped = MaskSD(segmenter, config).eval()(images, texts)
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

        report.checks.append(_check_embedding_level(segmenter, images, texts, text_embedded))
        _check_upstream(segmenter, image_embedded, visual, "image")
        _check_upstream(segmenter, text_embedded, text, "text")
        report.checks.append(CheckResult("upstream", True, "one changed candidate embedding changes each encoder's output"))
        report.checks.append(_check_special_tokens(segmenter, texts, text_embedded))
        feature_maps = _check_feature_maps(segmenter, visual, text, composed)
        if feature_maps is not None:
            report.checks.append(feature_maps)

    with _forked_rng(segmenter):  # MaskSD draws its mask tokens' initial values
        report.checks.extend(_check_training_step(segmenter, images, texts, forward, config))
    return report


def _check_embedding_level(segmenter: nn.Module, images: Any, texts: Any, text_embedded) -> CheckResult:
    """Identical patches must embed identically, and so must one word id repeated: a per-position term
    (the position embedding) before MaskSD's mask token would be erased with the token it replaces."""
    checked = []
    pixels = _pixels(images)
    if pixels is not None:
        flat = torch.zeros_like(pixels)  # every patch the same, and equal to a zero-padded border
        embedded = segmenter.embed_image(_with_pixels(images, flat))
        tokens = embedded.tokens[0]  # (N, C)
        if embedded.candidates is not None:  # a class or register token need not look like a patch
            tokens = tokens[embedded.candidates[0]]
        if not _rows_equal(tokens):
            raise SegmenterCheckError(
                "embedding_level", "embed_image gives different embeddings to identical patches: it adds a per-position term "
                "(the position embedding?) before MaskSD's mask token, which would erase that position too",
                "return the patch embeddings before the class token and position embedding; add those in encode_image")
        checked.append("identical patches")
    ids = _token_ids(texts)
    candidates = text_embedded.candidates
    if ids is not None and candidates is not None and bool(candidates.any()):
        row = int(candidates.any(dim=1).int().argmax())
        positions = candidates[row].nonzero().flatten()
        if len(positions) >= 2:
            repeated = ids.clone()
            repeated[row, positions] = ids[row, positions[0]]  # one word at every candidate position
            tokens = segmenter.embed_text(_with_ids(texts, repeated)).tokens[row, positions]  # (n, C)
            if not _rows_equal(tokens):
                raise SegmenterCheckError(
                    "embedding_level", "embed_text gives one word id different embeddings at different positions: it adds "
                    "the position embedding (or another per-position term) before MaskSD's mask token",
                    "return the token embeddings before the position embedding; add it in encode_text")
            checked.append("a repeated word")
    if not checked:
        return CheckResult("embedding_level", False, "images are not a tensor or pixel_values mapping and texts carry no token ids")
    return CheckResult("embedding_level", True, " and ".join(checked) + " embed identically (no position term before masking)")


def _check_upstream(segmenter: nn.Module, embedded, features, modality: str) -> None:
    candidates = embedded.candidates
    if candidates is None:
        candidates = torch.ones(embedded.tokens.shape[:2], dtype=torch.bool, device=embedded.tokens.device)
    row = int(candidates.any(dim=1).int().argmax())
    if not bool(candidates[row].any()):
        raise SegmenterCheckError("upstream", f"embed_{modality} marked no token of the batch as a candidate",
                                  "mark the real words (texts) as candidates; pass a batch with at least one word")
    position = int(candidates[row].int().argmax())
    tokens = embedded.tokens.clone()
    # not a constant shift, which a LayerNorm (CLIP's ln_pre) would remove: a vector that varies over channels
    wave = torch.linspace(-1.0, 1.0, tokens.shape[-1], device=tokens.device, dtype=tokens.dtype)
    tokens[row, position] = tokens[row, position] + (tokens.std() + 1.0) * wave
    encode = segmenter.encode_image if modality == "image" else segmenter.encode_text
    changed = encode(replace(embedded, tokens=tokens))
    if torch.equal(changed.tokens, features.tokens) and torch.equal(changed.pooled, features.pooled):
        raise SegmenterCheckError(
            "upstream", f"changing a candidate embedding did not change encode_{modality}'s output: it does not encode "
            f"Embeddings.tokens (it recomputes them, or reads another input)",
            f"make encode_{modality} run its encoder on embedded.tokens, the tensor MaskSD masks")


def _check_feature_maps(segmenter: nn.Module, visual, text, composed: torch.Tensor) -> CheckResult | None:
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
    patches = visual.tokens.shape[1]
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
    ids = _token_ids(texts)
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


def _check_training_step(segmenter: nn.Module, images: Any, texts: Any, logits: torch.Tensor, config: MaskSDConfig) -> list[CheckResult]:
    """One MaskSD training step on a copy: each branch's mask token and every trainable parameter get a gradient."""
    model = MaskSD(copy.deepcopy(segmenter), config).train()
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
        if branch is None or branch.masker is None:
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


def _pixels(images: Any) -> torch.Tensor | None:
    if torch.is_tensor(images) and images.is_floating_point():
        return images
    if isinstance(images, Mapping) and torch.is_tensor(images.get("pixel_values")):
        return images["pixel_values"]
    return None


def _with_pixels(images: Any, pixels: torch.Tensor) -> Any:
    return pixels if torch.is_tensor(images) else {**images, "pixel_values": pixels}


def _token_ids(texts: Any) -> torch.Tensor | None:
    if torch.is_tensor(texts) and texts.dim() == 2 and not texts.is_floating_point():
        return texts
    if isinstance(texts, Mapping) and torch.is_tensor(texts.get("input_ids")):
        return texts["input_ids"]
    return None


def _with_ids(texts: Any, ids: torch.Tensor) -> Any:
    if torch.is_tensor(texts):
        return ids
    updated = copy.copy(texts)  # a BatchEncoding stays one
    updated["input_ids"] = ids
    return updated


def _shapes(image_embedded, visual, text_embedded, text) -> str:
    return (f"image {tuple(image_embedded.tokens.shape)} -> {tuple(visual.tokens.shape)}, "
            f"text {tuple(text_embedded.tokens.shape)} -> {tuple(text.tokens.shape)}, joint D={visual.pooled.shape[-1]}")


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
