"""Training and evaluation loops shared by block KD, supernet training, subnet search and fine-tuning."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from modules.dist import all_reduce_mean
from modules.lsq import quant_parameters


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
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.eval()
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
        model.train(was_training)
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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    if correct[1] == 0:
        raise ValueError("evaluation got no batches: the validation loader is empty")
    return float(100.0 * correct[0] / correct[1])
