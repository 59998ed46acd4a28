"""Data for referring image segmentation: refer-format RefCOCO/RefCOCO+/G-Ref
loaders (:class:`ReferDataset`), procedurally generated referring scenes
(:class:`SyntheticReferDataset`), and the shared input transform.

Every dataset here returns the same sample dict, so a trainer can use either:

- ``image``: float32 (3, S, S), CLIP-normalised model input;
- ``mask``: float32 (1, S, S) in {0, 1}, the ground truth in the model-input frame;
- ``text``: str, the referring expression;
- ``target``: bool numpy (H0, W0), the ground truth at the original image size;
- ``frame``: :class:`Frame`, where the image sits inside the input (for :func:`restore`);
- ``index``: int, the item's index in its dataset.

:func:`collate` batches them for a ``DataLoader``.
"""

from masksd.data.collate import SAMPLE_KEYS, collate
from masksd.data.images import MAX_IMAGE_PIXELS, read_rgb
from masksd.data.refer import (
    DEFAULT_SPLIT_BY, SPLIT_COUNTS, SPLITS, ReferConfig, ReferDataset, ReferDatasetName, SplitBy, SplitCounts,
    SplitCountWarning, TextKey, decode_segmentation,
)
from masksd.data.synthetic import Scene, SceneObject, SyntheticConfig, SyntheticReferDataset
from masksd.data.transforms import (
    CLIP_MEAN, CLIP_STD, RESIZE_MODES, RESTORE_METHODS, Frame, InputTransform, ResizeMode, RestoreMethod, restore,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_SPLIT_BY",
    "MAX_IMAGE_PIXELS",
    "RESIZE_MODES",
    "RESTORE_METHODS",
    "SAMPLE_KEYS",
    "SPLITS",
    "SPLIT_COUNTS",
    "Frame",
    "InputTransform",
    "ReferConfig",
    "ReferDataset",
    "ReferDatasetName",
    "ResizeMode",
    "RestoreMethod",
    "Scene",
    "SceneObject",
    "SplitBy",
    "SplitCountWarning",
    "SplitCounts",
    "SyntheticConfig",
    "SyntheticReferDataset",
    "TextKey",
    "collate",
    "decode_segmentation",
    "read_rgb",
    "restore",
]
