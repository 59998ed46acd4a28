"""LAVT: a LAVT-style referring segmenter on transformers' SwinModel and BertModel, implementing masksd's fused protocol.

    images --Swin patch embedding--> (B, N, C) ------+
                                                     +-- encode: Swin stage s, then PWAM_s(pixels, words) and the
    texts --BERT word embedding--> (B, L, Ct) --BERT-+   language gate, for s = 1..4 --> four multimodal maps
                                                                                   --> LAVTDecodeHead --> (B, 1, H, W)

MaskSD's mask token replaces patch embeddings (LMVSD) where transformers' SimMIM mask token goes, after the patch
embedding's LayerNorm and before any position embedding, and word embeddings (VMLSD) before BERT adds position and
token-type embeddings. Each masked branch re-runs :meth:`LAVT.encode`: the words act inside the image encoder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from einops import rearrange
from torch import nn

from examples.cris.truncation import TruncationCount
from examples.lavt.config import LAVTConfig
from examples.lavt.decoder import LAVTDecodeHead, LAVTVisualContext
from examples.lavt.fusion import LanguageGate, PixelWordFusion
from examples.lavt.text import load_tokenizer
from masksd import Embeddings, Features, SegmenterAdapter
from masksd.adapter import FeatureMapLayout, describe
from masksd.data import Renormalise
from masksd.integrations.hfclip import require_transformers

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LAVT", "PatchGrid"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""Swin's ImageNet statistics (what LAVT normalises with), when a snapshot has no image processor config."""


class PatchGrid(NamedTuple):
    """``Embeddings.context`` of :meth:`LAVT.embed_image`."""

    grid: tuple[int, int]
    """(h, w) of the patch grid (1/4 of the input)."""
    image_size: tuple[int, int]
    """(H, W) of the input."""


class LAVT(SegmenterAdapter):
    """LAVT-style segmenter: ``model(images, model.tokenize(texts))`` -> (B, 1, H, W) logits for (B, 3, H, W) images
    normalised with CLIP's statistics (the pipeline's input; mapped to the snapshot's own statistics inside).

    Besides masksd's fused protocol (``embed_image``, ``embed_text``, ``encode``, ``decode_head``, ``relevance``)
    it offers what the training scripts use: ``tokenize``, ``token_strings``, ``word_mask``, ``grid_size``,
    ``config`` and ``hf_configs`` (the encoders' transformers configs, which a checkpoint stores).
    """

    def __init__(
        self,
        config: LAVTConfig | None = None,
        hf_configs: Mapping[str, dict] | None = None,
        tokenizer: Any = None,
        image_statistics: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        """``hf_configs``: the encoders' architecture as :meth:`hf_configs` gives it (a checkpoint's), built with
        random weights that a state dict replaces; else the snapshot's, or the tiny random model. ``tokenizer`` and
        ``image_statistics`` ((mean, std) of the image processor): what an export saved beside the weights; default:
        read from ``config.pretrained`` (or the tiny vocabulary and CLIP's statistics)."""
        super().__init__()
        transformers = require_transformers()
        config = LAVTConfig() if config is None else config
        if not isinstance(config, LAVTConfig):
            raise TypeError(f"config must be a LAVTConfig, got {type(config).__name__}")
        self.config = config
        swin, bert = _encoders(config, hf_configs, transformers)
        self.swin = nn.ModuleDict({"embeddings": swin.embeddings, "stages": swin.encoder.layers})  # Swin's final norm unused
        self.bert = bert
        dims = tuple(int(swin.config.embed_dim * 2**s) for s in range(len(swin.config.depths)))
        if len(dims) != 4:
            raise ValueError(f"LAVT reads four Swin stages; this Swin has {len(dims)} ({swin.config.depths})")
        text_dim = int(bert.config.hidden_size)
        self.fusions = nn.ModuleList(PixelWordFusion(d, text_dim, h, config.fusion_dropout) for d, h in zip(dims, config.fusion_heads))
        self.gates = nn.ModuleList(LanguageGate(d) for d in dims[:-1])  # LAVT's gate after stage 4 feeds nothing
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.decode_head = LAVTDecodeHead(dims)
        self.image_embed_dim, self.text_embed_dim = dims[0], text_dim
        self.window_size = int(swin.config.window_size)
        if config.image_size // 32 < self.window_size:
            raise ValueError(f"image_size={config.image_size} gives a last Swin stage of {config.image_size // 32}x{config.image_size // 32}, "
                             f"smaller than Swin's window {self.window_size}: use image_size >= {32 * self.window_size}")
        self.tokenizer = load_tokenizer(config.pretrained) if tokenizer is None else tokenizer
        if len(self.tokenizer) > bert.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but BERT's vocabulary {bert.config.vocab_size}")
        self.truncation = TruncationCount(config.max_words)  # expressions cut by tokenize, warned once
        self.special_token_ids = tuple(sorted({self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id}))
        self.register_buffer("_special", torch.tensor(self.special_token_ids), persistent=False)
        self.renormalise = Renormalise(*(_image_statistics(config.pretrained) if image_statistics is None else image_statistics))

    # ------------------------------------------------------------------------------------------ protocol
    def embed_image(self, images: torch.Tensor) -> Embeddings:
        """(B, 3, H, W) CLIP-normalised images, H and W multiples of 32 -> (B, N, C) Swin patch embeddings after their
        LayerNorm (N = H/4 · W/4, row-major), every patch a candidate, ``grid`` the patch grid."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got {describe(images)}")
        height, width = int(images.shape[2]), int(images.shape[3])
        if height % 32 or width % 32 or min(height, width) // 32 < self.window_size:
            raise ValueError(f"images must be a multiple of 32 px on each side (patch 4, three 2x merges) and at least "
                             f"{32 * self.window_size} px (Swin's window {self.window_size} fits the last stage), got {height}x{width}")
        embeddings = self.swin["embeddings"]
        patches, grid = embeddings.patch_embeddings(self.renormalise(images))  # (B, N, C), (h, w)
        return Embeddings(tokens=embeddings.norm(patches), context=PatchGrid(tuple(grid), (height, width)), grid=tuple(grid))

    def embed_text(self, texts: Mapping[str, torch.Tensor]) -> Embeddings:
        """The tokenizer's mapping (``input_ids``, ``attention_mask``: (B, L)) -> (B, L, Ct) BERT word embeddings; the
        candidates are the real words (not [CLS], [SEP] or padding); context the (B, L) attention mask."""
        ids, attention = _token_inputs(texts)
        candidates = attention.bool() & ~torch.isin(ids, self._special)  # (B, L)
        return Embeddings(tokens=self.bert.embeddings.word_embeddings(ids), candidates=candidates, context=(attention, candidates))

    def encode(self, image_embedded: Embeddings, text_embedded: Embeddings) -> tuple[Features, Features]:
        """BERT on the word embeddings, then Swin on the patch embeddings with LAVT's fusion after every stage.

        Returns the visual features (no joint-space tokens; context a :class:`LAVTVisualContext` with the four
        multimodal maps and each stage's pixel-word attention) and the text features (tokens: BERT's (B, L, Ct)
        outputs; context: the attention mask)."""
        layout = image_embedded.context
        if not isinstance(layout, PatchGrid):
            raise TypeError(f"image_embedded must come from LAVT.embed_image (context a PatchGrid), got {type(layout).__name__}")
        attention, candidates = text_embedded.context
        words = self.bert(inputs_embeds=text_embedded.tokens, attention_mask=attention).last_hidden_state  # (B, L, Ct)
        word_mask = attention.bool()  # LAVT's pixels attend to [CLS] and [SEP] too

        embeddings = self.swin["embeddings"]
        x = image_embedded.tokens  # (B, N, C)
        if embeddings.position_embeddings is not None:  # Swin-B has none; a Swin with absolute positions adds them here
            x = x + embeddings.interpolate_pos_encoding(x, *layout.image_size)
        x = embeddings.dropout(x)
        grid, maps, attentions = layout.grid, [], []
        for index, (stage, fusion, norm) in enumerate(zip(self.swin["stages"], self.fusions, self.norms)):
            for block in stage.blocks:
                x = block(x, grid)[0]  # (B, h·w, C_s)
            fused, weights = fusion(x, words, word_mask)  # (B, h·w, C_s)
            maps.append(rearrange(norm(fused), "b (h w) c -> b c h w", h=grid[0]))  # what the decoder reads
            attentions.append(weights)
            if stage.downsample is not None:  # the gated stream feeds the next stage
                x = stage.downsample(self.gates[index](x, fused), grid)  # (B, h·w / 4, 2 C_s)
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        context = LAVTVisualContext(tuple(maps), tuple(attentions), candidates, layout.image_size)
        return Features(tokens=None, pooled=None, context=context), Features(tokens=words, pooled=None, context=attention)

    def relevance(self, branch: Literal["lmvsd", "vmlsd"], visual: Features, text: Features) -> torch.Tensor:
        """Scores from the pixel-word attention of ``config.relevance_stages`` (``guidance="segmenter"``; ours, LAVT
        has no guidance).

        lmvsd: per pixel, the soft maximum (log-sum-exp) over the real words of its attention logits, mean over
        heads, standardised per sample, averaged over the stages on the finest one's grid: (B, N) on the patch
        grid when stage 1 is among them, else (B, h', w'). vmlsd: per text position, the share of attention the
        pixels give it, mean over pixels, heads and stages: (B, L)."""
        context = visual.context
        if not isinstance(context, LAVTVisualContext):
            raise TypeError(f"visual.context must be a LAVTVisualContext (from LAVT.encode), got {type(context).__name__}")
        stages = sorted(self.config.relevance_stages)
        if branch == "vmlsd":
            return torch.stack([context.attention[s - 1].weights.float().mean(dim=(1, 2)) for s in stages]).mean(0)  # (B, L)
        if branch != "lmvsd":
            raise ValueError(f"branch must be 'lmvsd' or 'vmlsd', got {branch!r}")
        finest = context.maps[stages[0] - 1].shape[-2:]
        has_words = context.words.any(dim=1)[:, None]  # (B, 1): an empty text scores every pixel 0
        total = 0.0
        for s in stages:
            logits = context.attention[s - 1].logits.float().mean(dim=1)  # (B, N_s, L)
            scores = logits.masked_fill(~context.words[:, None, :], float("-inf")).logsumexp(dim=-1)  # (B, N_s)
            scores = torch.where(has_words, scores, 0.0)
            scores = (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + 1e-6)
            h, w = context.maps[s - 1].shape[-2:]
            factor = finest[0] // h  # every stage halves the grid: a coarser stage's cell covers factor² finer ones
            spread = rearrange(scores, "b (h w) -> b h w", h=h).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
            total = total + spread  # (B, h', w')
        relevance = total / len(stages)
        return relevance.flatten(1) if stages[0] == 1 else relevance

    # ------------------------------------------------------------------------------------------ for the scripts
    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the patch grid at ``config.image_size``."""
        patch = self.swin["embeddings"].patch_embeddings.patch_size[0]
        return (self.config.image_size // patch, self.config.image_size // patch)

    def tokenize(self, texts: Sequence[str]):
        """Referring expressions -> BERT's mapping (``input_ids``, ``attention_mask``: (B, max_words)): [CLS], the
        word pieces, [SEP], padding; a longer sentence is cut with [SEP] kept, counted in ``self.truncation`` and warned
        about once. A ``transformers.BatchEncoding`` (``.to(device)`` works). Raises ValueError naming an empty text."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise TypeError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{index}] must be a non-empty string, got {text!r}")
        self.truncation.record(texts, [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]])  # uncut, specials included
        return self.tokenizer(list(texts), padding="max_length", max_length=self.config.max_words, truncation=True,
                              return_tensors="pt", return_token_type_ids=False)

    def token_strings(self, token_ids: torch.Tensor) -> list[str]:
        """One row of token ids (L,) -> each position's token up to and including [SEP]."""
        ids = token_ids.tolist()
        sep = self.tokenizer.sep_token_id
        return self.tokenizer.convert_ids_to_tokens(ids[: ids.index(sep) + 1] if sep in ids else ids)

    def word_mask(self, texts: Sequence[str], tokens: Mapping[str, torch.Tensor], flags: Sequence[Sequence[bool]]) -> torch.Tensor:
        """(B, L) bool: the token positions of the whitespace-separated words of ``texts`` whose ``flags`` are True
        (every word piece of such a word), for the guidance measurement of VMLSD."""
        ids, _ = _token_inputs(tokens)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (text, flag) in enumerate(zip(texts, flags)):
            encoding = self.tokenizer(text.split(), is_split_into_words=True, truncation=True, max_length=self.config.max_words)
            for position, word in enumerate(encoding.word_ids()):
                if word is not None and flag[word]:
                    mask[row, position] = True
        return mask

    def hf_configs(self) -> dict[str, dict]:
        """The encoders' transformers configs as plain dicts (``swin``, ``bert``): what a checkpoint stores to rebuild
        the model without the snapshot."""
        return {"swin": self.swin_config.to_dict(), "bert": self.bert.config.to_dict()}

    @property
    def feature_map_layout(self) -> FeatureMapLayout:
        """The patch grid and the (C, h, w) of the four stage maps at ``config.image_size``, for LMVSD's features site."""
        grid = self.grid_size
        shapes = tuple((int(norm.normalized_shape[0]), grid[0] // 2**s, grid[1] // 2**s) for s, norm in enumerate(self.norms))
        return FeatureMapLayout(grid, shapes)

    @property
    def swin_config(self):
        return self.swin["stages"][0].config


def _token_inputs(texts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, L) from the tokenizer's mapping, or a named error."""
    if not isinstance(texts, Mapping) or "input_ids" not in texts or "attention_mask" not in texts:
        raise TypeError(f"texts must be the tokenizer's mapping with input_ids and attention_mask (LAVT.tokenize), got {type(texts).__name__}")
    ids, attention = texts["input_ids"], texts["attention_mask"]
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype != torch.long or not torch.is_tensor(attention) or attention.shape != ids.shape:
        raise ValueError(f"texts' input_ids must be (B, L) long ids with an attention_mask of the same shape, got {describe(ids)} "
                         f"and {describe(attention)}")
    return ids, attention


def _encoders(config: LAVTConfig, hf_configs: Mapping[str, dict] | None, transformers: Any) -> tuple[nn.Module, nn.Module]:
    """SwinModel and BertModel (no pooler): from the snapshot, from a checkpoint's configs, or the tiny random ones."""
    if hf_configs is not None:  # a checkpoint's architecture; its weights load next
        swin = transformers.SwinModel(transformers.SwinConfig.from_dict(hf_configs["swin"]), add_pooling_layer=False)
        bert = transformers.BertModel(transformers.BertConfig.from_dict(hf_configs["bert"]), add_pooling_layer=False)
        return swin, bert
    if config.pretrained is not None:
        folder = Path(config.pretrained)
        swin = transformers.SwinModel.from_pretrained(folder / "swin", add_pooling_layer=False, drop_path_rate=config.drop_path_rate)
        bert = transformers.BertModel.from_pretrained(folder / "bert", add_pooling_layer=False)
        return swin, bert
    from examples.lavt.text import tiny_vocabulary

    swin = transformers.SwinModel(transformers.SwinConfig(
        image_size=config.image_size, patch_size=4, embed_dim=config.tiny_embed_dim, depths=list(config.tiny_depths),
        num_heads=list(config.tiny_heads), window_size=config.tiny_window, drop_path_rate=config.drop_path_rate,
    ), add_pooling_layer=False)
    width = config.tiny_text_width
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tiny_vocabulary()), hidden_size=width, num_hidden_layers=config.tiny_text_layers,
        num_attention_heads=config.tiny_text_heads, intermediate_size=2 * width, max_position_embeddings=max(32, config.max_words),
    ), add_pooling_layer=False)
    return swin, bert


def _image_statistics(pretrained: str | None) -> tuple[tuple, tuple]:
    """The mean and std the image encoder expects: the snapshot's image processor's (ImageNet's when it saved none),
    CLIP's for the random model (no change to the pipeline's input)."""
    from masksd.data import CLIP_MEAN, CLIP_STD

    if pretrained is None:
        return CLIP_MEAN, CLIP_STD
    path = Path(pretrained) / "swin" / "preprocessor_config.json"
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    processor = json.loads(path.read_text())
    return tuple(processor.get("image_mean", IMAGENET_MEAN)), tuple(processor.get("image_std", IMAGENET_STD))
