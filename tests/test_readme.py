"""The README's quick-start code runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_eval_matches_the_bare_segmenter():
    text = README.read_text()
    match = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its quickstart block"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 40
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), namespace)
    model, images, ids = namespace["model"], namespace["images"], namespace["ids"]
    assert torch.isfinite(namespace["out"].loss)
    assert model.branches["lmvsd"].masker.mask_token.grad is not None
    assert torch.equal(namespace["logits"], model.segmenter(images, ids))
