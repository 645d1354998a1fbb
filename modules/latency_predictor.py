"""Block-wise latency predictor measured on the device at hand (reference spec §11.1 replaced).

The original called nn-Meter predictors downloaded for a Pixel 4 or a VNNI CPU. Here the latency of
every distinct block configuration (block type, kernel, expand, cin, cout, stride, input size,
activation, SE) is *measured* on this machine, as a standalone ONNX Runtime or LiteRT model at
batch 1, in FP32 or INT8, and cached in a JSON table (`<table_dir>/<platform>.json`, written
atomically every few entries, so an interrupted build resumes). A subnet's latency is the sum of its
blocks, corrected by a linear fit `a * sum + b` against whole models measured once
(`calibrate(...)`), because a block measured alone pays costs a whole network does not: the session
call overhead and, in INT8, the quantize/dequantize at the block's input and output, which a whole
network fuses away between blocks.

Platforms: `ort_int8`, `ort_fp32`, `tflite_int8`, `tflite_fp32` (measured), `macs` (MMACs / 100: a
proxy for tests, not a latency), `nn_meter` (optional adapter; needs nn-meter and its predictor files).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from modules.blocks import build_block
from modules.checkpoint import atomic_write_text
from modules.superspace import BlockSpec

MEASURED_PLATFORMS = ("ort_int8", "ort_fp32", "tflite_int8", "tflite_fp32")
PLATFORMS = MEASURED_PLATFORMS + ("macs", "nn_meter")


def block_key(cfg: dict) -> str:
    """`name_hw_cin_cout_k_e_stride_act_se`: one key per distinct block configuration."""
    e = "None" if cfg["expand"] is None else f"{float(cfg['expand']):g}"
    return (f"{cfg['name']}_{cfg['hw']}_{cfg['cin']}_{cfg['cout']}_{cfg['kernel']}_{e}_{cfg['stride']}"
            f"_{cfg['act']}_{int(bool(cfg['se']))}")


def build_block_module(cfg: dict) -> torch.nn.Module:
    """A static, eval-mode module of one block configuration (random weights: latency only)."""
    spec = BlockSpec(cfg["name"], (cfg["kernel"],), (cfg["expand"],), cfg["act"], bool(cfg["se"]))
    block = build_block(spec, (cfg["cin"],), (cfg["cout"],), cfg["stride"])
    return block.eval()


def _block_input_shape(cfg: dict) -> tuple[int, int, int, int]:
    return (1, cfg["cin"], cfg["hw"], cfg["hw"])


def measure_block(cfg: dict, platform: str, threads: int = 1, warmup: int = 20, runs: int = 50,
                  workdir: str | None = None) -> float:
    """Median latency in ms of one block as a standalone model on `platform`."""
    from modules import benchmark, export

    module = build_block_module(cfg)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        shape = _block_input_shape(cfg)
        if platform.startswith("ort"):
            path = export.export_onnx(module, shape[2], os.path.join(tmp, "b.onnx"), in_channels=shape[1])
            if platform == "ort_int8":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # random calibration is fine for latency
                    path = export.quantize_onnx_int8(path, os.path.join(tmp, "b_int8.onnx"), None)
            return benchmark.benchmark_onnx(path, threads=threads, warmup=warmup, runs=runs)["median"]
        int8 = platform == "tflite_int8"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export.export_tflite(module, shape[2], os.path.join(tmp, "b.tflite"), int8=int8,
                                        in_channels=shape[1])
        return benchmark.benchmark_tflite(path, threads=threads, warmup=warmup, runs=runs)["median"]


class LatencyPredictor:
    """Sum of per-block latencies looked up in a measured table, with a linear whole-model correction."""

    def __init__(self, platform: str, table_path: str | None = None, threads: int = 1, warmup: int = 20,
                 runs: int = 50, measure_missing: bool = True):
        if platform not in PLATFORMS:
            raise ValueError(f"latency platform {platform!r}; allowed: {', '.join(PLATFORMS)}")
        self.platform, self.threads, self.warmup, self.runs = platform, threads, warmup, runs
        self.table_path = Path(table_path) if table_path else None
        self.measure_missing = measure_missing
        self.table: dict[str, float] = {}
        self.correction = (1.0, 0.0)  # latency = a * sum(blocks) + b
        self._unsaved = 0
        if self.table_path is not None and self.table_path.is_file():
            self._load()

    # ------------------------------------------------------------------ table I/O
    def _load(self) -> None:
        try:
            data = json.loads(self.table_path.read_text())
            self.table = {str(k): float(v) for k, v in data["blocks"].items()}
            self.correction = tuple(float(v) for v in data.get("correction", (1.0, 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"latency table {self.table_path} is corrupted ({e}); delete it to re-measure") from None
        if data.get("platform") != self.platform:
            raise ValueError(f"latency table {self.table_path} is for {data.get('platform')!r}, not {self.platform!r}")

    def save(self) -> None:
        if self.table_path is None:
            return
        atomic_write_text(self.table_path, json.dumps(
            {"platform": self.platform, "threads": self.threads, "correction": list(self.correction),
             "blocks": dict(sorted(self.table.items()))}, indent=0))
        self._unsaved = 0

    # ------------------------------------------------------------------ prediction
    def block_latency(self, cfg: dict) -> float:
        if self.platform == "macs":
            return _block_mmacs(cfg) / 100.0
        if self.platform == "nn_meter":
            raise ValueError("nn_meter platform: use NNMeterPredictor")
        key = block_key(cfg)
        if key not in self.table:
            if not self.measure_missing:
                raise ValueError(f"block {key} is not in the latency table {self.table_path}; build it first")
            self.table[key] = measure_block(cfg, self.platform, self.threads, self.warmup, self.runs)
            self._unsaved += 1
            if self._unsaved >= 20:
                self.save()
        return self.table[key]

    def predict_blocks(self, block_configs: list[dict]) -> float:
        total = sum(self.block_latency(c) for c in block_configs)
        a, b = self.correction
        return a * total + b

    def predict_subnet(self, net) -> float:
        """Predicted latency (ms) of the active subnet of `net` (a SuperNet or a standalone subnet)."""
        return self.predict_blocks(net.block_configs())

    def build(self, block_config_lists, desc: str = "measuring blocks") -> int:
        """Measure every block of every config list not yet in the table (resumable). Returns #new."""
        from tqdm import tqdm

        todo = {}
        for cfgs in block_config_lists:
            for c in cfgs:
                k = block_key(c)
                if k not in self.table:
                    todo[k] = c
        for c in tqdm(list(todo.values()), desc=desc, disable=not todo):
            self.block_latency(c)
        self.save()
        return len(todo)

    def calibrate(self, block_config_lists, measured_ms) -> tuple[float, float]:
        """Fit latency = a * sum(blocks) + b on whole models measured on the same platform."""
        sums = np.array([sum(self.block_latency(c) for c in cfgs) for cfgs in block_config_lists])
        y = np.asarray(measured_ms, dtype=float)
        if len(y) < 2:
            raise ValueError("calibration needs at least two measured models")
        a, b = np.polyfit(sums, y, 1)
        self.correction = (float(a), float(b))
        self.save()
        return self.correction


def _block_mmacs(cfg: dict) -> float:
    from modules.counter import count_macs

    key = block_key(cfg)
    if key not in _MACS_CACHE:
        _MACS_CACHE[key] = count_macs(build_block_module(cfg), _block_input_shape(cfg)) / 1e6
    return _MACS_CACHE[key]


_MACS_CACHE: dict[str, float] = {}


class NNMeterPredictor:
    """Adapter to nn-Meter block predictors, only when nn-meter and its predictor files are installed."""

    def __init__(self, predictor_name: str, predictor_version: float | None = None):
        try:
            from nn_meter import load_latency_predictor
        except ImportError:
            raise ImportError("the nn_meter platform needs nn-meter (pip install nn-meter) and its predictor files "
                              "registered locally (nn-meter register ...); it cannot download them here") from None
        try:
            self.predictor = load_latency_predictor(predictor_name, predictor_version)
        except Exception as e:  # nn-meter raises bare Exceptions and tries to download missing files
            raise ValueError(f"nn-meter predictor {predictor_name!r} is not available locally ({e})") from None

    def predict_blocks(self, block_configs: list[dict]) -> float:
        return float(sum(self.predictor.predict(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c,
                                                model_type="block") for c in block_configs))

    def predict_subnet(self, net) -> float:
        return self.predict_blocks(net.block_configs())


def load_predictor(platform: str, superspace: str | None = None, table_dir: str | None = None,
                   **kwargs) -> LatencyPredictor:
    """The predictor of `platform`; measured tables live in `<table_dir>/<platform>.json`."""
    if platform == "nn_meter":
        return NNMeterPredictor(kwargs.pop("predictor_name", "tflite27_cpu_int8"))
    table = None if table_dir is None or platform == "macs" else os.path.join(table_dir, f"{platform}.json")
    return LatencyPredictor(platform, table, **kwargs)
