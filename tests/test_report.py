"""make_report.py: sections built from a run's files; missing inputs name the stage to run."""
import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_report  # noqa: E402

SUPERNET = "tiny-100005-012120"


def _best(run_dir: Path, target: float, delta: float, subnet: str, predicted: float, val: float, random_val: float):
    run_dir.mkdir(parents=True)
    (run_dir / "best.json").write_text(json.dumps({
        "supernet": SUPERNET, "subnet": subnet, "fitness": 90.0, "latency_ms": predicted, "platform": "ort_int8",
        "target_ms": target, "delta_ms": delta, "window_ms": [round(target - delta, 3), target], "evaluated": 40,
        "top_val": [{"subnet": subnet, "val_top1": val}], "random_baseline_val_median": random_val}))


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "out"
    (out / "demo_markers").mkdir(parents=True)
    (out / "demo_markers" / "state.yaml").write_text(f"supernet: {SUPERNET}\n")
    (out / "demo_markers" / "data.done").write_text(json.dumps({"seconds": 11.0}))
    root = out / "search_subnet" / SUPERNET
    # deliberately written in the reverse order of their targets: the table sorts by target
    _best(root / "c0.861_d0.155", 0.861, 0.155, "sub_b", 0.74, 89.42, 80.78)
    _best(root / "c0.5_d0.155", 0.5, 0.155, "sub_a", 0.458, 85.24, 76.04)
    (out / "deploy").mkdir()
    with open(out / "deploy" / "latency_check.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["supernet", "name", "resolution", "MMACs", "pred_ort_int8_ms", "meas_ort_int8_ms", "err_ort_int8",
                    "subnet"])
        # sub_a: 0.388 in [0.345, 0.5]; sub_b: 0.609 < 0.9 * 0.706 = 0.6354 -> outside the +-10 % window
        w.writerow([SUPERNET, "subnet0", 56, 9.9, 0.458, 0.388, 0.18, "sub_a"])
        w.writerow([SUPERNET, "subnet1", 56, 25.9, 0.741, 0.609, 0.22, "sub_b"])
    return out


def test_subnet_table_checks_measured_latency_against_the_window(run):
    text = make_report.build_report(run, "tiny")
    section = text.split("## Subnet search")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 2
    assert rows[0].startswith("| 0.5 | [0.345, 0.5] | 40 | 0.458 | 0.388 | yes | 90.0 | 85.24 | 76.04 |")
    assert rows[1].startswith("| 0.861 | [0.706, 0.861] | 40 | 0.740 | 0.609 | NO | 90.0 | 89.42 | 80.78 |")


def test_missing_stage_outputs_say_which_stage_to_run(run):
    text = make_report.build_report(run, "tiny")
    assert "| data | 11.0 |" in text
    lut = text.split("## Block LUT")[1].split("\n## ")[0]
    assert "not available" in lut and "eval_block_kd.py" in lut
    deployed = text.split("## Deployed subnets")[1].split("\n## ")[0]
    assert "onnx_latency.csv" in deployed and "run_demo.py --only deploy" in deployed


def test_report_is_written_atomically_and_a_missing_dir_is_one_error(run, tmp_path):
    make_report.main(make_report.get_args_parser().parse_args(["--output_dir", str(run)]))
    assert (run / "report.md").read_text().startswith(f"# SpaceEvo run report: `{run}`")
    assert not list(run.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report.main(make_report.get_args_parser().parse_args(["--output_dir", str(tmp_path / "nope")]))


def test_fidelity_section_gives_each_runtime_its_verdict(run):
    fields = ["variant", "runtime", "top1", "delta_top1", "rel_err", "argmax_agree", "latency_ms", "speedup", "file"]
    rows = [["fake-quant (reference)", "torch", "91.92", "+0.00", "0.0000", "100.00", "", "", ""],
            ["learned scales (ours)", "onnxruntime", "91.36", "-0.56", "0.0096", "99.44", "0.619", "2.18", "a.onnx"],
            ["learned scales (ours)", "litert", "91.36", "-0.56", "0.0097", "99.44", "0.386", "3.65", "a.tflite"]]
    (run / "reports").mkdir()
    with open(run / "reports" / "deploy_fidelity.csv", "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    section = make_report.build_report(run, "tiny").split("## Deployment fidelity")[1]
    assert "| learned scales (ours) | onnxruntime | 91.36 | -0.56 |" in section
    assert "- onnxruntime: |delta top-1| = 0.56 points (goal <= 0.5): FAIL" in section
    assert "- litert: |delta top-1| = 0.56 points (goal <= 1.0): PASS" in section
