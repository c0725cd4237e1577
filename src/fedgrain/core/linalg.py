"""Linear algebra of the statistics, with one tolerance for "numerically zero".

Symmetric positive (semi-)definite solves and inverses of information matrices, the Wald
statistic of a difference through its covariance's pseudo-inverse, and the chi-square tail.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, special

#: Eigenvalues below this fraction of the largest are directions without information: zero
#: weight in a precision, dropped (with their degree of freedom) from a Wald statistic, and the
#: test of :func:`unidentified_directions`. The one tolerance of every statistic (pooling's
#: precisions and Q, the split test, the heterogeneity Q, the results' Wald tests); 1e-12 and
#: 1e-10 were both in use. 1e-10, because the split test's covariance is assembled from
#: differences (``J_R = J_P - J_L``, ``I - H_L H_P^-1``), whose rounding leaves a zero direction
#: at up to about ``cond(H_P)`` times machine epsilon: 1e-12 is too close to that. Over the
#: whole test suite the eigenvalues these statistics met were either rounding (at most 1e-15 of
#: the largest, or negative) or information (at least 1e-7 of the largest), so any value in
#: between gives the same numbers there; 1e-10 keeps at least three decades from either.
EIG_RTOL = 1e-10


def solve_psd(H: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``H x = b`` for symmetric positive (semi-)definite ``H``.

    Cholesky first; if ``H`` is numerically singular, the minimum-norm least-squares solution.
    """
    try:
        cf = linalg.cho_factor(H, check_finite=False)
        x = linalg.cho_solve(cf, b, check_finite=False)
        if np.all(np.isfinite(x)):
            return x
    except linalg.LinAlgError:
        pass
    return linalg.lstsq(H, b, check_finite=False, cond=1e-12)[0]


class NotIdentifiedError(ValueError):
    """The pooled information is singular; ``indices`` are the parameters involved."""

    def __init__(self, indices: np.ndarray):
        self.indices = np.asarray(indices)
        super().__init__(f"parameters {self.indices.tolist()} are not identified by the data")


def inverse(info: np.ndarray) -> np.ndarray:
    """Symmetric inverse of an information matrix, or :class:`NotIdentifiedError`."""
    bad = unidentified_directions(info)
    if bad.size:
        raise NotIdentifiedError(bad)
    inv = np.linalg.inv(info)
    return 0.5 * (inv + inv.T)


def unidentified_directions(info: np.ndarray, rtol: float = EIG_RTOL) -> np.ndarray:
    """Indices of parameters involved in (numerically) zero-information directions of ``info``.

    Scaled to unit diagonal first, so the test does not depend on the parameters' units.
    """
    dg = np.diag(info)
    if np.any(dg <= 0):
        return np.flatnonzero(dg <= 0)
    R = info / np.sqrt(np.outer(dg, dg))
    vals, vecs = np.linalg.eigh(R)
    null = vecs[:, vals < rtol * vals.max()]
    return np.flatnonzero(np.abs(null).max(axis=1, initial=0.0) > 0.1)


def pseudo_inverse(V: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eigen-decomposition of symmetric ``V`` restricted to its informative directions.

    Returns ``(vals, vecs, keep)`` with ``vals`` and ``vecs`` the kept eigenpairs: eigenvalues
    above :data:`EIG_RTOL` times the largest. ``vecs / vals @ vecs.T`` is the pseudo-inverse.
    """
    vals, vecs = np.linalg.eigh(0.5 * (V + V.T))
    top = vals.max(initial=0.0)
    keep = vals > EIG_RTOL * top if top > 0 else np.zeros_like(vals, dtype=bool)
    return vals[keep], vecs[:, keep], keep


def precision(V: np.ndarray) -> tuple[np.ndarray, int]:
    """The inverse of a covariance over its informative directions, and its rank.

    Directions whose variance is numerically zero get zero weight, never infinite weight.
    """
    if V.size == 0:
        return V.copy(), 0
    vals, vecs, _ = pseudo_inverse(V)
    return (vecs / vals) @ vecs.T, int(vals.shape[0])


def wald(diff: np.ndarray, V: np.ndarray) -> tuple[float, int]:
    """Wald statistic ``diff' V^+ diff`` and its degrees of freedom (the rank of ``V``)."""
    if diff.size == 0:
        return 0.0, 0
    vals, vecs, _ = pseudo_inverse(V)
    z = vecs.T @ diff
    return float(np.sum(z * z / vals)), int(vals.shape[0])


def chi2_sf(q: float, df: int) -> float:
    """Upper tail of the chi-square distribution with ``df`` degrees of freedom (1 when
    ``df`` is 0: nothing was tested)."""
    return float(special.chdtrc(df, q)) if df > 0 else 1.0
