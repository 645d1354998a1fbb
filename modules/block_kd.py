"""Block-wise knowledge distillation, as in the original, and the pieces the LUT build shares.

* `StagePlusProj`: in_proj (1x1 + bias, teacher_cin -> sampled CIN from the previous stage's *full* width
  list) -> elastic stage (full width and depth lists) -> out_proj (1x1 + bias, active width -> teacher_cout).
* `nsr_loss`: per (n, c), mean_hw (S - T)^2 / (unbiased var_hw(T) + eps), averaged. Normalised by the
  *teacher's* variance with an eps (the original divides by the student's, without eps, so the loss explodes
  as the student's variance nears 0).
* `FeatureCache`: teacher (stage input, stage output) per resolution for a fixed BN-calibration set and a
  fixed held-out set, computed once. Both use the evaluation transform: calibration images are train images
  (never held-out ones); calibrating on augmented crops and measuring on centre crops shifts the BN statistics,
  which penalises deeper sub-stages (more BN layers) and hid the size/NSR relation in the LUT.
* `train_step`: the sandwich step for many (stage, block) students at once: one teacher pass per batch and
  resolution feeds every student; 4 sub-stages per student (max @ max res, min @ min res, 2 random @ random
  res), gradients accumulated, ONE all-reduce for all students' gradients (and the stop flag), value
  clipping, optimizer step. Sub-stages are drawn from `random.Random` seeded by (seed, step, stage, block),
  so every DDP rank draws the same ones.
* `run_block_kd(args, phase)`: the driver behind ``train_block_kd.py`` (phase "fp32") and
  ``lsq_block_kd.py`` (phase "lsq").

Outputs per (stage X, block B) in ``<output_dir>/block_kd/<superspace>/stage{X}_{B}/``: ``checkpoint.pth``
(fp32) or ``lsq.pth`` (LSQ+), ``log.csv`` / ``lsq_log.csv`` (per epoch: train loss of the 4 sub-passes and
the held-out NSR of the max / min / random sub-stage; the row of epoch 0 is before training), ``net.txt``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import random
import signal
import time
import zlib
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Subset

from modules import dist
from modules.checkpoint import (atomic_save, atomic_write_text, build_checkpoint, load_checkpoint,
                                load_state_dict_strict)
from modules.encoding import format_substage
from modules.engine import AMP_MODES, amp_autocast, amp_grad_scaler, calibrate_bn, param_groups, warmup_cosine
from modules.lsq import PRESETS, quantizers, set_quant_mode
from modules.ops import DynamicConv2d
from modules.superspace import SEARCHABLE, SuperSpace, get_superspace
from modules.supernet import DynamicStage
from modules.teacher import StagedTeacher, resize

log = logging.getLogger("spaceevo.block_kd")

MODES = ("max", "min", "random", "random")  # the 4 sandwich sub-passes
EVAL_MODES = ("max", "min", "random")
DEFAULT_NSR_EPS = 1e-2
LOG_FIELDS = ("epoch", "step", "loss_max", "loss_min", "loss_random1", "loss_random2", "nsr_max", "nsr_min",
              "nsr_random", "lr", "seconds")
PHASES = {
    # phase: (checkpoint file, log file, default lr list)
    "fp32": ("checkpoint.pth", "log.csv", (0.005, 0.01, 0.01, 0.01, 0.01, 0.005)),
    "lsq": ("lsq.pth", "lsq_log.csv", (0.00125,) * 6),
}


# ------------------------------------------------------------------------------------------ selection
def check_selection(space: SuperSpace, stages: Sequence[int] | None, blocks: Sequence[int] | None
                    ) -> tuple[list[int], list[int]]:
    """Validated, sorted stage (1..6) and block (candidate index) lists; None means all."""
    n = len(space.candidates)
    stages = list(range(1, len(SEARCHABLE) + 1)) if not stages else sorted(set(int(s) for s in stages))
    blocks = list(range(n)) if blocks is None or len(blocks) == 0 else sorted(set(int(b) for b in blocks))
    bad = [s for s in stages if not 1 <= s <= len(SEARCHABLE)]
    if bad:
        raise ValueError(f"unknown stage index {bad[0]}: stages are 1..{len(SEARCHABLE)} (stage1..stage6)")
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        names = ", ".join(f"{i}={c.name}" for i, c in enumerate(space.candidates))
        raise ValueError(f"unknown block index {bad[0]} for superspace {space.name}: allowed {names}")
    return stages, blocks


def check_hw_list(space: SuperSpace, hw_list: Sequence[int] | None) -> tuple[int, ...]:
    if not hw_list:
        return tuple(space.block_kd_hw_list)
    bad = [r for r in hw_list if r not in space.block_kd_hw_list]
    if bad:
        raise ValueError(f"resolution {bad[0]} not in the block-KD resolutions of {space.name}: "
                         f"{list(space.block_kd_hw_list)}")
    return tuple(sorted(set(int(r) for r in hw_list)))


def stage_dir(output_dir: str | os.PathLike, superspace: str, stage: int, block: int) -> Path:
    return Path(output_dir) / "block_kd" / superspace / f"stage{stage}_{block}"


# ------------------------------------------------------------------------------------------ loss
def channels_last(t: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout: oneDNN's convolutions (forward and backward) run faster on CPU."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def nsr_per_sample(student: torch.Tensor, teacher: torch.Tensor, eps: float = DEFAULT_NSR_EPS) -> torch.Tensor:
    """NSR of each sample: mean over channels of mean_hw (S - T)^2 / (unbiased var_hw(T) + eps)."""
    if student.shape != teacher.shape:
        raise ValueError(f"NSR: student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
                         "differ in shape")
    if teacher.shape[2] * teacher.shape[3] < 2:
        raise ValueError(f"NSR needs at least 2 spatial positions, got {tuple(teacher.shape[2:])}")
    t = teacher.detach()
    err = (student - t).pow(2).mean((2, 3))
    var = t.var((2, 3), unbiased=True)
    return (err / (var + eps)).mean(1)


def nsr_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = DEFAULT_NSR_EPS) -> torch.Tensor:
    return nsr_per_sample(student, teacher, eps).mean()


# ------------------------------------------------------------------------------------------ student
@dataclass(frozen=True)
class SubStage:
    cin: int
    blocks: tuple  # ((k, w, e), ...)

    def __str__(self) -> str:
        return format_substage(list(self.blocks))


class StagePlusProj(nn.Module):
    """The block-KD student of searchable stage `stage` (1..6) with candidate block `block`."""

    def __init__(self, space: SuperSpace, stage: int, block: int, teacher_cin: int, teacher_cout: int):
        super().__init__()
        check_selection(space, [stage], [block])
        self.space, self.stage_idx, self.block_idx = space, stage, block
        self.stage_name = SEARCHABLE[stage - 1]
        self.stage_cfg = space.stage(self.stage_name)
        self.spec = space.candidates[block]
        self.in_list = tuple(space.prev_width_list(self.stage_name))
        self.teacher_cin, self.teacher_cout = int(teacher_cin), int(teacher_cout)
        c = self.stage_cfg
        self.in_proj = DynamicConv2d(self.teacher_cin, max(self.in_list), 1, bias=True)
        self.stage = DynamicStage(self.spec, self.in_list, c.width_list, c.depth_list, c.stride)
        self.out_proj = DynamicConv2d(max(c.width_list), self.teacher_cout, 1, bias=True)
        self.active_cin = max(self.in_list)
        self.sample(None, "max")

    @property
    def key(self) -> str:
        return f"stage{self.stage_idx}_{self.block_idx}"

    def meta(self) -> dict:
        return {"superspace": self.space.name, "stage": self.stage_idx, "block": self.block_idx,
                "block_name": self.spec.name, "teacher_cin": self.teacher_cin, "teacher_cout": self.teacher_cout}

    def set_active(self, sub: SubStage) -> None:
        self.active_cin = sub.cin
        self.stage.set_active(list(sub.blocks))

    def active_substage(self) -> SubStage:
        return SubStage(self.active_cin, tuple(self.stage.active_config()))

    def sample(self, rng: random.Random | None, mode: str = "random", window: int | None = None) -> SubStage:
        """Set and return a sub-stage: "max", "min" or "random" (uniform CIN over the previous stage's full
        list, depth, and per block kernel, width — within width window `window` if given — and expand)."""
        if mode not in ("max", "min", "random"):
            raise ValueError(f"sub-stage mode {mode!r}: expected max, min or random")
        if mode == "random" and rng is None:
            raise ValueError("random sub-stages need an explicit random.Random")
        pick = {"max": max, "min": min, "random": rng.choice if rng is not None else None}[mode]
        widths = self.stage_cfg.width_list if window is None else self.stage_cfg.window(window)
        cin = pick(self.in_list)
        depth = pick(self.stage_cfg.depth_list)
        blocks = tuple((pick(self.spec.kernel_list), pick(widths), pick(self.spec.expand_list)) for _ in range(depth))
        sub = SubStage(cin, blocks)
        self.set_active(sub)
        return sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.in_proj.active_out_channels = self.active_cin
        return self.out_proj(self.stage(self.in_proj(x)))

    def static_stage(self, sub: SubStage | None = None) -> DynamicStage:
        """The static sub-stage (no projections), architecture only (for MACs / params)."""
        sub = sub or self.active_substage()
        return DynamicStage.from_blocks(self.spec, sub.cin, list(sub.blocks), self.stage_cfg.stride)

    def block_configs(self, resolution: int) -> list[dict]:
        """Active blocks with their input size, for the latency predictor (as `SuperNet.block_configs`)."""
        hw = self.space.stage_input_hw(resolution, self.stage_name)
        cin, out = self.active_cin, []
        for b in self.stage.blocks[: self.stage.active_depth]:
            cfg = b.config(cin)
            cfg["hw"] = hw
            out.append(cfg)
            hw = math.ceil(hw / b.stride)
            cin = cfg["cout"]
        return out


def load_student(path: str | os.PathLike, space: SuperSpace, stage: int, block: int, teacher: StagedTeacher,
                 quant_preset: str | None = None) -> tuple[StagePlusProj, dict]:
    """A student from a block-KD checkpoint; LSQ+ checkpoints (phase "lsq") are switched to LSQ first.
    Raises one clear error when the file is missing or was trained for another stage / block / teacher."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"block-KD checkpoint {path} not found")
    ckpt = load_checkpoint(path)
    cin, cout = teacher.stage_channels[stage]
    model = StagePlusProj(space, stage, block, cin, cout)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not meta:
        raise ValueError(f"block-KD checkpoint {path}: no 'meta' entry (not written by train_block_kd.py)")
    want = model.meta()
    diff = [f"{k} {meta.get(k)!r} (expected {v!r})" for k, v in want.items() if meta.get(k) != v]
    if diff:
        raise ValueError(f"block-KD checkpoint {path} does not fit: {', '.join(diff)}")
    if ckpt.get("phase") == "lsq":
        set_quant_mode(model, "lsq", quant_preset or ckpt.get("quant_preset") or "ort")
    load_state_dict_strict(model, ckpt["model"], f"block-KD checkpoint {path}")
    return model, ckpt


# ------------------------------------------------------------------------------------------ features
class FeatureCache:
    """Teacher features of fixed image sets, per resolution and stage, computed once.

    ``calib[r][X]``: list of stage-X input batches (BN calibration); ``eval[r][X]``: list of
    (input, output) batches (held-out NSR).
    """

    def __init__(self):
        self.calib: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.eval: dict[int, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: StagedTeacher, calib_images: Iterable[torch.Tensor], eval_images: Iterable[torch.Tensor],
              hw_list: Sequence[int], stages: Sequence[int]) -> "FeatureCache":
        cache = cls()
        teacher.eval()
        calib_images = [channels_last(t) for t in calib_images]
        eval_images = [channels_last(t) for t in eval_images]
        for r in hw_list:
            cache.calib[r] = {x: [] for x in stages}
            cache.eval[r] = {x: [] for x in stages}
            for images in calib_images:
                feats = teacher.forward_stages(resize(images, r), stages)
                for x in stages:
                    cache.calib[r][x].append(feats[x][0])
            for images in eval_images:
                feats = teacher.forward_stages(resize(images, r), stages)
                for x in stages:
                    cache.eval[r][x].append(feats[x])
        return cache

    def num_eval_images(self) -> int:
        r = next(iter(self.eval))
        x = next(iter(self.eval[r]))
        return sum(t.shape[0] for t, _ in self.eval[r][x])


@torch.no_grad()
def measure_nsr(model: StagePlusProj, cache: FeatureCache, resolution: int, eps: float = DEFAULT_NSR_EPS,
                calibrate: bool = True) -> float:
    """BN-recalibrate the active sub-stage on the cached calibration inputs, then its mean NSR over the
    cached held-out images (summed over DDP ranks when a process group exists)."""
    x = model.stage_idx
    if calibrate:
        batches = cache.calib[resolution][x]
        calibrate_bn(model, batches, len(batches))
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for x_in, x_out in cache.eval[resolution][x]:
        per = nsr_per_sample(model(x_in), x_out, eps)
        total[0] += per.double().sum().item()  # total lives on the CPU, per on the model's device
        total[1] += per.numel()
    model.train(was_training)
    total = dist.all_reduce_sum(total)
    if total[1] == 0:
        raise ValueError("held-out NSR: no held-out images")
    return float(total[0] / total[1])


# ------------------------------------------------------------------------------------------ training
@dataclass
class Student:
    model: StagePlusProj
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    out_dir: Path
    epoch: int = 0  # next epoch to run
    batch_in_epoch: int = 0  # batches of `epoch` already done (resume after SIGTERM)
    step: int = 0
    loss_sums: tuple = (0.0, 0.0, 0.0, 0.0)  # train-loss sums of the batches done in `epoch` (for resume)
    loss_count: int = 0

    @property
    def key(self) -> str:
        return self.model.key


def sync_gradients(models: Sequence[nn.Module], stop: bool = False) -> bool:
    """Average the gradients of all `models` over DDP ranks in ONE all-reduce (the stop flag rides along).
    Returns True when any rank asked to stop. No-op without a process group."""
    if not dist.is_dist_avail_and_initialized():
        return stop
    grads = [p.grad for m in models for p in m.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([1.0 if stop else 0.0], dtype=torch.float32)])
    torch.distributed.all_reduce(flat)
    n = dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g) / n)
        offset += g.numel()
    return bool(flat[-1] > 0)


def train_step(students: Sequence[Student], teacher: StagedTeacher, images: torch.Tensor, hw_list: Sequence[int],
               step_seed: str, grad_clip_value: float | None, eps: float, stop: bool = False, amp: str = "off",
               scaler=None) -> tuple[dict[str, list[float]], bool]:
    """One sandwich step for every student on one batch; returns ({key: [4 losses]}, stop_any_rank).
    `amp`: autocast of the forward passes (`modules.engine.amp_autocast`); `scaler`: its GradScaler (fp16)."""
    rng = random.Random(f"{step_seed}-res")
    res = [max(hw_list), min(hw_list), rng.choice(hw_list), rng.choice(hw_list)]
    stages = sorted({s.model.stage_idx for s in students})
    images = channels_last(images)
    autocast = amp_autocast(amp, images.device)
    with torch.no_grad(), autocast:
        feats = {r: teacher.forward_stages(resize(images, r), stages) for r in sorted(set(res))}
    losses = {}
    for s in students:
        m = s.model
        m.train()
        srng = random.Random(f"{step_seed}-{m.key}")
        out = []
        for mode, r in zip(MODES, res):
            m.sample(srng, mode)
            x_in, x_out = feats[r][m.stage_idx]
            with amp_autocast(amp, images.device):
                pred = m(x_in)
            loss = nsr_loss(pred.float(), x_out.float(), eps)  # a variance ratio: float32
            (scaler.scale(loss) if scaler else loss).backward()
            out.append(loss.item())
        losses[s.key] = out
    stop = sync_gradients([s.model for s in students], stop)
    for s in students:
        if scaler:
            scaler.unscale_(s.optimizer)
        if grad_clip_value:
            torch.nn.utils.clip_grad_value_(s.model.parameters(), grad_clip_value)
        if scaler:
            scaler.step(s.optimizer)
        else:
            s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        s.step += 1
    if scaler:
        scaler.update()
    return losses, stop


def evaluate_student(model: StagePlusProj, cache: FeatureCache, hw_list: Sequence[int], seed: int,
                     eps: float) -> dict[str, float]:
    """Held-out NSR of the max (max res), min (min res) and one random sub-stage (random res; the same one in
    every evaluation of a run, so the numbers are comparable across epochs)."""
    rng = random.Random(f"{seed}-eval-{model.key}")
    out = {}
    for mode in EVAL_MODES:
        model.sample(rng, mode)
        r = {"max": max(hw_list), "min": min(hw_list)}.get(mode) or rng.choice(hw_list)
        out[mode] = measure_nsr(model, cache, r, eps)
    return out


@torch.no_grad()
def init_lsq_from_data(model: StagePlusProj, inputs: torch.Tensor, seed: int, max_samples: int = 64) -> int:
    """Initialise the LSQ+ scales of the quantizers from data: forward the max, min and random sub-stages
    until every quantizer is initialised. Returns the number left.

    Each forward is a BN calibration pass (BN on batch statistics): the checkpoint's running statistics
    belong to whichever sub-stage was evaluated last, and with them another sub-stage's activations can be
    off by orders of magnitude, which ruined the activation ranges (seen: a scale of 28, i.e. a range of 7000)."""
    was_training = model.training
    rng = random.Random(f"{seed}-lsq-init-{model.key}")
    # quantizers with learned state carry an `initialized` buffer (fixed-grid / pass-through ones do not)
    qs = [q for q in quantizers(model) if q.enabled and isinstance(getattr(q, "initialized", None), torch.Tensor)]
    for i in range(max_samples):
        model.sample(rng, ("max", "min")[i] if i < 2 else "random")
        calibrate_bn(model, [inputs], 1)
        if all(bool(q.initialized) for q in qs):
            break
    model.train(was_training)
    return sum(not bool(q.initialized) for q in qs)


_EARLY_STOP: list[int] = []  # SIGTERMs a --student_procs process got before its training loop


class _StopFlag:
    def __init__(self):
        self.set = bool(_EARLY_STOP)
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.set = True
            log.warning("got signal %d: saving checkpoints after this step, then exiting", signum)
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append_log(path: Path, row: dict) -> None:
    rows = _read_log(path) + [row]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in LOG_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _fmt(v) -> str:
    return "" if v is None or v == "" else f"{float(v):.4f}"


# ------------------------------------------------------------------------------------------ arguments
def add_block_kd_args(parser: argparse.ArgumentParser, phase: str) -> argparse.ArgumentParser:
    from modules.cli import add_common_args
    from modules.data import DEFAULT_DATA_DIR

    add_common_args(parser)
    fp32 = phase == "fp32"
    parser.add_argument("--superspace", default="tiny", help="mobilew | onnxw | tiny (default: %(default)s)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR,
                        help="ImageFolder root with train/ (and val/ for the tiny teacher); the default digits "
                             "set is written on first use (default: %(default)s)")
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="stages 1..6 to train (default: all)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help="candidate block indices to train (default: all)")
    add_block_ids_arg(parser, "train")
    parser.add_argument("--epochs", type=int, default=3 if fp32 else 1, help="(default: %(default)s)")
    parser.add_argument("--max_steps_per_epoch", type=int, default=None,
                        help="cap on batches per epoch (default: the whole train split)")
    parser.add_argument("--batch_size", type=int, default=64, help="train batch per process (default: %(default)s)")
    parser.add_argument("--eval_batch_size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--lr_list", type=float, nargs="+", default=list(PHASES[phase][2]),
                        help="Adam lr per stage 1..6, or one value for all (default: %(default)s)")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="(default: %(default)s)")
    parser.add_argument("--grad_clip_value", type=float, default=1.0,
                        help="element-wise gradient clipping, 0 = off (default: %(default)s)")
    parser.add_argument("--hw_list", type=int, nargs="+", default=None,
                        help="resolutions (default: the superspace's block_kd_hw_list)")
    parser.add_argument("--valid_size", type=int, default=256,
                        help="held-out images carved from train for the NSR evaluation (default: %(default)s)")
    parser.add_argument("--num_calib_batches", type=int, default=2,
                        help="train batches for BN re-calibration before each NSR evaluation (default: %(default)s)")
    parser.add_argument("--nsr_eps", type=float, default=DEFAULT_NSR_EPS,
                        help="eps added to the teacher variance in the NSR (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from {PHASES[phase][0]} of each (stage, block) when it exists")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (default: %(default)s)")
    parser.add_argument("--student_procs", type=int, default=1,
                        help="train the students in this many local processes of 1 thread each, every process a "
                             "disjoint share of the (stage, block) pairs: students are independent, so no gradient "
                             "is exchanged, and one-thread processes scale better over the cores than one process with "
                             "several threads on small students; not under torchrun (default: %(default)s)")
    parser.add_argument("--hflip", action="store_true", help="random horizontal flips (natural images)")
    parser.add_argument("--teacher_weights", default=None,
                        help="teacher weights: EfficientNet-B5 state dict (mobilew/onnxw; default: torchvision's "
                             "cache) or a tiny-teacher checkpoint (default: <output_dir>/block_kd/teacher/tiny/"
                             "checkpoint.pth, trained on --data_dir when missing)")
    parser.add_argument("--teacher_epochs", type=int, default=5,
                        help="epochs of the tiny teacher (default: %(default)s)")
    parser.add_argument("--amp", choices=AMP_MODES, default="off",
                        help="mixed precision of the teacher and student forward passes: bf16 (CPU or CUDA) or fp16 "
                             "(CUDA, with loss scaling); the NSR loss and LSQ+ fake-quant stay float32 (default: "
                             "%(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    if not fp32:
        parser.add_argument("--quant_preset", default="ort", choices=list(PRESETS),
                            help="LSQ+ preset (default: %(default)s)")
    _add_original_block_kd_names(parser)
    return parser


def add_block_ids_arg(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--block_ids stage1_0 stage3_2`` (alias ``--stage_list``, the original's name): exactly these (stage,
    block) pairs, instead of every pair of --stages x --blocks."""
    from modules.cli import add_aliases
    from modules.original_cli import block_id

    parser.add_argument("--block_ids", type=block_id, nargs="+", default=None, metavar="stageX_B",
                        help=f"(stage, block) pairs to {verb}, e.g. stage1_0 stage3_2 (default: --stages x --blocks)")
    add_aliases(parser, "--block_ids", "--stage_list")


def _add_original_block_kd_names(parser: argparse.ArgumentParser) -> None:
    """The original train_block_kd.py / lsq_block_kd.py names of our options."""
    from modules.cli import add_aliases
    from modules.original_cli import add_original_option, grandparent_of

    for ours, *theirs in (("--data_dir", "--dataset_path", "--dataset_dir", "--data_path"),
                          ("--epochs", "--num_epochs"), ("--batch_size", "--train_batch_size"),
                          ("--lr_list", "--learning_rate_list"), ("--teacher_weights", "--teacher_checkpoint_path"),
                          ("--seed", "--manual_seed"), ("--workers", "--num_workers"),
                          ("--no_progress", "--no-progress")):
        add_aliases(parser, ours, *theirs)
    add_original_option(parser, "--output_path", "output_dir", type=grandparent_of("block_kd"), metavar="DIR",
                        help="<output_dir>/block_kd/<superspace>, where the students' stageX_B dirs go")
    parser.add_argument("--inplace_distill_from_teacher", action="store_true",
                        help="every sub-stage learns from the teacher: always so here (the original without this "
                             "flag distilled the smaller sub-stages from the largest one)")


def selected_pairs(space: SuperSpace, stages, blocks, block_ids) -> list[tuple[int, int]]:
    """The (stage, block) pairs of a run: ``block_ids`` when given, else every pair of stages x blocks."""
    if not block_ids:
        stages, blocks = check_selection(space, stages, blocks)
        return [(x, b) for x in stages for b in blocks]
    if stages or blocks:
        raise ValueError("--block_ids (--stage_list) names the pairs itself: give it without --stages / --blocks")
    pairs = sorted(set((int(x), int(b)) for x, b in block_ids))
    for x, b in pairs:
        check_selection(space, [x], [b])
    return pairs


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size", "valid_size", "num_calib_batches"):
        v = getattr(args, name)
        if v is None or v < (0 if name == "epochs" else 1):
            raise ValueError(f"--{name} {v}: expected a {'non-negative' if name == 'epochs' else 'positive'} integer")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1:
        raise ValueError(f"--max_steps_per_epoch {args.max_steps_per_epoch}: expected a positive integer")
    if len(args.lr_list) not in (1, 6) or any(lr <= 0 for lr in args.lr_list):
        raise ValueError(f"--lr_list {args.lr_list}: expected 1 or 6 positive values (stage1..6)")
    if args.nsr_eps < 0:
        raise ValueError(f"--nsr_eps {args.nsr_eps}: expected >= 0")
    if args.student_procs < 1:
        raise ValueError(f"--student_procs {args.student_procs}: expected a positive integer")
    if args.student_procs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--student_procs > 1 starts its own local processes; under torchrun use --student_procs 1")


# ------------------------------------------------------------------------------------------ driver
def run_block_kd(args: argparse.Namespace, phase: str, shard: tuple[int, int] | None = None) -> dict:
    """Train (phase "fp32") or LSQ+-finetune (phase "lsq") every selected (stage, block) student jointly.
    Returns {key: {"before": {...}, "after": {...}}} (held-out NSR of max/min/random sub-stages).

    ``shard=(i, n)``: only the pairs i, i + n, ... (one of the ``--student_procs`` processes; the parent
    process trains the teacher beforehand and writes the summary afterwards)."""
    from modules.cli import seed_everything
    from modules.data import (build_dataset, build_loader, calib_batches, set_loader_epoch, split_holdout,
                              start_loader_at)

    if phase not in PHASES:
        raise ValueError(f"block-KD phase {phase!r}: expected fp32 or lsq")
    ckpt_name, log_name, _ = PHASES[phase]
    _check_args(args)
    space = get_superspace(args.superspace)
    all_pairs = selected_pairs(space, args.stages, args.blocks, args.block_ids)
    hw_list = check_hw_list(space, args.hw_list)
    root = Path(args.output_dir) / "block_kd" / space.name
    pairs = all_pairs if shard is None else all_pairs[shard[0]::shard[1]]
    if phase == "lsq":
        missing = [str(stage_dir(args.output_dir, space.name, x, b) / "checkpoint.pth") for x, b in pairs
                   if not (stage_dir(args.output_dir, space.name, x, b) / "checkpoint.pth").is_file()]
        if missing:
            raise FileNotFoundError(
                f"fp32 block-KD checkpoint(s) missing for LSQ+: {', '.join(missing[:4])}"
                + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                + f"; run train_block_kd.py --superspace {space.name} --output_dir {args.output_dir} first")

    if shard is None and args.student_procs > 1:
        return _run_student_procs(args, phase, space, all_pairs, hw_list, root)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is None and 1 < world <= len(all_pairs):
        return _run_student_ranks(args, phase, space, all_pairs, hw_list, root)
    info = dist.init_distributed_mode(args.device)
    device = info.device
    seed_everything(args.seed)
    t_start = time.time()
    data_dir, teacher = _setup_run(args, phase, space, hw_list, root, save_args=shard is None)
    teacher = teacher.to(device)
    if getattr(teacher, "val_acc", None):
        log.info("teacher %s: val top-1 %s", teacher.name,
                 ", ".join(f"{a:.2f}% @{r}px" for r, a in teacher.val_acc.items()))

    # data: train minus a held-out split (eval transforms) for the NSR evaluation
    size = max(hw_list)
    train_full = build_dataset(data_dir, "train", True, size, args.hflip)
    held_view = build_dataset(data_dir, "train", False, size)
    train_set, held = split_holdout(train_full, args.valid_size, args.seed, held_view)
    loader = build_loader(train_set, args.batch_size, True, args.workers, info.distributed, args.seed)
    steps_per_epoch = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    calib_loader = build_loader(Subset(held_view, train_set.indices), args.batch_size, True, args.workers,
                                info.distributed, args.seed + 1)
    calib_imgs = [b[0].to(device) for b in calib_batches(calib_loader, args.num_calib_batches)]
    eval_loader = build_loader(held, args.eval_batch_size, False, args.workers, info.distributed)
    eval_imgs = [b[0].to(device) for b in eval_loader]
    cache = FeatureCache.build(teacher, calib_imgs, eval_imgs, hw_list, sorted({x for x, _ in all_pairs}))
    log.info("%s block KD of %s: %d student(s) (%s), %d train images, %d steps/epoch, "
             "%d held-out images, resolutions %s, %d process(es)", phase, space.name, len(pairs),
             " ".join(f"stage{x}_{b}" for x, b in pairs),
             len(train_set), steps_per_epoch, len(held), list(hw_list), info.world_size)

    total_steps = max(1, args.epochs * steps_per_epoch)
    lrs = args.lr_list * 6 if len(args.lr_list) == 1 else args.lr_list
    students: list[Student] = []
    results: dict[str, dict] = {}
    for x, b in pairs:
        d = stage_dir(args.output_dir, space.name, x, b)
        cin, cout = teacher.stage_channels[x]
        # each student's initial weights depend on (seed, stage, block) only, not on which other students are
        # trained with it: --stages / --blocks selections and --student_procs shards train the same students
        torch.manual_seed(zlib.crc32(f"{args.seed}-stage{x}_{b}".encode()))
        model = StagePlusProj(space, x, b, cin, cout).to(device)
        resume = d / ckpt_name if args.resume and (d / ckpt_name).is_file() else None
        if phase == "lsq" and resume is None:
            fp32, ck = load_student(d / "checkpoint.pth", space, x, b, teacher)
            if ck.get("epoch", 0) < ck.get("args", {}).get("epochs", 0):
                log.warning("%s: fp32 checkpoint is from epoch %s of %s (incomplete run)", model.key,
                            ck.get("epoch"), ck.get("args", {}).get("epochs"))
            model.load_state_dict(fp32.state_dict())
            set_quant_mode(model, "lsq", args.quant_preset)
            left = init_lsq_from_data(model, cache.calib[max(hw_list)][x][0], args.seed)
            if left:
                log.info("%s: %d quantizer(s) not reached by the init sub-stages; they initialise on first use",
                         model.key, left)
        elif phase == "lsq":
            set_quant_mode(model, "lsq", args.quant_preset)
        opt = torch.optim.Adam(param_groups(model, args.weight_decay), lr=lrs[x - 1])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, 0))
        st = Student(model, opt, sched, d)
        if resume is not None:
            ck = load_checkpoint(resume)
            if ck.get("meta") != model.meta():
                raise ValueError(f"{resume}: trained for {ck.get('meta')}, not {model.meta()}")
            load_state_dict_strict(model, ck["model"], str(resume))
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["lr_scheduler"])
            st.epoch, st.batch_in_epoch, st.step = ck["epoch"], ck.get("batch_in_epoch", 0), ck.get("step", 0)
            if st.batch_in_epoch:
                st.loss_sums, st.loss_count = tuple(ck.get("loss_sums", (0.0,) * 4)), ck.get("loss_count", 0)
            log.info("%s: resumed from %s at epoch %d (+%d batches)", model.key, resume, st.epoch, st.batch_in_epoch)
        elif dist.is_main_process():
            d.mkdir(parents=True, exist_ok=True)
            if (d / log_name).exists():
                (d / log_name).unlink()
            atomic_write_text(d / "net.txt", str(model) + "\n")
        students.append(st)
    seed_everything(args.seed)  # augmentation draws from the global RNG: the same for any selection of students

    def save(st: Student) -> None:
        if dist.is_main_process():
            ck = build_checkpoint(st.model, st.optimizer, st.scheduler, epoch=st.epoch, step=st.step, args=args,
                                  meta=st.model.meta(), phase=phase, batch_in_epoch=st.batch_in_epoch,
                                  loss_sums=list(st.loss_sums), loss_count=st.loss_count,
                                  quant_preset=getattr(args, "quant_preset", None) if phase == "lsq" else None)
            atomic_save(ck, st.out_dir / ckpt_name)

    def log_eval(st: Student, nsr: dict, losses, seconds: float) -> None:
        if dist.is_main_process():
            row = {"epoch": st.epoch, "step": st.step, "nsr_max": _fmt(nsr["max"]), "nsr_min": _fmt(nsr["min"]),
                   "nsr_random": _fmt(nsr["random"]), "lr": f"{st.optimizer.param_groups[0]['lr']:.6g}",
                   "seconds": f"{seconds:.1f}"}
            if losses is not None:
                row.update({k: _fmt(v) for k, v in zip(LOG_FIELDS[2:6], losses)})
            _append_log(st.out_dir / log_name, row)

    # NSR before training (epoch 0 row)
    for st in students:
        if st.epoch == 0 and st.batch_in_epoch == 0:
            t0 = time.time()
            nsr = evaluate_student(st.model, cache, hw_list, args.seed, args.nsr_eps)
            log_eval(st, nsr, None, time.time() - t0)
            log.info("%s before: NSR max %.4f min %.4f random %.4f", st.key, nsr["max"], nsr["min"], nsr["random"])

    from tqdm import tqdm
    stopped = False
    amp_autocast(args.amp, device)  # an unusable --amp (fp16 on the CPU) fails here, before any step
    scaler = amp_grad_scaler(args.amp)
    with _StopFlag() as flag:
        for epoch in range(min([s.epoch for s in students] + [args.epochs]), args.epochs):
            active = [s for s in students if s.epoch == epoch]
            if not active:
                continue
            set_loader_epoch(loader, epoch)
            first = min(s.batch_in_epoch for s in active)  # resumed mid-epoch: the batches all did are not loaded
            start_loader_at(loader, first)
            for s in active:
                if s.batch_in_epoch == 0:
                    s.loss_sums, s.loss_count = (0.0,) * 4, 0
            t0 = time.time()
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"{phase} epoch {epoch + 1}/{args.epochs}",
                       disable=args.no_progress or not dist.is_main_process(), unit="batch", leave=False)
            for bi, (images, _) in enumerate(loader, start=first):
                if bi >= steps_per_epoch:
                    break
                bar.update(1)
                stepping = [s for s in active if bi >= s.batch_in_epoch]
                if not stepping:
                    continue
                losses, stop = train_step(stepping, teacher, images.to(device), hw_list,
                                          f"{args.seed}-{epoch * steps_per_epoch + bi}",
                                          args.grad_clip_value, args.nsr_eps, flag.set, args.amp, scaler)
                for s in stepping:
                    s.batch_in_epoch = bi + 1
                    s.loss_sums = tuple(a + v for a, v in zip(s.loss_sums, losses[s.key]))
                    s.loss_count += 1
                bar.set_postfix(loss=f"{sum(sum(v) for v in losses.values()) / (4 * len(losses)):.4f}")
                if stop:
                    stopped = True
                    break
            bar.close()
            if stopped:
                for s in active:
                    save(s)
                log.warning("stopped by signal in epoch %d: checkpoints saved; run again with --resume", epoch + 1)
                break
            train_seconds = time.time() - t0
            for s in active:
                mean = [dist.all_reduce_mean(v / max(1, s.loss_count)) for v in s.loss_sums]
                s.epoch, s.batch_in_epoch, s.loss_sums, s.loss_count = epoch + 1, 0, (0.0,) * 4, 0
                t1 = time.time()
                nsr = evaluate_student(s.model, cache, hw_list, args.seed, args.nsr_eps)
                log_eval(s, nsr, mean, train_seconds / len(active) + time.time() - t1)
                save(s)
                log.info("%s epoch %d: train loss (max/min/rand/rand) %s; held-out NSR max %.4f min %.4f random %.4f",
                         s.key, epoch + 1, " ".join(f"{v:.4f}" for v in mean), nsr["max"], nsr["min"], nsr["random"])
            log.info("epoch %d/%d done in %.0f s", epoch + 1, args.epochs, time.time() - t0)

    if dist.is_main_process():
        results = _read_results(args.output_dir, space, pairs, log_name)
        if shard is None and results:
            _write_summary(root, phase, space, pairs, results)
            log.info("%s block KD %s after %.0f s (summary: %s)", phase, "stopped" if stopped else "finished",
                     time.time() - t_start, root / f"{phase}_summary.csv")
    dist.barrier()
    dist.destroy_distributed()
    if stopped:
        return {"stopped": True, **results}
    return results


def _setup_run(args, phase: str, space: SuperSpace, hw_list, root: Path, save_args: bool = True):
    """Logging (+ args.yaml), the dataset dir and the teacher (the tiny one trained and cached when missing)."""
    from modules.cli import save_run_info, setup_logging
    from modules.data import prepare_default_data
    from modules.teacher import get_teacher

    run_name = f"{'train' if phase == 'fp32' else 'lsq'}_block_kd"
    setup_logging(root / "logs", run_name)
    if save_args:
        save_run_info(args, root / "logs" / run_name)
    data_dir = prepare_default_data(args.data_dir)
    teacher = get_teacher(space, args.output_dir, args.teacher_weights, data_dir, hw_list=hw_list,
                          train_kwargs={"epochs": args.teacher_epochs, "seed": args.seed, "workers": args.workers,
                                        "hw_list": hw_list})
    return data_dir, teacher


def _read_results(output_dir, space: SuperSpace, pairs, log_name: str) -> dict:
    """{key: {"before", "after", "epochs"}} from the students' logs (first row: before training)."""
    results = {}
    for x, b in pairs:
        rows = _read_log(stage_dir(output_dir, space.name, x, b) / log_name)
        if rows:
            results[f"stage{x}_{b}"] = {"before": {m: float(rows[0][f"nsr_{m}"]) for m in EVAL_MODES},
                                        "after": {m: float(rows[-1][f"nsr_{m}"]) for m in EVAL_MODES},
                                        "epochs": int(rows[-1]["epoch"])}
    return results


def _write_summary(root: Path, phase: str, space: SuperSpace, pairs, results: dict) -> None:
    lines = ["stage,block,block_name,epochs," + ",".join(f"nsr_{m}_{w}" for w in ("before", "after")
                                                        for m in EVAL_MODES)]
    for x, b in pairs:
        r = results.get(f"stage{x}_{b}")
        if r:
            lines.append(f"{x},{b},{space.candidates[b].name},{r['epochs']},"
                         + ",".join(f"{r[w][m]:.4f}" for w in ("before", "after") for m in EVAL_MODES))
    atomic_write_text(root / f"{phase}_summary.csv", "\n".join(lines) + "\n")


def _student_proc(cfg: dict, phase: str, shard: int, num_shards: int, result_path: str) -> None:
    """One --student_procs process: train its share of the students on 1 thread, write the outcome as JSON."""
    import json
    import sys

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_STOP.append(signum))  # stop after 1 step, saved
    try:
        out = run_block_kd(argparse.Namespace(**cfg), phase, shard=(shard, num_shards))
        atomic_write_text(result_path, json.dumps({"stopped": bool(out.get("stopped"))}))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # reported by the parent, in one line
        atomic_write_text(result_path, json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)


def _run_student_procs(args, phase: str, space: SuperSpace, pairs, hw_list, root: Path) -> dict:
    """Train the students in `args.student_procs` spawned processes (pairs i::n each); SIGTERM is passed on
    to them (they save their checkpoints and stop). The teacher is trained here first, once."""
    import json
    import multiprocessing as mp
    import tempfile

    t_start = time.time()
    _setup_run(args, phase, space, hw_list, root)  # trains and caches the tiny teacher when missing
    n = min(args.student_procs, len(pairs))
    log.info("%s block KD of %d student(s) in %d processes of 1 thread", phase, len(pairs), n)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"shard{i}.json") for i in range(n)]
        procs = [ctx.Process(target=_student_proc, args=(vars(args), phase, i, n, paths[i])) for i in range(n)]
        for p in procs:
            p.start()

        terminated = []

        def forward(signum, frame):
            log.warning("got signal %d: passing it on to the %d student processes", signum, n)
            terminated.append(signum)
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)
        old = signal.signal(signal.SIGTERM, forward)
        try:
            for p in procs:
                p.join()
        finally:
            signal.signal(signal.SIGTERM, old)
        outcomes = [json.loads(Path(f).read_text()) if os.path.isfile(f) else None for f in paths]
    for i, (p, o) in enumerate(zip(procs, outcomes)):
        if o is None and terminated:
            continue  # stopped by the signal before its training loop (it saves at the next step otherwise)
        if o is None or "error" in o:
            what = o["error"] if o else f"exit code {p.exitcode} without a result"
            raise RuntimeError(f"block-KD student process {i + 1}/{n} failed: {what}")
    stopped = bool(terminated) or any(o["stopped"] for o in outcomes if o)
    results = _read_results(args.output_dir, space, pairs, PHASES[phase][1])
    if results:
        _write_summary(root, phase, space, pairs, results)
    log.info("%s block KD %s after %.0f s (summary: %s)", phase, "stopped" if stopped else "finished",
             time.time() - t_start, root / f"{phase}_summary.csv")
    return {"stopped": True, **results} if stopped else results


# A rank may finish its students hours before another: the ranks only meet at the start and at the end, so
# the group's timeout must outlast the longest imbalance.
_STUDENT_RANKS_TIMEOUT = timedelta(days=7)


def _run_student_ranks(args, phase: str, space: SuperSpace, pairs, hw_list, root: Path) -> dict:
    """Under torchrun with at least as many students as ranks: rank r trains the students r, r + N, ... on all
    the data, as a --student_procs process does, so each student ends exactly as in one process. Rank 0 trains
    the (tiny) teacher first and writes the summary once every rank is done."""
    info = dist.init_distributed_mode(args.device, backend="gloo", timeout=_STUDENT_RANKS_TIMEOUT)
    t_start = time.time()
    try:
        # every rank: rank 0 trains and caches the tiny teacher when missing, the others wait for it
        _setup_run(args, phase, space, hw_list, root)
        log.info("%s block KD of %d student(s) spread over %d ranks", phase, len(pairs), info.world_size)
        with dist.rank_local():
            out = run_block_kd(args, phase, shard=(info.rank, info.world_size))
        stopped = any(dist.all_gather_object(bool(out.get("stopped"))))
        results = _read_results(args.output_dir, space, pairs, PHASES[phase][1])
        if info.rank == 0 and results:
            _write_summary(root, phase, space, pairs, results)
            log.info("%s block KD %s after %.0f s (summary: %s)", phase, "stopped" if stopped else "finished",
                     time.time() - t_start, root / f"{phase}_summary.csv")
    finally:
        dist.destroy_distributed()
    return {"stopped": True, **results} if stopped else results


# ------------------------------------------------------------------------------------------ LUT build
def lut_jobs(space: SuperSpace, pairs: Sequence[tuple[int, int]], windows: Sequence[int] | None
             ) -> list[tuple[int, int, int]]:
    """(stage, block, window) of every LUT file to build for the (stage, block) `pairs`; `windows` filters the
    window indices."""
    jobs = []
    for x, b in pairs:
        n = space.stage(SEARCHABLE[x - 1]).num_windows
        ws = range(n) if windows is None or len(windows) == 0 else [w for w in windows if 0 <= w < n]
        jobs += [(x, b, w) for w in ws]
    if not jobs:
        allowed = {f"stage{x}": space.stage(SEARCHABLE[x - 1]).num_windows for x in sorted({x for x, _ in pairs})}
        raise ValueError(f"no LUT file selected: window indices {list(windows or [])} are out of range "
                         f"(windows per stage: {allowed})")
    return jobs


def make_latency_fn(name: str, superspace: str, table_dir: str | None = None):
    """(fn(model, resolution) -> ms, description). "none" returns 0.0 (and says so); other names use
    `modules.latency.predictor.load_predictor(name, superspace, table_dir)`: the sub-stage's share of a
    network's latency = slope * sum of its blocks (the intercept belongs to the whole network)."""
    if name in (None, "", "none"):
        return (lambda model, r: 0.0), "none (latency column = 0.0)"
    try:
        from modules.latency.predictor import load_predictor
    except ImportError as e:
        raise ValueError(f"--latency_predictor {name}: modules.latency is not available ({e}); "
                         "use --latency_predictor none") from None
    pred = load_predictor(name, superspace, table_dir)
    if hasattr(pred, "blocks_sum") and hasattr(pred, "correction"):
        slope = float(pred.correction[0])
        return (lambda model, r: slope * pred.blocks_sum(model.block_configs(r))), f"{name} (slope {slope:.3f})"
    return (lambda model, r: float(pred.predict_blocks(model.block_configs(r)))), name


def lut_resolutions(rng: random.Random, hw_list: Sequence[int], n: int) -> list[int]:
    """n resolutions, stratified: each run of len(hw_list) rows is a random permutation of hw_list, so every
    resolution is equally likely for each row and every file with n >= len(hw_list) rows covers all of them
    (the space search needs rows at every resolution)."""
    out = []
    while len(out) < n:
        order = list(hw_list)
        rng.shuffle(order)
        out += order
    return out[:n]


def lut_row(model: StagePlusProj, cache: FeatureCache, rng: random.Random, window: int, resolution: int,
            eps: float, latency_fn, count_cache: dict) -> tuple:
    """Sample one sub-stage (widths in `window`) and measure it at `resolution`; returns the LUT row as a tuple
    for `modules.lut.format_lut_row`: (sub_stage, cin, hw, nsr, MMACs, Mparams, latency_ms)."""
    from modules.counter import count_macs, count_params

    sub = model.sample(rng, "random", window)
    r = resolution
    hw = model.space.stage_input_hw(r, model.stage_name)
    nsr = measure_nsr(model, cache, r, eps)
    key = (sub.cin, sub.blocks)
    if key not in count_cache:
        static = model.static_stage(sub)
        count_cache[key] = (static, count_params(static) / 1e6, {})
    static, mparams, macs = count_cache[key]
    if hw not in macs:
        macs[hw] = count_macs(static, (1, sub.cin, hw, hw)) / 1e6
    return str(sub), sub.cin, hw, nsr, macs[hw], mparams, float(latency_fn(model, r))


def build_lut_shard(cfg: dict, shard: int, num_shards: int, threads: int | None = None) -> dict:
    """Build the LUT files of shard `shard` of `num_shards` (jobs i with i % num_shards == shard).
    `cfg`: plain dict of eval_block_kd.py's arguments. No collectives, so any sharding works.
    Returns {"files": n, "skipped": n, "rows": n, "seconds": s}."""
    from tqdm import tqdm

    from modules.data import build_dataset, build_loader, calib_batches, split_holdout
    from modules.lut import format_lut_row, lut_file_path, read_lut_file, write_lut_file
    from modules.teacher import get_teacher

    if threads:  # a --workers process
        import threading

        torch.set_num_threads(threads)
        tqdm.set_lock(threading.RLock())  # tqdm's default lock holds a multiprocessing semaphore that leaks here
    a = argparse.Namespace(**cfg)
    space = get_superspace(a.superspace)
    hw_list = check_hw_list(space, a.hw_list)
    lut_name = space.name + ("_fp32" if a.fp32_mode else "")
    lut_dir = a.lut_dir or os.path.join(a.output_dir, "lut")
    ckpt_name = "checkpoint.pth" if a.fp32_mode else "lsq.pth"
    jobs = lut_jobs(space, selected_pairs(space, a.stages, a.blocks, a.block_ids), a.windows)[shard::num_shards]
    todo, skipped = [], 0
    for x, b, w in jobs:
        path = lut_file_path(lut_dir, lut_name, x, b, w)
        ckpt = stage_dir(a.output_dir, space.name, x, b) / ckpt_name
        if os.path.isfile(path) and not (ckpt.is_file() and ckpt.stat().st_mtime > os.path.getmtime(path)):
            try:  # complete (N valid rows) and newer than its checkpoint: keep
                if len(read_lut_file(path, space, x, b, w)) == a.num_samples:
                    skipped += 1
                    continue
            except ValueError:
                pass
        todo.append((x, b, w))
    stats = {"files": 0, "skipped": skipped, "rows": 0, "seconds": 0.0}
    if not todo:
        return stats
    missing = sorted({str(stage_dir(a.output_dir, space.name, x, b) / ckpt_name) for x, b, _ in todo
                      if not (stage_dir(a.output_dir, space.name, x, b) / ckpt_name).is_file()})
    if missing:
        raise FileNotFoundError(f"block-KD checkpoint(s) missing for the LUT: {', '.join(missing[:4])}"
                                + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                                + f"; run {'train' if a.fp32_mode else 'lsq'}_block_kd.py first")
    device = dist.local_device(getattr(a, "device", "cpu"))
    teacher = get_teacher(space, a.output_dir, a.teacher_weights, train_if_missing=False, hw_list=hw_list).to(device)
    latency_fn, lat_desc = make_latency_fn(a.latency_predictor, space.name, a.latency_table_dir)

    # fixed calibration batches (train augmentation, seeded) and held-out images (eval transform); the held-out
    # split is a prefix of block KD's (same seed, smaller or equal size), so it was never trained on
    size = max(hw_list)
    train_full = build_dataset(a.data_dir, "train", True, size)
    held_view = build_dataset(a.data_dir, "train", False, size)
    train_set, held = split_holdout(train_full, a.valid_size, a.seed, held_view)
    calib_loader = build_loader(Subset(held_view, train_set.indices), a.calib_batch_size, True, 0, False, a.seed + 1)
    calib_imgs = [bt[0].to(device) for bt in calib_batches(calib_loader, a.num_calib_batches)]
    eval_imgs = [bt[0].to(device) for bt in build_loader(held, a.eval_batch_size, False, 0)][:a.max_eval_batches]
    cache = FeatureCache.build(teacher, calib_imgs, eval_imgs, hw_list, sorted({x for x, _, _ in todo}))

    t0 = time.time()
    states: dict[tuple[int, int], tuple[StagePlusProj, dict]] = {}
    count_cache: dict = {}
    bar = tqdm(total=len(todo) * a.num_samples, desc=f"LUT shard {shard + 1}/{num_shards}", unit="row",
               disable=a.no_progress, position=shard if num_shards > 1 else None, leave=num_shards == 1)
    for x, b, w in todo:
        if (x, b) not in states:
            model, ck = load_student(stage_dir(a.output_dir, space.name, x, b) / ckpt_name, space, x, b, teacher)
            model.to(device)
            states[(x, b)] = (model, {k: v.clone() for k, v in model.state_dict().items()})
            cargs = ck.get("args", {})
            if cargs.get("seed", a.seed) != a.seed or cargs.get("valid_size", a.valid_size) < a.valid_size:
                log.warning("%s: trained with seed %s / valid_size %s; with seed %s / valid_size %s the LUT's held-"
                            "out images may overlap the training images", model.key, cargs.get("seed"),
                            cargs.get("valid_size"), a.seed, a.valid_size)
        model, state = states[(x, b)]
        model.load_state_dict(state)  # every file starts from the checkpoint: reproducible under any sharding
        rng = random.Random(f"lut-{a.seed}-stage{x}_{b}_{w}")
        rows = []
        for r in lut_resolutions(random.Random(f"lut-{a.seed}-stage{x}_{b}_{w}-res"), hw_list, a.num_samples):
            rows.append(format_lut_row(*lut_row(model, cache, rng, w, r, a.nsr_eps, latency_fn, count_cache)))
            bar.update(1)
        write_lut_file(lut_file_path(lut_dir, lut_name, x, b, w), rows)
        stats["files"] += 1
        stats["rows"] += len(rows)
        if len(count_cache) > 4096:
            count_cache.clear()
    bar.close()
    stats["seconds"] = time.time() - t0
    stats["latency"] = lat_desc
    return stats
