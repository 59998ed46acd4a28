import copy
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from masksd import BranchConfig, Embeddings, MaskSD, MaskSDConfig, MaskSDOutput, segmentation_loss
from tests.toys import ConvGRU, ToyViT, colour_task

ABLATIONS = {
    "default": MaskSDConfig(),
    "baseline": MaskSDConfig.baseline(),
    "lmvsd_only": MaskSDConfig(vmlsd=BranchConfig(enabled=False)),
    "vmlsd_only": MaskSDConfig(lmvsd=BranchConfig(enabled=False)),
    "not_shared": MaskSDConfig(share_weights=False),
    "no_masking": MaskSDConfig(masking=False),
    "ground_truth": MaskSDConfig(supervision="ground_truth"),
    "hard_target": MaskSDConfig(target="hard", threshold=0.4),
    "teacher_flow": MaskSDConfig(teacher_gradient="flow"),
    "select_bottom": MaskSDConfig(lmvsd=BranchConfig(select="bottom"), vmlsd=BranchConfig(select="bottom")),
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Spy:
    """Counts calls to a segmenter's embed/encode methods and to every decode head."""

    def __init__(self, model: MaskSD):
        self.calls = Counter()
        seg = model.segmenter
        for name in ("embed_image", "encode_image", "embed_text", "encode_text"):
            setattr(seg, name, self._counting(name, getattr(seg, name)))
        heads = [seg.decode_head] + [b.head for b in model.branches.values() if b.head is not None]
        for head in heads:
            head.register_forward_pre_hook(lambda *_: self.calls.update(["decode"]))

    def _counting(self, name, fn):
        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped


@pytest.fixture
def batch():
    return colour_task(4, seed=1)


@pytest.mark.parametrize("segmenter_cls", [ToyViT, ConvGRU])
def test_eval_output_is_the_bare_segmenters_bit_for_bit(segmenter_cls, batch):
    images, ids, masks = batch
    torch.manual_seed(0)
    segmenter = segmenter_cls()
    model = MaskSD(segmenter).train()
    model(images, ids, masks).loss.backward()  # a training step must not change what eval computes
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images, ids), segmenter(images, ids))


def test_main_branch_in_training_is_the_segmenters_forward(batch):
    images, ids, masks = batch
    torch.manual_seed(0)
    model = MaskSD(ToyViT(), MaskSDConfig.baseline())
    model.train()
    torch.manual_seed(3)
    out = model(images, ids, masks)
    torch.manual_seed(3)
    assert torch.equal(out.logits, model.segmenter(images, ids))  # same dropout draws


@pytest.mark.parametrize("segmenter_cls", [ToyViT, ConvGRU])
def test_extra_parameters_are_exactly_the_two_mask_tokens(segmenter_cls):
    segmenter = segmenter_cls()
    bare = n_params(segmenter)
    model = MaskSD(segmenter)
    assert n_params(model) - bare == segmenter.image_embed_dim + segmenter.text_embed_dim
    tokens = {n for n, _ in model.named_parameters() if not n.startswith("segmenter.")}
    assert tokens == {"branches.lmvsd.masker.mask_token", "branches.vmlsd.masker.mask_token"}


def test_unshared_heads_add_one_head_copy_per_branch():
    segmenter = ToyViT()
    bare, head = n_params(segmenter), n_params(segmenter.decode_head)
    model = MaskSD(segmenter, MaskSDConfig(share_weights=False))
    assert n_params(model) - bare == 2 * head + segmenter.image_embed_dim + segmenter.text_embed_dim
    lmvsd_only = MaskSD(ToyViT(), MaskSDConfig(share_weights=False, vmlsd=BranchConfig(enabled=False)))
    assert n_params(lmvsd_only) - bare == head + segmenter.image_embed_dim
    assert n_params(MaskSD(ToyViT(), MaskSDConfig(masking=False))) == bare  # no mask tokens without masking
    assert n_params(MaskSD(ToyViT(), MaskSDConfig.baseline())) == bare


@pytest.mark.parametrize(
    "name, expected",
    [
        ("default", {"embed_image": 1, "embed_text": 1, "encode_image": 2, "encode_text": 2, "decode": 3}),
        ("not_shared", {"embed_image": 1, "embed_text": 1, "encode_image": 2, "encode_text": 2, "decode": 3}),
        ("no_masking", {"embed_image": 1, "embed_text": 1, "encode_image": 2, "encode_text": 2, "decode": 3}),
        ("lmvsd_only", {"embed_image": 1, "embed_text": 1, "encode_image": 2, "encode_text": 1, "decode": 2}),
        ("vmlsd_only", {"embed_image": 1, "embed_text": 1, "encode_image": 1, "encode_text": 2, "decode": 2}),
        ("baseline", {"embed_image": 1, "embed_text": 1, "encode_image": 1, "encode_text": 1, "decode": 1}),
    ],
)
def test_encoders_and_decoder_run_exactly_as_often_as_specified(name, expected, batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT(), ABLATIONS[name]).train()
    spy = Spy(model)
    model(images, ids, masks)
    assert dict(spy.calls) == expected
    spy.calls.clear()
    model.eval()
    model(images, ids)
    assert dict(spy.calls) == {"embed_image": 1, "embed_text": 1, "encode_image": 1, "encode_text": 1, "decode": 1}


def test_branches_decode_with_the_other_modalitys_unmasked_features(batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT()).train()
    seen = []
    model.segmenter.decode_head.register_forward_pre_hook(lambda _m, args: seen.append(args))
    model(images, ids, masks)
    (main_v, main_t), (lm_v, lm_t), (vm_v, vm_t) = seen
    assert lm_t is main_t and lm_v is not main_v  # LMVSD re-encodes the image, reuses the text
    assert vm_v is main_v and vm_t is not main_t  # VMLSD re-encodes the text, reuses the image


def test_training_output_adds_weighted_parts(batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT()).train()
    out = model(images, ids, masks)
    assert isinstance(out, MaskSDOutput)
    assert torch.allclose(out.loss, out.seg_loss + out.lmvsd_loss + out.vmlsd_loss)
    assert torch.allclose(out.seg_loss, F.binary_cross_entropy_with_logits(out.logits, F.interpolate(masks, size=out.logits.shape[-2:])))
    assert out.image_masked.shape == (4, 16) and out.text_masked.shape == ids.shape
    assert out.image_masked.sum(dim=1).tolist() == [2] * 4  # K=0.5 of 16 patches -> 8, α=0.25 -> 2
    assert not (out.text_masked & (ids < 3)).any()  # never SOT, EOT or padding
    assert set(out.parts()) == {"loss", "seg", "lmvsd", "vmlsd"}

    # λ scales the branch loss linearly
    torch.manual_seed(0)
    half = MaskSD(ToyViT(), MaskSDConfig(lmvsd=BranchConfig(weight=0.375)))
    half.load_state_dict(model.state_dict())
    half.train()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    model.eval(), half.eval()  # disable dropout but call the training path explicitly
    model.training = half.training = True
    a = model(images, ids, masks, generator=g1)
    b = half(images, ids, masks, generator=g2)
    assert torch.allclose(b.lmvsd_loss, a.lmvsd_loss / 2)


def test_mask_tokens_get_gradient_and_teacher_logits_get_none(batch):
    images, ids, masks = batch
    ids = ids.clone()
    ids[:, 1:5] = torch.tensor([3, 4, 5, 2])  # three real words
    # K=1, α=0.5: round(1.5) = 2 words masked per sample (the paper's α=0.1 would mask none of 3 words)
    model = MaskSD(ToyViT(), MaskSDConfig(vmlsd=BranchConfig(top_k=1.0, ratio=0.5, weight=0.1))).train()
    out = model(images, ids, masks)
    assert out.text_masked.sum(dim=1).tolist() == [2] * 4
    distill = out.lmvsd_loss + out.vmlsd_loss
    (teacher_grad,) = torch.autograd.grad(distill, out.logits, retain_graph=True, allow_unused=True)
    assert teacher_grad is None or (teacher_grad == 0).all()
    out.loss.backward()
    for name in ("lmvsd", "vmlsd"):
        grad = model.branches[name].masker.mask_token.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_generator_makes_masking_reproducible(batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT())
    model.eval()
    model.training = True  # training path without dropout
    a = model(images, ids, masks, generator=torch.Generator().manual_seed(1))
    b = model(images, ids, masks, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.image_masked, b.image_masked) and torch.equal(a.loss, b.loss)


def test_no_masking_runs_branches_on_the_unmasked_embeddings(batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT(), MaskSDConfig(masking=False))
    model.eval()
    model.training = True  # without dropout the unmasked branch reproduces the main prediction
    out = model(images, ids, masks)
    assert not out.image_masked.any() and not out.text_masked.any()
    expected = 0.75 * F.binary_cross_entropy_with_logits(out.logits, torch.sigmoid(out.logits))
    assert torch.allclose(out.lmvsd_loss, expected, atol=1e-6)


@pytest.mark.parametrize("segmenter_cls", [ToyViT, ConvGRU])
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_trains_with_decreasing_loss(segmenter_cls, name):
    torch.manual_seed(0)
    model = MaskSD(segmenter_cls(), ABLATIONS[name]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        images, ids, masks = colour_task(16, seed=step % 4)
        out = model(images, ids, masks)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.seg_loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_bad_input_is_rejected_with_a_named_argument(batch):
    images, ids, masks = batch
    with pytest.raises(TypeError, match="segmenter"):
        MaskSD(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config"):
        MaskSD(ToyViT(), {"lmvsd": {}})
    with pytest.raises(ValueError, match="lmvsd.top_k"):
        MaskSDConfig(lmvsd=BranchConfig(top_k=0.0))
    with pytest.raises(ValueError, match="vmlsd.ratio"):
        MaskSDConfig(vmlsd=BranchConfig(ratio=1.5))
    with pytest.raises(ValueError, match="lmvsd.weight"):
        MaskSDConfig(lmvsd=BranchConfig(weight=-1))
    with pytest.raises(ValueError, match="supervision"):
        MaskSDConfig(supervision="gt")

    model = MaskSD(ToyViT()).train()
    with pytest.raises(ValueError, match="ground_truth"):
        model(images, ids)
    with pytest.raises(TypeError, match="ground_truth"):
        model(images, ids, masks.long())
    with pytest.raises(ValueError, match="ground_truth"):
        model(images, ids, masks[:2])
    with pytest.raises(ValueError, match="batch sizes"):
        model(images, ids[:3], masks)
    empty = ids.clone()
    empty[0] = torch.tensor([1, 2, 0, 0, 0, 0])  # SOT EOT: no word
    with pytest.raises(ValueError, match=r"samples \[0\] have no candidate token for vmlsd"):
        model.check_inputs(images, empty, masks)  # value checks run on request (once per epoch in the trainer)
    out = model(images, empty, masks)  # the step itself never reads values: sample 0 just keeps all its words
    assert not out.text_masked[0].any() and out.text_masked[1:].any(dim=1).all()
    bad = masks.clone()
    bad[2, 0, 0, 0] = -0.5
    with pytest.raises(ValueError, match=r"ground_truth values .* samples \[2\]"):
        model.check_inputs(images, ids, bad)
    model.check_inputs(images, ids, masks)


def test_a_segmenter_returning_wrong_shapes_is_named():
    class Broken(ToyViT):
        def embed_image(self, images):
            return Embeddings(super().embed_image(images).tokens[..., :5])

    images, ids, masks = colour_task(2)
    with pytest.raises(ValueError, match="segmenter.embed_image"):
        MaskSD(Broken()).train()(images, ids, masks)


def test_config_replace_keeps_validation():
    with pytest.raises(ValueError, match="threshold"):
        replace(MaskSDConfig(), threshold=1.0)


def test_masked_tokens_reports_what_the_training_step_masks(batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT())
    model.eval()
    image_masked, text_masked = model.masked_tokens(images, ids, generator=torch.Generator().manual_seed(4))
    model.training = True  # the training path, without dropout
    out = model(images, ids, masks, generator=torch.Generator().manual_seed(4))
    assert torch.equal(image_masked, out.image_masked) and torch.equal(text_masked, out.text_masked)
    assert MaskSD(ToyViT(), MaskSDConfig.baseline()).masked_tokens(images, ids) == (None, None)


def test_branch_presets_keep_each_branchs_paper_values():
    from masksd.config import PAPER_BRANCHES

    lm, vm = BranchConfig.lmvsd(), BranchConfig.vmlsd()
    assert (lm.top_k, lm.ratio, lm.weight) == (0.5, 0.25, 0.75)
    assert (vm.top_k, vm.ratio, vm.weight) == (0.5, 0.1, 0.1)
    assert MaskSDConfig().lmvsd == lm and MaskSDConfig().vmlsd == vm
    assert {k: getattr(vm, k) for k in PAPER_BRANCHES["vmlsd"]} == PAPER_BRANCHES["vmlsd"]
    # a partial override keeps the other values of the branch it is given to, not LMVSD's
    partial = MaskSDConfig(vmlsd=BranchConfig(top_k=0.7))
    assert (partial.vmlsd.top_k, partial.vmlsd.ratio, partial.vmlsd.weight) == (0.7, 0.1, 0.1)
    assert MaskSDConfig(lmvsd=BranchConfig(ratio=0.5)).lmvsd == BranchConfig.lmvsd(ratio=0.5)
    assert BranchConfig.vmlsd(weight=0.3).weight == 0.3 and BranchConfig.vmlsd(weight=0.3).ratio == 0.1
    with pytest.raises(ValueError, match="vmlsd.ratio"):
        BranchConfig.vmlsd(ratio=2.0)


def test_a_branch_config_tied_to_no_branch_says_which_preset_to_use():
    from masksd.wrapper import DistillBranch

    assert not BranchConfig().resolved and BranchConfig.lmvsd().resolved
    with pytest.raises(ValueError, match=r"BranchConfig.lmvsd\(...\) or BranchConfig.vmlsd\(...\)"):
        DistillBranch(BranchConfig(top_k=0.5), 8, MaskSDConfig(), None)
    with pytest.raises(TypeError, match="vmlsd must be a BranchConfig"):
        MaskSDConfig(vmlsd={"top_k": 0.5})


def test_vmlsd_preset_masks_one_word_of_every_sentence_and_min_masked_zero_is_the_literal_formula(batch):
    images, ids, masks = batch  # sentences of 1-3 real words
    model = MaskSD(ToyViT())
    model.eval()
    model.training = True
    out = model(images, ids, masks)
    assert out.text_masked.sum(dim=1).tolist() == [1] * 4
    literal = MaskSD(ToyViT(), MaskSDConfig(vmlsd=BranchConfig(min_masked=0)))
    literal.eval()
    literal.training = True
    assert not literal(images, ids, masks).text_masked.any()  # round(0.1 * ceil(0.5 * n)) = 0 for n < 9
    assert MaskSDConfig().lmvsd.min_masked == 0 and MaskSDConfig().vmlsd.min_masked == 1
    with pytest.raises(ValueError, match="vmlsd.min_masked"):
        MaskSDConfig(vmlsd=BranchConfig(min_masked=-1))


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_branch_norm_stats_leave_what_the_main_branch_left(batch):
    from masksd.wrapper import frozen_norm_stats

    images, ids, masks = batch
    torch.manual_seed(0)
    segmenter = ConvGRU()
    segmenter.decode_head.out = torch.nn.Sequential(torch.nn.BatchNorm2d(segmenter.image_embed_dim), segmenter.decode_head.out)
    start = copy.deepcopy(segmenter.state_dict())
    runs = {}
    for stats in ("update", "freeze"):
        segmenter.load_state_dict(start)
        torch.manual_seed(5)  # the same mask tokens
        model = MaskSD(segmenter, MaskSDConfig(branch_norm_stats=stats)).train()
        torch.manual_seed(1)
        out = model(images, ids, masks, generator=torch.Generator().manual_seed(2))
        runs[stats] = (out.loss.detach(), _bn_state(segmenter))
    segmenter.load_state_dict(start)
    segmenter.train()
    torch.manual_seed(1)
    segmenter(images, ids)  # the main branch alone
    main_only = _bn_state(segmenter)
    assert torch.equal(runs["freeze"][0], runs["update"][0])  # batch statistics still normalise the branches
    assert all(torch.equal(runs["freeze"][1][k], v) for k, v in main_only.items())
    assert not all(torch.equal(runs["update"][1][k], v) for k, v in main_only.items())
    norm = segmenter.decode_head.out[0]
    with frozen_norm_stats(segmenter):
        assert not norm.track_running_stats
    assert norm.track_running_stats


@pytest.mark.parametrize("segmenter_cls", [ToyViT, ConvGRU])
def test_checkpointed_branches_give_the_same_loss_and_gradients(segmenter_cls, batch):
    images, ids, masks = batch
    torch.manual_seed(0)
    segmenter = segmenter_cls()
    if segmenter_cls is ConvGRU:  # BatchNorm must not be updated twice by the recomputation
        segmenter.decode_head.out = torch.nn.Sequential(torch.nn.BatchNorm2d(segmenter.image_embed_dim), segmenter.decode_head.out)
    start = copy.deepcopy(segmenter.state_dict())
    results = {}
    for checkpointed in (False, True):
        segmenter.load_state_dict(start)
        torch.manual_seed(5)  # the same mask tokens
        model = MaskSD(segmenter, MaskSDConfig(checkpoint_branches=checkpointed)).train()  # dropout on
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = model(images, ids, masks, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[checkpointed] = (out.loss.detach(), grads, _bn_state(segmenter))
    (loss_a, grads_a, bn_a), (loss_b, grads_b, bn_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(torch.equal(bn_a[k], bn_b[k]) for k in bn_a)


def test_checkpointed_branches_keep_fewer_activations(batch):
    images, ids, masks = batch

    def saved_bytes(model):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(images, ids, masks)
        return sum(seen.values())

    torch.manual_seed(0)
    segmenter = ToyViT()
    plain = saved_bytes(MaskSD(segmenter).train())
    checkpointed = saved_bytes(MaskSD(segmenter, MaskSDConfig(checkpoint_branches=True)).train())
    baseline = saved_bytes(MaskSD(segmenter, MaskSDConfig.baseline()).train())
    assert baseline < checkpointed < plain
    # the branches' activations are what checkpointing drops: what stays is close to the baseline's
    assert (checkpointed - baseline) < 0.25 * (plain - baseline)


def test_distill_scale_multiplies_only_the_branch_losses(batch):
    images, ids, masks = batch
    model = MaskSD(ToyViT())
    model.eval()
    model.training = True  # no dropout: both calls see the same network
    full = model(images, ids, masks, generator=torch.Generator().manual_seed(0))
    half = model(images, ids, masks, generator=torch.Generator().manual_seed(0), distill_scale=0.5)
    assert torch.equal(full.seg_loss, half.seg_loss)
    assert torch.allclose(half.lmvsd_loss, full.lmvsd_loss / 2) and torch.allclose(half.vmlsd_loss, full.vmlsd_loss / 2)
    none = model(images, ids, masks, distill_scale=0.0)
    assert torch.allclose(none.loss, none.seg_loss)


def test_frozen_norm_stats_and_checkpointing_together(batch):
    images, ids, masks = batch
    torch.manual_seed(0)
    segmenter = ConvGRU()
    start = copy.deepcopy(segmenter.state_dict())
    results = {}
    for checkpointed in (False, True):
        segmenter.load_state_dict(start)
        torch.manual_seed(5)
        model = MaskSD(segmenter, MaskSDConfig(branch_norm_stats="freeze", checkpoint_branches=checkpointed)).train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = model(images, ids, masks, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        results[checkpointed] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                                 _bn_state(segmenter))
    (loss_a, grads_a, bn_a), (loss_b, grads_b, bn_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b) and all(torch.equal(bn_a[k], bn_b[k]) for k in bn_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def _main_logits_grad(model, batch, with_seg: bool):
    """The gradient at the main logits of the whole loss (or of the branch losses alone)."""
    images, ids, masks = batch
    model.eval()
    model.training = True  # the training path without dropout
    out = model(images, ids, masks, generator=torch.Generator().manual_seed(0))
    out.logits.retain_grad()
    (out.loss if with_seg else out.lmvsd_loss + out.vmlsd_loss).backward()
    return out, out.logits.grad


@pytest.mark.parametrize("target", ["soft", "hard"])
def test_detached_teacher_gives_the_main_logits_only_the_segmentation_gradient(target, batch):
    torch.manual_seed(0)
    model = MaskSD(ToyViT(), MaskSDConfig(target=target))
    out, grad = _main_logits_grad(model, batch, with_seg=True)
    (seg_only,) = torch.autograd.grad(segmentation_loss(out.logits, batch[2]), out.logits)
    assert torch.equal(grad, seg_only)  # the branch losses add nothing at the main logits
    _, branch_grad = _main_logits_grad(model, batch, with_seg=False)
    assert branch_grad is None or (branch_grad == 0).all()


def test_flowing_teacher_gives_the_main_logits_the_branch_losses_gradient(batch):
    torch.manual_seed(0)
    segmenter = ToyViT()
    model = MaskSD(segmenter, MaskSDConfig(teacher_gradient="flow"))
    seen = []  # the main, LMVSD and VMLSD logits, in call order
    segmenter.decode_head.register_forward_hook(lambda _m, _a, logits: seen.append(logits.detach()))
    out, grad = _main_logits_grad(model, batch, with_seg=False)
    _, lm_student, vm_student = seen
    # λ·d BCE(s, σ(t))/dt = λ·(-s)·σ'(t)/n per branch, s its student logits (same size as t here)
    p = torch.sigmoid(out.logits.detach())
    expected = sum(w * -s * p * (1 - p) / s.numel() for w, s in ((0.75, lm_student), (0.1, vm_student)))
    assert (grad != 0).all()
    torch.testing.assert_close(grad, expected)
    # the whole loss: the segmentation gradient plus that
    _, full = _main_logits_grad(model, batch, with_seg=True)
    (seg_only,) = torch.autograd.grad(segmentation_loss(out.logits, batch[2]), out.logits)
    torch.testing.assert_close(full, seg_only + expected)


@pytest.mark.parametrize("kwargs", [{"target": "hard"}, {"supervision": "ground_truth"}])
def test_a_flowing_teacher_without_a_soft_distillation_target_is_refused_by_name(kwargs):
    with pytest.raises(ValueError, match="teacher_gradient='flow' needs supervision='distill' and target='soft'"):
        MaskSDConfig(teacher_gradient="flow", **kwargs)
    with pytest.raises(ValueError, match="teacher_gradient must be one of"):
        MaskSDConfig(teacher_gradient="stop")


def test_bottom_selection_masks_only_among_the_least_correlated_patches(batch):
    images, ids, masks = batch
    torch.manual_seed(0)
    model = MaskSD(ToyViT(), MaskSDConfig(lmvsd=BranchConfig(select="bottom", ratio=1.0)))
    model.eval()
    model.training = True
    out = model(images, ids, masks)
    seg = model.segmenter
    visual = seg.encode_image(seg.embed_image(images))
    text = seg.encode_text(seg.embed_text(ids))
    scores = torch.einsum("bnd,bd->bn", visual.tokens, text.pooled)  # (B, 16)
    lowest = scores.argsort(dim=1)[:, :8]  # K = 0.5 of 16, α = 1: exactly the 8 lowest-scoring patches
    assert torch.equal(out.image_masked, torch.zeros_like(out.image_masked).scatter(1, lowest, True))
    assert model.branches["lmvsd"].filter.direction == "bottom" and model.branches["vmlsd"].filter.direction == "top"
    with pytest.raises(ValueError, match="lmvsd.select must be one of"):
        MaskSDConfig(lmvsd=BranchConfig(select="random"))


def test_the_features_site_needs_the_optional_protocol_and_vmlsd_refuses_it():
    with pytest.raises(TypeError, match=r"lmvsd.site='features' needs .* ToyViT lacks .*feature_map_layout.*decode_head.feature_maps"):
        MaskSD(ToyViT(), MaskSDConfig(lmvsd=BranchConfig(site="features")))
    with pytest.raises(ValueError, match="vmlsd.site must be 'embedding'"):
        MaskSDConfig(vmlsd=BranchConfig(site="features"))
    with pytest.raises(ValueError, match="lmvsd.site must be one of"):
        MaskSDConfig(lmvsd=BranchConfig(site="pixels"))
    MaskSD(ToyViT(), MaskSDConfig(lmvsd=BranchConfig(site="features", enabled=False)))  # a branch that is off needs nothing


def test_maskris_preset_is_maskris_as_published():
    from masksd.config import MASKRIS_BRANCHES

    m = MaskSDConfig.maskris()
    assert (m.lmvsd.site, m.lmvsd.top_k, m.lmvsd.ratio, m.lmvsd.weight, m.lmvsd.draw) == ("input", 1.0, 0.75, 0.5, "count")
    assert (m.vmlsd.site, m.vmlsd.top_k, m.vmlsd.ratio, m.vmlsd.weight, m.vmlsd.draw) == ("input", 1.0, 0.15, 0.5, "bernoulli")
    assert m.lmvsd.min_masked == m.vmlsd.min_masked == 0  # MaskRIS draws no minimum
    assert (m.target, m.teacher_gradient, m.supervision, m.masking, m.views) == ("soft", "detach", "distill", True, "combined")
    assert m.lmvsd.select == m.vmlsd.select == "top"
    assert {k: getattr(m.vmlsd, k) for k in MASKRIS_BRANCHES["vmlsd"]} == MASKRIS_BRANCHES["vmlsd"]
    assert MaskSDConfig.maskris(share_weights=False).share_weights is False
    assert MaskSDConfig.maskris(lmvsd=BranchConfig(enabled=False)).lmvsd.ratio == 0.25  # a whole field replaced


def test_checkpointed_branches_with_separate_heads_recompute_each_branch_with_its_own_head(batch):
    images, ids, masks = batch
    torch.manual_seed(0)
    segmenter = ToyViT()
    start = copy.deepcopy(segmenter.state_dict())
    results = {}
    for checkpointed in (False, True):
        segmenter.load_state_dict(start)
        torch.manual_seed(5)  # the same mask tokens and head copies
        model = MaskSD(segmenter, MaskSDConfig(share_weights=False, checkpoint_branches=checkpointed))
        with torch.no_grad():  # heads that have trained apart (as copies they start equal)
            for p in model.branches["vmlsd"].head.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.zero_grad(set_to_none=True)
        model.eval()
        model.training = True  # no dropout
        out = model(images, ids, masks, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        results[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert results[False].keys() == results[True].keys()
    for name in results[False]:
        torch.testing.assert_close(results[True][name], results[False][name], rtol=1e-5, atol=1e-6, msg=name)
