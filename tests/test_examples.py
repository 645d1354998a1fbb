"""The command lines in examples/*.sh and the README use flags that the scripts really have."""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPT = re.compile(r"(?:python(?:3)?\s+(?:-m\s+)?|\$RUN\s+)([\w/.]+)")


def _commands(text: str):
    """(script path, [flags]) of every `python script.py ...` / `$RUN script.py ...` / `python -m pkg.mod`."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #")[0]
        m = SCRIPT.search(line)
        if not m or line.lstrip().startswith("#"):
            continue
        target = m.group(1)
        path = target if target.endswith(".py") else target.replace(".", "/") + ".py"
        if not (REPO / path).is_file():
            continue
        rest = line[m.end():]
        try:
            tokens = shlex.split(rest, posix=True)
        except ValueError:  # unbalanced quotes inside $(...): fall back to a plain split
            tokens = rest.split()
        flags = [t.split("=")[0] for t in tokens if t.startswith("--")]
        yield path, flags


def _parser(path: str):
    spec = importlib.util.spec_from_file_location("example_target_" + path.replace("/", "_")[:-3], REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_args_parser()


def _cases():
    for f in sorted((REPO / "examples").glob("*.sh")) + [REPO / "README.md"]:
        for path, flags in _commands(f.read_text()):
            yield pytest.param(path, flags, id=f"{f.name}:{path}")


@pytest.mark.parametrize("path,flags", list(_cases()))
def test_example_flags_exist(path, flags):
    known = set(_parser(path)._option_string_actions)
    unknown = [fl for fl in flags if fl not in known]
    assert not unknown, f"{path}: unknown flag(s) {unknown}"


def test_the_examples_are_found():
    scripts = {p for f in (REPO / "examples").glob("*.sh") for p, _ in _commands(f.read_text())}
    assert {"train_block_kd.py", "train_supernet.py", "search_subnet.py", "onnx_tools/export_int8_lsq.py"} <= scripts


# ------------------------------------------------------------------ the examples run (dry mode)
def _env_with_venv(**extra) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, torchrun
    env.update(extra)
    return env


def _csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_one_node_example_runs_end_to_end_in_dry_mode(tmp_path):
    """DRY_RUN=1: every command of the 1-node example on the tiny superspace, digits and 2 gloo ranks, each
    stage reading what the one before wrote (block KD -> LUT -> space search -> supernet -> subnet search)."""
    import json
    import subprocess

    import yaml

    out = subprocess.run(["bash", str(REPO / "examples" / "imagenet_onnxw_1node.sh")], cwd=REPO, timeout=900,
                         env=_env_with_venv(DRY_RUN="1", OUT=str(tmp_path)), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    kd = tmp_path / "block_kd" / "tiny"
    assert len(_csv_rows(kd / "fp32_summary.csv")) == len(_csv_rows(kd / "lsq_summary.csv")) == 1 + 36
    luts = sorted((tmp_path / "lut" / "tiny").glob("stage*.csv"))
    assert len(luts) == 84 and all(len(p.read_text().splitlines()) == 2 for p in luts)
    space = yaml.safe_load(next((tmp_path / "space_search" / "tiny").glob("c100_*/result.yaml")).read_text())
    enc = space["best"]["supernet"]
    assert (tmp_path / "supernet_training" / enc / "checkpoint.pth").is_file()
    assert (tmp_path / "supernet_training" / enc / "lsq.pth").is_file()
    best = json.loads((tmp_path / "search_subnet" / enc / "c100_d100" / "best.json").read_text())
    assert best["supernet"] == enc and best["quant_mode"] == "lsq" and best["evaluated"] == 8


_STUB = """#!/usr/bin/env bash
# records its command line; `python -c CODE` really runs (the example reads the space search result with it)
if [ "$(basename "$0")" = python ] && [ "${1:-}" = -c ]; then exec %s "$@"; fi
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""


def _multinode(tmp_path: Path, node_rank: int) -> list[str]:
    import subprocess

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "torchrun"):
        (bin_dir / name).write_text(_STUB % sys.executable)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / f"node{node_rank}.log"
    env = _env_with_venv(OUT=str(out), IMAGENET="/data/imagenet", B5_WEIGHTS="/data/b5.pth", NNODES="2",
                         NODE_RANK=str(node_rank), MASTER_ADDR="10.0.0.1", STUB_LOG=str(log))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    res = subprocess.run(["bash", str(REPO / "examples" / "imagenet_mobilew_multinode.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return log.read_text().splitlines()


def test_multinode_example_runs_once_on_every_node(tmp_path):
    """The multi-node example's logic with recording launchers: every node runs every torchrun stage with its
    node rank; only node 0 builds the latency table and searches the space; every node then reads the space
    node 0 found from the shared output dir and trains / searches it, in one run of the script (no second
    run with SPACE set)."""
    out = tmp_path / "out"
    (out / "latency").mkdir(parents=True)
    (out / "latency" / "tflite_int8.json").write_text("{}")  # what node 0's build_latency_table leaves
    result = out / "space_search" / "mobilew" / "c15+20_t0.08_a0.01" / "result.yaml"
    result.parent.mkdir(parents=True)
    result.write_text("best:\n  supernet: mobilew-111111-000000\n")  # what node 0's search_block_kd leaves
    for rank in (0, 1):
        cmds = _multinode(tmp_path, rank)
        runs = [c for c in cmds if c.startswith("torchrun ")]
        assert len(runs) == 6 and all(f"--nnodes=2 --node_rank={rank} " in c for c in runs)
        scripts = [c.split()[6] for c in runs]
        assert scripts == ["train_block_kd.py", "lsq_block_kd.py", "eval_block_kd.py", "train_supernet.py",
                           "train_supernet.py", "search_subnet.py"]
        assert all("mobilew-111111-000000" in c for c in runs[3:])
        node0_only = [c.split()[1] for c in cmds if c.startswith("python ")]
        assert node0_only == (["build_latency_table.py", "search_block_kd.py"] if rank == 0 else [])
