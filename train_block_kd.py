"""Block-wise knowledge distillation, fp32 phase (as the original): every selected (stage, block) student
mimics its teacher stage with the NSR loss and the 4-sub-stage sandwich rule.

    python train_block_kd.py --superspace tiny --output_dir ./checkpoints            # all stages and blocks
    python train_block_kd.py --superspace tiny --stages 1 2 --blocks 0 3 --epochs 2 --resume
    torchrun --nproc_per_node 2 train_block_kd.py --superspace tiny                  # DDP (gloo on CPU)
    python train_block_kd.py --superspace onnxw --data_dir /data/imagenet --teacher_weights effnet_b5.pth

All students are trained together: one teacher pass per batch and resolution feeds every student. The tiny
superspace's teacher is trained on --data_dir first when <output_dir>/block_kd/teacher/tiny/checkpoint.pth is
missing. Writes <output_dir>/block_kd/<superspace>/stage{X}_{B}/{checkpoint.pth,log.csv,net.txt} and
fp32_summary.csv (held-out NSR before/after). SIGTERM saves the checkpoints and exits; --resume continues.
"""
from __future__ import annotations

import argparse

from modules.block_kd import add_block_kd_args, run_block_kd
from modules.cli import run_main


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_block_kd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_block_kd_args(parser, "fp32")


def main(args: argparse.Namespace):
    out = run_block_kd(args, "fp32")
    return 143 if out.get("stopped") else out  # stopped by SIGTERM: exit code 128 + 15


if __name__ == "__main__":
    run_main(main, get_args_parser())
