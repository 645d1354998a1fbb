"""Measure fp32 and int8 ``.tflite`` latency with the LiteRT interpreter and write latency.csv.

Models: the files ``tflite_tools/export_tflite.py`` wrote for an input.csv (``--input input.csv``,
``--model`` / ``--encoding``; looked up in ``--model_dir``) or every ``X.tflite`` / ``X_int8.tflite``
pair of a directory (``--input <dir>``). ``--threads`` interpreter threads (default 1), XNNPACK on by
default (``--no_xnnpack``: builtin kernels only, as the original phone runs; 3-5x slower on x86),
``--warmup`` + ``--runs`` (100 + 100), random input, median reported. Same latency.csv header as
``onnx_tools/benchmark.py``. For phones see tflite_tools/README.md (adb + ``benchmark_model``).

Example::

    python -m tflite_tools.benchmark --model SEQnet@pixel4-A0 --threads 1
    python tflite_tools/benchmark.py --input checkpoints/tflite_models --no_xnnpack --output latency_ref.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tflite_tools/benchmark.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import add_common_args, run_main  # noqa: E402
from onnx_tools.benchmark import add_benchmark_args  # noqa: E402

DEFAULT_MODEL_DIR = "./checkpoints/tflite_models"
HERE = Path(__file__).resolve().parent  # the tool's own input.csv lives here


def get_args_parser():
    p = argparse.ArgumentParser("tflite benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p, DEFAULT_MODEL_DIR, ".tflite")
    p.add_argument("--no_xnnpack", action="store_true", help="builtin kernels without the XNNPACK delegate")
    add_common_args(p)
    return p


def main(args):
    from modules.benchmark import (benchmark_pairs, benchmark_tflite, format_latency_table, models_to_benchmark,
                                   write_latency_csv)

    from modules.export import tool_input

    source = tool_input(args.input, args.model, args.encoding, HERE)
    pairs, out_dir = models_to_benchmark(source, args.model_dir, ".tflite", args.model, args.encoding)
    rows = benchmark_pairs(pairs, benchmark_tflite, threads=args.threads, warmup=args.warmup, runs=args.runs,
                           use_xnnpack=not args.no_xnnpack, seed=args.seed)
    out = write_latency_csv(args.output or out_dir / "latency.csv", rows)
    print(format_latency_table(rows))
    print(f"wrote {out} (XNNPACK {'off' if args.no_xnnpack else 'on'})")
    return rows


if __name__ == "__main__":
    run_main(main, get_args_parser())
