"""Block-wise latency predictor measured on the device at hand (replaces nn-Meter, reference spec §11.1).

The latency of every distinct block configuration (block type, input size, cin, cout, kernel, expand,
stride, activation, SE; :func:`block_key`) is *measured* on this machine as a standalone model at
batch 1 and cached in a JSON table ``<table_dir>/<platform>.json`` (written atomically after every
batch of blocks, so an interrupted build resumes where it stopped). A subnet's latency is the sum of
its blocks with a whole-model correction::

    predicted = a * sum_i block_i + b          (block_i: table entry, or the regression fallback)

Measuring a block (ORT platforms) costs ~0.1 s of CPU, because no torch export and no calibration run
is needed:

* the block's FP32 ONNX graph is written directly with ``onnx.helper`` from the block configuration
  (:func:`block_onnx`; the test suite checks it is node for node what ``torch.onnx.export`` writes
  for the torch block, after BN folding);
* INT8 uses ONNX Runtime's own ``quantize_static`` with the settings of
  :func:`modules.export.quantize_onnx_int8` (QDQ or QOperator, uint8 activations, int8 per-channel
  weights), but with a calibration cache of fixed ranges instead of a calibration run (scales do not
  change which kernels run) and per-tensor quantization widened to the per-channel form afterwards
  (the same graph without ORT's per-channel Python loop; checked by the tests);
* sessions are built from bytes; a batch of blocks is built, then timed together in shuffled rounds
  (:func:`time_rounds`) on the thread's CPU time, keeping the minimum (:class:`MeasureConfig` says why).

What a block measured alone pays that it does not pay inside a network, and how it is removed:

* **session-call overhead** (Python -> ORT ``run``): measured once per table on a trivial model
  (``overhead_ms``) and subtracted from every raw block time; the whole model pays it once (in ``b``).
  Blocks are run with IO binding (no per-run output allocation and copy);
* **Q/DQ and layout changes at the block boundary** (INT8): inside a network the tensor between two
  blocks stays uint8 and NHWC (``QLinearAdd -> QLinearConv``); a standalone QDQ block would quantize its
  float input, dequantize its output and transpose both. The input QuantizeLinear and output
  DequantizeLinear are cut (uint8 graph input and output, :func:`strip_boundary_qdq`) and the I/O made
  NHWC (:func:`nhwc_boundaries`), except the image input of ``FirstConv`` and the logits output of
  ``Logits``, which the whole network pays too;
* what remains (the caches are cold for each block's weights in a network, ORT scheduling) is fitted by
  ``calibrate`` on whole subnets measured end to end: ``a`` (slope) and ``b`` (intercept), per superspace.

Blocks not in the table are predicted by :class:`BlockRegressor` (per block type non-negative least
squares on analytic features, :func:`block_features`, times a random-forest correction), fitted on the
table's measured blocks. Predictions are cached per block configuration, so a subnet costs
microseconds; measuring in the hot path happens only with ``measure_missing=True``.

Platforms: ``ort_int8``, ``ort_fp32``, ``tflite_int8``, ``tflite_fp32`` (measured), ``macs``
(MMACs / 100: a proxy for tests, not a latency), ``nn_meter`` (optional adapter; needs nn-meter and
its predictor files).

Example::

    from modules.latency_predictor import load_predictor
    pred = load_predictor("ort_int8", "tiny", "checkpoints/latency")   # built by build_latency_table.py
    ms = pred.predict_subnet(net)           # net: a SuperNet with an active subnet, or a standalone subnet
    ms = pred.predict_config("tiny-123450-000000", "d1#1#..._r48")      # from encodings, no network
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform as _platform
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from modules.superspace import make_divisible

MEASURED_PLATFORMS = ("ort_int8", "ort_fp32", "tflite_int8", "tflite_fp32")
PLATFORMS = MEASURED_PLATFORMS + ("macs", "nn_meter")
TABLE_VERSION = 2
DEFAULT_TABLE_DIR = os.path.join("checkpoints", "latency")
NN_METER_HINT = ("the nn_meter platform needs nn-meter (pip install nn-meter==2.0) and its predictor files "
                 "registered locally (nn-meter register --predictor <dir>); they cannot be downloaded here. "
                 "Use a measured platform instead: " + ", ".join(MEASURED_PLATFORMS))
BUILD_HINT = "build it with: python build_latency_table.py --superspace <name> --platform {platform} --output_dir <dir>"
ACTS = ("relu", "relu6", "swish", "hswish", "none")
_SAVE_EVERY = 25  # table entries between atomic saves while building


# =============================================================================================== keys
def block_key(cfg: dict) -> str:
    """``name_hw_cin_cout_k_e_stride_act_se``: one key per distinct block configuration."""
    e = "None" if cfg["expand"] is None else f"{float(cfg['expand']):g}"
    return (f"{cfg['name']}_{cfg['hw']}_{cfg['cin']}_{cfg['cout']}_{cfg['kernel']}_{e}_{cfg['stride']}"
            f"_{cfg['act']}_{int(bool(cfg['se']))}")


def parse_block_key(key: str) -> dict:
    """The block configuration of a :func:`block_key` (ValueError naming the key if malformed)."""
    parts = key.split("_")
    try:
        name, hw, cin, cout, k, e, stride, act, se = parts
        if act not in ACTS or se not in ("0", "1"):
            raise ValueError
        return dict(name=name, hw=int(hw), cin=int(cin), cout=int(cout), kernel=int(k),
                    expand=None if e == "None" else float(e), stride=int(stride), act=act, se=se == "1")
    except ValueError:
        raise ValueError(f"malformed block key {key!r} (expected name_hw_cin_cout_k_e_stride_act_se)") from None


# =============================================================================================== torch
def build_block_module(cfg: dict):
    """A static, eval-mode torch module of one block configuration (random weights: latency only)."""
    from modules.blocks import build_block
    from modules.superspace import BlockSpec

    spec = BlockSpec(cfg["name"], (cfg["kernel"],), (cfg["expand"],), cfg["act"], bool(cfg["se"]))
    block = build_block(spec, (cfg["cin"],), (cfg["cout"],), cfg["stride"])
    return block.eval()


def _block_input_shape(cfg: dict) -> tuple[int, int, int, int]:
    return (1, cfg["cin"], cfg["hw"], cfg["hw"])


# =============================================================================================== block graph
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


# =============================================================================================== ONNX Runtime
def _ort_session(model_bytes: bytes, threads: int):
    """An ORT CPU session configured as `modules.benchmark.onnx_session` (ORT_ENABLE_ALL, sequential)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


_ORT_NP = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _session_runner(sess, iobinding: bool = False):
    """A no-argument callable running `sess` once on a fixed random input. ``iobinding``: input and output
    bound once to preallocated buffers (no per-run output allocation and copy to numpy, as between two
    blocks inside a network)."""
    import onnxruntime as ort

    i = sess.get_inputs()[0]
    dtype = _ORT_NP.get(i.type, np.float32)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape).astype(dtype) if dtype == np.float32
         else rng.integers(0, 128, size=shape).astype(dtype))
    if not iobinding:
        feed = {i.name: x}
        return lambda: sess.run(None, feed)
    b = sess.io_binding()
    b.bind_cpu_input(i.name, x)
    for o in sess.get_outputs():
        oshape = [d if isinstance(d, int) and d > 0 else 1 for d in o.shape]
        b.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_shape_and_type(oshape, _ORT_NP.get(o.type, np.float32)))
    b._keep = x  # the bound input must outlive the binding
    return lambda: sess.run_with_iobinding(b)


CLOCKS = ("cpu", "wall")
STATS = ("median", "p20", "min", "mean")


def time_callable(fn, min_runs: int = 15, max_runs: int = 300, min_time: float = 0.04, warmup: int = 3,
                  warmup_time: float = 0.01, clock: str = "cpu") -> dict:
    """Timing statistics (ms: median, p20, min, mean, std; runs) of `fn()`: `warmup` calls (at least
    `warmup_time` s), then calls until at least `min_runs` runs and `min_time` s of measured time (at
    most `max_runs`).

    ``clock="cpu"`` measures the calling thread's CPU time (``time.thread_time``): with one thread, ONNX
    Runtime and LiteRT compute on the calling thread, so this is the latency without the time spent
    waiting for a core on a shared machine (on this 2-core VM under load 6-9 the wall clock is 2-4x the
    CPU time and varies by tens of %). ``clock="wall"`` is ``time.perf_counter`` (use it on a
    dedicated device, or with several threads)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r}: use one of {CLOCKS}")
    now = time.thread_time if clock == "cpu" else time.perf_counter
    t_end = time.perf_counter() + warmup_time
    for _ in range(max(warmup, 1)):
        fn()
    while time.perf_counter() < t_end:
        fn()
    times, total = [], 0.0
    while len(times) < max_runs and (len(times) < min_runs or total < min_time):
        t0 = now()
        fn()
        dt = now() - t0
        times.append(dt)
        total += dt
    out = _summary(np.asarray(times) * 1e3, clock)
    out["times"] = [x * 1e3 for x in times]
    return out


def _summary(t: np.ndarray, clock: str) -> dict:
    med = float(np.median(t))
    ok = t[t >= 0.5 * med]  # a run under half the median is a clock glitch (seen once: 0.0 ms), not a latency
    return {"median": med, "p20": float(np.percentile(t, 20)), "min": float(ok.min()), "mean": float(t.mean()),
            "std": float(t.std()), "runs": int(t.size), "clock": clock}


def time_rounds(fns: dict, rounds: int = 2, min_runs: int = 15, max_runs: int = 300, min_time: float = 0.04,
                warmup: int = 3, clock: str = "cpu", seed: int = 0, gap: float = 0.0) -> dict:
    """Time several callables in `rounds` rounds, each round visiting them in a new random order (so the
    rounds of one model are seconds apart); per callable, the statistics of all its runs together (the
    minimum is the minimum over the rounds), plus ``round_min`` (each round's minimum). On a shared
    machine contention comes in phases of seconds; spreading a measurement over several phases is what
    makes repeated measurements agree. ``gap``: seconds of sleep between rounds (spreads the rounds of a
    single model, which has no other models to interleave with)."""
    rng = random.Random(seed)
    keys = list(fns)
    runs: dict = {k: [] for k in keys}
    per_round: dict = {k: [] for k in keys}
    for i in range(max(rounds, 1)):
        if i and gap > 0:
            time.sleep(gap)
        rng.shuffle(keys)
        for k in keys:
            st = time_callable(fns[k], min_runs, max_runs, min_time, warmup, 0.0, clock)
            runs[k].extend(st.pop("times"))
            per_round[k].append(st["min"])
    out = {}
    for k in fns:
        out[k] = _summary(np.asarray(runs[k]), clock)
        out[k]["round_min"] = per_round[k]
    return out


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

    from modules.export import _auto_reduce_range

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if fmt not in formats:
        raise ValueError(f"quantization format {fmt!r}: use one of {sorted(formats)}")
    if per_channel not in ("expand", "ort"):
        raise ValueError(f"per_channel {per_channel!r}: use 'expand' or 'ort'")
    root = logging.getLogger()
    old = root.level
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst, cache = (os.path.join(tmp, n) for n in ("b.onnx", "b_int8.onnx", "calib.json"))
        onnx.save(model, src)
        _fake_calibration_cache(model, cache)
        root.setLevel(logging.ERROR)  # "please pre-process" nag
        try:
            quantize_static(src, dst, None, quant_format=formats[fmt], per_channel=per_channel == "ort",
                            reduce_range=_auto_reduce_range(reduce_range), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibration_cache_path=cache,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        finally:
            root.setLevel(old)
        q = onnx.load(dst)
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
        for n in g.node:
            for i, x in enumerate(n.input):
                if x == inp.name:
                    n.input[i] = "input_nchw"
        g.node.insert(0, helper.make_node("Transpose", [inp.name], ["input_nchw"], perm=[0, 3, 1, 2], name="input_T"))
        inp.CopyFrom(helper.make_tensor_value_info(inp.name, TensorProto.UINT8, [n_, h, w, c]))
    if out.type.tensor_type.elem_type == TensorProto.UINT8 and len(dims(out)) == 4:
        n_, c, h, w = dims(out)
        for n in g.node:
            for i, x in enumerate(n.output):
                if x == out.name:
                    n.output[i] = "output_nchw"
            for i, x in enumerate(n.input):
                if x == out.name:
                    n.input[i] = "output_nchw"
        g.node.append(helper.make_node("Transpose", ["output_nchw"], [out.name], perm=[0, 2, 3, 1], name="output_T"))
        out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.UINT8, [n_, h, w, c]))


def block_model_bytes(cfg: dict, platform: str, fmt: str = "qdq", workdir: str | None = None,
                      boundary: str = "network") -> bytes:
    """The serialized ONNX model measured for one block on an ORT platform. INT8 with ``boundary="network"``
    (default): block-boundary Q/DQ cut and uint8 NHWC input/output, as inside a network
    (:func:`strip_boundary_qdq`, :func:`nhwc_boundaries`); ``"standalone"``: the quantized block as is
    (float NCHW input and output, for comparisons)."""
    if boundary not in ("network", "standalone"):
        raise ValueError(f"boundary {boundary!r}: use 'network' or 'standalone'")
    model = block_onnx(cfg)
    if platform == "ort_int8":
        model = quantize_block_onnx(model, fmt, workdir=workdir)
        if boundary == "network":
            strip_boundary_qdq(model, keep_input=cfg["name"] == "FirstConv", keep_output=cfg["name"] == "Logits")
            nhwc_boundaries(model)
    return model.SerializeToString()


def _overhead_model_bytes() -> bytes:
    """A trivial ONNX model (one Relu on 4 floats): its run time is the session-call overhead."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "overhead",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# =============================================================================================== measuring
ORT_PLATFORMS = ("ort_int8", "ort_fp32")


@dataclasses.dataclass
class MeasureConfig:
    """How one model is timed (:func:`time_callable`): warm-up, then runs until `min_runs` and
    `min_time` s; `stat` of the per-run times on `clock` is the figure kept.

    The default statistic is the **minimum**: on this shared 2-core machine, repeated measurements of
    the same model agree best on it (whole onnxw subnets measured 3 times: mean max/min spread 13 % for
    the minimum, 18 % for the median; blocks measured twice: median difference 7 % vs 10 %), because
    interference (cache and SMT contention from other processes) only ever adds time. On a dedicated
    device minimum and median nearly coincide."""
    threads: int = 1
    min_runs: int = 15
    max_runs: int = 300
    min_time: float = 0.04
    warmup: int = 3
    clock: str = "cpu"  # cpu (thread CPU time) | wall
    stat: str = "min"  # min | p20 | median | mean
    quant_format: str = "qdq"  # ort_int8: qdq | qoperator
    use_xnnpack: bool = True  # tflite_*
    # time_many: rounds per model, seconds apart, the runs split over them. Contention on a shared VM comes in
    # phases of seconds: the minimum over 6 rounds of 3 runs is far more reproducible than over 2 rounds of 8
    # (onnxw subnets measured twice, 10 min apart, at load 1: 78 % vs 50 % within +-10 % of each other)
    rounds: int = 6

    def __post_init__(self):
        if self.clock not in CLOCKS:
            raise ValueError(f"clock {self.clock!r}: use one of {CLOCKS}")
        if self.stat not in STATS:
            raise ValueError(f"statistic {self.stat!r}: use one of {STATS}")
        if self.threads > 1 and self.clock == "cpu":
            raise ValueError("clock 'cpu' measures the calling thread only: use clock 'wall' with threads > 1")

    def time(self, fn, platform: str | None = None, min_runs: int | None = None, min_time: float | None = None,
             warmup: int | None = None) -> dict:
        """Timing statistics of `fn` with these settings (`platform` is informational)."""
        st = time_callable(fn, self.min_runs if min_runs is None else min_runs, self.max_runs,
                           self.min_time if min_time is None else min_time,
                           self.warmup if warmup is None else warmup, clock=self.clock)
        st.pop("times")
        return st

    def time_many(self, fns: dict, min_runs: int | None = None, min_time: float | None = None,
                  warmup: int | None = None, seed: int = 0, gap: float = 0.0) -> dict:
        """Statistics of each callable over ``rounds`` shuffled rounds `gap` s apart (:func:`time_rounds`);
        `min_runs` / `min_time` per callable (default: this config's) are split over the rounds."""
        r = max(self.rounds, 1)
        min_runs = self.min_runs if min_runs is None else min_runs
        min_time = self.min_time if min_time is None else min_time
        return time_rounds(fns, r, max(1, -(-min_runs // r)), self.max_runs, min_time / r,
                           self.warmup if warmup is None else warmup, self.clock, seed, gap)


def measure_block(cfg: dict, platform: str, threads: int = 1, warmup: int = 3, runs: int = 15,
                  workdir: str | None = None, exporter: str = "direct", quant_format: str = "qdq",
                  min_time: float = 0.04, clock: str = "cpu", stat: str = "min") -> float:
    """Latency (ms, `stat` of `clock` times) of one block as a standalone model on `platform`, session
    overhead included. ``exporter="torch"`` exports the torch block instead of writing the graph
    directly (ORT platforms; slower, for checks)."""
    mc = MeasureConfig(threads=threads, min_runs=runs, warmup=warmup, quant_format=quant_format,
                       min_time=min_time, clock=clock, stat=stat)
    return _measure_block(cfg, platform, mc, workdir, exporter)[stat]


def _block_runner(cfg: dict, platform: str, mc: MeasureConfig, workdir=None, exporter: str = "direct",
                  boundary: str = "network"):
    """A no-argument callable running the standalone model of one block once (it keeps its session)."""
    if platform in ORT_PLATFORMS:
        if exporter == "torch":
            data = _torch_block_bytes(cfg, platform, mc.quant_format, workdir)
        else:
            data = block_model_bytes(cfg, platform, mc.quant_format, workdir, boundary)
        return _session_runner(_ort_session(data, mc.threads), iobinding=boundary == "network")
    if platform in ("tflite_int8", "tflite_fp32"):
        from modules import export

        module = build_block_module(cfg)
        shape = _block_input_shape(cfg) if cfg["name"] != "Logits" else (1, cfg["cin"], 1, 1)
        tmp = tempfile.TemporaryDirectory(dir=workdir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export.export_tflite(module, shape[2], os.path.join(tmp.name, "b.tflite"),
                                        int8=platform == "tflite_int8", in_channels=shape[1], num_random_calib=4)
        fn = _tflite_runner(path, mc)
        return lambda _keep=tmp: fn()  # the temp dir lives as long as the runner
    raise ValueError(f"platform {platform!r} is not measured; measured platforms: {', '.join(MEASURED_PLATFORMS)}")


def _measure_block(cfg: dict, platform: str, mc: MeasureConfig, workdir=None, exporter: str = "direct",
                   boundary: str = "network") -> dict:
    return mc.time_many({0: _block_runner(cfg, platform, mc, workdir, exporter, boundary)})[0]


def _tflite_runner(path, mc: MeasureConfig):
    from modules.benchmark import _random_input, tflite_interpreter

    it = tflite_interpreter(path, mc.threads, mc.use_xnnpack)
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        it.set_tensor(d["index"], _random_input(tuple(d["shape"]), d["dtype"], rng))
    return it.invoke


def _torch_block_bytes(cfg: dict, platform: str, fmt: str, workdir=None) -> bytes:
    import onnx

    from modules import export

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = export.export_onnx(build_block_module(cfg), cfg["hw"] if cfg["name"] != "Logits" else 1,
                                  os.path.join(tmp, "b.onnx"), in_channels=cfg["cin"])
        if platform == "ort_int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = export.quantize_onnx_int8(path, os.path.join(tmp, "b_int8.onnx"), None, fmt=fmt,
                                                 num_random_calib=2)
            m = strip_boundary_qdq(onnx.load(path), keep_input=cfg["name"] == "FirstConv",
                                   keep_output=cfg["name"] == "Logits")
            nhwc_boundaries(m)
            return m.SerializeToString()
        return Path(path).read_bytes()


def measure_overhead(platform: str, mc: MeasureConfig | None = None, repeats: int = 3) -> float:
    """Session-call overhead (ms): `mc.stat` run time of a trivial model, median over `repeats` sessions."""
    mc = mc or MeasureConfig()
    vals = []
    for _ in range(repeats):
        if platform in ORT_PLATFORMS:
            fn = _session_runner(_ort_session(_overhead_model_bytes(), mc.threads), iobinding=True)
        else:
            import torch

            from modules import export

            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = export.export_tflite(torch.nn.ReLU(), 2, os.path.join(tmp, "o.tflite"),
                                            int8=platform == "tflite_int8", in_channels=1, num_random_calib=2)
                fn = _tflite_runner(path, mc)
        vals.append(mc.time(fn, platform, min_runs=200, min_time=0.02, warmup=20)[mc.stat])
    return float(np.median(vals))


def export_subnet(net, platform: str, directory: str, quant_format: str = "qdq", calib=None) -> str:
    """Export a whole network the way it is deployed (`modules.export`: torch ONNX export + ONNX Runtime
    static quantization with `calib` (None: random), or LiteRT); returns the model file."""
    from modules import export

    res = getattr(net, "resolution", None) or getattr(net, "active_resolution")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=export.RandomCalibrationWarning)
        if platform in ORT_PLATFORMS:
            path = export.export_onnx(net, res, os.path.join(directory, "m.onnx"))
            if platform == "ort_int8":
                path = export.quantize_onnx_int8(path, os.path.join(directory, "m_int8.onnx"), calib,
                                                 fmt=quant_format, num_random_calib=4)
            return path
        if platform in ("tflite_int8", "tflite_fp32"):
            return export.export_tflite(net, res, os.path.join(directory, "m.tflite"), int8=platform == "tflite_int8",
                                        calib=calib, num_random_calib=4)
    raise ValueError(f"platform {platform!r} is not measured; measured platforms: {', '.join(MEASURED_PLATFORMS)}")


def measure_model_file(path, platform: str, mc: MeasureConfig | None = None, min_runs: int = 20,
                       min_time: float = 0.3, warmup: int = 5, gap: float = 1.0) -> dict:
    """Timing statistics (ms) of a model file, sessions configured as `modules.benchmark`; the model is run
    as deployed (``session.run`` with a float input). The runs are split over ``mc.rounds`` rounds `gap` s
    apart: one round caught in a slow phase of this shared VM measured two demo subnets 1.6x slower than
    a rerun a few minutes later."""
    from modules import benchmark

    mc = mc or MeasureConfig()
    if platform in ORT_PLATFORMS:
        fn = _session_runner(benchmark.onnx_session(path, mc.threads))
    else:
        fn = _tflite_runner(path, mc)
    st = mc.time_many({0: fn}, min_runs=min_runs, min_time=min_time, warmup=warmup, gap=gap)[0]
    st.pop("round_min", None)
    return st


def measure_subnet(net, platform: str, mc: MeasureConfig | None = None, workdir: str | None = None,
                   calib=None, **timing) -> dict:
    """End-to-end timing statistics (ms) of a whole network on `platform` (:func:`export_subnet` +
    :func:`measure_model_file`)."""
    mc = mc or MeasureConfig()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = export_subnet(net, platform, tmp, mc.quant_format, calib)
        return measure_model_file(path, platform, mc, **timing)


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
                inits += [numpy_helper.from_array(np.array(1 / 32, np.float32), sc),
                          numpy_helper.from_array(np.array(128, np.uint8), zp)]
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


def subnet_model_bytes(block_configs: list[dict], platform: str, quant_format: str = "qdq",
                       workdir: str | None = None, method: str = "stitch") -> bytes:
    """A whole network written directly (float input and output, as deployed). FP32: :func:`subnet_onnx`.
    INT8: ``method="stitch"`` (default) chains the quantized network-form blocks (:func:`stitch_blocks`;
    ~5x faster than quantizing the whole graph, whose ORT quantizer is quadratic in the node count);
    ``"quantize"``: :func:`quantize_block_onnx` of the whole :func:`subnet_onnx`. The test suite checks
    both give the optimised graph of the torch export + `modules.export.quantize_onnx_int8`."""
    if platform not in ORT_PLATFORMS:
        raise ValueError(f"directly written models are ONNX: ort_int8 / ort_fp32, not {platform!r} (use measure_subnet)")
    if method not in ("stitch", "quantize"):
        raise ValueError(f"method {method!r}: use 'stitch' or 'quantize'")
    if platform == "ort_fp32" or method == "quantize":
        model = subnet_onnx(block_configs)
        if platform == "ort_int8":
            model = quantize_block_onnx(model, quant_format, workdir=workdir)
        return model.SerializeToString()
    blocks = []
    for i, cfg in enumerate(block_configs):
        q = quantize_block_onnx(block_onnx(cfg, seed=i), quant_format, workdir=workdir)
        blocks.append(strip_boundary_qdq(q, keep_input=i == 0, keep_output=i == len(block_configs) - 1))
    return stitch_blocks(blocks).SerializeToString()


def measure_configs(block_configs: list[dict], platform: str, mc: MeasureConfig | None = None,
                    workdir: str | None = None, min_runs: int = 20, min_time: float = 0.3, warmup: int = 5) -> dict:
    """End-to-end timing statistics (ms) of a whole network given by its block configs, written directly
    (:func:`subnet_model_bytes`): node for node what the torch export + `modules.export.quantize_onnx_int8`
    give (the test suite checks it), built in a fraction of the time. ORT platforms only."""
    mc = mc or MeasureConfig()
    data = subnet_model_bytes(block_configs, platform, mc.quant_format, workdir)
    fn = _session_runner(_ort_session(data, mc.threads))
    return mc.time(fn, platform, min_runs=min_runs, min_time=min_time, warmup=warmup)


def measure_config_batch(models: dict, platform: str, mc: MeasureConfig | None = None, min_runs: int = 8,
                         min_time: float = 0.1, warmup: int = 2, seed: int = 0) -> dict:
    """End-to-end statistics of several whole networks ({key: block configs}) written directly
    (:func:`subnet_model_bytes`), built first and then timed together over ``mc.rounds`` shuffled rounds
    (`min_runs` / `min_time` per round), so each model's measurement spans several contention phases of a
    shared machine. Use batches of a few models (each session holds its weights)."""
    mc = mc or MeasureConfig()
    fns = {k: _session_runner(_ort_session(subnet_model_bytes(cfgs, platform, mc.quant_format), mc.threads))
           for k, cfgs in models.items()}
    return time_rounds(fns, mc.rounds, min_runs, mc.max_runs, min_time, warmup, mc.clock, seed)


def device_info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    info = {"cpu": cpu or _platform.processor(), "machine": _platform.machine()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# =============================================================================================== subnets
def _as_choice(supernet):
    from modules.encoding import SupernetChoice, parse_supernet

    return supernet if isinstance(supernet, SupernetChoice) else parse_supernet(str(supernet))


def subnet_block_configs(supernet, subnet, num_classes: int | None = None) -> list[dict]:
    """Block configs of a subnet from its encodings alone, equal to ``SuperNet.block_configs()`` of that
    subnet (the test suite checks it) without building the network (an onnxw supernet takes seconds).
    `num_classes`: the logits width (default: the superspace's)."""
    from modules.encoding import SubnetConfig, parse_subnet
    from modules.superspace import SUBNET_STAGES

    choice = _as_choice(supernet)
    cfg = subnet if isinstance(subnet, SubnetConfig) else parse_subnet(str(subnet), choice)
    space = choice.space
    hw, cin, out = cfg.resolution, space.cin, []
    for name, blocks in zip(SUBNET_STAGES, cfg.per_stage()):
        spec, stage, _ = choice.stage_spec(name)
        for i, (k, w, e) in enumerate(blocks):
            s = stage.stride if i == 0 else 1
            out.append(dict(name=spec.name, cin=cin, cout=w, kernel=k, expand=e, stride=s, act=spec.act,
                            se=spec.se, hw=hw))
            hw, cin = math.ceil(hw / s), w
    for name in ("final_expand", "feature_mix", "logits"):
        spec = space.fixed[name]
        w = (num_classes or space.num_classes) if name == "logits" else max(space.stage(name).width_list)
        e = None if spec.expand_list == (None,) else max(spec.expand_list)
        out.append(dict(name=spec.name, cin=cin, cout=w, kernel=max(spec.kernel_list), expand=e, stride=1,
                        act=spec.act, se=spec.se, hw=hw))
        hw = 1 if spec.name == "FeatureMix" else hw
        cin = w
    return out


def fixed_block_configs(superspace: str, resolutions=None) -> list[dict]:
    """Every configuration of the blocks outside the searchable stages (first conv, stage0, final expand,
    feature mix, logits) at each resolution: few, in every subnet, and unlike the searchable blocks, so
    the table should hold them all rather than leave them to the regression."""
    import itertools

    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    out = []
    fc, s0 = space.stage("first_conv"), space.stage("stage0")
    fspec, sspec = space.fixed["first_conv"], space.fixed["stage0"]
    for r in resolutions or space.supernet_hw_list:
        for w in fc.width_list:
            out.append(dict(name=fspec.name, cin=space.cin, cout=w, kernel=max(fspec.kernel_list), expand=None,
                            stride=fc.stride, act=fspec.act, se=fspec.se, hw=r))
        hw = math.ceil(r / fc.stride)
        for k, e in itertools.product(sspec.kernel_list, sspec.expand_list):
            for cin, cout in itertools.product(fc.width_list, s0.width_list):
                out.append(dict(name=sspec.name, cin=cin, cout=cout, kernel=k, expand=e, stride=s0.stride,
                                act=sspec.act, se=sspec.se, hw=hw))
            if max(s0.depth_list) > 1:
                for cin, cout in itertools.product(s0.width_list, s0.width_list):
                    out.append(dict(name=sspec.name, cin=cin, cout=cout, kernel=k, expand=e, stride=1,
                                    act=sspec.act, se=sspec.se, hw=math.ceil(hw / s0.stride)))
        hw = space.stage_input_hw(r, "final_expand")
        head = [space.fixed[n] for n in ("final_expand", "feature_mix", "logits")]
        fe_w, fm_w = max(space.stage("final_expand").width_list), max(space.stage("feature_mix").width_list)
        for cin in space.stage("stage6").width_list:
            out.append(dict(name=head[0].name, cin=cin, cout=fe_w, kernel=max(head[0].kernel_list), expand=None,
                            stride=1, act=head[0].act, se=head[0].se, hw=hw))
        out.append(dict(name=head[1].name, cin=fe_w, cout=fm_w, kernel=max(head[1].kernel_list), expand=None,
                        stride=1, act=head[1].act, se=head[1].se, hw=hw))
        out.append(dict(name=head[2].name, cin=fm_w, cout=space.num_classes, kernel=max(head[2].kernel_list),
                        expand=None, stride=1, act=head[2].act, se=head[2].se, hw=1))
    return out


def random_supernet(superspace: str, rng):
    """A uniformly random supernet choice (block type and width window per searchable stage)."""
    from modules.encoding import SupernetChoice
    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    blocks = tuple(rng.randrange(len(space.candidates)) for _ in space.searchable_stages)
    windows = tuple(rng.randrange(s.num_windows) for s in space.searchable_stages)
    return SupernetChoice(space.name, blocks, windows)


def random_subnet(supernet, rng, resolution: int | None = None, mode: str = "random"):
    """A subnet of `supernet` drawn like ``SuperNet.sample_active_subnet`` (uniform depth, then uniform
    kernel / width / expand per block), or its ``"max"`` / ``"min"`` subnet; `resolution` fixes r."""
    from modules.encoding import SubnetConfig
    from modules.superspace import SUBNET_STAGES

    choice = _as_choice(supernet)
    if mode not in ("max", "min", "random"):
        raise ValueError(f"subnet mode {mode!r}: use max, min or random")
    pick = {"max": max, "min": min}.get(mode) or rng.choice
    stages = []
    for name in SUBNET_STAGES:
        spec, stage, window = choice.stage_spec(name)
        blocks = []
        for _ in range(pick(stage.depth_list)):
            e = None if spec.expand_list == (None,) else pick(spec.expand_list)
            blocks.append((pick(spec.kernel_list), pick(window), None if e is None else float(e)))
        stages.append(blocks)
    r = resolution if resolution is not None else pick(choice.space.supernet_hw_list)
    return SubnetConfig.from_stages(stages, r)


def sample_subnets(superspace: str, num: int, rng, resolutions=None, supernets=None,
                   extremes: bool = True) -> list[tuple[str, str]]:
    """(supernet, subnet) encodings: at each resolution (default: the superspace's supernet resolutions),
    `num` random subnets of random supernets (or of `supernets`, cycled), plus the max and min subnets."""
    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    resolutions = list(resolutions or space.supernet_hw_list)
    choices = [_as_choice(s) for s in supernets] if supernets else None
    for c in choices or ():
        if c.superspace != space.name:
            raise ValueError(f"supernet {c} is not in superspace {space.name}")
    out, i = [], 0
    for r in resolutions:
        if r not in space.supernet_hw_list:
            raise ValueError(f"resolution {r} not in {space.name}'s {list(space.supernet_hw_list)}")
        modes = ["random"] * num + (["max", "min"] if extremes else [])
        for mode in modes:
            choice = choices[i % len(choices)] if choices else random_supernet(space.name, rng)
            i += 1
            out.append((str(choice), str(random_subnet(choice, rng, r, mode))))
    return out


# =============================================================================================== regression
class FlatForest:
    """A fitted scikit-learn forest regressor as flat numpy arrays, predicting every (row, tree) pair at once:
    the same values as ``forest.predict`` (float32 features against the trees' thresholds, as scikit-learn
    compares them) without its per-call cost (one row, 150 trees: 7.6 ms there, 0.14 ms here), which dominated
    random subnet sampling: one call per new subnet (bench/flat_forest.py)."""

    def __init__(self, forest):
        trees = [e.tree_ for e in forest.estimators_]
        sizes = np.array([t.node_count for t in trees])
        self.roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        shift = np.repeat(self.roots, sizes)
        left = np.concatenate([t.children_left for t in trees]).astype(np.int64)
        right = np.concatenate([t.children_right for t in trees]).astype(np.int64)
        leaf = left < 0
        own = np.arange(len(left))
        self.left = np.where(leaf, own, left + shift)  # a leaf points to itself: descending past it stays there
        self.right = np.where(leaf, own, right + shift)
        self.feature = np.where(leaf, 0, np.concatenate([t.feature for t in trees])).astype(np.int64)
        self.threshold = np.concatenate([t.threshold for t in trees])
        self.value = np.concatenate([t.value.reshape(t.node_count, -1)[:, 0] for t in trees])
        self.depth = max(t.max_depth for t in trees)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        node = np.broadcast_to(self.roots, (len(X), len(self.roots))).copy()
        rows = np.arange(len(X))[:, None]
        for _ in range(self.depth):
            go_left = X[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(go_left, self.left[node], self.right[node])
        return self.value[node].mean(axis=1)


class BlockRegressor:
    """Regression fallback for blocks not in the table, fitted on the measured ones.

    1. Per block type, non-negative least squares on :func:`block_features` (latency as a non-negative
       sum of costs per MAC of each conv kind, per tensor element, per op), minimising relative error;
       a global model over all types covers types with fewer than `min_samples` measurements.
    2. With at least `min_forest` measurements, a random forest (scikit-learn) on the log ratio
       measured / linear, from the block configuration (type, size, widths, kernel, expand, stride) and
       the log features. The linear part alone is biased low on large blocks (-7 % on the sum of 25
       random onnxw blocks); the residual forest removes the bias and captures width/alignment effects
       (sums of 25 held-out blocks within +-10 %: 66 % -> 92 %, see bench/latency_predictor.py).
    """

    def __init__(self, min_samples: int = 12, min_forest: int = 40, trees: int = 150, seed: int = 0):
        self.min_samples, self.min_forest, self.trees, self.seed = min_samples, min_forest, trees, seed
        self.coefs: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.types: list[str] = []
        self.forest = None
        self.flat_forest: FlatForest | None = None

    @staticmethod
    def _solve(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        from scipy.optimize import nnls

        w = 1.0 / np.maximum(y, 1e-4)  # relative error
        scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
        A = X / scale * w[:, None]
        coef, _ = nnls(A, y * w, maxiter=50 * A.shape[1])
        return coef / scale

    def _linear(self, cfgs: list[dict], X: np.ndarray) -> np.ndarray:
        if not self.coefs:
            raise ValueError("regression fallback is not fitted")
        out = np.empty(len(cfgs))
        for i, c in enumerate(cfgs):
            out[i] = X[i] @ self.coefs.get(c["name"], self.coefs["*"])
        return np.maximum(out, 1e-4)

    def _forest_x(self, cfgs: list[dict], X: np.ndarray, lin: np.ndarray) -> np.ndarray:
        rows = [[self.types.index(c["name"]) if c["name"] in self.types else -1, c["hw"], c["cin"], c["cout"],
                 c["kernel"], c["expand"] or 0.0, c["stride"], c["cin"] % 16, c["cout"] % 16] for c in cfgs]
        return np.hstack([np.asarray(rows, dtype=np.float64), np.log1p(X), np.log(lin)[:, None]])

    def fit(self, cfgs: list[dict], ms: list[float]) -> "BlockRegressor":
        if not cfgs:
            raise ValueError("regression fallback: no measured blocks to fit on")
        X = np.stack([block_features(c) for c in cfgs])
        y = np.maximum(np.asarray(ms, dtype=np.float64), 1e-4)
        names = np.array([c["name"] for c in cfgs])
        self.types = sorted(set(names))
        self.coefs = {"*": self._solve(X, y)}
        self.counts = {"*": len(y)}
        for n in self.types:
            m = names == n
            self.counts[n] = int(m.sum())
            if m.sum() >= self.min_samples:
                self.coefs[n] = self._solve(X[m], y[m])
        self.forest = self.flat_forest = None
        if len(y) >= self.min_forest:
            try:
                from sklearn.ensemble import RandomForestRegressor
            except ImportError:  # the linear model alone
                return self
            lin = self._linear(cfgs, X)
            self.forest = RandomForestRegressor(self.trees, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
            self.forest.fit(self._forest_x(cfgs, X, lin), np.log(y / lin))
            self.flat_forest = FlatForest(self.forest)
        return self

    def predict_many(self, cfgs: list[dict]) -> np.ndarray:
        """Latency (ms) of each block configuration."""
        if not cfgs:
            return np.zeros(0)
        X = np.stack([block_features(c) for c in cfgs])
        lin = self._linear(cfgs, X)
        if self.forest is None:
            return lin
        return lin * np.exp(self.flat_forest.predict(self._forest_x(cfgs, X, lin)))

    def predict(self, cfg: dict) -> float:
        return float(self.predict_many([cfg])[0])


# =============================================================================================== predictor
class LatencyPredictor:
    """Sum of per-block latencies (measured table, regression fallback) with a linear whole-model correction.

    Table file (JSON, atomic writes): ``platform``, ``threads``, ``overhead_ms`` (session-call overhead,
    already subtracted from every entry), ``blocks`` {block key: ms inside a network}, ``corrections``
    {superspace or "*": [a, b]}, ``calibration`` (the whole models behind the corrections), ``device``.
    """

    def __init__(self, platform: str, table_path: str | None = None, threads: int | None = None,
                 warmup: int = 3, runs: int = 15, measure_missing: bool = False, superspace: str | None = None,
                 fallback: str = "regression", min_time: float = 0.04, quant_format: str | None = None,
                 clock: str | None = None, stat: str | None = None, workdir: str | None = None):
        if platform not in PLATFORMS or platform == "nn_meter":
            allowed = ", ".join(p for p in PLATFORMS if p != "nn_meter")
            raise ValueError(f"latency platform {platform!r}; allowed: {allowed} (nn_meter: use load_predictor)")
        if fallback not in ("regression", "error"):
            raise ValueError(f"fallback {fallback!r}: use 'regression' or 'error'")
        self.platform, self.superspace = platform, superspace
        # measurement settings: explicit argument > the table's > default; explicit vs table conflict = error
        self._explicit = {k: v for k, v in dict(threads=threads, quant_format=quant_format, clock=clock,
                                                  stat=stat).items() if v is not None}
        self.mc = MeasureConfig(min_runs=runs, warmup=warmup, min_time=min_time, **self._explicit)
        self.table_path = Path(table_path) if table_path else None
        self.measure_missing, self.fallback, self.workdir = measure_missing, fallback, workdir
        self.batch_size = 32  # blocks built, then timed together in shuffled rounds
        self.table: dict[str, float] = {}
        self.raw: dict[str, float] = {}  # raw standalone times (overhead included), for reports
        self.overhead_ms: float | None = 0.0 if platform == "macs" else None
        self.corrections: dict[str, tuple[float, float]] = {}
        self.calibration: list[dict] = []
        self.device: dict = {}
        self._cache: dict[tuple, float] = {}  # block configuration -> latency (table or regression)
        self._subnet_cache: dict[tuple, float] = {}  # (supernet, subnet, classes) -> block sum
        self._regressor: BlockRegressor | None = None
        self._unsaved = 0
        self.stats = {"table": 0, "regression": 0, "measured": 0}
        if self.table_path is not None and self.table_path.is_file():
            self._load()

    @property
    def threads(self) -> int:
        return self.mc.threads

    # ------------------------------------------------------------------ correction
    @property
    def correction(self) -> tuple[float, float]:
        """(a, b) for this predictor's superspace (else the generic "*" fit, else (1, 0))."""
        return self.corrections.get(self.superspace or "*", self.corrections.get("*", (1.0, 0.0)))

    @correction.setter
    def correction(self, ab) -> None:
        self.corrections[self.superspace or "*"] = (float(ab[0]), float(ab[1]))

    # ------------------------------------------------------------------ table I/O
    def _load(self) -> None:
        path = self.table_path
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            blocks = {str(k): float(v) for k, v in data["blocks"].items()}
            for k in blocks:
                parse_block_key(k)
            raw = {str(k): float(v) for k, v in data.get("raw", {}).items()}
            corr = data.get("corrections")
            if corr is None:  # version 1: one "correction"
                corr = {"*": data.get("correction", (1.0, 0.0))}
            corrections = {str(k): (float(v[0]), float(v[1])) for k, v in corr.items()}
            overhead = data.get("overhead_ms")
            overhead = None if overhead is None else float(overhead)
            calibration = list(data.get("calibration", []))
            settings = {"threads": int(data.get("threads", 1)), "quant_format": str(data.get("quant_format", "qdq")),
                        "clock": str(data.get("clock", "wall")), "stat": str(data.get("stat", "median"))}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"latency table {path} is corrupted ({type(e).__name__}: {e}); delete it to "
                             "re-measure") from None
        if data.get("platform") != self.platform:
            raise ValueError(f"latency table {path} is for platform {data.get('platform')!r}, not {self.platform!r}")
        for k, v in settings.items():
            if k == "quant_format" and self.platform != "ort_int8":
                continue
            if k in self._explicit and self._explicit[k] != v:
                raise ValueError(f"latency table {path} was measured with {k}={v!r}, not {self._explicit[k]!r}")
        try:
            self.mc = dataclasses.replace(self.mc, **settings)
        except ValueError as e:
            raise ValueError(f"latency table {path}: {e}") from None
        self.table, self.raw, self.corrections, self.overhead_ms = blocks, raw, corrections, overhead
        self.calibration, self.device = calibration, dict(data.get("device", {}))
        here = device_info().get("cpu")
        if self.device.get("cpu") and here and self.device["cpu"] != here:
            warnings.warn(f"latency table {path} was measured on {self.device['cpu']!r}, this CPU is {here!r}")

    def save(self) -> None:
        if self.table_path is None:
            return
        from modules.checkpoint import atomic_write_text

        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": TABLE_VERSION, "platform": self.platform, "threads": self.threads,
                "quant_format": self.mc.quant_format, "clock": self.mc.clock, "stat": self.mc.stat,
                "device": self.device or device_info(),
                "overhead_ms": self.overhead_ms,
                "corrections": {k: list(v) for k, v in sorted(self.corrections.items())},
                "calibration": self.calibration,
                "blocks": dict(sorted(self.table.items())), "raw": dict(sorted(self.raw.items()))}
        atomic_write_text(self.table_path, json.dumps(data, indent=0))
        self._unsaved = 0

    # ------------------------------------------------------------------ measuring
    def ensure_overhead(self) -> float:
        if self.overhead_ms is None:
            self.overhead_ms = measure_overhead(self.platform, self.mc) if self.platform in MEASURED_PLATFORMS else 0.0
        return self.overhead_ms

    def measure(self, cfg: dict) -> float:
        """Measure one block now, store it in the table (saved every few entries) and return its latency."""
        self._measure_batch([cfg])
        return self.table[block_key(cfg)]

    def _measure_batch(self, cfgs: list[dict]) -> None:
        """Build the standalone models of `cfgs`, time them together (:meth:`MeasureConfig.time_many`:
        rounds in shuffled order) and store them."""
        if self.platform not in MEASURED_PLATFORMS:
            raise ValueError(f"platform {self.platform!r} is not measured")
        overhead = self.ensure_overhead()
        runners = {block_key(c): _block_runner(c, self.platform, self.mc, self.workdir) for c in cfgs}
        stats = self.mc.time_many(runners, seed=len(self.table))
        for key, st in stats.items():
            self.raw[key] = st[self.mc.stat]
            self.table[key] = max(st[self.mc.stat] - overhead, 0.0)
        self._regressor = None
        self._cache.clear()  # regression predictions may change with the new entries
        self._subnet_cache.clear()
        self.stats["measured"] += len(stats)
        self._unsaved += len(stats)
        if self._unsaved >= _SAVE_EVERY:
            self.save()

    # ------------------------------------------------------------------ prediction
    def regressor(self) -> BlockRegressor:
        if self._regressor is None:
            if not self.table:
                where = f" {self.table_path}" if self.table_path else ""
                raise ValueError(f"latency table{where} has no measured blocks to predict from; "
                                 + BUILD_HINT.format(platform=self.platform))
            keys = list(self.table)
            self._regressor = BlockRegressor().fit([parse_block_key(k) for k in keys], [self.table[k] for k in keys])
        return self._regressor

    def block_latency(self, cfg: dict) -> float:
        """Latency (ms) of one block inside a network: table entry, else measured (``measure_missing``),
        else the regression fallback (cached per block configuration)."""
        ck = (cfg["name"], cfg["hw"], cfg["cin"], cfg["cout"], cfg["kernel"], cfg["expand"], cfg["stride"], cfg["act"],
              cfg["se"])
        v = self._cache.get(ck)
        if v is None:
            v = self._cache[ck] = self._lookup(cfg)
        return v

    def _lookup(self, cfg: dict) -> float:
        if self.platform == "macs":
            return block_mmacs(cfg) / 100.0
        key = block_key(cfg)
        if key in self.table:
            self.stats["table"] += 1
            return self.table[key]
        if self.measure_missing:
            return self.measure(cfg)
        if self.fallback == "error":
            raise ValueError(f"block {key} is not in the latency table {self.table_path}; "
                             + BUILD_HINT.format(platform=self.platform))
        self.stats["regression"] += 1
        return max(self.regressor().predict(cfg), 0.0)

    def blocks_sum(self, block_configs: list[dict]) -> float:
        """Sum of the blocks' latencies (table / regression, no correction); blocks missing from the table
        are predicted in one batch."""
        cache = self._cache
        total, missing = 0.0, []
        for c in block_configs:
            v = cache.get((c["name"], c["hw"], c["cin"], c["cout"], c["kernel"], c["expand"], c["stride"], c["act"],
                           c["se"]))
            if v is None:
                missing.append(c)
            else:
                total += v
        if missing:
            self.prefetch(missing)
            total += sum(self.block_latency(c) for c in missing)
        return total

    def prefetch(self, block_configs: list[dict]) -> None:
        """Fill the cache for `block_configs`, regression predictions in one batch (much faster than one
        by one with the forest)."""
        todo = {}
        for c in block_configs:
            ck = (c["name"], c["hw"], c["cin"], c["cout"], c["kernel"], c["expand"], c["stride"], c["act"], c["se"])
            if ck in self._cache or ck in todo:
                continue
            if self.platform == "macs" or block_key(c) in self.table or self.measure_missing or self.fallback == "error":
                self.block_latency(c)
            else:
                todo[ck] = c
        if todo:
            vals = self.regressor().predict_many(list(todo.values()))
            self.stats["regression"] += len(todo)
            for ck, v in zip(todo, vals):
                self._cache[ck] = max(float(v), 0.0)

    def predict_blocks(self, block_configs: list[dict]) -> float:
        a, b = self.correction
        return a * self.blocks_sum(block_configs) + b

    def predict_subnet(self, net) -> float:
        """Predicted latency (ms) of the active subnet of `net` (a SuperNet or a standalone subnet)."""
        return self.predict_blocks(net.block_configs())

    def predict_config(self, supernet, subnet, num_classes: int | None = None) -> float:
        """Predicted latency (ms) of a subnet given by its encodings (no network built; the block sum is
        cached per subnet)."""
        key = (str(supernet), str(subnet), num_classes)
        total = self._subnet_cache.get(key)
        if total is None:
            total = self._subnet_cache[key] = self.blocks_sum(subnet_block_configs(supernet, subnet, num_classes))
        a, b = self.correction
        return a * total + b

    def build(self, block_config_lists, desc: str = "measuring blocks", progress: bool = True) -> int:
        """Measure every block of every config list not yet in the table (resumable: the table is saved
        after every batch of `batch_size` blocks and on interruption). Returns #new."""
        from tqdm import tqdm

        if self.platform not in MEASURED_PLATFORMS:
            return 0
        todo = {}
        for cfgs in block_config_lists:
            for c in cfgs:
                k = block_key(c)
                if k not in self.table and k not in todo:
                    todo[k] = c
        self.ensure_overhead()
        items = list(todo.values())
        bar = tqdm(total=len(items), desc=desc, disable=not items or not progress, unit="block")
        try:
            for i in range(0, len(items), self.batch_size):
                batch = items[i:i + self.batch_size]
                self._measure_batch(batch)
                bar.update(len(batch))
        finally:
            bar.close()
            self.save()
        return len(todo)

    def calibrate(self, block_config_lists, measured_ms, models: list[dict] | None = None,
                  superspace: str | None = None) -> tuple[float, float]:
        """Fit latency = a * sum(blocks) + b on whole models measured on the same platform (least squares
        on relative error); stored per superspace (default: this predictor's, else "*")."""
        sums = np.array([self.blocks_sum(cfgs) for cfgs in block_config_lists], dtype=np.float64)
        y = np.asarray(measured_ms, dtype=np.float64)
        if len(y) < 2 or len(y) != len(sums):
            raise ValueError(f"calibration needs at least two measured models and one latency per model "
                             f"(got {len(sums)} models, {len(y)} latencies)")
        if np.ptp(sums) <= 1e-9 * max(1.0, abs(sums).max()):
            a, b = float(np.mean(y / np.maximum(sums, 1e-9))), 0.0
        else:
            a, b = np.polyfit(sums, y, 1, w=1.0 / np.maximum(y, 1e-9))
        key = superspace or self.superspace or "*"
        self.corrections[key] = (float(a), float(b))
        if "*" not in self.corrections:
            self.corrections["*"] = (float(a), float(b))
        if models is not None:
            self.calibration = [m for m in self.calibration if m.get("superspace") != key] + \
                               [dict(m, superspace=key) for m in models]
        self.save()
        return self.corrections[key]


class NNMeterPredictor:
    """Adapter to nn-Meter block predictors, only when nn-meter and its predictor files are installed."""

    def __init__(self, predictor_name: str, predictor_version: float | None = None):
        try:
            from nn_meter import load_latency_predictor
        except ImportError:
            raise ImportError(NN_METER_HINT) from None
        try:
            self.predictor = load_latency_predictor(predictor_name, predictor_version)
        except Exception as e:  # nn-meter raises bare Exceptions and tries to download missing files
            raise ValueError(f"nn-meter predictor {predictor_name!r} is not available locally ({e}); "
                             + NN_METER_HINT) from None

    def predict_blocks(self, block_configs: list[dict]) -> float:
        total = 0.0
        for c in block_configs:
            c = dict(c)  # never mutate the caller's config (spec §13.18)
            c["kernel_size"], c["expand_ratio"], c["activation"] = c.pop("kernel"), c.pop("expand"), c.pop("act")
            total += float(self.predictor.predict(c, model_type="block"))
        return total

    def predict_subnet(self, net) -> float:
        return self.predict_blocks(net.block_configs())


def table_path(platform: str, table_dir: str | os.PathLike | None = None) -> Path:
    return Path(table_dir or DEFAULT_TABLE_DIR) / f"{platform}.json"


def load_predictor(platform: str, superspace: str | None = None, table_dir: str | None = None,
                   **kwargs) -> LatencyPredictor | NNMeterPredictor:
    """The predictor of `platform`; measured tables live in ``<table_dir>/<platform>.json`` (default
    ``checkpoints/latency``), built by ``build_latency_table.py``. The correction fitted for `superspace`
    is used when the table has one. A missing table is a FileNotFoundError unless
    ``measure_missing=True`` (then blocks are measured on first use)."""
    if platform == "nn_meter":
        return NNMeterPredictor(kwargs.pop("predictor_name", "tflite27_cpu_int8"), kwargs.pop("predictor_version", None))
    if platform not in PLATFORMS:
        raise ValueError(f"latency platform {platform!r}; allowed: {', '.join(PLATFORMS)}")
    if platform == "macs":
        return LatencyPredictor("macs", None, superspace=superspace)
    path = table_path(platform, table_dir)
    if not path.is_file() and not kwargs.get("measure_missing", False):
        raise FileNotFoundError(f"latency table {path} not found; "
                                + BUILD_HINT.format(platform=platform).replace("<name>", superspace or "<name>"))
    return LatencyPredictor(platform, str(path), superspace=superspace, **kwargs)
