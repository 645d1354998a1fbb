"""SIGTERM on the long jobs: the process exits promptly with code 143, what it has done is saved,
and a run with ``--resume`` (or simply again, for the LUT build) continues instead of starting over.

train_supernet.py has its own test (tests/test_train_supernet.py). Here: train_block_kd.py and
lsq_block_kd.py (stop at the next step boundary, checkpoints saved), eval_block_kd.py with 2 worker processes
(no orphaned workers; complete files kept, the rest rebuilt), search_block_kd.py and search_subnet.py (the
evolution state is saved on the way out; the resumed search ends exactly where an uninterrupted one ends).

The SIGTERMed runs are real subprocesses. To send the signal at a known point, they are started through a small
wrapper that slows one function down (a training step, a fitness evaluation) and prints a marker line after
each call; the parent sends SIGTERM after the second marker (the LUT build: once a worker's progress bar shows a
row). The runs that continue afterwards call the script's main in this process (no second torch start-up).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

# python -c WRAPPER <module to patch> <function> <script module> <args...>: wrap module.function so that every
# call sleeps 0.3 s and prints "SLOWED <n>", then run the script's main as its __main__ block would.
WRAPPER = textwrap.dedent("""
    import importlib, sys, time
    mod_name, fn_name, script = sys.argv[1:4]
    argv = sys.argv[4:]
    mod = importlib.import_module(mod_name)
    owner, attr = (mod, fn_name) if "." not in fn_name else (getattr(mod, fn_name.split(".")[0]),
                                                             fn_name.split(".")[1])
    orig, calls = getattr(owner, attr), [0]

    def slowed(*a, **k):
        out = orig(*a, **k)
        calls[0] += 1
        print(f"SLOWED {calls[0]}", flush=True)
        time.sleep(0.3)
        return out

    setattr(owner, attr, slowed)
    s = importlib.import_module(script)
    from modules.cli import run_main
    run_main(s.main, s.get_args_parser(), argv)
""")


def _in_process(module_name: str, *argv) -> int:
    """Run a script's main through run_main in this process (the resumed runs: no second torch start-up)."""
    import importlib

    from modules.cli import run_main

    m = importlib.import_module(module_name)
    try:
        run_main(m.main, m.get_args_parser(), [str(a) for a in argv])
        return 0
    except SystemExit as e:
        return e.code or 0
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_spaceevo", False)]:
            root.removeHandler(h)
            h.close()


def _term_when(cmd: list[str], ready) -> tuple[int, str, list[int]]:
    """Start `cmd`, read its merged stdout/stderr, send SIGTERM as soon as `ready(output so far)` holds.
    Returns (exit code, whole output, pids of the child processes alive when the signal was sent)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, children = b"", []
    try:
        while True:
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
            if ready(out.decode(errors="replace")):
                children = _children(p.pid)
                p.send_signal(signal.SIGTERM)
                break
        out += p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out.decode(errors="replace"), children


def _run_and_term(patch: tuple[str, str], script: str, *argv, after: int = 2) -> tuple[int, str, list[int]]:
    """Run `script` slowed at `patch` = (module, function); SIGTERM after the `after`-th call."""
    cmd = [sys.executable, "-c", WRAPPER, *patch, script[:-len(".py")], *map(str, argv)]
    return _term_when(cmd, lambda text: f"SLOWED {after}\n" in text)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(c) for c in task.read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _png_folder(root: Path, classes: int = 10, train: int = 5, val: int = 2) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / str(c)
            d.mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ block KD
BLOCK_KD = ("--superspace", "tiny", "--stages", 1, "--blocks", 0, "--epochs", 2, "--batch_size", 8,
            "--eval_batch_size", 16, "--valid_size", 16, "--num_calib_batches", 1, "--teacher_epochs", 1,
            "--hw_list", 32, "--no_progress")


@pytest.fixture(scope="module")
def block_kd(tmp_path_factory):
    """fp32 and LSQ+ block KD of stage1 block 0, each SIGTERMed after its 2nd step and resumed."""
    from test_block_kd import _write_teacher

    root = tmp_path_factory.mktemp("sigterm_kd")
    data, out = _png_folder(root / "data"), root / "out"
    _write_teacher(out)  # a random tiny teacher (training one is tested elsewhere)
    common = (*BLOCK_KD, "--data_dir", data, "--output_dir", out)
    runs = {}
    for script in ("train_block_kd.py", "lsq_block_kd.py"):
        code, text, _ = _run_and_term(("modules.block_kd", "train_step"), script, *common)
        resumed = _in_process(script[:-len(".py")], *common, "--resume")
        runs[script] = (code, text, resumed)
    return out / "block_kd" / "tiny" / "stage1_0", runs, data, out


@pytest.mark.parametrize("script,ckpt,log_name", [("train_block_kd.py", "checkpoint.pth", "log.csv"),
                                                  ("lsq_block_kd.py", "lsq.pth", "lsq_log.csv")])
def test_block_kd_stops_on_sigterm_and_resumes(block_kd, script, ckpt, log_name):
    from modules.checkpoint import load_checkpoint

    d, runs, _, _ = block_kd
    code, text, resumed = runs[script]
    assert code == 143, text
    assert "stopped by signal in epoch 1: checkpoints saved; run again with --resume" in text
    assert "Traceback" not in text
    # the stop came at a step boundary: 2 or 3 steps of epoch 1 (4 steps per epoch) are in the checkpoint
    assert resumed == 0
    log_text = (d.parent / "logs" / f"{script[:-len('.py')]}.log").read_text()
    assert log_text.count("stage1_0: resumed from") == 1 and "at epoch 0 (+" in log_text
    ck = load_checkpoint(d / ckpt)
    assert ck["epoch"] == 2 and ck["batch_in_epoch"] == 0 and ck["step"] == 8
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(d / log_name))]
    assert epochs == [0, 1, 2] if script == "train_block_kd.py" else epochs[-2:] == [1, 2]


# ------------------------------------------------------------------------------------------------ LUT build
def test_lut_build_sigterm_leaves_no_workers_and_reruns(block_kd):
    from modules.lut import read_lut_file

    _, _, data, out = block_kd
    args = ("--superspace", "tiny", "--data_dir", data, "--output_dir", out, "--stages", 1, "--blocks", 0,
            "--num_samples", 6, "--valid_size", 16, "--eval_batch_size", 16, "--calib_batch_size", 8,
            "--hw_list", 32, "--workers", 2)
    # SIGTERM once a worker's progress bar shows a row done (workers are spawned: nothing can be patched there)
    cmd = [sys.executable, str(REPO / "eval_block_kd.py"), *map(str, args)]
    code, text, children = _term_when(cmd, lambda t: re.search(r"LUT shard \d/2:.*?\| *[1-5]/6", t))
    assert code == 143 and "error: terminated (SIGTERM)" in text, text
    assert "Traceback" not in text
    assert len(children) >= 2  # the pool's workers (and multiprocessing's resource tracker)
    deadline = time.time() + 30
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children), "worker processes outlived the SIGTERMed parent"
    lut = out / "lut" / "tiny"
    assert not list(lut.glob("*.tmp")) if lut.exists() else True
    assert _in_process("eval_block_kd", *args[:-2], "--workers", 1, "--no_progress") == 0  # same rows
    for w in (0, 1):
        assert len(read_lut_file(str(lut / f"stage1_0_{w}.csv"), "tiny", 1, 0, w)) == 6


# ------------------------------------------------------------------------------------------------ searches
def _uninterrupted(script_module: str, argv: list[str]) -> None:
    """The same search in this process, never interrupted (the reference for the resumed one)."""
    import importlib

    s = importlib.import_module(script_module)
    s.main(s.get_args_parser().parse_args(argv))


def test_space_search_sigterm_saves_state_and_resume_matches(tmp_path, capsys):
    from modules.lut import write_synthetic_lut

    write_synthetic_lut(str(tmp_path / "lut"), "tiny", rows_per_file=60)
    argv = ["--superspace", "tiny", "--lut_dir", str(tmp_path / "lut"), "--latency_constraints", "20",
            "--population", "8", "--parents", "3", "--cycles", "30", "--num_samples", "100", "--chunk_size", "50",
            "--no_progress"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    code, text, _ = _run_and_term(("modules.qt_score", "QTScorer.score"), "search_block_kd.py", *argv,
                                  "--output_dir", out_a)
    assert code == 143 and "error: terminated (SIGTERM)" in text and "Traceback" not in text, text
    run = next((out_a / "space_search" / "tiny").glob("c20_*"))
    saved = json.loads((run / "state.json").read_text())
    assert 1 <= len(saved["records"]) < 30  # the evaluation in progress at the signal is lost
    assert _in_process("search_block_kd", *argv, "--output_dir", out_a, "--resume") == 0
    assert f"resumed from {run / 'state.json'}: " in capsys.readouterr().err
    _uninterrupted("search_block_kd", [*argv, "--output_dir", str(out_b)])
    ref = next((out_b / "space_search" / "tiny").glob("c20_*"))
    assert (run / "history.csv").read_text() == (ref / "history.csv").read_text()
    assert (run / "ranked.csv").read_text() == (ref / "ranked.csv").read_text()


def test_subnet_search_sigterm_saves_state_and_resume_matches(tmp_path):
    from test_subnet_search import ENC, make_supernet_ckpts, make_tiny_data

    from modules.latency.predictor import load_predictor
    from modules.supernet import supernet_from_encoding

    data = make_tiny_data(tmp_path / "data", per_class=4, val_per_class=1)
    make_supernet_ckpts(tmp_path / "a")
    pred, net = load_predictor("macs", "tiny"), supernet_from_encoding(ENC)
    net.set_min_subnet()
    lo = pred.predict_subnet(net)
    net.set_max_subnet()
    hi = pred.predict_subnet(net)
    target, delta = round(lo + 0.6 * (hi - lo), 3), round(0.5 * (hi - lo), 3)
    argv = ["--supernet", ENC, "--quant_mode", "fp32", "--data_dir", str(data), "--latency_predictor", "macs",
            "--latency_constraint", str(target), "--latency_delta", str(delta), "--population", "4",
            "--iterations", "1", "--num_mutations", "2", "--num_crossovers", "1", "--holdout_size", "16",
            "--num_calib_batches", "1", "--calib_batch_size", "8", "--batch_size", "16", "--eval_top", "0",
            "--no_progress"]
    code, text, _ = _run_and_term(("modules.subnet_search", "SubnetEvaluator.__call__"), "search_subnet.py", *argv,
                                  "--output_dir", tmp_path / "a")
    assert code == 143 and "error: terminated (SIGTERM)" in text and "Traceback" not in text, text
    assert "interrupted: state saved to" in text
    run = tmp_path / "a" / "search_subnet" / ENC / f"c{target:g}_d{delta:g}"
    assert 1 <= len(json.loads((run / "state.json").read_text())["records"]) < 7
    assert _in_process("search_subnet", *argv, "--output_dir", tmp_path / "a", "--resume") == 0
    assert f"resumed {run / 'state.json'}: " in (run.parent / "search_subnet.log").read_text()
    # the whole search was done: population 4 + one iteration of 2 mutants and 1 crossover, each once
    # (that a resumed search equals an uninterrupted one is tested in tests/test_subnet_search.py)
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 7 and len({r["subnet"] for r in rows}) == 7


def test_block_kd_student_procs_pass_sigterm_on(block_kd):
    """--student_procs 2: SIGTERM to the parent reaches both student processes, which save and stop; exit
    code 143, no orphaned process, and --resume finishes every student."""
    from modules.checkpoint import load_checkpoint

    _, _, data, out = block_kd
    out = out.parent / "procs"
    from test_block_kd import _write_teacher

    _write_teacher(out)
    args = [str(a) for a in ("--superspace", "tiny", "--stages", 1, "--blocks", 0, 1, "--epochs", 40, "--batch_size", 8,
                             "--eval_batch_size", 16, "--valid_size", 16, "--num_calib_batches", 1, "--hw_list", 32,
                             "--no_progress", "--data_dir", data, "--output_dir", out, "--student_procs", 2)]
    cmd = [sys.executable, str(REPO / "train_block_kd.py"), *args]
    # both students have logged their NSR before training: the processes are in (or entering) their loops
    code, text, children = _term_when(cmd, lambda t: t.count("before: NSR") == 2)
    assert code == 143, text
    assert "passing it on to the 2 student processes" in text and "Traceback" not in text
    deadline = time.time() + 10  # processes that are exiting (empty cmdline) get a moment to finish
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.1)
    alive = [Path(f"/proc/{c}/cmdline").read_bytes() for c in children if _alive(c)]
    assert len(children) >= 2 and not alive, alive  # (children: the 2 students + spawn's resource tracker)
    for b in (0, 1):
        ck = load_checkpoint(out / "block_kd" / "tiny" / f"stage1_{b}" / "checkpoint.pth")
        assert ck["epoch"] < 40
    assert _in_process("train_block_kd", *args, "--resume") == 0
    for b in (0, 1):
        assert load_checkpoint(out / "block_kd" / "tiny" / f"stage1_{b}" / "checkpoint.pth")["epoch"] == 40
