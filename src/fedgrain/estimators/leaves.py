"""The models of an adaptive partition's leaves, assembled from the leaves' local fits.

A leaf's local fit is over the coordinates the leaf identifies (:mod:`fedgrain.inference.local`); a
leaf
model is over all parameters, so that it predicts any row routed to it. :func:`leaf_view` fills
in what the leaf does not identify; :func:`region_estimates` pools the random pieces of a region
into the region's model.
"""

from __future__ import annotations

import numpy as np

from ..inference import local, pooling
from ..partition.tree import PartitionTree
from .base import OrdinalModel, register
from .divide_conquer import pool_or_explain, values_or_raise


@register
class LeafModel(OrdinalModel):
    """The fitted model of one leaf (made by :class:`AdaptiveFederatedOrdinal`, not fitted alone).

    Parameters a leaf does not identify are filled in and listed in ``results_.info`` under
    "Not identified in the leaf": the slope of a feature constant in the leaf comes from the
    global model (the leaf's thresholds absorb its effect and are shifted back, so predictions
    for the leaf's own rows are exactly the leaf's, with the leaf's uncertainty); the threshold
    of a class the leaf never saw sits where the leaf's rows would expect half an observation
    beyond it (what zero counts say), and further such thresholds at the global model's gaps
    from it. The standard errors of these thresholds are the global model's, a stand-in: the
    leaf has no information on them.

    Examples
    --------
    >>> from fedgrain import AdaptiveFederatedOrdinal
    >>> from fedgrain.datasets import make_regions
    >>> X, y, *_ = make_regions(6000, n_regions=2, random_state=0)
    >>> af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
    >>> leaf = af.local_models_[0]
    >>> leaf.leaf == af.partition_.leaves[0], leaf.coef_.shape
    (True, (5,))
    """

    def __init__(self, leaf=0):
        self.leaf = leaf

    def fit(self, X, y, sample_weight=None):
        raise NotImplementedError("Leaf models are made by AdaptiveFederatedOrdinal.fit.")


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
    # leaf's own edge estimate (local._edges), shifted back like its other thresholds, with the
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


def region_estimates(backend, refs, sched, run, tree: PartitionTree, settings,
                      refine_rounds: int, names, sizes) -> dict:
    """The pooled model of every region dealt out into random pieces: ``{region: view}``.

    With one region the pieces' model is the global one; otherwise each region's pieces are
    pooled and refined like the global model, over the region's pieces only.
    """
    region_of = tree.region_of()
    regions = np.unique(region_of)
    groups = {int(r): np.flatnonzero(region_of == r) for r in regions}
    multi = {r: m for r, m in groups.items() if m.shape[0] > 1}
    if not multi:
        return {}
    if regions.shape[0] == 1:
        r = int(regions[0])
        return {r: (run.estimate, run.cov, [])}
    est = {r: pool_or_explain(pooling.pool, names, [run.fits[i] for i in m]) for r, m in
           multi.items()}
    est = {r: (v.estimate, v.cov) for r, v in est.items()}
    members = np.concatenate(list(multi.values()))
    meat = local.meat_kind(settings.variance)
    owner = {int(i): r for r, m in multi.items() for i in m}
    for _ in range(refine_rounds):
        tasks = [{"shard": refs[i], "params": est[owner[int(i)]][0], "meat": meat}
                 for i in members]
        where = {int(i): t for t, i in enumerate(members)}
        bundles = [[where[i] for i in b if i in where] for b in sched.bundles()]
        evals = values_or_raise(backend.map_bundles(local.evaluate_task, tasks,
                                                    [b for b in bundles if b]),
                                sizes[members], "leaf", [tree.leaves[i] for i in members])
        for r, m in multi.items():
            ev = [evals[where[int(i)]] for i in m]
            est[r] = pool_or_explain(pooling.refine, names, est[r][0], ev, settings.variance)
    return {r: (e, c, []) for r, (e, c) in est.items()}
