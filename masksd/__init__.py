"""masksd: cross-modality masked self-distillation (CM-MaskSD) for referring image segmentation.

Wrap any segmenter that implements :class:`MaskableSegmenter` in :class:`MaskSD`;
train with the returned loss, evaluate with ``.eval()`` at the bare model's cost.
"""

from masksd.adapter import Embeddings, Features, MaskableSegmenter, SegmenterAdapter
from masksd.correlation import CorrelationFilter
from masksd.guidance import GuidanceMeter, correlation_scores, patch_targets
from masksd.loss import SelfDistillLoss, segmentation_loss
from masksd.masking import GuidedMasker
from masksd.config import BranchConfig, MaskSDConfig
from masksd.wrapper import MaskSD, MaskSDOutput, bare_state_dict
from masksd.verify import SegmenterCheckError, VerifyReport, verify_segmenter

__all__ = [
    "BranchConfig",
    "CorrelationFilter",
    "Embeddings",
    "Features",
    "GuidanceMeter",
    "GuidedMasker",
    "MaskSD",
    "MaskSDConfig",
    "MaskSDOutput",
    "MaskableSegmenter",
    "SegmenterAdapter",
    "SegmenterCheckError",
    "SelfDistillLoss",
    "VerifyReport",
    "bare_state_dict",
    "correlation_scores",
    "patch_targets",
    "segmentation_loss",
    "verify_segmenter",
]
__version__ = "0.1.0"
