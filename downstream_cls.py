"""Fine-tune an exported subnet on any ImageFolder dataset with a new classification head (as the original does).

Example (the demo's exported subnet, on the digits set, LSQ+ like the checkpoint)::

    python export_subnet.py --supernet tiny-123450-000000 --subnet best.json --output sub.pth
    python downstream_cls.py --subnet_ckpt sub.pth --data_dir my_dataset --epochs 30 --lr 0.0125
    python downstream_cls.py ... --resume          # continue a stopped run

The dataset is ``<data_dir>/train/<class>/*`` and ``<data_dir>/<val_split>/<class>/*``. The new head is the
same elastic linear layer as the body's (a QLinear-compatible `DynamicLinear`) and runs in the same quant mode
as the body: LSQ+ fake-quant when the checkpoint is LSQ+ (the original left the head fp32), unless
`--quant_mode` says otherwise. Recipe of the original: SGD Nesterov momentum 0.9, weight decay 1e-5 on
conv/linear weights only, linear warm-up of 2 epochs then linear decay, label smoothing 0.1, gradient clipping
at norm 1.0, batch 128, 200 epochs; `--only_train_head` freezes the body.

Outputs in ``<output_dir>/downstream_cls/<name>/``: ``log.csv`` (per epoch: lr, train loss, train top-1, val
top-1, seconds), ``checkpoint.pth`` (resume), ``best.pth`` and ``final.pth`` (subnet checkpoints with the new
head, loadable by `modules.subnet_search.load_subnet_checkpoint`).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from modules.checkpoint import (atomic_save, atomic_write_text, build_checkpoint, load_checkpoint,
                                load_state_dict_strict, set_rng_state, to_plain)
from modules.cli import add_aliases, add_common_args, positive_int, run_main, save_run_info, setup_logging
from modules.data import DOWNSTREAM_DATASETS
from modules.lsq import PRESETS

log = logging.getLogger("downstream_cls")
LOG_HEADER = ["epoch", "lr", "train_loss", "train_top1", "val_top1", "seconds"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("downstream_cls", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--subnet_ckpt", default=None, help="subnet checkpoint written by export_subnet.py")
    p.add_argument("--subnet_name", default=None,
                   help="the original's way: a released subnet by name, e.g. SEQnet@vnni-A0, extracted from its "
                        "supernet's checkpoint in <output_dir>/supernet_training/ (lsq.pth; checkpoint.pth with "
                        "--quant_mode fp32) with BN recalibrated on --imagenet_path")
    p.add_argument("--imagenet_path", default=None,
                   help="ImageFolder with train/ for the BN calibration of --subnet_name")
    p.add_argument("--num_calib_batches", type=positive_int, default=32,
                   help="BN calibration batches for --subnet_name (default: %(default)s, as the original)")
    p.add_argument("--calib_batch_size", type=positive_int, default=64, help="(default: %(default)s)")
    p.add_argument("--data_dir", default=None, help="ImageFolder root with train/ and the --val_split folder")
    p.add_argument("--dataset", choices=list(DOWNSTREAM_DATASETS), default=None,
                   help="a torchvision set (the original's names) read from --dataset_root, instead of --data_dir; "
                        "its lr and weight decay default to the original's per-dataset values")
    p.add_argument("--dataset_root", default="./datasets", help="torchvision layout (default: %(default)s)")
    p.add_argument("--download", action="store_true", help="let torchvision download a missing --dataset")
    p.add_argument("--val_split", default="val")
    p.add_argument("--name", default=None, help="run name (default: <subnet_ckpt stem>_<data_dir name>)")
    p.add_argument("--quant_mode", choices=["auto", "fp32", "lsq"], default="auto",
                   help="auto: the checkpoint's mode; lsq on an fp32 checkpoint initialises the LSQ+ scales from data")
    p.add_argument("--quant_preset", choices=list(PRESETS), default=None,
                   help="LSQ+ preset when switching an fp32 checkpoint to lsq (default ort)")
    p.add_argument("--epochs", type=positive_int, default=200)
    p.add_argument("--batch_size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=None, help="(default: the --dataset's, else 0.0125)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=None, help="(default: the --dataset's, else 1e-5)")
    p.add_argument("--warmup_epochs", type=float, default=2.0)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--only_train_head", action="store_true", help="freeze the body (BN statistics too)")
    p.add_argument("--image_size", type=positive_int, default=None, help="loader image size (default: the subnet's "
                   "resolution)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (natural images)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps_per_epoch", type=positive_int, default=None, help="cap the steps per epoch (quick runs)")
    p.add_argument("--max_eval_batches", type=positive_int, default=None, help="cap the val batches per evaluation")
    p.add_argument("--resume", action="store_true", help="continue from <run dir>/checkpoint.pth")
    p.add_argument("--fresh", action="store_true", help="discard an existing checkpoint of this run")
    add_common_args(p)
    for ours, *theirs in (("--workers", "--num_workers"), ("--warmup_epochs", "--lr_warmup"),
                          ("--grad_clip", "--max_grad_norm")):
        add_aliases(p, ours, *theirs)  # the original downstream_cls.py's names
    return p


def recipe(args) -> tuple[float, float]:
    """(lr, weight decay): the command line's, else the original's values for --dataset, else ours."""
    _, _, lr, wd = DOWNSTREAM_DATASETS.get(args.dataset, (None, None, 0.0125, 1e-5))
    return (lr if args.lr is None else args.lr), (wd if args.weight_decay is None else args.weight_decay)


def num_classes_of(args) -> int:
    """The class count fixes the head: the --dataset's, or ImageFolder's (non-hidden sub-folders of train/)."""
    if args.dataset:
        return DOWNSTREAM_DATASETS[args.dataset][1]
    train_dir = Path(args.data_dir) / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir} does not exist; expected an ImageFolder {args.data_dir}/train/<class>/*")
    num_classes = sum(1 for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if num_classes < 2:
        raise ValueError(f"{train_dir}: {num_classes} class folder(s); a classifier needs at least 2")
    return num_classes


def build_datasets(args, image_size: int):
    from modules.data import build_dataset, build_torchvision_dataset

    if args.dataset:
        return tuple(build_torchvision_dataset(args.dataset, args.dataset_root, train, image_size,
                                               hflip=args.hflip and train, download=args.download)
                     for train in (True, False))
    train_ds = build_dataset(args.data_dir, "train", train=True, image_size=image_size, hflip=args.hflip)
    val_ds = build_dataset(args.data_dir, args.val_split, train=False, image_size=image_size)
    if val_ds.classes != train_ds.classes:
        raise ValueError(f"{args.data_dir}: the classes of train/ and {args.val_split}/ differ")
    return train_ds, val_ds


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then linear decay to 0 at `total` (the original)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def subnet_checkpoint(args) -> Path:
    """--subnet_ckpt, or the released subnet --subnet_name extracted from its supernet's checkpoint (once, to
    <output_dir>/subnets/<name>.pth), as the original's downstream script starts."""
    if (args.subnet_ckpt is None) == (args.subnet_name is None):
        raise ValueError("give one of --subnet_ckpt (a subnet written by export_subnet.py) or --subnet_name NAME")
    if args.subnet_ckpt is not None:
        path = Path(args.subnet_ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"--subnet_ckpt {path} does not exist (write one with export_subnet.py)")
        return path
    from modules.named_models import get_named_model
    from modules.original import find_released_checkpoint
    from modules.subnet_search import build_calib_batches, extract_subnet, load_supernet_checkpoint, save_subnet_checkpoint

    m = get_named_model(args.subnet_name)
    if m.kind != "subnet":
        raise ValueError(f"--subnet_name {args.subnet_name} is a supernet; name one of its subnets")
    path = Path(args.output_dir) / "subnets" / f"{args.subnet_name}.pth"
    if path.is_file():
        log.info("%s: using %s", args.subnet_name, path)
        return path
    if args.imagenet_path is None:
        raise ValueError(f"--subnet_name {args.subnet_name} needs --imagenet_path (an ImageFolder with train/) to "
                         "recalibrate the subnet's BN statistics")
    try:
        source = find_released_checkpoint(args.output_dir, m.supernet_name, m.supernet,
                                          "fp32" if args.quant_mode == "fp32" else "lsq")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--subnet_name {args.subnet_name}: {e} (or give --subnet_ckpt)") from None
    net, _ = load_supernet_checkpoint(source, m.supernet, args.device, log=log.warning)
    calib, _, _ = build_calib_batches(args.imagenet_path, m.config.resolution, workers=args.workers,
                                      num_calib_batches=args.num_calib_batches,
                                      calib_batch_size=args.calib_batch_size, seed=args.seed)
    sub, seen = extract_subnet(net, m.config, calib, args.device)
    save_subnet_checkpoint(sub, path, source_checkpoint=str(source), bn_calibration_images=seen)
    log.info("%s extracted from %s, BN recalibrated on %d images: %s", args.subnet_name, source, seen, path)
    return path


def build_model(args, num_classes: int, ckpt_path: Path):
    """(model with a new head, quant mode, preset, source checkpoint dict)."""
    from modules.lsq import get_quant_mode, quantizers
    from modules.subnet_search import load_subnet_checkpoint

    want = None if args.quant_mode == "auto" else args.quant_mode
    model, ckpt = load_subnet_checkpoint(ckpt_path, num_classes=num_classes, new_head=True, quant_mode=want,
                                         quant_preset=args.quant_preset, return_ckpt=True)
    mode = get_quant_mode(model)
    preset = quantizers(model)[0].preset if mode == "lsq" else None
    if ckpt.get("quant_mode", "fp32") != mode:
        log.info("checkpoint is %s, fine-tuning in %s%s", ckpt.get("quant_mode", "fp32"), mode,
                 " (LSQ+ scales initialised from the first batch)" if mode == "lsq" else "")
    elif args.quant_preset and mode == "lsq" and args.quant_preset != preset:
        raise ValueError(f"--quant_preset {args.quant_preset}: the checkpoint was trained with {preset}")
    return model, mode, preset, ckpt


def write_log(path: Path, rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LOG_HEADER)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_subnet(model, path: Path, **extra) -> None:
    from modules.subnet_search import save_subnet_checkpoint

    save_subnet_checkpoint(model, path, **extra)


def main(args) -> dict:
    from modules.data import build_loader, set_loader_epoch
    from modules.engine import evaluate_top1, param_groups

    if (args.data_dir is None) == (args.dataset is None):
        raise ValueError("give one of --data_dir (an ImageFolder) or --dataset (a torchvision set)")
    ckpt_path = subnet_checkpoint(args)
    if args.resume and args.fresh:
        raise ValueError("--resume and --fresh exclude each other")
    name = args.name or f"{ckpt_path.stem}_{args.dataset or Path(args.data_dir).resolve().name}"
    run_dir = Path(args.output_dir) / "downstream_cls" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, "downstream_cls")
    save_run_info(args, run_dir)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    num_classes = num_classes_of(args)
    model, mode, preset, src = build_model(args, num_classes, ckpt_path)
    image_size = args.image_size or model.resolution
    train_ds, val_ds = build_datasets(args, image_size)
    train_loader = build_loader(train_ds, args.batch_size, train=True, workers=args.workers, seed=args.seed)
    val_loader = build_loader(val_ds, args.batch_size, train=False, workers=args.workers)
    model.to(device)
    log.info("%s: %s subnet %s, new %d-class head (%s), %d train / %d val images at %d px", name, mode,
             src["config"]["subnet"], num_classes, mode, len(train_ds), len(val_ds), image_size)

    if args.only_train_head:
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("logits.")
    lr, weight_decay = recipe(args)
    groups = param_groups(model, weight_decay)
    opt = torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.momentum > 0)
    steps_per_epoch = len(train_loader) if args.steps_per_epoch is None else min(args.steps_per_epoch,
                                                                                 len(train_loader))
    total = steps_per_epoch * args.epochs
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    start_epoch, rows, best = 0, [], -1.0
    ckpt_file = run_dir / "checkpoint.pth"
    if ckpt_file.is_file():
        if args.fresh:
            ckpt_file.unlink()
        elif not args.resume:
            raise ValueError(f"{ckpt_file} exists: pass --resume to continue that run, or --fresh to start over")
        else:
            ck = load_checkpoint(ckpt_file)
            load_state_dict_strict(model, ck["model"], f"checkpoint {ckpt_file}")
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["lr_scheduler"])
            start_epoch, rows, best = int(ck["epoch"]), list(ck.get("log", [])), float(ck.get("best", -1.0))
            if ck.get("rng"):
                set_rng_state(ck["rng"])
            log.info("resumed %s at epoch %d", ckpt_file, start_epoch)
    elif args.resume:
        log.warning("--resume: no checkpoint at %s; starting a new run", ckpt_file)

    extra = {"source_subnet_checkpoint": str(ckpt_path), "dataset": args.dataset or str(args.data_dir),
             "classes": list(train_ds.classes)}
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        set_loader_epoch(train_loader, epoch)
        model.train()
        if args.only_train_head:
            model.eval()
            model.logits.train()
        loss_sum, correct, seen = 0.0, 0, 0
        lr = opt.param_groups[0]["lr"]
        for i, (x, y) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = criterion(out, y)
            if not torch.isfinite(loss):
                raise ValueError(f"epoch {epoch} step {i}: loss is {loss.item()} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        val_top1 = evaluate_top1(model, val_loader, device, args.max_eval_batches)
        row = [epoch + 1, lr, loss_sum / max(1, seen), 100.0 * correct / max(1, seen), val_top1,
               time.perf_counter() - t0]
        rows.append(row)
        log.info("epoch %d/%d: lr %.4g, loss %.4f, train top-1 %.2f %%, val top-1 %.2f %% (%.1f s)", epoch + 1,
                 args.epochs, lr, row[2], row[3], val_top1, row[5])
        if val_top1 > best:
            best = val_top1
            save_subnet(model, run_dir / "best.pth", epoch=epoch + 1, val_top1=val_top1, **extra)
        atomic_save(build_checkpoint(model, opt, sched, epoch=epoch + 1, args=args, log=rows, best=best,
                                     quant_mode=mode, quant_preset=preset), ckpt_file)
        write_log(run_dir / "log.csv", rows)
    if rows:
        write_log(run_dir / "log.csv", rows)
    model.eval()
    save_subnet(model, run_dir / "final.pth", epoch=args.epochs, val_top1=rows[-1][4] if rows else None, **extra)
    log.info("best val top-1 %.2f %%; outputs in %s", best, run_dir)
    return {"run_dir": str(run_dir), "best_val_top1": best, "log": to_plain(rows), "quant_mode": mode}


if __name__ == "__main__":
    run_main(main, get_args_parser())
