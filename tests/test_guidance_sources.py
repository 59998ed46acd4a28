"""Guidance without a joint space (issue 26, item 2): the main prediction or the segmenter's own relevance ranks
the tokens, coarse grids spread their scores, and K = 1 reads no score (no dims, no features needed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from masksd import BranchConfig, Embeddings, Features, MaskSD, MaskSDConfig
from masksd.correlation import CorrelationFilter, prediction_scores, spread_scores, token_scores
from tests.toys import CoarseToy, NoJointSpace, ToyViT, colour_task


class FixedPrediction(nn.Module):
    """A decode head whose logits are a fixed map (plus a zero-weighted dependence on the features, so gradients flow)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("fixed", logits)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        return self.fixed + self.scale * visual.context.mean() * text.pooled.mean()


class GridViT(ToyViT):
    def embed_image(self, images):
        embedded = super().embed_image(images)
        return Embeddings(embedded.tokens, grid=(self.grid, self.grid))


def oracle_batch():
    """A 16x16 prediction of 4 images, high over a different set of the 4x4 token cells in each."""
    images, ids, masks = colour_task(4, seed=1)
    cells = [[0, 5, 10, 15], [1, 2, 3, 4], [12, 13, 14, 15], [6, 7, 9, 10]]
    on = torch.zeros(4, 16, dtype=torch.bool)
    for b, chosen in enumerate(cells):
        on[b, chosen] = True
    logits = torch.where(on.view(4, 1, 4, 4), 6.0, -6.0).repeat_interleave(4, 2).repeat_interleave(4, 3)  # (4, 1, 16, 16)
    logits = logits + 0.1 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))  # pooling must see through noise
    return images, ids, masks, logits, on


def test_prediction_guidance_keeps_the_patches_under_the_predicted_mask():
    images, ids, masks, logits, on = oracle_batch()
    segmenter = GridViT()
    segmenter.decode_head = FixedPrediction(logits)
    config = MaskSDConfig(lmvsd=BranchConfig(guidance="prediction", top_k=0.25, ratio=1.0), vmlsd=BranchConfig(enabled=False))
    out = MaskSD(segmenter, config).train()(images, ids, masks, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.image_masked, on)  # exactly the 4 cells under the predicted mask, in every image
    bottom = MaskSDConfig(lmvsd=BranchConfig(guidance="prediction", top_k=0.75, ratio=1.0, select="bottom"), vmlsd=BranchConfig(enabled=False))
    assert torch.equal(MaskSD(segmenter, bottom).train()(images, ids, masks).image_masked, ~on)


def test_prediction_scores_pool_the_detached_sigmoid_onto_the_grid():
    logits = torch.randn(2, 1, 8, 12, requires_grad=True)
    scores = prediction_scores(logits, (2, 3))
    assert scores.shape == (2, 6) and not scores.requires_grad
    torch.testing.assert_close(scores[:, 0], torch.sigmoid(logits[:, 0, :4, :4]).mean(dim=(1, 2)).detach())


def test_prediction_guidance_needs_a_grid_and_is_lmvsds_alone():
    images, ids, masks, logits, _ = oracle_batch()
    segmenter = ToyViT()  # declares no Embeddings.grid
    config = MaskSDConfig(lmvsd=BranchConfig(guidance="prediction"))
    with pytest.raises(ValueError, match=r"lmvsd.guidance='prediction' pools .* Embeddings\(\.\.\., grid=\(h, w\)\)"):
        MaskSD(segmenter, config).train()(images, ids, masks)
    with pytest.raises(ValueError, match="vmlsd.guidance='prediction' is LMVSD's"):
        MaskSDConfig(vmlsd=BranchConfig(guidance="prediction"))


@pytest.mark.parametrize("top_k", [1.0, 0.5])
def test_k_1_needs_no_joint_space_and_other_k_names_what_is_missing(top_k):
    images, ids, masks = colour_task(4, seed=1)
    config = MaskSDConfig(lmvsd=BranchConfig(top_k=top_k), vmlsd=BranchConfig(top_k=top_k))
    model = MaskSD(NoJointSpace(), config).train()  # widths 24 and 12, Features.tokens and pooled None
    if top_k == 1.0:
        out = model(images, ids, masks, generator=torch.Generator().manual_seed(0))
        assert out.image_masked.sum(dim=1).tolist() == [4] * 4  # round(0.25 * 16): every patch was a candidate
        assert torch.equal(out.text_masked.sum(dim=1), torch.ones(4, dtype=torch.long))  # one word each
        out.loss.backward()
        assert all(model.branches[n].masker.mask_token.grad.abs().sum() > 0 for n in ("lmvsd", "vmlsd"))
    else:
        with pytest.raises(ValueError, match=r"lmvsd.guidance='joint' .* no visual Features.tokens: .*'prediction' or 'segmenter'"):
            model(images, ids, masks)


def test_k_1_works_with_unequal_joint_dims_which_other_k_refuses():
    class Unequal(ToyViT):
        def __init__(self):
            super().__init__()
            self.text_proj = nn.Linear(32, 20, bias=False)  # joint dims 24 (image) and 20 (text)
            self.decode_head.sentence = nn.Linear(20, 32)

    images, ids, masks = colour_task(4, seed=1)
    one = MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0))
    assert torch.isfinite(MaskSD(Unequal(), one).train()(images, ids, masks).loss)
    with pytest.raises(ValueError, match=r"lmvsd.guidance='joint' needs .*equal D\), got visual D=24 and text D=20"):
        MaskSD(Unequal()).train()(images, ids, masks)


def test_k_1_reads_no_score(monkeypatch):
    """At K = 1 the filter is bypassed: no token_scores, no select."""
    images, ids, masks = colour_task(4, seed=1)
    calls = []
    monkeypatch.setattr(CorrelationFilter, "select_scores", lambda *a, **k: calls.append(1))
    one = MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0))
    MaskSD(ToyViT(), one).train()(images, ids, masks)
    assert calls == []


def test_coarse_features_spread_their_correlation_to_the_tokens_each_cell_covers():
    images, ids, masks = colour_task(4, seed=1)
    torch.manual_seed(0)
    segmenter = CoarseToy()
    config = MaskSDConfig(lmvsd=BranchConfig(top_k=0.25, ratio=1.0), vmlsd=BranchConfig(enabled=False))
    model = MaskSD(segmenter, config).train()
    out = model(images, ids, masks)
    with torch.no_grad():
        visual = segmenter.encode_image(segmenter.embed_image(images))
        text = segmenter.encode_text(segmenter.embed_text(ids))
    coarse = token_scores(text.pooled, visual.tokens)  # (B, 16) on the 4x4 grid
    top4 = torch.zeros(4, 16, dtype=torch.bool).scatter(1, coarse.topk(4, dim=1).indices, True)
    expected = top4.view(4, 4, 1, 4, 1).expand(4, 4, 2, 4, 2).reshape(4, 64)  # each coarse cell covers 2x2 tokens
    assert torch.equal(out.image_masked, expected)


def test_segmenter_relevance_on_a_coarse_grid_and_per_word():
    images, ids, masks = colour_task(4, seed=1)
    torch.manual_seed(0)
    segmenter = CoarseToy()
    config = MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter", top_k=0.25, ratio=1.0),
                          vmlsd=BranchConfig(guidance="segmenter", top_k=0.5, ratio=1.0))
    out = MaskSD(segmenter, config).train()(images, ids, masks)
    with torch.no_grad():
        visual = segmenter.encode_image(segmenter.embed_image(images))
        text = segmenter.encode_text(segmenter.embed_text(ids))
    relevance = segmenter.relevance("lmvsd", visual, text).flatten(1)  # (B, 16)
    top4 = torch.zeros(4, 16, dtype=torch.bool).scatter(1, relevance.topk(4, dim=1).indices, True)
    assert torch.equal(out.image_masked, top4.view(4, 4, 1, 4, 1).expand(4, 4, 2, 4, 2).reshape(4, 64))
    words = segmenter.relevance("vmlsd", visual, text).masked_fill(ids == 0, -1).masked_fill((ids == 1) | (ids == 2), -1)
    assert torch.equal(out.text_masked, words == words.max(dim=1, keepdim=True).values)  # ceil(0.5 * 1 word) = 1


def test_a_segmenter_without_relevance_or_with_misaligned_relevance_is_refused_by_name():
    with pytest.raises(TypeError, match=r"lmvsd.guidance='segmenter' needs segmenter.relevance.*ToyViT lacks.*adapter"):
        MaskSD(ToyViT(), MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter")))
    MaskSD(ToyViT(), MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter", top_k=1.0)))  # K = 1 reads no relevance

    class Misaligned(CoarseToy):
        def relevance(self, branch, visual, text):
            return visual.context.mean(dim=1)[:, :3]  # (B, 3, 4): tiles no 8x8 grid

    images, ids, masks = colour_task(4, seed=1)
    with pytest.raises(ValueError, match=r"segmenter.relevance\('lmvsd', ...\) relevance grid \(3, 4\) does not tile .* \(8, 8\)"):
        MaskSD(Misaligned(), MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter"))).train()(images, ids, masks)


def test_features_on_another_grid_must_declare_both_grids_that_tile():
    from masksd.adapter import check_features

    embedded = Embeddings(torch.zeros(2, 64, 4), grid=(8, 8))
    check_features(Features(torch.zeros(2, 16, 3), torch.zeros(2, 3), grid=(4, 4)), embedded, "encode_image")
    with pytest.raises(ValueError, match=r"encode_image gives tokens on another grid .* declare both grids"):
        check_features(Features(torch.zeros(2, 16, 3), torch.zeros(2, 3)), embedded, "encode_image")
    with pytest.raises(ValueError, match=r"grid \(3, 3\) does not tile the embeddings' grid \(8, 8\)"):
        check_features(Features(torch.zeros(2, 9, 3), torch.zeros(2, 3), grid=(3, 3)), embedded, "encode_image")
    with pytest.raises(ValueError, match=r"grid \(4, 4\) has 16 positions for N=10 tokens"):
        from masksd.adapter import check_embeddings

        check_embeddings(Embeddings(torch.zeros(2, 10, 4), grid=(4, 4)), 4, "embed_image")


@settings(max_examples=40, deadline=None)
@given(hc=st.integers(1, 4), wc=st.integers(1, 4), ph=st.integers(1, 3), pw=st.integers(1, 3), batch=st.integers(1, 3))
def test_spread_scores_gives_each_fine_token_its_covering_cells_score(hc, wc, ph, pw, batch):
    scores = torch.randn(batch, hc * wc)
    fine = spread_scores(scores, (hc, wc), (hc * ph, wc * pw)).view(batch, hc * ph, wc * pw)
    for i in range(hc * ph):
        for j in range(wc * pw):
            assert torch.equal(fine[:, i, j], scores[:, (i // ph) * wc + j // pw])
    assert torch.equal(spread_scores(scores.view(batch, hc, wc), (hc, wc), (hc * ph, wc * pw)).view_as(fine), fine)
