"""HFCLIPTowers: a transformers ``CLIPModel`` split at the patch and token embeddings.

``CLIPModel.get_image_features`` and ``get_text_features`` each run embedding, position embedding,
encoder, final norm, pooling and projection in one call; MaskSD must put its mask token between the
first two steps. This module holds the model's own submodules under the model's own attribute names
(so its state dict is the model's, less ``logit_scale``) and calls them in the order the library's
forward does, with the library's own causal-mask helper, so that

    encode_image(embed_image(pixel_values)).pooled == model.get_image_features(pixel_values).pooler_output
    encode_text(embed_text(texts)).pooled == model.get_text_features(**texts).pooler_output

hold bit for bit (``torch.equal``). transformers is imported only when a tower is built.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, NamedTuple

import torch
from einops import rearrange
from torch import nn

from masksd.adapter import Embeddings, Features, describe
from masksd.integrations.towers import ImageContext, TextContext

__all__ = ["HFCLIPTowers", "PatchLayout", "TokenInputs", "require_transformers"]

INSTALL_HINT = 'pip install "masksd[transformers]"'
LEGACY_EOS_TOKEN_ID = 2
"""The ``eos_token_id`` of configs written before transformers PR #24773 (OpenAI's CLIP checkpoints):
such a model pools text at the largest token id, and its config's bos/eos/pad ids (0, 2, 1) are
ordinary words of CLIP's vocabulary, not the tokenizer's special tokens."""


def require_transformers() -> Any:
    """The ``transformers`` module, or an ImportError naming the extra to install."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"masksd's Hugging Face integrations need transformers: {INSTALL_HINT}") from error
    return transformers


class PatchLayout(NamedTuple):
    """``Embeddings.context`` of :meth:`HFCLIPTowers.embed_image`."""

    grid: tuple[int, int]
    """(h, w) of the patch grid."""
    image_size: tuple[int, int]
    """(H, W) of the pixel values, which the position interpolation needs."""


class TokenInputs(NamedTuple):
    """``Embeddings.context`` of :meth:`HFCLIPTowers.embed_text`: what the text encoder needs besides the embeddings."""

    input_ids: torch.Tensor
    """(B, L) long token ids."""
    attention_mask: torch.Tensor | None
    """(B, L) 1 at real tokens, 0 at padding; None when the tokenizer gave none."""
    position_ids: torch.Tensor | None
    """(B or 1, L) position ids if the mapping held them, else None (the library's default 0..L-1)."""
    eos: torch.Tensor
    """(B,) long: the position whose final hidden state is pooled (the end-of-text token)."""


class HFCLIPTowers(nn.Module):
    """The image and text towers of a transformers ``CLIPModel``, split for MaskSD.

    Args:
        model: a ``transformers.CLIPModel`` (a ``CLIPSegModel``, CLIPSeg's CLIP, is read the same way).
        layers: 0-based vision encoder layers whose outputs :meth:`encode_image` returns in
            ``ImageContext.levels`` (B, Cv, h, w), class token dropped, in the order given.
        tokenizer: the model's tokenizer (or its processor): its ``all_special_ids`` are the ids that
            are never candidates. Required for checkpoints with the legacy ``eos_token_id=2``
            (OpenAI's), whose config ids are ordinary words.
        special_token_ids: instead of ``tokenizer``, the ids that are never candidates.
        interpolate_pos_encoding: interpolate the position embedding for other image sizes, as the
            library's argument of that name; None takes the library's default for this model class
            (False for ``CLIPModel.get_image_features``, True for ``CLIPSegModel``'s).

    Without ``tokenizer`` or ``special_token_ids`` the special ids are the config's ``bos_token_id``
    and ``eos_token_id`` (the eos id is what the model pools at, so it is exact); ``pad_token_id`` is
    not used (CLIPTextConfig's default 1 is the word ``"``), padding being excluded by the attention
    mask and by its place after the end-of-text token.

    Refuses (TypeError naming the class) any model other than ``CLIPModel``/``CLIPSegModel``; a
    ``SiglipModel`` is pointed to :class:`~masksd.integrations.HFSiglipTowers`, its sibling.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] = (),
        *,
        tokenizer: Any = None,
        special_token_ids: Iterable[int] | None = None,
        interpolate_pos_encoding: bool | None = None,
    ):
        super().__init__()
        _check_clip_model(model)
        self.vision_model = model.vision_model
        self.text_model = model.text_model
        self.visual_projection = model.visual_projection
        self.text_projection = model.text_projection

        depth = len(self.vision_model.encoder.layers)
        self.layers = check_layers(layers, depth, "layers")
        self.interpolate_pos_encoding = resolve_interpolation(interpolate_pos_encoding, model.get_image_features)

        text_config = self.text_model.config
        self.eos_token_id = getattr(self.text_model, "eos_token_id", text_config.eos_token_id)  # what its forward pools at
        self.legacy_pooling = self.eos_token_id == LEGACY_EOS_TOKEN_ID  # pools at argmax(input_ids), as the library
        self.special_token_ids = resolve_special_ids(text_config, tokenizer, special_token_ids)
        self.register_buffer("_special", torch.tensor(sorted(self.special_token_ids), dtype=torch.long), persistent=False)
        self._create_causal_mask = causal_mask_helper(self.text_model)

        self.image_embed_dim = int(self.vision_model.config.hidden_size)
        self.text_embed_dim = int(text_config.hidden_size)
        self.embed_dim = int(self.visual_projection.out_features)  # D, the joint space
        self.image_size = int(self.vision_model.config.image_size)
        self.max_length = int(self.text_model.embeddings.position_embedding.num_embeddings)

    # -- image ----------------------------------------------------------------------------------

    def embed_image(self, pixel_values: torch.Tensor) -> Embeddings:
        """(B, 3, H, W) float pixel values (the processor's ``pixel_values``) -> Embeddings: (B, N, Cv)
        patch embeddings before the class token and the position embedding; every patch a candidate;
        context = :class:`PatchLayout`."""
        embeddings = self.vision_model.embeddings
        height, width = check_pixel_values(
            pixel_values, embeddings.patch_embedding.in_channels, self.image_size, self.interpolate_pos_encoding
        )
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(dtype=weight.dtype))  # (B, Cv, h, w)
        grid = (int(patches.shape[2]), int(patches.shape[3]))
        tokens = rearrange(patches, "b c h w -> b (h w) c")  # (B, N, Cv)
        return Embeddings(tokens=tokens, candidates=None, context=PatchLayout(grid, (height, width)), grid=grid)

    def encode_image(self, embedded: Embeddings) -> Features:
        """Patch embeddings -> Features: tokens (B, N, D) and pooled (B, D) through ``post_layernorm``
        and ``visual_projection`` (pooled equals ``model.get_image_features``'s), context =
        :class:`ImageContext` with the requested layers' outputs (B, Cv, h, w)."""
        hidden, features = self.run_vision(embedded, self.layers)
        grid = embedded.context.grid
        levels = tuple(rearrange(h[:, 1:], "b (h w) c -> b c h w", h=grid[0]) for h in hidden)  # (B, Cv, h, w) each
        features.context = ImageContext(levels, grid)
        return features

    def run_vision(self, embedded: Embeddings, layers: Sequence[int]) -> tuple[list[torch.Tensor], Features]:
        """The vision encoder on patch embeddings, as ``CLIPVisionModel.forward`` runs it.

        Returns the outputs (B, 1 + N, Cv) of the 0-based encoder ``layers`` (class token first, before
        ``post_layernorm``; what the library's ``hidden_states[i + 1]`` holds), in the order given, and
        Features (tokens (B, N, D), pooled (B, D), no context)."""
        layout = embedded.context
        if not isinstance(layout, PatchLayout):
            raise TypeError(
                f"embedded must come from embed_image (its context a PatchLayout), got context {type(layout).__name__}"
            )
        vision, embeddings = self.vision_model, self.vision_model.embeddings
        patches = embedded.tokens  # (B, N, Cv)
        class_embeds = embeddings.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, Cv)
        x = torch.cat([class_embeds, patches], dim=1)  # (B, 1 + N, Cv)
        if self.interpolate_pos_encoding:
            x = x + embeddings.interpolate_pos_encoding(x, *layout.image_size)
        else:
            x = x + embeddings.position_embedding(embeddings.position_ids)
        x = vision.pre_layrnorm(x)
        wanted = set(layers)
        outputs: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(vision.encoder.layers):
            x = layer(x, None)  # as CLIPEncoder.forward calls it: (hidden_states, attention_mask)
            if index in wanted:
                outputs[index] = x
        pooled = self.visual_projection(vision.post_layernorm(x[:, 0, :]))  # (B, D), the library's own op order
        tokens = self.visual_projection(vision.post_layernorm(x[:, 1:, :]))  # (B, N, D)
        return [outputs[i] for i in layers], Features(tokens=tokens, pooled=pooled)

    # -- text -----------------------------------------------------------------------------------

    def embed_text(self, texts: Mapping[str, torch.Tensor]) -> Embeddings:
        """The tokenizer's mapping (``input_ids`` (B, L), optional ``attention_mask`` (B, L), optional
        ``position_ids``; a BatchEncoding or dict) -> Embeddings: (B, L, Ct) token embeddings before the
        position embedding; candidates (B, L) True only at real words (not a special id, not padding,
        before the pooled end-of-text token); context = :class:`TokenInputs`."""
        input_ids, attention_mask, position_ids = read_token_inputs(texts, self.max_length)
        tokens = self.text_model.embeddings.token_embedding(input_ids)  # (B, L, Ct)
        eos = self.pooled_positions(input_ids)  # (B,)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        candidates = (positions[None, :] < eos[:, None]) & ~torch.isin(input_ids, self._special.to(input_ids.device))
        if attention_mask is not None:
            candidates = candidates & attention_mask.bool()
        return Embeddings(tokens=tokens, candidates=candidates, context=TokenInputs(input_ids, attention_mask, position_ids, eos))

    def encode_text(self, embedded: Embeddings) -> Features:
        """Token embeddings -> Features: tokens (B, L, D) projected word features, pooled (B, D) the
        projected end-of-text state (equals ``model.get_text_features(**texts)``'s), context =
        :class:`TextContext` (words, padding True after the end-of-text token or where the mask is 0)."""
        inputs = embedded.context
        if not isinstance(inputs, TokenInputs):
            raise TypeError(
                f"embedded must come from embed_text (its context a TokenInputs), got context {type(inputs).__name__}"
            )
        text = self.text_model
        hidden = text.embeddings(inputs_embeds=embedded.tokens, position_ids=inputs.position_ids)  # (B, L, Ct)
        mask = self._create_causal_mask(
            config=text.config, inputs_embeds=hidden, attention_mask=inputs.attention_mask, cache=None
        )  # what CLIPTextModel.forward builds: None (sdpa's is_causal) or a 4-D additive/boolean mask
        last = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        last = text.final_layer_norm(last)  # (B, L, Ct)
        batch = torch.arange(last.shape[0], device=last.device)
        pooled = self.text_projection(last[batch, inputs.eos.to(last.device)])  # (B, D)
        words = self.text_projection(last)  # (B, L, D)
        positions = torch.arange(last.shape[1], device=last.device)
        padding = positions[None, :] > inputs.eos.to(last.device)[:, None]  # (B, L)
        if inputs.attention_mask is not None:
            padding = padding | ~inputs.attention_mask.to(last.device).bool()
        return Features(tokens=words, pooled=pooled, context=TextContext(words, padding))

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B,) the position the text model pools: the largest id for the legacy
        ``eos_token_id=2`` configs, else the first ``eos_token_id`` (as ``CLIPTextModel.forward``)."""
        ids = input_ids.to(dtype=torch.int)  # the library casts too (argmax on int64 is not ONNX-exportable)
        if self.legacy_pooling:
            return ids.argmax(dim=-1)
        return (ids == self.eos_token_id).int().argmax(dim=-1)

    @torch.no_grad()
    def check_inputs(self, images: torch.Tensor, texts: Mapping[str, torch.Tensor]) -> None:
        """The checks of values that :meth:`embed_text` skips (they wait for the device): every id in the
        vocabulary, and every text holding the end-of-text token the model pools at. Raises a
        ValueError naming ``texts`` and the samples. ``MaskSD.check_inputs`` calls it."""
        self.embed_image(images)
        input_ids, _, _ = read_token_inputs(texts, self.max_length)
        check_vocabulary(input_ids, self.text_model.embeddings.token_embedding.num_embeddings)
        if not self.legacy_pooling:
            missing = ~(input_ids == self.eos_token_id).any(dim=1)
            if bool(missing.any()):
                raise ValueError(
                    f"texts['input_ids'] of samples {missing.nonzero().flatten().tolist()} hold no eos_token_id "
                    f"{self.eos_token_id}, where the text model pools (tokenize with the model's own tokenizer, "
                    f"truncation keeping the end-of-text token)"
                )

# -- helpers shared with clipseg.py and siglip.py ------------------------------------------------


def read_token_inputs(texts: Any, max_length: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, attention_mask, position_ids) of the tokenizer's mapping ``texts``, or an error naming
    ``texts`` and what was expected; at most ``max_length`` tokens (the text model's positions)."""
    if not isinstance(texts, Mapping) or "input_ids" not in texts:
        keys = f" with keys {sorted(texts)}" if isinstance(texts, Mapping) else ""
        raise TypeError(
            f"texts must be the tokenizer's mapping with 'input_ids' (and 'attention_mask'), e.g. "
            f"tokenizer(sentences, padding=True, return_tensors='pt'); got {type(texts).__name__}{keys}"
        )
    input_ids = texts["input_ids"]
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(
            f"texts['input_ids'] must be an integer tensor (B, L) (tokenize with return_tensors='pt'), got {describe(input_ids)}"
        )
    if input_ids.shape[1] > max_length:
        raise ValueError(
            f"texts['input_ids'] has {input_ids.shape[1]} tokens, more than the text model's "
            f"{max_length} positions: tokenize with truncation=True, max_length={max_length}"
        )
    attention_mask = texts.get("attention_mask")
    if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape):
        raise ValueError(
            f"texts['attention_mask'] must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {describe(attention_mask)}"
        )
    position_ids = texts.get("position_ids")
    if position_ids is not None and (not torch.is_tensor(position_ids) or position_ids.shape[-1] != input_ids.shape[1]):
        raise ValueError(f"texts['position_ids'] must be a tensor (B, {input_ids.shape[1]}), got {describe(position_ids)}")
    return input_ids, attention_mask, position_ids


def check_pixel_values(pixel_values: Any, channels: int, image_size: int, interpolate: bool) -> tuple[int, int]:
    """(H, W) of ``pixel_values``, or a ValueError naming it unless it is a float (B, channels, H, W)
    tensor at the model's ``image_size`` (any size when the position embedding is ``interpolate``d)."""
    if (
        not torch.is_tensor(pixel_values)
        or pixel_values.dim() != 4
        or pixel_values.shape[1] != channels
        or not pixel_values.is_floating_point()
    ):
        raise ValueError(
            f"pixel_values must be a float tensor (B, {channels}, H, W) (the processor's inputs['pixel_values']), "
            f"got {describe(pixel_values)}"
        )
    height, width = int(pixel_values.shape[2]), int(pixel_values.shape[3])
    if not interpolate and (height, width) != (image_size, image_size):
        raise ValueError(
            f"pixel_values are {height}x{width} px but the vision model was built for "
            f"{image_size}x{image_size} and its position embedding is not interpolated "
            f"(interpolate_pos_encoding=False, the library's default here): resize the images or build "
            f"the towers with interpolate_pos_encoding=True"
        )
    return height, width


def _check_clip_model(model: object) -> None:
    """Raise a TypeError naming the class unless ``model`` is a CLIPModel or CLIPSegModel."""
    transformers = require_transformers()
    name = type(model).__name__
    if "siglip" in name.lower():
        raise TypeError(
            f"model is a {name}: SigLIP pools images with an attention-pooling head and text at the last token; "
            f"split it with masksd.integrations.HFSiglipTowers(model, ...)"
        )
    if isinstance(model, transformers.CLIPSegForImageSegmentation):
        raise TypeError(
            "model is a CLIPSegForImageSegmentation: wrap it whole with masksd.integrations.CLIPSegSegmenter(model), "
            "or take its CLIP alone with HFCLIPTowers(model.clip)"
        )
    if not isinstance(model, (transformers.CLIPModel, transformers.CLIPSegModel)):
        raise TypeError(
            f"model must be a transformers CLIPModel (with both towers; or CLIPSeg's CLIPSegModel), got {name}"
        )


def resolve_interpolation(interpolate_pos_encoding: bool | None, function: Callable[..., Any]) -> bool:
    """``interpolate_pos_encoding`` itself, or for None the default of that argument in the library's ``function``
    (``get_image_features``); a TypeError for anything but a bool or None."""
    if interpolate_pos_encoding is None:
        interpolate_pos_encoding = library_default(function, "interpolate_pos_encoding", False)
    if not isinstance(interpolate_pos_encoding, bool):
        raise TypeError(f"interpolate_pos_encoding must be a bool or None, got {interpolate_pos_encoding!r}")
    return interpolate_pos_encoding


def check_vocabulary(input_ids: torch.Tensor, vocab: int) -> None:
    """A ValueError naming ``texts`` and the samples holding ids outside 0..vocab-1 (reads values: not for the hot path)."""
    outside = ((input_ids < 0) | (input_ids >= vocab)).any(dim=1)
    if bool(outside.any()):
        raise ValueError(f"texts['input_ids'] of samples {outside.nonzero().flatten().tolist()} hold ids outside the vocabulary of {vocab}")


def check_layers(layers: Sequence[int], depth: int, source: str) -> tuple[int, ...]:
    """``layers`` as a tuple of distinct 0-based layer indices below ``depth``, or a ValueError naming ``source``."""
    try:
        resolved = tuple(int(i) for i in layers)
    except TypeError:
        raise TypeError(f"{source} must be a sequence of ints, got {type(layers).__name__}") from None
    if any(not 0 <= i < depth for i in resolved) or len(set(resolved)) != len(resolved):
        raise ValueError(f"{source} must be distinct 0-based encoder layer indices below the depth {depth}, got {resolved}")
    return resolved


def resolve_special_ids(text_config: Any, tokenizer: Any, special_token_ids: Iterable[int] | None) -> frozenset[int]:
    """The ids that are never candidates: ``special_token_ids``, else the tokenizer's (or processor's)
    ``all_special_ids``, else the config's bos and eos ids; a ValueError for a legacy config without either."""
    if special_token_ids is not None and tokenizer is not None:
        raise ValueError("pass tokenizer or special_token_ids, not both")
    if special_token_ids is not None:
        return frozenset(int(i) for i in special_token_ids)
    if tokenizer is not None:
        for source in (tokenizer, getattr(tokenizer, "tokenizer", None)):  # a processor holds its tokenizer
            ids = getattr(source, "all_special_ids", None)
            if ids:
                return frozenset(int(i) for i in ids)
        raise TypeError(
            f"tokenizer must be a transformers tokenizer or processor (with all_special_ids), got {type(tokenizer).__name__}"
        )
    if text_config.eos_token_id == LEGACY_EOS_TOKEN_ID:
        raise ValueError(
            f"the text config has the legacy eos_token_id={LEGACY_EOS_TOKEN_ID} (a checkpoint from before transformers "
            f"PR #24773, as OpenAI's): its bos/eos/pad ids are ordinary words, not the tokenizer's special tokens; "
            f"pass tokenizer=AutoTokenizer.from_pretrained(...) (or the processor) or special_token_ids"
        )
    return frozenset(int(i) for i in (text_config.bos_token_id, text_config.eos_token_id) if i is not None)


def causal_mask_helper(text_model: nn.Module) -> Callable[..., Any]:
    """The ``create_causal_mask`` that the text model's own module calls in its forward."""
    return mask_helper(text_model, "create_causal_mask")


def mask_helper(text_model: nn.Module, name: str) -> Callable[..., Any]:
    """The mask helper ``name`` (``create_causal_mask``, ``create_bidirectional_mask``) that the text model's
    own module calls in its forward, or an ImportError naming the transformers version."""
    helper = getattr(sys.modules.get(type(text_model).__module__), name, None)
    if helper is None:
        transformers = require_transformers()
        raise ImportError(
            f"{type(text_model).__name__} in transformers {transformers.__version__} does not build its mask with "
            f"{name}; masksd's integration follows transformers>=5: {INSTALL_HINT}"
        )
    return helper


def library_default(function: Callable[..., Any], name: str, fallback: Any) -> Any:
    """The default of argument ``name`` in the library's ``function`` (read, not restated here)."""
    parameter = inspect.signature(function).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
