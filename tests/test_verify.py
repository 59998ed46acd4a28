"""verify_segmenter's checks for issue 26: conv-stem borders told apart from a position embedding, relevance grids,
the joint-space warning, and refusals that point to writing an adapter (the leak check: tests/test_fused.py)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from einops import rearrange
from torch import nn

from masksd import BranchConfig, Embeddings, Features, MaskSDConfig, verify_segmenter
from masksd.verify import SegmenterCheckError
from tests.toys import EOT, CoarseToy, FusedToy, PlainRIS, ToyViT, colour_task


def toy_batch():
    images, ids, _ = colour_task(4)
    ids[:, 2], ids[:, 3] = 3, EOT  # two words per text, so that a repeated word is checked
    return images, ids


class ConvStem(ToyViT):
    """A two-layer conv stem (RN50's is three) before the transformer: on a flat image the first conv gives a
    constant map, and the second conv's zero padding changes the border cells."""

    def __init__(self, position_first: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1))
        self.position_first = position_first
        self.image_proj.requires_grad_(False)
        del self.patch

    def embed_image(self, images):
        tokens = rearrange(self.stem(images), "b c h w -> b (h w) c")  # (B, 16, 32) on a 4x4 grid
        if self.position_first:  # the mistake: the position embedding before the mask token
            tokens = tokens + self.image_pos[1:]
        return Embeddings(tokens, grid=(4, 4))


def test_embedding_level_passes_a_conv_stems_padded_border_and_says_so():
    torch.manual_seed(0)
    images, ids = toy_batch()
    segmenter = ConvStem()
    with torch.no_grad():
        flat = segmenter.embed_image(torch.zeros(1, 3, 16, 16)).tokens[0].view(4, 4, -1)
    assert not torch.allclose(flat[0, 0], flat[1, 1])  # the border differs, as the old check refused
    check = next(c for c in verify_segmenter(segmenter, images, ids).checks if c.name == "embedding_level")
    assert check.passed and "all but the 1-cell border band" in check.detail and "4x4 grid" in check.detail


def test_embedding_level_still_names_a_position_embedding_added_before_masking_with_a_conv_stem():
    torch.manual_seed(0)
    with pytest.raises(SegmenterCheckError) as error:
        verify_segmenter(ConvStem(position_first=True), *toy_batch())
    assert error.value.check == "embedding_level"
    assert "also away from the image borders" in str(error.value) and "position embedding" in str(error.value)


def test_embedding_level_without_a_grid_refuses_any_difference_and_says_a_grid_would_help():
    class NoGrid(ConvStem):
        def embed_image(self, images):
            embedded = super().embed_image(images)  # candidates given: the tokens may hold a class token, so no grid is assumed
            return Embeddings(embedded.tokens, candidates=torch.ones(embedded.tokens.shape[:2], dtype=torch.bool))

    torch.manual_seed(0)
    with pytest.raises(SegmenterCheckError, match=r"declares no Embeddings.grid on which a conv stem's border cells"):
        verify_segmenter(NoGrid(), *toy_batch())


class Aligned(FusedToy):
    """A joint space by construction: the sentence's pooled feature is its image's (plus a little of the words)."""

    sign = 1.0

    def encode(self, ie, te):
        visual, text = super().encode(ie, te)
        return visual, replace(text, pooled=self.sign * visual.pooled + 0.01 * text.pooled)


class Unrelated(Aligned):
    sign = -1.0  # matched pairs are the least alike: what two unrelated 24-d spaces look like at their worst


def frozen(segmenter):
    segmenter.image_proj.requires_grad_(False), segmenter.text_proj.requires_grad_(False)
    return segmenter


def test_joint_guidance_on_a_batch_without_alignment_warns_once_and_says_so_in_the_report():
    torch.manual_seed(0)
    images, ids = toy_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned = verify_segmenter(frozen(Aligned()), images, ids)
    assert aligned.warnings == [] and not [w for w in caught if "guidance='joint'" in str(w.message)]
    assert "rank in the joint space" in next(c.detail for c in aligned.checks if c.name == "joint_space")
    with pytest.warns(UserWarning, match=r"guidance='joint' \(lmvsd, vmlsd\) .* matched pairs are no closer than mismatched"):
        report = verify_segmenter(frozen(Unrelated()), images, ids)
    assert report.warnings == ["joint_space"] and "warn  joint_space" in str(report) and report.skipped == ["reference", "special_tokens"]
    # the same model ranked by its prediction, or not ranked (K = 1), gets no joint-space check at all
    off = MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0))
    assert "joint_space" not in [c.name for c in verify_segmenter(frozen(Unrelated()), images, ids, config=off).checks]


def test_joint_guidance_with_unequal_dims_fails_the_joint_space_check_by_name():
    class Unequal(Aligned):
        def encode(self, ie, te):
            visual, text = super().encode(ie, te)
            return visual, replace(text, tokens=text.tokens[..., :20], pooled=text.pooled[..., :20])

    torch.manual_seed(0)
    with pytest.raises(SegmenterCheckError) as error:
        verify_segmenter(frozen(Unequal()), *toy_batch())
    assert error.value.check == "joint_space" and "visual D=24 and text D=20" in str(error.value)


def test_relevance_grids_are_checked_against_the_tokens():
    torch.manual_seed(0)
    images, ids = toy_batch()
    config = MaskSDConfig(lmvsd=BranchConfig(guidance="segmenter"), vmlsd=BranchConfig(guidance="segmenter"))
    segmenter = CoarseToy()
    segmenter.image_proj.requires_grad_(False)
    check = next(c for c in verify_segmenter(segmenter, images, ids, config=config).checks if c.name == "relevance")
    assert check.passed and "lmvsd (4, 64)" in check.detail and "vmlsd (4, 6)" in check.detail

    class WrongWords(CoarseToy):
        def relevance(self, branch, visual, text):
            return super().relevance(branch, visual, text)[:, :4] if branch == "vmlsd" else super().relevance(branch, visual, text)

    with pytest.raises(SegmenterCheckError, match=r"check 'relevance' failed: segmenter.relevance\('vmlsd', ...\) must return float scores \(B, N\)=\(4, 6\)"):
        verify_segmenter(WrongWords(), images, ids, config=config)


def test_a_model_without_the_protocol_is_refused_with_the_way_to_write_an_adapter():
    images, ids = toy_batch()
    with pytest.raises(SegmenterCheckError) as error:
        verify_segmenter(PlainRIS(), images, ids)
    assert error.value.check == "protocol"
    message = str(error.value)
    assert "missing: ['image_embed_dim'" in message and "subclass masksd.SegmenterAdapter" in message
    assert "site='input'" in message and "docs/integrations.md" in message


def test_features_without_tokens_or_pooled_pass_verify_at_k_1():
    class NoFeatures(FusedToy):
        def encode(self, ie, te):
            visual, text = super().encode(ie, te)
            return Features(None, None, visual.context), Features(None, None, text.context)

    torch.manual_seed(0)
    segmenter = NoFeatures()
    segmenter.image_proj.requires_grad_(False), segmenter.text_proj.requires_grad_(False)  # unused without features
    off = MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0))
    report = verify_segmenter(segmenter, *toy_batch(), config=off)
    assert "image (4, 16, 32) -> None" in next(c.detail for c in report.checks if c.name == "shapes")
    assert [c.name for c in report.checks if c.name == "mask_token_gradient" and c.passed] == ["mask_token_gradient"] * 2
