"""Pooling the subsets' de-biased estimates (method.md 4, 4b, 6).

Pure functions of the local results: they never see data. ``pool`` is the patent's one-shot
combination, ``refine`` the extra round that takes one global Newton step from the pooled
estimate, and ``monotonise`` orders the final thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.isotonic import isotonic_regression

from .local import Evaluation, LocalFit
from .solvers import solve_psd

#: Eigenvalues of a subset's covariance below this fraction of the largest are treated as
#: directions without information (zero weight), never as infinitely precise ones.
EIG_RTOL = 1e-12


@dataclass(frozen=True)
class Pooled:
    """Inverse-variance combination of the subsets.

    ``q``, ``q_df`` and ``i2`` are the joint heterogeneity statistic, its chi-square degrees of
    freedom and ``max(0, (Q - df) / Q)``; ``q_param`` and ``i2_param`` the same per parameter
    (using each subset's marginal variance), with ``n_contrib`` subsets contributing to each.
    """

    estimate: np.ndarray
    cov: np.ndarray
    info: np.ndarray
    q: float
    q_df: int
    q_pvalue: float
    i2: float
    q_param: np.ndarray
    i2_param: np.ndarray
    n_contrib: np.ndarray


def precision(fit: LocalFit) -> tuple[np.ndarray, int]:
    """A subset's robust inverse variance ``Omega_m`` over all ``d`` parameters, and its rank.

    Rows and columns of unidentified parameters are zero; so are directions whose variance is
    numerically zero.
    """
    idx = np.flatnonzero(fit.identified)
    d = fit.cov.shape[0]
    omega = np.zeros((d, d))
    if idx.size == 0:
        return omega, 0
    V = fit.cov[np.ix_(idx, idx)]
    vals, vecs = np.linalg.eigh(0.5 * (V + V.T))
    top = vals.max(initial=0.0)
    keep = vals > EIG_RTOL * top if top > 0 else np.zeros_like(vals, dtype=bool)
    inv = (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T
    omega[np.ix_(idx, idx)] = inv
    return omega, int(keep.sum())


def pool(fits: Sequence[LocalFit]) -> Pooled:
    """Combine the subsets: ``(sum Omega_m)^-1 sum Omega_m gamma_m``.

    Raises
    ------
    ValueError
        When some parameter is identified in no subset.
    """
    if not fits:
        raise ValueError("nothing to pool: no subset results")
    d = fits[0].estimate.shape[0]
    omegas = []
    ranks = []
    info = np.zeros((d, d))
    rhs = np.zeros(d)
    for f in fits:
        om, rk = precision(f)
        omegas.append(om)
        ranks.append(rk)
        info += om
        rhs += om @ f.estimate
    if np.any(np.diag(info) <= 0):
        missing = np.flatnonzero(np.diag(info) <= 0).tolist()
        raise ValueError(f"parameters {missing} are identified in no subset")
    est = solve_psd(info, rhs)
    cov = solve_psd(info, np.eye(d))
    cov = 0.5 * (cov + cov.T)
    q = 0.0
    for f, om in zip(fits, omegas, strict=True):
        r = f.estimate - est
        q += float(r @ om @ r)
    q_df = int(sum(ranks) - d)
    q_p = float(stats.chi2.sf(q, q_df)) if q_df > 0 else float("nan")
    i2 = max(0.0, (q - q_df) / q) if q > 0 and q_df > 0 else 0.0
    # Per parameter, with the subsets' marginal variances.
    ests = np.array([f.estimate for f in fits])
    var = np.array([np.diag(f.cov) for f in fits])
    ok = np.array([f.identified for f in fits]) & (var > 0)
    wts = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        marg = (wts * ests).sum(0) / wts.sum(0)
        q_param = (wts * (ests - marg) ** 2).sum(0)
        n_contrib = ok.sum(0)
        dfp = n_contrib - 1
        i2_param = np.where((q_param > 0) & (dfp > 0), np.maximum(0.0, (q_param - dfp) / q_param),
                            0.0)
    return Pooled(est, cov, info, q, q_df, q_p, i2, q_param, i2_param, n_contrib)


def refine(
    estimate: np.ndarray, evaluations: Sequence[Evaluation], variance: str
) -> tuple[np.ndarray, np.ndarray]:
    """One global Newton step from the pooled estimate (method.md 4b).

    Each subset has sent its score, Hessian and meat at ``estimate``; the step is
    ``estimate + (sum H_m)^-1 sum s_m`` and the covariance the sandwich
    ``(sum H)^-1 (sum J) (sum H)^-1`` (``variance="model"``: ``(sum H)^-1``).
    """
    H = sum(e.hess for e in evaluations)
    s = sum(e.score for e in evaluations)
    d = estimate.shape[0]
    Hinv = solve_psd(H, np.eye(d))
    new = estimate + Hinv @ s
    if variance == "model":
        cov = Hinv
    else:
        J = sum(e.meat for e in evaluations)
        cov = Hinv @ J @ Hinv
    return new, 0.5 * (cov + cov.T)


def monotonise(theta: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Increasing thresholds by weighted isotonic regression, weights ``1 / Var(theta_k)``.

    Ordered input is returned unchanged.
    """
    if np.all(np.diff(theta) > 0):
        return theta
    w = 1.0 / np.where(var > 0, var, np.inf)
    w = np.where(np.isfinite(w) & (w > 0), w, 1.0)
    return isotonic_regression(theta, sample_weight=w, increasing=True)
