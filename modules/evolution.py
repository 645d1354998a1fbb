"""One generic evolution engine, shared by the space search (spec §7.3) and the subnet search (spec §9.3).

The caller supplies candidates through functions; the engine only sees their string keys:

* ``fitness(cand) -> float | (float, dict)``: higher is better; the dict (JSON-able) is kept as `info`;
* ``encode(cand) -> str`` and ``decode(str) -> cand``: the key used for dedupe and the saved state;
* ``is_valid(cand) -> bool`` (optional): candidates failing it are never evaluated;
* operators ``random_candidate(rng)``, ``mutate(cand, rng)``, ``crossover(a, b, rng)`` return a candidate
  or None (no legal move); `rng` is the engine's `random.Random`.

`Evolution` holds the history (every evaluated candidate once, in evaluation order), the rng and a driver
state. Two drivers run over it: `aging_evolution` (tournament parent, one child per mutation operator,
oldest member popped) and `topk_evolution` (top parents, then mutants and crossovers per iteration).

Termination guards: `new_candidate` gives up after `max_tries`; a driver stops with a message when it
cannot produce a new candidate any more (space exhausted, single-choice stages, or the operators keep
returning known candidates).

Resume: `save(path)` writes JSON with every evaluated record and a *boundary* (history length, rng state
and driver state at the start of the current step). `Evolution.load` restores the boundary and keeps the
records evaluated after it as a cache, so re-running the same driver call replays the step without
re-evaluating and ends exactly where an uninterrupted run ends.
"""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

STATE_VERSION = 1


@dataclass
class Record:
    key: str
    score: float
    info: dict = field(default_factory=dict)
    parent: Optional[str] = None
    index: int = 0  # position in the history (0-based evaluation order)
    cand: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"key": self.key, "score": self.score, "info": self.info, "parent": self.parent}


def _record(key: str, out) -> Record:
    score, info = (out if isinstance(out, tuple) else (out, {}))
    return Record(key, float(score), dict(info))


class Evolution:
    def __init__(self, fitness: Callable, encode: Callable[[Any], str] = str, decode: Callable[[str], Any] = None,
                 is_valid: Callable[[Any], bool] | None = None, seed: int = 0, max_tries: int = 100,
                 state_path: str | None = None, save_interval: float = 30.0, progress: bool = True,
                 config: dict | None = None, log: Callable[[str], None] | None = None,
                 fitness_many: Callable[[list], list] | None = None, batch_size: int = 1):
        self.fitness, self.encode, self.decode, self.is_valid = fitness, encode, decode, is_valid
        # fitness_many(cands) -> [fitness(c) for c in cands], e.g. spread over ranks; `evaluate_many` calls it
        # with up to `batch_size` candidates at a time (the state can be saved between the calls)
        self.fitness_many, self.batch_size = fitness_many, max(1, int(batch_size))
        self.rng = random.Random(seed)
        self.max_tries = max_tries
        self.state_path, self.save_interval = state_path, save_interval
        self.config = config or {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.history: list[Record] = []
        self.by_key: dict[str, Record] = {}
        self.cache: dict[str, Record] = {}  # evaluated after the restored boundary (resume replay)
        self.driver_state: dict | None = None
        self._best: Record | None = None
        self.stop_reason: str | None = None
        self.show_progress = progress
        self._pbar = None
        self._boundary = {"n_history": 0, "rng": self.rng.getstate(), "driver": None}
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------------ candidates
    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def new_candidate(self, make: Callable[[random.Random], Any], max_tries: int | None = None,
                      pending: set | frozenset = frozenset()) -> Any:
        """Call `make(rng)` until it returns a valid candidate neither in the history nor in `pending` (keys
        drawn but not evaluated yet); None after max_tries."""
        for _ in range(self.max_tries if max_tries is None else max_tries):
            cand = make(self.rng)
            if cand is None or (self.is_valid is not None and not self.is_valid(cand)):
                continue
            key = self.encode(cand)
            if key not in self.by_key and key not in pending:
                return cand
        return None

    def evaluate(self, cand: Any, parent: Record | None = None) -> Record | None:
        """Evaluate and append to the history; None if the candidate is already in it (dedupe)."""
        key = self.encode(cand)
        if key in self.by_key:
            return None
        rec = self.cache.pop(key, None)
        if rec is None:
            rec = _record(key, self.fitness(cand))
        return self._append(rec, cand, parent)

    def evaluate_many(self, cands: list) -> list[Record]:
        """Evaluate distinct new candidates (none in the history) and append them in order, `batch_size` at a
        time through `fitness_many` (one at a time through `fitness` without it). Candidates are drawn before
        any of them is evaluated, which changes nothing: drawing never depends on a score."""
        out = []
        for i in range(0, len(cands), self.batch_size):
            chunk = cands[i:i + self.batch_size]
            todo = [c for c in chunk if self.encode(c) not in self.cache]
            scores = (self.fitness_many(todo) if self.fitness_many else [self.fitness(c) for c in todo]) if todo \
                else []
            fresh = {self.encode(c): _record(self.encode(c), o) for c, o in zip(todo, scores)}
            for c in chunk:
                key = self.encode(c)
                out.append(self._append(self.cache.pop(key, None) or fresh[key], c, None))
        return out

    def _append(self, rec: Record, cand: Any, parent: Record | None) -> Record:
        key = rec.key
        rec.parent = parent.key if parent is not None else None
        rec.index, rec.cand = len(self.history), cand
        self.history.append(rec)
        self.by_key[key] = rec
        if self._best is None or rec.score > self._best.score:
            self._best = rec
        if self._pbar is not None:
            self._pbar.update(1)
            self._pbar.set_postfix(best=f"{self._best.score:.4f}", refresh=False)
        if self.state_path and time.monotonic() - self._last_save > self.save_interval:
            self.save()
        return rec

    def best(self, n: int | None = None):
        """The best record (n None) or the n best, by score then evaluation order."""
        if n is None:
            return self._best
        ranked = sorted(self.history, key=lambda r: (-r.score, r.index))
        return ranked[:n]

    def tournament(self, population: list[Record], size: int) -> Record:
        """Best of `size` distinct members drawn uniformly from the population."""
        sample = self.rng.sample(range(len(population)), min(size, len(population)))
        return max((population[i] for i in sample), key=lambda r: r.score)

    def stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.log(f"evolution stopped early: {reason}")

    # ------------------------------------------------------------------------ progress
    def start_progress(self, total: int, desc: str = "evolution") -> None:
        if self.show_progress and self._pbar is None:
            from tqdm import tqdm
            self._pbar = tqdm(total=total, initial=min(len(self.history), total), desc=desc, file=sys.stderr,
                              dynamic_ncols=True, mininterval=0.5)

    def close(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self.state_path:
            self.save()

    # ------------------------------------------------------------------------ state
    def mark_boundary(self, driver_state: dict) -> None:
        """Drivers call this between steps: the point a resumed run restarts from. Lists in the driver
        state are copied; drivers must not mutate other values in place."""
        self.driver_state = driver_state
        self._boundary = {"n_history": len(self.history), "rng": self.rng.getstate(),
                          "driver": {k: list(v) if isinstance(v, list) else v for k, v in driver_state.items()}}

    def state_dict(self) -> dict:
        boundary = dict(self._boundary, rng=_rng_to_json(self._boundary["rng"]))
        return {"version": STATE_VERSION, "config": self.config, "boundary": boundary,
                "records": [r.to_json() for r in self.history] + [r.to_json() for r in self.cache.values()],
                "stop_reason": self.stop_reason}

    def save(self, path: str | None = None) -> None:
        from modules.checkpoint import atomic_write_text

        atomic_write_text(path or self.state_path, json.dumps(self.state_dict()))
        self._last_save = time.monotonic()

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"evolution state version {state.get('version')} != {STATE_VERSION}")
        if self.config and state.get("config") != self.config:
            diff = {k: (state.get("config", {}).get(k), v) for k, v in self.config.items()
                    if state.get("config", {}).get(k) != v}
            raise ValueError(f"cannot resume: the saved run used other settings (saved, now): {diff}")
        b = state["boundary"]
        records = [Record(r["key"], r["score"], r.get("info", {}), r.get("parent")) for r in state["records"]]
        self.history, self.by_key, self.cache = [], {}, {}
        for i, r in enumerate(records[:b["n_history"]]):
            r.index, r.cand = i, self.decode(r.key) if self.decode else r.key
            self.history.append(r)
            self.by_key[r.key] = r
        self.cache = {r.key: r for r in records[b["n_history"]:]}
        self._best = max(self.history, key=lambda r: r.score, default=None)  # the earliest of ties
        self.rng.setstate(_rng_from_json(b["rng"]))
        self.driver_state = copy.deepcopy(b["driver"])
        self._boundary = dict(copy.deepcopy(b), rng=self.rng.getstate())
        self.stop_reason = state.get("stop_reason")

    def load(self, path: str) -> "Evolution":
        try:
            with open(path) as f:
                state = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid evolution state ({e})") from None
        self.load_state_dict(state)
        return self


def _rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


# ---------------------------------------------------------------------------------------- drivers
def _fill(evo: Evolution, population: list, target: int, budget: int, random_candidate, state: dict) -> None:
    """Top the population up to `target` with new random candidates (history budget permitting)."""
    while len(population) < target and len(evo.history) < budget:
        cand = evo.new_candidate(random_candidate)
        if cand is None:
            evo.stop(f"no new random candidate in {evo.max_tries} tries: the space looks exhausted "
                     f"(population {len(population)} < {target})")
            return
        population.append(evo.evaluate(cand))
        state["population"] = [r.key for r in population]
        evo.mark_boundary(state)


def aging_evolution(evo: Evolution, *, initial: list, random_candidate: Callable, mutations: list[Callable],
                    population_size: int, parent_size: int, cycles: int, max_stale: int = 1000) -> list[Record]:
    """Aging (regularized) evolution, spec §7.3.

    Seeds the population with `initial`, fills it with random candidates, then per step: a tournament of
    `parent_size` picks the parent; each operator of `mutations` makes one child, which, if new, is
    evaluated and appended while the oldest member is popped. `cycles` bounds the history length (initial
    population included); as in the original, the last step may overshoot it by up to len(mutations) - 1,
    so a step is never cut short (which keeps resumed runs identical to uninterrupted ones). Stops after
    `max_stale` steps in a row without a new child. Returns the history."""
    if population_size < 1 or parent_size < 1 or cycles < 1:
        raise ValueError(f"aging evolution: population {population_size}, parents {parent_size} and cycles "
                         f"{cycles} must be >= 1")
    st = evo.driver_state or {"driver": "aging", "phase": "init", "population": [], "stale": 0}
    population = [evo.by_key[k] for k in st["population"]]
    evo.start_progress(cycles)
    try:
        _aging_steps(evo, st, population, initial, random_candidate, mutations, population_size, parent_size,
                     cycles, max_stale)
    finally:
        evo.close()  # also saves the state when interrupted
    return evo.history


def _aging_steps(evo, st, population, initial, random_candidate, mutations, population_size, parent_size,
                 cycles, max_stale):
    if st["phase"] == "init":
        for cand in initial:  # deterministic seeding; candidates already evaluated are skipped on resume
            if len(population) >= population_size or len(evo.history) >= cycles:
                break
            rec = evo.evaluate(cand)
            if rec is not None:
                population.append(rec)
                st["population"] = [r.key for r in population]
                evo.mark_boundary(st)
        _fill(evo, population, population_size, cycles, random_candidate, st)
        st["phase"] = "evolve"
    population = deque(population)
    while len(evo.history) < cycles and evo.stop_reason is None and population:
        parent = evo.tournament(list(population), parent_size)
        new = 0
        for op in mutations:
            child = op(parent.cand, evo.rng)
            if child is None or (evo.is_valid is not None and not evo.is_valid(child)):
                continue
            rec = evo.evaluate(child, parent)
            if rec is not None:
                population.append(rec)
                population.popleft()
                new += 1
        st["stale"] = 0 if new else st["stale"] + 1
        st["population"] = [r.key for r in population]
        evo.mark_boundary(st)
        if st["stale"] >= max_stale:
            evo.stop(f"no new child in {max_stale} consecutive cycles: the space reachable by mutation "
                     f"looks exhausted ({len(evo.history)} evaluated)")


def topk_evolution(evo: Evolution, *, random_candidate: Callable, mutate: Callable, crossover: Callable,
                   population_size: int, parent_size: int, iterations: int, num_mutations: int,
                   num_crossovers: int, max_crossover_tries: int = 50) -> list[dict]:
    """Top-k evolution, spec §9.3: a random initial population; per iteration the top `parent_size`
    become parents, `num_mutations` mutants of random parents and `num_crossovers` crossovers of random
    distinct parent pairs (a mutant of the first parent when `max_crossover_tries` fail) are added, and
    parents + children form the next population. Returns the per-iteration best: [{iteration, key, score}]."""
    if parent_size < 1 or population_size < parent_size:
        raise ValueError(f"top-k evolution: need 1 <= parents {parent_size} <= population {population_size}")
    st = evo.driver_state or {"driver": "topk", "iteration": 0, "population": [], "best": []}
    population = [evo.by_key[k] for k in st["population"]]
    evo.start_progress(population_size + iterations * (num_mutations + num_crossovers))
    try:
        _topk_steps(evo, st, population, random_candidate, mutate, crossover, population_size, parent_size,
                    iterations, num_mutations, num_crossovers, max_crossover_tries)
    finally:
        evo.close()  # also saves the state when interrupted
    return st["best"]


def _fill_many(evo: Evolution, population: list, target: int, random_candidate, state: dict) -> None:
    """Top the population up to `target` with new random candidates, drawn first, then evaluated together."""
    cands, pending = [], set()
    while len(population) + len(cands) < target:
        cand = evo.new_candidate(random_candidate, pending=pending)
        if cand is None:
            evo.stop(f"no new random candidate in {evo.max_tries} tries: the space looks exhausted "
                     f"(population {len(population) + len(cands)} < {target})")
            break
        cands.append(cand)
        pending.add(evo.encode(cand))
    population += evo.evaluate_many(cands)
    state["population"] = [r.key for r in population]
    evo.mark_boundary(state)


def _children(evo: Evolution, parents: list, mutate, crossover, num_mutations: int, num_crossovers: int,
              max_crossover_tries: int) -> list:
    """The iteration's new candidates (distinct, not yet evaluated), in the order they are drawn."""
    cands, pending = [], set()

    def add(cand):
        if cand is not None:
            cands.append(cand)
            pending.add(evo.encode(cand))

    for _ in range(num_mutations):
        add(evo.new_candidate(lambda rng: mutate(rng.choice(parents).cand, rng), pending=pending))
    for _ in range(num_crossovers):
        cand = None
        if len(parents) >= 2:
            a, b = evo.rng.sample(parents, 2)
            cand = evo.new_candidate(lambda rng: crossover(a.cand, b.cand, rng), max_crossover_tries, pending)
        else:
            a = parents[0]
        if cand is None:
            cand = evo.new_candidate(lambda rng: mutate(a.cand, rng), pending=pending)
        add(cand)
    return cands


def _topk_steps(evo, st, population, random_candidate, mutate, crossover, population_size, parent_size,
                iterations, num_mutations, num_crossovers, max_crossover_tries):
    if st["iteration"] == 0:
        _fill_many(evo, population, population_size, random_candidate, st)
    while st["iteration"] < iterations and evo.stop_reason is None and population:
        parents = sorted(population, key=lambda r: (-r.score, r.index))[:parent_size]
        st["best"].append({"iteration": st["iteration"], "key": parents[0].key, "score": parents[0].score})
        children = evo.evaluate_many(_children(evo, parents, mutate, crossover, num_mutations, num_crossovers,
                                               max_crossover_tries))
        st["iteration"] += 1
        population = parents + children
        st["population"] = [r.key for r in population]
        evo.mark_boundary(st)
        if not children and num_mutations + num_crossovers > 0:
            evo.stop(f"iteration {st['iteration']}: no new child in {evo.max_tries} tries per slot: the space "
                     "looks exhausted")
