"""Latency predictor: direct block graphs vs torch export, table sums, save/load/resume, clear errors,
regression fallback. Timing settings are tiny (a few runs per block): the tests check plumbing, not speed."""
from __future__ import annotations

import collections
import itertools
import json
import random
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from modules.latency import local  # noqa: E402
from modules.latency.graph import FEATURES, block_features, block_mmacs, block_onnx, build_block_module, subnet_onnx  # noqa: E402,E501
from modules.latency.keys import block_key, parse_block_key  # noqa: E402
from modules.latency.local import measure_block, measure_model_file  # noqa: E402
from modules.latency.models import subnet_model_bytes  # noqa: E402
from modules.latency.predictor import LatencyPredictor, load_predictor  # noqa: E402
from modules.latency.quantize import quantize_block_onnx, strip_boundary_qdq  # noqa: E402
from modules.latency.regression import BlockRegressor, FlatForest  # noqa: E402
from modules.latency.sampling import (fixed_block_configs, random_subnet, random_supernet,  # noqa: E402
                                      subnet_block_configs)

FAST = dict(runs=3, warmup=1, min_time=0.0)


def _sig(model):
    """Node-by-node signature: op type, attributes (no Constant values), initializer shapes of inputs."""
    inits = {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        attrs = []
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            attrs.append((a.name, round(v, 5) if isinstance(v, float) else v))
        out.append((n.op_type, tuple(sorted(attrs)), tuple(inits[x] for x in n.input if x in inits)))
    return out


def _family_configs():
    """One config per block family of the three superspaces, with and without projection shortcut."""
    from modules.superspace import get_superspace

    seen, cfgs = set(), []
    for sp in ("onnxw", "mobilew", "tiny"):
        space = get_superspace(sp)
        for spec in list(space.candidates) + list(space.fixed.values()):
            for stride, (cin, cout) in ((1, (16, 16)), (2, (16, 24))):
                if spec.name == "Logits" and stride == 2:
                    continue
                cfg = dict(name=spec.name, cin=3 if spec.name == "FirstConv" else cin, cout=cout,
                           kernel=spec.kernel_list[-1], expand=spec.expand_list[-1], stride=stride, act=spec.act,
                           se=spec.se, hw=1 if spec.name == "Logits" else 8)
                if block_key(cfg) not in seen:
                    seen.add(block_key(cfg))
                    cfgs.append(cfg)
    return cfgs


FAMILY_CONFIGS = _family_configs()


@pytest.mark.parametrize("cfg", FAMILY_CONFIGS, ids=lambda c: f"{c['name']}-s{c['stride']}-{c['cin']}-{c['cout']}")
def test_block_graph_matches_torch_export(cfg, tmp_path):
    from modules.counter import count_macs
    from modules.export import export_onnx

    module = build_block_module(cfg)
    hw = cfg["hw"]
    path = export_onnx(module, hw, tmp_path / "b.onnx", in_channels=cfg["cin"])
    assert _sig(onnx.load(path)) == _sig(block_onnx(cfg))
    assert block_mmacs(cfg) == pytest.approx(count_macs(module, (1, cfg["cin"], hw, hw)) / 1e6)


def test_subnet_configs_and_graph_match_supernet(tmp_path):
    import torch

    from modules.export import export_onnx
    from modules.supernet import SuperNet, build_subnet

    torch.set_num_threads(1)
    rng = random.Random(3)
    choice = random_supernet("tiny", rng)
    net = SuperNet(choice)
    for _ in range(5):
        cfg = net.sample_active_subnet(rng)
        assert [block_key(c) for c in net.block_configs()] == [block_key(c) for c in subnet_block_configs(choice, cfg)]
    for mode in ("max", "min"):
        getattr(net, f"set_{mode}_subnet")()
        assert str(random_subnet(choice, rng, mode=mode)) == str(net.get_active_subnet_config())
    sub = random_subnet(choice, rng, 32)
    path = export_onnx(build_subnet(str(choice), str(sub)), 32, tmp_path / "m.onnx")
    assert _sig(onnx.load(path)) == _sig(subnet_onnx(subnet_block_configs(choice, sub)))


def test_expanded_per_channel_quantization_matches_ort():
    cfgs = [c for c in FAMILY_CONFIGS if c["name"] in ("MobileNetV3Res", "FusedMBConvRes", "Logits", "ResNetSE")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt, cfg in itertools.product(("qdq", "qoperator"), cfgs):
            m = block_onnx(cfg)
            assert _sig(quantize_block_onnx(m, fmt)) == _sig(quantize_block_onnx(m, fmt, per_channel="ort")), (fmt, cfg)


def test_boundary_qdq_cut():
    cfg = dict(name="MobileNetV2Res", cin=16, cout=16, kernel=3, expand=4, stride=1, act="relu6", se=False, hw=8)
    q = strip_boundary_qdq(quantize_block_onnx(block_onnx(cfg)))
    assert q.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert q.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = collections.Counter(n.op_type for n in q.graph.node)
    # the input feeds its DequantizeLinear directly, the output comes from a QuantizeLinear
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "input" for n in q.graph.node)
    assert any(n.op_type == "QuantizeLinear" and n.output[0] == "output" for n in q.graph.node)
    assert ops["Conv"] == 3
    # the image input of FirstConv and the logits output stay float
    for name, kw in (("FirstConv", dict(keep_input=True)), ("Logits", dict(keep_output=True))):
        c = next(c for c in FAMILY_CONFIGS if c["name"] == name)
        m = strip_boundary_qdq(quantize_block_onnx(block_onnx(c)), **kw)
        io = m.graph.input[0] if name == "FirstConv" else m.graph.output[0]
        assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for c in FAMILY_CONFIGS[:4]:  # every block model runs
        measure_block(c, "ort_int8", runs=2, warmup=1, min_time=0.0)


def test_block_key_round_trip():
    for c in FAMILY_CONFIGS:
        assert block_key(parse_block_key(block_key(c))) == block_key(c)
    with pytest.raises(ValueError, match="malformed block key"):
        parse_block_key("ResNet_8_16")


@pytest.fixture(scope="module")
def tiny_subnet():
    from modules.supernet import build_subnet

    rng = random.Random(0)
    choice = random_supernet("tiny", rng)
    sub = random_subnet(choice, rng, 32, mode="min")
    return str(choice), str(sub), build_subnet(str(choice), str(sub))


def test_sum_equals_table_entries(tmp_path, tiny_subnet):
    sup, sub, net = tiny_subnet
    path = tmp_path / "ort_fp32.json"
    pred = LatencyPredictor("ort_fp32", str(path), **FAST)
    assert pred.build([net.block_configs()], progress=False) == len({block_key(c) for c in net.block_configs()})
    assert pred.correction == (1.0, 0.0)
    expected = sum(pred.table[block_key(c)] for c in net.block_configs())
    assert pred.predict_subnet(net) == pytest.approx(expected, rel=1e-12)
    assert pred.predict_config(sup, sub) == pytest.approx(expected, rel=1e-12)  # from the encodings alone
    assert pred.stats["regression"] == 0
    # the raw standalone time is the table entry plus the session overhead
    k = block_key(net.block_configs()[1])
    assert pred.raw[k] == pytest.approx(pred.table[k] + pred.overhead_ms) or pred.table[k] == 0.0
    # a correction is applied linearly
    pred.correction = (2.0, 0.5)
    assert pred.predict_subnet(net) == pytest.approx(2.0 * expected + 0.5)
    # load_predictor reads the same table; the superspace picks its correction, else the generic one
    pred.calibrate([net.block_configs(), net.block_configs()[:-3]], [2 * expected, expected], superspace="tiny")
    again = load_predictor("ort_fp32", "tiny", str(tmp_path))
    assert again.table == pred.table and again.correction == pred.corrections["tiny"]
    assert load_predictor("ort_fp32", "onnxw", str(tmp_path)).correction == pred.corrections["*"]


def test_save_load_and_resume(tmp_path, tiny_subnet, monkeypatch):
    sup, sub, net = tiny_subnet
    path = tmp_path / "ort_int8.json"
    cfgs = net.block_configs()
    keys = list(dict.fromkeys(block_key(c) for c in cfgs))
    built = []
    real = local.block_runner

    def flaky(cfg, *a, **k):
        if len(built) == 5:  # interrupted while building the third batch of two
            raise KeyboardInterrupt
        built.append(block_key(cfg))
        return real(cfg, *a, **k)

    monkeypatch.setattr(local, "block_runner", flaky)
    pred = LatencyPredictor("ort_int8", str(path), **FAST)
    pred.batch_size = 2
    with pytest.raises(KeyboardInterrupt):
        pred.build([cfgs], progress=False)
    saved = json.loads(path.read_text())
    assert sorted(saved["blocks"]) == sorted(built[:4])  # the two finished batches were saved
    assert saved["platform"] == "ort_int8" and saved["overhead_ms"] > 0

    built.clear()
    monkeypatch.setattr(local, "block_runner", lambda cfg, *a, **k: (built.append(block_key(cfg)), real(cfg, *a, **k))[1])
    resumed = LatencyPredictor("ort_int8", str(path), **FAST)
    assert resumed.table == pytest.approx(saved["blocks"])
    assert resumed.build([cfgs], progress=False) == len(keys) - 4
    assert sorted(built) == sorted(set(keys) - set(saved["blocks"]))  # nothing measured twice
    built.clear()
    assert LatencyPredictor("ort_int8", str(path), **FAST).build([cfgs], progress=False) == 0 and not built


def test_clear_errors(tmp_path):
    bad = tmp_path / "ort_int8.json"
    bad.write_text('{"platform": "ort_int8", "blocks": {"x": ')
    with pytest.raises(ValueError, match=r"ort_int8\.json is corrupted"):
        load_predictor("ort_int8", "tiny", str(tmp_path))
    bad.write_text(json.dumps({"platform": "ort_int8", "blocks": {"not_a_key": 1.0}}))
    with pytest.raises(ValueError, match=r"ort_int8\.json is corrupted.*malformed block key"):
        load_predictor("ort_int8", "tiny", str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "ort_fp32.json").write_text(json.dumps({"platform": "ort_int8", "blocks": {}}))
    with pytest.raises(ValueError, match=r"ort_fp32\.json is for platform 'ort_int8', not 'ort_fp32'"):
        load_predictor("ort_fp32", "tiny", str(other))
    with pytest.raises(ValueError, match="latency platform 'gpu'"):
        load_predictor("gpu")
    with pytest.raises(FileNotFoundError, match=r"tflite_int8\.json not found.*build_latency_table\.py --superspace tiny"):
        load_predictor("tflite_int8", "tiny", str(tmp_path))
    (other / "ort_fp32.json").write_text(json.dumps({"platform": "ort_fp32", "threads": 1, "blocks": {}}))
    with pytest.raises(ValueError, match="threads=1, not 2"):
        load_predictor("ort_fp32", "tiny", str(other), threads=2, clock="wall")
    empty = load_predictor("ort_fp32", "tiny", str(other))
    with pytest.raises(ValueError, match="no measured blocks"):
        empty.predict_blocks([FAMILY_CONFIGS[0]])
    strict = load_predictor("ort_fp32", "tiny", str(other), fallback="error")
    with pytest.raises(ValueError, match="is not in the latency table"):
        strict.predict_blocks([FAMILY_CONFIGS[0]])


def test_nn_meter_is_not_a_platform():
    """nn-Meter's predictors cannot be built or downloaded here; the measured table replaces them (README)."""
    with pytest.raises(ValueError, match=r"latency platform 'nn_meter'; allowed: ort_int8, .*macs"):
        load_predictor("nn_meter", "tiny")


def test_macs_platform_needs_no_table(tiny_subnet):
    from modules.counter import count_macs

    _, _, net = tiny_subnet
    pred = load_predictor("macs", "tiny")
    macs = count_macs(net, (1, 3, net.resolution, net.resolution)) / 1e6
    assert pred.predict_subnet(net) == pytest.approx(macs / 100.0)


def test_regression_fallback_on_held_out_blocks():
    """Fit on measured blocks of one family, predict held-out configurations of it: a sane band."""
    rng = random.Random(1)
    cfgs = {}
    while len(cfgs) < 36:
        c = dict(name="MobileNetV2Res", cin=rng.choice((16, 24, 32, 48)), cout=rng.choice((16, 24, 32, 48)),
                 kernel=rng.choice((3, 5)), expand=float(rng.choice((2, 4, 6))), stride=rng.choice((1, 2)),
                 act="relu6", se=False, hw=rng.choice((8, 12, 16, 24)))
        cfgs[block_key(c)] = c
    cfgs = list(cfgs.values())
    pred = LatencyPredictor("ort_fp32", None, runs=5, warmup=2, min_time=0.003, measure_missing=True)
    ms = {block_key(c): pred.block_latency(c) for c in cfgs}
    train, test = cfgs[:28], cfgs[28:]
    fit = LatencyPredictor("ort_fp32", None)
    fit.table = {block_key(c): ms[block_key(c)] for c in train}
    fit.overhead_ms = pred.overhead_ms
    got = np.array([fit.block_latency(c) for c in test])
    want = np.array([ms[block_key(c)] for c in test])
    assert fit.stats["regression"] == len(test)
    ratio = got / np.maximum(want, 1e-4)
    assert np.all(ratio > 0.2) and np.all(ratio < 5.0), ratio  # a sane band on a loaded 2-core machine
    assert np.median(np.abs(np.log(ratio))) < np.log(1.6), ratio
    # a block type without measurements falls back to the global model
    other = dict(name="ResNet", cin=16, cout=16, kernel=3, expand=1.0, stride=1, act="relu", se=False, hw=8)
    assert fit.block_latency(other) > 0


def test_regressor_recovers_a_linear_cost_model():
    """Synthetic latencies = a non-negative cost per feature: the fit (linear + residual forest) recovers
    them on held-out configurations; predict_many equals predict."""
    rng = random.Random(2)
    cfgs = []
    for _ in range(160):
        name, act, se, e = rng.choice([("MobileNetV2Res", "relu6", False, (2, 4, 6)), ("ResNet", "relu", False, (0.5, 1.0)),
                                       ("MobileNetV3Res", "hswish", True, (4, 6))])
        cfgs.append(dict(name=name, cin=rng.choice((16, 24, 32, 48, 64)), cout=rng.choice((16, 24, 32, 48, 64)),
                         kernel=rng.choice((3, 5)), expand=float(rng.choice(e)), stride=rng.choice((1, 2)), act=act,
                         se=se, hw=rng.choice((7, 14, 28, 56))))
    cost = np.zeros(len(FEATURES))
    for f, c in (("one", 0.01), ("mac_pw", 2e-8), ("mac_dw", 8e-8), ("mac_kxk", 1.5e-8), ("elem_float", 3e-7),
                 ("elem_add", 1e-7), ("n_ops", 0.002)):
        cost[FEATURES.index(f)] = c
    y = [float(block_features(c) @ cost) for c in cfgs]
    reg = BlockRegressor().fit(cfgs[:120], y[:120])
    assert reg.forest is not None
    got = reg.predict_many(cfgs[120:])
    assert got == pytest.approx([reg.predict(c) for c in cfgs[120:]])
    err = np.abs(got / np.array(y[120:]) - 1)
    assert np.median(err) < 0.05 and err.max() < 0.5, err


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_forest_predicts_what_sklearn_predicts(seed):
    """FlatForest: scikit-learn's values, including rows whose features sit exactly on a split threshold (the
    trees compare float32 features) and integer-valued features like the block type and sizes."""
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(seed)
    X = np.hstack([rng.integers(0, 6, (300, 2)).astype(np.float64), rng.standard_normal((300, 3)) * 1e3,
                   rng.random((300, 2)) / 3])  # /3: most values are not representable in float32
    y = np.sin(X[:, 2] / 300) + X[:, 0] * 0.3 + rng.standard_normal(300) * 0.1
    forest = RandomForestRegressor(20, min_samples_leaf=2, random_state=seed).fit(X, y)
    flat = FlatForest(forest)
    t = forest.estimators_[0].tree_
    on_split = X[:40].copy()
    for i, node in enumerate(np.flatnonzero(t.children_left >= 0)[:40]):
        on_split[i, t.feature[node]] = t.threshold[node]
    Q = np.vstack([X, rng.standard_normal((200, 7)) * 500, on_split])
    np.testing.assert_allclose(flat.predict(Q), forest.predict(Q), rtol=1e-12, atol=1e-12)
    assert flat.predict(Q[:1]).shape == (1,)


def test_fixed_blocks_cover_every_subnet():
    rng = random.Random(4)
    keys = {block_key(c) for c in fixed_block_configs("tiny")}
    for _ in range(30):
        choice = random_supernet("tiny", rng)
        sub = random_subnet(choice, rng)
        cfgs = subnet_block_configs(choice, sub)
        fixed = cfgs[: sub.depths[0] + sub.depths[1]] + cfgs[-3:]
        assert {block_key(c) for c in fixed} <= keys


def test_stitched_whole_model_matches_quantized_whole_model(tmp_path):
    """The fast whole INT8 model (quantized network-form blocks chained) runs the same optimised graph as
    the quantized whole network; both run."""
    from modules.inspect import optimized_graph

    rng = random.Random(6)
    choice = random_supernet("tiny", rng)
    cfgs = subnet_block_configs(choice, random_subnet(choice, rng, 32))
    ops = []
    for method in ("stitch", "quantize"):
        data = subnet_model_bytes(cfgs, "ort_int8", method=method)
        path = tmp_path / f"{method}.onnx"
        path.write_bytes(data)
        ops.append(collections.Counter(n.op_type for n in optimized_graph(path).node))
        assert measure_model_file(path, "ort_int8", min_runs=2, min_time=0.0, warmup=1)["min"] > 0
    assert ops[0] == ops[1]


def test_warm_up_runs_until_the_times_stop_falling():
    from modules.latency.timing import warm_up

    def clock(times):
        """A fake clock: call i of fn takes times[i] (two readings per call)."""
        it = iter(t for x in times for t in (0.0, x))
        return lambda: next(it)

    falling = [10, 8, 6, 5, 4, 3, 2.5, 2, 2, 2, 2, 2, 2]  # a cold start: flat from call 8, three flat calls more
    assert warm_up(lambda: None, clock(falling), warmup=3, warmup_time=0.0) == 11
    flat = [2.0] * 20
    assert warm_up(lambda: None, clock(flat), warmup=3, warmup_time=0.0) == 4
    ever_faster = [0.9 ** i for i in range(60)]  # never warm: capped
    assert warm_up(lambda: None, clock(ever_faster), warmup=3, warmup_time=0.0, max_calls=50) == 50


def test_rounds_continue_while_the_minimum_falls(monkeypatch):
    from modules.latency import timing

    mins = {"steady": iter([5.0] * 20), "settling": iter([9.0, 8.0, 7.0, 6.0, 5.0, 5.0, 5.0, 5.0])}

    def fake(fn, *a, **k):
        m = next(mins[fn])
        return {"min": m, "times": [m]}

    monkeypatch.setattr(timing, "time_callable", fake)
    out = timing.time_rounds({"steady": "steady", "settling": "settling"}, rounds=2, max_rounds=10, tol=0.02)
    assert out["steady"]["round_min"] == [5.0, 5.0]  # stable after the two rounds asked for
    assert out["settling"]["round_min"] == [9.0, 8.0, 7.0, 6.0, 5.0, 5.0]  # until a round no longer lowers it
    assert out["settling"]["min"] == 5.0


def test_pinning_holds_one_cpu_and_is_undone():
    import os

    from modules.latency import timing

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux CPU affinity and two CPUs")
    before = os.sched_getaffinity(0)
    with timing.pinned(True):
        inside = os.sched_getaffinity(0)
    assert len(inside) == 1 and inside <= before and os.sched_getaffinity(0) == before


def test_smoothed_estimate_averages_block_noise_and_has_its_own_correction(tmp_path):
    """Noisy block entries of a made-up linear cost: the out-of-fold regression estimate is closer to the
    truth than the entries themselves; each estimate keeps its own correction through save and load."""
    rng = random.Random(3)
    cfgs = {}
    for _ in range(40):
        choice = random_supernet("tiny", rng)
        for c in subnet_block_configs(choice, random_subnet(choice, rng, rng.choice([32, 48, 64]))):
            cfgs[block_key(c)] = c
    truth = {k: float(block_features(c) @ np.linspace(1e-6, 2e-6, len(FEATURES))) + 0.01 for k, c in cfgs.items()}
    noise = np.random.default_rng(0).normal(1.0, 0.15, len(truth))
    pred = LatencyPredictor("ort_int8", str(tmp_path / "ort_int8.json"), superspace="tiny")
    pred.add_entries({k: v * n for (k, v), n in zip(truth.items(), noise)})
    pred.smooth()
    err_table = np.mean([abs(pred.table[k] / truth[k] - 1) for k in truth])
    err_smooth = np.mean([abs(pred.smoothed[k] / truth[k] - 1) for k in truth])
    assert err_smooth < err_table
    some = list(cfgs.values())[:10]
    pred.calibrate([some, some[:5]], [2.0, 1.0])  # table estimate
    pred.set_estimate("smoothed")
    assert pred.correction == (1.0, 0.0) and pred.blocks_sum(some) == pytest.approx(
        sum(pred.smoothed[block_key(c)] for c in some))
    pred.calibrate([some, some[:5]], [2.0, 1.0])
    again = load_predictor("ort_int8", "tiny", str(tmp_path))
    assert again.estimate == "smoothed" and again.smoothed == pytest.approx(pred.smoothed)
    assert again.predict_blocks(some) == pytest.approx(2.0, rel=1e-6)
    table = load_predictor("ort_int8", "tiny", str(tmp_path), estimate="table")
    assert table.predict_blocks(some) == pytest.approx(2.0, rel=1e-6) and table.correction != again.correction
