from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modules.checkpoint import (atomic_save, atomic_write_bytes, atomic_write_text, build_checkpoint, find_resume,
                                get_rng_state, load_checkpoint, load_state_dict_strict, set_rng_state, to_plain)


class Custom:
    """Not allow-listed for torch.load(weights_only=True)."""


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_round_trip_with_convention(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    sched.step()
    args = argparse.Namespace(lr=0.1, out=Path("x/y"), sizes=(1, 2))
    path = tmp_path / "sub" / "checkpoint.pth"
    assert find_resume(tmp_path / "sub") is None
    atomic_save(build_checkpoint(model, opt, sched, epoch=3, step=42, args=args, best_acc=0.5), path)
    assert find_resume(tmp_path / "sub") == path
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 42 and ckpt["best_acc"] == 0.5
    assert ckpt["args"] == {"lr": 0.1, "out": "x/y", "sizes": [1, 2]}
    other = _model()
    load_state_dict_strict(other, ckpt["model"], "test")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)
    sched2.load_state_dict(ckpt["lr_scheduler"])
    assert sched2.last_epoch == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_atomic_text_and_bytes(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "b.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_missing_truncated_and_unsafe_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.pth does not exist"):
        load_checkpoint(tmp_path / "nothing.pth")
    path = tmp_path / "checkpoint.pth"
    atomic_save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"", os.urandom(300)):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pth is corrupted or truncated"):
            load_checkpoint(path)

    torch.save({"x": Custom()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(path)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    # a save killed midway leaves only a partial temp file beside the checkpoint, never renamed
    partial = tmp_path / ".checkpoint.pth.abc123.tmp"
    full = path.read_bytes()
    partial.write_bytes(full[: len(full) // 3])
    assert find_resume(tmp_path) == path
    assert load_checkpoint(path)["epoch"] == 1
    # an exception inside the save does not touch the previous file either
    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_save({"epoch": 2, "bad": Boom()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name, path.name]


def test_strict_load_reports_problems():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    load_state_dict_strict(model, sd, "ckpt.pth")  # DDP prefix is stripped
    bad = dict(model.state_dict())
    del bad["1.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(model, bad, "ckpt.pth")
    msg = str(info.value)
    assert msg.startswith("ckpt.pth:")
    assert "1 missing key(s): 1.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "0.weight: checkpoint (5, 4) vs model (3, 4)" in msg
    many = {f"x{i}": torch.zeros(1) for i in range(12)}
    with pytest.raises(ValueError, match=r"12 unexpected key\(s\): x0, x1, x2, x3, x4, \.\.\. \(7 more\)"):
        load_state_dict_strict(model, {**model.state_dict(), **many}, "w")


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # populate cached gaussians
    path = tmp_path / "rng.pth"
    atomic_save({"rng": get_rng_state()}, path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
                torch.rand(3).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3).tolist())
    assert got == expected


def test_to_plain():
    ns = argparse.Namespace(a=Path("p"), b=(1, np.float32(2.5)), c={"d": None}, e=torch.device("cpu"))
    assert to_plain(ns) == {"a": "p", "b": [1, 2.5], "c": {"d": None}, "e": "cpu"}
