"""Q-T score of a candidate space (block type and width window per stage1..6), the original space search's fitness.

For each chunk of `chunk` samples one resolution R is drawn from the LUT's resolutions; each stage draws
`chunk` rows (with replacement) of its file ``stage{i}_{b_i}_{w_i}`` at R. A sample's loss is the sum of
the 6 stage NSRs, its latency the sum of the 6 stage latencies plus the fixed-stage latency L_fixed(R).
Per latency constraint c::

    p        = #(latency <= c) / N + 1e-5
    top_loss = sum of the top_k smallest losses with latency <= c / (their count + 1e-5)   (1e5 if none)
    lat_loss = max(1, (t / p) ** a)
    score    = 1 / (lat_loss * top_loss)

and score, lat_loss and top_loss are summed over the constraints.

All random numbers are drawn once per scorer (`Draws`: one resolution index per chunk and a uniform
u in [0, 1) per stage and sample; row = floor(u * rows at R)). Every candidate is scored with the same
draws (common random numbers), so a score is a pure function of (candidate, seed). The per-stage sample
vectors of a file are cached, so scoring a candidate is a few vector additions, a mask and a partition.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from modules.lut import Lut

NUM_STAGES = 6
NO_FEASIBLE_TOP_LOSS = 1e5
_warned: set[str] = set()


def _warn_once(tag: str, msg: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        print(f"warning: {msg}", file=sys.stderr)


def load_fixed_latency(path: str) -> dict[int, float]:
    """Read ``resolution,latency_ms`` lines (an optional header line is skipped) into {resolution: ms}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fixed-latency CSV {path} not found (lines: resolution,latency_ms)")
    out: dict[int, float] = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and not row[0].strip().lstrip("-").isdigit():
                continue  # header
            if len(row) != 2:
                raise ValueError(f"{path}:{lineno}: expected 2 fields resolution,latency_ms, got {len(row)}")
            try:
                r, ms = int(row[0]), float(row[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: {','.join(row)!r} is not <int resolution>,<float ms>") from None
            if not (math.isfinite(ms) and ms >= 0):
                raise ValueError(f"{path}:{lineno}: latency {row[1].strip()} must be finite and >= 0")
            if r in out:
                raise ValueError(f"{path}:{lineno}: resolution {r} listed twice")
            out[r] = ms
    return out


def fixed_stage_latency(predictor, space) -> dict[int, float]:
    """L_fixed(R), as in the original: predicted latency of the parts block KD does not cover (first_conv, stage0,
    final_expand, feature_mix, logits) in the min subnet of the all-zero supernet, per block-KD resolution.
    `predict_blocks` adds the predictor's whole-network constant, so it is counted here, once per sample;
    the LUT rows hold only the slope times their block sum (modules.block_kd.make_latency_fn)."""
    from modules.encoding import parse_supernet
    from modules.supernet import SuperNet

    net = SuperNet(parse_supernet(f"{space.name}-000000-000000"))
    cfg = net.set_min_subnet()
    n_stem = cfg.depths[0] + cfg.depths[1]
    out = {}
    for r in space.block_kd_hw_list:
        net.active_resolution = r
        blocks = net.block_configs()
        out[r] = float(predictor.predict_blocks(blocks[:n_stem] + blocks[-3:]))
    return out


@dataclass(frozen=True)
class Draws:
    """The scorer's random numbers: `res_idx` (n_chunks,) into the resolution list, `u` (n_chunks, 6, chunk)."""
    res_idx: np.ndarray
    u: np.ndarray

    @staticmethod
    def make(seed: int, num_resolutions: int, num_samples: int, chunk: int) -> "Draws":
        rng = np.random.default_rng(seed)
        n_chunks = num_samples // chunk
        return Draws(rng.integers(0, num_resolutions, size=n_chunks), rng.random((n_chunks, NUM_STAGES, chunk)))


@dataclass(frozen=True)
class QTScore:
    score: float  # summed over constraints
    lat_loss: float
    top_loss: float
    p: tuple[float, ...]  # per constraint
    per_constraint: tuple[tuple[float, float, float], ...]  # (score, lat_loss, top_loss) per constraint

    def as_dict(self, constraints: Sequence[float]) -> dict:
        d = {"score": self.score, "lat_loss": self.lat_loss, "top_loss": self.top_loss}
        d.update({f"p_c{c:g}": p for c, p in zip(constraints, self.p)})
        return d


def qt_from_samples(loss: np.ndarray, latency: np.ndarray, constraint: float, t: float, a: float,
                    top_k: int) -> tuple[float, float, float, float]:
    """(score, lat_loss, top_loss, p) of one constraint from the sample vectors (vectorised)."""
    n = loss.shape[0]
    mask = latency <= constraint
    feasible = loss[mask]
    count = feasible.shape[0]
    p = count / n + 1e-5
    if count:
        top = feasible if count <= top_k else np.partition(feasible, top_k - 1)[:top_k]
        top = np.sort(top).tolist()
        top_loss = sum(top) / (len(top) + 1e-5)  # ascending sequential sum, like the reference
    else:
        top_loss = NO_FEASIBLE_TOP_LOSS
    lat_loss = max(1.0, (t / p) ** a)
    return 1.0 / (lat_loss * top_loss), lat_loss, top_loss, p


class QTScorer:
    """Vectorised Q-T scorer over a loaded LUT. `score(blocks, windows)` -> QTScore."""

    def __init__(self, lut: Lut, constraints: Sequence[float], t: float = 0.08, a: float = 0.01,
                 top_k: int = 50, num_samples: int = 100_000, chunk: int = 500,
                 fixed_latency: Mapping[int, float] | None = None, seed: int = 0,
                 resolutions: Sequence[int] | None = None, draws: Draws | None = None,
                 cache_samples: bool = True):
        if not constraints:
            raise ValueError("Q-T score: need at least one latency constraint")
        for c in constraints:
            if not (math.isfinite(c) and c > 0):
                raise ValueError(f"Q-T score: latency constraint {c} must be a positive number (ms)")
        if top_k < 1:
            raise ValueError(f"Q-T score: top_k {top_k} must be >= 1")
        if chunk < 1 or num_samples < chunk or num_samples % chunk:
            raise ValueError(f"Q-T score: num_samples {num_samples} must be a positive multiple of chunk {chunk}")
        if not (t > 0 and math.isfinite(a)):
            raise ValueError(f"Q-T score: need t > 0 and a finite a, got t={t} a={a}")
        self.lut = lut
        self.constraints = tuple(float(c) for c in constraints)
        self.t, self.a, self.top_k = float(t), float(a), int(top_k)
        self.num_samples, self.chunk, self.seed = int(num_samples), int(chunk), seed
        self.resolutions = tuple(lut.resolutions if resolutions is None else resolutions)
        missing = [r for r in self.resolutions if r not in lut.resolutions]
        if missing:
            raise ValueError(f"Q-T score: resolutions {missing} have no LUT rows (LUT has {list(lut.resolutions)})")
        if fixed_latency is None:
            _warn_once("fixed_latency", "no fixed-stage latency given: L_fixed(R) = 0 ms for every resolution "
                       "(pass --fixed_latency_csv with lines resolution,latency_ms)")
            fixed_latency = {r: 0.0 for r in self.resolutions}
        lacking = [r for r in self.resolutions if r not in fixed_latency]
        if lacking:
            raise ValueError(f"Q-T score: fixed-stage latency missing for resolutions {lacking} "
                             f"(given: {sorted(fixed_latency)})")
        self.fixed_latency = {r: float(fixed_latency[r]) for r in self.resolutions}
        n_chunks = self.num_samples // self.chunk
        if draws is None:
            draws = Draws.make(seed, len(self.resolutions), self.num_samples, self.chunk)
        self.draws = draws
        if self.draws.u.shape != (n_chunks, NUM_STAGES, self.chunk) or self.draws.res_idx.shape != (n_chunks,):
            raise ValueError(f"Q-T score: draws of shape {self.draws.u.shape} do not match "
                             f"{(n_chunks, NUM_STAGES, self.chunk)}")
        fixed = np.array([self.fixed_latency[r] for r in self.resolutions])
        self._fixed_vec = np.repeat(fixed[self.draws.res_idx], self.chunk)  # (N,)
        self.cache_samples = cache_samples
        self._cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._buffers = None  # reused sample vectors of score()
        self.num_scored = 0
        self.num_infeasible = 0

    def stage_samples(self, stage: int, block: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(nsr, latency) vectors (N,) of stage `stage` (1..6) for file (block, window), under the draws."""
        key = (stage, block, window)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        parts = [self.lut.arrays(stage, block, window, r) for r in self.resolutions]
        counts = np.array([len(p[0]) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        loss_cat = np.concatenate([p[0] for p in parts])
        lat_cat = np.concatenate([p[1] for p in parts])
        n = counts[self.draws.res_idx][:, None]
        row = np.minimum((self.draws.u[:, stage - 1, :] * n).astype(np.int64), n - 1)
        idx = (offsets[self.draws.res_idx][:, None] + row).ravel()
        out = (loss_cat[idx], lat_cat[idx])
        if self.cache_samples:
            self._cache[key] = out
        return out

    def samples(self, blocks: Sequence[int], windows: Sequence[int],
                out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(loss, latency) of the N samples: stage sums in stage order, then + L_fixed(R) (into `out`)."""
        if len(blocks) != NUM_STAGES or len(windows) != NUM_STAGES:
            raise ValueError(f"Q-T score: need {NUM_STAGES} blocks and windows, got {blocks} {windows}")
        parts = [self.stage_samples(i, int(b), int(w)) for i, (b, w) in enumerate(zip(blocks, windows), start=1)]
        loss = np.add(parts[0][0], parts[1][0], out=None if out is None else out[0])
        lat = np.add(parts[0][1], parts[1][1], out=None if out is None else out[1])
        for sl, st in parts[2:]:
            np.add(loss, sl, out=loss)
            np.add(lat, st, out=lat)
        np.add(lat, self._fixed_vec, out=lat)
        return loss, lat

    def score(self, blocks: Sequence[int], windows: Sequence[int]) -> QTScore:
        if self._buffers is None:
            self._buffers = (np.empty(self.num_samples), np.empty(self.num_samples))
        loss, lat = self.samples(blocks, windows, self._buffers)
        per = []
        for c in self.constraints:
            s, ll, tl, p = qt_from_samples(loss, lat, c, self.t, self.a, self.top_k)
            if tl == NO_FEASIBLE_TOP_LOSS:
                self.num_infeasible += 1
                _warn_once("infeasible", f"candidate {''.join(map(str, blocks))}-{''.join(map(str, windows))}: no "
                           f"sample meets {c:g} ms (min {lat.min():.2f} ms); top_loss = 1e5 (warned once)")
            per.append((s, ll, tl, p))
        self.num_scored += 1
        return QTScore(sum(x[0] for x in per), sum(x[1] for x in per), sum(x[2] for x in per),
                       tuple(x[3] for x in per), tuple((x[0], x[1], x[2]) for x in per))
