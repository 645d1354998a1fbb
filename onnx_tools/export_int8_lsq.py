"""Export trained LSQ+ subnets to int8 ONNX with their learned scales (no calibration).

The trained fake-quant network itself is deployed: BN folded into the convs, every quantizer frozen at
its learned scale / integer zero point, one QuantizeLinear/DequantizeLinear pair per quantized tensor,
per-channel int8 weights. ONNX Runtime fuses the graph into QLinearConv / QLinearAdd / QLinearMul /
QLinearGlobalAveragePool / QGemm (`modules.deploy`). Needs an LSQ+ model trained with the ``ort`` or
``tflite`` preset (``--quant_preset``); the ``original`` preset has no int8 equivalent.

Models: standalone subnet checkpoints (``export_subnet.py``), or a supernet LSQ+ checkpoint
(``lsq.pth``) with ``--subnet ENCODING|max|min`` / ``--model NAME`` (its BN statistics are the
supernet's: recalibrate with export_subnet.py for accuracy). Files, next to export_onnx.py's:
``<output_dir>/<superspace>-<choice>-<sha256(subnet)[:8]>-lsq{_int8,}.onnx`` (the fp32 twin, BN folded,
for ``onnx_tools.benchmark``; ``--no_fp32`` skips it).

Example::

    python -m onnx_tools.export_int8_lsq checkpoints/subnets/tiny-012345-000000-1a2b3c4d.pth --verify --inspect
    python -m onnx_tools.export_int8_lsq --supernet_checkpoint checkpoints/supernet/tiny-.../lsq.pth --subnet max
    python -m onnx_tools.benchmark --input checkpoints/onnx_models          # X.onnx vs X_int8.onnx
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python onnx_tools/export_int8_lsq.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import run_main  # noqa: E402

DEFAULT_OUTPUT_DIR = "./checkpoints/onnx_models"


def add_lsq_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="*", help="standalone LSQ+ subnet checkpoints (export_subnet.py)")
    p.add_argument("--supernet_checkpoint", default=None, help="a supernet LSQ+ checkpoint (lsq.pth) ...")
    p.add_argument("--supernet", default=None, help="... its encoding, if the checkpoint does not record it")
    p.add_argument("--subnet", action="append", default=[], help="... and a subnet of it: encoding, max or min "
                   "(repeatable)")
    p.add_argument("--model", action="append", default=[], help="... or a published subnet of it by name "
                   "(repeatable)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the subnet's)")
    p.add_argument("--verify", action="store_true", help="run the exported file and torch fake-quant on 64 "
                   "inputs (--data_dir val images, else random) and report the relative output error")
    p.add_argument("--data_dir", default=None, help="ImageFolder root with val/ for --verify")
    p.add_argument("--qconfig", default=None, help="a quantization config file (modules.qconfig; written beside "
                   "every exported int8 model): export with its scales and zero points instead of the learned ones")


def load_lsq_models(args):
    """Yield (file stem, eval-mode LSQ+ model) for the script's model sources."""
    from modules.deploy import model_preset
    from modules.export import lsq_checkpoint_stem, model_file_stem
    from modules.subnet_search import load_subnet_checkpoint

    if not args.checkpoints and not args.supernet_checkpoint:
        raise ValueError("nothing to export: give subnet checkpoints, or --supernet_checkpoint with --subnet/--model")
    if (args.subnet or args.model) and not args.supernet_checkpoint:
        raise ValueError("--subnet / --model need --supernet_checkpoint (the trained weights)")
    for path in args.checkpoints:
        if not Path(path).is_file():
            raise FileNotFoundError(f"subnet checkpoint {path} not found")
        model = load_subnet_checkpoint(path)
        model_preset(model)
        yield lsq_checkpoint_stem(path), model
    if args.supernet_checkpoint:
        from modules.export import named_model_entry
        from modules.subnet_search import SubnetSpace, load_supernet_checkpoint, resolve_subnet

        if not args.subnet and not args.model:
            raise ValueError("--supernet_checkpoint needs --subnet ENCODING|max|min or --model NAME")
        net, info = load_supernet_checkpoint(args.supernet_checkpoint, args.supernet)
        model_preset(net)
        space = SubnetSpace(net.choice, net.hw_list)
        subnets = [str(resolve_subnet(space, s)) for s in args.subnet]
        for name in args.model:
            e = named_model_entry(name)
            if e.supernet != str(net.choice):
                raise ValueError(f"model {name} is a subnet of {e.supernet}, the checkpoint holds {net.choice}")
            subnets.append(e.subnet)
        print("warning: subnets taken from a supernet checkpoint keep the supernet's BN statistics; for accurate "
              "int8 models export them with export_subnet.py (BN recalibration) first", file=sys.stderr)
        superspace, choice = str(net.choice).split("-", 1)
        for s in subnets:
            net.set_active_subnet(s)
            sub = net.get_active_subnet(preserve_weight=True).eval()
            sub.resolution = sub.active_resolution
            yield f"{model_file_stem(superspace, choice, s)}-lsq", sub


def verify_inputs(args, resolution: int, num: int = 64):
    import torch

    if args.data_dir:
        from modules.data import build_dataset

        val = build_dataset(args.data_dir, "val", train=False, image_size=resolution)
        return torch.stack([val[i][0] for i in range(min(num, len(val)))]), "val images"
    return torch.randn(num, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)), "random inputs"


def get_args_parser():
    p = argparse.ArgumentParser("export_int8_lsq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lsq_model_args(p)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..17 (default: %(default)s)")
    p.add_argument("--no_fp32", action="store_true", help="do not write the fp32 twin")
    p.add_argument("--inspect", action="store_true", help="per-block report: int8 kernels, float fallbacks, "
                   "profiled int8 vs fp32 time")
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
        int8 = deploy.export_onnx_int8(model, out_dir / f"{stem}_int8.onnx", r, opset=args.opset, qconfig=qconfig)
        fp32 = None if args.no_fp32 else deploy.export_onnx_fp32(model, out_dir / f"{stem}.onnx", r, opset=args.opset)
        print(f"{stem} ({deploy.model_preset(model)}, r{r})\n  -> {int8}" + (f"\n  -> {fp32}" if fp32 else ""))
        row = {"name": stem, "int8": int8, "fp32": fp32}
        if args.verify:
            x, what = verify_inputs(args, r)
            with torch.no_grad():
                ref = model(x).numpy()
            y = deploy.run_onnx_batch(int8, x)
            row["rel_err"] = deploy.relative_error(y, ref)
            row["argmax_agree"] = float((y.argmax(1) == ref.argmax(1)).mean())
            print(f"  ORT int8 vs torch fake-quant on {len(x)} {what}: relative error {row['rel_err']:.4f}, "
                  f"argmax agreement {100 * row['argmax_agree']:.1f} %")
        if args.inspect:
            row["inspect"] = deploy.inspect_deployed(int8, fp32)
        written.append(row)
    return written


if __name__ == "__main__":
    run_main(main, get_args_parser())
