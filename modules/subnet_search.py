"""Subnet search (the original's mutation, crossover and top-k evolution) and subnet checkpoints.

The pieces `search_subnet.py`, `eval_supernet.py`, `export_subnet.py` and `downstream_cls.py` share:

* `SubnetSpace`: the subnet choices of one supernet (depth, kernel, width window, expand per stage and
  the superspace's full `supernet_hw_list`) with the operators of the search: `random`, `mutate`
  (the original's, but over every resolution, not just {192, 208, 224}) and `crossover`; they take an explicit
  `random.Random` and return `SubnetConfig`s with float/None expand ratios.
* `LatencyOracle`: cached predicted latency of a `SubnetConfig` (anything with `predict_subnet(net)`).
* `SubnetEvaluator`: the fitness, top-1 of the BN-recalibrated subnet on fixed, in-memory batches
  (`build_eval_batches`). It runs the subnet inside the supernet: a static (extracted) subnet is the same
  code with single-choice lists, so this is what the extracted subnet computes (tested), without copying
  weights per evaluation. Batches are resized to each resolution once and kept (memory permitting).
* `run_subnet_search`: `modules.evolution.topk_evolution` over the subnets whose predicted latency lies in
  [c - d, c]; out-of-window candidates are rejected before evaluation; no loop is unbounded, and a window
  that no random subnet reaches is a ValueError giving the supernet's latency range.
* Supernet checkpoints (`find_supernet_checkpoint`, `load_supernet_checkpoint`) and standalone subnet
  checkpoints (`save_subnet_checkpoint`, `load_subnet_checkpoint`):
  ``{"config": net.config_dict(), "model": state_dict, "quant_mode": "fp32"|"lsq", "quant_preset": ...}``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.cli import nonneg_int, positive_int
from modules.encoding import SubnetConfig, SupernetChoice, parse_subnet, parse_supernet
from modules.superspace import SUBNET_STAGES

SUBNET_CKPT_VERSION = 1
WINDOW_SEED_OFFSET = 7919  # rng of the window check, apart from the search rng


def _float_or_none(e):
    return None if e is None else float(e)


# ------------------------------------------------------------------------------------------ search space
@dataclass(frozen=True)
class StageChoices:
    name: str
    depth_list: tuple
    kernel_list: tuple
    width_list: tuple  # the supernet's active width window
    expand_list: tuple  # floats, or (None,) for blocks without expand ratio


class SubnetSpace:
    """The subnets of one supernet choice, with the search operators."""

    def __init__(self, choice: SupernetChoice, hw_list: Sequence[int] | None = None):
        self.choice = choice
        self.stages: list[StageChoices] = []
        for name in SUBNET_STAGES:
            spec, stage, window = choice.stage_spec(name)
            self.stages.append(StageChoices(name, tuple(stage.depth_list), tuple(spec.kernel_list), tuple(window),
                                            tuple(_float_or_none(e) for e in spec.expand_list)))
        self.hw_list = tuple(hw_list) if hw_list else tuple(choice.space.supernet_hw_list)
        if not self.hw_list:
            raise ValueError(f"{choice}: empty resolution list")

    def decode(self, text: str) -> SubnetConfig:
        cfg = parse_subnet(text, self.choice)
        if cfg.resolution not in self.hw_list:
            raise ValueError(f"subnet {text!r}: resolution {cfg.resolution} not in {list(self.hw_list)}")
        return cfg

    @staticmethod
    def _block(s: StageChoices, rng: random.Random) -> tuple:
        return rng.choice(s.kernel_list), rng.choice(s.width_list), rng.choice(s.expand_list)

    def random(self, rng: random.Random) -> SubnetConfig:
        """Uniform depth per stage, uniform (k, w, e) per block, uniform resolution."""
        stages = [[self._block(s, rng) for _ in range(rng.choice(s.depth_list))] for s in self.stages]
        return SubnetConfig.from_stages(stages, rng.choice(self.hw_list))

    def extreme(self, largest: bool) -> SubnetConfig:
        pick = max if largest else min
        stages = [[(pick(s.kernel_list), pick(s.width_list),
                    None if s.expand_list == (None,) else pick(s.expand_list))] * pick(s.depth_list)
                  for s in self.stages]
        return SubnetConfig.from_stages(stages, pick(self.hw_list))

    def mutate(self, cfg: SubnetConfig, rng: random.Random, prob: float, resolution_prob: float) -> SubnetConfig:
        """Per stage the depth is re-drawn with `prob`; each of k, w, e of the kept positions is re-drawn with
        `prob`; positions beyond the old depth are drawn at random; the resolution is re-drawn (over the whole
        resolution list) with `resolution_prob`."""
        stages = []
        for s, blocks in zip(self.stages, cfg.per_stage()):
            depth = rng.choice(s.depth_list) if rng.random() < prob else len(blocks)
            new = []
            for j in range(depth):
                if j < len(blocks):
                    k, w, e = blocks[j]
                    if rng.random() < prob:
                        k = rng.choice(s.kernel_list)
                    if rng.random() < prob:
                        w = rng.choice(s.width_list)
                    if rng.random() < prob:
                        e = rng.choice(s.expand_list)
                    new.append((k, w, _float_or_none(e)))
                else:
                    new.append(self._block(s, rng))
            stages.append(new)
        r = rng.choice(self.hw_list) if rng.random() < resolution_prob else cfg.resolution
        return SubnetConfig.from_stages(stages, r)

    def crossover(self, a: SubnetConfig, b: SubnetConfig, rng: random.Random) -> SubnetConfig:
        """Per stage the depth of a random parent; per block each of k, w, e from a random parent; positions only
        one parent has are copied from it; the resolution of a random parent."""
        stages = []
        for pa, pb in zip(a.per_stage(), b.per_stage()):
            depth = len(rng.choice((pa, pb)))
            new = []
            for j in range(depth):
                if j < len(pa) and j < len(pb):
                    k, w, e = (rng.choice((x, y)) for x, y in zip(pa[j], pb[j]))
                    new.append((k, w, _float_or_none(e)))
                else:
                    k, w, e = (pa if j < len(pa) else pb)[j]
                    new.append((k, w, _float_or_none(e)))
            stages.append(new)
        return SubnetConfig.from_stages(stages, rng.choice((a.resolution, b.resolution)))


def resolve_subnet(space: SubnetSpace, text: str) -> SubnetConfig:
    """"max", "min", a published subnet's name (SEQnet@vnni-A0, of this supernet), a subnet encoding, or a JSON
    file with a "subnet" key (e.g. search_subnet's best.json, whose "supernet" must then be this supernet)."""
    from modules.named_models import get_named_model, model_names

    text = str(text).strip()
    if text in ("max", "min"):
        return space.extreme(text == "max")
    if text in model_names():
        m = get_named_model(text)
        if m.kind != "subnet" or m.supernet != str(space.choice):
            raise ValueError(f"{text} is not a subnet of {space.choice}")
        return space.decode(m.subnet)
    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"subnet JSON {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or "subnet" not in d:
            raise ValueError(f"{path}: expected a JSON object with a 'subnet' key")
        if d.get("supernet") not in (None, str(space.choice)):
            raise ValueError(f"{path}: subnet of supernet {d['supernet']}, not of {space.choice}")
        return space.decode(d["subnet"])
    return space.decode(text)


# ------------------------------------------------------------------------------------------ latency
class LatencyOracle:
    """Predicted latency (ms) of subnets of `net`, cached by encoding. `predictor.predict_subnet(net)` is called
    with the subnet active on `net`."""

    def __init__(self, net: nn.Module, predictor: Any):
        if not hasattr(predictor, "predict_subnet"):
            raise ValueError(f"latency predictor {type(predictor).__name__} has no predict_subnet(net) method")
        self.net, self.predictor = net, predictor
        self.cache: dict[str, float] = {}

    def __call__(self, cfg: SubnetConfig | str) -> float:
        key = str(cfg)
        lat = self.cache.get(key)
        if lat is None:
            self.net.set_active_subnet(cfg)
            lat = float(self.predictor.predict_subnet(self.net))
            if not math.isfinite(lat):
                raise ValueError(f"latency predictor returned {lat} for subnet {key}")
            self.cache[key] = lat
        return lat


def load_predictor_for(platform: str, superspace: str, table_dir: str | None = None):
    """`modules.latency.predictor.load_predictor`, with a clear error while that module is missing."""
    try:
        from modules.latency.predictor import load_predictor
    except ImportError as e:
        raise ValueError(f"latency predictor {platform!r}: modules.latency is not available ({e})") from None
    return load_predictor(platform, superspace, table_dir)


def latency_range(space: SubnetSpace, lat: LatencyOracle, rng: random.Random, samples: int = 200) -> dict:
    """Predicted latency of the min and max subnets and the range over `samples` random subnets."""
    lo, hi = lat(space.extreme(False)), lat(space.extreme(True))
    vals = [lat(space.random(rng)) for _ in range(samples)]
    return {"min_subnet": lo, "max_subnet": hi, "sampled_min": min(vals), "sampled_max": max(vals),
            "sampled_median": sorted(vals)[len(vals) // 2]}


def search_root(output_dir: str | os.PathLike, supernet: str) -> Path:
    """<output_dir>/search_subnet/<supernet>: the logs and args of `search_subnet.py`, one dir per window."""
    return Path(output_dir) / "search_subnet" / str(supernet)


def search_run_dir(output_dir: str | os.PathLike, supernet: str, target: float, delta: float) -> Path:
    """The run of one latency window [target - delta, target]: state.json, best.json, history.csv, ..."""
    return search_root(output_dir, supernet) / f"c{target:g}_d{delta:g}"


def sample_in_window(space: SubnetSpace, lat: LatencyOracle, lo: float, hi: float, rng: random.Random,
                     num: int, max_tries: int, exclude: Iterable[str] = ()) -> list[SubnetConfig]:
    """Up to `num` distinct random subnets with latency in [lo, hi] (at most `max_tries` draws)."""
    seen, out = set(exclude), []
    for _ in range(max_tries):
        if len(out) >= num:
            break
        cfg = space.random(rng)
        key = str(cfg)
        if key not in seen and lo <= lat(cfg) <= hi:
            seen.add(key)
            out.append(cfg)
    return out


# ------------------------------------------------------------------------------------------ fitness data
def build_calib_batches(data_dir: str | os.PathLike, image_size: int, *, holdout_size: int | None = None,
                        num_calib_batches: int = 20, calib_batch_size: int = 64, seed: int = 0, workers: int = 0,
                        augment: bool = False, hflip: bool = False):
    """(calib, holdout, info): a fixed list of `num_calib_batches` train image tensors for BN calibration, drawn
    (seeded) from the train images *not* held out — with eval transforms as `train_supernet.py` validates, or
    with the training augmentation (`augment`, as the original) — and the held-out train subset (eval
    transforms; the fixed-seed permutation of `modules.data.split_holdout`)."""
    from modules.data import build_dataset, build_loader, calib_batches, split_holdout

    train_eval = build_dataset(data_dir, "train", train=False, image_size=image_size)
    train_calib = build_dataset(data_dir, "train", train=True, image_size=image_size, hflip=hflip) if augment \
        else train_eval
    n_train = len(train_eval)
    if holdout_size is None:
        holdout_size = min(10_000, max(1, n_train // 5))
    calib_src, holdout = split_holdout(train_calib, holdout_size, seed=seed, holdout_dataset=train_eval)
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # seeded augmentation; the batches are drawn once and kept
    try:
        loader = build_loader(calib_src, calib_batch_size, train=True, workers=workers, seed=seed)
        calib = [b[0] for b in calib_batches(loader, num_calib_batches)]
    finally:
        torch.random.set_rng_state(g_state)
    info = {"calib_images": sum(len(x) for x in calib), "holdout_size": holdout_size, "train_images": n_train}
    return calib, holdout, info


def build_eval_batches(data_dir: str | os.PathLike, image_size: int, *, split: str = "holdout",
                       holdout_size: int | None = None, num_calib_batches: int = 20, calib_batch_size: int = 64,
                       batch_size: int = 64, seed: int = 0, workers: int = 0, augment: bool = False,
                       hflip: bool = False, max_eval_images: int | None = None, cache_limit_gb: float = 4.0,
                       log: Callable = print):
    """(calib, val, info): `calib` from `build_calib_batches`, `val` the evaluation batches [(images, labels)]:
    the held-out part of train (`split` "holdout") or the val split ("val").

    Everything is loaded once into memory; an evaluation set larger than `cache_limit_gb` stays a DataLoader
    (re-read per evaluation)."""
    from torch.utils.data import Subset

    from modules.data import build_dataset, build_loader

    if split not in ("holdout", "val"):
        raise ValueError(f"evaluation split {split!r}: expected 'holdout' or 'val'")
    calib, holdout, info = build_calib_batches(
        data_dir, image_size, holdout_size=holdout_size, num_calib_batches=num_calib_batches,
        calib_batch_size=calib_batch_size, seed=seed, workers=workers, augment=augment, hflip=hflip)
    eval_ds = holdout if split == "holdout" else build_dataset(data_dir, "val", train=False, image_size=image_size)
    if max_eval_images is not None and max_eval_images < len(eval_ds):
        eval_ds = Subset(eval_ds, list(range(int(max_eval_images))))
    val_loader = build_loader(eval_ds, batch_size, train=False, workers=workers)
    nbytes = len(eval_ds) * 3 * image_size * image_size  # kept as uint8 pixels
    if nbytes <= cache_limit_gb * 2**30:
        val = PixelBatches(val_loader)
        cached = True
    else:
        log(f"evaluation set of {len(eval_ds)} images ({nbytes / 2**30:.1f} GB as uint8) exceeds --cache_limit_gb "
            f"{cache_limit_gb}: it is re-read for every evaluation")
        val, cached = val_loader, False
    info.update({"split": split, "eval_images": len(eval_ds), "eval_cached": cached})
    return calib, val, info


class PixelBatches:
    """Evaluation batches [(images, labels)] kept in memory as uint8 pixels (a quarter of float32: 10k images at
    224 px take 1.4 GiB) and normalised when iterated, with the very operations of the eval transform (ToTensor's
    /255, then Normalize), so the images are bitwise those of the loader. A batch whose pixels do not round-trip
    (another normalisation) is kept as float."""

    def __init__(self, batches: Iterable):
        from modules.data import IMAGENET_MEAN, IMAGENET_STD

        self.mean = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, -1, 1, 1)
        self.batches = [(self._pixels(x), y) for x, y in batches]

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        u8 = (x * self.std + self.mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        return u8 if torch.equal(self._normalise(u8), x) else x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        return x.float().div(255).sub_(self.mean).div_(self.std)

    def __iter__(self):
        for x, y in self.batches:
            yield self._normalise(x), y

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x, _ in self.batches)


class _Resized:
    """`batches` resized to `resolution` as they are iterated (no copy kept)."""

    def __init__(self, batches: Iterable, resolution: int):
        self.batches, self.resolution = batches, resolution

    def __iter__(self):
        for x, y in self.batches:
            yield resize_batch(x, self.resolution), y


def resize_batch(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """What `SuperNet.forward` does to an input of another size (bicubic, no antialias)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)


class SubnetEvaluator:
    """fitness(cfg) = top-1 (%) of `cfg` on `val` after BN calibration on `calib`, run inside `net`."""

    def __init__(self, net: nn.Module, calib: list, val: Iterable, device="cpu", cache_limit_gb: float = 4.0):
        if not calib:
            raise ValueError("BN calibration needs at least one batch")
        from modules.lsq import quantizers

        self.net, self.calib, self.val, self.device = net, calib, val, torch.device(device)
        self.cache_limit = cache_limit_gb * 2**30
        self._resized: dict[int, tuple] = {}
        self._bytes = 0
        self.num_evaluations = 0
        # LSQ+ quantizers the checkpoint never initialised are set from the first batch they see; they are reset
        # after every evaluation so that a subnet's fitness does not depend on the evaluation order (resume)
        self._uninit = [q for q in quantizers(net) if q.enabled and not bool(q.initialized)]

    def _data(self, resolution: int):
        if resolution in self._resized:
            return self._resized[resolution]
        calib = [resize_batch(x, resolution) for x in self.calib]
        val, size = self.val, sum(x.numel() * x.element_size() for x in calib)
        if isinstance(val, (list, PixelBatches)):  # in memory: resized float copies kept while they fit
            val = _Resized(val, resolution)
            n = sum(len(y) for _, y in getattr(self.val, "batches", self.val))
            val_bytes = n * 3 * resolution * resolution * 4
            if self._bytes + size + val_bytes <= self.cache_limit:
                val, size = list(val), size + val_bytes
        if self._bytes + size <= self.cache_limit:
            self._resized[resolution] = (calib, val)
            self._bytes += size
        return calib, val

    def __call__(self, cfg: SubnetConfig | str) -> float:
        from modules.engine import calibrate_bn, evaluate_top1

        self.net.set_active_subnet(cfg)
        res = self.net.active_resolution
        calib, val = self._data(res)
        try:
            calibrate_bn(self.net, calib, len(calib), self.device)
            self.num_evaluations += 1
            return evaluate_top1(self.net, val, self.device)
        finally:
            for q in self._uninit:
                q.initialized.fill_(False)


# ------------------------------------------------------------------------------------------ search
@dataclass
class SearchSettings:
    """Defaults of the original subnet search."""
    population: int = 512
    parent_ratio: float = 0.5
    iterations: int = 20
    num_mutations: int = 128
    num_crossovers: int = 128
    mutate_prob: float = 0.3
    resolution_mutate_prob: float = 0.5
    max_crossover_tries: int = 50
    max_tries: int = 5000  # per new candidate (random, mutant or crossover) and for the window check

    @property
    def parent_size(self) -> int:
        return max(1, int(round(self.population * self.parent_ratio)))

    def check(self) -> None:
        for name in ("population", "iterations", "max_crossover_tries", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"search setting {name}={getattr(self, name)} must be >= 1")
        for name in ("num_mutations", "num_crossovers"):
            if getattr(self, name) < 0:
                raise ValueError(f"search setting {name}={getattr(self, name)} must be >= 0")
        if not 0 < self.parent_ratio <= 1:
            raise ValueError(f"parent_ratio {self.parent_ratio} must be in (0, 1]")
        for name in ("mutate_prob", "resolution_mutate_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must be in [0, 1]")


@dataclass
class SearchOutcome:
    evo: Any
    trajectory: list
    target: float
    delta: float
    window: tuple
    latency_info: dict = field(default_factory=dict)

    @property
    def best(self):
        return self.evo.best()


def check_window(space: SubnetSpace, lat: LatencyOracle, lo: float, hi: float, rng: random.Random,
                 max_tries: int, platform: str = "") -> SubnetConfig:
    """A random subnet in [lo, hi], or a ValueError giving the supernet's latency range after `max_tries`."""
    for _ in range(max_tries):
        cfg = space.random(rng)
        if lo <= lat(cfg) <= hi:
            return cfg
    r = latency_range(space, lat, rng)
    on = f" under {platform}" if platform else ""
    raise ValueError(
        f"no subnet of {space.choice} has a predicted latency{on} in [{lo:g}, {hi:g}] ms after {max_tries} random "
        f"tries; its subnets range from {r['min_subnet']:.4g} ms (min subnet) to {r['max_subnet']:.4g} ms "
        f"(max subnet), random subnets {r['sampled_min']:.4g}..{r['sampled_max']:.4g} ms (median "
        f"{r['sampled_median']:.4g}); choose a latency constraint in that range (or widen --latency_delta)")


def run_subnet_search(space: SubnetSpace, lat: LatencyOracle, evaluator: Callable[[SubnetConfig], float],
                      target: float, delta: float, settings: SearchSettings | None = None, *, seed: int = 0,
                      state_path: str | os.PathLike | None = None, resume: bool = False,
                      save_interval: float = 30.0, progress: bool = True, config: dict | None = None,
                      platform: str = "", fitness_cache: dict | None = None,
                      log: Callable[[str], None] | None = None) -> SearchOutcome:
    """Top-k evolution over the subnets of `space` with predicted latency in [target - delta, target].

    `evaluator(cfg) -> top-1` is only called for in-window candidates. `fitness_cache` (key -> top-1) may be
    shared between targets. With `resume` and an existing `state_path`, the saved search continues and ends
    exactly where an uninterrupted run ends."""
    from modules.dist import broadcast_object, get_world_size, is_main_process, map_over_ranks
    from modules.evolution import Evolution, topk_evolution

    settings = settings or SearchSettings()
    settings.check()
    if not (delta >= 0 and target > 0 and math.isfinite(target) and math.isfinite(delta)):
        raise ValueError(f"latency constraint {target} / delta {delta}: need constraint > 0 and delta >= 0")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    lo, hi = target - delta, target
    fitness_cache = {} if fitness_cache is None else fitness_cache

    def in_window(cfg: SubnetConfig) -> bool:
        return lo <= lat(cfg) <= hi

    def fitness_many(cfgs: list[SubnetConfig]) -> list:
        """The candidates not scored yet are spread over the ranks; every rank gets every score."""
        todo = [c for c in cfgs if str(c) not in fitness_cache]
        for c, acc in zip(todo, map_over_ranks(lambda c: float(evaluator(c)), todo)):
            fitness_cache[str(c)] = acc
        st = evo.driver_state
        # topk_evolution appends the iteration's best before making its children: 0 = initial population
        iteration = len(st.get("best", [])) if st else 0
        return [(fitness_cache[str(c)], {"latency": lat(c), "iteration": iteration}) for c in cfgs]

    cfg = {"supernet": str(space.choice), "hw_list": list(space.hw_list), "target": target, "delta": delta,
           "platform": platform, "seed": seed,
           **{k: v for k, v in asdict(settings).items() if k not in ("iterations", "max_tries")}}
    cfg.update(config or {})
    main = is_main_process()  # every rank runs the same evolution; rank 0 alone writes its state
    evo = Evolution(lambda c: fitness_many([c])[0], encode=str, decode=space.decode, is_valid=in_window, seed=seed,
                    max_tries=settings.max_tries, state_path=str(state_path) if state_path and main else None,
                    save_interval=save_interval, progress=progress and main, config=cfg, log=log,
                    fitness_many=fitness_many, batch_size=get_world_size())
    resumed = False
    if state_path and broadcast_object(os.path.isfile(state_path)):
        if not resume:
            raise ValueError(f"{state_path} exists: pass --resume to continue that search, or --fresh to start over")
        evo.load(str(state_path))
        resumed = True
        log(f"resumed {state_path}: {len(evo.history)} subnets evaluated, "
            f"iteration {(evo.driver_state or {}).get('iteration', 0)}")
    if not resumed:
        # fail fast (and never loop) when the window is out of reach; uses its own rng, not the engine's
        check_window(space, lat, lo, hi, random.Random(seed + WINDOW_SEED_OFFSET), settings.max_tries, platform)
    try:
        trajectory = topk_evolution(
            evo, random_candidate=space.random,
            mutate=lambda c, rng: space.mutate(c, rng, settings.mutate_prob, settings.resolution_mutate_prob),
            crossover=space.crossover, population_size=settings.population, parent_size=settings.parent_size,
            iterations=settings.iterations, num_mutations=settings.num_mutations,
            num_crossovers=settings.num_crossovers, max_crossover_tries=settings.max_crossover_tries)
    except KeyboardInterrupt:
        if state_path:  # the engine saved the state on its way out
            log(f"interrupted: state saved to {state_path}; continue with --resume")
        raise
    if not evo.history:
        raise ValueError(f"the search for [{lo:g}, {hi:g}] ms evaluated no subnet ({evo.stop_reason})")
    bad = [r.key for r in evo.history if not lo <= r.info["latency"] <= hi]
    assert not bad, f"out-of-window subnets were evaluated: {bad[:3]}"
    return SearchOutcome(evo, trajectory, target, delta, (lo, hi))


# ------------------------------------------------------------------------------------------ supernet checkpoints
def find_supernet_checkpoint(output_dir: str | os.PathLike, encoding: str, quant_mode: str = "lsq",
                             supernet_dir: str | os.PathLike | None = None) -> Path:
    """`<supernet_dir>/<encoding>/{checkpoint,lsq}.pth` (lsq.pth for quant_mode "lsq"); `supernet_dir` defaults
    to `<output_dir>/supernet_training`. The original SpaceEvo's directory names for the supernet
    (``spaceevo@vnni``, ``<encoding>-align0``) are looked in too, so its released and trained checkpoints are
    found where it put them."""
    from modules.original import original_dir_names

    if quant_mode not in ("fp32", "lsq"):
        raise ValueError(f"quant mode {quant_mode!r}: expected fp32 or lsq")
    name = "lsq.pth" if quant_mode == "lsq" else "checkpoint.pth"
    root = Path(supernet_dir) if supernet_dir else Path(output_dir) / "supernet_training"
    for d in [encoding, *original_dir_names(encoding)]:
        if (root / d / name).is_file():
            return root / d / name
    path = root / encoding / name
    other = path.with_name("checkpoint.pth" if quant_mode == "lsq" else "lsq.pth")
    hint = f" ({other.name} exists there: use --quant_mode {'fp32' if quant_mode == 'lsq' else 'lsq'})" \
        if other.is_file() else " (train it with train_supernet.py, or give --checkpoint)"
    raise FileNotFoundError(f"supernet checkpoint {path} does not exist{hint}")


def _ckpt_meta(ckpt: dict, *names: str):
    args = ckpt.get("args") or {}
    if not isinstance(args, dict):
        args = vars(args) if hasattr(args, "__dict__") else {}
    for name in names:
        if ckpt.get(name) is not None:
            return ckpt[name]
        if args.get(name) is not None:
            return args[name]
    return None


def state_dict_of(ckpt: Any, path) -> dict:
    """The state dict of a loaded checkpoint: under ``model`` (ours), ``state_dict`` (the original's) or bare;
    ``module.`` prefixes (DDP) removed."""
    from modules.checkpoint import strip_module_prefix

    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                return strip_module_prefix(ckpt[key])
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return strip_module_prefix(ckpt)
    raise ValueError(f"checkpoint {path}: expected a state dict, bare or under 'model' / 'state_dict'")


def _state_quant(state: dict) -> tuple[str, str | None]:
    """(quant mode, preset guess) from the keys and shapes of a state dict."""
    w_scales = [v for k, v in state.items() if k.endswith("weight_quant.scale")]
    if not w_scales:
        return "fp32", None
    return "lsq", ("ort" if any(v.numel() > 1 for v in w_scales) else "original")


def _encoding_of(ckpt: dict, path: Path, encoding: str | None, *meta: str) -> SupernetChoice:
    """The supernet of a checkpoint: `encoding`, else the checkpoint's own record (`meta` keys, top level or in
    ``args``), else its directory's name (ours: the encoding; the original's: ``spaceevo@vnni``, ``...-align0``)."""
    from modules.original import supernet_from_dir_name

    enc = encoding or _ckpt_meta(ckpt, *meta)
    if enc is None:
        enc = supernet_from_dir_name(path.parent.name) or path.parent.name
        try:
            parse_supernet(enc)
        except ValueError:
            raise ValueError(f"checkpoint {path}: cannot tell its supernet encoding (not in the checkpoint, "
                             f"directory name {path.parent.name!r} is none); pass --supernet") from None
    return parse_supernet(str(enc))


def _load_original(ckpt: dict, state: dict, path: Path, encoding: str | None):
    """(net, quant mode, preset) of an original SpaceEvo checkpoint: its names mapped to ours, the LSQ+ scalars
    computed with the ``original`` preset (the one that reproduces its fake quantization)."""
    from modules.checkpoint import load_state_dict_strict
    from modules.lsq import set_quant_mode
    from modules.original import from_original_state
    from modules.supernet import SuperNet

    choice = _encoding_of(ckpt, path, encoding, "supernet_encoding")
    head = next((k for k in state if k.endswith("stages.logits.blocks.0.linear.weight")), None)
    net = SuperNet(choice, int(state[head].shape[0]) if head else None)
    ours, mode = from_original_state(state, net, f"checkpoint {path} (supernet {choice})")
    if mode == "lsq":
        set_quant_mode(net, "lsq", "original")
    load_state_dict_strict(net, ours, f"checkpoint {path}")
    return net, mode, ("original" if mode == "lsq" else None)


def _load_ours(ckpt: dict, state: dict, path: Path, encoding: str | None, log):
    from modules.checkpoint import load_state_dict_strict
    from modules.lsq import quantizers, set_quant_mode
    from modules.supernet import SuperNet

    choice = _encoding_of(ckpt, path, encoding, "supernet", "supernet_choice", "supernet_encoding", "encoding")
    if "logits.linear.weight" not in state:
        raise ValueError(f"checkpoint {path}: no 'logits.linear.weight' in its state dict: not a supernet")
    num_classes = int(state["logits.linear.weight"].shape[0])
    mode_keys, preset_guess = _state_quant(state)
    mode = _ckpt_meta(ckpt, "quant_mode") or mode_keys
    if mode != mode_keys:
        raise ValueError(f"checkpoint {path}: says quant_mode {mode!r} but its weights are {mode_keys}")
    preset = _ckpt_meta(ckpt, "quant_preset", "preset") if mode == "lsq" else None
    if mode == "lsq" and preset is None:
        preset = preset_guess
        log(f"warning: checkpoint {path} does not record its LSQ+ preset; assuming {preset!r}")
    net = SuperNet(choice, num_classes)
    if mode == "lsq":
        set_quant_mode(net, "lsq", preset)
    load_state_dict_strict(net, state, f"checkpoint {path}")
    if mode == "lsq":
        uninit = sum(1 for q in quantizers(net) if not bool(q.initialized))
        if uninit:
            log(f"warning: {uninit} LSQ+ quantizers of {path} were never initialised; they will be set from the "
                "first batch they see")
    return net, mode, preset


def load_supernet_checkpoint(path: str | os.PathLike, encoding: str | None = None, device="cpu",
                             log: Callable[[str], None] | None = None):
    """(SuperNet in eval mode with the checkpoint's weights, quant mode and preset; info dict).

    The supernet encoding comes from `encoding`, else the checkpoint (``supernet`` / ``args.supernet_choice``
    / ``args.supernet`` / ``args.encoding``), else the checkpoint's directory name. Quant mode and preset
    come from the checkpoint (``quant_mode`` / ``quant_preset``, top level or in ``args``), else from its keys.
    The original SpaceEvo's checkpoints (``checkpoint.pth`` fp32, ``lsq.pth`` LSQ+) are recognised by their keys
    and load with the ``original`` preset."""
    from modules.checkpoint import load_checkpoint
    from modules.original import is_original_state

    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = Path(path)
    ckpt = load_checkpoint(path)
    state = state_dict_of(ckpt, path)
    if is_original_state(state):
        net, mode, preset = _load_original(ckpt, state, path, encoding)
    else:
        net, mode, preset = _load_ours(ckpt, state, path, encoding, log)
    net.to(device).eval()
    args = ckpt.get("args") or {}
    info = {"path": str(path), "supernet": str(net.choice), "quant_mode": mode, "quant_preset": preset,
            "num_classes": net.num_classes, "epoch": ckpt.get("epoch"),
            "args": args if isinstance(args, dict) else dict(vars(args))}
    return net, info


def add_supernet_args(p: argparse.ArgumentParser) -> None:
    """--supernet / --checkpoint / --quant_mode / --data_dir / --image_size / calibration options."""
    from modules.cli import add_aliases
    from modules.original_cli import SupernetAction, SuperspaceAction

    p.add_argument("--supernet", "--supernet_choice", action=SupernetAction, default=None,
                   help="supernet encoding, e.g. tiny-123450-000000, or <blocks>-<windows> / <blocks>_<windows> "
                        "with --superspace (default: read from --checkpoint)")
    p.add_argument("--superspace", action=SuperspaceAction, supernet_dest="supernet", default=None,
                   help="superspace of a --supernet given without it (the original's --superspace)")
    p.add_argument("--checkpoint", default=None, help="supernet checkpoint (default: <supernet_dir>/<supernet>/"
                   "lsq.pth, or checkpoint.pth with --quant_mode fp32)")
    p.add_argument("--supernet_dir", default=None, help="dir of the supernet training runs, <supernet>/ (or the "
                   "original's <supernet>-align0/) in it (default: <output_dir>/supernet_training)")
    # a bare --quant_mode (the original's switch) means LSQ+
    p.add_argument("--quant_mode", choices=["lsq", "fp32"], nargs="?", const="lsq", default="lsq",
                   help="which default checkpoint to load (the mode itself is read from the checkpoint)")
    p.add_argument("--data_dir", default=None, help="ImageFolder root with train/ and val/ (default: the supernet "
                   "training's data: its --data_path, or the digits set in <its output_dir>/data/digits)")
    add_aliases(p, "--data_dir", "--dataset_path", "--dataset_dir", "--data_path")
    p.add_argument("--image_size", type=positive_int, default=None,
                   help="loader image size (default: the training's, else the superspace's largest resolution)")
    p.add_argument("--calib_augment", action="store_true",
                   help="BN-calibration images with the training augmentation (default: eval transforms, as "
                        "train_supernet.py validates)")
    p.add_argument("--hflip", action="store_true", help="with --calib_augment: random horizontal flips")
    p.add_argument("--num_calib_batches", type=positive_int, default=None,
                   help=f"BN calibration batches (default {DATA_DEFAULTS['num_calib_batches']})")
    p.add_argument("--calib_batch_size", type=positive_int, default=None,
                   help=f"(default {DATA_DEFAULTS['calib_batch_size']})")
    p.add_argument("--batch_size", type=positive_int, default=64, help="evaluation batch size")
    p.add_argument("--workers", type=nonneg_int, default=0)
    p.add_argument("--holdout_size", type=positive_int, default=None,
                   help="train images held out for the search fitness; BN calibration never uses them "
                        "(default: the supernet training's --valid_size held-out images, else min(10000, 20%% "
                        "of train))")
    p.add_argument("--data_seed", type=int, default=None,
                   help="seed of the holdout permutation and of the calibration batches (default: the supernet "
                        "training's --seed, else 0)")
    p.add_argument("--cache_limit_gb", type=float, default=4.0, help="memory for cached (resized) batches")
    add_aliases(p, "--valid_size", "--holdout_size")  # one name for hold-out sizes across the scripts


def calib_kwargs(data: dict) -> dict:
    """The BN-calibration / holdout keyword arguments of `build_calib_batches` and `build_eval_batches` from
    the settings `resolve_data` returns."""
    return {"holdout_size": data["holdout_size"], "num_calib_batches": data["num_calib_batches"],
            "calib_batch_size": data["calib_batch_size"], "seed": data["data_seed"],
            "augment": data["calib_augment"], "hflip": data["hflip"]}


DATA_DEFAULTS = {"num_calib_batches": 20, "calib_batch_size": 64, "holdout_size": None, "data_seed": 0}


def resolve_data(args, net_info: dict, saved: dict | None = None, log: Callable | None = None,
                 defaults: dict | None = None) -> dict:
    """The data settings of BN calibration and evaluation, each from: the command line, else `saved` (the
    "data" of a search's best.json, so an exported subnet gets exactly the BN statistics its search fitness
    used), else the supernet checkpoint's training args (its data, image size, and its held-out images:
    `valid_size` with its `seed`, so the search fitness is measured on images the supernet never trained
    on), else `defaults` (over DATA_DEFAULTS). Returns them (JSON-able); `args` is left as parsed."""
    from modules.data import write_digits_imagefolder

    log = log or (lambda msg: print(msg, file=sys.stderr))
    saved = saved or {}
    train = net_info.get("args") or {}
    if args.data_dir:
        data_dir = Path(args.data_dir)
    elif saved.get("data_dir"):
        data_dir = Path(saved["data_dir"])
    elif train.get("data_path"):
        data_dir = Path(train["data_path"])
    else:  # train_supernet.py's default: the digits set under its output dir
        data_dir = Path(train.get("output_dir") or args.output_dir) / "data" / "digits"
        write_digits_imagefolder(data_dir, size=64)  # no-op when complete
    from_train = {}
    if train.get("val_split", "holdout") == "holdout" and train.get("valid_size"):
        from_train = {"holdout_size": int(train["valid_size"]), "data_seed": int(train.get("seed", 0))}
    out = {"data_dir": str(data_dir)}
    for k, default in {**DATA_DEFAULTS, **(defaults or {})}.items():
        v = getattr(args, k, None)
        for src in (saved, from_train):
            if v is None:
                v = src.get(k)
        out[k] = default if v is None else v
    if train.get("val_split") == "val":
        log(f"the supernet {net_info.get('path', '')} was trained on every train image (val_split "
            f"{train.get('val_split')!r}): the held-out images are not new to it")
    elif from_train and (out["data_seed"] != from_train["data_seed"]
                         or (out["holdout_size"] or 0) > from_train["holdout_size"]):
        log(f"the holdout (size {out['holdout_size']}, seed {out['data_seed']}) is not within the supernet "
            f"training's held-out images (size {from_train['holdout_size']}, seed {from_train['data_seed']}): "
            "some were trained on")
    out.update(image_size=args.image_size or saved.get("image_size") or train.get("image_size") or None,
               calib_augment=bool(getattr(args, "calib_augment", False) or saved.get("calib_augment")),
               hflip=bool(args.hflip or saved.get("hflip")))
    return out


def resolve_checkpoint(args) -> Path:
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {path} does not exist")
        return path
    if not args.supernet:
        raise ValueError("give --supernet ENCODING (or --checkpoint PATH)")
    return find_supernet_checkpoint(args.output_dir, args.supernet, args.quant_mode, args.supernet_dir)


# ------------------------------------------------------------------------------------------ subnet checkpoints
def save_subnet_checkpoint(subnet: nn.Module, path: str | os.PathLike, **extra) -> Path:
    """Write a standalone subnet (a static `SuperNet`, e.g. from `get_active_subnet`) atomically."""
    from modules.checkpoint import atomic_save
    from modules.lsq import get_quant_mode, quantizers

    if getattr(subnet, "static_config", None) is None:
        raise ValueError("save_subnet_checkpoint needs a standalone subnet (net.get_active_subnet()), not a supernet")
    mode = get_quant_mode(subnet)
    preset = quantizers(subnet)[0].preset if mode == "lsq" else None
    ckpt = {"version": SUBNET_CKPT_VERSION, "config": subnet.config_dict(), "model": subnet.state_dict(),
            "quant_mode": mode, "quant_preset": preset, **extra}
    return atomic_save(ckpt, path)


def extract_subnet(net: nn.Module, cfg: SubnetConfig | str, calib: list | None, device="cpu") -> tuple[nn.Module, int]:
    """(standalone eval-mode subnet of supernet `net` with `cfg` active, BN calibration images seen): its BN
    statistics recalibrated on the `calib` image batches (None keeps the supernet's), as the original does
    before it evaluates or fine-tunes a subnet."""
    from modules.engine import calibrate_bn

    net.set_active_subnet(cfg)
    seen = calibrate_bn(net, calib, len(calib), device) if calib else 0
    sub = net.get_active_subnet(preserve_weight=True).eval()
    sub.resolution = sub.active_resolution
    return sub, seen


def load_subnet_checkpoint(path: str | os.PathLike, device="cpu", num_classes: int | None = None,
                           new_head: bool = False, quant_mode: str | None = None, quant_preset: str | None = None,
                           return_ckpt: bool = False):
    """The standalone subnet of a `save_subnet_checkpoint` file (eval mode, `.resolution` set): built with
    `build_from_config`, switched to LSQ+ if it was, loaded strictly (weights_only=True).

    `num_classes` other than the saved one, or `new_head`, gives a freshly initialised head (weights, bias, weight
    quantizer; same quant mode as the body) for fine-tuning; every other weight must match.
    `quant_mode` "fp32" on an LSQ+ checkpoint drops its quantizers; "lsq" on an fp32 checkpoint switches to LSQ+
    (`quant_preset`, default ort) with scales initialised from the first batch. With `return_ckpt`, returns
    (model, checkpoint dict)."""
    from modules.checkpoint import load_checkpoint, load_state_dict_strict
    from modules.lsq import set_quant_mode
    from modules.supernet import build_from_config

    path = Path(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a subnet checkpoint (expected keys 'config' and 'model'; write one with "
                         "export_subnet.py)")
    config = dict(ckpt["config"])
    saved_classes = config.get("num_classes")
    new_head = new_head or (num_classes is not None and num_classes != saved_classes)
    if num_classes is not None:
        config["num_classes"] = int(num_classes)
    try:
        model = build_from_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    mode = ckpt.get("quant_mode", "fp32")
    if mode not in ("fp32", "lsq"):
        raise ValueError(f"{path}: unknown quant_mode {mode!r}")
    if quant_mode not in (None, "fp32", "lsq"):
        raise ValueError(f"quant mode {quant_mode!r}: expected fp32 or lsq")
    state = ckpt["model"]
    if mode == "lsq" and quant_mode == "fp32":
        # every quantizer module is named `*_quant` (act_quant, weight_quant, branch_quant, gate_quant, ...)
        state = {k: v for k, v in state.items() if not k.rsplit(".", 2)[-2].endswith("_quant")}
        mode = "fp32"
    if mode == "lsq":
        set_quant_mode(model, "lsq", ckpt.get("quant_preset") or "ort")
    if new_head:
        # new weights, bias and weight quantizer; the input (activation) quantizer of the head is kept
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("logits.") and ".act_quant." not in k}
        state = {**{k: v for k, v in state.items() if k not in fresh}, **fresh}
    load_state_dict_strict(model, state, f"subnet checkpoint {path}")
    if mode == "fp32" and quant_mode == "lsq":
        set_quant_mode(model, "lsq", quant_preset or "ort")
    model.resolution = model.active_resolution
    model.to(device).eval()
    return (model, ckpt) if return_ckpt else model
