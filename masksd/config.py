"""MaskSD's configuration: one branch (:class:`BranchConfig`) and every ablation switch (:class:`MaskSDConfig`).

Each choice is a ``Literal`` alias defined here once; the checks and every script's ``--flag``
choices derive from it (``typing.get_args``). Field documentation lives in the field's metadata
(``documented``), so command-line help can be built from it without the source files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from masksd._checks import check_choice, check_fraction, check_nonnegative, check_open_fraction

__all__ = [
    "BranchConfig",
    "BranchName",
    "MaskSDConfig",
    "PAPER_BRANCHES",
    "Supervision",
    "Target",
    "documented",
]

BranchName = Literal["lmvsd", "vmlsd"]
"""LMVSD masks image patches chosen by the sentence; VMLSD masks words chosen by the image."""
Supervision = Literal["distill", "ground_truth"]
"""What the masked branches learn: the main prediction (the paper) or the ground truth (Table VI)."""
Target = Literal["soft", "hard"]
"""Distillation target: sigmoid of the main logits, or that probability thresholded."""

PAPER_BRANCHES: dict[str, dict[str, float]] = {
    "lmvsd": {"top_k": 0.5, "ratio": 0.25, "weight": 0.75},  # Table III
    "vmlsd": {"top_k": 0.5, "ratio": 0.1, "weight": 0.1},  # Table IV
}
"""The paper's best K, α and λ per branch: the one place these defaults are written."""


def documented(
    default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **metadata: Any
) -> Any:
    """A dataclass field whose documentation travels in its metadata (``field.metadata["help"]``),
    where command-line builders read it; other keyword arguments go into the metadata too."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


@dataclass
class BranchConfig:
    """One masked self-distillation branch (LMVSD or VMLSD).

    The paper's values differ per branch, so they are not defaults of this class: build one with
    :meth:`lmvsd` or :meth:`vmlsd` (paper values, keyword overrides), or give a partial
    ``BranchConfig(top_k=0.7)`` to ``MaskSDConfig(lmvsd=..., vmlsd=...)``, which fills every
    field left ``None`` with the paper's value for that branch.
    """

    enabled: bool = documented(True, help="Run this branch during training.")
    top_k: float | None = documented(None, help="K: fraction of candidate tokens kept by correlation filtering, in (0, 1].")
    ratio: float | None = documented(None, help="α: fraction of the kept tokens replaced by the mask token, in [0, 1].")
    weight: float | None = documented(None, help="λ: weight of this branch's loss in the total.")

    @classmethod
    def lmvsd(cls, **overrides: Any) -> BranchConfig:
        """The paper's LMVSD branch (K = 0.5, α = 0.25, λ1 = 0.75), with keyword overrides."""
        return cls(**overrides).resolve("lmvsd")

    @classmethod
    def vmlsd(cls, **overrides: Any) -> BranchConfig:
        """The paper's VMLSD branch (K = 0.5, α = 0.1, λ2 = 0.1), with keyword overrides."""
        return cls(**overrides).resolve("vmlsd")

    @property
    def resolved(self) -> bool:
        """Every value is set (none is left to a branch's paper default)."""
        return all(getattr(self, name) is not None for name in PAPER_BRANCHES["lmvsd"])

    def resolve(self, branch: BranchName) -> BranchConfig:
        """A copy with every ``None`` field set to ``branch``'s paper value, checked; errors name ``branch.field``."""
        check_choice("branch", branch, get_args(BranchName))
        filled = {k: v for k, v in PAPER_BRANCHES[branch].items() if getattr(self, k) is None}
        config = replace(self, **filled)
        if not isinstance(config.enabled, bool):
            raise TypeError(f"{branch}.enabled must be True or False, got {config.enabled!r}")
        check_fraction(f"{branch}.top_k", config.top_k, low_open=True)
        check_fraction(f"{branch}.ratio", config.ratio, low_open=False)
        check_nonnegative(f"{branch}.weight", config.weight)
        return config

    def require_resolved(self) -> None:
        """Raise unless every value is set: an unresolved config belongs to no branch."""
        if not self.resolved:
            raise ValueError(
                f"{self} is not tied to a branch: build it with BranchConfig.lmvsd(...) or BranchConfig.vmlsd(...), "
                "or pass it to MaskSDConfig(lmvsd=..., vmlsd=...), which fills the paper's values for that branch"
            )


@dataclass
class MaskSDConfig:
    """Every switch of the paper's ablations (Tables II–VII); defaults are the paper's."""

    lmvsd: BranchConfig = documented(
        default_factory=BranchConfig.lmvsd,
        help="Language-guided masked visual self-distillation: masks image patches chosen by the sentence.",
    )
    vmlsd: BranchConfig = documented(
        default_factory=BranchConfig.vmlsd,
        help="Visual-guided masked language self-distillation: masks words chosen by the image.",
    )
    share_weights: bool = documented(
        True, help="Branches decode with the segmenter's own head; False gives each branch its own copy (Table VII)."
    )
    masking: bool = documented(True, help="Mask the selected tokens; False runs the branches unmasked (Table V).")
    supervision: Supervision = documented(
        "distill", help="Branch targets: distill (the main prediction) or ground_truth (Table VI)."
    )
    target: Target = documented(
        "soft", help="Distillation target: soft = sigmoid(main logits), hard = sigmoid(main logits) > threshold."
    )
    threshold: float = documented(0.5, help="Binarisation threshold of the hard target, in (0, 1).")

    def __post_init__(self) -> None:
        for name in get_args(BranchName):
            branch = getattr(self, name)
            if not isinstance(branch, BranchConfig):
                raise TypeError(f"{name} must be a BranchConfig, got {type(branch).__name__}")
            setattr(self, name, branch.resolve(name))
        check_choice("supervision", self.supervision, get_args(Supervision))
        check_choice("target", self.target, get_args(Target))
        check_open_fraction("threshold", self.threshold)

    @classmethod
    def baseline(cls, **overrides: Any) -> MaskSDConfig:
        """Both branches off: MaskSD trains the bare segmenter with its segmentation loss."""
        return cls(lmvsd=BranchConfig(enabled=False), vmlsd=BranchConfig(enabled=False), **overrides)

    def branch(self, name: BranchName) -> BranchConfig:
        """The config of branch ``name``."""
        check_choice("branch", name, get_args(BranchName))
        return getattr(self, name)
