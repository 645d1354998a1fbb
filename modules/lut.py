"""Block-KD lookup tables (LUTs): one CSV per (stage, candidate block, width window), reference spec §3.3.

A LUT line has no header and 6 fields, the 4 numbers printed with ``%.4f``::

    sub_stage,1xCINxHxW,nsr,MMACs,Mparams,latency_ms
    5#80#4_7#112#3_5#80#2,1x64x24x24,0.3339,297.4925,2.0685,3.2369

Files are ``<lut_dir>/<superspace>/stage{X}_{B}_{W}.csv`` (X = 1..6, B = candidate index, W = window
index; `lut_dir` may also be the ``<superspace>`` folder itself); the authors' released LUTs
(``data/block_lut/{mobilew,onnxw}``) are in this format and load unchanged. ``lut_key`` is the one name
function shared by the LUT build (``eval_block_kd.py``) and the space search. The resolution of a row is
recovered from its H (``SuperSpace.resolution_from_hw``).

Every line is validated on reading; a bad line raises one ``ValueError`` naming file, line and problem.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from modules.encoding import format_substage, parse_substage
from modules.superspace import SEARCHABLE, SUPERSPACES, SuperSpace, get_superspace

NUM_FIELDS = 6
_FILE_RE = re.compile(r"^stage(\d+)_(\d+)_(\d+)\.csv$")


def lut_key(stage_idx: int, block_idx: int, window_idx: int) -> str:
    """``stage{X}_{B}_{W}``: X = searchable stage 1..6, B = candidate block index, W = width window."""
    return f"stage{int(stage_idx)}_{int(block_idx)}_{int(window_idx)}"


def lut_file_path(lut_dir: str, superspace: str | SuperSpace, stage_idx: int, block_idx: int,
                  window_idx: int) -> str:
    name = superspace if isinstance(superspace, str) else superspace.name
    return os.path.join(lut_dir, name, lut_key(stage_idx, block_idx, window_idx) + ".csv")


def _space(superspace: str | SuperSpace) -> SuperSpace:
    return get_superspace(superspace) if isinstance(superspace, str) else superspace


def format_lut_row(sub_stage: str | Sequence[tuple], cin: int, hw: int, nsr: float, mmacs: float,
                   mparams: float, latency_ms: float) -> str:
    """One LUT line (no newline). `sub_stage` is ``k#w#e_...`` or a list of (k, w, e)."""
    sub = sub_stage if isinstance(sub_stage, str) else format_substage(list(sub_stage))
    if "," in sub or "\n" in sub:
        raise ValueError(f"LUT row: sub-stage {sub!r} must not contain ',' or a newline")
    nums = (nsr, mmacs, mparams, latency_ms)
    for name, v in zip(("nsr", "MMACs", "Mparams", "latency_ms"), nums):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"LUT row {sub!r}: {name} = {v!r} must be a finite non-negative number")
    return f"{sub},1x{int(cin)}x{int(hw)}x{int(hw)},{nsr:.4f},{mmacs:.4f},{mparams:.4f},{latency_ms:.4f}"


def write_lut_file(path: str, rows: Iterable[str | Sequence]) -> None:
    """Write rows (formatted lines, or argument tuples for `format_lut_row`) atomically (temp + rename)."""
    from modules.checkpoint import atomic_write_text

    lines = [r if isinstance(r, str) else format_lut_row(*r) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------- reading
@dataclass
class LutTable:
    """The rows of one LUT file as columns; `at(resolution)` gives the (nsr, latency) arrays of a resolution."""
    key: str
    path: str
    stage: int
    block: int
    window: int
    sub_stage: list[str]
    cin: np.ndarray  # int64
    hw: np.ndarray  # int64, input H (= W)
    resolution: np.ndarray  # int64
    nsr: np.ndarray  # float64
    mmacs: np.ndarray
    mparams: np.ndarray
    latency: np.ndarray
    _by_res: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.sub_stage)

    def at(self, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """(nsr, latency) of the rows at `resolution`, in file order (cached, contiguous)."""
        if resolution not in self._by_res:
            m = self.resolution == resolution
            self._by_res[resolution] = (np.ascontiguousarray(self.nsr[m]), np.ascontiguousarray(self.latency[m]))
        return self._by_res[resolution]

    def resolutions(self) -> set[int]:
        return set(np.unique(self.resolution).tolist())

    def rows(self) -> list[str]:
        """The rows re-formatted (byte-identical to a file written by `format_lut_row`)."""
        return [format_lut_row(s, c, h, a, b, p, t) for s, c, h, a, b, p, t in zip(
            self.sub_stage, self.cin.tolist(), self.hw.tolist(), self.nsr.tolist(), self.mmacs.tolist(),
            self.mparams.tolist(), self.latency.tolist())]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get their average rank); nan when
    either is constant. Used to check that bigger sub-stages of a LUT file have lower NSR."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman: lengths differ ({len(ra)} vs {len(rb)})")
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


class _SubStageChecker:
    """Validates sub-stage strings: a fast path on the set of canonical ``k#w#e`` tokens, else the full parser."""

    def __init__(self, space: SuperSpace, stage_idx: int, block: int, window: int):
        self.spec = space.candidates[block]
        self.stage = space.stage(SEARCHABLE[stage_idx - 1])
        self.window = self.stage.window(window)
        self.tokens = {f"{k}#{w}#{e}" for k in self.spec.kernel_list for w in self.window
                       for e in self.spec.expand_list}
        self.depths = set(self.stage.depth_list)

    def check(self, text: str) -> None:
        toks = text.split("_")
        if len(toks) in self.depths and all(t in self.tokens for t in toks):
            return
        parse_substage(text, self.spec, self.stage, self.window)  # raises the precise error


def _bad(path: str, lineno: int, line: str, what: str) -> ValueError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return ValueError(f"{path}:{lineno}: {what} (line: {shown!r})")


def read_lut_file(path: str, superspace: str | SuperSpace, stage: int, block: int, window: int) -> LutTable:
    """Read and validate one LUT file of searchable stage `stage` (1..6), candidate `block`, window `window`.

    Every line is checked: 6 fields; shape ``1xCxHxW`` with C in the previous stage's full width list, H = W
    and H mapping to a resolution of the superspace; the sub-stage parses and lies within the block's
    kernels/expands, the stage's depths and the width window; the 4 numbers are finite and >= 0.
    Blank lines are ignored. A file without rows is an error.
    """
    space = _space(superspace)
    if not 1 <= stage <= len(SEARCHABLE):
        raise ValueError(f"{path}: stage {stage} not in 1..{len(SEARCHABLE)}")
    if not 0 <= block < len(space.candidates):
        raise ValueError(f"{path}: block {block} not in 0..{len(space.candidates) - 1} for {space.name}")
    stage_name = SEARCHABLE[stage - 1]
    try:
        space.stage(stage_name).window(window)  # range check
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    prev_widths = set(space.prev_width_list(stage_name))
    checker = _SubStageChecker(space, stage, block, window)
    shapes: dict[str, tuple[int, int, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None

    subs, shape_rows, num_strs, linenos = [], [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        f = line.split(",")
        if len(f) != NUM_FIELDS:
            raise _bad(path, lineno, line, f"expected {NUM_FIELDS} comma-separated fields "
                       f"(sub_stage,1xCINxHxW,nsr,MMACs,Mparams,latency_ms), got {len(f)}")
        sub = f[0].strip()
        try:
            checker.check(sub)
        except ValueError as e:
            raise _bad(path, lineno, line, str(e)) from None
        shp = f[1].strip()
        got = shapes.get(shp)
        if got is None:
            try:
                got = shapes[shp] = _parse_shape(shp, space, stage_name, prev_widths)
            except ValueError as e:
                raise _bad(path, lineno, line, str(e)) from None
        subs.append(sub)
        shape_rows.append(got)
        num_strs.append(f[2:])
        linenos.append(lineno)
    if not subs:
        raise ValueError(f"{path}: no data rows")

    try:
        nums = np.array(num_strs, dtype=np.float64)
    except ValueError:
        for i, fs in enumerate(num_strs):  # find the culprit for the message
            for name, s in zip(("nsr", "MMACs", "Mparams", "latency_ms"), fs):
                try:
                    float(s)
                except ValueError:
                    raise _bad(path, linenos[i], text.splitlines()[linenos[i] - 1],
                               f"{name} {s.strip()!r} is not a number") from None
        raise
    bad = ~(np.isfinite(nums) & (nums >= 0))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        name = ("nsr", "MMACs", "Mparams", "latency_ms")[j]
        raise _bad(path, linenos[i], text.splitlines()[linenos[i] - 1],
                   f"{name} = {num_strs[i][j].strip()} must be a finite non-negative number")
    shp = np.array(shape_rows, dtype=np.int64).reshape(-1, 3)
    return LutTable(lut_key(stage, block, window), path, stage, block, window, subs, shp[:, 0], shp[:, 1],
                    shp[:, 2], np.ascontiguousarray(nums[:, 0]), np.ascontiguousarray(nums[:, 1]),
                    np.ascontiguousarray(nums[:, 2]), np.ascontiguousarray(nums[:, 3]))


def _parse_shape(text: str, space: SuperSpace, stage_name: str, prev_widths: set[int]) -> tuple[int, int, int]:
    parts = text.split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) != 4 or dims[0] != 1:
        raise ValueError(f"input shape {text!r} must be 1xCINxHxW with integers")
    _, c, h, w = dims
    if h != w:
        raise ValueError(f"input shape {text!r}: H {h} != W {w}")
    if c not in prev_widths:
        raise ValueError(f"input shape {text!r}: CIN {c} not in the previous stage's width list {sorted(prev_widths)}")
    return c, h, space.resolution_from_hw(stage_name, h)


# ------------------------------------------------------------------------------------- LUT directory
@dataclass
class Lut:
    """All LUT files of a superspace: `tables[(stage, block, window)]`, rows split by resolution via `arrays`."""
    superspace: SuperSpace
    lut_dir: str  # as given
    root: str  # the folder the files were read from: <lut_dir>/<superspace> or lut_dir itself
    tables: dict[tuple[int, int, int], LutTable]
    resolutions: tuple[int, ...]  # resolutions present in every file, in superspace order

    def table(self, stage: int, block: int, window: int) -> LutTable:
        return self.tables[(stage, block, window)]

    def arrays(self, stage: int, block: int, window: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """(nsr, latency_ms) arrays of one file at one resolution."""
        return self.tables[(stage, block, window)].at(resolution)

    @property
    def num_rows(self) -> int:
        return sum(len(t) for t in self.tables.values())


def expected_keys(superspace: str | SuperSpace) -> list[tuple[int, int, int]]:
    space = _space(superspace)
    return [(x, b, w) for x, st in enumerate(space.searchable_stages, start=1)
            for b in range(len(space.candidates)) for w in range(st.num_windows)]


def lut_root(lut_dir: str, folder: str) -> str:
    """The folder holding the stage*.csv files: ``<lut_dir>/<folder>`` (the original's ``--lut_path
    data/block_lut``), else `lut_dir` itself when it holds them (``data/block_lut/onnxw``). A folder named after
    another superspace's LUT is refused: its rows would be checked against the wrong candidates and widths."""
    root = os.path.join(lut_dir, folder)
    if os.path.isdir(root):
        return root
    holds_files = os.path.isdir(lut_dir) and any(_FILE_RE.match(n) for n in os.listdir(lut_dir))
    if not holds_files:
        raise FileNotFoundError(f"LUT dir {root} not found (expected <lut_dir>/{folder}/stage{{X}}_{{B}}_{{W}}.csv "
                                f"or stage{{X}}_{{B}}_{{W}}.csv files in {lut_dir} itself)")
    name = os.path.basename(os.path.normpath(lut_dir))
    lut_names = set(SUPERSPACES) | {f"{n}_fp32" for n in SUPERSPACES}
    if name in lut_names and name != folder:
        raise ValueError(f"LUT dir {lut_dir} is named as the {name} LUT, but the {folder} LUT is wanted")
    return lut_dir


def load_lut_dir(lut_dir: str, superspace: str | SuperSpace, hw_list: Sequence[int] | None = None,
                 subdir: str | None = None) -> Lut:
    """Load and validate ``<lut_dir>/<superspace>/stage{X}_{B}_{W}.csv`` for every (stage, block, window)
    (`subdir` replaces ``<superspace>``, e.g. ``onnxw_fp32`` for the LUT of the fp32 block-KD models);
    `lut_dir` may also be that folder itself (`lut_root`). The authors' released LUTs load unchanged.

    Missing files raise one FileNotFoundError listing all of them. Every file must hold rows at every
    resolution of `hw_list` (default: the resolutions found in the files, which must then agree).
    """
    space = _space(superspace)
    root = lut_root(lut_dir, subdir or space.name)
    keys = expected_keys(space)
    missing = [lut_key(*k) + ".csv" for k in keys if not os.path.isfile(os.path.join(root, lut_key(*k) + ".csv"))]
    if missing:
        raise FileNotFoundError(f"LUT dir {root}: {len(missing)} of {len(keys)} files missing: {', '.join(missing)}")
    tables = {k: read_lut_file(os.path.join(root, lut_key(*k) + ".csv"), space, *k) for k in keys}

    if hw_list is not None:
        bad = [r for r in hw_list if r not in space.block_kd_hw_list]
        if bad:
            raise ValueError(f"{space.name}: resolutions {bad} not in the block-KD list {list(space.block_kd_hw_list)}")
        want = set(hw_list)
    else:
        want = set().union(*(t.resolutions() for t in tables.values()))
    lacking = [f"{t.key}.csv (has {sorted(t.resolutions())})" for t in tables.values() if not want <= t.resolutions()]
    if lacking:
        raise ValueError(f"LUT dir {root}: every file needs rows at resolutions {sorted(want)}; "
                         f"{len(lacking)} files lack some: {', '.join(lacking)}"
                         + ("" if hw_list is not None else "; restrict the resolutions with --hw_list"))
    resolutions = tuple(r for r in space.block_kd_hw_list if r in want)
    return Lut(space, lut_dir, root, tables, resolutions)


# ------------------------------------------------------------------------------------ synthetic LUTs
# Per-stage medians of the shipped onnxw LUT (spec §12.3): nsr loss and latency (ms).
_SYN_NSR = (0.26, 0.36, 0.43, 0.30, 0.73, 0.90)
_SYN_LAT = (5.7, 2.6, 2.1, 3.5, 2.7, 1.3)


def write_synthetic_lut(out_dir: str, superspace: str | SuperSpace, rows_per_file: int = 1000,
                        seed: int = 0) -> str:
    """Write a complete synthetic LUT under ``<out_dir>/<superspace>/``; returns that directory.

    Sub-stages are sampled as in the LUT build (depth, k, e uniform, widths uniform in the window, CIN
    uniform over the previous stage's full list; each resolution gets 1/3 of the rows, shuffled). NSR
    falls and latency rises with the sub-stage's capacity; each (stage, block) gets a random quality/cost
    factor, so the best space is not trivial. Value ranges resemble the shipped onnxw LUT (spec §12.3).
    Deterministic in `seed`.
    """
    space = _space(superspace)
    if rows_per_file < len(space.block_kd_hw_list):
        raise ValueError(f"synthetic LUT: rows_per_file {rows_per_file} < "
                         f"{len(space.block_kd_hw_list)} resolutions")
    rng = np.random.default_rng(seed)
    n_blocks = len(space.candidates)
    quality = rng.uniform(0.85, 1.2, size=(6, n_blocks))  # nsr multiplier
    cost = rng.uniform(0.6, 1.6, size=(6, n_blocks)) * quality ** -1.5  # better blocks tend to be slower
    r_max = max(space.block_kd_hw_list)
    hw_list = np.array(space.block_kd_hw_list)
    root = os.path.join(out_dir, space.name)
    n = rows_per_file
    for (x, b, w) in expected_keys(space):
        stage_name = SEARCHABLE[x - 1]
        st = space.stage(stage_name)
        spec = space.candidates[b]
        window = np.array(st.window(w))
        prev = np.array(space.prev_width_list(stage_name))
        depth_list = np.array(st.depth_list)
        kernels = np.array(spec.kernel_list)
        expands = np.array([1.0 if e is None else e for e in spec.expand_list], dtype=np.float64)
        d_max = depth_list.max()
        # per-row draws, vectorised: depth, per-block k/w/e indices (d_max slots, first `d` used), resolution, CIN
        depth = depth_list[rng.integers(len(depth_list), size=n)]
        ki = rng.integers(len(kernels), size=(n, d_max))
        wi = rng.integers(len(window), size=(n, d_max))
        ei = rng.integers(len(expands), size=(n, d_max))
        res = hw_list[rng.permutation(np.arange(n) % len(hw_list))]  # every resolution ~n/3 times
        cin = prev[rng.integers(len(prev), size=n)]
        noise = rng.lognormal(0, [0.05, 0.1], size=(n, 2))
        used = np.arange(d_max)[None, :] < depth[:, None]
        mean = lambda v: (v * used).sum(1) / depth  # noqa: E731
        wf = mean(window[wi]) / max(st.width_list)
        ef = mean(expands[ei]) / expands.max()
        kf = mean(kernels[ki]) / kernels.max()
        cap = (depth / d_max) * wf ** 2 * (0.5 + 0.5 * ef) * (0.7 + 0.3 * kf) / 0.25
        rs = res / r_max
        nsr = np.minimum(_SYN_NSR[x - 1] * quality[x - 1, b] * cap ** -0.12 * rs ** -0.1 * noise[:, 0], 1.05)
        lat = _SYN_LAT[x - 1] * cost[x - 1, b] * cap * rs ** 2 * noise[:, 1]
        macs = 300.0 * cap * rs ** 2 * (x / 3)
        params = 0.5 * cap * x
        e_str = [str(e) for e in spec.expand_list]
        k_l, w_l, e_l = kernels[ki].tolist(), window[wi].tolist(), ei.tolist()
        rows = []
        for i, d in enumerate(depth.tolist()):
            sub = "_".join(f"{k_l[i][j]}#{w_l[i][j]}#{e_str[e_l[i][j]]}" for j in range(d))
            rows.append(format_lut_row(sub, cin[i], space.stage_input_hw(int(res[i]), stage_name), float(nsr[i]),
                                       float(macs[i]), float(params[i]), float(lat[i])))
        write_lut_file(os.path.join(root, lut_key(x, b, w) + ".csv"), rows)
    return root
