"""Shared test setup: repo root on sys.path, one torch thread, a session-wide tiny digits ImageFolder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard requirement, but keep collection working
    torch = None
else:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The digits ImageFolder (16x16 PNGs, train/val, 10 classes) written once per test session. Read-only."""
    from modules.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", size=16)
