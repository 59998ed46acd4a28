"""masksd: cross-modality masked self-distillation (CM-MaskSD) for referring image segmentation.

Wrap any segmenter that implements :class:`MaskableSegmenter` (or :class:`FusedSegmenter`, for encoders
that read each other) in :class:`MaskSD`, or any ``forward(images, token_ids)`` model at the inputs
(:class:`InputSpec`); train with the returned loss, evaluate with ``.eval()`` at the bare model's cost.
"""

from masksd._lazy import lazy_exports

__all__ = [
    "BranchConfig",
    "CorrelationFilter",
    "Embeddings",
    "Features",
    "FusedSegmenter",
    "GuidanceMeter",
    "GuidedMasker",
    "InputSpec",
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

__getattr__, __dir__ = lazy_exports(globals(), {  # each name's module, imported on first use
    "Embeddings": "masksd.adapter",
    "Features": "masksd.adapter",
    "FusedSegmenter": "masksd.adapter",
    "MaskableSegmenter": "masksd.adapter",
    "SegmenterAdapter": "masksd.adapter",
    "CorrelationFilter": "masksd.correlation",
    "GuidanceMeter": "masksd.guidance",
    "correlation_scores": "masksd.guidance",
    "patch_targets": "masksd.guidance",
    "SelfDistillLoss": "masksd.loss",
    "segmentation_loss": "masksd.loss",
    "GuidedMasker": "masksd.masking",
    "InputSpec": "masksd.inputs",
    "BranchConfig": "masksd.config",
    "MaskSDConfig": "masksd.config",
    "MaskSD": "masksd.wrapper",
    "MaskSDOutput": "masksd.wrapper",
    "bare_state_dict": "masksd.wrapper",
    "SegmenterCheckError": "masksd.verify",
    "VerifyReport": "masksd.verify",
    "verify_segmenter": "masksd.verify",
})
