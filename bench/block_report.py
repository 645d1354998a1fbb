"""Per-block INT8 report (the analogue of Vitis AI's inspector): for every block type of the
superspaces at typical shapes, FP32 and INT8 ONNX Runtime latency, their ratio, and which ops stay in
float (DequantizeLinear -> op -> QuantizeLinear left in the optimised graph, `onnx_tools.inspect_int8`).

Shapes: for each searchable stage (stage1..6) of a superspace at `--resolution`, a stride-1 block with
cin = cout = the middle width of the stage, the smallest kernel and the middle expand ratio; plus the
fixed blocks (first conv, stage0, head). Each block is the standalone model of the latency predictor
(`modules.latency.models.block_model_bytes`: the graph torch exports; INT8 = ORT static
quantization, uint8 activations, int8 per-channel weights, block-boundary Q/DQ cut as inside a
network). FP32 and INT8 are timed in interleaved rounds on the thread's CPU time (1 thread), so the
ratio is robust on a shared machine.

    python -m bench.block_report                                   # mobilew + onnxw at 224 px
    python -m bench.block_report --superspace onnxw --resolution 160 --output_dir checkpoints/reports

With ``--table_dir DIR`` nothing is timed here: the FP32 and INT8 latency of each block come from the
latency tables ``DIR/<runtime>_fp32.json`` and ``DIR/<runtime>_int8.json`` (table entry, else the
regression), whichever runner filled them (this machine, a phone over adb, a host over ssh, a CSV):

    python -m bench.block_report --table_dir checkpoints/pixel4/latency --runtime tflite --superspace mobilew

Writes ``<output_dir>/block_report.csv`` and ``<output_dir>/block_report.png``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("FP32 vs INT8 latency and float ops per block type", add_help=True)
    p.add_argument("--superspace", action="append", default=[], help="default: mobilew and onnxw")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="interleaved FP32/INT8 rounds per block")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model and round (at least)")
    p.add_argument("--min_time", type=float, default=0.01, help="measured seconds per model and round (at least)")
    p.add_argument("--quant_format", default="qdq", choices=("qdq", "qoperator"))
    p.add_argument("--output_dir", default="./checkpoints/reports")
    p.add_argument("--table_dir", default=None, help="read FP32 / INT8 block latencies from these latency tables")
    p.add_argument("--runtime", default="ort", choices=("ort", "tflite"), help="with --table_dir: whose tables")
    return p


def typical_blocks(superspace: str, resolution: int) -> list[tuple[str, dict]]:
    """(stage, block config) at typical shapes: see the module doc."""
    import math

    from modules.superspace import SEARCHABLE, get_superspace

    space = get_superspace(superspace)
    out = []
    hw = resolution
    first = space.fixed["first_conv"]
    w0 = space.stage("first_conv").width_list[len(space.stage("first_conv").width_list) // 2]
    out.append(("first_conv", dict(name=first.name, cin=space.cin, cout=w0, kernel=first.kernel_list[0], expand=None,
                                   stride=space.stage("first_conv").stride, act=first.act, se=first.se, hw=hw)))
    hw = math.ceil(hw / space.stage("first_conv").stride)
    s0 = space.fixed["stage0"]
    out.append(("stage0", dict(name=s0.name, cin=w0, cout=w0, kernel=s0.kernel_list[0], expand=s0.expand_list[0],
                               stride=1, act=s0.act, se=s0.se, hw=hw)))
    for name in SEARCHABLE:
        stage = space.stage(name)
        hw_in = space.stage_input_hw(resolution, name)
        hw_out = math.ceil(hw_in / stage.stride)
        w = stage.width_list[len(stage.width_list) // 2]
        for spec in space.candidates:
            e = spec.expand_list[len(spec.expand_list) // 2]
            out.append((name, dict(name=spec.name, cin=w, cout=w, kernel=min(spec.kernel_list), expand=e, stride=1,
                                   act=spec.act, se=spec.se, hw=hw_out)))
    hw = space.stage_input_hw(resolution, "final_expand")
    cin = space.stage("stage6").width_list[-1]
    for name in ("final_expand", "feature_mix", "logits"):
        spec = space.fixed[name]
        cout = space.num_classes if name == "logits" else space.stage(name).width_list[0]
        out.append((name, dict(name=spec.name, cin=cin, cout=cout, kernel=spec.kernel_list[0], expand=None, stride=1,
                               act=spec.act, se=spec.se, hw=hw)))
        hw = 1 if name == "feature_mix" else hw
        cin = cout
    return out


def interleaved(fns: dict, rounds: int, runs: int, min_time: float) -> dict[str, float]:
    """Median over rounds of each callable's per-round median CPU time (ms); rounds alternate the callables."""
    from modules.latency.timing import time_callable

    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(time_callable(fn, runs, 500, min_time, 2, 0.0, "cpu")["median"])
    return {k: float(np.median(v)) for k, v in per.items()}


def float_ops(model_bytes: bytes) -> tuple[str, int, int]:
    from modules.inspect import inspect_onnx_int8

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "b_int8.onnx")
        with open(path, "wb") as f:
            f.write(model_bytes)
        total = inspect_onnx_int8(path, verbose=False)[-1]
    return total["float_op_types"], total["int8_kernels"], total["qdq_nodes"]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['superspace']} {r['stage']} {r['block']}" for r in rows]
    ratio = np.array([float(r["int8_speedup"]) for r in rows])
    colors = ["tab:red" if r["float_ops"] else ("tab:green" if s >= 1 else "tab:orange") for r, s in zip(rows, ratio)]
    fig, ax = plt.subplots(figsize=(9, max(4, 0.22 * len(rows) + 1)))
    y = np.arange(len(rows))
    ax.barh(y, ratio, color=colors)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("FP32 ms / INT8 ms (ONNX Runtime, 1 thread; >1: INT8 faster)")
    ax.set_title("INT8 speed-up per block (red: ops left in float; orange: no float ops, still slower)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def block_times(args, sp: str):
    """(stage, config, {"fp32": ms, "int8": ms}, int8 ONNX bytes or None) of the typical blocks: timed here, or
    read from the latency tables of --table_dir."""
    from modules.latency.models import block_model_bytes
    from modules.latency.predictor import load_predictor
    from modules.latency.sessions import ort_session, session_runner

    preds = {k: load_predictor(f"{args.runtime}_{k}", sp, args.table_dir) for k in ("fp32", "int8")} \
        if args.table_dir else None
    for stage, cfg in typical_blocks(sp, args.resolution):
        b8 = block_model_bytes(cfg, "ort_int8", args.quant_format) if args.runtime == "ort" else None
        if preds:
            yield stage, cfg, {k: p.block_latency(cfg) for k, p in preds.items()}, b8
            continue
        b32 = block_model_bytes(cfg, "ort_fp32")
        fns = {k: session_runner(ort_session(b, 1), iobinding=True) for k, b in (("fp32", b32), ("int8", b8))}
        yield stage, cfg, interleaved(fns, args.rounds, args.runs, args.min_time), b8


def main(args):
    from modules.latency.graph import block_mmacs
    from modules.latency.keys import block_key

    spaces = args.superspace or ["mobilew", "onnxw"]
    os.makedirs(args.output_dir, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    rows = []
    for sp in spaces:
        for stage, cfg, ms, b8 in block_times(args, sp):
            fl, n_int8, n_qdq = float_ops(b8) if b8 is not None else ("", "", "")
            row = {"superspace": sp, "stage": stage, "block": cfg["name"], "key": block_key(cfg),
                   "mmacs": f"{block_mmacs(cfg):.2f}", "fp32_ms": f"{ms['fp32']:.4f}", "int8_ms": f"{ms['int8']:.4f}",
                   "int8_speedup": f"{ms['fp32'] / ms['int8']:.3f}", "float_ops": fl, "int8_kernels": n_int8,
                   "qdq_nodes": n_qdq}
            rows.append(row)
            print(f"{sp:8s} {stage:12s} {cfg['name']:17s} {row['key']:44s} fp32 {ms['fp32']:7.3f} ms  "
                  f"int8 {ms['int8']:7.3f} ms  x{ms['fp32'] / ms['int8']:4.2f}  float: {fl or '-'}", flush=True)
    csv_path = os.path.join(args.output_dir, "block_report.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    png = os.path.join(args.output_dir, "block_report.png")
    plot(rows, png)
    # summary per block type (geometric mean of the speed-up over stages)
    print("\nper block type (geometric mean over the stages' typical shapes):")
    types: dict[tuple, list] = {}
    for r in rows:
        types.setdefault((r["superspace"], r["block"]), []).append(r)
    for (sp, name), rs in types.items():
        gm = float(np.exp(np.mean([np.log(float(r["int8_speedup"])) for r in rs])))
        fl = sorted({r["float_ops"] for r in rs if r["float_ops"]})
        print(f"  {sp:8s} {name:17s} INT8 speed-up x{gm:4.2f} over {len(rs)} shape(s); float ops: {'; '.join(fl) or '-'}")
    print(f"\nwrote {csv_path} and {png} in {time.time() - t0:.0f} s (load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
