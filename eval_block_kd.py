"""Block LUT build (the original's csv format): for every (stage X, block B, width window W), sample N
sub-stages of the LSQ+ block-KD student (CIN uniform over the previous stage's full width list, depth / kernel /
expand uniform, widths uniform within window W, resolution uniform over the block-KD list), BN-recalibrate
each on a fixed set of train batches, and measure its NSR against the teacher on a fixed held-out subset
(teacher features cached per resolution), its MACs / params (static sub-stage at 1xCINxHxW) and latency.

    python eval_block_kd.py --superspace tiny --output_dir ./checkpoints --num_samples 1000
    python eval_block_kd.py --superspace tiny --stages 1 2 --windows 0 --num_samples 50 --workers 2
    python eval_block_kd.py --superspace tiny --latency_predictor ort_int8        # table from build_latency_table.py
    torchrun --nproc_per_node 2 eval_block_kd.py --superspace tiny                 # files sharded over ranks

The original's command line (its README) runs as written, e.g.::

    python eval_block_kd.py --superspace onnxw --platform onnx_lut --output_path ./checkpoints/block_kd/lut \\
        --stage_list stage3_0 stage3_1 --width_window_filter 0 1 2 --hw_list 160 192 224 \\
        --dataset_path ./dataset --checkpoint_path ./checkpoints/block_kd --teacher_checkpoint_path T.pth --debug

(``--debug`` there means: evaluate each sub-stage on 10 held-out batches only; ``--traceback`` shows
tracebacks.)

Writes <lut_dir>/<superspace>/stage{X}_{B}_{W}.csv (--lut_dir default <output_dir>/lut) (no header, 6 fields, 4 decimals; atomic). Files
that already hold N valid rows and are newer than their checkpoint are skipped. Rows are reproducible
(also across sharding): file stage{X}_{B}_{W} uses the seed "lut-<seed>-stage{X}_{B}_{W}" and starts from
the checkpoint; resolutions are stratified (each run of len(hw_list) rows is a permutation), so every file
with N >= len(hw_list) rows covers every resolution. --fp32_mode reads checkpoint.pth instead of
lsq.pth and writes to <output_dir>/lut/<superspace>_fp32/. Sharding: files are split over
WORLD_SIZE (torchrun) x --workers processes; no process group is needed.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import time

import torch

from modules.block_kd import (DEFAULT_NSR_EPS, add_block_ids_arg, build_lut_shard, check_hw_list, lut_jobs,
                              selected_pairs)
from modules.checkpoint import to_plain
from modules.cli import add_aliases, add_common_args, run_main, save_run_info, setup_logging
from modules.original_cli import add_original_option, parent_of, platform_name
from modules.data import DEFAULT_DATA_DIR, prepare_default_data
from modules.superspace import get_superspace

log = logging.getLogger("spaceevo.eval_block_kd")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("eval_block_kd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the original's --debug: a quick LUT (10 held-out batches per sub-stage); tracebacks: --traceback
    parser.add_argument("--max_eval_batches", type=int, default=None,
                        help="evaluate each sub-stage on this many held-out batches only (default: all)")
    parser.add_argument("--debug", dest="max_eval_batches", action="store_const", const=10,
                        help="as the original: --max_eval_batches 10")
    parser.add_argument("--traceback", dest="debug", action="store_true", help="print full tracebacks on errors")
    add_common_args(parser)
    parser.add_argument("--superspace", default="tiny", help="mobilew | onnxw | tiny (default: %(default)s)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="ImageFolder root (default: %(default)s)")
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="stages 1..6 (default: all)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="candidate blocks (default: all)")
    add_block_ids_arg(parser, "build LUTs of")
    parser.add_argument("--windows", type=int, nargs="+", default=None, help="width windows (default: all)")
    parser.add_argument("--lut_dir", default=None, help="LUTs go to <lut_dir>/<superspace>/ (default: "
                        "<output_dir>/lut)")
    parser.add_argument("--num_samples", "--num_samples_per_stage", dest="num_samples", type=int, default=1000,
                        help="rows per LUT file (default: %(default)s)")
    parser.add_argument("--hw_list", type=int, nargs="+", default=None,
                        help="resolutions (default: the superspace's block_kd_hw_list)")
    parser.add_argument("--valid_size", type=int, default=128,
                        help="held-out images (a prefix of block KD's held-out split; default: %(default)s)")
    parser.add_argument("--eval_batch_size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--num_calib_batches", type=int, default=1,
                        help="train batches for BN re-calibration of each sub-stage (default: %(default)s)")
    parser.add_argument("--calib_batch_size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--nsr_eps", type=float, default=DEFAULT_NSR_EPS, help="(default: %(default)s)")
    parser.add_argument("--fp32_mode", action="store_true", help="use the fp32 checkpoint.pth, not lsq.pth")
    parser.add_argument("--latency_predictor", default="none",
                        help="none (writes 0.0) or a platform of modules.latency, e.g. ort_int8, "
                             "tflite_int8, macs (default: %(default)s)")
    parser.add_argument("--latency_table_dir", default=None,
                        help="latency tables (default: the predictor's, checkpoints/latency)")
    parser.add_argument("--teacher_weights", default=None, help="as in train_block_kd.py")
    parser.add_argument("--workers", type=int, default=1,
                        help="local processes sharing the files (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    _add_original_names(parser)
    return parser


def _add_original_names(parser: argparse.ArgumentParser) -> None:
    for ours, *theirs in (("--data_dir", "--dataset_path", "--dataset_dir", "--data_path"),
                          ("--windows", "--width_window_filter"), ("--lut_dir", "--lut_path", "--output_path"),
                          ("--teacher_weights", "--teacher_checkpoint_path"), ("--seed", "--manual_seed"),
                          ("--no_progress", "--no-progress")):
        add_aliases(parser, ours, *theirs)
    add_original_option(parser, "--checkpoint_path", "output_dir", type=parent_of("block_kd"), metavar="DIR",
                        help="<output_dir>/block_kd, which holds <superspace>/stageX_B/{checkpoint,lsq}.pth")
    add_original_option(parser, "--platform", "latency_predictor", type=platform_name,
                        help="--latency_predictor (tflite27_cpu_int8 -> tflite_int8, onnx_lut -> ort_int8)")


def main(args: argparse.Namespace) -> dict:
    space = get_superspace(args.superspace)
    pairs = selected_pairs(space, args.stages, args.blocks, args.block_ids)
    check_hw_list(space, args.hw_list)
    for name in ("num_samples", "valid_size", "eval_batch_size", "num_calib_batches", "calib_batch_size", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: expected a positive integer")
    if args.max_eval_batches is not None and args.max_eval_batches < 1:
        raise ValueError(f"--max_eval_batches {args.max_eval_batches}: expected a positive integer")
    jobs = lut_jobs(space, pairs, args.windows)
    # file sharding over torchrun ranks (read from the environment; no process group) x local workers
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    lut_root = args.lut_dir or os.path.join(args.output_dir, "lut")
    setup_logging(None, "eval_block_kd")
    if rank == 0:
        save_run_info(args, os.path.join(lut_root, "logs", space.name + ("_fp32" if args.fp32_mode else "")))
    if args.latency_predictor in (None, "", "none"):
        if rank == 0:
            print("notice: --latency_predictor none: the latency column is 0.0 (build a latency table with "
                  "build_latency_table.py and pass e.g. --latency_predictor ort_int8)", flush=True)
    data_dir = prepare_default_data(args.data_dir)
    cfg = to_plain(vars(args))
    cfg["data_dir"] = str(data_dir)
    n = args.workers
    shards = [rank * n + i for i in range(n)]
    t0 = time.time()
    if n == 1:
        results = [build_lut_shard(cfg, shards[0], world * n)]
    else:
        threads = max(1, torch.get_num_threads() // n)
        with mp.get_context("spawn").Pool(n) as pool:
            results = pool.starmap(build_lut_shard, [(cfg, s, world * n, threads) for s in shards])
    wall = time.time() - t0
    total = {k: sum(r[k] for r in results) for k in ("files", "skipped", "rows")}
    total["seconds"] = wall
    total["rows_per_second"] = total["rows"] / wall if total["rows"] else 0.0
    total["jobs"] = len(jobs)
    print(f"LUT {space.name}{'_fp32' if args.fp32_mode else ''} (shard {rank + 1}/{world}): {total['files']} file(s) "
          f"written, {total['skipped']} already complete, {total['rows']} rows in {wall:.1f} s "
          f"({total['rows_per_second']:.2f} rows/s) -> {os.path.join(lut_root, space.name)}", flush=True)
    return total


if __name__ == "__main__":
    out = run_main(main, get_args_parser())
