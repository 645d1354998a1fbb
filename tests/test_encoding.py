"""Encodings (the original's): supernet, subnet and LUT sub-stage strings round-trip and reject bad input clearly."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from modules.encoding import (SubnetConfig, format_substage, parse_subnet, parse_substage, parse_supernet,
                              validate_subnet)
from modules.superspace import SUBNET_STAGES, get_superspace

RESULTS = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "search_results.yaml").read_text())
SUPERNETS = RESULTS["supernets"]
SUBNETS = RESULTS["subnets"]

VNNI = "onnxw-151122-023231"
# SEQnet@vnni-A0 (released with the original): 13 blocks
VNNI_A0 = SUBNETS["SEQnet@vnni-A0"]["arch"]


# --------------------------------------------------------------------------- released strings
def test_released_names_match_spec():
    assert SUPERNETS == {
        "spaceevo@pixel4": "mobilew-122222-155400",
        "spaceevo@pixel4-tiny": "mobilew-332160-134200",
        "spaceevo@pixel4-medium": "mobilew-112220-154410",
        "spaceevo@vnni": "onnxw-151122-023231",
        "spaceevo@vnni-large": "onnxw-121122-133333",
    }
    assert sorted(SUBNETS) == sorted(f"SEQnet@{p}-A{i}" for p in ("pixel4", "vnni") for i in range(5))


@pytest.mark.parametrize("name", sorted(SUPERNETS))
def test_released_supernet_round_trip(name):
    text = SUPERNETS[name]
    choice = parse_supernet(text)
    assert str(choice) == text
    assert parse_supernet(str(choice)) == choice
    assert choice.superspace == text.split("-")[0]
    assert len(choice.blocks) == len(choice.windows) == 6


@pytest.mark.parametrize("name", sorted(SUBNETS))
def test_released_subnet_round_trip_and_validates(name):
    entry = SUBNETS[name]
    choice = parse_supernet(SUPERNETS[entry["supernet"]])
    cfg = parse_subnet(entry["arch"], choice)  # validates every value against the supernet's choices
    assert str(cfg) == entry["arch"]
    assert parse_subnet(str(cfg)) == cfg
    assert len(cfg.depths) == len(SUBNET_STAGES) == 8
    assert len(cfg.kernels) == len(cfg.widths) == len(cfg.expands) == sum(cfg.depths)
    assert cfg.expands[0] is None  # first_conv has no expand ratio: printed as 0
    stage0_e = {"mobilew": 1.0, "onnxw": 0.5}[choice.superspace]
    assert all(e == stage0_e for e in cfg.expands[1:1 + cfg.depths[1]])
    validate_subnet(cfg, choice)


def test_vnni_a0_details_from_spec():
    cfg = parse_subnet(VNNI_A0, parse_supernet(VNNI))
    assert cfg.depths == (1, 1, 2, 2, 2, 2, 2, 1) and sum(cfg.depths) == 13
    assert cfg.widths == (16, 16, 32, 32, 64, 64, 112, 112, 144, 144, 240, 240, 320)
    assert cfg.expands[:7] == (None, 0.5, 4.0, 4.0, 1.0, 1.0, 4.0)
    assert cfg.resolution == 160
    assert cfg.per_stage()[2] == [(3, 32, 4.0), (3, 32, 4.0)]
    assert SubnetConfig.from_stages(cfg.per_stage(), cfg.resolution) == cfg


def test_v1dual_blocks_print_as_zero_expand():
    # spaceevo@pixel4-tiny has V1Dual (index 0) in stage6: its blocks print e=0 and parse back to None
    choice = parse_supernet(SUPERNETS["spaceevo@pixel4-tiny"])
    assert choice.blocks[5] == 0
    space = choice.space
    stages = []
    for name in SUBNET_STAGES:
        spec, stage, window = choice.stage_spec(name)
        e = max(spec.expand_list) if spec.has_expand else None
        stages.append([(min(spec.kernel_list), window[0], e)] * min(stage.depth_list))
    cfg = SubnetConfig.from_stages(stages, space.supernet_hw_list[0])
    text = str(cfg)
    assert text.endswith("#0_r160")
    back = parse_subnet(text, choice)
    assert back == cfg and back.expands[-1] is None


def test_supernet_window_group_optional():
    assert parse_supernet("onnxw-151122") == parse_supernet("onnxw-151122-000000")


# --------------------------------------------------------------------------- bad supernet strings
@pytest.mark.parametrize("text, must_contain", [
    ("foo-151122-023231", ["'foo'", "mobilew", "onnxw", "tiny"]),                  # unknown superspace
    ("onnxw-15112-023231", ["'15112'", "6 digits"]),                                # wrong group length
    ("onnxw-151122-0232311", ["'0232311'", "6 digits"]),
    ("onnxw-15a122-023231", ["'15a122'", "6 digits"]),                              # non-numeric
    ("onnxw-171122-023231", ["block 7", "0..5", "FusedMBConvRes"]),                  # no candidate 7
    ("onnxw-151122-053231", ["stage2", "window 5", "0..3"]),                        # stage2 has 4 windows
    ("mobilew-122222-255400", ["stage1", "window 2", "0..1"]),
    ("onnxw", ["expected <superspace>-<6 block digits>"]),
    ("onnxw-151122-023231-align0", ["expected <superspace>-<6 block digits>"]),
])
def test_bad_supernet_raises_one_clear_error(text, must_contain):
    with pytest.raises(ValueError) as exc:
        parse_supernet(text)
    msg = str(exc.value)
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg, (part, msg)


# --------------------------------------------------------------------------- bad subnet strings
def _replace_group(text: str, prefix: str, new_values: str) -> str:
    parts = text.split("_")
    i = "dkwer".index(prefix)
    parts[i] = prefix + new_values
    return "_".join(parts)


def _set_token(text: str, prefix: str, index: int, value: str) -> str:
    parts = text.split("_")
    i = "dkwer".index(prefix)
    values = parts[i][1:].split("#")
    values[index] = value
    parts[i] = prefix + "#".join(values)
    return "_".join(parts)


def _with_extra_block(text: str, stage_index: int, n: int = 1) -> str:
    """`text` with the last block of stage `stage_index` repeated n more times (depth + n, lists consistent)."""
    cfg = parse_subnet(text)
    stages = cfg.per_stage()
    stages[stage_index] = stages[stage_index] + [stages[stage_index][-1]] * n
    return str(SubnetConfig.from_stages(stages, cfg.resolution))


# (bad string, substrings the message must contain: the bad token and the allowed values)
BAD_SUBNETS = {
    "depth_count": (_replace_group(VNNI_A0, "d", "1#1#2#2#2#2#2"), ["7 entries", "expected 8", "first_conv"]),
    "depth_value": (_with_extra_block(VNNI_A0, 7, 2), ["stage6 depth 3", "[1, 2]"]),
    "depth_value_stage0": (_with_extra_block(VNNI_A0, 1, 2), ["stage0 depth 3", "[1, 2]"]),
    "kernel_value": (_set_token(VNNI_A0, "k", 2, "7"), ["stage1", "kernel 7", "[3, 5]"]),
    "kernel_count": (_replace_group(VNNI_A0, "k", "#".join(["3"] * 12)), ["kernel list has 12", "expected 13"]),
    "width_count": (_replace_group(VNNI_A0, "w", "16#16"), ["width list has 2", "expected 13"]),
    "expand_count": (_replace_group(VNNI_A0, "e", "0#0.5"), ["expand list has 2", "expected 13"]),
    "width_value": (_set_token(VNNI_A0, "w", 2, "40"), ["stage1", "width 40", "[32, 48]"]),
    "width_outside_window": (_set_token(VNNI_A0, "w", 2, "64"), ["width 64", "[32, 48]"]),
    "expand_value": (_set_token(VNNI_A0, "e", 2, "5.0"), ["stage1", "expand 5.0", "['4.0', '6.0', '8.0']"]),
    "expand_missing": (_set_token(VNNI_A0, "e", 2, "0"), ["expand 0", "['4.0', '6.0', '8.0']"]),
    "first_conv_expand": (_set_token(VNNI_A0, "e", 0, "1.0"), ["first_conv", "expand 1.0", "['0']"]),
    "resolution_value": (_replace_group(VNNI_A0, "r", "170"), ["resolution 170", "[160, 176, 192, 208, 224]"]),
    "resolution_nonnumeric": (_replace_group(VNNI_A0, "r", "16O"), ["'r16O'", "r<int>"]),
    "kernel_nonnumeric": (_set_token(VNNI_A0, "k", 3, "x"), ["kernel token 'x'", "integer"]),
    "width_nonnumeric": (_set_token(VNNI_A0, "w", 3, "3.5"), ["width token '3.5'", "integer"]),
    "depth_nonnumeric": (_set_token(VNNI_A0, "d", 0, ""), ["depth token ''", "integer"]),
    "expand_nonnumeric": (_set_token(VNNI_A0, "e", 3, "four"), ["expand token 'four'", "not a number"]),
    "group_order": ("k3_d1_w16_e0_r160", ["d.._k.._w.._e.._r..", "['k', 'd', 'w', 'e', 'r']"]),
    "group_missing": (VNNI_A0.rsplit("_", 1)[0], ["5 '_'-separated groups"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SUBNETS))
def test_bad_subnet_raises_one_clear_error(case):
    text, must_contain = BAD_SUBNETS[case]
    with pytest.raises(ValueError) as exc:
        parse_subnet(text, parse_supernet(VNNI))
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.__cause__ is None
    for part in must_contain:
        assert part in msg, (case, part, msg)


def test_unvalidated_parse_checks_only_structure():
    # without a supernet the values are not checked, the counts are
    cfg = parse_subnet(_set_token(VNNI_A0, "k", 4, "9"))
    assert cfg.kernels[4] == 9
    with pytest.raises(ValueError, match="kernel list has 12"):
        parse_subnet(_replace_group(VNNI_A0, "k", "#".join(["3"] * 12)))


def test_validate_subnet_against_other_supernet():
    # a pixel4 subnet is not valid in the vnni supernet (stage0 is a ResNet with e=0.5 there)
    with pytest.raises(ValueError, match=re.escape("stage0 block 0 (ResNet): expand 1.0 not in ['0.5']")):
        parse_subnet(SUBNETS["SEQnet@pixel4-A2"]["arch"], parse_supernet(VNNI))


# --------------------------------------------------------------------------- LUT sub-stage strings
@pytest.mark.parametrize("text, blocks", [
    ("5#32#8_3#40#3", [(5, 32, 8), (3, 40, 3)]),
    ("3#32#None_3#32#None", [(3, 32, None), (3, 32, None)]),
    ("3#48#0.5_5#64#1.5_7#64#1.0", [(3, 48, 0.5), (5, 64, 1.5), (7, 64, 1.0)]),
    ("7#64#1.0", [(7, 64, 1.0)]),
    ("3#32#4_5#48#2", [(3, 32, 4), (5, 48, 2)]),
])
def test_substage_round_trip(text, blocks):
    parsed = parse_substage(text)
    assert parsed == blocks
    assert format_substage(parsed) == text
    assert [type(e) for _, _, e in parsed] == [type(e) for _, _, e in blocks]


@pytest.mark.parametrize("space_name, stage_name, index, text", [
    ("mobilew", "stage1", 0, "3#32#None_3#32#None"),        # V1Dual
    ("mobilew", "stage1", 1, "5#32#8_3#24#3"),              # MobileNetV2Res
    ("mobilew", "stage3", 3, "5#64#1.5_3#56#0.5"),          # ResNet (float expands)
    ("mobilew", "stage2", 4, "7#48#4_3#72#1"),              # FusedMBConvSERes
    ("onnxw", "stage6", 4, "7#448#1.0"),                    # ResNetSE, depth 1
])
def test_substage_validates_against_spec(space_name, stage_name, index, text):
    space = get_superspace(space_name)
    spec, stage = space.candidates[index], space.stage(stage_name)
    assert format_substage(parse_substage(text, spec, stage)) == text


@pytest.mark.parametrize("text, index, window, must_contain", [
    ("9#32#None_3#32#None", 0, None, ["kernel 9", "[3, 5, 7]"]),
    ("3#32#5_3#32#3", 1, None, ["expand 5", "[3, 6, 8]"]),
    ("3#32#0.75_3#32#1.5", 3, None, ["expand 0.75", "[0.5, 1.0, 1.5]"]),
    ("3#32#3", 1, None, ["depth 1", "[2, 3, 4]"]),
    ("3#36#3_3#32#3", 1, None, ["width 36", "[24, 32, 40]"]),
    ("3#40#3_3#32#3", 1, (24, 32), ["width 40", "[24, 32]"]),
    ("3#32_3#32#3", 1, None, ["'3#32'", "k#w#e"]),
    ("3#x#3_3#32#3", 1, None, ["'3#x#3'", "non-numeric"]),
])
def test_bad_substage(text, index, window, must_contain):
    space = get_superspace("mobilew")
    with pytest.raises(ValueError) as exc:
        parse_substage(text, space.candidates[index], space.stage("stage1"), window)
    for part in must_contain:
        assert part in str(exc.value), (part, str(exc.value))
