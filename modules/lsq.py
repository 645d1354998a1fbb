"""LSQ+ fake quantization (learned step size, learned offset) for 8-bit weights and activations.

Every quantizable op (conv, linear) owns an `ActQuantizer` for its input and a `WeightQuantizer`
for its weight. In "fp32" mode both are the identity and own no parameters, so an fp32 model's
state dict and DDP see no quantization state. `set_quant_mode(model, "lsq", preset)` creates the
learned parameters (so call it before building the optimizer and before loading an LSQ checkpoint);
the scales are initialised from the first batch that flows through (min/max), unless they were
loaded from a checkpoint (`initialized` is a buffer, saved with the weights).

Presets (what the fake-quant simulates):
  * ``original``: as the SpaceEvo code (spec §4): per-tensor weights in [-128, 127], unsigned 8-bit
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

Fixes against the original (spec §13.1): the weight scale starts at max|W|/127 (the original's
max|W|/255 clipped half the range); the root module is switched too; scales have a floor.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

QUANT_MODES = ("fp32", "lsq")
PRESETS = ("original", "ort", "tflite", "ort_avx2")
# weight integer range per preset: ort_avx2 keeps weights in 7 bits, as ONNX Runtime's reduce_range, so that
# the fast u8 x s8 kernels of x86 CPUs without VNNI (int16 pair sums) cannot saturate
WEIGHT_RANGES = {"original": (-128, 127), "ort": (-127, 127), "tflite": (-127, 127), "ort_avx2": (-63, 63)}
SCALE_FLOOR = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of x, gradient multiplied by g (LSQ step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def quantize_activation(x, scale, offset, qmin: int, qmax: int, integer_zero_point: bool, g: float = 1.0):
    """LSQ+ activation fake-quant: round(clamp((x - offset) / s, qmin', qmax')) * s + offset."""
    s = grad_scale(scale.abs().clamp_min(SCALE_FLOOR), g)
    beta = grad_scale(offset, g)
    levels = qmax - qmin
    if integer_zero_point:
        # the real-valued offset beta becomes the integer zero point zp = round(-beta/s) in [0, levels]
        zp = round_ste(torch.clamp(-beta / s, 0, levels))
        beta = -zp * s
    return round_ste(torch.clamp((x - beta) / s, 0, levels)) * s + beta


def quantize_weight(w, scale, qmin: int, qmax: int, g: float = 1.0):
    """Symmetric weight fake-quant; scale has shape [1] (per tensor) or [Cout] (per channel)."""
    s = grad_scale(scale.abs().clamp_min(SCALE_FLOOR), g)
    if s.numel() > 1:
        s = s.view(-1, *([1] * (w.dim() - 1)))
    return round_ste(torch.clamp(w / s, qmin, qmax)) * s


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op)
    return t


class _Quantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.enabled = False
        self.preset = None

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, preset={self.preset}"


class ActQuantizer(_Quantizer):
    """Quantizes an op's input to 8 bits with a learned scale and offset (LSQ+).

    Two structural constraints, set by the block that knows what produces the input and used by the
    backend presets only (``ort``, ``tflite``), make the fake-quant what an int8 kernel can fuse:
    ``unsigned`` (the input is a ReLU/ReLU6 output: the zero point is fixed at the bottom of the grid,
    so ONNX Runtime drops the Relu into the producing QLinearConv/QLinearAdd) and ``max_value`` (the
    range never exceeds it, e.g. 6 after ReLU6, so ONNX Runtime drops the Clip). Neither is state.
    """
    unsigned = False
    max_value = None

    def configure(self, preset: str) -> None:
        self.preset = preset
        self.integer_zero_point = preset != "original"
        # the grid is 256 levels in every preset; tflite only names it -128..127 instead of 0..255
        self.qmin, self.qmax = (-128, 127) if preset == "tflite" else (0, 255)
        if not hasattr(self, "scale"):
            self.scale = nn.Parameter(torch.ones(1))
            self.offset = nn.Parameter(torch.zeros(1))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        lo = _all_reduce(x.detach().min().reshape(1).clone(), torch.distributed.ReduceOp.MIN)
        hi = _all_reduce(x.detach().max().reshape(1).clone(), torch.distributed.ReduceOp.MAX)
        if self.integer_zero_point:
            # an integer zero point in [0, 255] can only represent ranges that contain 0: without this,
            # an all-positive input (e.g. a GAP of ReLU outputs) got zp 0 and was clipped at hi - lo
            lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
            if self.unsigned:
                lo = torch.zeros_like(lo)
            if self.max_value is not None:
                hi = hi.clamp_max(self.max_value)
        self.scale.copy_(((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-7))
        self.offset.copy_(lo)
        self.initialized.fill_(True)

    def forward(self, x):
        if not self.enabled:
            return x
        if not self.initialized:
            self.init_from(x)
        g = 1.0 / math.sqrt(x[0].numel() * (self.qmax - self.qmin)) if self.training else 1.0
        scale, offset = self._constrained()
        return quantize_activation(x, scale, offset, self.qmin, self.qmax, self.integer_zero_point, g)

    def _constrained(self):
        """(scale, offset) with the `unsigned` / `max_value` constraints of the backend presets applied."""
        scale, offset = self.scale, self.offset
        if self.integer_zero_point:
            if self.unsigned:
                offset = offset * 0.0  # zero point at the bottom of the grid (still in the autograd graph)
            if self.max_value is not None:
                scale = scale.abs().clamp_max(self.max_value / (self.qmax - self.qmin))
        return scale, offset

    def zero_point(self) -> int:
        """Integer zero point on this quantizer's grid (0..255 for ort, -128..127 for tflite)."""
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
    """Symmetric signed 8-bit weights, per tensor (original) or per output channel (ort/tflite)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def configure(self, preset: str) -> None:
        self.preset = preset
        self.per_channel = preset != "original"
        self.qmin, self.qmax = WEIGHT_RANGES[preset]
        shape = self.channels if self.per_channel else 1
        if not hasattr(self, "scale") or self.scale.numel() != shape:
            if hasattr(self, "scale"):
                del self.scale
                del self.initialized
            self.scale = nn.Parameter(torch.ones(shape))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Scale = max|W| / 127 (per channel when per_channel), so no weight is clipped at init."""
        if self.per_channel:
            m = w.detach().abs().flatten(1).amax(1)
            m = torch.cat([m, m.new_full((self.channels - m.numel(),), float(m.mean()))])
        else:
            m = w.detach().abs().max().reshape(1)
        m = _all_reduce(m.clone(), torch.distributed.ReduceOp.MAX)
        self.scale.copy_((m / self.qmax).clamp_min(1e-7))
        self.initialized.fill_(True)

    def forward(self, w):
        """w: the active (sliced) weight; its first dim indexes the first w.shape[0] channels."""
        if not self.enabled:
            return w
        if not self.initialized:
            self.init_from(w)
        scale = self.scale[: w.shape[0]] if self.per_channel else self.scale
        per_scale = w.numel() // scale.numel()
        g = 1.0 / math.sqrt(per_scale * self.qmax) if self.training else 1.0
        return quantize_weight(w, scale, self.qmin, self.qmax, g)


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
