"""Elastic stages and the weight-sharing supernet, after once-for-all, as in the original.

    net = SuperNet(parse_supernet("onnxw-151122-023231"))
    cfg = net.sample_active_subnet(random.Random(step))   # or set_max_subnet() / set_min_subnet()
    net.set_active_subnet(parse_subnet("d1#1#2#..._r160", net.choice))
    sub = net.get_active_subnet(preserve_weight=True)     # a standalone network with copied weights
    sub2 = build_from_config(sub.config_dict())            # the same architecture from its JSON config

A standalone subnet is a `SuperNet` whose choice lists are single values, so its forward pass is the
supernet's forward pass with nothing left to choose.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random

import torch.nn as nn
import torch.nn.functional as F

from modules.blocks import build_block
from modules.encoding import SubnetConfig, SupernetChoice, parse_subnet, parse_supernet, validate_subnet
from modules.lsq import get_quant_mode, quantizers, set_quant_mode
from modules.superspace import SUBNET_STAGES, BlockSpec


class DynamicStage(nn.Module):
    """`max(depth_list)` blocks; the first `active_depth` run. The first block carries the stride.

    `block_lists` (one (in_list, width_list, spec) per block) fixes per-block choices; by default every
    block draws from the stage's lists (the first block's input from `in_list`).
    """

    def __init__(self, spec: BlockSpec, in_list, width_list, depth_list, stride: int, block_lists=None):
        super().__init__()
        self.spec, self.width_list, self.depth_list = spec, tuple(width_list), tuple(depth_list)
        if block_lists is None:
            block_lists = [(in_list if i == 0 else width_list, width_list, spec) for i in range(max(depth_list))]
        self.blocks = nn.ModuleList(build_block(s, ins, ws, stride if i == 0 else 1)
                                    for i, (ins, ws, s) in enumerate(block_lists))
        self.active_depth = max(depth_list)

    @classmethod
    def from_blocks(cls, spec: BlockSpec, cin: int, blocks: list[tuple], stride: int) -> "DynamicStage":
        """A static stage running exactly `blocks` = [(k, w, e), ...] on `cin` input channels."""
        lists, ins = [], (cin,)
        for k, w, e in blocks:
            lists.append((ins, (w,), dataclasses.replace(spec, kernel_list=(k,), expand_list=(e,))))
            ins = (w,)
        return cls(spec, (cin,), tuple(w for _, w, _ in blocks), (len(blocks),), stride, lists)

    def set_active(self, blocks: list[tuple]) -> None:
        self.active_depth = len(blocks)
        for block, (k, w, e) in zip(self.blocks, blocks):
            block.set_active(k, w, e)

    def active_config(self) -> list[tuple]:
        return [(b.active_kernel, b.active_width, b.active_expand) for b in self.blocks[: self.active_depth]]

    def sample(self, rng: random.Random, mode: str = "random") -> list[tuple]:
        """A sub-stage: "max", "min" or uniformly "random" depth and per-block (k, w, e); sets it active."""
        pick = {"max": max, "min": min, "random": rng.choice}[mode]
        depth = pick(self.depth_list)
        blocks = [(pick(b.kernel_list), pick(b.width_list), None if b.expand_list == (None,) else pick(b.expand_list))
                  for b in self.blocks[:depth]]
        self.set_active(blocks)
        return blocks

    def forward(self, x):
        for block in self.blocks[: self.active_depth]:
            x = block(x)
        return x


class SuperNet(nn.Module):
    def __init__(self, choice: SupernetChoice, num_classes: int | None = None, dropout: float = 0.0,
                 subnet: SubnetConfig | None = None, original_sizes: bool = False):
        """`original_sizes`: size each stage's first block for the previous stage's whole width list rather than
        its window, as the original SpaceEvo code does (the extra channels are never used); `modules.original`
        builds one to know the tensor shapes of the original's checkpoints."""
        super().__init__()
        self.choice, self.space = choice, choice.space
        self.num_classes = num_classes or self.space.num_classes
        self.static_config = subnet
        if subnet is not None:
            validate_subnet(subnet, choice)
        stages, in_list = [], (self.space.cin,)
        per_stage = subnet.per_stage() if subnet is not None else [None] * len(SUBNET_STAGES)
        for name, fixed in zip(SUBNET_STAGES, per_stage):
            spec, stage, window = choice.stage_spec(name)
            if fixed is None:
                stages.append(DynamicStage(spec, in_list, window, stage.depth_list, stage.stride))
                in_list = stage.width_list if original_sizes else window
            else:
                stages.append(DynamicStage.from_blocks(spec, in_list[0], fixed, stage.stride))
                in_list = (fixed[-1][1],)
        self.stages = nn.ModuleList(stages)
        head = []
        for name in ("final_expand", "feature_mix", "logits"):
            width = (self.num_classes,) if name == "logits" else self.space.stage(name).width_list
            head.append(build_block(self.space.fixed[name], in_list, width, 1))
            in_list = width
        self.final_expand, self.feature_mix, self.logits = head
        self.set_dropout(dropout)
        self.hw_list = self.space.supernet_hw_list if subnet is None else (subnet.resolution,)
        self.active_resolution = max(self.hw_list)
        self.set_max_subnet()

    # ---------------------------------------------------------------- choosing subnets
    def set_dropout(self, p: float) -> None:
        self.logits.dropout.p = p

    def set_active_subnet(self, cfg: SubnetConfig | str) -> None:
        if isinstance(cfg, str):
            cfg = parse_subnet(cfg, self.choice)
        elif self.static_config is None:
            validate_subnet(cfg, self.choice)
        if cfg.resolution not in self.hw_list:
            raise ValueError(f"resolution {cfg.resolution} not in {list(self.hw_list)}")
        for stage, blocks in zip(self.stages, cfg.per_stage()):
            if len(blocks) > len(stage.blocks):
                raise ValueError(f"depth {len(blocks)} exceeds this network's {len(stage.blocks)} blocks")
            stage.set_active(blocks)
        self.active_resolution = cfg.resolution

    def get_active_subnet_config(self) -> SubnetConfig:
        return SubnetConfig.from_stages([s.active_config() for s in self.stages], self.active_resolution)

    def _sample(self, mode: str, rng: random.Random | None = None) -> SubnetConfig:
        rng = rng or random.Random()
        for stage in self.stages:
            stage.sample(rng, mode)
        self.active_resolution = {"max": max, "min": min, "random": rng.choice}[mode](self.hw_list)
        return self.get_active_subnet_config()

    def set_max_subnet(self) -> SubnetConfig:
        return self._sample("max")

    def set_min_subnet(self) -> SubnetConfig:
        return self._sample("min")

    def sample_active_subnet(self, rng: random.Random) -> SubnetConfig:
        """Uniform depth, kernel, width, expand and resolution (over the full resolution list)."""
        return self._sample("random", rng)

    # ---------------------------------------------------------------- forward
    def forward(self, x):
        if x.shape[-1] != self.active_resolution or x.shape[-2] != self.active_resolution:
            x = F.interpolate(x, size=(self.active_resolution,) * 2, mode="bicubic", align_corners=False)
        for stage in self.stages:
            x = stage(x)
        return self.logits(self.feature_mix(self.final_expand(x)))

    # ---------------------------------------------------------------- extraction
    def config_dict(self) -> dict:
        return {"supernet": str(self.choice), "subnet": str(self.get_active_subnet_config()),
                "num_classes": self.num_classes}

    def get_active_subnet(self, preserve_weight: bool = True) -> "SuperNet":
        """A standalone network of the active subnet; weights, BN stats and LSQ+ state copied."""
        sub = SuperNet(self.choice, self.num_classes, self.logits.dropout.p, self.get_active_subnet_config())
        if get_quant_mode(self) == "lsq":
            set_quant_mode(sub, "lsq", quantizers(self)[0].preset)
        if preserve_weight:
            load_sliced_state_dict(sub, self.state_dict())
        return sub.train(self.training)

    def block_configs(self) -> list[dict]:
        """Active blocks with their input size at the active resolution (for latency prediction)."""
        out, hw = [], self.active_resolution
        x_channels = self.space.cin
        blocks = [b for s in self.stages for b in s.blocks[: s.active_depth]]
        blocks += [self.final_expand, self.feature_mix, self.logits]
        for b in blocks:
            cfg = b.config(x_channels)
            cfg["hw"] = hw
            out.append(cfg)
            hw = math.ceil(hw / b.stride)
            if type(b).__name__ == "FeatureMix":
                hw = 1
            x_channels = cfg["cout"]
        return out

    def zero_last_gamma(self) -> None:
        """Zero the last BN gamma of every residual path, so residual blocks start as identities."""
        for stage in self.stages:
            for block in stage.blocks:
                bn = block.last_bn() if hasattr(block, "last_bn") else None
                if bn is not None:
                    nn.init.zeros_(bn.weight)


def load_sliced_state_dict(dst: nn.Module, src_state: dict) -> None:
    """Copy into `dst` the leading slices of `src_state` (kernels: the centred crop)."""
    new_state = {}
    for key, t in dst.state_dict().items():
        if key not in src_state:
            raise ValueError(f"weight {key!r} of the subnet is missing from the supernet state")
        s = src_state[key]
        if s.dim() == 4 and key.endswith("weight") and s.shape[2] != t.shape[2]:
            start = s.shape[2] // 2 - t.shape[2] // 2
            s = s[:, :, start:start + t.shape[2], start:start + t.shape[3]]
        s = s[tuple(slice(0, n) for n in t.shape)]
        if s.shape != t.shape:
            raise ValueError(f"weight {key!r}: supernet slice {tuple(s.shape)} does not fit {tuple(t.shape)}")
        new_state[key] = s.clone()
    dst.load_state_dict(new_state, strict=True)


def build_from_config(config: dict | str) -> SuperNet:
    """A standalone subnet from {"supernet": ..., "subnet": ..., "num_classes": ...} (a dict or JSON text)."""
    if isinstance(config, str):
        config = json.loads(config)
    missing = {"supernet", "subnet"} - set(config)
    if missing:
        raise ValueError(f"subnet config lacks {sorted(missing)}: {config}")
    choice = parse_supernet(config["supernet"])
    return SuperNet(choice, config.get("num_classes"), 0.0, parse_subnet(config["subnet"], choice))


def build_subnet(supernet_encoding: str, subnet_encoding: str, num_classes: int | None = None) -> SuperNet:
    """An eval-mode standalone subnet (random weights) with a `.resolution` attribute."""
    net = build_from_config({"supernet": supernet_encoding, "subnet": subnet_encoding, "num_classes": num_classes})
    net.resolution = net.active_resolution
    return net.eval()


def supernet_from_encoding(encoding: str, num_classes: int | None = None, dropout: float = 0.0) -> SuperNet:
    return SuperNet(parse_supernet(encoding), num_classes, dropout)

