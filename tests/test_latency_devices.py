"""Device runners end to end with fake `adb` / `ssh` on PATH (small scripts written here) that time the models
with the local LiteRT / ONNX Runtime: a table filled block by block, a device that disconnects part-way (the
rerun completes the same table), a device that answers garbage (one error naming the block), and block timings
imported from a CSV. Timing settings are tiny: the tests check the plumbing, not the speed."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import build_latency_table  # noqa: E402
from modules.latency.keys import block_key  # noqa: E402
from modules.latency.predictor import LatencyPredictor, load_predictor  # noqa: E402
from modules.latency.remote import AdbRunner, DeviceError, SshRunner, parse_benchmark_model  # noqa: E402
from modules.latency.sampling import fixed_block_configs, subnet_block_configs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A fake ssh: drops the options, counts its calls (FAKE_FAIL_AFTER: the connection drops after that many),
# answers garbage to a timer call naming FAKE_GARBAGE, else runs the command here with sh.
FAKE_SSH = r'''#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in -o|-p|-i|-l) shift 2 ;; -*) shift ;; *) break ;; esac
done
shift
n=$(( $(cat "$FAKE_STATE/calls" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_STATE/calls"
if [ -n "$FAKE_FAIL_AFTER" ] && [ $n -gt "$FAKE_FAIL_AFTER" ]; then
  echo "ssh: connect to host fake port 22: Connection refused" >&2; exit 255
fi
case "$*" in *remote_timer*"$FAKE_GARBAGE"*) if [ -n "$FAKE_GARBAGE" ]; then echo "Segmentation fault"; exit 0; fi ;; esac
exec sh -c "$*"
'''

# A fake adb: a device file system under FAKE_STATE/device; `shell .../benchmark_model --graph=...` times the
# model with the local LiteRT interpreter and prints benchmark_model's summary line.
FAKE_ADB = r'''#!{python}
import os, shutil, sys, time
state = os.environ["FAKE_STATE"]
calls = os.path.join(state, "calls")
n = (int(open(calls).read()) if os.path.exists(calls) else 0) + 1
open(calls, "w").write(str(n))
if os.environ.get("FAKE_FAIL_AFTER") and n > int(os.environ["FAKE_FAIL_AFTER"]):
    sys.exit("error: device 'FAKE0001' not found")
args = sys.argv[1:]
if args[:1] == ["-s"]:
    args = args[2:]
dev = lambda p: os.path.join(state, "device", p.lstrip("/"))
if args[0] == "get-serialno":
    print("FAKE0001")
elif args[0] == "push":
    os.makedirs(os.path.dirname(dev(args[2])), exist_ok=True)
    shutil.copy(args[1], dev(args[2]))
elif args[1] == "getprop":
    print({{"ro.product.model": "Fake Pixel", "ro.product.cpu.abi": "x86_64"}}[args[2]])
elif args[1] == "mkdir":
    os.makedirs(dev(args[-1]), exist_ok=True)
else:
    rest = args[1:]
    if rest[0] == "taskset":
        rest = rest[2:]
    opts = dict(a[2:].split("=", 1) for a in rest[1:])
    if os.environ.get("FAKE_GARBAGE") and os.environ["FAKE_GARBAGE"] in opts["graph"]:
        print("STARTING!\nFailed to allocate tensors"); sys.exit(0)
    sys.path.insert(0, {repo!r})
    from modules.latency.sessions import tflite_runner
    fn = tflite_runner(dev(opts["graph"]), int(opts["num_threads"]), opts["use_xnnpack"] == "true")
    for _ in range(int(opts["warmup_runs"])):
        fn()
    t0 = time.perf_counter()
    for _ in range(int(opts["num_runs"])):
        fn()
    avg = (time.perf_counter() - t0) / int(opts["num_runs"]) * 1e6
    print(f"Inference timings in us: Init: 1000, First inference: {{avg:.1f}}, Warmup (avg): {{avg:.1f}}, "
          f"Inference (avg): {{avg:.2f}}")
'''


def _install(tmp_path: Path, monkeypatch, name: str, text: str) -> Path:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text(text)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATE", str(state))
    for k in ("FAKE_FAIL_AFTER", "FAKE_GARBAGE"):
        monkeypatch.delenv(k, raising=False)
    return state


def _ssh_argv(out: Path, host_dir: Path) -> list[str]:
    return ["--superspace", "tiny", "--platform", "ort_int8", "--resolutions", "32", "--num_subnets", "0",
            "--num_calib", "2", "--min_runs", "2", "--min_time", "0", "--output_dir", str(out), "--no_progress",
            "--device_runner", "ssh", "--ssh_host", "fakehost", "--remote_python", sys.executable,
            "--remote_dir", str(host_dir)]


def test_ssh_table_survives_a_disconnect_and_matches_the_uninterrupted_keys(tmp_path, monkeypatch):
    state = _install(tmp_path, monkeypatch, "ssh", FAKE_SSH)
    argv = _ssh_argv(tmp_path / "out", tmp_path / "host")
    args = build_latency_table.get_args_parser().parse_args(argv)
    res, subnets, calib = build_latency_table.sample_models(args)
    expected = {block_key(c) for c in fixed_block_configs("tiny", res)} | \
        {block_key(c) for m in subnets + calib for c in subnet_block_configs(*m)}
    monkeypatch.setenv("FAKE_FAIL_AFTER", "30")  # the host goes away part-way through the blocks
    with pytest.raises(DeviceError, match=r"ssh runner: ssh .* failed \(exit 255\) while .*Connection refused"):
        build_latency_table.main(args)
    table = tmp_path / "out" / "latency" / "ort_int8.json"
    saved = json.loads(table.read_text())
    assert 0 < len(saved["blocks"]) < len(expected) and saved["overhead_ms"] > 0  # what was measured is kept
    assert saved["device"]["runner"] == "ssh" and saved["device"]["target"] == "fakehost"
    monkeypatch.delenv("FAKE_FAIL_AFTER")
    (state / "calls").write_text("0")
    out = build_latency_table.main(build_latency_table.get_args_parser().parse_args(argv))
    assert out["new_blocks"] == len(expected) - len(saved["blocks"])  # nothing measured twice
    pred = load_predictor("ort_int8", "tiny", str(tmp_path / "out" / "latency"))
    assert set(pred.table) == expected and all(v >= 0 for v in pred.table.values())
    assert {k: pred.table[k] for k in saved["blocks"]} == pytest.approx(saved["blocks"])
    assert len(pred.calibration) == 2 and pred.correction != (1.0, 0.0)
    assert pred.predict_config(*calib[0]) > 0  # the predictor works the same on a device-filled table
    with pytest.raises(ValueError, match="measured with runner 'ssh', not 'local'"):  # no mixing devices
        LatencyPredictor("ort_int8", str(table)).build([fixed_block_configs("tiny", [40])], progress=False)


def test_ssh_garbage_names_the_block(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "ssh", FAKE_SSH)
    cfg = fixed_block_configs("tiny", [32])[0]
    monkeypatch.setenv("FAKE_GARBAGE", f"b_{block_key(cfg)}")
    pred = LatencyPredictor("ort_int8", str(tmp_path / "t.json"), runs=2, min_time=0.0,
                            runner=SshRunner("fakehost", python=sys.executable, remote_dir=str(tmp_path / "host")))
    with pytest.raises(DeviceError, match=rf"no result while timing block {block_key(cfg)}; it printed: "
                                          r"'Segmentation fault'"):
        pred.build([[cfg]], progress=False)


def test_adb_table_resumes_after_a_disconnect_and_names_a_garbage_block(tmp_path, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    _install(tmp_path, monkeypatch, "adb", FAKE_ADB.format(python=sys.executable, repo=str(REPO)))
    cfgs = fixed_block_configs("tiny", [32])[:2]
    keys = {block_key(c) for c in cfgs}

    def predictor():
        p = LatencyPredictor("tflite_int8", str(tmp_path / "t.json"), runs=2, min_time=0.0, clock="wall",
                             stat="mean", runner=AdbRunner(serial="FAKE0001", taskset="f0", workdir=str(tmp_path)))
        p.mc.rounds = p.mc.max_rounds = 1
        return p

    monkeypatch.setenv("FAKE_FAIL_AFTER", "8")  # describe (3), mkdir, overhead (push, time), one block, then gone
    with pytest.raises(DeviceError, match="adb runner: adb -s FAKE0001 .*failed.*device 'FAKE0001' not found"):
        predictor().build([cfgs], progress=False)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert 0 < len(saved["blocks"]) < len(keys) and saved["device"]["model"] == "Fake Pixel"
    monkeypatch.delenv("FAKE_FAIL_AFTER")
    pred = predictor()
    assert pred.build([cfgs], progress=False) == len(keys) - len(saved["blocks"])
    assert set(pred.table) == keys and pred.predict_blocks(cfgs) > 0
    bad = fixed_block_configs("tiny", [40])[0]
    monkeypatch.setenv("FAKE_GARBAGE", f"b_{block_key(bad)}")
    with pytest.raises(DeviceError, match=rf"no 'Inference \(avg\)' time while timing block {block_key(bad)}"):
        pred.build([[bad]], progress=False)


def test_benchmark_model_output_parsing():
    text = ("INFO: count=50 first=1200 curr=980 min=950 max=1300 avg=1001.5 std=40\n"
            "INFO: Inference timings in us: Init: 15063, First inference: 1874, Warmup (avg): 1150.2,\n"
            "  Inference (avg): 1001.5\n")
    assert parse_benchmark_model(text, "x") == pytest.approx(1.0015)
    for bad in ("", "Inference timings in us: Init: 1, Inference (avg): nan", "avg=3"):
        with pytest.raises(DeviceError, match="while timing block B"):
            parse_benchmark_model(bad, "timing block B")


def test_import_csv(tmp_path):
    import random

    from modules.latency.sampling import sample_subnets

    models = sample_subnets("tiny", 0, random.Random(0), [32])  # its max and min subnets
    cfgs = list({block_key(c): c for m in models for c in subnet_block_configs(*m)}.values())
    rows = ["block,supernet,subnet,latency_ms,source"]
    rows += [f"{block_key(c)},,,{0.01 * (i + 1):.4f},lab phone" for i, c in enumerate(cfgs)]
    rows += [f",{sup},{sub},{ms},lab phone" for (sup, sub), ms in zip(models, (2.0, 0.5))]  # whole subnets
    good = tmp_path / "blocks.csv"
    good.write_text("\n".join(rows) + "\n")
    argv = ["--superspace", "tiny", "--platform", "tflite_int8", "--output_dir", str(tmp_path / "out"),
            "--import_csv", str(good), "--no_progress"]
    out = build_latency_table.main(build_latency_table.get_args_parser().parse_args(argv))
    pred = load_predictor("tflite_int8", "tiny", str(tmp_path / "out" / "latency"))
    assert out["new_blocks"] == len(cfgs) == len(pred.table) and pred.device["runner"] == "csv"
    assert pred.table[block_key(cfgs[0])] == pytest.approx(0.01)
    assert pred.predict_config(*models[0]) == pytest.approx(2.0) and pred.predict_config(*models[1]) == \
        pytest.approx(0.5)  # two whole subnets: the correction goes through both
    bad = tmp_path / "bad.csv"
    for text, msg in [("block,ms\nx,1\n", r"bad\.csv:1: header needs the columns block and latency_ms"),
                      ("block,latency_ms\nFirstConv_32_3_8,1\n", r"bad\.csv:2: malformed block key"),
                      (f"block,latency_ms\n{block_key(cfgs[0])},-1\n", r"bad\.csv:2: latency_ms '-1' must be"),
                      (f"block,latency_ms\n{block_key(cfgs[0])},fast\n", r"bad\.csv:2: latency_ms 'fast' is not")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            build_latency_table.main(build_latency_table.get_args_parser().parse_args(
                argv[:-3] + ["--import_csv", str(bad), "--output_dir", str(tmp_path / "bad")]))


@pytest.mark.parametrize("extra, msg", [
    (["--device_runner", "ssh"], "--device_runner ssh needs --ssh_host"),
    (["--device_runner", "adb"], "--device_runner adb times LiteRT models with benchmark_model: use --platform"),
    (["--device_runner", "adb", "--platform", "tflite_int8", "--stat", "min"], "benchmark_model reports the mean"),
])
def test_runner_arguments_are_checked(tmp_path, extra, msg):
    argv = ["--superspace", "tiny", "--output_dir", str(tmp_path), "--no_progress"] + extra
    with pytest.raises(ValueError, match=msg):
        build_latency_table.main(build_latency_table.get_args_parser().parse_args(argv))
    assert not (tmp_path / "latency").exists()


def test_block_report_reads_tables_whatever_filled_them(tmp_path):
    """The per-block FP32-vs-INT8 report from two imported tables (a device's timings): the ratios are the
    tables', and the INT8 graphs have no float ops."""
    from bench import block_report

    cfgs = [c for _, c in block_report.typical_blocks("tiny", 32)]
    for platform, ms in (("ort_fp32", 0.2), ("ort_int8", 0.1)):
        csv_path = tmp_path / f"{platform}.csv"
        csv_path.write_text("block,latency_ms\n" + "".join(f"{k},{ms}\n" for k in sorted({block_key(c) for c in cfgs})))
        build_latency_table.main(build_latency_table.get_args_parser().parse_args(
            ["--superspace", "tiny", "--platform", platform, "--output_dir", str(tmp_path), "--import_csv",
             str(csv_path)]))
    args = block_report.get_args_parser().parse_args(["--superspace", "tiny", "--resolution", "32", "--table_dir",
                                                      str(tmp_path / "latency"), "--output_dir", str(tmp_path)])
    rows = block_report.main(args)
    assert len(rows) == len(cfgs) and all(float(r["int8_speedup"]) == pytest.approx(2.0) for r in rows)
    assert not any(r["float_ops"] for r in rows)
