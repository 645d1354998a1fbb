#!/usr/bin/env bash
# GPU smoke test: each multi-rank step of the pipeline (supernet sandwich training with the gradient
# all-reduce, subnet-search evaluation spread over ranks) for a few steps on CUDA with 1 and 2 GPUs (NCCL),
# printing time per step, images/s and peak memory. Without a CUDA GPU it says so and exits 0.
#   scripts/gpu_smoke.sh            (or: make gpu-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" = 0 ]; then
  echo "gpu-smoke: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to run"
  exit 0
fi
NPROCS=1
if [ "$NGPU" -ge 2 ]; then NPROCS="1 2"; fi
"$PY" bench/scaling.py --device cuda --nprocs $NPROCS --steps 5 --batch_size 64 --resolution 224 \
    --candidates 8 --holdout 512
