"""Elastic ops: weights stored at the maximum size, sliced per forward, as in the original.

* `DynamicConv2d`: first `active_out_channels` outputs, first x.shape[1] inputs, the centred
  `active_kernel_size` crop of the largest kernel (no OFA kernel transform), optional bias.
  `depthwise=True` makes it a depthwise conv over the input's channels.
* `DynamicBatchNorm2d`: affine parameters and running stats sliced to the input's channels; in
  training only those entries of the running stats are updated.
* `DynamicLinear`, `DynamicSE` (squeeze-excite with a caller-chosen active mid width),
  `DynamicK3DWStack` (kernel k as (k-1)/2 stacked 3x3 depthwise convs).

A static module is the same class built with single-choice sizes, so slicing is then a no-op and
extracted subnets compute exactly what the supernet computed.

Backend presets (``ort``, ``tflite``; `modules.deploy` documents the measurements): besides every
conv / linear input, an int8 backend quantizes every tensor between two int8 kernels.
`TensorQuantizer`s sit where no conv input covers such a tensor: the conv output before a
hardswish/swish, the SE input and gate, a GAP input, residual branches (`modules.blocks`). swish
becomes x * q(sigmoid(x)) with the sigmoid on the fixed 1/256 grid (TFLite's int8 LOGISTIC, ORT's
QLinearSigmoid), the SE gate sits on the fixed 1/255 grid. In fp32 mode and in the ``original``
preset all of them are the identity and own no parameters.

In eval mode the backend presets compute what the int8 kernels compute: conv -> BN is one conv with
the BN folded into its per-channel weight scales (`fold_conv_bn`) and every conv / linear bias is
rounded to the int32 grid of step s_input * s_weight (`int32_bias`), as ONNX Runtime and TFLite
store it; the exported int8 models then agree with the eval-mode fake-quant to the last bit (ORT).
Training keeps conv -> BN with batch statistics and float biases.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.lsq import BACKEND_PRESETS, RULES, SCALE_FLOOR, ActQuantizer, QBase, pot_ste, quantize_activation
from modules.superspace import make_divisible

__all__ = ["BACKEND_PRESETS"]  # re-exported: the presets an int8 runtime runs (modules.lsq.RULES)


def backend_active(q: nn.Module) -> bool:
    """True if quantizer `q` is on and simulates an int8 backend (preset ort / tflite)."""
    return bool(getattr(q, "enabled", False)) and getattr(q, "preset", None) in BACKEND_PRESETS


def _drop_quant_state(q: nn.Module) -> None:
    """No parameters / buffers (a stateless identity); `initialized` stays readable as a plain True."""
    for name in ("scale", "offset"):
        q._parameters.pop(name, None)
    q._buffers.pop("initialized", None)
    q.__dict__["initialized"] = torch.ones((), dtype=torch.bool)


def _restore_quant_state(q: nn.Module) -> None:
    q.__dict__.pop("initialized", None)  # ActQuantizer.configure registers the buffer


class TensorQuantizer(ActQuantizer):
    """An activation quantizer the backend presets add where an int8 backend quantizes a tensor that
    is no conv/linear input (pre-activations of hswish/swish, residual branches, SE input, GAP input).
    The identity without parameters in fp32 mode and in the ``original`` preset."""

    def configure(self, preset: str) -> None:
        if preset in BACKEND_PRESETS:
            _restore_quant_state(self)
            super().configure(preset)
            return
        self.preset, self.rules, self.integer_zero_point = preset, RULES[preset], False
        _drop_quant_state(self)

    def forward(self, x):
        if not backend_active(self):
            return x
        return super().forward(x)


class FixedQuantizer(TensorQuantizer):
    """A TensorQuantizer on a fixed grid: a sigmoid output (step 1/256, what TFLite's int8 LOGISTIC requires)
    or the SE's hardsigmoid gate (1/255), k * step with k = 0..255 (zero point at the bottom). Presets whose
    rules forbid unsigned tensors (TensorRT, Vitis AI) use the symmetric int8 grid: twice the step (a power
    of two under power-of-two rules), zero point 0, half the levels unused."""
    unsigned = True

    def __init__(self, step: float):
        super().__init__()
        self.step = float(step)

    def configure(self, preset: str) -> None:
        _drop_quant_state(self)
        self.preset, self.rules = preset, RULES[preset]
        self.integer_zero_point = preset in BACKEND_PRESETS

    def grid(self) -> tuple[float, int]:
        """(step, zero point on the 0..255 grid) under this preset's rules."""
        zp = self.fixed_zero_point() or 0
        if not zp:
            return self.step, 0
        step = torch.tensor(2 * self.step)
        return float(pot_ste(step) if self.rules.pot_scale else step), zp

    def forward(self, x):
        if not backend_active(self):
            return x
        if not self.training:
            return self.fake_quant_as_deployed(x)
        step, zp = self.grid()
        offset = x.new_zeros(1) if zp == 0 else x.new_full((1,), -zp * step)
        return quantize_activation(x, x.new_full((1,), step), offset, self.qmin, self.qmax, True)

    def qparams(self) -> tuple[float, int]:
        step, zp = self.grid()
        return step, zp + self.qmin

    def extra_repr(self) -> str:
        return f"step={self.step:.6g}, enabled={self.enabled}, preset={self.preset}"


class OriginalPresetQuantizer(ActQuantizer):
    """A conv input quantizer of the ``original`` preset only. In the backend presets the conv reads a
    tensor that is already quantized (a projection shortcut reads the block input, quantized once for
    the branch and the shortcut): the identity without parameters."""

    def configure(self, preset: str) -> None:
        if preset not in BACKEND_PRESETS:
            _restore_quant_state(self)
            super().configure(preset)
            return
        self.preset, self.rules, self.integer_zero_point = preset, RULES[preset], True
        _drop_quant_state(self)

    def forward(self, x):
        if backend_active(self):
            return x
        return super().forward(x)


def weight_scale(conv: nn.Module, cout: int, gain: float = 1.0) -> torch.Tensor:
    """The weight scales of `conv`'s first `cout` channels as its WeightQuantizer uses them (one per channel;
    a per-tensor scale repeated). `gain`: see `WeightQuantizer.effective`."""
    s, _ = conv.weight_quant.qparams(cout, gain)
    return s if s.numel() == cout else s.expand(cout)


def input_scale(conv: nn.Module, prequantized) -> float:
    """Scale of the quantizer that quantizes `conv`'s input: the block's (`prequantized`) or its own."""
    q = prequantized if isinstance(prequantized, ActQuantizer) else conv.act_quant
    return q.qparams()[0]


def int32_bias(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """`bias` rounded to the int32 grid k * step (step = s_input * s_weight per channel), as int8 backends
    store biases."""
    return torch.round(bias / step) * step


def fold_conv_bn(w_q: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """Fold eval-mode BN into a conv with per-channel fake-quant weights `w_q` = q * s_w.

    Returns (weight, weight scale, bias): weight = q' * s', s' = s_w * |a|, q' = q * sign(a) with
    a = gamma / sqrt(var + eps) (a channel with a = 0 gets q' = 0, s' = s_w), bias = beta - mean * a
    (+ a * conv bias). Exact: per-channel scales absorb |a|, the symmetric integer range absorbs the sign.
    `modules.deploy` freezes exactly these tensors."""
    c = w_q.shape[0]
    a = bn.weight[:c] / torch.sqrt(bn.running_var[:c] + bn.eps)
    shift = bn.bias[:c] - bn.running_mean[:c] * a
    if bias is not None:
        shift = shift + a * bias[:c]
    view = (-1,) + (1,) * (w_q.dim() - 1)
    q = torch.round(w_q / s_w.view(view))
    zero = a == 0
    q = torch.where(zero.view(view), torch.zeros_like(q), q * torch.where(a < 0, -1.0, 1.0).view(view))
    s_fold = torch.where(zero, s_w, s_w * a.abs())
    return q * s_fold.view(view), s_fold, shift


def fold_bn_float(w: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """Fold eval-mode BN into a float conv weight before quantization, as a per-tensor backend's converter does
    (SNPE, Vitis AI): returns (w * a, bias', max|a|) with a = gamma / sqrt(var + eps). A per-tensor grid cannot
    absorb a per-channel factor exactly (unlike `fold_conv_bn`), so the folded weight is quantized afresh,
    with the learned per-tensor scale (and offset) times max|a|: the channel with the largest |a| keeps the
    grid it was trained on, the others get a coarser one relative to their range."""
    c = w.shape[0]
    a = bn.weight[:c] / torch.sqrt(bn.running_var[:c] + bn.eps)
    shift = bn.bias[:c] - bn.running_mean[:c] * a
    if bias is not None:
        shift = shift + a * bias[:c]
    gain = float(a.abs().max().clamp_min(SCALE_FLOOR))
    return w * a.view((-1,) + (1,) * (w.dim() - 1)), shift, gain


def eval_conv_params(conv: nn.Module, cin: int, prequantized, bn: nn.BatchNorm2d | None):
    """(fake-quant weight, per-channel weight scales, per-channel weight zero points, bias) of `conv` in the eval
    mode of a backend preset: BN folded (exactly into per-channel scales, `fold_conv_bn`; before quantization
    for per-tensor weights, `fold_bn_float`) and the bias on the int32 grid (`int32_bias`). `modules.deploy`
    freezes exactly these tensors."""
    wq = conv.weight_quant
    w = conv.active_weight(cin).contiguous()
    b = None if conv.bias is None else conv.bias[: w.shape[0]]
    cout, gain = w.shape[0], 1.0
    if bn is not None and not wq.per_channel:
        w, b, gain = fold_bn_float(w, b, bn)
        w = wq.quantize(w, gain)
        s_w = weight_scale(conv, cout, gain)
    else:
        w = wq(w)
        s_w = weight_scale(conv, cout)
        if bn is not None:
            w, s_w, b = fold_conv_bn(w, s_w, b, bn)
    zp = wq.qparams(cout, gain)[1].expand(cout)
    if b is not None:
        b = int32_bias(b, input_scale(conv, prequantized) * s_w)
    return w, s_w, zp, b


def mark_input(q: nn.Module, producer_act: str) -> None:
    """Tell quantizer `q` what produces its input: a ReLU output is `unsigned`, a ReLU6 output also
    capped at 6 (used by the backend presets only; see `ActQuantizer`)."""
    if isinstance(q, FixedQuantizer) or not isinstance(q, ActQuantizer):
        return
    if producer_act in ("relu", "relu6"):
        q.unsigned = True
    if producer_act == "relu6":
        q.max_value = 6.0


class QSiLU(nn.SiLU):
    """swish; in the backend presets x * q(sigmoid(x)) with the sigmoid on the fixed 1/256 grid, so that
    LOGISTIC / QLinearSigmoid and MUL / QLinearMul run in int8."""

    def __init__(self):
        super().__init__()
        self.sigmoid_quant = FixedQuantizer(1.0 / 256)

    def forward(self, x):
        if backend_active(self.sigmoid_quant):
            return x * self.sigmoid_quant(torch.sigmoid(x))
        return super().forward(x)


ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "swish": QSiLU, "hswish": nn.Hardswish, "none": nn.Identity}


def build_act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class DynamicConv2d(QBase):
    def __init__(self, max_in: int, max_out: int, max_kernel: int = 1, stride: int = 1,
                 depthwise: bool = False, bias: bool = False):
        super().__init__()
        self.max_in, self.max_out, self.max_kernel = max_in, max_out, max_kernel
        self.stride, self.depthwise = stride, depthwise
        in_per_group = 1 if depthwise else max_in
        self.weight = nn.Parameter(torch.empty(max_out, in_per_group, max_kernel, max_kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        self.active_out_channels = max_out
        self.active_kernel_size = max_kernel
        self._init_quant(max_out)

    def active_weight(self, in_channels: int) -> torch.Tensor:
        k = self.active_kernel_size
        start = self.max_kernel // 2 - k // 2
        cout = in_channels if self.depthwise else self.active_out_channels
        cin = 1 if self.depthwise else in_channels
        return self.weight[:cout, :cin, start:start + k, start:start + k]

    def forward(self, x, prequantized=False, fold_bn: nn.BatchNorm2d | None = None):
        """`prequantized`: the quantizer with which the owning block already quantized x (backend presets;
        act_quant is skipped), else False. `fold_bn` (eval mode, backend presets): the BN after this conv,
        folded in as the int8 backends compute it (`fold_conv_bn`, `int32_bias`)."""
        cin = x.shape[1]
        if fold_bn is not None or (self.bias is not None and not self.training and backend_active(self.weight_quant)):
            w, _, _, b = eval_conv_params(self, cin, prequantized, fold_bn)
        else:
            w = self.weight_quant(self.active_weight(cin).contiguous())
            b = None if self.bias is None else self.bias[: w.shape[0]]
        return F.conv2d(x if prequantized else self.act_quant(x), w, b, self.stride, self.active_kernel_size // 2,
                        1, cin if self.depthwise else 1)

    def extra_repr(self):
        return (f"{self.max_in}, {self.max_out}, kernel={self.max_kernel}, stride={self.stride}, "
                f"depthwise={self.depthwise}, bias={self.bias is not None}")


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels; `momentum=None` gives a cumulative average (BN calibration)."""

    def forward(self, x):
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        else:
            factor = 0.0
        use_batch_stats = self.training or not self.track_running_stats
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
                            use_batch_stats, factor, self.eps)


class DynamicLinear(QBase):
    def __init__(self, max_in: int, max_out: int, bias: bool = True):
        super().__init__()
        self.max_in, self.max_out = max_in, max_out
        self.weight = nn.Parameter(torch.empty(max_out, max_in))
        nn.init.normal_(self.weight, 0, 0.01)
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        self.active_out_features = max_out
        self._init_quant(max_out)

    def forward(self, x):
        w = self.weight_quant(self.weight[: self.active_out_features, : x.shape[1]].contiguous())
        b = None if self.bias is None else self.bias[: self.active_out_features]
        if b is not None and not self.training and backend_active(self.weight_quant):
            b = int32_bias(b, self.act_quant.qparams()[0] * weight_scale(self, w.shape[0]))
        return F.linear(self.act_quant(x), w, b)


class DynamicSE(nn.Module):
    """Squeeze-excite: GAP -> 1x1 conv C->mid (+bias) -> ReLU -> 1x1 conv mid->C (+bias) -> Hardsigmoid -> x*s.

    The active mid width is set by the owning block (`active_mid`): from the active C for MBv3-style
    SE, from the block's input width for ResNet-style SE (as the original does).
    """

    def __init__(self, max_channels: int, max_mid: int, input_act: str = "none"):
        super().__init__()
        self.reduce = DynamicConv2d(max_channels, max_mid, 1, bias=True)
        self.expand = DynamicConv2d(max_mid, max_channels, 1, bias=True)
        self.relu = nn.ReLU()
        self.gate = nn.Hardsigmoid()
        self.active_mid = max_mid
        # backend presets: x quantized once for the GAP and the multiply; the expand conv's output
        # quantized before the hardsigmoid; the gate on the fixed 1/255 grid
        self.in_quant, self.gate_pre_quant = TensorQuantizer(), TensorQuantizer()
        self.gate_quant = FixedQuantizer(1.0 / 255)
        mark_input(self.in_quant, input_act)
        mark_input(self.reduce.act_quant, input_act)  # the GAP of an unsigned tensor is unsigned
        mark_input(self.expand.act_quant, "relu")

    def forward(self, x):
        self.reduce.active_out_channels = self.active_mid
        self.expand.active_out_channels = x.shape[1]
        x = self.in_quant(x)
        # global average pooling (not .mean): ONNX GlobalAveragePool, which ORT runs in int8
        s = self.expand(self.relu(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        return x * self.gate_quant(self.gate(self.gate_pre_quant(s)))


def se_mid(channels: int) -> int:
    return make_divisible(channels // 4)


class DynamicK3DWStack(nn.Module):
    """Kernel k in {3,5,7} as 1/2/3 stacked 3x3 depthwise convs (the first has the stride), no BN between."""

    def __init__(self, max_channels: int, max_kernel: int, stride: int):
        super().__init__()
        n = (max_kernel - 1) // 2
        self.convs = nn.ModuleList(DynamicConv2d(max_channels, max_channels, 3, stride if i == 0 else 1,
                                                 depthwise=True) for i in range(n))
        self.active_kernel_size = max_kernel

    def forward(self, x, prequantized=False, fold_bn: nn.BatchNorm2d | None = None):
        """`fold_bn`: eval-mode backend presets fold this BN into the last active conv."""
        convs = self.convs[: (self.active_kernel_size - 1) // 2]
        for i, conv in enumerate(convs):
            pre = prequantized if i == 0 else False
            x = conv(x, pre, fold_bn if i == len(convs) - 1 else None)
        return x


class DynamicConvBNAct(nn.Module):
    """conv -> BN -> activation, all elastic."""

    def __init__(self, max_in: int, max_out: int, max_kernel: int = 1, stride: int = 1, act: str = "relu",
                 depthwise: bool = False, k3_stack: bool = False):
        super().__init__()
        if k3_stack:
            self.conv = DynamicK3DWStack(max_in, max_kernel, stride)
        else:
            self.conv = DynamicConv2d(max_in, max_out, max_kernel, stride, depthwise=depthwise)
        self.bn = DynamicBatchNorm2d(max_in if (depthwise or k3_stack) else max_out)
        self.act_name = act
        self.act = build_act(act)
        # backend presets: hardswish / swish have no int8 form fused into the conv: quantize the conv output
        self.pre_act_quant = TensorQuantizer() if act in ("hswish", "swish") else None

    def set_active(self, out_channels: int | None = None, kernel_size: int | None = None) -> None:
        if out_channels is not None and isinstance(self.conv, DynamicConv2d):
            self.conv.active_out_channels = out_channels
        if kernel_size is not None:
            self.conv.active_kernel_size = kernel_size

    def input_quantizer(self) -> ActQuantizer:
        """The quantizer of this op's input (its first conv's act_quant)."""
        return self.conv.convs[0].act_quant if isinstance(self.conv, DynamicK3DWStack) else self.conv.act_quant

    def folds_bn(self) -> bool:
        """Eval mode of a backend preset with BN running statistics: conv and BN run as one folded conv (not
        while the BN itself trains, e.g. in BN calibration)."""
        conv = self.conv.convs[0] if isinstance(self.conv, DynamicK3DWStack) else self.conv
        return (not self.training and isinstance(self.bn, nn.BatchNorm2d) and not self.bn.training
                and self.bn.track_running_stats and backend_active(conv.weight_quant))

    def forward(self, x, prequantized=False):
        if self.folds_bn():
            x = self.conv(x, prequantized, self.bn)
        else:
            x = self.bn(self.conv(x, prequantized))
        if self.pre_act_quant is not None:
            x = self.pre_act_quant(x)
        return self.act(x)
