"""Subnet export (exact outputs, strict standalone loading) and eval_supernet acc / lat modes without DDP."""
from __future__ import annotations

import csv
import random

import pytest
import torch

from test_subnet_search import ENC, FakePredictor, make_supernet_ckpts, make_tiny_data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    return {"root": root, "data": make_tiny_data(root / "data"), "ckpts": make_supernet_ckpts(root / "out"),
            "out": root / "out"}


def _export_args(env, *extra):
    import export_subnet

    return export_subnet.get_args_parser().parse_args(
        ["--supernet", ENC, "--output_dir", str(env["out"]), "--data_dir", str(env["data"]),
         "--num_calib_batches", "2", "--calib_batch_size", "8", "--holdout_size", "20", *extra])


@pytest.mark.parametrize("mode", ["fp32", "lsq"])
def test_exported_subnet_matches_supernet(env, mode, tmp_path):
    import export_subnet
    from modules.checkpoint import load_checkpoint
    from modules.engine import calibrate_bn
    from modules.lsq import get_quant_mode
    from modules.subnet_search import (SubnetSpace, build_calib_batches, load_subnet_checkpoint,
                                       load_supernet_checkpoint)

    net, info = load_supernet_checkpoint(env["ckpts"][mode])
    assert info["quant_mode"] == mode and info["supernet"] == ENC
    space = SubnetSpace(net.choice, net.hw_list)
    cfg = space.random(random.Random(4))
    out = tmp_path / "sub.pth"
    res = export_subnet.main(_export_args(env, "--quant_mode", mode, "--subnet", str(cfg), "--output", str(out)))
    assert res["max_abs_diff"] == 0.0
    ckpt = load_checkpoint(out)
    assert {"config", "model", "quant_mode", "quant_preset"} <= set(ckpt)
    assert ckpt["config"] == {"supernet": ENC, "subnet": str(cfg), "num_classes": 10}
    assert ckpt["quant_mode"] == mode and ckpt["quant_preset"] == ("ort" if mode == "lsq" else None)
    model = load_subnet_checkpoint(out)
    assert get_quant_mode(model) == mode and model.resolution == cfg.resolution
    # the supernet with the subnet active, BN-calibrated on the same batches, computes the same outputs
    calib, _, _ = build_calib_batches(env["data"], 64, holdout_size=20, num_calib_batches=2, calib_batch_size=8)
    net.set_active_subnet(cfg)
    calibrate_bn(net, calib, 2)
    net.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    # strict load: a tampered checkpoint is refused with a clear message
    ckpt["model"].pop(next(iter(ckpt["model"])))
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing key"):
        load_subnet_checkpoint(tmp_path / "bad.pth")
    # a new head for fine-tuning keeps every body weight
    m3 = load_subnet_checkpoint(out, num_classes=3)
    assert m3.logits.linear.weight.shape[0] == 3
    assert get_quant_mode(m3) == mode
    assert torch.equal(m3.stages[2].blocks[0].state_dict()[next(iter(m3.stages[2].blocks[0].state_dict()))],
                       model.stages[2].blocks[0].state_dict()[next(iter(model.stages[2].blocks[0].state_dict()))])


def test_export_errors(env, tmp_path):
    import export_subnet

    with pytest.raises(ValueError, match="not in"):
        export_subnet.main(_export_args(env, "--quant_mode", "fp32", "--subnet", "d1#1#1#1#1#1#1#1_k3#3#3#3#3#3#3#3"
                                        "_w8#8#16#24#32#48#64#80_e0#0.5#4#4#4#4#4#4_r33", "--no_calib"))
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        export_subnet.main(_export_args(env, "--quant_mode", "fp32", "--subnet", str(tmp_path / "nothing.json")))


def test_eval_supernet_acc_without_ddp(env, tmp_path):
    import eval_supernet

    assert not torch.distributed.is_initialized()
    csv_path = tmp_path / "acc.csv"
    args = eval_supernet.get_args_parser().parse_args(
        ["--mode", "acc", "--supernet", ENC, "--quant_mode", "lsq", "--output_dir", str(env["out"]),
         "--data_dir", str(env["data"]), "--num_calib_batches", "1", "--calib_batch_size", "8",
         "--max_eval_images", "10", "--subnets", "min", "--latency_predictor", "macs", "--csv", str(csv_path)])
    res = eval_supernet.main(args, predictors={"macs": FakePredictor()})
    names = [r["name"] for r in res["rows"]]
    assert names == ["max", "min", "min"]
    assert res["rows"][1]["top1"] == res["rows"][2]["top1"]  # deterministic
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 3 and rows[0]["quant_mode"] == "lsq" and rows[0]["split"] == "val"
    assert float(rows[0]["MMACs"]) > float(rows[1]["MMACs"]) and float(rows[0]["lat_macs_ms"]) > 0


def test_eval_supernet_lat(env, tmp_path):
    import eval_supernet

    args = eval_supernet.get_args_parser().parse_args(
        ["--mode", "lat", "--supernet", ENC, "--output_dir", str(tmp_path), "--latency_predictor", "ort_int8",
         "--no_maxmin", "--subnets", "min", "--random", "20", "--measure", "--runs", "3", "--warmup", "1",
         "--verbose"])
    res = eval_supernet.main(args, predictors={"ort_int8": FakePredictor()})
    row = res["rows"][0]
    assert row["name"] == "min" and row["pred_ort_int8_ms"] > 0
    assert row["meas_ort_int8_ms"] > 0 and row["err_ort_int8"] == pytest.approx(
        row["pred_ort_int8_ms"] / row["meas_ort_int8_ms"] - 1)
    assert (tmp_path / "eval_supernet" / ENC / "lat.csv").is_file()
    assert (tmp_path / "eval_supernet" / ENC / "latency_cdf.png").is_file()
    r = res["random"]["ort_int8"]
    assert r["min"] <= r["median"] <= r["max"]
