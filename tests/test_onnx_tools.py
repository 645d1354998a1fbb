"""ONNX export, ORT INT8 quantization, benchmark, int8 inspector and the onnx_tools scripts.

Hand-written tiny models only (no dependency on the supernet code); tiny shapes, few runs, no
assertion on wall times.
"""
from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.benchmark import LATENCY_HEADER, benchmark_onnx, run_onnx
from modules.export import (RandomCalibrationWarning, calib_from_loader, calib_loader_from_dir, export_onnx,
                            model_file_stem, parse_input_line, quantize_onnx_int8, read_input_csv)
from modules.inspect import inspect_onnx_int8

REPO_ROOT = Path(__file__).resolve().parents[1]
SEQNET_LINE = ("onnxw,151122-023231,d1#1#2#2#2#2#2#1_k3#3#3#3#3#3#3#3#3#3#3#3#3_w16#16#32#32#64#64#112#112#144#144"
               "#240#240#320_e0#0.5#4.0#4.0#1.0#1.0#4.0#4.0#4.0#4.0#4.0#4.0#4.0_r160")
RES = 32


# ----------------------------------------------------------------------------- tiny models
def conv_bn_act(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(F.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn_act(cin, mid, 1, act=act), conv_bn_act(mid, mid, 3, stride, mid, act=act)]
        if se:
            layers.append(SE(mid))
        layers.append(conv_bn_act(mid, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class TinyNet(nn.Module):
    """MobileNetV2-like (ReLU6), or with Hardswish + SE blocks (`hswish_se=True`)."""

    def __init__(self, hswish_se=False, num_classes=10):
        super().__init__()
        act = nn.Hardswish if hswish_se else nn.ReLU6
        self.blocks = nn.Sequential(
            conv_bn_act(3, 16, 3, 2, act=act),
            InvertedResidual(16, 16, 1, 1, act),
            InvertedResidual(16, 24, 2, 4, act, se=hswish_se),
            InvertedResidual(24, 24, 1, 4, act, se=hswish_se),
            conv_bn_act(24, 64, 1, act=act))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)
        self.resolution = RES

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.blocks(x)), 1))


class SlicedConvBN(nn.Module):
    """Like an elastic op: F.conv2d / F.batch_norm on slices of larger parameters (no nn.Conv2d)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 8, 3, 3) * 0.2)
        self.bn_w, self.bn_b = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32) * 0.1)
        self.register_buffer("mean", torch.randn(32) * 0.1)
        self.register_buffer("var", torch.rand(32) + 0.5)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(16, 10)
        self.resolution = RES

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.conv2d(x, self.weight[:16, :8], padding=1)
        x = F.relu(F.batch_norm(x, self.mean[:16], self.var[:16], self.bn_w[:16], self.bn_b[:16], False, 0.0, 1e-5))
        return self.head(x.mean((2, 3)))


def _bn_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BN layers data statistics (a randomly initialised net otherwise has vanishing activations)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(x)
    return model.eval()


def _rel_err(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A ReLU6 tiny net exported to fp32 ONNX + QDQ int8 (random calibration), and data."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("onnx")
    x = torch.randn(24, 3, RES, RES)
    model = _bn_stats(TinyNet(), x[:16])
    fp32 = export_onnx(model, RES, d / "tiny.onnx")
    with pytest.warns(RandomCalibrationWarning):
        int8 = quantize_onnx_int8(fp32, d / "tiny_int8.onnx", calib=None)
    return {"model": model, "x": x, "fp32": fp32, "int8": int8, "dir": d}


# ----------------------------------------------------------------------------- export + quantize
def test_fp32_export_matches_torch_and_int8_is_close(tiny):
    x = tiny["x"][16:]
    ref = tiny["model"](x).detach().numpy()
    assert _rel_err(run_onnx(tiny["fp32"], x.numpy()), ref) < 1e-4
    y8 = run_onnx(tiny["int8"], x.numpy())
    assert _rel_err(y8, ref) < 0.05
    import onnx

    m = onnx.load(tiny["fp32"])
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["output"]
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 3, RES, RES]
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 17


def test_int8_graph_runs_int8_kernels(tiny):
    rows = inspect_onnx_int8(tiny["int8"], verbose=False)
    total = rows[-1]
    assert total["group"] == "TOTAL" and "QLinearConv" in total["int8_op_types"]
    assert total["float_ops"] == 0 and total["status"] == "int8"
    groups = {r["group"] for r in rows}
    assert "blocks/blocks.2" in groups  # grouped by block (first indexed node-name component)


def test_qoperator_format_and_real_calibration(tiny, digits_root):
    loader = calib_loader_from_dir(digits_root / "train", RES, batch_size=4)
    calib = calib_from_loader(loader, num_samples=8)
    assert len(calib) == 8 and calib[0].shape == (1, 3, RES, RES) and calib[0].dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomCalibrationWarning)  # real images: no random-data warning
        q = quantize_onnx_int8(tiny["fp32"], tiny["dir"] / "tiny_qop_int8.onnx", calib=calib, fmt="qoperator")
    y = run_onnx(q, tiny["x"][16:].numpy())
    assert y.shape == (8, 10) and np.isfinite(y).all()
    assert "QLinearConv" in inspect_onnx_int8(q, verbose=False)[-1]["int8_op_types"]


def test_hswish_and_se_gates_run_in_int8_and_float_islands_are_reported(tmp_path):
    """Hardswish and the SE gate rewritten (modules.onnx_int8): only int8 kernels, output as close to fp32 as
    the plain quantization's; quantized as exported they stay float and the inspector says so."""
    torch.manual_seed(0)
    model = _bn_stats(TinyNet(hswish_se=True), torch.randn(8, 3, RES, RES))
    fp32 = export_onnx(model, RES, tmp_path / "se.onnx")
    calib, x = torch.randn(8, 3, RES, RES), torch.randn(4, 3, RES, RES).numpy()
    q = quantize_onnx_int8(fp32, tmp_path / "se_int8.onnx", calib=calib)
    total = inspect_onnx_int8(q, verbose=False)[-1]
    assert total["status"] != "FLOAT FALLBACK" and not total["float_op_types"], total
    plain = quantize_onnx_int8(fp32, tmp_path / "se_plain.onnx", calib=calib, int8_activations=False)
    with pytest.warns(UserWarning, match="float compute"):
        rows = inspect_onnx_int8(plain)
    assert rows[-1]["status"] == "FLOAT FALLBACK" and "HardSigmoid" in rows[-1]["float_op_types"]
    assert any(r["group"] == "blocks/blocks.2" and r["status"] == "FLOAT FALLBACK" for r in rows)
    ref = run_onnx(fp32, x)
    assert _rel_err(run_onnx(q, x), ref) < max(0.05, 1.5 * _rel_err(run_onnx(plain, x), ref))
    fp_rows = inspect_onnx_int8(fp32, verbose=False)  # an fp32 model is not "falling back"
    assert fp_rows[-1]["status"] == "fp32" and fp_rows[-1]["int8_kernels"] == 0


def test_sliced_weights_and_functional_bn_are_folded(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = SlicedConvBN().eval()
    fp32 = export_onnx(model, RES, tmp_path / "sliced.onnx")
    ops = [n.op_type for n in onnx.load(fp32).graph.node]
    assert "BatchNormalization" not in ops
    x = torch.randn(4, 3, RES, RES)
    assert _rel_err(run_onnx(fp32, x.numpy()), model(x).detach().numpy()) < 1e-4
    q = quantize_onnx_int8(fp32, tmp_path / "sliced_int8.onnx", calib=torch.randn(8, 3, RES, RES))
    assert inspect_onnx_int8(q, verbose=False)[-1]["int8_op_types"].count("QLinearConv") == 1


def test_export_restores_training_flag_and_checks_opset(tmp_path):
    model = TinyNet().train()
    export_onnx(model, RES, tmp_path / "t.onnx", opset=13)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="opset 12"):
        export_onnx(model, RES, tmp_path / "t12.onnx", opset=12)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_onnx_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx")


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_onnx_returns_sane_dict(tiny):
    r = benchmark_onnx(tiny["int8"], threads=1, warmup=2, runs=5)
    for k in ("median", "mean", "std", "runs", "warmup", "threads"):
        assert k in r
    assert r["median"] > 0 and r["mean"] > 0 and r["std"] >= 0
    assert (r["runs"], r["warmup"], r["threads"]) == (5, 2, 1)
    with pytest.raises(ValueError):
        benchmark_onnx(tiny["int8"], runs=0)


# ----------------------------------------------------------------------------- input.csv
def test_input_csv_parsing_and_file_names(tmp_path):
    p = tmp_path / "input.csv"
    p.write_text(SEQNET_LINE)  # the shipped file: one line, no trailing newline
    [e] = read_input_csv(p)
    assert (e.superspace, e.choice, e.supernet, e.resolution) == ("onnxw", "151122-023231", "onnxw-151122-023231", 160)
    assert e.name == SEQNET_LINE.replace(",", "-", 2)
    assert e.stem == model_file_stem("onnxw", "151122-023231", e.subnet) and len(e.stem.rsplit("-", 1)[1]) == 8


@pytest.mark.parametrize("bad, match", [
    ("onnxw,151122-023231", "expected 3 comma-separated fields"),
    ("onnxw,15112-023231," + SEQNET_LINE.split(",")[2], "6 digits"),
    ("nosuchspace,151122-023231," + SEQNET_LINE.split(",")[2], "nosuchspace"),
    ("onnxw,151122-023231,d1#1#2_k3_w16_e0_r160", "depth list"),
])
def test_malformed_input_csv_line_names_file_and_line(tmp_path, bad, match):
    p = tmp_path / "input.csv"
    p.write_text(f"{SEQNET_LINE}\n\n{bad}\n")
    with pytest.raises(ValueError, match=match) as ei:
        read_input_csv(p)
    assert f"{p}:3:" in str(ei.value)
    with pytest.raises(ValueError, match="x.csv:7:"):
        parse_input_line(bad, "x.csv", 7)


def test_missing_input_csv_and_model_files(tmp_path):
    from onnx_tools import benchmark as bench_script

    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_input_csv(tmp_path / "nope.csv")
    p = tmp_path / "input.csv"
    p.write_text(SEQNET_LINE + "\n")
    args = bench_script.get_args_parser().parse_args(["--input", str(p), "--model_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"not found \(for .*input.csv:1"):
        bench_script.main(args)


# ----------------------------------------------------------------------------- scripts
def _fake_builder(supernet_encoding, subnet_encoding, num_classes=None):
    torch.manual_seed(0)
    return TinyNet().eval()


def test_export_and_benchmark_scripts_end_to_end(tmp_path, monkeypatch, capsys):
    """input.csv → export_onnx.main → benchmark.main → latency.csv (model builder stubbed by a tiny net)."""
    import modules.export
    from onnx_tools import benchmark as bench_script
    from onnx_tools import export_onnx as export_script

    monkeypatch.setattr(modules.export, "build_model_from_encoding", _fake_builder)
    p = tmp_path / "input.csv"
    p.write_text(SEQNET_LINE)
    out = tmp_path / "models"
    args = export_script.get_args_parser().parse_args(
        ["--input", str(p), "--skip_weights", "--output_dir", str(out), "--num_calib", "4"])
    [w] = export_script.main(args)
    assert "random data" in capsys.readouterr().err
    stem = model_file_stem("onnxw", "151122-023231", SEQNET_LINE.split(",")[2])
    assert Path(w["fp32"]).name == f"{stem}.onnx" and Path(w["int8"]).name == f"{stem}_int8.onnx"

    args = bench_script.get_args_parser().parse_args(
        ["--input", str(p), "--model_dir", str(out), "--warmup", "1", "--runs", "3"])
    bench_script.main(args)
    with open(out / "latency.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == LATENCY_HEADER and len(rows) == 2
    row = dict(zip(rows[0], rows[1]))
    assert row["name"] == SEQNET_LINE.replace(",", "-", 2)
    assert float(row["fp32_median_ms"]) > 0 and float(row["int8_median_ms"]) > 0 and float(row["speedup"]) > 0
    assert (row["threads"], row["warmup"], row["runs"]) == ("1", "1", "3")

    # directory mode: X.onnx + X_int8.onnx → one row named X
    args = bench_script.get_args_parser().parse_args(
        ["--input", str(out), "--warmup", "0", "--runs", "2", "--output", str(tmp_path / "dir.csv")])
    [r] = bench_script.main(args)
    assert r["name"] == stem and r["speedup"]


def test_export_script_needs_weights_choice(tmp_path):
    from onnx_tools import export_onnx as export_script

    p = tmp_path / "input.csv"
    p.write_text(SEQNET_LINE)
    args = export_script.get_args_parser().parse_args(["--input", str(p), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--skip_weights"):
        list(export_script.load_models(args))


def test_cli_malformed_line_is_one_error_line(tmp_path):
    p = tmp_path / "input.csv"
    p.write_text("onnxw,151122-023231\n")
    r = subprocess.run([sys.executable, str(REPO_ROOT / "onnx_tools" / "export_onnx.py"), "--input", str(p),
                        "--skip_weights", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert f"{p}:1:" in r.stderr and "Traceback" not in r.stderr
