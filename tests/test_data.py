from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.data import (build_dataset, build_loader, calib_batches, set_loader_epoch, split_counts,
                          split_holdout, write_digits_imagefolder)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def test_digits_layout_and_counts(digits_root):
    counts = split_counts(digits_root)
    assert set(counts) == {"train", "val"}
    for split in ("train", "val"):
        assert sorted(counts[split]) == [str(i) for i in range(10)]
        assert all(n > 0 for n in counts[split].values())
    total = sum(sum(c.values()) for c in counts.values())
    assert total == 1797
    # stratified: every class has ~20 % of its images in val
    for c in counts["train"]:
        frac = counts["val"][c] / (counts["val"][c] + counts["train"][c])
        assert 0.18 < frac < 0.22
    img = Image.open(next((digits_root / "val" / "3").glob("*.png")))
    assert img.size == (16, 16) and img.mode == "RGB"


def test_digits_deterministic_and_idempotent(tmp_path, digits_root):
    a = write_digits_imagefolder(tmp_path / "a", size=16, seed=0)
    assert _listing(a) == _listing(digits_root)
    some = sorted((a / "train" / "5").glob("*.png"))[0]
    same = digits_root / some.relative_to(a)
    assert hashlib.sha1(some.read_bytes()).digest() == hashlib.sha1(same.read_bytes()).digest()
    mtime = some.stat().st_mtime_ns
    assert write_digits_imagefolder(a, size=16, seed=0) == a  # marker present: nothing rewritten
    assert some.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    # another seed gives another split; other parameters rewrite the set
    b = write_digits_imagefolder(tmp_path / "b", size=16, seed=1)
    assert _listing(b) != _listing(a)
    write_digits_imagefolder(a, size=20, seed=0)
    assert Image.open(next((a / "train" / "0").glob("*.png"))).size == (20, 20)


def test_build_dataset_shapes(digits_root):
    train = build_dataset(digits_root, "train", train=True, image_size=24)
    val = build_dataset(digits_root, "val", train=False, image_size=24)
    assert len(train) + len(val) == 1797
    assert train.classes == [str(i) for i in range(10)]
    x, y = train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= y < 10
    x, y = val[5]
    assert x.shape == (3, 24, 24)
    # eval transform is deterministic
    assert torch.equal(val[5][0], val[5][0])


def test_no_hflip_by_default(digits_root):
    from torchvision import transforms as T

    names = [type(t).__name__ for t in build_dataset(digits_root, "train", True, 16).transform.transforms]
    assert "RandomHorizontalFlip" not in names
    flipped = build_dataset(digits_root, "train", True, 16, hflip=True).transform.transforms
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in flipped)


def _first_batch(root, augment: str, size: int, workers: int = 0) -> torch.Tensor:
    """The first training batch (8 images, no shuffling) with torch's RNG seeded at 0."""
    ds = build_dataset(root, "train", True, size, hflip=True, min_scale=0.5, augment=augment)
    torch.manual_seed(0)
    x, _ = next(iter(build_loader(ds, 8, train=False, workers=workers)))
    return x


@pytest.mark.parametrize("size", [16, 224])
def test_auto_augment_changes_the_training_batch(digits_root, tmp_path, size):
    """--augment auto_augment_tf: with the same seed the basic batch repeats exactly and the AutoAugment batch
    differs from it; shapes and dtypes are unchanged; small (digits) and ImageNet-size images, in the main
    process and in DataLoader worker processes."""
    from torchvision import transforms as T

    root = digits_root
    if size == 224:  # a few ImageNet-size images of unequal shapes
        rng = np.random.default_rng(0)
        for i in range(8):
            cls = tmp_path / "big" / "train" / f"c{i % 2}"
            cls.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(300 + 10 * i, 260, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(cls / f"{i}.jpg")
        root = tmp_path / "big"
    for workers in (0, 2):  # in workers, the loader's seeded generator seeds each worker's RNG
        basic = _first_batch(root, "basic", size, workers)
        assert torch.equal(basic, _first_batch(root, "basic", size, workers))  # the seed fixes the crops
        auto = _first_batch(root, "auto_augment_tf", size, workers)
        assert auto.shape == basic.shape == (8, 3, size, size) and auto.dtype == basic.dtype == torch.float32
        assert torch.isfinite(auto).all()
        assert not torch.equal(auto, basic)
    steps = build_dataset(root, "train", True, size, augment="auto_augment_tf").transform.transforms
    auto_aug = [t for t in steps if isinstance(t, T.AutoAugment)]
    assert len(auto_aug) == 1 and auto_aug[0].policy == T.AutoAugmentPolicy.IMAGENET
    assert isinstance(steps[steps.index(auto_aug[0]) + 1], T.ToTensor)  # on the PIL crop, before ToTensor
    # evaluation transforms ignore the augmentation
    val = build_dataset(root, "train", False, size, augment="auto_augment_tf").transform.transforms
    assert not any(isinstance(t, T.AutoAugment) for t in val)
    with pytest.raises(ValueError, match="augmentation 'randaugment': expected one of basic, auto_augment_tf"):
        build_dataset(root, "train", True, size, augment="randaugment")


def test_loader_holdout_and_determinism(digits_root):
    train = build_dataset(digits_root, "train", train=False, image_size=16)
    rest, holdout = split_holdout(train, 100, seed=3)
    assert len(rest) + len(holdout) == len(train) and len(holdout) == 100
    assert not set(rest.indices) & set(holdout.indices)
    assert split_holdout(train, 100, seed=3)[1].indices == holdout.indices
    assert split_holdout(train, 100, seed=4)[1].indices != holdout.indices
    with pytest.raises(ValueError, match="holdout size"):
        split_holdout(train, len(train), seed=0)

    loader = build_loader(holdout, batch_size=32, train=True, seed=7)
    set_loader_epoch(loader, 2)
    first = [y.tolist() for _, y in loader]
    set_loader_epoch(loader, 2)
    again = [y.tolist() for _, y in loader]
    set_loader_epoch(loader, 3)
    other = [y.tolist() for _, y in loader]
    assert first == again and first != other
    assert len(first) == 3  # drop_last in training: 100 // 32
    x, _ = next(iter(build_loader(holdout, 64, train=False)))
    assert x.shape == (64, 3, 16, 16)
    assert sum(1 for _ in calib_batches(loader, 7)) == 7


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected an ImageFolder: .*/<class>/<image>"):
        build_dataset(tmp_path / "nope", "train", True, 16)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class subfolders"):
        build_dataset(tmp_path / "empty", "train", True, 16)
    cls = tmp_path / "noimg" / "val" / "cat"
    cls.mkdir(parents=True)
    (cls / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"class folder .*cat holds no image"):
        build_dataset(tmp_path / "noimg", "val", False, 16)


def test_unreadable_image_names_the_file(tmp_path):
    good = tmp_path / "d" / "train" / "a"
    good.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good / "ok.png")
    bad = good / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = build_dataset(tmp_path / "d", "train", False, 8)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds[idx]
    assert ds[1 - idx][0].shape == (3, 8, 8)


def test_dist_helpers_without_process_group():
    from modules import dist

    info = dist.init_distributed_mode("cpu")
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()
    assert dist.all_reduce_mean(3) == 3.0 and torch.equal(dist.all_reduce_mean(torch.ones(2)), torch.ones(2))
    with pytest.raises(ValueError, match="floating-point"):
        dist.all_reduce_mean(torch.ones(2, dtype=torch.long))
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.save_on_master(lambda x: x + 1, 1) == 2
    dist.barrier()


_TWO_RANKS = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
from modules import dist
from modules.data import build_loader, set_loader_epoch
info = dist.init_distributed_mode("cpu")
loader = build_loader(torch.utils.data.TensorDataset(torch.arange(20)), 2, train=True, distributed=True, seed=0)
set_loader_epoch(loader, 1)
seen = [int(v) for (b,) in loader for v in b]
out = dict(rank=info.rank, world=info.world_size, seen=seen,
           mean=dist.all_reduce_mean(float(info.rank)), obj=dist.broadcast_object(info.rank))
t = torch.full((2,), float(info.rank))
out["inplace"] = dist.all_reduce_mean(t) is t and t.tolist() == [0.5, 0.5]
out["sum"] = dist.all_reduce_sum(torch.tensor([info.rank + 1])).tolist()
# one file per rank: the two ranks' prints share one stdout and can interleave within a line
with open(os.path.join({out!r}, f"rank{{info.rank}}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_distributed()
"""


def test_distributed_loader_two_ranks(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(root=str(Path(__file__).resolve().parents[1]), out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    assert all(r["mean"] == 0.5 and r["obj"] == 0 and r["inplace"] and r["sum"] == [3] for r in results)
    a, b = results[0]["seen"], results[1]["seen"]
    assert len(a) == len(b) == 10 and sorted(a + b) == list(range(20))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumed_at_step_k_gives_the_batches_k_on(digits_root, workers):
    """A train loader started at batch k of an epoch (the mid-epoch resume, nothing before k loaded) yields
    exactly batches k.. of the uninterrupted epoch: same images (random crops and flips included), same
    labels; the epoch after it is whole again; the order depends on (seed, epoch)."""
    from modules.data import build_dataset, build_loader, set_loader_epoch, start_loader_at

    ds = torch.utils.data.Subset(build_dataset(digits_root, "train", train=True, image_size=16, hflip=True),
                                 range(256))

    def epoch(k: int = 0, e: int = 1, seed: int = 3):
        loader = build_loader(ds, 32, train=True, workers=workers, seed=seed)
        set_loader_epoch(loader, e)
        start_loader_at(loader, k)
        return list(loader), loader

    full, _ = epoch()
    resumed, loader = epoch(k=3)
    assert len(full) > 5 and len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(next(iter(loader))[0], full[0][0])  # the next pass starts at batch 0 again
    assert not torch.equal(epoch(e=2)[0][0][0], full[0][0]) and not torch.equal(epoch(seed=4)[0][0][0], full[0][0])
