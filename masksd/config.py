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
    "Draw",
    "Guidance",
    "MASKRIS_BRANCHES",
    "MaskSDConfig",
    "NormStats",
    "PAPER_BRANCHES",
    "Select",
    "Site",
    "Supervision",
    "Target",
    "TeacherGradient",
    "Views",
    "documented",
]

BranchName = Literal["lmvsd", "vmlsd"]
"""LMVSD masks image patches chosen by the sentence; VMLSD masks words chosen by the image."""
Supervision = Literal["distill", "ground_truth"]
"""What the masked branches learn: the main prediction (the paper) or the ground truth (Table VI)."""
Target = Literal["soft", "hard"]
"""Distillation target: sigmoid of the main logits, or that probability thresholded."""
NormStats = Literal["update", "freeze"]
"""What the masked branches do to BatchNorm running statistics: update them like the main branch, or leave them."""
TeacherGradient = Literal["detach", "flow"]
"""Whether the branch losses' gradient reaches the main prediction through the soft target: detach (no;
ours and MaskRIS's) or flow (yes: Eq. 9 read literally, BCE differentiating its target M_seg)."""
Select = Literal["top", "bottom"]
"""Which candidate tokens correlation filtering keeps: the most correlated (the paper) or the least (AMLRIS's direction)."""
Site = Literal["embedding", "features", "input"]
"""Where a branch masks: the token embeddings before the encoder (re-encoded; the paper), the visual maps the
decode head reads, after the encoder (LMVSD only: per-position learnable values, no second encode), or the
model's inputs (square pixel patches, word ids; MaskRIS's site: the whole forward re-runs, no adapter needed)."""
Guidance = Literal["joint", "prediction", "segmenter"]
"""What ranks the tokens correlation filtering keeps: the dot product with the other modality's pooled feature in
a joint image-text space (the paper), the main branch's own detached predicted mask pooled onto the image token
grid (LMVSD only; any segmenter), or the segmenter's own ``relevance(branch, visual, text)`` scores."""
Draw = Literal["count", "bernoulli"]
"""How many of the kept tokens are masked: exactly round(α·kept) per sample (the paper), or each independently with
probability α (MaskRIS's per-word draw)."""
Views = Literal["separate", "combined"]
"""How the masked passes are arranged: one per branch, each masking its own modality (the paper), or MaskRIS's one
combined view masking both modalities in a single extra pass."""

PAPER_BRANCHES: dict[str, dict[str, float]] = {
    "lmvsd": {"top_k": 0.5, "ratio": 0.25, "weight": 0.75, "min_masked": 0},  # Table III
    "vmlsd": {"top_k": 0.5, "ratio": 0.1, "weight": 0.1, "min_masked": 1},  # Table IV
}
"""The paper's best K, α and λ per branch: the one place these defaults are written. ``min_masked`` is
ours: the paper's VMLSD (α = 0.1, K = 0.5) would mask no word of a sentence under 9 words, i.e. of
almost every RefCOCO expression (3.6 words on average), yet Table IV shows its α mattering, so its
branch masked; at least one word per sentence is the reading that makes it mask (see the README)."""


MASKRIS_BRANCHES: dict[str, dict[str, Any]] = {
    # 75 % of the 32-px pixel patches, zero-filled (util/aug_mask.py); round(0.75·n) is its n - int(0.25·n) on square grids
    "lmvsd": {"site": "input", "top_k": 1.0, "ratio": 0.75, "weight": 0.5, "min_masked": 0, "draw": "count"},
    # each word with probability 0.15, then [MASK] / a random id / kept at 80/10/10 (data/dataset_refer_bert.py)
    "vmlsd": {"site": "input", "top_k": 1.0, "ratio": 0.15, "weight": 0.5, "min_masked": 0, "draw": "bernoulli"},
}
"""The ``maskris`` preset's branches (:meth:`MaskSDConfig.maskris`): MaskRIS as published (naver-ai/maskris). The
two λ = 0.5 add up to the weight of its one combined view (:attr:`MaskSDConfig.views`)."""


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
    min_masked: int | None = documented(None, help="Mask at least this many selected tokens in every sample that has them, when α > 0 (0: round(α·kept) alone, which is 0 for short sentences).")
    select: Select = documented("top", help="Which candidates correlation filtering keeps: top (the ceil(K·n) most correlated, the paper) or bottom (the least, AMLRIS's direction).")
    site: Site = documented("embedding", help="Where the branch masks: embedding (the tokens before the encoder, which re-runs), features (LMVSD only: the decode head's visual maps, with a learnable value per position and level; no second image encode) or input (square pixel patches filled, or word ids replaced, at the model's inputs, as MaskRIS; the whole forward re-runs; needs top_k=1, or guidance=prediction for LMVSD).")
    guidance: Guidance = documented("joint", help="What ranks the tokens top_k keeps: joint (dot product with the other modality's pooled feature in a joint image-text space, the paper), prediction (LMVSD only: the main branch's detached predicted mask pooled onto the image token grid) or segmenter (the segmenter's relevance(branch, visual, text) scores). Unused at top_k=1.")
    draw: Draw = documented("count", help="How many kept tokens are masked: count (exactly round(α·kept) per sample, the paper) or bernoulli (each independently with probability α, MaskRIS's per-word draw); min_masked applies to both.")

    @classmethod
    def lmvsd(cls, **overrides: Any) -> BranchConfig:
        """The paper's LMVSD branch (K = 0.5, α = 0.25, λ1 = 0.75, no minimum), with keyword overrides."""
        return cls(**overrides).resolve("lmvsd")

    @classmethod
    def vmlsd(cls, **overrides: Any) -> BranchConfig:
        """The paper's VMLSD branch (K = 0.5, α = 0.1, λ2 = 0.1, at least one word masked), with keyword overrides."""
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
        if isinstance(config.min_masked, bool) or not isinstance(config.min_masked, int) or config.min_masked < 0:
            raise ValueError(f"{branch}.min_masked must be an int >= 0, got {config.min_masked!r}")
        check_choice(f"{branch}.select", config.select, get_args(Select))
        check_choice(f"{branch}.site", config.site, get_args(Site))
        check_choice(f"{branch}.guidance", config.guidance, get_args(Guidance))
        check_choice(f"{branch}.draw", config.draw, get_args(Draw))
        if branch == "vmlsd" and config.site == "features":
            raise ValueError("vmlsd.site must be 'embedding' or 'input' (words have no feature maps; site='features' is LMVSD's), got 'features'")
        if branch == "vmlsd" and config.guidance == "prediction":
            raise ValueError("vmlsd.guidance='prediction' is LMVSD's (a predicted mask ranks image patches, not words): "
                             "use 'joint' or 'segmenter' for VMLSD, or top_k=1")
        if config.site == "input" and config.top_k < 1 and not (branch == "lmvsd" and config.guidance == "prediction"):
            raise ValueError(
                f"{branch}.site='input' masks the raw inputs, which have no features to rank: give {branch}.top_k=1 (random "
                f"masking, as MaskRIS)" + (" or lmvsd.guidance='prediction'" if branch == "lmvsd" else "")
                + f", got top_k={config.top_k} with guidance={config.guidance!r}"
            )
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
    teacher_gradient: TeacherGradient = documented(
        "detach", help="Gradient of the branch losses through their soft target sigmoid(main logits): detach (none reaches the main prediction) or flow (it does, as a literal BCE(M_branch, M_seg) of Eq. 9 would; needs supervision=distill and target=soft)."
    )
    branch_norm_stats: NormStats = documented(
        "update", help="BatchNorm running statistics in the masked branches' passes: update (as the main pass does) or freeze (leave them as the main pass left them; batch statistics are still used)."
    )
    checkpoint_branches: bool = documented(
        False, help="Recompute each masked branch (its encoder pass and decode) in the backward pass instead of keeping its activations: less memory, more time, the same gradients."
    )
    views: Views = documented(
        "separate", help="separate: one masked pass per branch, each masking its own modality (the paper); combined: one extra pass with both enabled branches' modalities masked (MaskRIS), distilled at the sum of their λ."
    )

    def __post_init__(self) -> None:
        for name in get_args(BranchName):
            branch = getattr(self, name)
            if not isinstance(branch, BranchConfig):
                raise TypeError(f"{name} must be a BranchConfig, got {type(branch).__name__}")
            setattr(self, name, branch.resolve(name))
        check_choice("supervision", self.supervision, get_args(Supervision))
        check_choice("target", self.target, get_args(Target))
        check_open_fraction("threshold", self.threshold)
        check_choice("teacher_gradient", self.teacher_gradient, get_args(TeacherGradient))
        if self.teacher_gradient == "flow" and (self.supervision, self.target) != ("distill", "soft"):
            raise ValueError(
                "teacher_gradient='flow' needs supervision='distill' and target='soft' (a ground-truth target has no "
                "teacher, and a thresholded one has no gradient), got "
                f"supervision={self.supervision!r}, target={self.target!r}"
            )
        check_choice("branch_norm_stats", self.branch_norm_stats, get_args(NormStats))
        if not isinstance(self.checkpoint_branches, bool):
            raise TypeError(f"checkpoint_branches must be True or False, got {self.checkpoint_branches!r}")
        check_choice("views", self.views, get_args(Views))
        if self.views == "combined" and self.lmvsd.enabled and self.lmvsd.site == "features":
            raise ValueError("views='combined' re-runs the model on masked inputs or embeddings; lmvsd.site='features' masks "
                             "the decode head's maps instead: use lmvsd.site='embedding' or 'input', or views='separate'")

    @classmethod
    def baseline(cls, **overrides: Any) -> MaskSDConfig:
        """Both branches off: MaskSD trains the bare segmenter with its segmentation loss."""
        return cls(lmvsd=BranchConfig(enabled=False), vmlsd=BranchConfig(enabled=False), **overrides)

    @classmethod
    def maskris(cls, **overrides: Any) -> MaskSDConfig:
        """MaskRIS as published (naver-ai/maskris): one combined view with 75 % of the 32-px pixel patches of the
        image zero-filled and each word drawn with probability 0.15 (then [MASK] / a random id / kept at 80/10/10),
        no correlation filtering (K = 1), distilled from the detached soft main prediction; total loss
        seg + (0.5 + 0.5)·L_masked. Masks at the inputs, so the segmenter needs only ``forward(images, token_ids)``
        and MaskSD needs ``inputs=InputSpec.from_tokenizer(tokenizer)`` (the mask id, vocabulary, special ids).
        Keyword overrides replace whole fields. What still differs from MaskRIS is in docs/method.md."""
        values: dict[str, Any] = dict(
            lmvsd=BranchConfig.lmvsd(**MASKRIS_BRANCHES["lmvsd"]),
            vmlsd=BranchConfig.vmlsd(**MASKRIS_BRANCHES["vmlsd"]),
            target="soft",
            teacher_gradient="detach",
            views="combined",
        )
        return cls(**{**values, **overrides})

    def branch(self, name: BranchName) -> BranchConfig:
        """The config of branch ``name``."""
        check_choice("branch", name, get_args(BranchName))
        return getattr(self, name)
