"""Benchmark of the space search: vectorised Q-T scorer vs a pure-Python reference scorer written
like the original (per-sample loops, list of dicts, Python sorts), on a synthetic full-size onnxw LUT
(1000 rows per file, all 132 files), with identical random draws; then a full default search.

    python -m bench.space_search                       # 200 candidates, constraints 15 20, full search
    python -m bench.space_search --num_candidates 20 --skip_search

Prints max |score difference| (must be <= 1e-9), whether the best candidate agrees, the speed ratio
(goal >= 100x) and the wall time of a 5000-cycle search (goal < 60 s on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.lut import Lut, load_lut_dir, write_synthetic_lut  # noqa: E402
from modules.qt_score import Draws, QTScorer  # noqa: E402


def reference_score(lut: Lut, blocks, windows, constraints, t: float, a: float, top_k: int, draws: Draws,
                    resolutions, fixed_latency: dict, u_lists=None):
    """Pure-Python Q-T score (written like the original searcher) from the same draws as QTScorer.

    Returns (score, lat_loss, top_loss) summed over the constraints."""
    u = u_lists if u_lists is not None else draws.u.tolist()
    res_idx = draws.res_idx.tolist()
    files = {}
    loss_list, latency_list = [], []
    for c, ri in enumerate(res_idx):
        r = resolutions[ri]
        stage_rows = []
        for i in range(6):
            key = (i + 1, blocks[i], windows[i], r)
            if key not in files:
                nsr, lat = lut.arrays(i + 1, blocks[i], windows[i], r)
                files[key] = (nsr.tolist(), lat.tolist())
            stage_rows.append(files[key])
        for j in range(len(u[c][0])):
            loss, latency = 0.0, 0.0
            for i in range(6):
                nsr, lat = stage_rows[i]
                k = min(int(u[c][i][j] * len(nsr)), len(nsr) - 1)
                loss += nsr[k]
                latency += lat[k]
            loss_list.append(loss)
            latency_list.append(latency + fixed_latency[r])
    n = len(loss_list)
    score = lat_loss = top_loss = 0.0
    for constraint in constraints:
        samples = sorted(({"loss": lo, "latency": la} for lo, la in zip(loss_list, latency_list)),
                         key=lambda s: s["latency"])
        end = 0  # number of samples with latency <= constraint (binary search on the sorted list)
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if samples[mid]["latency"] <= constraint:
                lo = mid + 1
            else:
                hi = mid
        end = lo
        p = end / n + 1e-5
        if end:
            top = sorted(samples[:end], key=lambda s: s["loss"])[:top_k]
            avg = 0.0
            for s in top:
                avg += s["loss"]
            avg /= len(top) + 1e-5
        else:
            avg = 1e5
        ll = max(1.0, (t / p) ** a)
        score += 1.0 / (ll * avg)
        lat_loss += ll
        top_loss += avg
    return score, lat_loss, top_loss


def random_candidates(lut: Lut, n: int, seed: int):
    rng = random.Random(seed)
    space = lut.superspace
    nw = space.num_window_choices()
    out = set()
    while len(out) < n:
        out.add((tuple(rng.randrange(len(space.candidates)) for _ in nw), tuple(rng.randrange(k) for k in nw)))
    return sorted(out)


def get_args_parser():
    p = argparse.ArgumentParser("bench.space_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--superspace", default="onnxw", choices=["onnxw", "mobilew", "tiny"])
    p.add_argument("--lut_dir", default=None, help="existing LUT root (default: write a synthetic one to a temp dir)")
    p.add_argument("--rows_per_file", type=int, default=1000)
    p.add_argument("--num_candidates", type=int, default=200)
    p.add_argument("--constraints", type=float, nargs="+", default=[15.0, 20.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_search", action="store_true", help="skip the full 5000-cycle search")
    p.add_argument("--cycles", type=int, default=5000)
    return p


def main(args):
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    tmp = tempfile.TemporaryDirectory(prefix="bench_space_search_")
    lut_dir = args.lut_dir
    rows = []
    if lut_dir is None:
        lut_dir = os.path.join(tmp.name, "lut")
        t0 = time.perf_counter()
        write_synthetic_lut(lut_dir, args.superspace, args.rows_per_file, args.seed)
        rows.append(("write synthetic LUT", f"{time.perf_counter() - t0:.2f} s", ""))
    t0 = time.perf_counter()
    lut = load_lut_dir(lut_dir, args.superspace)
    rows.append(("load + validate LUT", f"{time.perf_counter() - t0:.2f} s",
                 f"{len(lut.tables)} files, {lut.num_rows} rows"))

    cands = random_candidates(lut, args.num_candidates, args.seed)
    fixed = {r: 0.0 for r in lut.resolutions}
    scorer = QTScorer(lut, args.constraints, t=0.08, a=0.01, top_k=50, num_samples=100_000, chunk=500,
                      fixed_latency=fixed, seed=args.seed)
    t0 = time.perf_counter()
    fast = [scorer.score(b, w) for b, w in cands]
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = [scorer.score(b, w) for b, w in cands]
    t_warm = time.perf_counter() - t0

    u_lists = scorer.draws.u.tolist()
    ref = []
    t0 = time.perf_counter()
    for i, (b, w) in enumerate(cands):
        ref.append(reference_score(lut, b, w, scorer.constraints, scorer.t, scorer.a, scorer.top_k, scorer.draws,
                                   scorer.resolutions, fixed, u_lists))
        if (i + 1) % 20 == 0:
            print(f"  reference scorer: {i + 1}/{len(cands)} candidates", file=sys.stderr, flush=True)
    t_ref = time.perf_counter() - t0
    max_diff = max(max(abs(f.score - r[0]), abs(f.lat_loss - r[1]), abs(f.top_loss - r[2])) for f, r in zip(fast, ref))
    best_fast = max(range(len(cands)), key=lambda i: fast[i].score)
    best_ref = max(range(len(cands)), key=lambda i: ref[i][0])
    n = len(cands)
    rows += [
        ("candidates / constraints", f"{n} / {' '.join(f'{c:g}' for c in scorer.constraints)}", "N=100000, top-50"),
        ("reference (pure Python)", f"{1e3 * t_ref / n:.1f} ms/cand", f"{t_ref:.1f} s total"),
        ("vectorised, cold cache", f"{1e3 * t_cold / n:.2f} ms/cand", f"ratio {t_ref / t_cold:.0f}x"),
        ("vectorised, warm cache", f"{1e3 * t_warm / n:.2f} ms/cand", f"ratio {t_ref / t_warm:.0f}x"),
        ("max |diff| score/lat/top", f"{max_diff:.3e}", "PASS" if max_diff <= 1e-9 else "FAIL (> 1e-9)"),
        ("same best candidate", str(best_fast == best_ref),
         "-".join("".join(map(str, x)) for x in cands[best_fast])),
    ]

    top5 = []
    if not args.skip_search:
        import search_block_kd
        out = os.path.join(tmp.name, "out")
        sargs = search_block_kd.get_args_parser().parse_args(
            ["--superspace", args.superspace, "--lut_dir", lut_dir, "--output_dir", out, "--no_progress",
             "--cycles", str(args.cycles), "--seed", str(args.seed), "--latency_constraints",
             *[f"{c:g}" for c in args.constraints]])
        t0, c0 = time.perf_counter(), time.process_time()
        result = search_block_kd.main(sargs)
        t_search, c_search = time.perf_counter() - t0, time.process_time() - c0
        rows.append((f"full search ({args.cycles} cycles)", f"{t_search:.1f} s wall",
                     f"{c_search:.1f} s CPU; incl. LUT load {result['lut_load_seconds']:.1f} s; "
                     f"{result['evaluated']} evaluated"))
        top5 = result["top5"]

    w = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{w}}  {'value':<18} note")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<18} {r[2]}")
    if top5:
        print("\ntop-5 spaces of the search:")
        for i, r in enumerate(top5, start=1):
            print(f"  {i}. {r['supernet']}  score {r['score']:.4f}  top_loss {r['top_loss']:.4f}  lat_loss "
                  f"{r['lat_loss']:.4f}")
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tmp.cleanup()
    return max_diff


if __name__ == "__main__":
    main(get_args_parser().parse_args())
