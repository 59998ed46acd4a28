"""Fused encoders (issue 26, item 1): a segmenter whose encoders read each other implements one ``encode``; MaskSD
re-runs it per branch with only that branch's modality masked, and verify_segmenter catches the stateful shortcut."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch import nn

from masksd import BranchConfig, Features, MaskSD, MaskSDConfig, bare_state_dict, verify_segmenter
from masksd.adapter import is_fused
from masksd.verify import SegmenterCheckError
from tests.toys import EOT, FusedToy, ToyViT, colour_task


def recording(segmenter: FusedToy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the (image tokens, text tokens) each call of ``segmenter.encode`` receives."""
    calls = []
    encode = segmenter.encode

    def spy(image_embedded, text_embedded):
        calls.append((image_embedded.tokens.detach().clone(), text_embedded.tokens.detach().clone()))
        return encode(image_embedded, text_embedded)

    segmenter.encode = spy
    return calls


def test_a_fused_adapter_is_told_apart_from_towers():
    assert is_fused(FusedToy()) and not is_fused(ToyViT())

    class Plain(nn.Module):  # not a SegmenterAdapter: encode and no encode_image/encode_text
        def encode(self, ie, te): ...

    class Both(Plain):
        def encode_image(self, e): ...

        def encode_text(self, e): ...

    assert is_fused(Plain()) and not is_fused(Both())


def test_each_fused_branch_reencodes_with_only_its_own_modality_masked():
    images, ids, masks = colour_task(4, seed=1)
    torch.manual_seed(0)
    model = MaskSD(FusedToy()).train()
    calls = recording(model.segmenter)
    out = model(images, ids, masks, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3  # main, LMVSD, VMLSD
    (image, text), (lmvsd_image, lmvsd_text), (vmlsd_image, vmlsd_text) = calls
    token = lambda name: model.branches[name].masker.mask_token.detach()  # noqa: E731
    # LMVSD: the image differs exactly at the masked patches, which hold the mask token; the text is the main pass's
    assert out.image_masked.any() and torch.equal((lmvsd_image != image).any(-1), out.image_masked)
    assert torch.equal(lmvsd_image[out.image_masked], token("lmvsd").expand(int(out.image_masked.sum()), -1))
    assert torch.equal(lmvsd_text, text)
    # VMLSD: the words differ exactly at the masked words; the image is the main pass's, unmasked
    assert out.text_masked.any() and torch.equal((vmlsd_text != text).any(-1), out.text_masked)
    assert torch.equal(vmlsd_text[out.text_masked], token("vmlsd").expand(int(out.text_masked.sum()), -1))
    assert torch.equal(vmlsd_image, image)
    out.loss.backward()
    assert all(model.branches[n].masker.mask_token.grad.abs().sum() > 0 for n in ("lmvsd", "vmlsd"))


def test_a_fused_segmenter_embeds_once_encodes_three_times_and_decodes_three_times():
    images, ids, masks = colour_task(4, seed=1)
    model = MaskSD(FusedToy()).train()
    calls = Counter()
    for name in ("embed_image", "embed_text", "encode"):
        method = getattr(model.segmenter, name)
        setattr(model.segmenter, name, lambda *a, _m=method, _n=name: (calls.update([_n]), _m(*a))[1])
    model.segmenter.decode_head.register_forward_pre_hook(lambda *_: calls.update(["decode"]))
    model(images, ids, masks)
    assert calls == {"embed_image": 1, "embed_text": 1, "encode": 3, "decode": 3}


@pytest.mark.parametrize("config", [MaskSDConfig(), MaskSDConfig(share_weights=False), MaskSDConfig.maskris(lmvsd=BranchConfig.lmvsd(top_k=1.0, ratio=0.75), vmlsd=BranchConfig.vmlsd(top_k=1.0))],
                         ids=["paper", "separate-heads", "combined-view"])
def test_fused_eval_output_is_the_bare_forward_exactly_after_training(config):
    images, ids, masks = colour_task(4, seed=1)
    torch.manual_seed(0)
    segmenter = FusedToy()
    initial = copy.deepcopy(segmenter.state_dict())
    model = MaskSD(segmenter, config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(images, ids, masks).loss.backward()
        optimizer.step()
    # a fresh bare model with the trained weights (what an exported checkpoint gives) computes the eval output
    bare = FusedToy().eval()
    bare.load_state_dict(bare_state_dict(model.state_dict()))
    assert not torch.equal(bare.fuse.weight, initial["fuse.weight"])  # the fused encoder trained
    with torch.no_grad():
        assert torch.equal(model.eval()(images, ids), bare(images, ids))
        expected = segmenter.decode_head(*segmenter.encode(segmenter.embed_image(images), segmenter.embed_text(ids)))
        assert torch.equal(segmenter(images, ids), expected)


def test_a_fused_segmenter_passes_verify_segmenter():
    torch.manual_seed(0)
    images, ids, _ = colour_task(4)
    ids[:, 2], ids[:, 3] = 3, EOT  # two words, so that a repeated word is checked
    segmenter = FusedToy()
    segmenter.image_proj.requires_grad_(False), segmenter.text_proj.requires_grad_(False)  # feed only the correlation
    report = verify_segmenter(segmenter, images, ids)
    checks = {c.name: c for c in report.checks}
    assert "fused: encode" in checks["protocol"].detail and "decode_head(*encode(" in checks["composition"].detail
    assert "lmvsd: unchanged under other pixels" in checks["leak"].detail and "vmlsd: unchanged under other word ids" in checks["leak"].detail


class LeakyCache(ToyViT):
    """LAVT forced into the towers protocol by a cache: embed_text keeps the sentence, encode_image fuses it into the
    visual map. The main pass's visual features, reused by VMLSD, were built from the unmasked words."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(self.text_embed_dim, self.text_embed_dim)
        self.image_proj.requires_grad_(False)

    def embed_text(self, ids):
        embedded = super().embed_text(ids)
        self.sentence = embedded.tokens.mean(dim=1)  # cached from the main pass: the unmasked sentence
        return embedded

    def encode_image(self, embedded):
        visual = super().encode_image(embedded)
        return replace(visual, context=visual.context * torch.sigmoid(self.gate(self.sentence))[:, :, None, None])


def test_verify_names_the_leak_of_a_stateful_adapter_that_caches_the_sentence():
    torch.manual_seed(0)
    images, ids, _ = colour_task(4)
    ids[:, 2], ids[:, 3] = 4, EOT
    with pytest.raises(SegmenterCheckError) as error:
        verify_segmenter(LeakyCache(), images, ids)
    assert error.value.check == "leak"
    assert "VMLSD view's output changed" in str(error.value) and "only the unmasked text of the main pass" in str(error.value)
    assert "FusedSegmenter" in str(error.value)
    # the same model without the cache (fused: encode reads both) passes the leak check
    honest = ToyViT()
    honest.image_proj.requires_grad_(False)
    assert [c.passed for c in verify_segmenter(honest, images, ids).checks if c.name == "leak"] == [True]


def test_the_leak_check_shifts_embeddings_where_texts_carry_no_ids_and_says_so():
    class DictTexts(ToyViT):
        def embed_text(self, texts):
            return super().embed_text(texts["ids"])

    torch.manual_seed(0)
    images, ids, _ = colour_task(4)
    segmenter = DictTexts()
    segmenter.image_proj.requires_grad_(False)
    leak = [c for c in verify_segmenter(segmenter, images, {"ids": ids}).checks if c.name == "leak"]
    assert leak[0].passed and "other pixels" in leak[0].detail and "shifted embeddings" in leak[0].detail


def test_a_fused_segmenter_lacking_a_member_is_refused_with_the_fused_protocol_named():
    class Half(nn.Module):
        image_embed_dim = text_embed_dim = 4
        decode_head = nn.Identity()

        def embed_image(self, x): ...

        def encode(self, ie, te): ...

    with pytest.raises(TypeError, match=r"does not implement masksd.FusedSegmenter; missing: \['embed_text'\].*write an adapter"):
        MaskSD(Half())


def test_features_are_optional_in_a_fused_model_at_k_1():
    class NoFeatures(FusedToy):
        def encode(self, ie, te):
            visual, text = super().encode(ie, te)
            return Features(None, None, visual.context), Features(None, None, text.context)

    images, ids, masks = colour_task(4, seed=1)
    one = MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0))
    out = MaskSD(NoFeatures(), one).train()(images, ids, masks)
    assert out.image_masked.sum() == 4 * 4 and torch.isfinite(out.loss)  # round(0.25 * 16) per image
    with pytest.raises(ValueError, match=r"lmvsd.guidance='joint' .* gives no visual Features.tokens"):
        MaskSD(NoFeatures()).train()(images, ids, masks)
