"""--amp: bf16 autocast (testable on the CPU) runs block KD and supernet training steps with finite losses close
to float32's; LSQ+ fake-quant runs in float32 inside autocast; fp16 without CUDA is one clear error."""
from __future__ import annotations

import csv
import logging
import random

import pytest
import torch

from modules.engine import amp_autocast


def test_lsq_quantizers_run_in_float32_under_autocast():
    from modules.lsq import ActQuantizer, QConv2d, set_quant_mode

    torch.manual_seed(0)
    conv = torch.nn.Sequential(QConv2d(3, 8, 3, padding=1))
    set_quant_mode(conv, "lsq", "ort")
    x = torch.rand(2, 3, 8, 8)
    ref = conv(x)
    seen = []
    for m in conv.modules():
        if isinstance(m, ActQuantizer):
            m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype,
                                                                      torch.is_autocast_enabled("cpu"))))
    with amp_autocast("bf16", "cpu"):
        y = conv(x.bfloat16())
    assert seen == [(torch.bfloat16, torch.float32, True)]  # hook sees the module's input and output
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, rtol=0.05, atol=0.05)


def test_fp16_without_cuda_is_one_clear_error():
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        amp_autocast("fp16", "cpu")
    with pytest.raises(ValueError, match="expected one of off, bf16, fp16"):
        amp_autocast("fp8", "cpu")


def test_block_kd_steps_in_bf16_match_float32():
    from modules.block_kd import StagePlusProj, Student, train_step
    from modules.superspace import get_superspace
    from modules.teacher import _calibrated_bn_stats, build_tiny_teacher, check_teacher, tiny_teacher_arch

    space = get_superspace("tiny")
    torch.manual_seed(0)
    teacher = build_tiny_teacher(tiny_teacher_arch(space))
    teacher.set_bn_stats({r: _calibrated_bn_stats(teacher, torch.rand(16, 3, 64, 64), r) for r in (32, 48, 64)})
    check_teacher(teacher.eval(), space, (32, 48, 64))
    cin, cout = teacher.stage_channels[2]
    images = torch.rand(8, 3, 64, 64)
    losses = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(1)
        model = StagePlusProj(space, 2, 0, cin, cout)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        st = Student(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None)
        losses[amp] = [train_step([st], teacher, images, (32, 48, 64), f"0-{i}", None, 1e-2, amp=amp)[0][st.key]
                       for i in range(3)]
    flat = {k: [v for step in ls for v in step] for k, ls in losses.items()}
    assert all(torch.isfinite(torch.tensor(flat["bf16"])))
    assert flat["bf16"] == pytest.approx(flat["off"], rel=0.05)


def test_supernet_training_in_bf16_matches_float32(tmp_path, digits_root):
    import train_supernet
    from modules.cli import parse_args_with_config

    losses = {}
    for amp in ("off", "bf16"):
        out = tmp_path / amp
        argv = ["--supernet_choice", "tiny-000000-000000", "--output_dir", str(out), "--data_path",
                str(digits_root), "--image_size", "32", "--batch_size_per_gpu", "8", "--max_train_samples", "24",
                "--valid_size", "16", "--eval_batch_size", "16", "--bn_calib_batches", "1", "--epochs", "1",
                "--warmup_epochs", "0", "--threads", "1", "--no-progress", "--no-plot", "--amp", amp]
        try:
            assert train_supernet.main(parse_args_with_config(train_supernet.get_args_parser(), argv)) == 0
        finally:
            root = logging.getLogger()
            for h in [h for h in root.handlers if getattr(h, "_spaceevo", False)]:
                root.removeHandler(h)
                h.close()
        with open(train_supernet.Run(str(out), "tiny-000000-000000", "fp32").csv, newline="") as f:
            losses[amp] = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses["bf16"]) == 1 and all(v == v and abs(v) < float("inf") for v in losses["bf16"])
    # the epoch's mean loss over 3 sandwich steps: bf16 keeps ~3 significant digits per op (2 % seen)
    assert losses["bf16"] == pytest.approx(losses["off"], rel=0.05)
