"""A CRIS-style CLIP referring image segmenter (CRIS, CVPR 2022), the baseline CM-MaskSD wraps.

    from examples.cris import CRIS, CRISConfig
    model = CRIS(CRISConfig.tiny())                      # or CRIS(CRISConfig()) for ViT-B-16 @ 480
    logits = model(images, model.tokenize(["the man on the left"]))  # (B, 1, 4g, 4g)
"""

from examples.cris.backbone import CLIPBackbone, create_clip, register_model_configs
from examples.cris.config import TINY_CLIP, CRISConfig
from examples.cris.model import CRIS, DecodeHead, TextContext

__all__ = ["CRIS", "CRISConfig", "CLIPBackbone", "DecodeHead", "TINY_CLIP", "TextContext", "create_clip", "register_model_configs"]
