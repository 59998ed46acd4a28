"""A LAVT-style referring image segmenter (LAVT, CVPR 2022) on transformers' Swin and BERT, the reference model of
the fused family (fusion inside the image encoder: LAVT, CARIS, ReLA, MaskRIS, AMLRIS).

    from examples.lavt import LAVT, LAVTConfig
    model = LAVT(LAVTConfig())                                   # tiny random; LAVTConfig(pretrained=DIR, image_size=480)
    logits = model(images, model.tokenize(["the man on the left"]))  # (B, 1, H, W)
"""

from masksd._lazy import lazy_exports

__all__ = ["LAVT", "LAVTConfig", "LAVTDecodeHead", "LAVTVisualContext", "LAVT_MODEL", "LanguageGate", "PixelWordFusion"]

__getattr__, __dir__ = lazy_exports(globals(), {  # each name's module, imported on first use
    "LAVTConfig": "examples.lavt.config",
    "LAVT_MODEL": "examples.lavt.config",
    "LAVTDecodeHead": "examples.lavt.decoder",
    "LAVTVisualContext": "examples.lavt.decoder",
    "LanguageGate": "examples.lavt.fusion",
    "PixelWordFusion": "examples.lavt.fusion",
    "LAVT": "examples.lavt.model",
})
