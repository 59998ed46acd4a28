import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksd import CorrelationFilter


def expected_count(fraction: Fraction, n_valid: int) -> int:
    return 0 if n_valid == 0 else max(1, math.ceil(fraction * n_valid))


@st.composite
def batches(draw, max_b=4, max_n=24, max_c=8):
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, c, generator=g)
    query = torch.randn(b, c, generator=g)
    valid = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)))
    return tokens, query, valid


def oracle(scores: torch.Tensor, valid: torch.Tensor, fraction: Fraction, select: str) -> torch.Tensor:
    """The selection written out per sample: sort valid indices by score (descending for top, ascending
    for bottom), ties by index, and keep the first ceil(K·n)."""
    out = torch.zeros_like(valid)
    for b in range(scores.shape[0]):
        indices = [i for i in range(scores.shape[1]) if valid[b, i]]
        sign = -1.0 if select == "top" else 1.0
        indices.sort(key=lambda i: (sign * float(scores[b, i]), i))
        for i in indices[: expected_count(fraction, len(indices))]:
            out[b, i] = True
    return out


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(1, 20), st.sampled_from(["top", "bottom"]))
def test_selection_equals_the_sorting_oracle(batch, twentieths, select):
    tokens, query, valid = batch
    fraction = Fraction(twentieths, 20)
    selected = CorrelationFilter(float(fraction), select=select).select(query, tokens, valid)
    scores = torch.einsum("bnc,bc->bn", tokens.float(), query.float())
    assert torch.equal(selected, oracle(scores, valid, fraction, select))


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(1, 20))
def test_selects_exact_count_of_best_valid_tokens(batch, twentieths):
    tokens, query, valid = batch
    fraction = Fraction(twentieths, 20)
    selected = CorrelationFilter(float(fraction)).select(query, tokens, valid)

    assert selected.dtype == torch.bool and selected.shape == valid.shape
    assert not (selected & ~valid).any(), "padding/special positions must never be selected"
    scores = torch.einsum("bnc,bc->bn", tokens, query)
    for b in range(tokens.shape[0]):
        n_valid = int(valid[b].sum())
        assert int(selected[b].sum()) == expected_count(fraction, n_valid)
        rest = valid[b] & ~selected[b]
        if selected[b].any() and rest.any():
            assert scores[b][selected[b]].min() >= scores[b][rest].max()


@settings(max_examples=100, deadline=None)
@given(batches(), st.floats(min_value=1e-6, max_value=1.0, allow_nan=False))
def test_count_is_between_one_and_all_valid_for_any_fraction(batch, top_k):
    tokens, query, valid = batch
    selected = CorrelationFilter(top_k).select(query, tokens, valid)
    n_valid = valid.sum(dim=1)
    counts = selected.sum(dim=1)
    assert torch.equal(counts == 0, n_valid == 0)
    assert (counts <= n_valid).all()
    assert (counts >= (n_valid > 0).long()).all()


def test_float_products_do_not_round_up_a_whole_count():
    # 0.1 * 30 is 3.0000000000000004 in floating point; the count must be 3.
    tokens = torch.randn(1, 30, 4)
    assert int(CorrelationFilter(0.1).select(torch.randn(1, 4), tokens).sum()) == 3
    assert int(CorrelationFilter(0.7).select(torch.randn(1, 4), torch.randn(1, 10, 4)).sum()) == 7


def test_top_k_one_selects_every_valid_token_and_none_valid_selects_none():
    tokens, query = torch.randn(2, 5, 3), torch.randn(2, 3)
    valid = torch.tensor([[True, False, True, True, False], [False] * 5])
    selected = CorrelationFilter(1.0).select(query, tokens, valid)
    assert torch.equal(selected, valid)


def test_selection_carries_no_gradient():
    tokens = torch.randn(2, 6, 4, requires_grad=True)
    query = torch.randn(2, 4, requires_grad=True)
    selected = CorrelationFilter(0.5).select(query, tokens)
    assert not selected.requires_grad and selected.grad_fn is None


def test_picks_highest_dot_products():
    query = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[[0.1, 0.0], [3.0, 0.0], [-1.0, 5.0], [2.0, 9.0]]])
    selected = CorrelationFilter(0.5).select(query, tokens)
    assert selected.tolist() == [[False, True, False, True]]


def test_bottom_selects_the_least_correlated_candidates_on_hand_made_scores():
    scores = torch.tensor([[0.3, -2.0, 5.0, 1.0, -1.0, 0.0], [4.0, 4.0, -3.0, -3.0, -3.0, 9.0]])
    valid = torch.tensor([[True, False, True, True, True, True], [True, True, True, True, False, True]])
    top = CorrelationFilter(0.5, select="top").select_scores(scores, valid)
    bottom = CorrelationFilter(0.5, select="bottom").select_scores(scores, valid)
    # row 0: 5 candidates (index 1, the lowest score, is padding) -> ceil(2.5) = 3
    assert top[0].nonzero().flatten().tolist() == [0, 2, 3]  # 5.0, 1.0, 0.3
    assert bottom[0].nonzero().flatten().tolist() == [0, 4, 5]  # -1.0, 0.0, 0.3; never the padded -2.0
    # row 1: 5 candidates -> 3; ties go to the lower index in both directions
    assert top[1].nonzero().flatten().tolist() == [0, 1, 5]  # 9.0, then the tied 4.0s
    assert bottom[1].nonzero().flatten().tolist() == [0, 2, 3]  # the tied -3.0s at 2, 3 (4 is padding), then 4.0 at 0
    assert torch.equal(CorrelationFilter(1.0, select="bottom").select_scores(scores, valid), valid)  # K = 1: every candidate
    assert CorrelationFilter(0.01, select="bottom").select_scores(scores[:1])[0].nonzero().flatten().tolist() == [1]  # no mask: all count


def test_select_must_be_top_or_bottom():
    with pytest.raises(ValueError, match=r"select must be one of \('top', 'bottom'\), got 'least'"):
        CorrelationFilter(0.5, select="least")


@pytest.mark.parametrize("top_k", [0.0, -0.1, 1.01, float("nan")])
def test_top_k_out_of_range(top_k):
    with pytest.raises((ValueError, TypeError), match="top_k"):
        CorrelationFilter(top_k)


def test_bad_shapes_name_the_argument():
    f = CorrelationFilter(0.5)
    with pytest.raises(ValueError, match="tokens"):
        f.select(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="query"):
        f.select(torch.randn(3, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="query"):
        f.select(torch.randn(2, 3), torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="valid"):
        f.select(torch.randn(2, 4), torch.randn(2, 5, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="valid"):
        f.select(torch.randn(2, 4), torch.randn(2, 5, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="tokens"):
        f.select(torch.randn(2, 4), torch.ones(2, 5, 4, dtype=torch.long))


@pytest.mark.parametrize("select", ["top", "bottom"])
def test_nan_scores_rank_last_and_an_invalid_token_is_never_selected(select):
    """A relevance hook or a prediction may give NaN (attention over nothing) or a "never" score (-inf, or +inf when
    the bottom is kept): a NaN must not be chosen before real scores, and a never-token must not let an invalid
    token of lower index in."""
    nan, inf = float("nan"), float("inf")
    ranked = torch.tensor([[nan, 1.0, 2.0, nan], [5.0, -inf, 1.0, nan]])  # as the direction ranks them: high first
    scores = ranked if select == "top" else -ranked
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    half = CorrelationFilter(0.5, select=select).select_scores(scores, valid)  # ceil(0.5 * n) of each row
    assert half.nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]  # real scores first; then the lower index
    every = CorrelationFilter(1.0, select=select).select_scores(scores, valid)
    assert torch.equal(every, valid)  # exactly the valid tokens, never the invalid one
