"""A CRIS-style CLIP referring image segmenter (CRIS, CVPR 2022), the baseline CM-MaskSD wraps.

    from examples.cris import CRIS, CRISConfig
    model = CRIS(CRISConfig.tiny())                      # or CRIS(CRISConfig()) for ViT-B-16 @ 480
    logits = model(images, model.tokenize(["the man on the left"]))  # (B, 1, 4g, 4g)
"""

from masksd._lazy import lazy_exports

__all__ = ["CRIS", "CRISConfig", "CLIPBackbone", "DecodeHead", "TINY_CLIP", "TextContext", "create_clip", "register_model_configs"]

__getattr__, __dir__ = lazy_exports(globals(), {  # each name's module, imported on first use
    "CLIPBackbone": "examples.cris.backbone",
    "create_clip": "examples.cris.backbone",
    "register_model_configs": "examples.cris.backbone",
    "TINY_CLIP": "examples.cris.config",
    "CRISConfig": "examples.cris.config",
    "CRIS": "examples.cris.model",
    "DecodeHead": "examples.cris.model",
    "TextContext": "examples.cris.model",
})
