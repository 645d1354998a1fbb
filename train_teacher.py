"""Train the tiny superspace's block-KD teacher on the embedded digits data (or any ImageFolder).

    python train_teacher.py --output_dir ./checkpoints                     # -> block_kd/teacher/tiny/checkpoint.pth
    python train_teacher.py --data_dir /data/my_imagefolder --epochs 10 --force

A small residual convnet whose strides follow the tiny superspace (first_conv 2, stage0 1, stage1..3 2,
stage4..6 1) and whose stage widths exceed the students' (as EfficientNet-B5's do for mobilew / onnxw). It is
trained at random resolutions of the superspace's block-KD list, then gets BN statistics per resolution.
train_block_kd.py trains it automatically when the checkpoint is missing; this script does it explicitly
(--force retrains). The full-size superspaces use EfficientNet-B5 weights instead (--teacher_weights).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modules.cli import add_common_args, run_main, setup_logging
from modules.data import DEFAULT_DATA_DIR, prepare_default_data
from modules.superspace import get_superspace
from modules.teacher import get_teacher, tiny_teacher_path, train_tiny_teacher

log = logging.getLogger("spaceevo.train_teacher")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--superspace", default="tiny", choices=["tiny"], help="(default: %(default)s)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="ImageFolder with train/ and val/ "
                        "(default: %(default)s, written on first use)")
    parser.add_argument("--epochs", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW lr, cosine schedule (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError("--epochs and --batch_size must be positive integers and --lr positive")
    setup_logging(None, "train_teacher")
    space = get_superspace(args.superspace)
    path = tiny_teacher_path(args.output_dir, space.name)
    if path.is_file() and not args.force:
        teacher = get_teacher(space, args.output_dir, train_if_missing=False)
        print(f"teacher {path} exists (val top-1 {teacher.val_acc}); --force retrains it")
        return {"path": str(path), "val_acc": teacher.val_acc, "trained": False}
    data_dir = prepare_default_data(args.data_dir)
    ckpt = train_tiny_teacher(space, data_dir, path, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, workers=args.workers)
    get_teacher(space, args.output_dir, train_if_missing=False)  # shape check against the superspace
    acc = ", ".join(f"{a:.2f}% @{r}px" for r, a in ckpt["val_acc"].items())
    print(f"teacher saved to {Path(path)}: val top-1 {acc} ({ckpt['train_seconds']:.0f} s)")
    return {"path": str(path), "val_acc": ckpt["val_acc"], "trained": True}


if __name__ == "__main__":
    run_main(main, get_args_parser())
