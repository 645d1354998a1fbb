#!/usr/bin/env bash
# Full-size SpaceEvo for the VNNI/ONNX Runtime target (`onnxw`) on ImageNet, one node with 8 GPUs.
# IMAGENET: an ImageFolder with train/ and val/. B5_WEIGHTS: torchvision efficientnet_b5 state dict
# (nothing is downloaded at run time; e.g. copy it from a machine with internet access).
# DRY_RUN=1: every command below with its flags and file hand-offs, on the tiny superspace, the digits set
# (written under $OUT) and 2 CPU ranks (gloo), a step or two each (examples/dry_run.sh; a few minutes).
set -euo pipefail
OUT=${OUT:-./checkpoints}
NGPU=${NGPU:-8}
SUPERSPACE=onnxw DEVICE=cuda HW="160 192 224" PLATFORM=ort_int8
SPACE_LAT="15 20" SUBNET_LAT="8 10 12" SUBNET_DELTA=2 CONFIG=supernet_training_configs/train.yaml
TEACHER=() KD=() LUT=() TABLE=() SPACE_SEARCH=() SUPERNET=() SEARCH=()
if [ "${DRY_RUN:-0}" = 1 ]; then
  source "$(dirname "$0")/dry_run.sh"
else
  IMAGENET=${IMAGENET:?set IMAGENET=/path/to/imagenet}
  B5_WEIGHTS=${B5_WEIGHTS:?set B5_WEIGHTS=/path/to/efficientnet_b5.pth}
  TEACHER=(--teacher_weights "$B5_WEIGHTS")
fi
RUN="torchrun --standalone --nproc_per_node=${NGPU}"

# 1. block-wise KD, fp32 then LSQ+ (every stage x candidate block; the students spread over the ranks)
$RUN train_block_kd.py --superspace $SUPERSPACE --data_dir "$IMAGENET" "${TEACHER[@]}" \
    --output_dir "$OUT" --device $DEVICE --epochs 5 --hw_list $HW --resume "${KD[@]}"
$RUN lsq_block_kd.py --superspace $SUPERSPACE --data_dir "$IMAGENET" "${TEACHER[@]}" \
    --output_dir "$OUT" --device $DEVICE --epochs 1 --hw_list $HW --quant_preset ort --resume "${KD[@]}"

# 2. latency table measured on the DEPLOYMENT device (run this step on the target CPU, 1 thread)
python build_latency_table.py --superspace $SUPERSPACE --platform $PLATFORM --output_dir "$OUT" "${TABLE[@]}"

# 3. block LUT (1000 sub-stages per stage x block x window), files sharded over the ranks
$RUN eval_block_kd.py --superspace $SUPERSPACE --data_dir "$IMAGENET" "${TEACHER[@]}" \
    --output_dir "$OUT" --device $DEVICE --num_samples 1000 --hw_list $HW --latency_predictor $PLATFORM \
    --latency_table_dir "$OUT/latency" "${LUT[@]}"

# 4. space search (CPU, about a minute)
python search_block_kd.py --superspace $SUPERSPACE --lut_dir "$OUT/lut" --latency_constraints $SPACE_LAT \
    --latency_loss_t 0.08 --latency_predictor $PLATFORM --latency_table_dir "$OUT/latency" --output_dir "$OUT" \
    "${SPACE_SEARCH[@]}"
SPACE=$(python -c "import yaml,glob;print(yaml.safe_load(open(sorted(glob.glob('$OUT/space_search/$SUPERSPACE/*/result.yaml'))[-1]))['best']['supernet'])")

# 5. supernet: 360 fp32 epochs, then 50 LSQ+ epochs
$RUN train_supernet.py -c $CONFIG --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device $DEVICE --resume "${SUPERNET[@]}"
$RUN train_supernet.py -c $CONFIG --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device $DEVICE --quant_mode lsq --resume "${SUPERNET[@]}"

# 6. subnet search under latency windows [c-2, c] ms (candidates spread over the ranks)
$RUN search_subnet.py --supernet "$SPACE" --data_dir "$IMAGENET" --device $DEVICE --output_dir "$OUT" \
    --latency_predictor $PLATFORM --latency_table_dir "$OUT/latency" --latency_constraint $SUBNET_LAT \
    --latency_delta $SUBNET_DELTA --resume "${SEARCH[@]}"
