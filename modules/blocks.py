"""Block families of the superspaces (those of the original code), elastic in kernel, width and expand ratio.

Every block is built from its `BlockSpec` choices, the widths its input may have (`in_list`) and its
output width choices (`width_list`); `set_active(k, w, e)` picks one configuration and the input
width is read from the tensor. A block built with single-choice lists is a static block.

Backend presets (``ort``/``tflite``, `modules.deploy`): a block quantizes its input once (with its
first conv's input quantizer) and feeds that to the branch and to the shortcut; a residual branch is
quantized before the add (`branch_quant`), a projection shortcut after its conv (`shortcut_quant`); so
every residual add reads two quantized tensors and ONNX Runtime / TFLite run it as an int8 add. A
quantizer whose input comes from a ReLU/ReLU6 is marked `unsigned` (`modules.ops.mark_input`),
across blocks by `link_block_inputs` (run by `set_quant_mode`).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from modules.lsq import register_link_pass
from modules.ops import (DynamicConvBNAct, DynamicLinear, DynamicSE, OriginalPresetQuantizer, TensorQuantizer,
                         backend_active, build_act, mark_input, se_mid)
from modules.superspace import BlockSpec, make_divisible


class DynamicBlock(nn.Module):
    output_act = "none"  # what makes the block's output (a residual add, a projection, or `spec.act`)

    def __init__(self, spec: BlockSpec, in_list, width_list, stride: int):
        super().__init__()
        self.spec = spec
        self.in_list, self.width_list = tuple(in_list), tuple(width_list)
        self.kernel_list, self.expand_list = tuple(spec.kernel_list), tuple(spec.expand_list)
        self.stride = stride
        self.max_in, self.max_out, self.max_kernel = max(in_list), max(width_list), max(spec.kernel_list)
        self.set_active(self.max_kernel, self.max_out, self.max_expand)

    @property
    def max_expand(self):
        return None if self.expand_list == (None,) else max(self.expand_list)

    def set_active(self, kernel: int, width: int, expand) -> None:
        self.active_kernel, self.active_width, self.active_expand = kernel, width, expand

    def _make_shortcut(self) -> nn.Module | None:
        """A 1x1 stride-s conv + BN projection, built only if some (cin, w) pair needs it."""
        if self.stride == 1 and all(c == w for c in self.in_list for w in self.width_list):
            return None
        shortcut = DynamicConvBNAct(self.max_in, self.max_out, 1, self.stride, act="none")
        shortcut.conv.act_quant = OriginalPresetQuantizer()  # backend presets: reads the quantized block input
        self.shortcut_quant = TensorQuantizer()
        return shortcut

    def _shortcut(self, x, prequantized=False):
        if x.shape[1] == self.active_width and self.stride == 1:
            return x
        self.shortcut.set_active(self.active_width)
        return self.shortcut_quant(self.shortcut(x, prequantized))

    @staticmethod
    def _quantize_input(x, first: DynamicConvBNAct):
        """Backend presets: (x quantized by `first`'s input quantizer, that quantizer); else (x, False).
        The quantizer is passed on as `prequantized` to the convs that read x."""
        q = first.input_quantizer()
        if backend_active(q):
            return q(x), q
        return x, False

    def input_quantizers(self) -> list:
        """The quantizers that read this block's input (marked by `link_block_inputs`)."""
        return []

    def hidden_width(self, cin: int) -> int | None:
        return None

    def config(self, cin: int) -> dict:
        """Block configuration for the latency predictor and the counter."""
        return dict(name=type(self).__name__, cin=cin, cout=self.active_width, kernel=self.active_kernel,
                    expand=self.active_expand, stride=self.stride, act=self.spec.act, se=self.spec.se)


class MobileNetV1Dual(DynamicBlock):
    """DW k s -> 1x1 cin->w -> DW k -> 1x1 w->w (each BN+ReLU), plus identity or projection shortcut."""

    def __init__(self, spec, in_list, width_list, stride):
        super().__init__(spec, in_list, width_list, stride)
        self.dw1 = DynamicConvBNAct(self.max_in, self.max_in, self.max_kernel, stride, spec.act, depthwise=True)
        self.pw1 = DynamicConvBNAct(self.max_in, self.max_out, 1, 1, spec.act)
        self.dw2 = DynamicConvBNAct(self.max_out, self.max_out, self.max_kernel, 1, spec.act, depthwise=True)
        self.pw2 = DynamicConvBNAct(self.max_out, self.max_out, 1, 1, spec.act)
        self.shortcut = self._make_shortcut()
        self.branch_quant = TensorQuantizer()
        for q in (self.pw1.input_quantizer(), self.dw2.input_quantizer(), self.pw2.input_quantizer(), self.branch_quant):
            mark_input(q, spec.act)

    def input_quantizers(self):
        return [self.dw1.input_quantizer()]

    def forward(self, x):
        k, w = self.active_kernel, self.active_width
        self.dw1.set_active(kernel_size=k)
        self.pw1.set_active(w)
        self.dw2.set_active(kernel_size=k)
        self.pw2.set_active(w)
        x, pre = self._quantize_input(x, self.dw1)
        return self.branch_quant(self.pw2(self.dw2(self.pw1(self.dw1(x, pre))))) + self._shortcut(x, pre)

    def last_bn(self):
        # None: pw2's BN is followed by a ReLU, so a zero gamma would make the branch output 0 with zero
        # gradient for good (the original zeroed it and killed every V1Dual residual branch)
        return None


class InvertedResidual(DynamicBlock):
    """MobileNetV2/V3 family: [1x1 expand] -> DW k (or K3 stack) -> [SE] -> 1x1 project; h = e * cin."""
    k3_stack = False
    force_residual = True

    def __init__(self, spec, in_list, width_list, stride):
        super().__init__(spec, in_list, width_list, stride)
        self.max_hidden = max(make_divisible(e * c) for e in self.expand_list for c in self.in_list)
        if any(make_divisible(e * c) != c for e in self.expand_list for c in self.in_list):
            self.expand_conv = DynamicConvBNAct(self.max_in, self.max_hidden, 1, 1, spec.act)
        else:
            self.expand_conv = None
        self.dw = DynamicConvBNAct(self.max_hidden, self.max_hidden, self.max_kernel, stride, spec.act,
                                   depthwise=True, k3_stack=self.k3_stack)
        self.se = DynamicSE(self.max_hidden, se_mid(self.max_hidden), spec.act) if spec.se else None
        self.project = DynamicConvBNAct(self.max_hidden, self.max_out, 1, 1, "none")
        if self.force_residual:
            self.shortcut = self._make_shortcut()
        self.branch_quant = TensorQuantizer()
        if self.expand_conv is not None and all(make_divisible(e * c) != c for e in self.expand_list for c in self.in_list):
            mark_input(self.dw.input_quantizer(), spec.act)  # the DW conv always reads the expand conv's output
        if self.se is None:
            mark_input(self.project.input_quantizer(), spec.act)

    def input_quantizers(self):
        if self.expand_conv is None:
            return [self.dw.input_quantizer()]
        if all(make_divisible(e * c) != c for e in self.expand_list for c in self.in_list):
            return [self.expand_conv.input_quantizer()]
        return []  # the DW conv reads the block input or the expand output: no sign to rely on

    def hidden_width(self, cin):
        return make_divisible(self.active_expand * cin)

    def forward(self, x):
        cin = x.shape[1]
        h = self.hidden_width(cin)
        x, pre = self._quantize_input(x, self.expand_conv if h != cin else self.dw)
        out = x
        if h != cin:
            self.expand_conv.set_active(h)
            out = self.expand_conv(out, pre)
        self.dw.set_active(kernel_size=self.active_kernel)
        out = self.dw(out, pre if h == cin else False)
        if self.se is not None:
            self.se.active_mid = se_mid(h)
            out = self.se(out)
        self.project.set_active(self.active_width)
        out = self.project(out)
        if self.force_residual:
            return self.branch_quant(out) + self._shortcut(x, pre)
        if cin == self.active_width and self.stride == 1:
            return self.branch_quant(out) + x
        return out

    def last_bn(self):
        return self.project.bn if self.force_residual else None


class MobileNetV2(InvertedResidual):
    force_residual = False


class MobileNetV2Res(InvertedResidual):
    pass


class MobileNetV3Res(InvertedResidual):
    pass


class MobileNetV2K3Res(InvertedResidual):
    k3_stack = True


class MobileNetV3K3Res(InvertedResidual):
    k3_stack = True


class ResNet(DynamicBlock):
    """Bottleneck: 1x1 cin->h -> k x k s -> [SE, mid from cin] -> 1x1 h->w; act(path + shortcut); h = e * w."""

    def __init__(self, spec, in_list, width_list, stride):
        super().__init__(spec, in_list, width_list, stride)
        self.max_hidden = max(make_divisible(e * w) for e in self.expand_list for w in self.width_list)
        self.conv1 = DynamicConvBNAct(self.max_in, self.max_hidden, 1, 1, spec.act)
        self.conv2 = DynamicConvBNAct(self.max_hidden, self.max_hidden, self.max_kernel, stride, spec.act)
        self.se = DynamicSE(self.max_hidden, se_mid(self.max_in), spec.act) if spec.se else None
        self.conv3 = DynamicConvBNAct(self.max_hidden, self.max_out, 1, 1, "none")
        self.shortcut = self._make_shortcut()
        self.final_act = build_act(spec.act)
        self.output_act = spec.act
        self.branch_quant = TensorQuantizer()
        mark_input(self.conv2.input_quantizer(), spec.act)
        if self.se is None:
            mark_input(self.conv3.input_quantizer(), spec.act)

    def input_quantizers(self):
        return [self.conv1.input_quantizer()]

    def hidden_width(self, cin):
        return make_divisible(self.active_expand * self.active_width)

    def forward(self, x):
        h = self.hidden_width(x.shape[1])
        self.conv1.set_active(h)
        self.conv2.set_active(h, self.active_kernel)
        x, pre = self._quantize_input(x, self.conv1)
        out = self.conv2(self.conv1(x, pre))
        if self.se is not None:
            self.se.active_mid = se_mid(x.shape[1])
            out = self.se(out)
        self.conv3.set_active(self.active_width)
        return self.final_act(self.branch_quant(self.conv3(out)) + self._shortcut(x, pre))

    def last_bn(self):
        return self.conv3.bn


class ResNetSE(ResNet):
    pass


class FusedMBConvRes(DynamicBlock):
    """Fused k x k s conv cin->h (always present) -> [SE, mid from cin] -> 1x1 h->w; always residual."""

    def __init__(self, spec, in_list, width_list, stride):
        super().__init__(spec, in_list, width_list, stride)
        self.max_hidden = max(make_divisible(e * c) for e in self.expand_list for c in self.in_list)
        self.fused = DynamicConvBNAct(self.max_in, self.max_hidden, self.max_kernel, stride, spec.act)
        self.se = DynamicSE(self.max_hidden, se_mid(self.max_in), spec.act) if spec.se else None
        self.project = DynamicConvBNAct(self.max_hidden, self.max_out, 1, 1, "none")
        self.shortcut = self._make_shortcut()
        self.branch_quant = TensorQuantizer()
        if self.se is None:
            mark_input(self.project.input_quantizer(), spec.act)

    def input_quantizers(self):
        return [self.fused.input_quantizer()]

    def hidden_width(self, cin):
        return make_divisible(self.active_expand * cin)

    def forward(self, x):
        h = self.hidden_width(x.shape[1])
        self.fused.set_active(h, self.active_kernel)
        x, pre = self._quantize_input(x, self.fused)
        out = self.fused(x, pre)
        if self.se is not None:
            self.se.active_mid = se_mid(x.shape[1])
            out = self.se(out)
        self.project.set_active(self.active_width)
        return self.branch_quant(self.project(out)) + self._shortcut(x, pre)

    def last_bn(self):
        return self.project.bn


class FusedMBConvSERes(FusedMBConvRes):
    pass


class FirstConv(DynamicBlock):
    """3x3 stride-2 conv + BN + ReLU on the image."""

    def __init__(self, spec, in_list, width_list, stride):
        super().__init__(spec, in_list, width_list, stride)
        self.conv = DynamicConvBNAct(self.max_in, self.max_out, self.max_kernel, stride, spec.act)
        self.output_act = spec.act

    def input_quantizers(self):
        return [self.conv.input_quantizer()]

    def forward(self, x):
        self.conv.set_active(self.active_width)
        return self.conv(x)


class FinalExpand(FirstConv):
    """1x1 conv + BN + act to the head width."""


class FeatureMix(FirstConv):
    """Global average pool, then 1x1 conv + BN + act. Backend presets quantize the pooling input."""

    def __init__(self, spec, in_list, width_list, stride):
        super().__init__(spec, in_list, width_list, stride)
        self.pool_quant = TensorQuantizer()

    def input_quantizers(self):
        return [self.pool_quant, self.conv.input_quantizer()]  # the GAP keeps the sign of its input

    def forward(self, x):
        return super().forward(F.adaptive_avg_pool2d(self.pool_quant(x), 1))


class Logits(DynamicBlock):
    """Flatten (never squeezes the batch dim), dropout, linear."""

    def __init__(self, spec, in_list, width_list, stride, dropout: float = 0.0):
        super().__init__(spec, in_list, width_list, stride)
        self.dropout = nn.Dropout(dropout)
        self.linear = DynamicLinear(self.max_in, self.max_out)

    def input_quantizers(self):
        return [self.linear.act_quant]

    def forward(self, x):
        return self.linear(self.dropout(x.flatten(1)))


BLOCKS = {cls.__name__: cls for cls in (
    MobileNetV1Dual, MobileNetV2, MobileNetV2Res, MobileNetV3Res, MobileNetV2K3Res, MobileNetV3K3Res,
    ResNet, ResNetSE, FusedMBConvRes, FusedMBConvSERes, FirstConv, FinalExpand, FeatureMix, Logits)}

def build_block(spec: BlockSpec, in_list, width_list, stride: int) -> DynamicBlock:
    if spec.name not in BLOCKS:
        raise ValueError(f"unknown block type {spec.name!r}; allowed: {', '.join(BLOCKS)}")
    return BLOCKS[spec.name](spec, in_list, width_list, stride)


@register_link_pass
def link_block_inputs(model: nn.Module) -> None:
    """Mark the input quantizers of every block after a block that ends in a ReLU/ReLU6 (`mark_input`).

    Chains: the `blocks` of any module that has them (a stage), and a network with `stages` (each with
    `blocks`) followed by `final_expand`, `feature_mix`, `logits` (SuperNet). All blocks of a stage have
    the same type, so with elastic depth the previous block is always of the type linked here."""
    chains = []
    for m in model.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            chains.append([b for b in blocks if isinstance(b, DynamicBlock)])
        stages = getattr(m, "stages", None)
        if isinstance(stages, nn.ModuleList):
            chain = [b for s in stages for b in getattr(s, "blocks", []) if isinstance(b, DynamicBlock)]
            chain += [getattr(m, n) for n in ("final_expand", "feature_mix", "logits")
                      if isinstance(getattr(m, n, None), DynamicBlock)]
            chains.append(chain)
    for chain in chains:
        for prev, block in zip(chain, chain[1:]):
            for q in block.input_quantizers():
                mark_input(q, prev.output_act)
