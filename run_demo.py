"""The whole SpaceEvo pipeline on the embedded digits data and the `tiny` superspace, in one command.

    python run_demo.py                       # (what `make demo` runs) outputs in ./checkpoints/demo
    python run_demo.py --fresh               # redo every stage
    python run_demo.py --only lut space      # (re)run some stages; the others must be done

Stages (each a stage script run as a subprocess, so this file is also a worked example of the CLI):
data -> block KD fp32 -> block KD LSQ+ -> latency table (ONNX Runtime INT8, measured here) -> block LUT ->
space search -> supernet fp32 -> supernet LSQ+ -> subnet search at two latency targets -> export + INT8
deployment (ONNX Runtime, LiteRT) -> report. A stage whose completion marker exists is skipped (a second run
takes seconds); an interrupted stage is resumed. Latency targets are derived from this machine's
measurements, since the latency is measured on the device at hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent
SUPERSPACE = "tiny"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("run_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="./checkpoints/demo")
    p.add_argument("--fresh", action="store_true", help="redo every stage (deletes the completion markers)")
    p.add_argument("--only", nargs="+", default=None, choices=[s[0] for s in STAGES], help="run only these stages")
    p.add_argument("--platform", default="ort_int8", choices=["ort_int8", "ort_fp32", "tflite_int8", "tflite_fp32"],
                   help="latency platform for the LUT and the subnet search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    return p


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)
        self.data = self.out / "data" / "digits"
        self.markers = self.out / "demo_markers"
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- helpers
    def run(self, script: str, *argv, ok_codes: tuple[int, ...] = (0,)) -> int:
        cmd = [sys.executable, str(REPO / script), *map(str, argv)]
        if self.args.debug:
            cmd.append("--debug")
        print("\n$ " + " ".join(cmd[1:]), flush=True)
        t = time.time()
        rc = subprocess.call(cmd, cwd=REPO)
        if rc not in ok_codes:
            raise SystemExit(f"error: stage command failed with exit code {rc}: {' '.join(cmd[1:])}")
        print(f"[demo] {script}: {time.time() - t:.1f} s", flush=True)
        return rc

    def common(self):
        return ["--output_dir", self.out, "--seed", self.args.seed]

    def read_yaml(self, path: Path) -> dict:
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: run the stage that writes it (see --only)")
        return yaml.safe_load(path.read_text())

    @property
    def state_path(self) -> Path:
        return self.markers / "state.yaml"

    def state(self) -> dict:
        return yaml.safe_load(self.state_path.read_text()) if self.state_path.is_file() else {}

    def set_state(self, **kv) -> None:
        s = self.state()
        s.update(kv)
        self.markers.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(s))
        os.replace(tmp, self.state_path)

    def predictor(self):
        from modules.latency.predictor import load_predictor

        return load_predictor(self.args.platform, SUPERSPACE, str(self.out / "latency"))

    def space_latency_quantiles(self, quantiles, n: int = 20000) -> list[float]:
        """Quantiles of the latency of random spaces' random sub-stages (plus the fixed stages): targets
        for the space search that this machine's measurements can meet."""
        import numpy as np

        from modules.lut import load_lut_dir
        from modules.qt_score import fixed_stage_latency
        from modules.superspace import get_superspace

        space = get_superspace(SUPERSPACE)
        lut = load_lut_dir(str(self.out / "lut"), space)
        fixed = fixed_stage_latency(self.predictor(), space)
        rng = np.random.default_rng(self.args.seed)
        totals = []
        for r in lut.resolutions:
            total = np.full(n // len(lut.resolutions), fixed[r])
            for stage in range(1, 7):
                lat = np.concatenate([t.at(r)[1] for t in lut.tables.values() if t.stage == stage])
                total += rng.choice(lat, total.size)
            totals.append(total)
        return [float(q) for q in np.quantile(np.concatenate(totals), quantiles)]

    # ---------------------------------------------------------------- stages
    def data_stage(self):
        self.run("prepare_data.py", "--data_dir", self.data, "--size", 64)

    def block_kd_fp32(self):
        # demo-sized; the 36 students are independent, so 2 one-thread processes share them (2 threads in one
        # process gain little on these tiny tensors, and stall when another job holds a core)
        self.run("train_block_kd.py", "--superspace", SUPERSPACE, "--data_dir", self.data, *self.common(),
                 "--epochs", 2, "--max_steps_per_epoch", 8, "--batch_size", 32, "--valid_size", 128,
                 "--num_calib_batches", 1, "--student_procs", 2, "--resume", "--no_progress")

    def block_kd_lsq(self):
        self.run("lsq_block_kd.py", "--superspace", SUPERSPACE, "--data_dir", self.data, *self.common(),
                 "--epochs", 1, "--max_steps_per_epoch", 6, "--batch_size", 32, "--valid_size", 128,
                 "--num_calib_batches", 1, "--student_procs", 2, "--resume", "--no_progress")

    def latency_table(self):
        self.run("build_latency_table.py", "--superspace", SUPERSPACE, "--platform", self.args.platform,
                 "--output_dir", self.out, "--no_progress")

    def lut(self):
        self.run("eval_block_kd.py", "--superspace", SUPERSPACE, "--data_dir", self.data, *self.common(),
                 "--num_samples", 9, "--workers", 2, "--latency_predictor", self.args.platform,
                 "--latency_table_dir", self.out / "latency", "--no_progress")

    def space_search(self):
        constraints = [round(c, 3) for c in self.space_latency_quantiles((0.3, 0.6))]
        self.run("search_block_kd.py", "--superspace", SUPERSPACE, "--lut_dir", self.out / "lut",
                 "--latency_constraints", *constraints, "--population", 60, "--parents", 15, "--cycles", 400,
                 "--num_samples", 20000, "--latency_predictor", self.args.platform,
                 "--latency_table_dir", self.out / "latency", "--no_progress", *self.common())
        tag = f"c{'+'.join(f'{c:g}' for c in constraints)}"
        result = next((self.out / "space_search" / SUPERSPACE).glob(f"{tag}_t*/result.yaml"))
        self.set_state(space_constraints=constraints, supernet=self.read_yaml(result)["best"]["supernet"])

    def supernet_fp32(self):
        self.run("train_supernet.py", "-c", REPO / "supernet_training_configs/tiny.yaml",
                 "--supernet_choice", self.state()["supernet"], "--data_path", self.data, *self.common(), "--resume")

    def supernet_lsq(self):
        self.run("train_supernet.py", "-c", REPO / "supernet_training_configs/tiny.yaml",
                 "--supernet_choice", self.state()["supernet"], "--data_path", self.data, *self.common(),
                 "--quant_mode", "lsq", "--resume")

    def subnet_search(self):
        from modules.supernet import supernet_from_encoding

        # Measure the blocks of the chosen space's subnets too (the table so far holds random spaces' blocks)
        # and fit the whole-model correction on its subnets, so that the search predicts from measurements.
        self.run("build_latency_table.py", "--superspace", SUPERSPACE, "--platform", self.args.platform,
                 "--supernet", self.state()["supernet"], "--num_subnets", 4, "--num_calib", 10,
                 "--output_dir", self.out, "--no_progress")
        net = supernet_from_encoding(self.state()["supernet"])
        pred = self.predictor()
        net.set_min_subnet()
        lo = pred.predict_subnet(net)
        net.set_max_subnet()
        hi = pred.predict_subnet(net)
        targets = [round(lo + f * (hi - lo), 3) for f in (0.4, 0.75)]
        delta = round(0.15 * (hi - lo), 3)
        self.set_state(subnet_targets=targets, subnet_delta=delta, subnet_latency_range=[round(lo, 3), round(hi, 3)])
        self.run("search_subnet.py", "--supernet", self.state()["supernet"], "--data_dir", self.data,
                 "--latency_predictor", self.args.platform, "--latency_table_dir", self.out / "latency",
                 "--latency_constraint", *targets, "--latency_delta", delta, "--random_baseline", 12,
                 # demo-sized: 40 evolved + 12 random subnets per target (the original: 512 x 20 iterations)
                 "--population", 16, "--iterations", 3, "--num_mutations", 4, "--num_crossovers", 4, "--eval_top", 5,
                 "--num_calib_batches", 2, "--resume", *self.common())

    def deploy(self):
        from modules.subnet_search import search_run_dir

        s = self.state()
        enc = s["supernet"]
        deploy = self.out / "deploy"
        subnets, encodings = [], []
        for c in s["subnet_targets"]:
            best = search_run_dir(self.out, enc, c, s["subnet_delta"]) / "best.json"
            encodings.append(json.loads(best.read_text())["subnet"])
            sub = self.out / "subnets" / f"{enc}_c{c:g}.pth"
            self.run("export_subnet.py", "--supernet", enc, "--data_dir", self.data, "--subnet", best,
                     "--output", sub, "--eval", *self.common())
            subnets.append(sub)
        # Real INT8 files with the learned LSQ+ scales, checked against torch fake-quant on val images.
        self.run("onnx_tools/export_int8_lsq.py", *subnets, "--output_dir", deploy / "onnx", "--verify",
                 "--data_dir", self.data)
        # LiteRT for the larger subnet only: litert-torch conversions are slow (one int8 + one fp32 per model)
        self.run("tflite_tools/export_int8_lsq.py", subnets[-1], "--output_dir", deploy / "tflite", "--verify",
                 "--data_dir", self.data)
        self.run("onnx_tools/benchmark.py", "--input", deploy / "onnx", "--output", deploy / "onnx_latency.csv")
        self.run("tflite_tools/benchmark.py", "--input", deploy / "tflite", "--output", deploy / "tflite_latency.csv")
        # Predicted vs measured latency of the searched subnets, measured the way the predictor was built.
        self.run("eval_supernet.py", "--mode", "lat", "--supernet", enc, "--subnets", *encodings, "--no_maxmin",
                 "--latency_predictor", self.args.platform, "--latency_table_dir", self.out / "latency",
                 "--measure", "--runs", 200, "--csv", deploy / "latency_check.csv", *self.common())
        # fidelity of the files exported above (not exported again): top-1 on all val images, rel. error, latency
        # (exit code 1: a fidelity goal missed; the report shows it, the demo goes on)
        if self.run("bench/deploy_fidelity.py", "--checkpoint", subnets[-1], "--data_dir", self.data,
                    "--onnx_dir", deploy / "onnx", "--tflite_dir", deploy / "tflite",
                    "--output_dir", self.out / "reports", "--latency_model", "", "--no_ptq", ok_codes=(0, 1)):
            print("[demo] warning: a deployment fidelity goal was missed; see the report", flush=True)
        self.run("bench/block_report.py", "--superspace", SUPERSPACE, "--resolution", 64,
                 "--output_dir", self.out / "reports")

    def report(self):
        self.run("make_report.py", "--output_dir", self.out)

    # ---------------------------------------------------------------- driver
    def main(self):
        if self.args.fresh and self.markers.exists():
            for f in self.markers.glob("*.done"):
                f.unlink()
        self.markers.mkdir(parents=True, exist_ok=True)
        selected = self.args.only or [s[0] for s in STAGES]
        t_all = time.time()
        for name, method, title in STAGES:
            marker = self.markers / f"{name}.done"
            if name not in selected:
                continue
            if marker.exists() and not self.args.only and not self.args.fresh:
                print(f"[demo] {title}: done earlier (delete {marker} or use --fresh to redo)", flush=True)
                continue
            print(f"\n[demo] ===== {title} =====", flush=True)
            t = time.time()
            getattr(self, method)()
            self.timings[name] = time.time() - t
            marker.write_text(json.dumps({"seconds": round(self.timings[name], 1), "finished": time.ctime()}))
        total = time.time() - t_all
        print("\n[demo] stage wall times (this run):")
        for name, sec in self.timings.items():
            print(f"  {name:<16s} {sec:7.1f} s")
        print(f"  {'total':<16s} {total:7.1f} s\n[demo] report: {self.out / 'report.md'}")


STAGES = [
    ("data", "data_stage", "digits ImageFolder"),
    ("block_kd", "block_kd_fp32", "block-wise KD, fp32"),
    ("block_kd_lsq", "block_kd_lsq", "block-wise KD, LSQ+"),
    ("latency", "latency_table", "latency table measured on this machine"),
    ("lut", "lut", "block LUT"),
    ("space", "space_search", "space search (Q-T score evolution)"),
    ("supernet", "supernet_fp32", "supernet training, fp32"),
    ("supernet_lsq", "supernet_lsq", "supernet training, LSQ+"),
    ("subnet", "subnet_search", "subnet search at two latency targets"),
    ("deploy", "deploy", "export, INT8 deployment and benchmarks"),
    ("report", "report", "report"),
]


def main(args):
    sys.path.insert(0, str(REPO))
    Demo(args).main()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
