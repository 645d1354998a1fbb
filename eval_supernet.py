"""Evaluate a trained supernet (like the original): accuracy or latency of its max, min and given subnets.

Examples::

    # top-1 on the val split after BN recalibration (fp32 with checkpoint.pth, LSQ+ fake-quant with lsq.pth and
    # --quant_mode [lsq])
    python eval_supernet.py --mode acc --supernet tiny-123450-000000 --subnets d1#1#..._r48 best.json --quant_mode
    # predicted latency (and measured ONNX Runtime latency with --measure) of the same subnets
    python eval_supernet.py --mode lat --supernet tiny-123450-000000 --subnets best.json \\
        --latency_predictor ort_int8 --measure

`--mode acc` runs in one process or under torchrun (the subnets spread over the ranks) and rank 0 writes a table and
``<output_dir>/eval_supernet/<supernet>/acc_<quant mode>_<split>.csv`` (rewritten, never appended):
name, subnet, resolution, top-1, MMACs, Mparams (+ predicted latency with --latency_predictor).
`--mode lat` needs no checkpoint or data: predicted latency per platform of `--latency_predictor`
(per block with `--verbose`), `--random N` random subnets for a latency CDF plot, and with `--measure` the
latency measured on this machine for each measured platform (ort_int8, ort_fp32, tflite_int8, tflite_fp32;
exported and timed as the predictor's table was, `modules.latency.local.measure_subnet`) and the
relative error of the prediction — written to ``lat.csv`` (and ``latency_cdf.png``).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from modules.checkpoint import atomic_write_bytes, atomic_write_text
from modules.cli import add_aliases, add_common_args, run_main, setup_logging
from modules.dist import destroy_distributed, init_distributed_mode, is_main_process, map_over_ranks
from modules.subnet_search import (SubnetEvaluator, SubnetSpace, add_supernet_args, build_eval_batches, calib_kwargs,
                                   load_predictor_for, load_supernet_checkpoint, resolve_checkpoint, resolve_data,
                                   resolve_subnet)

log = logging.getLogger("eval_supernet")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("eval_supernet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["acc", "lat"], default="acc")
    add_supernet_args(p)
    p.add_argument("--subnets", nargs="+", default=[], metavar="SUBNET",
                   help="subnet encodings, 'max', 'min', or JSON files with a 'subnet' key (search best.json)")
    p.add_argument("--no_maxmin", action="store_true", help="skip the max and min subnets")
    p.add_argument("--split", choices=["val", "holdout"], default="val",
                   help="acc: evaluate on the val split or on the search's held-out train images")
    p.add_argument("--max_eval_images", type=int, default=None, help="acc: evaluate on the first N images only")
    p.add_argument("--latency_predictor", nargs="+", default=None, metavar="PLATFORM",
                   help="predictor platforms (ort_int8, ort_fp32, tflite_int8, tflite_fp32, macs); lat mode "
                        "default: ort_int8")
    p.add_argument("--latency_table_dir", default=None)
    p.add_argument("--verbose", action="store_true", help="lat: per-block predicted latency")
    p.add_argument("--random", type=int, default=0, help="lat: also N random subnets, with a latency CDF plot")
    p.add_argument("--measure", action="store_true",
                   help="lat: also measure each subnet on the (measured) predictor platforms, the way the "
                        "predictor's table was measured")
    p.add_argument("--threads", type=int, default=1, help="lat --measure: threads (if the predictor has no setting)")
    p.add_argument("--warmup", type=int, default=5, help="lat --measure: warm-up runs")
    p.add_argument("--runs", type=int, default=20, help="lat --measure: minimum timed runs")
    p.add_argument("--csv", default=None, help="CSV path (default under <output_dir>/eval_supernet/<supernet>/)")
    add_common_args(p)
    p.set_defaults(quant_mode="fp32")  # as the original: the fp32 checkpoint, LSQ+ with (a bare) --quant_mode
    for ours, *theirs in (("--subnets", "--subnet_choice"), ("--supernet_dir", "--resume"),
                          ("--batch_size", "--batch_size_per_gpu"),
                          ("--num_calib_batches", "--post_bn_calibration_batch_num"),
                          ("--workers", "--data_loader_workers_per_gpu")):
        add_aliases(p, ours, *theirs)  # the original eval_supernet.py's names
    return p


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def subnet_list(space: SubnetSpace, args) -> list[tuple[str, object]]:
    items = [] if args.no_maxmin else [("max", space.extreme(True)), ("min", space.extreme(False))]
    for s in args.subnets:
        cfg = resolve_subnet(space, s)
        if s.endswith(".json"):  # e.g. search_subnet/<supernet>/c1_d0.1/best.json -> c1_d0.1/best
            name = f"{Path(s).parent.name}/{Path(s).stem}"
        else:
            name = s if s in ("max", "min") else f"subnet{len(items)}"
        items.append((name, cfg))
    if not items:
        raise ValueError("nothing to evaluate: --no_maxmin without --subnets")
    return items


def _predictors(platforms: list[str], space: SubnetSpace, args, given: dict | None) -> dict:
    given = given or {}
    return {p: given[p] if p in given else load_predictor_for(p, space.choice.superspace, args.latency_table_dir)
            for p in platforms}


# ------------------------------------------------------------------------------------------ accuracy
def eval_acc(args, predictor_platforms: list[str], predictors: dict | None = None, device="cpu") -> dict:
    from modules.counter import count_macs, count_params
    ckpt_path = resolve_checkpoint(args)
    net, info = load_supernet_checkpoint(ckpt_path, args.supernet, device, log=log.warning)
    space = SubnetSpace(net.choice, net.hw_list)
    items = subnet_list(space, args)
    data = resolve_data(args, info, log=log.warning)
    image_size = data["image_size"] or max(space.hw_list)
    calib, val, dinfo = build_eval_batches(
        data["data_dir"], image_size, split=args.split, batch_size=args.batch_size, workers=args.workers,
        max_eval_images=args.max_eval_images, cache_limit_gb=args.cache_limit_gb, log=log.warning,
        **calib_kwargs(data))
    log.info("%s (%s): %d %s images, BN calibration on %d train images", info["supernet"], info["quant_mode"],
             dinfo["eval_images"], args.split, dinfo["calib_images"])
    evaluator = SubnetEvaluator(net, calib, val, device, args.cache_limit_gb)
    predictors = _predictors(predictor_platforms, space, args, predictors)
    header = ["name", "resolution", "top1", "MMACs", "Mparams"] + [f"lat_{p}_ms" for p in predictors] + ["subnet"]

    def row(item) -> list:
        name, cfg = item
        t0 = time.perf_counter()
        acc = evaluator(cfg)
        macs = count_macs(net, (1, 3, cfg.resolution, cfg.resolution)) / 1e6
        params = count_params(net.get_active_subnet(preserve_weight=False)) / 1e6
        lats = [float(p.predict_subnet(net)) for p in predictors.values()]
        log.info("%s: top-1 %.2f %% (%.1f s)", name, acc, time.perf_counter() - t0)
        return [name, cfg.resolution, acc, macs, params] + lats + [str(cfg)]

    rows = map_over_ranks(row, items)  # the subnets spread over the ranks; rank 0 writes the table
    out = Path(args.csv) if args.csv else (Path(args.output_dir) / "eval_supernet" / info["supernet"]
                                          / f"acc_{info['quant_mode']}_{args.split}.csv")
    if is_main_process():
        print(format_table(header[:-1], [r[:-1] for r in rows]))
        atomic_write_text(out, _csv(["supernet", "quant_mode", "split"] + header,
                                    [[info["supernet"], info["quant_mode"], args.split]
                                     + [f"{c:.6g}" if isinstance(c, float) else c for c in r] for r in rows]))
        log.info("wrote %s", out)
    return {"csv": str(out), "rows": [dict(zip(header, r)) for r in rows], "info": info}


# ------------------------------------------------------------------------------------------ latency
def measure(model: torch.nn.Module, platform: str, predictor, args) -> float:
    """Measured latency (ms) of a standalone model on `platform`, exported and timed the way the latency
    predictor's table was measured (`modules.latency.local.measure_subnet`, the predictor's settings)."""
    from modules.latency.local import measure_subnet
    from modules.latency.timing import MeasureConfig

    mc = getattr(predictor, "mc", None)
    if not isinstance(mc, MeasureConfig):
        mc = MeasureConfig(threads=args.threads, min_runs=args.runs, warmup=args.warmup,
                           clock="cpu" if args.threads == 1 else "wall")
    stats = measure_subnet(model.eval(), platform, mc, min_runs=args.runs, warmup=args.warmup)
    return float(stats[mc.stat])


def eval_lat(args, platforms: list[str], predictors: dict | None = None) -> dict:
    from modules.counter import count_macs
    from modules.encoding import parse_supernet
    from modules.supernet import SuperNet

    if args.checkpoint or (args.supernet is None):
        ckpt_path = resolve_checkpoint(args)
        net, info = load_supernet_checkpoint(ckpt_path, args.supernet, "cpu", log=log.warning)
    else:  # latency needs no trained weights
        net = SuperNet(parse_supernet(args.supernet)).eval()
        info = {"supernet": str(net.choice), "quant_mode": "fp32"}
    space = SubnetSpace(net.choice, net.hw_list)
    items = subnet_list(space, args)
    rng = random.Random(args.seed)
    predictors = _predictors(platforms, space, args, predictors)
    header = ["name", "resolution", "MMACs"] + [f"pred_{p}_ms" for p in predictors]
    measured = []
    if args.measure:
        from modules.latency.keys import MEASURED_PLATFORMS

        measured = [p for p in predictors if p in MEASURED_PLATFORMS]
        if not measured:
            raise ValueError(f"--measure: none of the platforms {list(predictors)} is measured on a device; use "
                             f"one of {', '.join(MEASURED_PLATFORMS)}")
        header += [f"meas_{p}_ms" for p in measured] + [f"err_{p}" for p in measured]
    rows = []
    for name, cfg in items:
        net.set_active_subnet(cfg)
        preds = {p: float(pred.predict_subnet(net)) for p, pred in predictors.items()}
        row = [name, cfg.resolution, count_macs(net, (1, 3, cfg.resolution, cfg.resolution)) / 1e6] + \
            list(preds.values())
        if args.verbose:
            blocks = net.block_configs()
            for p, pred in predictors.items():
                print(f"{name} ({p}):")
                for b in blocks:
                    print(f"  {b['name']:<18} cin {b['cin']:>4} cout {b['cout']:>4} k {b['kernel']} e {b['expand']} "
                          f"s {b['stride']} hw {b['hw']:>3}: {float(pred.predict_blocks([b])):.4f} ms")
                print(f"  total {preds[p]:.4f} ms")
        if measured:
            sub = net.get_active_subnet(preserve_weight=True)
            meas = {p: measure(sub, p, predictors[p], args) for p in measured}
            row += list(meas.values()) + [preds[p] / meas[p] - 1.0 for p in measured]
            log.info("%s: %s", name, ", ".join(f"{p} predicted {preds[p]:.3f} ms, measured {meas[p]:.3f} ms"
                                               for p in measured))
        rows.append(row + [str(cfg)])
    print(format_table(header, [r[:-1] for r in rows]))
    root = Path(args.output_dir) / "eval_supernet" / info["supernet"]
    out = Path(args.csv) if args.csv else root / "lat.csv"
    atomic_write_text(out, _csv(["supernet"] + header + ["subnet"],
                                [[info["supernet"]] + [f"{c:.6g}" if isinstance(c, float) else c for c in r]
                                 for r in rows]))
    log.info("wrote %s", out)
    result = {"csv": str(out), "rows": [dict(zip(header + ["subnet"], r)) for r in rows]}
    if args.random:
        lat = {p: [] for p in predictors}
        for _ in range(args.random):
            net.set_active_subnet(space.random(rng))
            for p, pred in predictors.items():
                lat[p].append(float(pred.predict_subnet(net)))
        result["random"] = {p: {"min": min(v), "median": statistics.median(v), "max": max(v)} for p, v in lat.items()}
        for p, s in result["random"].items():
            log.info("%d random subnets, %s: %.4g / %.4g / %.4g ms (min / median / max)", args.random, p,
                     s["min"], s["median"], s["max"])
        _plot_cdf(lat, root / "latency_cdf.png", info["supernet"])
    return result


def _plot_cdf(lat: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, v in lat.items():
        v = sorted(v)
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=p)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("fraction of random subnets")
    ax.set_title(f"{title}: latency CDF")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(args, predictors: dict | None = None) -> dict:
    """`predictors` ({platform: object with predict_subnet/predict_blocks}) replaces the loaded ones (tests)."""
    if args.mode == "lat":  # one process: latency needs no data, --measure times on this machine's CPU
        setup_logging(None, "eval_supernet")
        torch.manual_seed(args.seed)
        return eval_lat(args, args.latency_predictor or ["ort_int8"], predictors)
    dinfo = init_distributed_mode(args.device)
    try:
        setup_logging(None, "eval_supernet")
        torch.manual_seed(args.seed)
        return eval_acc(args, args.latency_predictor or [], predictors, dinfo.device)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_main(main, get_args_parser())
