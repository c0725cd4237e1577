"""Tests of "one model on both sides" for candidate splits, on a sample of a node's rows.

- **quick fits**: a few unpenalised Newton steps of the composite likelihood on at most
  :data:`QUICK_ROWS` rows, with the cluster-sandwich covariance; they also give the profiler's
  screening importance of the features;
- :func:`refine`: Newton steps from a quick fit on all the rows a split is tested on (up to
  :data:`TEST_ROWS`; each step one pass, about one Gram matrix), so the test's power grows with
  the data instead of stopping at :data:`QUICK_ROWS`;
- :func:`split_test`: a robust score test at the parent's fit that two candidate children
  share its model (masked sums of the rows' terms, :class:`NodeTerms`, so many candidates cost
  one pass);
- :func:`heterogeneity`: the Wald ``Q`` between two fitted regions (docs/method.md, "Adaptive
  partitions").

Both statistics are :func:`fedgrain.core.linalg.wald` (pseudo-inverse over the informative
directions, rank as degrees of freedom); their p-values are :func:`fedgrain.core.linalg.chi2_sf`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from scipy import special

from ..core.likelihood import initial_thresholds
from ..core.linalg import solve_psd, wald
from ..core.solvers import newton, runaway
from .local import Problem, identified_problem

#: Rows a quick fit uses at most.
QUICK_ROWS = 2_500
#: Rows a split test needs beyond a threshold (below it and above it) on each side of the cut
#: to compare that threshold.
MIN_ROWS_BESIDE = 10
#: Times a quick fit drops the features the classes are separated along and tries again
#: (only nearly constant ones: one value in all but RARE_SHARE of the rows).
MAX_DROPS = 2
RARE_SHARE = 0.1
#: Rows a split test uses at most: all the rows the tree is grown on
#: (:data:`fedgrain.partition.growth.SAMPLE_ROWS`). A test costs two passes over a node's rows
#: (:func:`refine`, :func:`node_terms`) and one masked Gram matrix per candidate.
TEST_ROWS = 50_000

@dataclass(frozen=True)
class QuickFit:
    """An unpenalised composite fit on a sample, over the full parameters ``(beta, theta)``.

    ``identified`` marks the parameters the rows identify (features that vary, thresholds with
    rows on both sides); the others are NaN in ``estimate`` and zero in ``cov``.
    ``shifted`` is True when a feature is left out (constant in these rows, or separated), so
    the thresholds estimate ``theta_k - c' beta`` rather than ``theta_k``. ``separated`` are the
    features left out because the classes are separated along them in these rows.
    """

    estimate: np.ndarray
    cov: np.ndarray
    identified: np.ndarray
    shifted: bool
    n_rows: int
    separated: frozenset = frozenset()


def quick_fit(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, n_classes: int,
              start: np.ndarray | None = None) -> QuickFit | None:
    """Fit the composite model on (at most :data:`QUICK_ROWS` of) these standardised rows.

    Returns None when the rows cannot support a fit: too few of them for the identified
    parameters, or the classes separated (the fit runs off to infinity). Separation along a
    nearly constant feature (one value in all but :data:`RARE_SHARE` of the rows, whose few
    other rows fall in one class by chance) leaves that feature out of the fit instead, as a
    constant one would be (up to :data:`MAX_DROPS` times).
    """
    n = y.shape[0]
    if n > QUICK_ROWS:
        rows = np.linspace(0, n - 1, QUICK_ROWS).round().astype(np.intp)
        X, y, w = X[rows], y[rows], None if w is None else w[rows]
    prob, means, _, _ = identified_problem(np.ascontiguousarray(X), y, w, n_classes)
    p = X.shape[1]
    n_eff = float(y.shape[0] if w is None else w.sum())
    dropped: list[int] = []
    for _ in range(MAX_DROPS + 1):
        if prob.size == 0 or y.shape[0] < 2 * prob.size:
            return None
        x0 = np.concatenate([np.zeros(prob.features.size),
                             initial_thresholds(y, w, n_classes)[prob.thresholds]])
        if start is not None:
            guess = start[prob.full_index()]
            x0 = np.where(np.isfinite(guess), guess, x0)
            # thresholds from another region may be out of order for these rows: keep the
            # start's slopes only when its thresholds are unusable
            if np.any(np.diff(x0[prob.features.size:]) <= 0):
                x0[prob.features.size:] = initial_thresholds(y, w, n_classes)[prob.thresholds]
        oracle = prob.oracle()
        res = newton(oracle, x0, n_eff, max_iter=25, tol=1e-4)
        if res.diverged:
            return None
        nf = prob.features.size
        # how far a step moves the linear predictor across each feature's range: a sparse
        # feature's standard deviation hides its few separated rows
        off = runaway(res.step[:nf] * (X.max(axis=0) - X.min(axis=0))[prob.features], 1e-2)
        if off.any() and not all(_nearly_constant(X[:, j]) for j in prob.features[off]):
            return None  # separated along a feature that varies: no model here
        if not off.any():
            # thresholds at the rows' means: a slope creeping along a nearly constant feature
            # drags the raw thresholds by its mean times its step, which is no separation
            centred = res.step[nf:] - means[prob.features] @ res.step[:nf]
            if not res.converged or runaway(centred, 1e-2).any():
                return None
            break
        # A few rows of a nearly constant feature separate the classes along it (a feature
        # that is 0 in nearly all of a node's rows): the node's model leaves that feature out,
        # as it would a constant one, rather than the node going unfitted, so a node's fate
        # does not hinge on where a cut fell among the feature's rare values.
        dropped += prob.features[off].tolist()
        prob = Problem(prob.X, prob.y, prob.w, p, n_classes - 1, prob.features[~off],
                       prob.thresholds, prob.link, prob.device)
    else:
        return None
    Hinv = solve_psd(res.hess, np.eye(prob.size))
    meat = oracle(res.x, loss=False, order=0, meat="cluster").meat
    V = Hinv @ meat @ Hinv
    full = prob.full_index()
    d = p + n_classes - 1
    est = np.full(d, np.nan)
    est[full] = res.x
    cov = np.zeros((d, d))
    cov[np.ix_(full, full)] = 0.5 * (V + V.T)
    ident = np.zeros(d, dtype=bool)
    ident[full] = True
    return QuickFit(est, cov, ident, prob.features.size < p, int(y.shape[0]),
                    frozenset(int(j) for j in dropped))


def _nearly_constant(x: np.ndarray) -> bool:
    """Whether one value holds all but :data:`RARE_SHARE` of ``x``."""
    _, counts = np.unique(x, return_counts=True)
    return counts.max() >= (1.0 - RARE_SHARE) * x.shape[0]


def refine(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, fit: QuickFit,
           steps: int = 1) -> tuple[QuickFit, NodeTerms]:
    """Newton steps from ``fit`` (a quick fit on a sample) on all these rows, and the rows'
    terms at the result (:func:`node_terms`).

    A split test at a fit from :data:`QUICK_ROWS` rows is valid on more rows (its score is
    corrected for the fit's estimation to first order), but the second-order error grows with
    the rows: one Newton step from the quick fit makes it negligible. Each step is one pass
    over the rows (:meth:`NodeTerms.total`). Over the parameters ``fit`` identifies; the
    covariance is the cluster sandwich on these rows. A step that does not stay finite is not
    taken.
    """
    terms = node_terms(X, y, w, fit)
    idx = np.flatnonzero(fit.identified)
    p = X.shape[1]
    for _ in range(steps):
        s, H, _ = terms.total
        est = fit.estimate.copy()
        est[idx] = est[idx] + solve_psd(H, s)
        # thresholds must stay ordered for the binary probabilities to mean anything
        if not np.all(np.isfinite(est[idx])) or np.any(np.diff(est[p:][fit.identified[p:]])
                                                        <= 0):
            break
        fit = replace(fit, estimate=est, n_rows=int(y.shape[0]))
        terms = node_terms(X, y, w, fit)
    _, H, J = terms.total
    Hinv = solve_psd(H, np.eye(H.shape[0]))
    V = Hinv @ J @ Hinv
    cov = np.zeros_like(fit.cov)
    cov[np.ix_(idx, idx)] = 0.5 * (V + V.T)
    return replace(fit, cov=cov, n_rows=int(y.shape[0])), terms


def heterogeneity(a: QuickFit, b: QuickFit, n_features: int) -> tuple[float, int]:
    """Wald statistic ``Q`` for "the two regions share one model", and its degrees of freedom.

    Compared are the parameters both fits identify; thresholds only when neither region has a
    constant feature (otherwise each region's thresholds absorb that feature's effect
    differently and are not comparable).
    """
    common = a.identified & b.identified
    if a.shifted or b.shifted:
        common[n_features:] = False
    idx = np.flatnonzero(common)
    if idx.size == 0:
        return 0.0, 0
    diff = a.estimate[idx] - b.estimate[idx]
    return wald(diff, a.cov[np.ix_(idx, idx)] + b.cov[np.ix_(idx, idx)])


def split_test(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, fit: QuickFit,
               left: np.ndarray, terms: NodeTerms | None = None) -> tuple[float, int]:
    """Robust score test that the rows ``left`` and the others share the model ``fit``.

    ``fit`` is the composite fit of all these rows (the parent). With scores ``s``, Hessians
    ``H`` and cluster meats ``J`` of the left part ``L``, the right part ``R`` and all rows
    ``P``, the left score corrected for the estimation of ``fit`` is
    ``s~ = s_L - H_L H_P^-1 s_P = H_R H_P^-1 s_L - H_L H_P^-1 s_R`` with variance
    ``(I - A) J_L (I - A)' + A J_R A'``, ``A = H_L H_P^-1``; the statistic ``s~' V^+ s~`` is
    chi-square with ``rank V`` degrees of freedom when one model holds on both sides (the
    Lagrange multiplier form of the ``Q`` of docs/method.md, "Adaptive partitions": masked sums
    of the rows' terms at the parent's fit, where a Wald ``Q`` would need two fits). A feature
    constant on one side makes ``V`` singular in its direction and the test drops that direction
    (:data:`fedgrain.core.linalg.EIG_RTOL`), so splitting on a binary feature does not mistake
    the feature's own effect for heterogeneity. A threshold with fewer than
    :data:`MIN_ROWS_BESIDE` rows beyond it on one side of the cut (a class absent there, as in
    a tail of a feature that drives the outcome) is left out of the comparison
    (:func:`_testable`).

    ``terms`` are the rows' terms at ``fit`` (:func:`node_terms`), when already computed.
    """
    terms = node_terms(X, y, w, fit) if terms is None else terms
    sP, HP, JP = terms.total
    left = np.asarray(left, dtype=bool)
    if 2 * int(left.sum()) <= left.shape[0]:  # sum over the smaller side, the other by difference
        sL, HL, JL = terms.sums(left)
        JR = JP - JL
    else:
        sR, HR, JR = terms.sums(~left)
        sL, HL, JL = sP - sR, HP - HR, JP - JR
    A = solve_psd(HP, HL.T).T  # H_L H_P^-1 (both symmetric)
    s = sL - A @ sP
    B = np.eye(A.shape[0]) - A
    V = B @ JL @ B.T + A @ JR @ A.T
    keep = _testable(y, w, left, fit, X.shape[1], s.shape[0])
    if not keep.all():
        s, V = s[keep], V[np.ix_(keep, keep)]
    return wald(s, V)


def _testable(y, w, left, fit: QuickFit, p: int, d: int) -> np.ndarray:
    """The score's coordinates a split test compares: every feature, and the thresholds with
    at least :data:`MIN_ROWS_BESIDE` rows (of positive weight) on both of their sides on both
    sides of the cut. Beyond a class (nearly) absent on one side, that side's score for the
    threshold is a sum of tiny terms of one sign and its empirical variance tinier still: the
    statistic would be large under one model."""
    ths = np.flatnonzero(fit.identified[p:])
    keep = np.ones(d, dtype=bool)
    if ths.size == 0:
        return keep
    K = ths.max() + 2
    counted = np.ones(y.shape[0], dtype=bool) if w is None else w > 0
    for side in (left, ~left):
        counts = np.bincount(y[side & counted], minlength=K)
        below = np.cumsum(counts)[ths]
        above = counts.sum() - below
        keep[d - ths.size:] &= np.minimum(below, above) >= MIN_ROWS_BESIDE
    return keep


@dataclass(frozen=True)
class NodeTerms:
    """Each row's terms of the composite likelihood at a fit, over the parameters it
    identifies: its score ``S`` (summed over the row's expanded rows, as the cluster meat
    wants), the features ``Xf`` and the binary variances ``V``. Sums over any subset of the
    rows are then a few products (:meth:`sums`), not a pass of the likelihood."""

    S: np.ndarray
    Xf: np.ndarray
    V: np.ndarray
    w: np.ndarray

    @cached_property
    def total(self):
        """:meth:`sums` over all the rows (computed once)."""
        return self.sums()

    @cached_property
    def _vsum(self) -> np.ndarray:
        return self.V.sum(axis=1)

    def sums(self, mask: np.ndarray | None = None):
        """Score, Hessian and cluster meat of the rows in ``mask`` (a boolean mask; all rows
        by default). Only the masked rows are touched."""
        if mask is None:
            S, Xf, V, m, vs = self.S, self.Xf, self.V, self.w, self._vsum
        else:
            idx = np.flatnonzero(mask)
            S, Xf, V, m, vs = self.S[idx], self.Xf[idx], self.V[idx], self.w[idx], \
                self._vsum[idx]
        nf = Xf.shape[1]
        Sm = S * m[:, None]
        d = S.shape[1]
        H = np.empty((d, d))
        Xm = Sm[:, :0] if nf == 0 else Xf * m[:, None]
        H[:nf, :nf] = (Xm * vs[:, None]).T @ Xf
        H[:nf, nf:] = -(Xm.T @ V)
        H[nf:, :nf] = H[:nf, nf:].T
        H[nf:, nf:] = np.diag(m @ V)
        return Sm.sum(axis=0), H, Sm.T @ S


def node_terms(X, y, w, fit: QuickFit) -> NodeTerms:
    """The rows' terms at ``fit`` (see :class:`NodeTerms`); sums equal ``composite_pass``'s."""
    p = X.shape[1]
    ident = fit.identified
    feats = np.flatnonzero(ident[:p])
    ths = np.flatnonzero(ident[p:])
    beta = np.where(ident[:p], np.nan_to_num(fit.estimate[:p]), 0.0)
    theta = np.nan_to_num(fit.estimate[p:])[ths]
    mu = special.expit((X @ beta)[:, None] - theta[None, :])  # P(Y > k)
    E = (y[:, None] > ths[None, :]) - mu
    Xf = X[:, feats]
    S = np.concatenate([Xf * E.sum(axis=1)[:, None], -E], axis=1)
    return NodeTerms(S, Xf, mu * (1.0 - mu), np.ones(y.shape[0]) if w is None else w)
