"""Superspaces: the fixed macro-architecture plus the candidate block types of each searchable stage.

A *superspace* (`mobilew`, `onnxw`, `tiny`) fixes the 11 stages (stem, stage0, six searchable stages,
head), their width lists, depth lists, strides and width-window sizes, and the ordered list of
candidate block types. A *supernet* picks one block type and one width window per searchable stage
(encoding `onnxw-151122-023231`); a *subnet* picks depth, kernel, width and expand per block.

Numbers follow the original code; `tiny` is our own small space for the demo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def channel_list(low: int, high: int, step: int = 8) -> tuple[int, ...]:
    """Integers low, low+step, ... up to and including high."""
    return tuple(range(low, high + 1, step))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round v to the nearest multiple of divisor (never below min_value, never below 0.9 v)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class StageConfig:
    name: str
    width_list: tuple[int, ...]
    depth_list: tuple[int, ...]
    stride: int
    width_window_size: int | None = None  # None: one window holding the whole list

    @property
    def window_size(self) -> int:
        return len(self.width_list) if self.width_window_size is None else self.width_window_size

    @property
    def num_windows(self) -> int:
        return len(self.width_list) - self.window_size + 1

    def window(self, choice: int) -> tuple[int, ...]:
        """Widths of window `choice`; -1 means the whole list (block KD uses it)."""
        if choice == -1:
            return self.width_list
        if not 0 <= choice < self.num_windows:
            raise ValueError(f"{self.name}: width window {choice} out of range 0..{self.num_windows - 1}")
        return self.width_list[choice:choice + self.window_size]


@dataclass(frozen=True)
class BlockSpec:
    """A block family with its choices. `expand_list` is (None,) for blocks without expand ratio."""
    name: str
    kernel_list: tuple[int, ...]
    expand_list: tuple
    act: str  # relu | relu6 | swish | hswish
    se: bool = False

    @property
    def has_expand(self) -> bool:
        return self.expand_list != (None,)


# Block family names understood by modules.blocks.
BLOCK_FAMILIES = (
    "MobileNetV1Dual", "MobileNetV2", "MobileNetV2Res", "MobileNetV3Res", "MobileNetV2K3Res",
    "MobileNetV3K3Res", "ResNet", "ResNetSE", "FusedMBConvRes", "FusedMBConvSERes",
    "FirstConv", "FinalExpand", "FeatureMix", "Logits",
)

STAGE_NAMES = ("first_conv", "stage0", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6",
               "final_expand", "feature_mix", "logits")
SEARCHABLE = STAGE_NAMES[2:8]  # block type and width window are chosen for stage1..6
SUBNET_STAGES = STAGE_NAMES[:8]  # depth/kernel/width/expand are chosen for first_conv..stage6


@dataclass(frozen=True)
class SuperSpace:
    name: str
    stages: tuple[StageConfig, ...]  # the 11 stages, in STAGE_NAMES order
    candidates: tuple[BlockSpec, ...]  # index = digit in the supernet encoding
    fixed: dict = field(hash=False)  # stage name -> BlockSpec for first_conv, stage0, head
    block_kd_hw_list: tuple[int, ...]
    supernet_hw_list: tuple[int, ...]
    num_classes: int = 1000
    cin: int = 3

    def __post_init__(self):
        assert tuple(s.name for s in self.stages) == STAGE_NAMES, self.name
        assert len(self.candidates) <= 10, "one digit per stage in the encoding"
        for s in self.stages[2:8]:
            assert s.num_windows <= 10, s
        # The LUT recovers a row's resolution from its spatial size: the map must be injective.
        for i in range(len(SEARCHABLE)):
            sizes = [self.stage_input_hw(r, SEARCHABLE[i]) for r in self.block_kd_hw_list]
            assert len(set(sizes)) == len(sizes), (self.name, SEARCHABLE[i], sizes)

    def stage(self, name: str) -> StageConfig:
        return self.stages[STAGE_NAMES.index(name)]

    @property
    def searchable_stages(self) -> tuple[StageConfig, ...]:
        return self.stages[2:8]

    def num_window_choices(self) -> tuple[int, ...]:
        return tuple(s.num_windows for s in self.searchable_stages)

    def stage_input_hw(self, resolution: int, stage_name: str) -> int:
        """Spatial size at the input of `stage_name` (convs with padding k//2: ceil division)."""
        hw = resolution
        for s in self.stages[:STAGE_NAMES.index(stage_name)]:
            hw = math.ceil(hw / s.stride)
        return hw

    def resolution_from_hw(self, stage_name: str, hw: int) -> int:
        for r in self.block_kd_hw_list:
            if self.stage_input_hw(r, stage_name) == hw:
                return r
        allowed = {self.stage_input_hw(r, stage_name): r for r in self.block_kd_hw_list}
        raise ValueError(f"{self.name} {stage_name}: input size {hw} matches no resolution; allowed {allowed}")

    def prev_width_list(self, stage_name: str) -> tuple[int, ...]:
        """Widths a sub-stage's input may have: the previous stage's full list, as in the original's LUTs."""
        return self.stages[STAGE_NAMES.index(stage_name) - 1].width_list

    def check_choice(self, blocks: tuple[int, ...], windows: tuple[int, ...]) -> None:
        if len(blocks) != 6 or len(windows) != 6:
            raise ValueError(f"{self.name}: need 6 block and 6 window choices, got {blocks} {windows}")
        for i, (b, w, s) in enumerate(zip(blocks, windows, self.searchable_stages)):
            if not 0 <= b < len(self.candidates):
                raise ValueError(f"{self.name} stage{i + 1}: block {b} not in 0..{len(self.candidates) - 1} "
                                 f"({', '.join(c.name for c in self.candidates)})")
            if not 0 <= w < s.num_windows:
                raise ValueError(f"{self.name} stage{i + 1}: width window {w} not in 0..{s.num_windows - 1}")


# ----------------------------------------------------------------------------------------------
def _mobilew() -> SuperSpace:
    stages = (
        StageConfig("first_conv", (16, 24, 32), (1,), 2),
        StageConfig("stage0", (16, 24, 32), (1, 2), 1),
        StageConfig("stage1", (24, 32, 40), (2, 3, 4), 2, 2),
        StageConfig("stage2", channel_list(24, 72), (2, 3, 4), 2, 2),
        StageConfig("stage3", channel_list(56, 112), (2, 3, 4, 5, 6), 2, 3),
        StageConfig("stage4", channel_list(112, 176), tuple(range(2, 9)), 1, 3),
        StageConfig("stage5", (192, 200, 208, 216, 224, 240, 256, 272, 288), tuple(range(2, 9)), 2, 5),
        StageConfig("stage6", channel_list(216, 360, 16), (1, 2), 1, 7),
        StageConfig("final_expand", (1280,), (1,), 1),
        StageConfig("feature_mix", (1920,), (1,), 1),
        StageConfig("logits", (1000,), (1,), 1),
    )
    k, e = (3, 5, 7), (3, 6, 8)
    candidates = (
        BlockSpec("MobileNetV1Dual", k, (None,), "relu"),
        BlockSpec("MobileNetV2Res", k, e, "relu6"),
        BlockSpec("MobileNetV3Res", k, e, "swish", se=True),
        BlockSpec("ResNet", (3, 5), (0.5, 1.0, 1.5), "relu"),
        BlockSpec("FusedMBConvSERes", k, (1, 2, 3, 4), "swish", se=True),
        BlockSpec("MobileNetV3K3Res", k, e, "swish", se=True),
        BlockSpec("MobileNetV2K3Res", k, e, "relu6"),
    )
    fixed = {
        "first_conv": BlockSpec("FirstConv", (3,), (None,), "relu"),
        "stage0": BlockSpec("MobileNetV2", (3,), (1.0,), "relu"),
        "final_expand": BlockSpec("FinalExpand", (1,), (None,), "swish"),
        "feature_mix": BlockSpec("FeatureMix", (1,), (None,), "swish"),
        "logits": BlockSpec("Logits", (1,), (None,), "none"),
    }
    return SuperSpace("mobilew", stages, candidates, fixed, (160, 192, 224), channel_list(160, 224, 16))


def _onnxw() -> SuperSpace:
    stages = (
        StageConfig("first_conv", (16, 32), (1,), 2),
        StageConfig("stage0", (16, 32), (1, 2), 1),
        StageConfig("stage1", (32, 48, 64), (2, 3, 4), 2, 2),
        StageConfig("stage2", channel_list(32, 96, 16), (2, 3, 4), 2, 2),
        StageConfig("stage3", channel_list(64, 144, 16), (2, 3, 4, 5, 6), 2, 3),
        StageConfig("stage4", channel_list(112, 192, 16), (2, 3, 4, 5, 6), 1, 3),
        StageConfig("stage5", channel_list(192, 304, 16), (2, 3, 4, 5, 6), 2, 5),
        StageConfig("stage6", channel_list(304, 448, 16), (1, 2), 1, 7),
        StageConfig("final_expand", (1280,), (1,), 1),
        StageConfig("feature_mix", (1920,), (1,), 1),
        StageConfig("logits", (1000,), (1,), 1),
    )
    candidates = (
        BlockSpec("MobileNetV1Dual", (3, 5), (None,), "relu"),
        BlockSpec("MobileNetV2Res", (3, 5), (4, 6, 8), "relu6"),
        BlockSpec("MobileNetV3Res", (3, 5), (4, 6, 8), "hswish", se=True),
        BlockSpec("ResNet", (3, 5, 7), (0.5, 1.0, 1.5), "relu"),
        BlockSpec("ResNetSE", (3, 5, 7), (0.5, 1.0, 1.5), "relu", se=True),
        BlockSpec("FusedMBConvRes", (3, 5, 7), (1, 2, 3, 4), "swish"),
    )
    fixed = {
        "first_conv": BlockSpec("FirstConv", (3,), (None,), "relu"),
        "stage0": BlockSpec("ResNet", (3,), (0.5,), "relu"),
        "final_expand": BlockSpec("FinalExpand", (1,), (None,), "hswish"),
        "feature_mix": BlockSpec("FeatureMix", (1,), (None,), "hswish"),
        "logits": BlockSpec("Logits", (1,), (None,), "none"),
    }
    return SuperSpace("onnxw", stages, candidates, fixed, (160, 192, 224), channel_list(160, 224, 16))


def _tiny() -> SuperSpace:
    """Small space for the demo and tests: onnxw's block families, narrow widths, 32-64 px inputs.

    Total stride 16 (stage5 keeps stride 1) so that 32/48/64 px give distinct sizes at every stage.
    """
    stages = (
        StageConfig("first_conv", (8, 16), (1,), 2),
        StageConfig("stage0", (8, 16), (1, 2), 1),
        StageConfig("stage1", (16, 24, 32), (1, 2), 2, 2),
        StageConfig("stage2", (24, 32, 40), (1, 2), 2, 2),
        StageConfig("stage3", (32, 40, 48, 56), (1, 2), 2, 2),
        StageConfig("stage4", (48, 56, 64), (1, 2), 1, 2),
        StageConfig("stage5", (64, 72, 80, 88), (1, 2), 1, 2),
        StageConfig("stage6", (80, 96, 112), (1,), 1, 2),
        StageConfig("final_expand", (128,), (1,), 1),
        StageConfig("feature_mix", (192,), (1,), 1),
        StageConfig("logits", (10,), (1,), 1),
    )
    onnxw = _onnxw()
    fixed = dict(onnxw.fixed)
    return SuperSpace("tiny", stages, onnxw.candidates, fixed, (32, 48, 64), (32, 40, 48, 56, 64), num_classes=10)


SUPERSPACES = {"mobilew": _mobilew, "onnxw": _onnxw, "tiny": _tiny}
_CACHE: dict[str, SuperSpace] = {}


def get_superspace(name: str) -> SuperSpace:
    if name not in SUPERSPACES:
        raise ValueError(f"unknown superspace {name!r}; allowed: {', '.join(SUPERSPACES)}")
    if name not in _CACHE:
        _CACHE[name] = SUPERSPACES[name]()
    return _CACHE[name]
