"""Data for referring image segmentation: refer-format RefCOCO/RefCOCO+/G-Ref
loaders, procedurally generated referring scenes, and the shared input transform."""

from masksd.data.transforms import CLIP_MEAN, CLIP_STD, Frame, InputTransform, restore

__all__ = ["CLIP_MEAN", "CLIP_STD", "Frame", "InputTransform", "restore"]
