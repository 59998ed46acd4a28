import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksd import GuidedMasker
from masksd.masking import FeatureMapMasker


def expected_count(fraction: Fraction, n: int) -> int:
    return math.floor(fraction * n + Fraction(1, 2))


@st.composite
def batches(draw, max_b=4, max_n=24, max_c=8):
    b, n, c = draw(st.integers(1, max_b)), draw(st.integers(1, max_n)), draw(st.integers(1, max_c))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    embeddings = torch.randn(b, n, c, generator=g)
    candidates = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)))
    return embeddings, candidates, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(0, 20))
def test_masks_exact_count_of_candidates_and_leaves_the_rest_bit_identical(batch, twentieths):
    embeddings, candidates, seed = batch
    fraction = Fraction(twentieths, 20)
    masker = GuidedMasker(embeddings.shape[-1], float(fraction))
    masked, applied = masker.mask(embeddings, candidates, generator=torch.Generator().manual_seed(seed))

    assert masked.shape == embeddings.shape and applied.shape == candidates.shape
    assert not (applied & ~candidates).any(), "only candidates may be masked"
    for b in range(embeddings.shape[0]):
        assert int(applied[b].sum()) == expected_count(fraction, int(candidates[b].sum()))
    assert torch.equal(masked[~applied], embeddings[~applied])
    assert torch.equal(masked[applied], masker.mask_token.detach().expand_as(masked)[applied])


def test_halves_round_up():
    masker = GuidedMasker(4, 0.1)
    _, applied = masker.mask(torch.randn(3, 10, 4), torch.tensor([[True] * 5 + [False] * 5, [True] * 4 + [False] * 6, [True] * 10]))
    assert applied.sum(dim=1).tolist() == [1, 0, 1]  # 0.5 -> 1, 0.4 -> 0, 1.0 -> 1


def test_generator_makes_the_choice_reproducible_and_uniform():
    masker = GuidedMasker(2, 0.25)
    x = torch.randn(1, 8, 2)
    first = masker.mask(x, generator=torch.Generator().manual_seed(7))[1]
    again = masker.mask(x, generator=torch.Generator().manual_seed(7))[1]
    assert torch.equal(first, again)

    g = torch.Generator().manual_seed(0)
    hits = sum(masker.mask(x, generator=g)[1][0].long() for _ in range(4000))  # 2 of 8 each time
    expected = 4000 * 2 / 8
    assert ((hits - expected).abs() < 0.1 * expected).all(), hits


def test_mask_token_gets_gradient_and_embeddings_keep_theirs():
    masker = GuidedMasker(4, 0.5)
    x = torch.randn(2, 6, 4, requires_grad=True)
    masked, applied = masker.mask(x)
    (masked * torch.randn_like(masked)).sum().backward()
    assert masker.mask_token.grad is not None and masker.mask_token.grad.abs().sum() > 0
    assert (x.grad[applied] == 0).all() and (x.grad[~applied] != 0).any()


def test_mask_token_init_and_dtype_follow_embeddings():
    masker = GuidedMasker(512, 0.5)
    assert masker.mask_token.shape == (512,)
    assert masker.mask_token.abs().max() <= 0.04 + 1e-6  # truncated at 2 std
    assert 0.01 < masker.mask_token.std() < 0.03
    masked, _ = masker.mask(torch.randn(1, 4, 512, dtype=torch.bfloat16))
    assert masked.dtype == torch.bfloat16


def test_ratio_zero_masks_nothing_ratio_one_masks_all_candidates():
    x, cand = torch.randn(2, 5, 3), torch.tensor([[True, True, False, True, False]] * 2)
    assert not GuidedMasker(3, 0.0).mask(x, cand)[1].any()
    assert torch.equal(GuidedMasker(3, 1.0).mask(x, cand)[1], cand)


@pytest.mark.parametrize("ratio", [-0.01, 1.5, float("inf")])
def test_ratio_out_of_range(ratio):
    with pytest.raises((ValueError, TypeError), match="ratio"):
        GuidedMasker(4, ratio)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="dim"):
        GuidedMasker(0, 0.5)
    masker = GuidedMasker(4, 0.5)
    with pytest.raises(ValueError, match="embeddings"):
        masker.mask(torch.randn(2, 4))
    with pytest.raises(ValueError, match="embeddings"):
        masker.mask(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="candidates"):
        masker.mask(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="candidates"):
        masker.mask(torch.randn(2, 3, 4), torch.ones(3, 3, dtype=torch.bool))


@settings(max_examples=100, deadline=None)
@given(batches(), st.integers(0, 20), st.integers(0, 3))
def test_min_count_masks_at_least_that_many_where_there_are_enough(batch, twentieths, minimum):
    embeddings, candidates, seed = batch
    fraction = Fraction(twentieths, 20)
    masker = GuidedMasker(embeddings.shape[-1], float(fraction), min_count=minimum)
    _, applied = masker.mask(embeddings, candidates, generator=torch.Generator().manual_seed(seed))
    for b in range(embeddings.shape[0]):
        n = int(candidates[b].sum())
        floor = min(minimum, n) if fraction > 0 else 0  # α = 0 asks for no masking
        assert int(applied[b].sum()) == max(expected_count(fraction, n), floor)


def test_the_paper_vmlsd_setting_masks_short_sentences_only_with_a_minimum():
    # K = 0.5 keeps ceil(n/2) of n words; α = 0.1 of 2 kept words rounds to 0
    kept = torch.tensor([[True, True, False, False]])
    assert not GuidedMasker(4, 0.1).mask(torch.randn(1, 4, 4), kept)[1].any()
    assert GuidedMasker(4, 0.1, min_count=1).mask(torch.randn(1, 4, 4), kept)[1].sum() == 1
    assert not GuidedMasker(4, 0.1, min_count=1).mask(torch.randn(1, 4, 4), torch.zeros(1, 4, dtype=torch.bool))[1].any()
    with pytest.raises(ValueError, match="min_count"):
        GuidedMasker(4, 0.1, min_count=-1)


GRID, SHAPES = (4, 4), ((3, 8, 8), (5, 4, 4), (2, 2, 2))  # a CRIS-like pyramid: 2g, g, g/2


def _maps(batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, *shape, generator=g) for shape in SHAPES)


def test_feature_maps_are_replaced_at_the_chosen_tokens_resized_to_each_level():
    masker = FeatureMapMasker(GRID, SHAPES, ratio=0.5)
    candidates = torch.zeros(2, 16, dtype=torch.bool)
    candidates[0, [0, 5, 10, 15]] = True  # the diagonal of the 4x4 grid
    candidates[1, [3, 12]] = True
    maps = _maps(2)
    masked, applied = masker.mask(maps, candidates, generator=torch.Generator().manual_seed(3))
    # the same draw as the embedding site's mask token would take
    _, expected = GuidedMasker(1, 0.5).mask(torch.zeros(2, 16, 1), candidates, generator=torch.Generator().manual_seed(3))
    assert torch.equal(applied, expected) and applied.sum(dim=1).tolist() == [2, 1]
    for level, (x, y, values) in enumerate(zip(maps, masked, masker.maps)):
        scale = x.shape[-1] / GRID[1]
        where = torch.zeros(2, *x.shape[-2:], dtype=torch.bool)
        for b, token in applied.nonzero().tolist():  # nearest: output (i, j) reads token (floor(i / scale), floor(j / scale))
            row, col = divmod(token, GRID[1])
            for i in range(x.shape[-2]):
                for j in range(x.shape[-1]):
                    if int(i / scale) == row and int(j / scale) == col:
                        where[b, i, j] = True
        where = where[:, None].expand_as(x)
        assert torch.equal(y[~where], x[~where]), level  # everything else bit-identical
        assert torch.equal(y[where], values.detach().expand_as(x)[where]), level
        assert where.any() or level == 2  # the coarsest level keeps every other token only


def test_feature_map_values_are_initialised_like_the_mask_token_and_get_gradient():
    masker = FeatureMapMasker((8, 8), ((64, 16, 16), (32, 8, 8)), ratio=1.0)
    assert [tuple(v.shape) for v in masker.maps] == [(64, 16, 16), (32, 8, 8)]
    assert sum(v.numel() for v in masker.parameters()) == 64 * 256 + 32 * 64
    values = torch.cat([v.detach().flatten() for v in masker.maps])
    assert values.abs().max() <= 0.04 + 1e-6 and 0.01 < values.std() < 0.03  # normal std 0.02 truncated at 2 std
    maps = tuple(torch.randn(2, *v.shape, requires_grad=True) for v in masker.maps)
    half = torch.zeros(2, 64, dtype=torch.bool)
    half[:, :32] = True  # the top half of the grid
    masked, applied = masker.mask(maps, half)
    sum((m * torch.randn_like(m)).sum() for m in masked).backward()
    for x, values in zip(maps, masker.maps):
        h = x.shape[-2] // 2
        assert (values.grad[:, :h] != 0).all() and (values.grad[:, h:] == 0).all()
        assert (x.grad[:, :, :h] == 0).all() and (x.grad[:, :, h:] != 0).all()


def test_feature_map_masker_names_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        FeatureMapMasker((4,), SHAPES, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        FeatureMapMasker(GRID, ((3, 8),), 0.5)
    with pytest.raises(ValueError, match="ratio"):
        FeatureMapMasker(GRID, SHAPES, 1.5)
    masker = FeatureMapMasker(GRID, SHAPES, 0.5)
    with pytest.raises(ValueError, match="maps must be 3 tensors"):
        masker.mask(_maps(2)[:2], torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"maps\[1\] must have shape"):
        masker.mask((_maps(2)[0], torch.randn(2, 5, 3, 3), _maps(2)[2]), torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidates must have shape"):
        masker.mask(_maps(2), torch.ones(2, 15, dtype=torch.bool))
