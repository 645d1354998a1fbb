"""train_supernet.py: sandwich step, exact resume after SIGKILL / SIGTERM (fp32 and LSQ+), 2-process torchrun,
one-line errors. Tiny settings: tiny-000000-000000, batch 8, 32 px crops, 32 training images, 1 thread."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_supernet
from modules.checkpoint import load_checkpoint
from modules.cli import parse_args_with_config
from modules.engine import ResizeCache, all_reduce_gradients, step_rng, warmup_cosine
from modules.supernet import supernet_from_encoding

REPO = Path(__file__).resolve().parents[1]
ENC = "tiny-000000-000000"
STEPS_PER_EPOCH = 4  # 32 images / batch 8


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--supernet_choice", ENC, "--output_dir", str(out), "--data_path", str(data), "--image_size", "32",
            "--batch_size_per_gpu", "8", "--max_train_samples", "32", "--valid_size", "16", "--eval_batch_size",
            "16", "--bn_calib_batches", "1", "--valid_freq", "2", "--epochs", "3", "--warmup_epochs", "1",
            "--base_lr", "0.05", "--lsq_epochs", "2", "--lsq_warmup_epochs", "0", "--lsq_base_lr", "0.005",
            "--threads", "1", "--deterministic", "--no-progress", *extra]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPACEEVO_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _run(argv: list[str], expect: int = 0, launcher: list[str] | None = None, **env: str):
    cmd = (launcher or [sys.executable]) + [str(REPO / "train_supernet.py"), *argv, "--no-plot"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert p.returncode == expect, f"exit {p.returncode} != {expect}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-3000:]}"
    return p


def _run_in_process(argv: list[str]) -> int:
    """main() in the test process (saves a process start); undoes its global side effects."""
    args = parse_args_with_config(train_supernet.get_args_parser(), argv)
    try:
        return train_supernet.main(args)
    finally:
        torch.use_deterministic_algorithms(False)
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_spaceevo", False)]:
            root.removeHandler(h)
            h.close()


def _exp(out: Path) -> Path:
    return out / "supernet_training" / ENC


def _model(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _model(a), _model(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory, digits_root) -> Path:
    """An uninterrupted fp32 run (3 epochs x 4 steps)."""
    out = tmp_path_factory.mktemp("fp32_ref")
    assert _run_in_process(_args(out, digits_root)) == 0
    return out


@pytest.fixture(scope="module")
def lsq_start(fp32_reference, tmp_path_factory):
    """A factory of output dirs holding a copy of the reference fp32 checkpoint."""
    def make(name: str) -> Path:
        out = tmp_path_factory.mktemp(name)
        _exp(out).mkdir(parents=True)
        shutil.copy(_exp(fp32_reference) / "checkpoint.pth", _exp(out) / "checkpoint.pth")
        return out
    return make


# --------------------------------------------------------------------------- resume
def test_fp32_sigkill_and_sigterm_then_resume_match_uninterrupted_run(fp32_reference, digits_root, tmp_path):
    ref = _exp(fp32_reference)
    ck = load_checkpoint(ref / "checkpoint.pth")
    assert ck["epoch"] == 3 and ck["step"] == 3 * STEPS_PER_EPOCH and ck["complete"] and ck["quant_mode"] == "fp32"
    rows = _csv(ref / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and not rows[0]["max_acc"]
    assert all(float(r["max_acc"]) >= 0 and float(r["min_acc"]) >= 0 for r in rows[1:])
    assert (ref / "curves.png").stat().st_size > 0 and (ref / "checkpoint_best.pth").is_file()

    out = tmp_path / "b"
    # SIGKILL right after step 6 (epoch 2, batch 2): only the epoch-1 checkpoint survives
    _run(_args(out, digits_root), expect=-9, SPACEEVO_FAULT_AT_STEP="6")
    ck = load_checkpoint(_exp(out) / "checkpoint.pth")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (1, 0, 4)
    # resume; SIGTERM after step 9: the run saves at the next step boundary (mid-epoch 3) and exits with 0
    p = _run(_args(out, digits_root, "--resume"), SPACEEVO_FAULT_AT_STEP="9", SPACEEVO_FAULT_SIGNAL="TERM")
    assert "stop requested (SIGTERM)" in p.stdout
    ck = load_checkpoint(_exp(out) / "checkpoint.pth")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (2, 2, 10)
    _run(_args(out, digits_root, "--resume"))
    _assert_same_weights(ref / "checkpoint.pth", _exp(out) / "checkpoint.pth")
    _assert_same_weights(ref / "checkpoint_best.pth", _exp(out) / "checkpoint_best.pth")
    assert _csv(ref / "log.csv") == _csv(_exp(out) / "log.csv")


def test_lsq_sigkill_then_resume_matches_uninterrupted_run(fp32_reference, lsq_start, digits_root):
    runs = {name: lsq_start(name) for name in ("ref", "killed")}
    assert _run_in_process(_args(runs["ref"], digits_root, "--quant_mode", "lsq")) == 0
    _run(_args(runs["killed"], digits_root, "--quant_mode", "lsq"), expect=-9, SPACEEVO_FAULT_AT_STEP="5")
    ck = load_checkpoint(_exp(runs["killed"]) / "lsq.pth")
    assert (ck["epoch"], ck["step"], ck["quant_mode"], ck["quant_preset"]) == (1, 4, "lsq", "ort")
    _run(_args(runs["killed"], digits_root, "--quant_mode", "lsq", "--resume"))
    ref, got = _exp(runs["ref"]), _exp(runs["killed"])
    _assert_same_weights(ref / "lsq.pth", got / "lsq.pth")
    assert _csv(ref / "lsq_log.csv") == _csv(got / "lsq_log.csv")
    state = _model(ref / "lsq.pth")
    scales = [k for k in state if k.endswith("act_quant.scale")]
    assert scales and all(bool(state[k.replace("scale", "initialized")]) for k in scales)
    # the fp32 files are left alone
    _assert_same_weights(_exp(fp32_reference) / "checkpoint.pth", ref / "checkpoint.pth")
    assert not (ref / "log.csv").exists() and (ref / "lsq_log.csv").is_file() and (ref / "lsq_best.pth").is_file()


@pytest.mark.parametrize("quant_mode", ["fp32", "lsq"])
def test_channels_last_run_matches_nchw_and_loads_as_nchw(lsq_start, digits_root, quant_mode):
    """--channels_last: NHWC weights in the checkpoint, which load into a plain supernet; the logged losses of
    the first step (forward before any update) equal the NCHW run's (to float rounding). Later steps are not
    compared: at 8 images and 1-2 px feature maps, BN gradients are ill-conditioned and the summation order
    alone moves them by several %."""
    extra = ["--epochs", "1", "--lsq_epochs", "1", "--valid_freq", "1", "--quant_mode", quant_mode,
             "--max_train_samples", "8", "--warmup_epochs", "0"]
    state, log_rows = {}, {}
    for fmt in ("--no-channels_last", "--channels_last"):
        out = lsq_start(f"cl_{quant_mode}{fmt}")
        assert _run_in_process(_args(out, digits_root, *extra, fmt)) == 0
        run = train_supernet.Run(str(out), ENC, quant_mode)
        state[fmt], log_rows[fmt] = _model(run.last), _csv(run.csv)
    nchw, nhwc = log_rows["--no-channels_last"], log_rows["--channels_last"]
    assert len(nchw) == len(nhwc) == 1
    # LSQ+: a value flips to the next quantization level where the NCHW and NHWC sums differ in the last bit;
    # the small subnets' KD loss (8 images, BN over 1-2 px maps) amplifies that most; how much depends on the 8
    # images drawn (with the per-sample augmentation seeds of modules.data.SeededSamples: 2 % on the loss)
    tol = {"loss": dict(abs=2e-4), "kd_loss": dict(abs=2e-4)} if quant_mode == "fp32" else \
        {"loss": dict(rel=3e-2), "kd_loss": dict(rel=0.25)}
    for key in ("loss", "kd_loss"):
        assert float(nhwc[0][key]) == pytest.approx(float(nchw[0][key]), **tol[key]), key
    convs = [v for v in state["--channels_last"].values() if v.dim() == 4 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    assert not any(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
                   for v in state["--no-channels_last"].values())
    net = supernet_from_encoding(ENC)
    if quant_mode == "lsq":
        from modules.lsq import set_quant_mode
        set_quant_mode(net, "lsq", "ort")
    net.load_state_dict(state["--channels_last"])


def test_auto_augment_training_steps_in_worker_processes(digits_root, tmp_path):
    """--augment auto_augment_tf with 2 loader workers: 2 steps of fp32 training run and validate; the
    choice is recorded in args.yaml for --resume / -c."""
    import yaml

    out = tmp_path / "aa"
    assert _run_in_process(_args(out, digits_root, "--augment", "auto_augment_tf", "--workers", "2",
                                 "--max_train_samples", "16", "--epochs", "1", "--valid_freq", "1")) == 0
    run = train_supernet.Run(str(out), ENC, "fp32")
    ck = load_checkpoint(run.last)
    assert ck["step"] == 2 and ck["complete"]
    rows = _csv(run.csv)
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"])) and float(rows[0]["max_acc"]) >= 0
    assert yaml.safe_load(open(_exp(out) / "args.yaml"))["augment"] == "auto_augment_tf"


# --------------------------------------------------------------------------- DDP
def test_two_process_torchrun_ends_with_identical_weights(lsq_start, digits_root):
    """LSQ+ on 2 ranks from the fp32 reference: sampler sharding, one gradient all-reduce per step, the
    scale initialisation all-reduced inside the first forward, BN calibration / accuracy reduced over ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = lsq_start("ddp")
    _run(_args(out, digits_root, "--quant_mode", "lsq"), launcher=launcher)
    summary = json.loads((_exp(out) / "lsq_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "done" and summary["step"] == 2 * 2
    digests = summary["state_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert train_supernet.state_digest(_load_model(_exp(out) / "lsq.pth")) == digests[0]


def _load_model(path: Path):
    from modules.lsq import set_quant_mode
    net = set_quant_mode(supernet_from_encoding(ENC), "lsq", "ort")
    net.load_state_dict(_model(path))
    return net


# --------------------------------------------------------------------------- errors
def _exit(argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        train_supernet.run_main(train_supernet.main, train_supernet.get_args_parser(), argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return e.value.code, err


@pytest.mark.parametrize("yaml_text, needle", [("epochs: 3\nbogus_key: 1\n", "bogus_key"),
                                               ("epochs: three\n", "epochs"),
                                               ("base_lr: [0.1]\n", "base_lr"),
                                               ("epochs: [1\n", "not valid YAML")])
def test_bad_yaml_is_one_error_line(tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    code, err = _exit(["-c", str(cfg), "--supernet_choice", ENC, "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_encoding_outside_the_superspace_is_one_error_line(tmp_path, capsys):
    code, err = _exit(["--supernet_choice", "tiny-191122-000000", "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "stage2" in err[0], err
    code, err = _exit(["--supernet_choice", "tiny-151122-090000", "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "window" in err[0], err


def test_lsq_without_fp32_checkpoint_is_one_error_line(tmp_path, capsys):
    code, err = _exit(["--supernet_choice", ENC, "--quant_mode", "lsq", "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "checkpoint.pth" in err[0] and "fp32" in err[0], err


def test_cli_error_exit_code_in_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "train_supernet.py"), "--supernet_choice", "nosuchspace-000000",
                        "--output_dir", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "nosuchspace" in p.stderr


def test_shipped_configs_parse():
    for name in ("train.yaml", "tiny.yaml"):
        args = train_supernet.get_args_parser()
        ns = parse_args_with_config(
            args, ["-c", str(REPO / "supernet_training_configs" / name), "--supernet_choice", ENC])
        train_supernet.check_args(ns)
        # the ImageNet recipe augments as the original; the digits demo keeps the cheap crop
        assert ns.augment == {"train.yaml": "auto_augment_tf", "tiny.yaml": "basic"}[name]
    assert ns.epochs >= 1


# --------------------------------------------------------------------------- step mechanics (in process)
def test_sandwich_step_subnets_and_full_resolution_list():
    """Max at the largest and min at the smallest resolution; the random subnets draw from the superspace's
    whole supernet_hw_list (the original used only its upper part); the draws depend on (seed, step) only."""
    torch.manual_seed(0)
    net = supernet_from_encoding(ENC)
    argv = ["--supernet_choice", ENC, "--batch_size_per_gpu", "2", "--epochs", "1", "--warmup_epochs", "0"]
    args = train_supernet.get_args_parser().parse_args(argv)
    trainer = train_supernet.Trainer(args, net, {"train": [None] * 20}, torch.device("cpu"), None, ENC)
    seen = []
    orig = net.forward

    def spy(x):
        seen.append((net.get_active_subnet_config(), x.shape[-1], net.logits.dropout.p))
        return orig(x)

    net.forward = spy
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    hw = net.hw_list
    randoms = set()
    for step in range(15):
        seen.clear()
        trainer.train_step(images, labels, False)
        assert len(seen) == 4
        (mx, r0, p0), *mid, (mn, r3, p3) = seen
        assert mx == net.set_max_subnet() and r0 == max(hw) and p0 == args.dropout
        assert mn == net.set_min_subnet() and r3 == min(hw) and p3 == 0.0
        rng = step_rng(args.seed, step)
        rng.getrandbits(62)
        for cfg, res, p in mid:
            assert cfg == net.sample_active_subnet(rng) and res == cfg.resolution and p == 0.0
            randoms.add(cfg.resolution)
    assert randoms == set(hw)
    assert trainer.step == 15 and all(torch.isfinite(p).all() for p in net.parameters())


def test_engine_helpers_without_process_group():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.001) and f(10) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.1 * 3.14159265)).item()), rel=1e-4)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    q = torch.nn.Parameter(torch.ones(2))
    assert all_reduce_gradients([p, q], [1.0]) == [1.0]
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and q.grad is None
    x = torch.randn(1, 3, 32, 32)
    rc = ResizeCache(x)
    assert rc(32) is x and rc(48) is rc(48) and rc(48).shape[-1] == 48
    assert step_rng(3, 7).random() == step_rng(3, 7).random() != step_rng(3, 8).random()


@pytest.mark.parametrize("preset", ["ort", "original"])
def test_bn_calibration_reaches_every_bn_in_lsq_mode(preset):
    """calibrate_bn must run every BN, also where an eval-mode op folds its BN into the conv (backend presets)."""
    from modules.engine import calibrate_bn
    from modules.lsq import set_quant_mode
    torch.manual_seed(0)
    net = set_quant_mode(supernet_from_encoding(ENC), "lsq", preset)
    net.set_min_subnet()
    net.train()(torch.randn(4, 3, 32, 32))  # initialise the scales
    sub = net.get_active_subnet().eval()
    bns = [m for m in sub.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    calibrate_bn(sub, [(torch.randn(4, 3, 32, 32), None)] * 2, 2)
    assert all(int(bn.num_batches_tracked) == 2 for bn in bns)
    assert not any(m.training for m in sub.modules())  # the modes are restored
