"""Convert supernet checkpoints between the original SpaceEvo's format and ours, both ways.

Every script here reads the original's ``checkpoint.pth`` / ``lsq.pth`` as they are; convert one to keep a file
in our format, or convert ours back so that the original's code can evaluate or fine-tune a supernet trained here
(fp32, or LSQ+ with ``--quant_preset original``, the preset that computes the original's fake quantization).

Examples::

    # the released spaceevo@vnni LSQ+ checkpoint in our format
    python convert_checkpoint.py --checkpoint checkpoints/supernet_training/spaceevo@vnni/lsq.pth \\
        --output checkpoints/supernet_training/onnxw-151122-023231/lsq.pth
    # one of ours for the original's code (it reads <models_save_dir>/<supernet>-align0/checkpoint.pth)
    python convert_checkpoint.py --checkpoint checkpoints/supernet_training/onnxw-151122-023231/checkpoint.pth \\
        --output original/supernet_training/onnxw-151122-023231-align0/checkpoint.pth

The direction is the other format of the input; every key of both sides is accounted for (a mismatch is one
error naming the first keys that differ). Ours: ``{"model", "supernet", "quant_mode", "quant_preset", "epoch"}``;
the original's: ``{"state_dict": {"module." + key: tensor}, "epoch", "args": {"supernet_encoding", ...}}``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from modules.checkpoint import atomic_save, load_checkpoint
from modules.cli import run_main
from modules.original import is_original_state, to_original_state
from modules.subnet_search import load_supernet_checkpoint, state_dict_of


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("convert_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a supernet checkpoint, ours or the original's (.pth)")
    p.add_argument("--output", required=True, help="where to write the converted checkpoint")
    p.add_argument("--supernet", default=None,
                   help="its supernet encoding, if neither the checkpoint nor its directory name says")
    p.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    return p


def main(args) -> dict:
    src, out = Path(args.checkpoint), Path(args.output)
    if out.resolve() == src.resolve():
        raise ValueError(f"--output {out} is the input checkpoint; write the conversion elsewhere")
    ckpt = load_checkpoint(src)
    from_original = is_original_state(state_dict_of(ckpt, src))
    net, info = load_supernet_checkpoint(src, args.supernet)
    if from_original:
        atomic_save({"model": net.state_dict(), "supernet": info["supernet"], "quant_mode": info["quant_mode"],
                     "quant_preset": info["quant_preset"], "epoch": info["epoch"], "converted_from": str(src)}, out)
    else:
        state = {"module." + k: v for k, v in to_original_state(net).items()}
        atomic_save({"state_dict": state, "epoch": info["epoch"],
                     "args": {"supernet_encoding": info["supernet"], "quant_mode": info["quant_mode"] == "lsq"}}, out)
    fmt = "ours" if from_original else "the original's"
    print(f"{src} ({info['supernet']}, {info['quant_mode']}) -> {out} ({fmt} format)")
    return {"path": str(out), "format": "ours" if from_original else "original", **info}


if __name__ == "__main__":
    run_main(main, get_args_parser())
