"""LAVT-style Swin + BERT, tiny and random: words fused into the image encoder after each stage (fused encode).

The model: transformers' ``SwinModel`` and ``BertModel``; after each Swin stage every pixel attends
to the words (LAVT's pixel-word attention module in miniature, gated and added to the pixel) before
the stage's patch merging; a decoder fuses the stages' maps top-down (LAVT's decoder reads no words).
LAVT, ReLA, CARIS, MaskRIS and AMLRIS build on this backbone.
The adapter: masks Swin's patch embeddings (before its norm) and BERT's word embeddings (before its
position and type embeddings); a fused ``encode`` re-runs BERT and the fused stages, so LMVSD's
words are the unmasked sentence's and VMLSD's masked words reach every stage.

Guidance: Swin and BERT share no embedding space, so no ``"joint"``: LMVSD ranks patches by the main
branch's own predicted mask (``"prediction"``); VMLSD ranks words by how much the pixels attend to
each in the last fusion (``"segmenter"``: the adapter's ``relevance`` hook, which also offers LMVSD
each last-stage pixel's attention to the real words, on that stage's coarse grid).
"""

from __future__ import annotations

import torch
import transformers
from einops import rearrange
from torch import nn

from masksd import BranchConfig, Embeddings, Features, MaskSDConfig, SegmenterAdapter
from masksd.integrations import DecoderHead

CONFIG = MaskSDConfig(lmvsd=BranchConfig.lmvsd(guidance="prediction"), vmlsd=BranchConfig.vmlsd(guidance="segmenter"))

WORDS = ["the", "red", "car", "on", "left", "a", "man", "small", "ball"]


# -- the model's own code -----------------------------------------------------------------------------


class PixelWordAttention(nn.Module):
    """LAVT's PWAM in miniature: each pixel attends to the words; the result, gated, is added. Returns the attention too."""

    def __init__(self, width: int, text_width: int, heads: int = 1):
        super().__init__()
        self.attend = nn.MultiheadAttention(width, heads, kdim=text_width, vdim=text_width, batch_first=True)
        self.gate = nn.Sequential(nn.Linear(width, width), nn.Tanh())

    def forward(self, x: torch.Tensor, words: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused, attention = self.attend(x, words, words, key_padding_mask=padding)  # (B, N, C), (B, N, L)
        return x + self.gate(fused) * fused, attention


class FusedStage(nn.Module):
    """A Swin stage with pixel-word fusion before its patch merging, as LAVT's MMBasicLayer."""

    def __init__(self, stage: nn.Module, width: int, text_width: int):
        super().__init__()
        self.stage, self.fusion = stage, PixelWordAttention(width, text_width)

    def forward(self, x, dims, words, padding):
        """(B, h*w, C) -> this stage's fused map (B, C, h, w), the next stage's input and dims, the attention."""
        for block in self.stage.blocks:
            x = block(x, dims)[0]
        x, attention = self.fusion(x, words, padding)
        fused = rearrange(x, "b (h w) c -> b c h w", h=dims[0])
        if self.stage.downsample is not None:
            x, dims = self.stage.downsample(x, dims), ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return fused, x, dims, attention


class Decoder(nn.Module):
    """LAVT's decoder in miniature: the deepest map upsampled and added to each shallower one, then a 1x1 conv."""

    def __init__(self, widths: list[int], width: int = 16):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in widths])
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](maps[-1])
        for lateral, level in zip(self.lateral[-2::-1], maps[-2::-1]):
            x = lateral(level) + nn.functional.interpolate(x, size=level.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(x)  # (B, 1, h1, w1)


class LAVT(nn.Module):
    """Swin with words fused after each stage, BERT for the words, a decoder over the stages' maps."""

    def __init__(self, swin: transformers.SwinModel, bert: transformers.BertModel):
        super().__init__()
        self.swin, self.bert = swin, bert
        swin.layernorm.requires_grad_(False)  # Swin's final norm: unused, the decoder reads each stage's fused map
        widths = [swin.config.embed_dim * 2**i for i in range(len(swin.config.depths))]  # each stage doubles C
        self.stages = nn.ModuleList([FusedStage(s, c, bert.config.hidden_size) for s, c in zip(swin.encoder.layers, widths)])
        self.decoder = Decoder(widths)

    def forward(self, pixel_values: torch.Tensor, texts: dict[str, torch.Tensor]) -> torch.Tensor:
        words = self.bert(texts["input_ids"], attention_mask=texts["attention_mask"]).last_hidden_state  # (B, L, Ct)
        x, dims = self.swin.embeddings(pixel_values)
        maps = []
        for stage in self.stages:
            fused, x, dims, _ = stage(x, dims, words, texts["attention_mask"] == 0)
            maps.append(fused)
        return self.decoder(maps)


def tiny_lavt(seed: int = 0) -> tuple[LAVT, transformers.BertTokenizer]:
    """Swin at 32 px (4-px patches, three stages: 8x8, 4x4, 2x2), a two-layer BERT and a WordPiece tokenizer over WORDS."""
    torch.manual_seed(seed)
    swin = transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=2, drop_path_rate=0.0,
    ))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    ), add_pooling_layer=False)
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return LAVT(swin, bert), transformers.BertTokenizer(vocab=vocab)


# -- adapter ------------------------------------------------------------------------------------------


class LAVTAdapter(SegmenterAdapter):
    """LAVT for MaskSD: masks at Swin's patch and BERT's word embeddings; one fused ``encode``."""

    def __init__(self, model: LAVT, tokenizer):
        super().__init__()
        self.model, self.decode_head = model, DecoderHead(model.decoder, lambda visual, text: (visual.context,))
        self.image_embed_dim, self.text_embed_dim = model.swin.config.embed_dim, model.bert.config.hidden_size
        self.special_token_ids = frozenset(tokenizer.all_special_ids)

    def embed_image(self, pixel_values: torch.Tensor) -> Embeddings:
        patches, grid = self.model.swin.embeddings.patch_embeddings(pixel_values)  # (B, N, C), before the norm
        return Embeddings(patches, grid=grid)

    def embed_text(self, texts: dict[str, torch.Tensor]) -> Embeddings:
        ids, mask = texts["input_ids"], texts["attention_mask"]
        words = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(self.special_token_ids), device=ids.device))
        return Embeddings(self.model.bert.embeddings.word_embeddings(ids), candidates=words, context=mask)

    def encode(self, image: Embeddings, text: Embeddings) -> tuple[Features, Features]:
        model, embeddings = self.model, self.model.swin.embeddings
        words = model.bert(inputs_embeds=text.tokens, attention_mask=text.context).last_hidden_state
        x, dims, maps = embeddings.dropout(embeddings.norm(image.tokens)), image.grid, []
        for stage in model.stages:
            fused, x, dims, attention = stage(x, dims, words, text.context == 0)
            maps.append(fused)
        return Features(None, None, context=maps), Features(None, None, context=attention * text.candidates[:, None])

    def relevance(self, branch: str, visual: Features, text: Features) -> torch.Tensor:
        attention = text.context  # (B, N', L): the last fusion's pixel attention to each real word
        return attention.mean(dim=1) if branch == "vmlsd" else attention.sum(dim=2).view(-1, *visual.context[-1].shape[2:])


# -- end of adapter -----------------------------------------------------------------------------------


def build(seed: int = 0):
    """(segmenter, images, texts, reference): the tiny model adapted, a batch of two, the model itself as reference."""
    model, tokenizer = tiny_lavt(seed)
    texts = dict(tokenizer(["the red car on the left", "a man"], padding=True, return_tensors="pt"))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return LAVTAdapter(model, tokenizer), images, texts, model
