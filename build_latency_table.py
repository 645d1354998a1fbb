"""Build (or resume) the block-latency table of a superspace on the device you deploy to: this machine, a
phone over adb or a host over ssh; or import block timings measured elsewhere.

1. Take every configuration of the fixed blocks (first conv, stage0, head) and sample `--num_subnets`
   random subnets (random supernets of the superspace, or `--supernet`) plus the max and min subnets at
   each resolution, and measure every distinct block they contain as a
   standalone model (progress bar; saved every few blocks, so an interrupted build resumes where it
   stopped: blocks already in the table are never measured again).
2. Measure `--num_calib` whole subnets end to end and fit the correction
   ``latency = a * sum(blocks) + b`` for the superspace. ORT whole models are written directly
   (`--exporter direct`, node for node the torch export + `modules.export.quantize_onnx_int8`, as the
   tests check, in a fraction of the time) or exported through torch (`--exporter torch`; always for
   LiteRT). Whole-model measurements are kept in the table too and reused on resume.

Writes ``<output_dir>/latency/<platform>.json``; `modules.latency.predictor.load_predictor(platform,
superspace, <output_dir>/latency)` reads it (blocks missing from the table are predicted by a
per-block-type regression fitted on the measured ones).

Runners (`--device_runner`; the same table either way, `modules.latency.remote`):

* ``local`` (default): timed in this process.
* ``adb``: every block (and each calibration subnet) exported as a ``.tflite`` file, pushed to the phone and
  timed there by LiteRT's ``benchmark_model`` (``--benchmark_model``, 1 thread, ``--taskset`` to pin,
  XNNPACK unless ``--no_xnnpack``); ``--platform tflite_int8`` or ``tflite_fp32``.
* ``ssh``: every model as ``.onnx`` (or ``.tflite``) copied to ``--ssh_host`` and timed there by
  ``modules.latency.remote_timer`` run with ``--remote_python`` (needs numpy + onnxruntime there).

A device runner measures and saves block by block: a phone that disconnects loses nothing measured, and the
same command continues where it stopped. `--import_csv FILE` fills the table from block timings measured
elsewhere instead (`modules.latency.csv_import` describes the CSV).

Example (the demo; ~1-2 min on 2 shared cores)::

    python build_latency_table.py --superspace tiny --platform ort_int8 --output_dir checkpoints

    # a larger table for the onnxw supernet found by the space search, FP32 too
    python build_latency_table.py --superspace onnxw --supernet onnxw-151122-023231 --num_subnets 20 \\
        --num_calib 20 --platform ort_fp32

    # a Pixel phone (benchmark_model pushed to /data/local/tmp first, see tflite_tools/README.md)
    python build_latency_table.py --superspace mobilew --platform tflite_int8 --device_runner adb \
        --serial <serial> --taskset f0 --output_dir checkpoints/pixel4
    # a remote x86 server
    python build_latency_table.py --superspace onnxw --device_runner ssh --ssh_host me@server \
        --output_dir checkpoints/server
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("build_latency_table")


def get_args_parser():
    from modules.latency.keys import MEASURED_PLATFORMS
    from modules.latency.remote import RUNNERS
    from modules.latency.timing import CLOCKS, STATS

    p = argparse.ArgumentParser("Measure the block-latency table of a superspace on this device", add_help=True)
    p.add_argument("--superspace", default="tiny", help="mobilew | onnxw | tiny")
    p.add_argument("--platform", default="ort_int8", choices=MEASURED_PLATFORMS)
    p.add_argument("--output_dir", default="./checkpoints", help="the table goes to <output_dir>/latency/<platform>.json")
    p.add_argument("--supernet", action="append", default=[],
                   help="sample subnets of this supernet encoding only (repeatable); default: random supernets")
    p.add_argument("--num_subnets", type=int, default=5, help="random subnets per resolution (plus max and min)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="default: the superspace's supernet resolutions")
    p.add_argument("--num_calib", type=int, default=10, help="whole subnets measured end to end for the correction")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default=None, choices=CLOCKS,
                   help="cpu: thread CPU time (default; robust on a shared machine, 1 thread); wall: perf_counter "
                        "(the adb runner's only clock)")
    p.add_argument("--stat", default=None, choices=STATS,
                   help="statistic of the per-run times (default min: most repeatable on a shared machine; the adb "
                        "runner: mean, what benchmark_model reports)")
    p.add_argument("--min_runs", type=int, default=15, help="timed runs per block (at least)")
    p.add_argument("--min_time", type=float, default=0.03, help="measured seconds per block (at least)")
    p.add_argument("--quant_format", default="qdq", choices=("qdq", "qoperator"), help="ort_int8 quantization format")
    p.add_argument("--exporter", default="direct", choices=("direct", "torch"),
                   help="how whole calibration models are built (ORT platforms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimate", default="table", choices=("table", "smoothed"),
                   help="the table's default block estimate: its measurement, or its out-of-fold regression "
                        "prediction (averages away single-measurement noise; better on some noisy runs, worse on "
                        "others, see README); both get a correction")
    p.add_argument("--device_runner", default="local", choices=RUNNERS, help="where the models are timed")
    p.add_argument("--serial", default=None, help="adb: the device serial (default: adb's only device)")
    p.add_argument("--adb", default=None, help="adb: the adb binary (default: adb on PATH)")
    p.add_argument("--benchmark_model", default=None,
                   help="adb: LiteRT benchmark_model on the device (default /data/local/tmp/benchmark_model)")
    p.add_argument("--taskset", default=None, help="adb: CPU mask to pin benchmark_model to, e.g. f0 (big cores)")
    p.add_argument("--no_xnnpack", action="store_true", help="tflite platforms: builtin kernels, no XNNPACK")
    p.add_argument("--ssh_host", default=None, help="ssh: [user@]host")
    p.add_argument("--ssh", default=None, help="ssh: the ssh binary (default: ssh on PATH)")
    p.add_argument("--remote_python", default=None, help="ssh: python on the host (default python3)")
    p.add_argument("--remote_dir", default=None, help="adb / ssh: working directory on the device")
    p.add_argument("--import_csv", default=None, metavar="FILE",
                   help="fill the table from block timings measured elsewhere (columns block, latency_ms)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    return p


def _check_args(args) -> None:
    from modules.superspace import get_superspace

    get_superspace(args.superspace)
    for name in ("num_subnets", "num_calib", "min_runs"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if 0 < args.num_calib < 2:
        raise ValueError("--num_calib must be 0 (no correction) or >= 2")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.device_runner == "ssh" and not args.ssh_host:
        raise ValueError("--device_runner ssh needs --ssh_host [user@]host")
    if args.device_runner == "adb" and args.platform not in ("tflite_int8", "tflite_fp32"):
        raise ValueError(f"--device_runner adb times LiteRT models with benchmark_model: use --platform tflite_int8 "
                         f"or tflite_fp32, not {args.platform}")
    if args.device_runner == "adb" and (args.clock or "wall", args.stat or "mean") != ("wall", "mean"):
        raise ValueError("--device_runner adb: benchmark_model reports the mean wall-clock time; drop --clock / "
                         "--stat or give --clock wall --stat mean")


def measure_calibration(pred, models: list[tuple[str, str]], superspace: str, progress: bool = True,
                        exporter: str = "direct", batch: int = 8) -> list[dict]:
    """Whole-model latency of each (supernet, subnet) on the predictor's runner, reusing the ones already in
    the table (saved after every batch)."""
    from tqdm import tqdm

    done = {(m["supernet"], m["subnet"]): m for m in pred.calibration if m.get("superspace") == superspace}
    todo = [m for m in dict.fromkeys(models) if m not in done]
    bar = tqdm(total=len(todo), desc="whole models", disable=not progress or not todo, unit="model")
    step = min(batch, pred.batch_size)
    for i in range(0, len(todo), step):
        chunk = todo[i:i + step]
        stats = pred.runner.time_models(chunk, pred.platform, pred.mc, exporter=exporter, seed=i)
        for (sup, sub), r in stats.items():
            done[(sup, sub)] = m = {"superspace": superspace, "supernet": sup, "subnet": sub,
                                    "measured_ms": r[pred.mc.stat], "runs": r["runs"]}
            pred.calibration.append(m)
        pred.save()
        bar.update(len(chunk))
    bar.close()
    return [done[m] for m in models]


def make_runner(args):
    """The runner of --device_runner with its options."""
    from modules.latency.remote import make_runner as runner_of

    if args.device_runner == "adb":
        return runner_of("adb", serial=args.serial, adb=args.adb, benchmark_model=args.benchmark_model,
                         remote_dir=args.remote_dir, taskset=args.taskset)
    if args.device_runner == "ssh":
        return runner_of("ssh", host=args.ssh_host, ssh=args.ssh, python=args.remote_python,
                         remote_dir=args.remote_dir)
    return runner_of("local")


def make_predictor(args, path):
    """The table's predictor with the timing settings of the arguments (clock and statistic: the runner's
    defaults unless given)."""
    import dataclasses

    from modules.latency.predictor import LatencyPredictor

    adb = args.device_runner == "adb"
    pred = LatencyPredictor(args.platform, str(path), threads=args.threads, superspace=args.superspace,
                            runs=args.min_runs, min_time=args.min_time, quant_format=args.quant_format,
                            clock=args.clock or ("wall" if adb else "cpu"),
                            stat=args.stat or ("mean" if adb else "min"),
                            runner=None if args.import_csv else make_runner(args))
    pred.mc = dataclasses.replace(pred.mc, use_xnnpack=not args.no_xnnpack)
    return pred


def sample_models(args) -> tuple[list, list, list]:
    """(resolutions, (supernet, subnet) sampled for the table, calibration subnets)."""
    from modules.latency.sampling import sample_subnets
    from modules.superspace import get_superspace

    res = list(args.resolutions or get_superspace(args.superspace).supernet_hw_list)
    subnets = sample_subnets(args.superspace, args.num_subnets, random.Random(args.seed), args.resolutions,
                             args.supernet or None)
    cal_rng = random.Random(args.seed + 1)
    calib = []
    for i in range(args.num_calib):
        calib += sample_subnets(args.superspace, 1, cal_rng, [res[i % len(res)]], args.supernet or None,
                                extremes=False)
    return res, subnets, calib


def fit_correction(pred, calib, args) -> None:
    """Measure the calibration subnets and fit the correction of each estimate (the table's default last)."""
    from modules.latency.predictor import ESTIMATES
    from modules.latency.sampling import subnet_block_configs

    models = measure_calibration(pred, calib, args.superspace, progress=not args.no_progress, exporter=args.exporter)
    cfgs = [subnet_block_configs(m["supernet"], m["subnet"]) for m in models]
    y = [m["measured_ms"] for m in models]
    for estimate in sorted(ESTIMATES, key=lambda e: e == args.estimate):
        pred.set_estimate(estimate)
        a, b = pred.calibrate(cfgs, y, models=models, superspace=args.superspace)
        errs = [pred.predict_blocks(c) / t - 1 for c, t in zip(cfgs, y)]
        within = sum(abs(e) <= 0.10 for e in errs) / len(errs)
        rms = math.sqrt(sum(e * e for e in errs) / len(errs))
        log.info("correction for %s (%s blocks): latency = %.3f * sum(blocks) + %.4f ms; on the %d calibration "
                 "models: %.0f %% within +-10 %%, RMS relative error %.1f %%", args.superspace, estimate, a, b, len(y),
                 100 * within, 100 * rms)


def main(args):
    from modules.latency.csv_import import import_block_csv
    from modules.latency.predictor import table_path
    from modules.latency.sampling import fixed_block_configs, subnet_block_configs

    _check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    path = table_path(args.platform, os.path.join(args.output_dir, "latency"))
    pred = make_predictor(args, path)
    if args.import_csv:
        info = import_block_csv(pred, args.import_csv, args.superspace)
        log.info("imported %d blocks (%d whole subnets, correction %s) from %s into %s", info["blocks"],
                 info["models"], info["correction"], args.import_csv, path)
        return {"table": str(path), "blocks": len(pred.table), "new_blocks": info["blocks"],
                "correction": pred.correction, "seconds": time.time() - t0}
    resumed = len(pred.table)
    res, subnets, calib = sample_models(args)
    lists = [fixed_block_configs(args.superspace, res)] + [subnet_block_configs(s, n) for s, n in subnets + calib]
    log.info("%s %s on %s: %d subnets (+%d for calibration), table %s (%d blocks already measured)",
             args.superspace, args.platform, args.device_runner, len(subnets), len(calib), path, resumed)
    new = pred.build(lists, desc=f"{args.platform} blocks", progress=not args.no_progress)
    pred.smooth()
    pred.set_estimate(args.estimate)
    log.info("measured %d new blocks (session overhead %.4f ms subtracted from each) in %.0f s", new,
             pred.overhead_ms, time.time() - t0)
    if calib:
        fit_correction(pred, calib, args)
    pred.device = pred.runner.describe()
    pred.save()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    log.info("table %s: %d blocks; done in %.0f s (load average %.1f)", path, len(pred.table), time.time() - t0, load)
    return {"table": str(path), "blocks": len(pred.table), "new_blocks": new, "correction": pred.correction,
            "seconds": time.time() - t0}


if __name__ == "__main__":
    from modules.cli import run_main

    run_main(main, get_args_parser())
