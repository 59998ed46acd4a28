"""LAVTConfig: the LAVT-style segmenter's sizes and switches; LAVT's own values where it has one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["LAVT_MODEL", "LAVTConfig", "SNAPSHOT_HINT"]

LAVT_MODEL = "lavt"
"""The ``--model`` value that selects this architecture in the training scripts."""

SNAPSHOT_HINT = (
    "a folder holding swin/ (SwinModel.from_pretrained('microsoft/swin-base-patch4-window12-384').save_pretrained(DIR/swin), "
    "with its image processor saved there too) and bert/ (BertModel and BertTokenizer of 'bert-base-uncased', "
    "each .save_pretrained(DIR/bert))"
)
"""What ``pretrained`` must hold, for error messages and docs."""


@dataclass
class LAVTConfig:
    """A LAVT-style referring segmenter (LAVT, CVPR 2022): Swin with a pixel-word attention module and a
    language gate after each stage, BERT for the words, LAVT's simple multi-scale decoder.

    ``pretrained`` names a local folder of two transformers snapshots (see :data:`SNAPSHOT_HINT`); their
    own configs give the encoders' architecture. None builds the tiny random model of the tests and the
    CPU table from the ``tiny_*`` fields below, which apply to it alone.
    """

    pretrained: str | None = None
    """A folder with ``swin/`` and ``bert/`` snapshots (Swin-B window 12 @ 384 and bert-base-uncased for LAVT's
    published model), or None for the tiny random model."""
    image_size: int = 64
    """Square input size in pixels (LAVT trains at 480); a multiple of 32, so that every Swin stage's grid tiles
    the patch grid."""
    max_words: int = 20
    """Text positions, [CLS] and [SEP] included (LAVT: 20); longer sentences are cut, [SEP] kept."""
    fusion_heads: tuple[int, ...] = (1, 1, 1, 1)
    """Heads of each stage's pixel-word attention (LAVT: one each)."""
    fusion_dropout: float = 0.0
    """Dropout inside the pixel-word attention modules (LAVT: 0)."""
    drop_path_rate: float = 0.3
    """Swin's stochastic depth, rising linearly over the blocks to this rate (LAVT: 0.3)."""
    relevance_stages: tuple[int, ...] = (1, 2, 3, 4)
    """Stages (1-4) whose pixel-word attention :meth:`LAVT.relevance` reads for ``guidance="segmenter"``: each
    stage's scores are standardised per sample and averaged on the finest of these stages' grids (ours: LAVT
    has no guidance; one coarse stage alone cannot rank the patches of a small image)."""
    tiny_embed_dim: int = 16
    """Swin's stage-1 width (doubling each stage) of the random model."""
    tiny_depths: tuple[int, ...] = (2, 2, 2, 2)
    """Swin blocks per stage of the random model (four stages, as LAVT's decoder reads)."""
    tiny_heads: tuple[int, ...] = (1, 2, 4, 8)
    """Swin attention heads per stage of the random model."""
    tiny_window: int = 2
    """Swin window size of the random model: at most ``image_size / 32``, the last stage's grid (transformers' Swin
    fails on a stage smaller than its window)."""
    tiny_text_width: int = 32
    """BERT hidden size of the random model."""
    tiny_text_layers: int = 2
    """BERT layers of the random model."""
    tiny_text_heads: int = 2
    """BERT attention heads of the random model."""

    def __post_init__(self) -> None:
        for name in ("image_size", "max_words", "tiny_embed_dim", "tiny_window", "tiny_text_width", "tiny_text_layers",
                     "tiny_text_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (3 if name == "max_words" else 1):
                raise ValueError(f"{name} must be a positive int (max_words >= 3), got {value!r}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (patch 4, three 2x merges), got {self.image_size}")
        for name in ("fusion_heads", "tiny_depths", "tiny_heads", "relevance_stages"):
            value = tuple(getattr(self, name))
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {getattr(self, name)!r}")
            setattr(self, name, value)
        for name in ("fusion_heads", "tiny_depths", "tiny_heads"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"{name} must give one value per Swin stage (4: LAVT's decoder reads four), got {getattr(self, name)}")
        if not set(self.relevance_stages) <= {1, 2, 3, 4} or len(set(self.relevance_stages)) != len(self.relevance_stages):
            raise ValueError(f"relevance_stages must be distinct stages among 1-4, got {self.relevance_stages}")
        for name in ("fusion_dropout", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a rate in [0, 1), got {value!r}")
        if self.pretrained is not None:
            folder = Path(self.pretrained)
            missing = [name for name in ("swin", "bert") if not (folder / name).is_dir()]
            if missing:
                raise FileNotFoundError(f"pretrained={self.pretrained!r} lacks {missing}: pass {SNAPSHOT_HINT}, or none for the tiny random LAVT")
