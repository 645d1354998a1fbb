"""Elastic ops: weights stored at the maximum size, sliced per forward (reference spec §2.1).

* `DynamicConv2d`: first `active_out_channels` outputs, first x.shape[1] inputs, the centred
  `active_kernel_size` crop of the largest kernel (no OFA kernel transform), optional bias.
  `depthwise=True` makes it a depthwise conv over the input's channels.
* `DynamicBatchNorm2d`: affine parameters and running stats sliced to the input's channels; in
  training only those entries of the running stats are updated.
* `DynamicLinear`, `DynamicSE` (squeeze-excite with a caller-chosen active mid width),
  `DynamicK3DWStack` (kernel k as (k-1)/2 stacked 3x3 depthwise convs).

A static module is the same class built with single-choice sizes, so slicing is then a no-op and
extracted subnets compute exactly what the supernet computed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.lsq import QBase
from modules.superspace import make_divisible

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "swish": nn.SiLU, "hswish": nn.Hardswish, "none": nn.Identity}


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

    def forward(self, x):
        cin = x.shape[1]
        w = self.weight_quant(self.active_weight(cin).contiguous())
        b = None if self.bias is None else self.bias[: w.shape[0]]
        return F.conv2d(self.act_quant(x), w, b, self.stride, self.active_kernel_size // 2, 1,
                        cin if self.depthwise else 1)

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
        return F.linear(self.act_quant(x), w, b)


class DynamicSE(nn.Module):
    """Squeeze-excite: GAP -> 1x1 conv C->mid (+bias) -> ReLU -> 1x1 conv mid->C (+bias) -> Hardsigmoid -> x*s.

    The active mid width is set by the owning block (`active_mid`): from the active C for MBv3-style
    SE, from the block's input width for ResNet-style SE (spec §2.1).
    """

    def __init__(self, max_channels: int, max_mid: int):
        super().__init__()
        self.reduce = DynamicConv2d(max_channels, max_mid, 1, bias=True)
        self.expand = DynamicConv2d(max_mid, max_channels, 1, bias=True)
        self.relu = nn.ReLU()
        self.gate = nn.Hardsigmoid()
        self.active_mid = max_mid

    def forward(self, x):
        self.reduce.active_out_channels = self.active_mid
        self.expand.active_out_channels = x.shape[1]
        # global average pooling (not .mean): ONNX GlobalAveragePool, which ORT runs in int8
        s = self.gate(self.expand(self.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


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

    def forward(self, x):
        for conv in self.convs[: (self.active_kernel_size - 1) // 2]:
            x = conv(x)
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
        self.act = build_act(act)

    def set_active(self, out_channels: int | None = None, kernel_size: int | None = None) -> None:
        if out_channels is not None and isinstance(self.conv, DynamicConv2d):
            self.conv.active_out_channels = out_channels
        if kernel_size is not None:
            self.conv.active_kernel_size = kernel_size

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))
