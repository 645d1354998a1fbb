"""downstream_cls.py: fine-tuning an exported subnet with a new head (same quant mode as the body), log, resume."""
from __future__ import annotations

import csv

import pytest
import torch

from test_subnet_search import ENC, make_supernet_ckpts, make_tiny_data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import export_subnet

    root = tmp_path_factory.mktemp("ds")
    data = make_tiny_data(root / "data")
    three = make_tiny_data(root / "three", per_class=6, val_per_class=2, classes=3)  # another task: 3 classes
    make_supernet_ckpts(root / "out")
    sub = root / "sub_lsq.pth"
    args = export_subnet.get_args_parser().parse_args(
        ["--supernet", ENC, "--quant_mode", "lsq", "--output_dir", str(root / "out"), "--data_dir", str(data),
         "--subnet", "min", "--num_calib_batches", "1", "--calib_batch_size", "8", "--holdout_size", "20",
         "--output", str(sub)])
    export_subnet.main(args)
    return {"root": root, "three": three, "sub": sub}


def _args(env, *extra):
    import downstream_cls

    return downstream_cls.get_args_parser().parse_args(
        ["--subnet_ckpt", str(env["sub"]), "--data_dir", str(env["three"]), "--output_dir", str(env["root"] / "o"),
         "--batch_size", "6", "--steps_per_epoch", "2", "--lr", "0.05", "--warmup_epochs", "0.5", *extra])


def test_finetune_writes_log_and_resumes(env):
    import downstream_cls
    from modules.lsq import get_quant_mode, quantizers
    from modules.subnet_search import load_subnet_checkpoint

    res = downstream_cls.main(_args(env, "--epochs", "1"))
    run = env["root"] / "o" / "downstream_cls" / "sub_lsq_three"
    assert res["run_dir"] == str(run) and res["quant_mode"] == "lsq"
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    assert set(rows[0]) == set(downstream_cls.LOG_HEADER)
    with pytest.raises(ValueError, match="--resume"):
        downstream_cls.main(_args(env, "--epochs", "2"))
    downstream_cls.main(_args(env, "--epochs", "2", "--resume"))
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    model = load_subnet_checkpoint(run / "final.pth")
    assert model.num_classes == 3 and model.logits.linear.weight.shape == (3, model.logits.linear.weight.shape[1])
    # the new head is quantized like the body, its LSQ+ scales initialised and saved
    assert get_quant_mode(model) == "lsq"
    head_q = quantizers(model.logits)
    assert head_q and all(q.enabled and bool(q.initialized) for q in head_q)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_fp32_finetune_only_head(env):
    import downstream_cls
    from modules.subnet_search import load_subnet_checkpoint

    res = downstream_cls.main(_args(env, "--epochs", "1", "--quant_mode", "fp32", "--only_train_head",
                                    "--name", "fp32_head"))
    assert res["quant_mode"] == "fp32"
    src = load_subnet_checkpoint(env["sub"])
    tuned = load_subnet_checkpoint(env["root"] / "o" / "downstream_cls" / "fp32_head" / "final.pth")
    a, b = src.state_dict(), tuned.state_dict()
    body = [k for k in b if not k.startswith("logits.")]
    assert body and all(torch.equal(a[k], b[k]) for k in body)  # frozen body, BN statistics included


def test_bad_dataset_is_a_clear_error(env, tmp_path):
    import downstream_cls

    args = _args(env, "--epochs", "1")
    args.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        downstream_cls.main(args)
