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
    """Also launched by torch.distributed.launch, whose --local-rank=N every script accepts."""
    csvs = []
    for nproc in (0, 2):
        out = env["root"] / f"e{nproc}"
        launcher = "torch.distributed.launch" if nproc else "torch.distributed.run"
        run_ranks([REPO_ROOT / "eval_supernet.py", "--supernet", ENC, "--checkpoint", env["ckpts"]["lsq"],
                   "--output_dir", out, "--data_dir", env["data"], "--subnets", "min", "max", "min",
                   "--num_calib_batches", "1", "--calib_batch_size", "16", "--batch_size", "16",
                   "--latency_predictor", "macs"], nproc, launcher=launcher)
        csvs.append(_rows(next((out / "eval_supernet").rglob("acc_lsq_val.csv"))))
    assert csvs[0] == csvs[1]
    assert [r[3] for r in csvs[0][1:]] == ["max", "min", "min", "max", "min"]
    assert len({r[5] for r in csvs[0][1:] if r[3] == "min"}) == 1  # one subnet, one score on either rank


def _block_kd(out: Path, data: Path, nproc: int) -> None:
    from test_block_kd import _write_teacher

    _write_teacher(out)
    run_ranks([REPO_ROOT / "train_block_kd.py", "--output_dir", out, "--data_dir", data, "--stages", "1", "2",
               "--blocks", "0", "1", "--batch_size", "16", "--valid_size", "32", "--eval_batch_size", "32",
               "--num_calib_batches", "1", "--no_progress", "--epochs", "1", "--max_steps_per_epoch", "2"], nproc)


def _lut(out: Path, data: Path, lut_dir: Path, nproc: int) -> dict[str, str]:
    run_ranks([REPO_ROOT / "eval_block_kd.py", "--output_dir", out, "--data_dir", data, "--stages", "1", "2",
               "--blocks", "0", "1", "--windows", "0", "--fp32_mode", "--num_samples", "6", "--valid_size", "32",
               "--calib_batch_size", "16", "--lut_dir", lut_dir, "--no_progress", "--device", "cpu"], nproc)
    return {p.name: p.read_text() for p in sorted((lut_dir / "tiny_fp32").glob("*.csv"))}


def test_block_kd_and_lut_two_ranks_write_what_one_rank_writes(tmp_path, digits_root):
    """Block KD spreads the 4 students over the 2 ranks (each trains its own on all the data); the LUT build
    spreads its 4 files. Logs, summary and LUT files equal those of one process."""
    for nproc in (0, 2):
        _block_kd(tmp_path / f"kd{nproc}", digits_root, nproc)
    root = [tmp_path / f"kd{n}" / "block_kd" / "tiny" for n in (0, 2)]
    keys = ["stage1_0", "stage1_1", "stage2_0", "stage2_1"]
    for key in keys:
        a, b = (_rows(r / key / "log.csv") for r in root)
        assert len(a) == len(b) == 3 and a[0] == b[0]  # header
        for ra, rb in zip(a[1:], b[1:]):
            assert [float(v) for v in ra[:-1] if v] == pytest.approx([float(v) for v in rb[:-1] if v], rel=1e-5)
    assert [r[:4] for r in _rows(root[0] / "fp32_summary.csv")] == [r[:4] for r in _rows(root[1] / "fp32_summary.csv")]
    one = _lut(tmp_path / "kd0", digits_root, tmp_path / "lut1", 0)
    two = _lut(tmp_path / "kd0", digits_root, tmp_path / "lut2", 2)
    assert sorted(one) == [f"{k}_0.csv" for k in keys] and one == two
    assert all(len(text.splitlines()) == 6 for text in one.values())
