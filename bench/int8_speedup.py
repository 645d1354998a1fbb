"""INT8 vs FP32 ONNX Runtime latency of the published SEQnet subnets, measured in the same run.

For each model (default SEQnet@vnni-A0 and SEQnet@pixel4-A0, ``data/search_results.yaml``):
``modules.supernet.build_subnet`` (random weights) -> ``modules.export.export_onnx`` (fp32, opset 17)
-> ``modules.export.quantize_onnx_int8`` in QDQ and in QOperator format (uint8 activations, int8
per-channel weights; calibration on random inputs, which does not change speed). The three files are
timed in interleaved rounds (1 thread by default): per round each file gets ``--runs`` timed runs
after a warm-up; the figure is the median over rounds of the per-round medians, on the thread's CPU
time (``--clock cpu``, robust on a shared machine) and on the wall clock. The INT8 graphs are
inspected (`onnx_tools.inspect_int8`): ops that stay in float between DQ/Q pairs are listed.

    python -m bench.int8_speedup                                  # both SEQnets, 1 thread
    python -m bench.int8_speedup --model SEQnet@vnni-A1 --rounds 7 --output checkpoints/reports/int8.csv

The original reports 7.85 ms -> 3.84 ms (2.04x) for SEQnet@vnni-A0 on its VNNI CPU; the goal here is
>= 2.0x for vnni-A0. The extra variant ``int8_qdq_fp32stem`` (first conv and stage0 kept in FP32) is an
experiment showing where INT8 loses, not the export recipe; ``int8_qdq_float_act`` is the QDQ model
quantized as exported (``int8_activations=False``: hardswish and SE gates left in float between DQ/Q), to
show what the rewrite into int8 ops (`modules.onnx_int8`) gains.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

DEFAULT_MODELS = ("SEQnet@vnni-A0", "SEQnet@pixel4-A0")
VARIANTS = ("fp32", "int8_qdq", "int8_qdq_float_act", "int8_qoperator", "int8_qdq_fp32stem")


def get_args_parser():
    p = argparse.ArgumentParser("FP32 vs INT8 ORT latency of published SEQnets", add_help=True)
    p.add_argument("--model", action="append", default=[], help=f"published subnet (default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (fp32, qdq, qoperator in each)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--output", default="./checkpoints/reports/int8_speedup.csv")
    p.add_argument("--model_dir", default=None, help="keep the exported models here (default: a temp dir)")
    return p


def export_variants(name: str, directory: str) -> dict[str, str]:
    from modules.export import RandomCalibrationWarning, export_onnx, quantize_onnx_int8
    from modules.named_models import get_named_model
    from modules.supernet import build_subnet

    m = get_named_model(name)
    net = build_subnet(m.supernet, m.subnet)
    stem = os.path.join(directory, name.replace("@", "_"))
    fp32 = export_onnx(net, net.resolution, f"{stem}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomCalibrationWarning)
        qdq = quantize_onnx_int8(fp32, f"{stem}_int8_qdq.onnx", None, fmt="qdq", num_random_calib=8)
        qop = quantize_onnx_int8(fp32, f"{stem}_int8_qoperator.onnx", None, fmt="qoperator", num_random_calib=8)
        flt = quantize_onnx_int8(fp32, f"{stem}_int8_qdq_float_act.onnx", None, fmt="qdq", num_random_calib=8,
                                 int8_activations=False)
    stem_fp32 = quantize_keep_stem_fp32(fp32, f"{stem}_int8_qdq_fp32stem.onnx")
    return {"fp32": fp32, "int8_qdq": qdq, "int8_qdq_float_act": flt, "int8_qoperator": qop,
            "int8_qdq_fp32stem": stem_fp32}


def quantize_keep_stem_fp32(fp32: str, out: str) -> str:
    """An experiment, not the export recipe: the settings of `modules.export.quantize_onnx_int8` (QDQ,
    uint8 activations, int8 per-channel weights, random calibration) with the first conv and stage0 left in
    FP32 (``nodes_to_exclude``): at 3-32 channels and high resolution, ORT's int8 convs are ~2x slower
    than its NCHWc FP32 convs (bench/block_report.py)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from modules.export import auto_reduce_range

    m = onnx.load(fp32, load_external_data=False)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    exclude = [n.name for n in m.graph.node if n.name.startswith(("/stages.0/", "/stages.1/"))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{m.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=auto_reduce_range(None), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return out


def _runner(path, threads):
    from modules.latency.sessions import ort_session

    sess = ort_session(path, threads)
    i = sess.get_inputs()[0]
    feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]
                                                              ).astype(np.float32)}
    return lambda: sess.run(None, feed)


def time_variants(paths: dict[str, str], threads: int, rounds: int, runs: int, warmup: int) -> dict[str, dict]:
    """Per variant: median over rounds of the per-round median, CPU (thread) and wall clock, in ms."""
    fns = {k: _runner(p, threads) for k, p in paths.items()}
    per = {k: {"cpu": [], "wall": []} for k in paths}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(warmup):
                fn()
            cpu, wall = [], []
            for _ in range(runs):
                w0, c0 = time.perf_counter(), time.thread_time()
                fn()
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - w0)
            per[k]["cpu"].append(np.median(cpu) * 1e3)
            per[k]["wall"].append(np.median(wall) * 1e3)
    return {k: {"cpu_ms": float(np.median(v["cpu"])), "wall_ms": float(np.median(v["wall"])),
                "cpu_spread": float(np.ptp(v["cpu"]) / np.median(v["cpu"]))} for k, v in per.items()}


def float_ops(path: str) -> str:
    from modules.inspect import inspect_onnx_int8

    total = inspect_onnx_int8(path, verbose=False)[-1]
    return f"{total['float_op_types'] or '-'} (int8 kernels {total['int8_kernels']}, Q/DQ {total['qdq_nodes']})"


def main(args):
    import torch

    torch.set_num_threads(1)
    models = args.model or list(DEFAULT_MODELS)
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model_dir or tmp
        os.makedirs(directory, exist_ok=True)
        for name in models:
            t0 = time.time()
            paths = export_variants(name, directory)
            res = time_variants(paths, args.threads, args.rounds, args.runs, args.warmup)
            fp = res["fp32"]
            print(f"\n{name}  (export+quantize+timing {time.time() - t0:.0f} s)")
            print(f"  {'variant':18s} {'cpu ms':>8s} {'wall ms':>8s} {'speedup(cpu)':>12s} {'speedup(wall)':>13s} "
                  f"{'round spread':>12s}")
            for k in VARIANTS:
                r = res[k]
                sc, sw = fp["cpu_ms"] / r["cpu_ms"], fp["wall_ms"] / r["wall_ms"]
                print(f"  {k:18s} {r['cpu_ms']:8.3f} {r['wall_ms']:8.3f} {sc:12.2f} {sw:13.2f} {100 * r['cpu_spread']:11.0f}%")
                rows.append({"model": name, "variant": k, "cpu_ms": f"{r['cpu_ms']:.4f}", "wall_ms": f"{r['wall_ms']:.4f}",
                             "speedup_cpu": f"{sc:.3f}", "speedup_wall": f"{sw:.3f}", "threads": args.threads,
                             "float_ops": float_ops(paths[k]) if k != "fp32" else ""})
            for k in VARIANTS[1:]:
                print(f"  {k} ops left in float: {float_ops(paths[k])}")
    load1 = os.getloadavg()[0]
    print(f"\nload average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores; CPU time is the thread's own "
          "compute time, wall includes waiting for a core")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
