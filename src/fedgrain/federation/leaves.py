"""The leaves' models of an adaptive partition, from their local fits (docs/method.md 5).

A leaf's local fit is over the coordinates the leaf identifies
(:mod:`fedgrain.inference.local`); a leaf model is over all parameters, so that it predicts any
row routed to it. :func:`leaf_view` fills in what the leaf does not identify;
:class:`LeafTable` holds every leaf's model on the original scale and predicts each row with its
leaf's (or, for rows no leaf has seen, a fallback model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..exceptions import SeparationError
from ..inference import local
from .engine import Units


class LeafSeparationError(SeparationError):
    """A leaf's rows are (quasi-)separated: its fit has no finite estimate (``indices``:
    the parameters, full-vector positions, along which it runs off)."""

    def __init__(self, indices):
        self.indices = tuple(int(j) for j in indices)
        super().__init__("The classes are (quasi-)separated in the leaf's rows: its fit runs "
                         f"off to infinity along parameters {list(self.indices)}.")


@dataclass(frozen=True)
class LeafUnits(Units):
    """Leaves named by node id in messages, with the features each leaf's cuts use
    (``cut_features[pos]``): a feature constant in a leaf because a cut above it uses that
    feature (a split on a binary column, say) is expected, and not worth a warning."""

    cut_features: tuple = ()


def leaf_units(tree) -> LeafUnits:
    """The naming of a partition's leaves, with the features of the cuts above each."""
    cut = []
    for nid in tree.leaves:
        used: set[int] = set()
        node = tree.nodes[nid]
        while node.parent is not None and node.parent in tree.nodes:
            node = tree.nodes[node.parent]
            if node.kind == "hyperplane" and node.a is not None:
                used.update(int(j) for j in np.flatnonzero(np.asarray(node.a) != 0))
        cut.append(frozenset(used))
    return LeafUnits("leaf", list(tree.leaves), tuple(cut))


def leaf_view(fit: local.LocalFit, fallback: np.ndarray, fallback_cov: np.ndarray, p: int):
    """A leaf's estimate over all parameters (standardised coordinates), with its covariance.

    Parameters the leaf does not identify are filled in (see :class:`LeafModel`) from
    ``fallback`` (the global estimate) and the leaf's edge estimates. The result is linear in
    the leaf's estimate and the global one, ``S est_leaf + T est_global + const``, so its
    covariance is ``S V S' + T V_global T'``: a threshold that absorbed a constant feature's
    effect carries the global slope's uncertainty, which cancels again in predictions for the
    leaf's own rows.

    A middle class the leaf never saw (``fit.gaps``) leaves the two thresholds around it at one
    common estimate (their binary labels are identical in the leaf): they are opened
    symmetrically around it to the leaf's own width for the class (half an observation
    expected among its rows), and each such width gets a standard error equal to itself (its
    log has standard error 1): on the logit scale of the class's probability the 95% interval
    then runs from 0.14 to 7.1 times the estimate, whose upper end (3.5 / n for the average
    row) is close to the exact 97.5% Poisson bound for zero counts in n rows (3.7 / n). Both
    thresholds are listed as filled in: the leaf identifies their mean, not their difference.

    Returns ``(estimate, cov, filled)`` where ``filled`` lists the filled-in parameters. A
    separated fit (``fit.separated``) has no estimate to view: :class:`LeafSeparationError`.
    """
    if fit.separated:
        raise LeafSeparationError(fit.separated)
    A, est_leaf = fit.design, fit.estimate
    d = A.shape[1]
    full = fallback.copy()
    S = np.zeros((d, A.shape[0]))
    T = np.eye(d)
    known = np.zeros(d, dtype=bool)
    rows = sorted(range(A.shape[0]), key=lambda r: int(np.flatnonzero(A[r]).max()) >= p)
    for r in rows:  # feature rows first: threshold rows refer to the slopes
        cols = np.flatnonzero(A[r])
        k = cols.max()  # a feature row has one column; a threshold row's largest is its own
        others = cols[cols != k]
        full[k] = est_leaf[r] - A[r, others] @ full[others]
        S[k] = 0.0
        S[k, r] = 1.0
        T[k] = -A[r, others] @ T[others]
        known[k] = True
    extra = np.zeros((d, d))
    opened = _open_gaps(getattr(fit, "gaps", None), p, full, S, T, extra)
    # thresholds of classes the leaf never saw: the one next to the classes it has at the
    # leaf's own edge estimate (LocalFit.edges), shifted back like its other thresholds, with the
    # global threshold's uncertainty as a stand-in; further ones at the global model's gaps
    placed = known.copy()
    if fit.edges is not None:
        absent = np.setdiff1d(np.arange(p), np.flatnonzero(known[:p]))
        th_rows = np.flatnonzero(A[:, p:].any(axis=1))
        shift = -A[th_rows[0], absent] if absent.size and th_rows.size else np.zeros(0)
        for k in np.flatnonzero(np.isfinite(fit.edges)):
            full[p + k] = fit.edges[k] + shift @ full[absent]
            T[p + k] = shift @ T[absent] if absent.size else 0.0
            T[p + k, p + k] += 1.0
            placed[p + k] = True
    th_placed = np.flatnonzero(placed[p:])
    for k in np.flatnonzero(~placed[p:]):
        if th_placed.size:
            j = th_placed[np.argmin(np.abs(th_placed - k))]
            full[p + k] = full[p + j] + fallback[p + k] - fallback[p + j]
            S[p + k] = S[p + j]
            T[p + k] = T[p + j]
            T[p + k, p + k] += 1.0
            T[p + k, p + j] -= 1.0
    cov = S @ fit.cov @ S.T + T @ fallback_cov @ T.T + extra
    filled = ~known
    filled[opened] = True
    return full, cov, np.flatnonzero(filled).tolist()


def _open_gaps(gaps, p: int, full: np.ndarray, S: np.ndarray, T: np.ndarray,
               extra: np.ndarray) -> list[int]:
    """Open the thresholds around absent middle classes (in place; see :func:`leaf_view`).

    ``gaps[c]`` is the leaf's width for an absent class ``c`` (the distance between thresholds
    ``c - 1`` and ``c``); a run of absent classes opens around the mean of its thresholds.
    Returns the full-vector positions of the opened thresholds.
    """
    if gaps is None:
        return []
    width = np.where(np.isfinite(gaps), gaps, 0.0)
    opened: list[int] = []
    c = 0
    while c < width.shape[0]:
        if not width[c] > 0:
            c += 1
            continue
        run = [c]
        while run[-1] + 1 < width.shape[0] and width[run[-1] + 1] > 0:
            run.append(run[-1] + 1)
        c = run[-1] + 1
        ks = p + np.arange(run[0] - 1, run[-1] + 1)  # the run's thresholds
        if ks[0] < p:
            continue
        w = width[run]
        offsets = np.concatenate([[0.0], np.cumsum(w)]) - 0.5 * w.sum()
        full[ks] = full[ks].mean() + offsets
        S[ks] = S[ks].mean(axis=0)
        T[ks] = T[ks].mean(axis=0)
        # threshold i of the run is the mean plus sum_j C[i, j] w_j: C = -1/2 + (j < i)
        C = (np.arange(len(run))[None, :] < np.arange(len(ks))[:, None]) - 0.5
        extra[np.ix_(ks, ks)] += (C * w**2) @ C.T
        opened.extend(int(k) for k in ks)
    return opened


@dataclass(frozen=True)
class LeafTable:
    """Every leaf's model on the original scale, in the order of the partition's leaves.

    ``ids`` are the leaves' node ids, ``params`` ``(L, d)`` and ``covs`` ``(L, d, d)`` their
    parameters ``(coef, thresholds)`` and covariances, ``notes`` the parameters each leaf does
    not identify (filled in, see :class:`fedgrain.estimators.models.LeafModel`).
    """

    ids: list[int]
    params: np.ndarray
    covs: np.ndarray
    notes: list[list[str]]

    def routed(self, Xe: np.ndarray, leaf: np.ndarray, fallback: np.ndarray | None,
               fallback_params: np.ndarray):
        """Each row's linear predictor and thresholds: its leaf's model, or where
        ``fallback`` is True the model ``fallback_params``."""
        p = Xe.shape[1]
        table = np.vstack([self.params, fallback_params[None, :]])
        which = np.where(leaf < 0, len(self.ids), leaf)  # no leaf (an unknown group)
        if fallback is not None:
            which = np.where(fallback, len(self.ids), which)
        eta = np.einsum("ij,ij->i", Xe, table[which, :p]) if Xe.shape[0] else np.zeros(0)
        return eta, table[which, p:]

    def replace(self, ids: list[int], models: dict) -> LeafTable:
        """The table over leaves ``ids``: ``models[nid] = (params, cov, notes)`` for new or
        changed leaves, the current models for the others."""
        old = {nid: (self.params[i], self.covs[i], self.notes[i])
               for i, nid in enumerate(self.ids)}
        old.update(models)
        return LeafTable(list(ids), np.array([old[n][0] for n in ids]),
                         np.array([old[n][1] for n in ids]), [old[n][2] for n in ids])


#: A row outside its leaf's range of a feature by more than this share of the range is unseen.
UNSEEN_MARGIN = 0.25
UNSEEN_BLOCK = 65_536


def unseen_rows(Xe: np.ndarray, leaf: np.ndarray, profiles: list) -> np.ndarray:
    """Which rows lie outside the region their leaf was trained on.

    ``profiles`` are the leaves' :class:`fedgrain.partition.profile.LeafProfile` in the order
    of ``leaf``'s positions. A row is unseen when some feature lies outside its leaf's range
    (the 0.1% to 99.9% quantiles of the leaf's rows) by more than :data:`UNSEEN_MARGIN` times
    that range, *and* outside the whole range of the rows the leaf's model was fitted on
    (``seen_low`` to ``seen_high``, where known): the leaf's model would be extrapolated there.
    So a model's own training rows are never unseen, whether a feature is constant in their
    leaf (a range of zero) or they sit in a long tail beyond the quantiles.
    """
    if any(lp.low is None for lp in profiles):
        return leaf < 0
    low = np.array([lp.low for lp in profiles])
    high = np.array([lp.high for lp in profiles])
    pad = UNSEEN_MARGIN * (high - low)
    lo, hi = low - pad, high + pad
    seen = [lp.seen_low is not None and lp.seen_high is not None for lp in profiles]
    if any(seen):  # the union with the training rows' whole range
        lo = np.array([np.minimum(a, lp.seen_low) if ok else a
                       for a, lp, ok in zip(lo, profiles, seen, strict=True)])
        hi = np.array([np.maximum(b, lp.seen_high) if ok else b
                       for b, lp, ok in zip(hi, profiles, seen, strict=True)])
    out = np.zeros(Xe.shape[0], dtype=bool)
    for a in range(0, Xe.shape[0], UNSEEN_BLOCK):
        rows = slice(a, a + UNSEEN_BLOCK)
        Xb, lb = Xe[rows], leaf[rows]
        out[rows] = ((Xb < lo[lb]) | (Xb > hi[lb])).any(axis=1) | (lb < 0)
    return out
