#!/usr/bin/env bash
# Full-size SpaceEvo for the VNNI/ONNX Runtime target (`onnxw`) on ImageNet, one node with 8 GPUs.
# IMAGENET: an ImageFolder with train/ and val/. B5_WEIGHTS: torchvision efficientnet_b5 state dict
# (nothing is downloaded at run time; e.g. copy it from a machine with internet access).
set -euo pipefail
IMAGENET=${IMAGENET:?set IMAGENET=/path/to/imagenet}
B5_WEIGHTS=${B5_WEIGHTS:?set B5_WEIGHTS=/path/to/efficientnet_b5.pth}
OUT=${OUT:-./checkpoints}
NGPU=${NGPU:-8}
RUN="torchrun --standalone --nproc_per_node=${NGPU}"

# 1. block-wise KD, fp32 then LSQ+ (every stage x candidate block)
$RUN train_block_kd.py --superspace onnxw --data_dir "$IMAGENET" --teacher_weights "$B5_WEIGHTS" \
    --output_dir "$OUT" --device cuda --epochs 5 --hw_list 160 192 224 --resume
$RUN lsq_block_kd.py --superspace onnxw --data_dir "$IMAGENET" --teacher_weights "$B5_WEIGHTS" \
    --output_dir "$OUT" --device cuda --epochs 1 --hw_list 160 192 224 --quant_preset ort --resume

# 2. latency table measured on the DEPLOYMENT device (run this step on the target CPU, 1 thread)
python build_latency_table.py --superspace onnxw --platform ort_int8 --output_dir "$OUT"

# 3. block LUT (1000 sub-stages per stage x block x window), files sharded over the ranks
$RUN eval_block_kd.py --superspace onnxw --data_dir "$IMAGENET" --teacher_weights "$B5_WEIGHTS" \
    --output_dir "$OUT" --device cuda --num_samples 1000 --latency_predictor ort_int8 \
    --latency_table_dir "$OUT/latency"

# 4. space search (CPU, about a minute)
python search_block_kd.py --superspace onnxw --lut_dir "$OUT/lut" --latency_constraints 15 20 \
    --latency_loss_t 0.08 --latency_predictor ort_int8 --latency_table_dir "$OUT/latency" --output_dir "$OUT"
SPACE=$(python -c "import yaml,glob;print(yaml.safe_load(open(sorted(glob.glob('$OUT/space_search/onnxw/*/result.yaml'))[-1]))['best']['supernet'])")

# 5. supernet: 360 fp32 epochs, then 50 LSQ+ epochs
$RUN train_supernet.py -c supernet_training_configs/train.yaml --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device cuda --resume
$RUN train_supernet.py -c supernet_training_configs/train.yaml --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device cuda --quant_mode lsq --resume

# 6. subnet search under latency windows [c-2, c] ms
$RUN search_subnet.py --supernet "$SPACE" --data_dir "$IMAGENET" --device cuda --output_dir "$OUT" \
    --latency_predictor ort_int8 --latency_table_dir "$OUT/latency" --latency_constraint 8 10 12 --latency_delta 2
