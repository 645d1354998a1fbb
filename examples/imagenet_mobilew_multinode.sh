#!/usr/bin/env bash
# Full-size SpaceEvo for the Pixel4/TFLite target (`mobilew`), several nodes x 8 GPUs with torchrun.
# Run this script on every node with NODE_RANK=0..NNODES-1 and MASTER_ADDR set to node 0.
set -euo pipefail
IMAGENET=${IMAGENET:?set IMAGENET=/path/to/imagenet}
B5_WEIGHTS=${B5_WEIGHTS:?set B5_WEIGHTS=/path/to/efficientnet_b5.pth}
OUT=${OUT:-./checkpoints}          # a shared filesystem visible from every node
NNODES=${NNODES:?set NNODES}; NODE_RANK=${NODE_RANK:?set NODE_RANK}; MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
RUN="torchrun --nnodes=${NNODES} --node_rank=${NODE_RANK} --nproc_per_node=8 --master_addr=${MASTER_ADDR} --master_port=29500"

$RUN train_block_kd.py --superspace mobilew --data_dir "$IMAGENET" --teacher_weights "$B5_WEIGHTS" \
    --output_dir "$OUT" --device cuda --hw_list 160 192 224 --resume
$RUN lsq_block_kd.py --superspace mobilew --data_dir "$IMAGENET" --teacher_weights "$B5_WEIGHTS" \
    --output_dir "$OUT" --device cuda --hw_list 160 192 224 --quant_preset tflite --resume

# The latency table must be measured on the phone's CPU: either build it with LiteRT on a similar CPU
# (--platform tflite_int8) or measure on the phone with tflite_tools/README.md (adb + benchmark_model).
if [ "$NODE_RANK" = 0 ]; then
  python build_latency_table.py --superspace mobilew --platform tflite_int8 --output_dir "$OUT"
fi
# the other nodes wait on the shared $OUT for node 0's table (not in torchrun's rendezvous, which times out)
until [ -f "$OUT/latency/tflite_int8.json" ]; do sleep 30; done

$RUN eval_block_kd.py --superspace mobilew --data_dir "$IMAGENET" --teacher_weights "$B5_WEIGHTS" \
    --output_dir "$OUT" --device cuda --latency_predictor tflite_int8 --latency_table_dir "$OUT/latency"

if [ "$NODE_RANK" = 0 ]; then
  python search_block_kd.py --superspace mobilew --lut_dir "$OUT/lut" --latency_constraints 15 20 \
      --latency_predictor tflite_int8 --latency_table_dir "$OUT/latency" --output_dir "$OUT"
fi
# every node reads the best space of node 0's search from the shared $OUT (its run dir is named after the
# constraints, c15+20_t<t>), waiting for it; set SPACE to train another space
RESULT_GLOB="$OUT/space_search/mobilew/c15+20_t*/result.yaml"
until compgen -G "$RESULT_GLOB" >/dev/null; do sleep 30; done
SPACE=${SPACE:-$(python -c "import yaml,glob;print(yaml.safe_load(open(sorted(glob.glob('$RESULT_GLOB'))[-1]))['best']['supernet'])")}

$RUN train_supernet.py -c supernet_training_configs/train.yaml --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device cuda --quant_preset tflite --resume
$RUN train_supernet.py -c supernet_training_configs/train.yaml --supernet_choice "$SPACE" \
    --data_path "$IMAGENET" --output_dir "$OUT" --device cuda --quant_mode lsq --quant_preset tflite --resume
$RUN search_subnet.py --supernet "$SPACE" --data_dir "$IMAGENET" --device cuda --output_dir "$OUT" \
    --latency_predictor tflite_int8 --latency_table_dir "$OUT/latency" --latency_constraint 15 20 25 --latency_delta 2
