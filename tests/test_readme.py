"""The README's code runs as written (the configuration block lives in docs/method.md)."""

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
    section = (README.parent / "docs" / "method.md").read_text().split("## Configuration and the paper's ablations", 1)[1]
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


def _block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README lost its {marker} block"
    return match.group(1)


def test_open_clip_wrapping_runs_and_passes_the_checker(capsys):
    code = _block("open_clip")
    assert len([l for l in code.split("\n\n")[-1].splitlines() if l.strip()]) <= 10  # the wrapping itself
    offline = {'"ViT-B-16", pretrained="openai"': '"masksd-tiny", pretrained=None', '"ViT-B-16"': '"masksd-tiny"', "layers=(11,)": "layers=(2,)"}
    for name, tiny in offline.items():  # the tiny config stands in for the downloaded weights
        assert name in code
        code = code.replace(name, tiny)
    from examples.cris.backbone import register_model_configs

    register_model_configs()
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), namespace)
    # all but the reference, not given here; the tiny random CLIP standing in for the weights may warn that it has no joint space yet
    assert re.search(r"12 checks passed(, 1 with a warning)?, 1 skipped", capsys.readouterr().out)
    model, images, texts = namespace["model"], namespace["images"], namespace["texts"]
    out = model.train()(images, texts, (torch.rand(2, 1, 8, 8) > 0.5).float())
    out.loss.backward()
    assert model.branches["lmvsd"].masker.mask_token.grad.abs().sum() > 0


def test_clipseg_wrapping_runs_on_a_local_snapshot(tmp_path, capsys):
    import numpy as np

    from tests.hf_snapshot import write_clipseg_snapshot

    code = _block("clipseg")
    lines = [l for l in code.split("\n\n")[-1].splitlines() if l.strip()]
    assert len(lines) <= 5
    snapshot = write_clipseg_snapshot(tmp_path / "clipseg")
    assert '"CIDAS/clipseg-rd64-refined"' in code
    code = code.replace('"CIDAS/clipseg-rd64-refined"', repr(str(snapshot)))  # offline: the same files, tiny
    namespace: dict = {"image": np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), namespace)
    # all but the reference, not given here; the tiny random CLIP standing in for the weights may warn that it has no joint space yet
    assert re.search(r"12 checks passed(, 1 with a warning)?, 1 skipped", capsys.readouterr().out)
    segmenter, inputs = namespace["segmenter"], namespace["inputs"]
    assert segmenter(inputs["pixel_values"], inputs).shape == (2, 1, 64, 64)


def test_a_plain_model_trains_at_the_inputs_in_the_three_lines_the_readme_shows():
    from masksd import InputSpec, MaskSD, MaskSDConfig
    from tests.test_input_site import WORDS, bert_tokenizer, plain_batch
    from tests.toys import PlainRIS

    code = _block("input_site")
    assert len([line for line in code.splitlines() if line.strip()]) == 3
    images, token_ids, masks = plain_batch()
    namespace = dict(MaskSD=MaskSD, MaskSDConfig=MaskSDConfig, InputSpec=InputSpec, my_model=PlainRIS(vocab=len(WORDS)),
                     tokenizer=bert_tokenizer(), images=images, token_ids=token_ids, masks=masks)
    exec(compile(code, str(README), "exec"), namespace)
    out = namespace["out"]
    assert out.combined_loss is not None and all(p.grad is not None for p in namespace["my_model"].parameters())
