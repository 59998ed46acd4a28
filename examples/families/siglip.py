"""SigLIP towers, tiny and random: independent towers in a sigmoid-trained joint space, late fusion.

The model: transformers' ``SiglipModel`` and a decoder that scores each patch of one encoder
layer's map against the sentence, plus SigLIP's own image-sentence agreement (the pooled features'
dot product) as a per-image bias.
The adapter: :class:`masksd.integrations.HFSiglipTowers` (pooled features equal SigLIP's own; image
tokens are its attention-pooling head's value path at each patch, text tokens each position through
the text head) and the decoder in the protocol's signature.

Guidance: the paper's (``"joint"``): the tokens lie in the pooled features' space, though no loss
trained them per token (see HFSiglipTowers); ``"prediction"`` is the choice that assumes nothing.
"""

from __future__ import annotations

import torch
import transformers
from einops import rearrange
from torch import nn

from masksd import MaskSDConfig
from masksd.integrations import DecoderHead, HFSiglipTowers, TowerSegmenter

CONFIG = MaskSDConfig()  # the paper's: joint-space guidance for both branches
PAD, UNK = 1, 2  # SigLIP's tokenizer: "</s>" ends a text and pads it (padding="max_length"), "<unk>"


# -- the model's own code -----------------------------------------------------------------------------


class Decoder(nn.Module):
    """Each patch of a (B, C, h, w) map, projected, dotted with the sentence; plus the image-sentence agreement: (B, 1, h, w)."""

    def __init__(self, width: int, joint: int):
        super().__init__()
        self.project = nn.Conv2d(width, joint, 1)
        self.scale = nn.Parameter(torch.tensor(joint**-0.5))

    def forward(self, level: torch.Tensor, image: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        patches = torch.einsum("bchw,bc->bhw", self.project(level), sentence)
        return (self.scale * (patches + (image * sentence).sum(dim=1)[:, None, None])).unsqueeze(1)


class SiglipSegmenter(nn.Module):
    """SigLIP with a decoder over vision layer ``level``'s output."""

    def __init__(self, siglip: transformers.SiglipModel, level: int = 1):
        super().__init__()
        self.siglip, self.level = siglip, level
        self.decoder = Decoder(siglip.config.vision_config.hidden_size, siglip.config.text_config.projection_size)

    def forward(self, pixel_values: torch.Tensor, texts: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self.siglip.get_image_features(pixel_values, output_hidden_states=True)
        patches = image.hidden_states[self.level + 1]  # (B, N, C): encoder layer `level`'s output
        level = rearrange(patches, "b (h w) c -> b c h w", h=int(patches.shape[1] ** 0.5))
        return self.decoder(level, image.pooler_output, self.siglip.get_text_features(**texts).pooler_output)


def tiny_siglip(seed: int = 0) -> transformers.SiglipModel:
    """SigLIP at 32 px (8-px patches: 4x4), two layers per tower, width 32, a 100-id vocabulary."""
    torch.manual_seed(seed)
    return transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=8, pad_token_id=PAD, projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
    ))


# -- adapter ------------------------------------------------------------------------------------------


def adapt(model: SiglipSegmenter, special_token_ids=(PAD, UNK)) -> TowerSegmenter:
    towers = HFSiglipTowers(model.siglip, layers=(model.level,), special_token_ids=special_token_ids)  # or tokenizer=
    return TowerSegmenter(towers, DecoderHead(model.decoder, lambda v, t: (v.context.levels[0], v.pooled, t.pooled)))


# -- end of adapter -----------------------------------------------------------------------------------


def build(seed: int = 0):
    """(segmenter, images, texts, reference): the tiny model adapted, a batch of two, the model itself as reference."""
    model = SiglipSegmenter(tiny_siglip(seed))
    ids = torch.tensor([[5, 6, 7, 8, PAD, PAD, PAD, PAD], [9, 10, PAD, PAD, PAD, PAD, PAD, PAD]])  # as SigLIP's tokenizer pads
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return adapt(model), images, {"input_ids": ids}, model
