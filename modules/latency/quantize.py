"""INT8 graph surgery on ONNX models: ONNX Runtime's static quantization with a fixed calibration cache,
the per-channel widening of its per-tensor output, cutting a block's boundary Q/DQ and making its I/O NHWC
(as between two blocks inside a quantized network), and chaining quantized blocks into a whole network.
"""
from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


def _fake_calibration_cache(model, path: str) -> None:
    """A MinMax calibration cache giving every float tensor the range [-1, 1] (ranges change scales,
    not which kernels run)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    names = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    lo, hi = np.array(-1.0, dtype=np.float32), np.array(1.0, dtype=np.float32)
    data = {n: TensorData(lowest=lo, highest=hi) for n in names}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def quantize_block_onnx(model, fmt: str = "qdq", reduce_range: bool | None = None, workdir: str | None = None,
                        per_channel: str = "expand"):
    """INT8 ModelProto of an FP32 block ModelProto: ONNX Runtime ``quantize_static`` with the settings of
    :func:`modules.export.quantize_onnx_int8` (uint8 activations, int8 symmetric per-channel weights),
    ranges from a fixed calibration cache instead of a calibration run.

    ``per_channel="expand"`` (default) quantizes per tensor, then turns every weight / bias
    DequantizeLinear into its per-channel form (a scale and zero point per output channel, ``axis=0``):
    the graph ORT's per-channel quantizer writes, without its per-channel Python loop (the test suite
    compares the two). ``"ort"``: ORT's own per-channel quantization (slower)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from modules.export import auto_reduce_range
    from modules.onnx_int8 import fold_scale_muls, int8_friendly_activations

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if fmt not in formats:
        raise ValueError(f"quantization format {fmt!r}: use one of {sorted(formats)}")
    if per_channel not in ("expand", "ort"):
        raise ValueError(f"per_channel {per_channel!r}: use 'expand' or 'ort'")
    root = logging.getLogger()
    old = root.level
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst, cache = (os.path.join(tmp, n) for n in ("b.onnx", "b_int8.onnx", "calib.json"))
        onnx.save(int8_friendly_activations(onnx.load_from_string(model.SerializeToString())), src)
        _fake_calibration_cache(onnx.load(src), cache)
        root.setLevel(logging.ERROR)  # "please pre-process" nag
        try:
            quantize_static(src, dst, None, quant_format=formats[fmt], per_channel=per_channel == "ort",
                            reduce_range=auto_reduce_range(reduce_range), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibration_cache_path=cache,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        finally:
            root.setLevel(old)
        q = onnx.load(dst)
    fold_scale_muls(q)
    if per_channel == "expand":
        _expand_per_channel(q)
    return q


def _expand_per_channel(model) -> None:
    """Per-tensor weight/bias quantization -> per-channel form, in place: each DequantizeLinear (or, in
    QOperator models, QLinearConv / QGemm weight scale) of an int8 weight or int32 bias initializer gets
    a [C] scale and zero point (and ``axis=0`` on DequantizeLinear)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def widen(name: str, c: int) -> None:
        t = inits[name]
        a = numpy_helper.to_array(t)
        if a.ndim == 0 or a.size == 1:
            t.CopyFrom(numpy_helper.from_array(np.full(c, a.reshape(-1)[0], dtype=a.dtype), name))

    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w = inits[n.input[0]]
            if w.data_type not in (3, 6) or len(w.dims) < 1:  # int8 weights, int32 biases
                continue
            c = int(w.dims[0])
            for x in n.input[1:3]:
                if x:
                    widen(x, c)
            if not any(a.name == "axis" for a in n.attribute):
                n.attribute.append(helper.make_attribute("axis", 0))
        elif n.op_type in ("QLinearConv", "QGemm") and len(n.input) > 5 and n.input[3] in inits:
            c = int(inits[n.input[3]].dims[0])
            widen(n.input[4], c)
            widen(n.input[5], c)


def strip_boundary_qdq(model, keep_input: bool = False, keep_output: bool = False):
    """Cut the QuantizeLinear of the graph input and the DequantizeLinear of the graph output of a QDQ
    model (in place): the block then takes and returns uint8 tensors, as inside a quantized network
    where ``QLinearAdd`` of one block feeds ``QLinearConv`` of the next. No-op where the pattern is absent
    (e.g. QOperator models, whose QuantizeLinear / DequantizeLinear are cut the same way)."""
    from onnx import TensorProto

    g = model.graph
    inp, out = g.input[0], g.output[0]
    if not keep_input:
        q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == inp.name]
        if len(q) == 1 and sum(inp.name in n.input for n in g.node) == 1:
            qout = q[0].output[0]
            for n in g.node:
                for i, x in enumerate(n.input):
                    if x == qout:
                        n.input[i] = inp.name
            g.node.remove(q[0])
            inp.type.tensor_type.elem_type = TensorProto.UINT8
    if not keep_output:
        dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == out.name]
        if len(dq) == 1:
            src = dq[0].input[0]
            if sum(src in n.input for n in g.node) == 1:
                g.node.remove(dq[0])
                for n in g.node:
                    for i, x in enumerate(n.output):
                        if x == src:
                            n.output[i] = out.name
                    for i, x in enumerate(n.input):
                        if x == src:
                            n.input[i] = out.name
                out.type.tensor_type.elem_type = TensorProto.UINT8
    return model


def nhwc_boundaries(model) -> None:
    """Give a quantized block uint8 NHWC input / output (in place): a Transpose to NCHW after a 4-D uint8
    graph input and a Transpose to NHWC before a 4-D uint8 graph output. ONNX Runtime runs int8 convs in
    NHWC and, inside a network, keeps tensors NHWC from one block to the next; here its layout pass
    cancels these transposes against its own, so the standalone block runs without layout changes at
    its ends, as it does inside the network."""
    from onnx import TensorProto, helper

    g = model.graph
    inp, out = g.input[0], g.output[0]

    def dims(v):
        return [d.dim_value for d in v.type.tensor_type.shape.dim]

    if inp.type.tensor_type.elem_type == TensorProto.UINT8 and len(dims(inp)) == 4:
        n_, c, h, w = dims(inp)
        _rename(g, inp.name, "input_nchw")
        g.node.insert(0, helper.make_node("Transpose", [inp.name], ["input_nchw"], perm=[0, 3, 1, 2], name="input_T"))
        inp.CopyFrom(helper.make_tensor_value_info(inp.name, TensorProto.UINT8, [n_, h, w, c]))
    if out.type.tensor_type.elem_type == TensorProto.UINT8 and len(dims(out)) == 4:
        n_, c, h, w = dims(out)
        _rename(g, out.name, "output_nchw")
        g.node.append(helper.make_node("Transpose", ["output_nchw"], [out.name], perm=[0, 2, 3, 1], name="output_T"))
        out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.UINT8, [n_, h, w, c]))


def _rename(graph, old: str, new: str) -> None:
    """Every node input and output named `old` is named `new` (the graph's own inputs/outputs are untouched)."""
    for n in graph.node:
        for names in (n.input, n.output):
            for i, x in enumerate(names):
                if x == old:
                    names[i] = new


def _first_qparams(graph) -> tuple[float, int]:
    """(scale, zero point) of a graph's first QuantizeLinear: a float-input block (Logits: Flatten first)
    dequantized with them runs its layout op on uint8, as inside the quantized network (DQ and Q alike)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    q = next((n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits
              and len(n.input) > 2 and n.input[2] in inits), None)
    if q is None:
        return 1 / 32, 128
    return (float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0]),
            int(numpy_helper.to_array(inits[q.input[2]]).reshape(-1)[0]))


def stitch_blocks(models: list) -> "onnx.ModelProto":
    """Chain block models into one network (names prefixed per block). Where one block's output type differs
    from the next block's input type, a QuantizeLinear (float -> uint8) or DequantizeLinear is inserted.
    Quantized network-form blocks (:func:`block_model_bytes` without the NHWC transposes) chained this way
    give the graph ORT's quantizer writes for the whole network: between two blocks one uint8 tensor (the
    last Q of one block, the first DQ of the next)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, opsets = [], [], {}
    prev, prev_type, inp, out_vi = None, None, None, None
    for i, m in enumerate(models):
        g = m.graph
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        pre = f"b{i}/"
        gin, gout = g.input[0], g.output[0]
        in_type = gin.type.tensor_type.elem_type
        if i == 0:
            src = "input"
            inp = helper.make_tensor_value_info("input", in_type, [d.dim_value for d in gin.type.tensor_type.shape.dim])
        else:
            src = prev
            if prev_type != in_type:
                op = "QuantizeLinear" if in_type == TensorProto.UINT8 else "DequantizeLinear"
                sc, zp = f"{pre}boundary_scale", f"{pre}boundary_zp"
                scale, zero = _first_qparams(g) if op == "DequantizeLinear" else (1 / 32, 128)
                inits += [numpy_helper.from_array(np.array(scale, np.float32), sc),
                          numpy_helper.from_array(np.array(zero, np.uint8), zp)]
                nodes.append(helper.make_node(op, [prev, sc, zp], [f"{pre}boundary"], name=f"{pre}boundary"))
                src = f"{pre}boundary"

        def rn(x, _pre=pre, _src=src, _in=gin.name):
            return x if not x else (_src if x == _in else _pre + x)

        for n in g.node:
            n2 = helper.make_node(n.op_type, [rn(x) for x in n.input], [rn(x) for x in n.output],
                                  name=pre + (n.name or n.op_type), domain=n.domain)
            n2.attribute.extend(n.attribute)
            nodes.append(n2)
        for t in g.initializer:
            t2 = type(t)()
            t2.CopyFrom(t)
            t2.name = pre + t.name
            inits.append(t2)
        prev, prev_type = pre + gout.name, gout.type.tensor_type.elem_type
        out_vi = gout
    for n in nodes:  # the last block writes "output"
        for j, x in enumerate(n.output):
            if x == prev:
                n.output[j] = "output"
    out = helper.make_tensor_value_info("output", prev_type, [d.dim_value for d in out_vi.type.tensor_type.shape.dim])
    model = helper.make_model(helper.make_graph(nodes, "model", [inp], [out], inits),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = models[0].ir_version
    return model
