"""CLIPSeg as the pipeline's second architecture (``--model clipseg``): the same training, validation,
evaluation and prediction scripts as CRIS, through :class:`masksd.integrations.CLIPSegSegmenter`.

``CLIPSegRIS`` adds what the scripts ask of a segmenter besides the MaskSD protocol: ``tokenize``,
``token_strings``, ``grid_size`` and ``config``. ``pretrained`` is a local snapshot of
``CIDAS/clipseg-rd64-refined`` (a folder holding ``config.json``, the weights and the tokenizer files,
as ``save_pretrained`` writes it); None builds a tiny random CLIPSeg with CLIP's BPE vocabulary (from
open_clip's tokenizer) for tests and the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from examples.cris.config import CLIP_CONTEXT_LENGTH
from examples.cris.truncation import TruncationCount, cut_to_context
from masksd.data import CLIP_MEAN, CLIP_STD, Renormalise
from masksd.integrations import CLIPSegSegmenter
from masksd.integrations.hfclip import require_transformers

__all__ = ["CLIPSEG", "CLIPSegRIS", "CLIPSegRISConfig"]

CLIPSEG = "clipseg"
"""The ``--model`` value that selects this architecture."""


@dataclass
class CLIPSegRISConfig:
    """A CLIPSeg referring segmenter for the pipeline. The sizes below apply to the random model only
    (``pretrained=None``); a snapshot brings its own architecture."""

    pretrained: str | None = None
    """A local CLIPSeg snapshot folder (``CIDAS/clipseg-rd64-refined`` saved with ``save_pretrained``),
    or None for a tiny random CLIPSeg."""
    image_size: int = 64
    """Square input size (CLIPSeg interpolates its position embedding to it; the snapshot was trained at 352)."""
    max_words: int = 17
    """Text positions, BOS and EOS included; longer sentences are truncated (EOS kept)."""
    width: int = 32
    """Hidden size of both random towers."""
    layers: int = 3
    """Layers of the random vision tower (the text tower has 2)."""
    heads: int = 4
    """Attention heads of the random towers."""
    patch_size: int = 8
    """Patch size of the random vision tower."""
    reduce_dim: int = 16
    """Width of the random decoder."""
    extract_layers: tuple[int, ...] = (0, 1, 2)
    """Vision layers the random decoder reads."""

    def __post_init__(self) -> None:
        for name in ("image_size", "max_words", "width", "layers", "heads", "patch_size", "reduce_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (3 if name == "max_words" else 1):
                raise ValueError(f"{name} must be a positive int (max_words >= 3), got {value!r}")
        self.extract_layers = tuple(self.extract_layers)
        if self.pretrained is not None and not Path(self.pretrained).is_dir():
            raise FileNotFoundError(
                f"pretrained={self.pretrained!r} is not a folder: pass a local CLIPSeg snapshot (e.g. "
                f"CLIPSegForImageSegmentation.from_pretrained('CIDAS/clipseg-rd64-refined').save_pretrained(DIR), with "
                f"its processor saved there too), or none for a random tiny CLIPSeg"
            )


class CLIPSegRIS(CLIPSegSegmenter):
    """CLIPSeg for the training scripts: ``model(images, tokenize(texts))`` -> (B, 1, S, S) logits for
    CLIP-normalised (B, 3, S, S) images, the pipeline's input (see :mod:`masksd.data.transforms`)."""

    def __init__(self, config: CLIPSegRISConfig | None = None, hf_config: dict[str, Any] | None = None):
        transformers = require_transformers()
        config = CLIPSegRISConfig() if config is None else config
        if config.pretrained is not None and hf_config is None:
            model = transformers.CLIPSegForImageSegmentation.from_pretrained(config.pretrained)
        else:  # a checkpoint's architecture, or the random tiny one
            spec = transformers.CLIPSegConfig.from_dict(hf_config) if hf_config is not None else _tiny_config(config)
            model = transformers.CLIPSegForImageSegmentation(spec)
        tokenizer, mean, std = _tokenizer_and_normalisation(config.pretrained)
        super().__init__(model, tokenizer=tokenizer)  # both tokenizers list their special ids (all_special_ids)
        self.config = config
        self._tokenizer = tokenizer
        self.truncation = TruncationCount(config.max_words)  # expressions cut by tokenize, warned once
        # The pipeline normalises with CLIP's statistics; a snapshot's processor may use others (CLIPSeg's
        # uses ImageNet's): an exact per-channel affine map between the two, identity for the random model.
        self.renormalise = Renormalise(mean, std)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the patch grid at ``config.image_size``."""
        patch = self.model.config.vision_config.patch_size
        return (self.config.image_size // patch, self.config.image_size // patch)

    def embed_image(self, images: torch.Tensor):
        return super().embed_image(self.renormalise(images))  # CLIP's normalisation -> the processor's

    def tokenize(self, texts: Sequence[str]):
        """Referring expressions -> the tokenizer's mapping (``input_ids``, ``attention_mask``: (B, max_words)),
        a ``transformers.BatchEncoding`` (``.to(device)`` works). Raises ValueError naming an empty text. A text
        longer than max_words is cut (end token kept), counted in ``self.truncation`` and warned about once."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise TypeError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{index}] must be a non-empty string, got {text!r}")
        transformers = require_transformers()
        length = self.config.max_words
        if isinstance(self._tokenizer, transformers.PreTrainedTokenizerBase):  # the snapshot's
            needed = [len(ids) for ids in self._tokenizer(list(texts))["input_ids"]]  # uncut, special tokens included
            self.truncation.record(texts, needed)
            return self._tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        full = self._tokenizer(list(texts), context_length=CLIP_CONTEXT_LENGTH + 1)  # open_clip's: EOT kept, zero padding
        ids, needed = cut_to_context(full, length, self._tokenizer.eot_token_id)  # (B, max_words), as open_clip cuts
        self.truncation.record(texts, needed, measured=full.shape[1])
        eot = (ids == self._tokenizer.eot_token_id).int().argmax(dim=1)  # (B,)
        attention = (torch.arange(length)[None, :] <= eot[:, None]).long()  # (B, L)
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": attention})

    def token_strings(self, token_ids: torch.Tensor) -> list[str]:
        """One row of token ids (L,) -> the text of each position up to and including the end-of-text token."""
        ids = token_ids.tolist()
        eos = self.towers.eos_token_id
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        if hasattr(self._tokenizer, "convert_ids_to_tokens"):  # the snapshot's
            return [t.replace("</w>", "") for t in self._tokenizer.convert_ids_to_tokens(ids)]
        return [self._tokenizer.decode([i]).strip() for i in ids]

    def hf_config(self) -> dict[str, Any]:
        """The architecture as a plain dict (what a checkpoint stores to rebuild the model without the snapshot)."""
        return self.model.config.to_dict()


def _tiny_config(config: CLIPSegRISConfig):
    transformers = require_transformers()
    from open_clip import get_tokenizer  # the random model speaks CLIP's BPE vocabulary

    tokenizer = get_tokenizer("ViT-B-16")
    text = dict(vocab_size=49408, hidden_size=config.width, intermediate_size=2 * config.width, num_hidden_layers=2,
                num_attention_heads=config.heads, max_position_embeddings=77,
                bos_token_id=tokenizer.sot_token_id, eos_token_id=tokenizer.eot_token_id, pad_token_id=0)
    vision = dict(hidden_size=config.width, intermediate_size=2 * config.width, num_hidden_layers=config.layers,
                  num_attention_heads=config.heads, image_size=config.image_size, patch_size=config.patch_size)
    return transformers.CLIPSegConfig(
        text_config=text, vision_config=vision, projection_dim=config.width, extract_layers=config.extract_layers,
        reduce_dim=config.reduce_dim, decoder_num_attention_heads=config.heads, decoder_intermediate_size=2 * config.reduce_dim,
    )


def _tokenizer_and_normalisation(pretrained: str | None) -> tuple[Any, tuple, tuple]:
    """The snapshot's tokenizer and its image processor's mean/std; open_clip's tokenizer and CLIP's for the random model."""
    if pretrained is None:
        from open_clip import get_tokenizer

        return get_tokenizer("ViT-B-16"), CLIP_MEAN, CLIP_STD
    transformers = require_transformers()
    try:
        processor = transformers.AutoProcessor.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"pretrained={pretrained!r} holds no CLIPSeg processor (tokenizer files, preprocessor_config.json): {error}") from error
    images = processor.image_processor
    return processor.tokenizer, tuple(float(v) for v in images.image_mean), tuple(float(v) for v in images.image_std)
