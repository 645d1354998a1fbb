"""Space search (as the original's `search_block_kd.py`): aging evolution over (block type, width window) per stage1..6,
scored by the Q-T score computed from the block-KD LUTs only.

Example (search, then score given spaces)::

    python search_block_kd.py --superspace onnxw --lut_dir checkpoints/lut \\
        --latency_constraints 15 20 --output_dir checkpoints
    python search_block_kd.py --superspace onnxw --lut_dir checkpoints/lut \\
        --latency_constraints 15 20 --score_only onnxw-151122-023231 onnxw-151122-000000
    # the authors' released LUTs (<SpaceEvo>/data/block_lut/{onnxw,mobilew}), fixed stages from our table
    python search_block_kd.py --superspace onnxw --lut_dir SpaceEvo/data/block_lut --latency_constraints 10 \\
        --latency_predictor ort_int8 --latency_table_dir checkpoints/latency

Outputs under ``<output_dir>/space_search/<superspace>[_fp32]/c<c1+c2..>_t<t>_a<a>/``: ``ranked.csv`` (every
evaluated space, best first), ``history.csv`` (one line per evaluation), ``score.png``, ``result.yaml``
(best encoding), ``args.yaml`` (reusable with ``-c``) and ``state.json`` (for ``--resume``; ``--cycles``
may be raised on resume).
Differences from the original: block choices of random individuals are really random, duplicates are
never re-evaluated, mutation never loops on single-choice stages, and the search stops with a message
when no new candidate can be produced.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

from modules.cli import add_aliases, positive_float, positive_int, run_main, save_run_info
from modules.encoding import SupernetChoice, parse_supernet
from modules.evolution import Evolution, aging_evolution
from modules.lut import load_lut_dir
from modules.original_cli import add_original_option, platform_name
from modules.qt_score import QTScorer, fixed_stage_latency, load_fixed_latency
from modules.superspace import SUPERSPACES, SuperSpace, get_superspace


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("search_block_kd", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--superspace", required=True, choices=sorted(SUPERSPACES))
    p.add_argument("--lut_dir", default="checkpoints/lut",
                   help="holds <superspace>/stage{X}_{B}_{W}.csv (eval_block_kd.py writes <output_dir>/lut), or is "
                        "that <superspace> folder itself; the authors' released data/block_lut reads unchanged")
    p.add_argument("--fp32_lut", action="store_true", help="read <lut_dir>/<superspace>_fp32 (LUT of fp32 block KD)")
    p.add_argument("--hw_list", type=positive_int, nargs="+", default=None,
                   help="resolutions to sample (default: the superspace's block-KD resolutions found in the LUT)")
    p.add_argument("--latency_constraints", type=positive_float, nargs="+", required=True, help="ms")
    p.add_argument("--latency_loss_t", type=positive_float, default=0.08)
    p.add_argument("--latency_loss_a", type=float, default=0.01)
    p.add_argument("--top_k", type=positive_int, default=50)
    p.add_argument("--num_samples", type=positive_int, default=100_000)
    p.add_argument("--chunk_size", type=positive_int, default=500, help="samples per drawn resolution")
    p.add_argument("--fixed_latency_csv", default=None,
                   help="lines resolution,latency_ms: latency of first_conv, stage0 and head (default 0)")
    p.add_argument("--latency_predictor", default=None,
                   choices=["ort_int8", "ort_fp32", "tflite_int8", "tflite_fp32"],
                   help="predict the first_conv/stage0/head latency per resolution with this platform's table, on "
                        "the min subnet of the all-zero supernet as the original does (instead of "
                        "--fixed_latency_csv)")
    p.add_argument("--latency_table_dir", default=None, help="dir of <platform>.json (build_latency_table.py)")
    p.add_argument("--population", type=positive_int, default=500)
    p.add_argument("--parents", type=positive_int, default=125, help="tournament size")
    p.add_argument("--cycles", type=positive_int, default=5000, help="evaluations, initial population included")
    p.add_argument("--seed", type=int, default=0, help="seeds the evolution and the score's samples")
    p.add_argument("--output_dir", default="checkpoints")
    p.add_argument("--score_only", nargs="+", metavar="CHOICE", default=None,
                   help="only score these spaces (onnxw-151122-023231, 151122-023231 or 151122_023231)")
    p.add_argument("--resume", action="store_true", help="continue from state.json of the run dir")
    p.add_argument("--top_n", type=positive_int, default=10, help="spaces printed at the end")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    for names in (("--latency_constraint", "--latency_constraints"), ("--lut_dir", "--lut_path"),
                  ("--score_only", "--supernet_choices"), ("--population", "--population_size"),
                  ("--parents", "--parent_size"), ("--no_progress", "--no-progress")):
        add_aliases(p, *names)  # one name per concept across the scripts; the original's names
    add_original_option(p, "--platform", "latency_predictor", type=platform_name,
                        help="--latency_predictor (tflite27_cpu_int8 -> tflite_int8, onnx_lut -> ort_int8)")
    return p


# ------------------------------------------------------------------------------ search-space operators
def space_operators(space: SuperSpace):
    """(random_candidate, mutate_block, mutate_window, uniform individuals) over SupernetChoice."""
    n_blocks = len(space.candidates)
    n_windows = space.num_window_choices()

    def random_candidate(rng):
        return SupernetChoice(space.name, tuple(rng.randrange(n_blocks) for _ in n_windows),
                              tuple(rng.randrange(n) for n in n_windows))

    def mutate_block(c: SupernetChoice, rng):
        if n_blocks < 2:
            return None
        i = rng.randrange(len(c.blocks))
        b = rng.choice([v for v in range(n_blocks) if v != c.blocks[i]])
        return SupernetChoice(c.superspace, c.blocks[:i] + (b,) + c.blocks[i + 1:], c.windows)

    def mutate_window(c: SupernetChoice, rng):
        stages = [i for i, n in enumerate(n_windows) if n > 1]
        if not stages:
            return None
        i = rng.choice(stages)
        w = rng.choice([v for v in range(n_windows[i]) if v != c.windows[i]])
        return SupernetChoice(c.superspace, c.blocks, c.windows[:i] + (w,) + c.windows[i + 1:])

    # the original's uniform seeds: every stage gets block i and window min(j, n_windows - 1)
    uniform = [SupernetChoice(space.name, (i,) * len(n_windows), tuple(min(j, n - 1) for n in n_windows))
               for i in range(n_blocks) for j in range(max(n_windows))]
    return random_candidate, mutate_block, mutate_window, uniform


def make_fitness(scorer: QTScorer):
    def fitness(c: SupernetChoice):
        s = scorer.score(c.blocks, c.windows)
        return s.score, {"lat_loss": s.lat_loss, "top_loss": s.top_loss, "p": list(s.p)}
    return fitness


def run_search(scorer: QTScorer, space: SuperSpace, population: int = 500, parents: int = 125,
               cycles: int = 5000, seed: int = 0, state_path: str | None = None, resume: bool = False,
               progress: bool = True, config: dict | None = None) -> Evolution:
    """Aging (regularized) evolution, as the original's, over the supernet choices of `space`; returns the Evolution."""
    random_candidate, mutate_block, mutate_window, uniform = space_operators(space)
    evo = Evolution(make_fitness(scorer), encode=str, decode=parse_supernet, seed=seed,
                    state_path=state_path, progress=progress, config=config)
    if resume and state_path and os.path.isfile(state_path):
        evo.load(state_path)
        print(f"resumed from {state_path}: {len(evo.history)} evaluated", file=sys.stderr)
    elif resume:
        print(f"warning: --resume: no state at {state_path}; starting a new search", file=sys.stderr)
    aging_evolution(evo, initial=uniform, random_candidate=random_candidate,
                    mutations=[mutate_block, mutate_window], population_size=population,
                    parent_size=parents, cycles=cycles)
    return evo


# ----------------------------------------------------------------------------------------- outputs
def run_dir_for(args) -> str:
    cons = "+".join(f"{c:g}" for c in args.latency_constraints)
    return os.path.join(args.output_dir, "space_search", args.superspace + ("_fp32" if args.fp32_lut else ""),
                        f"c{cons}_t{args.latency_loss_t:g}_a{args.latency_loss_a:g}")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _csv_text(header: list, rows: list) -> str:
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_outputs(evo: Evolution, constraints, run_dir: str, summary: dict) -> dict:
    import yaml
    os.makedirs(run_dir, exist_ok=True)
    p_cols = [f"p_c{c:g}" for c in constraints]
    ranked = evo.best(len(evo.history))
    _atomic_write(os.path.join(run_dir, "ranked.csv"), _csv_text(
        ["rank", "supernet", "score", "lat_loss", "top_loss"] + p_cols,
        [[i + 1, r.key, f"{r.score:.6f}", f"{r.info['lat_loss']:.6f}", f"{r.info['top_loss']:.6f}"]
         + [f"{p:.6f}" for p in r.info["p"]] for i, r in enumerate(ranked)]))
    best, rows, best_curve = -float("inf"), [], []
    for r in evo.history:
        best = max(best, r.score)
        best_curve.append(best)
        rows.append([r.index + 1, r.key, r.parent or "", f"{r.score:.6f}", f"{best:.6f}"])
    _atomic_write(os.path.join(run_dir, "history.csv"),
                  _csv_text(["cycle", "child", "parent", "score", "best_so_far"], rows))
    _plot(evo, best_curve, os.path.join(run_dir, "score.png"))
    top = lambda r: {"supernet": r.key, "score": r.score, "lat_loss": r.info["lat_loss"],  # noqa: E731
                     "top_loss": r.info["top_loss"], **dict(zip(p_cols, r.info["p"]))}
    result = {"best": top(ranked[0]), "top5": [top(r) for r in ranked[:5]], **summary}
    _atomic_write(os.path.join(run_dir, "result.yaml"), yaml.safe_dump(result, sort_keys=False))
    return result


def _plot(evo: Evolution, best_curve: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r.index + 1 for r in evo.history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(x, [r.score for r in evo.history], s=3, alpha=0.35, label="evaluated space")
    ax.plot(x, best_curve, color="C3", label="best so far")
    seeded = sum(1 for r in evo.history if r.parent is None)
    ax.axvline(seeded + 0.5, color="grey", ls="--", lw=0.8, label="end of initial population")
    ax.set_xlabel("cycle (evaluation)")
    ax.set_ylabel("Q-T score")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _format_table(records, constraints) -> str:
    head = f"{'rank':>4}  {'supernet':<22} {'score':>8} {'lat_loss':>8} {'top_loss':>8} " + \
        " ".join(f"{'p@' + format(c, 'g'):>8}" for c in constraints)
    lines = [head]
    for i, r in enumerate(records, start=1):
        lines.append(f"{i:>4}  {r.key:<22} {r.score:8.4f} {r.info['lat_loss']:8.4f} {r.info['top_loss']:8.4f} "
                     + " ".join(f"{p:8.4f}" for p in r.info["p"]))
    return "\n".join(lines)


def _parse_choice(text: str, space: SuperSpace) -> SupernetChoice:
    t = text.strip()
    if not t.startswith(space.name + "-"):
        if t.split("-")[0] in SUPERSPACES:
            raise ValueError(f"--score_only {text!r}: superspace differs from --superspace {space.name}")
        t = f"{space.name}-{t.replace('_', '-')}"
    return parse_supernet(t)


# --------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    space = get_superspace(args.superspace)
    if args.parents > args.population:
        raise ValueError(f"--parents {args.parents} must not exceed --population {args.population}")
    if args.num_samples % args.chunk_size:
        raise ValueError(f"--num_samples {args.num_samples} must be a multiple of --chunk_size {args.chunk_size}")
    choices = [_parse_choice(c, space) for c in args.score_only] if args.score_only else None
    if args.fixed_latency_csv and args.latency_predictor:
        raise ValueError("give either --fixed_latency_csv or --latency_predictor, not both")
    fixed = load_fixed_latency(args.fixed_latency_csv) if args.fixed_latency_csv else None
    if args.latency_predictor:
        from modules.latency.predictor import load_predictor
        predictor = load_predictor(args.latency_predictor, space.name, args.latency_table_dir)
        fixed = fixed_stage_latency(predictor, space)
        print("fixed-stage latency (ms) per resolution:", {r: round(v, 4) for r, v in fixed.items()})
    t0 = time.perf_counter()
    lut_sub = space.name + ("_fp32" if args.fp32_lut else "")
    lut = load_lut_dir(args.lut_dir, space, args.hw_list, subdir=lut_sub)
    t_load = time.perf_counter() - t0
    print(f"LUT {lut.root}: {len(lut.tables)} files, {lut.num_rows} rows, "
          f"resolutions {list(lut.resolutions)} ({t_load:.1f} s)")
    scorer = QTScorer(lut, args.latency_constraints, t=args.latency_loss_t, a=args.latency_loss_a,
                      top_k=args.top_k, num_samples=args.num_samples, chunk=args.chunk_size,
                      fixed_latency=fixed, seed=args.seed)
    run_dir = run_dir_for(args)
    os.makedirs(run_dir, exist_ok=True)
    save_run_info(args, run_dir)

    if choices is not None:
        fitness = make_fitness(scorer)
        from modules.evolution import Record
        recs = []
        for c in choices:
            s, info = fitness(c)
            recs.append(Record(str(c), s, info))
        print(_format_table(recs, scorer.constraints))
        p_cols = [f"p_c{c:g}" for c in scorer.constraints]
        _atomic_write(os.path.join(run_dir, "score_only.csv"), _csv_text(
            ["supernet", "score", "lat_loss", "top_loss"] + p_cols,
            [[r.key, f"{r.score:.6f}", f"{r.info['lat_loss']:.6f}", f"{r.info['top_loss']:.6f}"]
             + [f"{p:.6f}" for p in r.info["p"]] for r in recs]))
        print(f"scores written to {os.path.join(run_dir, 'score_only.csv')}")
        return {"scores": {r.key: r.score for r in recs}}

    config = {"superspace": space.name, "lut_dir": os.path.abspath(lut.root),
              "hw_list": list(scorer.resolutions),
              "latency_constraints": list(scorer.constraints), "t": scorer.t, "a": scorer.a, "top_k": scorer.top_k,
              "num_samples": scorer.num_samples, "chunk": scorer.chunk, "seed": args.seed,
              "fixed_latency": {str(k): v for k, v in scorer.fixed_latency.items()},
              "population": args.population, "parents": args.parents}
    t1 = time.perf_counter()
    evo = run_search(scorer, space, args.population, args.parents, args.cycles, args.seed,
                     state_path=os.path.join(run_dir, "state.json"), resume=args.resume,
                     progress=not args.no_progress, config=config)
    t_search = time.perf_counter() - t1
    summary = {"evaluated": len(evo.history), "cycles": args.cycles, "stop_reason": evo.stop_reason,
               "infeasible_scores": scorer.num_infeasible, "search_seconds": round(t_search, 2),
               "lut_load_seconds": round(t_load, 2), "settings": config}
    result = write_outputs(evo, scorer.constraints, run_dir, summary)
    print(_format_table(evo.best(args.top_n), scorer.constraints))
    print(f"{len(evo.history)} spaces evaluated in {t_search:.1f} s; best {result['best']['supernet']} "
          f"score {result['best']['score']:.4f}; outputs in {run_dir}")
    return result


if __name__ == "__main__":
    run_main(main, get_args_parser())
