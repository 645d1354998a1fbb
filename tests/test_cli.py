from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modules.cli import add_common_args, parse_args_with_config, run_main, save_run_info, setup_logging

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("t")
    add_common_args(p)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--name", default="run")
    p.add_argument("--resolutions", type=int, nargs="+", default=[160, 192])
    p.add_argument("--use_se", action="store_true")
    p.add_argument("--platform", choices=["ort_int8", "tflite_int8"], default="ort_int8")
    return p


def _yaml(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_without_config():
    args = parse_args_with_config(_parser(), [])
    assert args.output_dir == "./checkpoints" and args.seed == 0 and args.device == "cpu" and not args.debug
    assert args.lr == 0.1 and args.resolutions == [160, 192] and args.config is None


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    cfg = _yaml(tmp_path, {"lr": "1e-3", "epochs": 3, "resolutions": [96, 128], "use_se": True,
                           "platform": "tflite_int8", "output-dir": "out"})
    args = parse_args_with_config(_parser(), ["-c", cfg])
    assert args.lr == 0.001 and args.epochs == 3 and args.resolutions == [96, 128] and args.use_se
    assert args.platform == "tflite_int8" and args.output_dir == "out" and args.config == cfg
    args = parse_args_with_config(_parser(), ["--config", cfg, "--epochs", "5", "--resolutions", "64"])
    assert args.epochs == 5 and args.resolutions == [64] and args.lr == 0.001


def test_unknown_key_lists_allowed_and_suggests(tmp_path):
    cfg = _yaml(tmp_path, {"lrr": 0.1, "zzz": 1})
    with pytest.raises(ValueError) as info:
        parse_args_with_config(_parser(), ["-c", cfg])
    msg = str(info.value)
    assert "unknown key(s) 'lrr' (did you mean 'lr'?), 'zzz'" in msg
    assert "allowed keys:" in msg and "resolutions" in msg and cfg in msg


@pytest.mark.parametrize("data, expected", [
    ({"epochs": "three"}, "key 'epochs' has value 'three', expected a valid int"),
    ({"epochs": 2.5}, "expected an int"),
    ({"lr": True}, "expected a float"),
    ({"use_se": "yes please"}, "expected a boolean"),
    ({"resolutions": [96, "x"]}, "key 'resolutions' has value [96, 'x'], expected a valid int"),
    ({"platform": "nnmeter"}, "expected one of ['ort_int8', 'tflite_int8']"),
    ({"name": [1, 2]}, "expected a single str"),
])
def test_wrong_type_errors(tmp_path, data, expected):
    with pytest.raises(ValueError) as info:
        parse_args_with_config(_parser(), ["-c", _yaml(tmp_path, data)])
    assert expected in str(info.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml does not exist"):
        parse_args_with_config(_parser(), ["-c", str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_args_with_config(_parser(), ["-c", str(tmp_path / "list.yaml")])
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_args_with_config(_parser(), ["-c", str(tmp_path / "bad.yaml")])


def test_config_satisfies_required_argument(tmp_path):
    p = _parser()
    p.add_argument("--supernet", required=True)
    args = parse_args_with_config(p, ["-c", _yaml(tmp_path, {"supernet": "onnxw-151122-023231"})])
    assert args.supernet == "onnxw-151122-023231"


def test_save_run_info_round_trips_as_config(tmp_path):
    args = parse_args_with_config(_parser(), ["--lr", "0.5", "--resolutions", "32", "48", "--output_dir",
                                              str(tmp_path / "out")])
    def head() -> str:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        return sha.stdout.strip() if sha.returncode == 0 else "unknown"

    before = head()  # others may commit while the test runs: accept HEAD before or after the call
    path = save_run_info(args, tmp_path / "out")
    assert path == tmp_path / "out" / "args.yaml"
    info = yaml.safe_load(path.read_text())
    assert info["lr"] == 0.5 and info["resolutions"] == [32, 48]
    assert info["git_sha"] in (before, head())
    again = parse_args_with_config(_parser(), ["-c", str(path)])
    assert vars(again) | {"config": None} == vars(args)


def test_run_main_errors(capsys):
    def main(args):
        raise ValueError("bad thing in\n  two lines")

    with pytest.raises(SystemExit) as info:
        run_main(main, _parser(), [])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: bad thing in two lines\n"

    with pytest.raises(SystemExit) as info:
        run_main(main, _parser(), ["--debug"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad thing in two lines\n")

    def interrupted(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_main(interrupted, argparse.ArgumentParser(), [])
    assert info.value.code == 130

    assert run_main(lambda args: {"ok": args.lr}, _parser(), ["--lr", "2"]) == {"ok": 2.0}


def test_run_main_usage_errors_and_sigterm_are_one_line(capsys, tmp_path):
    import os
    import signal

    with pytest.raises(SystemExit) as info:
        run_main(lambda args: None, _parser(), ["--platform", "gpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: t: argument --platform: invalid choice: 'gpu'")

    before = signal.getsignal(signal.SIGTERM)
    done = tmp_path / "cleanup-ran"

    def terminated(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary for the handler to run at
            raise AssertionError("SIGTERM did not interrupt main")
        finally:
            done.write_text("yes")

    with pytest.raises(SystemExit) as info:
        run_main(terminated, _parser(), [])
    assert info.value.code == 143 and done.read_text() == "yes"
    assert capsys.readouterr().err == "error: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_prepare_data_script_and_error_exit(tmp_path):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_data.py"), "--data_dir", str(tmp_path / "d"),
                          "--size", "8"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "train: 1438 images in 10 classes" in out.stdout and "val: 359 images" in out.stdout
    out = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_data.py"), "--size", "4",
                          "--data_dir", str(tmp_path / "e")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == "error: digits image size 4: expected >= 8\n"


def test_setup_logging_writes_file(tmp_path):
    log = setup_logging(tmp_path, "stage")
    log.info("hello %d", 5)
    setup_logging(tmp_path, "stage")  # idempotent: no duplicated handlers
    logging.getLogger("other").warning("world")
    for h in logging.getLogger().handlers:
        h.flush()
    text = (tmp_path / "stage.log").read_text()
    assert "hello 5" in text and text.count("world") == 1
    for h in list(logging.getLogger().handlers):
        if getattr(h, "_spaceevo", False):
            logging.getLogger().removeHandler(h)
            h.close()
