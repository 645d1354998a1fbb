"""Export one subnet of a trained supernet as a standalone checkpoint (spec §10.3, `get_subnet.py`).

Example (the best subnet of a search, BN recalibrated on the same training images the search used)::

    python export_subnet.py --supernet tiny-123450-000000 \\
        --subnet checkpoints/search_subnet/tiny-123450-000000/c1_d0.1/best.json --eval

The file (written atomically) is ``{"config": {"supernet", "subnet", "num_classes"}, "model": state_dict,
"quant_mode": "fp32"|"lsq", "quant_preset": ..., ...}``: a static network (weights, BN statistics and LSQ+
scales copied from the supernet). `modules.subnet_search.load_subnet_checkpoint(path)` rebuilds it; the
evaluation, downstream fine-tuning and ONNX/TFLite tools accept it. Default output:
``<output_dir>/subnets/<superspace>-<choice>-<sha256(subnet)[:8]>.pth``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from modules.cli import add_common_args, run_main, setup_logging
from modules.ops import BACKEND_PRESETS
from modules.subnet_search import (SubnetSpace, add_supernet_args, build_calib_batches, calib_kwargs,
                                   extract_subnet, load_subnet_checkpoint, load_supernet_checkpoint,
                                   resolve_checkpoint, resolve_data, resolve_subnet, save_subnet_checkpoint)

log = logging.getLogger("export_subnet")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("export_subnet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_supernet_args(p)
    p.add_argument("--subnet", required=True,
                   help="subnet encoding, a published subnet's name (SEQnet@vnni-A0), 'max', 'min', or a JSON file with "
                        "a 'subnet' key (search_subnet's best.json)")
    p.add_argument("--no_calib", action="store_true",
                   help="keep the supernet's BN statistics instead of recalibrating them for this subnet")
    p.add_argument("--quant_preset", default=None, choices=BACKEND_PRESETS,
                   help="convert an `original`-preset LSQ+ subnet (the original SpaceEvo's lsq.pth) to this backend "
                        "preset so that its learned scales deploy to int8 runtimes: the tensors the original leaves "
                        "float take their scales from the calibration images")
    p.add_argument("--output", default=None, help="output .pth (default: <output_dir>/subnets/<name>.pth)")
    p.add_argument("--eval", action="store_true", help="report the exported subnet's top-1 on the val split")
    add_common_args(p)
    return p


def default_output(output_dir: str, supernet: str, subnet: str) -> Path:
    from modules.export import model_file_stem

    superspace, choice = supernet.split("-", 1)
    return Path(output_dir) / "subnets" / f"{model_file_stem(superspace, choice, subnet)}.pth"


def _convert_preset(sub, info: dict, preset: str, calib, device) -> None:
    """Switch an original-preset subnet to `preset`; its new quantizers take their ranges from the first
    calibration batch."""
    from modules.lsq import convert_original_preset

    if info["quant_preset"] != "original":
        raise ValueError(f"--quant_preset converts original-preset LSQ+ checkpoints; {info['path']} is "
                         f"{info['quant_mode']} ({info['quant_preset'] or 'no preset'})")
    if calib is None:
        raise ValueError("--quant_preset needs calibration images for the tensors the original leaves float: "
                         "drop --no_calib")
    convert_original_preset(sub, preset)
    with torch.no_grad():
        sub(calib[0].to(device))
    log.info("converted the original preset to %s (quantizers new to it calibrated on %d images)", preset,
             len(calib[0]))


def main(args) -> dict:
    setup_logging(None, "export_subnet")
    saved = None
    if args.subnet.endswith(".json") and Path(args.subnet).is_file():
        try:
            saved = json.loads(Path(args.subnet).read_text()).get("data")
        except (json.JSONDecodeError, AttributeError):
            saved = None  # resolve_subnet reports a malformed file
    ckpt_path = resolve_checkpoint(args)
    net, info = load_supernet_checkpoint(ckpt_path, args.supernet, args.device, log=log.warning)
    space = SubnetSpace(net.choice, net.hw_list)
    cfg = resolve_subnet(space, args.subnet)
    data = resolve_data(args, info, saved, log=log.warning) if not args.no_calib or args.eval else {}
    if saved:
        log.info("BN calibration settings of the search: %s", data)
    image_size = data.get("image_size") or args.image_size or max(space.hw_list)
    calib = None
    if not args.no_calib:
        calib, _, dinfo = build_calib_batches(data["data_dir"], image_size, workers=args.workers,
                                              **calib_kwargs(data))
    else:
        log.warning("--no_calib: the subnet keeps the supernet's BN statistics (usually wrong for a subnet)")
    sub, seen = extract_subnet(net, cfg, calib, args.device)
    if seen:
        log.info("BN statistics recalibrated on %d training images", seen)
    if args.quant_preset:
        _convert_preset(sub, info, args.quant_preset, calib, args.device)
    out = Path(args.output) if args.output else default_output(args.output_dir, info["supernet"], str(cfg))
    save_subnet_checkpoint(sub, out, source_checkpoint=str(ckpt_path), bn_calibration_images=int(seen),
                           data=data)
    # round trip: the reloaded file computes what the supernet computes with the subnet active
    model = load_subnet_checkpoint(out, args.device)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(args.device)
    net.eval()
    with torch.no_grad():
        diff = float((model(x) - (sub if args.quant_preset else net)(x)).abs().max())
    log.info("wrote %s (%s, %s); max |output - supernet output| = %.3g", out, info["quant_mode"], cfg, diff)
    result = {"path": str(out), "supernet": info["supernet"], "subnet": str(cfg), "quant_mode": info["quant_mode"],
              "max_abs_diff": diff}
    if args.eval:
        from modules.data import build_dataset, build_loader
        from modules.engine import evaluate_top1

        val = build_loader(build_dataset(data["data_dir"], "val", train=False, image_size=image_size), args.batch_size,
                           train=False, workers=args.workers)
        result["val_top1"] = evaluate_top1(model, val, args.device)
        log.info("val top-1 %.2f %%", result["val_top1"])
    print(out)
    return result


if __name__ == "__main__":
    run_main(main, get_args_parser())
