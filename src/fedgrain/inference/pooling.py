"""Pooling the subsets' de-biased estimates (docs/method.md, "Pooling and refinement").

Pure functions of the local results: they never see data. ``pool`` is the patent's one-shot
combination and ``refine`` the extra round that takes one global Newton step from the pooled
estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..core.linalg import (
    NotIdentifiedError,
    chi2_sf,
    inverse,
    pseudo_inverse,
    solve_psd,
    unidentified_directions,
)
from ..core.linalg import precision as cov_precision
from .local import Evaluation, LocalFit


@dataclass(frozen=True)
class Pooled:
    """Inverse-variance combination of the subsets.

    ``q``, ``q_df`` and ``i2`` are the joint heterogeneity statistic, its chi-square degrees of
    freedom and ``max(0, (Q - df) / Q)``; ``information`` is the data's summed Fisher
    information ``sum A' H A`` (the subsets' Hessians at their fits).
    """

    estimate: np.ndarray
    cov: np.ndarray
    q: float
    q_df: int
    q_pvalue: float
    i2: float
    information: np.ndarray | None = None


def pool(fits: Sequence[LocalFit], stratified: bool = False) -> Pooled:
    """Combine the subsets: ``gamma = (sum A'Omega A)^-1 sum A'Omega gamma_m`` (docs/method.md,
    "Pooling and refinement").

    ``A`` is each subset's ``design`` (the identity when it identifies every parameter).
    ``stratified``: the subsets are a class-stratified division of the rows, so Q, its p-value
    and I^2 compare them within classes (:func:`heterogeneity`); the estimate and its
    covariance are the same either way.

    Raises
    ------
    NotIdentifiedError
        When the pooled information is singular: some parameter (or combination) is identified
        in no subset.
    """
    if not fits:
        raise ValueError("nothing to pool: no subset results")
    d = fits[0].design.shape[1]
    pieces = []
    info = np.zeros((d, d))
    fisher = np.zeros((d, d))
    rhs = np.zeros(d)
    for f in fits:
        om, rank = cov_precision(f.cov)
        pieces.append((om, rank))
        info += f.design.T @ om @ f.design
        fisher += f.design.T @ f.hess @ f.design
        rhs += f.design.T @ (om @ f.estimate)
    # Identification is judged on the data's information, not on the (possibly regularised,
    # nodewise) inverses behind the weights.
    bad = unidentified_directions(fisher)
    if bad.size:
        raise NotIdentifiedError(bad)
    cov = inverse(info)
    est = cov @ rhs
    q = 0.0
    for f, (om, _) in zip(fits, pieces, strict=True):
        r = f.estimate - f.design @ est
        q += float(r @ om @ r)
    q_df = int(sum(rank for _, rank in pieces) - d)
    out = Pooled(est, cov, q, q_df, *_q_summary(q, q_df), fisher)
    return heterogeneity(out, fits) if stratified else out


def _q_summary(q: float, q_df: int) -> tuple[float, float]:
    """The p-value (NaN: nothing to test) and I^2 of ``Q`` on ``q_df`` degrees of freedom."""
    q_p = chi2_sf(q, q_df) if q_df > 0 else float("nan")
    i2 = max(0.0, (q - q_df) / q) if q > 0 and q_df > 0 else 0.0
    return q_p, i2


#: Q compares subsets within classes only when, in the median subset, every direction keeps
#: at least this many rows' worth of within-class variance (``WithinClass.ratio`` times the
#: rows). Below it the features barely predict the class: the thresholds are pinned by the
#: class counts and vary across subsets by second-order terms the normal approximation leaves
#: out (measured, 8 subsets of 500 rows: one feature with slope 0 or 0.3 gave Q p-values below
#: 0.05 in 97% and 36% of data sets, against 0.01 and 0.3-3 for this statistic in the
#: calibrated cases), and Q keeps the plain covariances, which are conservative there.
WITHIN_MIN_ROWS = 0.1


def _views_usable(fits: Sequence[LocalFit]) -> bool:
    """Whether every subset has a within-class view and they describe the spread: the median
    subset keeps at least ``WITHIN_MIN_ROWS`` rows' worth of within-class variance in every
    direction (else the features barely predict the class and the plain Q is kept)."""
    return not any(f.within is None for f in fits) and np.median(
        [f.within.ratio * f.within.class_weights.sum() for f in fits]) >= WITHIN_MIN_ROWS


def within_class(fits: Sequence[LocalFit]) -> list[LocalFit]:
    """The subsets of a class-stratified division as heterogeneity tests compare them: each
    fit's ``estimate`` and ``cov`` replaced by its :class:`~fedgrain.inference.local.WithinClass`
    view, moved to the classes' common shares over all the subsets
    (``estimate + sum_h (pi_h n_m - n_mh) class_shift_h``). ``fits`` as they are when one has
    no such view.
    """
    if not _views_usable(fits):
        return list(fits)
    n_mh = np.array([f.within.class_weights for f in fits])
    share = n_mh.sum(0) / n_mh.sum()
    out = []
    for f, n in zip(fits, n_mh, strict=True):
        gap = np.where(n > 0, share * n.sum() - n, 0.0)  # a class the subset lacks: no shift
        out.append(replace(f, estimate=f.within.estimate + gap @ f.within.class_shift,
                           cov=f.within.cov))
    return out


def heterogeneity(pooled: Pooled, fits: Sequence[LocalFit]) -> Pooled:
    """``pooled`` with Q, its degrees of freedom, p-value and I^2 for a class-stratified
    division (docs/method.md, "Pooling and refinement").

    A stratified division gives every subset the same class shares, so the subsets' score sums
    differ only by the rows' variation *within* each class: each subset's estimate varies
    across such subsets with the covariance of its :func:`within_class` view
    (``Theta J_w Theta'``), less than ``cov``, most for the thresholds. Q is the generalised
    least-squares residual of those views, ``sum_m r_m' W_m r_m`` around
    ``(sum A'W A)^+ sum A'W gamma_m``, on ``sum rank(W_m) - rank(sum A'W A)`` degrees of
    freedom. ``pooled`` is returned as it is when a subset has no such view.
    """
    if len(fits) < 2 or not _views_usable(fits):
        return pooled
    fits = within_class(fits)
    d = fits[0].design.shape[1]
    info, rhs, pieces = np.zeros((d, d)), np.zeros(d), []
    for f in fits:
        om, rank = cov_precision(f.cov)
        pieces.append((om, rank))
        info += f.design.T @ om @ f.design
        rhs += f.design.T @ (om @ f.estimate)
    vals, vecs, _ = pseudo_inverse(info)
    centre = (vecs / vals) @ (vecs.T @ rhs)
    q = 0.0
    for f, (om, _) in zip(fits, pieces, strict=True):
        r = f.estimate - f.design @ centre
        q += float(r @ om @ r)
    q_df = int(sum(rank for _, rank in pieces) - vals.shape[0])
    return replace(pooled, q=q, q_df=q_df, **dict(zip(("q_pvalue", "i2"),
                                                      _q_summary(q, q_df), strict=True)))


def full_view(fit: LocalFit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A subset's estimate, lasso fit and covariance over the full parameters, where it has them.

    Returns ``(estimate, lasso, cov, resolved)``: a full parameter is resolved when one of the
    subset's coordinates is that parameter alone (a unit row of ``design``); unresolved entries
    are zero.
    """
    A = fit.design
    d = A.shape[1]
    unit = (np.count_nonzero(A, axis=1) == 1) & np.isclose(A.max(axis=1), 1.0)
    rows = np.flatnonzero(unit)
    cols = np.argmax(A[rows], axis=1)
    est, las, cov = np.zeros(d), np.zeros(d), np.zeros((d, d))
    est[cols], las[cols] = fit.estimate[rows], fit.lasso[rows]
    cov[np.ix_(cols, cols)] = fit.cov[np.ix_(rows, rows)]
    resolved = np.zeros(d, dtype=bool)
    resolved[cols] = True
    return est, las, cov, resolved


def marginal_heterogeneity(estimates: np.ndarray, variances: np.ndarray,
                           resolved: np.ndarray) -> dict[str, np.ndarray]:
    """Per-parameter Q and I^2 from the subsets' marginal estimates and variances.

    Arrays are ``(M, d)``; only resolved entries with positive variance count. Returns
    ``q_param``, ``i2_param`` and ``n_contrib`` (subsets that carried the parameter).
    """
    ok = resolved & (variances > 0)
    wts = np.where(ok, 1.0 / np.where(ok, variances, 1.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (wts * estimates).sum(0) / wts.sum(0)
        q = (wts * (estimates - mean) ** 2).sum(0)
    n_contrib = ok.sum(0)
    df = n_contrib - 1
    i2 = np.zeros_like(q)
    pos = (q > 0) & (df > 0)
    i2[pos] = np.maximum(0.0, (q[pos] - df[pos]) / q[pos])
    return {"q_param": np.nan_to_num(q), "i2_param": i2, "n_contrib": n_contrib}


def refine(
    estimate: np.ndarray, evaluations: Sequence[Evaluation], variance: str
) -> tuple[np.ndarray, np.ndarray]:
    """One global Newton step from the pooled estimate (docs/method.md, "Pooling and
    refinement").

    Each subset has sent its score, Hessian and meat at ``estimate``; the step is
    ``estimate + (sum H_m)^-1 sum s_m`` and the covariance the sandwich
    ``(sum H)^-1 (sum J) (sum H)^-1`` (``variance="model"``: ``(sum H)^-1``).
    """
    H = sum(e.hess for e in evaluations)
    s = sum(e.score for e in evaluations)
    Hinv = inverse(H)
    new = estimate + Hinv @ s
    if variance == "model":
        cov = Hinv
    else:
        J = sum(e.meat for e in evaluations)
        cov = Hinv @ J @ Hinv
    return new, 0.5 * (cov + cov.T)




def information_mean(estimates: Sequence[np.ndarray], covs: Sequence[np.ndarray],
                     informations: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Estimates pooled by their data's information ``H_m`` (a Hessian, not an inverse
    variance): ``(sum H)^-1 sum H_m est_m`` with the sandwich covariance
    ``(sum H)^-1 (sum H_m V_m H_m) (sum H)^-1``.

    The pooling of penalised (personalised) fits, whose covariance is not the inverse of their
    information; a tiny ridge keeps directions no fit informs finite.
    """
    d = estimates[0].shape[0]
    W = solve_psd(sum(informations) + 1e-8 * np.eye(d), np.eye(d))
    est = W @ sum(H @ e for H, e in zip(informations, estimates, strict=True))
    V = W @ sum(H @ C @ H for H, C in zip(informations, covs, strict=True)) @ W
    return est, 0.5 * (V + V.T)
