"""Build, count and evaluate the published SpaceEvo models by name (``data/search_results.yaml``).

Names: the 5 supernets ``spaceevo@{pixel4,pixel4-tiny,pixel4-medium,vnni,vnni-large}`` and the 10
subnets ``SEQnet@{pixel4,vnni}-A{0..4}``. For a supernet the table reports its max and min subnets.
MACs are multiply-accumulates for one image at the model's resolution (the original's "FLOPs");
params count BN affine parameters and 3 LSQ+ scalars per conv/linear, as the original.

Examples::

    # the table of every named model (random weights: no accuracy)
    .venv/bin/python eval_specific_net.py --all
    # top-1 of a subnet from a trained supernet checkpoint (extracted, BN re-calibrated on `train`)
    .venv/bin/python eval_specific_net.py --model_name SEQnet@vnni-A0 --dataset_path /data/imagenet \\
        --checkpoint checkpoints/supernet_training/onnxw-151122-023231/checkpoint.pth
    # the LSQ+ (int8 fake-quant) supernet checkpoint: max and min subnets of spaceevo@vnni
    .venv/bin/python eval_specific_net.py --model_name spaceevo@vnni --dataset_path /data/imagenet \\
        --checkpoint .../lsq.pth --quant_mode lsq --quant_preset ort

``--checkpoint`` may hold a supernet state dict or a standalone subnet's (as saved from
``SuperNet.get_active_subnet()``), either bare or under the key ``model`` / ``state_dict``; it is loaded
with ``torch.load(weights_only=True)`` and strictly. ``--dataset_path`` is an ImageFolder root with a
``val`` split (and a ``train`` split for BN calibration).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from modules.checkpoint import load_checkpoint, load_state_dict_strict
from modules.cli import add_aliases, run_main
from modules.counter import count_macs, count_params
from modules.lsq import PRESETS, QUANT_MODES, set_quant_mode
from modules.named_models import get_named_model, model_names, reported_subnets
from modules.original import find_released_checkpoint, from_original_state, is_original_state
from modules.subnet_search import state_dict_of
from modules.supernet import SuperNet

DEFAULT_CALIB_BATCHES = 20


def get_args_parser() -> argparse.ArgumentParser:
    names = model_names()
    p = argparse.ArgumentParser("eval_specific_net", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model_name", choices=names, metavar="NAME",
                      help="one of: " + ", ".join(names))
    what.add_argument("--all", action="store_true", help="every named model (table only)")
    p.add_argument("--dataset_path", default=None, help="ImageFolder root with a 'val' split (needs --checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="supernet or standalone-subnet checkpoint (.pth; ours or the original SpaceEvo's). Default for "
                        "a named model: <output_dir>/supernet_training/<supernet name>/{checkpoint,lsq}.pth, where "
                        "the original keeps its released checkpoints")
    p.add_argument("--output_dir", default="./checkpoints",
                   help="checkpoint directory searched when --checkpoint is not given (default: %(default)s)")
    p.add_argument("--quant_mode", choices=QUANT_MODES, nargs="?", const="lsq", default="fp32",
                   help="(default: %(default)s; a bare --quant_mode, the original's switch, means lsq)")
    p.add_argument("--quant_preset", choices=PRESETS, default=None,
                   help="LSQ+ preset (default: original for the original's checkpoints, else ort)")
    p.add_argument("--num_classes", type=int, default=None,
                   help="classifier width (default: from the checkpoint, else 1000)")
    p.add_argument("--batch_size", type=int, default=50, help="evaluation batch (default: %(default)s)")
    p.add_argument("--calib_batch_size", type=int, default=64, help="BN calibration batch (default: %(default)s)")
    p.add_argument("--num_calib_batches", type=int, default=None,
                   help=f"BN calibration batches from 'train' for subnets extracted from a supernet checkpoint "
                        f"(default {DEFAULT_CALIB_BATCHES}; 0 keeps the stored statistics; standalone subnet "
                        "checkpoints are not re-calibrated unless this is given)")
    p.add_argument("--max_batches", type=int, default=None, help="evaluate only this many val batches")
    p.add_argument("--image_size", type=int, default=None,
                   help="eval crop size (default: the model's resolution; the model resizes anyway)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="calibration shuffling seed (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    for ours, *theirs in (("--data_dir", "--dataset_path", "--dataset_dir", "--data_path"),
                          ("--batch_size", "--batch_size_per_gpu"),
                          ("--num_calib_batches", "--post_bn_calibration_batch_num"),
                          ("--workers", "--data_loader_workers_per_gpu")):
        add_aliases(p, ours, *theirs)  # one name per concept across the scripts; the original's names
    return p


# --------------------------------------------------------------------------- checkpoints
def _checkpoint_path(args) -> Path | None:
    """--checkpoint, else the named model's supernet checkpoint where the original keeps it; without one, a table
    of MACs and params only (an accuracy needs weights: one line says where to put them)."""
    if args.checkpoint is not None or args.all:
        return args.checkpoint
    m = get_named_model(args.model_name)
    try:
        return find_released_checkpoint(args.output_dir, m.supernet_name, m.supernet, args.quant_mode)
    except FileNotFoundError as e:
        if args.dataset_path is not None:
            raise FileNotFoundError(f"{e} (or give --checkpoint)") from None
        print(f"note: {e}; MACs and params only", file=sys.stderr)
        return None


def _load_state(args, path) -> tuple[dict, str]:
    """(our state dict, LSQ+ preset) of a checkpoint; the original's are mapped to our names (preset original)."""
    state = state_dict_of(load_checkpoint(path), path)
    preset = args.quant_preset or "ort"
    if is_original_state(state):
        if args.all:
            raise ValueError("an original SpaceEvo checkpoint fits one model: use --model_name")
        if args.quant_preset not in (None, "original"):
            raise ValueError(f"checkpoint {path} is an original SpaceEvo checkpoint: its LSQ+ scalars only mean "
                             "something with --quant_preset original")
        m = get_named_model(args.model_name)
        state, mode = from_original_state(state, SuperNet(m.choice, _num_classes(args, state)), f"checkpoint {path}")
        preset = "original"
        if mode == "fp32" and args.quant_mode == "lsq":
            raise ValueError(f"checkpoint {path} is an fp32 checkpoint (its LSQ+ scalars were never trained): "
                             "evaluate it without --quant_mode lsq, or give lsq.pth")
        if mode == "lsq" and args.quant_mode == "fp32":  # the original evaluates an LSQ+ checkpoint's weights in fp32
            state = {k: v for k, v in state.items() if "_quant." not in k}
        return state, preset
    _check_quant_keys(state, args.quant_mode, path)
    return state, preset


def _num_classes(args, state: dict) -> int:
    head = next((v for k, v in state.items() if k.endswith("logits.blocks.0.linear.weight")
                 or k == "logits.linear.weight"), None)
    return args.num_classes or (int(head.shape[0]) if head is not None else 1000)


def _fits(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


def _check_quant_keys(state: dict, quant_mode: str, path) -> None:
    has_lsq = any(k.endswith("act_quant.scale") or k.endswith("weight_quant.scale") for k in state)
    if has_lsq and quant_mode != "lsq":
        raise ValueError(f"checkpoint {path} holds LSQ+ quantizer parameters: evaluate it with --quant_mode lsq "
                         "(and the --quant_preset it was trained with)")
    if not has_lsq and quant_mode == "lsq":
        raise ValueError(f"checkpoint {path} holds no LSQ+ quantizer parameters (an fp32 checkpoint): "
                         "drop --quant_mode lsq")


# --------------------------------------------------------------------------- evaluation
def _loaders(args, resolution: int, calib_batches: int):
    from modules.data import build_dataset, build_loader, calib_batches as take

    size = args.image_size or resolution
    val = build_loader(build_dataset(args.dataset_path, "val", train=False, image_size=size),
                       args.batch_size, train=False, workers=args.workers)
    calib = None
    if calib_batches > 0:
        train = build_loader(build_dataset(args.dataset_path, "train", train=True, image_size=size),
                             args.calib_batch_size, train=True, workers=args.workers, seed=args.seed)
        calib = take(train, calib_batches)
    return val, calib


def _evaluate(args, model, resolution: int, calib_batches: int) -> float:
    from modules.engine import calibrate_bn, evaluate_top1

    val, calib = _loaders(args, resolution, calib_batches)
    if calib is not None:
        calibrate_bn(model, calib, calib_batches, args.device)
    return evaluate_top1(model, val, args.device, args.max_batches)


def _count(model, resolution: int) -> tuple[float, float]:
    return count_macs(model, (1, 3, resolution, resolution)) / 1e6, count_params(model) / 1e6


def _rows_for(args, name: str, state: dict | None, preset: str, path) -> list[dict]:
    m = get_named_model(name)
    num_classes = _num_classes(args, state or {})
    quant = args.quant_mode == "lsq"

    def prepare(net):
        if quant:
            set_quant_mode(net, "lsq", preset)
        return net.to(args.device).eval()

    supernet = None
    if state is not None:
        candidate = prepare(SuperNet(m.choice, num_classes))
        if _fits(candidate, state):
            load_state_dict_strict(candidate, state, f"checkpoint {path}")
            supernet = candidate
        elif m.kind == "supernet":
            load_state_dict_strict(candidate, state, f"checkpoint {path} (supernet {m.supernet})")
    rows = []
    for label, cfg in reported_subnets(m):
        top1 = None
        if supernet is not None:  # a subnet of a supernet checkpoint: extract it with its weights
            supernet.set_active_subnet(cfg)
            net = supernet.get_active_subnet(preserve_weight=True).eval()
            calib = DEFAULT_CALIB_BATCHES if args.num_calib_batches is None else args.num_calib_batches
        else:
            net = prepare(SuperNet(m.choice, num_classes, 0.0, cfg))
            calib = args.num_calib_batches or 0
            if state is not None:  # a standalone subnet checkpoint
                load_state_dict_strict(net, state, f"checkpoint {path} (subnet {label})")
        macs, params = _count(net, cfg.resolution)
        if args.dataset_path is not None:
            top1 = _evaluate(args, net, cfg.resolution, calib)
        rows.append(dict(name=label, resolution=cfg.resolution, mmacs=macs, mparams=params, top1=top1,
                         supernet=m.supernet, subnet=str(cfg)))
    return rows


def format_table(rows: list[dict]) -> str:
    with_acc = any(r["top1"] is not None for r in rows)
    width = max([len("name")] + [len(r["name"]) for r in rows])
    head = f"{'name':<{width}}  {'res':>4}  {'MMACs':>9}  {'Mparams':>8}" + ("  top1(%)" if with_acc else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['resolution']:>4}  {r['mmacs']:>9.2f}  {r['mparams']:>8.4f}"
        if with_acc:
            line += f"  {r['top1']:>7.2f}" if r["top1"] is not None else f"  {'-':>7}"
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    if not args.all and not args.model_name:
        raise ValueError("give --model_name NAME or --all")
    if args.all and args.checkpoint:
        raise ValueError("--checkpoint fits one model: use it with --model_name, not --all")
    for opt in ("batch_size", "calib_batch_size"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt} {getattr(args, opt)}: expected a positive integer")
    if args.dataset_path is not None and not Path(args.dataset_path).is_dir():
        raise FileNotFoundError(f"dataset directory {args.dataset_path} does not exist")
    state, preset, path = None, args.quant_preset or "ort", _checkpoint_path(args)
    if path is not None:
        state, preset = _load_state(args, path)
    torch.manual_seed(args.seed)
    names = model_names() if args.all else [args.model_name]
    rows = []
    for name in names:
        rows += _rows_for(args, name, state, preset, path)
    print(format_table(rows))
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    run_main(main, get_args_parser())
