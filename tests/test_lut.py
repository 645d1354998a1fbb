"""LUT files: key, row format, atomic write / validated read round trip, malformed lines, missing files."""
import os

import numpy as np
import pytest

from modules.lut import (expected_keys, format_lut_row, load_lut_dir, lut_file_path, lut_key, read_lut_file,
                         spearman, write_lut_file, write_synthetic_lut)
from modules.superspace import get_superspace

TINY = get_superspace("tiny")
# tiny stage1: widths (16, 24, 32), window size 2, depths (1, 2); previous stage widths (8, 16);
# input H at resolutions 32/48/64 is 16/24/32. Candidate 1 = MobileNetV2Res (k 3 5, e 4 6 8).
GOOD = [
    format_lut_row([(3, 16, 4), (5, 24, 8)], 8, 16, 0.45571, 19.669, 0.0069, 1.50044),
    format_lut_row("5#24#6", 16, 24, 0.3, 2.0, 0.01, 0.2),
    format_lut_row("3#16#4_3#16#4", 16, 32, 1.0, 12.5, 0.5, 3.25),
]


def test_lut_key_and_path():
    assert lut_key(3, 5, 1) == "stage3_5_1"
    assert lut_file_path("/x", "onnxw", 1, 0, 2) == os.path.join("/x", "onnxw", "stage1_0_2.csv")
    assert len(expected_keys("onnxw")) == 132 and len(expected_keys("mobilew")) == 210


def test_format_row():
    assert GOOD[0] == "3#16#4_5#24#8,1x8x16x16,0.4557,19.6690,0.0069,1.5004"
    with pytest.raises(ValueError, match="nsr"):
        format_lut_row("3#16#4", 8, 16, float("nan"), 1, 1, 1)
    with pytest.raises(ValueError, match="latency_ms"):
        format_lut_row("3#16#4", 8, 16, 0.1, 1, 1, -1)


def test_round_trip_byte_exact(tmp_path):
    path = tmp_path / "tiny" / "stage1_1_0.csv"
    write_lut_file(str(path), GOOD)
    assert path.read_bytes() == ("\n".join(GOOD) + "\n").encode()
    assert [p.name for p in path.parent.iterdir()] == ["stage1_1_0.csv"]  # no temp file left
    t = read_lut_file(str(path), TINY, 1, 1, 0)
    assert t.rows() == GOOD
    assert t.cin.tolist() == [8, 16, 16] and t.resolution.tolist() == [32, 48, 64]
    assert t.nsr.tolist() == [0.4557, 0.3, 1.0] and t.latency.tolist() == [1.5004, 0.2, 3.25]
    nsr, lat = t.at(48)
    assert nsr.tolist() == [0.3] and lat.tolist() == [0.2]
    # tuples are formatted on write
    write_lut_file(str(path), [("5#24#6", 16, 24, 0.3, 2.0, 0.01, 0.2)])
    assert path.read_text() == GOOD[1] + "\n"


@pytest.mark.parametrize("line, message", [
    ("3#16#4,1x8x16x16,0.1,1.0,1.0", "expected 6 comma-separated fields"),
    ("3#16#4,1x8x16x16,0.1,1.0,1.0,2.0,7", "got 7"),
    ("3#16#4,1x8x16x16,nan,1.0,1.0,2.0", "nsr = nan must be a finite non-negative"),
    ("3#16#4,1x8x16x16,0.1,inf,1.0,2.0", "MMACs = inf"),
    ("3#16#4,1x8x16x16,0.1,1.0,1.0,-2.0", "latency_ms = -2.0"),
    ("3#16#4,1x8x16x16,0.1,abc,1.0,2.0", "MMACs 'abc' is not a number"),
    ("3#16#4,1x8x16,0.1,1.0,1.0,2.0", "must be 1xCINxHxW"),
    ("3#16#4,8x16x16,0.1,1.0,1.0,2.0", "must be 1xCINxHxW"),
    ("3#16#4,1x8x16x17,0.1,1.0,1.0,2.0", "H 16 != W 17"),
    ("3#16#4,1x12x16x16,0.1,1.0,1.0,2.0", "CIN 12 not in the previous stage's width list"),
    ("3#16#4,1x8x20x20,0.1,1.0,1.0,2.0", "input size 20 matches no resolution"),
    ("3#32#4,1x8x16x16,0.1,1.0,1.0,2.0", "width 32 not in"),  # window 0 = (16, 24)
    ("7#16#4,1x8x16x16,0.1,1.0,1.0,2.0", "kernel 7 not in"),
    ("3#16#5,1x8x16x16,0.1,1.0,1.0,2.0", "expand 5 not in"),
    ("3#16#None,1x8x16x16,0.1,1.0,1.0,2.0", "expand None not in"),
    ("3#16#4_3#16#4_3#16#4,1x8x16x16,0.1,1.0,1.0,2.0", "depth 3 not in"),
    ("3#16,1x8x16x16,0.1,1.0,1.0,2.0", "must be k#w#e"),
])
def test_malformed_line_rejected(tmp_path, line, message):
    path = tmp_path / "stage1_1_0.csv"
    path.write_text("\n".join(GOOD[:2] + [line] + GOOD[2:]) + "\n")
    with pytest.raises(ValueError) as e:
        read_lut_file(str(path), TINY, 1, 1, 0)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg  # file and line number
    assert message in msg, msg
    assert "\n" not in msg


def test_empty_file_and_blank_lines(tmp_path):
    path = tmp_path / "stage1_1_0.csv"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no data rows"):
        read_lut_file(str(path), TINY, 1, 1, 0)
    path.write_text(GOOD[0] + "\n\n" + GOOD[1] + "\r\n")
    assert len(read_lut_file(str(path), TINY, 1, 1, 0)) == 2


def test_alternative_expand_spelling_accepted(tmp_path):
    path = tmp_path / "stage1_1_0.csv"
    path.write_text("3#16#4.0,1x8x16x16,0.1000,1.0000,1.0000,2.0000\n")
    assert read_lut_file(str(path), TINY, 1, 1, 0).sub_stage == ["3#16#4.0"]


def test_load_dir_synthetic_and_missing_files(tmp_path):
    root = write_synthetic_lut(str(tmp_path), "tiny", rows_per_file=30, seed=1)
    lut = load_lut_dir(str(tmp_path), "tiny")
    assert len(lut.tables) == len(expected_keys("tiny")) and lut.num_rows == 30 * len(lut.tables)
    assert lut.resolutions == (32, 48, 64)
    nsr, lat = lut.arrays(3, 2, 1, 48)
    assert nsr.dtype == np.float64 and len(nsr) == len(lat) > 0
    assert (lut.table(3, 2, 1).resolution == 48).sum() == len(nsr)
    # deterministic in the seed
    other = tmp_path / "again"
    write_synthetic_lut(str(other), "tiny", rows_per_file=30, seed=1)
    assert (other / "tiny" / "stage3_2_1.csv").read_bytes() == open(os.path.join(root, "stage3_2_1.csv"), "rb").read()

    os.remove(os.path.join(root, "stage2_0_1.csv"))
    os.remove(os.path.join(root, "stage6_5_0.csv"))
    with pytest.raises(FileNotFoundError) as e:
        load_lut_dir(str(tmp_path), "tiny")
    assert "2 of 84 files missing: stage2_0_1.csv, stage6_5_0.csv" in str(e.value)


def test_load_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lut_dir(str(tmp_path), "tiny")
    root = write_synthetic_lut(str(tmp_path), "tiny", rows_per_file=12, seed=0)
    # the <superspace> folder itself is accepted too; one named after another superspace is refused
    assert load_lut_dir(root, "tiny").root == root == load_lut_dir(str(tmp_path), "tiny").root
    os.rename(root, tmp_path / "onnxw")
    with pytest.raises(ValueError, match="named as the onnxw LUT, but the tiny LUT is wanted"):
        load_lut_dir(str(tmp_path / "onnxw"), "tiny")
    os.rename(tmp_path / "onnxw", root)
    # one file lacks resolution 64
    path = os.path.join(root, "stage4_1_0.csv")
    t = read_lut_file(path, TINY, 4, 1, 0)
    write_lut_file(path, [r for r, res in zip(t.rows(), t.resolution.tolist()) if res != 64])
    with pytest.raises(ValueError, match=r"1 files lack some: stage4_1_0.csv \(has \[32, 48\]\)"):
        load_lut_dir(str(tmp_path), "tiny")
    assert load_lut_dir(str(tmp_path), "tiny", hw_list=[32, 48]).resolutions == (32, 48)
    with pytest.raises(ValueError, match="not in the block-KD list"):
        load_lut_dir(str(tmp_path), "tiny", hw_list=[224])


def test_spearman_against_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = 1 2 3 4, b = 1 3 2 4: rho = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 5, 2, 9]) == pytest.approx(0.8)
    # ties take their average rank: b ranks 1.5 1.5 3 4 -> Pearson of the ranks
    assert spearman([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3, 4])[0, 1])
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="lengths differ"):
        spearman([1, 2], [1, 2, 3])
