"""Guidance diagnostics: exact values on hand-made cases, oracles, and the tiny CRIS end to end."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from examples.cris import CRIS, CRISConfig
from examples.pipeline.guidance import measure_guidance
from masksd import BranchConfig, GuidanceMeter, MaskSD, MaskSDConfig, correlation_scores, patch_targets
from masksd.data import SyntheticConfig, SyntheticReferDataset, collate
from masksd.data.synthetic import target_words


@pytest.fixture(scope="module")
def cris():
    torch.manual_seed(0)
    return CRIS(CRISConfig.tiny()).eval()


# ---------------------------------------------------------------- patch_targets


def test_patch_targets_on_a_hand_made_mask():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 1],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    masks = torch.stack([mask, ~mask])  # (2, 4, 6); grid (2, 3) -> 2x2-pixel patches
    # Shares, row-major: mask 1, 1/4, 1/4, 0, 1, 1/2; its complement 0, 3/4, 3/4, 1, 0, 1/2.
    # 1/2 is not "mostly inside" (strictly more than min_share).
    expected = torch.tensor([[1, 0, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(patch_targets(masks, (2, 3)), expected)
    assert torch.equal(patch_targets(masks[:, None].float(), (2, 3)), expected)  # (B, 1, H, W) float
    # min_share 0.2: the quarter-covered patches count too
    assert torch.equal(patch_targets(masks, (2, 3), min_share=0.2)[0], torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool))


def test_patch_targets_follow_the_vit_token_order():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, 32, 48, generator=g) > 0.5).float()
    share = F.avg_pool2d(masks, 8)  # (3, 1, 4, 6)
    expected = rearrange(share, "b c h w -> b (h w) c")[..., 0] > 0.5
    assert torch.equal(patch_targets(masks, (4, 6)), expected)


def test_patch_targets_errors_name_the_argument():
    masks = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="multiples of grid"):
        patch_targets(masks, (3, 3))
    with pytest.raises(ValueError, match="grid"):
        patch_targets(masks, (2,))
    with pytest.raises(ValueError, match="masks"):
        patch_targets(torch.zeros(2, 3, 8, 8), (2, 2))
    with pytest.raises(ValueError, match="masks"):
        patch_targets(torch.zeros(8, 8), (2, 2))
    with pytest.raises(TypeError, match="masks"):
        patch_targets(torch.zeros(2, 8, 8, dtype=torch.long), (2, 2))
    with pytest.raises(ValueError, match="min_share"):
        patch_targets(masks, (2, 2), min_share=1.0)


# ---------------------------------------------------------------- GuidanceMeter, hand-made


def test_patch_metrics_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.5, 0.3, 0.7],
            [0.2, 0.2, 0.2, 0.8, 0.0, 0.4],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # no on-target patch: counts nowhere
        ]
    )
    on = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    meter = GuidanceMeter(top_k_image=0.4)  # ceil(0.4 * 6) = ceil(2.4) = 3 kept (floor or round would keep 2)
    meter.update_patches(scores, on)
    out = meter.compute()
    # Sample 0: on {0.9, 0.5}, off {0.1, 0.5, 0.3, 0.7}. 0.9 beats all 4; 0.5 beats 0.1 and 0.3,
    # ties 0.5 (1/2), loses to 0.7: AUC = 6.5 / 8. Kept: 0.9 (#0), 0.7 (#5), then the 0.5 tie goes
    # to the lower index #2 (on): 2 of 2 on-target kept. Top-1 #0 is on. Top-1 chance 2/6.
    # Sample 1: on {0.2 (#2), 0.0, 0.4}, off {0.2, 0.2, 0.8}. 0.2 ties twice (1), 0.0 wins nothing,
    # 0.4 beats both 0.2 (2): AUC = 3 / 9. Kept: 0.8 (#3), 0.4 (#5), 0.2 tie -> #0 (off): 1 of 3.
    # Top-1 #3 is off. Top-1 chance 3/6.
    assert out["lmvsd_auc"] == pytest.approx((6.5 / 8 + 3 / 9) / 2)
    assert out["lmvsd_kept"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["lmvsd_kept_chance"] == pytest.approx(3 / 6)
    assert out["lmvsd_top1"] == pytest.approx(1 / 2)
    assert out["lmvsd_top1_chance"] == pytest.approx((2 / 6 + 3 / 6) / 2)
    assert out["lmvsd_samples"] == 2 and out["lmvsd_auc_samples"] == 2
    assert not any(k.startswith("vmlsd") for k in out)


def test_all_on_target_counts_for_kept_and_top1_but_not_auc():
    meter = GuidanceMeter(top_k_image=0.5)
    meter.update_patches(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool))
    out = meter.compute()
    # 2 of 4 kept, all on target: kept 2/4 = its chance; top-1 on target, chance 4/4.
    assert out["lmvsd_kept"] == out["lmvsd_kept_chance"] == 0.5
    assert out["lmvsd_top1"] == out["lmvsd_top1_chance"] == 1.0
    assert out["lmvsd_samples"] == 1 and out["lmvsd_auc_samples"] == 0 and math.isnan(out["lmvsd_auc"])


def test_word_precision_by_hand():
    # Row 0: SOT the red circle left of the blue square EOT; row 1: SOT the large green triangle EOT pad...
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.2, 0.6, 0.0, 0.1, 0.3, 0.4, 5.0],
            [9.0, 0.3, 0.9, 0.3, 0.1, 5.0, 7.0, 7.0, 7.0, 7.0],
        ]
    )
    candidates = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    relevant = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    meter = GuidanceMeter(top_k_text=0.4)
    meter.update_words(scores, candidates, relevant)
    out = meter.compute()
    # Row 0: ceil(0.4 * 8) = 4 of the 8 words: 0.6 (left), 0.5 (red), 0.4 (square), 0.3 (blue);
    # SOT/EOT score higher but are no candidates. 1 relevant of 4; chance 2/8.
    # Row 1: ceil(0.4 * 4) = 2: 0.9 (large), then the 0.3 tie goes to #1 ("the"): 1 of 2; chance 3/4.
    assert out["vmlsd_precision"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert out["vmlsd_chance"] == pytest.approx((2 / 8 + 3 / 4) / 2)
    assert out["vmlsd_samples"] == 2
    assert not any(k.startswith("lmvsd") for k in out)


def test_meter_accumulates_over_batches_and_resets():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.3, 0.7], [0.2, 0.2, 0.2, 0.8, 0.0, 0.4]])
    on = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    whole, split = GuidanceMeter(0.4), GuidanceMeter(0.4)
    whole.update_patches(scores, on)
    split.update_patches(scores[:1], on[:1])
    split.update_patches(scores[1:], on[1:])
    assert split.compute() == pytest.approx(whole.compute())
    split.reset()
    with pytest.raises(ValueError, match="never called"):
        split.compute()


def test_meter_errors_name_the_argument():
    with pytest.raises(ValueError, match="top_k"):
        GuidanceMeter(top_k_image=0.0)
    with pytest.raises(ValueError, match="top_k"):
        GuidanceMeter(top_k_text=1.5)
    meter = GuidanceMeter()
    scores, labels = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="scores"):
        meter.update_patches(torch.zeros(8), labels)
    with pytest.raises(TypeError, match="scores"):
        meter.update_patches(torch.zeros(2, 4, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="scores"):
        meter.update_patches(torch.tensor([[0.0, float("nan"), 0.0, 0.0]] * 2), labels)
    with pytest.raises(ValueError, match="on_target"):
        meter.update_patches(scores, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="on_target"):
        meter.update_patches(scores, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="relevant must lie within candidates; samples \\[1\\]"):
        relevant = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
        meter.update_words(scores, torch.tensor([[0, 1, 1, 0]] * 2, dtype=torch.bool), relevant)
    with pytest.raises(TypeError, match="candidates"):
        meter.update_words(scores, torch.ones(2, 4), labels)


# ---------------------------------------------------------------- GuidanceMeter, oracles


@st.composite
def labelled(draw, max_n=40):
    n = draw(st.integers(2, max_n))
    on = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    scores = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))  # few values: many ties
    return torch.tensor([scores], dtype=torch.float32), torch.tensor([on])


@settings(max_examples=100, deadline=None)
@given(labelled(), st.integers(1, 20))
def test_indicator_scores_are_perfect_and_their_negation_worst(sample, twentieths):
    _, on = sample
    top_k = twentieths / 20
    n, n_on = on.shape[1], int(on.sum())
    meter = GuidanceMeter(top_k_image=top_k)
    meter.update_patches(on.float(), on)
    out = meter.compute()
    if n_on == 0:
        assert out["lmvsd_samples"] == 0
        return
    assert out["lmvsd_kept"] == pytest.approx(min(1.0, math.ceil(top_k * n - 1e-6) / n_on))
    assert out["lmvsd_top1"] == 1.0
    if n_on < n:
        assert out["lmvsd_auc"] == 1.0
        worst = GuidanceMeter(top_k_image=top_k)
        worst.update_patches(-on.float(), on)
        assert worst.compute()["lmvsd_auc"] == 0.0


@settings(max_examples=100, deadline=None)
@given(labelled(), st.integers(1, 20))
def test_patch_metrics_match_a_pairwise_oracle(sample, twentieths):
    scores, on = sample
    top_k = twentieths / 20
    s, t = scores[0].tolist(), on[0].tolist()
    pos = [x for x, y in zip(s, t) if y]
    neg = [x for x, y in zip(s, t) if not y]
    meter = GuidanceMeter(top_k_image=top_k)
    meter.update_patches(scores, on)
    out = meter.compute()
    if not pos:
        return
    count = math.ceil(top_k * len(s) - 1e-6)
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))  # best first, ties to the lower index
    assert out["lmvsd_kept"] == pytest.approx(sum(t[i] for i in order[:count]) / len(pos))
    assert out["lmvsd_kept_chance"] == pytest.approx(count / len(s))
    assert out["lmvsd_top1"] == float(t[order[0]])
    assert out["lmvsd_top1_chance"] == pytest.approx(len(pos) / len(s))
    if neg:
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        assert out["lmvsd_auc"] == pytest.approx(wins / (len(pos) * len(neg)))


# ---------------------------------------------------------------- synthetic target words and CRIS alignment


def test_target_words_on_each_form_of_the_grammar():
    assert target_words("the red circle") == [False, True, True]
    assert target_words("the large red circle") == [False, True, True, True]
    assert target_words("the red circle left of the blue square") == [False, True, True] + [False] * 5
    assert target_words("the small green triangle right of the large blue square") == [False, True, True, True] + [False] * 6
    assert target_words("the blue square above the red circle") == [False, True, True] + [False] * 4
    for bad in ("the man on the left", "red circle", "the red circle left of", "the red circle near the blue square", ""):
        with pytest.raises(ValueError, match="not a synthetic expression"):
            target_words(bad)


def test_target_words_flag_exactly_the_targets_attributes_on_real_scenes():
    data = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=40))
    for i in range(len(data)):
        scene = data.scene(i)
        t = scene.objects[scene.target]
        words = scene.text.split()
        flagged = [w for w, f in zip(words, target_words(scene.text)) if f]
        assert flagged in ([t.colour, t.shape], [t.size, t.colour, t.shape])


def test_word_mask_marks_the_target_words_pieces(cris):
    data = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=24))
    texts = [data.scene(i).text for i in range(len(data))]
    ids = cris.tokenize(texts)
    relevant = cris.word_mask(texts, ids, [target_words(t) for t in texts])  # (B, L)
    for row, text in enumerate(texts):
        pieces = [p for p, r in zip(cris.token_strings(ids[row]), relevant[row]) if r]
        assert pieces == [w for w, f in zip(text.split(), target_words(text)) if f]
    assert any(len(t.split()) > 4 for t in texts), "expected relational expressions among the scenes"


def test_word_index_splits_words_into_pieces_and_handles_truncation():
    short = CRIS(CRISConfig.tiny(max_words=6))
    texts = ["The  Orange-ish triangle!", "the large red circle left of the blue square"]
    ids = short.tokenize(texts)
    # Row 0: "the", "orange" "-" "ish", "triangle" "!" are 6 pieces; 4 fit between SOT and EOT.
    # Row 1: 9 words, 4 fit: the large red circle.
    assert short.word_index(texts, ids).tolist() == [[-1, 0, 1, 1, 1, -1], [-1, 0, 1, 2, 3, -1]]
    flags = [[False, True, True], target_words(texts[1])]
    assert short.word_mask(texts, ids, flags).tolist() == [
        [False, False, True, True, True, False],
        [False, False, True, True, True, False],
    ]
    with pytest.raises(ValueError, match="row 1 is not the tokenization"):
        short.word_index(["the red circle", "the blue square"], short.tokenize(["the red circle", "the red square"]))
    with pytest.raises(ValueError, match="texts must be a list of 2 strings"):
        short.word_index(texts[:1], ids)
    with pytest.raises(ValueError, match="flags\\[1\\]"):
        short.word_mask(texts, ids, [[True] * 3, [True]])


# ---------------------------------------------------------------- scores and the pipeline


def test_correlation_scores_rank_as_the_branches_select(cris):
    # ratio 1 masks every token the filters select, so masked_tokens shows the selection itself.
    config = MaskSDConfig(lmvsd=BranchConfig(top_k=0.5, ratio=1.0), vmlsd=BranchConfig(top_k=0.4, ratio=1.0))
    model = MaskSD(cris, config).eval()
    batch = collate([SyntheticReferDataset(SyntheticConfig(split="val", num_samples=4))[i] for i in range(4)])
    ids = cris.tokenize(batch["text"])
    image_masked, text_masked = model.masked_tokens(batch["image"], ids)
    patch_scores, word_scores, candidates = correlation_scores(model, batch["image"], ids)
    assert patch_scores.shape == image_masked.shape == (4, 64) and word_scores.shape == text_masked.shape
    meter = GuidanceMeter(0.5, 0.4)
    assert torch.equal(meter.image_filter.select(torch.ones(4, 1), patch_scores[..., None]), image_masked)
    assert torch.equal(meter.text_filter.select(torch.ones(4, 1), word_scores[..., None], candidates), text_masked)
    bare = correlation_scores(cris, batch["image"], ids)  # a never-wrapped segmenter gives the same
    assert all(torch.equal(a, b) for a, b in zip(bare, (patch_scores, word_scores, candidates)))
    with pytest.raises(TypeError, match="MaskableSegmenter"):
        correlation_scores(torch.nn.Linear(2, 2), batch["image"], ids)


def test_measure_guidance_on_the_tiny_cris(cris):
    data = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=12))
    loader = DataLoader(data, batch_size=4, collate_fn=collate)
    cris.train()
    out = measure_guidance(cris, loader, cris.tokenize, torch.device("cpu"))
    assert cris.training, "measure_guidance must restore the train/eval mode"
    assert set(out) == {
        "lmvsd_auc", "lmvsd_kept", "lmvsd_kept_chance", "lmvsd_top1", "lmvsd_top1_chance",
        "lmvsd_samples", "lmvsd_auc_samples", "vmlsd_precision", "vmlsd_chance", "vmlsd_samples",
    }  # fmt: skip
    for key, value in out.items():
        if not key.endswith("samples"):
            assert 0.0 <= value <= 1.0, key
    assert out["lmvsd_kept_chance"] == 0.5  # ceil(0.5 * 64) = 32 of 64 patches
    assert out["vmlsd_samples"] == 12 and 0 < out["lmvsd_samples"] <= 12
    wrapped = measure_guidance(MaskSD(cris), loader, cris.tokenize, torch.device("cpu"))
    assert wrapped == out
    cris.eval()


def test_measure_guidance_without_synthetic_texts_reports_only_patches(cris):
    data = SyntheticReferDataset(SyntheticConfig(split="val", num_samples=4))
    batch = collate([data[i] for i in range(4)])
    batch["text"] = ["the man on the left", "a red circle", "the red circle", "the dog"]
    out = measure_guidance(cris, [batch], cris.tokenize, torch.device("cpu"))
    assert out["vmlsd_samples"] == 1  # only "the red circle" parses
    batch["text"] = ["the man on the left"] * 4
    out = measure_guidance(cris, [batch], cris.tokenize, torch.device("cpu"))
    assert not any(k.startswith("vmlsd") for k in out) and out["lmvsd_samples"] > 0


def test_readme_guidance_snippet_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "guidance.md").read_text()
    match = re.search(r"<!-- guidance -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/guidance.md lost its guidance block"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(match.group(1), "docs/guidance.md", "exec"), namespace)
    assert namespace["guidance"]["vmlsd_samples"] == 16 and 0 <= namespace["guidance"]["lmvsd_auc"] <= 1
