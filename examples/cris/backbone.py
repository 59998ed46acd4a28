"""The CLIP image and text encoders, built by open_clip and split at the embedding level by masksd.integrations."""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
from dataclasses import replace

from einops import rearrange
from open_clip.transformer import VisionTransformer
from torch import nn

from examples.cris.config import SHIPPED_WEIGHTS, TINY_CLIP
from masksd import Embeddings, Features
from masksd.integrations import OpenCLIPTowers

__all__ = ["CLIPBackbone", "create_clip", "get_tokenizer", "register_model_configs", "resolve_quick_gelu"]

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")


def register_model_configs() -> None:
    """Add ``examples/cris/model_configs/`` to open_clip's model configs (once), so that
    ``open_clip.create_model(TINY_CLIP)`` builds the tiny model like any built-in one."""
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_quick_gelu(model_name: str, pretrained: str | None, quick_gelu: bool | None) -> bool:
    """QuickGELU on or off: ``quick_gelu`` when given, else what the pretrained tag was trained with."""
    if quick_gelu is not None:
        return quick_gelu
    if pretrained is None:
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


@contextmanager
def _interpolate_in_float32() -> Iterator[None]:
    """open_clip resizes a checkpoint's image position embedding in the checkpoint's dtype, and torch's CPU
    bicubic interpolation has no half-precision kernel: an fp16 checkpoint (the shipped tiny weights,
    OpenAI's) failed at any size but its own. Within this context the embedding is cast to float32 first;
    the model is float32 and load_state_dict casts to it anyway, so a checkpoint at its own size loads
    the same values."""
    import open_clip.factory

    resize = open_clip.factory.resize_pos_embed

    def resize_in_float32(state_dict, model, *args, **kwargs):
        embedding = state_dict.get("visual.positional_embedding")
        if embedding is not None and embedding.is_floating_point():
            state_dict["visual.positional_embedding"] = embedding.float()
        return resize(state_dict, model, *args, **kwargs)

    open_clip.factory.resize_pos_embed = resize_in_float32
    try:
        yield
    finally:
        open_clip.factory.resize_pos_embed = resize


def create_clip(
    model_name: str, pretrained: str | None, image_size: int, quick_gelu: bool | None = None
) -> open_clip.CLIP:
    """An open_clip CLIP at ``image_size`` px: random init, a pretrained tag, shipped weights by name, or a local checkpoint.

    open_clip interpolates the checkpoint's image position embedding to the new grid when it loads
    (in float32, whatever the checkpoint's precision).
    Raises FileNotFoundError for a ``pretrained`` that is neither a tag nor a file, a ValueError naming a
    local file that is truncated, a training checkpoint or another model's weights, and a RuntimeError
    that says what to do when a tag's weights cannot be downloaded.
    """
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"model_name {model_name!r} is not an open_clip model config (see open_clip.list_models())")
    if pretrained in SHIPPED_WEIGHTS:
        model_for, path = SHIPPED_WEIGHTS[pretrained]
        if model_for != model_name:
            raise ValueError(f"pretrained={pretrained!r} holds weights for model {model_for!r}, got model_name {model_name!r}")
        pretrained = str(path)
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"the shipped weights {pretrained} are missing from this checkout (git lfs? a partial copy?)")
    is_tag = pretrained is not None and bool(open_clip.get_pretrained_cfg(model_name, pretrained))
    if pretrained is not None and not is_tag and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither an open_clip tag for {model_name} (tags: {tags}) "
            f"nor an existing checkpoint file: {os.path.abspath(pretrained)}"
        )
    try:
        with _interpolate_in_float32():
            clip = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                force_image_size=image_size,
                force_quick_gelu=resolve_quick_gelu(model_name, pretrained, quick_gelu),
            )
    except Exception as error:  # open_clip's torch.load or load_state_dict, in its own words
        if not is_tag:
            raise _weights_file_error(pretrained, model_name, error) from error
        if not isinstance(error, RuntimeError):
            raise
        raise RuntimeError(
            f"could not fetch the {model_name} weights tagged {pretrained!r} (offline?). Download them where "
            f"there is a network (open_clip.create_model({model_name!r}, pretrained={pretrained!r}) fills the "
            f"Hugging Face cache, which later runs use offline), or pass the checkpoint file as pretrained "
            f"(with quick_gelu=True for OpenAI weights)."
        ) from error
    _check_clip(model_name, clip)
    return clip


def _weights_file_error(path: str, model_name: str, error: BaseException) -> Exception:
    """Why open_clip could not load the local weights file ``path`` for ``model_name``, as one ValueError
    (the file is read again, with ``weights_only=True``, to tell which); ``error`` itself when the file
    loads and holds the CLIP weights it should (a bug, not the file's fault)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as load_error:  # torch's own words only where they say something about the file
        first = (str(load_error).strip().splitlines() or [""])[0].split(". ")[0][:200]
        detail = f": {first}" if isinstance(load_error, (RuntimeError, pickle.UnpicklingError)) and first else ""
        return ValueError(f"pretrained={path!r} is truncated or not a file torch.save wrote (a partial download or copy?){detail}")
    if isinstance(state, dict) and "model" in state and {"optimizer", "step"} & state.keys():
        return ValueError(
            f"pretrained={path!r} is a training checkpoint (of {state.get('family', 'a training run')}), not CLIP weights: "
            f"continue it with --resume, evaluate it with evaluate.py, or pass CLIP weights such as the clip.pt "
            f"examples/pretrain_clip.py writes"
        )
    text = str(error)
    counts = {kind: len(re.findall(r'"[^"]+"', found.group(1))) for kind in ("Missing", "Unexpected")
              if (found := re.search(rf"{kind} key\(s\) in state_dict: (.*)", text))}
    if counts or "size mismatch" in text:
        found = ", ".join(f"{n} {kind.lower()}" for kind, n in counts.items())
        reshaped = text.count("size mismatch")
        found = ", ".join(x for x in (found, f"{reshaped} of another shape" if reshaped else "") if x)
        return ValueError(f"pretrained={path!r} does not hold open_clip CLIP weights for {model_name}: its tensors do not fit ({found})")
    return error if isinstance(error, Exception) else ValueError(str(error))


def _check_clip(model_name: str, clip: nn.Module) -> None:
    """Raise unless ``clip`` is the CLIP layout the backbone reads: ViT image tower, CLIP text tower."""
    problems = []
    if not isinstance(clip, open_clip.CLIP):
        problems.append(f"model class {type(clip).__name__} (expected open_clip.CLIP)")
    else:
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            problems.append(f"image tower {type(visual).__name__} (expected a ViT)")
        elif visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            problems.append("image pooling other than the class token")
        elif not isinstance(visual.patch_dropout, nn.Identity):
            problems.append("patch dropout (it would break the token alignment MaskSD relies on)")
        if clip.text_pool_type != "argmax":
            problems.append(f"text pooling {clip.text_pool_type!r} (expected the EOT token, 'argmax')")
    if problems:
        raise ValueError(f"{model_name} cannot serve as the CRIS backbone: " + "; ".join(problems))


@lru_cache(maxsize=8)
def get_tokenizer(model_name: str, context_length: int) -> open_clip.SimpleTokenizer:
    """open_clip's tokenizer for ``model_name`` at ``context_length`` (built once: it parses the BPE merges)."""
    register_model_configs()
    return open_clip.get_tokenizer(model_name, context_length=context_length)


class CLIPBackbone(OpenCLIPTowers):
    """CLIP's two towers split at the embeddings (:class:`masksd.integrations.OpenCLIPTowers`), with
    what CRIS adds: a text context of ``max_words``, the ``feature_layers`` its neck reads, the
    weights that only feed MaskSD's no-grad correlation frozen, and ``deep_level``.

    Holds the CLIP modules under open_clip's own attribute names, so that its state dict is a CLIP
    state dict without ``logit_scale`` (see :meth:`clip_state_dict`). The text context stays at 77
    positions so pretrained weights load unchanged; only the first ``max_words`` are used.
    """

    def __init__(
        self,
        clip: open_clip.CLIP,
        tokenizer: open_clip.SimpleTokenizer,
        max_words: int,
        feature_layers: tuple[int, int, int],
        deep_level: str = "block",
    ):
        if max_words > clip.context_length:
            raise ValueError(f"max_words={max_words} exceeds the text tower's {clip.context_length} positions")
        super().__init__(clip, tokenizer, layers=feature_layers)
        # CLIP's logit_scale (and logit_bias) are not taken: only the contrastive loss uses them.
        self.max_words = max_words
        self.feature_layers = tuple(feature_layers)
        self.deep_level = deep_level
        self.grid_size = tuple(self.visual.grid_size)

        if deep_level == "block":
            # ln_post and proj only map tokens into the joint space for MaskSD's no-grad correlation: frozen.
            self.visual.ln_post.requires_grad_(False)
            self.visual.proj.requires_grad_(False)
            # Blocks after the deepest feature level feed only that correlation too.
            self.visual.transformer.resblocks[self.feature_layers[-1] + 1 :].requires_grad_(False)

    @property
    def image_width(self) -> int:
        """C of the patch embeddings (the ViT width)."""
        return self.image_embed_dim

    @property
    def text_width(self) -> int:
        """C of the token embeddings (the text transformer width)."""
        return self.text_embed_dim

    @property
    def embed_dim(self) -> int:
        """D of CLIP's joint image-text space."""
        return self.visual.output_dim

    def encode_image(self, embedded: Embeddings) -> Features:
        """Patch embeddings -> Features (see OpenCLIPTowers); with ``deep_level="projected"`` the deepest
        level is the (B, D, h, w) map of the projected patch tokens instead of a block's output."""
        features = super().encode_image(embedded)
        if self.deep_level != "projected":  # the tokens the correlation ranks also feed the decoder (ETRIS-style)
            return features
        grid = features.context.grid
        levels = features.context.levels[:-1] + (rearrange(features.tokens, "b (h w) c -> b c h w", h=grid[0]),)
        return replace(features, context=features.context._replace(levels=levels))

    def project_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class and patch rows of one projection of the whole (B, 1 + N, Cv) sequence: the arithmetic
        every stored CRIS run used (equal to CLIP's pooled-then-projected feature up to float rounding)."""
        projected = x @ self.visual.proj  # (B, 1 + N, D)
        return projected[:, 0], projected[:, 1:]

    def project_text(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The words projected once and the sentence read from them at ``index``: as every stored CRIS
        run computed it (equal to CLIP's pooled-then-projected feature up to float rounding)."""
        words = self._project(x)  # (B, L, D)
        return words[torch.arange(words.shape[0], device=words.device), index], words

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as an open_clip CLIP state dict, loadable by ``create_model(pretrained=<file>)``."""
        state = super().clip_state_dict()
        # open_clip's strict loader expects the key; CRIS never trains it, so CLIP's initial value goes in.
        state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
        return state
