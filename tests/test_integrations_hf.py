"""HFCLIPTowers and CLIPSegSegmenter at tiny random configs: the split equals the library's forward
bit for bit, candidates are the real words, MaskSD trains through them, bad inputs are named."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import masksd  # noqa: E402
from masksd import MaskSD, MaskSDConfig  # noqa: E402
from masksd.adapter import Features  # noqa: E402
from masksd.integrations import (  # noqa: E402
    CLIPSegSegmenter, HFCLIPTowers, HFSiglipTowers, ImageContext, TextContext, TowerSegmenter,
)
from masksd.integrations.clipseg import CLIPSegImageContext  # noqa: E402
from masksd.integrations.hfclip import require_transformers  # noqa: E402

BOS, EOS, PAD = 98, 99, 0
TEXT = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
GRID = (4, 4)


def tiny_clip(attn: str = "sdpa", **text) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config={**TEXT, **text}, vision_config=VISION, projection_dim=24))
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_clipseg(attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPSegConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=24, extract_layers=(0, 2),
        reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )
    model = transformers.CLIPSegForImageSegmentation(config)
    model.set_attn_implementation(attn)
    return model.eval()


def padded_texts() -> dict[str, torch.Tensor]:
    """Two texts of 4 and 2 words; the second padded after its EOS (attention mask 0 there)."""
    input_ids = torch.tensor([[BOS, 5, 6, 7, 8, EOS], [BOS, 9, 10, EOS, PAD, PAD]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pixels(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def ground_truth(logits: torch.Tensor) -> torch.Tensor:
    return (torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()


class LevelHead(nn.Module):
    """A small head of our own: the last level (B, Cv, h, w), projected and gated by the sentence (B, D)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, 1)

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        level = visual.context.levels[-1]  # (B, Cv, h, w)
        return (self.proj(level) * text.pooled[:, :, None, None]).sum(dim=1, keepdim=True)  # (B, 1, h, w)


# -- HFCLIPTowers: exact composition ----------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hfclip_pooled_and_tokens_equal_the_librarys_features(attn):
    model, x, texts = tiny_clip(attn), pixels(), padded_texts()
    towers = HFCLIPTowers(model, layers=(2, 0))
    visual = towers.encode_image(towers.embed_image(x))
    text = towers.encode_text(towers.embed_text(texts))

    image_out = model.get_image_features(x, output_hidden_states=True)  # v5: an output object
    text_out = model.get_text_features(**texts)
    assert torch.equal(visual.pooled, image_out.pooler_output)  # (B, D)
    assert torch.equal(text.pooled, text_out.pooler_output)
    vision = model.vision_model
    assert torch.equal(visual.tokens, model.visual_projection(vision.post_layernorm(image_out.last_hidden_state[:, 1:])))
    assert torch.equal(text.tokens, model.text_projection(text_out.last_hidden_state))
    assert visual.tokens.shape == (2, 16, 24) and text.tokens.shape == (2, 6, 24)

    assert isinstance(visual.context, ImageContext) and visual.context.grid == GRID
    for level, index in zip(visual.context.levels, (2, 0)):  # in the order asked, class token dropped
        expected = image_out.hidden_states[index + 1][:, 1:].transpose(1, 2).reshape(2, 32, *GRID)
        assert torch.equal(level, expected)
    assert isinstance(text.context, TextContext) and text.context.words is text.tokens


def test_hfclip_candidates_are_the_real_words_of_a_padded_batch():
    towers = HFCLIPTowers(tiny_clip())
    assert towers.special_token_ids == frozenset({BOS, EOS})  # the config's bos/eos, not its pad id
    assert (towers.image_embed_dim, towers.text_embed_dim) == (32, 32)
    embedded = towers.embed_text(padded_texts())
    assert embedded.tokens.shape == (2, 6, 32)
    assert embedded.candidates.tolist() == [
        [False, True, True, True, True, False],
        [False, True, True, False, False, False],
    ]
    padding = towers.encode_text(embedded).context.padding
    assert padding.tolist() == [[False] * 6, [False, False, False, False, True, True]]
    assert towers.embed_image(pixels()).candidates is None


def test_hfclip_embeddings_are_upstream_of_position_embedding():
    """Embeddings are the raw token/patch embeddings: the library's own embedding modules, no positions added."""
    model, x, texts = tiny_clip(), pixels(), padded_texts()
    towers = HFCLIPTowers(model)
    patches = model.vision_model.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
    assert torch.equal(towers.embed_image(x).tokens, patches)
    assert torch.equal(towers.embed_text(texts).tokens, model.text_model.embeddings.token_embedding(texts["input_ids"]))


def test_hfclip_legacy_eos_config_pools_at_argmax_and_takes_the_tokenizers_ids():
    model = tiny_clip(eos_token_id=2)  # pre-#24773 config: pools at the largest id (EOS=99 here)
    texts = {"input_ids": torch.tensor([[BOS, 2, 1, EOS, EOS], [BOS, 5, EOS, EOS, EOS]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    with pytest.raises(ValueError, match="legacy eos_token_id=2.*tokenizer"):
        HFCLIPTowers(model)
    processor = SimpleNamespace(tokenizer=SimpleNamespace(all_special_ids=[BOS, EOS]))
    towers = HFCLIPTowers(model, tokenizer=processor)
    assert towers.special_token_ids == frozenset({BOS, EOS})
    embedded = towers.embed_text(texts)
    assert embedded.candidates.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]
    assert torch.equal(towers.encode_text(embedded).pooled, model.get_text_features(**texts).pooler_output)


def test_hfclip_interpolates_only_when_asked_and_then_equals_the_library():
    model, x = tiny_clip(), pixels(size=48)
    with pytest.raises(ValueError, match=r"48x48 px.*32x32.*interpolate_pos_encoding=True"):
        HFCLIPTowers(model).embed_image(x)
    towers = HFCLIPTowers(model, layers=(1,), interpolate_pos_encoding=True)
    visual = towers.encode_image(towers.embed_image(x))
    assert visual.context.grid == (6, 6) and visual.context.levels[0].shape == (2, 32, 6, 6)
    assert torch.equal(visual.pooled, model.get_image_features(x, interpolate_pos_encoding=True).pooler_output)


def test_tower_segmenter_on_hfclip_is_exact_in_eval_and_trains_one_step():
    towers = HFCLIPTowers(tiny_clip(), layers=(1,))
    segmenter = TowerSegmenter(towers, LevelHead(32, 24))
    x, texts = pixels(), padded_texts()
    bare = segmenter(x, texts)
    assert bare.shape == (2, 1, *GRID)
    wrapped = MaskSD(segmenter)
    assert torch.equal(wrapped.eval()(x, texts), bare)

    out = wrapped.train()(x, texts, ground_truth(bare))
    out.loss.backward()
    assert out.image_masked.sum(dim=1).tolist() == [2, 2]  # 16 patches, K=0.5, α=0.25
    assert out.text_masked.sum(dim=1).tolist() == [1, 1]  # at least one real word each
    assert not (out.text_masked & ~towers.embed_text(texts).candidates).any()
    for name in ("lmvsd", "vmlsd"):
        grad = wrapped.branches[name].masker.mask_token.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert segmenter.decode_head.proj.weight.grad.abs().sum() > 0


def test_hfclip_holds_the_models_own_modules_less_logit_scale():
    model = tiny_clip()
    towers = HFCLIPTowers(model)
    names = {f"{n}" for n, _ in model.named_parameters()} - {"logit_scale"}
    assert {n for n, _ in towers.named_parameters()} == names
    assert towers.vision_model is model.vision_model and towers.text_projection is model.text_projection


# -- HFSiglipTowers ---------------------------------------------------------------------------

SIGLIP_PAD, SIGLIP_UNK = 1, 2  # SigLIP's tokenizer pads with its end-of-text token "</s>" (id 1)


def tiny_siglip(image_size: int = 32, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=8, pad_token_id=SIGLIP_PAD, projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
    ))
    model.set_attn_implementation(attn)
    return model.eval()


def siglip_texts() -> dict[str, torch.Tensor]:
    """As SigLIP is tokenized: padding="max_length" with "</s>", no attention mask; an unknown word in the first."""
    return {"input_ids": torch.tensor([[5, SIGLIP_UNK, 7, 8, SIGLIP_PAD, SIGLIP_PAD, SIGLIP_PAD, SIGLIP_PAD],
                                       [9, 10, SIGLIP_PAD, SIGLIP_PAD, SIGLIP_PAD, SIGLIP_PAD, SIGLIP_PAD, SIGLIP_PAD]])}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("masked", [False, True])
def test_siglip_pooled_features_equal_the_librarys(attn, masked):
    model, x, texts = tiny_siglip(attn=attn), pixels(), siglip_texts()
    if masked:  # a tokenizer that returns an attention mask: the encoder then skips the padding
        texts["attention_mask"] = (texts["input_ids"] != SIGLIP_PAD).long()
    towers = HFSiglipTowers(model, layers=(1, 0), special_token_ids=(SIGLIP_PAD, SIGLIP_UNK))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        visual = towers.encode_image(towers.embed_image(x))
        text = towers.encode_text(towers.embed_text(texts))
        image_out = model.get_image_features(x, output_hidden_states=True)
        text_out = model.get_text_features(**texts)
        assert torch.equal(visual.pooled, image_out.pooler_output), mode
        assert torch.equal(text.pooled, text_out.pooler_output), mode
    assert torch.equal(text.tokens, model.text_model.head(text_out.last_hidden_state))  # every position through the head
    assert visual.tokens.shape == (2, 16, 32) and visual.grid is None and visual.context.grid == GRID  # on the patch grid
    for level, index in zip(visual.context.levels, (1, 0)):  # in the order asked
        assert torch.equal(level, image_out.hidden_states[index + 1].transpose(1, 2).reshape(2, 32, *GRID))


def test_siglip_image_tokens_are_what_the_pooling_head_gives_for_one_patch():
    """The per-token reading's oracle: with a single patch the head's probe attends to it alone, so the
    pooled feature is that patch's token; and the value path is what the library's head computes per patch."""
    model = tiny_siglip(image_size=8)
    towers = HFSiglipTowers(model, special_token_ids=(SIGLIP_PAD,))
    with torch.no_grad():
        visual = towers.encode_image(towers.embed_image(pixels(size=8)))
    assert visual.tokens.shape == (2, 1, 32)
    torch.testing.assert_close(visual.tokens[:, 0], visual.pooled)
    states = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(5):
            torch.testing.assert_close(towers.head_value_path(states)[:, i], model.vision_model.head(states[:, i : i + 1]))


def test_siglip_candidates_are_the_words_before_the_first_pad():
    towers = HFSiglipTowers(tiny_siglip(), special_token_ids=(SIGLIP_PAD, SIGLIP_UNK))
    embedded = towers.embed_text(siglip_texts())
    assert embedded.candidates.tolist() == [[True, False, True, True] + [False] * 4, [True, True] + [False] * 6]
    assert embedded.grid is None and towers.embed_image(pixels()).grid == GRID
    padding = towers.encode_text(embedded).context.padding
    assert padding.tolist() == [[False] * 5 + [True] * 3, [False] * 3 + [True] * 5]  # the end-of-text token is kept
    full = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)}  # truncated without "</s>": the pooled last position
    assert towers.embed_text(full).candidates[:, -1].tolist() == [False, False]
    tokenizer = SimpleNamespace(all_special_ids=[SIGLIP_PAD, SIGLIP_UNK], pad_token_id=SIGLIP_PAD)
    assert HFSiglipTowers(tiny_siglip(), tokenizer=tokenizer).special_token_ids == frozenset({SIGLIP_PAD, SIGLIP_UNK})


def test_siglip_towers_refuse_what_they_cannot_match():
    with pytest.raises(TypeError, match="model must be a transformers SiglipModel.*got CLIPModel"):
        HFSiglipTowers(tiny_clip(), special_token_ids=(1,))
    with pytest.raises(ValueError, match="tokenizer.*SigLIP config's bos/eos ids"):
        HFSiglipTowers(tiny_siglip())
    headless = tiny_siglip()
    headless.vision_model.use_head = False
    with pytest.raises(ValueError, match="no pooling head"):
        HFSiglipTowers(headless, special_token_ids=(1,))
    with pytest.raises(ValueError, match=r"40x40 px.*32x32"):
        HFSiglipTowers(tiny_siglip(), special_token_ids=(1,)).embed_image(pixels(size=40))


# -- CLIPSegSegmenter -------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch,size", [(1, 32), (2, 32), (2, 48)])
def test_clipseg_logits_equal_the_models_own(attn, batch, size):
    model = tiny_clipseg(attn)
    segmenter = CLIPSegSegmenter(model)
    x = pixels(batch, size)
    texts = {k: v[:batch] for k, v in padded_texts().items()}
    logits = segmenter(x, texts)
    with torch.no_grad():
        reference = model(pixel_values=x, **texts).logits
    assert logits.shape == (batch, 1, size, size)
    assert torch.equal(logits, reference.reshape(batch, 1, size, size))

    wrapped = MaskSD(segmenter).eval()
    assert torch.equal(wrapped(x, texts), logits)


def test_clipseg_pooled_and_activations_are_clipsegs_own():
    model, x, texts = tiny_clipseg(), pixels(), padded_texts()
    segmenter = CLIPSegSegmenter(model)
    visual = segmenter.encode_image(segmenter.embed_image(x))
    text = segmenter.encode_text(segmenter.embed_text(texts))
    with torch.no_grad():
        out = model(pixel_values=x, **texts)
        image_out = model.clip.get_image_features(x, output_hidden_states=True)
    assert torch.equal(text.pooled, out.conditional_embeddings)  # CLIPSeg's FiLM input
    assert torch.equal(visual.pooled, image_out.pooler_output)
    assert isinstance(visual.context, CLIPSegImageContext) and visual.context.grid == GRID
    for activation, index in zip(visual.context.activations, model.extract_layers):
        assert torch.equal(activation, image_out.hidden_states[index + 1])  # (B, 1 + N, Cv), class token kept
    assert segmenter.special_token_ids == frozenset({BOS, EOS})
    assert segmenter.embed_text(texts).candidates.sum(dim=1).tolist() == [4, 2]


def test_clipseg_training_step_reaches_the_mask_tokens_through_frozen_clip():
    model = tiny_clipseg()
    segmenter = CLIPSegSegmenter(model)
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    wrapped = MaskSD(segmenter).train()
    x, texts = pixels(), padded_texts()
    out = wrapped(x, texts, ground_truth(segmenter(x, texts)))
    out.loss.backward()
    for name in ("lmvsd", "vmlsd"):
        grad = wrapped.branches[name].masker.mask_token.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_clipseg_separate_branch_heads_are_copies_of_the_decoder_and_train():
    segmenter = CLIPSegSegmenter(tiny_clipseg())
    wrapped = MaskSD(segmenter, MaskSDConfig(share_weights=False)).train()
    x, texts = pixels(), padded_texts()
    out = wrapped(x, texts, ground_truth(segmenter(x, texts)))
    out.loss.backward()
    for name in ("lmvsd", "vmlsd"):
        head = wrapped.branches[name].head
        assert head.decoder is not segmenter.decode_head.decoder
        assert all(p.grad is not None for p in head.parameters()), name


def test_clipseg_segmenter_holds_exactly_the_models_weights():
    """Every parameter the segmenter trains is the wrapped model's own (less logit_scale): training it trains
    ``segmenter.model``, which ``save_pretrained`` exports with no masksd needed."""
    model = tiny_clipseg()
    segmenter = CLIPSegSegmenter(model, freeze_clip=False)
    assert segmenter.model is model
    ours = {id(p) for p in segmenter.parameters()}
    theirs = {id(p) for n, p in model.named_parameters() if n != "clip.logit_scale"}
    assert ours == theirs
    assert all(p.requires_grad for p in model.clip.parameters())  # freeze_clip=False leaves them as they were


# -- named errors -----------------------------------------------------------------------------


def test_bad_texts_are_named():
    segmenter, x = CLIPSegSegmenter(tiny_clipseg()), pixels()
    texts = padded_texts()
    with pytest.raises(TypeError, match=r"texts must be the tokenizer's mapping with 'input_ids'.*keys \['attention_mask'\]"):
        segmenter(x, {"attention_mask": texts["attention_mask"]})
    with pytest.raises(TypeError, match="texts must be the tokenizer's mapping"):
        segmenter(x, texts["input_ids"])
    with pytest.raises(ValueError, match=r"texts\['input_ids'\] must be an integer tensor"):
        segmenter(x, {"input_ids": texts["input_ids"].float()})
    with pytest.raises(ValueError, match=r"texts\['attention_mask'\] must be a tensor of input_ids' shape"):
        segmenter(x, {"input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"][:, :3]})
    with pytest.raises(ValueError, match="more than the text model's 16 positions"):
        segmenter(x, {"input_ids": torch.full((2, 17), 5)})
    with pytest.raises(ValueError, match="as many samples, got 2 and 1"):
        segmenter(x, {k: v[:1] for k, v in texts.items()})


def test_bad_images_are_named():
    towers, segmenter, texts = HFCLIPTowers(tiny_clip()), CLIPSegSegmenter(tiny_clipseg()), padded_texts()
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor \(B, 3, H, W\)"):
        towers.embed_image(torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match=r"pixel_values are 40x40 px but the vision model was built for 32x32"):
        towers.embed_image(pixels(size=40))
    with pytest.raises(ValueError, match="square grid"):
        segmenter(torch.randn(2, 3, 32, 48), texts)


def test_models_that_are_not_clip_are_refused_by_name():
    with pytest.raises(TypeError, match="model must be a transformers CLIPModel.*got Linear"):
        HFCLIPTowers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"SiglipModel: .*masksd.integrations.HFSiglipTowers\(model"):
        HFCLIPTowers(tiny_siglip())
    clipseg = tiny_clipseg()
    with pytest.raises(TypeError, match=r"CLIPSegSegmenter\(model\).*HFCLIPTowers\(model.clip\)"):
        HFCLIPTowers(clipseg)
    assert HFCLIPTowers(clipseg.clip).interpolate_pos_encoding  # CLIPSeg's CLIP: the library's default, True
    with pytest.raises(TypeError, match="CLIPSegForImageSegmentation, got CLIPModel"):
        CLIPSegSegmenter(tiny_clip())
    with pytest.raises(TypeError, match="got CLIPSegModel: it has no decoder"):
        CLIPSegSegmenter(clipseg.clip)


def test_bad_arguments_are_named():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"layers must be distinct 0-based encoder layer indices below the depth 3, got \(3,\)"):
        HFCLIPTowers(model, layers=(3,))
    with pytest.raises(ValueError, match="tokenizer or special_token_ids, not both"):
        HFCLIPTowers(model, tokenizer=SimpleNamespace(all_special_ids=[1]), special_token_ids=[1])
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer or processor"):
        HFCLIPTowers(model, tokenizer=object())
    assert HFCLIPTowers(model, special_token_ids=[BOS, EOS, PAD]).special_token_ids == frozenset({BOS, EOS, PAD})


def test_check_inputs_finds_a_text_without_its_eos_token():
    segmenter = CLIPSegSegmenter(tiny_clipseg())
    wrapped = MaskSD(segmenter)
    texts = padded_texts()
    wrapped.check_inputs(pixels(), texts)  # passes
    truncated = {"input_ids": texts["input_ids"][:, :3], "attention_mask": texts["attention_mask"][:, :3]}
    with pytest.raises(ValueError, match=r"samples \[0, 1\] hold no eos_token_id 99"):
        wrapped.check_inputs(pixels(), truncated)
    with pytest.raises(ValueError, match="outside the vocabulary of 100"):
        wrapped.check_inputs(pixels(), {"input_ids": torch.tensor([[BOS, 100, EOS], [BOS, 5, EOS]])})


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "masksd\[transformers\]"'):
        require_transformers()
    with pytest.raises(ImportError, match="masksd"):
        HFCLIPTowers(nn.Linear(2, 2))


def test_integrations_are_reached_lazily_from_the_package():
    import masksd.integrations as integrations

    assert integrations.HFCLIPTowers is HFCLIPTowers and integrations.CLIPSegSegmenter is CLIPSegSegmenter
    assert masksd.MaskSD is MaskSD
