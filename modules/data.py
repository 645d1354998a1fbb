"""Data: the embedded digits ImageFolder, ImageFolder datasets / loaders shared by every stage script.

Layout expected everywhere: ``<root>/<split>/<class>/<image>`` (``split`` = ``train`` / ``val``), e.g. ImageNet
or the digits set written by :func:`write_digits_imagefolder` (``prepare_data.py``). Loaders deliver one image
size; multi-resolution training is done by the models (they resize their input to the active resolution).
Holdout subsets for BN calibration / search fitness are carved out of ``train`` (:func:`split_holdout`), never
out of ``val``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from modules import dist

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_DATA_DIR = "./checkpoints/data/digits"
MARKER = ".complete"


def _layout(root: str | os.PathLike, split: str) -> str:
    return f"expected an ImageFolder: {Path(root)}/{split}/<class>/<image>"


# --------------------------------------------------------------------------- embedded digits set
def write_digits_imagefolder(root: str | os.PathLike, size: int = 64, val_fraction: float = 0.2,
                             seed: int = 0) -> Path:
    """Write scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as ``size``x``size`` RGB PNGs.

    Layout ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` with a deterministic stratified split
    (``val_fraction`` of every class goes to val). Idempotent: returns at once when ``root`` already holds a
    complete set written with the same parameters (marker file ``root/.complete``); otherwise the set is
    written into a temp dir next to ``root`` which then replaces ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    size = int(size)
    if size < 8:
        raise ValueError(f"digits image size {size}: expected >= 8")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction}: expected a number in (0, 1)")
    params = {"dataset": "sklearn-digits", "size": size, "val_fraction": float(val_fraction), "seed": int(seed)}
    if _marker_matches(root, params):
        return root

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)  # (N, 8, 8) in 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    split_of = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        split_of[idx[:n_val]] = "val"
        split_of[idx[n_val:]] = "train"

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        counts = {"train": 0, "val": 0}
        for i, (img, label) in enumerate(zip(images, labels)):
            split = split_of[i]
            out = tmp / split / str(int(label))
            out.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray(np.clip(img * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8), mode="L")
            gray.resize((size, size), Image.BILINEAR).convert("RGB").save(out / f"{i:04d}.png")
            counts[split] += 1
        (tmp / MARKER).write_text(json.dumps({**params, "counts": counts}, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if _marker_matches(root, params):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        if root.exists():
            trash = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
            os.replace(root, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _marker_matches(root: Path, params: dict[str, Any]) -> bool:
    try:
        info = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(info.get(k) == v for k, v in params.items())


def prepare_default_data(data_dir: str | os.PathLike, size: int = 64) -> Path:
    """If ``data_dir`` is the default digits location, write the digits set there (rank 0; others wait).
    Any other ``data_dir`` is returned untouched (the user's own ImageFolder)."""
    data_dir = Path(data_dir)
    if data_dir.resolve() == Path(DEFAULT_DATA_DIR).resolve():
        if dist.is_main_process():
            write_digits_imagefolder(data_dir, size=size)
        dist.barrier()
    return data_dir


# --------------------------------------------------------------------------- datasets
def _torchvision():
    import torchvision  # noqa: F401  (imported lazily: it is slow to import)
    from torchvision import datasets, transforms
    return datasets, transforms


def _check_imagefolder(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist; {_layout(root, split)}")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"data directory {path} has no class subfolders; {_layout(root, split)}")
    for c in classes:
        has_image = any(f.suffix.lower() in IMG_EXTENSIONS for f in c.rglob("*") if f.is_file())
        if not has_image:
            raise ValueError(f"class folder {c} holds no image ({', '.join(IMG_EXTENSIONS)}); "
                             f"{_layout(root, split)}")
    return path


def _make_imagefolder_class():
    datasets, _ = _torchvision()

    class CheckedImageFolder(datasets.ImageFolder):
        """ImageFolder that skips hidden folders and whose unreadable images raise a ValueError naming the file."""

        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise ValueError(f"data directory {directory} has no class subfolders")
            return classes, {c: i for i, c in enumerate(classes)}

        def __getitem__(self, index: int):
            path, target = self.samples[index]
            try:
                sample = self.loader(path)
            except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
                raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e})") from e
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target

    return CheckedImageFolder


_IMAGEFOLDER_CLS = None


# Training augmentations (`--augment`): "basic" = random-resized crop [+ flip]; "auto_augment_tf" = the same
# followed by AutoAugment, the original's ImageNet recipe. The original ran TensorFlow's EfficientNet policy
# ("v0"); torchvision's ImageNet AutoAugment policy is used instead (the same operations, other sub-policies).
AUGMENTATIONS = ("basic", "auto_augment_tf")
# AutoAugment fills the corners its shears, rotations and translations uncover with the mean image colour
# (as the original), not black, so the filled area normalises to ~0.
_MEAN_FILL = [round(255 * m) for m in IMAGENET_MEAN]


def build_transform(train: bool, image_size: int, hflip: bool = False, min_scale: float = 0.35,
                    augment: str = "basic"):
    """Train: RandomResizedCrop(scale min_scale..1) [+ flip] [+ AutoAugment]; eval: Resize(size/0.875) +
    CenterCrop; ImageNet norm. `augment` (one of AUGMENTATIONS) only changes the training transform."""
    _, T = _torchvision()
    bilinear = T.InterpolationMode.BILINEAR
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augmentation {augment!r}: expected one of {', '.join(AUGMENTATIONS)}")
    if train:
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"crop min_scale {min_scale}: expected a number in (0, 1]")
        ops = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=bilinear)]
        if hflip:
            ops.append(T.RandomHorizontalFlip())
        if augment == "auto_augment_tf":
            # on the crop, as the original: its translations are relative to the image size, so small
            # images (digits) and ImageNet crops get the same relative shifts
            ops.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=bilinear, fill=_MEAN_FILL))
    else:
        ops = [T.Resize(int(image_size / 0.875), interpolation=bilinear), T.CenterCrop(image_size)]
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def build_dataset(root: str | os.PathLike, split: str, train: bool, image_size: int, hflip: bool = False,
                  min_scale: float = 0.35, augment: str = "basic"):
    """ImageFolder over ``root/split`` with train or eval transforms. ``hflip`` adds random horizontal flips
    (off by default: digits must not be mirrored; turn it on for natural images such as ImageNet);
    ``augment`` names the training augmentation (AUGMENTATIONS)."""
    global _IMAGEFOLDER_CLS
    if int(image_size) < 1:
        raise ValueError(f"image_size {image_size}: expected a positive integer")
    transform = build_transform(train, int(image_size), hflip, min_scale, augment)
    path = _check_imagefolder(Path(root), split)
    if _IMAGEFOLDER_CLS is None:
        _IMAGEFOLDER_CLS = _make_imagefolder_class()
    return _IMAGEFOLDER_CLS(str(path), transform=transform)


def split_holdout(dataset: Dataset, holdout_size: int, seed: int = 0,
                  holdout_dataset: Dataset | None = None) -> tuple[Subset, Subset]:
    """(train_subset, holdout_subset) from one fixed permutation of ``dataset`` (seeded by ``seed``).

    ``holdout_dataset``: the same samples with other transforms (e.g. ``build_dataset(root, "train",
    train=False, ...)`` for search fitness); the holdout subset then indexes into it.
    """
    n = len(dataset)
    holdout_size = int(holdout_size)
    if not 0 < holdout_size < n:
        raise ValueError(f"holdout size {holdout_size}: expected 1..{n - 1} (the train split has {n} images)")
    if holdout_dataset is not None and len(holdout_dataset) != n:
        raise ValueError(f"holdout_dataset has {len(holdout_dataset)} samples but the dataset has {n}: "
                         "they must list the same images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    holdout = sorted(perm[:holdout_size])
    train = sorted(perm[holdout_size:])
    return Subset(dataset, train), Subset(holdout_dataset if holdout_dataset is not None else dataset, holdout)


# --------------------------------------------------------------------------- loaders
class SeededSamples(Dataset):
    """``dataset`` whose random augmentation of sample i in epoch e is drawn from a torch RNG seeded with
    (seed, e, i): the same whichever rank, DataLoader worker or resumed run loads it. The global RNG is left
    as it was."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index))
            return self.dataset[index]

    def __getattr__(self, name: str):  # e.g. .classes / .samples of the wrapped ImageFolder
        # not dunders: a Subset's __getitems__ (batched fetch) would bypass the per-sample seeds
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochSampler(DistributedSampler):
    """This rank's share of a (seed, epoch) permutation (DistributedSampler's split; rank 0 of 1 without a
    process group) that can start part-way: after ``start_at(n)`` the next epoch begins at its n-th sample, so a
    run resumed at step k loads batches k, k+1, ... without loading the first k again."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, drop_last: bool, distributed: bool):
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def start_at(self, sample: int) -> None:
        self.start = int(sample)

    def __iter__(self):
        start, self.start = self.start, 0  # once: the epoch after a resumed one is whole again
        return iter(list(super().__iter__())[start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, distributed: bool = False,
                 seed: int = 0, drop_last: bool | None = None) -> DataLoader:
    """DataLoader with deterministic shuffling (train: an :class:`EpochSampler`, split over the ranks when
    ``distributed``; augmentation seeded per sample by :class:`SeededSamples`).

    Call :func:`set_loader_epoch` before each epoch so the batches depend on (seed, epoch) only, and
    :func:`start_loader_at` to resume mid-epoch without loading the batches done. ``drop_last`` defaults to
    ``train`` when the dataset holds more than one batch (BatchNorm in training mode cannot take a batch of one).
    Memory is pinned when CUDA is available. Workers are started per epoch (not persistent): they must see the
    epoch set by `set_loader_epoch` for the augmentation seeds.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size}: expected a positive integer")
    if len(dataset) == 0:
        raise ValueError("cannot build a loader over an empty dataset")
    if drop_last is None:
        drop_last = bool(train) and len(dataset) > batch_size
    distributed = distributed and dist.is_dist_avail_and_initialized()
    if train:
        dataset = SeededSamples(dataset, seed)
        sampler = EpochSampler(dataset, shuffle=True, seed=int(seed), drop_last=True, distributed=distributed)
    elif distributed:
        sampler = EpochSampler(dataset, shuffle=False, seed=int(seed), drop_last=False, distributed=True)
    else:
        sampler = None
    loader = DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, num_workers=int(workers),
                        drop_last=drop_last, persistent_workers=False, pin_memory=torch.cuda.is_available())
    loader.base_seed = int(seed)
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the order and augmentation of ``loader``'s batches a function of (seed, epoch)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(int(epoch))
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = int(epoch)


def start_loader_at(loader: DataLoader, batch: int) -> None:
    """The next pass over ``loader`` (a train loader) starts at batch ``batch`` of its epoch: a mid-epoch resume
    that does not load the batches already done."""
    if not isinstance(loader.sampler, EpochSampler):
        raise ValueError("start_loader_at needs a train loader of build_loader")
    loader.sampler.start_at(int(batch) * int(loader.batch_size))


def calib_batches(loader: DataLoader, num_batches: int) -> Iterator[Any]:
    """Exactly ``num_batches`` batches from ``loader``, starting over when it runs out (BN calibration)."""
    num_batches = int(num_batches)
    if num_batches <= 0:
        return
    produced = 0
    while produced < num_batches:
        got_any = False
        for batch in loader:
            got_any = True
            yield batch
            produced += 1
            if produced >= num_batches:
                return
        if not got_any:
            raise ValueError("calibration loader yielded no batch (empty dataset or batch larger than the data "
                             "with drop_last)")


def split_counts(root: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> dict[str, dict[str, int]]:
    """Images per class per split of an ImageFolder root: ``{split: {class: count}}`` (missing splits skipped)."""
    out: dict[str, dict[str, int]] = {}
    for split in splits:
        path = Path(root) / split
        if not path.is_dir():
            continue
        out[split] = {c.name: sum(1 for f in c.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
                      for c in sorted(path.iterdir()) if c.is_dir() and not c.name.startswith(".")}
    return out


# ------------------------------------------------------------------------- torchvision classification sets
# The original downstream_cls.py's datasets: name -> (train split keyword, classes, SGD lr, weight decay). The
# lr / weight decay are its per-dataset recipe; the train split is "train=True" for CIFAR, else its split name.
DOWNSTREAM_DATASETS = {
    "CIFAR10": (None, 10, 0.0125, 4e-5),
    "CIFAR100": (None, 100, 0.0125, 4e-5),
    "Flowers102": ("train", 102, 0.15, 4e-6),
    "OxfordIIITPet": ("trainval", 37, 0.00375, 4e-6),
    "Food101": ("train", 101, 0.15, 4e-8),
    "StanfordCars": ("train", 196, 0.15, 0.0),
    "FGVCAircraft": ("trainval", 102, 0.075, 4e-8),
}


def build_torchvision_dataset(name: str, root: str | os.PathLike, train: bool, image_size: int,
                              hflip: bool = False, download: bool = False):
    """A torchvision classification set of `DOWNSTREAM_DATASETS` read from ``root`` (torchvision's layout),
    with our train / eval transforms. Nothing is downloaded unless ``download``; a missing set is one
    FileNotFoundError saying where it was looked for."""
    import torchvision.datasets as tvd

    if name not in DOWNSTREAM_DATASETS:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(DOWNSTREAM_DATASETS)}")
    split = DOWNSTREAM_DATASETS[name][0]
    kwargs = {"train": train} if split is None else {"split": split if train else "test"}
    transform = build_transform(train, int(image_size), hflip, 0.35)
    try:
        return getattr(tvd, name)(str(root), transform=transform, download=download, **kwargs)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(f"dataset {name} not found under {Path(root).resolve()} (torchvision layout; "
                                f"{' '.join(str(e).split())}); pass --download to fetch it") from None
