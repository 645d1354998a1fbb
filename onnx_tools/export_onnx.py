"""Export subnets to fp32 and INT8 ONNX (fixed batch 1 and resolution, input ``input``, output ``output``).

Models come from an input.csv (no header; one line per model ``<superspace>,<blocks>-<windows>,<subnet>``,
the original format), from published names (``--model SEQnet@vnni-A0``) or from ``--encoding`` strings.
INT8 = ONNX Runtime static quantization: uint8 activations, int8 per-channel weights (7-bit range on
x86 CPUs without VNNI, where ORT's full-range kernels saturate), QDQ or QOperator, calibrated on real
images (``--calib_dir``, an ImageFolder) or on random data (latency only; a warning says so).
Files: ``<output_dir>/<superspace>-<choice>-<sha256(subnet)[:8]>{,_int8}.onnx``.

Example::

    python -m onnx_tools.export_onnx --input onnx_tools/input.csv --skip_weights
    python onnx_tools/export_onnx.py --model SEQnet@vnni-A0 --skip_weights --format qoperator
    python -m onnx_tools.benchmark --input onnx_tools/input.csv      # then measure them
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python onnx_tools/export_onnx.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import add_common_args, run_main  # noqa: E402

DEFAULT_OUTPUT_DIR = "./checkpoints/onnx_models"
HERE = Path(__file__).resolve().parent  # the tool's own input.csv lives here


def add_model_source_args(p: argparse.ArgumentParser) -> None:
    """--input / --model / --encoding, --skip_weights / --checkpoint, --num_classes, calibration."""
    p.add_argument("--input", default=None, help="input.csv: <superspace>,<blocks>-<windows>,<subnet> per line "
                   "(default with no --model / --encoding: input.csv beside this script)")
    p.add_argument("--model", action="append", default=[], help="published subnet name, e.g. SEQnet@vnni-A0 "
                   "(repeatable)")
    p.add_argument("--encoding", action="append", default=[],
                   help="'<superspace>,<blocks>-<windows>,<subnet>' (repeatable)")
    p.add_argument("--skip_weights", action="store_true", help="random weights: for latency measurements only")
    p.add_argument("--checkpoint", default=None, help="trained weights (not supported yet: use --skip_weights)")
    p.add_argument("--num_classes", type=int, default=None, help="classifier size (default: the superspace's)")
    p.add_argument("--calib_dir", default=None, help="ImageFolder dir of calibration images (default: random "
                   "data, with a warning)")
    p.add_argument("--num_calib", type=int, default=32, help="calibration images (default: %(default)s)")


def get_args_parser():
    p = argparse.ArgumentParser("export_onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--format", choices=["qdq", "qoperator"], default="qdq", help="INT8 ONNX format (default: qdq)")
    p.add_argument("--per_tensor", action="store_true", help="per-tensor weights (default: per-channel)")
    p.add_argument("--reduce_range", choices=["auto", "on", "off"], default="auto",
                   help="7-bit weights; auto = on for x86 CPUs without VNNI (default: auto)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..17 (default: %(default)s)")
    p.add_argument("--no_int8", action="store_true", help="export fp32 only")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="(default: %(default)s)")
    add_common_args(p)
    return p


def load_models(args):
    """Yield (InputEntry, eval-mode model) for the script's model sources (weights as requested)."""
    from modules.export import build_model_from_encoding, collect_entries, tool_input

    entries = collect_entries(tool_input(args.input, args.model, args.encoding, HERE), args.model, args.encoding)
    if not entries:
        raise ValueError("nothing to export: give --input <input.csv>, --model <name> or --encoding <line>")
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint} not found")
        raise ValueError("--checkpoint: loading trained weights into exported subnets is not implemented yet; "
                         "use --skip_weights for latency-only models")
    if not args.skip_weights:
        raise ValueError("no weights: pass --checkpoint <file> for trained weights, or --skip_weights for random "
                         "weights (latency only)")
    for e in entries:
        yield e, build_model_from_encoding(e.supernet, e.subnet, num_classes=args.num_classes)


def calibration(args, resolution: int):
    """Calibration images for one resolution (None → random data, the quantizer warns)."""
    if args.calib_dir is None:
        return None
    from modules.export import calib_from_loader, calib_loader_from_dir

    return calib_from_loader(calib_loader_from_dir(args.calib_dir, resolution, seed=args.seed), args.num_calib)


def main(args):
    import torch

    from modules.export import RandomCalibrationWarning, export_onnx, quantize_onnx_int8

    torch.manual_seed(args.seed)
    out_dir = Path(args.output_dir)
    reduce_range = {"auto": None, "on": True, "off": False}[args.reduce_range]
    written = []
    warned = False
    for entry, model in load_models(args):
        r = int(model.resolution)
        fp32 = export_onnx(model, r, out_dir / f"{entry.stem}.onnx", opset=args.opset)
        int8 = None
        if not args.no_int8:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RandomCalibrationWarning)
                int8 = quantize_onnx_int8(fp32, out_dir / f"{entry.stem}_int8.onnx", calibration(args, r),
                                          fmt=args.format, per_channel=not args.per_tensor,
                                          num_random_calib=args.num_calib, reduce_range=reduce_range, seed=args.seed)
            for w in caught:
                if not issubclass(w.category, RandomCalibrationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                elif not warned:
                    print("WARNING: INT8 calibration on random data (no --calib_dir): the INT8 models are for "
                          "latency only, their accuracy is meaningless", file=sys.stderr)
                    warned = True
        print(f"{entry.name[:90]}\n  -> {fp32}" + (f"\n  -> {int8}" if int8 else ""))
        written.append({"name": entry.name, "fp32": fp32, "int8": int8})
    return written


if __name__ == "__main__":
    run_main(main, get_args_parser())
