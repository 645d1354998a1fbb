"""The original SpaceEvo's checkpoints: every key both ways, and the same logits as the original code computes.

The fixtures in tests/data were made with the original code (microsoft/Moonlit, SpaceEvo): the key lists of the
released spaceevo@vnni and spaceevo@pixel4 supernets, and for one subnet of each the original's logits in fp32 and
with its LSQ+ fake quantization, for weights rebuilt from a seeded recipe.
"""
from __future__ import annotations

import pytest
import torch

from conftest import original_fixture, original_state_dict, save_original_checkpoint
from modules import original
from modules.lsq import get_quant_mode, quantizers, set_quant_mode
from modules.supernet import supernet_from_encoding

SUPERNETS = {"vnni": "onnxw-151122-023231", "pixel4": "mobilew-122222-155400"}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["vnni", "pixel4"])
def test_every_original_key_is_mapped_with_its_shape_and_order(name):
    fixture = original_fixture(name)
    net = supernet_from_encoding(SUPERNETS[name])
    state = {k: torch.empty(shape) for k, shape in fixture["keys"]}
    original.check_original_state(state, net)  # names and shapes, or one error
    exported = original.to_original_state(net)
    assert [(k, tuple(v.shape)) for k, v in exported.items()] == fixture["keys"]
    # every one of our tensors has exactly one original key
    set_quant_mode(net, "lsq", "original")
    names = original.key_map(net)
    ours = [k for k in net.state_dict() if not k.endswith("quant.initialized")]
    assert sorted(names) == sorted(ours)
    assert len(set(names.values())) == len(names)


@pytest.fixture(scope="module", params=["vnni", "pixel4"])
def original_checkpoints(request, tmp_path_factory):
    """(fixture, {"fp32": checkpoint.pth, "lsq": lsq.pth}) in the original's format and directory layout."""
    fixture = original_fixture(request.param)
    root = tmp_path_factory.mktemp("orig") / "supernet_training" / fixture["expected"]["supernet_name"]
    enc = fixture["expected"]["supernet"]
    paths = {"fp32": save_original_checkpoint(original_state_dict(fixture, lsq=False), root / "checkpoint.pth", enc),
             "lsq": save_original_checkpoint(original_state_dict(fixture), root / "lsq.pth", enc)}
    return fixture, paths


@pytest.fixture
def threads_as_the_fixtures():
    """The fixtures' logits were computed with 2 threads. Rounding in the fake quantization makes LSQ+ logits
    sensitive to the convs' summation order: single-threaded kernels sum in another order, flip a few roundings
    and move the logits by ~1 % (2, 3, 4 or 8 threads all give the same result)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["fp32", "lsq"])
def test_original_checkpoint_gives_the_original_logits(original_checkpoints, mode, threads_as_the_fixtures):
    from modules.subnet_search import load_supernet_checkpoint

    fixture, paths = original_checkpoints
    exp = fixture["expected"]
    net, info = load_supernet_checkpoint(paths[mode], log=pytest.fail)
    assert (info["supernet"], info["quant_mode"], info["quant_preset"]) == \
        (exp["supernet"], mode, "original" if mode == "lsq" else None)
    if mode == "lsq":  # the original's rule: an op whose scalars left (sw, sa, beta) = (1, 1, 0) is initialised
        for m in net.modules():
            if hasattr(m, "act_quant") and hasattr(m, "weight_quant"):
                moved = m.weight_quant.scale.item() != 1 or m.act_quant.scale.item() != 1 or m.act_quant.offset.item() != 0
                assert bool(m.act_quant.initialized) == bool(m.weight_quant.initialized) == moved
    net.set_active_subnet(exp["subnet"])
    x = torch.randn((4, 3, exp["resolution"], exp["resolution"]), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = net(x)
        sub = net.get_active_subnet().eval()(x)  # extraction keeps weights, BN statistics and LSQ+ scalars
    ref = torch.tensor(exp[f"logits_{mode}"])
    assert _rel_l2(y, ref) <= (1e-5 if mode == "fp32" else 1e-3)
    assert torch.equal(y.argmax(1), ref.argmax(1))
    assert _rel_l2(sub, ref) <= (1e-5 if mode == "fp32" else 1e-3)
    if mode == "lsq":  # the fake quantization is really on: far from the fp32 logits
        assert _rel_l2(y, torch.tensor(exp["logits_fp32"])) > 0.05


def test_round_trip_both_ways(original_checkpoints):
    from modules.checkpoint import load_checkpoint
    from modules.subnet_search import load_supernet_checkpoint

    fixture, paths = original_checkpoints
    net, _ = load_supernet_checkpoint(paths["lsq"], log=pytest.fail)
    back = original.to_original_state(net)
    saved = {k[len("module."):]: v for k, v in load_checkpoint(paths["lsq"])["state_dict"].items()}
    assert list(back) == list(saved)
    # what the original computes with is kept exactly; channels it never uses come back neutral
    again, mode = original.from_original_state(back, supernet_from_encoding(str(net.choice)))
    assert mode == "lsq"
    own = net.state_dict()
    assert set(again) == set(own) and all(torch.equal(again[k], own[k]) for k in own)


def test_mismatch_names_the_first_differing_keys(original_checkpoints):
    fixture, _ = original_checkpoints
    state = original_state_dict(fixture)
    first = fixture["keys"][0][0]
    state.pop(first)
    state["stages.stage9.blocks.0.conv.weight"] = torch.zeros(1)
    net = supernet_from_encoding(fixture["expected"]["supernet"])
    with pytest.raises(ValueError, match=rf"1 missing key\(s\): {first};.*1 unexpected key\(s\): stages.stage9"):
        original.from_original_state(state, net, "lsq.pth")


def test_backend_presets_have_no_original_format():
    net = set_quant_mode(supernet_from_encoding("tiny-111111-000000"), "lsq", "ort")
    with pytest.raises(ValueError, match="original"):
        original.to_original_state(net)
    assert get_quant_mode(net) == "lsq"


def test_original_directory_names():
    assert original.supernet_from_dir_name("spaceevo@vnni") == "onnxw-151122-023231"
    assert original.supernet_from_dir_name("mobilew-312120-155501-align0") == "mobilew-312120-155501"
    assert original.supernet_from_dir_name("checkpoints") is None
