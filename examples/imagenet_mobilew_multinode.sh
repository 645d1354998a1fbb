#!/usr/bin/env bash
# Full-size SpaceEvo for the Pixel4/TFLite target (`mobilew`), several nodes x 8 GPUs with torchrun.
# Run this script on every node with NODE_RANK=0..NNODES-1 and MASTER_ADDR set to node 0; $OUT must be a
# filesystem shared by the nodes (node 0's latency table and space search are read from it by the others).
# DRY_RUN=1: the tiny superspace, digits and 2 CPU ranks per node, a step or two per command (examples/dry_run.sh).
set -euo pipefail
OUT=${OUT:-./checkpoints}          # a shared filesystem visible from every node
NGPU=${NGPU:-8}
SUPERSPACE=mobilew DEVICE=cuda HW="160 192 224" PLATFORM=tflite_int8
SPACE_LAT="15 20" SUBNET_LAT="15 20 25" SUBNET_DELTA=2 CONFIG=supernet_training_configs/train.yaml
TEACHER=() KD=() LUT=() TABLE=() SPACE_SEARCH=() SUPERNET=() SEARCH=()
if [ "${DRY_RUN:-0}" = 1 ]; then
  source "$(dirname "$0")/dry_run.sh"
else
  IMAGENET=${IMAGENET:?set IMAGENET=/path/to/imagenet}
  B5_WEIGHTS=${B5_WEIGHTS:?set B5_WEIGHTS=/path/to/efficientnet_b5.pth}
  TEACHER=(--teacher_weights "$B5_WEIGHTS")
fi
NNODES=${NNODES:?set NNODES}; NODE_RANK=${NODE_RANK:?set NODE_RANK}; MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
RUN="torchrun --nnodes=${NNODES} --node_rank=${NODE_RANK} --nproc_per_node=${NGPU} --master_addr=${MASTER_ADDR} --master_port=${MASTER_PORT:-29500}"

$RUN train_block_kd.py --superspace $SUPERSPACE --data_dir "$IMAGENET" "${TEACHER[@]}" \
    --output_dir "$OUT" --device $DEVICE --hw_list $HW --resume "${KD[@]}"
$RUN lsq_block_kd.py --superspace $SUPERSPACE --data_dir "$IMAGENET" "${TEACHER[@]}" \
    --output_dir "$OUT" --device $DEVICE --hw_list $HW --quant_preset tflite --resume "${KD[@]}"

# The latency table must be measured on the phone's CPU: either build it with LiteRT on a similar CPU
# (--platform tflite_int8) or measure on the phone with tflite_tools/README.md (adb + benchmark_model).
if [ "$NODE_RANK" = 0 ]; then
  python build_latency_table.py --superspace $SUPERSPACE --platform $PLATFORM --output_dir "$OUT" "${TABLE[@]}"
fi
# the other nodes wait on the shared $OUT for node 0's table (not in torchrun's rendezvous, which times out)
until [ -f "$OUT/latency/$PLATFORM.json" ]; do sleep 30; done

$RUN eval_block_kd.py --superspace $SUPERSPACE --data_dir "$IMAGENET" "${TEACHER[@]}" \
    --output_dir "$OUT" --device $DEVICE --hw_list $HW --latency_predictor $PLATFORM \
    --latency_table_dir "$OUT/latency" "${LUT[@]}"

if [ "$NODE_RANK" = 0 ]; then
  python search_block_kd.py --superspace $SUPERSPACE --lut_dir "$OUT/lut" --latency_constraints $SPACE_LAT \
      --latency_predictor $PLATFORM --latency_table_dir "$OUT/latency" --output_dir "$OUT" "${SPACE_SEARCH[@]}"
fi
# every node reads the best space of node 0's search from the shared $OUT (its run dir is named after the
# constraints, c15+20_t<t>_a<a>), waiting for it; set SPACE to train another space
RESULT_GLOB="$OUT/space_search/$SUPERSPACE/c${SPACE_LAT// /+}_t*/result.yaml"
until compgen -G "$RESULT_GLOB" >/dev/null; do sleep 30; done
SPACE=${SPACE:-$(python -c "import yaml,glob;print(yaml.safe_load(open(sorted(glob.glob('$RESULT_GLOB'))[-1]))['best']['supernet'])")}

$RUN train_supernet.py -c $CONFIG --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device $DEVICE --quant_preset tflite --resume "${SUPERNET[@]}"
$RUN train_supernet.py -c $CONFIG --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device $DEVICE --quant_mode lsq --quant_preset tflite --resume \
    "${SUPERNET[@]}"
$RUN search_subnet.py --supernet "$SPACE" --data_dir "$IMAGENET" --device $DEVICE --output_dir "$OUT" \
    --latency_predictor $PLATFORM --latency_table_dir "$OUT/latency" --latency_constraint $SUBNET_LAT \
    --latency_delta $SUBNET_DELTA --resume "${SEARCH[@]}"
