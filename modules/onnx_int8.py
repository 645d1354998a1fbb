"""No float islands: ONNX graph rewrites that let ONNX Runtime's static quantization keep hardswish and
squeeze-excite gates in int8.

ONNX Runtime has no quantized HardSwish or HardSigmoid kernel: quantized as they are, each runs in float
between a DequantizeLinear and a QuantizeLinear over the whole feature map, and the SE multiply after a
float gate stays float too. Rewritten into ops that do have int8 kernels, before quantization
(:func:`int8_friendly_activations`, exact in float):

* ``HardSwish(x) = Mul(x, Clip(Add(x, 3), 0, 6)) * 1/6``: QLinearAdd (the Clip fuses into its output
  range), QLinearMul; the final ``* 1/6`` is folded into the QLinearMul's output scale after quantization
  (:func:`fold_scale_muls`), so no op is left for it;
* ``HardSigmoid(Conv(x))`` (the SE gate) ``= Clip(Conv'(x), 0, 1)`` with the conv's weights and bias
  scaled by alpha and beta added to its bias: the gate is a QLinearConv output, and the SE multiply
  reads two int8 tensors and runs as QLinearMul. A HardSigmoid not fed by its own conv becomes
  ``Clip(Add(Mul(x, alpha), beta), 0, 1)``.
"""
from __future__ import annotations

import numpy as np

_SCALE_MUL = "int8_scale/"  # name prefix of the * 1/6 Muls that fold_scale_muls removes after quantization


def _const(graph, name: str, value: float) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
    return name


def _consumers(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def _fold_into_conv(graph, conv, alpha: float, beta: float) -> bool:
    """Scale `conv`'s weight and bias by alpha and add beta to the bias (in place); False when they are not
    initializers of their own."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    names = list(conv.input[1:3])
    if not names or any(n not in inits for n in names) or any(len(_consumers(graph, n)) != 1 for n in names):
        return False
    w = numpy_helper.to_array(inits[names[0]]).astype(np.float32)
    b = (numpy_helper.to_array(inits[names[1]]).astype(np.float32) if len(names) > 1
         else np.zeros(w.shape[0], np.float32))
    inits[names[0]].CopyFrom(numpy_helper.from_array(w * np.float32(alpha), names[0]))
    if len(names) > 1:
        inits[names[1]].CopyFrom(numpy_helper.from_array(b * np.float32(alpha) + np.float32(beta), names[1]))
    else:
        conv.input.append(_const(graph, f"{conv.name or conv.output[0]}/bias", 0.0))
        inits = {t.name: t for t in graph.initializer}
        inits[conv.input[2]].CopyFrom(numpy_helper.from_array(np.full(w.shape[0], beta, np.float32), conv.input[2]))
    return True


def _hardswish_nodes(graph, n, i: int) -> list:
    from onnx import helper

    x, y, p = n.input[0], n.output[0], f"int8_hswish{i}/"
    c3, c0, c6 = (_const(graph, p + k, v) for k, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0)))
    sixth = _const(graph, p + "sixth", 1.0 / 6.0)
    return [helper.make_node("Add", [x, c3], [p + "x3"], name=p + "add"),
            helper.make_node("Clip", [p + "x3", c0, c6], [p + "relu6"], name=p + "clip"),
            helper.make_node("Mul", [x, p + "relu6"], [p + "x_relu6"], name=p + "mul"),
            helper.make_node("Mul", [p + "x_relu6", sixth], [y], name=_SCALE_MUL + p + "sixth")]


def _hardsigmoid_nodes(graph, n, i: int, producers: dict) -> list:
    from onnx import helper

    alpha = next((a.f for a in n.attribute if a.name == "alpha"), 0.2)
    beta = next((a.f for a in n.attribute if a.name == "beta"), 0.5)
    x, y, p = n.input[0], n.output[0], f"int8_hsigmoid{i}/"
    c0, c1 = _const(graph, p + "zero", 0.0), _const(graph, p + "one", 1.0)
    conv = producers.get(x)
    if conv is not None and conv.op_type == "Conv" and len(_consumers(graph, x)) == 1 and \
            _fold_into_conv(graph, conv, alpha, beta):
        return [helper.make_node("Clip", [x, c0, c1], [y], name=p + "clip")]
    a, b = _const(graph, p + "alpha", alpha), _const(graph, p + "beta", beta)
    return [helper.make_node("Mul", [x, a], [p + "ax"], name=p + "mul"),
            helper.make_node("Add", [p + "ax", b], [p + "axb"], name=p + "add"),
            helper.make_node("Clip", [p + "axb", c0, c1], [y], name=p + "clip")]


def int8_friendly_activations(model):
    """Rewrite every HardSwish and HardSigmoid of a float ONNX model (in place, see the module docstring);
    returns the model. Opset >= 11 (Clip with min / max inputs)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    out, i = [], 0
    for n in list(graph.node):
        if n.op_type == "HardSwish" and n.domain in ("", "ai.onnx"):
            out += _hardswish_nodes(graph, n, i)
        elif n.op_type == "HardSigmoid" and n.domain in ("", "ai.onnx"):
            out += _hardsigmoid_nodes(graph, n, i, producers)
        else:
            out.append(n)
            continue
        i += 1
    del graph.node[:]
    graph.node.extend(out)
    return model


def fold_scale_muls(model) -> int:
    """After QDQ quantization: remove each ``Q(s1) -> DQ(s1) -> Mul(k) -> Q(s2)`` of
    :func:`int8_friendly_activations`: the first QuantizeLinear writes the Mul's output directly, with scale
    ``s2 / k`` and the second one's zero point (the same uint8 values as ``Q(s2)`` of the product, one
    requantization less); readers keep their ``DQ(s2)``, so bias scales stay consistent. In place; returns
    the number removed (0 for QOperator graphs)."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    removed = 0
    for mul in [n for n in g.node if n.op_type == "Mul" and n.name.startswith(_SCALE_MUL)]:
        dq_x = producers.get(mul.input[0])
        q_x = producers.get(dq_x.input[0]) if dq_x is not None and dq_x.op_type == "DequantizeLinear" else None
        k = _scalar(mul.input[1], inits, producers)
        qs = _consumers(g, mul.output[0])
        if q_x is None or q_x.op_type != "QuantizeLinear" or not k or len(qs) != 1 or \
                qs[0].op_type != "QuantizeLinear" or len(_consumers(g, q_x.output[0])) != 1:
            continue
        s2 = float(numpy_helper.to_array(inits[qs[0].input[1]]).reshape(-1)[0])
        q_x.input[1] = _const(g, mul.name + "/scale", s2 / k)
        if len(qs[0].input) > 2:
            q_x.input[2] = qs[0].input[2]
        for dq in _consumers(g, qs[0].output[0]):  # the readers of the product now read the first Q
            dq.input[0] = q_x.output[0]
        for n in (mul, qs[0], dq_x):
            g.node.remove(n)
        removed += 1
    outputs = {o.name for o in g.output}
    for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in outputs
              and not _consumers(g, n.output[0])]:
        g.node.remove(n)  # the Muls' constants
    return removed


def _scalar(name: str, inits: dict, producers: dict) -> float | None:
    """The value of a scalar constant input, also when the quantizer wrapped it in a DequantizeLinear."""
    from onnx import numpy_helper

    if name in inits:
        return float(numpy_helper.to_array(inits[name]).reshape(-1)[0])
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64).reshape(-1)[0]
    s = float(numpy_helper.to_array(inits[dq.input[1]]).reshape(-1)[0])
    z = float(numpy_helper.to_array(inits[dq.input[2]]).reshape(-1)[0]) if len(dq.input) > 2 and dq.input[2] else 0.0
    return (q - z) * s
