"""Every stage under torchrun on CPU / gloo splits its work over the ranks and writes the same files as one
process: subnet search (candidates spread over ranks, scores gathered, rank 0 writes), eval_supernet (subnets
spread), block KD (students spread), the LUT build (files spread)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from test_subnet_search import ENC, make_supernet_ckpts, make_tiny_data

from conftest import REPO_ROOT, run_ranks


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    return {"root": root, "data": make_tiny_data(root / "data"), "ckpts": make_supernet_ckpts(root / "ckpt")}


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _search(env, out: Path, nproc: int) -> Path:
    run_ranks([REPO_ROOT / "search_subnet.py", "--supernet", ENC, "--checkpoint", env["ckpts"]["lsq"],
               "--output_dir", out, "--data_dir", env["data"], "--latency_predictor", "macs",
               "--latency_constraint", "0.5", "--latency_delta", "0.45", "--population", "6", "--iterations", "2",
               "--num_mutations", "3", "--num_crossovers", "2", "--holdout_size", "24", "--num_calib_batches", "1",
               "--calib_batch_size", "16", "--batch_size", "24", "--eval_top", "3", "--random_baseline", "2",
               "--no_progress"], nproc)
    return out / "search_subnet" / ENC / "c0.5_d0.45"


def test_subnet_search_two_ranks_write_what_one_rank_writes(env):
    one, two = _search(env, env["root"] / "s1", 0), _search(env, env["root"] / "s2", 2)
    for name in ("history.csv", "top.csv", "random_baseline.csv"):
        assert _rows(one / name) == _rows(two / name), name
    assert len(_rows(one / "history.csv")) == 1 + 6 + 2 * 5
    a, b = (json.loads((d / "best.json").read_text()) for d in (one, two))
    assert a == b and a["evaluated"] == 16
    assert json.loads((one / "eval_cache.json").read_text()) == json.loads((two / "eval_cache.json").read_text())
    state = json.loads((two / "state.json").read_text())
    assert len(state["records"]) == 16  # rank 0 saved the whole history, gathered from both ranks
    assert not list(two.glob(".*tmp*"))


def test_eval_supernet_two_ranks_write_what_one_rank_writes(env):
    csvs = []
    for nproc in (0, 2):
        out = env["root"] / f"e{nproc}"
        run_ranks([REPO_ROOT / "eval_supernet.py", "--supernet", ENC, "--checkpoint", env["ckpts"]["lsq"],
                   "--output_dir", out, "--data_dir", env["data"], "--subnets", "min", "max", "min",
                   "--num_calib_batches", "1", "--calib_batch_size", "16", "--batch_size", "16",
                   "--latency_predictor", "macs"], nproc)
        csvs.append(_rows(next((out / "eval_supernet").rglob("acc_lsq_val.csv"))))
    assert csvs[0] == csvs[1]
    assert [r[3] for r in csvs[0][1:]] == ["max", "min", "min", "max", "min"]
    assert len({r[5] for r in csvs[0][1:] if r[3] == "min"}) == 1  # one subnet, one score on either rank
