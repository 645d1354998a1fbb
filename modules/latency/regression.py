"""Regression fallback for blocks not in the table: per block type non-negative least squares on the analytic
block features, times a random-forest correction evaluated as flat numpy arrays.
"""
from __future__ import annotations

import numpy as np

from modules.latency.graph import block_features


class FlatForest:
    """A fitted scikit-learn forest regressor as flat numpy arrays, predicting every (row, tree) pair at once:
    the same values as ``forest.predict`` (float32 features against the trees' thresholds, as scikit-learn
    compares them) without its per-call cost (one row, 150 trees: 7.6 ms there, 0.14 ms here), which dominated
    random subnet sampling: one call per new subnet (bench/flat_forest.py)."""

    def __init__(self, forest):
        trees = [e.tree_ for e in forest.estimators_]
        sizes = np.array([t.node_count for t in trees])
        self.roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        shift = np.repeat(self.roots, sizes)
        left = np.concatenate([t.children_left for t in trees]).astype(np.int64)
        right = np.concatenate([t.children_right for t in trees]).astype(np.int64)
        leaf = left < 0
        own = np.arange(len(left))
        self.left = np.where(leaf, own, left + shift)  # a leaf points to itself: descending past it stays there
        self.right = np.where(leaf, own, right + shift)
        self.feature = np.where(leaf, 0, np.concatenate([t.feature for t in trees])).astype(np.int64)
        self.threshold = np.concatenate([t.threshold for t in trees])
        self.value = np.concatenate([t.value.reshape(t.node_count, -1)[:, 0] for t in trees])
        self.depth = max(t.max_depth for t in trees)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        node = np.broadcast_to(self.roots, (len(X), len(self.roots))).copy()
        rows = np.arange(len(X))[:, None]
        for _ in range(self.depth):
            go_left = X[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(go_left, self.left[node], self.right[node])
        return self.value[node].mean(axis=1)


class BlockRegressor:
    """Regression fallback for blocks not in the table, fitted on the measured ones.

    1. Per block type, non-negative least squares on :func:`block_features` (latency as a non-negative
       sum of costs per MAC of each conv kind, per tensor element, per op), minimising relative error;
       a global model over all types covers types with fewer than `min_samples` measurements.
    2. With at least `min_forest` measurements, a random forest (scikit-learn) on the log ratio
       measured / linear, from the block configuration (type, size, widths, kernel, expand, stride) and
       the log features. The linear part alone is biased low on large blocks (-7 % on the sum of 25
       random onnxw blocks); the residual forest removes the bias and captures width/alignment effects
       (sums of 25 held-out blocks within +-10 %: 66 % -> 92 %, see bench/latency_predictor.py).
    """

    def __init__(self, min_samples: int = 12, min_forest: int = 40, trees: int = 150, seed: int = 0):
        self.min_samples, self.min_forest, self.trees, self.seed = min_samples, min_forest, trees, seed
        self.coefs: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.types: list[str] = []
        self.forest = None
        self.flat_forest: FlatForest | None = None

    @staticmethod
    def _solve(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        from scipy.optimize import nnls

        w = 1.0 / np.maximum(y, 1e-4)  # relative error
        scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
        A = X / scale * w[:, None]
        coef, _ = nnls(A, y * w, maxiter=50 * A.shape[1])
        return coef / scale

    def _linear(self, cfgs: list[dict], X: np.ndarray) -> np.ndarray:
        if not self.coefs:
            raise ValueError("regression fallback is not fitted")
        out = np.empty(len(cfgs))
        for i, c in enumerate(cfgs):
            out[i] = X[i] @ self.coefs.get(c["name"], self.coefs["*"])
        return np.maximum(out, 1e-4)

    def _forest_x(self, cfgs: list[dict], X: np.ndarray, lin: np.ndarray) -> np.ndarray:
        rows = [[self.types.index(c["name"]) if c["name"] in self.types else -1, c["hw"], c["cin"], c["cout"],
                 c["kernel"], c["expand"] or 0.0, c["stride"], c["cin"] % 16, c["cout"] % 16] for c in cfgs]
        return np.hstack([np.asarray(rows, dtype=np.float64), np.log1p(X), np.log(lin)[:, None]])

    def fit(self, cfgs: list[dict], ms: list[float]) -> "BlockRegressor":
        if not cfgs:
            raise ValueError("regression fallback: no measured blocks to fit on")
        X = np.stack([block_features(c) for c in cfgs])
        y = np.maximum(np.asarray(ms, dtype=np.float64), 1e-4)
        names = np.array([c["name"] for c in cfgs])
        self.types = sorted(set(names))
        self.coefs = {"*": self._solve(X, y)}
        self.counts = {"*": len(y)}
        for n in self.types:
            m = names == n
            self.counts[n] = int(m.sum())
            if m.sum() >= self.min_samples:
                self.coefs[n] = self._solve(X[m], y[m])
        self.forest = self.flat_forest = None
        if len(y) >= self.min_forest:
            try:
                from sklearn.ensemble import RandomForestRegressor
            except ImportError:  # the linear model alone
                return self
            lin = self._linear(cfgs, X)
            self.forest = RandomForestRegressor(self.trees, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
            self.forest.fit(self._forest_x(cfgs, X, lin), np.log(y / lin))
            self.flat_forest = FlatForest(self.forest)
        return self

    def predict_many(self, cfgs: list[dict]) -> np.ndarray:
        """Latency (ms) of each block configuration."""
        if not cfgs:
            return np.zeros(0)
        X = np.stack([block_features(c) for c in cfgs])
        lin = self._linear(cfgs, X)
        if self.forest is None:
            return lin
        return lin * np.exp(self.flat_forest.predict(self._forest_x(cfgs, X, lin)))

    def predict(self, cfg: dict) -> float:
        return float(self.predict_many([cfg])[0])


def cross_fitted(cfgs: list[dict], ms: list[float], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold regression predictions: each block's latency predicted by a :class:`BlockRegressor` fitted
    on the other folds, never on the block itself. A table of single measurements on a busy machine is
    noisy block by block; these predictions keep what the other blocks say about a configuration and
    drop the block's own measurement noise (subnet sums agree better with whole-model measurements)."""
    n = len(cfgs)
    if n < 2 * folds:
        return np.asarray(ms, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    y = np.asarray(ms, dtype=np.float64)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        reg = BlockRegressor(seed=seed).fit([cfgs[i] for i in rest], y[rest])
        out[part] = np.maximum(reg.predict_many([cfgs[i] for i in part]), 0.0)
    return out
