"""Export subnets to fp32 and int8 ``.tflite`` with litert-torch (no TensorFlow, no Keras twin).

Same model sources as ``onnx_tools/export_onnx.py``: an input.csv (``<superspace>,<blocks>-<windows>,
<subnet>`` per line), ``--model SEQnet@pixel4-A0`` or ``--encoding``. fp32 = ``litert_torch.convert``;
int8 = PT2E static quantization (int8 per-tensor activations, int8 symmetric per-channel weights),
calibrated on ``--calib_dir`` images or random data (latency only, with a warning). The int8 file has
int8 input/output tensors (scale and zero point in the tensor details). Input layout stays NCHW
``[1,3,r,r]`` (litert-torch adds a TRANSPOSE at the input).
Files: ``<output_dir>/<superspace>-<choice>-<sha256(subnet)[:8]>{,_int8}.tflite``.

Example::

    python -m tflite_tools.export_tflite --model SEQnet@pixel4-A0 --skip_weights
    python tflite_tools/export_tflite.py --input tflite_tools/input.csv --skip_weights --no_int8
    python -m tflite_tools.benchmark --model SEQnet@pixel4-A0           # then measure them
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python tflite_tools/export_tflite.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import add_common_args, run_main  # noqa: E402
from onnx_tools.export_onnx import add_model_source_args, calibration, load_models  # noqa: E402

DEFAULT_OUTPUT_DIR = "./checkpoints/tflite_models"


def get_args_parser():
    p = argparse.ArgumentParser("export_tflite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--per_tensor", action="store_true", help="per-tensor int8 weights (default: per-channel)")
    p.add_argument("--no_int8", action="store_true", help="export fp32 only")
    p.add_argument("--no_fp32", action="store_true", help="export int8 only")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="(default: %(default)s)")
    add_common_args(p)
    return p


def main(args):
    import torch

    from modules.export import RandomCalibrationWarning, import_litert_torch, export_tflite

    import_litert_torch()  # fail early, with the install hint, before building anything
    if args.no_int8 and args.no_fp32:
        raise ValueError("--no_int8 and --no_fp32 together leave nothing to export")
    torch.manual_seed(args.seed)
    out_dir = Path(args.output_dir)
    written, warned = [], False
    for entry, model in load_models(args):
        r = int(model.resolution)
        fp32 = None if args.no_fp32 else export_tflite(model, r, out_dir / f"{entry.stem}.tflite", seed=args.seed)
        int8 = None
        if not args.no_int8:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RandomCalibrationWarning)
                int8 = export_tflite(model, r, out_dir / f"{entry.stem}_int8.tflite", int8=True,
                                     calib=calibration(args, r), per_channel=not args.per_tensor,
                                     num_random_calib=args.num_calib, seed=args.seed)
            for w in caught:
                if not issubclass(w.category, RandomCalibrationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                elif not warned:
                    print("WARNING: INT8 calibration on random data (no --calib_dir): the INT8 models are for "
                          "latency only, their accuracy is meaningless", file=sys.stderr)
                    warned = True
        print(f"{entry.name[:90]}" + "".join(f"\n  -> {f}" for f in (fp32, int8) if f))
        written.append({"name": entry.name, "fp32": fp32, "int8": int8})
    return written


if __name__ == "__main__":
    run_main(main, get_args_parser())
