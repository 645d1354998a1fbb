"""Teachers: EfficientNet-B5 loading from a local state dict, shape checks, the tiny teacher and its cache."""
from __future__ import annotations

import os

import pytest
import torch

from modules.superspace import get_superspace
from modules.teacher import (EFFNET_B5_CHANNELS, build_tiny_teacher, check_teacher, efficientnet_b5_teacher,
                             get_teacher, load_tiny_teacher, tiny_teacher_arch, tiny_teacher_path,
                             train_tiny_teacher)


def test_efficientnet_b5_loads_a_local_state_dict(tmp_path):
    from torchvision.models import efficientnet_b5

    torch.manual_seed(0)
    net = efficientnet_b5(weights=None)
    path = tmp_path / "b5.pth"
    torch.save({"model": net.state_dict()}, path)  # wrapped dicts are accepted too
    teacher = get_teacher("onnxw", teacher_weights=path, hw_list=(160,))
    assert teacher.stage_channels == {1: (24, 40), 2: (40, 64), 3: (64, 128), 4: (128, 176), 5: (176, 304),
                                      6: (304, 512)}
    # stage3 = features[4]
    assert torch.equal(teacher.stages[3][0].block[0][0].weight, net.features[4][0].block[0][0].weight)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        feats = teacher.forward_stages(x, (2, 3))
        assert feats[2][1].shape == (1, 64, 20, 20) and torch.equal(feats[2][1], feats[3][0])
        x_in, x_out = teacher.forward_to_stage(x, 3)
    assert torch.allclose(x_out, feats[3][1]) and x_out.shape == (1, 128, 10, 10)


def test_efficientnet_b5_without_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--teacher_weights PATH.*nothing is downloaded"):
        get_teacher("mobilew")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        efficientnet_b5_teacher(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="state dict does not match"):
        efficientnet_b5_teacher(bad)


def test_teacher_shape_mismatch_is_one_clear_error():
    space = get_superspace("tiny")
    arch = tiny_teacher_arch(space)
    arch["strides"][6] = 2  # stage5 with stride 2: the tiny superspace keeps stride 1 there
    with pytest.raises(ValueError, match="stage5 output .* expects"):
        check_teacher(build_tiny_teacher(arch), space)
    with pytest.raises(ValueError, match=r"widths .* expected"):
        check_teacher(build_tiny_teacher(tiny_teacher_arch(space)), space, (32,), EFFNET_B5_CHANNELS)


def test_forward_stages_is_one_pass_of_forward_to_stage():
    space = get_superspace("tiny")
    torch.manual_seed(0)
    t = build_tiny_teacher(tiny_teacher_arch(space)).eval()
    channels = check_teacher(t, space)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = t.forward_stages(x)
        for i in range(1, 7):
            a, b = t.forward_to_stage(x, i)
            assert torch.equal(a, feats[i][0]) and torch.equal(b, feats[i][1])
            assert (a.shape[1], b.shape[1]) == channels[i]
            assert a.shape[-1] == space.stage_input_hw(48, f"stage{i}")
            if i < 6:
                assert torch.equal(feats[i][1], feats[i + 1][0])
    with pytest.raises(ValueError, match="not in 1..6"):
        t.forward_stages(x, (7,))


def test_tiny_teacher_trains_caches_and_uses_per_resolution_bn(tmp_path, digits_root):
    space = get_superspace("tiny")
    path = tiny_teacher_path(tmp_path)
    ckpt = train_tiny_teacher(space, digits_root, path, epochs=1, max_steps_per_epoch=2, calib_images=64)
    assert path.is_file() and set(ckpt["val_acc"]) == {32, 48, 64}
    mtime = os.path.getmtime(path)
    teacher = get_teacher("tiny", output_dir=tmp_path, data_dir=digits_root)  # cached: no retraining
    assert os.path.getmtime(path) == mtime and teacher.val_acc == ckpt["val_acc"]
    bn = teacher.stem[1]
    with torch.no_grad():
        for r in (64, 32):
            teacher(torch.zeros(1, 3, r, r))
            assert torch.equal(bn.running_mean, teacher.bn_stats[r]["stem.1.running_mean"])
    assert not torch.equal(teacher.bn_stats[32]["stem.1.running_mean"], teacher.bn_stats[64]["stem.1.running_mean"])
    loaded, _ = load_tiny_teacher(path)
    assert sorted(loaded.bn_stats) == [32, 48, 64]
    with pytest.raises(FileNotFoundError, match="train_teacher.py"):
        get_teacher("tiny", output_dir=tmp_path / "empty", train_if_missing=False)
