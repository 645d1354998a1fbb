"""Subnet search (reference spec §9): evolutionary search over the subnets of a trained supernet, per latency
target c, for the best held-out top-1 among subnets whose predicted latency lies in [c - d, c].

Example (digits demo, tiny superspace, two targets, small search)::

    python search_subnet.py --supernet tiny-123450-000000 --latency_predictor ort_int8 \\
        --latency_constraint 0.8 1.2 --latency_delta 0.1 --tiny
    python search_subnet.py ... --resume          # continue a stopped search

Fitness = top-1 of the subnet after BN recalibration (LSQ+ fake-quant when the checkpoint is LSQ+) on train
images held out from training: by default exactly the supernet training's held-out images (its `--valid_size`
and `--seed`), never the val split, which is only used after the search to report the top `--eval_top`
subnets. BN-calibration batches and held-out images are loaded once, kept in memory and resized once per
resolution. Defaults as the original: population 512, 20 iterations, 256 parents, 128 mutations + 128
crossovers, mutate prob 0.3, resolution mutate prob 0.5 (over the superspace's whole resolution list), 20 BN
calibration batches. `--tiny` gives a small search (population 32, 5 iterations, 8 + 8 children, 5 BN
calibration batches) unless those flags are given. Candidates outside the window are never evaluated (latency
prediction is cheap); if no random subnet falls in the window after `--max_tries` draws, the run stops at once
with the supernet's latency range. `--random_baseline N` also scores N random in-window subnets.

Outputs per target, under ``<output_dir>/search_subnet/<supernet>/c<c>_d<d>/``: ``history.csv`` (every
evaluated subnet: index, iteration, subnet, predicted latency, fitness), ``best.json`` (the best subnet and the
data settings; usable by ``build_from_config`` and by ``export_subnet.py --subnet best.json``), ``top.csv``
(top subnets with val top-1), ``pareto.png`` (accuracy vs latency), ``state.json`` (for ``--resume``),
``eval_cache.json`` (scores of the top subnets on val and of the random baseline: not evaluated again).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from modules.checkpoint import atomic_write_bytes, atomic_write_text
from modules.cli import add_aliases, add_common_args, nonneg_int, positive_int, run_main, save_run_info, setup_logging
from modules.dist import destroy_distributed, init_distributed_mode, is_main_process, map_over_ranks
from modules.original_cli import add_original_option, parent_of
from modules.subnet_search import (WINDOW_SEED_OFFSET, LatencyOracle, SearchSettings, SubnetEvaluator, SubnetSpace,
                                   add_supernet_args, build_eval_batches, calib_kwargs, check_window,
                                   load_predictor_for, load_supernet_checkpoint, resolve_checkpoint, resolve_data,
                                   run_subnet_search, sample_in_window, search_root, search_run_dir)

log = logging.getLogger("search_subnet")

ORIGINAL = dict(population=512, iterations=20, num_mutations=128, num_crossovers=128)
TINY = dict(population=32, iterations=5, num_mutations=8, num_crossovers=8)
TINY_CALIB_BATCHES = 5  # --tiny: BN calibration on 5 batches (>= 160 images, the original's minimum)
PLATFORMS = ("ort_int8", "ort_fp32", "tflite_int8", "tflite_fp32", "macs")


def _pos_float(text: str) -> float:
    v = float(text)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return v


def _prob(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1]")
    return v


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("search_subnet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_supernet_args(p)
    p.add_argument("--latency_predictor", default="ort_int8", help=f"platform: {', '.join(PLATFORMS)}")
    p.add_argument("--latency_table_dir", default=None, help="latency predictor table dir (predictor default)")
    p.add_argument("--latency_constraint", type=_pos_float, nargs="+", required=True, help="targets c (ms)")
    p.add_argument("--latency_delta", type=float, default=5.0, help="window [c - d, c] (ms)")
    g = p.add_argument_group("evolution (defaults: the original's, or --tiny)")
    g.add_argument("--population", type=positive_int, default=None, help="512 (--tiny: 32)")
    g.add_argument("--iterations", type=positive_int, default=None, help="20 (--tiny: 5)")
    g.add_argument("--num_mutations", type=nonneg_int, default=None, help="128 (--tiny: 8)")
    g.add_argument("--num_crossovers", type=nonneg_int, default=None, help="128 (--tiny: 8)")
    g.add_argument("--parent_ratio", type=_prob, default=0.5)
    g.add_argument("--mutate_prob", type=_prob, default=0.3)
    g.add_argument("--resolution_mutate_prob", type=_prob, default=0.5)
    g.add_argument("--max_crossover_tries", type=positive_int, default=50)
    g.add_argument("--max_tries", type=positive_int, default=5000,
                   help="draws per new candidate, and random draws to find the window before giving up")
    g.add_argument("--tiny", action="store_true",
                   help=f"small search for the demo (see above; also --num_calib_batches {TINY_CALIB_BATCHES})")
    p.add_argument("--eval_top", type=nonneg_int, default=10, help="evaluate the top N on the val split at the end")
    p.add_argument("--random_baseline", type=nonneg_int, default=0,
                   help="also evaluate N random in-window subnets (holdout and val) for comparison")
    p.add_argument("--resume", action="store_true", help="continue the searches of state.json")
    p.add_argument("--fresh", action="store_true", help="discard an existing state.json and start over")
    p.add_argument("--save_interval", type=float, default=30.0, help="seconds between state saves")
    p.add_argument("--no_progress", action="store_true")
    add_common_args(p)
    _add_original_names(p)
    return p


def _add_original_names(p: argparse.ArgumentParser) -> None:
    """The original search_subnet.py's names of our options."""
    for ours, *theirs in (("--supernet_dir", "--checkpoint_path"), ("--population", "--population_size"),
                          ("--iterations", "--max_time_budget"), ("--num_crossovers", "--crossover_size"),
                          ("--mutate_prob", "--arch_mutate_prob"), ("--max_crossover_tries", "--max_crossover_try"),
                          ("--eval_top", "--test_top_num"), ("--seed", "--manual_seed"),
                          ("--no_progress", "--no-progress")):
        add_aliases(p, ours, *theirs)
    add_original_option(p, "--output_path", "output_dir", type=parent_of("search_subnet"), metavar="DIR",
                        help="<output_dir>/search_subnet, where the searches' dirs go")
    add_original_option(p, "--mutation_size", "num_mutations", type=lambda t: nonneg_int(str(int(float(t)))),
                        metavar="N", help="--num_mutations")


# ------------------------------------------------------------------------------------------ helpers
def settings_from_args(args) -> SearchSettings:
    base = TINY if args.tiny else ORIGINAL
    vals = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    return SearchSettings(parent_ratio=args.parent_ratio, mutate_prob=args.mutate_prob,
                          resolution_mutate_prob=args.resolution_mutate_prob,
                          max_crossover_tries=args.max_crossover_tries, max_tries=args.max_tries, **vals)


def predictor_fingerprint(predictor) -> str:
    """Type and table digest of the latency predictor: a resumed search refuses another table (its latencies,
    hence the window, would differ)."""
    import hashlib

    path = getattr(predictor, "table_path", None)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).is_file() else "-"
    return f"{type(predictor).__name__}:{getattr(predictor, 'platform', '')}:{digest}"


class EvalCache:
    """Held-out and val top-1 of the subnets scored after the evolution (top `--eval_top` on val, the random
    baseline), kept in ``<run_dir>/eval_cache.json`` so that a resumed or repeated run does not evaluate them
    again. Keyed by the data settings and the checkpoint file (path, size, mtime): any change starts afresh."""

    def __init__(self, path: Path, config: dict):
        self.path, self.config = path, json.loads(json.dumps(config))
        self.tables: dict[str, dict[str, float]] = {"holdout": {}, "val": {}}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError as e:
                raise ValueError(f"{path} is not a valid score cache ({e}); delete it or rerun with --fresh") from e
            if saved.get("config") == self.config:
                self.tables = {k: dict(saved.get(k, {})) for k in self.tables}
            else:
                log.info("%s: data or checkpoint changed, its scores are not reused", path)
        self.hits = 0

    def get_many(self, table: str, keys: list[str], evaluate) -> list[float]:
        """The scores of `keys`, those not cached computed by `evaluate(key)` spread over the ranks (every rank
        gets every score; rank 0 alone writes the cache)."""
        values = self.tables[table]
        todo = list(dict.fromkeys(k for k in keys if k not in values))
        self.hits += sum(1 for k in keys if k in values)
        for key, score in zip(todo, map_over_ranks(lambda k: float(evaluate(k)), todo)):
            values[key] = score
        if todo and is_main_process():
            atomic_write_text(self.path, json.dumps({"config": self.config, **self.tables}, indent=1) + "\n")
        return [values[k] for k in keys]


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def summarize(outcome, net_info: dict, platform: str, top_rows: list | None, data: dict | None = None) -> dict:
    """The content of best.json."""
    evo = outcome.evo
    best = evo.best()
    top = evo.best(10)
    result = {"supernet": net_info["supernet"], "subnet": best.key, "num_classes": net_info["num_classes"],
              "fitness": best.score, "latency_ms": best.info["latency"], "platform": platform,
              "target_ms": outcome.target, "delta_ms": outcome.delta, "window_ms": list(outcome.window),
              "quant_mode": net_info["quant_mode"], "checkpoint": net_info["path"],
              "evaluated": len(evo.history), "stop_reason": evo.stop_reason,
              "top": [{"subnet": r.key, "latency_ms": r.info["latency"], "fitness": r.score} for r in top],
              "trajectory": outcome.trajectory, "data": data or {}}
    if top_rows:
        result["top_val"] = top_rows
    return result


def write_outputs(outcome, run_dir: Path, result: dict, top_rows: list | None) -> None:
    """history.csv, best.json (`result`) and top.csv of one search."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "history.csv", _csv(
        ["index", "iteration", "subnet", "latency_ms", "fitness"],
        [[r.index, r.info["iteration"], r.key, f"{r.info['latency']:.6f}", f"{r.score:.4f}"]
         for r in outcome.evo.history]))
    atomic_write_text(run_dir / "best.json", json.dumps(result, indent=1) + "\n")
    if top_rows:
        atomic_write_text(run_dir / "top.csv", _csv(
            ["rank", "subnet", "latency_ms", "holdout_top1", "val_top1"],
            [[i + 1, r["subnet"], f"{r['latency_ms']:.6f}", f"{r['fitness']:.4f}", f"{r['val_top1']:.4f}"]
             for i, r in enumerate(top_rows)]))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(latency, acc) points not dominated (lower latency and higher accuracy), sorted by latency."""
    front, best = [], -float("inf")
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def plot_pareto(outcomes: list, path: Path, platform: str, baselines: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, oc in enumerate(outcomes):
        hist = oc.evo.history
        lat = [r.info["latency"] for r in hist]
        acc = [r.score for r in hist]
        it = [r.info["iteration"] for r in hist]
        sc = ax.scatter(lat, acc, c=it, cmap="viridis", s=10, alpha=0.6,
                        label="evaluated subnets" if i == 0 else None)
        front = pareto_front(list(zip(lat, acc)))
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C1", lw=1,
                label="Pareto front" if i == 0 else None)
        b = oc.evo.best()
        ax.scatter([b.info["latency"]], [b.score], marker="*", s=180, color="C3", edgecolor="k", zorder=5,
                   label="best" if i == 0 else None)
        lo, hi = oc.window
        ax.axvspan(lo, hi, color="grey", alpha=0.08)
        ax.axvline(hi, color="grey", ls="--", lw=0.8)
        if baselines and oc.target in baselines:
            bl = baselines[oc.target]
            ax.scatter([r["latency_ms"] for r in bl], [r["fitness"] for r in bl], marker="x", color="k", s=20,
                       label="random in window" if i == 0 else None)
    if outcomes and len(outcomes[0].evo.history) > 1:
        from matplotlib.ticker import MaxNLocator
        fig.colorbar(sc, ax=ax, label="iteration", ticks=MaxNLocator(integer=True))
    ax.set_xlabel(f"predicted latency (ms, {platform})")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("subnet search: accuracy vs latency")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ main
def main(args, predictor=None) -> dict:
    """Under torchrun every rank runs the same evolution; the candidates of each step are spread over the ranks
    and their scores gathered, so every rank holds the whole history and rank 0 alone writes the files."""
    info = init_distributed_mode(args.device)
    try:
        return _search(args, predictor, info.device)
    finally:
        destroy_distributed()


def _search(args, predictor, device) -> dict:
    t_start = time.perf_counter()
    settings = settings_from_args(args)
    settings.check()
    if args.latency_delta < 0:
        raise ValueError(f"--latency_delta {args.latency_delta} must be >= 0")
    if args.resume and args.fresh:
        raise ValueError("--resume and --fresh exclude each other")
    torch.manual_seed(args.seed)
    ckpt_path = resolve_checkpoint(args)
    net, net_info = load_supernet_checkpoint(ckpt_path, args.supernet, device, log=log.warning)
    encoding = net_info["supernet"]
    root = search_root(args.output_dir, encoding)
    root.mkdir(parents=True, exist_ok=True)
    setup_logging(root, "search_subnet")
    save_run_info(args, root)
    log.info("supernet %s from %s (%s%s, %d classes)", encoding, ckpt_path, net_info["quant_mode"],
             f"/{net_info['quant_preset']}" if net_info["quant_preset"] else "", net_info["num_classes"])
    if predictor is None:
        predictor = load_predictor_for(args.latency_predictor, net.space.name, args.latency_table_dir)
    space = SubnetSpace(net.choice, net.hw_list)
    lat = LatencyOracle(net, predictor)
    for target in args.latency_constraint:  # fail fast, before loading any data
        state = search_run_dir(args.output_dir, encoding, target, args.latency_delta) / "state.json"
        if not (args.resume and state.is_file()):
            check_window(space, lat, target - args.latency_delta, target,
                         random.Random(args.seed + WINDOW_SEED_OFFSET), settings.max_tries, args.latency_predictor)
    ev = _Evaluators(args, net, net_info, space, device, ckpt_path)
    st = Path(ckpt_path).stat()
    ckpt_stat = [st.st_size, st.st_mtime_ns]
    run_config = dict(ev.data_config, predictor=predictor_fingerprint(predictor))
    fitness_cache: dict[str, float] = {}
    results, outcomes, baselines = {}, [], {}
    for target in args.latency_constraint:
        run_dir = search_run_dir(args.output_dir, encoding, target, args.latency_delta)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = run_dir / "state.json"
        if args.fresh and is_main_process():
            for f in (state, run_dir / "eval_cache.json"):
                f.unlink(missing_ok=True)
        log.info("target %g ms, window [%g, %g] ms (%s): population %d, %d iterations, %d parents, %d mutations + "
                 "%d crossovers", target, target - args.latency_delta, target, args.latency_predictor,
                 settings.population, settings.iterations, settings.parent_size, settings.num_mutations,
                 settings.num_crossovers)
        t0 = time.perf_counter()
        n_eval0 = ev.holdout.num_evaluations
        outcome = run_subnet_search(
            space, lat, ev.holdout, target, args.latency_delta, settings, seed=args.seed, state_path=state,
            resume=args.resume, save_interval=args.save_interval, progress=not args.no_progress,
            config=run_config, platform=args.latency_predictor, fitness_cache=fitness_cache, log=log.info)
        dt = time.perf_counter() - t0
        n_eval = ev.holdout.num_evaluations - n_eval0
        best = outcome.evo.best()
        log.info("target %g ms: %d subnets in the history (%d evaluated by this rank, %.2f s each), best %.2f %% at "
                 "%.4g ms: %s", target, len(outcome.evo.history), n_eval, dt / max(1, n_eval), best.score,
                 best.info["latency"], best.key)
        if outcome.evo.stop_reason:
            log.warning("target %g ms: search stopped early: %s", target, outcome.evo.stop_reason)
        scores = EvalCache(run_dir / "eval_cache.json", dict(ev.data_config, checkpoint_stat=ckpt_stat))
        top_rows = _top_on_val(args, outcome, scores, ev)
        rows = _random_baseline(args, space, lat, target, scores, ev, fitness_cache)
        if scores.hits:
            log.info("%d score(s) reused from %s", scores.hits, scores.path)
        if rows is not None:
            baselines[target] = rows
        results[target] = _write_target(args, outcome, run_dir, net_info, top_rows, rows, ev.data_config, baselines)
        outcomes.append(outcome)
    if len(outcomes) > 1 and is_main_process():
        plot_pareto(outcomes, root / "pareto.png", args.latency_predictor, baselines)
    log.info("done in %.1f s", time.perf_counter() - t_start)
    return results


class _Evaluators:
    """The fitness evaluator (held-out train images) and, built on first use, the val evaluator."""

    def __init__(self, args, net, net_info: dict, space: SubnetSpace, device, ckpt_path: Path):
        self.args, self.net, self.device = args, net, device
        self.data = data = resolve_data(args, net_info, log=log.warning,
                                        defaults={"num_calib_batches": TINY_CALIB_BATCHES} if args.tiny else None)
        self.image_size = data["image_size"] or max(space.hw_list)
        t0 = time.perf_counter()
        self.calib, holdout, self.data_info = build_eval_batches(
            data["data_dir"], self.image_size, split="holdout", batch_size=args.batch_size, workers=args.workers,
            cache_limit_gb=args.cache_limit_gb, log=log.warning, **calib_kwargs(data))
        log.info("fitness data: %d held-out train images, %d BN-calibration images (%.1f s)",
                 self.data_info["eval_images"], self.data_info["calib_images"], time.perf_counter() - t0)
        self.holdout = SubnetEvaluator(net, self.calib, holdout, device, args.cache_limit_gb)
        self._val = None
        self.data_config = dict(data, checkpoint=str(Path(ckpt_path).resolve()),
                                data_dir=str(Path(data["data_dir"]).resolve()), image_size=self.image_size,
                                holdout_size=self.data_info["holdout_size"])

    def val(self, key: str) -> float:
        if self._val is None:
            a, data = self.args, self.data
            _, val, _ = build_eval_batches(
                data["data_dir"], self.image_size, split="val", holdout_size=self.data_info["holdout_size"],
                num_calib_batches=1, calib_batch_size=data["calib_batch_size"], batch_size=a.batch_size,
                seed=data["data_seed"], workers=a.workers, cache_limit_gb=a.cache_limit_gb, log=log.warning)
            self._val = SubnetEvaluator(self.net, self.calib, val, self.device, a.cache_limit_gb)
        return self._val(key)


def _top_on_val(args, outcome, scores: EvalCache, ev: _Evaluators) -> list[dict]:
    """The top `--eval_top` subnets of the search with their val top-1."""
    if not args.eval_top:
        return []
    top = outcome.evo.best(args.eval_top)
    vals = scores.get_many("val", [r.key for r in top], ev.val)
    rows = [{"subnet": r.key, "latency_ms": r.info["latency"], "fitness": r.score, "val_top1": v}
            for r, v in zip(top, vals)]
    log.info("top %d on val: best subnet %.2f %%", len(rows), rows[0]["val_top1"])
    return rows


def _random_baseline(args, space, lat, target: float, scores: EvalCache, ev: _Evaluators,
                     fitness_cache: dict) -> list[dict] | None:
    """`--random_baseline` random in-window subnets with their held-out and val top-1 (None without it)."""
    if not args.random_baseline:
        return None
    rng = random.Random(args.seed + 104729)
    cfgs = sample_in_window(space, lat, target - args.latency_delta, target, rng, args.random_baseline,
                            args.max_tries * args.random_baseline)
    keys = [str(c) for c in cfgs]
    todo = [k for k in keys if k not in fitness_cache]
    for k, acc in zip(todo, scores.get_many("holdout", todo, ev.holdout)):
        fitness_cache[k] = acc
    vals = scores.get_many("val", keys, ev.val)
    return [{"subnet": k, "latency_ms": lat(k), "fitness": fitness_cache[k], "val_top1": v}
            for k, v in zip(keys, vals)]


def _write_target(args, outcome, run_dir: Path, net_info: dict, top_rows: list, rows: list | None,
                  data_config: dict, baselines: dict) -> dict:
    """best.json, history.csv, top.csv, random_baseline.csv, pareto.png of one target (rank 0 writes)."""
    res = summarize(outcome, net_info, args.latency_predictor, top_rows, data_config)
    med = None
    if rows is not None:
        med = statistics.median(r["val_top1"] for r in rows) if rows else float("nan")
        res["random_baseline_val_median"] = med
        log.info("random baseline: %d in-window subnets, median val top-1 %.2f %%", len(rows), med)
    if not is_main_process():
        return res
    write_outputs(outcome, run_dir, res, top_rows)
    if rows is not None:
        atomic_write_text(run_dir / "random_baseline.csv", _csv(
            ["subnet", "latency_ms", "holdout_top1", "val_top1"],
            [[r["subnet"], f"{r['latency_ms']:.6f}", f"{r['fitness']:.4f}", f"{r['val_top1']:.4f}"] for r in rows]))
    plot_pareto([outcome], run_dir / "pareto.png", args.latency_predictor, baselines)
    log.info("outputs in %s", run_dir)
    return res


if __name__ == "__main__":
    run_main(main, get_args_parser())
