"""How a model is timed: warm-up, runs until enough runs and time, shuffled rounds over several models, and
the statistic kept (:class:`MeasureConfig`). Runner-independent: the callables timed are built elsewhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time

import numpy as np

CLOCKS = ("cpu", "wall")
STATS = ("median", "p20", "min", "mean")


def warm_up(fn, now, warmup: int, warmup_time: float, tol: float = 0.05, max_calls: int = 50) -> int:
    """Call `fn` until warm: at least `warmup` calls and `warmup_time` s, then until the last three calls no
    longer beat the earlier calls' minimum by more than `tol` (first runs fill caches, page in weights and let
    the runtime pick its kernels; a fixed count is either too short for big models or wasted on small ones).
    Returns the number of calls."""
    t_end = time.perf_counter() + warmup_time
    times: list[float] = []
    while len(times) < max_calls:
        t0 = now()
        fn()
        times.append(now() - t0)
        if len(times) < max(warmup, 1) or time.perf_counter() < t_end or len(times) < 4:
            continue
        if min(times[-3:]) >= (1.0 - tol) * min(times[:-3]):
            break
    return len(times)


def time_callable(fn, min_runs: int = 15, max_runs: int = 300, min_time: float = 0.04, warmup: int = 3,
                  warmup_time: float = 0.01, clock: str = "cpu") -> dict:
    """Timing statistics (ms: median, p20, min, mean, std; runs) of `fn()`: warm-up (:func:`warm_up`: at
    least `warmup` calls and `warmup_time` s, until the times stop falling), then calls until at least
    `min_runs` runs and `min_time` s of measured time (at most `max_runs`).

    ``clock="cpu"`` measures the calling thread's CPU time (``time.thread_time``): with one thread, ONNX
    Runtime and LiteRT compute on the calling thread, so this is the latency without the time spent
    waiting for a core on a shared machine, where the wall clock can be several times the CPU time.
    ``clock="wall"`` is ``time.perf_counter`` (use it on a dedicated device, or with several threads)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r}: use one of {CLOCKS}")
    now = time.thread_time if clock == "cpu" else time.perf_counter
    warm_up(fn, now, warmup, warmup_time)
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
    ok = t[t >= 0.5 * med]  # a run under half the median is a clock glitch (0.0 ms happens), not a latency
    return {"median": med, "p20": float(np.percentile(t, 20)), "min": float(ok.min()), "mean": float(t.mean()),
            "std": float(t.std()), "runs": int(t.size), "clock": clock}


@contextlib.contextmanager
def pinned(enable: bool = True):
    """Pin the calling thread to one CPU for the duration (Linux; elsewhere, or when `enable` is false, a
    no-op): a thread that migrates between cores mid-measurement refills its caches on the new core. The CPU
    chosen is the one of the allowed set that was idle longest over the last 50 ms."""
    allowed = os.sched_getaffinity(0) if enable and hasattr(os, "sched_setaffinity") else set()
    if len(allowed) < 2:
        yield
        return
    os.sched_setaffinity(0, {_idlest_cpu(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _cpu_idle() -> dict[int, int]:
    idle = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name != "cpu":
                    idle[int(name[3:])] = int(vals[3]) + int(vals[4])  # idle + iowait jiffies
    except (OSError, ValueError, IndexError):
        pass
    return idle


def _idlest_cpu(allowed: set[int]) -> int:
    before = _cpu_idle()
    time.sleep(0.05)
    after = _cpu_idle()
    return max(sorted(allowed), key=lambda c: after.get(c, 0) - before.get(c, 0))


def time_rounds(fns: dict, rounds: int = 2, min_runs: int = 15, max_runs: int = 300, min_time: float = 0.04,
                warmup: int = 3, clock: str = "cpu", seed: int = 0, gap: float = 0.0, max_rounds: int | None = None,
                tol: float = 0.02, pin: bool = False) -> dict:
    """Time several callables in `rounds` rounds, each round visiting them in a new random order (so the
    rounds of one model are seconds apart); per callable, the statistics of all its runs together (the
    minimum is the minimum over the rounds), plus ``round_min`` (each round's minimum). On a shared
    machine contention comes in phases of seconds; spreading a measurement over several phases is what
    makes repeated measurements agree. Callables whose minimum still fell by more than `tol` in the last
    round get further rounds, up to `max_rounds` (default: `rounds`): the minimum is kept once it is
    stable. ``gap``: seconds of sleep between rounds (spreads the rounds of a single model, which has no
    other models to interleave with). ``pin``: the thread stays on one CPU (:func:`pinned`)."""
    rng = random.Random(seed)
    runs: dict = {k: [] for k in fns}
    per_round: dict = {k: [] for k in fns}
    keys = list(fns)
    with pinned(pin):
        for i in range(max(rounds, max_rounds or 0, 1)):
            if i >= max(rounds, 1):
                keys = [k for k in keys if min(per_round[k][-1:]) < (1.0 - tol) * min(per_round[k][:-1])]
                if not keys:
                    break
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

    The default statistic is the **minimum**: on a shared machine repeated measurements of the same model
    agree best on it (docs/RESULTS.md), because interference (cache and SMT contention from other
    processes) only ever adds time. On a dedicated device minimum and median nearly coincide.

    Repeatability: the runs are split over `rounds` shuffled rounds (contention on a shared machine comes
    in phases of seconds, and the minimum over many short rounds is far more reproducible than over a few
    long ones), a model whose minimum still falls gets further rounds up to `max_rounds` (until it moves
    by less than `stable_tol`), and with `pin` the measuring thread stays on one CPU."""
    threads: int = 1
    min_runs: int = 15
    max_runs: int = 300
    min_time: float = 0.04
    warmup: int = 3
    clock: str = "cpu"  # cpu (thread CPU time) | wall
    stat: str = "min"  # min | p20 | median | mean
    quant_format: str = "qdq"  # ort_int8: qdq | qoperator
    use_xnnpack: bool = True  # tflite_*
    rounds: int = 6  # time_many: rounds per model, seconds apart, the runs split over them
    max_rounds: int = 10  # ... and more while the minimum still falls by more than stable_tol
    stable_tol: float = 0.02
    pin: bool = True  # the measuring thread on one CPU (Linux)

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
                           self.warmup if warmup is None else warmup, self.clock, seed, gap, self.max_rounds,
                           self.stable_tol, self.pin)
