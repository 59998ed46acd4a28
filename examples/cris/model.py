"""CRIS: the CRIS-style CLIP referring segmenter of CM-MaskSD, implementing masksd's adapter protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from examples.cris.backbone import CLIPBackbone, create_clip, get_tokenizer, resolve_quick_gelu
from examples.cris.config import CLIP_CONTEXT_LENGTH, CRISConfig
from examples.cris.decoder import Projector, VisionLanguageDecoder
from examples.cris.neck import FusionNeck, ViTPyramid
from examples.cris.truncation import TruncationCount, cut_to_context
from masksd import Embeddings, Features, SegmenterAdapter
from masksd.adapter import FeatureMapLayout
from masksd.integrations import ImageContext, TextContext

__all__ = ["CRIS", "DecodeHead", "TextContext"]  # TextContext: masksd.integrations's, re-exported


class DecodeHead(nn.Module):
    """Everything after the encoders: ViT pyramid, fusion neck, vision-language decoder, projector.

    Called as ``head(visual, text)`` with :class:`masksd.Features`: ``visual.context`` is an
    :class:`~masksd.integrations.ImageContext` with the three (B, Cv, g, g) ViT levels, ``text.pooled``
    the (B, D) sentence state and ``text.context`` a :class:`~masksd.integrations.TextContext`. Returns (B, 1, 4g, 4g) mask logits (1/4 of the input for patch 16).

    Split for MaskSD's features site (:class:`masksd.adapter.FeatureMapHead`): :meth:`feature_maps` is the
    pyramid (the three maps the neck reads), :meth:`decode_maps` the rest; ``forward`` is the two in turn.
    """

    def __init__(self, image_width: int, text_dim: int, config: CRISConfig):
        super().__init__()
        deep_width = text_dim if config.deep_level == "projected" else image_width  # text_dim is CLIP's joint D
        self.pyramid = ViTPyramid(image_width, config.pyramid_channels, deep_width)
        self.neck = FusionNeck(config.pyramid_channels, config.neck_channels, text_dim, fast=config.fast_head)
        self.decoder = VisionLanguageDecoder(
            config.decoder_layers,
            config.decoder_dim,
            config.decoder_heads,
            config.decoder_ffn,
            config.decoder_dropout,
            text_dim,
        )
        self.projector = Projector(config.decoder_dim, text_dim, config.projector_kernel, fast=config.fast_head)

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        return self.decode_maps(self.feature_maps(visual), visual, text)

    def set_fast(self, projector: bool, coordinates: bool) -> None:
        """Switch the two reassociated parts of ``CRISConfig.fast_head`` (the projector's dynamic convolution,
        CoordConv's coordinates) on or off in place, keeping the weights: for benchmarks that compare them on
        one model. A model's config says what it was built with."""
        self.projector.fast = projector
        self.neck.refine[0].fast = coordinates

    def feature_maps(self, visual: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pyramid's maps (B, C_i, ...) at 2g, g and ceil(g/2): what the fusion neck reads."""
        image = visual.context
        if not isinstance(image, ImageContext) or len(image.levels) != 3:
            raise TypeError(f"visual.context must be an ImageContext with the three ViT levels, got {type(image).__name__}")
        return self.pyramid(image.levels)

    def decode_maps(self, maps: Sequence[torch.Tensor], visual: Features, text: Features) -> torch.Tensor:
        """(B, 1, 4g, 4g) mask logits from the three pyramid maps and the text (``visual`` is not read again)."""
        context = text.context
        if not isinstance(context, TextContext):
            raise TypeError(f"text.context must be a TextContext, got {type(context).__name__}")
        fused = self.neck(maps, text.pooled)  # (B, dim, g, g)
        fused = self.decoder(fused, context.words, context.padding)
        return self.projector(fused, text.pooled)  # (B, 1, 4g, 4g)


class CRIS(SegmenterAdapter):
    """CRIS-style referring segmenter on an open_clip CLIP (paper §III-A, Eq. 1-2).

    ``model(images, token_ids)`` returns (B, 1, 4g, 4g) mask logits for (B, 3, S, S) images
    (S = ``config.image_size``) and (B, L <= max_words) token ids from :meth:`tokenize`.
    Wrap it in :class:`masksd.MaskSD` for training with the distillation branches.
    """

    def __init__(self, config: CRISConfig | None = None):
        super().__init__()
        config = CRISConfig() if config is None else config
        if not isinstance(config, CRISConfig):
            raise TypeError(f"config must be a CRISConfig, got {type(config).__name__}")
        # Keep the activation actually built, so a checkpoint rebuilds the same network without the tag.
        config = replace(config, quick_gelu=resolve_quick_gelu(config.model_name, config.pretrained, config.quick_gelu))
        self.config = config
        clip = create_clip(config.model_name, config.pretrained, config.image_size, config.quick_gelu)
        patch = clip.visual.patch_size[0]
        if config.image_size % patch:
            raise ValueError(f"image_size={config.image_size} must be a multiple of {config.model_name}'s patch size {patch}")
        layers = config.resolved_feature_layers(len(clip.visual.transformer.resblocks))
        self._tokenizer = get_tokenizer(config.model_name, config.max_words)
        self.backbone = CLIPBackbone(clip, self._tokenizer, config.max_words, layers, config.deep_level)
        self.decode_head = DecodeHead(self.backbone.image_width, self.backbone.embed_dim, config)
        self.image_embed_dim = self.backbone.image_width
        self.text_embed_dim = self.backbone.text_width
        self.special_token_ids = self.backbone.special_token_ids
        self.sot_id = self._tokenizer.sot_token_id
        self.eot_id = self._tokenizer.eot_token_id
        self.truncation = TruncationCount(config.max_words)  # expressions cut by tokenize, warned once

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the ViT's patch grid at ``config.image_size``."""
        return self.backbone.grid_size

    @property
    def feature_map_layout(self) -> FeatureMapLayout:
        """The patch grid and the (C, h, w) of the pyramid's three maps, which MaskSD's features site replaces
        (ViT-B-16 @ 480: 512 x 60², 1024 x 30², 1024 x 15²)."""
        grid = tuple(self.grid_size)
        return FeatureMapLayout(grid, self.decode_head.pyramid.output_shapes(grid))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Referring expressions -> (B, max_words) long token ids (SOT, words, EOT, zero padding).

        Uses open_clip's tokenizer: a sentence too long is cut to max_words with EOT kept last, counted in
        ``self.truncation``, and the first batch with a cut sentence warns once with the counts.
        Raises ValueError naming the index of an empty or whitespace-only text.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is empty: nothing to tokenize")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"texts[{index}] is empty or whitespace only: {text!r}")
        full = self._tokenizer(list(texts), context_length=CLIP_CONTEXT_LENGTH + 1)  # (B, 78): what each text needs
        ids, needed = cut_to_context(full, self.config.max_words, self.eot_id)  # (B, max_words), as open_clip cuts
        self.truncation.record(texts, needed, measured=full.shape[1])
        wordless = (ids[:, 1] == self.eot_id).nonzero().flatten().tolist()
        if wordless:  # e.g. text the tokenizer's cleaning removes entirely
            raise ValueError(f"texts at indices {wordless} have no word left after tokenization: {[texts[i] for i in wordless]}")
        return ids

    def token_strings(self, token_ids: torch.Tensor) -> list[str]:
        """One row of token ids (L,) -> the text of each position up to and including EOT
        (``<start_of_text>``, word pieces, ``<end_of_text>``), aligned with ``embed_text``'s positions."""
        ids = token_ids.tolist()
        end = ids.index(self.eot_id) + 1 if self.eot_id in ids else len(ids)
        return [self._tokenizer.decode([i]).strip() for i in ids[:end]]

    def word_index(self, texts: Sequence[str], token_ids: torch.Tensor) -> torch.Tensor:
        """Which whitespace-separated word of ``texts[b]`` each token position comes from.

        texts: B strings; token_ids: (B, L) long, ``self.tokenize(texts)``. Returns (B, L) long:
        the 0-based word index at each word piece, -1 at SOT, EOT and padding. Derived from the
        tokenizer itself (each word tokenized alone); raises ValueError if a row's pieces are not
        those words' pieces in order (a sentence cut at ``max_words`` keeps its leading pieces).
        """
        self.check_inputs(None, token_ids)
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) != token_ids.shape[0]:
            got = f"{len(texts)} texts" if isinstance(texts, Sequence) and not isinstance(texts, str) else type(texts).__name__
            raise ValueError(f"texts must be a list of {token_ids.shape[0]} strings, one per token_ids row, got {got}")
        index = torch.full(token_ids.shape, -1, dtype=torch.long)  # (B, L)
        eot = _eot_index(token_ids, self.eot_id).tolist()
        for row, (text, ids, end) in enumerate(zip(texts, token_ids.tolist(), eot)):
            words = text.split() if isinstance(text, str) else None
            if not words:
                raise ValueError(f"texts[{row}] must be a non-empty str, got {text!r}")
            pieces, owners = [], []
            # Tokenized one by one at full length, so that no word is cut; SOT and EOT stripped.
            for w, word_ids in enumerate(self._tokenizer(words, context_length=CLIP_CONTEXT_LENGTH).tolist()):
                word_pieces = word_ids[1 : word_ids.index(self.eot_id)]
                pieces += word_pieces
                owners += [w] * len(word_pieces)
            kept = end - 1  # word pieces sit at positions 1 .. end - 1
            cut = kept < len(pieces) and end == self.config.max_words - 1  # truncated by tokenize
            if ids[1:end] != pieces[:kept] or (kept != len(pieces) and not cut):
                raise ValueError(
                    f"token_ids row {row} is not the tokenization of texts[{row}]={text!r}: its word pieces "
                    f"{ids[1:end]} differ from the words' own {pieces}"
                )
            index[row, 1:end] = torch.tensor(owners[:kept], dtype=torch.long)
        return index.to(token_ids.device)

    def word_mask(self, texts: Sequence[str], token_ids: torch.Tensor, flags: Sequence[Sequence[bool]]) -> torch.Tensor:
        """(B, L) bool, True at the token positions of the words flagged True.

        texts: B strings; token_ids: (B, L) from ``self.tokenize(texts)``; flags: per text, one bool
        per whitespace-separated word (e.g. ``masksd.data.synthetic.target_words``). A word made
        of several BPE pieces marks them all; words cut off at ``max_words`` mark nothing.
        """
        index = self.word_index(texts, token_ids).cpu()  # (B, L)
        if len(flags) != len(texts):
            raise ValueError(f"flags must hold one list per text ({len(texts)}), got {len(flags)}")
        out = torch.zeros(index.shape, dtype=torch.bool)
        for row, (text, row_flags) in enumerate(zip(texts, flags)):
            n_words = len(text.split())
            if len(row_flags) != n_words:
                raise ValueError(f"flags[{row}] must hold one bool per word of texts[{row}] ({n_words}), got {len(row_flags)}")
            lookup = torch.tensor([bool(f) for f in row_flags] + [False])  # index -1 reads the trailing False
            out[row] = lookup[index[row]]
        return out.to(token_ids.device)

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        """(B, 3, S, S) float images -> Embeddings with (B, N, Cv) patch embeddings; context = grid (h, w)."""
        size = self.config.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
            got = f"shape {tuple(images.shape)}, dtype {images.dtype}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, {size}, {size}), got {got}")
        if tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"images must have shape (B, 3, {size}, {size}) to match image_size={size} "
                f"(the position embedding's grid), got {tuple(images.shape)}"
            )
        return self.backbone.embed_image(images)

    def encode_image(self, embedded: Embeddings) -> Features:
        """Patch embeddings -> Features: tokens (B, N, D) and pooled (B, D) in CLIP's joint space
        (through CLIP's frozen ln_post and proj), context = an ImageContext with the three (B, Cv, g, g) ViT levels."""
        return self.backbone.encode_image(embedded)

    def embed_text(self, token_ids: torch.Tensor) -> Embeddings:
        """(B, L) long token ids -> Embeddings with (B, L, Ct) token embeddings; candidates True at
        real words only (not SOT, EOT or padding); context = the token ids."""
        self._check_token_ids(token_ids)
        return self.backbone.embed_text(token_ids)

    def encode_text(self, embedded: Embeddings) -> Features:
        """Token embeddings -> Features: tokens = (B, L, D) word features, pooled = (B, D) EOT
        sentence state (both projected into the joint space); context = a TextContext."""
        return self.backbone.encode_text(embedded)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Inference: (B, 1, 4g, 4g) mask logits, after :meth:`check_inputs` (MaskSD's training step
        calls the pieces directly and checks values only on request)."""
        self.check_inputs(images, token_ids)
        if torch.is_tensor(images) and images.dim() == 4 and images.shape[0] != token_ids.shape[0]:
            raise ValueError(
                f"images and token_ids must hold one text per image: got {images.shape[0]} images and "
                f"{token_ids.shape[0]} texts"
            )
        return super().forward(images, token_ids)

    def check_inputs(self, images: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Value checks that wait for the device: every row of ``token_ids`` starts with SOT and holds an
        EOT. Raises a ValueError naming the rows. (Shapes and dtypes are checked on every call anyway.)"""
        self._check_token_ids(token_ids)
        bad = ((token_ids[:, 0] != self.sot_id) | ~(token_ids == self.eot_id).any(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"token_ids rows {bad} do not start with SOT ({self.sot_id}) and hold an EOT ({self.eot_id})")

    def _check_token_ids(self, token_ids: torch.Tensor) -> None:
        """Shape and dtype only: reading the ids would wait for the device in every training step."""
        max_words = self.config.max_words
        if not torch.is_tensor(token_ids) or token_ids.dim() != 2 or token_ids.dtype != torch.long:
            got = f"shape {tuple(token_ids.shape)}, dtype {token_ids.dtype}" if torch.is_tensor(token_ids) else type(token_ids).__name__
            raise ValueError(f"token_ids must be a (B, L) long tensor from CRIS.tokenize, got {got}")
        if not 2 <= token_ids.shape[1] <= max_words:
            raise ValueError(f"token_ids must have 2..max_words={max_words} columns, got {token_ids.shape[1]}")


def _eot_index(token_ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B,) position of the first EOT token in each row."""
    return (token_ids == eot_id).int().argmax(dim=1)
