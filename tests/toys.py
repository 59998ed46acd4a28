"""Two structurally different tiny segmenters implementing the masksd protocol, and a toy referring task.

ToyViT: patch embedding + Transformer image encoder, Transformer text encoder (like CLIP).
ConvGRU: convolutional image encoder, GRU text encoder: nothing CLIP-like, to show MaskSD is plug-and-play.
Token ids: 0 padding, 1 SOT, 2 EOT, 3.. words; colour word c is id 3 + c.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from masksd import Embeddings, Features, SegmenterAdapter

PAD, SOT, EOT = 0, 1, 2
VOCAB = 16
COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # word ids 3, 4, 5


def real_words(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) long -> (B, L) bool: neither padding nor SOT/EOT."""
    return (ids != PAD) & (ids != SOT) & (ids != EOT)


def eot_index(ids: torch.Tensor) -> torch.Tensor:
    return (ids == EOT).int().argmax(dim=1)  # (B,)


class FusionHead(nn.Module):
    """Multiplies the visual map by the projected sentence and predicts logits at the map's size."""

    def __init__(self, channels: int, joint: int):
        super().__init__()
        self.sentence = nn.Linear(joint, channels)
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.1))
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        fmap = visual.context  # (B, C, h, w)
        gate = self.sentence(text.pooled)[:, :, None, None]  # (B, C, 1, 1)
        return self.out(self.conv(fmap * gate))  # (B, 1, h, w)


class ToyViT(SegmenterAdapter):
    def __init__(self, size: int = 16, patch: int = 4, width: int = 32, joint: int = 24, length: int = 6):
        super().__init__()
        self.grid = size // patch
        self.image_embed_dim = self.text_embed_dim = width
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(self.grid**2 + 1, width) * 0.02)
        self.image_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True), 1, enable_nested_tensor=False
        )
        self.image_proj = nn.Linear(width, joint, bias=False)
        self.words = nn.Embedding(VOCAB, width)
        self.text_pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.text_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True), 1, enable_nested_tensor=False
        )
        self.text_proj = nn.Linear(width, joint, bias=False)
        self.decode_head = FusionHead(width, joint)

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        tokens = rearrange(self.patch(images), "b c h w -> b (h w) c")  # (B, N, C)
        return Embeddings(tokens)

    def encode_image(self, embedded: Embeddings) -> Features:
        x = embedded.tokens
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.image_pos  # (B, 1 + N, C)
        x = self.image_encoder(x)
        fmap = rearrange(x[:, 1:], "b (h w) c -> b c h w", h=self.grid)
        return Features(tokens=self.image_proj(x[:, 1:]), pooled=self.image_proj(x[:, 0]), context=fmap)

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return Embeddings(self.words(ids), candidates=real_words(ids), context=ids)  # (B, L, C)

    def encode_text(self, embedded: Embeddings) -> Features:
        ids = embedded.context
        x = self.text_encoder(embedded.tokens + self.text_pos[: ids.shape[1]], src_key_padding_mask=ids == PAD)
        pooled = x[torch.arange(x.shape[0]), eot_index(ids)]  # (B, C)
        return Features(tokens=self.text_proj(x), pooled=self.text_proj(pooled))


class ConvGRU(SegmenterAdapter):
    def __init__(self, width: int = 24, joint: int = 16):
        super().__init__()
        self.image_embed_dim = width
        self.text_embed_dim = 12
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.image_proj = nn.Conv2d(width, joint, 1)
        self.words = nn.Embedding(VOCAB, 12)
        self.gru = nn.GRU(12, joint, batch_first=True)
        self.decode_head = FusionHead(width, joint)

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        fmap = self.stem(images)  # (B, C, h, w)
        return Embeddings(rearrange(fmap, "b c h w -> b (h w) c"), context=fmap.shape[-2:])

    def encode_image(self, embedded: Embeddings) -> Features:
        h, w = embedded.context
        fmap = self.body(rearrange(embedded.tokens, "b (h w) c -> b c h w", h=h, w=w))  # (B, C, h, w)
        joint = rearrange(self.image_proj(fmap), "b d h w -> b (h w) d")  # (B, N, D)
        return Features(tokens=joint, pooled=joint.mean(dim=1), context=fmap)

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return Embeddings(self.words(ids), candidates=real_words(ids), context=ids)

    def encode_text(self, embedded: Embeddings) -> Features:
        ids = embedded.context
        out, _ = self.gru(embedded.tokens)  # (B, L, D)
        return Features(tokens=out, pooled=out[torch.arange(out.shape[0]), eot_index(ids)])


def colour_task(batch: int, size: int = 16, length: int = 6, seed: int = 0):
    """Images with three coloured squares; the text names one colour; the target is that square.

    Returns images (B, 3, S, S), token ids (B, L), masks (B, 1, S, S) float.
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g) * 0.2
    masks = torch.zeros(batch, 1, size, size)
    ids = torch.full((batch, length), PAD)
    quarter = size // 4
    for b in range(batch):
        cells = torch.randperm(4, generator=g)[:3]  # three of the four quadrants
        target = int(torch.randint(3, (1,), generator=g))
        for colour, cell in enumerate(cells.tolist()):
            top, left = (cell // 2) * 2 * quarter, (cell % 2) * 2 * quarter
            region = (slice(top + 1, top + 1 + quarter), slice(left + 1, left + 1 + quarter))
            images[b, :, region[0], region[1]] = COLOURS[colour][:, None, None]
            if colour == target:
                masks[b, 0, region[0], region[1]] = 1.0
        ids[b, :3] = torch.tensor([SOT, 3 + target, EOT])
    return images, ids, masks


# -- issue 26: models outside the paper's assumptions (late fusion, a joint space, an adapter) ---------------------


class WordGatedHead(nn.Module):
    """Decodes a visual map gated by the mean of the text context's word features: reads no pooled feature."""

    def __init__(self, channels: int, words: int):
        super().__init__()
        self.gate = nn.Linear(words, channels)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(text.context.mean(dim=1)))[:, :, None, None]  # (B, C, 1, 1)
        return self.out(visual.context * gate)  # (B, 1, h, w)


class FusedToy(SegmenterAdapter):
    """LAVT-style early fusion: the sentence gates the image tokens before the image encoder (one-way), so the
    visual features depend on the words. Implements ``encode`` (masksd.FusedSegmenter) and declares its grid."""

    def __init__(self, size: int = 16, patch: int = 4, width: int = 32, joint: int = 24, length: int = 6):
        super().__init__()
        self.grid = size // patch
        self.image_embed_dim = self.text_embed_dim = width
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.image_pos = nn.Parameter(torch.randn(self.grid**2, width) * 0.02)
        self.words = nn.Embedding(VOCAB, width)
        self.text_pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.text_encoder = nn.GRU(width, width, batch_first=True)
        self.fuse = nn.Linear(width, width)
        self.image_encoder = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.image_proj = nn.Linear(width, joint)
        self.text_proj = nn.Linear(width, joint)
        self.decode_head = WordGatedHead(width, width)

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        return Embeddings(rearrange(self.patch(images), "b c h w -> b (h w) c"), grid=(self.grid, self.grid))

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return Embeddings(self.words(ids), candidates=real_words(ids), context=ids)

    def encode(self, image_embedded: Embeddings, text_embedded: Embeddings) -> tuple[Features, Features]:
        ids = text_embedded.context
        words, _ = self.text_encoder(text_embedded.tokens + self.text_pos[: ids.shape[1]])  # (B, L, C)
        sentence = words[torch.arange(words.shape[0]), eot_index(ids)]  # (B, C)
        x = (image_embedded.tokens + self.image_pos) * torch.sigmoid(self.fuse(sentence))[:, None]  # words fused in
        x = self.image_encoder(x)  # (B, N, C)
        fmap = rearrange(x, "b (h w) c -> b c h w", h=self.grid)
        visual = Features(tokens=self.image_proj(x), pooled=self.image_proj(x.mean(dim=1)), context=fmap)
        return visual, Features(tokens=self.text_proj(words), pooled=self.text_proj(sentence), context=words)


class NoJointSpace(SegmenterAdapter):
    """Towers without a joint image-text space (Swin + BERT, DINOv2 + CLIP text): unequal widths, no
    Features.tokens or pooled; the head reads the maps and the words."""

    def __init__(self, width: int = 24, words: int = 12):
        super().__init__()
        self.image_embed_dim, self.text_embed_dim = width, words
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.words = nn.Embedding(VOCAB, words)
        self.gru = nn.GRU(words, words, batch_first=True)
        self.decode_head = WordGatedHead(width, words)

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        fmap = self.stem(images)  # (B, C, h, w)
        return Embeddings(rearrange(fmap, "b c h w -> b (h w) c"), grid=tuple(fmap.shape[-2:]))

    def encode_image(self, embedded: Embeddings) -> Features:
        h, w = embedded.grid
        fmap = torch.relu(self.body(rearrange(embedded.tokens, "b (h w) c -> b c h w", h=h, w=w)))
        return Features(tokens=None, pooled=None, context=fmap)

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return Embeddings(self.words(ids), candidates=real_words(ids), context=ids)

    def encode_text(self, embedded: Embeddings) -> Features:
        out, _ = self.gru(embedded.tokens)  # (B, L, words)
        return Features(tokens=None, pooled=None, context=out)


class CoarseToy(SegmenterAdapter):
    """A CNN read at two grids (CRIS's RN50: stem tokens 56x56, C5 features 7x7): stem tokens on an 8x8 grid, joint
    features on 4x4 (Features.grid); its relevance hook scores LMVSD on the 4x4 grid and VMLSD per word."""

    def __init__(self, width: int = 16, joint: int = 12):
        super().__init__()
        self.image_embed_dim, self.text_embed_dim = width, 12
        self.stem = nn.Conv2d(3, width, 2, stride=2)  # 16 px -> 8x8 tokens
        self.down = nn.Conv2d(width, width, 2, stride=2)  # 8x8 -> 4x4 "C5"
        self.image_proj = nn.Conv2d(width, joint, 1)
        self.words = nn.Embedding(VOCAB, 12)
        self.gru = nn.GRU(12, joint, batch_first=True)
        self.decode_head = FusionHead(width, joint)

    def embed_image(self, images: torch.Tensor) -> Embeddings:
        return Embeddings(rearrange(self.stem(images), "b c h w -> b (h w) c"), grid=(8, 8))

    def encode_image(self, embedded: Embeddings) -> Features:
        fmap = torch.relu(self.down(rearrange(embedded.tokens, "b (h w) c -> b c h w", h=8)))  # (B, C, 4, 4)
        joint = rearrange(self.image_proj(fmap), "b d h w -> b (h w) d")  # (B, 16, D)
        return Features(tokens=joint, pooled=joint.mean(dim=1), context=fmap, grid=(4, 4))

    def embed_text(self, ids: torch.Tensor) -> Embeddings:
        return Embeddings(self.words(ids), candidates=real_words(ids), context=ids)

    def encode_text(self, embedded: Embeddings) -> Features:
        out, _ = self.gru(embedded.tokens)
        return Features(tokens=out, pooled=out[torch.arange(out.shape[0]), eot_index(embedded.context)])

    def relevance(self, branch: str, visual: Features, text: Features) -> torch.Tensor:
        if branch == "lmvsd":
            return visual.context.pow(2).mean(dim=1)  # (B, 4, 4): on the coarse grid
        return text.tokens.norm(dim=-1)  # (B, L)


class PlainRIS(nn.Module):
    """A model with nothing of the adapter protocol: forward(images, token_ids) -> (B, 1, h, w) logits."""

    def __init__(self, width: int = 16, vocab: int = 40):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 4, stride=4)
        self.words = nn.Embedding(vocab, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        sentence = self.words(token_ids).mean(dim=1)[:, :, None, None]  # (B, C, 1, 1)
        return self.out(torch.relu(self.conv(images)) * sentence)  # (B, 1, h, w)
