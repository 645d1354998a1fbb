"""Q-T score (hand-computed value, reference equality, reproducibility) and the space search end to end."""
import csv
import json
import math
import os

import numpy as np
import pytest
import yaml

import search_block_kd
from modules.cli import run_main
from bench.space_search import reference_score
from modules.encoding import SupernetChoice
from modules.lut import expected_keys, format_lut_row, load_lut_dir, lut_file_path, write_lut_file, write_synthetic_lut
from modules.qt_score import Draws, QTScorer, load_fixed_latency
from modules.superspace import SEARCHABLE, get_superspace

TINY = get_superspace("tiny")


def write_hand_lut(root, values):
    """Tiny LUT: values(stage, block, window) -> [(resolution, nsr, latency), ...] rows, in file order."""
    for x, b, w in expected_keys(TINY):
        stage_name = SEARCHABLE[x - 1]
        spec, st = TINY.candidates[b], TINY.stage(stage_name)
        sub = f"{spec.kernel_list[0]}#{st.window(w)[0]}#{spec.expand_list[0]}"
        cin = TINY.prev_width_list(stage_name)[0]
        rows = [format_lut_row(sub, cin, TINY.stage_input_hw(r, stage_name), nsr, 1.0, 0.1, lat)
                for r, nsr, lat in values(x, b, w)]
        write_lut_file(lut_file_path(root, "tiny", x, b, w), rows)
    return load_lut_dir(root, "tiny")


def test_score_matches_hand_computation(tmp_path):
    # Every file: 2 rows per resolution. At 32 px: (nsr 0.1, lat 1), (0.2, 2); at 64 px: (0.1, 2), (0.15, 3).
    lut = write_hand_lut(str(tmp_path), lambda x, b, w: [
        (32, 0.1, 1.0), (32, 0.2, 2.0), (48, 0.5, 9.0), (48, 0.5, 9.0), (64, 0.1, 2.0), (64, 0.15, 3.0)])
    # 2 chunks of 2 samples: chunk 0 at 32 px, chunk 1 at 64 px; u = 0.25 -> row 0, u = 0.75 -> row 1.
    u = np.empty((2, 6, 2))
    u[:, :, 0], u[:, :, 1] = 0.25, 0.75
    draws = Draws(np.array([0, 2]), u)
    fixed = {32: 1.0, 48: 5.0, 64: 3.0}
    t, a = 0.8, 0.5
    scorer = QTScorer(lut, [14, 16, 5], t=t, a=a, top_k=2, num_samples=4, chunk=2, fixed_latency=fixed, draws=draws)
    s = scorer.score((1, 2, 3, 4, 5, 0), (0, 1, 2, 0, 1, 1))
    # samples (loss, latency): 6 x row0 @32, 6 x row1 @32, 6 x row0 @64, 6 x row1 @64, plus L_fixed
    samples = [(6 * 0.1, 6 * 1.0 + 1.0), (6 * 0.2, 6 * 2.0 + 1.0), (6 * 0.1, 6 * 2.0 + 3.0), (6 * 0.15, 6 * 3.0 + 3.0)]
    assert [x[1] for x in samples] == [7.0, 13.0, 15.0, 21.0]
    # c = 14: samples 1, 2 fit. p = 2/4 + 1e-5; top-2 mean = (0.6 + 1.2) / (2 + 1e-5)
    p14, top14 = 0.5 + 1e-5, (0.6 + 1.2) / (2 + 1e-5)
    ll14 = math.sqrt(0.8 / p14)
    # c = 16: samples 1, 2, 3 fit; the 2 smallest losses are 0.6 and 0.6
    p16, top16 = 0.75 + 1e-5, (0.6 + 0.6) / (2 + 1e-5)
    ll16 = math.sqrt(0.8 / p16)
    # c = 5: nothing fits: p = 1e-5, top_loss = 1e5
    p5, top5 = 1e-5, 1e5
    ll5 = math.sqrt(0.8 / 1e-5)
    expected = 1 / (ll14 * top14) + 1 / (ll16 * top16) + 1 / (ll5 * top5)
    assert s.score == pytest.approx(expected, rel=1e-12)
    assert s.top_loss == pytest.approx(top14 + top16 + top5, rel=1e-12)
    assert s.lat_loss == pytest.approx(ll14 + ll16 + ll5, rel=1e-12)
    assert s.p == pytest.approx((p14, p16, p5), rel=1e-12)
    assert scorer.num_infeasible == 1
    # lat_loss is clipped at 1 when p >= t
    s2 = QTScorer(lut, [100], t=0.8, a=0.5, top_k=2, num_samples=4, chunk=2, fixed_latency=fixed, draws=draws)
    assert s2.score((0,) * 6, (0,) * 6).lat_loss == 1.0


def test_vectorised_equals_reference(tmp_path):
    write_synthetic_lut(str(tmp_path), "tiny", rows_per_file=60, seed=3)
    lut = load_lut_dir(str(tmp_path), "tiny")
    fixed = {32: 0.5, 48: 0.7, 64: 1.1}
    scorer = QTScorer(lut, [12.0, 18.0], t=0.08, a=0.01, top_k=20, num_samples=3000, chunk=100,
                      fixed_latency=fixed, seed=5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        b = tuple(int(v) for v in rng.integers(0, 6, 6))
        w = tuple(int(rng.integers(0, n)) for n in TINY.num_window_choices())
        fast = scorer.score(b, w)
        ref = reference_score(lut, b, w, scorer.constraints, scorer.t, scorer.a, scorer.top_k, scorer.draws,
                              scorer.resolutions, fixed)
        assert abs(fast.score - ref[0]) <= 1e-9 and abs(fast.top_loss - ref[2]) <= 1e-9
        assert abs(fast.lat_loss - ref[1]) <= 1e-9


def test_score_reproducible(tmp_path):
    write_synthetic_lut(str(tmp_path), "tiny", rows_per_file=30, seed=0)
    lut = load_lut_dir(str(tmp_path), "tiny")
    kw = dict(t=0.08, a=0.01, top_k=10, num_samples=2000, chunk=100, fixed_latency={32: 0, 48: 0, 64: 0})
    cand = ((1, 2, 3, 4, 5, 0), (1, 0, 2, 1, 0, 1))
    s1, s2, s3 = (QTScorer(lut, [15.0], seed=sd, **kw).score(*cand).score for sd in (7, 7, 8))
    assert s1 == s2 and s1 != s3
    sc = QTScorer(lut, [15.0], seed=7, cache_samples=False, **kw)
    assert sc.score(*cand).score == s1 == sc.score(*cand).score


def test_scorer_argument_errors(tmp_path):
    write_synthetic_lut(str(tmp_path), "tiny", rows_per_file=9, seed=0)
    lut = load_lut_dir(str(tmp_path), "tiny")
    with pytest.raises(ValueError, match="multiple of chunk"):
        QTScorer(lut, [5], num_samples=1000, chunk=300, fixed_latency={32: 0, 48: 0, 64: 0})
    with pytest.raises(ValueError, match="fixed-stage latency missing for resolutions \\[64\\]"):
        QTScorer(lut, [5], num_samples=1000, chunk=100, fixed_latency={32: 0, 48: 0})
    with pytest.raises(ValueError, match="positive"):
        QTScorer(lut, [0], num_samples=1000, chunk=100, fixed_latency={32: 0, 48: 0, 64: 0})
    csv_path = tmp_path / "fixed.csv"
    csv_path.write_text("resolution,latency_ms\n32,1.5\n48,2\n64,2.5\n")
    assert load_fixed_latency(str(csv_path)) == {32: 1.5, 48: 2.0, 64: 2.5}
    csv_path.write_text("32,1.5\n48,nan\n")
    with pytest.raises(ValueError, match=":2: latency nan"):
        load_fixed_latency(str(csv_path))


TARGET_B, TARGET_W = (3, 1, 4, 2, 5, 1), (1, 0, 2, 1, 0, 1)


def known_best_values(x, b, w):
    """Constant rows; the target (block, window) of each stage has the lowest NSR, except a faster-looking
    trap: block 0 in stage 3 has an even lower NSR but a latency above every constraint."""
    i = x - 1
    nsr = 0.1 + 0.03 * (b != TARGET_B[i]) + 0.01 * (w != TARGET_W[i])
    lat = 1.0
    if x == 3 and b == 0:
        nsr, lat = 0.05, 100.0
    return [(r, nsr, lat) for r in (32, 48, 64) for _ in range(2)]


def test_search_finds_known_best(tmp_path):
    lut = write_hand_lut(str(tmp_path), known_best_values)
    scorer = QTScorer(lut, [20.0], top_k=5, num_samples=200, chunk=50, fixed_latency={32: 0, 48: 0, 64: 0})
    evo = search_block_kd.run_search(scorer, TINY, population=24, parents=6, cycles=400, seed=0, progress=False)
    best = evo.best()
    assert best.key == str(SupernetChoice("tiny", TARGET_B, TARGET_W)), [r.key for r in evo.best(5)]
    assert best.info["top_loss"] == pytest.approx(0.6 * 5 / (5 + 1e-5))
    assert len({r.key for r in evo.history}) == len(evo.history) <= 401  # 2 children per cycle
    # the initial population holds the 6 x 3 uniform individuals of spec §7.3, then random ones
    assert [r.key for r in evo.history[:3]] == ["tiny-000000-000000", "tiny-000000-111111", "tiny-000000-112121"]
    assert len({r.key[5:11] for r in evo.history[18:24]}) > 1  # random blocks, not a hard-coded list


def test_space_operators_never_return_parent():
    import random
    rand, mut_b, mut_w, uniform = search_block_kd.space_operators(TINY)
    rng = random.Random(0)
    assert len(uniform) == 6 * 3
    for _ in range(200):
        c = rand(rng)
        TINY.check_choice(c.blocks, c.windows)
        for child in (mut_b(c, rng), mut_w(c, rng)):
            TINY.check_choice(child.blocks, child.windows)
            diff = [i for i in range(6) if (c.blocks[i], c.windows[i]) != (child.blocks[i], child.windows[i])]
            assert len(diff) == 1


def run_cli(argv):
    """Exit code of the script's entry point (run_main: errors -> one line on stderr, exit 2)."""
    try:
        run_main(search_block_kd.main, search_block_kd.get_args_parser(), argv)
    except SystemExit as e:
        return e.code
    return 0


def _cli(tmp_path, lut_root, *extra):
    return ["--superspace", "tiny", "--lut_dir", lut_root, "--output_dir", str(tmp_path / "out"), "--no_progress",
            "--latency_constraints", "15", "20", "--num_samples", "2000", "--chunk_size", "100", "--top_k", "10",
            "--population", "20", "--parents", "5", *extra]


def test_cli_outputs_and_resume(tmp_path, capsys):
    lut_root = str(tmp_path / "lut")
    write_synthetic_lut(lut_root, "tiny", rows_per_file=30, seed=0)
    run_dir = tmp_path / "out" / "space_search" / "tiny" / "c15+20_t0.08_a0.01"
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "120")) == 0
    full = (run_dir / "ranked.csv").read_text()
    hist = list(csv.DictReader(open(run_dir / "history.csv")))
    assert [int(h["cycle"]) for h in hist] == list(range(1, len(hist) + 1)) and len(hist) in (120, 121)
    assert float(hist[-1]["best_so_far"]) == max(float(h["score"]) for h in hist)
    ranked = list(csv.DictReader(open(run_dir / "ranked.csv")))
    assert list(ranked[0]) == ["rank", "supernet", "score", "lat_loss", "top_loss", "p_c15", "p_c20"]
    result = yaml.safe_load(open(run_dir / "result.yaml"))
    assert result["best"]["supernet"] == ranked[0]["supernet"] and len(result["top5"]) == 5
    assert (run_dir / "score.png").stat().st_size > 1000 and (run_dir / "args.yaml").is_file()
    # interrupted at 60, resumed to 120: same ranking as the uninterrupted run
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "60")) == 0
    assert len(json.load(open(run_dir / "state.json"))["records"]) in (60, 61)
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "120", "--resume")) == 0
    assert (run_dir / "ranked.csv").read_text() == full
    # resuming with other settings is refused
    capsys.readouterr()
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "130", "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and err.count("\n") == 1

    # scoring mode
    assert run_cli(_cli(tmp_path, lut_root, "--score_only", ranked[0]["supernet"], "000000-000000")) == 0
    rows = list(csv.DictReader(open(run_dir / "score_only.csv")))
    assert rows[0]["supernet"] == ranked[0]["supernet"] and rows[0]["score"] == ranked[0]["score"]
    assert rows[1]["supernet"] == "tiny-000000-000000"


@pytest.mark.parametrize("extra, message", [
    (["--parents", "30"], "--parents 30 must not exceed --population 20"),
    (["--score_only", "onnxw-000000-000000"], "superspace differs"),
    (["--score_only", "900000-000000"], "block 9 not in"),
    (["--num_samples", "2050"], "multiple of --chunk_size"),
    (["--fixed_latency_csv", "/nonexistent.csv"], "not found"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, extra, message):
    lut_root = str(tmp_path / "lut")
    write_synthetic_lut(lut_root, "tiny", rows_per_file=6, seed=0)
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "5", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_missing_lut_dir(tmp_path, capsys):
    assert run_cli(_cli(tmp_path, str(tmp_path / "nope"), "--cycles", "5")) == 2
    assert "not found" in capsys.readouterr().err
    lut_root = str(tmp_path / "lut")
    write_synthetic_lut(lut_root, "tiny", rows_per_file=6, seed=0)
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "5", "--fp32_lut")) == 2
    assert "lut/tiny_fp32 not found" in capsys.readouterr().err
    os.rename(os.path.join(lut_root, "tiny"), os.path.join(lut_root, "tiny_fp32"))
    assert run_cli(_cli(tmp_path, lut_root, "--cycles", "30", "--fp32_lut")) == 0
    assert (tmp_path / "out" / "space_search" / "tiny_fp32" / "c15+20_t0.08_a0.01" / "ranked.csv").is_file()
    with pytest.raises(SystemExit):
        search_block_kd.get_args_parser().parse_args(["--superspace", "big", "--latency_constraints", "5"])
    with pytest.raises(SystemExit):
        search_block_kd.get_args_parser().parse_args(["--superspace", "tiny", "--latency_constraints", "-5"])
    assert os.path.isdir(tmp_path)
