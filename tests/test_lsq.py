"""LSQ+ quantizers, with our fixes: forward vs torch fake-quant, STE gradients, init, mode switch, training."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from modules import lsq
from modules.lsq import (ActQuantizer, QConv2d, QLinear, get_quant_mode, quant_parameters,
                         quantize_activation, quantize_weight, quantizers, set_quant_mode)
from modules.ops import DynamicConv2d, DynamicLinear


def _grid_values(scale: torch.Tensor, lo: int, hi: int, shape, gen, margin: float = 0.4) -> torch.Tensor:
    """Values n*s + u*s with integer n in [lo, hi] and |u| <= margin: never on a rounding boundary, so
    our round(x/s) and torch's round(x * (1/s)) agree exactly. `scale` broadcasts along dim 0."""
    n = torch.randint(lo, hi + 1, shape, generator=gen).float()
    u = (torch.rand(shape, generator=gen) * 2 - 1) * margin
    s = scale.view(-1, *([1] * (len(shape) - 1))) if scale.numel() > 1 else scale
    return (n + u) * s


# --------------------------------------------------------------------------- forward vs torch
@pytest.mark.parametrize("qmin, qmax", [(-128, 127), (-127, 127)])
def test_quantize_weight_per_tensor_matches_torch(qmin, qmax):
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([0.013])
    w = _grid_values(s, qmin - 20, qmax + 20, (8, 4, 3, 3), gen)  # includes clipped values at both ends
    ours = quantize_weight(w, s, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(w, float(s), 0, qmin, qmax)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
    assert (w / s).abs().max() > qmax  # the clipping branch was exercised


def test_quantize_weight_per_channel_matches_torch():
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(6, generator=gen) * 0.05 + 0.001
    w = _grid_values(s, -140, 140, (6, 5, 3, 3), gen)
    ours = quantize_weight(w, s, -127, 127)
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(6, dtype=torch.int32), 0, -127, 127)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("preset", ["original", "ort", "tflite"])
def test_weight_quantizer_module_matches_torch(preset):
    torch.manual_seed(2)
    conv = QConv2d(4, 6, 3, bias=False)
    set_quant_mode(conv, "lsq", preset)
    wq = conv.weight_quant
    out = wq(conv.weight)  # initialises the scale (max|W| / qmax)
    s = wq.scale.detach()
    if preset == "original":
        assert s.numel() == 1 and (wq.qmin, wq.qmax) == (-128, 127)
        ref = torch.fake_quantize_per_tensor_affine(conv.weight.detach(), float(s), 0, -128, 127)
    else:
        assert s.numel() == 6 and (wq.qmin, wq.qmax) == (-127, 127)
        ref = torch.fake_quantize_per_channel_affine(conv.weight.detach(), s, torch.zeros(6, dtype=torch.int32),
                                                     0, -127, 127)
    # a weight exactly at a rounding boundary could round differently (x/s vs x*(1/s)): allow one step there
    diff = (out.detach() - ref).abs()
    step = s.view(-1, 1, 1, 1) if s.numel() > 1 else s
    assert (diff <= 1e-6).float().mean() > 0.99
    assert torch.all(diff <= step * 1.0001)


@pytest.mark.parametrize("preset, qmin", [("ort", 0), ("tflite", -128)])
def test_act_quantizer_integer_zero_point_matches_torch(preset, qmin):
    gen = torch.Generator().manual_seed(3)
    q = ActQuantizer()
    q.configure(preset)
    q.enabled = True
    q.eval()
    s, beta = 0.021, -1.337  # -beta/s = 63.67 -> zero point 64 on the 0..255 grid
    with torch.no_grad():
        q.scale.fill_(s)
        q.offset.fill_(beta)
        q.initialized.fill_(True)
    zp = round(-beta / s)
    assert q.zero_point() == zp + qmin
    x = _grid_values(torch.tensor([s]), -zp - 30, 255 - zp + 30, (4, 3, 5, 5), gen)
    ours = q(x)
    ref = torch.fake_quantize_per_tensor_affine(x, s, zp + qmin, qmin, qmin + 255)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours.min().item() == pytest.approx(-zp * s, abs=1e-6)
    assert ours.max().item() == pytest.approx((255 - zp) * s, abs=1e-5)


def test_act_quantizer_continuous_offset_original_preset():
    gen = torch.Generator().manual_seed(4)
    q = ActQuantizer()
    q.configure("original")
    q.enabled = True
    q.eval()
    s, beta = 0.02, -1.337
    with torch.no_grad():
        q.scale.fill_(s)
        q.offset.fill_(beta)
        q.initialized.fill_(True)
    x = torch.randn(200, generator=gen) * 3
    expected = torch.round(torch.clamp((x - beta) / s, 0, 255)) * s + beta
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)
    # the offset is continuous: beta itself is representable (it is the grid's zero)
    assert q(torch.tensor([beta])).item() == pytest.approx(beta, abs=1e-7)


# --------------------------------------------------------------------------- gradients
def _analytic_weight_grads(w, s, qmin, qmax, g, upstream):
    """LSQ: d out/d s = round(w/s) - w/s inside, qmin / qmax where clipped (times g); d out/d w = 1 inside."""
    v = w / s
    inside = (v >= qmin) & (v <= qmax)
    d_s = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    return (upstream * d_s * g), upstream * inside


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_scale_gradient_matches_lsq_formula(per_channel):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64) * 0.5
    scale_values = torch.tensor([0.004, 0.006, 0.009], dtype=torch.float64) if per_channel else \
        torch.tensor([0.005], dtype=torch.float64)  # small enough that some weights clip
    scale = scale_values.clone().requires_grad_(True)
    w_var = w.clone().requires_grad_(True)
    g = 0.37
    upstream = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    (quantize_weight(w_var, scale, -128, 127, g) * upstream).sum().backward()
    s_b = scale_values.view(-1, 1, 1, 1) if per_channel else scale_values
    d_s, d_w = _analytic_weight_grads(w, s_b, -128, 127, g, upstream)
    expected_s = d_s.sum((1, 2, 3)) if per_channel else d_s.sum().reshape(1)
    v = w / s_b
    assert ((v < -128) | (v > 127)).any() and ((v > -128) & (v < 127)).any()
    torch.testing.assert_close(scale.grad, expected_s)
    torch.testing.assert_close(w_var.grad, d_w)


def _analytic_act_grads(x, s, beta, levels, g, upstream, integer_zero_point):
    """LSQ+ activation gradients of the straight-through surrogate (times g).

    Continuous offset: v = (x - beta)/s; d/ds = round(v) - v inside, 0 / levels when clipped low / high;
    d/dbeta = 0 inside, 1 when clipped. Integer zero point zp = round(z), z = -beta/s: v = x/s + zp;
    d/ds = round(v) - v inside, (0 or levels) - zp + z when clipped; d/dbeta the same as above.
    """
    if integer_zero_point:
        z = -beta / s
        zp = round(z)
        v = x / s + zp
        low, high = -zp + z, levels - zp + z
    else:
        v = (x - beta) / s
        low, high = 0.0, float(levels)
    inside = (v >= 0) & (v <= levels)
    d_s = torch.where(inside, torch.round(v) - v, torch.where(v < 0, low, high))
    d_beta = torch.where(inside, 0.0, 1.0)
    return (upstream * d_s).sum() * g, (upstream * d_beta).sum() * g, upstream * inside


@pytest.mark.parametrize("integer_zero_point", [False, True])
def test_activation_scale_and_offset_gradients_match_lsq_plus_formula(integer_zero_point):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 2
    s0, b0 = 0.011, -1.23  # range [-1.23, 1.57]: about 30 % of x is clipped at each end... or inside
    scale = torch.tensor([s0], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([b0], dtype=torch.float64, requires_grad=True)
    x_var = x.clone().requires_grad_(True)
    g = 0.21
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (quantize_activation(x_var, scale, offset, 0, 255, integer_zero_point, g) * upstream).sum().backward()
    e_s, e_b, e_x = _analytic_act_grads(x, s0, b0, 255, g, upstream, integer_zero_point)
    torch.testing.assert_close(scale.grad, e_s.reshape(1))
    torch.testing.assert_close(offset.grad, e_b.reshape(1))
    torch.testing.assert_close(x_var.grad, e_x)


class _FrozenRound:
    """Stands in for `lsq.round_ste`: records round(y) - y at the base point, then replays those residuals,
    so a finite difference sees the straight-through surrogate y + const of the real implementation."""

    def __init__(self):
        self.residuals, self.replay, self.i = [], False, 0

    def __call__(self, y):
        if not self.replay:
            r = (y.round() - y).detach()
            self.residuals.append(r)
            return y + r
        r = self.residuals[self.i]
        self.i += 1
        return y + r

    def start_replay(self):
        self.replay, self.i = True, 0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("which", ["weight", "act_offset", "act_integer_zp"])
def test_gradients_match_finite_differences_of_ste_surrogate(which, fused, monkeypatch):
    """Autograd (the fused nodes training uses, or the reference chains) vs central differences of the
    reference chain with its roundings frozen."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    g = 0.5
    params = {"scale": torch.tensor([0.006 if which == "weight" else 0.012], dtype=torch.float64),
              "offset": torch.tensor([-1.1], dtype=torch.float64)}

    def f(p, reference=True):
        qw, qa = (lsq.quantize_weight_reference, lsq.quantize_activation_reference) if reference else \
            (quantize_weight, quantize_activation)
        if which == "weight":
            return (qw(x, p["scale"], -128, 127, g) * upstream).sum()
        return (qa(x, p["scale"], p["offset"], 0, 255, which == "act_integer_zp", g) * upstream).sum()

    # autograd at the base point (true round_ste)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    value = f(leaves, reference=not fused)
    value.backward()
    names = ["scale"] if which == "weight" else ["scale", "offset"]
    frozen = _FrozenRound()
    monkeypatch.setattr(lsq, "round_ste", frozen)
    assert f(params).item() == pytest.approx(value.item(), rel=1e-12)  # same value; records the residuals
    eps = 1e-7
    for name in names:
        diffs = []
        for sign in (+1, -1):
            p = {k: v.clone() for k, v in params.items()}
            p[name] += sign * eps
            frozen.start_replay()
            diffs.append(f(p).item())
        fd = (diffs[0] - diffs[1]) / (2 * eps)
        # the forward value is unscaled; only the gradient carries the LSQ factor g
        assert leaves[name].grad.item() == pytest.approx(g * fd, rel=1e-5, abs=1e-6), name


def _fused_and_reference(fused, reference, x, params, args, upstream):
    """(output, grad of x, grads of params) of both implementations; x / params get fresh leaves."""
    res = []
    for fn in (fused, reference):
        xv = x.detach().clone().requires_grad_(x.requires_grad)
        ps = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        out = fn(xv, *ps, *args)
        if out.requires_grad:
            (out * upstream).sum().backward()
        res.append((out.detach(), xv.grad, [p.grad for p in ps]))
    return res


def _assert_fused_matches(res, dtype):
    (out_f, gx_f, gp_f), (out_r, gx_r, gp_r) = res
    assert torch.equal(out_f, out_r)  # the same ops in the same order: bit-identical values
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    if gx_r is None:
        assert gx_f is None
    else:  # the reference's x gradient goes through / s then * s: equal up to rounding
        torch.testing.assert_close(gx_f, gx_r, **tol)
    for a, b in zip(gp_f, gp_r):
        if b is None:
            assert a is None
        else:  # sums in another order: float32 agrees to ~1e-5 relative
            torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * float(b.abs().max() + 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("integer_zero_point", [False, True])
@pytest.mark.parametrize("g", [1.0, 0.21, 1 / math.sqrt(16 * 8 * 8 * 255)])  # the last: a typical LSQ factor
@pytest.mark.parametrize("case", ["signed", "relu_zero_offset", "unsigned_constraint", "negative_scale",
                                  "scale_floor", "x_no_grad", "constant_qparams", "tflite_grid"])
def test_fused_activation_matches_reference_chain(dtype, integer_zero_point, g, case):
    """quantize_activation (one autograd node) vs quantize_activation_reference (the chain of autograd ops):
    identical values, the same gradients for x, scale and offset, edge cases included (inputs exactly on the
    clipping bound, zero offset, the offset * 0 of `unsigned`, negative / zero scales, no-grad inputs)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 4, 5, 5, generator=gen, dtype=dtype) * 2
    scale, offset = torch.tensor([0.011], dtype=dtype), torch.tensor([-1.23], dtype=dtype)
    qmin, qmax = 0, 255
    if case == "relu_zero_offset":  # many inputs exactly 0 = exactly on the bottom bound
        x, offset = x.relu(), torch.zeros(1, dtype=dtype)
    elif case == "negative_scale":
        scale = -scale
    elif case == "scale_floor":
        scale = torch.zeros(1, dtype=dtype)
    elif case == "tflite_grid":
        qmin, qmax = -128, 127
    upstream = torch.randn(x.shape, generator=gen, dtype=dtype)
    x.requires_grad_(case != "x_no_grad")
    scale.requires_grad_(case != "constant_qparams")
    offset.requires_grad_(case != "constant_qparams")
    args = (qmin, qmax, integer_zero_point, g)
    if case == "unsigned_constraint":  # ActQuantizer._constrained: the offset enters as offset * 0.0
        def wrap(fn):
            return lambda x_, s_, o_, *a: fn(x_, s_, o_ * 0.0, *a)
        fused, reference = wrap(quantize_activation), wrap(lsq.quantize_activation_reference)
    else:
        fused, reference = quantize_activation, lsq.quantize_activation_reference
    res = _fused_and_reference(fused, reference, x, [scale, offset], args, upstream)
    _assert_fused_matches(res, dtype)
    if case == "signed":  # both clipping ends and the inside were exercised
        t = (x.detach() - offset) / scale
        assert (t < 0).any() and (t > 255).any() and ((t > 0) & (t < 255)).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("g", [1.0, 0.3])
@pytest.mark.parametrize("case", ["plain", "sliced_scale", "negative_scale", "linear", "w_no_grad"])
def test_fused_weight_matches_reference_chain(dtype, per_channel, g, case):
    gen = torch.Generator().manual_seed(13)
    shape = (6, 5) if case == "linear" else (6, 4, 3, 3)
    w = torch.randn(shape, generator=gen, dtype=dtype) * 0.5
    scale = (torch.rand(8 if case == "sliced_scale" else 6, generator=gen, dtype=dtype) * 0.004 + 0.002) \
        if per_channel else torch.tensor([0.004], dtype=dtype)  # small enough that some weights clip
    if case == "negative_scale":
        scale[0] = -scale[0]
    scale.requires_grad_(True)
    w.requires_grad_(case != "w_no_grad")
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    if case == "sliced_scale":  # WeightQuantizer passes scale[:Cout] for a sliced elastic weight
        def wrap(fn):
            return lambda w_, s_, *a: fn(w_, s_[:6], *a)
        fused, reference = wrap(quantize_weight), wrap(lsq.quantize_weight_reference)
    else:
        fused, reference = quantize_weight, lsq.quantize_weight_reference
    res = _fused_and_reference(fused, reference, w, [scale], (-127, 127, g), upstream)
    _assert_fused_matches(res, dtype)
    if case == "sliced_scale" and per_channel:  # only the active channels' scales learn
        assert torch.all(res[0][2][0][6:] == 0) and torch.all(res[0][2][0][:6] != 0)


@pytest.mark.parametrize("encoding, preset", [("tiny-012345-000000", "ort"), ("tiny-100005-012120", "original")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_supernet_gradients_match_reference_chain(encoding, preset, dtype, monkeypatch):
    """A whole LSQ+ supernet (every block family; unsigned / max_value constraints, TensorQuantizers, sliced
    per-channel scales of a smaller subnet): the same loss and gradients with the fused nodes as with the
    reference chains patched in wherever modules imported them. float32 runs the training hot path (scalars on
    the host); float64 checks the closed-form gradients tightly, free of float32 summation order."""
    import sys
    from modules.engine import init_lsq_scales
    from modules.supernet import supernet_from_encoding
    torch.manual_seed(15)
    net = set_quant_mode(supernet_from_encoding(encoding), "lsq", preset).to(dtype).train()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    net.set_max_subnet()
    init_lsq_scales(net, x)
    net.sample_active_subnet(__import__("random").Random(0))
    results = []
    for reference in (False, True):
        if reference:
            for mod in list(sys.modules.values()):
                if getattr(mod, "__name__", "").split(".")[0] != "modules":
                    continue
                for name in ("quantize_activation", "quantize_weight"):
                    if getattr(mod, name, None) is getattr(lsq, name):
                        monkeypatch.setattr(mod, name, getattr(lsq, name + "_reference"))
        net.zero_grad(set_to_none=True)
        loss = net(x).logsumexp(1).sum()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (loss_f, grads_f), (loss_r, grads_r) = results
    assert loss_f == loss_r  # bit-identical forward
    assert grads_f.keys() == grads_r.keys() and any("scale" in n for n in grads_f)
    # float32: sums in another order move a scale's gradient by up to ~2e-4 relative, and by more where its
    # terms cancel (a scale gradient far smaller than the largest one can move by a few %, with the CPU's vector width);
    # the chains leave ~1e-11 where the truth is 0
    rel, floor = (1e-3, 1e-5) if dtype == torch.float32 else (1e-9, 1e-12)
    largest = max(float(g.abs().max()) for g in grads_r.values())
    for n, ref in grads_r.items():
        diff = float((grads_f[n] - ref).abs().max())
        assert diff <= rel * float(ref.abs().max()) + floor * largest, (n, diff, float(ref.abs().max()))


def test_traced_quantizers_use_the_reference_chain():
    """Exporters trace plain aten ops (no opaque autograd node): same values as eager."""
    torch.manual_seed(14)
    conv = QConv2d(3, 4, 3, padding=1)
    set_quant_mode(conv, "lsq", "ort")
    x = torch.randn(2, 3, 6, 6)
    conv.eval()
    eager = conv(x)
    traced = torch.jit.trace(conv, (x,))
    assert "PythonOp" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)


def test_module_gradient_scale_factors():
    """g = 1/sqrt(features per sample * 255) for activations, 1/sqrt(weights per scale * qmax) for weights."""
    torch.manual_seed(8)
    conv = QConv2d(3, 4, 3, bias=False)
    set_quant_mode(conv, "lsq", "ort")
    x = torch.randn(2, 3, 6, 6)
    conv.eval()
    conv(x)  # initialise
    conv.train()
    conv.zero_grad()
    y = conv(x)
    up = torch.randn_like(y)
    (y * up).sum().backward()
    # recompute the same forward functionally with explicit g factors
    a_s = conv.act_quant.scale.detach().clone().requires_grad_(True)
    a_b = conv.act_quant.offset.detach().clone().requires_grad_(True)
    w_s = conv.weight_quant.scale.detach().clone().requires_grad_(True)
    g_a = 1 / math.sqrt(3 * 6 * 6 * 255)
    g_w = 1 / math.sqrt(3 * 3 * 3 * 127)
    xq = quantize_activation(x, a_s, a_b, 0, 255, True, g_a)
    wq = quantize_weight(conv.weight.detach(), w_s, -127, 127, g_w)
    (nn.functional.conv2d(xq, wq) * up).sum().backward()
    torch.testing.assert_close(conv.act_quant.scale.grad, a_s.grad)
    torch.testing.assert_close(conv.act_quant.offset.grad, a_b.grad)
    torch.testing.assert_close(conv.weight_quant.scale.grad, w_s.grad)
    assert conv.weight_quant.scale.grad.abs().sum() > 0


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("preset", ["original", "ort", "tflite"])
@pytest.mark.parametrize("kind", ["QConv2d", "DynamicConv2d", "QLinear", "DynamicLinear", "depthwise"])
def test_first_forward_clips_no_weight(kind, preset):
    """The original initialised sw = max|W|/255 and clipped about half the weights."""
    torch.manual_seed(9)
    op, x = {
        "QConv2d": (lambda: QConv2d(8, 16, 3, padding=1), torch.randn(2, 8, 5, 5)),
        "DynamicConv2d": (lambda: DynamicConv2d(8, 16, 5), torch.randn(2, 8, 5, 5)),
        "QLinear": (lambda: QLinear(8, 16), torch.randn(2, 8)),
        "DynamicLinear": (lambda: DynamicLinear(8, 16), torch.randn(2, 8)),
        "depthwise": (lambda: DynamicConv2d(8, 8, 3, depthwise=True), torch.randn(2, 8, 5, 5)),
    }[kind]
    op = op()
    set_quant_mode(op, "lsq", preset)
    op(x)
    wq = op.weight_quant
    assert bool(wq.initialized)
    s = wq.scale.detach()
    w = op.weight.detach()
    ratio = w.abs() / (s.view(-1, *([1] * (w.dim() - 1))) if s.numel() > 1 else s)
    assert ratio.max() <= wq.qmax * (1 + 1e-5)  # no weight is clipped
    # ... and the whole range is used: the largest weight (per channel when per-channel) maps to qmax
    per = ratio.flatten(1).amax(1) if s.numel() > 1 else ratio.max().reshape(1)
    torch.testing.assert_close(per, torch.full_like(per, float(wq.qmax)))
    err = (wq(op.weight).detach() - w).abs()
    assert torch.all(err <= (s.max() / 2) * (1 + 1e-4))


@pytest.mark.parametrize("preset", ["original", "ort", "tflite"])
@pytest.mark.parametrize("data", ["signed", "positive", "negative", "relu"])
def test_first_forward_activation_range_covers_input(preset, data):
    """After init, the activation grid covers the first batch (within half a step): also for inputs
    that do not contain 0 (an integer zero point must then extend the range to 0)."""
    gen = torch.Generator().manual_seed(10)
    x = {"signed": torch.randn(4, 16, generator=gen) * 3,
         "positive": torch.rand(4, 16, generator=gen) + 5.0,
         "negative": -torch.rand(4, 16, generator=gen) - 2.0,
         "relu": torch.relu(torch.randn(4, 16, generator=gen))}[data]
    q = ActQuantizer()
    q.configure(preset)
    q.enabled = True
    q.eval()
    y = q(x)
    s = q.scale.abs().item()
    assert (y - x).abs().max().item() <= s / 2 * 1.001 + 1e-6, (preset, data, s)
    if preset != "original":
        assert q.qmin <= q.zero_point() <= q.qmax


def test_scale_floor_keeps_zero_scale_finite():
    w = torch.randn(4, 4)
    out = quantize_weight(w, torch.zeros(1), -128, 127)
    assert torch.isfinite(out).all()
    x = torch.randn(10)
    assert torch.isfinite(quantize_activation(x, torch.zeros(1), torch.zeros(1), 0, 255, True)).all()


# --------------------------------------------------------------------------- mode switch
def test_set_quant_mode_on_bare_qconv2d_root_module():
    """The original skipped the root module, so a bare op stayed fp32."""
    torch.manual_seed(11)
    conv = QConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    fp32 = conv(x)
    assert get_quant_mode(conv) == "fp32" and quant_parameters(conv) == []
    assert set_quant_mode(conv, "lsq", "ort") is conv
    assert get_quant_mode(conv) == "lsq" and conv.quant_mode == "lsq" and conv.quant_preset == "ort"
    assert all(q.enabled for q in quantizers(conv)) and len(quantizers(conv)) == 2
    assert len(quant_parameters(conv)) == 3  # act scale, act offset, weight scale
    q8 = conv(x)
    assert not torch.allclose(q8, fp32)
    assert (q8 - fp32).abs().max() < 0.05 * fp32.abs().max()
    set_quant_mode(conv, "fp32")
    assert get_quant_mode(conv) == "fp32"
    torch.testing.assert_close(conv(x), fp32)


def test_set_quant_mode_on_bare_dynamic_conv():
    conv = DynamicConv2d(4, 4, 3)
    set_quant_mode(conv, "lsq", "original")
    assert conv.act_quant.enabled and conv.weight_quant.enabled
    conv(torch.randn(1, 4, 5, 5))
    assert bool(conv.act_quant.initialized) and bool(conv.weight_quant.initialized)


@pytest.mark.parametrize("mode, preset, bad", [("int8", "ort", "int8"), ("lsq", "onnx", "onnx")])
def test_set_quant_mode_rejects_bad_values(mode, preset, bad):
    with pytest.raises(ValueError, match=bad):
        set_quant_mode(QConv2d(1, 1, 1), mode, preset)


def test_preset_switch_rebuilds_weight_scale_shape():
    conv = QConv2d(3, 5, 1)
    set_quant_mode(conv, "lsq", "original")
    assert conv.weight_quant.scale.shape == (1,)
    set_quant_mode(conv, "lsq", "ort")
    assert conv.weight_quant.scale.shape == (5,) and not bool(conv.weight_quant.initialized)


# --------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("preset", ["original", "ort"])
def test_state_dict_round_trip_keeps_initialized(preset):
    torch.manual_seed(12)
    conv = QConv2d(3, 4, 3, padding=1)
    set_quant_mode(conv, "lsq", preset)
    conv.eval()
    x = torch.randn(2, 3, 6, 6)
    conv(x)
    with torch.no_grad():  # pretend training moved the scales away from their init values
        conv.act_quant.scale.mul_(1.5)
        conv.weight_quant.scale.mul_(0.8)
    ref = conv(x)
    state = conv.state_dict()
    assert {"act_quant.scale", "act_quant.offset", "act_quant.initialized", "weight_quant.scale",
            "weight_quant.initialized"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = QConv2d(3, 4, 3, padding=1)
    set_quant_mode(fresh, "lsq", preset)
    fresh.load_state_dict(loaded, strict=True)
    fresh.eval()
    assert bool(fresh.act_quant.initialized) and bool(fresh.weight_quant.initialized)
    saved_scale = fresh.act_quant.scale.detach().clone()
    torch.testing.assert_close(fresh(x), ref)
    fresh(x * 100)  # a very different batch: a re-init would change the scale
    torch.testing.assert_close(fresh.act_quant.scale.detach(), saved_scale)


def test_fp32_model_has_no_quant_state():
    conv = QConv2d(3, 4, 3)
    assert not any("quant" in k for k in conv.state_dict())


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("preset", ["original", "ort"])
def test_lsq_toy_model_trains(preset):
    torch.manual_seed(13)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()
    model = nn.Sequential(QConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), QLinear(8, 2))
    set_quant_mode(model, "lsq", preset)
    model.train()
    model(x)  # initialise the scales before building the optimizer state
    scales_before = [p.detach().clone() for p in quant_parameters(model)]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(scales_before, quant_parameters(model))]
    assert any(moved)  # the learned scales / offsets receive gradients
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8
