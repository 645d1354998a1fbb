"""Named models (`data/search_results.yaml`) and `eval_specific_net.py`: build, count, evaluate, clear errors."""
from __future__ import annotations

import argparse
import inspect
import random

import pytest
import torch
import yaml

import eval_specific_net as esn
from modules import named_models as nm
from modules.counter import count_params
from modules.data import build_dataset, build_loader
from modules.encoding import parse_subnet, parse_supernet
from modules.engine import evaluate_top1
from modules.lsq import set_quant_mode
from modules.supernet import SuperNet

SUPERNET_NAMES = ["spaceevo@pixel4", "spaceevo@pixel4-tiny", "spaceevo@pixel4-medium", "spaceevo@vnni",
                  "spaceevo@vnni-large"]
SUBNET_NAMES = [f"SEQnet@{p}-A{i}" for p in ("pixel4", "vnni") for i in range(5)]


# --------------------------------------------------------------------------- the registry
def test_registry_lists_the_released_models():
    assert nm.model_names(kind="supernet") == SUPERNET_NAMES
    assert nm.model_names(kind="subnet") == SUBNET_NAMES
    assert nm.model_names() == SUPERNET_NAMES + SUBNET_NAMES
    m = nm.get_named_model("SEQnet@vnni-A0")
    assert (m.kind, m.supernet_name, m.supernet) == ("subnet", "spaceevo@vnni", "onnxw-151122-023231")
    assert m.config.resolution == 160 and str(m.config) == m.subnet
    s = nm.get_named_model("spaceevo@pixel4-tiny")
    assert (s.kind, s.supernet, s.subnet, s.config) == ("supernet", "mobilew-332160-134200", None, None)


def test_unknown_name_is_one_clear_error():
    with pytest.raises(ValueError) as exc:
        nm.get_named_model("SEQnet@vnni-A5")
    msg = str(exc.value)
    assert "'SEQnet@vnni-A5'" in msg and "did you mean" in msg and "SEQnet@pixel4-A0" in msg and "\n" not in msg


@pytest.mark.parametrize("content, must_contain", [
    ("supernets: {a: onnxw-151122-093231}\n", ["supernet a", "window 9"]),
    ("supernets: {a: onnxw-151122-023231}\nsubnets: {b: {supernet: c, arch: x}}\n", ["subnet b", "'c'"]),
    ("supernets: {a: onnxw-151122-023231}\nsubnets: {b: {supernet: a}}\n", ["subnet b", "'arch'"]),
    ("supernets: {a: onnxw-151122-023231}\nsubnets: {b: {supernet: a, arch: d1_k3_w16_e0_r160}}\n",
     ["subnet b", "depth list has 1 entries"]),
    ("[1, 2]\n", ["expected mappings"]),
    ("supernets: [\n", ["not valid YAML"]),
])
def test_bad_results_file(tmp_path, content, must_contain):
    p = tmp_path / "results.yaml"
    p.write_text(content)
    with pytest.raises(ValueError) as exc:
        nm.load_named_models(p)
    for part in must_contain:
        assert part in str(exc.value), (part, str(exc.value))


def test_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nm.load_named_models(tmp_path / "nope.yaml")


@pytest.mark.parametrize("platform", ["pixel4", "vnni"])
def test_a0_is_the_min_subnet_of_its_supernet(platform):
    """Spec §1.4 [RUN]: each A0 is exactly the min subnet of its supernet."""
    a0 = nm.get_named_model(f"SEQnet@{platform}-A0")
    assert nm.extreme_subnet(a0.choice, "min") == a0.config


# --------------------------------------------------------------------------- build + forward
@pytest.mark.parametrize("name", SUBNET_NAMES)
def test_seqnet_builds_and_runs(name):
    torch.manual_seed(0)
    net = nm.build_named_model(name)
    cfg = nm.get_named_model(name).config
    assert not net.training and net.get_active_subnet_config() == cfg and net.active_resolution == cfg.resolution
    with torch.no_grad():
        out = net(torch.randn(2, 3, cfg.resolution, cfg.resolution))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SUPERNET_NAMES)
def test_supernet_builds_and_runs_max_and_min(name):
    torch.manual_seed(0)
    net = nm.build_named_model(name)
    m = nm.get_named_model(name)
    assert str(net.choice) == m.supernet
    # extreme_subnet (used by the table without building the supernet) agrees with the supernet
    assert net.set_max_subnet() == nm.extreme_subnet(m.choice, "max")
    with torch.no_grad():
        out_max = net(torch.randn(1, 3, 224, 224))
        assert net.set_min_subnet() == nm.extreme_subnet(m.choice, "min")
        out_min = net(torch.randn(2, 3, 160, 160))
    assert out_max.shape == (1, 1000) and out_min.shape == (2, 1000)
    assert torch.isfinite(out_max).all() and torch.isfinite(out_min).all()
    if m.name in ("spaceevo@pixel4", "spaceevo@vnni"):
        plat = "pixel4" if "pixel4" in m.name else "vnni"
        for i in range(5):  # every released subnet of this supernet can be activated in it
            net.set_active_subnet(nm.get_named_model(f"SEQnet@{plat}-A{i}").subnet)


# --------------------------------------------------------------------------- the script: table
def _args(*argv) -> argparse.Namespace:
    return esn.get_args_parser().parse_args(list(argv))


def test_script_layout():
    assert "eval_specific_net.py --all" in esn.__doc__ and "--model_name" in esn.__doc__
    assert inspect.signature(esn.main).parameters.keys() == {"args"}
    action = {a.dest: a for a in esn.get_args_parser()._actions}["model_name"]
    assert list(action.choices) == SUPERNET_NAMES + SUBNET_NAMES


def test_all_table(capsys):
    rows = esn.main(_args("--all"))
    out = capsys.readouterr().out
    names = [r["name"] for r in rows]
    expected = [f"{n} ({m})" for n in SUPERNET_NAMES for m in ("max", "min")] + SUBNET_NAMES
    assert names == expected
    lines = out.strip().splitlines()
    assert lines[0].split() == ["name", "res", "MMACs", "Mparams"] and len(lines) == 2 + len(rows)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        assert r["top1"] is None and r["mmacs"] > 10 and 4.4 < r["mparams"] < 200
        assert r["resolution"] == parse_subnet(r["subnet"]).resolution
        assert any(line.startswith(r["name"]) and f"{r['mmacs']:.2f}" in line for line in lines)
    for plat in ("pixel4", "vnni"):  # A0 is the min subnet: same numbers
        a0, mn = by_name[f"SEQnet@{plat}-A0"], by_name[f"spaceevo@{plat} (min)"]
        assert (a0["mmacs"], a0["mparams"], a0["subnet"]) == (mn["mmacs"], mn["mparams"], mn["subnet"])
        macs = [by_name[f"SEQnet@{plat}-A{i}"]["mmacs"] for i in range(5)]
        assert macs == sorted(macs)  # A0 < A1 < ... < A4
        assert by_name[f"spaceevo@{plat} (max)"]["resolution"] == 224


# --------------------------------------------------------------------------- the script: evaluation
TINY_SUPERNET = "tiny-012345-010101"


@pytest.fixture
def tiny_results(tmp_path, monkeypatch):
    """A results file with a tiny supernet and one of its subnets, installed as the default file."""
    net = SuperNet(parse_supernet(TINY_SUPERNET))
    sub = str(net.sample_active_subnet(random.Random(0)))
    p = tmp_path / "results.yaml"
    p.write_text(yaml.safe_dump({"supernets": {"tinynet@test": TINY_SUPERNET},
                                 "subnets": {"tinysub@test-A0": {"supernet": "tinynet@test", "arch": sub}}}))
    monkeypatch.setattr(nm, "RESULTS_YAML", p)
    return sub


def _trained_tiny_supernet(quant: str | None = None) -> SuperNet:
    torch.manual_seed(1)
    net = SuperNet(parse_supernet(TINY_SUPERNET), num_classes=10)
    if quant:
        set_quant_mode(net, "lsq", quant)
    net.train()
    with torch.no_grad():
        for res in (64, 32, 48):
            net.sample_active_subnet(random.Random(res))
            net(torch.randn(4, 3, 32, 32))
    return net.eval()


def _direct_top1(model, root, resolution, batches=2, batch_size=16):
    loader = build_loader(build_dataset(root, "val", train=False, image_size=resolution), batch_size, train=False)
    return evaluate_top1(model, loader, max_batches=batches)


EVAL = ("--batch_size", "16", "--max_batches", "2")


@pytest.mark.parametrize("quant", [None, "ort"])
def test_eval_subnet_from_supernet_checkpoint(tmp_path, digits_root, tiny_results, quant):
    net = _trained_tiny_supernet(quant)
    ckpt = tmp_path / "supernet.pth"
    torch.save({"model": net.state_dict(), "epoch": 3}, ckpt)
    qargs = ("--quant_mode", "lsq", "--quant_preset", quant) if quant else ()
    rows = esn.main(_args("--model_name", "tinysub@test-A0", "--dataset_path", str(digits_root), "--checkpoint",
                          str(ckpt), "--num_calib_batches", "0", *EVAL, *qargs))
    assert len(rows) == 1 and rows[0]["subnet"] == tiny_results
    net.set_active_subnet(tiny_results)
    expected = _direct_top1(net.get_active_subnet(), digits_root, rows[0]["resolution"])
    assert rows[0]["top1"] == pytest.approx(expected)
    assert 0 <= rows[0]["top1"] <= 100


def test_eval_supernet_max_and_min_with_bn_calibration(tmp_path, digits_root, tiny_results, capsys):
    net = _trained_tiny_supernet()
    ckpt = tmp_path / "supernet.pth"
    torch.save(net.state_dict(), ckpt)  # a bare state dict
    rows = esn.main(_args("--model_name", "tinynet@test", "--dataset_path", str(digits_root), "--checkpoint",
                          str(ckpt), "--num_calib_batches", "2", "--calib_batch_size", "8", *EVAL))
    assert [r["name"] for r in rows] == ["tinynet@test (max)", "tinynet@test (min)"]
    assert [r["resolution"] for r in rows] == [64, 32]
    assert all(0 <= r["top1"] <= 100 for r in rows)
    assert "top1(%)" in capsys.readouterr().out


def test_eval_standalone_named_subnet_checkpoint(tmp_path, digits_root):
    """A real named subnet (SEQnet@vnni-A0, 160 px) with a 10-class standalone checkpoint."""
    torch.manual_seed(2)
    net = nm.build_named_model("SEQnet@vnni-A0", num_classes=10)
    ckpt = tmp_path / "a0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)  # DDP keys
    rows = esn.main(_args("--model_name", "SEQnet@vnni-A0", "--dataset_path", str(digits_root), "--checkpoint",
                          str(ckpt), "--batch_size", "8", "--max_batches", "1"))
    assert rows[0]["top1"] == pytest.approx(_direct_top1(net, digits_root, 160, batches=1, batch_size=8))
    assert rows[0]["mparams"] == pytest.approx(count_params(net) / 1e6)  # a 10-class head (from the checkpoint)
    assert rows[0]["mparams"] < 7.7954 - 1.9  # the 1000-class SEQnet@vnni-A0 has 7.7954 M


@pytest.mark.parametrize("case", ["lsq_ckpt_fp32_mode", "fp32_ckpt_lsq_mode", "subnet_ckpt_for_supernet",
                                  "wrong_arch", "not_a_state_dict", "dataset_without_checkpoint", "nothing",
                                  "all_with_checkpoint", "missing_dataset"])
def test_eval_errors(tmp_path, digits_root, tiny_results, case):
    lsq_net = _trained_tiny_supernet("ort") if case == "lsq_ckpt_fp32_mode" else None
    fp32_net = SuperNet(parse_supernet(TINY_SUPERNET), num_classes=10)
    ckpt = tmp_path / "c.pth"
    argv, match = [], ""
    if case == "lsq_ckpt_fp32_mode":
        torch.save(lsq_net.state_dict(), ckpt)
        argv, match = ["--model_name", "tinynet@test", "--checkpoint", str(ckpt)], "--quant_mode lsq"
    elif case == "fp32_ckpt_lsq_mode":
        torch.save(fp32_net.state_dict(), ckpt)
        argv, match = ["--model_name", "tinynet@test", "--checkpoint", str(ckpt), "--quant_mode", "lsq"], \
            "no LSQ\\+ quantizer parameters"
    elif case == "subnet_ckpt_for_supernet":
        fp32_net.set_active_subnet(tiny_results)
        torch.save(fp32_net.get_active_subnet().state_dict(), ckpt)
        argv, match = ["--model_name", "tinynet@test", "--checkpoint", str(ckpt)], "missing key"
    elif case == "wrong_arch":
        torch.save(SuperNet(parse_supernet("tiny-543210-101010")).state_dict(), ckpt)
        argv, match = ["--model_name", "tinysub@test-A0", "--checkpoint", str(ckpt)], "does not match the model"
    elif case == "not_a_state_dict":
        torch.save({"epoch": 1}, ckpt)
        argv, match = ["--model_name", "tinysub@test-A0", "--checkpoint", str(ckpt)], "expected a state dict"
    elif case == "dataset_without_checkpoint":
        argv = ["--model_name", "tinysub@test-A0", "--dataset_path", str(digits_root), "--output_dir", str(tmp_path)]
        match = (rf"put the released tinynet@test checkpoint.pth at {tmp_path}/supernet_training/tinynet@test/"
                 r"checkpoint.pth \(or give --checkpoint\)")
    elif case == "nothing":
        argv, match = [], "--model_name NAME or --all"
    elif case == "all_with_checkpoint":
        torch.save(fp32_net.state_dict(), ckpt)
        argv, match = ["--all", "--checkpoint", str(ckpt)], "not --all"
    elif case == "missing_dataset":
        torch.save(fp32_net.state_dict(), ckpt)
        argv, match = ["--model_name", "tinynet@test", "--checkpoint", str(ckpt), "--dataset_path",
                       str(tmp_path / "nodata")], "does not exist"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        esn.main(_args(*argv))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from modules.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(esn.main, esn.get_args_parser(), ["--model_name", "SEQnet@vnni-A0", "--checkpoint",
                                                    str(tmp_path / "missing.pth")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint") and "missing.pth does not exist" in err[0]
    with pytest.raises(SystemExit) as exc:
        esn.get_args_parser().parse_args(["--model_name", "SEQnet@vnni-A9"])
    assert exc.value.code == 2
    assert "invalid choice: 'SEQnet@vnni-A9'" in capsys.readouterr().err


def test_a_published_subnet_by_name_where_a_subnet_is_taken():
    from modules.encoding import parse_supernet
    from modules.subnet_search import SubnetSpace, resolve_subnet

    space = SubnetSpace(parse_supernet("onnxw-151122-023231"), (160, 176, 192, 208, 224))
    m = nm.get_named_model("SEQnet@vnni-A0")
    assert str(resolve_subnet(space, "SEQnet@vnni-A0")) == m.subnet
    with pytest.raises(ValueError, match="not a subnet of onnxw-151122-023231"):
        resolve_subnet(space, "SEQnet@pixel4-A0")
