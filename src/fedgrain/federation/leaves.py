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

from ..inference import local


def leaf_view(fit: local.LocalFit, fallback: np.ndarray, fallback_cov: np.ndarray, p: int):
    """A leaf's estimate over all parameters (standardised coordinates), with its covariance.

    Parameters the leaf does not identify are filled in (see :class:`LeafModel`) from
    ``fallback`` (the global estimate) and the leaf's edge estimates. The result is linear in
    the leaf's estimate and the global one, ``S est_leaf + T est_global + const``, so its
    covariance is ``S V S' + T V_global T'``: a threshold that absorbed a constant feature's
    effect carries the global slope's uncertainty, which cancels again in predictions for the
    leaf's own rows. Returns ``(estimate, cov, filled)`` where ``filled`` lists the filled-in
    parameters.
    """
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
    cov = S @ fit.cov @ S.T + T @ fallback_cov @ T.T
    return full, cov, np.flatnonzero(~known).tolist()


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
        which = leaf if fallback is None else np.where(fallback, len(self.ids), leaf)
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
    that range: the leaf's model would be extrapolated there.
    """
    if any(lp.low is None for lp in profiles):
        return np.zeros(Xe.shape[0], dtype=bool)
    low = np.array([lp.low for lp in profiles])
    high = np.array([lp.high for lp in profiles])
    pad = UNSEEN_MARGIN * (high - low)
    lo, hi = low - pad, high + pad
    out = np.zeros(Xe.shape[0], dtype=bool)
    for a in range(0, Xe.shape[0], UNSEEN_BLOCK):
        rows = slice(a, a + UNSEEN_BLOCK)
        Xb, lb = Xe[rows], leaf[rows]
        out[rows] = ((Xb < lo[lb]) | (Xb > hi[lb])).any(axis=1)
    return out
