"""The latency predictor: a subnet's latency is the sum of its blocks' latencies (the measured table, else the
regression fallback) with a whole-model correction fitted per superspace::

    predicted = a * sum_i block_i + b

The table (``<table_dir>/<platform>.json``, atomic writes) is filled by a runner (`modules.latency.local`,
`modules.latency.remote`) or imported from a CSV (`modules.latency.csv_import`); the predictor does not care
which.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np

from modules.latency.graph import block_mmacs
from modules.latency.keys import MEASURED_PLATFORMS, PLATFORMS, block_key, parse_block_key
from modules.latency.local import LocalRunner
from modules.latency.sessions import device_info
from modules.latency.regression import BlockRegressor, cross_fitted
from modules.latency.sampling import subnet_block_configs
from modules.latency.timing import MeasureConfig

TABLE_VERSION = 2
ESTIMATES = ("table", "smoothed")
DEFAULT_TABLE_DIR = os.path.join("checkpoints", "latency")
BUILD_HINT = "build it with: python build_latency_table.py --superspace <name> --platform {platform} --output_dir <dir>"
_SAVE_EVERY = 25  # table entries between atomic saves while measuring on demand


class LatencyPredictor:
    """Sum of per-block latencies (measured table, regression fallback) with a linear whole-model correction.

    Table file (JSON, atomic writes): ``platform``, ``threads``, ``overhead_ms`` (session-call overhead,
    already subtracted from every entry), ``blocks`` {block key: ms inside a network}, ``corrections``
    {superspace or "*" (+ "@smoothed"): [a, b]}, ``calibration`` (the whole models behind the corrections),
    ``device``, ``smoothed`` and ``estimate`` (below).

    ``estimate``: what a block in the table counts for. ``"table"``: its measurement. ``"smoothed"``: its
    out-of-fold regression prediction (:func:`regression.cross_fitted`, stored as ``smoothed`` by
    :meth:`smooth`), which averages away the noise of single block measurements on a busy machine. Each
    estimate has its own correction; blocks outside the table use the regression either way.
    """

    def __init__(self, platform: str, table_path: str | None = None, threads: int | None = None,
                 warmup: int = 3, runs: int = 15, measure_missing: bool = False, superspace: str | None = None,
                 fallback: str = "regression", min_time: float = 0.04, quant_format: str | None = None,
                 clock: str | None = None, stat: str | None = None, workdir: str | None = None, runner=None,
                 estimate: str | None = None):
        if platform not in PLATFORMS:
            raise ValueError(f"latency platform {platform!r}; allowed: {', '.join(PLATFORMS)}")
        if fallback not in ("regression", "error"):
            raise ValueError(f"fallback {fallback!r}: use 'regression' or 'error'")
        if estimate not in (None,) + ESTIMATES:
            raise ValueError(f"estimate {estimate!r}: use one of {', '.join(ESTIMATES)}")
        self.platform, self.superspace = platform, superspace
        # measurement settings: explicit argument > the table's > default; explicit vs table conflict = error
        self._explicit = {k: v for k, v in dict(threads=threads, quant_format=quant_format, clock=clock,
                                                  stat=stat).items() if v is not None}
        self.mc = MeasureConfig(min_runs=runs, warmup=warmup, min_time=min_time, **self._explicit)
        self.table_path = Path(table_path) if table_path else None
        self.measure_missing, self.fallback, self.workdir = measure_missing, fallback, workdir
        self.runner = runner or LocalRunner(workdir)  # fills the table: this process, or a device
        self.batch_size = self.runner.batch_size  # blocks measured (and saved) together
        self.table: dict[str, float] = {}
        self.raw: dict[str, float] = {}  # raw standalone times (overhead included), for reports
        self.overhead_ms: float | None = 0.0 if platform == "macs" else None
        self.corrections: dict[str, tuple[float, float]] = {}
        self.calibration: list[dict] = []
        self.device: dict = {}
        self.smoothed: dict[str, float] = {}
        self._explicit_estimate = estimate
        self.estimate = estimate or "table"
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
    def _correction_key(self, superspace: str | None) -> str:
        return (superspace or "*") + ("@smoothed" if self.estimate == "smoothed" else "")

    @property
    def correction(self) -> tuple[float, float]:
        """(a, b) for this predictor's superspace and estimate (else the generic "*" fit, else (1, 0))."""
        return self.corrections.get(self._correction_key(self.superspace),
                                    self.corrections.get(self._correction_key(None), (1.0, 0.0)))

    @correction.setter
    def correction(self, ab) -> None:
        self.corrections[self._correction_key(self.superspace)] = (float(ab[0]), float(ab[1]))

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
            smoothed = {str(k): float(v) for k, v in data.get("smoothed", {}).items()}
            estimate = str(data.get("estimate", "table"))
            if estimate not in ESTIMATES:
                raise ValueError(f"estimate {estimate!r}")
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
        self.smoothed, self.estimate = smoothed, self._explicit_estimate or estimate
        here = device_info().get("cpu")
        local = self.device.get("runner", "local") == "local"
        if local and self.device.get("cpu") and here and self.device["cpu"] != here:
            warnings.warn(f"latency table {path} was measured on {self.device['cpu']!r}, this CPU is {here!r}")

    def save(self) -> None:
        if self.table_path is None:
            return
        from modules.checkpoint import atomic_write_text

        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": TABLE_VERSION, "platform": self.platform, "threads": self.threads,
                "quant_format": self.mc.quant_format, "clock": self.mc.clock, "stat": self.mc.stat,
                "device": self.device or self.runner.describe(),
                "overhead_ms": self.overhead_ms,
                "corrections": {k: list(v) for k, v in sorted(self.corrections.items())},
                "calibration": self.calibration, "estimate": self.estimate,
                "smoothed": dict(sorted(self.smoothed.items())),
                "blocks": dict(sorted(self.table.items())), "raw": dict(sorted(self.raw.items()))}
        atomic_write_text(self.table_path, json.dumps(data, indent=0))
        self._unsaved = 0

    # ------------------------------------------------------------------ measuring
    def ensure_overhead(self) -> float:
        if self.overhead_ms is None:
            self.check_runner()
            measured = self.platform in MEASURED_PLATFORMS
            self.overhead_ms = self.runner.overhead(self.platform, self.mc) if measured else 0.0
        return self.overhead_ms

    def check_runner(self) -> None:
        """A table holds the times of one device: adding to it with another runner, or another phone or host,
        would mix two devices' latencies."""
        if not self.device:
            self.device = self.runner.describe()
            return
        here = self.runner.describe()
        for k in ("runner", "target"):
            was, now = self.device.get(k, "local" if k == "runner" else None), here.get(k)
            if was != now:
                raise ValueError(f"latency table {self.table_path} was measured with {k} {was!r}, not {now!r}; "
                                 "use another --output_dir for another device")

    def measure(self, cfg: dict) -> float:
        """Measure one block now, store it in the table (saved every few entries) and return its latency."""
        self._measure_batch([cfg])
        return self.table[block_key(cfg)]

    def _measure_batch(self, cfgs: list[dict]) -> None:
        """Time the standalone models of `cfgs` with the runner and store them."""
        if self.platform not in MEASURED_PLATFORMS:
            raise ValueError(f"platform {self.platform!r} is not measured")
        self.check_runner()
        overhead = self.ensure_overhead()
        stats = self.runner.time_blocks(cfgs, self.platform, self.mc, seed=len(self.table))
        self.add_entries({k: max(ms - overhead, 0.0) for k, ms in stats.items()}, stats)
        self.stats["measured"] += len(stats)
        self._unsaved += len(stats)
        if self._unsaved >= _SAVE_EVERY:
            self.save()

    def smooth(self) -> None:
        """Compute the ``smoothed`` estimate of every table entry (:func:`regression.cross_fitted`)."""
        keys = sorted(self.table)
        vals = cross_fitted([parse_block_key(k) for k in keys], [self.table[k] for k in keys])
        self.smoothed = {k: float(v) for k, v in zip(keys, vals)}
        self._cache.clear()
        self._subnet_cache.clear()

    def set_estimate(self, estimate: str) -> None:
        """Use `estimate` for table blocks from now on (and its correction)."""
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate {estimate!r}: use one of {', '.join(ESTIMATES)}")
        self.estimate = estimate
        self._cache.clear()
        self._subnet_cache.clear()

    def add_entries(self, latencies: dict[str, float], raw: dict[str, float] | None = None) -> None:
        """Store block latencies (ms inside a network; `raw`: the standalone times they come from, default the
        same) in the table (saved by :meth:`save`)."""
        for k in latencies:
            parse_block_key(k)
        self.table.update(latencies)
        self.raw.update(latencies if raw is None else raw)
        self._regressor = None
        self._cache.clear()  # regression predictions may change with the new entries
        self._subnet_cache.clear()

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
            if self.estimate == "smoothed" and key in self.smoothed:
                return self.smoothed[key]
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
                self.save()  # a device that disconnects loses at most the batch it was timing
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
        self.corrections[self._correction_key(key)] = (float(a), float(b))
        if self._correction_key(None) not in self.corrections:
            self.corrections[self._correction_key(None)] = (float(a), float(b))
        if models is not None:
            self.calibration = [m for m in self.calibration if m.get("superspace") != key] + \
                               [dict(m, superspace=key) for m in models]
        self.save()
        return self.corrections[self._correction_key(key)]


def table_path(platform: str, table_dir: str | os.PathLike | None = None) -> Path:
    return Path(table_dir or DEFAULT_TABLE_DIR) / f"{platform}.json"


def load_predictor(platform: str, superspace: str | None = None, table_dir: str | None = None,
                   **kwargs) -> LatencyPredictor:
    """The predictor of `platform`; measured tables live in ``<table_dir>/<platform>.json`` (default
    ``checkpoints/latency``), built by ``build_latency_table.py``. The correction fitted for `superspace`
    is used when the table has one. A missing table is a FileNotFoundError unless
    ``measure_missing=True`` (then blocks are measured on first use)."""
    if platform not in PLATFORMS:
        raise ValueError(f"latency platform {platform!r}; allowed: {', '.join(PLATFORMS)}")
    if platform == "macs":
        return LatencyPredictor("macs", None, superspace=superspace)
    path = table_path(platform, table_dir)
    if not path.is_file() and not kwargs.get("measure_missing", False):
        raise FileNotFoundError(f"latency table {path} not found; "
                                + BUILD_HINT.format(platform=platform).replace("<name>", superspace or "<name>"))
    return LatencyPredictor(platform, str(path), superspace=superspace, **kwargs)
