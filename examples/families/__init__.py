"""The field's model families as tiny random-init models with their MaskSD adapters (docs/families.md).

Each module holds a family's model ("the model's own code": its encoders from open_clip or
transformers, the bridges or fusion modules, a small decoder) and, between the markers
``# -- adapter`` and ``# -- end of adapter``, everything written to wrap it for MaskSD; ``CONFIG``,
the MaskSD configuration whose guidance suits it; ``build(seed)``, the tiny model adapted with a
batch. The modules import only masksd, torch, einops, open_clip and transformers, so that they run
from an installed wheel (``python -m examples.families`` here; ``python -m families`` from a copy).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from types import ModuleType
from typing import NamedTuple

import torch

from masksd import MaskSD, verify_segmenter

__all__ = ["FAMILIES", "FamilyCheck", "adapter_lines", "adapter_source", "check_family", "load"]

FAMILIES = ("cris_rn50", "etris", "lavt", "detris", "siglip")
"""The modules, one per family: CRIS on RN50, ETRIS-style bridges, LAVT-style Swin + BERT, DETRIS-style
DINOv2 + CLIP text, SigLIP towers."""
START, END = "# -- adapter", "# -- end of adapter"


def load(name: str) -> ModuleType:
    """The family module ``name`` (one of FAMILIES)."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def adapter_source(module: ModuleType) -> str:
    """The text between the module's adapter markers."""
    source = inspect.getsource(module)
    if source.count(START) != 1 or source.count(END) != 1:
        raise ValueError(f"{module.__name__} must hold one '{START}' and one '{END}' marker line")
    return source.split(START, 1)[1].split("\n", 1)[1].split(END, 1)[0]


def adapter_lines(module: ModuleType) -> int:
    """Lines of code in the module's adapter: not blank, not a comment, not a docstring."""
    source = adapter_source(module)
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = source.splitlines()
    return sum(1 for number, line in enumerate(lines, 1) if line.strip() and not line.strip().startswith("#") and number not in docstrings)


class FamilyCheck(NamedTuple):
    name: str
    adapter_lines: int
    checks_passed: int
    loss: float


def check_family(name: str, seed: int = 0) -> FamilyCheck:
    """Build family ``name``'s tiny model, run verify_segmenter on it (against the model itself where it has its
    own forward) with the family's CONFIG, and take one MaskSD training step; raise on any failure."""
    module = load(name)
    segmenter, images, texts, reference = module.build(seed)
    report = verify_segmenter(segmenter, images, texts, reference=reference, config=module.CONFIG)
    model = MaskSD(segmenter, module.CONFIG).train()
    with torch.no_grad():
        truth = (torch.sigmoid(segmenter(images, texts)) > 0.5).float()  # any (B, 1, h, w) target
    out = model(images, texts, truth, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    for branch in ("lmvsd", "vmlsd"):
        grad = model.branches[branch].masker.mask_token.grad
        if grad is None or not grad.abs().sum() > 0:
            raise AssertionError(f"{name}: the {branch} mask token got no gradient")
    return FamilyCheck(name, adapter_lines(module), len(report.checks) - len(report.skipped), out.loss.item())
