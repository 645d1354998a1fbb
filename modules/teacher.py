"""Block-KD teachers: a classifier split as stem, stage0..stage6 and head.

Student stage X (1..6) of a superspace distils teacher stage X: its input is the teacher's *input* to
that stage, its target the teacher's output. Two teachers:

* ``mobilew`` / ``onnxw``: torchvision's EfficientNet-B5 (``features[0]`` = stem 3->48, ``features[1..7]``
  = stage0..stage6 with outputs 24/40/64/128/176/304/512, ``features[8]`` + pool + classifier = head),
  with weights from ``--teacher_weights PATH`` or torchvision's cache
  (``<torch.hub.get_dir()>/checkpoints/efficientnet_b5_lukemelas-1a07897c.pth``). Nothing is downloaded.
* ``tiny``: a small residual convnet whose strides follow the tiny superspace, trained by the pipeline
  on the embedded digits data (``train_tiny_teacher``) and cached at
  ``<output_dir>/block_kd/teacher/tiny/checkpoint.pth``.

    teacher = get_teacher("tiny", output_dir="./checkpoints", data_dir="./checkpoints/data/digits")
    x_in, x_out = teacher.forward_to_stage(images, 3)
    feats = teacher.forward_stages(images, stages=(1, 2, 3))   # {X: (input, output)} in one pass
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import dist
from modules.checkpoint import atomic_save, load_checkpoint, load_state_dict_strict
from modules.superspace import SEARCHABLE, STAGE_NAMES, SuperSpace, get_superspace

log = logging.getLogger("spaceevo.teacher")

NUM_STAGES = 6  # distilled stages 1..6
EFFNET_B5_FILE = "efficientnet_b5_lukemelas-1a07897c.pth"
EFFNET_B5_URL = "https://download.pytorch.org/models/" + EFFNET_B5_FILE
# the original's EfficientNet-B5 split: stem 48, stage0..stage6 outputs
EFFNET_B5_CHANNELS = (48, 24, 40, 64, 128, 176, 304, 512)
TINY_TEACHER_ARCH = "tiny_convnet"


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bicubic resize to resolution x resolution (no-op when already that size), as the supernet does."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False)


class StagedTeacher(nn.Module):
    """``stem`` -> ``stages[0..6]`` (stage0..stage6) -> ``head`` (logits). Student stage X <-> ``stages[X]``."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module, name: str):
        super().__init__()
        if len(stages) != NUM_STAGES + 1:
            raise ValueError(f"teacher {name}: needs 7 stages (stage0..stage6), got {len(stages)}")
        self.stem, self.stages, self.head, self.name = stem, nn.ModuleList(stages), head, name
        self.stage_channels: dict[int, tuple[int, int]] = {}  # X -> (cin, cout), set by check_teacher
        # optional per-resolution BN statistics {resolution: {buffer name: tensor}}, used in eval mode
        self.bn_stats: dict[int, dict[str, torch.Tensor]] = {}
        self._bn_resolution: int | None = None

    def set_bn_stats(self, bn_stats: dict) -> None:
        """Per-resolution BN running stats (the tiny teacher's are calibrated per resolution after training)."""
        self.bn_stats = {int(r): dict(v) for r, v in bn_stats.items()}
        self._bn_resolution = None

    def _select_bn(self, x: torch.Tensor) -> None:
        r = int(x.shape[-1])
        if self.training:
            self._bn_resolution = None  # training mode updates the running buffers
            return
        if not self.bn_stats or r == self._bn_resolution:
            return
        stats = self.bn_stats.get(r)
        if stats is None:
            raise ValueError(f"teacher {self.name} has BN statistics for resolutions {sorted(self.bn_stats)}, "
                             f"not for {r}")
        buffers = dict(self.named_buffers())
        with torch.no_grad():
            for k, v in stats.items():
                buffers[k].copy_(v)
        self._bn_resolution = r

    def forward_to_stage(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of teacher stage i (1..6) for images x."""
        return self.forward_stages(x, (i,))[i]

    def forward_stages(self, x: torch.Tensor, stages: Iterable[int] | None = None
                       ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{i: (input, output)} for every i in `stages` (default 1..6), in one pass stopping after the last."""
        want = sorted(set(range(1, NUM_STAGES + 1) if stages is None else stages))
        for i in want:
            if not 1 <= i <= NUM_STAGES:
                raise ValueError(f"teacher stage {i} not in 1..{NUM_STAGES}")
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not want:
            return out
        self._select_bn(x)
        x = self.stages[0](self.stem(x))
        for i in range(1, want[-1] + 1):
            y = self.stages[i](x)
            if i in want:
                out[i] = (x, y)
            x = y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._select_bn(x)
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return self.head(x)


# ------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def check_teacher(teacher: StagedTeacher, space: SuperSpace, hw_list: Sequence[int] | None = None,
                  expected_channels: Sequence[int] | None = None) -> dict[int, tuple[int, int]]:
    """Check that teacher stage X's input / output sizes match the superspace's stage X at every resolution.

    Sets and returns ``teacher.stage_channels`` = {X: (cin, cout)}. ``expected_channels``: optional
    (stem, stage0..stage6) output widths to assert. Raises one ValueError naming stage, resolution and sizes.
    """
    hw_list = tuple(hw_list or space.block_kd_hw_list)
    was_training = teacher.training
    teacher.eval()
    p = next(teacher.parameters())
    channels: dict[int, tuple[int, int]] = {}
    try:
        for r in hw_list:
            x = torch.zeros(1, space.cin, r, r, dtype=p.dtype, device=p.device)
            if teacher.bn_stats and r not in teacher.bn_stats:
                raise ValueError(f"teacher {teacher.name} has BN statistics for resolutions "
                                 f"{sorted(teacher.bn_stats)}, not for {r} (superspace {space.name})")
            h = teacher.stem(x)
            widths = [h.shape[1]]
            h = teacher.stages[0](h)
            widths.append(h.shape[1])
            for i in range(1, NUM_STAGES + 1):
                name = SEARCHABLE[i - 1]
                want_in = space.stage_input_hw(r, name)
                want_out = space.stage_input_hw(r, STAGE_NAMES[STAGE_NAMES.index(name) + 1])
                y = teacher.stages[i](h)
                for what, t, want in (("input", h, want_in), ("output", y, want_out)):
                    if t.shape[-1] != want or t.shape[-2] != want:
                        raise ValueError(
                            f"teacher {teacher.name} does not fit superspace {space.name}: stage{i} {what} is "
                            f"{'x'.join(map(str, t.shape[1:]))} at resolution {r}, the superspace expects "
                            f"{want}x{want} (strides {[s.stride for s in space.stages[:8]]})")
                cin_cout = (h.shape[1], y.shape[1])
                if channels.setdefault(i, cin_cout) != cin_cout:
                    raise ValueError(f"teacher {teacher.name}: stage{i} channels change with resolution")
                widths.append(y.shape[1])
                h = y
            if expected_channels is not None and tuple(widths) != tuple(expected_channels):
                raise ValueError(f"teacher {teacher.name}: stem/stage0..stage6 widths {tuple(widths)}, expected "
                                 f"{tuple(expected_channels)}")
    finally:
        teacher.train(was_training)
    teacher.stage_channels = channels
    return channels


# ------------------------------------------------------------------------------------ EfficientNet-B5
def effnet_b5_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / EFFNET_B5_FILE


def _state_dict_from(obj, path) -> dict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"teacher weights {path}: expected a state dict, got {type(obj).__name__}")


class _Head(nn.Module):
    def __init__(self, conv: nn.Module, classifier: nn.Module):
        super().__init__()
        self.conv, self.classifier = conv, classifier

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


def efficientnet_b5_teacher(weights: str | os.PathLike | None = None, load: bool = True) -> StagedTeacher:
    """torchvision EfficientNet-B5 split into stem / stage0..6 / head, weights from `weights` or the cache.

    `load=False` builds it with random weights (tests, shape checks). Never downloads.
    """
    from torchvision.models import efficientnet_b5

    path = None
    if load:
        path = Path(weights) if weights else effnet_b5_cache_path()
        if not path.is_file():
            where = f"--teacher_weights {path} does not exist" if weights else f"no file at {path}"
            raise FileNotFoundError(
                f"EfficientNet-B5 teacher weights not found ({where}). Provide a torchvision efficientnet_b5 "
                f"state dict with --teacher_weights PATH, or put {EFFNET_B5_FILE} (from {EFFNET_B5_URL}) into "
                f"{effnet_b5_cache_path().parent}; nothing is downloaded at run time")
    net = efficientnet_b5(weights=None)
    if path is not None:
        load_state_dict_strict(net, _state_dict_from(load_checkpoint(path), path), f"teacher weights {path}")
    f = net.features
    teacher = StagedTeacher(f[0], list(f[1:8]), _Head(f[8], net.classifier), "efficientnet_b5")
    return teacher.eval()


# ------------------------------------------------------------------------------------ tiny teacher
class _ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _ResBlock(nn.Module):
    """conv3x3(s)-BN-ReLU-conv3x3-BN + shortcut; linear output (like MBConv's projection), so stage
    outputs have no dead (constant) channels."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(_ConvBN(cin, cout, 3, stride), _ConvBN(cout, cout, 3, 1, act=False))
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else _ConvBN(cin, cout, 1, stride, act=False)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def tiny_teacher_arch(space: SuperSpace) -> dict:
    """Architecture of the tiny teacher: strides from the superspace (first_conv, stage0..stage6)."""
    return {"arch": TINY_TEACHER_ARCH, "widths": [8, 8, 32, 48, 64, 96, 112, 128], "depths": [1] * 7,
            "strides": [s.stride for s in space.stages[:8]], "head_width": 128, "num_classes": space.num_classes,
            "cin": space.cin}


def build_tiny_teacher(arch: dict) -> StagedTeacher:
    if arch.get("arch") != TINY_TEACHER_ARCH:
        raise ValueError(f"teacher arch {arch.get('arch')!r}: expected {TINY_TEACHER_ARCH!r}")
    w, d, s = arch["widths"], arch["depths"], arch["strides"]
    stem = _ConvBN(arch["cin"], w[0], 3, s[0])
    stages = []
    for i in range(7):
        stages.append(nn.Sequential(*[_ResBlock(w[i] if j == 0 else w[i + 1], w[i + 1], s[i + 1] if j == 0 else 1)
                                      for j in range(d[i])]))
    head = nn.Sequential(nn.ReLU(), _ConvBN(w[-1], arch["head_width"], 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(arch["head_width"], arch["num_classes"]))
    return StagedTeacher(stem, stages, head, TINY_TEACHER_ARCH)


def tiny_teacher_path(output_dir: str | os.PathLike, superspace: str = "tiny") -> Path:
    return Path(output_dir) / "block_kd" / "teacher" / superspace / "checkpoint.pth"


def load_tiny_teacher(path: str | os.PathLike) -> tuple[StagedTeacher, dict]:
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "model" not in ckpt:
        raise ValueError(f"teacher checkpoint {path}: expected a dict with 'arch' and 'model' (written by "
                         "train_teacher.py)")
    teacher = build_tiny_teacher(ckpt["arch"])
    load_state_dict_strict(teacher, ckpt["model"], f"teacher checkpoint {path}")
    if ckpt.get("bn_stats"):
        teacher.set_bn_stats(ckpt["bn_stats"])
    return teacher.eval(), ckpt


def train_tiny_teacher(space: SuperSpace, data_dir: str | os.PathLike, out_path: str | os.PathLike, epochs: int = 5,
                       batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
                       workers: int = 0, max_steps_per_epoch: int | None = None,
                       hw_list: Sequence[int] | None = None, calib_images: int = 512) -> dict:
    """Train the tiny teacher on an ImageFolder (train split) at random resolutions of `hw_list`, then
    calibrate BN statistics per resolution (`calib_images` train images, eval transform) and measure the val
    top-1 per resolution; write ``out_path`` atomically. Returns the checkpoint dict (``val_acc``: % per
    resolution). Runs on the calling process only (no collectives), so rank 0 can train it under DDP."""
    from modules.data import build_dataset, build_loader, set_loader_epoch

    hw_list = tuple(hw_list or space.block_kd_hw_list)
    torch.manual_seed(seed)
    arch = tiny_teacher_arch(space)
    model = build_tiny_teacher(arch)
    size = max(hw_list)
    train_loader = build_loader(build_dataset(data_dir, "train", True, size), batch_size, True, workers, seed=seed)
    steps = len(train_loader) if max_steps_per_epoch is None else min(len(train_loader), max_steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = random.Random(f"teacher-{seed}")
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        set_loader_epoch(train_loader, epoch)
        seen, correct, loss_sum = 0, 0, 0.0
        for b, (images, labels) in enumerate(train_loader):
            if b >= steps:
                break
            logits = model(resize(images, rng.choice(hw_list)))
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            loss_sum += loss.item() * labels.numel()
        log.info("teacher epoch %d/%d: loss %.4f, train top-1 %.2f%% (%.0f s)", epoch + 1, epochs,
                 loss_sum / max(1, seen), 100.0 * correct / max(1, seen), time.time() - t0)

    # per-resolution BN statistics: the statistics of 32 px and 64 px digits differ too much to share
    calib_set = build_dataset(data_dir, "train", False, size)
    pick = torch.randperm(len(calib_set), generator=torch.Generator().manual_seed(seed))[:calib_images]
    calib = [im for im, _ in build_loader(torch.utils.data.Subset(calib_set, pick.tolist()), 128, False, workers)]
    calib = torch.cat(calib)  # a random (class-balanced on average) subset: the folder order is by class
    model.set_bn_stats({r: _calibrated_bn_stats(model, calib, r) for r in hw_list})
    model.eval()
    val_loader = build_loader(build_dataset(data_dir, "val", False, size), 128, False, workers)
    val_acc = {int(r): _top1(model, val_loader, r) for r in hw_list}
    ckpt = {"model": model.state_dict(), "arch": arch, "bn_stats": model.bn_stats, "val_acc": val_acc,
            "epochs": int(epochs), "superspace": space.name, "train_seconds": time.time() - t0,
            "data_dir": str(data_dir)}
    atomic_save(ckpt, out_path)
    log.info("teacher: val top-1 %s after %.0f s; saved %s",
             ", ".join(f"{a:.2f}% @{r}px" for r, a in val_acc.items()), time.time() - t0, out_path)
    return ckpt


@torch.no_grad()
def _calibrated_bn_stats(model: StagedTeacher, images: torch.Tensor, resolution: int,
                         batch_size: int = 128) -> dict[str, torch.Tensor]:
    """BN running stats re-estimated (cumulative average) on `images` resized to `resolution`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(images), batch_size):
        model(resize(images[i:i + batch_size], resolution))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(bn)]}.{k}": getattr(bn, k).clone() for bn in bns
            for k in ("running_mean", "running_var")}


@torch.no_grad()
def _top1(model: nn.Module, loader, resolution: int) -> float:
    correct = total = 0
    for images, labels in loader:
        correct += (model(resize(images, resolution)).argmax(1) == labels).sum().item()
        total += labels.numel()
    return 100.0 * correct / max(1, total)


# ------------------------------------------------------------------------------------ entry point
def get_teacher(superspace: str | SuperSpace, output_dir: str | os.PathLike = "./checkpoints",
                teacher_weights: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                train_if_missing: bool = True, hw_list: Sequence[int] | None = None,
                train_kwargs: dict | None = None) -> StagedTeacher:
    """The checked, frozen, eval-mode teacher of a superspace (see module docstring).

    tiny: `teacher_weights` or the cached checkpoint; when missing and `train_if_missing`, rank 0 trains it
    on `data_dir` (the other ranks wait). Raises one clear error when no weights are available.
    """
    space = get_superspace(superspace) if isinstance(superspace, str) else superspace
    if space.name == "tiny":
        path = Path(teacher_weights) if teacher_weights else tiny_teacher_path(output_dir, space.name)
        if not path.is_file():
            if teacher_weights or not train_if_missing:
                raise FileNotFoundError(f"tiny teacher checkpoint {path} not found; train it with "
                                        f"train_teacher.py --output_dir {output_dir}")
            if data_dir is None:
                raise ValueError(f"tiny teacher checkpoint {path} not found and no data_dir to train it on")
            if dist.is_main_process():
                log.info("tiny teacher not found at %s: training it on %s", path, data_dir)
                train_tiny_teacher(space, data_dir, path, **(train_kwargs or {}))
            dist.barrier()
        teacher, ckpt = load_tiny_teacher(path)
        teacher.val_acc = ckpt.get("val_acc")
        expected = None
    else:
        teacher = efficientnet_b5_teacher(teacher_weights)
        expected = EFFNET_B5_CHANNELS
    check_teacher(teacher, space, hw_list, expected)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
