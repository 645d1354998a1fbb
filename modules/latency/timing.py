"""How a model is timed: warm-up, runs until enough runs and time, shuffled rounds over several models, and
the statistic kept (:class:`MeasureConfig`). Runner-independent: the callables timed are built elsewhere.
"""
from __future__ import annotations

import dataclasses
import random
import time

import numpy as np

CLOCKS = ("cpu", "wall")
STATS = ("median", "p20", "min", "mean")


def time_callable(fn, min_runs: int = 15, max_runs: int = 300, min_time: float = 0.04, warmup: int = 3,
                  warmup_time: float = 0.01, clock: str = "cpu") -> dict:
    """Timing statistics (ms: median, p20, min, mean, std; runs) of `fn()`: `warmup` calls (at least
    `warmup_time` s), then calls until at least `min_runs` runs and `min_time` s of measured time (at
    most `max_runs`).

    ``clock="cpu"`` measures the calling thread's CPU time (``time.thread_time``): with one thread, ONNX
    Runtime and LiteRT compute on the calling thread, so this is the latency without the time spent
    waiting for a core on a shared machine (on this 2-core VM under load 6-9 the wall clock is 2-4x the
    CPU time and varies by tens of %). ``clock="wall"`` is ``time.perf_counter`` (use it on a
    dedicated device, or with several threads)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r}: use one of {CLOCKS}")
    now = time.thread_time if clock == "cpu" else time.perf_counter
    t_end = time.perf_counter() + warmup_time
    for _ in range(max(warmup, 1)):
        fn()
    while time.perf_counter() < t_end:
        fn()
    times, total = [], 0.0
    while len(times) < max_runs and (len(times) < min_runs or total < min_time):
        t0 = now()
        fn()
        dt = now() - t0
        times.append(dt)
        total += dt
    out = _summary(np.asarray(times) * 1e3, clock)
    out["times"] = [x * 1e3 for x in times]
    return out


def _summary(t: np.ndarray, clock: str) -> dict:
    med = float(np.median(t))
    ok = t[t >= 0.5 * med]  # a run under half the median is a clock glitch (seen once: 0.0 ms), not a latency
    return {"median": med, "p20": float(np.percentile(t, 20)), "min": float(ok.min()), "mean": float(t.mean()),
            "std": float(t.std()), "runs": int(t.size), "clock": clock}


def time_rounds(fns: dict, rounds: int = 2, min_runs: int = 15, max_runs: int = 300, min_time: float = 0.04,
                warmup: int = 3, clock: str = "cpu", seed: int = 0, gap: float = 0.0) -> dict:
    """Time several callables in `rounds` rounds, each round visiting them in a new random order (so the
    rounds of one model are seconds apart); per callable, the statistics of all its runs together (the
    minimum is the minimum over the rounds), plus ``round_min`` (each round's minimum). On a shared
    machine contention comes in phases of seconds; spreading a measurement over several phases is what
    makes repeated measurements agree. ``gap``: seconds of sleep between rounds (spreads the rounds of a
    single model, which has no other models to interleave with)."""
    rng = random.Random(seed)
    keys = list(fns)
    runs: dict = {k: [] for k in keys}
    per_round: dict = {k: [] for k in keys}
    for i in range(max(rounds, 1)):
        if i and gap > 0:
            time.sleep(gap)
        rng.shuffle(keys)
        for k in keys:
            st = time_callable(fns[k], min_runs, max_runs, min_time, warmup, 0.0, clock)
            runs[k].extend(st.pop("times"))
            per_round[k].append(st["min"])
    out = {}
    for k in fns:
        out[k] = _summary(np.asarray(runs[k]), clock)
        out[k]["round_min"] = per_round[k]
    return out

@dataclasses.dataclass
class MeasureConfig:
    """How one model is timed (:func:`time_callable`): warm-up, then runs until `min_runs` and
    `min_time` s; `stat` of the per-run times on `clock` is the figure kept.

    The default statistic is the **minimum**: on this shared 2-core machine, repeated measurements of
    the same model agree best on it (whole onnxw subnets measured 3 times: mean max/min spread 13 % for
    the minimum, 18 % for the median; blocks measured twice: median difference 7 % vs 10 %), because
    interference (cache and SMT contention from other processes) only ever adds time. On a dedicated
    device minimum and median nearly coincide."""
    threads: int = 1
    min_runs: int = 15
    max_runs: int = 300
    min_time: float = 0.04
    warmup: int = 3
    clock: str = "cpu"  # cpu (thread CPU time) | wall
    stat: str = "min"  # min | p20 | median | mean
    quant_format: str = "qdq"  # ort_int8: qdq | qoperator
    use_xnnpack: bool = True  # tflite_*
    # time_many: rounds per model, seconds apart, the runs split over them. Contention on a shared VM comes in
    # phases of seconds: the minimum over 6 rounds of 3 runs is far more reproducible than over 2 rounds of 8
    # (onnxw subnets measured twice, 10 min apart, at load 1: 78 % vs 50 % within +-10 % of each other)
    rounds: int = 6

    def __post_init__(self):
        if self.clock not in CLOCKS:
            raise ValueError(f"clock {self.clock!r}: use one of {CLOCKS}")
        if self.stat not in STATS:
            raise ValueError(f"statistic {self.stat!r}: use one of {STATS}")
        if self.threads > 1 and self.clock == "cpu":
            raise ValueError("clock 'cpu' measures the calling thread only: use clock 'wall' with threads > 1")

    def time(self, fn, platform: str | None = None, min_runs: int | None = None, min_time: float | None = None,
             warmup: int | None = None) -> dict:
        """Timing statistics of `fn` with these settings (`platform` is informational)."""
        st = time_callable(fn, self.min_runs if min_runs is None else min_runs, self.max_runs,
                           self.min_time if min_time is None else min_time,
                           self.warmup if warmup is None else warmup, clock=self.clock)
        st.pop("times")
        return st

    def time_many(self, fns: dict, min_runs: int | None = None, min_time: float | None = None,
                  warmup: int | None = None, seed: int = 0, gap: float = 0.0) -> dict:
        """Statistics of each callable over ``rounds`` shuffled rounds `gap` s apart (:func:`time_rounds`);
        `min_runs` / `min_time` per callable (default: this config's) are split over the rounds."""
        r = max(self.rounds, 1)
        min_runs = self.min_runs if min_runs is None else min_runs
        min_time = self.min_time if min_time is None else min_time
        return time_rounds(fns, r, max(1, -(-min_runs // r)), self.max_runs, min_time / r,
                           self.warmup if warmup is None else warmup, self.clock, seed, gap)
