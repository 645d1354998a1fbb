"""LUT-build throughput on the tiny superspace: rows per second of `eval_block_kd.py`'s row loop.

    python bench/lut_build.py                       # every stage x block, 3 rows each, LSQ+ students
    python bench/lut_build.py --rows 6 --valid_size 128 --calib_batch_size 64 --threads 2

Students and teacher have random weights (throughput does not depend on training). Compares the cached
teacher features (what eval_block_kd.py does) with the original's scheme (teacher recomputed from the stem
for every sub-stage's calibration and evaluation batches), and LSQ+ with fp32 students. Prints ratios.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modules.block_kd import FeatureCache, StagePlusProj, init_lsq_from_data, lut_resolutions, lut_row  # noqa: E402
from modules.lsq import set_quant_mode  # noqa: E402
from modules.superspace import get_superspace  # noqa: E402
from modules.teacher import build_tiny_teacher, check_teacher, tiny_teacher_arch  # noqa: E402


def rows_per_second(space, teacher, images, args, quant: bool, naive: bool) -> tuple[float, dict]:
    calib, held = images
    hw = tuple(space.block_kd_hw_list)
    per_stage, total_rows, total_time, cpu0 = {}, 0, 0.0, time.process_time()
    cache = None if naive else FeatureCache.build(teacher, calib, held, hw, range(1, 7))
    for x in range(1, 7):
        n, t = 0, 0.0
        for b in range(len(space.candidates)):
            torch.manual_seed(x * 10 + b)
            cin, cout = teacher.stage_channels[x]
            model = StagePlusProj(space, x, b, cin, cout)
            if quant:
                set_quant_mode(model, "lsq", "ort")
                with torch.no_grad():
                    first = teacher.forward_to_stage(calib[0][:8], x)[0]
                init_lsq_from_data(model, first, 0)
            rng, cc = random.Random(f"bench-{x}-{b}"), {}
            t0 = time.perf_counter()
            for r in lut_resolutions(random.Random(f"bench-res-{x}-{b}"), hw, args.rows):
                c = FeatureCache.build(teacher, calib, held, (r,), [x]) if naive else cache
                lut_row(model, c, rng, 0, r, 1e-2, lambda m, rr: 0.0, cc)
            t += time.perf_counter() - t0
            n += args.rows
        per_stage[x] = n / t
        total_rows += n
        total_time += t
    per_stage["cpu"] = total_rows / (time.process_time() - cpu0)
    return total_rows / total_time, per_stage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3, help="rows per (stage, block) (default: %(default)s)")
    p.add_argument("--valid_size", type=int, default=128, help="held-out images per row (default: %(default)s)")
    p.add_argument("--calib_batch_size", type=int, default=64,
                   help="BN-calibration images per row (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--skip_naive", action="store_true", help="skip the recompute-the-teacher baseline")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    space = get_superspace("tiny")
    torch.manual_seed(0)
    teacher = build_tiny_teacher(tiny_teacher_arch(space)).eval()
    check_teacher(teacher, space)
    size = max(space.block_kd_hw_list)
    images = ([torch.randn(args.calib_batch_size, 3, size, size)], [torch.randn(args.valid_size, 3, size, size)])
    print(f"tiny superspace, {args.rows} rows x 6 stages x {len(space.candidates)} blocks, {args.calib_batch_size} "
          f"calibration + {args.valid_size} held-out images per row, {args.threads} thread(s)")
    lsq, lsq_stage = rows_per_second(space, teacher, images, args, True, False)
    print("LSQ+ students, cached teacher features: %.2f rows/s wall, %.2f rows per CPU-second (per stage: %s)"
          % (lsq, lsq_stage.pop("cpu"), ", ".join(f"{x}: {v:.2f}" for x, v in lsq_stage.items())))
    fp, _ = rows_per_second(space, teacher, images, args, False, False)
    print(f"fp32 students, cached teacher features: {fp:.2f} rows/s  (LSQ+ fake-quant costs x{fp / lsq:.2f})")
    if not args.skip_naive:
        naive, _ = rows_per_second(space, teacher, images, args, True, True)
        print(f"LSQ+ students, teacher recomputed per row: {naive:.2f} rows/s  (cache speed-up x{lsq / naive:.2f})")


if __name__ == "__main__":
    main()
