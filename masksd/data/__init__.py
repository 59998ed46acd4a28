"""Data for referring image segmentation: refer-format RefCOCO/RefCOCO+/G-Ref/RefClef/gRefCOCO
loaders (:class:`ReferDataset`), your own images, masks and expressions as a manifest
(:class:`ManifestDataset`), procedurally generated referring scenes (:class:`SyntheticReferDataset`),
and the shared input transform.

Every dataset here returns the same sample dict, so a trainer can use any of them:

- ``image``: float32 (3, S, S), CLIP-normalised model input;
- ``mask``: float32 (1, S, S) in {0, 1}, the ground truth in the model-input frame;
- ``text``: str, the referring expression;
- ``target``: bool numpy (H0, W0), the ground truth at the original image size;
- ``frame``: :class:`Frame`, where the image sits inside the input (for :func:`restore`);
- ``index``: int, the item's index in its dataset.

:func:`collate` batches them for a ``DataLoader``.
"""

from masksd._lazy import lazy_exports

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
    "ManifestConfig",
    "ManifestDataset",
    "ReferConfig",
    "ReferDataset",
    "ReferDatasetName",
    "Renormalise",
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
    "read_manifest",
    "read_mask",
    "read_rgb",
    "restore",
]

__getattr__, __dir__ = lazy_exports(globals(), {  # each name's module, imported on first use
    "SAMPLE_KEYS": "masksd.data.batching",
    "collate": "masksd.data.batching",  # not a module of the same name: importing it would shadow the function
    "MAX_IMAGE_PIXELS": "masksd.data.images",
    "read_rgb": "masksd.data.images",
    "read_mask": "masksd.data.images",
    "ManifestConfig": "masksd.data.config",
    "ManifestDataset": "masksd.data.manifest",
    "read_manifest": "masksd.data.manifest",
    "DEFAULT_SPLIT_BY": "masksd.data.config",
    "SPLIT_COUNTS": "masksd.data.config",
    "SPLITS": "masksd.data.config",
    "ReferConfig": "masksd.data.config",
    "ReferDataset": "masksd.data.refer",
    "ReferDatasetName": "masksd.data.config",
    "SplitBy": "masksd.data.config",
    "SplitCounts": "masksd.data.config",
    "SplitCountWarning": "masksd.data.config",
    "TextKey": "masksd.data.config",
    "decode_segmentation": "masksd.data.refer",
    "Scene": "masksd.data.synthetic",
    "SceneObject": "masksd.data.synthetic",
    "SyntheticConfig": "masksd.data.synthetic",
    "SyntheticReferDataset": "masksd.data.synthetic",
    "CLIP_MEAN": "masksd.data.transforms",
    "CLIP_STD": "masksd.data.transforms",
    "RESIZE_MODES": "masksd.data.config",
    "RESTORE_METHODS": "masksd.data.config",
    "Frame": "masksd.data.transforms",
    "InputTransform": "masksd.data.transforms",
    "Renormalise": "masksd.data.transforms",
    "ResizeMode": "masksd.data.config",
    "RestoreMethod": "masksd.data.config",
    "restore": "masksd.data.transforms",
})
