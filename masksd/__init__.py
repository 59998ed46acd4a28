"""masksd: cross-modality masked self-distillation (CM-MaskSD) for referring image segmentation."""

from masksd.adapter import Embeddings, Features, MaskableSegmenter, SegmenterAdapter

__all__ = ["Embeddings", "Features", "MaskableSegmenter", "SegmenterAdapter"]
__version__ = "0.1.0"
