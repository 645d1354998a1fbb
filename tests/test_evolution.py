"""Generic evolution engine on a toy problem: dedupe, termination guards, reproducibility, resume."""
import json

import pytest

from modules.evolution import Evolution, aging_evolution, topk_evolution

TARGET = (3, 1, 2)


def encode(c):
    return "-".join(map(str, c))


def decode(s):
    return tuple(int(v) for v in s.split("-"))


class Toy:
    """Candidates: tuples of 3 ints in 0..n-1 (n**3 of them); fitness = -squared distance to TARGET."""

    def __init__(self, n=5):
        self.n, self.calls = n, []

    def fitness(self, c):
        self.calls.append(c)
        return -sum((a - b) ** 2 for a, b in zip(c, TARGET)), {"dist": sum(abs(a - b) for a, b in zip(c, TARGET))}

    def random(self, rng):
        return tuple(rng.randrange(self.n) for _ in range(3))

    def mutate(self, c, rng):
        if self.n < 2:
            return None
        i = rng.randrange(3)
        return c[:i] + (rng.choice([v for v in range(self.n) if v != c[i]]),) + c[i + 1:]

    def crossover(self, a, b, rng):
        return tuple(rng.choice(pair) for pair in zip(a, b))


def run_aging(toy, seed=0, cycles=60, state_path=None, evo=None, **kw):
    evo = evo or Evolution(toy.fitness, encode, decode, seed=seed, state_path=state_path, progress=False,
                           save_interval=0.0)
    aging_evolution(evo, initial=[(0, 0, 0), (toy.n - 1,) * 3], random_candidate=toy.random,
                    mutations=[toy.mutate, toy.mutate], population_size=kw.get("population", 10),
                    parent_size=kw.get("parents", 3), cycles=cycles, max_stale=kw.get("max_stale", 200))
    return evo


def run_topk(toy, seed=0, iterations=5, state_path=None, evo=None):
    evo = evo or Evolution(toy.fitness, encode, decode, seed=seed, state_path=state_path, progress=False,
                           save_interval=0.0)
    best = topk_evolution(evo, random_candidate=toy.random, mutate=toy.mutate, crossover=toy.crossover,
                          population_size=8, parent_size=4, iterations=iterations, num_mutations=2,
                          num_crossovers=2, max_crossover_tries=5)
    return evo, best


def keys(evo):
    return [(r.key, r.score, r.parent) for r in evo.history]


def test_aging_finds_optimum_and_dedupes():
    toy = Toy(n=6)
    evo = run_aging(toy, cycles=120)
    assert evo.best().cand == TARGET and evo.best().info == {"dist": 0}
    ks = [r.key for r in evo.history]
    assert len(ks) == len(set(ks)) == len(toy.calls)  # every candidate evaluated once
    assert ks[:2] == ["0-0-0", "5-5-5"]  # seeded in order
    assert all(r.parent is None for r in evo.history[:10]) and all(r.parent for r in evo.history[10:])
    assert evo.stop_reason is None and len(evo.history) in (120, 121)


def test_reproducible_with_seed():
    a, b, c = run_aging(Toy()), run_aging(Toy()), run_aging(Toy(), seed=1)
    assert keys(a) == keys(b) and keys(a) != keys(c)
    (ea, ba), (eb, bb) = run_topk(Toy()), run_topk(Toy())
    assert keys(ea) == keys(eb) and ba == bb


def test_aging_stops_when_space_exhausted():
    toy = Toy(n=3)  # 27 candidates
    evo = run_aging(toy, cycles=1000, max_stale=50)
    assert len(evo.history) == len({r.key for r in evo.history}) <= 27
    assert evo.stop_reason and "exhausted" in evo.stop_reason


def test_single_choice_space_terminates():
    toy = Toy(n=1)  # one candidate, mutation impossible
    evo = Evolution(toy.fitness, encode, decode, progress=False, max_tries=20)
    aging_evolution(evo, initial=[], random_candidate=toy.random, mutations=[toy.mutate], population_size=5,
                    parent_size=2, cycles=100, max_stale=10)
    assert [r.key for r in evo.history] == ["0-0-0"] and "exhausted" in evo.stop_reason
    evo2 = Evolution(toy.fitness, encode, decode, progress=False, max_tries=20)
    topk_evolution(evo2, random_candidate=toy.random, mutate=toy.mutate, crossover=toy.crossover,
                   population_size=4, parent_size=2, iterations=10, num_mutations=2, num_crossovers=2)
    assert len(evo2.history) == 1 and evo2.stop_reason


def test_topk_stops_when_space_exhausted_and_respects_validity():
    toy = Toy(n=3)
    evo = Evolution(toy.fitness, encode, decode, progress=False, is_valid=lambda c: c[0] != 0)  # 18 valid
    topk_evolution(evo, random_candidate=toy.random, mutate=toy.mutate, crossover=toy.crossover,
                   population_size=6, parent_size=3, iterations=50, num_mutations=3, num_crossovers=3)
    assert all(r.cand[0] != 0 for r in evo.history) and len(evo.history) <= 18
    assert evo.stop_reason and "exhausted" in evo.stop_reason


def test_topk_population_and_best_trajectory():
    toy = Toy(n=6)
    evo, best = run_topk(toy, iterations=6)
    assert len(evo.history) == 8 + 6 * 4 and len(best) == 6
    assert [b["score"] for b in best] == sorted(b["score"] for b in best)  # elitist: never worse
    assert evo.driver_state["iteration"] == 6 and len(evo.driver_state["population"]) == 8


def test_aging_resume_equals_uninterrupted(tmp_path):
    full = run_aging(Toy(), cycles=80)
    path = str(tmp_path / "state.json")
    run_aging(Toy(), cycles=37, state_path=path)
    state = json.load(open(path))
    assert state["records"] and state["boundary"]["rng"]  # plain JSON
    toy = Toy()
    evo = Evolution(toy.fitness, encode, decode, progress=False).load(path)
    run_aging(toy, cycles=80, evo=evo)
    assert keys(evo) == keys(full)
    assert len(toy.calls) == len(full.history) - state["boundary"]["n_history"]


class Interrupt(Exception):
    pass


def _interrupting(toy, after):
    count = [0]

    def fitness(c):
        count[0] += 1
        if count[0] > after:
            raise Interrupt()
        return toy.fitness(c)
    return fitness


@pytest.mark.parametrize("driver", ["aging", "topk"])
def test_resume_after_crash_mid_step_replays_from_cache(tmp_path, driver):
    """A crash inside a step: the state saved after every evaluation holds the boundary plus the later
    records; the resumed run replays the step from the cache (no re-evaluation) and ends identical."""
    full = run_aging(Toy(), cycles=70) if driver == "aging" else run_topk(Toy(), iterations=6)[0]
    path = str(tmp_path / "state.json")
    toy = Toy()
    evo = Evolution(_interrupting(toy, 25), encode, decode, seed=0, state_path=path, progress=False,
                    save_interval=0.0)
    with pytest.raises(Interrupt):
        run_aging(toy, cycles=70, evo=evo) if driver == "aging" else run_topk(toy, iterations=6, evo=evo)
    evaluated_before = {encode(c) for c in toy.calls}
    toy2 = Toy()
    evo2 = Evolution(toy2.fitness, encode, decode, progress=False).load(path)
    if driver == "aging":
        run_aging(toy2, cycles=70, evo=evo2)
    else:
        run_topk(toy2, iterations=6, evo=evo2)
    assert keys(evo2) == keys(full)
    assert not evaluated_before & {encode(c) for c in toy2.calls}  # nothing evaluated twice


def test_resume_refuses_other_config(tmp_path):
    path = str(tmp_path / "state.json")
    toy = Toy()
    evo = Evolution(toy.fitness, encode, decode, state_path=path, progress=False, config={"seed": 0})
    run_aging(toy, cycles=20, evo=evo)
    with pytest.raises(ValueError, match="other settings"):
        Evolution(toy.fitness, encode, decode, progress=False, config={"seed": 1}).load(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid evolution state"):
        Evolution(toy.fitness, encode, decode, progress=False).load(str(tmp_path / "bad.json"))


def test_argument_errors():
    toy = Toy()
    with pytest.raises(ValueError, match="must be >= 1"):
        aging_evolution(Evolution(toy.fitness, encode, decode, progress=False), initial=[],
                        random_candidate=toy.random, mutations=[toy.mutate], population_size=0, parent_size=1,
                        cycles=10)
    with pytest.raises(ValueError, match="parents"):
        topk_evolution(Evolution(toy.fitness, encode, decode, progress=False), random_candidate=toy.random,
                       mutate=toy.mutate, crossover=toy.crossover, population_size=2, parent_size=3,
                       iterations=1, num_mutations=1, num_crossovers=1)
