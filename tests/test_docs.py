"""The README and docs/: every Python block runs, every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- ([\w-]+) -->\s*)?```python\n(.*?)```", re.S)
MARKED = {  # blocks marked <!-- name --> run in a test that also checks what they claim
    "quickstart": "tests/test_readme.py",
    "open_clip": "tests/test_readme.py (the tiny config stands in for downloaded weights)",
    "clipseg": "tests/test_readme.py (on a tiny local snapshot)",
    "guidance": "tests/test_guidance.py",
    "manifest-folder": "tests/test_manifest.py (on a folder of images, masks and expression files)",
    "input_site": "tests/test_readme.py (a plain model and a tiny BERT tokenizer stand in for the reader's)",
}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def blocks() -> list[tuple[str, int, str | None, str]]:
    found = []
    for page in PAGES:
        for index, match in enumerate(BLOCK.finditer(page.read_text())):
            found.append((str(page.relative_to(ROOT)), index, match.group(1), match.group(2)))
    return found


def test_every_marked_block_has_its_test():
    markers = {marker for _, _, marker, _ in blocks() if marker}
    assert markers <= set(MARKED), f"marked blocks without a test: {markers - set(MARKED)}"
    assert markers == set(MARKED), f"tests whose block is gone: {set(MARKED) - markers}"


@pytest.mark.parametrize("page", sorted({p for p, _, m, _ in blocks() if m is None}))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's unmarked blocks run in order in one namespace, as a reader would paste them, in a
    folder holding ``data/``: refcoco and refcocog in the refer layout (tests/test_refer.py's fixture)."""
    from tests.test_refer import write_refer_root

    write_refer_root(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    torch.manual_seed(0)
    namespace = {"__name__": "docs_page"}
    for p, index, marker, code in blocks():
        if p == page and marker is None:
            exec(compile(code, f"{page} (block {index})", "exec"), namespace)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: {broken}"
