"""The LAVT-style model's rows of the miniature table (issue 30): ``python -m benchmarks.ablation --mode lavt``.

    python -m benchmarks.ablation --mode lavt --tag lavt_200 --scenes 200 --steps 400 --eval-every 40 --best-of test
    python -m benchmarks.ablation --mode lavt --tag lavt_16000 --scenes 16000 --steps 400 --eval-every 40 --best-of test

Every row trains the tiny LAVT (``examples/lavt``, ``--model lavt --pretrained none``: random Swin, BERT and fusion)
on the synthetic scenes with the demo's other settings, as the CRIS rows of the overfit (200 scenes) and 16,000-scene
tables do; each run is scored from its best.pt, chosen on `test`, and reported on `val` and compositional. LAVT has no
joint image-text space, so CM-MaskSD's correlation filter has no CLIP similarity to rank by: each guidance source
LAVT does have is a row. Each row's difference is paired with the LAVT baseline of the same seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.ablation import Row

__all__ = ["LAVT_BASELINE", "MASKRIS_LAVT_GAIN", "lavt_rows"]

LAVT_BASELINE = "baseline, LAVT"
"""The row every LAVT row is paired with."""

MASKRIS_LAVT_GAIN = {"oIoU": 1.06, "note": "MaskRIS (Lee et al., 2024), LAVT on RefCOCO val: masked views at the input site"}
"""MaskRIS's published gain from its masked views on LAVT, for the report beside the miniature's."""

_LAVT = {"model": "lavt"}
_SEGMENTER = {"masksd.lmvsd.guidance": "segmenter", "masksd.vmlsd.guidance": "segmenter"}


def lavt_rows(row: type[Row], maskris: dict[str, Any]) -> dict[str, Row]:
    """The rows, built with ablation.py's ``Row`` class; ``maskris``: the ``--masksd-preset maskris`` overrides
    (MaskRIS's recipe as published: input site, K = 1, 75 % of 32-px pixel patches, 15 % of the words)."""

    def lavt(table: str, **overrides: Any) -> Row:
        return row("scratch", table, {**_LAVT, **overrides}, versus=LAVT_BASELINE)

    return {
        LAVT_BASELINE: lavt("II", baseline=True),
        "LAVT, MaskRIS recipe (input site)": lavt("—", **maskris),
        "LAVT, CM-MaskSD, guided by PWAM's attention": lavt("II", **_SEGMENTER),
        "LAVT, CM-MaskSD, LMVSD guided by the prediction": lavt("II", **{**_SEGMENTER, "masksd.lmvsd.guidance": "prediction"}),
        "LAVT, CM-MaskSD, K=1 (random)": lavt("III", **{"masksd.lmvsd.top_k": 1.0, "masksd.vmlsd.top_k": 1.0}),
        "LAVT, CM-MaskSD, ground-truth supervision": lavt("VI", **_SEGMENTER, **{"masksd.supervision": "ground_truth"}),
    }
