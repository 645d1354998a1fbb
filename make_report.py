"""Collect the outputs of a pipeline run into `<output_dir>/report.md` (with PNG plots).

    python make_report.py --output_dir checkpoints/demo

Sections: stage wall times, block LUT (NSR vs latency per stage), space search (score over cycles, best
spaces), supernet training curves and final accuracies, subnet search (accuracy vs latency against random
subnets), FP32 vs INT8 latency per block type, deployment fidelity. A section whose inputs are missing says
which stage to run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import yaml


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("make_report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="./checkpoints/demo")
    p.add_argument("--superspace", default="tiny")
    p.add_argument("--debug", action="store_true")
    return p


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _md_table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "_(empty)_\n"
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def lut_scatter(out: Path, superspace: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modules.lut import load_lut_dir, spearman
    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    lut = load_lut_dir(str(out / "lut"), space)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    colors = plt.cm.tab10.colors
    for stage in range(1, 7):
        ax = axes[(stage - 1) // 3][(stage - 1) % 3]
        for b, cand in enumerate(space.candidates):
            tabs = [t for t in lut.tables.values() if t.stage == stage and t.block == b]
            if tabs:
                ax.scatter([x for t in tabs for x in t.latency], [x for t in tabs for x in t.nsr], s=5, alpha=0.5,
                           color=colors[b % 10], label=cand.name)
        ax.set_title(f"stage{stage}")
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel("NSR (int8, lower is better)")
        ax.set_yscale("log")  # a few barely trained sub-stages have NSR 10x the median
    axes[0][0].legend(fontsize=7, markerscale=3)
    fig.suptitle(f"Block LUT of `{superspace}`: NSR vs latency of sampled sub-stages")
    fig.tight_layout()
    png = out / "report_lut_scatter.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    # per block type: median NSR and latency over all stages
    rows = []
    for b, cand in enumerate(space.candidates):
        tabs = [t for t in lut.tables.values() if t.block == b]
        nsr = sorted(x for t in tabs for x in t.nsr)
        lat = sorted(x for t in tabs for x in t.latency)
        if nsr:
            rows.append({"block": f"{b} {cand.name}", "rows": len(nsr), "median NSR": f"{nsr[len(nsr) // 2]:.4f}",
                         "median latency ms": f"{lat[len(lat) // 2]:.4f}"})
    rhos = [spearman(t.mparams, -t.nsr) for t in lut.tables.values() if len(t.nsr) > 2]
    rhos = [r for r in rhos if r == r]  # files whose rows all have the same size give nan
    rank = ""
    if rhos:
        rank = (f"Do bigger sub-stages quantize better? Spearman(Mparams, -NSR) within a file: mean "
                f"{sum(rhos) / len(rhos):+.2f}, > 0 in {sum(r > 0 for r in rhos)} of {len(rhos)} files "
                "(a short block KD leaves it near 0).\n\n")
    return f"{lut.num_rows} rows in {len(lut.tables)} files.\n\n![LUT]({_rel(png, out)})\n\n" + rank + _md_table(rows)



def section(title: str, body_fn, hint: str) -> str:
    try:
        body = body_fn()
    except FileNotFoundError as e:
        body = f"_not available ({e}); run the stage: {hint}_\n"
    return f"## {title}\n\n{body}\n"


def build_report(out: Path, superspace: str) -> str:
    state_path = out / "demo_markers" / "state.yaml"
    state = yaml.safe_load(state_path.read_text()) if state_path.is_file() else {}
    parts = [f"# SpaceEvo run report: `{out}`\n"]

    def timings():
        rows = []
        for f in sorted((out / "demo_markers").glob("*.done"), key=os.path.getmtime):
            rows.append({"stage": f.stem, "seconds": json.loads(f.read_text())["seconds"]})
        if not rows:
            raise FileNotFoundError("no stage markers")
        total = sum(float(r["seconds"]) for r in rows)
        return _md_table(rows) + f"\nTotal of the last runs of each stage: {total:.0f} s.\n"

    parts.append(section("Stage wall times", timings, "run_demo.py"))
    parts.append(section("Block LUT", lambda: lut_scatter(out, superspace), "eval_block_kd.py"))

    def space():
        runs = sorted((out / "space_search" / superspace).glob("*/ranked.csv"), key=os.path.getmtime)
        if not runs:
            raise FileNotFoundError("no space_search/*/ranked.csv")
        run = runs[-1].parent
        best = yaml.safe_load((run / "result.yaml").read_text())
        rows = _csv_rows(run / "ranked.csv")[:5]
        return (f"Constraints: {state.get('space_constraints', '?')} ms. "
                f"Chosen space: **`{best['best']['supernet']}`**.\n\n"
                f"![score]({_rel(run / 'score.png', out)})\n\nTop 5:\n\n" + _md_table(rows))

    parts.append(section("Space search", space, "search_block_kd.py"))

    def supernet():
        enc = state.get("supernet")
        d = out / "supernet_training" / str(enc)
        text = ""
        for prefix, title in (("", "fp32"), ("lsq_", "LSQ+")):
            log = d / f"{prefix}log.csv"
            if not log.is_file():
                raise FileNotFoundError(log)
            rows = _csv_rows(log)
            text += f"**{title}** ({len(rows)} epochs), last row:\n\n" + _md_table(rows[-1:])
            text += f"\n![{title}]({_rel(d / f'{prefix}curves.png', out)})\n\n"
        return f"Supernet `{enc}`.\n\n" + text

    parts.append(section("Supernet training", supernet, "train_supernet.py"))

    def subnets():
        from modules.subnet_search import search_root

        enc = state.get("supernet")
        bests = sorted(((json.loads((d / "best.json").read_text()), d)
                        for d in search_root(out, enc).glob("c*_d*") if (d / "best.json").is_file()),
                       key=lambda br: br[0]["target_ms"])
        if not bests:
            raise FileNotFoundError("no search_subnet/*/best.json")
        measured = {}  # subnet -> ms measured the way the predictor's table was measured (deploy stage)
        check = out / "deploy" / "latency_check.csv"
        if check.is_file():
            for r in _csv_rows(check):
                col = next((c for c in r if c.startswith("meas_")), None)
                if col and r.get("subnet"):
                    measured[r["subnet"]] = float(r[col])
        rows, plots = [], ""
        for b, run in bests:
            lo, hi = b["window_ms"]
            val = b.get("top_val", [{}])[0].get("val_top1")
            ms = measured.get(b["subnet"])
            rows.append({
                "target ms": b["target_ms"], "window ms": f"[{lo:g}, {hi:g}]", "evaluated": b["evaluated"],
                "predicted ms": f"{b['latency_ms']:.3f}",
                "measured ms": "" if ms is None else f"{ms:.3f}",
                "in window +-10 %": "" if ms is None else ("yes" if 0.9 * lo <= ms <= 1.1 * hi else "NO"),
                "held-out top-1": b["fitness"], "val top-1": "" if val is None else f"{val:.2f}",
                "random median val top-1": "" if b.get("random_baseline_val_median") is None
                else f"{b['random_baseline_val_median']:.2f}",
                "subnet": f"`{b['subnet']}`"})
            if (run / "pareto.png").is_file():
                plots += f"![{run.name}]({_rel(run / 'pareto.png', out)})\n"
        return (f"Supernet `{enc}`, platform {bests[0][0]['platform']}. Best subnet per target (fitness: held-out "
                "train images; val: the untouched val split), against the median of random subnets in the same window; "
                "measured latency from the deploy stage (`eval_supernet.py --mode lat --measure`).\n\n"
                + _md_table(rows) + "\n" + plots)

    parts.append(section("Subnet search", subnets, "search_subnet.py"))

    def deployed():
        text = ""
        for name, title in (("onnx_latency.csv", "ONNX Runtime"), ("tflite_latency.csv", "LiteRT (XNNPACK)")):
            path = out / "deploy" / name
            if not path.is_file():
                raise FileNotFoundError(path)
            cols = ["name", "fp32_median_ms", "int8_median_ms", "speedup", "threads"]
            text += f"**{title}**, the exported files with the learned LSQ+ scales:\n\n" + _md_table(
                _csv_rows(path), cols) + "\n"
        return text

    parts.append(section("Deployed subnets: FP32 vs INT8 latency", deployed, "run_demo.py --only deploy"))

    def blocks():
        csv_path = out / "reports" / "block_report.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(csv_path)
        png = csv_path.with_suffix(".png")
        return _md_table(_csv_rows(csv_path)) + (f"\n![blocks]({_rel(png, out)})\n" if png.is_file() else "")

    parts.append(section("FP32 vs INT8 latency per block type", blocks, "bench/block_report.py"))

    def fidelity():
        csv_path = out / "reports" / "deploy_fidelity.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(csv_path)
        from bench.deploy_fidelity import verdict_line, verdicts

        rows = _csv_rows(csv_path)
        return _md_table(rows) + "\n" + "".join(f"- {verdict_line(*v)}\n" for v in verdicts(rows))

    parts.append(section("Deployment fidelity (learned LSQ+ scales in real INT8)", fidelity, "bench/deploy_fidelity.py"))

    def compare_spaces():
        summary = out / "compare_spaces" / "summary.md"
        if not summary.is_file():
            raise FileNotFoundError(summary)
        # the summary's figure is next to it; from the report it is one folder down
        return summary.read_text().replace("](compare.png)", "](compare_spaces/compare.png)")

    parts.append(section("Searched space against hand-made spaces", compare_spaces,
                         "python bench/space_vs_baseline.py --demo_dir <output_dir>"))
    return "\n".join(parts)


def main(args):
    from modules.checkpoint import atomic_write_text

    out = Path(args.output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output dir {out} does not exist: run the pipeline first (run_demo.py)")
    text = build_report(out, args.superspace)
    atomic_write_text(out / "report.md", text)
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    from modules.cli import run_main

    run_main(main, get_args_parser())
