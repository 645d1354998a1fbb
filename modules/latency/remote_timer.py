"""Times model files on the machine it runs on and prints one JSON line per file: the command an ssh runner
(`modules.latency.remote`) runs on the remote host. It needs only numpy and onnxruntime (or ai-edge-litert for
.tflite files) there, with this file, `sessions.py` and `timing.py` copied under ``modules/latency/``.

    python -m modules.latency.remote_timer --iobinding b1.onnx b2.onnx      # blocks, timed together
    python -m modules.latency.remote_timer --info                           # the machine, one JSON line

Output: ``{"device": {...}}`` first, then ``{"file": <name>, "min": ms, "median": ms, ..., "runs": n}`` per file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the copied package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modules.latency.sessions import device_info, ort_session, session_runner, tflite_runner  # noqa: E402
from modules.latency.timing import CLOCKS, MeasureConfig  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("Time model files on this machine (the remote side of an ssh latency runner)")
    p.add_argument("files", nargs="*", help=".onnx (ONNX Runtime) or .tflite (LiteRT) model files")
    p.add_argument("--info", action="store_true", help="print this machine's description only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iobinding", action="store_true", help="ORT: bind input and output once (blocks)")
    p.add_argument("--no_xnnpack", action="store_true", help="LiteRT: builtin kernels")
    p.add_argument("--clock", default="cpu", choices=CLOCKS)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max_rounds", type=int, default=10)
    p.add_argument("--min_runs", type=int, default=15, help="timed runs per file, over all rounds")
    p.add_argument("--min_time", type=float, default=0.04, help="measured seconds per file, over all rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_pin", action="store_true", help="do not pin the measuring thread to one CPU")
    p.add_argument("--seed", type=int, default=0)
    return p


def _runner(path: Path, args):
    if path.suffix == ".tflite":
        return tflite_runner(path, args.threads, not args.no_xnnpack)
    return session_runner(ort_session(path, args.threads), iobinding=args.iobinding)


def main(args):
    print(json.dumps({"device": device_info()}), flush=True)
    if args.info:
        return
    mc = MeasureConfig(threads=args.threads, min_runs=args.min_runs, min_time=args.min_time, warmup=args.warmup,
                       clock=args.clock, rounds=args.rounds, max_rounds=args.max_rounds, pin=not args.no_pin)
    fns = {Path(f).name: _runner(Path(f), args) for f in args.files}
    for name, st in mc.time_many(fns, seed=args.seed).items():
        print(json.dumps(dict(st, file=name)), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
