"""MACs and parameter counts with the original's conventions (those of its released results and block LUTs).

* MACs (the original calls them "FLOPs"): multiply-accumulates of every conv and linear layer, as
  run (active widths and kernels), for one image. BN, activations, adds and pooling are not counted.
* Params: weights, biases and BN affine parameters of the modules that run, plus 3 per conv/linear
  for the LSQ+ scalars (weight scale, activation scale, offset), whatever the quant mode — so the
  numbers match the released LUTs (e.g. mobilew stage1 V1Dual `3#32#None_3#32#None` at 1x32x112x112:
  19.6690 MMACs, 0.0069 Mparams).
Count a standalone (extracted) module for params; MACs work on supernets too.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from modules.lsq import quantizers
from modules.ops import DynamicConv2d, DynamicLinear

LSQ_SCALARS_PER_OP = 3


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs for one forward pass of a single input of shape (1, C, H, W)."""
    total = 0

    def conv_hook(m, inputs, out):
        nonlocal total
        w = m.active_weight(inputs[0].shape[1])
        total += out[0].numel() * w.shape[1] * w.shape[2] * w.shape[3]

    def linear_hook(m, inputs, out):
        nonlocal total
        total += inputs[0].shape[1] * out.shape[1]

    hooks = []
    for m in model.modules():
        if isinstance(m, DynamicConv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, DynamicLinear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def count_params(model: nn.Module) -> int:
    """Parameters of a standalone module, LSQ+ state counted as 3 scalars per conv/linear."""
    quant = {id(p) for q in quantizers(model) for p in q.parameters(recurse=False)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in quant)
    n_ops = sum(isinstance(m, (DynamicConv2d, DynamicLinear)) for m in model.modules())
    return n + LSQ_SCALARS_PER_OP * n_ops


def macs_params(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, float]:
    """(MMACs, Mparams) of a standalone module."""
    return count_macs(model, input_shape) / 1e6, count_params(model) / 1e6
