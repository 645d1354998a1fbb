"""MACs / params counter, with the original's conventions: the original's "FLOPs" are multiply-accumulates; params count
BN affine parameters and 3 LSQ+ scalars per conv/linear."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modules.counter import count_macs, count_params, macs_params
from modules.encoding import parse_substage, parse_supernet
from modules.lsq import set_quant_mode
from modules.superspace import get_superspace
from modules.supernet import DynamicStage, SuperNet, build_subnet


def _substage(space: str, index: int, text: str, cin: int, stride: int) -> DynamicStage:
    sp = get_superspace(space)
    return DynamicStage.from_blocks(sp.candidates[index], cin, parse_substage(text, sp.candidates[index]), stride)


def test_spec_lut_row_mobilew_stage1_v1dual():
    """First row of the released mobilew/stage1_0_0.csv: 19.6690 MMACs, 0.0069 Mparams."""
    stage = _substage("mobilew", 0, "3#32#None_3#32#None", cin=32, stride=2)
    macs, params = count_macs(stage, (1, 32, 112, 112)), count_params(stage)
    # block 1 (stride 2, 112 -> 56, projection shortcut): dw 3x3 + pw + dw 3x3 + pw + shortcut 1x1
    dw, pw = 32 * 56 * 56 * 9, 32 * 32 * 56 * 56
    block1 = dw + pw + dw + pw + pw
    block2 = dw + pw + dw + pw  # stride 1, identity shortcut
    assert macs == block1 + block2 == 19_668_992
    # params: weights + BN (2 per channel) + 3 LSQ scalars per conv
    dwp, pwp = 32 * 9 + 64 + 3, 32 * 32 + 64 + 3
    assert params == (dwp + pwp + dwp + pwp + pwp) + (dwp + pwp + dwp + pwp) == 6875
    mm, mp = macs_params(stage, (1, 32, 112, 112))
    assert f"{mm:.4f}" == "19.6690" and f"{mp:.4f}" == "0.0069"


# (space, candidate, sub-stage, cin, stride, input shape, hand-computed MACs, hand-computed params)
HAND = {
    # ResNet bottleneck, h = make_divisible(0.5 * 32) = 16; 20x20 -> 10x10 (stride in the k x k conv)
    "onnxw-ResNet": ("onnxw", 3, "3#32#0.5", 16, 2, (1, 16, 20, 20),
                     16 * 16 * 400 + 16 * 16 * 9 * 100 + 16 * 32 * 100 + 16 * 32 * 100,
                     (256 + 32 + 3) + (2304 + 32 + 3) + (512 + 64 + 3) + (512 + 64 + 3)),
    # FusedMBConvRes: block 1 h = 2*16 = 32, fused 3x3 s2 + project + shortcut; block 2 h = 32, fused 5x5
    "onnxw-FusedMBConvRes": ("onnxw", 5, "3#32#2_5#32#1", 16, 2, (1, 16, 16, 16),
                             (16 * 32 * 9 * 64 + 32 * 32 * 64 + 16 * 32 * 64) + (32 * 32 * 25 * 64 + 32 * 32 * 64),
                             (4608 + 64 + 3) + (1024 + 64 + 3) + (512 + 64 + 3) + (25600 + 64 + 3) + (1024 + 64 + 3)),
    # FusedMBConvSERes: SE on h = 32 with mid = make_divisible(cin // 4) = 8 (convs with bias on 1x1 maps)
    "mobilew-FusedMBConvSERes": ("mobilew", 4, "3#32#2", 16, 2, (1, 16, 16, 16),
                                 16 * 32 * 9 * 64 + (32 * 8 + 8 * 32) + 32 * 32 * 64 + 16 * 32 * 64,
                                 (4608 + 64 + 3) + (256 + 8 + 3) + (256 + 32 + 3) + (1024 + 64 + 3) + (512 + 64 + 3)),
    # MobileNetV2K3Res k=5: expand 16->48, two stacked 3x3 DW convs, one BN, project 48->16, identity shortcut
    "mobilew-MobileNetV2K3Res": ("mobilew", 6, "5#16#3", 16, 1, (1, 16, 8, 8),
                                 16 * 48 * 64 + 2 * 48 * 9 * 64 + 48 * 16 * 64,
                                 (768 + 96 + 3) + 2 * (432 + 3) + 96 + (768 + 32 + 3)),
}


@pytest.mark.parametrize("key", sorted(HAND))
def test_hand_computed_substages(key):
    space, index, text, cin, stride, shape, macs, params = HAND[key]
    stage = _substage(space, index, text, cin, stride)
    assert count_macs(stage, shape) == macs
    assert count_params(stage) == params


def test_macs_match_torch_flop_counter_and_supernet():
    """Independent check: torch's FlopCounterMode (2 FLOPs per MAC for conv / linear) on extracted subnets;
    counting the supernet with the subnet active gives the same MACs as counting the extracted subnet."""
    net = SuperNet(parse_supernet("tiny-012345-010101")).eval()
    rng = random.Random(0)
    for cfg in (net.set_max_subnet(), net.set_min_subnet(), net.sample_active_subnet(rng)):
        shape = (1, 3, cfg.resolution, cfg.resolution)
        sub = net.get_active_subnet(preserve_weight=False).eval()
        macs = count_macs(sub, shape)
        with FlopCounterMode(display=False) as fc:
            sub(torch.zeros(shape))
        assert macs == fc.get_total_flops() // 2 > 0
        assert count_macs(net, shape) == macs


def test_macs_independent_of_input_size_argument_resolution():
    """The model resizes its input to its resolution, so MACs depend on the subnet's resolution only."""
    net = SuperNet(parse_supernet("tiny-012345-010101")).eval()
    net.set_min_subnet()
    sub = net.get_active_subnet()
    assert count_macs(sub, (1, 3, 32, 32)) == count_macs(sub, (1, 3, 64, 64))


def test_params_count_lsq_scalars_whatever_the_mode():
    stage = _substage("onnxw", 3, "3#32#0.5", 16, 2)
    fp32 = count_params(stage)
    set_quant_mode(stage, "lsq", "ort")  # per-channel weight scales exist now, but count as 3 scalars per op
    assert count_params(stage) == fp32
    assert sum(p.numel() for p in stage.parameters()) > fp32


def test_head_params_of_a_released_subnet():
    """About 4.4 M of every subnet's parameters is the head, as the original's released results imply."""
    net = build_subnet("onnxw-151122-023231", "d1#1#2#2#2#2#2#1_k3#3#3#3#3#3#3#3#3#3#3#3#3_w16#16#32#32#64#64#112#"
                       "112#144#144#240#240#320_e0#0.5#4.0#4.0#1.0#1.0#4.0#4.0#4.0#4.0#4.0#4.0#4.0_r160")
    head = count_params(net.feature_mix) + count_params(net.logits)
    assert head == (1280 * 1920 + 2 * 1920 + 3) + (1920 * 1000 + 1000 + 3)
    assert 4.3e6 < head < 4.5e6
    total = count_params(net)
    assert total == sum(p.numel() for p in net.parameters()) + 3 * sum(
        1 for m in net.modules() if type(m).__name__ in ("DynamicConv2d", "DynamicLinear"))
    assert count_macs(net.logits, (1, 1920, 1, 1)) == 1920 * 1000


def test_count_restores_training_mode():
    stage = _substage("onnxw", 3, "3#32#0.5", 16, 2)
    stage.train()
    count_macs(stage, (1, 16, 20, 20))
    assert stage.training
