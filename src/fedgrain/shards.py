"""Standardisation and the building of subsets ("shards") from the user's rows.

The subsets are standardised with one *global* mean and scale, so every subset's estimate is in
the same coordinates and pooling is a plain weighted average; :class:`Standardizer` maps the
pooled estimate and its covariance back to the original scale at the end. Shards are written in
row blocks straight into the arrays the backend allocated, so the data are copied exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import progress
from .backends import Backend, ShardRef
from .ordinal import block_rows


def column_moments(X: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation of each column, in row blocks.

    Sums are taken around the first row, which keeps the variance accurate when a column's
    mean is large compared with its spread.
    """
    n, p = X.shape
    block = block_rows(p)
    tw = float(n if w is None else w.sum())
    shift = np.array(X[0], dtype=float) if n else np.zeros(p)
    s1 = np.zeros(p)
    s2 = np.zeros(p)
    for a in range(0, n, block):
        Xb = X[a : a + block] - shift
        if w is None:
            s1 += Xb.sum(axis=0)
            s2 += np.einsum("ij,ij->j", Xb, Xb)
        else:
            wb = w[a : a + block]
            s1 += wb @ Xb
            s2 += wb @ (Xb * Xb)
    m = s1 / tw
    var = np.maximum(s2 / tw - m * m, 0.0)
    return shift + m, np.sqrt(var)


@dataclass(frozen=True)
class Standardizer:
    """``x_std = (x - mean) / scale``, and the matching map of parameters.

    With ``eta = x'beta``: ``beta = beta_std / scale`` and
    ``theta = theta_std + (mean / scale)' beta_std``.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, w: np.ndarray | None = None) -> Standardizer:
        mean, scale = column_moments(X, w)
        return cls(mean, np.where(scale > 0, scale, 1.0))

    def jacobian(self, n_thresholds: int) -> np.ndarray:
        """``T`` with ``params_raw = T @ params_std``, over ``(beta, theta)``."""
        p = self.mean.shape[0]
        T = np.zeros((p + n_thresholds, p + n_thresholds))
        T[:p, :p] = np.diag(1.0 / self.scale)
        T[p:, :p] = (self.mean / self.scale)[None, :]
        T[p:, p:] = np.eye(n_thresholds)
        return T

    def to_raw(self, params: np.ndarray, cov: np.ndarray | None = None):
        """Map standardised parameters (and their covariance) to the original scale."""
        T = self.jacobian(params.shape[0] - self.mean.shape[0])
        raw = T @ params
        return raw if cov is None else (raw, T @ cov @ T.T)

    def transform(self, Xb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.subtract(Xb, self.mean, out=out)
        out /= self.scale
        return out


def row_blocks(X, block: int | None = None):
    """``(start, rows)`` blocks of the encoded rows ``X``: an array, or rows streamed from disk
    (any object with a ``blocks()`` method, such as :class:`fedgrain.data.streamed.StreamedRows`).
    """
    if hasattr(X, "blocks"):
        for a, Xb in X.blocks():
            yield a, Xb
            progress.advance(Xb.shape[0])
        return
    block = block or block_rows(X.shape[1])
    for a in range(0, X.shape[0], block):
        yield a, X[a : a + block]
        progress.advance(min(block, X.shape[0] - a))


def is_streamed(X) -> bool:
    """Whether ``X`` stands for rows read from disk on every pass (not an array)."""
    return hasattr(X, "blocks")


def fit_standardizer(X, w: np.ndarray | None = None) -> Standardizer:
    """The global standardisation of ``X`` (measured already when the rows are streamed)."""
    return X.standardizer if is_streamed(X) else Standardizer.fit(X, w)


def take_rows(X, index: np.ndarray) -> np.ndarray:
    """The rows at ``index`` (sorted) of an array or of streamed rows."""
    if is_streamed(X):
        with progress.step("sampling rows", X.shape[0], "rows"):
            return X.take(index)
    return X[index]


def route_rows(tree, X, codes: np.ndarray | None = None) -> np.ndarray:
    """``tree.route`` for an array, or for streamed rows (one pass)."""
    if is_streamed(X):
        with progress.step("routing rows", X.shape[0], "rows"):
            return tree.route_blocks(row_blocks(X), X.shape[0], codes)
    return tree.route(X, codes)


def leaf_ranges(X, leaf: np.ndarray, n_leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """Each leaf's smallest and largest value of every column (``(n_leaves, p)`` each)."""
    p = X.shape[1]
    lo, hi = np.full((n_leaves, p), np.inf), np.full((n_leaves, p), -np.inf)
    for a, Xb in row_blocks(X):
        lb = leaf[a : a + Xb.shape[0]]
        for pos in np.unique(lb):
            rows = Xb[lb == pos]
            np.minimum(lo[pos], rows.min(axis=0), out=lo[pos])
            np.maximum(hi[pos], rows.max(axis=0), out=hi[pos])
    return lo, hi


def build_shards(
    backend: Backend,
    X,
    codes: np.ndarray,
    weights: np.ndarray | None,
    labels: np.ndarray,
    n_subsets: int,
    standardizer: Standardizer,
) -> list[ShardRef]:
    """Copy each subset's rows, standardised, into a shard placed by ``backend``.

    ``labels`` gives each row's subset (see :func:`fedgrain.partition.stratified_split`). One
    pass over the rows in blocks fills every shard through the backend's
    :class:`~fedgrain.backends.base.ShardWriter`, so the only memory beyond the shards is a
    block; rows streamed from disk (``X`` with ``blocks()``) are spilled to shard files, so
    nothing but a block is ever held. On failure nothing stays placed.
    """
    sizes = np.bincount(labels, minlength=n_subsets)
    streamed = is_streamed(X)
    writer = backend.writer(sizes, X.shape[1], weights is not None, spill=streamed)
    try:
        with progress.step("placing subsets", X.shape[0], "rows"):
            for a, Xb in row_blocks(X):
                b = a + Xb.shape[0]
                writer.write(labels[a:b], standardizer.transform(Xb), codes[a:b],
                             None if weights is None else weights[a:b])
            return writer.finish()
    except BaseException:
        writer.abort()
        raise
