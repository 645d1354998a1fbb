"""ONNX graphs of blocks and whole subnets written directly from block configurations, and the analytic
block features (MACs per conv kind, tensor sizes) the regression uses.

:func:`block_onnx` writes, with ``onnx.helper``, the graph ``torch.onnx.export`` writes for the torch block
after BN folding (the test suite checks it node for node), in milliseconds instead of seconds.
"""
from __future__ import annotations

import math

import numpy as np

from modules.latency.keys import ACTS, block_key
from modules.superspace import make_divisible


def build_block_module(cfg: dict):
    """A static, eval-mode torch module of one block configuration (random weights: latency only)."""
    from modules.blocks import build_block
    from modules.superspace import BlockSpec

    spec = BlockSpec(cfg["name"], (cfg["kernel"],), (cfg["expand"],), cfg["act"], bool(cfg["se"]))
    block = build_block(spec, (cfg["cin"],), (cfg["cout"],), cfg["stride"])
    return block.eval()


def block_input_shape(cfg: dict) -> tuple[int, int, int, int]:
    """NCHW input shape of a block's standalone model (Logits: the pooled [1, cin, 1, 1])."""
    hw = 1 if cfg["name"] == "Logits" else cfg["hw"]
    return (1, cfg["cin"], hw, hw)


class _Graph:
    """Records the ops of one block (shapes, MACs) and, with `materialize`, the ONNX nodes and weights.

    The op sequence mirrors `modules.blocks` forward passes as ``torch.onnx.export`` writes them after
    BN folding (conv+BN -> Conv with bias; ReLU6 -> Clip; SiLU -> Sigmoid*x; Hardsigmoid ->
    HardSigmoid(1/6, 0.5); adaptive_avg_pool2d(x, 1) -> GlobalAveragePool; Linear -> Flatten + Gemm).
    """

    def __init__(self, cin: int, hw: int, materialize: bool = False, seed: int = 0):
        self.shapes = {"input": (cin, hw, hw)}
        self.materialize = materialize
        self.nodes, self.inits = [], []
        self.rng = np.random.default_rng(seed)
        self.f = dict.fromkeys(FEATURES, 0.0)
        self.f["one"] = 1.0
        self.f["elem_in"] = float(cin * hw * hw)
        self._n = 0

    def _name(self, op: str) -> str:
        self._n += 1
        return f"{op}_{self._n}"

    def _node(self, op_type, inputs, shape, **attrs) -> str:
        name = self._name(op_type)
        out = f"{name}_out"
        self.shapes[out] = shape
        if op_type != "Constant":
            self.f["n_ops"] += 1
        if self.materialize:
            from onnx import helper

            self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def _init(self, name: str, shape, scale: float = 1.0) -> str:
        if self.materialize:
            from onnx import numpy_helper

            n = int(np.prod(shape))
            start = int(self.rng.integers(_POOL.size))
            a = np.resize(_POOL, start + n)[start:].reshape(shape) * np.float32(scale)  # weights: speed only
            self.inits.append(numpy_helper.from_array(a, name))
        return name

    def conv(self, x: str, cout: int, k: int, stride: int, depthwise: bool = False, bias: bool = True) -> str:
        c, h, w = self.shapes[x]
        ho, wo = math.ceil(h / stride), math.ceil(w / stride)
        cout = c if depthwise else cout
        cin_g = 1 if depthwise else c
        name = self._name("conv")
        ins = [x, self._init(f"{name}.weight", (cout, cin_g, k, k), math.sqrt(2.0 / (cin_g * k * k)))]
        if bias:
            ins.append(self._init(f"{name}.bias", (cout,), 0.1))
        macs = float(cout * ho * wo * cin_g * k * k)
        if depthwise:
            self.f["mac_dw"] += macs
        elif k == 1 and h * w == 1:
            self.f["mac_vec"] += macs  # 1x1 conv on a pooled vector (SE, FeatureMix)
        elif k == 1:
            self.f["mac_pw"] += macs
        else:
            self.f["mac_kxk"] += macs
        self.f["elem_conv_out"] += float(cout * ho * wo)
        p = k // 2
        return self._node("Conv", ins, (cout, ho, wo), dilations=[1, 1], group=c if depthwise else 1,
                          kernel_shape=[k, k], pads=[p, p, p, p], strides=[stride, stride])

    def act(self, x: str, kind: str) -> str:
        shape = self.shapes[x]
        n = float(np.prod(shape))
        if kind == "none":
            return x
        if kind == "relu":
            return self._node("Relu", [x], shape)
        if kind == "relu6":
            if self.materialize:
                from onnx import helper, numpy_helper

                lo, hi = self._name("Constant"), self._name("Constant")
                self.nodes.append(helper.make_node("Constant", [], [lo], name=lo,
                                                   value=numpy_helper.from_array(np.array(0.0, np.float32))))
                self.nodes.append(helper.make_node("Constant", [], [hi], name=hi,
                                                   value=numpy_helper.from_array(np.array(6.0, np.float32))))
            else:
                lo = hi = ""
            return self._node("Clip", [x, lo, hi], shape)
        self.f["elem_float"] += n  # no int8 kernel: DQ -> float op -> Q around it
        if kind == "hswish":
            return self._node("HardSwish", [x], shape)
        if kind == "swish":
            s = self._node("Sigmoid", [x], shape)
            return self._node("Mul", [x, s], shape)
        if kind == "hsigmoid":
            return self._node("HardSigmoid", [x], shape, alpha=1.0 / 6.0)  # beta: the default 0.5
        raise ValueError(f"unknown activation {kind!r}; allowed: {', '.join(ACTS)}")

    def conv_act(self, x, cout, k, stride, act, depthwise=False, bias=True):
        return self.act(self.conv(x, cout, k, stride, depthwise, bias), act)

    def add(self, a: str, b: str) -> str:
        self.f["elem_add"] += float(np.prod(self.shapes[a]))
        return self._node("Add", [a, b], self.shapes[a])

    def mean(self, x: str) -> str:
        c, h, w = self.shapes[x]
        self.f["elem_pool"] += float(c * h * w)
        return self._node("GlobalAveragePool", [x], (c, 1, 1))  # F.adaptive_avg_pool2d(x, 1)

    def se(self, x: str, mid: int) -> str:
        c = self.shapes[x][0]
        s = self.mean(x)
        s = self.act(self.conv(s, mid, 1, 1), "relu")
        s = self.act(self.conv(s, c, 1, 1), "hsigmoid")
        self.f["elem_mul"] += float(np.prod(self.shapes[x]))
        return self._node("Mul", [x, s], self.shapes[x])

    def gemm(self, x: str, cout: int) -> str:
        c, h, w = self.shapes[x]
        cin = c * h * w
        x = self._node("Flatten", [x], (cin, 1, 1), axis=1)
        name = self._name("fc")
        w_ = self._init(f"{name}.weight", (cout, cin), 0.01)
        b_ = self._init(f"{name}.bias", (cout,), 0.0)
        self.f["mac_fc"] += float(cin * cout)
        self.f["elem_conv_out"] += float(cout)
        return self._node("Gemm", [x, w_, b_], (cout, 1, 1), alpha=1.0, beta=1.0, transB=1)

    def shortcut(self, x: str, cout: int, stride: int) -> str:
        c = self.shapes[x][0]
        if c == cout and stride == 1:
            return x
        return self.conv(x, cout, 1, stride)


_POOL = np.random.default_rng(12345).standard_normal(1 << 18).astype(np.float32)  # random weights, tiled

FEATURES = ("one", "n_ops", "elem_in", "elem_out", "mac_pw", "mac_kxk", "mac_dw", "mac_vec", "mac_fc",
            "elem_conv_out", "elem_float", "elem_add", "elem_pool", "elem_mul")


def _emit_block(g: _Graph, x: str, cfg: dict) -> str:
    """Append the ops of block `cfg` (as in `modules.blocks`) reading tensor `x`; returns the output tensor."""
    from modules.ops import se_mid

    name, cin, cout, k, e = cfg["name"], cfg["cin"], cfg["cout"], cfg["kernel"], cfg["expand"]
    s, act, se = cfg["stride"], cfg["act"], bool(cfg["se"])
    if g.shapes[x][0] != cin:
        raise ValueError(f"block {block_key(cfg)}: input has {g.shapes[x][0]} channels, not {cin}")
    if name == "MobileNetV1Dual":
        y = g.conv_act(x, cin, k, s, act, depthwise=True)
        y = g.conv_act(y, cout, 1, 1, act)
        y = g.conv_act(y, cout, k, 1, act, depthwise=True)
        y = g.conv_act(y, cout, 1, 1, act)
        y = g.add(y, g.shortcut(x, cout, s))
    elif name in ("MobileNetV2", "MobileNetV2Res", "MobileNetV3Res", "MobileNetV2K3Res", "MobileNetV3K3Res"):
        h = make_divisible(e * cin)
        y = g.conv_act(x, h, 1, 1, act) if h != cin else x
        if "K3" in name:
            n = (k - 1) // 2
            for i in range(n):
                y = g.conv(y, h, 3, s if i == 0 else 1, depthwise=True, bias=i == n - 1)
            y = g.act(y, act)
        else:
            y = g.conv_act(y, h, k, s, act, depthwise=True)
        if se:
            y = g.se(y, se_mid(h))
        y = g.conv(y, cout, 1, 1)
        if name != "MobileNetV2":
            y = g.add(y, g.shortcut(x, cout, s))
        elif cin == cout and s == 1:
            y = g.add(y, x)
    elif name in ("ResNet", "ResNetSE"):
        h = make_divisible(e * cout)
        y = g.conv_act(x, h, 1, 1, act)
        y = g.conv_act(y, h, k, s, act)
        if se:
            y = g.se(y, se_mid(cin))
        y = g.conv(y, cout, 1, 1)
        y = g.act(g.add(y, g.shortcut(x, cout, s)), act)
    elif name in ("FusedMBConvRes", "FusedMBConvSERes"):
        h = make_divisible(e * cin)
        y = g.conv_act(x, h, k, s, act)
        if se:
            y = g.se(y, se_mid(cin))
        y = g.conv(y, cout, 1, 1)
        y = g.add(y, g.shortcut(x, cout, s))
    elif name in ("FirstConv", "FinalExpand"):
        y = g.conv_act(x, cout, k, s, act)
    elif name == "FeatureMix":
        y = g.conv_act(g.mean(x), cout, k, s, act)
    elif name == "Logits":
        y = g.gemm(x, cout)
    else:
        raise ValueError(f"unknown block type {name!r} in latency config {cfg}")
    return y


def _trace_block(cfg: dict, materialize: bool = False, seed: int = 0) -> tuple[_Graph, str]:
    """Run one block through a fresh :class:`_Graph` (input ``input``)."""
    g = _Graph(cfg["cin"], 1 if cfg["name"] == "Logits" else cfg["hw"], materialize, seed)
    y = _emit_block(g, "input", cfg)
    g.f["elem_out"] = float(np.prod(g.shapes[y]))
    return g, y


def _graph_model(g: _Graph, y: str, opset: int = 17):
    from onnx import TensorProto, helper

    if opset != 17:
        raise ValueError(f"the graph writer emits opset 17 graphs, not {opset}")
    last = g.nodes[-1]
    if y == "input" or last.output[0] != y:
        raise ValueError("model has no computation")
    last.output[0] = "output"  # the last node writes the graph output
    c, h, w = g.shapes["input"]
    oc, oh, ow = g.shapes[y]
    out_shape = [1, oc] if last.op_type == "Gemm" else [1, oc, oh, ow]
    graph = helper.make_graph(g.nodes, "model", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="spaceevo")
    model.ir_version = 8
    return model


def block_onnx(cfg: dict, opset: int = 17, seed: int = 0):
    """FP32 ONNX ModelProto of one block (random weights), input ``input`` [1,cin,hw,hw] (Logits:
    [1,cin,1,1]), output ``output``: the graph ``torch.onnx.export`` writes for the block after BN
    folding (checked by the test suite)."""
    g, y = _trace_block(cfg, materialize=True, seed=seed)
    return _graph_model(g, y, opset)


def subnet_onnx(block_configs: list[dict], opset: int = 17, seed: int = 0):
    """FP32 ONNX ModelProto of a whole network given by its block configs (``SuperNet.block_configs()`` or
    :func:`subnet_block_configs`), random weights: the blocks of :func:`block_onnx` chained, which is what
    ``modules.export.export_onnx`` writes for the torch subnet (checked by the test suite), in ms instead
    of seconds."""
    first = block_configs[0]
    g = _Graph(first["cin"], first["hw"], materialize=True, seed=seed)
    y = "input"
    for cfg in block_configs:
        if cfg["name"] != "Logits" and g.shapes[y][1] != cfg["hw"]:
            raise ValueError(f"block {block_key(cfg)}: input is {g.shapes[y][1]} px, not {cfg['hw']}")
        y = _emit_block(g, y, cfg)
    return _graph_model(g, y, opset)


_FEATURE_CACHE: dict[str, np.ndarray] = {}


def block_features(cfg: dict) -> np.ndarray:
    """Analytic features of a block (see :data:`FEATURES`), cached per block key."""
    key = block_key(cfg)
    f = _FEATURE_CACHE.get(key)
    if f is None:
        g, _ = _trace_block(cfg)
        f = _FEATURE_CACHE[key] = np.array([g.f[n] for n in FEATURES], dtype=np.float64)
    return f


def block_mmacs(cfg: dict) -> float:
    """MMACs of one block (convs + FC, as `modules.counter`)."""
    f = block_features(cfg)
    return float(sum(f[FEATURES.index(n)] for n in ("mac_pw", "mac_kxk", "mac_dw", "mac_vec", "mac_fc"))) / 1e6
