"""Backend presets after MQBench's table (tensorrt, snpe, vitis, openvino): the quantizers follow each backend's
rules, the exported QDQ ONNX file obeys them and matches the eval-mode fake-quant model, and the quantization
config file written beside it round-trips through `onnx_tools/export_int8_lsq.py --qconfig`."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from modules import deploy
from modules.lsq import RULES, ActQuantizer, WeightQuantizer, set_quant_mode
from modules.ops import DynamicConvBNAct
from modules.qconfig import qconfig_path, read_qconfig

NEW_PRESETS = ("tensorrt", "snpe", "vitis", "openvino")
SUPERNET, RES = "tiny-012345-000000", 32
# measured: ORT on the exported QDQ file vs the eval-mode fake-quant model, relative error of the logits
# <= 3e-7 for every new preset (float summation order only); asserted with margin
QDQ_TOL = 1e-5


def _act(preset, unsigned=False, data=None):
    q = ActQuantizer()
    q.unsigned = unsigned
    q.configure(preset)
    q.enabled = True
    q(torch.linspace(-1.0, 3.0, 101) if data is None else data)  # initialises the scale (training mode)
    return q


def _is_pot(s) -> bool:
    return all(math.log2(v) == round(math.log2(v)) for v in np.asarray(s, dtype=np.float64).reshape(-1))


# ------------------------------------------------------------------------------------------ the quantizers
@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_activation_rules(preset):
    rules = RULES[preset]
    q = _act(preset)
    s, zp = q.qparams()
    assert (q.qmin, q.qmax) == ((-128, 127) if rules.act_dtype == "int8" else (0, 255))
    if rules.act_zero_point == "zero":
        assert zp == 0  # symmetric
    else:  # snpe: asymmetric uint8, range [-1, 3] -> zero point ~ 255 / 4
        assert 60 <= zp <= 68
    if rules.pot_scale:
        assert _is_pot(s)
    y = q(torch.linspace(-1.0, 3.0, 101)).detach()
    k = y / s + zp  # the integers on the grid
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert k.min() >= q.qmin - 1e-4 and k.max() <= q.qmax + 1e-4
    # a ReLU output: unsigned (uint8, zero point 0) where the backend allows it, else still signed
    u = _act(preset, unsigned=True, data=torch.linspace(0.0, 3.0, 101))
    su, zu = u.qparams()
    if rules.relu_unsigned:
        assert (u.qmin, zu) == (0, 0) and su == pytest.approx(3.0 / 255, rel=1e-6)
    else:
        assert (u.qmin, zu) == (-128, 0)
        assert su == (2.0 ** round(math.log2(3.0 / 127)) if rules.pot_scale else pytest.approx(3.0 / 127, rel=1e-6))


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_weight_rules(preset):
    rules = RULES[preset]
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 1.0, 6).view(-1, 1, 1, 1)
    wq = WeightQuantizer(6)
    wq.configure(preset)
    wq.enabled = True
    y = wq(w).detach()
    s, zp = wq.qparams(6)
    assert s.shape == ((6,) if rules.weight_per_channel else (1,))
    assert hasattr(wq, "offset") != rules.weight_symmetric
    if rules.weight_symmetric:
        assert (zp == 0).all()
    else:  # snpe: uint8 with a learned zero point near the middle of a roughly symmetric range
        assert (wq.qmin, wq.qmax) == (0, 255) and 100 <= int(zp) <= 156
    assert _is_pot(s) == rules.pot_scale
    k = y / s.view(-1, 1, 1, 1) + zp.view(-1, 1, 1, 1)
    torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
    assert k.min() >= wq.qmin - 1e-3 and k.max() <= wq.qmax + 1e-3


def test_power_of_two_scale_gradient_is_straight_through():
    """vitis: s = 2 ** round(log2 scale) with the rounding's gradient passed through: d s / d scale = s / scale."""
    q = _act("vitis")
    with torch.no_grad():
        q.scale.fill_(0.011)  # between 2^-7 and 2^-6: rounds to 2^-7 in the log2 domain
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    (q(x) * x).sum().backward()
    g_pot = q.scale.grad.clone()
    assert q.qparams() == (2.0 ** -7, 0)
    # the same loss through a plain symmetric quantizer at the rounded scale: its gradient times s / scale
    ref = _act("openvino")
    with torch.no_grad():
        ref.scale.fill_(2.0 ** -7)
    (ref(x) * x).sum().backward()
    torch.testing.assert_close(g_pot, ref.scale.grad * (2.0 ** -7 / 0.011), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preset", ("snpe", "vitis"))
def test_per_tensor_presets_fold_bn_before_quantization(preset):
    """Per-tensor weights cannot absorb BN's per-channel factor exactly: eval mode folds BN into the float
    weight first, then quantizes it per tensor with the learned scale times max|a|, as the deployed file."""
    torch.manual_seed(0)
    m = DynamicConvBNAct(3, 8, 3, 1, "none")
    set_quant_mode(m, "lsq", preset)
    x = torch.randn(4, 3, 8, 8)
    m.train()
    m(x)
    with torch.no_grad():
        m.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.2, 2.0, -1.2, 0.3, -0.01, 1.0]))
        m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    with torch.no_grad():
        unfolded = m.bn(m.conv(x))  # what training computes: quantized unfolded weight, then the float BN
        folded = m(x)
        d = deploy.deploy_model(m, "torch", resolution=8)
        y = d(x)
    torch.testing.assert_close(y, folded, rtol=1e-6, atol=1e-6)  # the deployed op is the eval-mode op
    assert isinstance(d.bn, torch.nn.Identity) and d.conv.w_scale.numel() == 1
    a = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
    s = float(m.conv.weight_quant.scale.detach().abs()) * float(a.detach().abs().max())
    assert float(d.conv.w_scale) == pytest.approx(2.0 ** round(math.log2(s)) if preset == "vitis" else s, rel=1e-6)
    # the folded weight on one per-tensor grid: coarser for the small-|a| channels, so not exact; measured
    # 0.65 % (snpe) and 0.82 % (vitis)
    err = deploy.relative_error(folded, unfolded)
    print(f"{preset}: BN folded before quantization vs quantized conv then BN: relative error {err:.4f}")
    assert err < 0.05


# ------------------------------------------------------------------------------------------ exported files
@pytest.fixture(scope="module")
def subnet():
    from bench.deploy_fidelity import demo_config
    from modules.supernet import supernet_from_encoding

    torch.manual_seed(0)
    net = supernet_from_encoding(SUPERNET)
    net.set_active_subnet(demo_config(net, RES))
    return net.get_active_subnet()


def _lsq_model(sub, preset):
    """`sub` under `preset`, scales initialised, 3 LSQ+ steps on random data (scales leave their init), eval."""
    m = copy.deepcopy(sub)
    set_quant_mode(m, "lsq", preset)
    m.train()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(torch.randn(8, 3, RES, RES, generator=g)),
                                          torch.randint(0, 10, (8,), generator=g)).backward()
        opt.step()
    return m.eval()


def _quantize_nodes(path):
    """Every QuantizeLinear of an ONNX file: (node, input tensor, scale, zero point, axis or None, is weight,
    producer op of the input)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}
    producer = {o: n.op_type for n in g.node for o in n.output}
    rows = []
    for n in g.node:
        if n.op_type != "QuantizeLinear":
            continue
        value = {**inits, **consts}
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        rows.append(dict(node=n.name, tensor=n.input[0], scale=value[n.input[1]], zp=value[n.input[2]], axis=axis,
                         weight=inits.get(n.input[0]), producer=producer.get(n.input[0], "input")))
    return rows


def _check_rules(preset, rows):
    rules = RULES[preset]
    weights, acts = [r for r in rows if r["weight"] is not None], [r for r in rows if r["weight"] is None]
    assert weights and acts
    for r in weights:
        w, s, zp = r["weight"], r["scale"].astype(np.float64), r["zp"]
        if rules.weight_per_channel:
            assert s.shape == (w.shape[0],) and r["axis"] in (None, 0) and zp.shape == s.shape
            s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            assert s.size == 1 and zp.size == 1
        k = np.round(w / s) + zp.astype(np.int64).reshape(s.shape if s.size > 1 else ())
        assert zp.dtype == (np.int8 if rules.weight_symmetric else np.uint8), r["node"]
        lo, hi = rules.weight_range
        assert k.min() >= lo and k.max() <= hi, (r["node"], k.min(), k.max())
        if rules.weight_symmetric:
            assert (zp == 0).all(), r["node"]
    for r in acts:
        assert r["scale"].size == 1 and r["zp"].size == 1, r["node"]  # per tensor
        if rules.act_zero_point == "zero":
            assert int(r["zp"]) == 0, r["node"]
        unsigned = r["zp"].dtype == np.uint8
        if rules.act_dtype == "uint8":
            assert unsigned, r["node"]
        elif not rules.relu_unsigned:
            assert not unsigned, r["node"]  # tensorrt / vitis: int8 everywhere
        else:  # openvino: uint8 exactly after a ReLU (or a tensor made from ReLU outputs / a sigmoid), else int8
            after_relu = r["producer"] in ("Relu", "Clip", "GlobalAveragePool", "Sigmoid", "HardSigmoid")
            assert unsigned == after_relu or (after_relu and r["producer"] == "GlobalAveragePool"), r
    if rules.pot_scale:
        assert all(_is_pot(r["scale"]) for r in rows)
    if preset == "openvino":
        assert {r["zp"].dtype for r in acts} == {np.dtype(np.uint8), np.dtype(np.int8)}


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_exported_qdq_file_obeys_the_rules_and_matches_fake_quant(subnet, preset, tmp_path):
    m = _lsq_model(subnet, preset)
    x = torch.randn(16, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(x).numpy()
    path = deploy.export_onnx_int8(m, tmp_path / f"m_{preset}_int8.onnx")
    rows = _quantize_nodes(path)
    _check_rules(preset, rows)
    err = deploy.relative_error(deploy.run_onnx_batch(path, x), ref)
    print(f"{preset}: ORT QDQ vs fake-quant relative error {err:.2e}")
    assert err < QDQ_TOL, err
    # the quantization config beside the file holds every quantized tensor with the file's parameters
    cfg = read_qconfig(qconfig_path(path))
    assert cfg["preset"] == preset and qconfig_path(path).name == f"m_{preset}_int8.qconfig.json"
    by_node = {t["onnx_node"]: t for t in cfg["tensors"]}
    for r in rows:
        t = by_node[r["node"]]
        np.testing.assert_allclose(np.asarray(t["scale"], np.float32), r["scale"].reshape(-1), rtol=0)
        assert t["zero_point"] == r["zp"].reshape(-1).astype(int).tolist() and t["dtype"] == r["zp"].dtype.name
        assert t["symmetric"] == (not r["zp"].any()) and (t["axis"] is None) == (r["scale"].size == 1)
        if r["weight"] is not None:
            assert t["kind"] == "weight" and t["tensor"] == r["tensor"]


def test_qconfig_round_trip_through_export_int8_lsq(subnet, tmp_path):
    """Export, read the config back, re-export with --qconfig: identical Q/DQ parameters and outputs; a changed
    scale in the file changes that tensor in the re-exported model."""
    from modules.subnet_search import save_subnet_checkpoint
    from onnx_tools import export_int8_lsq

    m = _lsq_model(subnet, "tensorrt")
    ckpt = save_subnet_checkpoint(m, tmp_path / "sub.pth")

    def export(out, *extra):
        args = export_int8_lsq.get_args_parser().parse_args([str(ckpt), "--output_dir", str(out), "--no_fp32",
                                                             *extra])
        (row,) = export_int8_lsq.main(args)
        return row["int8"]

    first = export(tmp_path / "a")
    cfg_file = qconfig_path(first)
    again = export(tmp_path / "b", "--qconfig", str(cfg_file))
    a, b = _quantize_nodes(first), _quantize_nodes(again)
    assert [r["node"] for r in a] == [r["node"] for r in b]
    for ra, rb in zip(a, b):
        assert np.array_equal(ra["scale"], rb["scale"]) and np.array_equal(ra["zp"], rb["zp"]), ra["node"]
        assert ra["zp"].dtype == rb["zp"].dtype
    assert qconfig_path(again).read_text() == cfg_file.read_text()
    x = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(deploy.run_onnx_batch(first, x), deploy.run_onnx_batch(again, x))

    cfg = json.loads(cfg_file.read_text())
    t = next(t for t in cfg["tensors"] if t["kind"] == "activation" and t["onnx_node"])
    t["scale"] = [2 * t["scale"][0]]
    edited = tmp_path / "edited.qconfig.json"
    edited.write_text(json.dumps(cfg))
    changed = {r["node"]: r for r in _quantize_nodes(export(tmp_path / "c", "--qconfig", str(edited)))}
    node = t["onnx_node"]
    assert float(changed[node]["scale"]) == np.float32(t["scale"][0])
    cfg["tensors"][0]["name"] = "no.such.quantizer"
    edited.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no.such.quantizer"):
        export(tmp_path / "d", "--qconfig", str(edited))
