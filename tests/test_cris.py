"""The CRIS-style CLIP segmenter (examples/cris) at its tiny size: protocol, open_clip parity, loading, MaskSD."""

from __future__ import annotations

import re

import open_clip
from einops import rearrange
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.cris import CRIS, TINY_CLIP, CRISConfig
from examples.cris.backbone import create_clip, resolve_quick_gelu
from masksd import BranchConfig, MaskSD, MaskSDConfig, bare_state_dict, segmentation_loss
from tests.conftest import refuse_host_reads

SOT, EOT = 49406, 49407
SENTENCES = ["the red car on the left", "a man"]


def tiny(seed: int = 0, **overrides) -> CRIS:
    torch.manual_seed(seed)
    return CRIS(CRISConfig.tiny(**overrides))


def batch(model: CRIS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, token ids and a ground-truth box mask for SENTENCES at the model's size."""
    size = model.config.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(SENTENCES), 3, size, size, generator=generator)
    truth = torch.zeros(len(SENTENCES), 1, size, size)
    truth[0, :, : size // 2, : size // 2] = 1
    truth[1, :, size // 4 :, size // 2 :] = 1
    return images, model.tokenize(SENTENCES), truth


def clip_like(model: CRIS) -> open_clip.CLIP:
    """open_clip's own CLIP module holding the model's backbone weights."""
    clip = open_clip.create_model(TINY_CLIP, force_image_size=model.config.image_size)
    clip.load_state_dict(model.backbone.clip_state_dict())
    return clip.eval()


def train_steps(wrapped: MaskSD, steps: int, seed: int = 0) -> list[float]:
    images, ids, truth = batch(wrapped.segmenter, seed)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    wrapped.train()
    for _ in range(steps):
        out = wrapped(images, ids, truth, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
        assert all(torch.isfinite(torch.tensor(v)) for v in out.parts().values()), out.parts()
    return losses


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- shapes and the protocol ------------------------------------------------------------------------


def test_protocol_shapes():
    model = tiny().eval()
    images, ids, _ = batch(model)
    image_embedded = model.embed_image(images)
    assert image_embedded.tokens.shape == (2, 64, 64)  # 8x8 patches of the 64-px image, width 64
    assert image_embedded.candidates is None and image_embedded.context == (8, 8)
    visual = model.encode_image(image_embedded)
    assert visual.tokens.shape == (2, 64, 64) and visual.pooled.shape == (2, 64)
    assert [tuple(level.shape) for level in visual.context.levels] == [(2, 64, 8, 8)] * 3

    text_embedded = model.embed_text(ids)
    assert text_embedded.tokens.shape == (2, 17, 64) and torch.equal(text_embedded.context, ids)
    text = model.encode_text(text_embedded)
    assert text.tokens.shape == (2, 17, 64) and text.pooled.shape == (2, 64)
    assert text.context.padding.tolist()[1] == [False] * 4 + [True] * 13  # SOT a man EOT | padding

    logits = model.decode_head(visual, text)
    assert logits.shape == (2, 1, 32, 32)  # 4x the 8x8 grid
    assert torch.equal(logits, model(images, ids))
    assert model.image_embed_dim == 64 and model.text_embed_dim == 64


def test_default_feature_layers_end_each_third():
    config = CRISConfig()
    assert config.resolved_feature_layers(12) == (3, 7, 11)
    assert config.resolved_feature_layers(24) == (7, 15, 23)
    assert tiny().backbone.feature_layers == (0, 1, 2)
    with pytest.raises(ValueError, match="past the ViT"):
        CRISConfig.tiny(feature_layers=(0, 1, 3)).resolved_feature_layers(3)


def test_encoders_match_open_clip():
    model = tiny().eval()
    clip = clip_like(model)
    images, ids, _ = batch(model)
    with torch.no_grad():
        visual = model.encode_image(model.embed_image(images))
        torch.testing.assert_close(visual.pooled, clip.visual(images))
        clip.visual.output_tokens = True
        _, patch_tokens = clip.visual(images)  # after ln_post, before proj
        torch.testing.assert_close(visual.tokens, patch_tokens @ clip.visual.proj)

        text = model.encode_text(model.embed_text(ids))
        ids77 = open_clip.tokenize(SENTENCES)  # context 77: the causal mask hides positions past EOT
        torch.testing.assert_close(text.pooled, clip.encode_text(ids77))
        assert torch.equal(ids, ids77[:, :17])


def test_config_validation():
    with pytest.raises(ValueError, match="decoder_dim"):
        CRISConfig.tiny(neck_channels=(16, 48, 64))
    with pytest.raises(ValueError, match="max_words"):
        CRISConfig.tiny(max_words=78)
    with pytest.raises(ValueError, match="odd"):
        CRISConfig.tiny(projector_kernel=2)
    with pytest.raises(ValueError, match="multiple of .* patch size 8"):
        tiny(image_size=60)
    with pytest.raises(TypeError, match="CRISConfig"):
        CRIS({"model_name": TINY_CLIP})


# --- tokenization -------------------------------------------------------------------------------------


def test_tokenize_uses_open_clip_ids():
    model = tiny()
    ids = model.tokenize(SENTENCES)
    assert ids.dtype == torch.long and ids.shape == (2, 17)
    assert torch.equal(ids, open_clip.get_tokenizer(TINY_CLIP)(SENTENCES)[:, :17])
    assert ids[1, :4].tolist() == [SOT, 320, 786, EOT] and ids[1, 4:].eq(0).all()


def test_long_sentence_is_truncated_keeping_eot():
    model = tiny()
    sentence = " ".join(["the small dog next to the big brown chair"] * 4)  # 36 words
    full = open_clip.tokenize([sentence])[0]
    assert int((full > 0).sum()) == 38  # SOT + 36 words + EOT: longer than max_words
    ids = model.tokenize([sentence])[0]
    assert ids.tolist() == full[:16].tolist() + [EOT]  # the first 15 words, then EOT, no padding
    embedded = model.embed_text(ids[None])
    assert embedded.candidates[0].tolist() == [False] + [True] * 15 + [False]


def test_candidates_exclude_sot_eot_and_padding():
    model = tiny()
    ids = model.tokenize(SENTENCES)
    candidates = model.embed_text(ids).candidates
    assert candidates.dtype == torch.bool
    assert candidates[0].tolist() == [False] + [True] * 6 + [False] * 10
    assert candidates[1].tolist() == [False, True, True] + [False] * 14
    assert not candidates[ids == SOT].any() and not candidates[ids == EOT].any() and not candidates[ids == 0].any()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["red", "car", "man", "left", "dog", "chair"]), min_size=1, max_size=30))
def test_candidate_count_is_words_up_to_max_words(words):
    model = _TOKENIZER_MODEL
    ids = model.tokenize([" ".join(words)])
    candidates = model.embed_text(ids).candidates
    assert int(candidates.sum()) == min(len(words), model.config.max_words - 2)  # each word is one BPE token
    assert int((ids == EOT).sum()) == 1


_TOKENIZER_MODEL = tiny()


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_empty_text_raises_with_its_index(bad):
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        _TOKENIZER_MODEL.tokenize(["a man", bad])
    with pytest.raises(TypeError):
        _TOKENIZER_MODEL.tokenize("a man")


def test_malformed_token_ids_raise():
    model = _TOKENIZER_MODEL
    ids = model.tokenize(SENTENCES)
    with pytest.raises(ValueError, match="2..max_words=17"):
        model.embed_text(open_clip.tokenize(SENTENCES))  # context 77
    broken = ids.clone()
    broken[1, 3] = 0  # EOT removed
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.check_inputs(None, broken)  # values: on request (MaskSD.check_inputs) and in inference
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.eval()(torch.zeros(2, 3, 64, 64), broken)
    with pytest.raises(ValueError, match="long"):
        model.embed_text(ids.int())


# --- image size and loading ---------------------------------------------------------------------------


def test_wrong_image_size_raises():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*image_size=64"):
        model.embed_image(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="float"):
        model.embed_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_local_checkpoint_round_trip(tmp_path):
    original = tiny(seed=1).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(original.backbone.clip_state_dict(), path)
    loaded = tiny(seed=2, pretrained=str(path)).eval()
    for name, value in original.backbone.state_dict().items():
        assert torch.equal(value, loaded.backbone.state_dict()[name]), name
    loaded.decode_head.load_state_dict(original.decode_head.state_dict())  # the head is not in a CLIP checkpoint
    images, ids, _ = batch(original)
    with torch.no_grad():
        assert torch.equal(loaded(images, ids), original(images, ids))


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        tiny(pretrained=str(path))


def test_checkpoint_at_another_size_is_interpolated(tmp_path):
    small = tiny(seed=3)
    path = tmp_path / "tiny_clip_64px.pt"
    torch.save(small.backbone.clip_state_dict(), path)
    large = tiny(seed=4, image_size=96, pretrained=str(path)).eval()

    old = small.backbone.visual.positional_embedding.detach()  # (1 + 8*8, 64)
    new = large.backbone.visual.positional_embedding.detach()
    assert old.shape == (65, 64) and new.shape == (1 + 12 * 12, 64)
    grid = old[1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(new[1:], expected.permute(0, 2, 3, 1).reshape(144, 64))
    assert torch.equal(new[0], old[0])  # the class token's position is kept

    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert large(images, large.tokenize(SENTENCES)).shape == (2, 1, 48, 48)
    with pytest.raises(ValueError, match="image_size=96"):
        large.embed_image(torch.randn(2, 3, 64, 64))


def test_random_init_at_another_size():
    model = tiny(image_size=96).eval()
    assert model.backbone.visual.positional_embedding.shape == (145, 64)
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert model(images, model.tokenize(["a man"])).shape == (1, 1, 48, 48)


def test_quick_gelu_follows_the_tag():
    assert resolve_quick_gelu("ViT-B-16", "openai", None) is True
    assert resolve_quick_gelu("ViT-L-14", "openai", None) is True
    assert resolve_quick_gelu("ViT-B-16", "laion2b_s34b_b88k", None) is False
    assert resolve_quick_gelu("ViT-B-16", None, None) is False
    assert resolve_quick_gelu("ViT-B-16", "/some/file.pt", True) is True


def test_non_clip_models_are_refused():
    with pytest.raises(ValueError, match="not an open_clip model config"):
        create_clip("ViT-Q-99", None, 64)
    with pytest.raises(ValueError, match="ViT"):
        create_clip("RN50", None, 224)


def test_half_precision_weights_load_at_any_image_size():
    """The shipped weights are fp16; torch's CPU bicubic interpolation has no half kernel, so they once loaded at
    their own 64 px only. The position embedding is now resized in float32, and at 64 px loads unchanged."""
    import open_clip.factory
    import open_clip.model

    from examples.cris.config import SHIPPED_WEIGHTS, TINY_CLIP

    stored = open_clip.factory.load_state_dict(str(SHIPPED_WEIGHTS["masksd-tiny-synthetic"][1]))
    assert stored["visual.positional_embedding"].dtype == torch.float16  # the case that failed
    own = create_clip(TINY_CLIP, "masksd-tiny-synthetic", 64).visual.positional_embedding
    assert torch.equal(own, stored["visual.positional_embedding"].float())
    larger = create_clip(TINY_CLIP, "masksd-tiny-synthetic", 96)
    expected = {"visual.positional_embedding": stored["visual.positional_embedding"].float()}
    open_clip.model.resize_pos_embed(expected, larger)
    assert larger.visual.positional_embedding.shape == (12 * 12 + 1, 64)
    assert torch.equal(larger.visual.positional_embedding, expected["visual.positional_embedding"])
    assert open_clip.factory.resize_pos_embed is open_clip.model.resize_pos_embed  # open_clip's own function is back


# --- MaskSD ----------------------------------------------------------------------------------------------

ABLATIONS = {
    "baseline": MaskSDConfig.baseline(),
    "lmvsd_only": MaskSDConfig(vmlsd=BranchConfig(enabled=False)),
    "vmlsd_only": MaskSDConfig(lmvsd=BranchConfig(enabled=False)),
    "both": MaskSDConfig(),
    "separate_heads": MaskSDConfig(share_weights=False),
    "no_masking": MaskSDConfig(masking=False),
    "ground_truth": MaskSDConfig(supervision="ground_truth"),
    "hard_target": MaskSDConfig(target="hard"),
    "teacher_flow": MaskSDConfig(teacher_gradient="flow"),
    "features_site": MaskSDConfig(lmvsd=BranchConfig(site="features")),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_trains_under_every_ablation(name):
    wrapped = MaskSD(tiny(), ABLATIONS[name])
    losses = train_steps(wrapped, steps=2)
    assert len(losses) == 2


def test_training_lowers_the_loss_on_a_fixed_batch():
    wrapped = MaskSD(tiny(seed=5))
    losses = train_steps(wrapped, steps=8)
    assert losses[-1] < 0.8 * losses[0], losses


def test_wrapped_eval_output_is_the_bare_models():
    model = tiny()
    wrapped = MaskSD(model, MaskSDConfig(share_weights=False))
    train_steps(wrapped, steps=1)  # moves weights and BatchNorm statistics away from their init
    wrapped.eval()
    images, ids, _ = batch(model, seed=1)
    with torch.no_grad():
        assert torch.equal(wrapped(images, ids), model(images, ids))


def test_masked_branches_mask_the_expected_counts():
    wrapped = MaskSD(tiny()).train()
    images, ids, truth = batch(wrapped.segmenter)
    out = wrapped(images, ids, truth, generator=torch.Generator().manual_seed(0))
    # LMVSD: ceil(0.5 * 64) = 32 patches kept, round(0.25 * 32) = 8 masked.
    assert out.image_masked.sum(dim=1).tolist() == [8, 8]
    # VMLSD: 6 and 2 words -> 3 and 1 kept -> round(0.1 * 3) = round(0.1 * 1) = 0, but at least 1 masked.
    assert out.text_masked.sum(dim=1).tolist() == [1, 1]
    literal = MaskSD(wrapped.segmenter, MaskSDConfig(vmlsd=BranchConfig(min_masked=0))).train()
    assert literal(images, ids, truth).text_masked.sum(dim=1).tolist() == [0, 0]


def test_parameter_counts():
    model = tiny()
    bare, head = n_params(model), n_params(model.decode_head)
    mask_tokens = model.image_embed_dim + model.text_embed_dim
    assert n_params(MaskSD(model)) == bare + mask_tokens
    assert n_params(MaskSD(model, MaskSDConfig(share_weights=False))) == bare + mask_tokens + 2 * head
    lmvsd_only = MaskSDConfig(vmlsd=BranchConfig(enabled=False), share_weights=False)
    assert n_params(MaskSD(model, lmvsd_only)) == bare + model.image_embed_dim + head
    assert n_params(MaskSD(model, MaskSDConfig.baseline())) == bare


# --- DDP readiness: every trainable parameter takes part in a training step ------------------------


def test_frozen_and_dropped_parameters():
    model = tiny()
    names = {name for name, _ in model.named_parameters()}
    assert not any("logit_scale" in name or "logit_bias" in name for name in names)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.visual.proj", "backbone.visual.ln_post.weight", "backbone.visual.ln_post.bias"}


FEATURES = BranchConfig(site="features")


@pytest.mark.parametrize(
    "config",
    [MaskSDConfig(), MaskSDConfig(share_weights=False), MaskSDConfig(lmvsd=FEATURES), MaskSDConfig(lmvsd=FEATURES, share_weights=False)],
    ids=["shared", "separate", "features", "features-separate"],
)
def test_every_trainable_parameter_gets_a_gradient_in_masksd(config):
    wrapped = MaskSD(tiny(), config).train()
    images, ids, truth = batch(wrapped.segmenter)
    wrapped(images, ids, truth, generator=torch.Generator().manual_seed(0)).loss.backward()
    missing = [name for name, p in wrapped.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_every_trainable_parameter_gets_a_gradient_bare():
    model = tiny().train()
    images, ids, truth = batch(model)
    segmentation_loss(model(images, ids), truth).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []



def test_readme_example_runs():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "docs" / "reference-model.md").read_text()
    section = readme.split("# Reference model: CRIS-style CLIP segmenter", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/reference-model.md (CRIS example)", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1, 32, 32)
    assert all(p.grad is not None for p in namespace["wrapped"].parameters() if p.requires_grad)


def test_vit_b16_blocks_after_the_deepest_level_are_frozen_and_the_rest_train():
    torch.manual_seed(0)
    model = CRIS(CRISConfig(pretrained=None, image_size=64, feature_layers=(2, 5, 8)))  # ViT-B-16 at a 4x4 grid
    blocks = model.backbone.visual.transformer.resblocks
    assert all(p.requires_grad for p in blocks[:9].parameters())
    assert not any(p.requires_grad for p in blocks[9:].parameters())
    wrapped = MaskSD(model).train()
    images, ids, truth = batch(model)
    out = wrapped(images, ids, truth, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (2, 1, 16, 16)
    out.loss.backward()
    assert [name for name, p in wrapped.named_parameters() if p.requires_grad and p.grad is None] == []


def _running_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def test_frozen_branch_norm_stats_on_cris_batchnorm():
    """CRIS's neck and projector use BatchNorm: with branch_norm_stats="freeze" a CM-MaskSD step leaves
    every running statistic where the main pass alone leaves it; with "update" the branches move them."""
    model = tiny()
    images, ids, truth = batch(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(_running_stats(model)) > 10
    model.train()
    torch.manual_seed(1)
    model(images, ids)  # the main pass alone
    main_only = _running_stats(model)
    after = {}
    for stats in ("update", "freeze"):
        model.load_state_dict(start)
        torch.manual_seed(2)
        wrapped = MaskSD(model, MaskSDConfig(branch_norm_stats=stats)).train()
        torch.manual_seed(1)
        wrapped(images, ids, truth, generator=torch.Generator().manual_seed(0)).loss.backward()
        after[stats] = _running_stats(model)
    assert all(torch.equal(after["freeze"][k], v) for k, v in main_only.items())
    assert not all(torch.equal(after["update"][k], v) for k, v in main_only.items())


def test_a_cris_training_step_reads_no_tensor_value(monkeypatch):
    """No host synchronisation inside a MaskSD(CRIS) training step: nothing in it may read a tensor's
    values (item, tolist, bool, nonzero...); the value checks run in check_inputs, on request."""
    model = tiny()
    images, ids, truth = batch(model)
    wrapped = MaskSD(model, MaskSDConfig(checkpoint_branches=True)).train()
    wrapped.check_inputs(images, ids, truth)  # allowed: once per epoch, before the steps
    refuse_host_reads(monkeypatch, "the training step")
    out = wrapped(images, ids, truth, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(out.loss)


def test_projected_deep_level_feeds_the_decoder_the_tokens_the_filter_ranks():
    model = tiny(deep_level="projected")
    images, ids, truth = batch(model)
    assert model.backbone.visual.proj.requires_grad and model.backbone.visual.ln_post.weight.requires_grad
    visual = model.encode_image(model.embed_image(images))
    deep = visual.context.levels[-1]  # (B, D, g, g)
    assert deep.shape == (2, model.backbone.embed_dim, 8, 8)
    assert torch.equal(rearrange(deep, "b c h w -> b (h w) c"), visual.tokens)
    wrapped = MaskSD(model).train()
    wrapped(images, ids, truth).loss.backward()
    assert model.backbone.visual.proj.grad is not None and model.backbone.visual.proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="deep_level"):
        CRISConfig.tiny(deep_level="last")


# --- LMVSD at the features site: the pyramid's maps, replaced after the encoder ---------------------


def test_the_decode_head_split_is_its_forward_and_the_layout_its_maps():
    model = tiny().eval()
    images, ids, _ = batch(model)
    with torch.no_grad():
        visual = model.encode_image(model.embed_image(images))
        text = model.encode_text(model.embed_text(ids))
        maps = model.decode_head.feature_maps(visual)
        assert torch.equal(model.decode_head.decode_maps(maps, visual, text), model.decode_head(visual, text))
    layout = model.feature_map_layout
    assert layout.grid == model.grid_size == (8, 8)
    assert layout.shapes == tuple(tuple(m.shape[1:]) for m in maps) == ((32, 16, 16), (64, 8, 8), (64, 4, 4))
    odd = tiny(image_size=72).eval()  # a 9x9 grid: the strided level rounds up
    with torch.no_grad():
        odd_maps = odd.decode_head.feature_maps(odd.encode_image(odd.embed_image(batch(odd)[0])))
    assert odd.feature_map_layout.shapes == tuple(tuple(m.shape[1:]) for m in odd_maps) == ((32, 18, 18), (64, 9, 9), (64, 5, 5))


def test_features_site_maps_at_vit_b16_480_are_table_vii_3m():
    torch.manual_seed(0)
    model = CRIS(CRISConfig.variant("vitb-480", pretrained=None))  # built, never run (counting only)
    layout = model.feature_map_layout
    assert layout.grid == (30, 30) and layout.shapes == ((512, 60, 60), (1024, 30, 30), (1024, 15, 15))
    lmvsd_only = MaskSD(model, MaskSDConfig(lmvsd=FEATURES, vmlsd=BranchConfig(enabled=False)))
    assert n_params(lmvsd_only) - n_params(model) == 512 * 60**2 + 1024 * 30**2 + 1024 * 15**2 == 2_995_200
    both = MaskSD(model, MaskSDConfig(lmvsd=FEATURES))
    assert n_params(both) - n_params(model) == 2_995_200 + model.text_embed_dim  # and VMLSD's 512-d token
    assert {n for n, _ in lmvsd_only.named_parameters() if not n.startswith("segmenter.")} == {
        f"branches.lmvsd.masker.maps.{i}" for i in range(3)
    }


def test_features_site_encodes_the_image_once_and_eval_is_the_bare_model():
    from tests.test_wrapper import Spy

    model = tiny()
    wrapped = MaskSD(model, MaskSDConfig(lmvsd=FEATURES)).train()
    spy = Spy(wrapped)
    images, ids, truth = batch(model)
    out = wrapped(images, ids, truth, generator=torch.Generator().manual_seed(0))
    assert spy.calls["embed_image"] == 1 and spy.calls["encode_image"] == 1  # no second image encode
    assert spy.calls["encode_text"] == 2  # VMLSD still re-encodes the text
    assert out.image_masked.sum(dim=1).tolist() == [8, 8]  # the same counts as the embedding site
    out.loss.backward()
    for level, values in enumerate(wrapped.branches["lmvsd"].masker.maps):
        assert values.grad is not None and values.grad.abs().sum() > 0, level
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(images, ids), model(images, ids))
    assert bare_state_dict(wrapped.state_dict()).keys() == model.state_dict().keys()  # the maps stay behind


def test_features_site_replaces_the_chosen_patches_in_every_level_and_masked_tokens_reports_them():
    model = tiny()
    wrapped = MaskSD(model, MaskSDConfig(lmvsd=FEATURES, vmlsd=BranchConfig(enabled=False)))
    wrapped.eval()  # the training path without dropout
    wrapped.training = True
    seen = []
    model.decode_head.neck.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # the maps it reads
    images, ids, truth = batch(model)
    out = wrapped(images, ids, truth, generator=torch.Generator().manual_seed(2))
    (main_maps, branch_maps) = seen
    values = wrapped.branches["lmvsd"].masker.maps
    grid = out.image_masked.view(2, 1, 8, 8).float()
    for x, y, v in zip(main_maps, branch_maps, values):
        where = F.interpolate(grid, size=x.shape[-2:], mode="nearest").bool().expand_as(x)
        assert torch.equal(y[~where], x[~where]) and torch.equal(y[where], v.detach().expand_as(x)[where])
    image_masked, _ = wrapped.masked_tokens(images, ids, generator=torch.Generator().manual_seed(2))
    assert torch.equal(image_masked, out.image_masked)


def test_features_site_with_checkpointed_branches_gives_the_same_loss_and_gradients():
    results = {}
    for checkpointed in (False, True):
        model = tiny(seed=3)
        torch.manual_seed(5)  # the same maps
        wrapped = MaskSD(model, MaskSDConfig(lmvsd=FEATURES, checkpoint_branches=checkpointed)).train()
        images, ids, truth = batch(model)
        torch.manual_seed(1)
        out = wrapped(images, ids, truth, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        results[checkpointed] = (out.loss.detach(), {n: p.grad for n, p in wrapped.named_parameters() if p.grad is not None})
    (loss_a, grads_a), (loss_b, grads_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert {f"branches.lmvsd.masker.maps.{i}" for i in range(3)} <= grads_a.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
