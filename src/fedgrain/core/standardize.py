"""The global standardisation of the features, and the matching map of parameters.

Every subset is standardised with one *global* mean and scale, so every subset's estimate is in
the same coordinates and pooling is a plain weighted average; :class:`Standardizer` maps the
pooled estimate and its covariance back to the original scale at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import block_rows, is_streamed
from .likelihood import monotonise


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
        return cls.of_moments(*column_moments(X, w))

    @classmethod
    def of_moments(cls, mean: np.ndarray, sd: np.ndarray) -> Standardizer:
        """From columns' means and standard deviations (a constant column keeps scale 1)."""
        return cls(mean, np.where(sd > 0, sd, 1.0))

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

    def to_raw_model(self, params: np.ndarray, cov: np.ndarray):
        """:meth:`to_raw` for a fitted model: raw parameters with the thresholds made increasing
        (weighted isotonic regression, :func:`fedgrain.core.likelihood.monotonise`), and their
        covariance."""
        raw, cov = self.to_raw(params, cov)
        p = self.mean.shape[0]
        raw[p:] = monotonise(raw[p:], np.diag(cov)[p:])
        return raw, cov

    def transform(self, Xb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.subtract(Xb, self.mean, out=out)
        out /= self.scale
        return out


def fit_standardizer(X, w: np.ndarray | None = None, moments=None) -> Standardizer:
    """The global standardisation of ``X`` (measured already when the rows are streamed, or
    from ``moments``, the columns' means and standard deviations taken with the checks)."""
    if is_streamed(X):
        return X.standardizer
    return Standardizer.fit(X, w) if moments is None else Standardizer.of_moments(*moments)
