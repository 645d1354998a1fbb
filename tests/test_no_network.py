"""Offline and safe loading.

* The demo's first stages run with the network blocked: a ``sitecustomize.py`` put first on the subprocesses'
  PYTHONPATH makes every IPv4/IPv6 ``connect`` / ``sendto``, ``socket.create_connection`` and
  ``socket.getaddrinfo`` raise and log the attempt. ``prepare_data.py``, a one-stage ``train_block_kd.py``
  (tiny teacher trained on the spot) and ``eval_specific_net.py`` must succeed and attempt nothing; the
  onnxw block KD without EfficientNet-B5 weights must fail with one clear line instead of downloading them.
  (The stage commands are run_demo.py's, made tinier.)
* Every ``torch.load(...)`` call in the repository passes ``weights_only=True`` (checked on the syntax tree),
  unless the file is in the documented ``TORCH_LOAD_ALLOW`` list.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SITECUSTOMIZE = textwrap.dedent('''
    """Test-only: no network. Every attempt is logged to $SPACEEVO_NET_LOG and raises OSError."""
    import os
    import socket
    import traceback

    _LOG = os.environ.get("SPACEEVO_NET_LOG", os.devnull)
    _INET = (socket.AF_INET, socket.AF_INET6)


    def _blocked(what, address):
        with open(_LOG, "a") as f:
            f.write(f"{what} {address!r}\\n{''.join(traceback.format_stack(limit=12))}\\n")
        raise OSError(f"network blocked by the test: {what} {address!r}")


    _connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto


    def connect(self, address):
        if self.family in _INET:
            _blocked("connect", address)
        return _connect(self, address)


    def connect_ex(self, address):
        if self.family in _INET:
            _blocked("connect_ex", address)
        return _connect_ex(self, address)


    def sendto(self, data, *args):
        if self.family in _INET:
            _blocked("sendto", args[-1])
        return _sendto(self, data, *args)


    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.create_connection = lambda address, *a, **k: _blocked("create_connection", address)
    socket.getaddrinfo = lambda host, *a, **k: _blocked("getaddrinfo", host)
''')


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """(run(script, *argv) -> CompletedProcess, path of the attempt log) with the network blocked."""
    root = tmp_path_factory.mktemp("offline")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    log = root / "net_attempts.log"
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", OMP_NUM_THREADS="1", SPACEEVO_NET_LOG=str(log))
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(k, None)

    def run(script, *argv):
        cmd = [sys.executable, *([script] if script == "-c" else [str(REPO / script)]), *map(str, argv)]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)

    return run, log, root


def test_the_blocker_is_active(offline):
    run, log, _ = offline
    p = run("-c", "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)")
    assert p.returncode != 0 and "network blocked by the test: create_connection" in p.stderr
    p = run("-c", "import urllib.request; urllib.request.urlopen('http://example.com', timeout=1)")
    assert p.returncode != 0 and "network blocked by the test" in p.stderr
    assert log.is_file()
    log.unlink()


def test_demo_stages_run_offline(offline):
    run, log, root = offline
    data, out = root / "data" / "digits", root / "out"
    p = run("prepare_data.py", "--data_dir", data, "--size", 16)
    assert p.returncode == 0, p.stderr
    assert "train: 1438 images in 10 classes" in p.stdout
    # run_demo's block_kd_fp32, one student, one resolution, two steps; the tiny teacher is trained first
    p = run("train_block_kd.py", "--superspace", "tiny", "--data_dir", data, "--output_dir", out, "--stages", 1,
            "--blocks", 0, "--epochs", 1, "--max_steps_per_epoch", 2, "--batch_size", 8, "--eval_batch_size", 16,
            "--valid_size", 16, "--num_calib_batches", 1, "--teacher_epochs", 1, "--hw_list", 32, "--no_progress")
    assert p.returncode == 0, p.stderr
    assert (out / "block_kd" / "tiny" / "stage1_0" / "checkpoint.pth").is_file()
    assert (out / "block_kd" / "teacher" / "tiny" / "checkpoint.pth").is_file()
    p = run("eval_specific_net.py", "--model_name", "SEQnet@vnni-A0")
    assert p.returncode == 0, p.stderr
    assert "SEQnet@vnni-A0" in p.stdout
    # the big spaces' teacher is never downloaded: one clear line, and no connection was attempted
    p = run("train_block_kd.py", "--superspace", "onnxw", "--data_dir", data, "--output_dir", out, "--stages", 1,
            "--blocks", 0, "--no_progress")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "nothing is downloaded" in err[0], p.stderr
    assert not log.exists(), log.read_text()


# ------------------------------------------------------------------------------------- torch.load audit
# file (relative to the repo) -> why a torch.load there may go without weights_only=True. Empty: none may.
TORCH_LOAD_ALLOW: dict[str, str] = {}
_SKIP_DIRS = {".git", ".venv", "venv", "checkpoints", "__pycache__", "node_modules", "build", "dist"}


def _python_files():
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) of every torch.load / torch.serialization.load call without a literal weights_only=True, and
    of imports that would hide such calls (``from torch import load``)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            bad += [(node.lineno, f"from {node.module} import load") for a in node.names if a.name == "load"]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = ast.unparse(f) if isinstance(f, ast.Attribute) else ""
        if name not in ("torch.load", "torch.serialization.load"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if not ok:
            bad.append((node.lineno, f"{name}(...) without weights_only=True"))
    return bad


def test_every_torch_load_is_weights_only():
    problems, seen = [], 0
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        if "load" not in text:
            continue
        try:
            tree = ast.parse(text, filename=rel)
        except SyntaxError as e:  # a half-edited file: only a problem if it may hold a load call
            if "torch.load(" in text or "serialization.load(" in text:
                problems.append(f"{rel}: does not parse ({e.msg}), cannot audit its torch.load calls")
            continue
        seen += text.count("torch.load(")
        if rel in TORCH_LOAD_ALLOW:
            continue
        problems += [f"{rel}:{line}: {why}" for line, why in _unsafe_loads(tree)]
    assert seen >= 1  # modules/checkpoint.py's load_checkpoint
    assert not problems, "unsafe torch.load calls:\n" + "\n".join(problems)


def test_the_audit_catches_unsafe_calls():
    src = ("import torch\nfrom torch import load\na = torch.load(p)\nb = torch.load(p, weights_only=False)\n"
           "c = torch.load(p, weights_only=flag)\nd = torch.load(p, weights_only=True)\n"
           "e = torch.serialization.load(\n    p,\n    map_location='cpu')\n")
    assert [line for line, _ in _unsafe_loads(ast.parse(src))] == [2, 3, 4, 5, 7]
