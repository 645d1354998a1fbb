"""LSQ+ fake quantization (learned step size, learned offset) for 8-bit weights and activations.

Every quantizable op (conv, linear) owns an `ActQuantizer` for its input and a `WeightQuantizer`
for its weight. In "fp32" mode both are the identity and own no parameters, so an fp32 model's
state dict and DDP see no quantization state. `set_quant_mode(model, "lsq", preset)` creates the
learned parameters (so call it before building the optimizer and before loading an LSQ checkpoint);
the scales are initialised from the first batch that flows through (min/max), unless they were
loaded from a checkpoint (`initialized` is a buffer, saved with the weights).

Presets (what the fake-quant simulates):
  * ``original``: as the SpaceEvo code: per-tensor weights in [-128, 127], unsigned 8-bit
    activations with a continuous learned offset. Not exactly representable by int8 backends.
  * ``ort`` / ``tflite``: per-channel symmetric weights in [-127, 127] (so BN folding and the sign of
    gamma are exact), 8-bit asymmetric activations whose zero point is an integer (the offset is
    snapped to the integer grid with a straight-through estimator), as ONNX Runtime (uint8
    activations) and TFLite (int8 activations, same grid shifted by 128) compute.
  * ``ort_avx2``: ``ort`` with 7-bit weights in [-63, 63] (ORT's reduce_range): exact *and* fast on x86
    CPUs without VNNI, where full-range weights need ORT's slower u8 x u8 kernels. These presets also
    quantize the tensors between int8 kernels that are no conv input (residual branches, hardswish /
    swish inputs, SE, GAP inputs: `modules.ops.TensorQuantizer`, `modules.blocks`), and
    `modules.deploy` exports the learned scales to int8 ONNX / TFLite.
  * ``tensorrt`` / ``snpe`` / ``vitis`` / ``openvino``: the rules MQBench lists for these backends (`RULES`):
    TensorRT symmetric int8 activations (zero point 0, also after a ReLU) and per-channel weights; SNPE
    asymmetric uint8 per tensor for activations *and* weights; Vitis AI symmetric per-tensor int8 with
    power-of-two scales (2 ** round(log2 s), straight-through); OpenVINO per-channel weights, symmetric
    activations, unsigned (uint8, zero point 0) after a ReLU. Per-tensor weights cannot absorb BN exactly:
    their eval mode folds BN into the float weight before quantizing it (`modules.ops.fold_bn_float`).

Every preset is a row of `RULES` (`QuantRules`): the quantizers read its fields, not the preset's name.

Fixes against the original: the weight scale starts at max|W|/127 (the original's
max|W|/255 clipped half the range); the root module is switched too; scales have a floor.

`quantize_activation_reference` / `quantize_weight_reference` define the fake-quant as chains of autograd ops;
training runs `quantize_activation` / `quantize_weight`: one autograd node each, the same values bit for bit
and the same straight-through gradients, in less time, so that an LSQ+ step costs not much more than an fp32 one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

QUANT_MODES = ("fp32", "lsq")
SCALE_FLOOR = 1e-8
ZERO_POINTS = ("continuous", "integer", "zero")


@dataclass(frozen=True)
class QuantRules:
    """What a backend's int8 kernels accept, after MQBench's backend parameters (symmetry, per-channel,
    power-of-two scale), as data: the quantizers read these fields instead of testing preset names.

    act_dtype: the 256-level activation grid named ``uint8`` (0..255) or ``int8`` (-128..127).
    act_zero_point: ``continuous`` (the original's real-valued offset: no int8 kernel), ``integer`` (asymmetric,
        a learned integer zero point) or ``zero`` (symmetric: zero point 0 on the int8 grid).
    relu_unsigned: a ReLU output may sit on an unsigned grid (zero point at its bottom; with symmetric
        activations that is uint8 with zero point 0, as OpenVINO quantizes ReLU outputs).
    weight_per_channel / weight_symmetric / weight_range: per output channel or per tensor; symmetric
        (zero point 0, integers in weight_range) or asymmetric (uint8 with a learned integer zero point).
    pot_scale: every scale is a power of two (rounded in the log2 domain, straight-through gradient)."""
    act_dtype: str
    act_zero_point: str
    relu_unsigned: bool
    weight_per_channel: bool
    weight_symmetric: bool
    weight_range: tuple
    pot_scale: bool = False

    def __post_init__(self):
        if self.act_dtype not in ("uint8", "int8") or self.act_zero_point not in ZERO_POINTS:
            raise ValueError(f"bad quantization rules {self}")


# ort_avx2 keeps weights in 7 bits, as ONNX Runtime's reduce_range, so that the fast u8 x s8 kernels of x86
# CPUs without VNNI (int16 pair sums) cannot saturate. The last four follow MQBench's backend table: TensorRT
# (symmetric int8 everywhere, per-channel weights), SNPE (asymmetric uint8 per tensor), Vitis AI (symmetric
# per-tensor int8 with power-of-two scales) and OpenVINO (per-channel symmetric weights; activations symmetric,
# unsigned after a ReLU).
RULES = {
    "original": QuantRules("uint8", "continuous", False, False, True, (-128, 127)),
    "ort": QuantRules("uint8", "integer", True, True, True, (-127, 127)),
    "tflite": QuantRules("int8", "integer", True, True, True, (-127, 127)),
    "ort_avx2": QuantRules("uint8", "integer", True, True, True, (-63, 63)),
    "tensorrt": QuantRules("int8", "zero", False, True, True, (-127, 127)),
    "snpe": QuantRules("uint8", "integer", True, False, False, (0, 255)),
    "vitis": QuantRules("int8", "zero", False, False, True, (-128, 127), pot_scale=True),
    "openvino": QuantRules("int8", "zero", True, True, True, (-127, 127)),
}
PRESETS = tuple(RULES)
# the presets an int8 runtime can run exactly (integer zero points)
BACKEND_PRESETS = tuple(p for p, r in RULES.items() if r.act_zero_point != "continuous")
WEIGHT_RANGES = {p: r.weight_range for p, r in RULES.items()}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient."""
    return (x.round() - x).detach() + x


def pot_ste(s: torch.Tensor) -> torch.Tensor:
    """The power of two nearest to s in the log2 domain, 2 ** round(log2 s), with a straight-through estimator
    on the rounding (MQBench's power-of-two scale): the gradient is that of 2 ** log2(s)."""
    return 2 ** round_ste(torch.log2(s))


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of x, gradient multiplied by g (LSQ step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def quantize_activation_reference(x, scale, offset, qmin: int, qmax: int, integer_zero_point: bool,
                                  g: float = 1.0):
    """LSQ+ activation fake-quant as a chain of autograd ops (the definition; `quantize_activation` computes
    the same values and gradients in one autograd node): round(clamp((x - offset) / s, qmin', qmax')) * s + offset."""
    s = grad_scale(scale.abs().clamp_min(SCALE_FLOOR), g)
    beta = grad_scale(offset, g)
    levels = qmax - qmin
    if integer_zero_point:
        # the real-valued offset beta becomes the integer zero point zp = round(-beta/s) in [0, levels]
        zp = round_ste(torch.clamp(-beta / s, 0, levels))
        beta = -zp * s
    return round_ste(torch.clamp((x - beta) / s, 0, levels)) * s + beta


def quantize_weight_reference(w, scale, qmin: int, qmax: int, g: float = 1.0):
    """Symmetric weight fake-quant as a chain of autograd ops (the definition of `quantize_weight`)."""
    s = grad_scale(scale.abs().clamp_min(SCALE_FLOOR), g)
    if s.numel() > 1:
        s = s.view(-1, *([1] * (w.dim() - 1)))
    return round_ste(torch.clamp(w / s, qmin, qmax)) * s


# ------------------------------------------------------------------ fused autograd nodes (the training hot path)
# The reference chains above record ~25 autograd nodes per call, half of them on 1-element tensors, and about
# 20 full passes over the activation in forward + backward, several through bool masks (slow on the CPU): LSQ+
# training steps took ~2x the fp32 time (bench/lsq_overhead.py --reference). The nodes below compute
# bit-identical outputs (same ops in the same order) and the same straight-through gradients in closed form,
# with 0/1 float masks, ~14 passes, and the per-tensor scalars on the host (tests/test_lsq.py checks them
# against the reference chains). With clamp's gradient mask `inside` (lo < t < hi) and
# e = out - x inside, e = out where clipped:
#   d out/d s = e / s (offset held fixed at beta: minus beta / s where clipped); d out/d beta = 1 where clipped;
#   the integer zero point zp = round_ste(clamp(z, 0, levels)), z = -beta0 / s, adds the chain through zp.
def _grad_scale_value(v: torch.Tensor, g: float) -> torch.Tensor:
    """The value grad_scale(v, g) produces (not always bit-equal to v)."""
    return v if g == 1.0 else (v - v * g) + v * g


def _scale_grad(d_s: torch.Tensor, scale: torch.Tensor, g: float) -> torch.Tensor:
    """Gradient of the learned `scale` given d/ds of s = grad_scale(|scale|.clamp_min(SCALE_FLOOR), g)."""
    a = scale.abs()
    return (d_s * g * torch.sgn(scale) * (a > SCALE_FLOOR).to(scale.dtype)).reshape(scale.shape)


def _open_interval(t: torch.Tensor, lo, hi) -> torch.Tensor:
    """lo < t < hi: where torch.clamp(t, lo, hi) passes the gradient (its backward excludes both bounds)."""
    return (t > lo).logical_and_(t < hi)


def _inside_mask(t: torch.Tensor, lo, hi, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """_open_interval as 0/1 in t's dtype, the comparisons written straight to it: on CPU, bool tensors (and
    torch.where / multiplications by them) take several times as long as float ones. `scratch`: a buffer
    like t to use for the second comparison (fewer fresh allocations: each costs page faults on the CPU)."""
    m = torch.gt(t, lo, out=torch.empty_like(t))
    return m.mul_(torch.lt(t, hi, out=torch.empty_like(t) if scratch is None else scratch))


def _act_qparams_host(scale, offset, levels: int, integer_zero_point: bool, g: float):
    """(s, beta0, beta, z) of quantize_activation_reference as Python floats, computed in float32 arithmetic
    (numpy scalars: bit-identical to torch's float32 ops on 1-element tensors, without a dozen tiny tensor ops)."""
    f32 = np.float32
    s = max(abs(f32(scale.item())), f32(SCALE_FLOOR))
    beta0 = f32(offset.item())
    if g != 1.0:
        g32 = f32(g)
        s = (s - s * g32) + s * g32
        beta0 = (beta0 - beta0 * g32) + beta0 * g32
    beta, z = beta0, None
    if integer_zero_point:
        z = -beta0 / s
        beta = -f32(np.round(np.clip(z, 0, levels))) * s
    return float(s), float(beta0), float(beta), (None if z is None else float(z))


class _ActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, offset, levels: int, integer_zero_point: bool, g: float):
        # float32 per-tensor quantizer on the CPU: its scalars stay on the host (no device syncs involved there)
        ctx.host = host = (x.device.type == "cpu" and x.dtype == scale.dtype == offset.dtype == torch.float32
                           and scale.numel() == 1 and offset.numel() == 1)
        if host:
            s, beta0, beta, z = _act_qparams_host(scale, offset, levels, integer_zero_point, g)
        else:
            s = _grad_scale_value(scale.abs().clamp_min(SCALE_FLOOR), g)
            beta0 = _grad_scale_value(offset, g)
            beta, z = beta0, None
            if integer_zero_point:
                z = -beta0 / s
                beta = -torch.clamp(z, 0, levels).round() * s
        # = (x - beta) / s; beta is exactly 0 for most activations (zero point 0 after a ReLU): 2 passes fewer
        zero_beta = host and beta == 0.0
        t = torch.div(x, s) if zero_beta else torch.sub(x, beta).div_(s)
        grads = any(ctx.needs_input_grad[:3])
        e = torch.empty_like(t) if any(ctx.needs_input_grad[1:3]) else None
        inside = _inside_mask(t, 0, levels, e) if grads else None
        out = t.clamp_(0, levels).round_().mul_(s)
        if not zero_beta:
            out.add_(beta)
        if grads:
            if e is not None:
                torch.addcmul(out, x, inside, value=-1, out=e)
            if host:
                ctx.save_for_backward(inside, e)
                ctx.qparams = (float(scale.item()), s, beta, beta0, z, scale.shape, offset.shape)
            else:
                ctx.save_for_backward(inside, e, scale, s, beta, beta0, z)
        ctx.levels, ctx.izp, ctx.g = levels, integer_zero_point, g
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.host:
            inside, e = ctx.saved_tensors
        else:
            inside, e, scale, s, beta, beta0, z = ctx.saved_tensors
        gx = grad * inside
        d_scale = d_offset = None
        if e is not None:
            ge = torch.dot(grad.reshape(-1), e.reshape(-1))
            clipped = (grad - gx).sum()  # d out/d beta summed (grad - grad * 1 is exactly 0 inside)
            if ctx.host:
                scale_value, s, beta, beta0, z, scale_shape, offset_shape = ctx.qparams
                ge, clipped = ge.item(), clipped.item()
                cz = 1.0 if ctx.izp and 0 < z < ctx.levels else 0.0  # where clamp(z, 0, levels) passes gradient
            elif ctx.izp:
                cz = _open_interval(z, 0, ctx.levels).to(s.dtype)
            if ctx.izp:
                d_s = ge / s - cz * clipped * beta0 / s
                d_beta0 = cz * clipped
            else:
                d_s = (ge - beta * clipped) / s
                d_beta0 = clipped
            if ctx.host:
                live = abs(np.float32(scale_value)) > np.float32(SCALE_FLOOR)  # clamp_min passes gradient
                sign = (scale_value > 0) - (scale_value < 0)
                d_scale = grad.new_full(scale_shape, d_s * ctx.g * sign * live) if ctx.needs_input_grad[1] else None
                d_offset = grad.new_full(offset_shape, d_beta0 * ctx.g) if ctx.needs_input_grad[2] else None
            else:
                d_scale = _scale_grad(d_s, scale, ctx.g)
                d_offset = (d_beta0 * ctx.g).reshape(beta0.shape)
        return (gx if ctx.needs_input_grad[0] else None), d_scale, d_offset, None, None, None


class _WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, qmin: int, qmax: int, g: float):
        s = _grad_scale_value(scale.abs().clamp_min(SCALE_FLOOR), g)
        if s.numel() > 1:
            s = s.view(-1, *([1] * (w.dim() - 1)))
        t = w / s
        grads = any(ctx.needs_input_grad[:2])
        e = torch.empty_like(t) if ctx.needs_input_grad[1] else None
        inside = _inside_mask(t, qmin, qmax, e) if grads else None
        out = t.clamp_(qmin, qmax).round_().mul_(s)
        if grads:
            if e is not None:
                torch.addcmul(out, w, inside, value=-1, out=e)
            ctx.save_for_backward(inside, e, scale, s)
        ctx.g = g
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, e, scale, s = ctx.saved_tensors
        d_scale = None
        if e is not None:
            if scale.numel() > 1:
                d_s = (grad * e).reshape(grad.shape[0], -1).sum(1) / s.reshape(-1)
            else:
                d_s = torch.dot(grad.reshape(-1), e.reshape(-1)) / s
            d_scale = _scale_grad(d_s, scale, ctx.g)
        gw = grad * inside if ctx.needs_input_grad[0] else None
        return gw, d_scale, None, None, None


def _fused_ok() -> bool:
    """False while tracing / scripting / compiling (exporters see the plain reference ops)."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling())


def quantize_activation(x, scale, offset, qmin: int, qmax: int, integer_zero_point: bool, g: float = 1.0):
    """LSQ+ activation fake-quant: round(clamp((x - offset) / s, qmin', qmax')) * s + offset.

    `integer_zero_point`: the offset is snapped to the integer grid, zp = round(clamp(-offset/s, 0, levels)),
    with straight-through gradients. `g` scales the gradients of scale and offset (LSQ), not the values."""
    if not _fused_ok():
        return quantize_activation_reference(x, scale, offset, qmin, qmax, integer_zero_point, g)
    return _ActFakeQuant.apply(x, scale, offset, qmax - qmin, integer_zero_point, g)


def quantize_weight(w, scale, qmin: int, qmax: int, g: float = 1.0):
    """Symmetric weight fake-quant; scale has shape [1] (per tensor) or [Cout] (per channel)."""
    if not _fused_ok():
        return quantize_weight_reference(w, scale, qmin, qmax, g)
    return _WeightFakeQuant.apply(w, scale, qmin, qmax, g)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    from modules.dist import is_dist_avail_and_initialized  # not inside dist.rank_local(): ranks on other nets

    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(t, op=op)
    return t


def _fp32(forward):
    """Run a quantizer's forward in float32, outside autocast (mixed precision): the LSQ+ grid (scale x
    integer levels, the rounding, the gradient masks at the clip points) needs float32; a bf16 input is
    widened first. The quantized tensor stays float32; the next conv / linear casts it for its own kernel."""
    @functools.wraps(forward)
    def wrapped(self, x):
        if not self.enabled:
            return x
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return forward(self, x)
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x.float())
    return wrapped


class _Quantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.enabled = False
        self.preset = None

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, preset={self.preset}"


class ActQuantizer(_Quantizer):
    """Quantizes an op's input to 8 bits with a learned scale and offset (LSQ+), under its preset's
    `QuantRules` (grid, integer or fixed zero point, power-of-two scale).

    Two structural constraints, set by the block that knows what produces the input and used by the
    backend presets only, make the fake-quant what an int8 kernel can fuse:
    ``unsigned`` (the input is a ReLU/ReLU6 output: where the rules allow it, the zero point is fixed at the
    bottom of the grid, so ONNX Runtime drops the Relu into the producing QLinearConv/QLinearAdd) and
    ``max_value`` (the range never exceeds it, e.g. 6 after ReLU6, so ONNX Runtime drops the Clip). Neither
    is state.
    """
    unsigned = False
    max_value = None

    def configure(self, preset: str) -> None:
        self.preset, self.rules = preset, RULES[preset]
        self.integer_zero_point = self.rules.act_zero_point != "continuous"
        if not hasattr(self, "scale"):
            self.scale = nn.Parameter(torch.ones(1))
            self.offset = nn.Parameter(torch.zeros(1))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def qmin(self) -> int:
        """Bottom of the 256-level grid's integer names: -128 (int8) or 0 (uint8; a symmetric preset's ReLU
        outputs when its rules allow unsigned ones)."""
        r = self.rules
        relu_u8 = r.act_zero_point == "zero" and r.relu_unsigned and self.unsigned
        return -128 if r.act_dtype == "int8" and not relu_u8 else 0

    @property
    def qmax(self) -> int:
        return self.qmin + 255

    def fixed_zero_point(self) -> int | None:
        """The zero point the rules fix, on the 0..255 grid (0: unsigned; 128: symmetric int8), or None when
        it is learned."""
        if not self.integer_zero_point:
            return None
        if self.unsigned and self.rules.relu_unsigned:
            return 0
        return -self.qmin if self.rules.act_zero_point == "zero" else None

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        lo = _all_reduce(x.detach().min().reshape(1).clone(), torch.distributed.ReduceOp.MIN)
        hi = _all_reduce(x.detach().max().reshape(1).clone(), torch.distributed.ReduceOp.MAX)
        zp = self.fixed_zero_point()
        if self.integer_zero_point:
            # an integer zero point in [0, 255] can only represent ranges that contain 0: without this,
            # an all-positive input (e.g. a GAP of ReLU outputs) got zp 0 and was clipped at hi - lo
            lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
            if self.unsigned and zp == 0:
                lo = torch.zeros_like(lo)
            if self.max_value is not None:
                hi = hi.clamp_max(self.max_value)
        if zp:  # symmetric int8: the larger side sets the scale
            self.scale.copy_(torch.maximum(hi / (255 - zp), -lo / zp).clamp_min(1e-7))
        else:
            self.scale.copy_(((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-7))
        self.offset.copy_(lo)
        self.initialized.fill_(True)

    @_fp32
    def forward(self, x):
        if not self.enabled:
            return x
        if not self.initialized:
            self.init_from(x)
        if self.integer_zero_point and not self.training:
            return self.fake_quant_as_deployed(x)
        g = 1.0 / math.sqrt(x.numel() // x.shape[0] * (self.qmax - self.qmin)) if self.training else 1.0
        scale, offset = self._constrained()
        return quantize_activation(x, scale, offset, self.qmin, self.qmax, self.integer_zero_point, g)

    def fake_quant_as_deployed(self, x):
        """The backend presets' eval mode: torch's fake-quant op with the integer (scale, zero point), the op the
        deployed model runs. It rounds x * (1/s); x / s, as training computes, rounds differently at a few
        values per million, and each such flip travels through the network (~1 % of the logits)."""
        s, zp = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, s, zp, self.qmin, self.qmax)

    def _constrained(self):
        """(scale, offset) with the rules and the `unsigned` / `max_value` constraints applied: a fixed zero
        point makes the offset -zp * scale (still in the autograd graph), power-of-two rules round the scale."""
        scale, offset = self.scale, self.offset
        zp = self.fixed_zero_point()
        if zp == 0:
            offset = offset * 0.0  # zero point at the bottom of the grid (still in the autograd graph)
        if self.integer_zero_point and self.max_value is not None:
            scale = scale.abs().clamp_max(self.max_value / (self.qmax - self.qmin - (zp or 0)))
        if self.rules.pot_scale:
            scale = pot_ste(scale.abs().clamp_min(SCALE_FLOOR))
        if zp:
            offset = offset * 0.0 - zp * scale.abs().clamp_min(SCALE_FLOOR)
        return scale, offset

    def zero_point(self) -> int:
        """Integer zero point on this quantizer's grid (0..255 for uint8 grids, -128..127 for int8 ones)."""
        return self.qparams()[1]

    @torch.no_grad()
    def qparams(self) -> tuple[float, int]:
        """(scale, integer zero point on this quantizer's grid) exactly as the forward pass uses them
        (backend presets; for deployment)."""
        scale, offset = self._constrained()
        s = scale.abs().clamp_min(SCALE_FLOOR)
        zp = torch.clamp(torch.round(-offset / s), 0, self.qmax - self.qmin)
        return float(s.item()), int(zp.item()) + self.qmin


class WeightQuantizer(_Quantizer):
    """8-bit weights under the preset's `QuantRules`: symmetric per tensor (original, vitis) or per output
    channel (ort, tflite, tensorrt, openvino), or asymmetric uint8 per tensor with a learned integer zero
    point (snpe: the weight is fake-quantized as an activation is)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def configure(self, preset: str) -> None:
        self.preset, self.rules = preset, RULES[preset]
        self.per_channel, self.symmetric = self.rules.weight_per_channel, self.rules.weight_symmetric
        self.qmin, self.qmax = self.rules.weight_range
        shape = self.channels if self.per_channel else 1
        fresh = not hasattr(self, "scale") or self.scale.numel() != shape
        if hasattr(self, "offset") == self.symmetric:  # an asymmetric grid learns an offset, a symmetric one none
            if self.symmetric:
                del self.offset
            else:
                self.offset = nn.Parameter(torch.zeros(1))
                fresh = True
        if fresh:
            if hasattr(self, "scale"):
                del self.scale
                del self.initialized
            self.scale = nn.Parameter(torch.ones(shape))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Scale = max|W| / 127 (per channel when per_channel), so no weight is clipped at init; an asymmetric
        grid spans [min(W, 0), max(W, 0)]."""
        if not self.symmetric:
            lo = _all_reduce(w.detach().min().clamp_max(0.0).reshape(1).clone(), torch.distributed.ReduceOp.MIN)
            hi = _all_reduce(w.detach().max().clamp_min(0.0).reshape(1).clone(), torch.distributed.ReduceOp.MAX)
            self.scale.copy_(((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-7))
            self.offset.copy_(lo)
            self.initialized.fill_(True)
            return
        if self.per_channel:
            m = w.detach().abs().flatten(1).amax(1)
            m = torch.cat([m, m.new_full((self.channels - m.numel(),), float(m.mean()))])
        else:
            m = w.detach().abs().max().reshape(1)
        m = _all_reduce(m.clone(), torch.distributed.ReduceOp.MAX)
        self.scale.copy_((m / self.qmax).clamp_min(1e-7))
        self.initialized.fill_(True)

    def effective(self, cout: int, gain: float = 1.0):
        """(scale, offset or None) the fake-quant of a `cout`-channel weight uses: the learned ones, times `gain`
        (a per-tensor weight with BN folded in, `modules.ops.fold_bn_float`), rounded to powers of two when the
        rules say so."""
        scale = self.scale[:cout] if self.per_channel else self.scale
        offset = None if self.symmetric else self.offset
        if gain != 1.0:
            scale = scale.abs() * gain
            offset = None if offset is None else offset * gain
        if self.rules.pot_scale:
            scale = pot_ste(scale.abs().clamp_min(SCALE_FLOOR))
        return scale, offset

    @_fp32
    def forward(self, w):
        """w: the active (sliced) weight; its first dim indexes the first w.shape[0] channels."""
        return self.quantize(w)

    def quantize(self, w, gain: float = 1.0):
        """Fake-quantize `w` with the learned parameters times `gain` (see `effective`)."""
        if not self.enabled:
            return w
        if not self.initialized:
            self.init_from(w)
        scale, offset = self.effective(w.shape[0], gain)
        if offset is not None:
            g = 1.0 / math.sqrt(w.numel() * (self.qmax - self.qmin)) if self.training else 1.0
            return quantize_activation(w, scale, offset, self.qmin, self.qmax, True, g)
        per_scale = w.numel() // scale.numel()
        g = 1.0 / math.sqrt(per_scale * self.qmax) if self.training else 1.0
        return quantize_weight(w, scale, self.qmin, self.qmax, g)

    @torch.no_grad()
    def qparams(self, cout: int, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, integer zero points), one per channel or one per tensor, as `quantize` uses them."""
        scale, offset = self.effective(cout, gain)
        s = scale.abs().clamp_min(SCALE_FLOOR)
        if offset is None:
            return s, torch.zeros(s.shape, dtype=torch.int64)
        zp = torch.clamp(torch.round(-offset / s), 0, self.qmax - self.qmin) + self.qmin
        return s, zp.to(torch.int64)


class QBase(nn.Module):
    """Mixin for quantizable ops: `self.act_quant(x)` on the input, `self.weight_quant(w)` on the weight."""

    def _init_quant(self, out_channels: int) -> None:
        self.act_quant = ActQuantizer()
        self.weight_quant = WeightQuantizer(out_channels)


class QConv2d(nn.Conv2d, QBase):
    """A plain (static) Conv2d with LSQ+ quantizers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(self.out_channels)

    def forward(self, x):
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QLinear(nn.Linear, QBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(self.out_features)

    def forward(self, x):
        return nn.functional.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)


def quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _Quantizer)]


def set_quant_mode(model: nn.Module, mode: str, preset: str = "ort") -> nn.Module:
    """Switch every quantizer in `model` (the root included) to "fp32" or "lsq" with `preset`."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quant mode {mode!r}; allowed: {', '.join(QUANT_MODES)}")
    if preset not in PRESETS:
        raise ValueError(f"quant preset {preset!r}; allowed: {', '.join(PRESETS)}")
    for q in quantizers(model):
        if mode == "lsq":
            q.configure(preset)
        q.enabled = mode == "lsq"
    model.quant_mode, model.quant_preset = mode, (preset if mode == "lsq" else None)
    for link in _LINK_PASSES:
        link(model)
    return model


_LINK_PASSES = []


def register_link_pass(fn):
    """Register `fn(model)`, run by every `set_quant_mode` call: model-level structure the quantizers
    need (e.g. `modules.blocks` marks a block's input quantizer `unsigned` when the previous block
    ends in a ReLU)."""
    if fn not in _LINK_PASSES:
        _LINK_PASSES.append(fn)
    return fn


def get_quant_mode(model: nn.Module) -> str:
    return "lsq" if any(q.enabled for q in quantizers(model)) else "fp32"


def quant_parameters(model: nn.Module):
    """The learned LSQ+ scales and offsets (no weight decay on them)."""
    return [p for q in quantizers(model) for p in q.parameters(recurse=False)]


@torch.no_grad()
def convert_original_preset(model: nn.Module, preset: str = "ort") -> nn.Module:
    """Switch an ``original``-preset LSQ+ model to a backend preset, keeping what it learned, so that it deploys
    to int8 runtimes: each weight scale becomes the same scale for every channel (integers clipped to the
    symmetric range, -128 -> -127), each activation offset is snapped to the integer zero point nearest to it
    (in the forward pass). The tensors the original never quantizes (residual branches, SE, pooling inputs)
    get fresh quantizers that take their range from the next batch that flows through (calibration)."""
    if preset not in PRESETS or preset == "original":
        raise ValueError(f"target preset {preset!r}; allowed: {', '.join(p for p in PRESETS if p != 'original')}")
    enabled = [q for q in quantizers(model) if q.enabled]
    if not enabled or any(q.preset != "original" for q in enabled):
        raise ValueError("convert_original_preset needs an LSQ+ model with the original preset")
    weights = {q: (q.scale.detach().abs().clone(), bool(q.initialized)) for q in enabled
               if isinstance(q, WeightQuantizer)}
    set_quant_mode(model, "lsq", preset)
    for q, (scale, initialized) in weights.items():
        q.scale.copy_(scale.expand_as(q.scale))
        if not q.symmetric:  # the original's grid [-128, 127] on an asymmetric uint8 one: zero point 128
            q.offset.copy_(-128 * q.scale)
        q.initialized.fill_(initialized)
    return model
