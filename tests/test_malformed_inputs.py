"""Malformed inputs: every stage script answers bad input with exit code 2 and ONE line
``error: ...`` on stderr that names the offending thing (file path, token, key) — never a traceback.

The table ``CASES`` below IS the documentation of what is checked: one row per kind of malformed input,
``Case(name, script, argv, expect, sub)``:

* ``script`` is the top-level stage script, ``argv`` its command line; ``{fx}`` stands for the fixture
  directory built once by :func:`_build_fixtures` (tiny ImageFolders, tiny supernet checkpoints, a synthetic
  tiny LUT, YAML configs, CSV / JSON files, each broken in exactly one way);
* ``expect`` is one substring (or a tuple of substrings) the error line must contain — the file / token /
  key at fault and what is wrong with it;
* ``sub=True`` runs the script as a real subprocess (``python <script> ...``), checking the exit code and the
  whole of stderr; the other rows call the script's ``main`` through ``modules.cli.run_main`` in this
  process (same code path, without paying torch's start-up per row).

Every row fails before any training starts, so the file stays well under a minute on 2 cores.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SUB_OK = "d1#1#1#1#1#1#1#1_k3#3#3#3#3#3#3#3_w8#8#16#24#32#48#64#80_e0#0.5#0#0#0#0#0#0"  # valid body, no _r
LUT_FILE = "stage2_0_1.csv"  # the file each broken LUT dir has damaged (line 2)
SUPERNET = "tiny-000000-000000"
OTHER_SUPERNET = "tiny-333333-000000"


class Case(NamedTuple):
    name: str
    script: str
    argv: tuple
    expect: str | tuple
    sub: bool = False  # run as a real subprocess


def _search_block_kd(lut: str, *extra: str) -> tuple:
    return ("--superspace", "tiny", "--lut_dir", f"{{fx}}/{lut}", "--latency_constraints", "10",
            "--output_dir", "{fx}/o", "--cycles", "5", "--population", "4", "--parents", "2",
            "--num_samples", "10", "--chunk_size", "10", "--no_progress", *extra)


_EXPORT = ("--supernet", SUPERNET, "--quant_mode", "fp32", "--output_dir", "{fx}/out", "--data_dir", "{fx}/small",
           "--no_calib", "--output", "{fx}/o/sub.pth")
_EVAL_ACC = ("--mode", "acc", "--supernet", SUPERNET, "--quant_mode", "fp32", "--num_calib_batches", "1",
             "--calib_batch_size", "4", "--batch_size", "4", "--holdout_size", "4", "--no_maxmin")
_BLOCK_KD = ("--superspace", "tiny", "--output_dir", "{fx}/o", "--stages", "1", "--blocks", "0", "--epochs", "1",
             "--max_steps_per_epoch", "1", "--no_progress")
_LAT = ("--mode", "lat", "--latency_predictor", "ort_int8", "--latency_table_dir", "{fx}/nolat")
_CKPT = f"{{fx}}/out/supernet_training/{SUPERNET}/checkpoint.pth"
_OTHER_CKPT = f"{{fx}}/out/supernet_training/{OTHER_SUPERNET}/checkpoint.pth"
_TRUNC_CKPT = f"{{fx}}/trunc/supernet_training/{SUPERNET}/checkpoint.pth"

CASES = [
    # ---- supernet encodings (<superspace>-<6 block digits>-<6 window digits>)
    Case("supernet: unknown block token", "train_supernet.py",
         ("--supernet_choice", "tiny-191122-000000", "--data_path", "{fx}/small", "--output_dir", "{fx}/o"),
         ("supernet encoding 'tiny-191122-000000'", "stage2: block 9 not in 0..5"), sub=True),
    Case("supernet: wrong number of stage digits", "train_supernet.py",
         ("--supernet_choice", "tiny-15112-000000", "--data_path", "{fx}/small", "--output_dir", "{fx}/o"),
         "supernet encoding 'tiny-15112-000000': block group '15112' must be 6 digits"),
    Case("supernet: width window out of range", "train_supernet.py",
         ("--supernet_choice", "tiny-151122-050000", "--data_path", "{fx}/small", "--output_dir", "{fx}/o"),
         ("supernet encoding 'tiny-151122-050000'", "stage2: width window 5 not in 0..1")),
    Case("supernet: unknown superspace", "eval_supernet.py", (*_LAT, "--supernet", "foo-000000-000000"),
         "supernet encoding 'foo-000000-000000': unknown superspace 'foo'"),
    # ---- subnet encodings (d.._k.._w.._e.._r..)
    Case("subnet: wrong depth count", "export_subnet.py",
         (*_EXPORT, "--subnet", "d1#1#1#1#1#1#1_k3#3#3#3#3#3#3_w8#8#16#24#32#48#64_e0#0.5#0#0#0#0#0_r32"),
         "depth list has 7 entries, expected 8", sub=True),
    Case("subnet: kernel outside the choices", "export_subnet.py",
         (*_EXPORT, "--subnet", SUB_OK.replace("_k3#3#3#3#3#3#3#3", "_k3#3#3#3#3#3#3#9") + "_r32"),
         "stage6 block 0 (MobileNetV1Dual): kernel 9 not in [3, 5]"),
    Case("subnet: resolution outside the list", "eval_supernet.py",
         (*_LAT, "--supernet", SUPERNET, "--subnets", SUB_OK + "_r33"),
         "resolution 33 not in [32, 40, 48, 56, 64]"),
    Case("subnet: JSON file that is not JSON", "eval_supernet.py",
         (*_LAT, "--supernet", SUPERNET, "--subnets", "{fx}/best_bad.json"),
         "{fx}/best_bad.json: not valid JSON"),
    # ---- block LUT CSVs (sub_stage,1xCINxHxW,nsr,MMACs,Mparams,latency_ms)
    Case("LUT: wrong field count", "search_block_kd.py", _search_block_kd("lut_fields"),
         f"lut_fields/tiny/{LUT_FILE}:2: expected 6 comma-separated fields", sub=True),
    Case("LUT: NaN latency", "search_block_kd.py", _search_block_kd("lut_nan"),
         f"lut_nan/tiny/{LUT_FILE}:2: latency_ms = nan must be a finite non-negative number"),
    Case("LUT: bad sub-stage key", "search_block_kd.py", _search_block_kd("lut_key"),
         (f"lut_key/tiny/{LUT_FILE}:2:", "sub-stage '3#32#None_9#40#None'", "kernel 9 not in [3, 5]")),
    Case("LUT: bad shape token", "search_block_kd.py", _search_block_kd("lut_shape"),
         f"lut_shape/tiny/{LUT_FILE}:2: input shape '1x16x8' must be 1xCINxHxW"),
    Case("LUT: truncated file", "search_block_kd.py", _search_block_kd("lut_trunc"),
         f"lut_trunc/tiny/{LUT_FILE}:2: expected 6 comma-separated fields (sub_stage,1xCINxHxW,nsr,MMACs,"
         "Mparams,latency_ms), got 2"),
    Case("LUT: a file missing", "search_block_kd.py", _search_block_kd("lut_missing"),
         "lut_missing/tiny: 1 of 84 files missing: stage3_1_0.csv"),
    Case("fixed-latency CSV: non-numeric field", "search_block_kd.py",
         _search_block_kd("lut", "--fixed_latency_csv", "{fx}/fixed_bad.csv"),
         "{fx}/fixed_bad.csv:2: '48,abc' is not <int resolution>,<float ms>"),
    Case("latency table: corrupted JSON", "eval_supernet.py",
         ("--mode", "lat", "--supernet", SUPERNET, "--latency_predictor", "ort_int8", "--latency_table_dir",
          "{fx}/badlat"),
         "latency table {fx}/badlat/ort_int8.json is corrupted"),
    Case("latency table: missing", "search_subnet.py",
         ("--supernet", SUPERNET, "--quant_mode", "fp32", "--output_dir", "{fx}/out", "--data_dir", "{fx}/small",
          "--latency_predictor", "ort_int8", "--latency_table_dir", "{fx}/nolat", "--latency_constraint", "1",
          "--tiny"),
         "latency table {fx}/nolat/ort_int8.json not found"),
    # ---- YAML configs (-c FILE.yaml)
    Case("YAML: unknown key", "train_block_kd.py", ("-c", "{fx}/cfg/unknown.yaml"),
         ("config {fx}/cfg/unknown.yaml: unknown key(s) 'batchsize'", "did you mean 'batch_size'?"), sub=True),
    Case("YAML: wrong type", "train_block_kd.py", ("-c", "{fx}/cfg/type.yaml"),
         "config {fx}/cfg/type.yaml: key 'epochs' has value 'two', expected a valid int"),
    Case("YAML: not a mapping", "train_supernet.py", ("-c", "{fx}/cfg/list.yaml"),
         "config {fx}/cfg/list.yaml: expected a mapping of argument names to values, got list"),
    Case("YAML: syntax error", "search_subnet.py", ("-c", "{fx}/cfg/syntax.yaml"),
         "config {fx}/cfg/syntax.yaml: not valid YAML"),
    Case("YAML: missing file", "lsq_block_kd.py", ("-c", "{fx}/cfg/nope.yaml"),
         "config file {fx}/cfg/nope.yaml does not exist"),
    # ---- data sets (ImageFolder <root>/<split>/<class>/<image>)
    Case("data: missing dataset dir", "train_block_kd.py", (*_BLOCK_KD, "--data_dir", "{fx}/nodata"),
         "data directory {fx}/nodata/train does not exist"),
    Case("data: empty dataset dir (no class folders)", "train_supernet.py",
         ("--supernet_choice", SUPERNET, "--data_path", "{fx}/empty", "--output_dir", "{fx}/o"),
         "data directory {fx}/empty/train has no class subfolders"),
    Case("data: class folder without images", "train_supernet.py",
         ("--supernet_choice", SUPERNET, "--data_path", "{fx}/noimg", "--output_dir", "{fx}/o"),
         "class folder {fx}/noimg/train/0 holds no image"),
    Case("data: unreadable (corrupt) image", "eval_supernet.py",
         (*_EVAL_ACC, "--output_dir", "{fx}/out", "--data_dir", "{fx}/corrupt", "--subnets", SUB_OK + "_r32"),
         "cannot read image {fx}/corrupt/val/1/9999.png"),
    # ---- checkpoints
    Case("checkpoint: truncated", "eval_supernet.py",
         (*_EVAL_ACC, "--output_dir", "{fx}/trunc", "--data_dir", "{fx}/small"),
         f"checkpoint {_TRUNC_CKPT} is corrupted or truncated", sub=True),
    Case("checkpoint: not a torch file", "train_block_kd.py",
         (*_BLOCK_KD, "--data_dir", "{fx}/small", "--teacher_weights", "{fx}/garbage.pth"),
         "checkpoint {fx}/garbage.pth is corrupted or truncated (not a torch zip archive"),
    Case("checkpoint: objects weights_only refuses", "export_subnet.py",
         (*_EXPORT, "--checkpoint", "{fx}/unsafe.pth", "--subnet", "max"),
         "checkpoint {fx}/unsafe.pth holds objects that torch.load(weights_only=True) refuses (datetime.datetime)"),
    Case("checkpoint: missing", "eval_specific_net.py",
         ("--model_name", "SEQnet@vnni-A0", "--checkpoint", "{fx}/missing.pth"),
         "checkpoint {fx}/missing.pth does not exist"),
    Case("checkpoint: from another superspace", "eval_specific_net.py",
         ("--model_name", "SEQnet@vnni-A0", "--checkpoint", _CKPT),
         f"checkpoint {_CKPT} (subnet SEQnet@vnni-A0): state dict does not match the model"),
    Case("checkpoint: of another supernet (weights)", "export_subnet.py",
         (*_EXPORT, "--checkpoint", _OTHER_CKPT, "--subnet", "max"),
         (f"checkpoint {_OTHER_CKPT}: state dict does not match the model", "missing key(s)")),
    Case("checkpoint: of another supernet (metadata)", "train_supernet.py",
         ("--supernet_choice", SUPERNET, "--data_path", "{fx}/small", "--output_dir", "{fx}/o", "--quant_mode",
          "lsq", "--fp32_checkpoint", _OTHER_CKPT),
         f"checkpoint {_OTHER_CKPT} is of supernet {OTHER_SUPERNET}, not {SUPERNET}"),
    Case("checkpoint: a supernet where a subnet is needed", "downstream_cls.py",
         ("--subnet_ckpt", _CKPT, "--data_dir", "{fx}/small", "--output_dir", "{fx}/o", "--epochs", "1"),
         f"{_CKPT}: not a subnet checkpoint", sub=True),
    Case("checkpoint: fp32 block-KD students missing", "lsq_block_kd.py", (*_BLOCK_KD, "--data_dir", "{fx}/small"),
         "fp32 block-KD checkpoint(s) missing for LSQ+: {fx}/o/block_kd/tiny/stage1_0/checkpoint.pth"),
    Case("checkpoint: LSQ+ block-KD students missing", "eval_block_kd.py",
         ("--superspace", "tiny", "--output_dir", "{fx}/o", "--data_dir", "{fx}/small", "--stages", "1",
          "--blocks", "0", "--num_samples", "3", "--no_progress"),
         "block-KD checkpoint(s) missing for the LUT: {fx}/o/block_kd/tiny/stage1_0/lsq.pth"),
    # ---- ONNX tools, named models, misc
    Case("input.csv: line with 2 fields (benchmark)", "onnx_tools/benchmark.py",
         ("--input", "{fx}/input_bad.csv", "--model_dir", "{fx}/o"),
         "{fx}/input_bad.csv:2: expected 3 comma-separated fields", sub=True),
    Case("input.csv: line with 2 fields (export)", "onnx_tools/export_onnx.py",
         ("--input", "{fx}/input_bad.csv", "--skip_weights", "--output_dir", "{fx}/o"),
         "{fx}/input_bad.csv:2: expected 3 comma-separated fields"),
    Case("benchmark: directory without models", "onnx_tools/benchmark.py", ("--input", "{fx}/empty"),
         "no *.onnx files in {fx}/empty"),
    Case("named model: unknown name", "eval_specific_net.py", ("--model_name", "SEQnet@foo-A9"),
         "argument --model_name: invalid choice: 'SEQnet@foo-A9'", sub=True),
    Case("block KD: unknown stage index", "train_block_kd.py",
         (*_BLOCK_KD, "--data_dir", "{fx}/small", "--stages", "7"), "unknown stage index 7"),
    Case("report: output dir missing", "make_report.py", ("--output_dir", "{fx}/no_run"),
         "output dir {fx}/no_run does not exist"),
]


# --------------------------------------------------------------------------------------------- fixtures
def _png_folder(root: Path, classes=("0", "1"), per_class: int = 4) -> None:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                px = torch.randint(0, 256, (16, 16, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i:04d}.png")


def _break_lut(src: Path, dst: Path, mutate) -> None:
    shutil.copytree(src, dst)
    f = dst / "tiny" / LUT_FILE
    text = f.read_text()
    lines = text.splitlines()
    if mutate == "truncate":  # cut in the middle of line 2, as a killed non-atomic writer would leave it
        f.write_text(text[: len(lines[0]) + 1 + len(lines[1].split(",")[0]) + 1])
    elif mutate == "delete":
        (dst / "tiny" / "stage3_1_0.csv").unlink()
    else:
        lines[1] = mutate(lines[1].split(","))
        f.write_text("\n".join(lines) + "\n")


def _build_fixtures(fx: Path) -> None:
    from modules.checkpoint import atomic_save
    from modules.encoding import parse_supernet
    from modules.lut import write_synthetic_lut
    from modules.supernet import SuperNet

    _png_folder(fx / "small")
    shutil.copytree(fx / "small", fx / "corrupt")
    (fx / "corrupt" / "val" / "1" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (fx / "empty" / "train").mkdir(parents=True)
    (fx / "empty" / "val").mkdir()
    for split in ("train", "val"):
        (fx / "noimg" / split / "0").mkdir(parents=True)
        (fx / "noimg" / split / "0" / "README.txt").write_text("not an image\n")

    torch.manual_seed(0)
    for enc in (SUPERNET, OTHER_SUPERNET):
        net = SuperNet(parse_supernet(enc), 10)
        atomic_save({"model": net.state_dict(), "supernet": enc, "quant_mode": "fp32", "epoch": 1},
                    fx / "out" / "supernet_training" / enc / "checkpoint.pth")
    good = (fx / "out" / "supernet_training" / SUPERNET / "checkpoint.pth").read_bytes()
    trunc = fx / "trunc" / "supernet_training" / SUPERNET / "checkpoint.pth"
    trunc.parent.mkdir(parents=True)
    trunc.write_bytes(good[: len(good) // 2])
    (fx / "garbage.pth").write_bytes(b"this is not a checkpoint\n")
    import datetime

    torch.save({"model": {"w": torch.zeros(1)}, "saved": datetime.datetime(2024, 1, 1)}, fx / "unsafe.pth")

    write_synthetic_lut(str(fx / "lut"), "tiny", rows_per_file=3)
    _break_lut(fx / "lut", fx / "lut_fields", lambda f: ",".join(f[:5]))
    _break_lut(fx / "lut", fx / "lut_nan", lambda f: ",".join(f[:5] + ["nan"]))
    _break_lut(fx / "lut", fx / "lut_key", lambda f: ",".join(["3#32#None_9#40#None"] + f[1:]))
    _break_lut(fx / "lut", fx / "lut_shape", lambda f: ",".join([f[0], "1x16x8"] + f[2:]))
    _break_lut(fx / "lut", fx / "lut_trunc", "truncate")
    _break_lut(fx / "lut", fx / "lut_missing", "delete")
    (fx / "fixed_bad.csv").write_text("32,1.0\n48,abc\n")
    (fx / "badlat").mkdir()
    (fx / "badlat" / "ort_int8.json").write_text('{"platform": "ort_int8", "blocks": \n')
    (fx / "best_bad.json").write_text('{"subnet": "d1#1_k3"')

    cfg = fx / "cfg"
    cfg.mkdir()
    (cfg / "unknown.yaml").write_text("epochs: 1\nbatchsize: 4\n")
    (cfg / "type.yaml").write_text("epochs: two\n")
    (cfg / "list.yaml").write_text("- epochs\n- 1\n")
    (cfg / "syntax.yaml").write_text("latency_constraint: [1\n")
    (fx / "input_bad.csv").write_text(f"tiny,000000-000000,{SUB_OK}_r32\ntiny,000000-000000\n")


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("malformed")
    _build_fixtures(root)
    return root


@pytest.fixture(autouse=True)
def _restore_logging():
    """Scripts run in-process install stdout log handlers (to pytest's capture); drop them afterwards."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_spaceevo", False):
            root.removeHandler(h)
            h.close()


# --------------------------------------------------------------------------------------------- the runner
def _fill(text: str, fx: Path) -> str:
    return text.replace("{fx}", str(fx))


def _run_subprocess(case: Case, argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / case.script), *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stderr


def _run_in_process(case: Case, argv: list[str], capsys) -> tuple[int, str]:
    from modules.cli import run_main

    module = importlib.import_module(case.script[: -len(".py")].replace("/", "."))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, module.get_args_parser(), argv)
    return exc.value.code, capsys.readouterr().err


def test_table_is_big_enough():
    assert len(CASES) >= 22 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.sub for c in CASES) >= 8
    for c in CASES:
        assert (REPO / c.script).is_file(), c.script


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_one_clear_line(case: Case, fx: Path, capsys):
    argv = [_fill(a, fx) for a in case.argv]
    code, err = _run_subprocess(case, argv) if case.sub else _run_in_process(case, argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for want in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert _fill(want, fx) in lines[0], (want, lines[0])
