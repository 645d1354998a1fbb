"""Fault injection: a process SIGKILLed in the middle of `modules.checkpoint.atomic_save` never
damages the previous checkpoint, and its half-written temp file is never picked up by `find_resume` /
`load_checkpoint`; truncated checkpoints and truncated LUT CSVs give one clear error naming the file.

The kill is real: a child process saves checkpoint 1, then starts saving a large checkpoint 2 through file
writes slowed down (``os.fdopen`` wrapped in the child only) that stop after a few MB and signal the parent,
which then sends SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from modules.checkpoint import find_resume, load_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Child: save epoch 1 (1 MB), then save epoch 2 (8 tensors of 4 MB) with writes that stall forever after 4 MB.
_CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from modules.checkpoint import atomic_save

    path, marker, first = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if first:
        atomic_save({"epoch": 1, "w": torch.full((1 << 18,), 1.0)}, path)
    real_fdopen = os.fdopen

    class StallingFile:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            n = self.f.write(data)
            self.written += n
            if self.written > (4 << 20):  # 4 MB of the 32 MB are on disk: tell the parent, then hang
                self.f.flush()
                open(marker, "w").close()
                time.sleep(600)
            return n

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    os.fdopen = lambda fd, *a, **k: StallingFile(real_fdopen(fd, *a, **k))
    atomic_save({"epoch": 2, "w": [torch.full((1 << 20,), 2.0 + i) for i in range(8)]}, path)  # 8 x 4 MB
    print("save finished: the stall did not happen", flush=True)
""")


def _kill_mid_save(out_dir: Path, with_previous: bool) -> list[Path]:
    """Run the child, SIGKILL it while it writes checkpoint 2; returns the temp files it left behind."""
    path, marker = out_dir / "checkpoint.pth", out_dir / "stalled"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(marker), "1" if with_previous else "0"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, f"child exited early: {child.communicate()}"
            assert time.time() < deadline, "child never reached the middle of the save"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(".tmp"))


def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    temps = _kill_mid_save(tmp_path, with_previous=True)
    path = tmp_path / "checkpoint.pth"
    # the half-written checkpoint 2 exists only as a hidden temp file next to the intact checkpoint 1
    assert len(temps) == 1 and temps[0].name.startswith(".checkpoint.pth.")
    assert 4 << 20 < temps[0].stat().st_size < 32 << 20
    assert find_resume(tmp_path) == path
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.full((1 << 18,), 1.0))
    # what the killed save left is a truncated checkpoint: one clear error naming it
    with pytest.raises(ValueError, match=f"checkpoint {temps[0]} is corrupted or truncated"):
        load_checkpoint(temps[0])


def test_sigkill_mid_first_save_leaves_nothing_to_resume(tmp_path):
    temps = _kill_mid_save(tmp_path, with_previous=False)
    assert len(temps) == 1
    assert find_resume(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'checkpoint.pth'} does not exist"):
        load_checkpoint(tmp_path / "checkpoint.pth")


def test_truncated_checkpoint_names_the_file(tmp_path):
    from modules.checkpoint import atomic_save

    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 3, "w": torch.randn(4096)}, path)
    data = path.read_bytes()
    for cut in (0, 1, 100, len(data) // 2, len(data) - 100, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"checkpoint {path} is corrupted or truncated") and "\n" not in msg, msg


def test_truncated_lut_csv_names_the_file_and_line(tmp_path):
    from modules.lut import read_lut_file, write_synthetic_lut

    root = Path(write_synthetic_lut(str(tmp_path / "lut"), "tiny", rows_per_file=6))
    path = root / "stage3_2_1.csv"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    start = len(lines[0]) + len(lines[1])  # line 3 is cut
    fields = lines[2].split(",")
    cuts = [start + 3, start + len(fields[0]) + 1, start + len(fields[0]) + 4,
            start + len(",".join(fields[:3])) + 1]
    for cut in cuts:
        path.write_text(text[:cut])
        with pytest.raises(ValueError) as info:
            read_lut_file(str(path), "tiny", 3, 2, 1)
        msg = str(info.value)
        assert msg.startswith(f"{path}:3: ") and "\n" not in msg, msg
    path.write_text("")
    with pytest.raises(ValueError, match=f"{path}: no data rows"):
        read_lut_file(str(path), "tiny", 3, 2, 1)
