"""Deploy exactly what was trained: learned LSQ+ scales into real int8 ONNX and TFLite.

The original exported an fp32 ONNX and re-quantized it with ONNX Runtime on 30 *random* images, so
the LSQ+ scales never reached the device and the deployed accuracy was unknown.
Here the trained fake-quant network itself is frozen and exported; no calibration step in between.

Backend presets (`modules.lsq`, `modules.ops`, `modules.blocks`), as MQBench's backend parameters:

=========  ======================================  =====================================
preset     activations (per tensor)                 weights (symmetric, per channel)
=========  ======================================  =====================================
original   u8 with a continuous offset              per tensor [-128, 127]: converted first
ort        u8, integer zero point                   s8 [-127, 127]
tflite     s8, integer zero point                   s8 [-127, 127]
ort_avx2   u8, integer zero point                   [-63, 63] (ORT's reduce_range)
tensorrt   s8, zero point 0                         s8 [-127, 127]
snpe       u8, integer zero point                   u8 per tensor, integer zero point
vitis      s8, zero point 0, power-of-two scales    s8 per tensor, power-of-two scale
openvino   s8 zero point 0; u8 zero point 0 after   s8 [-127, 127]
           a ReLU
=========  ======================================  =====================================

An ``original``-preset model (the original SpaceEvo's ``lsq.pth``) deploys after
`modules.lsq.convert_original_preset` (``export_subnet.py --quant_preset ort``): its learned scales kept, each
offset rounded to an integer zero point, per-channel weight scales.

The last four are the rules of backends that do not run here (OpenVINO's runtime integration lives with the
latency code): their QDQ ONNX files obey those rules and ORT runs them (`tests/test_presets.py`). Per-tensor
weight presets (snpe, vitis) fold BN into the float weight before quantizing it, as those backends' converters
do (`modules.ops.fold_bn_float`), so the eval mode and the exported file compute the same thing, a little
away from training's quantized-conv-then-BN (0.7-0.8 % of a conv's output in `tests/test_presets.py`, BN
gains 0.01-2). Every export writes the quantization config file beside the model (`modules.qconfig`).

``ort`` and ``tflite`` compute the same function (tflite names the 256-level grid -128..127 and its
zero point zp-128), so a model trained with either deploys to both. What they quantize, measured
with ONNX Runtime 1.32 (QDQ fusion) and litert-torch 0.10 (quantized_decomposed + STATIC mode):

* every conv / linear input (as in training since the original), with BN folded into the conv:
  per-channel weight scales make folding exact, s_c' = s_c |gamma_c / sigma_c|, the integer weight
  flips its sign with gamma (exact because the weight range is symmetric);
* conv / linear biases: int32 with step s_input * s_weight (both runtimes). Rounding the folded bias
  moves an output by up to ~1 % of its LSB, enough to flip a few roundings that then multiply through
  the network (measured: 2 % logit error vs fake-quant, 0.3 % with the fix). So the backend presets'
  **eval mode** computes conv -> BN as the folded conv with the int32 bias (`modules.ops.fold_conv_bn`,
  `int32_bias`); training keeps conv -> BN with batch statistics. ORT then reproduces the eval-mode
  torch model bit for bit up to float ties (rel. error 1e-7 on the demo's deploy graph);
* the block input once, shared by the branch and the shortcut, the residual branch before the add,
  a projection shortcut after its conv: ORT QLinearAdd / TFLite ADD (int8);
* ReLU / ReLU6 outputs on an unsigned grid (zero point at the bottom, ReLU6 range <= 6): ORT removes
  the Relu / Clip before a QuantizeLinear only then (ReluQuantFusion, ClipQuantFusion), so the conv
  fuses into QLinearConv; TFLite fuses them as the conv's activation;
* the conv output before hardswish / swish; swish as x * q(sigmoid(x)) with the sigmoid on the
  1/256 grid: QLinearSigmoid + QLinearMul / LOGISTIC + MUL run in int8; hardswish runs in int8 in
  TFLite (HARD_SWISH) but **not in ONNX Runtime** (float HardSigmoid + Mul between DQ/Q): hardswish
  blocks stay slower in int8 there, which is what the search has to see;
* the SE input (GAP and multiply read the same quantized tensor), the expand conv's output, the
  hardsigmoid gate on the 1/255 grid (the gate itself stays float on a [1, C, 1, 1] vector);
* global average pooling input (QLinearGlobalAveragePool / MEAN); the logits stay float (QGemm with
  float output: `_quantize_gemm_bias` gives the Gemm the int32 bias ORT needs for that).

Deployment (no calibration): `deploy_model` copies the network, freezes the eval-mode computation
(BN folded, int32 biases: the same tensors) and replaces each quantizer by a frozen one holding the
learned scale and zero point — for ONNX ``torch.fake_quantize_per_tensor_affine`` (u8) /
``fake_quantize_per_channel_affine`` (weights), exported with the TorchScript exporter (opset 13..17)
into one Q/DQ pair per tensor, which ORT fuses; for TFLite ``quantized_decomposed.quantize_per_tensor``
/ ``quantize_per_channel`` (s8), converted by litert-torch in static-quantization mode into CONV_2D /
DEPTHWISE_CONV_2D / ADD / MUL / MEAN / LOGISTIC / HARD_SWISH / FULLY_CONNECTED int8 kernels.

x86 CPUs without VNNI (this machine: AMD EPYC, AVX2): ORT's default u8 x s8 kernels add pairs of
products in saturating int16 (``vpmaddubsw``) and full-range weights overflow (4.6 % error on one
conv). Sessions here set ``session.x64quantprecision=1`` (`modules.latency.sessions.ort_session` with
``precise=None``, automatic on such CPUs):
exact u8 x u8 kernels, but about as slow as fp32. The ``ort_avx2`` preset trains 7-bit weights, which
ORT runs exactly with the fast kernels (it converts only weights outside [-64, 64]).

Example::

    from modules.deploy import export_onnx_int8, export_tflite_int8
    export_onnx_int8(subnet, "out/m_int8.onnx")          # subnet: a standalone LSQ+ (ort/tflite) network
    export_tflite_int8(subnet, "out/m_int8.tflite")
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.latency.sessions import ort_session
from modules.lsq import RULES, ActQuantizer, WeightQuantizer, get_quant_mode, quantizers
from modules.ops import (BACKEND_PRESETS, DynamicConv2d, DynamicLinear, OriginalPresetQuantizer, backend_active,
                         eval_conv_params, int32_bias, weight_scale)
from modules.qconfig import apply_qconfig, qconfig_of, qconfig_path, write_qconfig

__all__ = ["DEPLOY_BACKENDS", "FrozenActQuant", "FrozenConv2d", "FrozenLinear", "model_preset", "deploy_model",
           "fp32_model", "export_onnx_int8", "export_onnx_fp32", "export_tflite_int8", "export_tflite_fp32",
           "run_onnx_batch", "run_tflite_batch", "relative_error",
           "profile_onnx_blocks", "inspect_deployed", "format_rows"]

DEPLOY_BACKENDS = ("torch", "onnx", "tflite")


def _import_decomposed():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)


# ----------------------------------------------------------------------------- frozen modules
class FrozenActQuant(nn.Module):
    """A quantizer frozen at (scale, zero point): 256 levels, `zero_point` on the 0..255 grid.

    backend ``torch`` / ``onnx``: ``fake_quantize_per_tensor_affine``, u8 (ONNX Q/DQ pair with a uint8 zero
    point), or s8 when `signed` (the symmetric presets' int8 tensors: zero point `zero_point` - 128 = 0);
    ``tflite``: ``quantized_decomposed`` quantize/dequantize on the s8 grid (zero point - 128).
    `enabled` / `preset` let the blocks see an active backend quantizer (`modules.ops.backend_active`)."""

    def __init__(self, scale: float, zero_point: int, backend: str, preset: str, signed: bool = False):
        super().__init__()
        if not (scale > 0 and np.isfinite(scale)) or not 0 <= zero_point <= 255:
            raise ValueError(f"bad activation quantization parameters: scale {scale}, zero point {zero_point}")
        self.scale, self.zero_point, self.backend = float(scale), int(zero_point), backend
        self.signed = bool(signed)
        self.enabled, self.preset = True, preset

    def forward(self, x):
        if self.backend == "tflite":
            qd = torch.ops.quantized_decomposed
            zp = self.zero_point - 128
            q = qd.quantize_per_tensor(x, self.scale, zp, -128, 127, torch.int8)
            return qd.dequantize_per_tensor(q, self.scale, zp, -128, 127, torch.int8)
        if self.signed:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point - 128, -128, 127)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)

    def extra_repr(self):
        return (f"scale={self.scale:.6g}, zero_point={self.zero_point} (u8), signed={self.signed}, "
                f"backend={self.backend}")


def _fq_weight(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, backend: str, qrange=None) -> torch.Tensor:
    """Per-channel weights (axis 0); per-tensor ones when `qrange` (their integer range) is given."""
    if qrange is not None:
        lo, hi = (-128, 127) if qrange[0] < 0 else (0, 255)  # the exporters' int8 / uint8 ranges
        if backend == "tflite":
            qd = torch.ops.quantized_decomposed
            q = qd.quantize_per_tensor(w, float(scale), int(zp), lo, hi, torch.int8)
            return qd.dequantize_per_tensor(q, float(scale), int(zp), lo, hi, torch.int8)
        return torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), lo, hi)
    if backend == "tflite":
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_channel(w, scale, zp, 0, -127, 127, torch.int8)
        return qd.dequantize_per_channel(q, scale, zp, 0, -127, 127, torch.int8)
    # ONNX's exporter accepts only the (-128, 127) / (0, 255) ranges; the integers are in [-127, 127] anyway
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, -128, 127)


class _FrozenWeightOp(nn.Module):
    """`w_scale` / `w_zero_point`: one per output channel, or one (per tensor, `w_range` its integer range)."""

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act_quant: nn.Module,
                 backend: str, w_zero_point: torch.Tensor | None = None, w_range: tuple | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("w_scale", w_scale.detach().float().contiguous())
        zp = torch.zeros(w_scale.numel(), dtype=torch.int64) if w_zero_point is None else w_zero_point
        self.register_buffer("w_zero_point", zp.detach().to(torch.int64).reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.act_quant = act_quant
        self.backend, self.w_range = backend, w_range

    def quantized_weight(self) -> torch.Tensor:
        return _fq_weight(self.weight, self.w_scale, self.w_zero_point, self.backend, self.w_range)


class FrozenConv2d(_FrozenWeightOp):
    """conv2d(act_quant(x), per-channel fake-quant weight) + float bias, weights and scales frozen (BN folded)."""

    def __init__(self, weight, w_scale, bias, act_quant, backend, stride: int, padding: int, groups: int,
                 w_zero_point=None, w_range=None):
        super().__init__(weight, w_scale, bias, act_quant, backend, w_zero_point, w_range)
        self.stride, self.padding, self.groups = int(stride), int(padding), int(groups)

    def forward(self, x, prequantized: bool = False):
        x = x if prequantized else self.act_quant(x)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self):
        o, i, k, _ = self.weight.shape
        return f"{i * self.groups}, {o}, kernel={k}, stride={self.stride}, groups={self.groups}, backend={self.backend}"


class FrozenLinear(_FrozenWeightOp):
    """linear(act_quant(x), per-channel fake-quant weight) + float bias (the logits stay float)."""

    def forward(self, x):
        return F.linear(self.act_quant(x), self.quantized_weight(), self.bias)


# ----------------------------------------------------------------------------- conversion
def model_preset(model: nn.Module) -> str:
    """The LSQ+ preset of `model`; ValueError unless it is an LSQ+ model with a backend preset."""
    if get_quant_mode(model) != "lsq":
        raise ValueError("deployment needs an LSQ+ model (quant_mode lsq); this one is fp32 — train it with "
                         "--quant_mode lsq --quant_preset ort (or tflite)")
    presets = {q.preset for q in quantizers(model) if q.enabled}
    bad = presets - set(BACKEND_PRESETS)
    if bad or len(presets) != 1:
        raise ValueError(f"LSQ+ preset {sorted(presets)}: only {' / '.join(BACKEND_PRESETS)} models are deployable "
                         "with their learned scales (the original preset's continuous offset and per-tensor "
                         "[-128, 127] weights have no int8 kernel); convert it with export_subnet.py --quant_preset "
                         "ort, or fine-tune with --quant_preset ort")
    return presets.pop()


def _resolution(model: nn.Module, resolution) -> int:
    r = resolution or getattr(model, "resolution", None) or getattr(model, "active_resolution", None)
    if r is None:
        raise ValueError("resolution not given and the model has no .resolution / .active_resolution")
    return int(r)


def _frozen_act(q: nn.Module, backend: str, preset: str) -> nn.Module:
    if isinstance(q, OriginalPresetQuantizer) or not backend_active(q):
        return nn.Identity()
    if not bool(q.initialized):
        raise ValueError(f"quantizer {q} has no learned scale yet (run a forward pass / load the LSQ+ checkpoint)")
    scale, zp = q.qparams()
    return FrozenActQuant(scale, zp - q.qmin, backend, preset, signed=q.rules.act_zero_point == "zero" and q.qmin < 0)


def _record_calls(model: nn.Module, resolution: int) -> dict[nn.Module, tuple]:
    """The arguments (x, prequantized, fold_bn) of every DynamicConv2d / DynamicLinear / quantizer call in
    one eval forward pass at `resolution` (the active path; eval mode folds BN in the backend presets).
    A quantizer on the path without a learned scale is an error (it would initialise from this input)."""
    seen: dict[nn.Module, tuple] = {}

    def record(mod, args):
        if isinstance(mod, ActQuantizer) and backend_active(mod) and not bool(mod.initialized):
            raise ValueError(f"quantizer {mod} on the active path has no learned scale (never run in LSQ+ mode): "
                             "load a trained LSQ+ checkpoint or run a forward pass first")
        seen.setdefault(mod, (args[0], args[1] if len(args) > 1 else False, args[2] if len(args) > 2 else None))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, (DynamicConv2d, DynamicLinear, ActQuantizer))]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _check_weights(m: nn.Module) -> None:
    wq: WeightQuantizer = m.weight_quant
    if not (wq.enabled and wq.preset in BACKEND_PRESETS):
        raise ValueError(f"{type(m).__name__}: weights are not LSQ+ with a backend preset (preset {wq.preset})")
    if not bool(wq.initialized):
        raise ValueError(f"{type(m).__name__}: weight scale not learned yet (run a forward pass / load the checkpoint)")


def _frozen_weight_qparams(m: nn.Module, s_w: torch.Tensor, zp: torch.Tensor) -> dict:
    """The frozen op's weight quantization: one scale per channel, or the per-tensor scale and its range."""
    wq = m.weight_quant
    if wq.per_channel:
        return {"w_scale": s_w, "w_zero_point": zp, "w_range": None}
    return {"w_scale": s_w[:1], "w_zero_point": zp[:1], "w_range": (wq.qmin, wq.qmax)}


def _with_qrange(op: nn.Module, m: nn.Module) -> nn.Module:
    op.w_qrange = (m.weight_quant.qmin, m.weight_quant.qmax)  # the integers the weights use (qconfig file)
    return op


@torch.no_grad()
def _frozen_conv(conv: DynamicConv2d, call: tuple, act_quant: nn.Module, backend: str) -> FrozenConv2d:
    """The eval-mode computation of `conv` (`modules.ops.eval_conv_params`: BN folded, int32 bias) frozen."""
    x, prequantized, bn = call[:3]
    _check_weights(conv)
    cin = x.shape[1]
    w, s_w, zp, b = eval_conv_params(conv, cin, prequantized, bn)
    q = _frozen_weight_qparams(conv, s_w, zp)
    return _with_qrange(FrozenConv2d(w, q["w_scale"], b, act_quant, backend, conv.stride,
                                     conv.active_kernel_size // 2, cin if conv.depthwise else 1, q["w_zero_point"],
                                     q["w_range"]), conv)


@torch.no_grad()
def _frozen_linear(lin: DynamicLinear, call: tuple, act_quant: nn.Module, backend: str) -> FrozenLinear:
    _check_weights(lin)
    w = lin.weight_quant(lin.weight[: lin.active_out_features, : call[0].shape[1]].contiguous())
    s_w = weight_scale(lin, w.shape[0])
    b = None if lin.bias is None else int32_bias(lin.bias[: w.shape[0]], lin.act_quant.qparams()[0] * s_w)
    q = _frozen_weight_qparams(lin, s_w, lin.weight_quant.qparams(w.shape[0])[1].expand(w.shape[0]))
    return _with_qrange(FrozenLinear(w, q["w_scale"], b, act_quant, backend, q["w_zero_point"], q["w_range"]), lin)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def deploy_model(model: nn.Module, backend: str = "onnx", resolution: int | None = None,
                 qconfig: dict | None = None) -> nn.Module:
    """A frozen eval-mode copy of an LSQ+ network (preset ort / tflite) for `backend`.

    It computes what the eval-mode fake-quant model computes, frozen: BN folded into the preceding
    convs and biases on the int32 grid (`modules.ops.fold_conv_bn`, `int32_bias`: the same tensors),
    every active quantizer replaced by a `FrozenActQuant` (learned scale, integer zero point), every
    conv / linear by a `FrozenConv2d` / `FrozenLinear` with per-channel fake-quant weights. ``torch`` and
    ``onnx`` use torch's fake-quant ops (u8 grid), ``tflite`` the quantized_decomposed ops (s8 grid).
    The blocks' forward code is unchanged. The active subnet of a supernet works too; `resolution`
    defaults to the model's own."""
    if backend not in DEPLOY_BACKENDS:
        raise ValueError(f"deploy backend {backend!r}; allowed: {', '.join(DEPLOY_BACKENDS)}")
    preset = model_preset(model)
    if backend == "tflite":
        if not RULES[preset].weight_symmetric:
            raise ValueError(f"preset {preset}: asymmetric uint8 weights have no TFLite int8 kernel; export ONNX")
        _import_decomposed()
    res = _resolution(model, resolution)
    model = copy.deepcopy(model).eval()
    calls = _record_calls(model, res)
    # every quantizer on the active path (a conv's input quantizer is on it when the conv is, even if a block
    # quantized that input for it)
    used = [q for q in quantizers(model) if isinstance(q, ActQuantizer) and q in calls]
    used += [m.act_quant for m in calls if isinstance(m, (DynamicConv2d, DynamicLinear)) and m.act_quant not in calls]
    frozen = {id(q): _frozen_act(q, backend, preset) for q in used}
    folded = {id(call[2]) for call in calls.values() if call[2] is not None}
    for name, m in list(model.named_modules()):
        if isinstance(m, DynamicConv2d) and m in calls:
            _set_child(model, name, _frozen_conv(m, calls[m], frozen[id(m.act_quant)], backend))
        elif isinstance(m, DynamicLinear) and m in calls:
            _set_child(model, name, _frozen_linear(m, calls[m], frozen[id(m.act_quant)], backend))
    for name, m in list(model.named_modules()):
        if isinstance(m, ActQuantizer) and id(m) in frozen:
            _set_child(model, name, frozen[id(m)])
        elif isinstance(m, nn.BatchNorm2d) and id(m) in folded:
            _set_child(model, name, nn.Identity())
    model.deploy_backend, model.deploy_preset, model.resolution = backend, preset, res
    if qconfig is not None:
        apply_qconfig(model, qconfig)
    return model.eval()


def fp32_model(model: nn.Module) -> nn.Module:
    """An fp32 eval copy (quantizers off): the network the original exported before re-quantizing it."""
    from modules.lsq import set_quant_mode

    m = copy.deepcopy(model).eval()
    set_quant_mode(m, "fp32")
    return m


# ----------------------------------------------------------------------------- export
def export_onnx_int8(model: nn.Module, path, resolution: int | None = None, opset: int = 17,
                     qconfig: dict | None = None) -> str:
    """Int8 QDQ ONNX of an LSQ+ network with its learned scales (TorchScript exporter, fixed batch 1,
    input ``input`` / output ``output``); ORT fuses it into QLinearConv / QLinearAdd / ... kernels. `qconfig`
    (`modules.qconfig`): scales and zero points that replace the learned ones. The file's quantization config
    is written beside it (``<model>_int8.qconfig.json``)."""
    from modules.export import export_onnx

    import onnx

    dm = deploy_model(model, "onnx", resolution, qconfig)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message=".*fake_quantize.*")
        path = export_onnx(dm, dm.resolution, path, opset=opset)
    proto = onnx.load(path)
    if _quantize_gemm_bias(proto):
        from modules.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, proto.SerializeToString())
    write_qconfig(qconfig_path(path), qconfig_of(dm, {n.name for n in proto.graph.node}))
    return path


def _quantize_gemm_bias(proto) -> int:
    """Give every Gemm whose input and weight are dequantized an int32 bias (scale s_x * s_w, per output
    channel) behind a DequantizeLinear, as ORT's own quantizer writes it: ORT then runs QGemm (int8 with
    float output) for the logits. (ORT quantizes a float bias itself only when a QuantizeLinear follows
    the Gemm; our logits are not quantized.) Returns the number of Gemms changed."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    changed = 0
    for n in g.node:
        if n.op_type != "Gemm" or len(n.input) < 3 or not n.input[2] or n.input[2] not in inits:
            continue
        dq_x, dq_w = producer.get(n.input[0]), producer.get(n.input[1])
        if not dq_x or not dq_w or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        s_x, s_w = value(dq_x.input[1]), value(dq_w.input[1])
        if s_x is None or s_w is None or s_x.size != 1 or (s_w.size > 1 and axis != (0 if trans_b else 1)):
            continue
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        scale = (float(s_x.reshape(-1)[0]) * s_w.astype(np.float64).reshape(-1) * np.ones_like(bias)).astype(np.float32)
        q = np.clip(np.round(bias / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        base = f"{n.name or n.output[0]}.bias"
        g.initializer.extend([numpy_helper.from_array(q, f"{base}_int32"), numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(np.zeros_like(q), f"{base}_zero_point")])
        dq = helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_scale", f"{base}_zero_point"],
                              [f"{base}_dq"], name=f"{base}_DequantizeLinear", axis=0)
        g.node.insert(list(g.node).index(n), dq)
        n.input[2] = f"{base}_dq"
        changed += 1
    return changed


def export_onnx_fp32(model: nn.Module, path, resolution: int | None = None, opset: int = 17) -> str:
    from modules.export import export_onnx

    return export_onnx(fp32_model(model), _resolution(model, resolution), path, opset=opset)


def _litert_convert(module: nn.Module, x: torch.Tensor, path, static_int8: bool) -> str:
    from modules.export import atomic_target, import_litert_torch

    litert_torch = import_litert_torch()
    path, tmp = atomic_target(path, ".tflite")
    try:
        with torch.no_grad():
            if static_int8:
                from litert_torch.quantize import pt2e_quantizer, quant_config

                # the quantizer only switches the converter to static Q/DQ fusion; the graph is already quantized
                qcfg = quant_config.QuantConfig(pt2e_quantizer=pt2e_quantizer.PT2EQuantizer().set_global(
                    pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)))
                gm = torch.export.export(module.eval(), (x,)).module()
                for sub in gm.modules():  # the flag litert-torch checks ("converted in training mode")
                    sub.training = False
                edge = litert_torch.convert(gm, (x,), quant_config=qcfg)
            else:
                edge = litert_torch.convert(module, (x,))
        edge.export(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def export_tflite_int8(model: nn.Module, path, resolution: int | None = None, qconfig: dict | None = None) -> str:
    """A real int8 ``.tflite`` of an LSQ+ network with its learned scales (litert-torch, static Q/DQ
    fusion). Input: float32 NCHW ``[1, 3, r, r]``; output: float32 logits. `qconfig` and the config file
    written beside it: as `export_onnx_int8`."""
    dm = deploy_model(model, "tflite", resolution, qconfig)
    x = torch.randn(1, 3, dm.resolution, dm.resolution, generator=torch.Generator().manual_seed(0))
    path = _litert_convert(dm, x, path, static_int8=True)
    write_qconfig(qconfig_path(path), qconfig_of(dm))
    return path


def export_tflite_fp32(model: nn.Module, path, resolution: int | None = None) -> str:
    r = _resolution(model, resolution)
    x = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(0))
    return _litert_convert(fp32_model(model), x, path, static_int8=False)


# ----------------------------------------------------------------------------- running
def run_onnx_batch(path_or_session, x, threads: int = 1, precise: bool | None = None) -> np.ndarray:
    """Outputs of a fixed-batch-1 ONNX model for every sample of `x` ([N, C, H, W])."""
    sess = path_or_session if hasattr(path_or_session, "run") else ort_session(path_or_session, threads, precise)
    name = sess.get_inputs()[0].name
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def run_tflite_batch(path, x, threads: int = 1) -> np.ndarray:
    from modules.benchmark import run_tflite

    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    return run_tflite(path, x, threads=threads)


def relative_error(y, ref) -> float:
    """||y - ref|| / ||ref|| over all elements."""
    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


# ----------------------------------------------------------------------------- inspection
def profile_onnx_blocks(path, runs: int = 50, warmup: int = 10, threads: int = 1, precise: bool | None = None,
                        group_depth: int | None = None) -> dict[str, float]:
    """Per-block mean kernel time (ms per inference) of an ONNX model from ORT's profiler; blocks
    grouped from node names as `onnx_tools.inspect_int8` does."""
    from modules.inspect import node_groups, optimized_graph, path_group

    graph = optimized_graph(path)
    group_of = dict(zip([n.name for n in graph.node], node_groups(graph, group_depth)))
    sess = ort_session(path, threads, precise, profile=True)
    i = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
    for _ in range(warmup + runs):
        sess.run(None, {i.name: x})
    prof = sess.end_profiling()
    try:
        events = json.loads(Path(prof).read_text())
    finally:
        os.unlink(prof)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup:]
    per_run: list[dict[str, float]] = [{} for _ in starts]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not starts:
            continue
        k = int(np.searchsorted(starts, e.get("ts", 0), side="right")) - 1
        if k < 0:
            continue  # a warm-up run
        node = e["name"][: -len("_kernel_time")]
        g = group_of.get(node) or path_group(node, group_depth) or "(io)"
        per_run[k][g] = per_run[k].get(g, 0.0) + e.get("dur", 0) / 1e3
    groups = {g for r in per_run for g in r}
    # median over runs: robust to the other processes of a shared machine
    return {g: float(np.median([r.get(g, 0.0) for r in per_run])) for g in groups}


def inspect_deployed(int8_path, fp32_path=None, runs: int = 50, threads: int = 1, precise: bool | None = None,
                     verbose: bool = True) -> list[dict]:
    """Per-block report of an exported int8 ONNX model: the `onnx_tools.inspect_int8` rows (int8 kernels,
    float ops left between DQ/Q after ORT's optimisation, status) plus, with the fp32 export of the same
    network, each block's profiled kernel time in int8 and fp32 and a warning for blocks slower in int8."""
    from modules.inspect import inspect_onnx_int8

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = inspect_onnx_int8(int8_path, verbose=False)
    if fp32_path is not None:
        t8 = profile_onnx_blocks(int8_path, runs, threads=threads, precise=precise)
        t32 = profile_onnx_blocks(fp32_path, runs, threads=threads, precise=precise)
        for r in rows:
            g = r["group"]
            a = sum(t8.values()) if g == "TOTAL" else t8.get(g)
            b = sum(t32.values()) if g == "TOTAL" else t32.get(g)
            r["int8_ms"] = "" if a is None else f"{a:.4f}"
            r["fp32_ms"] = "" if b is None else f"{b:.4f}"
            r["speedup"] = f"{b / a:.2f}" if a and b else ""
            slower = bool(a and b and a > b)
            r["warning"] = "SLOWER IN INT8" if slower else ("float fallback" if r["status"] == "FLOAT FALLBACK" else "")
    else:
        for r in rows:
            r["warning"] = "float fallback: may be slower in int8" if r["status"] == "FLOAT FALLBACK" else ""
    if verbose:
        cols = ["group", "int8_kernels", "float_ops", "qdq_nodes", "status"]
        cols += ["int8_ms", "fp32_ms", "speedup"] if fp32_path is not None else []
        cols += ["warning", "float_op_types"]
        print(f"{int8_path}: ORT-optimised graph, per block")
        print(format_rows(rows, cols))
        bad = [r["group"] for r in rows[:-1] if r["warning"]]
        if bad:
            warnings.warn(f"{Path(int8_path).name}: block(s) {', '.join(bad)} keep float compute or run slower in "
                          "INT8 than in FP32", stacklevel=2)
    return rows


def format_rows(rows: list[dict], cols: list[str], markdown: bool = False) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        return "\n".join(lines + ["| " + " | ".join(x) + " |" for x in cells])
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
