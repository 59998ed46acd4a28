"""The CRIS head's speed changes compute what the head computed: bit for bit where the arithmetic is unchanged (the
default head, what every stored run and `make demo` used), within stated tolerances where it is reassociated
(``CRISConfig.fast_head``) or kept in the autocast dtype."""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from examples.cris import CRIS, CRISConfig
from examples.cris.decoder import Projector, VisionLanguageDecoder
from examples.cris.neck import CoordConv

REFERENCE = Path(__file__).with_name("cris_reference_arithmetic.json")
"""Eval logits and the first four trainer steps' losses of the tiny default model, written by the code before the
head changes (``python tests/test_cris_head.py`` writes it again) with the numerics it was made under."""
FP32_TOLERANCE = 1e-5
"""fast_head vs the reference in float32: largest difference over the largest magnitude (logits, gradients)."""


def _numerics() -> dict:
    from benchmarks.common import machine

    return {"torch": torch.__version__, "cpu": machine()["cpu"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def reference_arithmetic() -> dict:
    """What the fixture holds, computed here: the shipped tiny model's eval logits on seeded inputs (their sha256,
    sum and largest magnitude) and the (loss, seg, lmvsd, vmlsd) of 4 demo-config trainer steps with clipping."""
    import csv

    from examples.pipeline.config import TrainConfig
    from examples.pipeline.trainer import train

    torch.manual_seed(0)
    model = CRIS(CRISConfig.tiny(pretrained="masksd-tiny-synthetic")).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    tokens = model.tokenize(["the red circle left of the square", "a big blue square", "the green triangle", "circle"])
    with torch.no_grad():
        logits = model(images, tokens).contiguous()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(synthetic_train_size=64, synthetic_eval_size=16, batch_size=8, max_steps=4, epochs=1, workers=0,
                          log_every=1, progress=False, overlays=0, eval_untrained=False, eval_guidance=False, output=out,
                          grad_clip=1.0)
        train(cfg, evaluate_at_end=False)
        with open(Path(out) / "train_log.csv") as f:
            losses = [[float(row[k]) for k in ("loss", "seg", "lmvsd", "vmlsd")] for row in csv.DictReader(f)]
    return {"numerics": _numerics(), "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            "logits_sum": logits.double().sum().item(), "logits_max": logits.abs().max().item(), "losses": losses}


def test_the_default_head_computes_what_the_stored_runs_computed():
    """Under the numerics the fixture was made under (torch, CPU kernels, threads), bit for bit; elsewhere (CPU
    kernels round differently, see docs/benchmarks.md) within float32 rounding."""
    stored = json.loads(REFERENCE.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(stored["numerics"]["torch_threads"])
    try:
        now = reference_arithmetic()
    finally:
        torch.set_num_threads(threads)
    if now["numerics"] == stored["numerics"]:
        assert now["logits_sha256"] == stored["logits_sha256"]
        assert now["losses"] == stored["losses"]
    else:
        assert now["logits_sum"] == pytest.approx(stored["logits_sum"], rel=1e-4, abs=1e-3)
        assert sum(now["losses"], []) == pytest.approx(sum(stored["losses"], []), rel=1e-3)


def _pair(image_size: int = 64, seed: int = 0) -> tuple[CRIS, CRIS]:
    torch.manual_seed(seed)
    reference = CRIS(CRISConfig.tiny(image_size=image_size))
    fast = CRIS(CRISConfig.tiny(image_size=image_size, fast_head=True))
    fast.load_state_dict(reference.state_dict())
    assert fast.decode_head.projector.fast and fast.decode_head.neck.refine[0].fast and not reference.decode_head.projector.fast
    return reference, fast


def _inputs(model: CRIS, size: int = 64, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    texts = ["the red circle", "a big blue square on the left", "x", "the small green triangle behind it"][:batch]
    return torch.randn(batch, 3, size, size, generator=g), model.tokenize(texts)


@pytest.mark.parametrize("size", [64, 96])
def test_fast_head_is_the_same_function_in_float32(size):
    """Eval logits and training gradients of the fast head equal the reference's within float32 rounding."""
    reference, fast = _pair(size)
    images, tokens = _inputs(reference, size)
    with torch.no_grad():
        expected, got = reference.eval()(images, tokens), fast.eval()(images, tokens)
    assert (got - expected).abs().max() <= FP32_TOLERANCE * expected.abs().max()
    grads = []
    for model in (reference.train(), fast.train()):
        torch.manual_seed(5)  # the same dropout
        model.zero_grad()
        model(images, tokens).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    scale = max(g.abs().max() for g in grads[0].values())
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max() for n in grads[0]) <= FP32_TOLERANCE * scale


def test_fast_head_under_bf16_autocast_is_as_close_to_float32_as_the_reference():
    """Under bf16 autocast the fast head's logits are as close to the float32 reference as the reference's own bf16
    logits (within twice their error), for three seeds."""
    for seed in range(3):
        reference, fast = _pair(seed=seed)
        images, tokens = _inputs(reference)
        reference.eval(), fast.eval()
        with torch.no_grad():
            exact = reference(images, tokens)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours, theirs = fast(images, tokens).float(), reference(images, tokens).float()
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-6


def test_fast_projector_reads_channels_last_maps_without_changing_them():
    """The batched matmul reads a channels_last map (GPUs) as it lies; the result is the grouped convolution's."""
    torch.manual_seed(0)
    projector = Projector(32, 16, 3).eval()
    pixels, sentence = torch.randn(3, 32, 5, 7), torch.randn(3, 16)
    with torch.no_grad():
        expected = projector(pixels, sentence)
        projector.fast = True
        for layout in (torch.contiguous_format, torch.channels_last):
            projector.to(memory_format=layout)
            got = projector(pixels.to(memory_format=layout), sentence)
            assert got.shape == expected.shape == (3, 1, 20, 28)
            assert (got - expected).abs().max() <= FP32_TOLERANCE * expected.abs().max()


def test_fast_coordconv_adds_the_coordinates_convolution_once():
    torch.manual_seed(0)
    conv = CoordConv(6, 4, 3).train()
    x = torch.randn(2, 6, 5, 9, requires_grad=True)
    expected = conv(x)
    (weight_grad,) = torch.autograd.grad(expected.sum(), conv.conv[0].weight)
    conv.fast = True
    got = conv(x)
    assert (got - expected).abs().max() <= FP32_TOLERANCE * expected.abs().max()
    (fast_grad,) = torch.autograd.grad(got.sum(), conv.conv[0].weight)  # the coordinate channels' weights train too
    assert (fast_grad - weight_grad).abs().max() <= FP32_TOLERANCE * weight_grad.abs().max()


def test_the_decoders_residual_stream_stays_in_the_autocast_dtype():
    """Under bf16 autocast every decoder layer returns bf16 (the LayerNorms' float32 no longer spreads into the
    stream); in float32 the casts are no-ops. The bf16 output stays within bf16 rounding of the float32 one."""
    torch.manual_seed(0)
    decoder = VisionLanguageDecoder(2, 32, 4, 64, 0.0, 64).eval()
    pixels, words = torch.randn(2, 32, 6, 6), torch.randn(2, 5, 64)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    dtypes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for layer in decoder.layers]
    with torch.no_grad():
        exact = decoder(pixels, words, padding)
        assert dtypes == [torch.float32] * 2
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = decoder(pixels.bfloat16(), words, padding)
    for hook in hooks:
        hook.remove()
    assert dtypes == [torch.bfloat16] * 2
    assert (half.float() - exact).abs().max() <= 0.05 * exact.abs().max()


def test_fast_head_is_a_checked_switch_the_trainer_passes_on():
    with pytest.raises(TypeError, match="fast_head"):
        CRISConfig.tiny(fast_head="yes")
    from examples.train_cris_masksd import parse_args

    assert parse_args(["--fast-head"]).fast_head is True and parse_args([]).fast_head is False


if __name__ == "__main__":  # rewrite the fixture (only from code whose default head is the stored arithmetic)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    REFERENCE.write_text(json.dumps(reference_arithmetic(), indent=2) + "\n")
    print(f"wrote {REFERENCE}")
