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
    # the initial population holds the 6 x 3 uniform individuals of the original's seeding, then random ones
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


# ------------------------------------------------------------------- the authors' released LUT format
ONNXW = get_superspace("onnxw")


def _released_nsr(x: int, b: int, w: int) -> float:
    """NSR of every row of file stage{x}_{b}_{w}: block (6 - x) % 6 and window 0 are best at stage x."""
    return 0.30 + 0.02 * ((b + x) % 6) + 0.01 * w


def write_released_style_lut(block_lut):
    """An onnxw LUT as the authors released it (``data/block_lut/onnxw/stage{X}_{B}_{W}.csv``): no header,
    6 fields, 4 decimals, expands printed as sampled (None for MobileNetV1Dual, 0.5/1.0/1.5 for ResNet, ints
    otherwise). Written as plain text, not with modules.lut. Two rows per resolution (the smallest and the
    largest sub-stage); every row of a file has the same NSR and latency (0.5 + 0.1 x window ms)."""
    for x, b, w in expected_keys(ONNXW):
        stage_name = SEARCHABLE[x - 1]
        spec, st = ONNXW.candidates[b], ONNXW.stage(stage_name)
        window, cins = st.window(w), ONNXW.prev_width_list(stage_name)
        small = "_".join([f"{spec.kernel_list[0]}#{window[0]}#{spec.expand_list[0]}"] * min(st.depth_list))
        large = "_".join([f"{spec.kernel_list[-1]}#{window[-1]}#{spec.expand_list[-1]}"] * max(st.depth_list))
        lines = [f"{sub},1x{cin}x{hw}x{hw},{_released_nsr(x, b, w):.4f},{macs:.4f},{macs / 300:.4f},"
                 f"{0.5 + 0.1 * w:.4f}"
                 for r in (224, 192, 160) for hw in [ONNXW.stage_input_hw(r, stage_name)]
                 for sub, cin, macs in ((small, cins[0], 12.5 * x), (large, cins[-1], 250.125 * x))]
        path = block_lut / "onnxw" / f"stage{x}_{b}_{w}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
    return block_lut


def _released_cli(tmp_path, lut_dir, *extra):
    return ["--superspace", "onnxw", "--lut_dir", str(lut_dir), "--output_dir", str(tmp_path / "out"),
            "--no_progress", "--latency_constraints", "10", "--latency_loss_t", "0.08", "--latency_loss_a", "0.01",
            "--num_samples", "2000", "--chunk_size", "100", "--top_k", "10", *extra]


def test_released_lut_format_is_read_and_searched(tmp_path, capsys):
    block_lut = write_released_style_lut(tmp_path / "block_lut")
    assert (block_lut / "onnxw" / "stage1_0_0.csv").read_text().splitlines()[0] == \
        "3#32#None_3#32#None,1x16x112x112,0.3200,12.5000,0.0417,0.5000"
    assert "#0.5_" in (block_lut / "onnxw" / "stage3_3_1.csv").read_text()
    # the folder holding <superspace>/ (the original's --lut_path data/block_lut) or that folder itself
    lut = load_lut_dir(str(block_lut), "onnxw")
    assert lut.root == str(block_lut / "onnxw") and load_lut_dir(str(block_lut / "onnxw"), "onnxw").root == lut.root
    t = lut.table(3, 3, 1)
    assert t.sub_stage[0] == "3#80#0.5_3#80#0.5" and t.resolution.tolist() == [224, 224, 192, 192, 160, 160]
    assert t.cin.tolist()[:2] == [32, 96] and t.hw.tolist()[:2] == [28, 28]
    assert t.nsr.tolist() == [0.31] * 6 and t.latency.tolist() == [0.6] * 6 and t.mmacs[1] == 750.375

    fixed = tmp_path / "fixed.csv"
    fixed.write_text("resolution,latency_ms\n160,1.0\n192,1.25\n224,1.5\n")
    argv = _released_cli(tmp_path, block_lut, "--fixed_latency_csv", str(fixed), "--population", "30",
                         "--parents", "8", "--cycles", "1500")
    assert run_cli(argv) == 0
    run_dir = tmp_path / "out" / "space_search" / "onnxw" / "c10_t0.08_a0.01"
    result = yaml.safe_load(open(run_dir / "result.yaml"))
    # stages combine independently: the best space takes the best block and window 0 at every stage
    best = "onnxw-" + "".join(str((6 - x) % 6) for x in range(1, 7)) + "-000000"
    assert result["best"]["supernet"] == best
    assert result["settings"]["fixed_latency"] == {"160": 1.0, "192": 1.25, "224": 1.5}
    # every sample meets 10 ms (at most 6 x 0.8 + 1.5), so lat_loss = 1 and score = 1 / mean of the top 10
    loss = sum(_released_nsr(x, (6 - x) % 6, 0) for x in range(1, 7))
    assert result["best"]["score"] == pytest.approx((10 + 1e-5) / (10 * loss), rel=1e-9)
    assert result["best"]["p_c10"] == pytest.approx(1 + 1e-5)

    # scoring given spaces, in the original's <blocks>_<windows> spelling, from the onnxw folder itself
    capsys.readouterr()
    assert run_cli(_released_cli(tmp_path, block_lut / "onnxw", "--fixed_latency_csv", str(fixed),
                                 "--score_only", best[6:].replace("-", "_"), "111111_000000")) == 0
    rows = {r["supernet"]: float(r["score"]) for r in csv.DictReader(open(run_dir / "score_only.csv"))}
    assert rows[best] == pytest.approx(result["best"]["score"], abs=1e-6)
    worse = sum(_released_nsr(x, 1, 0) for x in range(1, 7))
    assert rows["onnxw-111111-000000"] == pytest.approx((10 + 1e-5) / (10 * worse), rel=1e-5)


def test_released_lut_with_fixed_latency_from_a_latency_table(tmp_path, capsys):
    """--latency_predictor: L_fixed(R) is our latency table's sum over first_conv, stage0 and the head of the
    min subnet (5 blocks, each 0.5 ms here) where the original asked nn-Meter. Space 543210-000000 then
    takes 2.5 + 6 x 0.5 = 5.5 ms at every resolution: it meets 5.6 ms and misses 5.4 ms."""
    from modules.latency.keys import block_key
    from modules.latency.predictor import LatencyPredictor
    from modules.latency.sampling import fixed_block_configs

    block_lut = write_released_style_lut(tmp_path / "block_lut")
    table = LatencyPredictor("ort_int8", str(tmp_path / "latency" / "ort_int8.json"))
    table.table = {block_key(c): 0.5 for c in fixed_block_configs("onnxw", [160, 192, 224])}
    table.overhead_ms = 0.0
    table.save()
    capsys.readouterr()
    argv = _released_cli(tmp_path, block_lut, "--latency_predictor", "ort_int8", "--latency_table_dir",
                         str(tmp_path / "latency"), "--latency_constraints", "5.4", "5.6",
                         "--score_only", "543210_000000")
    assert run_cli(argv) == 0
    assert "fixed-stage latency (ms) per resolution: {160: 2.5, 192: 2.5, 224: 2.5}" in capsys.readouterr().out
    run_dir = tmp_path / "out" / "space_search" / "onnxw" / "c5.4+5.6_t0.08_a0.01"
    (row,) = csv.DictReader(open(run_dir / "score_only.csv"))
    assert float(row["p_c5.4"]) == pytest.approx(1e-5) and float(row["p_c5.6"]) == pytest.approx(1 + 1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f[:5], "expected 6 comma-separated fields (sub_stage,1xCINxHxW,nsr,MMACs,Mparams,latency_ms), got 5"),
    (lambda f: f[:2] + ["0.3x"] + f[3:], "nsr '0.3x' is not a number"),
    (lambda f: [f[0].replace("#1.5", "#None")] + f[1:], "expand None not in"),
    (lambda f: [f[0]] + ["1x32x27x27"] + f[2:], "input size 27 matches no resolution"),
])
def test_released_lut_malformed_row_is_one_error_naming_file_and_line(tmp_path, capsys, edit, message):
    block_lut = write_released_style_lut(tmp_path / "block_lut")
    path = block_lut / "onnxw" / "stage3_3_1.csv"  # ResNet: expands 0.5 1.0 1.5, input 28/24/20 px
    lines = path.read_text().splitlines()
    lines[3] = ",".join(edit(lines[3].split(",")))
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run_cli(_released_cli(tmp_path, block_lut, "--score_only", "543210_000000")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:4: ") and message in err and err.count("\n") == 1, err
