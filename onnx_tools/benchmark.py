"""Measure FP32 and INT8 ONNX Runtime latency side by side and write latency.csv.

Models: the files ``onnx_tools/export_onnx.py`` wrote for an input.csv (``--input input.csv``, or
``--model`` / ``--encoding``; files looked up in ``--model_dir``), or every ``X.onnx`` /
``X_int8.onnx`` pair of a directory (``--input <dir>``). ORT CPUExecutionProvider, ORT_ENABLE_ALL,
sequential, ``--threads`` intra-op threads (default 1, as the original), random-normal input,
``--warmup`` untimed + ``--runs`` timed runs (100 + 100), each run timed with perf_counter.

latency.csv (with a header): ``name,fp32_median_ms,fp32_mean_ms,fp32_std_ms,int8_median_ms,
int8_mean_ms,int8_std_ms,speedup,threads,warmup,runs``; speedup = fp32 median / int8 median.
Latency on a shared machine is noisy: compare models measured in the same run.

Example::

    python -m onnx_tools.export_onnx --input onnx_tools/input.csv --skip_weights
    python -m onnx_tools.benchmark --input onnx_tools/input.csv --threads 1
    python onnx_tools/benchmark.py --input checkpoints/onnx_models --output latency.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python onnx_tools/benchmark.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import add_common_args, run_main  # noqa: E402

DEFAULT_MODEL_DIR = "./checkpoints/onnx_models"
HERE = Path(__file__).resolve().parent  # the tool's own input.csv lives here


def add_benchmark_args(p: argparse.ArgumentParser, default_model_dir: str, ext: str) -> None:
    p.add_argument("--input", default=None, help=f"input.csv of models, or a directory of *{ext} / *_int8{ext} files (default with no "
                   "--model / --encoding: input.csv beside the script)")
    p.add_argument("--model", action="append", default=[], help="published subnet name, e.g. SEQnet@vnni-A0")
    p.add_argument("--encoding", action="append", default=[], help="'<superspace>,<blocks>-<windows>,<subnet>'")
    p.add_argument("--model_dir", default=default_model_dir, help="where the exported files of input.csv entries "
                   "are (default: %(default)s)")
    p.add_argument("--output", default=None, help="latency.csv path (default: <model dir>/latency.csv)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=100, help="untimed runs first (default: %(default)s)")
    p.add_argument("--runs", type=int, default=100, help="timed runs (default: %(default)s)")


def get_args_parser():
    p = argparse.ArgumentParser("onnx benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p, DEFAULT_MODEL_DIR, ".onnx")
    add_common_args(p)
    return p


def main(args):
    from modules.benchmark import (benchmark_onnx, benchmark_pairs, format_latency_table, models_to_benchmark,
                                   write_latency_csv)

    from modules.export import tool_input

    source = tool_input(args.input, args.model, args.encoding, HERE)
    pairs, out_dir = models_to_benchmark(source, args.model_dir, ".onnx", args.model, args.encoding)
    rows = benchmark_pairs(pairs, benchmark_onnx, threads=args.threads, warmup=args.warmup, runs=args.runs,
                           seed=args.seed)
    out = write_latency_csv(args.output or out_dir / "latency.csv", rows)
    print(format_latency_table(rows))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    run_main(main, get_args_parser())
