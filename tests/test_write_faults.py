"""Filesystem faults long runs meet: a disk that fills up part-way through a write, an output path that cannot
be created. Each is one error naming the path; the last good checkpoint / LUT file / search state stays intact
and no temp file is left behind; a script reports it as one `error:` line."""
from __future__ import annotations

import argparse
import errno
import json
import os

import pytest
import torch

from modules import checkpoint
from modules.checkpoint import WriteError, atomic_save, load_checkpoint


class _DiskFillsUp:
    """A file whose writes fail with ENOSPC once `room` bytes are written (the first part really lands)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


@pytest.fixture
def full_disk(monkeypatch):
    """From now on every atomic write runs out of space after 100 bytes."""
    real = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, *a, **k: _DiskFillsUp(real(fd, *a, **k), 100))


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_checkpoint_write_that_fills_the_disk(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, *a, **k: _DiskFillsUp(real(fd, *a, **k), 100))
    with pytest.raises(WriteError, match=f"cannot write {path}: the disk is full") as e:
        atomic_save({"epoch": 2, "w": torch.zeros(10_000)}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and _leftovers(tmp_path) == []


def test_lut_file_write_that_fills_the_disk(tmp_path, full_disk):
    from modules.lut import write_lut_file

    path = tmp_path / "tiny" / "stage1_0_0.csv"
    path.parent.mkdir()
    good = "k3#w8#e1,8,32,0.1000,1.0000,0.0100,0.0000\n"
    path.write_text(good)
    with pytest.raises(WriteError, match=f"cannot write {path}: the disk is full"):
        write_lut_file(str(path), ["k3#w8#e1,8,32,0.2000,1.0000,0.0100,0.0000"] * 50)
    assert path.read_text() == good and _leftovers(path.parent) == []


def test_search_state_write_that_fills_the_disk(tmp_path, monkeypatch):
    from modules.evolution import Evolution

    path = tmp_path / "state.json"
    evo = Evolution(lambda c: float(c), state_path=str(path), progress=False)
    evo.evaluate(1)
    evo.save()
    saved = path.read_text()
    for c in range(2, 40):
        evo.evaluate(c)
    real = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, *a, **k: _DiskFillsUp(real(fd, *a, **k), 100))
    with pytest.raises(WriteError, match=f"cannot write {path}: the disk is full"):
        evo.save()
    assert path.read_text() == saved and len(json.loads(saved)["records"]) == 1
    assert _leftovers(tmp_path) == []


def test_output_path_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output dir should be")
    with pytest.raises(WriteError, match=f"cannot create directory {blocker / 'lut'}: a file is in the way"):
        checkpoint.atomic_write_text(blocker / "lut" / "x.csv", "1\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_dir_without_write_permission(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=f"cannot write {d / 'x.pth'}: permission denied"):
            atomic_save({}, d / "x.pth")
    finally:
        d.chmod(0o755)


def test_run_main_reports_a_write_error_in_one_line(tmp_path, full_disk, capsys):
    from modules.cli import run_main

    path = tmp_path / "run" / "checkpoint.pth"
    with pytest.raises(SystemExit) as e:
        run_main(lambda args: atomic_save({"w": torch.zeros(10_000)}, path), argparse.ArgumentParser("demo"), [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == f"error: cannot write {path}: the disk is full\n"
    assert not path.exists() and _leftovers(path.parent) == []
