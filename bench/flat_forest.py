"""Random in-window subnet sampling with the latency predictor's forest: scikit-learn's ``predict`` against
``modules.latency.regression.FlatForest`` (the same trees as numpy arrays), side by side in one process.

Each new random subnet brings blocks missing from the latency table, so every draw costs one forest
prediction; the subnet search draws thousands (its window check, initial population and random baseline).

    python -m bench.flat_forest                                   # fits on random measured-like blocks
    python -m bench.flat_forest --table_dir checkpoints/demo/latency --supernet tiny-510155-002011

Reported: ms per forest call (batches of 1, 16 and 256 block configs) for both, with the ratio sklearn / flat,
and the largest difference of their predictions; with a table, the forest time per random subnet of
`--supernet` both ways, and the whole prediction time per random subnet as the search now runs it.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.latency.graph import block_features  # noqa: E402
from modules.latency.keys import block_key, parse_block_key  # noqa: E402
from modules.latency.predictor import load_predictor  # noqa: E402
from modules.latency.regression import BlockRegressor  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("flat_forest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table_dir", default=None, help="a measured latency table dir (default: a synthetic fit)")
    p.add_argument("--platform", default="ort_int8")
    p.add_argument("--supernet", default="tiny-510155-002011")
    p.add_argument("--subnets", type=int, default=1000, help="random subnets (with --table_dir; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _synthetic_regressor(seed: int):
    """A regressor fitted on the blocks of random tiny subnets with a made-up latency (MACs-like, noisy)."""
    from modules.subnet_search import SubnetSpace
    from modules.supernet import supernet_from_encoding

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    net = supernet_from_encoding("tiny-012345-000000")
    space = SubnetSpace(net.choice, net.hw_list)
    cfgs = []
    for _ in range(60):
        net.set_active_subnet(space.random(rng))
        cfgs += net.block_configs()
    ms = [1e-3 * (c["hw"] ** 2) * c["cin"] * c["cout"] * c["kernel"] ** 2 / 1e5 * nrng.lognormal(0, 0.1) + 0.005
          for c in cfgs]
    return BlockRegressor().fit(cfgs, ms), cfgs


def _forest_rows(reg, cfgs: list[dict]) -> np.ndarray:
    """The forest's input rows for block configs (what BlockRegressor.predict_many feeds it)."""
    F = np.stack([block_features(c) for c in cfgs])
    return reg._forest_x(cfgs, F, reg._linear(cfgs, F))


def _time(fn, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def main(args) -> int:
    from modules.subnet_search import LatencyOracle, SubnetSpace
    from modules.supernet import supernet_from_encoding

    if args.table_dir:
        pred = load_predictor(args.platform, args.supernet.split("-")[0], args.table_dir)
        reg = pred.regressor()
        cfgs = [c for c in (parse_block_key(k) for k in list(pred.table)[:256]) if c]
    else:
        pred = None
        reg, cfgs = _synthetic_regressor(args.seed)
    if reg.forest is None:
        raise SystemExit("error: the regressor has no forest (too few measured blocks)")
    X = _forest_rows(reg, cfgs)
    a, b = reg.forest.predict(X), reg.flat_forest.predict(X)
    print(f"{len(reg.forest.estimators_)} trees, depth {reg.flat_forest.depth}; max |sklearn - flat| on {len(X)} "
          f"rows: {np.abs(a - b).max():.2e}")
    print(f"{'rows':>6} {'sklearn ms':>11} {'flat ms':>9} {'ratio':>7}")
    for n in (1, 16, 256):
        rows = X[:n] if n <= len(X) else np.resize(X, (n, X.shape[1]))
        t_sk = _time(lambda: reg.forest.predict(rows), 20)
        t_fl = _time(lambda: reg.flat_forest.predict(rows), 20)
        print(f"{n:>6} {t_sk:>11.3f} {t_fl:>9.3f} {t_sk / t_fl:>6.1f}x")
    if pred is not None:
        net = supernet_from_encoding(args.supernet)
        space, rng = SubnetSpace(net.choice, net.hw_list), random.Random(args.seed)
        batches = []  # per random subnet: the forest rows of its blocks missing from the table
        for _ in range(args.subnets):
            net.set_active_subnet(space.random(rng))
            miss = [c for c in net.block_configs() if block_key(c) not in pred.table]
            if miss:
                batches.append(_forest_rows(reg, miss))
        t_sk = _time(lambda: [reg.forest.predict(x) for x in batches], 1) / args.subnets
        t_fl = _time(lambda: [reg.flat_forest.predict(x) for x in batches], 1) / args.subnets
        print(f"forest per random subnet ({len(batches)} of {args.subnets} miss table blocks): sklearn {t_sk:.3f} ms, "
              f"flat {t_fl:.3f} ms, ratio {t_sk / t_fl:.1f}x")
        lat, rng = LatencyOracle(net, pred), random.Random(args.seed + 1)
        draws = [space.random(rng) for _ in range(args.subnets)]
        t = _time(lambda: [lat(c) for c in draws], 1) / args.subnets
        print(f"whole prediction per new random subnet (set active, blocks, flat forest, correction): {t:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
