"""Losses of supernet training: AlphaNet's adaptive α-divergence and label-smoothing CE."""
from __future__ import annotations

import math

import pytest
import torch

from modules.losses import AdaptiveLossSoft, CrossEntropyLabelSmooth, cross_entropy_smooth, f_divergence


def test_alpha_divergence_hand_computed_value_and_gradient():
    """Student logits (0, 0): q = (1/2, 1/2); teacher logits (ln 3, 0): p = (3/4, 1/4); r = p/q = (3/2, 1/2).

    α = -1: D = Σ q (r^-1 - 1) / 2 = 1/2 (2/3 - 1)/2 + 1/2 (2 - 1)/2 = -1/12 + 1/4 = 1/6.
    α = +1: D = KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308 < 1/6, so α = -1 is chosen.
    Surrogate weights w = q (r^-1 / α + 1/(α(α-1))) = (1/2 (-2/3 + 1/2), 1/2 (-2 + 1/2)) = (-1/12, -3/4);
    d/dz [-Σ w log softmax(z)] = -w + (Σ w) softmax(z) = (1/12 - 5/12, 3/4 - 5/12) = (-1/3, 1/3).
    """
    student = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    loss = AdaptiveLossSoft(alpha_min=-1.0, alpha_max=1.0, iw_clip=5.0)(student, teacher)
    assert loss.item() == pytest.approx(1 / 6, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-1 / 3, 1 / 3]], dtype=torch.float64))

    d_lo, s_lo = f_divergence(student, teacher, -1.0, 5.0)
    d_hi, _ = f_divergence(student, teacher, 1.0, 5.0)
    assert d_lo.item() == pytest.approx(1 / 6)
    assert d_hi.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # AlphaNet's surrogate value: -Σ w log q = (1/12 + 3/4) ln(1/2)
    assert s_lo.item() == pytest.approx((1 / 12 + 3 / 4) * math.log(0.5))


def test_kl_branch_chosen_and_its_gradient_is_the_cross_entropy_gradient():
    """When KL(p||q) is the larger divergence, the gradient is softmax(z) - p (the CE gradient)."""
    student = torch.tensor([[5.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)
    d_lo, _ = f_divergence(student, teacher, -1.0, 5.0)
    d_hi, _ = f_divergence(student, teacher, 1.0, 5.0)
    assert d_hi.item() > d_lo.item()
    loss = AdaptiveLossSoft(-1.0, 1.0, iw_clip=5.0)(student, teacher)
    p, q = teacher.softmax(1), student.detach().softmax(1)
    assert loss.item() == pytest.approx((p * (p / q).log()).sum().item())
    loss.backward()
    torch.testing.assert_close(student.grad, q - p)


def test_importance_weight_clip_and_per_sample_choice():
    torch.manual_seed(0)
    student = torch.randn(6, 10, dtype=torch.float64) * 3
    teacher = torch.randn(6, 10, dtype=torch.float64) * 3
    d_lo, _ = f_divergence(student, teacher, -1.0, 5.0)
    d_hi, _ = f_divergence(student, teacher, 1.0, 5.0)
    loss = AdaptiveLossSoft(-1.0, 1.0, 5.0)(student, teacher)
    assert loss.item() == pytest.approx(torch.maximum(d_lo, d_hi).mean().item())
    # the clip bounds r^α: with a tiny clip the α=-1 divergence is at most Σ q (clip - 1)/2
    d_clip, _ = f_divergence(student, teacher, -1.0, 1.0)
    assert torch.all(d_clip <= 1e-12)


def test_alpha_zero_branch_is_reverse_kl():
    student = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    d, _ = f_divergence(student, teacher, 0.0, 1e9)
    p, q = teacher.softmax(1), student.softmax(1)
    assert d.item() == pytest.approx((q * (q / p).log()).sum().item())


def test_divergence_and_gradient_vanish_when_student_equals_teacher():
    logits = torch.randn(4, 5, dtype=torch.float64)
    student = logits.clone().requires_grad_(True)
    loss = AdaptiveLossSoft()(student, logits)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert student.grad.abs().max().item() < 1e-12


def test_teacher_receives_no_gradient():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    AdaptiveLossSoft()(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_bad_alpha_range_raises():
    with pytest.raises(ValueError, match="alpha_min"):
        AdaptiveLossSoft(alpha_min=1.0, alpha_max=-1.0)
    with pytest.raises(ValueError, match="iw_clip"):
        AdaptiveLossSoft(iw_clip=0.0)


def test_label_smoothing_cross_entropy_matches_formula():
    torch.manual_seed(1)
    logits = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1, 1, 2])
    eps = 0.1
    logp = logits.log_softmax(1)
    soft = torch.full_like(logp, eps / 4)
    soft[torch.arange(5), target] += 1 - eps
    expected = -(soft * logp).sum(1).mean()
    assert cross_entropy_smooth(logits, target, eps).item() == pytest.approx(expected.item())
    assert CrossEntropyLabelSmooth(eps)(logits, target).item() == pytest.approx(expected.item())
    assert CrossEntropyLabelSmooth(0.0)(logits, target).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target).item())
    with pytest.raises(ValueError, match="smoothing"):
        CrossEntropyLabelSmooth(1.0)
