"""masksd.integrations on open_clip (and OpenAI CLIP's layout), the decode-head contract, and verify_segmenter."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import open_clip
import pytest
import torch
from einops import rearrange
from torch import nn

from examples.cris import TINY_CLIP
from examples.cris.backbone import register_model_configs
from masksd import Features, MaskSD, SegmenterCheckError, verify_segmenter
from masksd.integrations import ImageContext, OpenCLIPTowers, TextContext, TowerSegmenter
from tests.toys import EOT, PAD, SOT, ToyViT, colour_task

SENTENCES = ["the red car on the left", "a man"]


def tiny_clip(seed: int = 0, **kwargs) -> open_clip.CLIP:
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_CLIP, **kwargs).eval()


def tokenizer():
    return open_clip.get_tokenizer(TINY_CLIP)


class LevelHead(nn.Module):
    """A user's decode head: the deepest requested level gated by the sentence feature."""

    def __init__(self, width: int = 64, joint: int = 64):
        super().__init__()
        self.gate = nn.Linear(joint, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, visual: Features, text: Features) -> torch.Tensor:
        return self.decode(visual.context.levels, text.pooled)

    def decode(self, levels: list[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        return self.out(levels[-1] * self.gate(sentence)[:, :, None, None])  # (B, 1, h, w)


def user_forward(clip: open_clip.CLIP, head: LevelHead):
    """The user's own model, written against open_clip alone: the reference the towers must equal."""

    def forward(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        levels = clip.visual.forward_intermediates(images, indices=[1, 2], intermediates_only=True)["image_intermediates"]
        return head.decode(levels, clip.encode_text(ids))

    return forward


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- OpenCLIPTowers against open_clip's own forward ------------------------------------------------


@pytest.mark.parametrize("context_length", [77, 17])
def test_open_clip_towers_equal_open_clips_own_encoders(context_length):
    clip, tok = tiny_clip(), tokenizer()
    towers = OpenCLIPTowers(clip, tok, layers=(2, 0))
    x, ids = images(), tok(SENTENCES, context_length=context_length)
    captured = {}
    hooks = [clip.visual.transformer.resblocks[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)) for i in (0, 2)]
    hooks.append(clip.visual.ln_post.register_forward_hook(lambda m, a, o: captured.__setitem__("ln_post", o)))
    with torch.no_grad():
        visual = towers.encode_image(towers.embed_image(x))
        text = towers.encode_text(towers.embed_text(ids))
        assert torch.equal(visual.pooled, clip.encode_image(x))
        assert torch.equal(text.pooled, clip.encode_text(tok(SENTENCES)))  # the causal mask makes 17 == 77 exactly
    for hook in hooks:
        hook.remove()
    assert torch.equal(visual.tokens, captured["ln_post"][:, 1:] @ clip.visual.proj)  # (B, 64, D)
    assert isinstance(visual.context, ImageContext) and visual.context.grid == (8, 8)
    for level, block in zip(visual.context.levels, (2, 0)):  # in the order asked
        assert torch.equal(level, rearrange(captured[block][:, 1:], "b (h w) c -> b c h w", h=8))
    assert isinstance(text.context, TextContext) and text.context.words is text.tokens
    assert text.tokens.shape == (2, context_length, 64)


def test_candidates_are_the_real_words_only():
    clip, tok = tiny_clip(), tokenizer()
    towers = OpenCLIPTowers(clip, tok)
    ids = tok(SENTENCES, context_length=12)  # SOT the red car on the left EOT | SOT a man EOT pad...
    embedded = towers.embed_text(ids)
    assert embedded.candidates.tolist() == [[False] + [True] * 6 + [False] * 5, [False, True, True] + [False] * 9]
    assert towers.special_token_ids == {tok.sot_token_id, tok.eot_token_id}
    padding = towers.encode_text(embedded).context.padding
    assert padding.tolist()[1] == [False] * 4 + [True] * 8
    assert towers.image_embed_dim == 64 and towers.text_embed_dim == 64


def test_towers_hold_the_clip_modules_under_their_own_names():
    clip = tiny_clip()
    towers = OpenCLIPTowers(clip, tokenizer())
    expected = {k for k in clip.state_dict() if k != "logit_scale"}
    assert set(towers.clip_state_dict()) == expected
    assert towers.visual is clip.visual and towers.token_embedding is clip.token_embedding  # shared, not copied


def test_towers_refuse_what_they_cannot_split_exactly():
    tok = tokenizer()
    with pytest.raises(ValueError, match="patch dropout"):
        OpenCLIPTowers(tiny_clip(force_patch_dropout=0.5), tok)
    resnet = tiny_clip()
    resnet.visual = open_clip.model.ModifiedResNet(layers=(1, 1, 1, 1), output_dim=64, heads=2, image_size=64, width=16)
    with pytest.raises(ValueError, match="ModifiedResNet is not a ViT"):
        OpenCLIPTowers(resnet, tok)
    pooled = tiny_clip()
    pooled.visual.attn_pool = nn.Identity()
    with pytest.raises(ValueError, match="attention pooling"):
        OpenCLIPTowers(pooled, tok)
    custom = nn.Module()
    custom.text, custom.visual = nn.Module(), tiny_clip().visual
    with pytest.raises(ValueError, match="separate text tower"):
        OpenCLIPTowers(custom, tok)
    with pytest.raises(ValueError, match="tokenizer"):
        OpenCLIPTowers(tiny_clip())
    with pytest.raises(ValueError, match="layers"):
        OpenCLIPTowers(tiny_clip(), tok, layers=(3,))


def test_towers_name_bad_inputs():
    towers = OpenCLIPTowers(tiny_clip(), tokenizer())
    with pytest.raises(ValueError, match="force_image_size"):
        towers.embed_image(images(size=96))
    with pytest.raises(ValueError, match=r"images must be a float tensor \(B, 3, H, W\)"):
        towers.embed_image(torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match="token_ids must be a \\(B, L\\) long tensor"):
        towers.embed_text(torch.zeros(2, 17))
    with pytest.raises(ValueError, match="2..77 columns"):
        towers.embed_text(torch.zeros(2, 78, dtype=torch.long))


# -- OpenAI CLIP's layout (the CLIP vendored in CRIS.pytorch and ETRIS) ----------------------------


class SeqFirstBlock(nn.Module):
    """A residual attention block in OpenAI's layout: (L, B, C) input, the attention mask stored in the block."""

    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class SeqFirstTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.resblocks = nn.Sequential(*[SeqFirstBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class OpenAIStyleCLIP(nn.Module):
    """OpenAI CLIP's attribute layout and forward (as vendored by CRIS.pytorch), tiny."""

    def __init__(self, width: int = 32, embed_dim: int = 24, context_length: int = 8, vocab: int = 50):
        super().__init__()
        visual = nn.Module()
        visual.conv1 = nn.Conv2d(3, width, 8, stride=8, bias=False)
        visual.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        visual.positional_embedding = nn.Parameter(torch.randn(17, width) * 0.1)  # 4x4 grid + class
        visual.ln_pre, visual.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        visual.transformer = SeqFirstTransformer(width, 2, 4)
        visual.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
        self.visual = visual
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.transformer = SeqFirstTransformer(width, 2, 4, mask)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(image).flatten(2).permute(0, 2, 1)
        x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return v.ln_post(x[:, 0, :]) @ v.proj

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def test_openai_layout_splits_exactly():
    torch.manual_seed(0)
    clip = OpenAIStyleCLIP().eval()
    towers = OpenCLIPTowers(clip, special_token_ids=(48, 49), layers=(1,))  # SOT 48, EOT 49 (the highest id)
    x = images(size=32)
    ids = torch.tensor([[48, 5, 6, 7, 49, 0, 0, 0], [48, 9, 49, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        visual = towers.encode_image(towers.embed_image(x))
        embedded = towers.embed_text(ids)
        text = towers.encode_text(embedded)
        assert torch.equal(visual.pooled, clip.encode_image(x))
        assert torch.equal(text.pooled, clip.encode_text(ids))
    assert towers.layout == "openai" and visual.context.levels[0].shape == (2, 32, 4, 4)
    assert embedded.candidates.tolist() == [[False, True, True, True] + [False] * 4, [False, True] + [False] * 6]
    with pytest.raises(ValueError, match="8 columns"):
        towers.embed_text(ids[:, :6])


# -- TowerSegmenter, the decode-head contract, MaskSD ----------------------------------------------


def open_clip_segmenter(seed: int = 0) -> tuple[TowerSegmenter, open_clip.CLIP, LevelHead]:
    clip = tiny_clip(seed)
    head = LevelHead()
    # LevelHead reads no projected image feature: ln_post and proj feed only MaskSD's no-grad correlation.
    clip.visual.ln_post.requires_grad_(False)
    clip.visual.proj.requires_grad_(False)
    return TowerSegmenter(OpenCLIPTowers(clip, tokenizer(), layers=(1, 2)), head), clip, head


def test_tower_segmenter_equals_the_users_own_model_and_trains_the_mask_tokens():
    segmenter, clip, head = open_clip_segmenter()
    x, ids = images(), tokenizer()(SENTENCES)  # open_clip's encode_text takes the full 77 positions
    report = verify_segmenter(segmenter, x, ids, reference=user_forward(clip, head))
    assert not report.skipped  # every check ran, the reference included
    assert re.search(r"13 checks passed(, 1 with a warning)?, 0 skipped", str(report))  # random CLIP: maybe no joint space yet
    model = MaskSD(segmenter).eval()
    with torch.no_grad():
        assert torch.equal(model(x, ids), user_forward(clip, head)(x, ids))
    model.train()
    truth = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    model(x, ids, truth, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name in ("lmvsd", "vmlsd"):
        assert model.branches[name].masker.mask_token.grad.abs().sum() > 0, name


def test_decode_head_contract_errors_name_decode_head():
    towers = OpenCLIPTowers(tiny_clip(), tokenizer(), layers=(2,))

    class ThreeArgs(nn.Module):
        def forward(self, levels, sentence, grid):
            return levels

    with pytest.raises(TypeError, match=r"decode_head must be an nn.Module called as decode_head\(visual"):
        TowerSegmenter(towers, ThreeArgs())
    with pytest.raises(TypeError, match="segmenter.decode_head"):
        segmenter = TowerSegmenter(towers, LevelHead())
        segmenter.decode_head = ThreeArgs()
        MaskSD(segmenter)

    class Squeezed(LevelHead):
        def forward(self, visual, text):
            return super().forward(visual, text)[:, 0]  # (B, h, w), as CLIPSeg returns

    segmenter = TowerSegmenter(towers, Squeezed())
    ids = tokenizer()(SENTENCES, context_length=17)
    with pytest.raises(ValueError, match=r"decode_head must return float mask logits of shape \(B, 1, h, w\), got shape \(2, 8, 8\): for one channel, return logits.unsqueeze\(1\)"):
        segmenter(images(), ids)
    with pytest.raises(ValueError, match=r"segmenter.decode_head must return .* got shape \(2, 8, 8\)"):
        MaskSD(segmenter).train()(images(), ids, torch.zeros(2, 1, 64, 64))


def test_integrations_import_neither_open_clip_nor_transformers():
    code = "import sys, masksd, masksd.integrations; sys.exit(int('open_clip' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- verify_segmenter on deliberately wrong adapters -----------------------------------------------


class PositionsBeforeMasking(ToyViT):
    def embed_image(self, images):
        embedded = super().embed_image(images)
        return replace(embedded, tokens=embedded.tokens + self.image_pos[1:])

    def encode_image(self, embedded):
        x = torch.cat([self.cls.expand(embedded.tokens.shape[0], 1, -1) + self.image_pos[:1], embedded.tokens], dim=1)
        x = self.image_encoder(x)
        fmap = rearrange(x[:, 1:], "b (h w) c -> b c h w", h=self.grid)
        return Features(tokens=self.image_proj(x[:, 1:]), pooled=self.image_proj(x[:, 0]), context=fmap)


class SOTCandidate(ToyViT):
    special_token_ids = frozenset({SOT, EOT})

    def embed_text(self, ids):
        embedded = super().embed_text(ids)
        return replace(embedded, candidates=(ids != PAD) & (ids != EOT))  # SOT offered for masking


class ForwardNotComposition(ToyViT):
    def forward(self, images, texts):
        return super().forward(images, texts) * 1.0001  # e.g. a temperature the pieces do not apply


class EncoderUnderNoGrad(ToyViT):
    def encode_image(self, embedded):
        with torch.no_grad():  # as CLIPSeg runs CLIP
            return super().encode_image(embedded)


def toy_batch():
    x, ids, _ = colour_task(4)
    ids[:, 2], ids[:, 3] = 3, EOT  # two words per text, so that a repeated word can be checked
    return x, ids


@pytest.mark.parametrize(
    "adapter, check",
    [
        (PositionsBeforeMasking, "embedding_level"),
        (SOTCandidate, "special_tokens"),
        (ForwardNotComposition, "composition"),
        (EncoderUnderNoGrad, "mask_token_gradient"),
        (ToyViT, "unused_parameters"),  # its image projection feeds only the no-grad correlation
    ],
)
def test_verify_names_the_check_each_wrong_adapter_fails(adapter, check):
    torch.manual_seed(0)
    with pytest.raises(SegmenterCheckError) as error:
        verify_segmenter(adapter(), *toy_batch())
    assert error.value.check == check
    assert f"check '{check}' failed" in str(error.value) and "Fix:" in str(error.value)


def test_verify_passes_a_right_adapter_and_leaves_it_as_it_was():
    torch.manual_seed(0)
    toy = ToyViT()
    toy.image_proj.requires_grad_(False)
    toy.train()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    rng = torch.get_rng_state()
    report = verify_segmenter(toy, *toy_batch(), reference=lambda x, t: ToyViT.forward(toy, x, t))
    assert report.skipped == ["special_tokens"]
    assert toy.training and all(m.training for m in toy.modules())
    assert all(torch.equal(v, before[k]) for k, v in toy.state_dict().items())
    assert all(p.grad is None for p in toy.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_verify_reference_catches_a_split_that_is_off_by_rounding():
    segmenter, clip, head = open_clip_segmenter()
    x, ids = images(), tokenizer()(SENTENCES, context_length=17)

    def project_then_pool(x, ids):  # words projected before taking EOT: 1e-7 off open_clip
        levels = clip.visual.forward_intermediates(x, indices=[1, 2], intermediates_only=True)["image_intermediates"]
        t = clip.ln_final(clip.transformer(clip.token_embedding(ids) + clip.positional_embedding[:17], attn_mask=clip.attn_mask[:17, :17]))
        words = t @ clip.text_projection
        return head.decode(levels, words[torch.arange(2), ids.argmax(-1)])

    with pytest.raises(SegmenterCheckError, match="check 'reference' failed: .*max abs difference"):
        verify_segmenter(segmenter, x, ids, reference=project_then_pool)


def test_verify_passes_cris_at_the_features_site():
    from examples.cris import CRIS, CRISConfig
    from masksd import BranchConfig, MaskSDConfig

    torch.manual_seed(0)
    segmenter = CRIS(CRISConfig.tiny())
    ids = segmenter.tokenize(["the red cube", "a small blue ball"])
    report = verify_segmenter(segmenter, images(), ids, config=MaskSDConfig(lmvsd=BranchConfig(site="features")))
    assert [c.name for c in report.checks if c.name == "mask_token_gradient" and c.passed] == ["mask_token_gradient"] * 2
    assert [c.passed for c in report.checks if c.name == "feature_maps"] == [True]


def test_verify_checks_the_features_site_split_where_a_segmenter_offers_it():
    from examples.cris import CRIS, CRISConfig
    from masksd.adapter import FeatureMapLayout

    torch.manual_seed(0)
    segmenter = CRIS(CRISConfig.tiny())
    ids = segmenter.tokenize(["the red cube", "a small blue ball"])
    head_class = type(segmenter.decode_head)

    class Shifted(head_class):  # a forward that is not its own split
        def forward(self, visual, text):
            return super().forward(visual, text) + 1e-3

    segmenter.decode_head.__class__ = Shifted
    with pytest.raises(SegmenterCheckError, match=r"check 'feature_maps' failed: .*differs from decode_head\(visual, text\)"):
        verify_segmenter(segmenter, images(), ids)
    segmenter.decode_head.__class__ = head_class
    assert [c.passed for c in verify_segmenter(segmenter, images(), ids).checks if c.name == "feature_maps"] == [True]

    class WrongGrid(CRIS):
        @property
        def feature_map_layout(self):
            return FeatureMapLayout((4, 4), super().feature_map_layout.shapes)  # the tiny grid is 8 x 8

    wrong = WrongGrid(CRISConfig.tiny())
    with pytest.raises(SegmenterCheckError, match=r"check 'feature_maps' failed: .*grid \(4, 4\) has 16 positions for 64 patch tokens"):
        verify_segmenter(wrong, images(), ids)

    toy = ToyViT()  # no FeatureMapHead: no such check; half of one: refused by name
    toy.image_proj.requires_grad_(False)
    assert "feature_maps" not in [c.name for c in verify_segmenter(toy, *toy_batch()).checks]
    toy.feature_map_layout = FeatureMapLayout((2, 2), ((4, 2, 2),))
    with pytest.raises(SegmenterCheckError, match=r"check 'feature_maps' failed: ToyViT implements part .* lacks decode_head.feature_maps"):
        verify_segmenter(toy, *toy_batch())


def test_lazy_packages_keep_their_submodules_and_functions_apart():
    code = (
        "import masksd, masksd.data.batching\n"
        "from masksd.data import collate\n"
        "assert callable(collate), collate\n"
        "assert masksd.wrapper.MaskSD is masksd.MaskSD\n"  # a submodule, as an eager package binds it
        "import pickle; from masksd import BranchConfig; pickle.loads(pickle.dumps(BranchConfig()))\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
