"""Latency measurement and inference runners for exported ONNX / TFLite models.

* :func:`benchmark_onnx`: ONNX Runtime CPUExecutionProvider, ORT_ENABLE_ALL, sequential execution,
  ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, random-normal input of the model's
  input shape, `warmup` untimed runs then `runs` runs each timed with ``time.perf_counter``.
* :func:`benchmark_tflite`: the LiteRT interpreter (``ai_edge_litert.interpreter``) with XNNPACK
  (default) or the plain builtin kernels (``use_xnnpack=False``).
* Both return ``dict(median, mean, std, min, runs, warmup, threads, ...)`` with times in **ms**;
  the median is the figure to report.
* :func:`run_onnx` / :func:`run_tflite`: outputs for a batch of inputs on fixed-batch-1 models
  (int8 TFLite input/output tensors are (de)quantized with their scale and zero point).
* latency.csv rows: :data:`LATENCY_HEADER`, :func:`latency_row`, :func:`write_latency_csv`,
  :func:`pair_model_files` (``X.onnx`` + ``X_int8.onnx`` in a directory → one row).

Example::

    from modules.benchmark import benchmark_onnx
    print(benchmark_onnx("m_int8.onnx", threads=1, warmup=100, runs=100)["median"])
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from modules.latency.sessions import ORT_DTYPES, ort_session, random_input, tflite_interpreter

__all__ = ["LATENCY_HEADER", "summarize_times", "benchmark_onnx", "benchmark_tflite", "run_onnx", "run_tflite", "latency_row", "write_latency_csv", "pair_model_files",
           "entry_model_files", "models_to_benchmark", "benchmark_pairs", "format_latency_table"]

LATENCY_HEADER = ["name", "fp32_median_ms", "fp32_mean_ms", "fp32_std_ms", "int8_median_ms", "int8_mean_ms",
                  "int8_std_ms", "speedup", "threads", "warmup", "runs"]



def _check_counts(threads: int, warmup: int, runs: int) -> None:
    if threads < 1 or warmup < 0 or runs < 1:
        raise ValueError(f"need threads >= 1, warmup >= 0, runs >= 1 (got {threads}, {warmup}, {runs})")


def _require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    return path


def summarize_times(times_s, threads: int, warmup: int) -> dict:
    """Per-run times in seconds → dict of ms statistics (median, mean, std (population), min)."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    return {"median": float(np.median(t)), "mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()),
            "runs": int(t.size), "warmup": int(warmup), "threads": int(threads)}


def _time_calls(fn: Callable[[], object], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- ONNX Runtime
def _ort_input(sess, rng):
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"expected a model with one input, got {[i.name for i in inputs]}")
    i = inputs[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]  # symbolic batch → 1
    return i.name, random_input(shape, ORT_DTYPES.get(i.type, np.float32), rng)


def benchmark_onnx(path, threads: int = 1, warmup: int = 100, runs: int = 100, seed: int = 0) -> dict:
    """Median/mean/std latency (ms) of one ONNX model with ONNX Runtime on the CPU."""
    _check_counts(threads, warmup, runs)
    sess = ort_session(path, threads)
    name, x = _ort_input(sess, np.random.default_rng(seed))
    feed = {name: x}
    out = summarize_times(_time_calls(lambda: sess.run(None, feed), warmup, runs), threads, warmup)
    out["backend"] = "onnxruntime"
    return out


def run_onnx(path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """First output of an ONNX model for each sample of `x` ([N,...]), run one sample at a time."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


# ----------------------------------------------------------------------------- LiteRT
def benchmark_tflite(path, threads: int = 1, warmup: int = 100, runs: int = 100, use_xnnpack: bool = True,
                     seed: int = 0) -> dict:
    """Median/mean/std latency (ms) of one .tflite model with the LiteRT interpreter."""
    _check_counts(threads, warmup, runs)
    it = tflite_interpreter(path, threads, use_xnnpack)
    rng = np.random.default_rng(seed)
    for d in it.get_input_details():
        it.set_tensor(d["index"], random_input(tuple(d["shape"]), d["dtype"], rng))
    out = summarize_times(_time_calls(it.invoke, warmup, runs), threads, warmup)
    out.update(backend="litert", use_xnnpack=bool(use_xnnpack))
    return out


def run_tflite(path, x: np.ndarray, threads: int = 1, use_xnnpack: bool = True) -> np.ndarray:
    """First output (float32) of a .tflite model for each sample of `x` ([N,...], float32), one at a
    time; int8/uint8 input and output tensors are (de)quantized with their (scale, zero point)."""
    it = tflite_interpreter(path, threads, use_xnnpack)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    x = np.asarray(x, dtype=np.float32)
    outs = []
    for k in range(len(x)):
        xi = x[k:k + 1]
        if tuple(xi.shape) != tuple(i["shape"]):
            raise ValueError(f"{path}: input shape {tuple(i['shape'])}, got {tuple(xi.shape)}")
        if i["dtype"] != np.float32:
            s, z = i["quantization"]
            info = np.iinfo(i["dtype"])
            xi = np.clip(np.round(xi / s) + z, info.min, info.max).astype(i["dtype"])
        it.set_tensor(i["index"], xi)
        it.invoke()
        y = it.get_tensor(o["index"])
        if o["dtype"] != np.float32:
            s, z = o["quantization"]
            y = (y.astype(np.float32) - z) * s
        outs.append(np.array(y, dtype=np.float32))
    return np.concatenate(outs)


# ----------------------------------------------------------------------------- latency.csv
def latency_row(name: str, fp32: dict | None, int8: dict | None, threads: int, warmup: int, runs: int) -> dict:
    """One latency.csv row (missing side → empty cells; speedup = fp32 median / int8 median)."""
    def cell(d, k):
        return "" if d is None else f"{d[k]:.4f}"

    speedup = f"{fp32['median'] / int8['median']:.3f}" if fp32 and int8 and int8["median"] > 0 else ""
    return {"name": name, "fp32_median_ms": cell(fp32, "median"), "fp32_mean_ms": cell(fp32, "mean"),
            "fp32_std_ms": cell(fp32, "std"), "int8_median_ms": cell(int8, "median"),
            "int8_mean_ms": cell(int8, "mean"), "int8_std_ms": cell(int8, "std"), "speedup": speedup,
            "threads": threads, "warmup": warmup, "runs": runs}


def write_latency_csv(path, rows: list[dict]) -> str:
    """Write rows under :data:`LATENCY_HEADER` (atomic replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LATENCY_HEADER, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(buf.getvalue())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return str(path)


def pair_model_files(directory, ext: str = ".onnx") -> list[tuple[str, Path | None, Path | None]]:
    """(name, fp32 file, int8 file) for each model of a directory: ``X{ext}`` and ``X_int8{ext}``
    make one pair named X; a file without its partner has None on the other side."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} not found")
    pairs: dict[str, list] = {}
    for p in sorted(directory.glob(f"*{ext}")):
        stem = p.name[: -len(ext)]
        if stem.endswith("_int8"):
            pairs.setdefault(stem[: -len("_int8")], [None, None])[1] = p
        else:
            pairs.setdefault(stem, [None, None])[0] = p
    if not pairs:
        raise FileNotFoundError(f"no *{ext} files in {directory}")
    return [(k, v[0], v[1]) for k, v in sorted(pairs.items())]


def entry_model_files(entries, model_dir, ext: str = ".onnx") -> list[tuple[str, Path, Path]]:
    """(name, fp32 file, int8 file) of input.csv entries (:class:`modules.export.InputEntry`), files
    ``<model_dir>/<stem>{ext}`` and ``<stem>_int8{ext}``; a missing file is a FileNotFoundError naming
    it and the input line it comes from."""
    model_dir = Path(model_dir)
    out = []
    for e in entries:
        fp32, int8 = model_dir / f"{e.stem}{ext}", model_dir / f"{e.stem}_int8{ext}"
        for f in (fp32, int8):
            if not f.is_file():
                where = f"{e.source}:{e.lineno}" if e.lineno else e.source
                script = "onnx_tools/export_onnx.py" if ext == ".onnx" else "tflite_tools/export_tflite.py"
                raise FileNotFoundError(f"model file {f} not found (for {where}: {e.name}); export it first ({script})")
        out.append((e.name, fp32, int8))
    return out


def models_to_benchmark(input_path, model_dir, ext: str, models=(), encodings=()):
    """Resolve a benchmark script's inputs: an input.csv (+ --model / --encoding entries, files in
    `model_dir`) or a directory of model files. Returns (pairs, default output dir)."""
    from modules.export import collect_entries

    if input_path is not None and Path(input_path).is_dir():
        if models or encodings:
            raise ValueError("give either a model directory or input.csv / --model / --encoding entries, not both")
        return pair_model_files(input_path, ext), Path(input_path)
    if input_path is None and not models and not encodings:
        raise ValueError("nothing to benchmark: give --input (an input.csv or a directory of models), --model or "
                         "--encoding")
    entries = collect_entries(input_path, models, encodings)
    return entry_model_files(entries, model_dir, ext), Path(model_dir)


def benchmark_pairs(pairs, bench: Callable[..., dict], threads: int = 1, warmup: int = 100, runs: int = 100,
                    log: Callable[[str], None] | None = print, **kw) -> list[dict]:
    """latency.csv rows for (name, fp32 file | None, int8 file | None) pairs, FP32 and INT8 of a model
    measured one after the other in the same run."""
    rows = []
    for i, (name, fp32, int8) in enumerate(pairs, 1):
        r32 = bench(fp32, threads=threads, warmup=warmup, runs=runs, **kw) if fp32 else None
        r8 = bench(int8, threads=threads, warmup=warmup, runs=runs, **kw) if int8 else None
        row = latency_row(name, r32, r8, threads, warmup, runs)
        rows.append(row)
        if log:
            log(f"[{i}/{len(pairs)}] {name[:80]}: fp32 {row['fp32_median_ms'] or '-'} ms, "
                f"int8 {row['int8_median_ms'] or '-'} ms, speedup {row['speedup'] or '-'}")
    return rows


def format_latency_table(rows: list[dict]) -> str:
    cols = ["name", "fp32_median_ms", "int8_median_ms", "speedup", "threads"]
    cells = [[str(r[c]) if c != "name" or len(str(r[c])) <= 60 else str(r[c])[:57] + "..." for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
