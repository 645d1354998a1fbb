"""bench/space_vs_baseline.py: which spaces it compares, and how it states the result against the seed spread."""
from __future__ import annotations

import pytest

from bench.space_vs_baseline import compared_spaces, summarize
from modules.encoding import parse_supernet


def test_hand_made_spaces_share_the_searched_windows():
    spaces = compared_spaces("tiny-500155-012111", random_seed=0)
    assert spaces["searched"] == "tiny-500155-012111"
    # tiny's candidates are onnxw's: 2 = MobileNetV3Res (hardswish + SE), 3 = ResNet
    assert spaces["all-MBv3Res"] == "tiny-222222-012111" and spaces["all-ResNet"] == "tiny-333333-012111"
    parse_supernet(spaces["random"])  # a valid supernet of the superspace
    assert compared_spaces("tiny-500155-012111", random_seed=0)["random"] == spaces["random"]  # seeded


def _rows(space, target, accs, lat=0.3):
    return [{"space": space, "target_ms": target, "seed": s, "subnet": "d..", "val_top1": a, "int8_ms": lat}
            for s, a in enumerate(accs)]


@pytest.mark.parametrize("searched, other, verdict", [
    ([90.0, 91.0], [85.0, 86.0], "beats the best other space (all-ResNet) by 5.00 points, more than the seed-to-seed "
                                 "spread (1.00)"),
    ([90.0, 93.0], [89.0, 90.0], "beats the best other space (all-ResNet) by 2.00 points, within the seed-to-seed "
                                 "spread (3.00)"),
    ([80.0, 80.0], [85.0, 85.5], "trails the best other space (all-ResNet) by 5.25 points, more than"),
])
def test_summary_compares_the_lead_with_the_seed_spread(searched, other, verdict):
    spaces = {"searched": "a", "all-ResNet": "b", "random": "c"}
    rows = _rows("searched", 0.4, searched) + _rows("all-ResNet", 0.4, other) + _rows("random", 0.4, [50.0, 60.0])
    table, verdicts = summarize(rows, spaces, [0.4])
    assert len(verdicts) == 1 and verdicts[0].startswith(f"0.4 ms: the searched space {verdict}")
    by_space = {r["space"]: r for r in table}
    assert by_space["random"]["val_top1_mean"] == 55.0 and by_space["random"]["spread"] == 10.0


def test_a_space_without_subnets_in_the_window_is_reported_not_dropped():
    spaces = {"searched": "a", "all-MBv3Res": "b"}
    rows = _rows("searched", 0.4, [90.0]) + [{"space": "all-MBv3Res", "target_ms": 0.4, "seed": 0}]
    table, verdicts = summarize(rows, spaces, [0.4])
    assert {"target_ms": 0.4, "space": "all-MBv3Res", "seeds": 0} in table
    assert verdicts == ["0.4 ms: not enough spaces with subnets in the window to compare"]
