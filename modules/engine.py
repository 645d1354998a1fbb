"""Training and evaluation loops shared by block KD, supernet training, subnet search and fine-tuning."""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.dist import all_reduce_mean, is_dist_avail_and_initialized
from modules.lsq import quant_parameters


AMP_MODES = ("off", "bf16", "fp16")


def amp_autocast(mode: str, device: str | torch.device):
    """The autocast region of `--amp` for forward passes and losses: bf16 (CPU or CUDA) or fp16 (CUDA only, with
    `amp_grad_scaler`); "off" is a no-op. LSQ+ quantizers leave it and run in float32 (`modules.lsq`)."""
    if mode not in AMP_MODES:
        raise ValueError(f"--amp {mode!r}: expected one of {', '.join(AMP_MODES)}")
    if mode == "off":
        return contextlib.nullcontext()
    dev = torch.device(device)
    if mode == "fp16" and dev.type != "cuda":
        raise ValueError(f"--amp fp16 needs a CUDA device (got {dev}); use --amp bf16 on the CPU")
    return torch.autocast(dev.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def amp_grad_scaler(mode: str):
    """A GradScaler for --amp fp16 (fp16 gradients underflow without loss scaling), else None."""
    return torch.amp.GradScaler("cuda") if mode == "fp16" else None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: not on BN affine params, biases or LSQ+ scales.

    (The original matched ".bn" but names its BN modules "norm", so it decayed BN gammas and LSQ
    scales, spec §13.1 item 9.)
    """
    no_decay_ids = {id(p) for p in quant_parameters(model)}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_start: float = 0.001):
    """lr factor per step: linear warm-up from `warmup_start`, times a cosine over the whole schedule."""
    def factor(step: int) -> float:
        wf = 1.0 if step >= warmup_steps or warmup_steps == 0 else warmup_start + (1 - warmup_start) * step / warmup_steps
        return wf * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return factor


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable, num_batches: int, device="cpu") -> int:
    """Re-estimate BN running stats of the active (sub)network: reset, cumulative average over
    `num_batches` training batches (every batch is used), then average over DDP ranks.
    Returns the number of images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, bn.training) for bn in bns]
    modes = [(m, m.training) for m in model.modules()]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    # BNs in train mode, and so are the modules that own a BN: an owner in eval mode may fold its BN into
    # the conv (backend presets) and never call it, which would leave the running stats unestimated
    for m in model.modules():
        if any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in m.children()):
            m.training = True
    for bn in bns:
        bn.train()
    seen = 0
    try:
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device))
            seen += images.shape[0]
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
        for m, training in modes:
            m.training = training
    if seen == 0:
        raise ValueError("BN calibration got no batches: the calibration loader is empty")
    for bn in bns:
        all_reduce_mean(bn.running_mean)
        all_reduce_mean(bn.running_var)
    return seen


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device="cpu", max_batches: int | None = None) -> float:
    """Top-1 accuracy in percent, summed over DDP ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(images.to(device))
        correct[0] += (logits.argmax(1).cpu() == labels).sum().item()
        correct[1] += labels.numel()
    model.train(was_training)
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(correct)
    if correct[1] == 0:
        raise ValueError("evaluation got no batches: the validation loader is empty")
    return float(100.0 * correct[0] / correct[1])


# ============================================================================ generic training-loop pieces
# (supernet training; usable by any stage script that trains with SGD + warm-up cosine on one or more ranks)

def step_rng(seed: int, step: int) -> random.Random:
    """The RNG for global step `step`: every DDP rank builds the same one, so they pick the same subnets."""
    return random.Random(int(seed) * 1_000_003 + int(step))


def set_deterministic(enabled: bool = True, device: str | torch.device = "cpu") -> None:
    """Deterministic kernels. On CUDA: `torch.use_deterministic_algorithms` and deterministic cuDNN. On CPU the
    kernels are already deterministic for a fixed thread count (no atomics); only oneDNN is pinned, since
    `use_deterministic_algorithms` would import torch._inductor (seconds per process) for nothing."""
    enabled = bool(enabled)
    if hasattr(torch.backends, "mkldnn") and hasattr(torch.backends.mkldnn, "deterministic"):
        torch.backends.mkldnn.deterministic = enabled
    if torch.device(device).type == "cuda":
        torch.use_deterministic_algorithms(enabled, warn_only=True)
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled


def build_sgd(model: nn.Module, lr: float, momentum: float = 0.9, nesterov: bool = True,
              weight_decay: float = 0.0) -> torch.optim.SGD:
    """SGD over `param_groups(model, weight_decay)` (no decay on BN, biases and LSQ+ scales)."""
    if lr <= 0:
        raise ValueError(f"learning rate {lr}: expected a positive number")
    if nesterov and momentum <= 0:
        raise ValueError("nesterov SGD needs momentum > 0")
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)


def build_warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                        warmup_start: float = 0.001) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler: lr = base · `warmup_cosine(total_steps, warmup_steps)(it)` (spec §8.3)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, warmup_start))


def _dist_on() -> bool:
    return is_dist_avail_and_initialized()


@torch.no_grad()
def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank `src` to every rank (no-op without a process group)."""
    if not _dist_on():
        return
    for t in list(model.parameters()) + list(model.buffers()):
        torch.distributed.broadcast(t.data, src)


@torch.no_grad()
def all_reduce_gradients(params: list[torch.Tensor], flags: list[float] | None = None) -> list[float]:
    """Average `.grad` over DDP ranks in ONE all-reduce, and sum `flags` (e.g. a stop request) with it.

    A parameter without gradient on some rank contributes zeros; one without gradient on every rank keeps
    `grad = None` (the optimizer then skips it, as in a single process). Replaces DDP's per-backward
    reducer, which with several forward/backward passes per step (sandwich rule) all-reduces each time and,
    under `no_sync`, mishandles parameters unused by the last pass. Returns the summed flags.
    """
    flags = [float(f) for f in (flags or [])]
    if not _dist_on():
        return flags
    world = torch.distributed.get_world_size()
    ref = params[0]
    used = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [used, torch.tensor(flags, dtype=ref.dtype, device=ref.device)])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).div_(world)
        offset += n
    used = flat[offset:offset + len(params)]
    for p, u in zip(params, used.tolist()):
        if u == 0:
            p.grad = None
    return flat[offset + len(params):].tolist()


@torch.no_grad()
def all_reduce_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BN running stats) over ranks, so every rank holds the same state."""
    if not _dist_on():
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


class GracefulStop:
    """Context manager: the first SIGTERM / SIGINT sets `.requested` (the loop saves and exits at the next
    step boundary); a second one falls back to the default handler. Only installable in the main thread."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self.requested, self.signum, self._old = tuple(signals), False, None, {}

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class AverageMeter:
    """Running mean; `state()` / `from_state()` so a resumed epoch keeps its sums."""

    def __init__(self, total: float = 0.0, count: int = 0):
        self.total, self.count = float(total), int(count)

    def update(self, value: float, n: int = 1) -> None:
        self.total += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def state(self) -> list:
        return [self.total, self.count]

    @classmethod
    def from_state(cls, state) -> "AverageMeter":
        return cls(*state) if state else cls()


class ResizeCache:
    """`images` resized to each resolution at most once per step (bicubic, as the model itself does)."""

    def __init__(self, images: torch.Tensor):
        self.images, self._cache = images, {}

    def __call__(self, resolution: int) -> torch.Tensor:
        if self.images.shape[-1] == resolution and self.images.shape[-2] == resolution:
            return self.images
        if resolution not in self._cache:
            self._cache[resolution] = F.interpolate(self.images, size=(resolution, resolution), mode="bicubic",
                                                    align_corners=False)
        return self._cache[resolution]


@torch.no_grad()
def init_lsq_scales(model: nn.Module, images: torch.Tensor) -> int:
    """Initialise the LSQ+ scales of `model` (active subnet) from one forward of `images` in train mode
    (min/max of what each quantizer sees; all-reduced over ranks). BN running stats are left untouched.
    Returns the number of quantizers initialised by this call."""
    from modules.lsq import quantizers
    before = sum(bool(q.initialized) for q in quantizers(model) if q.enabled)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    was_training = model.training
    model.train()
    try:
        model(images)
    finally:
        for bn, st in zip(bns, saved):
            bn.load_state_dict(st)
        model.train(was_training)
    return sum(bool(q.initialized) for q in quantizers(model) if q.enabled) - before


def write_csv(path, rows: list[dict], fields: list[str]) -> None:
    """Rewrite `path` atomically with `rows` (missing / None values as empty cells)."""
    import csv
    import io
    from modules.checkpoint import atomic_write_text
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


def plot_curves(path, rows: list[dict], title: str = "") -> None:
    """PNG with the training loss (left axis) and the validation accuracies per epoch (right axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from modules.checkpoint import atomic_write_bytes
    import io
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ep = [r["epoch"] for r in rows]
    for key, style in (("loss", "-"), ("kd_loss", "--")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(ep, [float("nan") if y is None else y for y in ys], style, color="tab:blue", label=key)
    ax1.set_xlabel("epoch")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "1.2" epochs on short runs
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    for key, color in (("max_acc", "tab:red"), ("min_acc", "tab:orange")):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), "o-", color=color, label=key)
    ax2.set_ylabel("val top-1 (%)", color="tab:red")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax1.set_title(title)
    fig.subplots_adjust(left=0.1, right=0.88, top=0.9, bottom=0.13)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
