"""Which ops of a quantized ONNX model really run in int8 after ONNX Runtime's graph optimisation.

ONNX Runtime fuses ``DequantizeLinear → op → QuantizeLinear`` into an int8 kernel (QLinearConv,
QLinearAdd, QGemm, ...) only for the ops it has kernels for; any other op (HardSigmoid, HardSwish,
Mul of an SE gate, Sigmoid, ...) keeps its DQ/Q pair and runs in float, which can make the INT8
model slower than FP32. `inspect_onnx_int8` loads the model at ORT_ENABLE_ALL, saves the optimised graph
(``optimized_model_filepath``), follows tensor types through it (float / quantized) and counts, per
block (node-name prefix), int8 kernels, float compute ops and Q/DQ nodes. The command-line tool is
``onnx_tools/inspect_int8.py``.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

# int8/uint8 kernels of ORT's CPU provider (com.microsoft and ai.onnx domains)
INT8_KERNELS = {
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QEmbedLayerNormalization",
    "NhwcQLinearConv", "QLinearConvTranspose",
}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# ops that do arithmetic (as opposed to layout/shape ops); in the float region they are float compute
FLOAT_COMPUTE_OPS = {
    "Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
    "Add", "Sub", "Mul", "Div", "Sum", "BiasAdd", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Relu",
    "LeakyRelu", "Clip", "Elu", "Selu", "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Erf", "Softmax",
    "GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "Pow", "Sqrt", "Exp", "Mish",
    "Swish", "Max", "Min",
}
_QUANT_OUT_KERNELS = INT8_KERNELS - {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                                      "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention",
                                      "QEmbedLayerNormalization"}
IO_GROUP = "(io)"


def optimized_graph(path):
    """The ONNX GraphProto ORT actually runs (ORT_ENABLE_ALL, CPU provider), read back from
    ``optimized_model_filepath`` in a temp dir."""
    import onnx

    from modules.latency.sessions import ort_session

    with tempfile.TemporaryDirectory() as d:
        opt = os.path.join(d, "optimized.onnx")
        ort_session(path, threads=1, optimized_model_filepath=opt)
        return onnx.load(opt).graph


_INDEXED = re.compile(r"(^|\.)\d+$")  # "features.3", "3": an element of a Sequential/ModuleList
_BLOCK = re.compile(r"(^|\.)(blocks?|layers?)\.\d+$")  # "blocks.0", "stages.1.blocks.0"


def path_group(name: str, depth: int | None) -> str | None:
    """Block of a torch-exported node name ``/features/features.3/conv/Conv``: the first `depth` module
    components, or (depth None) everything up to the first ``blocks.N`` / ``layers.N`` component
    (``stages.6/blocks.0``), else up to the first indexed one (``features/features.3``), else the first
    component (``final_expand``)."""
    parts = [p for p in name.split("/") if p][:-1]  # drop the op name
    if not parts:
        return None
    if depth is not None:
        return "/".join(parts[:depth])
    for pattern in (_BLOCK, _INDEXED):
        for i, p in enumerate(parts):
            if pattern.search(p):
                return "/".join(parts[:i + 1])
    return parts[0]


def node_groups(graph, depth: int | None) -> list[str]:
    """Group of each node; nodes ORT created without a path name (``Transpose``, the two halves of a
    decomposed HardSwish, graph-input Q / graph-output DQ) join the group of the node producing their
    first input, or ``(io)`` when they touch a graph input/output."""
    graph_io = {i.name for i in graph.input} | {o.name for o in graph.output}
    producer_group: dict[str, str] = {}
    groups = []
    for n in graph.node:
        g = path_group(n.name, depth)
        if g is None:
            if any(x in graph_io for x in list(n.input) + list(n.output)):
                g = IO_GROUP
            else:
                g = next((producer_group[x] for x in n.input if x in producer_group), IO_GROUP)
        for o in n.output:
            producer_group[o] = g
        groups.append(g)
    return groups


def _tensor_kinds(graph) -> tuple[dict[str, str], dict[int, str]]:
    """Propagate 'float' / 'quant' through the graph (topologically sorted by ORT): graph inputs and
    DequantizeLinear outputs are float, QuantizeLinear / int8-kernel outputs are quantized, other ops
    inherit the kind of their first non-constant input. Returns (tensor kinds, node input kinds)."""
    import onnx

    kinds: dict[str, str] = {}
    for i in graph.input:
        et = i.type.tensor_type.elem_type
        kinds[i.name] = "float" if et in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, 0) else "quant"
    consts = {t.name for t in graph.initializer}
    node_kind: dict[int, str] = {}
    for idx, n in enumerate(graph.node):
        ins = [kinds[x] for x in n.input if x and x not in consts and x in kinds]
        in_kind = ins[0] if ins else "const"
        node_kind[idx] = in_kind
        if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            out = "quant"
        elif n.op_type == "DequantizeLinear":
            out = "float"
        elif n.op_type in _QUANT_OUT_KERNELS:
            out = "quant"
        elif n.op_type in INT8_KERNELS:  # integer kernels with float or int32 results
            out = "float"
        else:
            out = in_kind
        for o in n.output:
            kinds[o] = out
    return kinds, node_kind


def inspect_onnx_int8(path, group_depth: int | None = None, verbose: bool = True) -> list[dict]:
    """Per-block rows ``{model, group, int8_kernels, float_ops, qdq_nodes, int8_op_types,
    float_op_types, status}`` of the ORT-optimised graph of `path`, plus a final ``TOTAL`` row.

    Blocks come from node names (torch export names nodes ``/features/features.3/conv/Conv``):
    `group_depth` None = up to the first ``blocks.N``/``layers.N`` component (``stages.6/blocks.0``),
    else the first indexed one (``features/features.3``); an int = that many leading module
    components. ``status`` is
    ``int8`` (no float compute), ``FLOAT FALLBACK`` (float compute ops in a quantized model) or
    ``fp32`` (a model without any int8 kernel). Prints a table and warns about fallback blocks
    when `verbose`.
    """
    graph = optimized_graph(path)
    _, node_kind = _tensor_kinds(graph)
    groups: dict[str, dict[str, Counter]] = {}
    order: list[str] = []
    for idx, (n, g) in enumerate(zip(graph.node, node_groups(graph, group_depth))):
        if g not in groups:
            groups[g] = {"int8": Counter(), "float": Counter(), "qdq": Counter()}
            order.append(g)
        if n.op_type in INT8_KERNELS:
            groups[g]["int8"][n.op_type] += 1
        elif n.op_type in QDQ_OPS:
            groups[g]["qdq"][n.op_type] += 1
        elif n.op_type in FLOAT_COMPUTE_OPS and node_kind[idx] == "float":
            groups[g]["float"][n.op_type] += 1
    quantized = any(v["int8"] or v["qdq"] for v in groups.values())

    def row(group, c):
        n_int8, n_float = sum(c["int8"].values()), sum(c["float"].values())
        status = ("FLOAT FALLBACK" if n_float else "int8") if quantized else "fp32"
        if not n_int8 and not n_float:
            status = "-"
        fmt = lambda cnt: " ".join(f"{k}x{v}" for k, v in sorted(cnt.items()))  # noqa: E731
        return {"model": str(path), "group": group, "int8_kernels": n_int8, "float_ops": n_float,
                "qdq_nodes": sum(c["qdq"].values()), "int8_op_types": fmt(c["int8"]),
                "float_op_types": fmt(c["float"]), "status": status}

    rows = [row(g, groups[g]) for g in order]
    total = {"int8": Counter(), "float": Counter(), "qdq": Counter()}
    for c in groups.values():
        for k in total:
            total[k].update(c[k])
    rows.append(row("TOTAL", total))
    if verbose:
        print(f"{path}: ORT-optimised graph, {len(graph.node)} nodes")
        print(format_table(rows))
        bad = [r["group"] for r in rows[:-1] if r["status"] == "FLOAT FALLBACK"]
        if bad:
            warnings.warn(f"{Path(path).name}: {len(bad)} block(s) keep float compute between DQ/Q pairs and may be "
                          f"slower in INT8 than in FP32: {', '.join(bad)}", stacklevel=2)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["group", "int8_kernels", "float_ops", "qdq_nodes", "status", "float_op_types", "int8_op_types"]
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
