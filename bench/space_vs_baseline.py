"""Does the searched space beat hand-made ones? INT8 top-1 against measured INT8 latency, one recipe for all.

    python bench/space_vs_baseline.py --demo_dir checkpoints/demo                 # after `make demo`
    python bench/space_vs_baseline.py --demo_dir checkpoints/demo --seeds 0 1 2   # more seeds

What SpaceEvo claims is that a space chosen by the Q-T score gives better INT8 accuracy at equal INT8 latency
than a hand-made space. This runs, for every space and seed, exactly what the demo runs for its searched space:
supernet training (fp32 then LSQ+, `supernet_training_configs/tiny.yaml`), the INT8 subnet search at the demo's
latency targets (same windows, same predictor, a table that holds every compared space's blocks), then the
best subnet of each target exported with BN recalibration, deployed to ONNX Runtime INT8 with its learned scales
and timed (1 thread, median). Spaces, all of the `tiny` superspace and with the searched space's width windows,
so that only the operators differ:

* ``searched``: the demo's space search result;
* ``all-MBv3Res``: hardswish + SE inverted residuals in every stage (the mobile spaces of OFA / AttentiveNAS);
* ``all-ResNet``: bottlenecks in every stage;
* ``random``: block types and windows drawn with `--random_seed`.

Writes, under `--output_dir` (default ``<demo_dir>/compare_spaces``): ``results.csv`` (one row per space, seed and
target: subnet, predicted and measured INT8 latency, holdout and val top-1 of the INT8 fake-quant model, ORT's
agreement with it), ``summary.md`` (per target: each space's mean and spread over seeds, and whether the searched
space's lead exceeds the seed-to-seed spread) and ``compare.png``. Every step is resumable: a rerun skips what
is done. `make_report.py` adds the summary to the demo report when it finds it.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from modules.checkpoint import atomic_write_text  # noqa: E402
from modules.encoding import parse_supernet  # noqa: E402
from modules.superspace import get_superspace  # noqa: E402

SUPERSPACE = "tiny"
HAND_MADE = {"all-MBv3Res": "MobileNetV3Res", "all-ResNet": "ResNet"}
FIELDS = ["space", "supernet", "seed", "target_ms", "subnet", "predicted_ms", "int8_ms", "fp32_ms", "holdout_top1",
          "val_top1", "ort_argmax_agree", "ort_rel_err"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("space_vs_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", required=True, help="a finished demo's output dir (run_demo.py / make demo)")
    p.add_argument("--output_dir", default=None, help="(default: <demo_dir>/compare_spaces)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training and search seeds")
    p.add_argument("--random_seed", type=int, default=0, help="draws the random space (default: %(default)s)")
    p.add_argument("--platform", default="ort_int8", choices=["ort_int8"], help="latency platform")
    p.add_argument("--runs", type=int, default=200, help="timed runs per deployed file (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="fp32 supernet epochs for every space (default: tiny.yaml's, as the demo)")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: summarize what is finished (a space still running is reported as not run)")
    p.add_argument("--population", type=int, default=16, help="subnet search population (default: %(default)s, "
                   "as the demo)")
    p.add_argument("--iterations", type=int, default=3, help="subnet search iterations (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the training runs (default: tiny.yaml's; 1 when seeds run side by side)")
    p.add_argument("--lsq_epochs", type=int, default=None,
                   help="LSQ+ supernet epochs for every space (default: tiny.yaml's, as the demo)")
    return p


def compared_spaces(searched: str, random_seed: int) -> dict[str, str]:
    """label -> supernet encoding: the searched space, the hand-made ones with its windows, a random space."""
    space = get_superspace(SUPERSPACE)
    choice = parse_supernet(searched)
    names = [c.name for c in space.candidates]
    windows = "".join(map(str, choice.windows))
    out = {"searched": searched}
    for label, block in HAND_MADE.items():
        out[label] = f"{SUPERSPACE}-{str(names.index(block)) * 6}-{windows}"
    rng = random.Random(random_seed)
    blocks = "".join(str(rng.randrange(len(names))) for _ in range(6))
    rand_windows = "".join(str(rng.randrange(n)) for n in space.num_window_choices())
    out["random"] = f"{SUPERSPACE}-{blocks}-{rand_windows}"
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.demo = Path(args.demo_dir)
        self.out = Path(args.output_dir or self.demo / "compare_spaces")
        self.data = self.demo / "data" / "digits"
        state = self.demo / "demo_markers" / "state.yaml"
        if not state.is_file():
            raise SystemExit(f"error: {state} is missing: run the demo first (make demo / run_demo.py)")
        # the demo's data, latency table and space search are what this needs (its supernets are not)
        self.state = yaml.safe_load(state.read_text())
        self.spaces = compared_spaces(self.state["supernet"], args.random_seed)
        self.markers = self.out / "markers"

    def run(self, marker: str, script: str, *argv) -> None:
        done = self.markers / f"{marker}.done"
        if done.exists():
            return
        cmd = [sys.executable, str(REPO / script), *map(str, argv)]
        print("\n$ " + " ".join(cmd[1:]), flush=True)
        t = time.time()
        if subprocess.call(cmd, cwd=REPO) != 0:
            raise SystemExit(f"error: step failed: {' '.join(cmd[1:])}")
        self.markers.mkdir(parents=True, exist_ok=True)
        done.write_text(f"{time.time() - t:.1f} s\n")

    def latency_table(self) -> None:
        """The demo's table plus the blocks of every compared space, before any search: one predictor for all."""
        lat = self.out / "latency"
        if not lat.exists():
            shutil.copytree(self.demo / "latency", lat)
        for label, enc in self.spaces.items():
            self.run(f"latency_{label}", "build_latency_table.py", "--superspace", SUPERSPACE, "--platform",
                     self.args.platform, "--supernet", enc, "--num_subnets", 4, "--num_calib", 10,
                     "--output_dir", self.out, "--no_progress")

    def train_and_search(self, label: str, enc: str, seed: int) -> None:
        out = self.out / f"seed{seed}"
        common = ["--data_path", self.data, "--output_dir", out, "--seed", seed, "--resume"]
        for flag in ("epochs", "lsq_epochs", "threads"):
            if getattr(self.args, flag) is not None:
                common += [f"--{flag}", getattr(self.args, flag)]
        cfg = REPO / "supernet_training_configs" / "tiny.yaml"
        self.run(f"fp32_{label}_{seed}", "train_supernet.py", "-c", cfg, "--supernet", enc, *common)
        self.run(f"lsq_{label}_{seed}", "train_supernet.py", "-c", cfg, "--supernet", enc, "--quant_mode", "lsq",
                 *common)
        self.run(f"search_{label}_{seed}", "search_subnet.py", "--supernet", enc, "--data_dir", self.data,
                 "--latency_predictor", self.args.platform, "--latency_table_dir", self.out / "latency",
                 "--latency_constraint", *self.state["subnet_targets"], "--latency_delta", self.state["subnet_delta"],
                 "--population", self.args.population, "--iterations", self.args.iterations, "--num_mutations", 4,
                 "--num_crossovers", 4, "--eval_top", 5,
                 "--num_calib_batches", 2, "--resume", "--output_dir", out, "--seed", seed)

    def deploy(self, label: str, enc: str, seed: int) -> list[dict]:
        from modules.subnet_search import search_run_dir

        out, rows = self.out / f"seed{seed}", []
        for target in self.state["subnet_targets"]:
            best_json = search_run_dir(out, enc, target, self.state["subnet_delta"]) / "best.json"
            best = json.loads(best_json.read_text()) if best_json.is_file() else None
            if best is None or not best.get("top_val"):
                rows.append({"space": label, "supernet": enc, "seed": seed, "target_ms": target})
                continue  # no subnet of this space in the window
            stem = f"{label}_s{seed}_c{target:g}"
            sub = out / "subnets" / f"{stem}.pth"
            onnx_dir = out / "deploy" / stem
            self.run(f"export_{stem}", "export_subnet.py", "--supernet", enc, "--subnet", best_json, "--data_dir",
                     self.data, "--output", sub, "--output_dir", out, "--seed", seed)
            self.run(f"onnx_{stem}", "onnx_tools/export_int8_lsq.py", sub, "--output_dir", onnx_dir)
            self.run(f"time_{stem}", "onnx_tools/benchmark.py", "--input", onnx_dir, "--output",
                     onnx_dir / "latency.csv", "--runs", self.args.runs)
            rows.append(self.row(label, enc, seed, target, best, sub, onnx_dir))
        return rows

    def finished_rows(self, label: str, enc: str, seed: int) -> list[dict]:
        """--report_only: the rows of the targets whose search and deployment are done; nothing is run."""
        from modules.subnet_search import search_run_dir

        out, rows = self.out / f"seed{seed}", []
        if not (self.markers / f"search_{label}_{seed}.done").exists():
            return rows
        for target in self.state["subnet_targets"]:
            best_json = search_run_dir(out, enc, target, self.state["subnet_delta"]) / "best.json"
            best = json.loads(best_json.read_text())
            stem = f"{label}_s{seed}_c{target:g}"
            if not best.get("top_val"):
                rows.append({"space": label, "supernet": enc, "seed": seed, "target_ms": target})
            elif (self.markers / f"time_{stem}.done").exists():
                rows.append(self.row(label, enc, seed, target, best, out / "subnets" / f"{stem}.pth",
                                     out / "deploy" / stem))
        return rows

    def row(self, label, enc, seed, target, best, sub: Path, onnx_dir: Path) -> dict:
        with open(onnx_dir / "latency.csv") as f:
            (timing,) = list(csv.DictReader(f))
        top = best["top_val"][0]  # the search's best subnet (by holdout accuracy) and its val top-1
        agree, rel_err = ort_fidelity(sub, next(onnx_dir.glob("*_int8.onnx")), self.data)
        return {"space": label, "supernet": enc, "seed": seed, "target_ms": target, "subnet": top["subnet"],
                "predicted_ms": round(top["latency_ms"], 4), "int8_ms": timing["int8_median_ms"],
                "fp32_ms": timing["fp32_median_ms"], "holdout_top1": round(top["fitness"], 2),
                "val_top1": round(top["val_top1"], 2), "ort_argmax_agree": round(agree, 4),
                "ort_rel_err": round(rel_err, 5)}

    def latency_windows(self) -> None:
        """The demo's subnet-search targets, or (a demo stopped before its subnet search) the same formula: 40 %
        and 75 % of the way from the searched space's min to its max subnet latency, windows 15 % of that wide."""
        if "subnet_targets" in self.state:
            return
        path = self.out / "targets.json"
        if not path.is_file():
            from modules.latency.predictor import load_predictor
            from modules.supernet import supernet_from_encoding

            pred = load_predictor(self.args.platform, SUPERSPACE, str(self.out / "latency"))
            net = supernet_from_encoding(self.state["supernet"])
            net.set_min_subnet()
            lo = pred.predict_subnet(net)
            net.set_max_subnet()
            hi = pred.predict_subnet(net)
            atomic_write_text(path, json.dumps({"subnet_targets": [round(lo + f * (hi - lo), 3) for f in (0.4, 0.75)],
                                                "subnet_delta": round(0.15 * (hi - lo), 3)}))
        self.state.update(json.loads(path.read_text()))

    def main(self) -> None:
        print("compared spaces:", json.dumps(self.spaces, indent=1), flush=True)
        if not self.args.report_only:
            self.latency_table()
        self.latency_windows()
        rows = []
        for seed in self.args.seeds:
            for label, enc in self.spaces.items():
                if not self.args.report_only:
                    self.train_and_search(label, enc, seed)
                    rows += self.deploy(label, enc, seed)
                else:
                    rows += self.finished_rows(label, enc, seed)
        write_results(self.out, rows, self.spaces, self.args.seeds, self.state)


def ort_fidelity(subnet_ckpt: Path, int8_onnx: Path, data_dir: Path, num: int = 256) -> tuple[float, float]:
    """(argmax agreement, relative logit error) of the deployed ONNX Runtime INT8 file against the torch
    fake-quant subnet on the first `num` val images."""
    import torch

    from modules import deploy
    from modules.data import build_dataset
    from modules.subnet_search import load_subnet_checkpoint

    model = load_subnet_checkpoint(subnet_ckpt)
    val = build_dataset(data_dir, "val", train=False, image_size=model.resolution)
    x = torch.stack([val[i][0] for i in range(min(num, len(val)))])
    with torch.no_grad():
        ref = model(x).numpy()
    y = deploy.run_onnx_batch(int8_onnx, x)
    return float((y.argmax(1) == ref.argmax(1)).mean()), deploy.relative_error(y, ref)


def summarize(rows: list[dict], spaces: dict, targets) -> tuple[list[dict], list[str]]:
    """Per target and space: mean val top-1 and INT8 latency over seeds, spread (max - min) of the top-1; and one
    verdict line per target on the searched space against the best other space."""
    import statistics

    table, verdicts = [], []
    for target in targets:
        stats = {}
        for label in spaces:
            done = [r for r in rows if r["space"] == label and r["target_ms"] == target and r.get("subnet")]
            if not done:
                table.append({"target_ms": target, "space": label, "seeds": 0})
                continue
            acc = [float(r["val_top1"]) for r in done]
            lat = [float(r["int8_ms"]) for r in done]
            stats[label] = (statistics.mean(acc), max(acc) - min(acc))
            table.append({"target_ms": target, "space": label, "seeds": len(done),
                          "val_top1_mean": round(statistics.mean(acc), 2), "spread": round(max(acc) - min(acc), 2),
                          "int8_ms_mean": round(statistics.mean(lat), 4),
                          "per_seed": " / ".join(f"{a:.2f}" for a in acc)})
        others = {k: v for k, v in stats.items() if k != "searched"}
        if "searched" in stats and others:
            best = max(others, key=lambda k: others[k][0])
            lead = stats["searched"][0] - others[best][0]
            noise = max(stats["searched"][1], others[best][1])
            word = "beats" if lead > 0 else "trails"
            clear = "more than" if abs(lead) > noise else "within"
            verdicts.append(f"{target:g} ms: the searched space {word} the best other space ({best}) by "
                            f"{abs(lead):.2f} points, {clear} the seed-to-seed spread ({noise:.2f})")
        else:
            verdicts.append(f"{target:g} ms: not enough spaces with subnets in the window to compare")
    return table, verdicts


def plot(out: Path, rows: list[dict], spaces: dict, seeds) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_front, ax_dep) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = dict(zip(spaces, plt.cm.tab10.colors))
    for label, enc in spaces.items():
        for seed in seeds:
            for hist in sorted((out / f"seed{seed}" / "search_subnet" / enc).glob("c*_d*/history.csv")):
                with open(hist) as f:
                    pts = sorted((float(r["latency_ms"]), float(r["fitness"])) for r in csv.DictReader(f))
                front, best = [], -1.0
                for lat, acc in pts:  # upper-left Pareto front: best accuracy at or below each latency
                    if acc > best:
                        front.append((lat, acc))
                        best = acc
                if front:
                    ax_front.step(*zip(*front), where="post", color=colors[label], alpha=0.7,
                                  label=label if seed == seeds[0] and hist.parent.name.startswith("c") else None)
        pts = [(float(r["int8_ms"]), float(r["val_top1"])) for r in rows if r["space"] == label and r.get("subnet")]
        if pts:
            ax_dep.scatter(*zip(*pts), color=colors[label], label=label, s=30)
    handles, labels = ax_front.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax_front.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax_front.set(title="subnet search: Pareto fronts (all seeds)", xlabel="predicted INT8 latency (ms)",
                 ylabel="held-out top-1 of the INT8 fake-quant subnet (%)")
    ax_dep.legend(fontsize=8)
    ax_dep.set(title="best subnet per target, deployed to ONNX Runtime INT8",
               xlabel="measured INT8 latency (ms, 1 thread, median)", ylabel="val top-1, INT8 (%)")
    fig.tight_layout()
    png = out / "compare.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def write_results(out: Path, rows: list[dict], spaces: dict, seeds, state: dict) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    table, verdicts = summarize(rows, spaces, state["subnet_targets"])
    png = plot(out, rows, spaces, seeds)
    cols = ["target_ms", "space", "seeds", "val_top1_mean", "spread", "int8_ms_mean", "per_seed"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in table]
    spaces_md = "\n".join(f"* `{label}`: `{enc}`" for label, enc in spaces.items())
    text = (f"Spaces (window {state['subnet_delta']:g} ms below each target; seeds {', '.join(map(str, seeds))}):"
            f"\n\n{spaces_md}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"* {v}" for v in verdicts)
            + f"\n\n![spaces]({png.name})\n")
    atomic_write_text(out / "summary.md", text)
    print(text)


def main(args) -> None:
    Bench(args).main()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
