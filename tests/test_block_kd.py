"""Block KD on the tiny superspace: NSR loss, StagePlusProj, fp32 -> LSQ+ -> LUT on a small digits ImageFolder."""
from __future__ import annotations

import csv
import os
import random

import pytest
import torch

import eval_block_kd
import lsq_block_kd
import train_block_kd
from modules.block_kd import (StagePlusProj, check_selection, lut_resolutions, nsr_loss,
                              nsr_per_sample, stage_dir)
from modules.checkpoint import atomic_save, load_checkpoint
from modules.counter import count_macs
from modules.lut import read_lut_file, spearman
from modules.superspace import get_superspace
from modules.supernet import load_sliced_state_dict
from modules.teacher import _calibrated_bn_stats, build_tiny_teacher, tiny_teacher_arch, tiny_teacher_path

SPACE = get_superspace("tiny")
STAGE, BLOCK = 2, 0  # stage2 (16x16 input at 64 px), MobileNetV1Dual: the cheapest student
# The LUT of the last width window, which holds the max sub-stage. After a short sandwich run the min sub-stage
# (trained directly every step) is better trained than the intermediate ones, so in the lowest window the
# smallest sub-stages can look best; with enough training the ranking holds in every window.
WINDOW = SPACE.stage(f"stage{STAGE}").num_windows - 1


def _write_teacher(out_dir, arch=None) -> None:
    """A random tiny teacher with per-resolution BN statistics (training it is tested in test_teacher.py)."""
    torch.manual_seed(0)
    arch = arch or tiny_teacher_arch(SPACE)
    t = build_tiny_teacher(arch)
    images = torch.rand(64, 3, 64, 64)
    t.set_bn_stats({r: _calibrated_bn_stats(t, images, r) for r in SPACE.block_kd_hw_list})
    atomic_save({"model": t.state_dict(), "arch": arch, "bn_stats": t.bn_stats, "val_acc": {}},
                tiny_teacher_path(out_dir))


def _common(out, data):
    return ["--output_dir", str(out), "--data_dir", str(data), "--stages", str(STAGE), "--blocks", str(BLOCK),
            "--batch_size", "32", "--valid_size", "64", "--eval_batch_size", "64", "--num_calib_batches", "1",
            "--no_progress"]


def _run(module, argv):
    return module.main(module.get_args_parser().parse_args(argv))


def _log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, digits_root):
    """fp32 block KD (3 epochs) -> LSQ+ (1 epoch) -> a 24-row LUT for the last window of (stage2, block 0)."""
    out = tmp_path_factory.mktemp("bkd")
    _write_teacher(out)
    common = _common(out, digits_root)
    fp32 = _run(train_block_kd, common + ["--epochs", "3", "--max_steps_per_epoch", "10"])
    lsq = _run(lsq_block_kd, common + ["--epochs", "1", "--max_steps_per_epoch", "3"])
    lut = _run(eval_block_kd, ["--output_dir", str(out), "--data_dir", str(digits_root), "--stages", str(STAGE),
                               "--blocks", str(BLOCK), "--windows", str(WINDOW), "--num_samples", "24", "--valid_size",
                               "64", "--calib_batch_size", "32", "--no_progress"])
    return out, fp32, lsq, lut


# ------------------------------------------------------------------------------------------ units
def test_nsr_is_normalised_by_the_teacher_variance():
    torch.manual_seed(0)
    t = torch.randn(4, 3, 5, 5)
    assert float(nsr_loss(t, t)) == 0.0
    s = torch.zeros_like(t)  # a constant student: the original (student variance, no eps) divides by 0
    want = (t.pow(2).mean((2, 3)) / (t.var((2, 3), unbiased=True) + 1e-2)).mean()
    assert torch.allclose(nsr_loss(s, t), want)
    assert torch.allclose(nsr_loss(s, 3 * t, eps=0.0), nsr_loss(s, t, eps=0.0))  # scale free
    assert nsr_per_sample(s, t).shape == (4,)
    with pytest.raises(ValueError, match="differ in shape"):
        nsr_loss(s[:, :2], t)


def test_stage_plus_proj_sampling_and_static_sub_stage():
    torch.manual_seed(0)
    m = StagePlusProj(SPACE, 3, 1, 24, 32).eval()
    st = SPACE.stage("stage3")
    rng = random.Random(0)
    for _ in range(20):
        sub = m.sample(rng, "random", window=1)
        assert sub.cin in SPACE.prev_width_list("stage3")  # the previous stage's FULL list
        assert len(sub.blocks) in st.depth_list and all(w in st.window(1) for _, w, _ in sub.blocks)
    assert m.sample(None, "max").cin == 40 and m.sample(None, "min").blocks[0][1] == 32
    sub = m.sample(random.Random(3), "random")
    static = m.static_stage()
    load_sliced_state_dict(static, m.stage.state_dict())
    x = torch.randn(2, sub.cin, 8, 8)
    with torch.no_grad():
        assert torch.allclose(static.eval()(x), m.stage(x), atol=1e-5)
    assert count_macs(static, (1, sub.cin, 8, 8)) == count_macs(m.stage, (1, sub.cin, 8, 8))
    y = m(torch.randn(2, 24, 8, 8))
    assert y.shape == (2, 32, 4, 4)
    assert len(m.block_configs(64)) == len(sub.blocks) and m.block_configs(64)[0]["hw"] == 8


def test_resolutions_are_stratified():
    r = lut_resolutions(random.Random(0), (32, 48, 64), 7)
    assert len(r) == 7 and sorted(r[:3]) == [32, 48, 64] and sorted(r[3:6]) == [32, 48, 64]


def test_bad_selection_is_one_clear_error(tmp_path, digits_root, capsys):
    with pytest.raises(ValueError, match="unknown stage index 7"):
        check_selection(SPACE, [7], None)
    with pytest.raises(ValueError, match="unknown block index 9 .*0=MobileNetV1Dual"):
        check_selection(SPACE, None, [9])
    from modules.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(train_block_kd.main, train_block_kd.get_args_parser(),
                 ["--output_dir", str(tmp_path), "--stages", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown stage index 0")
    with pytest.raises(FileNotFoundError, match=r"fp32 block-KD checkpoint\(s\) missing .*stage3_1/checkpoint.pth"):
        _run(lsq_block_kd, ["--output_dir", str(tmp_path), "--stages", "3", "--blocks", "1"])


def test_teacher_with_wrong_strides_is_one_clear_error(tmp_path, digits_root):
    arch = tiny_teacher_arch(SPACE)
    arch["strides"][3] = 1  # stage2 without its stride
    _write_teacher(tmp_path, arch)
    with pytest.raises(ValueError, match="does not fit superspace tiny: stage2 output"):
        _run(train_block_kd, _common(tmp_path, digits_root) + ["--epochs", "1", "--max_steps_per_epoch", "1"])


# ------------------------------------------------------------------------------------------ pipeline
def test_fp32_run_lowers_the_nsr(pipeline):
    out, fp32, _, _ = pipeline
    rows = _log(stage_dir(out, "tiny", STAGE, BLOCK) / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    for mode in ("max", "min", "random"):
        assert float(rows[-1][f"nsr_{mode}"]) < float(rows[0][f"nsr_{mode}"]), (mode, rows)
    assert float(rows[-1]["nsr_max"]) < 0.8 * float(rows[0]["nsr_max"]), rows
    key = f"stage{STAGE}_{BLOCK}"
    assert fp32[key]["after"]["max"] < fp32[key]["before"]["max"]
    ck = load_checkpoint(stage_dir(out, "tiny", STAGE, BLOCK) / "checkpoint.pth")
    assert ck["epoch"] == 3 and ck["meta"]["stage"] == STAGE and ck["phase"] == "fp32"
    assert (out / "block_kd" / "tiny" / "fp32_summary.csv").is_file()


def test_lsq_run_starts_from_the_fp32_checkpoint(pipeline):
    out, fp32, lsq, _ = pipeline
    key = f"stage{STAGE}_{BLOCK}"
    # epoch 0 of the LSQ+ log is the fp32 model right after the LSQ+ init: close to the fp32 result,
    # far below a random student's NSR
    before, fp32_after = lsq[key]["before"]["max"], fp32[key]["after"]["max"]
    assert before < 0.5 * fp32[key]["before"]["max"] and before < 1.5 * fp32_after
    ck = load_checkpoint(stage_dir(out, "tiny", STAGE, BLOCK) / "lsq.pth")
    assert ck["phase"] == "lsq" and ck["quant_preset"] == "ort" and ck["epoch"] == 1
    assert any(k.endswith("act_quant.scale") for k in ck["model"])
    assert all(bool(v) for k, v in ck["model"].items() if k.endswith("initialized") and "in_proj" in k)


def test_lut_round_trips_and_bigger_sub_stages_have_lower_nsr(pipeline):
    out, _, _, lut = pipeline
    path = out / "lut" / "tiny" / f"stage{STAGE}_{BLOCK}_{WINDOW}.csv"
    assert lut["files"] == 1 and lut["rows"] == 24
    text = path.read_text()
    table = read_lut_file(str(path), "tiny", STAGE, BLOCK, WINDOW)
    assert len(table) == 24 and "\n".join(table.rows()) + "\n" == text  # byte-identical round trip
    assert table.resolutions() == {32, 48, 64} and set(table.cin.tolist()) <= set(SPACE.prev_width_list("stage2"))
    assert (table.latency == 0).all() and (table.nsr > 0).all() and (table.mmacs > 0).all()
    rho = spearman(table.mparams, -table.nsr)
    print(f"Spearman(params, -NSR) = {rho:.3f}, Spearman(CIN, -NSR) = {spearman(table.cin, -table.nsr):.3f}")
    assert rho > 0, f"Spearman(params, -NSR) = {rho:.3f}"


def test_lut_is_skipped_when_complete_and_reproducible(pipeline, digits_root):
    out, _, _, _ = pipeline
    path = out / "lut" / "tiny" / f"stage{STAGE}_{BLOCK}_{WINDOW}.csv"
    text, mtime = path.read_text(), os.path.getmtime(path)
    argv = ["--output_dir", str(out), "--data_dir", str(digits_root), "--stages", str(STAGE), "--blocks", str(BLOCK),
            "--windows", str(WINDOW), "--num_samples", "24", "--valid_size", "64", "--calib_batch_size", "32",
            "--no_progress"]
    again = _run(eval_block_kd, argv)
    assert again["skipped"] == 1 and again["files"] == 0 and os.path.getmtime(path) == mtime
    path.unlink()
    again = _run(eval_block_kd, argv[:-6] + ["6"] + argv[-5:])  # 6 rows: the first 6 of the 24-row file
    assert path.read_text().splitlines() == text.splitlines()[:6]


def test_student_procs_train_the_same_students_as_one_process(tmp_path, digits_root):
    """--student_procs 2 splits the students over 2 spawned processes; a student's initial weights, batches and
    sub-stages depend only on (seed, stage, block, step), so each one ends as in a single-process run."""
    logs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        _write_teacher(out)
        common = ["--output_dir", str(out), "--data_dir", str(digits_root), "--stages", "1", str(STAGE),
                  "--blocks", str(BLOCK), "1", "--batch_size", "16", "--valid_size", "32", "--eval_batch_size", "32",
                  "--num_calib_batches", "1", "--no_progress", "--epochs", "1", "--max_steps_per_epoch", "2"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the student processes: the same float summation order
        try:
            res = _run(train_block_kd, common + ["--student_procs", str(procs)])
        finally:
            torch.set_num_threads(threads)
        assert sorted(k for k in res if k != "stopped") == ["stage1_0", "stage1_1", "stage2_0", "stage2_1"]
        summary = _log(out / "block_kd" / "tiny" / "fp32_summary.csv")
        assert [(r["stage"], r["block"]) for r in summary] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
        logs[procs] = {k: _log(out / "block_kd" / "tiny" / k / "log.csv") for k in res}
    for key, rows in logs[1].items():
        assert len(rows) == len(logs[2][key]) == 2
        for a, b in zip(rows, logs[2][key]):
            for col in ("loss_max", "loss_min", "nsr_max", "nsr_min", "nsr_random"):
                if a[col]:
                    assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4), (key, col)
