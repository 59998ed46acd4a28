"""The field's model families (examples/families/): each tiny adapter passes verify_segmenter and takes a MaskSD
training step with the guidance its model supports; each is at most 25 lines (counted, not asserted by hand);
each imports only what a user of the wheel has; docs/families.md shows each adapter as it is."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from examples.families import FAMILIES, adapter_lines, adapter_source, check_family, load  # noqa: E402
from masksd import MaskSD  # noqa: E402
from masksd.adapter import is_fused  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_ADAPTER_LINES = 25
WHEEL_IMPORTS = {"__future__", "masksd", "torch", "einops", "open_clip", "transformers"}
"""What a family module may import: masksd and its dependencies, and the two model libraries of its extras."""


@pytest.mark.filterwarnings("ignore:guidance='joint'")  # random weights: CLIP's and SigLIP's spaces are not aligned yet
@pytest.mark.parametrize("name", FAMILIES)
def test_family_verifies_and_takes_a_training_step(name):
    result = check_family(name)  # raises on a failed check or a mask token without gradient
    assert result.checks_passed >= 10 and result.loss > 0
    assert result.adapter_lines <= MAX_ADAPTER_LINES, f"{name}'s adapter has {result.adapter_lines} lines"


@pytest.mark.parametrize("name", ["etris", "lavt"])
def test_fused_families_re_encode_with_exactly_one_modality_masked(name):
    """The main pass sees both inputs; LMVSD the masked image with the real words; VMLSD the real image with masked words."""
    module = load(name)
    segmenter, images, texts, _ = module.build()
    assert is_fused(segmenter)
    calls, encode = [], segmenter.encode
    segmenter.encode = lambda image, text: (calls.append((image.tokens.detach(), text.tokens.detach())), encode(image, text))[1]
    model = MaskSD(segmenter, module.CONFIG).train()
    with torch.no_grad():
        truth = torch.zeros_like(segmenter.decode_head(*encode(segmenter.embed_image(images), segmenter.embed_text(texts))))
    out = model(images, texts, truth, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3
    (image, text), (lmvsd_image, lmvsd_text), (vmlsd_image, vmlsd_text) = calls
    assert torch.equal(lmvsd_text, text) and torch.equal(vmlsd_image, image)
    assert torch.equal((lmvsd_image != image).any(dim=-1), out.image_masked)  # exactly the masked patches changed
    assert torch.equal((vmlsd_text != text).any(dim=-1), out.text_masked)


def test_cris_rn50_masks_stem_tokens_under_the_best_c5_cells():
    """Joint guidance on the coarse C5 grid: the sentence ranks the 2x2 C5 tokens, K = 0.5 keeps two cells, and
    every masked stem token (16x16) lies in one of them."""
    module = load("cris_rn50")
    segmenter, images, texts, _ = module.build()
    model = MaskSD(segmenter, module.CONFIG).train()
    with torch.no_grad():
        visual = segmenter.encode_image(segmenter.embed_image(images))
        text = segmenter.encode_text(segmenter.embed_text(texts))
    scores = torch.einsum("bnd,bd->bn", visual.tokens, text.pooled)  # (B, 4) on the C5 grid
    kept_cells = scores.topk(2, dim=1).indices  # (B, 2)
    out = model(images, texts, torch.zeros(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    rows, cols = torch.arange(256) // 16, torch.arange(256) % 16
    cell_of_token = (rows // 8) * 2 + cols // 8  # (256,) the C5 cell each stem token lies in
    for b in range(2):
        masked = out.image_masked[b].nonzero().flatten()
        assert len(masked) == 32  # round(0.25 * 128): a quarter of the two kept cells' 128 tokens
        assert set(cell_of_token[masked].tolist()) <= set(kept_cells[b].tolist())


def test_lavt_masks_a_word_among_those_the_pixels_attend_to_most():
    """Guidance "segmenter": VMLSD keeps the half of each sentence's words that LAVT's last fusion attends to most."""
    module = load("lavt")
    segmenter, images, texts, _ = module.build()
    model = MaskSD(segmenter, module.CONFIG).train()
    embedded = segmenter.embed_text(texts)
    with torch.no_grad():
        visual, text = segmenter.encode(segmenter.embed_image(images), embedded)
    relevance = segmenter.relevance("vmlsd", visual, text)  # (B, L)
    out = model(images, texts, torch.zeros(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for b in range(2):
        words = embedded.candidates[b].nonzero().flatten()
        kept = words[relevance[b, words].argsort(descending=True)[: -(-len(words) // 2)]]  # ceil(K * n), K = 0.5
        assert out.text_masked[b].sum() == 1 and set(out.text_masked[b].nonzero().flatten().tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("name", FAMILIES)
def test_family_modules_import_only_what_the_wheel_user_has(name):
    tree = ast.parse(Path(load(name).__file__).read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert roots <= WHEEL_IMPORTS, f"{name} imports {roots - WHEEL_IMPORTS}"
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree)), "no relative imports"


def test_adapter_lines_count_code_only(tmp_path):
    source = '''"""A module."""
import torch
# -- adapter
class Adapter:
    """Docstrings,
    however long, are not counted."""

    # nor comments, nor blank lines
    def embed(self, x):  # a trailing comment is on a line of code
        return x
# -- end of adapter
x = 1
'''
    path = tmp_path / "counted.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("counted", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert adapter_lines(module) == 3
    path.write_text(source.replace("# -- end of adapter\n", ""))
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="one '# -- adapter' and one '# -- end of adapter'"):
        adapter_lines(module)


def test_docs_show_each_adapter_as_it_is():
    page = (ROOT / "docs" / "families.md").read_text()
    for name in FAMILIES:
        match = re.search(rf"<!-- family-{name} -->\s*```python\n(.*?)```", page, re.S)
        assert match, f"docs/families.md has no <!-- family-{name} --> block"
        assert match.group(1).strip() == adapter_source(load(name)).strip(), f"docs/families.md's {name} adapter differs from the file"
        assert re.search(rf"\| \[{name}\.py\]\([^)]*\) \| {adapter_lines(load(name))} \|", page), f"{name}'s line count in the table"
