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


# ------------------------------------------------------------------ checkpoints made with the original SpaceEvo code
ORIGINAL_FIXTURES = REPO_ROOT / "tests" / "data"


def original_fixture(name: str) -> dict:
    """The recipe of `tests/data/original_spaceevo_<name>/` (see its README): expected.json, keys (name, shape)
    in the original's order, and the stored BN statistics / LSQ+ scalars."""
    import json

    root = ORIGINAL_FIXTURES / f"original_spaceevo_{name}"
    keys = []
    for line in (root / "keys.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        keys.append((key, () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))))
    stats = torch.load(root / "stats.pt", weights_only=True) if (root / "stats.pt").is_file() else {}
    expected = json.loads((root / "expected.json").read_text()) if (root / "expected.json").is_file() else {}
    return {"keys": keys, "stats": stats, "expected": expected}


def original_state_dict(fixture: dict, lsq: bool = True) -> dict:
    """The original supernet's state dict rebuilt from its recipe, in its key order (the fp32 checkpoint keeps
    the LSQ+ scalars at their initial values 1, 1, 0, as the original's fp32 training leaves them)."""
    import math

    seed, state = fixture["expected"].get("seed", 1), {}
    for i, (key, shape) in enumerate(fixture["keys"]):
        name = key.rsplit(".", 1)[-1]
        if not lsq and name in ("sw", "sa", "beta"):
            state[key] = torch.full(shape, 0.0 if name == "beta" else 1.0)
        elif key in fixture["stats"]:
            state[key] = fixture["stats"][key]
        else:
            g = torch.Generator().manual_seed(seed * 100003 + i)
            if len(shape) >= 2:
                state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
            elif key.endswith("norm.weight"):
                state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
            else:
                state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def save_original_checkpoint(state: dict, path: Path, encoding: str, epoch: int = 360) -> Path:
    """A checkpoint file as the original's trainer writes it: ``module.``-prefixed state dict under
    ``state_dict``, the epoch, optimizer / scheduler state, and ``args``, its own pickled config object (here a
    class of the same module path, so that loading needs the same stand-in as the released files)."""
    import sys
    import types

    mod = "modules.alphanet_training.utils.config"
    cls = type("Config", (dict,), {"__module__": mod})
    fake = types.ModuleType(mod)
    fake.Config = cls
    saved = sys.modules.get(mod)
    sys.modules[mod] = fake
    try:
        args = cls(epochs=360, supernet_encoding=encoding, supernet_choice=encoding.split("-", 1)[1],
                   lr_scheduler={"base_lr": 0.1})
        args.__dict__ = args  # as the original's AttrDict
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": epoch, "args": args, "state_dict": {"module." + k: v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": epoch}}, path)
    finally:
        if saved is None:
            del sys.modules[mod]
        else:
            sys.modules[mod] = saved
    return path


# ------------------------------------------------------------------ multi-process runs
def run_ranks(argv: list[str], nproc: int, cwd: Path | None = None, timeout: float = 300, extra_env=None,
              launcher: str = "torch.distributed.run"):
    """Run ``argv`` (a script and its flags) as `nproc` ranks of `launcher` (torchrun's module, or the older
    torch.distributed.launch, which appends --local-rank=N) on CPU (gloo, one thread each), or as a plain process
    when `nproc` is 0. Returns the CompletedProcess; a failed run fails the test with its output."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(extra_env or {}))
    launcher = [sys.executable] if nproc == 0 else \
        [sys.executable, "-m", launcher, "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run(launcher + [str(a) for a in argv], cwd=cwd or REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv[0]} on {nproc} rank(s) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out
