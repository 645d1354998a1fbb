"""Elastic supernet: extraction exactness for every block family, configs, sampling, zero_last_gamma.

Forwards run on the `tiny` superspace (onnxw's six block families) and on `tinymw`, a test-only
superspace with tiny's stages and mobilew's seven candidates and fixed blocks, so that every family of
both real superspaces (incl. MobileNetV3K3Res, MobileNetV2K3Res, FusedMBConvSERes, MobileNetV3Res with
swish) is checked at 32 px. The full-size spaces are only built, sampled, and run once at their min
subnet (160 px, batch 1).
"""
from __future__ import annotations

import dataclasses
import io
import random

import pytest
import torch
import torch.nn as nn

from modules import superspace as ss
from modules.blocks import MobileNetV1Dual, MobileNetV2, ResNet
from modules.encoding import parse_subnet, parse_supernet, validate_subnet
from modules.lsq import get_quant_mode, quantizers, set_quant_mode
from modules.supernet import DynamicStage, SuperNet, build_from_config, load_sliced_state_dict

TINY_MW = "tinymw"


def _tinymw() -> ss.SuperSpace:
    tiny, mobilew = ss.get_superspace("tiny"), ss.get_superspace("mobilew")
    return dataclasses.replace(tiny, name=TINY_MW, candidates=mobilew.candidates, fixed=dict(mobilew.fixed))


@pytest.fixture(scope="module", autouse=True)
def register_tinymw():
    """Register the test-only superspace for this module (removed afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ss.SUPERSPACES, TINY_MW, _tinymw)
        yield
        ss._CACHE.pop(TINY_MW, None)


def _families():
    out = []
    for space_name, n in (("tiny", 6), (TINY_MW, 7)):
        for i in range(n):
            out.append(pytest.param(space_name, i, id=f"{space_name}-{i}"))
    return out


FAMILIES = _families()
WINDOWS = {"tiny": "010101", TINY_MW: "101010"}


def _family_name(space_name: str, index: int) -> str:
    return (_tinymw() if space_name == TINY_MW else ss.get_superspace(space_name)).candidates[index].name


def _init_flags(model: nn.Module) -> list[bool]:
    """`initialized` of every quantizer that has learned state (some quantizers are stateless)."""
    return [bool(q.initialized) for q in quantizers(model) if hasattr(q, "initialized")]


def _trained_supernet(space_name: str, index: int, quant: str | None = None, seed: int = 0) -> SuperNet:
    """A supernet of one block family in all six stages, with BN statistics from a few random subnets."""
    torch.manual_seed(seed)
    net = SuperNet(parse_supernet(f"{space_name}-{str(index) * 6}-{WINDOWS[space_name]}"))
    if quant:
        set_quant_mode(net, "lsq", quant)
    net.train()
    rng = random.Random(seed)
    with torch.no_grad():
        net.set_max_subnet()
        net(torch.randn(2, 3, 32, 32))  # the LSQ init runs on the max subnet
        for _ in range(3):
            net.sample_active_subnet(rng)
            net(torch.randn(2, 3, 32, 32) * 2 + 0.5)
    bn_means = [m.running_mean.abs().sum().item() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(bn_means) > 0  # BN stats are not the defaults
    return net.eval()


def _subnet_modes(net: SuperNet, rng: random.Random, n_random: int):
    yield "max", net.set_max_subnet()
    yield "min", net.set_min_subnet()
    for i in range(n_random):
        yield f"random{i}", net.sample_active_subnet(rng)


def _check_extraction(net: SuperNet, quant: str | None, n_random: int = 3):
    """max, min and `n_random` random subnets: extracted == active supernet; the last one is also rebuilt
    from its JSON config and loaded strictly."""
    x = torch.randn(2, 3, 32, 32)
    rng = random.Random(1)
    seen = set()
    for label, cfg in _subnet_modes(net, rng, n_random):
        seen.add(str(cfg))
        assert net.get_active_subnet_config() == cfg
        sub = net.get_active_subnet(preserve_weight=True)
        assert not sub.training and sub.static_config == cfg
        assert get_quant_mode(sub) == ("lsq" if quant else "fp32")
        assert sub.get_active_subnet_config() == cfg
        with torch.no_grad():
            ref, out = net(x), sub(x)
        assert out.shape == (2, net.num_classes)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{label} {cfg}")
        assert sum(p.numel() for p in sub.parameters()) <= sum(p.numel() for p in net.parameters())
    assert len(seen) >= 3  # max, min and random subnets differ

    # the JSON config rebuilds the same architecture; the state dict loads strictly
    rebuilt = build_from_config(sub.config_dict())
    if quant:
        set_quant_mode(rebuilt, "lsq", quant)
    rebuilt.load_state_dict(sub.state_dict(), strict=True)
    assert str(rebuilt.get_active_subnet_config()) == str(cfg)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("space_name, index", FAMILIES)
def test_extracted_subnet_matches_supernet_fp32(space_name, index):
    _check_extraction(_trained_supernet(space_name, index), None)


@pytest.mark.parametrize("space_name, index", FAMILIES)
def test_extracted_subnet_matches_supernet_lsq(space_name, index):
    net = _trained_supernet(space_name, index, quant="ort")
    assert any(_init_flags(net.stages[2]))
    _check_extraction(net, "ort", n_random=1)


@pytest.mark.parametrize("encoding", ["tiny-012345-010101", f"{TINY_MW}-654321-101010"])
def test_mixed_families_extraction_lsq_original_preset(encoding):
    torch.manual_seed(3)
    net = SuperNet(parse_supernet(encoding))
    set_quant_mode(net, "lsq", "original")
    net.train()
    rng = random.Random(3)
    with torch.no_grad():
        for _ in range(3):
            net.sample_active_subnet(rng)
            net(torch.randn(4, 3, 32, 32))
    net.eval()
    _check_extraction(net, "original", n_random=2)


def test_extraction_in_train_mode_uses_batch_statistics_identically():
    net = _trained_supernet("tiny", 3)
    net.train()
    net.sample_active_subnet(random.Random(5))
    sub = net.get_active_subnet()
    assert sub.training
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(sub(x), net(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- standalone stages
def _all_specs():
    specs = {}
    for name in ("onnxw", "mobilew"):
        for i, spec in enumerate(ss.get_superspace(name).candidates):
            specs[f"{name}-{i}-{spec.name}"] = spec
    return specs


ALL_SPECS = _all_specs()


@pytest.mark.parametrize("key", sorted(ALL_SPECS))
def test_dynamic_stage_extraction_every_family(key):
    """A block-KD style elastic stage vs the static stage `from_blocks` with sliced weights (every family of
    both real superspaces, with their real kernel / expand / activation / SE choices, at small widths)."""
    spec = ALL_SPECS[key]
    torch.manual_seed(4)
    stage = DynamicStage(spec, in_list=(8, 16), width_list=(16, 24), depth_list=(1, 2, 3), stride=2)
    rng = random.Random(4)
    stage.train()
    with torch.no_grad():
        for _ in range(3):
            stage.sample(rng)
            stage(torch.randn(3, rng.choice((8, 16)), 12, 12))
    stage.eval()
    for mode in ("max", "min", "random", "random", "random"):
        blocks = stage.sample(rng, mode)
        assert stage.active_config() == blocks
        cin = 16 if mode == "max" else 8 if mode == "min" else rng.choice((8, 16))
        static = DynamicStage.from_blocks(spec, cin, blocks, stride=2)
        load_sliced_state_dict(static, stage.state_dict())
        static.eval()
        assert static.active_config() == [(k, w, e) for k, w, e in blocks]
        x = torch.randn(2, cin, 12, 12)
        with torch.no_grad():
            ref, out = stage(x), static(x)
        assert out.shape == (2, blocks[-1][1], 6, 6)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{key} {mode} {blocks}")


def test_k3_stack_kernel_is_stack_depth():
    spec = ss.get_superspace("mobilew").candidates[5]  # MobileNetV3K3Res
    stage = DynamicStage(spec, (16,), (16,), (1,), 1)
    block = stage.blocks[0]
    assert len(block.dw.conv.convs) == 3 and all(c.max_kernel == 3 for c in block.dw.conv.convs)
    static = DynamicStage.from_blocks(spec, 16, [(5, 16, 3)], 1)
    assert len(static.blocks[0].dw.conv.convs) == 2


# --------------------------------------------------------------------------- configs and sampling
@pytest.fixture(scope="module")
def full_supernets():
    """Supernets built once per encoding on the meta device (no weights: sampling and configs only)."""
    cache = {}

    def get(encoding):
        if encoding not in cache:
            with torch.device("meta"):
                cache[encoding] = SuperNet(parse_supernet(encoding)).eval()
        return cache[encoding]
    return get


FULL_FAMILIES = [pytest.param(f"onnxw-{str(i) * 6}-000000", id=f"onnxw-{i}") for i in range(6)] + \
    [pytest.param(f"mobilew-{str(i) * 6}-000000", id=f"mobilew-{i}") for i in range(7)]


@pytest.mark.parametrize("encoding", FULL_FAMILIES)
def test_full_size_family_builds_samples_and_extracts_min(encoding):
    """Full-size supernets of every family: built, sampled configs validate, and the extracted min subnet
    (160 px, batch 1) matches the supernet. Exactness for random subnets of the same block families is
    checked on tiny / tinymw above."""
    torch.manual_seed(0)
    net = SuperNet(parse_supernet(encoding)).eval()
    space = net.space
    for stage, cfg_stage in zip(net.stages, space.stages):
        assert len(stage.blocks) == max(cfg_stage.depth_list)
    rng = random.Random(7)
    for _ in range(5):
        cfg = net.sample_active_subnet(rng)
        validate_subnet(cfg, net.choice)
        assert parse_subnet(str(cfg), net.choice) == cfg
    cfg = net.set_min_subnet()
    assert cfg.resolution == space.supernet_hw_list[0] == 160
    assert cfg.depths == tuple(min(s.depth_list) for s in space.stages[:8])
    sub = net.get_active_subnet()
    x = torch.randn(1, 3, 64, 64)  # resized to 160 by both networks
    with torch.no_grad():
        ref, out = net(x), sub(x)
    assert out.shape == (1, 1000)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert net.set_max_subnet().resolution == 224


@pytest.mark.parametrize("encoding", ["tiny-345012-101010", f"{TINY_MW}-123456-010101",
                                      "onnxw-151122-023231", "mobilew-122222-155400"])
def test_config_round_trips_through_set_active_subnet(encoding, full_supernets):
    net = full_supernets(encoding)
    rng = random.Random(11)
    for _ in range(10):
        cfg = net.sample_active_subnet(rng)
        text = str(net.get_active_subnet_config())
        net.set_max_subnet()
        net.set_active_subnet(cfg)
        assert net.get_active_subnet_config() == cfg and net.active_resolution == cfg.resolution
        net.set_min_subnet()
        net.set_active_subnet(text)  # the string form is parsed and validated
        assert str(net.get_active_subnet_config()) == text


def test_set_active_subnet_rejects_invalid_config(full_supernets):
    net = full_supernets("onnxw-151122-023231")
    text = str(net.set_min_subnet())
    bad = text.replace("_r160", "_r100")
    with pytest.raises(ValueError, match="resolution 100"):
        net.set_active_subnet(bad)
    cfg = parse_subnet(text)
    wrong_width = dataclasses.replace(cfg, widths=(cfg.widths[0] + 1,) + cfg.widths[1:])
    with pytest.raises(ValueError, match="width 17 not in window"):
        net.set_active_subnet(wrong_width)


@pytest.mark.parametrize("encoding", ["tiny-012345-010101", "onnxw-151122-023231", "mobilew-332160-134200"])
def test_sampling_is_reproducible(encoding, full_supernets):
    net = full_supernets(encoding)
    rng1, rng2 = random.Random(42), random.Random(42)
    seq1 = [str(net.sample_active_subnet(rng1)) for _ in range(20)]
    seq2 = [str(net.sample_active_subnet(rng2)) for _ in range(20)]
    assert seq1 == seq2
    assert len(set(seq1)) > 10
    rng3 = random.Random(43)
    assert [str(net.sample_active_subnet(rng3)) for _ in range(20)] != seq1
    # a second supernet object with the same encoding samples the same sequence
    with torch.device("meta"):
        twin = SuperNet(parse_supernet(encoding))
    rng4 = random.Random(42)
    assert [str(twin.sample_active_subnet(rng4)) for _ in range(20)] == seq1


@pytest.mark.parametrize("encoding", ["tiny-012345-010101", "onnxw-151122-023231", "mobilew-122222-155400"])
def test_every_resolution_of_supernet_hw_list_is_sampled(encoding, full_supernets):
    """The original sampled {192, 208, 224} only: 160 was seen by the min net, 176 never."""
    net = full_supernets(encoding)
    rng = random.Random(0)
    seen = {net.sample_active_subnet(rng).resolution for _ in range(200)}
    assert seen == set(net.space.supernet_hw_list)
    if not encoding.startswith("tiny"):
        assert seen == {160, 176, 192, 208, 224}
    assert net.set_min_subnet().resolution == min(net.space.supernet_hw_list)
    assert net.set_max_subnet().resolution == max(net.space.supernet_hw_list)


def test_sampling_covers_every_choice():
    net = SuperNet(parse_supernet("tiny-135024-101010"))
    rng = random.Random(0)
    samples = [net.sample_active_subnet(rng) for _ in range(300)]
    for i, stage_name in enumerate(ss.SUBNET_STAGES):
        spec, stage, window = net.choice.stage_spec(stage_name)
        depths = {s.depths[i] for s in samples}
        assert depths == set(stage.depth_list), stage_name
        blocks = [b for s in samples for b in s.per_stage()[i]]
        assert {b[0] for b in blocks} == set(spec.kernel_list)
        assert {b[1] for b in blocks} == set(window)
        assert {b[2] for b in blocks} == set(spec.expand_list)


# --------------------------------------------------------------------------- zero_last_gamma
@pytest.mark.parametrize("space_name, index", FAMILIES)
def test_zero_last_gamma(space_name, index):
    net = SuperNet(parse_supernet(f"{space_name}-{str(index) * 6}-{WINDOWS[space_name]}"))
    net.zero_last_gamma()
    zeroed = 0
    for stage in net.stages:
        for block in stage.blocks:
            bn = block.last_bn() if hasattr(block, "last_bn") else None
            if isinstance(block, MobileNetV2) and not block.force_residual:
                assert bn is None  # plain V2 (mobilew stage0) is left unchanged
                assert block.project.bn.weight.abs().sum() > 0
            elif isinstance(block, MobileNetV1Dual):
                assert bn is None  # BN -> ReLU: a zero gamma would kill the branch for good
                assert block.pw2.bn.weight.abs().sum() > 0
                zeroed += 1  # counted: left alive on purpose
            elif bn is not None:
                assert torch.all(bn.weight == 0)
                zeroed += 1
    assert zeroed >= sum(len(s.blocks) for s in net.stages[2:])
    # a block with an identity shortcut is now the identity (ResNet: relu of it)
    net.eval()
    block = net.stages[5].blocks[1]  # stage4 (stride 1), second block
    w = block.width_list[0]
    block.set_active(block.kernel_list[0], w, block.expand_list[0])
    x = torch.randn(2, w, 4, 4)
    with torch.no_grad():
        out = block(x)
    if not isinstance(block, MobileNetV1Dual):
        torch.testing.assert_close(out, torch.relu(x) if isinstance(block, ResNet) else x)


# --------------------------------------------------------------------------- LSQ supernet state
def test_lsq_supernet_state_dict_round_trip():
    net = _trained_supernet("tiny", 2, quant="ort")
    net.set_min_subnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = SuperNet(parse_supernet(str(net.choice)))
    set_quant_mode(fresh, "lsq", "ort")
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh.eval().set_min_subnet()
    flags = _init_flags(net)
    assert any(flags) and _init_flags(fresh) == flags
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
