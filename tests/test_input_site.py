"""Masking at the inputs (issue 26, item 3): pixel patches and word ids replaced as MaskRIS does, the combined view,
the maskris preset as published, and a plain ``forward(images, token_ids)`` model trained with no adapter."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from masksd import BranchConfig, InputSpec, MaskSD, MaskSDConfig, verify_segmenter
from masksd.masking import PixelPatchMasker, WordIdMasker, choose_masked, mask_counts
from tests.toys import PlainRIS, ToyViT, colour_task

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "cube", "a", "small", "ball", "on", "left", "blue"]
SENTENCES = ["the red cube", "a small blue ball on the left", "the left cube", "a ball"]


def bert_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def plain_batch(seed: int = 0):
    tokens = bert_tokenizer()(SENTENCES, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 64, 64, generator=g), tokens["input_ids"], (torch.rand(4, 1, 64, 64, generator=g) > 0.5).float()


# -- the maskers ---------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(height=st.integers(8, 40), width=st.integers(8, 40), patch=st.sampled_from([4, 8, 16]), ratio=st.floats(0, 1), seed=st.integers(0, 99))
def test_pixel_masking_fills_exactly_the_chosen_patches(height, width, patch, ratio, seed):
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed)) + 5.0  # no pixel equals the fill
    masker = PixelPatchMasker(patch, fill=0.0, ratio=ratio)
    masked, applied = masker.mask(pixels, generator=torch.Generator().manual_seed(seed))
    gh, gw = -(-height // patch), -(-width // patch)
    assert applied.shape == (2, gh * gw) and torch.equal(applied.sum(dim=1), mask_counts(ratio, torch.full((2,), gh * gw)))
    for b in range(2):
        for k in range(gh * gw):
            rows = slice((k // gw) * patch, (k // gw + 1) * patch)
            cols = slice((k % gw) * patch, (k % gw + 1) * patch)
            expected = torch.zeros_like(pixels[b, :, rows, cols]) if applied[b, k] else pixels[b, :, rows, cols]
            assert torch.equal(masked[b, :, rows, cols], expected)


@pytest.mark.parametrize("side", range(1, 41))
def test_the_count_draw_at_three_quarters_is_maskris_keep_count_on_square_grids(side):
    """MaskRIS keeps int(L * (1 - 0.75)) patches of L; round(0.75 L) (halves up) masks the rest on every square grid."""
    n = side * side
    assert int(mask_counts(0.75, torch.tensor([n]))) == n - int(n * (1 - 0.75))


def test_word_masking_changes_exactly_the_drawn_words_and_never_a_special_or_padding():
    ids = torch.tensor([[2, 5, 6, 7, 3, 0, 0], [2, 8, 9, 13, 10, 3, 0]])
    candidates = (ids > 4)  # not [PAD] [UNK] [CLS] [SEP] [MASK]
    masker = WordIdMasker(mask_token_id=4, vocab_size=14, replacement=(1.0, 0.0), ratio=0.5, min_count=1)
    new, drawn = masker.mask(ids, candidates, torch.Generator().manual_seed(0))
    assert torch.equal(new != ids, drawn) and bool((new[drawn] == 4).all()) and not bool((drawn & ~candidates).any())
    assert drawn.sum(dim=1).tolist() == [2, 2]  # round(0.5 * 3) halves up, round(0.5 * 4)


def test_word_replacement_is_80_10_10_on_a_large_draw():
    ids = torch.randint(10, 30000, (400, 500), generator=torch.Generator().manual_seed(1))
    masker = WordIdMasker(mask_token_id=3, vocab_size=30522, replacement=(0.8, 0.1), ratio=0.15, draw="bernoulli")
    new, drawn = masker.mask(ids, torch.ones_like(ids, dtype=torch.bool), torch.Generator().manual_seed(2))
    n = int(drawn.sum())
    assert abs(n / ids.numel() - 0.15) < 0.003  # each word with probability 0.15
    to_mask, kept = int((new[drawn] == 3).sum()) / n, int((new[drawn] == ids[drawn]).sum()) / n
    to_random = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.01 and abs(to_random - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    assert torch.equal(new[~drawn], ids[~drawn]) and int(new.max()) < 30522


def test_random_replacement_words_are_uniform_over_the_vocabulary_without_its_special_ids():
    """A random [SEP]/[PAD] (or CLIP's end-of-text id, where CLIP pools) mid-sentence would change its structure."""
    special = (0, 3, 4, 9)  # scattered, so that stepping past each one is tested
    ids = torch.full((200, 100), 5)
    masker = WordIdMasker(mask_token_id=4, vocab_size=12, replacement=(0.0, 1.0), ratio=1.0, special_ids=special + (40,))
    new, drawn = masker.mask(ids, torch.ones_like(ids, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert bool(drawn.all()) and not bool(torch.isin(new, torch.tensor(special)).any()) and int(new.max()) < 12
    counts = torch.bincount(new.flatten(), minlength=12)[[1, 2, 5, 6, 7, 8, 10, 11]].double()  # the 8 other ids
    assert bool((counts / counts.mean() - 1).abs().max() < 0.1)  # each about 20000 / 8 = 2500 times
    with pytest.raises(ValueError, match="vocab_size must leave a word that is not special"):
        WordIdMasker(mask_token_id=0, vocab_size=2, replacement=(0.8, 0.1), ratio=0.15, special_ids=(0, 1))


def test_the_input_site_draws_no_special_id_as_a_random_word():
    images, ids, masks = plain_batch()
    spec = InputSpec.from_tokenizer(bert_tokenizer(), patch_size=16, word_replacement=(0.0, 1.0))
    config = MaskSDConfig.maskris(lmvsd=BranchConfig(enabled=False), vmlsd=BranchConfig.vmlsd(site="input", top_k=1.0, ratio=1.0))
    model = MaskSD(PlainRIS(vocab=len(WORDS)), config, inputs=spec).train()
    seen = []
    model.segmenter.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    for seed in range(20):  # 20 draws of the 17 words among 9 non-special ids: a special id would show up
        model(images, ids, masks, generator=torch.Generator().manual_seed(seed))
    for view in seen[1::2]:
        assert not bool((torch.isin(view, torch.tensor(spec.special_token_ids)) & (view != ids)).any())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 12), ratio=st.floats(0, 1), min_count=st.integers(0, 4), seed=st.integers(0, 99))
def test_bernoulli_draw_masks_only_candidates_and_at_least_min_count(n, ratio, min_count, seed):
    candidates = torch.zeros(3, 12, dtype=torch.bool)
    candidates[:, :n] = True
    chosen = choose_masked(candidates, ratio, min_count, torch.Generator().manual_seed(seed), draw="bernoulli")
    assert not bool((chosen & ~candidates).any())
    if ratio > 0:
        assert bool((chosen.sum(dim=1) >= min(min_count, n)).all())
    else:
        assert not bool(chosen.any())
    if ratio == 1:
        assert torch.equal(chosen, candidates)


# -- InputSpec ------------------------------------------------------------------------------------------------------


def test_input_spec_from_a_bert_and_an_open_clip_tokenizer():
    import open_clip

    spec = InputSpec.from_tokenizer(bert_tokenizer())
    assert (spec.mask_token_id, spec.vocab_size, spec.special_token_ids, spec.patch_size) == (4, 14, (0, 1, 2, 3, 4), 32)
    clip = InputSpec.from_tokenizer(open_clip.get_tokenizer("ViT-B-32"), patch_size=16)
    assert clip.mask_token_id is None and clip.special_token_ids == (0, 49406, 49407) and clip.patch_size == 16
    with pytest.raises(TypeError, match="tokenizer must be a transformers or open_clip tokenizer"):
        InputSpec.from_tokenizer(object())
    with pytest.raises(ValueError, match="word_replacement shares must add up to at most 1"):
        InputSpec(word_replacement=(0.8, 0.3))


def test_a_mapping_of_ids_excludes_padding_by_its_attention_mask():
    tokens = bert_tokenizer()(SENTENCES, padding=True, return_tensors="pt")
    spec = InputSpec(special_token_ids=(2, 3))  # padding (0) not listed: the attention mask excludes it
    words = spec.word_candidates(tokens)
    assert torch.equal(words, (tokens["input_ids"] > 4))
    changed = spec.with_ids(tokens, tokens["input_ids"] + 1)
    assert type(changed) is type(tokens) and torch.equal(changed["input_ids"], tokens["input_ids"] + 1)
    assert torch.equal(tokens["input_ids"], bert_tokenizer()(SENTENCES, padding=True, return_tensors="pt")["input_ids"])


# -- MaskSD at the input site ---------------------------------------------------------------------------------------


def counting(model: nn.Module) -> tuple[Counter, list]:
    """Count forward calls of ``model`` and record the (images, ids) each receives."""
    calls, seen = Counter(), []
    model.register_forward_pre_hook(lambda m, args: (calls.update(["forward"]), seen.append(tuple(a.clone() for a in args))) and None)
    return calls, seen


def test_a_plain_model_trains_with_maskris_in_three_lines_and_the_combined_view_runs_one_extra_pass():
    images, ids, masks = plain_batch()
    torch.manual_seed(0)
    my_model, tokenizer = PlainRIS(vocab=len(WORDS)), bert_tokenizer()
    calls, seen = counting(my_model)
    # the three lines
    model = MaskSD(my_model, MaskSDConfig.maskris(), inputs=InputSpec.from_tokenizer(tokenizer, patch_size=16))
    out = model.train()(images, ids, masks, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert calls["forward"] == 2 and out.combined_loss is not None and out.lmvsd_loss is None and out.vmlsd_loss is None
    torch.testing.assert_close(out.loss, out.seg_loss + out.combined_loss)
    (main_images, main_ids), (view_images, view_ids) = seen
    assert torch.equal(main_images, images) and torch.equal(main_ids, ids)
    # the combined view: 75 % of the 16 patches of 16 px zero-filled (12 of 16), the drawn words replaced, both at once
    assert out.image_masked.sum(dim=1).tolist() == [12] * 4
    cover = out.image_masked.view(4, 1, 4, 1, 4, 1).expand(4, 1, 4, 16, 4, 16).reshape(4, 1, 64, 64)
    assert torch.equal(view_images, torch.where(cover, 0.0, images))
    assert not bool(((view_ids != ids) & ~out.text_masked).any()) and not bool((out.text_masked & (ids <= 4)).any())
    assert all(p.grad is not None for p in my_model.parameters())
    with torch.no_grad():
        assert torch.equal(model.eval()(images, ids), my_model(images, ids))


def test_the_separate_views_at_the_input_site_run_one_pass_each_with_one_modality_masked():
    images, ids, masks = plain_batch()
    my_model = PlainRIS(vocab=len(WORDS))
    calls, seen = counting(my_model)
    config = MaskSDConfig.maskris(views="separate", vmlsd=BranchConfig.vmlsd(site="input", top_k=1.0, ratio=0.5, min_masked=1))
    spec = InputSpec.from_tokenizer(bert_tokenizer(), patch_size=16, word_replacement=(1.0, 0.0))
    out = MaskSD(my_model, config, inputs=spec).train()(images, ids, masks)
    assert calls["forward"] == 3 and out.lmvsd_loss is not None and out.vmlsd_loss is not None and out.combined_loss is None
    (_, _), (lmvsd_images, lmvsd_ids), (vmlsd_images, vmlsd_ids) = seen
    assert torch.equal(lmvsd_ids, ids) and not torch.equal(lmvsd_images, images)
    assert torch.equal(vmlsd_images, images) and torch.equal(vmlsd_ids != ids, out.text_masked)
    assert bool((vmlsd_ids[out.text_masked] == 4).all())


def test_prediction_guidance_at_the_input_site_masks_the_pixel_patches_under_the_prediction():
    class Fixed(PlainRIS):
        def forward(self, images, token_ids):
            on = torch.zeros(4, 1, 4, 4)
            on[0, :, :2, :2] = on[1, :, 2:, 2:] = on[2, :, :, :1] = on[3, :, 1:3, 1:3] = 1
            return 12 * on - 6 + 0 * super().forward(images, token_ids).mean()

    images, ids, masks = plain_batch()
    config = MaskSDConfig(lmvsd=BranchConfig(site="input", guidance="prediction", top_k=0.25, ratio=1.0), vmlsd=BranchConfig(enabled=False))
    out = MaskSD(Fixed(vocab=len(WORDS)), config, inputs=InputSpec(patch_size=16)).train()(images, ids, masks)
    on = Fixed(vocab=len(WORDS))(images, ids) > 0
    assert torch.equal(out.image_masked, on.flatten(1))


def test_prediction_guidance_scores_a_cut_pixel_patch_by_the_pixels_on_it():
    """40-px images in 16-px patches: the last row of patches is 8 px tall. The prediction is sure on those 8 px and
    mildly positive (0.6) on the first patch row: the cut row ranks first (an even 3-way split of the 40 px would
    mix the cut row with 6 px of background and rank the first row above it)."""
    class Fixed(PlainRIS):
        def forward(self, images, token_ids):
            logits = torch.full((images.shape[0], 1, 40, 40), -6.0)
            logits[:, :, :16] = math.log(0.6 / 0.4)
            logits[:, :, 32:] = 6.0
            return logits + 0 * super().forward(images, token_ids).mean()

    images, ids, masks = torch.randn(2, 3, 40, 40), plain_batch()[1][:2], torch.ones(2, 1, 40, 40)
    config = MaskSDConfig(lmvsd=BranchConfig(site="input", guidance="prediction", top_k=1 / 3, ratio=1.0), vmlsd=BranchConfig(enabled=False))
    model = MaskSD(Fixed(vocab=len(WORDS)), config, inputs=InputSpec(patch_size=16)).train()
    out = model(images, ids, masks)
    assert model.image_grid(images) == (3, 3) and out.image_masked.nonzero().tolist() == [[0, 6], [0, 7], [0, 8], [1, 6], [1, 7], [1, 8]]


def test_an_adapter_masked_at_the_input_site_re_embeds_the_masked_pixels():
    images, ids, masks = colour_task(4, seed=1)
    segmenter = ToyViT()
    embedded = []
    embed = segmenter.embed_image
    segmenter.embed_image = lambda x: (embedded.append(x.clone()), embed(x))[1]
    config = MaskSDConfig(lmvsd=BranchConfig(site="input", top_k=1.0, ratio=0.5), vmlsd=BranchConfig(enabled=False))
    model = MaskSD(segmenter, config, inputs=InputSpec(patch_size=4, fill=-1.0)).train()
    out = model(images, ids, masks, generator=torch.Generator().manual_seed(0))
    assert len(embedded) == 2 and torch.equal(embedded[0], images)
    cover = out.image_masked.view(4, 1, 4, 1, 4, 1).expand(4, 1, 4, 4, 4, 4).reshape(4, 1, 16, 16)
    assert torch.equal(embedded[1], torch.where(cover, -1.0, images)) and out.image_masked.sum(dim=1).tolist() == [8] * 4
    image_masked, _ = model.masked_tokens(images, ids, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_masked, out.image_masked) and model.image_grid(images) == (4, 4)


def test_input_site_refusals_name_the_argument_and_point_to_an_adapter():
    import open_clip

    clip_spec = InputSpec.from_tokenizer(open_clip.get_tokenizer("ViT-B-32"))
    with pytest.raises(ValueError, match=r"inputs.mask_token_id is None \(CLIP's tokenizer has no mask token\).*vmlsd.site='embedding'"):
        MaskSD(PlainRIS(), MaskSDConfig.maskris(), inputs=clip_spec)
    with pytest.raises(ValueError, match="needs inputs.special_token_ids"):
        MaskSD(PlainRIS(), MaskSDConfig.maskris(), inputs=InputSpec(mask_token_id=4, vocab_size=14))
    with pytest.raises(TypeError, match=r"PlainRIS does not implement masksd.MaskableSegmenter.*write an adapter: subclass masksd.SegmenterAdapter"):
        MaskSD(PlainRIS())  # the paper's embedding site needs the adapter
    with pytest.raises(TypeError, match="share_weights=False copies segmenter.decode_head .* PlainRIS exposes none"):
        MaskSD(PlainRIS(), MaskSDConfig.maskris(share_weights=False), inputs=InputSpec.from_tokenizer(bert_tokenizer()))
    with pytest.raises(ValueError, match=r"lmvsd.site='input' masks the raw inputs, .*lmvsd.top_k=1"):
        MaskSDConfig(lmvsd=BranchConfig(site="input"))
    with pytest.raises(ValueError, match=r"views='combined' .* lmvsd.site='features'"):
        MaskSDConfig(lmvsd=BranchConfig(site="features"), views="combined")
    images, ids, masks = plain_batch()
    model = MaskSD(PlainRIS(vocab=len(WORDS)), MaskSDConfig.maskris(), inputs=InputSpec.from_tokenizer(bert_tokenizer()))
    with pytest.raises(ValueError, match=r"texts rows \[1\] hold token ids outside \[0, inputs.vocab_size=14\)"):
        bad = ids.clone()
        bad[1, 1] = 99
        model.check_inputs(images, bad, masks)
    with pytest.raises(ValueError, match=r"images must be a \(B, C, H, W\) float tensor .*InputSpec.image_key"):
        model.train()(images[0], ids, masks)


def test_a_maskris_step_reads_no_tensor_value(monkeypatch):
    images, ids, masks = plain_batch()
    model = MaskSD(PlainRIS(vocab=len(WORDS)), MaskSDConfig.maskris(), inputs=InputSpec.from_tokenizer(bert_tokenizer(), patch_size=16)).train()
    model.check_inputs(images, ids, masks)

    def refuse(*args, **kwargs):
        raise AssertionError("the training step read a tensor value")

    for name in ("item", "tolist", "__bool__", "nonzero", "numpy", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = model(images, ids, masks, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(out.loss)


def test_verify_runs_the_input_site_checks_on_a_plain_model():
    images, ids, _ = plain_batch()
    torch.manual_seed(0)
    report = verify_segmenter(PlainRIS(vocab=len(WORDS)), images, ids, config=MaskSDConfig.maskris(),
                              inputs=InputSpec.from_tokenizer(bert_tokenizer(), patch_size=16))
    checks = {c.name: c for c in report.checks}
    assert "no adapter" in checks["protocol"].detail and checks["eval_parity"].passed and checks["unused_parameters"].passed
    assert "lmvsd + vmlsd: unchanged under other pixels and other word ids" in checks["leak"].detail
    assert "composition" not in checks and "embedding_level" not in checks


def test_cris_trains_with_maskris_images_at_the_inputs_and_words_at_the_embeddings():
    """The pipeline's substitute for CLIP's tokenizer (no [MASK]): --masksd-preset maskris --vmlsd-site embedding."""
    from examples.cris import CRIS, CRISConfig
    from masksd.config import MASKRIS_BRANCHES

    torch.manual_seed(0)
    segmenter = CRIS(CRISConfig.tiny())
    config = MaskSDConfig.maskris(vmlsd=BranchConfig.vmlsd(**{**MASKRIS_BRANCHES["vmlsd"], "site": "embedding"}))
    model = MaskSD(segmenter, config, inputs=InputSpec()).train()
    images = torch.randn(2, 3, 64, 64)
    ids = segmenter.tokenize(["the red car on the left", "a man"])
    out = model(images, ids, torch.ones(2, 1, 64, 64), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.image_masked.sum(dim=1).tolist() == [3, 3]  # 75 % of the 2x2 patches of 32 px
    assert model.branches["vmlsd"].masker.mask_token.grad is not None
    with torch.no_grad():
        assert torch.equal(model.eval()(images, ids), segmenter(images, ids))


def test_a_combined_view_with_separate_heads_decodes_with_one_head_copy_of_its_own():
    images, ids, masks = colour_task(4, seed=1)
    config = MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0), views="combined", share_weights=False)
    model = MaskSD(ToyViT(), config).train()
    assert model.combined.head is not None and all(branch.head is None for branch in model.branches.values())
    out = model(images, ids, masks)
    out.loss.backward()
    assert all(p.grad is not None for p in model.combined.head.parameters())
    assert float(model.combined.criterion.weight) == 0.75 + 0.1  # λ1 + λ2
