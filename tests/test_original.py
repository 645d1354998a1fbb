"""The original SpaceEvo's checkpoints: every key both ways, and the same logits as the original code computes.

The fixtures in tests/data were made with the original code (microsoft/Moonlit, SpaceEvo): the key lists of the
released spaceevo@vnni and spaceevo@pixel4 supernets, and for one subnet of each the original's logits in fp32 and
with its LSQ+ fake quantization, for weights rebuilt from a seeded recipe.
"""
from __future__ import annotations

from pathlib import Path

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


def test_eval_specific_net_finds_the_released_files_where_the_original_keeps_them(original_checkpoints, digits_root,
                                                                                   capsys):
    import eval_specific_net
    from modules.cli import parse_args_with_config

    fixture, paths = original_checkpoints
    exp = fixture["expected"]
    name = next(n for n, sub in (("SEQnet@vnni-A0", "vnni"), ("SEQnet@pixel4-A4", "pixel4")) if sub in exp["subnet_name"])
    out = paths["lsq"].parents[2]  # <output_dir>/supernet_training/spaceevo@.../lsq.pth
    argv = ["--model_name", name, "--dataset_dir", str(digits_root), "--output_dir", str(out), "--max_batches", "1",
            "--num_calib_batches", "1", "--batch_size", "8", "--calib_batch_size", "8"]
    for extra in ([], ["--quant_mode"]):  # fp32 (checkpoint.pth), then the original's bare switch (lsq.pth)
        rows = eval_specific_net.main(parse_args_with_config(eval_specific_net.get_args_parser(), argv + extra))
        assert [(r["name"], r["subnet"]) for r in rows] == [(name, exp["subnet"])]
        assert 0.0 <= rows[0]["top1"] <= 100.0
    with pytest.raises(FileNotFoundError, match=r"put the released spaceevo@\S+ lsq.pth at .*supernet_training"):
        eval_specific_net.main(parse_args_with_config(eval_specific_net.get_args_parser(),
                                                      [*argv[:4], "--output_dir", str(out / "elsewhere"),
                                                       "--quant_mode"]))


def _tiny_original_checkpoint(out, encoding: str, lsq: bool):
    """A tiny supernet written in the original's format and directory layout (our exporter writes exactly the
    original's keys, checked against its real key lists above)."""
    torch.manual_seed(0)
    net = supernet_from_encoding(encoding, num_classes=10)
    if lsq:
        set_quant_mode(net, "lsq", "original")
        with torch.no_grad():
            net(torch.randn(4, 3, 64, 64))  # min-max init of the scalars
    name = "lsq.pth" if lsq else "checkpoint.pth"
    path = save_original_checkpoint(original.to_original_state(net), out / "supernet_training" / f"{encoding}-align0"
                                    / name, encoding)
    return net, path


def test_lsq_training_starts_from_the_originals_fp32_checkpoint(tmp_path, digits_root):
    import train_supernet
    from modules.cli import parse_args_with_config
    from modules.subnet_search import load_supernet_checkpoint

    enc = "tiny-111111-000000"
    net, _ = _tiny_original_checkpoint(tmp_path, enc, lsq=False)
    argv = ["--superspace", "tiny", "--supernet_choice", enc.split("-", 1)[1], "--quant_mode", "--output_dir",
            str(tmp_path), "--data_path", str(digits_root), "--image_size", "32", "--batch_size_per_gpu", "8",
            "--max_train_samples", "16", "--valid_size", "8", "--eval_batch_size", "8", "--bn_calib_batches", "1",
            "--valid_freq", "1", "--lsq_epochs", "1", "--lsq_warmup_epochs", "0", "--lsq_base_lr", "1e-30",
            "--weight_decay", "0", "--threads", "1", "--no-progress", "--no-plot"]
    assert train_supernet.main(parse_args_with_config(train_supernet.get_args_parser(), argv)) == 0
    trained, info = load_supernet_checkpoint(tmp_path / "supernet_training" / enc / "lsq.pth", log=lambda m: None)
    assert info["quant_mode"] == "lsq"
    # lr 1e-30 (below every weight's float32 resolution): the weights are still the original checkpoint's
    w = dict(trained.named_parameters())
    for key, value in net.named_parameters():
        assert torch.allclose(w[key].detach(), value.detach(), rtol=1e-6, atol=1e-20), key


def test_original_lsq_checkpoint_deploys_to_onnx_int8(tmp_path, digits_root):
    import export_subnet
    from modules import deploy
    from modules.cli import parse_args_with_config
    from modules.subnet_search import load_subnet_checkpoint

    enc = "tiny-151122-000000"
    _, path = _tiny_original_checkpoint(tmp_path, enc, lsq=True)
    argv = ["--checkpoint", str(path), "--subnet", "max", "--data_dir", str(digits_root), "--image_size", "32",
            "--num_calib_batches", "2", "--calib_batch_size", "16", "--quant_preset", "ort",
            "--output", str(tmp_path / "sub.pth"), "--output_dir", str(tmp_path)]
    export_subnet.main(parse_args_with_config(export_subnet.get_args_parser(), argv))
    model = load_subnet_checkpoint(tmp_path / "sub.pth")
    assert deploy.model_preset(model) == "ort"
    onnx_file = deploy.export_onnx_int8(model, tmp_path / "sub_int8.onnx")
    x = torch.randn(16, 3, model.resolution, model.resolution, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
        torch.testing.assert_close(deploy.deploy_model(model, "torch")(x).numpy(), ref, rtol=0, atol=0)
    y = deploy.run_onnx_batch(onnx_file, x)
    # an untrained net with tiny logits: ORT's integer requantization moves them by a few %, not the winner
    assert deploy.relative_error(y, ref) < 0.1 and (y.argmax(1) == ref.argmax(1)).mean() >= 0.9
    import onnx
    ops = {n.op_type for n in onnx.load(onnx_file).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ graph: ORT fuses it into QLinearConv


def test_downstream_fine_tunes_a_released_subnet_by_name(original_checkpoints, digits_root):
    """The original's `downstream_cls.py --subnet_name SEQnet@... --imagenet_path P`: the subnet comes out of the
    released supernet checkpoint (LSQ+, original preset), BN recalibrated, and is fine-tuned with a new head."""
    import downstream_cls
    from modules.cli import parse_args_with_config
    from modules.subnet_search import load_subnet_checkpoint

    fixture, paths = original_checkpoints
    name = "SEQnet@vnni-A0" if "vnni" in fixture["expected"]["subnet_name"] else "SEQnet@pixel4-A0"
    out = paths["lsq"].parents[2]
    argv = ["--subnet_name", name, "--imagenet_path", str(digits_root), "--data_dir", str(digits_root),
            "--output_dir", str(out), "--num_calib_batches", "1", "--calib_batch_size", "8", "--epochs", "1",
            "--batch_size", "8", "--steps_per_epoch", "2", "--max_eval_batches", "1", "--image_size", "32",
            "--fresh"]
    result = downstream_cls.main(parse_args_with_config(downstream_cls.get_args_parser(), argv))
    from modules.named_models import get_named_model

    extracted = load_subnet_checkpoint(out / "subnets" / f"{name}.pth")
    assert str(extracted.get_active_subnet_config()) == get_named_model(name).subnet
    assert {q.preset for q in quantizers(extracted) if q.enabled} == {"original"}
    tuned = load_subnet_checkpoint(Path(result["run_dir"]) / "final.pth")
    assert tuned.logits.linear.weight.shape[0] == 10 and result["quant_mode"] == "lsq"


def test_convert_checkpoint_both_ways(tmp_path):
    import convert_checkpoint
    from modules.checkpoint import load_checkpoint
    from modules.cli import parse_args_with_config
    from modules.subnet_search import load_supernet_checkpoint

    enc = "tiny-151122-000000"
    _, orig_path = _tiny_original_checkpoint(tmp_path, enc, lsq=True)

    def convert(src, out):
        return convert_checkpoint.main(parse_args_with_config(convert_checkpoint.get_args_parser(),
                                                              ["--checkpoint", str(src), "--output", str(out)]))

    assert convert(orig_path, tmp_path / "ours.pth")["format"] == "ours"
    assert convert(tmp_path / "ours.pth", tmp_path / "back" / "lsq.pth")["format"] == "original"
    nets = [load_supernet_checkpoint(p, enc, log=lambda m: None)[0]
            for p in (orig_path, tmp_path / "ours.pth", tmp_path / "back" / "lsq.pth")]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = [n(x) for n in nets]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    back = load_checkpoint(tmp_path / "back" / "lsq.pth")["state_dict"]
    assert list(back) == list(load_checkpoint(orig_path)["state_dict"])
    with pytest.raises(ValueError, match="is the input checkpoint"):
        convert(orig_path, orig_path)


def test_resume_continues_the_originals_fp32_run(tmp_path, digits_root):
    """--resume with no run of ours continues the original's fp32 run from its weights and epoch."""
    import train_supernet
    from modules.checkpoint import load_checkpoint
    from modules.cli import parse_args_with_config

    enc = "tiny-111111-000000"
    _, path = _tiny_original_checkpoint(tmp_path, enc, lsq=False)
    ckpt = load_checkpoint(path)
    ckpt["epoch"] = 1  # the original saved after its first of 2 epochs
    torch.save(ckpt, path)
    argv = ["--supernet", enc, "--resume", "--output_dir", str(tmp_path), "--data_path", str(digits_root),
            "--image_size", "32", "--batch_size_per_gpu", "8", "--max_train_samples", "16", "--valid_size", "8",
            "--eval_batch_size", "8", "--bn_calib_batches", "1", "--valid_freq", "1", "--epochs", "2",
            "--warmup_epochs", "0", "--threads", "1", "--no-progress", "--no-plot"]
    assert train_supernet.main(parse_args_with_config(train_supernet.get_args_parser(), argv)) == 0
    ours = load_checkpoint(tmp_path / "supernet_training" / enc / "checkpoint.pth")
    # one more epoch of 2 steps after the original's first, at the lr of step 2 of the schedule
    assert (ours["epoch"], ours["step"]) == (2, 4) and [row["epoch"] for row in ours["history"]] == [2]
