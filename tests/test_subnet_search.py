"""Subnet search: operators, window, reproducibility, resume after a kill, clear errors.

Runs on a random-init `tiny` supernet, a small digits ImageFolder at 32 px and a fake latency predictor (a MACs
formula); `make_tiny_data`, `make_supernet_ckpts` and `FakePredictor` are shared with the other subnet tests.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

ENC = "tiny-123450-000000"


class FakePredictor:
    """Latency (ms) = a MACs-like sum over the active blocks (anything with predict_subnet will do)."""

    def predict_blocks(self, blocks):
        t = 0.0
        for b in blocks:
            k, e = b["kernel"] or 1, b["expand"] or 1
            t += b["cin"] * b["cout"] * k * k * e * b["hw"] ** 2 / b["stride"] ** 2
        return t / 1e7

    def predict_subnet(self, net):
        return self.predict_blocks(net.block_configs())


def make_tiny_data(root: Path, per_class: int = 12, val_per_class: int = 3, size: int = 32, classes: int = 10) -> Path:
    """A small digits ImageFolder (train/val) at `size` px from scikit-learn's bundled digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(classes):
        idx = np.flatnonzero(d.target == c)[: per_class + val_per_class]
        for j, i in enumerate(idx):
            split = "train" if j < per_class else "val"
            out = root / split / str(c)
            out.mkdir(parents=True, exist_ok=True)
            g = Image.fromarray(np.clip(d.images[i] * 255 / 16, 0, 255).astype(np.uint8), mode="L")
            g.resize((size, size), Image.BILINEAR).convert("RGB").save(out / f"{i}.png")
    return root


def make_supernet_ckpts(out_dir: Path) -> dict:
    """Random-init tiny supernet saved as train_supernet would: checkpoint.pth (fp32) and lsq.pth (LSQ+, ort)."""
    from modules.checkpoint import atomic_save
    from modules.lsq import set_quant_mode
    from modules.supernet import supernet_from_encoding

    torch.manual_seed(0)
    net = supernet_from_encoding(ENC)
    d = out_dir / "supernet_training" / ENC
    atomic_save({"model": net.state_dict(), "args": {"supernet_choice": ENC, "quant_mode": "fp32"}, "epoch": 1},
                d / "checkpoint.pth")
    set_quant_mode(net, "lsq", "ort")
    net.eval()
    rng = random.Random(0)
    with torch.no_grad():  # initialise the LSQ+ scales on a few subnets, as LSQ+ training would
        net.set_max_subnet()
        net(torch.randn(4, 3, 32, 32))
        for _ in range(6):
            net.sample_active_subnet(rng)
            net(torch.randn(4, 3, 32, 32))
    atomic_save({"model": net.state_dict(), "args": {"supernet_choice": ENC, "quant_mode": "lsq"},
                 "quant_mode": "lsq", "quant_preset": "ort", "epoch": 1}, d / "lsq.pth")
    return {"fp32": d / "checkpoint.pth", "lsq": d / "lsq.pth"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ss")
    data = make_tiny_data(root / "data")
    ckpts = make_supernet_ckpts(root / "out")
    return {"root": root, "data": data, "ckpts": ckpts}


# ---------------------------------------------------------------------------------------- operators
def test_operators_give_valid_subnets_over_all_resolutions():
    from modules.encoding import parse_supernet, validate_subnet
    from modules.subnet_search import SubnetSpace

    choice = parse_supernet("onnxw-151122-023231")
    space = SubnetSpace(choice)
    rng = random.Random(0)
    cfgs = [space.random(rng) for _ in range(60)]
    kids = [space.mutate(rng.choice(cfgs), rng, 0.3, 0.5) for _ in range(60)]
    kids += [space.crossover(*rng.sample(cfgs, 2), rng) for _ in range(60)]
    for c in cfgs + kids:
        validate_subnet(c, choice)
        assert str(space.decode(str(c))) == str(c)
    assert {c.resolution for c in cfgs + kids} == set(choice.space.supernet_hw_list)  # 160..224, not just 192+
    a, b = cfgs[0], cfgs[1]
    assert space.mutate(a, rng, 0.0, 0.0) == a
    assert space.crossover(a, a, rng) == a
    x = space.crossover(a, b, rng)
    for s, pa, pb, px in zip(space.stages, a.per_stage(), b.per_stage(), x.per_stage()):
        assert len(px) in (len(pa), len(pb))
        for j, blk in enumerate(px):
            for f in range(3):
                assert blk[f] in [p[j][f] for p in (pa, pb) if j < len(p)]
    m = space.mutate(a, random.Random(1), 1.0, 1.0)
    assert m != a
    # min / max subnets equal the supernet's own
    from modules.supernet import SuperNet
    net = SuperNet(choice)
    assert str(net.set_min_subnet()) == str(space.extreme(False))
    assert str(net.set_max_subnet()) == str(space.extreme(True))


def test_search_engine_only_evaluates_in_window(env):
    from modules.subnet_search import LatencyOracle, SearchSettings, SubnetSpace, load_supernet_checkpoint, \
        run_subnet_search

    net, _ = load_supernet_checkpoint(env["ckpts"]["fp32"])
    space = SubnetSpace(net.choice, net.hw_list)
    lat = LatencyOracle(net, FakePredictor())
    seen = []

    def fitness(cfg):  # no data needed: a deterministic fake accuracy
        seen.append(str(cfg))
        assert 0.4 <= lat(cfg) <= 1.0
        return float(sum(cfg.widths) % 97)

    st = SearchSettings(population=10, iterations=3, num_mutations=3, num_crossovers=2, max_tries=2000)
    oc = run_subnet_search(space, lat, fitness, 1.0, 0.6, st, seed=3, progress=False)
    assert len(seen) == len(set(seen)) == len(oc.evo.history) == 10 + 3 * 5
    assert all(0.4 <= r.info["latency"] <= 1.0 for r in oc.evo.history)
    assert [r.info["iteration"] for r in oc.evo.history] == [0] * 10 + [1] * 5 + [2] * 5 + [3] * 5
    assert oc.best.score == max(r.score for r in oc.evo.history)
    scores = [t["score"] for t in oc.trajectory]
    assert scores == sorted(scores)  # parents survive: the best never gets worse


# ---------------------------------------------------------------------------------------- search_subnet.py
def _args(env, out: Path, *extra: str):
    import search_subnet

    argv = ["--supernet", ENC, "--quant_mode", "fp32", "--output_dir", str(out), "--data_dir", str(env["data"]),
            "--latency_constraint", "0.9", "--latency_delta", "0.5", "--population", "6", "--iterations", "2",
            "--num_mutations", "2", "--num_crossovers", "1", "--holdout_size", "24", "--num_calib_batches", "1",
            "--calib_batch_size", "16", "--batch_size", "24", "--eval_top", "1", "--no_progress",
            "--save_interval", "0", *extra]
    return search_subnet.get_args_parser().parse_args(argv)


def _history(out: Path) -> list[list[str]]:
    run = out / "search_subnet" / ENC / "c0.9_d0.5"
    with open(run / "history.csv") as f:
        return list(csv.reader(f))


def _copy_ckpts(env, out: Path) -> None:
    import shutil
    shutil.copytree(env["root"] / "out" / "supernet_training", out / "supernet_training")


@pytest.fixture(scope="module")
def first_run(env):
    import search_subnet

    out = env["root"] / "run_a"
    _copy_ckpts(env, out)
    res = search_subnet.main(_args(env, out), predictor=FakePredictor())
    return out, res


def test_search_outputs_in_window_and_usable(env, first_run):
    from modules.supernet import build_from_config

    out, res = first_run
    run = out / "search_subnet" / ENC / "c0.9_d0.5"
    for name in ("history.csv", "best.json", "pareto.png", "top.csv", "state.json"):
        assert (run / name).is_file(), name
    rows = _history(out)
    assert rows[0] == ["index", "iteration", "subnet", "latency_ms", "fitness"]
    assert len(rows) - 1 == 6 + 2 * 3
    assert all(0.4 <= float(r[3]) <= 0.9 for r in rows[1:])
    best = json.loads((run / "best.json").read_text())
    assert best["subnet"] == res[0.9]["subnet"]
    assert best["fitness"] == pytest.approx(max(float(r[4]) for r in rows[1:]), abs=1e-4)
    sub = build_from_config(best)
    assert str(sub.get_active_subnet_config()) == best["subnet"]
    assert best["data"]["holdout_size"] == 24 and best["quant_mode"] == "fp32"


def test_search_is_reproducible_and_resumes_after_kill(env, first_run, monkeypatch):
    import search_subnet
    from modules import subnet_search

    out_a, _ = first_run
    # same seed, fresh dir: identical history
    out_b = env["root"] / "run_b"
    _copy_ckpts(env, out_b)
    search_subnet.main(_args(env, out_b, "--eval_top", "0"), predictor=FakePredictor())
    assert _history(out_b) == _history(out_a)

    # killed after 8 evaluations (no clean shutdown), then --resume: the same result as uninterrupted
    class Killed(BaseException):
        pass

    calls = {"n": 0}
    orig = subnet_search.SubnetEvaluator.__call__

    def dying(self, cfg):
        calls["n"] += 1
        if calls["n"] > 8:
            raise Killed()
        return orig(self, cfg)

    out_c = env["root"] / "run_c"
    _copy_ckpts(env, out_c)
    monkeypatch.setattr(subnet_search.SubnetEvaluator, "__call__", dying)
    with pytest.raises(Killed):
        search_subnet.main(_args(env, out_c, "--eval_top", "0"), predictor=FakePredictor())
    monkeypatch.setattr(subnet_search.SubnetEvaluator, "__call__", orig)
    state = out_c / "search_subnet" / ENC / "c0.9_d0.5" / "state.json"
    assert len(json.loads(state.read_text())["records"]) == 8
    with pytest.raises(ValueError, match="--resume"):  # never silently overwritten
        search_subnet.main(_args(env, out_c, "--eval_top", "0"), predictor=FakePredictor())
    search_subnet.main(_args(env, out_c, "--eval_top", "0", "--resume"), predictor=FakePredictor())
    assert _history(out_c) == _history(out_a)
    # a different seed searches differently
    out_d = env["root"] / "run_d"
    _copy_ckpts(env, out_d)
    search_subnet.main(_args(env, out_d, "--eval_top", "0", "--seed", "5", "--iterations", "1"),
                       predictor=FakePredictor())
    assert [r[2] for r in _history(out_d)[1:7]] != [r[2] for r in _history(out_a)[1:7]]


def test_no_subnet_in_window_is_a_clear_error(env, tmp_path):
    import search_subnet

    _copy_ckpts(env, tmp_path)
    args = _args(env, tmp_path, "--max_tries", "300")
    args.latency_constraint = [0.01]
    args.latency_delta = 0.005
    with pytest.raises(ValueError, match=r"no subnet .* in \[0.005, 0.01\] ms after 300 random tries; its subnets "
                                         r"range from .* ms \(min subnet\) to .* ms \(max subnet\)"):
        search_subnet.main(args, predictor=FakePredictor())


def test_missing_checkpoint_is_a_clear_error(env, tmp_path):
    import search_subnet

    with pytest.raises(FileNotFoundError, match="supernet_training/tiny-123450-000000/checkpoint.pth"):
        search_subnet.main(_args(env, tmp_path), predictor=FakePredictor())


def test_exported_best_scores_its_search_fitness(env, first_run, tmp_path):
    """export_subnet on best.json reuses the search's BN-calibration data: same holdout top-1 as the search."""
    import export_subnet
    from modules.engine import evaluate_top1
    from modules.subnet_search import build_eval_batches, load_subnet_checkpoint

    out, _ = first_run
    best_json = out / "search_subnet" / ENC / "c0.9_d0.5" / "best.json"
    best = json.loads(best_json.read_text())
    args = export_subnet.get_args_parser().parse_args(
        ["--supernet", ENC, "--quant_mode", "fp32", "--output_dir", str(out), "--subnet", str(best_json),
         "--output", str(tmp_path / "best.pth")])
    export_subnet.main(args)
    from modules.checkpoint import load_checkpoint

    data = load_checkpoint(tmp_path / "best.pth")["data"]  # the BN-calibration settings it used, from best.json
    assert data["holdout_size"] == 24 and data["num_calib_batches"] == 1 and data["data_dir"] == best["data"]["data_dir"]
    assert args.holdout_size is None and args.data_dir is None  # the parsed arguments are left as parsed
    model = load_subnet_checkpoint(tmp_path / "best.pth")
    _, holdout, _ = build_eval_batches(env["data"], 64, holdout_size=24, num_calib_batches=1, calib_batch_size=16,
                                       batch_size=24)
    assert evaluate_top1(model, holdout) == pytest.approx(best["fitness"], abs=1e-9)


def test_data_defaults_follow_the_supernet_training(env, tmp_path):
    import search_subnet
    from modules.subnet_search import resolve_data

    args = search_subnet.get_args_parser().parse_args(["--latency_constraint", "1", "--output_dir", str(tmp_path)])
    info = {"args": {"data_path": str(env["data"]), "val_split": "holdout", "valid_size": 30, "seed": 3,
                     "image_size": 48}}
    d = resolve_data(args, info)
    assert (d["data_dir"], d["holdout_size"], d["data_seed"], d["image_size"]) == (str(env["data"]), 30, 3, 48)
    assert d["num_calib_batches"] == 20 and not d["calib_augment"]
    args = search_subnet.get_args_parser().parse_args(["--latency_constraint", "1", "--holdout_size", "10",
                                                       "--data_seed", "3", "--data_dir", str(env["data"])])
    d = resolve_data(args, info, saved={"holdout_size": 99, "num_calib_batches": 4})
    assert (d["holdout_size"], d["num_calib_batches"]) == (10, 4)  # flag > saved search settings > training


def test_rerun_reuses_the_val_and_baseline_scores(env, monkeypatch):
    """--resume after a finished search: the evolution is restored and the top-k val scores and the random
    baseline come from eval_cache.json (no evaluation at all); a rewritten checkpoint invalidates them."""
    import os

    import search_subnet
    from modules import subnet_search

    out = env["root"] / "run_cache"
    _copy_ckpts(env, out)
    argv = ("--random_baseline", "3", "--eval_top", "2", "--resume")
    search_subnet.main(_args(env, out, *argv), predictor=FakePredictor())
    run = out / "search_subnet" / ENC / "c0.9_d0.5"
    first = {n: (run / n).read_text() for n in ("random_baseline.csv", "top.csv")}
    cache = json.loads((run / "eval_cache.json").read_text())
    assert len(cache["val"]) >= 3 and cache["holdout"]

    calls = {"n": 0}
    orig = subnet_search.SubnetEvaluator.__call__

    def counting(self, cfg):
        calls["n"] += 1
        return orig(self, cfg)

    monkeypatch.setattr(subnet_search.SubnetEvaluator, "__call__", counting)
    search_subnet.main(_args(env, out, *argv), predictor=FakePredictor())
    assert calls["n"] == 0
    assert {n: (run / n).read_text() for n in first} == first

    ckpt = next((out / "supernet_training").rglob("checkpoint.pth"))
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    search_subnet.main(_args(env, out, *argv), predictor=FakePredictor())
    assert calls["n"] >= 3  # the baseline and the top subnets scored again
    assert {n: (run / n).read_text() for n in first} == first  # same weights: same scores

    (run / "eval_cache.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval_cache.json is not a valid score cache"):
        search_subnet.main(_args(env, out, *argv), predictor=FakePredictor())
