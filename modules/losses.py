"""Losses for supernet training: label-smoothing cross-entropy (max subnet) and AlphaNet's adaptive
α-divergence (in-place distillation of the other subnets from the max subnet, as in the original).

    ce = CrossEntropyLabelSmooth(0.1)
    kd = AdaptiveLossSoft(alpha_min=-1.0, alpha_max=1.0, iw_clip=5.0)
    loss = ce(max_logits, labels) ; loss_sub = kd(sub_logits, max_logits.detach())
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cross_entropy_smooth(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean CE against (1 - smoothing) * one_hot + smoothing / num_classes (torch's label_smoothing)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing {smoothing}: expected a number in [0, 1)")
    return F.cross_entropy(logits, target, label_smoothing=float(smoothing))


class CrossEntropyLabelSmooth(nn.Module):
    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing {smoothing}: expected a number in [0, 1)")
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy_smooth(logits, target, self.smoothing)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def f_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, iw_clip: float):
    """Per-sample α-divergence D_α(p || q) and AlphaNet's gradient surrogate, q = student, p = teacher.

    With r = p / q (importance ratio, no gradient):
      * α = 0:  D = Σ q·(-log r),            r clipped to [0, iw_clip];  ρ = log r - 1
      * α = 1:  D = Σ q·r·log r = KL(p||q), r not clipped;               ρ = r
      * else:   D = Σ q·(clip(r^α) - 1) / (α(α-1)), clip to [0, iw_clip]; ρ = clip(r^α)/α + 1/(α(α-1))
    Surrogate = -Σ q·ρ·log q_student: its gradient w.r.t. the student logits is the divergence's.
    Returns (divergence, surrogate), each of shape [batch].
    """
    student_logits, teacher_logits = _at_least_fp32(student_logits), _at_least_fp32(teacher_logits)
    q = F.softmax(student_logits.detach(), dim=1)
    p = F.softmax(teacher_logits.detach(), dim=1)
    log_q = F.log_softmax(student_logits, dim=1)  # the only term with a gradient
    r = p / q
    if abs(alpha) < 1e-3:
        r = r.clamp(0, iw_clip)
        f, f_base, rho = -r.log(), 0.0, r.log() - 1.0
    elif abs(alpha - 1.0) < 1e-3:
        f, f_base, rho = r * r.log(), 0.0, r
    else:
        r_alpha = r.pow(alpha).clamp(0, iw_clip)
        f_base = 1.0 / (alpha * (alpha - 1.0))
        f, rho = r_alpha * f_base, r_alpha / alpha + f_base
    divergence = (q * (f - f_base)).sum(1)
    surrogate = -(q * rho * log_q).sum(1)
    return divergence, surrogate


class AdaptiveLossSoft(nn.Module):
    """AlphaNet's adaptive α-divergence: per sample, the larger of D_{α_min} and D_{α_max} is minimised.

    The returned value is the mean selected divergence (≥ 0, comparable across steps); its gradient is
    that of AlphaNet's surrogate (the original reported the surrogate's value, which is not a divergence).
    `teacher_logits` are used without gradient.
    """

    def __init__(self, alpha_min: float = -1.0, alpha_max: float = 1.0, iw_clip: float = 5.0):
        super().__init__()
        if not alpha_min <= alpha_max:
            raise ValueError(f"alpha_min {alpha_min} > alpha_max {alpha_max}")
        if not iw_clip > 0:
            raise ValueError(f"iw_clip {iw_clip}: expected a positive number")
        self.alpha_min, self.alpha_max, self.iw_clip = float(alpha_min), float(alpha_max), float(iw_clip)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        d_lo, s_lo = f_divergence(student_logits, teacher_logits, self.alpha_min, self.iw_clip)
        d_hi, s_hi = f_divergence(student_logits, teacher_logits, self.alpha_max, self.iw_clip)
        pick_lo = d_lo > d_hi
        divergence = torch.where(pick_lo, d_lo, d_hi).mean()
        surrogate = torch.where(pick_lo, s_lo, s_hi).mean()
        return surrogate - surrogate.detach() + divergence.detach()

    def extra_repr(self) -> str:
        return f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}, iw_clip={self.iw_clip}"
