"""Latency predictor vs measured ONNX Runtime latency of random onnxw subnets.

1. Sample `--num` random subnets of random onnxw supernets, split over `--resolutions` (default
   50 at 160 px + 50 at 224 px), plus `--num_calib` subnets for the whole-model correction and
   `--num_train` more whose blocks (with the calibration subnets' blocks) train the regression fallback.
2. Measure every distinct block of all of them (the predictor's table, `modules.latency_predictor`);
   with `--interleave 1` (default) batch by batch, each batch's blocks right before its whole models,
   so that on a shared machine whose load drifts over the run (load 8 -> 3 in one run here) the table
   and the models it predicts are measured under the same conditions, as on a dedicated device.
3. Measure every test subnet end to end twice (two passes over all models, the second in reverse
   order, ~10 min apart), the calibration subnets once. Each measurement builds a batch of models and
   times them in `--rounds` shuffled rounds (the minimum over the rounds' runs), as the blocks are.
   Whole models are the deployed graphs (`--exporter direct`: written directly, the optimised graph of
   the torch export + `quantize_onnx_int8`, which the tests check; `--torch_check N` also times N test
   models exported through torch to show they run alike).
4. Report, per statistic (min, median of the per-run thread CPU times):
   * **noise floor**: share of test models whose two measurements are within +-10 % of each other,
     and the RMS of their difference;
   * **table** predictor (all blocks measured; correction fitted on the calibration models only):
     share within +-10 % of the first measurement, of the second, and of their mean; RMSE;
   * **regression** predictor (the blocks of the test subnets that a table built from the train +
     calibration subnets and the fixed blocks would not hold, predicted by the regression fitted on
     that table);
   * the uncorrected block sum, and the raw sum of standalone blocks (what the correction adds);
   * block-level regression accuracy on held-out blocks; prediction time per subnet.
   With `--ablation K`, the blocks of K test subnets are also measured as plain quantized models
   (float input/output with their Q/DQ, NCHW), to show what cutting the block boundaries removes.

Everything is cached under `--output_dir` (resumable); the full default run took 1060 s at load 1 on the
2-core VM (blocks 372 s, whole models 615 s) and is meant to run in the background::

    nohup python -m bench.latency_predictor > checkpoints/bench_latency/log.txt 2>&1 &
    python -m bench.latency_predictor --num 20 --num_calib 8 --num_train 4     # quick look (~5 min)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("Latency predictor accuracy on random onnxw subnets", add_help=True)
    p.add_argument("--superspace", default="onnxw")
    p.add_argument("--platform", default="ort_int8", choices=("ort_int8", "ort_fp32"))
    p.add_argument("--num", type=int, default=100, help="test subnets (split over the resolutions)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[160, 224])
    p.add_argument("--num_calib", type=int, default=20, help="subnets measured whole to fit the correction")
    p.add_argument("--num_train", type=int, default=20, help="extra subnets whose blocks train the regression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_runs", type=int, default=15, help="timed runs per block (at least)")
    p.add_argument("--min_time", type=float, default=0.03, help="measured seconds per block (at least)")
    p.add_argument("--rounds", type=int, default=6, help="shuffled timing rounds per block / model and pass")
    p.add_argument("--max_rounds", type=int, default=10, help="more rounds while a minimum still falls by > 2 %%")
    p.add_argument("--pin", type=int, default=1, help="1: the measuring thread stays on one CPU")
    p.add_argument("--stat", default="min", choices=("min", "median"),
                   help="statistic of the per-run times, blocks and whole models alike")
    p.add_argument("--model_runs", type=int, default=4, help="timed runs per whole model and round (at least)")
    p.add_argument("--model_time", type=float, default=0.05, help="measured seconds per whole model and round")
    p.add_argument("--model_batch", type=int, default=8, help="whole models built, then timed together")
    p.add_argument("--interleave", type=int, default=1,
                   help="1: measure each batch's blocks right before its whole models (same machine state); "
                        "0: all blocks first")
    p.add_argument("--exporter", default="direct", choices=("direct", "torch"), help="how whole models are built")
    p.add_argument("--torch_check", type=int, default=3, help="test models also timed via the torch export")
    p.add_argument("--ablation", type=int, default=10, help="test subnets whose blocks are also timed standalone")
    p.add_argument("--output_dir", default="./checkpoints/bench_latency")
    p.add_argument("--device_runner", default="local", choices=("local", "ssh"),
                   help="ssh: blocks and whole models timed on --ssh_host by modules.latency.remote_timer")
    p.add_argument("--ssh_host", default=None)
    p.add_argument("--remote_python", default=None, help="python on the ssh host (default python3)")
    p.add_argument("--remote_dir", default=None, help="working directory on the ssh host")
    p.add_argument("--no_progress", action="store_true")
    return p


# ------------------------------------------------------------------------------------------ state
class State:
    """Whole-model measurements, cached in <output_dir>/models_<platform>.json (atomic writes)."""

    def __init__(self, path):
        self.path = path
        self.data = json.load(open(path)) if os.path.isfile(path) else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        from modules.checkpoint import atomic_write_text

        self.data[key] = value
        atomic_write_text(self.path, json.dumps(self.data))


def _whole(cfgs, platform, mc, exporter, sup=None, sub=None, runs=20, tmin=0.3) -> dict:
    from modules.latency.local import measure_configs, measure_subnet

    if exporter == "direct":
        return measure_configs(cfgs, platform, mc, min_runs=runs, min_time=tmin)
    import torch

    from modules.supernet import build_subnet

    torch.set_num_threads(1)
    return measure_subnet(build_subnet(sup, sub), platform, mc, min_runs=runs, min_time=tmin)


def _keep(st: dict) -> dict:
    return {k: st[k] for k in ("min", "p20", "median", "mean", "runs", "round_min") if k in st}


# ------------------------------------------------------------------------------------------ metrics
def within(pred, meas, tol=0.10) -> float:
    pred, meas = np.asarray(pred), np.asarray(meas)
    return float(np.mean(np.abs(pred / meas - 1) <= tol))


def rmse(pred, meas) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(meas)) ** 2)))


def rel_rms(pred, meas) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) / np.asarray(meas) - 1) ** 2)))


def fit_correction(sums, meas) -> tuple[float, float]:
    sums, meas = np.asarray(sums), np.asarray(meas)
    a, b = np.polyfit(sums, meas, 1, w=1.0 / meas)
    return float(a), float(b)


def main(args):
    from tqdm import tqdm

    from modules.latency.keys import block_key, parse_block_key
    from modules.latency.local import measure_block_stats, measure_config_batch
    from modules.latency.predictor import LatencyPredictor
    from modules.latency.remote import make_runner
    from modules.latency.regression import BlockRegressor
    from modules.latency.sampling import fixed_block_configs, random_subnet, random_supernet, subnet_block_configs
    from modules.latency.timing import time_rounds

    os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.time()
    loads = [os.getloadavg()[0]]
    progress = not args.no_progress
    # ---------------------------------------------------------------- sampling
    rng_test, rng_cal, rng_train = (random.Random(args.seed * 3 + i) for i in range(3))

    def draw(rng, n):
        out = []
        for i in range(n):
            r = args.resolutions[i % len(args.resolutions)]
            ch = random_supernet(args.superspace, rng)
            out.append((str(ch), str(random_subnet(ch, rng, r))))
        return out

    test, calib, train = draw(rng_test, args.num), draw(rng_cal, args.num_calib), draw(rng_train, args.num_train)
    cfgs = {m: subnet_block_configs(*m) for m in test + calib + train}
    # ---------------------------------------------------------------- blocks and whole models
    table = os.path.join(args.output_dir, f"{args.platform}.json")
    runner = make_runner(args.device_runner, host=args.ssh_host, python=args.remote_python,
                         remote_dir=args.remote_dir) if args.device_runner != "local" else None
    pred = LatencyPredictor(args.platform, table, runs=args.min_runs, min_time=args.min_time, stat=args.stat,
                            runner=runner)
    pred.mc.rounds, pred.mc.max_rounds, pred.mc.pin = args.rounds, args.max_rounds, bool(args.pin)
    mc = pred.mc
    state = State(os.path.join(args.output_dir, f"models_{args.platform}.json"))
    n_before = len(pred.table)
    fixed = fixed_block_configs(args.superspace, args.resolutions)  # build_latency_table.py measures these too
    t_blocks = t_models = 0.0

    def blocks_of(models):
        nonlocal t_blocks
        t0 = time.time()
        pred.build([cfgs[m] for m in models], desc="blocks", progress=False)
        t_blocks += time.time() - t0

    def whole(tag, models):
        nonlocal t_models
        t0 = time.time()
        todo = [m for m in models if state.get(f"{tag}|{m[0]}|{m[1]}") is None]
        for i in range(0, len(todo), args.model_batch):
            chunk = todo[i:i + args.model_batch]
            if runner is not None:  # the device's own whole-model settings (those of the local runner)
                stats = runner.time_models(chunk, args.platform, mc, args.exporter, seed=hash((tag, i)) % 1000)
            elif args.exporter == "direct":
                stats = measure_config_batch({m: cfgs[m] for m in chunk}, args.platform, mc, args.model_runs,
                                             args.model_time, seed=hash((tag, i)) % 1000)
            else:
                stats = {m: _whole(cfgs[m], args.platform, mc, "torch", *m, runs=args.model_runs * args.rounds,
                                   tmin=args.model_time * args.rounds) for m in chunk}
            for m, st in stats.items():
                state.put(f"{tag}|{m[0]}|{m[1]}", _keep(st))
        t_models += time.time() - t0

    t0 = time.time()
    pred.build([fixed] + [cfgs[m] for m in train], desc="blocks", progress=False)
    t_blocks += time.time() - t0
    steps = [("cal", calib[i:i + args.model_batch]) for i in range(0, len(calib), args.model_batch)]
    steps += [("p1", test[i:i + args.model_batch]) for i in range(0, len(test), args.model_batch)]
    if not args.interleave:  # all blocks first, then all whole models
        blocks_of(calib + test)
    for tag, chunk in tqdm(steps, desc="blocks + models", disable=not progress, unit="batch"):
        if args.interleave:  # a batch's blocks and its whole models are measured in the same few minutes
            blocks_of(chunk)
        whole(tag, chunk)
    loads.append(os.getloadavg()[0])
    rev = list(reversed(test))
    for i in tqdm(range(0, len(rev), args.model_batch), desc="second pass", disable=not progress, unit="batch"):
        whole("p2", rev[i:i + args.model_batch])
    new = len(pred.table) - n_before
    print(f"blocks: {len(pred.table)} in the table ({n_before} cached, {new} measured in {t_blocks:.0f} s, "
          f"{t_blocks / max(new, 1):.3f} s/block); session overhead {pred.overhead_ms * 1e3:.1f} us; whole models "
          f"{t_models:.0f} s", flush=True)
    loads.append(os.getloadavg()[0])
    # torch-exported cross-check: the torch export + quantize_onnx_int8 and the directly written model,
    # timed together
    checks = []
    for m in test[: args.torch_check]:
        key = f"torch|{m[0]}|{m[1]}"
        if state.get(key) is None:
            import tempfile

            import torch

            from modules.latency.models import export_subnet, subnet_model_bytes
            from modules.latency.sessions import ort_session, session_runner
            from modules.supernet import build_subnet

            torch.set_num_threads(1)
            with tempfile.TemporaryDirectory() as tmp:
                path = export_subnet(build_subnet(*m), args.platform, tmp, mc.quant_format)
                fns = {"torch": session_runner(ort_session(open(path, "rb").read(), 1)),
                       "direct": session_runner(ort_session(subnet_model_bytes(cfgs[m], args.platform), 1))}
                st = time_rounds(fns, 3, args.model_runs, mc.max_runs, args.model_time, 2, mc.clock)
            state.put(key, {k: _keep(v) for k, v in st.items()})
        checks.append(state.get(key))
    # ablation: blocks as plain standalone quantized models
    ablation = []
    if args.platform == "ort_int8" and args.ablation:
        for m in tqdm(test[: args.ablation], desc="ablation blocks", disable=not progress, unit="model"):
            key = f"ablation|{m[0]}|{m[1]}"
            if state.get(key) is None:
                vals = [measure_block_stats(c, args.platform, mc, boundary="standalone")["min"] for c in cfgs[m]]
                state.put(key, {"standalone_sum": float(sum(vals)), "n": len(vals)})
            ablation.append((m, state.get(key)))
    loads.append(os.getloadavg()[0])

    # ---------------------------------------------------------------- evaluation
    ov = pred.overhead_ms
    keys_train = {block_key(c) for m in calib + train for c in cfgs[m]} | {block_key(c) for c in fixed}
    reg = BlockRegressor().fit([parse_block_key(k) for k in keys_train], [pred.table[k] for k in keys_train])

    def tsum(m):
        return sum(pred.table[block_key(c)] for c in cfgs[m])

    def rsum(m):
        out = [c for c in cfgs[m] if block_key(c) not in keys_train]
        return (sum(pred.table[block_key(c)] for c in cfgs[m] if block_key(c) in keys_train)
                + float(np.maximum(reg.predict_many(out), 0.0).sum()))

    def rawsum(m):
        return sum(pred.raw[block_key(c)] for c in cfgs[m])

    pred.smooth()  # every table block's out-of-fold regression prediction (the predictor's "smoothed" estimate)

    def ssum(m):
        return sum(pred.smoothed[block_key(c)] for c in cfgs[m])

    rows_out, summary = [], {}
    stat = args.stat
    cal_meas = [state.get(f"cal|{m[0]}|{m[1]}")[stat] for m in calib]
    a, b = fit_correction([tsum(m) for m in calib], cal_meas)
    p1 = np.array([state.get(f"p1|{m[0]}|{m[1]}")[stat] for m in test])
    p2 = np.array([state.get(f"p2|{m[0]}|{m[1]}")[stat] for m in test])
    both = (p1 + p2) / 2
    s_tab = np.array([tsum(m) for m in test])
    s_reg = np.array([rsum(m) for m in test])
    s_raw = np.array([rawsum(m) for m in test])
    pred_tab, pred_reg = a * s_tab + b, a * s_reg + b
    a_s, b_s = fit_correction([ssum(m) for m in calib], cal_meas)
    pred_smo = a_s * np.array([ssum(m) for m in test]) + b_s
    res_arr = np.array([int(m[1].rsplit("_r", 1)[1]) for m in test])
    n_blocks = np.array([len(cfgs[m]) for m in test])
    # the same correction fitted on the test models themselves (an upper bound of what a linear fit can do)
    a_in, b_in = fit_correction(s_tab, both)
    cover = np.mean([block_key(c) in keys_train for m in test for c in cfgs[m]])

    print(f"\n=== {args.platform}, {len(test)} test subnets of random {args.superspace} supernets at "
          f"{'/'.join(map(str, args.resolutions))} px, statistic: {stat} of per-run thread CPU time ===")
    print(f"measured latency: {p1.min():.2f} .. {p1.max():.2f} ms (median {np.median(p1):.2f}); "
          f"{n_blocks.min()}..{n_blocks.max()} blocks per subnet")
    print(f"correction fitted on {len(calib)} calibration subnets: latency = {a:.3f} * sum(blocks) + {b:.3f} ms "
          f"(blocks net of the {ov * 1e3:.1f} us session overhead)")
    print(f"\nnoise floor (same model, two passes):   within +-10 %: {100 * within(p1, p2):5.1f} %   "
          f"RMS diff {rmse(p1, p2):.3f} ms ({100 * rel_rms(p1, p2):.1f} %)")
    lines = [("table + correction", pred_tab), ("smoothed table + correction", pred_smo),
             ("regression + correction", pred_reg),
             ("table, uncorrected sum", s_tab + ov), ("raw standalone sum", s_raw),
             ("table, correction fitted on test (bound)", a_in * s_tab + b_in)]
    print(f"{'predictor':42s} {'+-10% vs p1':>11s} {'vs p2':>6s} {'vs mean':>8s} {'RMSE ms':>8s} {'rel RMS':>8s}")
    for name, pr in lines:
        print(f"{name:42s} {100 * within(pr, p1):10.1f}% {100 * within(pr, p2):5.1f}% {100 * within(pr, both):7.1f}% "
              f"{rmse(pr, both):8.3f} {100 * rel_rms(pr, both):7.1f}%")
        summary[name] = {"within10_p1": within(pr, p1), "within10_p2": within(pr, p2), "within10_mean": within(pr, both),
                         "rmse_ms": rmse(pr, both), "rel_rms": rel_rms(pr, both)}
    summary["noise_floor"] = {"within10": within(p1, p2), "rmse_ms": rmse(p1, p2), "rel_rms": rel_rms(p1, p2)}
    print(f"(regression: {100 * (1 - cover):.0f} % of the test subnets' blocks are not in the train table and come "
          f"from the regression)")
    for r in sorted(set(res_arr)):
        k = res_arr == r
        print(f"  {r} px: noise floor {100 * within(p1[k], p2[k]):5.1f} %, table {100 * within(pred_tab[k], both[k]):5.1f} %, "
              f"smoothed {100 * within(pred_smo[k], both[k]):5.1f} %, regression {100 * within(pred_reg[k], both[k]):5.1f} % "
              f"within +-10 % (n={k.sum()}, median {np.median(both[k]):.2f} ms)")
        summary[f"res{r}"] = {"noise_floor": within(p1[k], p2[k]), "table": within(pred_tab[k], both[k]),
                              "smoothed": within(pred_smo[k], both[k]), "regression": within(pred_reg[k], both[k]),
                              "n": int(k.sum())}
    # median statistic, for reference (blocks still on the min table)
    m1 = np.array([state.get(f"p1|{m[0]}|{m[1]}")["median"] for m in test])
    m2 = np.array([state.get(f"p2|{m[0]}|{m[1]}")["median"] for m in test])
    print(f"median of the runs instead of min: noise floor {100 * within(m1, m2):.1f} % within +-10 %, "
          f"RMS diff {100 * rel_rms(m1, m2):.1f} %")
    summary["noise_floor_median_stat"] = {"within10": within(m1, m2), "rel_rms": rel_rms(m1, m2)}

    # block-level regression accuracy on held-out blocks
    held = {block_key(c): c for m in test for c in cfgs[m] if block_key(c) not in keys_train}
    hk = list(held)
    if hk:
        pr = np.maximum(reg.predict_many([held[k] for k in hk]), 1e-6)
        ms = np.array([max(pred.table[k], 1e-6) for k in hk])
        err = pr / ms - 1
        big = ms >= 0.05
        print(f"\nregression on {len(hk)} held-out blocks (fit on {len(keys_train)}): median |err| "
              f"{100 * np.median(np.abs(err)):.1f} %, within +-10 %: {100 * np.mean(np.abs(err) <= 0.1):.1f} %, "
              f"+-20 %: {100 * np.mean(np.abs(err) <= 0.2):.1f} %; blocks >= 50 us: median |err| "
              f"{100 * np.median(np.abs(err[big])):.1f} % (n={big.sum()})")
        per_type = {}
        for k, e in zip(hk, err):
            per_type.setdefault(k.split("_")[0], []).append(abs(e))
        print("  per type, median |err|: " + ", ".join(f"{t} {100 * np.median(v):.0f} % (n={len(v)})"
                                                       for t, v in sorted(per_type.items())))
        summary["regression_blocks"] = {"n": len(hk), "median_abs_err": float(np.median(np.abs(err))),
                                        "within10": float(np.mean(np.abs(err) <= 0.1))}

    # prediction speed
    p = LatencyPredictor(args.platform, table)
    sample = [cfgs[m] for m in test]
    for c in sample:
        p.predict_blocks(c)  # fill the per-key cache
    t0 = time.perf_counter()
    for _ in range(20):
        for c in sample:
            p.predict_blocks(c)
    us = (time.perf_counter() - t0) / (20 * len(sample)) * 1e6
    print(f"\nprediction: {us:.1f} us per subnet (block configs given, per-key cache warm)")
    summary["predict_us"] = us

    if checks:
        r = [c["torch"][stat] / c["direct"][stat] for c in checks]
        print(f"torch-exported vs directly written whole models ({len(r)}): time ratio "
              + ", ".join(f"{x:.3f}" for x in r))
        summary["torch_vs_direct"] = r
    if ablation:
        idx = {m: i for i, m in enumerate(test)}
        rs = [(d["standalone_sum"], s_raw[idx[m]], both[idx[m]]) for m, d in ablation]
        print(f"block boundaries ({len(rs)} subnets): plain standalone INT8 blocks (float I/O, Q/DQ, NCHW) sum to "
              f"{np.mean([x[0] / x[2] for x in rs]):.3f}x the measured model, network-boundary blocks to "
              f"{np.mean([x[1] / x[2] for x in rs]):.3f}x (both with session overhead)")
        summary["ablation"] = {"standalone_over_measured": float(np.mean([x[0] / x[2] for x in rs])),
                               "network_over_measured": float(np.mean([x[1] / x[2] for x in rs]))}

    # ---------------------------------------------------------------- outputs
    for i, m in enumerate(test):
        rows_out.append({"supernet": m[0], "subnet": m[1], "resolution": res_arr[i], "blocks": n_blocks[i],
                         "measured_p1_ms": f"{p1[i]:.4f}", "measured_p2_ms": f"{p2[i]:.4f}",
                         "pred_table_ms": f"{pred_tab[i]:.4f}", "pred_regression_ms": f"{pred_reg[i]:.4f}",
                         "blocks_sum_ms": f"{s_tab[i]:.4f}"})
    with open(os.path.join(args.output_dir, f"results_{args.platform}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_out[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows_out)
    summary.update({"correction": [a, b], "overhead_ms": ov, "load_average": loads,
                    "seconds": {"blocks": t_blocks, "models": t_models, "total": time.time() - t_start}})
    with open(os.path.join(args.output_dir, f"summary_{args.platform}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nload average during the run: {' -> '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores; "
          f"total {time.time() - t_start:.0f} s (blocks {t_blocks:.0f} s, whole models {t_models:.0f} s)")
    print(f"wrote {args.output_dir}/results_{args.platform}.csv and summary_{args.platform}.json")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
