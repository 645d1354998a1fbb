"""Block-wise knowledge distillation, LSQ+ phase (as the original): each selected (stage, block) student
starts from its fp32 checkpoint (<output_dir>/block_kd/<superspace>/stage{X}_{B}/checkpoint.pth, written by
train_block_kd.py; a missing one is an error), is switched to LSQ+ fake quantization (--quant_preset), gets
its scales initialised from data and continues the distillation.

    python lsq_block_kd.py --superspace tiny --output_dir ./checkpoints               # all stages and blocks
    python lsq_block_kd.py --superspace tiny --stages 1 --blocks 0 --epochs 1 --quant_preset tflite
    torchrun --nproc_per_node 2 lsq_block_kd.py --superspace tiny

Writes stage{X}_{B}/lsq.pth (the LUT build reads it), lsq_log.csv (epoch 0 = right after the LSQ+ init) and
lsq_summary.csv. SIGTERM saves lsq.pth and exits; --resume continues from lsq.pth.
"""
from __future__ import annotations

import argparse

from modules.block_kd import add_block_kd_args, run_block_kd
from modules.cli import run_main


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("lsq_block_kd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_block_kd_args(parser, "lsq")


def main(args: argparse.Namespace):
    out = run_block_kd(args, "lsq")
    return 143 if out.get("stopped") else out  # stopped by SIGTERM: exit code 128 + 15


if __name__ == "__main__":
    run_main(main, get_args_parser())
