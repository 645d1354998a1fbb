"""TFLite export through litert-torch (fp32 and PT2E int8), LiteRT benchmark and the tflite_tools scripts.

Skipped as a whole when litert-torch / ai-edge-litert are not importable. Hand-written tiny models.
"""
from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("litert_torch", reason="litert-torch is not installed (pip install litert-torch==0.10.0): "
                    "TFLite export is optional")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install ai-edge-litert==2.3.0)")

from modules.benchmark import LATENCY_HEADER, benchmark_tflite, run_tflite  # noqa: E402
from modules.latency.sessions import tflite_interpreter  # noqa: E402
from modules.export import RandomCalibrationWarning, export_tflite  # noqa: E402

RES = 32


def conv_bn_act(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn_act(cin, mid, 1), conv_bn_act(mid, mid, 3, stride, mid),
                                  conv_bn_act(mid, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class TinyMBV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.blocks = nn.Sequential(conv_bn_act(3, 16, 3, 2), InvertedResidual(16, 16, 1, 1),
                                    InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
                                    conv_bn_act(24, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)
        self.resolution = RES

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.blocks(x)), 1))


class SlicedConv(nn.Module):
    """Elastic-op style: F.conv2d on a slice of a larger weight (PT2E needs it frozen to a get_attr)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(32, 8, 3, 3) * 0.2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(F.conv2d(F.relu(self.stem(x)), self.weight[:16], padding=1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _bn_stats(model, x):
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
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tflite")
    x = torch.randn(32, 3, RES, RES)
    model = _bn_stats(TinyMBV2(), x[:16])
    fp32 = export_tflite(model, RES, d / "tiny.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomCalibrationWarning)  # calibration data given: no warning
        int8 = export_tflite(model, RES, d / "tiny_int8.tflite", int8=True, calib=x[:16])
    return {"model": model, "x": x, "fp32": fp32, "int8": int8, "dir": d}


def test_fp32_tflite_matches_torch(tiny):
    x = tiny["x"][16:24]
    assert _rel_err(run_tflite(tiny["fp32"], x.numpy()), tiny["model"](x).detach().numpy()) < 1e-4


def test_int8_tflite_runs_int8_kernels_and_agrees_on_argmax(tiny):
    x = tiny["x"][16:]
    ref = tiny["model"](x).detach().numpy()
    y = run_tflite(tiny["int8"], x.numpy())
    assert y.shape == ref.shape and np.isfinite(y).all()
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.75
    it = tflite_interpreter(tiny["int8"], use_xnnpack=False)
    inp = it.get_input_details()[0]
    assert inp["dtype"] == np.int8 and inp["quantization"][0] > 0  # real int8 model, int8 I/O
    ops = {d["op_name"] for d in it._get_ops_details()}
    assert "CONV_2D" in ops and "DEPTHWISE_CONV_2D" in ops and "DEQUANTIZE" not in ops  # no float islands
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    conv = next(d for d in it._get_ops_details() if d["op_name"] == "CONV_2D")
    assert tensors[conv["inputs"][1]]["dtype"] == np.int8  # int8 weights


def test_int8_export_of_sliced_weights_and_training_flag(tmp_path):
    torch.manual_seed(0)
    model = SlicedConv().train()
    with pytest.warns(RandomCalibrationWarning):
        p = export_tflite(model, RES, tmp_path / "sliced_int8.tflite", int8=True, num_random_calib=4)
    assert model.training  # caller's mode restored
    model.eval()
    x = torch.randn(4, 3, RES, RES)
    y = run_tflite(p, x.numpy())
    assert _rel_err(y, model(x).detach().numpy()) < 0.1


def test_benchmark_tflite_sane_dict(tiny):
    for xnn in (True, False):
        r = benchmark_tflite(tiny["int8"], threads=1, warmup=2, runs=5, use_xnnpack=xnn)
        for k in ("median", "mean", "std", "runs", "warmup", "threads"):
            assert k in r
        assert r["median"] > 0 and r["std"] >= 0 and r["runs"] == 5 and r["use_xnnpack"] is xnn


def test_benchmark_script_directory_mode(tiny, tmp_path):
    from tflite_tools import benchmark as bench_script

    out = tmp_path / "lat.csv"
    args = bench_script.get_args_parser().parse_args(
        ["--input", str(tiny["dir"]), "--warmup", "1", "--runs", "2", "--output", str(out), "--no_xnnpack"])
    bench_script.main(args)
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == LATENCY_HEADER
    row = dict(zip(rows[0], rows[1]))
    assert row["name"] == "tiny" and float(row["fp32_median_ms"]) > 0 and float(row["int8_median_ms"]) > 0


def test_missing_tflite_model_file(tmp_path):
    from tflite_tools import benchmark as bench_script

    line = ("onnxw,151122-023231,d1#1#2#2#2#2#2#1_k3#3#3#3#3#3#3#3#3#3#3#3#3_w16#16#32#32#64#64#112#112#144#144"
            "#240#240#320_e0#0.5#4.0#4.0#1.0#1.0#4.0#4.0#4.0#4.0#4.0#4.0#4.0_r160")
    p = tmp_path / "input.csv"
    p.write_text(line + "\n")
    args = bench_script.get_args_parser().parse_args(["--input", str(p), "--model_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"\.tflite not found \(for .*input.csv:1"):
        bench_script.main(args)
