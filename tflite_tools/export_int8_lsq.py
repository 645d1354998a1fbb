"""Export trained LSQ+ subnets to a real int8 ``.tflite`` with their learned scales (no calibration).

BN folded into the convs, every quantizer frozen at its learned scale / zero point as
``quantized_decomposed`` quantize/dequantize ops (int8 activations: the u8 zero point minus 128;
int8 per-channel weights in [-127, 127]), converted by litert-torch in static-quantization mode into
int8 CONV_2D / DEPTHWISE_CONV_2D / ADD / MUL / MEAN / LOGISTIC / HARD_SWISH / FULLY_CONNECTED kernels
(`modules.deploy`). Input float32 NCHW ``[1, 3, r, r]``, output float32 logits. Same model sources as
``onnx_tools/export_int8_lsq.py``. Files: ``<output_dir>/<stem>-lsq{_int8,}.tflite`` (the fp32 twin for
``tflite_tools.benchmark``; ``--no_fp32`` skips it).

Example::

    python -m tflite_tools.export_int8_lsq checkpoints/subnets/tiny-012345-000000-1a2b3c4d.pth --verify
    python -m tflite_tools.benchmark --input checkpoints/tflite_models
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tflite_tools/export_int8_lsq.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import run_main  # noqa: E402
from onnx_tools.export_int8_lsq import add_lsq_model_args, load_lsq_models, verify_inputs  # noqa: E402

DEFAULT_OUTPUT_DIR = "./checkpoints/tflite_models"


def get_args_parser():
    p = argparse.ArgumentParser("export_int8_lsq (tflite)", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lsq_model_args(p)
    p.add_argument("--no_fp32", action="store_true", help="do not write the fp32 twin")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="(default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    return p


def main(args):
    import torch

    from modules import deploy
    from modules.qconfig import read_qconfig

    out_dir = Path(args.output_dir)
    qconfig = read_qconfig(args.qconfig) if args.qconfig else None
    written = []
    for stem, model in load_lsq_models(args):
        r = args.resolution or int(model.resolution)
        int8 = deploy.export_tflite_int8(model, out_dir / f"{stem}_int8.tflite", r, qconfig=qconfig)
        fp32 = None if args.no_fp32 else deploy.export_tflite_fp32(model, out_dir / f"{stem}.tflite", r)
        print(f"{stem} ({deploy.model_preset(model)}, r{r})\n  -> {int8}" + (f"\n  -> {fp32}" if fp32 else ""))
        row = {"name": stem, "int8": int8, "fp32": fp32}
        if args.verify:
            x, what = verify_inputs(args, r)
            with torch.no_grad():
                ref = model(x).numpy()
            y = deploy.run_tflite_batch(int8, x)
            row["rel_err"] = deploy.relative_error(y, ref)
            row["argmax_agree"] = float((y.argmax(1) == ref.argmax(1)).mean())
            print(f"  LiteRT int8 vs torch fake-quant on {len(x)} {what}: relative error {row['rel_err']:.4f}, "
                  f"argmax agreement {100 * row['argmax_agree']:.1f} %")
        written.append(row)
    return written


if __name__ == "__main__":
    run_main(main, get_args_parser())
