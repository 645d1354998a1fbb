"""Which ops of a quantized ONNX model really run in int8 after ONNX Runtime's graph optimisation.

ONNX Runtime fuses ``DequantizeLinear → op → QuantizeLinear`` into an int8 kernel (QLinearConv,
QLinearAdd, QGemm, ...) only for the ops it has kernels for; any other op (HardSigmoid, HardSwish,
Mul of an SE gate, Sigmoid, ...) keeps its DQ/Q pair and runs in float, which can make the INT8
model slower than FP32. This tool loads the model at ORT_ENABLE_ALL, saves the optimised graph
(``optimized_model_filepath``), follows tensor types through it (float / quantized) and counts, per
block (node-name prefix), int8 kernels, float compute ops and Q/DQ nodes.

Example::

    python -m onnx_tools.inspect_int8 checkpoints/onnx_models/onnxw-151122-023231-1a2b3c4d_int8.onnx \
        --output checkpoints/onnx_models/inspect.csv
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python onnx_tools/inspect_int8.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.checkpoint import atomic_write_text  # noqa: E402
from modules.inspect import inspect_onnx_int8  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("Inspect int8 vs float ops of ONNX models after ORT optimisation", add_help=True)
    p.add_argument("models", nargs="+", help=".onnx files (or directories: every *_int8.onnx inside)")
    p.add_argument("--group_depth", type=int, default=None,
                   help="leading node-name components that name a block (default: up to blocks.N / layers.N, "
                        "else the first indexed one, e.g. features/features.3)")
    p.add_argument("--output", default=None, help="CSV file for all rows (default: print only)")
    p.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    return p


def main(args):
    paths = []
    for m in args.models:
        m = Path(m)
        if m.is_dir():
            found = sorted(m.glob("*_int8.onnx"))
            if not found:
                raise FileNotFoundError(f"no *_int8.onnx files in {m}")
            paths += found
        elif m.is_file():
            paths.append(m)
        else:
            raise FileNotFoundError(f"ONNX model {m} not found")
    rows = []
    for p in paths:
        rows += inspect_onnx_int8(p, args.group_depth)
    if args.output:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        print(f"wrote {atomic_write_text(args.output, buf.getvalue())}")
    return rows


if __name__ == "__main__":
    from modules.cli import run_main

    run_main(main, get_args_parser())
