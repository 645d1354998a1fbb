"""Write the embedded default data set: scikit-learn's 8x8 handwritten digits as an RGB ImageFolder.

    python prepare_data.py --data_dir ./checkpoints/data/digits --size 64

Layout: ``<data_dir>/train/<digit>/*.png`` and ``<data_dir>/val/<digit>/*.png`` (stratified 80/20 split,
deterministic). Nothing is downloaded; running it again is instant. Bring your own ImageFolder (e.g. ImageNet
with ``train/`` and ``val/``) by passing its path as ``--data_dir`` to the stage scripts instead.
"""
from __future__ import annotations

import argparse

from modules.cli import run_main
from modules.data import DEFAULT_DATA_DIR, split_counts, write_digits_imagefolder


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="output ImageFolder root (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="share of each class in val (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    return parser


def main(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    root = write_digits_imagefolder(args.data_dir, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    counts = split_counts(root)
    for split, per_class in counts.items():
        print(f"{split}: {sum(per_class.values())} images in {len(per_class)} classes ({root / split})")
    return counts


if __name__ == "__main__":
    run_main(main, get_args_parser())
