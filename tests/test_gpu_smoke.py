"""scripts/gpu_smoke.sh on a machine without a GPU says so and exits 0; its worker (bench/scaling.py) runs
the same steps on the CPU and reports positive throughputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script would run it")
def test_gpu_smoke_without_a_gpu_exits_0():
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_smoke.sh")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU on this machine" in out.stdout


def test_scaling_worker_on_one_cpu_rank():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "scaling.py"), "--worker", "--steps", "1",
                          "--batch_size", "4", "--candidates", "2", "--holdout", "64", "--resolution", "32"],
                         capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert res["ranks"] == 1 and res["train"]["images_per_s"] > 0 and res["search_eval"]["images_per_s"] > 0
