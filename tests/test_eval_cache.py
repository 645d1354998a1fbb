"""The subnet search's in-memory evaluation images: kept as uint8 pixels (a quarter of float32) and normalised
on the fly, they give the images, and so the fitness, of the float cache; code paths given an explicit
torch.device put their tensors on it."""
from __future__ import annotations

import random

import pytest
import torch

from test_subnet_search import ENC, make_supernet_ckpts, make_tiny_data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return {"data": make_tiny_data(root / "data"), "ckpts": make_supernet_ckpts(root / "out")}


def test_uint8_cache_equals_the_float_images_and_scores(env):
    from modules.subnet_search import (PixelBatches, SubnetEvaluator, SubnetSpace, build_eval_batches,
                                       load_supernet_checkpoint)

    calib, val, info = build_eval_batches(env["data"], 32, holdout_size=24, num_calib_batches=1,
                                          calib_batch_size=16, batch_size=10)
    assert isinstance(val, PixelBatches) and info["eval_cached"] and info["eval_images"] == 24
    assert all(x.dtype == torch.uint8 for x, _ in val.batches)
    floats = [(x, y) for x, y in val]
    assert val.nbytes * 4 == sum(x.numel() * x.element_size() for x, _ in floats)
    net, _ = load_supernet_checkpoint(env["ckpts"]["lsq"])
    space = SubnetSpace(net.choice, net.hw_list)
    rng = random.Random(0)
    cfgs = [space.extreme(True), space.extreme(False)] + [space.random(rng) for _ in range(3)]
    # a float list (what the cache held before) and the uint8 cache, one evaluator each, no resize cache
    from_float = SubnetEvaluator(net, calib, floats, torch.device("cpu"), cache_limit_gb=0)
    from_u8 = SubnetEvaluator(net, calib, val, torch.device("cpu"), cache_limit_gb=0)
    a, b = [from_float(c) for c in cfgs], [from_u8(c) for c in cfgs]
    assert a == b and len(set(a)) > 1


def test_pixel_batches_keep_images_that_do_not_round_trip_as_float():
    from modules.subnet_search import PixelBatches

    x = torch.randn(2, 3, 4, 4)  # not an ImageNet-normalised image of 8-bit pixels
    kept = PixelBatches([(x, torch.zeros(2))])
    assert kept.batches[0][0].dtype == torch.float32 and torch.equal(next(iter(kept))[0], x)


def test_explicit_device_objects(env):
    from modules import dist
    from modules.subnet_search import SubnetEvaluator, load_supernet_checkpoint

    dev = torch.device("cpu")
    assert dist.local_device(dev) == dev and dist.local_device("cpu") == dev
    net, _ = load_supernet_checkpoint(env["ckpts"]["fp32"], device=dev)
    assert {p.device for p in net.parameters()} == {dev}
    ev = SubnetEvaluator(net, [torch.rand(4, 3, 32, 32)], [(torch.rand(4, 3, 32, 32), torch.zeros(4).long())], dev)
    assert ev.device == dev and 0.0 <= ev(net.set_max_subnet()) <= 100.0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dist.local_device("cuda")
