import pytest
import torch
import torch.nn.functional as F

from masksd import SelfDistillLoss, segmentation_loss
from masksd.loss import check_mask_values


def test_segmentation_loss_is_bce_with_logits():
    logits = torch.randn(3, 1, 8, 8)
    gt = (torch.rand(3, 1, 8, 8) > 0.5).float()
    assert torch.allclose(segmentation_loss(logits, gt), F.binary_cross_entropy_with_logits(logits, gt))
    assert torch.allclose(segmentation_loss(logits, gt[:, 0]), F.binary_cross_entropy_with_logits(logits, gt))


def test_segmentation_loss_downsamples_ground_truth_with_nearest():
    logits = torch.randn(2, 1, 4, 4)
    gt = (torch.rand(2, 1, 16, 16) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, F.interpolate(gt, size=(4, 4), mode="nearest"))
    assert torch.allclose(segmentation_loss(logits, gt), expected)


def test_soft_distillation_target_is_detached_sigmoid_of_teacher():
    student = torch.randn(2, 1, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 1, 6, 6, requires_grad=True)
    loss = SelfDistillLoss(0.75)(student, teacher)
    expected = 0.75 * F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher).detach())
    assert torch.allclose(loss, expected)
    loss.backward()
    assert teacher.grad is None or (teacher.grad == 0).all()
    assert student.grad.abs().sum() > 0


def test_teacher_inside_a_graph_gets_zero_gradient():
    w = torch.ones(1, requires_grad=True)
    teacher = torch.randn(1, 1, 4, 4) * w
    student = torch.randn(1, 1, 4, 4, requires_grad=True)
    SelfDistillLoss(1.0)(student, teacher).backward()
    assert w.grad is None


def test_hard_target_thresholds_the_teacher():
    student = torch.randn(2, 1, 5, 5)
    teacher = torch.randn(2, 1, 5, 5)
    loss = SelfDistillLoss(0.5, target="hard", threshold=0.7)(student, teacher)
    target = (torch.sigmoid(teacher) > 0.7).float()
    assert torch.allclose(loss, 0.5 * F.binary_cross_entropy_with_logits(student, target))


def test_ground_truth_supervision_ignores_teacher():
    student = torch.randn(2, 1, 5, 5)
    gt = (torch.rand(2, 1, 5, 5) > 0.5).float()
    loss = SelfDistillLoss(0.1, supervision="ground_truth")(student, torch.randn(2, 1, 5, 5), gt)
    assert torch.allclose(loss, 0.1 * F.binary_cross_entropy_with_logits(student, gt))
    with pytest.raises(ValueError, match="ground_truth"):
        SelfDistillLoss(0.1, supervision="ground_truth")(student, student)


def test_target_is_resized_to_the_student():
    student = torch.randn(1, 1, 4, 4)
    teacher = torch.randn(1, 1, 8, 8)
    soft = F.interpolate(torch.sigmoid(teacher), size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(SelfDistillLoss(1.0)(student, teacher), F.binary_cross_entropy_with_logits(student, soft))
    hard = F.interpolate((torch.sigmoid(teacher) > 0.5).float(), size=(4, 4), mode="nearest")
    assert torch.allclose(
        SelfDistillLoss(1.0, target="hard")(student, teacher), F.binary_cross_entropy_with_logits(student, hard)
    )


def test_bad_input_names_the_argument():
    logits = torch.randn(2, 1, 4, 4)
    with pytest.raises(TypeError, match="ground_truth"):
        segmentation_loss(logits, torch.ones(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ground_truth"):
        segmentation_loss(logits, torch.ones(4, 4))
    with pytest.raises(ValueError, match="ground_truth"):
        segmentation_loss(logits, torch.ones(3, 1, 4, 4))
    out_of_range = torch.ones(2, 1, 4, 4)
    out_of_range[1, 0, 0, 0] = 2.0
    with pytest.raises(ValueError, match=r"ground_truth values must lie in \[0, 1\].*samples \[1\]"):
        check_mask_values("ground_truth", out_of_range)  # value checks run on request, not in the loss
    check_mask_values("ground_truth", torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="logits"):
        segmentation_loss(torch.randn(2, 4, 4), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="teacher_logits"):
        SelfDistillLoss(1.0)(logits, torch.randn(3, 1, 4, 4))
    with pytest.raises(ValueError, match="student_logits"):
        SelfDistillLoss(1.0)(torch.randn(2, 2, 4, 4), logits)
    for kwargs, name in [
        ({"weight": -1.0}, "weight"),
        ({"weight": 1.0, "target": "fuzzy"}, "target"),
        ({"weight": 1.0, "supervision": "teacher"}, "supervision"),
        ({"weight": 1.0, "threshold": 1.0}, "threshold"),
    ]:
        with pytest.raises(ValueError, match=name):
            SelfDistillLoss(**kwargs)


def test_flowing_teacher_gradient_is_the_bce_derivative_through_the_soft_target():
    student = torch.randn(2, 1, 6, 6)
    teacher = torch.randn(2, 1, 6, 6, requires_grad=True)
    loss = SelfDistillLoss(0.75, teacher_gradient="flow")(student, teacher)
    expected = 0.75 * F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher.detach()))
    assert torch.allclose(loss, expected)  # the value is the detached loss's
    (grad,) = torch.autograd.grad(loss, teacher)
    # d/dt of λ·mean(-(σ(t)·log σ(s) + (1-σ(t))·log(1-σ(s)))) = λ·(-s)·σ'(t) / n
    p = torch.sigmoid(teacher.detach())
    torch.testing.assert_close(grad, 0.75 * -student * p * (1 - p) / student.numel())


def test_flowing_teacher_gradient_passes_the_bilinear_resize():
    teacher = torch.randn(1, 1, 4, 4, requires_grad=True)
    loss = SelfDistillLoss(1.0, teacher_gradient="flow")(torch.randn(1, 1, 8, 8), teacher)
    (grad,) = torch.autograd.grad(loss, teacher)
    assert (grad != 0).all()


@pytest.mark.parametrize("kwargs", [{"target": "hard"}, {"supervision": "ground_truth"}])
def test_flowing_teacher_gradient_needs_the_soft_distillation_target(kwargs):
    with pytest.raises(ValueError, match="teacher_gradient='flow' needs supervision='distill' and target='soft'"):
        SelfDistillLoss(1.0, teacher_gradient="flow", **kwargs)
    with pytest.raises(ValueError, match="teacher_gradient must be one of"):
        SelfDistillLoss(1.0, teacher_gradient="stop")
    SelfDistillLoss(1.0, teacher_gradient="detach", **kwargs)  # the detached target works with every supervision
