"""Train a weight-sharing supernet with the sandwich rule: fp32 first, then LSQ+ (8-bit fake quantization).

    # digits demo (a few minutes on 2 CPU cores); the data are written to <output_dir>/data/digits
    python train_supernet.py -c supernet_training_configs/tiny.yaml --supernet_choice tiny-151122-000000
    python train_supernet.py -c supernet_training_configs/tiny.yaml --supernet_choice tiny-151122-000000 \\
        --quant_mode lsq
    # ImageNet recipe on 8 GPUs (any YAML key can be overridden on the command line)
    torchrun --nproc_per_node=8 train_supernet.py -c supernet_training_configs/train.yaml \\
        --supernet_choice onnxw-151122-023231 --data_path /data/imagenet
    # continue an interrupted run (either mode)
    python train_supernet.py -c ... --supernet_choice ... [--quant_mode lsq] --resume

Each step (spec §8.5): the max subnet (max resolution, dropout) learns from the labels with label-smoothed
CE; the min subnet (min resolution) and `num_arch_training - 2` random subnets (resolution drawn from the
superspace's whole `supernet_hw_list`) learn from the max subnet's detached logits with AlphaNet's
adaptive α-divergence. Subnets are drawn from `random.Random(seed * 1_000_003 + step)`, so every rank
trains the same ones; the gradients of all passes are averaged over ranks in one all-reduce per step.

Outputs in `<output_dir>/supernet_training/<encoding>/`:
  fp32: checkpoint.pth (last), checkpoint_best.pth, log.csv, curves.png, train_supernet.log, args.yaml
  lsq:  lsq.pth (last), lsq_best.pth, lsq_log.csv, lsq_curves.png, lsq_train_supernet.log, lsq_args.yaml
"best" = best max-subnet top-1 on the validation data: a held-out part of train (`--val_split holdout`,
`--valid_size` images) or the val split (`--val_split val`, then "best" is chosen on the test data).
`--quant_mode lsq` starts from `checkpoint.pth` (or `--fp32_checkpoint`). SIGTERM / Ctrl-C: the current
state is saved at the next step boundary and the run exits; `--resume` continues exactly there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from modules import dist
from modules.checkpoint import (atomic_save, atomic_write_text, build_checkpoint, find_resume, get_rng_state,
                                load_checkpoint, load_state_dict_strict, set_rng_state, to_plain)
from modules.cli import (add_aliases, add_common_args, git_sha, run_main, save_run_info, seed_everything,
                         setup_logging)
from modules.data import AUGMENTATIONS
from modules.encoding import parse_supernet
from modules.engine import (AMP_MODES, AverageMeter, GracefulStop, ResizeCache, all_reduce_buffers,
                            all_reduce_gradients, amp_autocast, amp_grad_scaler, broadcast_module, build_sgd,
                            build_warmup_cosine, calibrate_bn, evaluate_top1, init_lsq_scales, plot_curves,
                            set_deterministic, step_rng, write_csv)
from modules.original import from_original_state, is_original_state
from modules.losses import AdaptiveLossSoft, CrossEntropyLabelSmooth
from modules.lsq import PRESETS, set_quant_mode
from modules.original_cli import SupernetAction, SuperspaceAction, supernet_text, translate_train_yaml
from modules.supernet import SuperNet

log = logging.getLogger("train_supernet")
CSV_FIELDS = ["epoch", "loss", "kd_loss", "lr", "max_acc", "min_acc", "time_s"]
# Test hook: SIGKILL (or another signal, SPACEEVO_FAULT_SIGNAL=TERM) this process right after global step N.
FAULT_STEP_ENV, FAULT_SIGNAL_ENV = "SPACEEVO_FAULT_AT_STEP", "SPACEEVO_FAULT_SIGNAL"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("train_supernet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    bool_arg = argparse.BooleanOptionalAction
    g = p.add_argument_group("model")
    g.add_argument("--supernet", "--supernet_choice", dest="supernet_choice", required=True, action=SupernetAction,
                   help="supernet encoding <superspace>-<blocks>-<windows>, e.g. tiny-151122-000000")
    g.add_argument("--superspace", default=None, action=SuperspaceAction, supernet_dest="supernet_choice",
                   help="superspace prefix when --supernet is given as <blocks>-<windows> or <blocks>_<windows>")
    # a bare --quant_mode (the original's switch) means LSQ+
    g.add_argument("--quant_mode", choices=["fp32", "lsq"], nargs="?", const="lsq", default="fp32",
                   help="fp32 training, or LSQ+ training starting from the fp32 checkpoint (default: %(default)s)")
    g.add_argument("--quant_preset", choices=list(PRESETS), default="ort",
                   help="what the LSQ+ fake-quant simulates (default: %(default)s)")
    g.add_argument("--fp32_checkpoint", default=None,
                   help="fp32 supernet to start LSQ+ from (default: <exp>/checkpoint.pth)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <exp>/checkpoint.pth (fp32) or <exp>/lsq.pth (lsq) if it exists")
    g.add_argument("--zero_last_gamma", action=bool_arg, default=True,
                   help="start residual blocks as identities (default: %(default)s)")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root with train/ and val/ (default: digits written to <output_dir>/data/digits)")
    g.add_argument("--image_size", type=int, default=None,
                   help="crop size delivered by the loaders; the model resizes to each subnet's resolution "
                        "(default: the largest supernet resolution)")
    g.add_argument("--hflip", action=bool_arg, default=False, help="random horizontal flips (natural images)")
    g.add_argument("--crop_min_scale", type=float, default=0.35,
                   help="RandomResizedCrop area scale range (min, 1) of the training crops (default: %(default)s)")
    g.add_argument("--augment", choices=list(AUGMENTATIONS), default="basic",
                   help="training augmentation: basic = random-resized crop [+ flip]; auto_augment_tf adds "
                        "AutoAugment (ImageNet policy) after them, the original's ImageNet recipe "
                        "(default: %(default)s)")
    g.add_argument("--val_split", choices=["holdout", "val"], default="holdout",
                   help="validate on --valid_size held-out train images, or on the val split (default: %(default)s)")
    g.add_argument("--valid_size", type=int, default=200, help="held-out train images (default: %(default)s)")
    g.add_argument("--max_train_samples", type=int, default=0,
                   help="use only this many training images (0: all; for quick runs)")
    g.add_argument("--batch_size_per_gpu", type=int, default=64, help="batch per process (default: %(default)s)")
    g.add_argument("--eval_batch_size", type=int, default=0, help="validation batch (0: 2 x batch_size_per_gpu)")
    g.add_argument("--workers", type=int, default=0, help="data loader workers per process (default: %(default)s)")

    g = p.add_argument_group("sandwich rule and distillation")
    g.add_argument("--sandwich_rule", action=bool_arg, default=True,
                   help="max + random + min subnets per step (else num_arch_training random ones)")
    g.add_argument("--num_arch_training", type=int, default=4, help="subnets per step (default: %(default)s)")
    g.add_argument("--inplace_distill", action=bool_arg, default=True,
                   help="non-max subnets learn from the max subnet's logits (else from the labels)")
    g.add_argument("--alpha_min", type=float, default=-1.0)
    g.add_argument("--alpha_max", type=float, default=1.0)
    g.add_argument("--iw_clip", type=float, default=5.0, help="importance-weight clip of the α-divergence")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=360)
    g.add_argument("--warmup_epochs", type=float, default=5)
    g.add_argument("--base_lr", type=float, default=0.1,
                   help="lr = base_lr x max(1, total_batch // lr_scaling_batch) (default: %(default)s)")
    g.add_argument("--lr_scaling_batch", type=int, default=256)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=bool_arg, default=True)
    g.add_argument("--weight_decay", type=float, default=1e-5, help="on conv/linear weights only")
    g.add_argument("--label_smoothing", type=float, default=0.1)
    g.add_argument("--dropout", type=float, default=0.2, help="dropout before the classifier, max subnet only")
    g.add_argument("--grad_clip_value", type=float, default=1.0, help="element-wise gradient clip (0: off)")

    g = p.add_argument_group("LSQ+ phase (--quant_mode lsq)")
    g.add_argument("--lsq_epochs", type=int, default=50)
    g.add_argument("--lsq_warmup_epochs", type=float, default=3)
    g.add_argument("--lsq_base_lr", type=float, default=0.01)
    g.add_argument("--lsq_init_batches", type=int, default=1,
                   help="training batches (concatenated) whose min/max initialise the scales, max subnet")

    g = p.add_argument_group("validation")
    g.add_argument("--valid_freq", type=int, default=5, help="validate every N epochs and at the last one")
    g.add_argument("--bn_calib_batches", type=int, default=20,
                   help="training batches for BN re-calibration of each validated subnet (default: %(default)s)")

    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--channels_last", action=bool_arg, default=False,
                   help="NHWC memory format for weights and images: on CPU 1.2x faster per fp32 step (tiny demo, "
                        "2 threads: 17.9 -> 15.0 s per epoch)")
    g.add_argument("--deterministic", action=bool_arg, default=False,
                   help="deterministic kernels (bit-exact resume on CPU with a fixed --threads)")
    g.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="mixed precision of the forward passes: bf16 (CPU or CUDA) or fp16 (CUDA, with loss scaling); "
                        "LSQ+ fake-quant stays float32 (default: %(default)s)")
    g.add_argument("--progress", action=bool_arg, default=True, help="tqdm progress bar")
    g.add_argument("--plot", action=bool_arg, default=True, help="draw curves.png after each validation")
    _add_original_names(p)
    return p


def _add_original_names(p: argparse.ArgumentParser) -> None:
    """One name per concept across the scripts, and the original train_supernet.py's names (its train.yaml
    keys too: `modules.original_cli.translate_train_yaml`)."""
    for ours, *theirs in (("--data_dir", "--data_path", "--dataset_dir", "--dataset_path"),
                          ("--num_calib_batches", "--bn_calib_batches", "--post_bn_calibration_batch_num"),
                          ("--epochs", "--num_epochs"), ("--workers", "--data_loader_workers_per_gpu")):
        add_aliases(p, ours, *theirs)
    p.add_argument("--no_progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="same as --no-progress")
    p.translate_config = translate_train_yaml


# ============================================================================ setup
def supernet_encoding(args) -> str:
    text = supernet_text(args.supernet_choice)
    if args.superspace and not text.startswith(args.superspace + "-"):
        text = f"{args.superspace}-{text}"
    return str(parse_supernet(text))


def check_args(args) -> None:
    positive = ["epochs", "batch_size_per_gpu", "num_arch_training", "valid_freq", "bn_calib_batches",
                "lr_scaling_batch", "lsq_epochs", "lsq_init_batches"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: expected a positive integer")
    for name in ("warmup_epochs", "lsq_warmup_epochs", "weight_decay", "grad_clip_value", "max_train_samples",
                 "workers", "threads", "eval_batch_size"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} {getattr(args, name)}: expected a non-negative number")
    for name in ("base_lr", "lsq_base_lr", "iw_clip"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} {getattr(args, name)}: expected a positive number")
    if not 0 <= args.dropout < 1 or not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--dropout {args.dropout} / --label_smoothing {args.label_smoothing}: expected [0, 1)")
    if args.sandwich_rule and args.num_arch_training < 2:
        raise ValueError(f"--num_arch_training {args.num_arch_training}: the sandwich rule needs >= 2 (max and min)")
    if args.alpha_min > args.alpha_max:
        raise ValueError(f"--alpha_min {args.alpha_min} > --alpha_max {args.alpha_max}")
    if not 0 < args.crop_min_scale <= 1:
        raise ValueError(f"--crop_min_scale {args.crop_min_scale}: expected a number in (0, 1]")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image_size {args.image_size}: expected >= 8")


def build_data(args, image_size: int, distributed: bool):
    from modules.data import build_dataset, build_loader, write_digits_imagefolder
    if args.data_path is None:
        root = Path(args.output_dir) / "data" / "digits"
        if dist.is_main_process():
            write_digits_imagefolder(root, size=64)
        dist.barrier()
    else:
        root = Path(args.data_path)
    train_aug = build_dataset(root, "train", train=True, image_size=image_size, hflip=args.hflip,
                              min_scale=args.crop_min_scale, augment=args.augment)
    train_plain = build_dataset(root, "train", train=False, image_size=image_size)
    if args.val_split == "holdout":
        train_set, val_set = _holdout(train_aug, train_plain, args)
    else:
        train_set = Subset(train_aug, list(range(len(train_aug))))
        val_set = build_dataset(root, "val", train=False, image_size=image_size)
    if args.max_train_samples:
        train_set = Subset(train_set.dataset, train_set.indices[: args.max_train_samples])
    calib_set = Subset(train_plain, train_set.indices)  # BN calibration: training images, eval transforms
    world = dist.get_world_size()
    if len(train_set) < args.batch_size_per_gpu * world:
        raise ValueError(f"{len(train_set)} training images are fewer than one global batch "
                         f"({args.batch_size_per_gpu} x {world} processes)")
    eval_bs = args.eval_batch_size or 2 * args.batch_size_per_gpu
    loaders = dict(
        train=build_loader(train_set, args.batch_size_per_gpu, train=True, workers=args.workers,
                           distributed=distributed, seed=args.seed, drop_last=True),
        calib=build_loader(calib_set, args.batch_size_per_gpu, train=True, workers=args.workers,
                           distributed=distributed, seed=args.seed + 1, drop_last=True),
        val=build_loader(val_set, eval_bs, train=False, workers=args.workers, distributed=distributed,
                         seed=args.seed))
    return root, len(train_aug.classes), loaders, (len(train_set), len(val_set))


def _holdout(train_aug, train_plain, args):
    from modules.data import split_holdout
    train_set, val_set = split_holdout(train_aug, args.valid_size, seed=args.seed, holdout_dataset=train_plain)
    return train_set, val_set


class Run:
    """Paths and file names of one experiment in one mode."""

    def __init__(self, output_dir: str, encoding: str, quant_mode: str):
        self.dir = Path(output_dir) / "supernet_training" / encoding
        lsq = quant_mode == "lsq"
        self.prefix = "lsq_" if lsq else ""
        self.last = self.dir / ("lsq.pth" if lsq else "checkpoint.pth")
        self.best = self.dir / ("lsq_best.pth" if lsq else "checkpoint_best.pth")
        self.csv = self.dir / f"{self.prefix}log.csv"
        self.png = self.dir / f"{self.prefix}curves.png"
        self.fp32 = self.dir / "checkpoint.pth"


def load_run_checkpoint(path: Path, encoding: str, quant_mode: str, preset: str | None) -> dict:
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and is_original_state(ckpt["state_dict"]):
        ckpt = _from_original(ckpt, path, encoding, quant_mode)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'model' entry: not a supernet training checkpoint")
    found = ckpt.get("supernet")
    if found is not None and found != encoding:
        raise ValueError(f"checkpoint {path} is of supernet {found}, not {encoding}")
    mode = ckpt.get("quant_mode", "fp32")
    if mode != quant_mode:
        raise ValueError(f"checkpoint {path} was written in quant mode {mode!r}, expected {quant_mode!r}")
    if quant_mode == "lsq" and ckpt.get("quant_preset") != preset:
        raise ValueError(f"checkpoint {path} uses LSQ+ preset {ckpt.get('quant_preset')!r}; "
                         f"resume with --quant_preset {ckpt.get('quant_preset')}")
    return ckpt


def _from_original(ckpt: dict, path: Path, encoding: str, quant_mode: str) -> dict:
    """An original SpaceEvo fp32 checkpoint as one of ours (weights only: its optimizer state belongs to its own
    parameter order), so that our LSQ+ phase can start from the original's fp32 training."""
    state = ckpt["state_dict"]
    head = next((v for k, v in state.items() if k.endswith("stages.logits.blocks.0.linear.weight")), None)
    net = SuperNet(parse_supernet(encoding), None if head is None else int(head.shape[0]))
    ours, mode = from_original_state(state, net, f"checkpoint {path} (supernet {encoding})")
    if mode != "fp32" or quant_mode != "fp32":
        raise ValueError(f"checkpoint {path} is an original SpaceEvo {mode} checkpoint: only its fp32 checkpoint "
                         "can start training here (our LSQ+ phase); evaluate or export its LSQ+ checkpoint instead")
    args = ckpt.get("args") or {}
    epoch, epochs = ckpt.get("epoch"), args.get("epochs") if isinstance(args, dict) else None
    return {"model": ours, "supernet": encoding, "quant_mode": "fp32", "epoch": epoch, "epochs": epochs,
            "complete": None if epoch is None or epochs is None else epoch >= epochs}


def _original_fp32_run(args, encoding: str) -> Path | None:
    """With --resume and no run of ours: the original's fp32 checkpoint of this supernet, if one is where it keeps
    them (``<output_dir>/supernet_training/<encoding>-align0/checkpoint.pth``)."""
    from modules.subnet_search import find_supernet_checkpoint, state_dict_of

    try:
        path = find_supernet_checkpoint(args.output_dir, encoding, "fp32")
    except FileNotFoundError:
        return None
    return path if is_original_state(state_dict_of(load_checkpoint(path), path)) else None


def _fp32_source(args, run: Run, encoding: str) -> Path:
    """--fp32_checkpoint, else our fp32 run's checkpoint, else one where the original keeps it."""
    from modules.subnet_search import find_supernet_checkpoint

    if args.fp32_checkpoint:
        path = Path(args.fp32_checkpoint)
    elif run.fp32.is_file():
        path = run.fp32
    else:
        try:
            path = find_supernet_checkpoint(args.output_dir, encoding, "fp32")
        except FileNotFoundError:
            path = run.fp32
    if not path.is_file():
        raise FileNotFoundError(f"--quant_mode lsq starts from the fp32 supernet checkpoint {path}, which "
                                f"does not exist; train {encoding} in fp32 first (same --output_dir) or pass "
                                "--fp32_checkpoint")
    return path


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (sorted keys, raw bytes): equal digests = bit-identical replicas."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather(obj):
    if not dist.is_dist_avail_and_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _any_rank(flag: bool) -> bool:
    return dist.all_reduce_sum(float(flag)) > 0 if dist.is_dist_avail_and_initialized() else bool(flag)


# ============================================================================ training
class Trainer:
    def __init__(self, args, model: SuperNet, loaders: dict, device: torch.device, run: Run, encoding: str):
        self.args, self.model, self.loaders, self.device, self.run, self.encoding = args, model, loaders, device, run, encoding
        self.lsq = args.quant_mode == "lsq"
        self.epochs = args.lsq_epochs if self.lsq else args.epochs
        warmup = args.lsq_warmup_epochs if self.lsq else args.warmup_epochs
        base_lr = args.lsq_base_lr if self.lsq else args.base_lr
        total_batch = args.batch_size_per_gpu * dist.get_world_size()
        self.lr = base_lr * max(1, total_batch // args.lr_scaling_batch)
        self.steps_per_epoch = len(loaders["train"])
        self.total_steps = self.steps_per_epoch * self.epochs
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_sgd(model, self.lr, args.momentum, args.nesterov, args.weight_decay)
        self.scheduler = build_warmup_cosine(self.optimizer, self.total_steps, int(round(warmup * self.steps_per_epoch)))
        self.scaler = amp_grad_scaler(args.amp)
        self.ce = CrossEntropyLabelSmooth(args.label_smoothing)
        self.kd = AdaptiveLossSoft(args.alpha_min, args.alpha_max, args.iw_clip)
        # state that a checkpoint carries
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best_acc, self.history = -1.0, []
        self.meters = {"loss": AverageMeter(), "kd_loss": AverageMeter()}
        self.epoch_rng = None  # per-rank RNG state at the start of `self.epoch`
        self.epoch_time = 0.0
        fault = os.environ.get(FAULT_STEP_ENV)
        self.fault_step = int(fault) if fault else None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        rngs = _gather(self.epoch_rng)
        return build_checkpoint(
            self.model, self.optimizer, self.scheduler, epoch=self.epoch, step=self.step, args=self.args,
            batch_in_epoch=self.batch_in_epoch, rng_per_rank=rngs, best_acc=self.best_acc, history=self.history,
            meters={k: m.state() for k, m in self.meters.items()}, epoch_time=self.epoch_time,
            supernet=self.encoding, quant_mode=self.args.quant_mode,
            quant_preset=self.args.quant_preset if self.lsq else None, num_classes=self.model.num_classes,
            epochs=self.epochs, steps_per_epoch=self.steps_per_epoch, world_size=dist.get_world_size(),
            complete=self.epoch >= self.epochs)

    def save(self, best: bool = False) -> None:
        all_reduce_buffers(self.model)  # BN running stats: the same on every rank
        ckpt = self.checkpoint()       # collective (RNG gather): every rank calls it
        if dist.is_main_process():
            atomic_save(ckpt, self.run.last)
            if best:
                atomic_save(ckpt, self.run.best)
        dist.barrier()

    def start_at(self, epoch: int) -> None:
        """Continue a run another program trained for `epoch` epochs, from its weights: the lr schedule goes on
        where that run's was; the optimizer's momentum starts anew (its state belongs to the other program's
        parameter order)."""
        self.epoch, self.step = epoch, epoch * self.steps_per_epoch
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()

    def restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.best_acc, self.history = float(ckpt.get("best_acc", -1.0)), list(ckpt.get("history", []))
        self.meters = {k: AverageMeter.from_state(ckpt.get("meters", {}).get(k)) for k in self.meters}
        self.epoch_time = float(ckpt.get("epoch_time", 0.0))
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            if self.batch_in_epoch:
                raise ValueError(f"cannot resume mid-epoch: the checkpoint had {ckpt['steps_per_epoch']} steps per "
                                 f"epoch, this run has {self.steps_per_epoch} (data, batch size or process count "
                                 "changed)")
            log.warning("steps per epoch changed from %s to %s: the lr schedule is stretched",
                        ckpt["steps_per_epoch"], self.steps_per_epoch)
        rngs = ckpt.get("rng_per_rank") or [ckpt.get("rng")]
        if len(rngs) != dist.get_world_size():
            log.warning("checkpoint written by %d process(es), now %d: data augmentation will not replay exactly",
                        len(rngs), dist.get_world_size())
        state = rngs[dist.get_rank() % len(rngs)]
        if state:
            set_rng_state(state)

    # ------------------------------------------------------------------ one step
    def subnet_plan(self) -> list[str]:
        n = self.args.num_arch_training
        return ["max"] + ["random"] * (n - 2) + ["min"] if self.args.sandwich_rule else ["random"] * n

    def train_step(self, images, labels, stop_requested: bool) -> tuple[float, float, bool]:
        args, net = self.args, self.model
        rng = step_rng(args.seed, self.step)
        torch_seed = rng.getrandbits(62) + dist.get_rank()  # dropout masks: a function of (seed, step, rank)
        self.optimizer.zero_grad(set_to_none=True)
        resize = ResizeCache(images)
        kd_losses, loss_label = [], float("nan")
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(torch_seed)
            teacher = None
            for i, kind in enumerate(self.subnet_plan()):
                if kind == "max":
                    net.set_max_subnet()
                elif kind == "min":
                    net.set_min_subnet()
                else:
                    net.sample_active_subnet(rng)
                net.set_dropout(args.dropout if i == 0 else 0.0)
                with amp_autocast(args.amp, self.device):
                    out = net(resize(net.active_resolution)).float()
                if i == 0:
                    loss = self.ce(out, labels)
                    teacher = out.detach()
                    loss_label = loss.item()
                elif args.inplace_distill:
                    loss = self.kd(out, teacher)
                    kd_losses.append(loss.item())
                else:
                    loss = self.ce(out, labels)
                    kd_losses.append(loss.item())
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step} ({kind} subnet "
                                             f"{net.get_active_subnet_config()}); lower the learning rate")
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        net.set_dropout(0.0)
        # all-reduced before unscaling: an overflow on any rank reaches every rank, so all skip that step alike
        flags = all_reduce_gradients(self.params, [float(stop_requested)])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if args.grad_clip_value > 0:
            torch.nn.utils.clip_grad_value_(self.params, args.grad_clip_value)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        kd = sum(kd_losses) / len(kd_losses) if kd_losses else float("nan")
        return loss_label, kd, flags[0] > 0

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        net, res = self.model, {}
        from modules.data import calib_batches, set_loader_epoch
        for kind in ("max", "min"):
            cfg = net.set_max_subnet() if kind == "max" else net.set_min_subnet()
            sub = net.get_active_subnet(preserve_weight=True).to(self.device)
            set_loader_epoch(self.loaders["calib"], 0)  # the same calibration images every time
            calibrate_bn(sub, calib_batches(self.loaders["calib"], self.args.bn_calib_batches),
                         self.args.bn_calib_batches, self.device)
            res[f"{kind}_acc"] = round(evaluate_top1(sub, self.loaders["val"], self.device), 3)
            res[f"{kind}_subnet"] = str(cfg)
        net.set_max_subnet()
        return res

    # ------------------------------------------------------------------ loop
    def fit(self, stop: GracefulStop) -> str:
        """Train until the last epoch or a stop request; returns "done" or "stopped"."""
        from modules.data import set_loader_epoch, start_loader_at
        args, loader = self.args, self.loaders["train"]
        main = dist.is_main_process()
        self.model.train()
        while self.epoch < self.epochs:
            if self.batch_in_epoch == 0:
                self.epoch_rng = get_rng_state()
                self.meters = {k: AverageMeter() for k in self.meters}
                self.epoch_time = 0.0
            else:
                self.epoch_rng = get_rng_state()  # restored from the checkpoint: the epoch's start state
            t0 = time.time()
            set_loader_epoch(loader, self.epoch)
            start_loader_at(loader, self.batch_in_epoch)  # mid-epoch resume: the batches done are not loaded
            it = iter(loader)
            bar = None
            if main and args.progress:
                from tqdm import tqdm
                bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False, mininterval=1.0,
                           desc=f"{'lsq' if self.lsq else 'fp32'} epoch {self.epoch + 1}/{self.epochs}",
                           dynamic_ncols=True)
            stopped = False
            for images, labels in it:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                loss, kd, stopped = self.train_step(images, labels, stop.requested)
                self.meters["loss"].update(loss, labels.shape[0])
                if math.isfinite(kd):
                    self.meters["kd_loss"].update(kd, labels.shape[0])
                self.batch_in_epoch += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.meters['loss'].avg:.3f}", kd=f"{self.meters['kd_loss'].avg:.3f}",
                                    lr=f"{self.scheduler.get_last_lr()[0]:.4f}", refresh=False)
                if self.fault_step is not None and self.step == self.fault_step:
                    sig = getattr(signal, "SIG" + os.environ.get(FAULT_SIGNAL_ENV, "KILL").upper())
                    os.kill(os.getpid(), sig)
                    if sig != signal.SIGKILL:
                        time.sleep(0.05)  # let the handler run before the next step's flag check
                if stopped:
                    break
            if bar is not None:
                bar.close()
            self.epoch_time += time.time() - t0
            if stopped:
                self.save()
                log.info("stop requested (%s): saved epoch %d step %d (batch %d/%d) to %s; continue with --resume",
                         stop.name or "another rank", self.epoch + 1, self.step, self.batch_in_epoch,
                         self.steps_per_epoch, self.run.last)
                return "stopped"
            self.end_epoch()
            if _any_rank(stop.requested):
                log.info("stop requested (%s) after epoch %d; saved to %s; continue with --resume",
                         stop.name or "another rank", self.epoch, self.run.last)
                return "stopped"
        return "done"

    def end_epoch(self) -> None:
        epoch = self.epoch + 1
        row = {"epoch": epoch, "loss": _r(dist.all_reduce_mean(self.meters["loss"].avg)),
               "kd_loss": _r(dist.all_reduce_mean(self.meters["kd_loss"].avg)),
               "lr": _r(self.scheduler.get_last_lr()[0], 6), "max_acc": None, "min_acc": None}
        best = False
        if epoch % self.args.valid_freq == 0 or epoch == self.epochs:
            all_reduce_buffers(self.model)
            t0 = time.time()
            res = self.validate()
            self.model.train()
            row.update(max_acc=res["max_acc"], min_acc=res["min_acc"])
            best = res["max_acc"] > self.best_acc
            self.best_acc = max(self.best_acc, res["max_acc"])
            log.info("epoch %d validation (%.1fs): max subnet %.2f%% | min subnet %.2f%%%s", epoch, time.time() - t0,
                     res["max_acc"], res["min_acc"], " (best)" if best else "")
        row["time_s"] = round(self.epoch_time, 1)
        self.history.append(row)
        log.info("epoch %d/%d: loss %.4f kd %.4f lr %.5f (%d steps, %.1fs)", epoch, self.epochs, row["loss"] or 0,
                 row["kd_loss"] or 0, row["lr"], self.steps_per_epoch, self.epoch_time)
        self.epoch, self.batch_in_epoch = epoch, 0
        self.epoch_rng = get_rng_state()
        self.save(best)
        if dist.is_main_process():
            write_csv(self.run.csv, self.history, CSV_FIELDS)
        if self.args.plot and dist.is_main_process() and row["max_acc"] is not None:  # a new point: redraw
            try:
                plot_curves(self.run.png, self.history, f"{self.encoding} {self.args.quant_mode}")
            except Exception as e:  # a plotting problem must not stop training
                log.warning("could not draw %s: %s", self.run.png, e)


def _r(x, nd: int = 5):
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


# ============================================================================ main
def main(args: argparse.Namespace) -> int:
    check_args(args)
    encoding = supernet_encoding(args)
    choice = parse_supernet(encoding)
    run = Run(args.output_dir, encoding, args.quant_mode)
    lsq = args.quant_mode == "lsq"
    preset = args.quant_preset if lsq else None

    # decide where the weights come from before any heavy work, so bad input fails fast
    resume_path = find_resume(run.dir, run.last.name) if args.resume else None
    original_start = _original_fp32_run(args, encoding) if args.resume and not lsq and resume_path is None else None
    fp32_path = None
    if lsq and resume_path is None:
        fp32_path = _fp32_source(args, run, encoding)

    info = dist.init_distributed_mode(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        set_deterministic(True, info.device)
    run.dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run.dir, f"{run.prefix}train_supernet")
    if lsq:
        _save_lsq_run_info(args, run.dir)
    else:
        save_run_info(args, run.dir)
    log.info("supernet %s, %s mode%s, %d process(es) on %s, %d thread(s)", encoding, args.quant_mode,
             f" (preset {preset})" if lsq else "", info.world_size, info.device, torch.get_num_threads())

    resume_ckpt = load_run_checkpoint(resume_path, encoding, args.quant_mode, preset) if resume_path else None
    fp32_ckpt = load_run_checkpoint(fp32_path, encoding, "fp32", None) if fp32_path else None
    if original_start is not None:  # the original's fp32 run, continued here from its weights
        fp32_path, fp32_ckpt = original_start, load_run_checkpoint(original_start, encoding, "fp32", None)
    if args.resume and resume_ckpt is None:
        log.info("--resume: no %s yet, starting %s", run.last, "from the fp32 supernet" if lsq else "from scratch")
    elif not args.resume and run.last.exists() and dist.is_main_process():
        log.warning("%s exists and will be overwritten (pass --resume to continue it)", run.last)

    image_size = args.image_size or max(choice.space.supernet_hw_list)
    seed_everything(args.seed)  # the same model initialisation on every rank
    data_root, num_classes, loaders, (n_train, n_val) = build_data(args, image_size, info.distributed)
    log.info("data %s: %d training images, %d validation images (%s), %d classes, %d px crops", data_root, n_train,
             n_val, "held-out train" if args.val_split == "holdout" else "val split", num_classes, image_size)

    model = SuperNet(choice, num_classes)
    if args.zero_last_gamma:
        model.zero_last_gamma()
    if fp32_ckpt is not None:
        if lsq:
            _check_complete(fp32_ckpt, fp32_path)
        load_state_dict_strict(model, fp32_ckpt["model"], f"fp32 checkpoint {fp32_path}")
    if lsq:
        set_quant_mode(model, "lsq", preset)  # creates the LSQ+ parameters: before the optimizer / LSQ checkpoint
    if resume_ckpt is not None:
        load_state_dict_strict(model, resume_ckpt["model"], f"checkpoint {resume_path}")
    model.to(info.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    broadcast_module(model)
    torch.manual_seed(args.seed * 1_000_003 + info.rank)  # data augmentation differs between ranks
    trainer = Trainer(args, model, loaders, info.device, run, encoding)
    log.info("%d epochs x %d steps, lr %.4g, subnets per step: %s (min %s, max %s)", trainer.epochs,
             trainer.steps_per_epoch, trainer.lr, "+".join(trainer.subnet_plan()), model.set_min_subnet(),
             model.set_max_subnet())
    if resume_ckpt is not None:
        trainer.restore(resume_ckpt)
        log.info("resumed %s: epoch %d, batch %d, step %d", resume_path, trainer.epoch + 1, trainer.batch_in_epoch,
                 trainer.step)
    elif original_start is not None and fp32_ckpt.get("epoch"):
        trainer.start_at(int(fp32_ckpt["epoch"]))
        log.info("continuing the original's run %s after its epoch %d (optimizer state starts anew)",
                 original_start, trainer.epoch)
    elif lsq:
        n = _init_lsq(model, loaders["calib"], args, info.device)
        log.info("LSQ+ scales of %d quantizers initialised from %d image(s) with the max subnet", n,
                 args.lsq_init_batches * args.batch_size_per_gpu)

    if trainer.epoch >= trainer.epochs:
        log.info("%s is already complete (%d epochs); nothing to do", run.last, trainer.epochs)
        return 0
    t0 = time.time()
    with GracefulStop() as stop:
        status = trainer.fit(stop)
    elapsed = time.time() - t0
    digests = _gather(state_digest(model))
    summary = {"supernet": encoding, "quant_mode": args.quant_mode, "quant_preset": preset, "status": status,
               "epoch": trainer.epoch, "step": trainer.step, "best_max_acc": trainer.best_acc,
               "last": trainer.history[-1] if trainer.history else None, "train_seconds": round(elapsed, 1),
               "world_size": info.world_size, "state_sha256_per_rank": digests}
    if len(set(digests)) > 1:
        log.error("the replicas differ between ranks: %s", digests)
    if dist.is_main_process():
        atomic_write_text(run.dir / f"{run.prefix}summary.json", json.dumps(summary, indent=1) + "\n")
    log.info("%s after %d epoch(s), %.1fs: best max-subnet top-1 %.2f%%; outputs in %s", status, trainer.epoch,
             elapsed, trainer.best_acc, run.dir)
    dist.barrier()
    dist.destroy_distributed()
    return 0


def _check_complete(ckpt: dict, path: Path) -> None:
    if ckpt.get("complete") is False:
        log.warning("fp32 checkpoint %s stopped at epoch %s of %s: LSQ+ starts from an unfinished supernet", path,
                    ckpt.get("epoch"), ckpt.get("epochs"))


def _init_lsq(model: SuperNet, calib_loader, args, device) -> int:
    from modules.data import set_loader_epoch
    set_loader_epoch(calib_loader, 0)
    batches = []
    for images, _ in calib_loader:
        batches.append(images)
        if len(batches) >= args.lsq_init_batches:
            break
    model.set_max_subnet()
    return init_lsq_scales(model, torch.cat(batches).to(device))


def _save_lsq_run_info(args, out_dir: Path) -> None:
    import shlex

    import yaml
    if not dist.is_main_process():
        return
    info = {"git_sha": git_sha(), "command": shlex.join([sys.executable, *sys.argv])}
    info.update(to_plain(vars(args)))
    atomic_write_text(out_dir / "lsq_args.yaml", yaml.safe_dump(info, sort_keys=False, default_flow_style=None))


if __name__ == "__main__":
    run_main(main, get_args_parser())
