"""Every command line of the original SpaceEvo README runs through our scripts' parsers with its original meaning,
under torch.distributed.launch (which appends --local-rank=N) and torchrun (which does not)."""
import importlib.util
import pickle
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from modules.cli import parse_args_with_config, run_main

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_TRAIN_YAML = {  # the original's supernet_training_configs/train.yaml, key for key
    "batch_size_per_gpu": 64, "sandwich_rule": True, "alpha_min": -1.0, "alpha_max": 1.0, "iw_clip": 5.0,
    "grad_clip_value": 1.0, "warmup_epochs": 5, "epochs": 360, "start_epoch": 0, "label_smoothing": 0.1,
    "inplace_distill": True, "sync_bn": False, "bn_momentum": 0, "bn_eps": "1e-5", "post_bn_calibration_batch_num": 20,
    "num_arch_training": 4, "models_save_dir": "checkpoints/supernet_training", "data_loader_workers_per_gpu": 8,
    "dropout": 0.2, "weight_decay_weight": 0.00001, "weight_decay_bn_bias": 0.0,
    "optimizer": {"method": "sgd", "momentum": 0.9, "nesterov": True},
    "lr_scheduler": {"method": "warmup_cosine_lr", "base_lr": 0.1, "clamp_lr_percent": 0.0},
    "multiprocessing_distributed": True, "dist_backend": "nccl", "distributed": True, "dataset": "imagenet",
    "dataset_dir": "<path_to_imagenet>", "valid_size": 0, "valid_freq": 5, "n_classes": 1000, "drop_last": True,
    "print_freq": 10, "resume": "", "seed": 0, "debug": "", "debug_batches": 20,
    # "augment": "auto_augment_tf" maps to train_supernet's --augment (added on another branch)
}

# The README's commands, in its order; ${CHECKPOINT_DIR} -> CK, ${IMAGENET_PATH} / <path_to_imagenet> -> IMNET,
# <superspace> / [a|b] choices -> their first value; the <subnet_choice> placeholders are kept.
LAUNCH4 = "python -m torch.distributed.launch --nproc_per_node=4"
README_COMMANDS = [
    "python eval_specific_net.py --model_name spaceevo@vnni --dataset_dir IMNET --quant_mode",
    "python eval_specific_net.py --model_name spaceevo@vnni --dataset_dir IMNET",
    "python eval_specific_net.py --model_name SEQnet@pixel4-A0 --dataset_dir IMNET --quant_mode",
    "python eval_specific_net.py --model_name SEQnet@vnni-A0 --dataset_dir IMNET --quant_mode",
    "python eval_specific_net.py --model_name SEQnet@pixel4-A0 --dataset_dir IMNET",
    f"{LAUNCH4} train_block_kd.py --superspace mobilew --output_path CK/block_kd/mobilew "
    "--inplace_distill_from_teacher --num_epochs 5 --stage_list stage1_0 stage1_2 --hw_list 160 192 224 "
    "--dataset_path IMNET",
    f"{LAUNCH4} lsq_block_kd.py --superspace mobilew --output_path CK/block_kd/mobilew "
    "--inplace_distill_from_teacher --num_epochs 1 --stage_list stage1_0 stage1_2 --hw_list 160 192 224 "
    "--dataset_path IMNET --teacher_checkpoint_path CK/block_kd/teacher_checkpoint/efficientnet_b5/checkpoint.pth "
    "--train_batch_size 32 --learning_rate_list 0.00125 0.00125 0.00125 0.00125 0.00125 0.00125",
    "python eval_block_kd.py --superspace mobilew --platform tflite27_cpu_int8 --output_path CK/block_kd/lut "
    "--stage_list stage3_0 stage3_1 --width_window_filter 0 1 2 --hw_list 160 192 224 --dataset_path ./dataset "
    "--checkpoint_path CK/block_kd "
    "--teacher_checkpoint_path CK/block_kd/teacher_checkpoint/efficientnet_b5/checkpoint.pth --debug",
    "python search_block_kd.py --superspace mobilew --latency_constraint 15 20 --platform tflite27_cpu_int8 "
    "--latency_loss_t 0.08 --latency_loss_a 0.01 --lut_path data/block_lut --output_dir CK/block_kd/search",
    "python search_block_kd.py --superspace onnxw --latency_constraint 10 --platform onnx_lut --latency_loss_t 0.08 "
    "--latency_loss_a 0.01 --lut_path data/block_lut --output_dir CK/block_kd/search",
    "python search_block_kd.py --superspace onnxw --latency_constraint 15 --platform onnx_lut --latency_loss_t 0.08 "
    "--supernet_choices 111111_000000 222222_000000",
    "python -m torch.distributed.launch --nproc_per_node 8 train_supernet.py "
    "--config-file supernet_training_configs/train.yaml --superspace mobilew --supernet_choice 123214-012321 "
    "--batch_size_per_gpu 64 --resume",
    "python -m torch.distributed.launch --nproc_per_node 8 train_supernet.py "
    "--config-file supernet_training_configs/train.yaml --superspace mobilew --supernet_choice 123214-012321 "
    "--batch_size_per_gpu 32 --quant_mode",
    "python -m torch.distributed.launch --nproc_per_node 4 search_subnet.py --superspace onnxw "
    "--supernet_choice 121122-133333 --dataset_path IMNET --output_path CK/search_subnet "
    "--checkpoint_path CK/supernet_training --latency_constraint 15 --latency_delta 2 --batch_size 32 "
    "--num_calib_batches 20",
    "python eval_supernet.py --superspace onnxw --supernet_choice 121122-133333 --mode acc "
    "--resume CK/supernet_training --dataset_dir ./dataset --subnet_choice <subnet_choice1> <subnet_choice2> <...>",
    "python eval_supernet.py --superspace onnxw --supernet_choice 121122-133333 --mode acc "
    "--resume CK/supernet_training --dataset_dir ./dataset --subnet_choice <subnet_choice1> <subnet_choice2> <...> "
    "--quant_mode",
    "python eval_supernet.py --superspace onnxw --supernet_choice 121122-133333 --mode lat "
    "--subnet_choice <subnet_choice1> <subnet_choice2> <...>",
    "python onnx_tools/export_onnx.py --skip_weights",
    "python onnx_tools/benchmark.py",
    "python tflite_tools/benchmark.py",
    "python downstream_cls.py --subnet_name SEQnet@vnni-A0 --dataset CIFAR10 --imagenet_path xxx",
]
BLOCK_KD = {"output_dir": "CK", "block_ids": [(1, 0), (1, 2)], "hw_list": [160, 192, 224], "data_dir": "IMNET",
            "inplace_distill_from_teacher": True}
TEACHER = "CK/block_kd/teacher_checkpoint/efficientnet_b5/checkpoint.pth"
MEANINGS = [  # what each README command means, in our names
    {"model_name": "spaceevo@vnni", "dataset_path": "IMNET", "quant_mode": "lsq"},
    {"model_name": "spaceevo@vnni", "dataset_path": "IMNET", "quant_mode": "fp32"},
    {"model_name": "SEQnet@pixel4-A0", "quant_mode": "lsq"},
    {"model_name": "SEQnet@vnni-A0", "quant_mode": "lsq"},
    {"model_name": "SEQnet@pixel4-A0", "quant_mode": "fp32"},
    {**BLOCK_KD, "superspace": "mobilew", "epochs": 5},
    {**BLOCK_KD, "epochs": 1, "teacher_weights": TEACHER, "batch_size": 32, "lr_list": [0.00125] * 6},
    {"superspace": "mobilew", "latency_predictor": "tflite_int8", "lut_dir": "CK/block_kd/lut", "output_dir": "CK",
     "block_ids": [(3, 0), (3, 1)], "windows": [0, 1, 2], "hw_list": [160, 192, 224], "data_dir": "./dataset",
     "teacher_weights": TEACHER, "max_eval_batches": 10, "debug": False},
    {"latency_constraints": [15.0, 20.0], "latency_predictor": "tflite_int8", "lut_dir": "data/block_lut",
     "latency_loss_t": 0.08, "latency_loss_a": 0.01, "output_dir": "CK/block_kd/search"},
    {"latency_constraints": [10.0], "latency_predictor": "ort_int8"},
    {"latency_constraints": [15.0], "score_only": ["111111_000000", "222222_000000"]},
    {"supernet_choice": "mobilew-123214-012321", "batch_size_per_gpu": 64, "resume": True, "quant_mode": "fp32",
     "epochs": 360},
    {"supernet_choice": "mobilew-123214-012321", "batch_size_per_gpu": 32, "resume": False, "quant_mode": "lsq"},
    {"supernet": "onnxw-121122-133333", "data_dir": "IMNET", "output_dir": "CK", "supernet_dir": "CK/supernet_training",
     "latency_constraint": [15.0], "latency_delta": 2.0, "batch_size": 32, "num_calib_batches": 20,
     "quant_mode": "lsq"},
    {"supernet": "onnxw-121122-133333", "mode": "acc", "supernet_dir": "CK/supernet_training", "data_dir": "./dataset",
     "subnets": ["<subnet_choice1>", "<subnet_choice2>", "<...>"], "quant_mode": "fp32"},
    {"supernet": "onnxw-121122-133333", "quant_mode": "lsq"},
    {"supernet": "onnxw-121122-133333", "mode": "lat", "subnets": ["<subnet_choice1>", "<subnet_choice2>", "<...>"]},
    {"skip_weights": True, "input": None},
    {"input": None},
    {"input": None},
    {"subnet_name": "SEQnet@vnni-A0", "dataset": "CIFAR10", "imagenet_path": "xxx", "lr": None},
]


def _load_script(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], REPO / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(command: str) -> tuple[str, list[str]]:
    """(script, its arguments) of a README command, with or without the torch.distributed.launch prefix."""
    words = shlex.split(command)[1:]
    if words[:2] == ["-m", "torch.distributed.launch"]:
        words = words[2:]
        while words[0].startswith("--nproc_per_node"):
            words = words[1:] if "=" in words[0] else words[2:]
    return words[0], words[1:]


def _launched(command: str) -> bool:
    return "torch.distributed.launch" in command


def test_readme_command_count():
    assert len(README_COMMANDS) == len(MEANINGS) == 21


@pytest.mark.parametrize("i", range(len(README_COMMANDS)))
@pytest.mark.parametrize("launcher", ["torch.distributed.launch", "torchrun"])
def test_readme_command_parses_with_original_meaning(i, launcher, monkeypatch):
    monkeypatch.chdir(REPO)  # train_supernet's --config-file supernet_training_configs/train.yaml is relative
    script, argv = _split(README_COMMANDS[i])
    if launcher == "torch.distributed.launch":
        argv = [*argv, "--local-rank=0"] if i % 2 else ["--local_rank=1", *argv]  # both spellings, either place
    args = parse_args_with_config(_load_script(script).get_args_parser(), argv)
    got = {k: getattr(args, k) for k in MEANINGS[i]}
    assert got == MEANINGS[i]
    if launcher == "torch.distributed.launch":
        assert args.local_rank in (0, 1)


def test_original_train_yaml_keys_are_mapped(tmp_path):
    import train_supernet

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(ORIGINAL_TRAIN_YAML))
    args = parse_args_with_config(train_supernet.get_args_parser(),
                                  ["--config-file", str(cfg), "--superspace", "mobilew", "--supernet_choice",
                                   "123214_012321"])
    assert train_supernet.supernet_encoding(args) == "mobilew-123214-012321"
    assert (args.data_path, args.output_dir, args.val_split, args.workers, args.bn_calib_batches) == \
        ("<path_to_imagenet>", "checkpoints", "val", 8, 20)
    assert (args.weight_decay, args.momentum, args.nesterov, args.base_lr, args.resume, args.epochs) == \
        (1e-5, 0.9, True, 0.1, False, 360)
    assert args.quant_mode == "fp32" and args.valid_freq == 5


@pytest.mark.parametrize("key, value, words", [
    ("print_every", 10, ["'print_every'", "unknown"]),
    ("sync_bn", True, ["'sync_bn'", "SyncBatchNorm"]),
    ("optimizer", {"method": "adam"}, ["'optimizer'", "sgd"]),
    ("valid_size", -1, ["'valid_size'"]),
])
def test_original_train_yaml_bad_key_is_one_error(tmp_path, capsys, key, value, words):
    import train_supernet

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({**ORIGINAL_TRAIN_YAML, key: value}))
    with pytest.raises(SystemExit) as e:
        run_main(lambda a: 0, train_supernet.get_args_parser(),
                 ["--config-file", str(cfg), "--supernet_choice", "mobilew-123214-012321"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: config ")
    assert all(w in err[0] for w in words)


def test_help_shows_one_name_with_its_aliases(capsys):
    import search_block_kd

    with pytest.raises(SystemExit):
        parse_args_with_config(search_block_kd.get_args_parser(), ["--help"])
    out = capsys.readouterr().out
    assert "--latency_constraint LATENCY_CONSTRAINTS [LATENCY_CONSTRAINTS ...], --latency_constraints" in out
    assert "--config FILE.yaml, --config-file FILE.yaml" in out or "--config-file FILE.yaml" in out


def test_eval_block_kd_debug_is_ten_batches_and_traceback_is_separate():
    import eval_block_kd

    parse = lambda *a: parse_args_with_config(eval_block_kd.get_args_parser(), list(a))  # noqa: E731
    assert (parse("--debug").max_eval_batches, parse("--debug").debug) == (10, False)
    assert (parse("--traceback").max_eval_batches, parse("--traceback").debug) == (None, True)


def test_bad_original_values_are_usage_errors(capsys):
    import train_block_kd

    for argv, word in ((["--stage_list", "stage9_0"], "stage9_0"), (["--output_path", "somewhere"], "block_kd")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda a: 0, train_block_kd.get_args_parser(), argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and word in err[0]


def test_tools_read_their_input_csv_by_default():
    from modules.export import read_input_csv, tool_input

    for tool, superspace in (("onnx_tools", "onnxw"), ("tflite_tools", "mobilew")):
        path = tool_input(None, [], [], REPO / tool)
        entries = read_input_csv(path)  # validated: every line builds
        assert Path(path) == REPO / tool / "input.csv" and len(entries) == 5
        assert {e.superspace for e in entries} == {superspace}
    assert tool_input(None, ["SEQnet@vnni-A0"], [], REPO / "onnx_tools") is None


def _write_fake_cifar10(root: Path, n: int = 20) -> None:
    """torchvision's CIFAR10 layout: python pickles of 32x32 RGB rows (the md5 check is torchvision's)."""
    import hashlib

    import torchvision.datasets as tvd

    base = root / tvd.CIFAR10.base_folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {name: md5 for name, md5 in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list}
    for name in files:
        data = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(range(10)) * (n // 10)}
        (base / name).write_bytes(pickle.dumps(data))
    meta = base / tvd.CIFAR10.meta["filename"]
    meta.write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    # torchvision checks the md5 of every file: patch the expected sums to ours
    sums = {name: hashlib.md5((base / name).read_bytes()).hexdigest() for name in files}
    return sums, hashlib.md5(meta.read_bytes()).hexdigest()


def test_downstream_torchvision_dataset_from_disk_and_missing_one(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    from modules.data import build_torchvision_dataset

    sums, meta_md5 = _write_fake_cifar10(tmp_path / "datasets")
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[n, sums[n]] for n, _ in tvd.CIFAR10.train_list])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [[n, sums[n]] for n, _ in tvd.CIFAR10.test_list])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": meta_md5})
    train = build_torchvision_dataset("CIFAR10", tmp_path / "datasets", True, 32)
    val = build_torchvision_dataset("CIFAR10", tmp_path / "datasets", False, 32)
    assert (len(train), len(val)) == (100, 20) and tuple(train[0][0].shape) == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"CIFAR100 not found under .*nowhere.*--download"):
        build_torchvision_dataset("CIFAR100", tmp_path / "nowhere", True, 32)
    assert not (tmp_path / "nowhere").exists() or not any((tmp_path / "nowhere").iterdir())


def test_downstream_subnet_name_without_checkpoint_is_one_error(capsys, tmp_path):
    import downstream_cls

    with pytest.raises(SystemExit) as e:
        run_main(downstream_cls.main, downstream_cls.get_args_parser(),
                 ["--subnet_name", "SEQnet@vnni-A0", "--dataset", "CIFAR10", "--imagenet_path", "xxx",
                  "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    where = tmp_path / "supernet_training" / "spaceevo@vnni" / "lsq.pth"
    assert e.value.code == 2 and len(err) == 1 and f"put the released spaceevo@vnni lsq.pth at {where}" in err[0]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
