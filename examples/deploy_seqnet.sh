#!/usr/bin/env bash
# Export a searched subnet with its learned LSQ+ scales to real INT8 ONNX / TFLite and benchmark it here.
set -euo pipefail
OUT=${OUT:-./checkpoints}
SPACE=${SPACE:?supernet encoding, e.g. onnxw-151122-023231}
BEST=${BEST:?best.json written by search_subnet.py}
IMAGENET=${IMAGENET:?ImageFolder for BN calibration}
python export_subnet.py --supernet "$SPACE" --subnet "$BEST" --data_dir "$IMAGENET" --output "$OUT/subnets/best.pth"
python onnx_tools/export_int8_lsq.py "$OUT/subnets/best.pth" --output_dir "$OUT/deploy" --verify --data_dir "$IMAGENET"
python tflite_tools/export_int8_lsq.py "$OUT/subnets/best.pth" --output_dir "$OUT/deploy" --verify --data_dir "$IMAGENET"
python -m onnx_tools.benchmark --input "$OUT/deploy" --threads 1
python -m tflite_tools.benchmark --input "$OUT/deploy" --threads 1
