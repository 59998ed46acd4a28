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


def test_configuration_examples_run_and_mean_what_they_say():
    section = README.read_text().split("## Configuration and the paper's ablations", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in code.splitlines()]
    namespace: dict = {}
    exec(compile("\n".join(lines[:1]), str(README), "exec"), namespace)  # the import
    configs = [eval(line, namespace) for line in lines[1:] if line]
    default, vmlsd_ratio, partial, vmlsd_only, baseline = configs
    assert (default.vmlsd.ratio, default.lmvsd.ratio, vmlsd_ratio.vmlsd.ratio) == (0.1, 0.25, 0.2)
    assert (partial.vmlsd.top_k, partial.vmlsd.ratio, partial.vmlsd.weight) == (0.7, 0.1, 0.1)
    assert not vmlsd_only.lmvsd.enabled and vmlsd_only.vmlsd.enabled
    assert not baseline.lmvsd.enabled and not baseline.vmlsd.enabled
