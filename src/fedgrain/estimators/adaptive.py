"""Adaptive federated ordinal regression: profile, partition, schedule, fit leaves, pool.

The first form (``meta="none"``): every leaf of the partition tree keeps its own de-biased local
fit, and the leaves' fits are pooled into a global model with inference exactly as the
divide-and-conquer estimator pools its subsets (method.md 4-5; with adaptive, non-random leaves
the pooled estimate stays valid when one model holds everywhere, and ``Q`` measures how much the
leaves differ when it does not).
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.utils import check_random_state

from .. import combine, local
from .._warnings import warn
from ..backends import Backend, get_backend
from ..data import prepare_fit
from ..exceptions import DataError
from ..ordinal import class_proba, cumulative_proba
from ..partition import PartitionTree
from ..partition_growth import grow, leaf_seeds, profile_leaves
from ..profile import DataProfile
from ..results import OrdinalResults, parameter_names
from ..schedule import Schedule, schedule
from ..shards import Standardizer, build_shards
from .base import OrdinalModel, is_int, is_real, param_error, register
from .divide_conquer import DivideConquerOrdinal, _identified, _values, fit_partition

#: Default minimum leaf size, in rows per parameter: ``min_subset_size = 20 d`` (capped at the
#: number of rows). A leaf's own model is used for prediction, so it needs more rows than the
#: pooling alone would (``5 d``, method.md 6).
MIN_LEAF_ROWS_PER_PARAM = 20
META = ("none",)


@register
class LeafModel(OrdinalModel):
    """The fitted model of one leaf (made by :class:`AdaptiveFederatedOrdinal`, not fitted alone).

    Parameters a leaf does not identify are filled in, with the global model's uncertainty, and
    listed in ``results_.info``: the slope of a feature constant in the leaf comes from the
    global model (the leaf's thresholds absorb its effect); the threshold of a class the leaf
    never saw sits where the leaf's rows would expect half an observation beyond it (what zero
    counts say), and further such thresholds at the global model's gaps from it.
    """

    def __init__(self, leaf=0):
        self.leaf = leaf

    def fit(self, X, y, sample_weight=None):
        raise NotImplementedError("Leaf models are made by AdaptiveFederatedOrdinal.fit.")


@register
class AdaptiveFederatedOrdinal(OrdinalModel):
    """Ordinal regression on an adaptive partition of the data, pooled with valid inference.

    ``fit`` profiles the data (density, feature importance, clusters), grows a partition tree
    whose splits go where the data are dense, the important features vary and the model
    changes, assigns the leaves to workers, fits the patent's de-biased L1 estimator on every
    leaf in parallel, and pools the leaves into a global model with inference. ``predict``
    routes each row to its leaf's model.

    Parameters
    ----------
    granularity : float in [0, 1]
        How far splitting goes. 0 is the patent's static division (random stratified subsets,
        one per worker, and one global model); 1 splits down to ``min_subset_size`` wherever
        the children's models differ at the 5% level. In between, a split must be significant
        at ``0.05 * 10^(-6 (1 - g))`` and there are at most ``(n / min_subset_size)^g`` regions
        (see :mod:`fedgrain.partition_growth`); more granularity never gives fewer leaves.
    min_subset_size : int or None
        No leaf has fewer rows. Default ``20 d`` (d = features plus thresholds), at most the
        number of rows.
    meta : {"none"}
        ``"none"``: each leaf keeps its own local fit.
    backend, n_jobs, random_state, alpha, variance, refine_rounds, debias, ridge,
    penalize_thresholds, levels, categorical, cv_folds, max_iter, tol :
        As for :class:`fedgrain.DivideConquerOrdinal`; they set every leaf's fit and the
        pooling.

    Attributes
    ----------
    coef_, thresholds_, cov_, bse_, results_ : the global model's (pooled over the leaves)
    global_model_ : DivideConquerOrdinal
        The pooled model with inference; ``global_model_.q_`` is the leaves' heterogeneity.
    local_models_ : list of LeafModel
        One per leaf, in the order of ``partition_.leaves``. Random pieces of one region share
        the region's pooled model.
    partition_ : fedgrain.partition.PartitionTree
        ``leaves``, ``sizes``, ``route(X)`` (leaf positions of encoded rows), ``describe()``.
    profile_ : fedgrain.profile.DataProfile
        Per leaf: rows, class counts, density, feature importance (of the leaf's local model),
        2-means centres.
    n_leaves_ : int
    schedule_ : fedgrain.schedule.Schedule
        Leaves to workers, with ``imbalance`` and ``bytes_to_move``.
    timings_ : dict
        Wall time of each phase of the fit, in seconds ("prepare", "profile and partition",
        "schedule", "place leaves", "fit leaves and pool", "results").

    Examples
    --------
    >>> from fedgrain import AdaptiveFederatedOrdinal
    >>> from fedgrain.datasets import make_regions
    >>> X, y, region, *_ = make_regions(6000, n_regions=2, random_state=0)
    >>> af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial").fit(X, y)
    >>> af.n_leaves_
    2
    """

    def __init__(self, granularity=0.5, min_subset_size=None, meta="none", backend="processes",
                 n_jobs=None, random_state=0, *, alpha="rate", variance="cluster",
                 refine_rounds=1, debias="auto", ridge=0.0, penalize_thresholds=False,
                 levels=None, categorical=None, cv_folds=5, max_iter=100, tol=1e-8):
        self.granularity = granularity
        self.min_subset_size = min_subset_size
        self.meta = meta
        self.backend = backend
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.alpha = alpha
        self.variance = variance
        self.refine_rounds = refine_rounds
        self.debias = debias
        self.ridge = ridge
        self.penalize_thresholds = penalize_thresholds
        self.levels = levels
        self.categorical = categorical
        self.cv_folds = cv_folds
        self.max_iter = max_iter
        self.tol = tol

    def _global_estimator(self) -> DivideConquerOrdinal:
        keys = ("alpha", "variance", "backend", "n_jobs", "random_state", "refine_rounds",
                "debias", "ridge", "penalize_thresholds", "levels", "categorical", "cv_folds",
                "max_iter", "tol")
        return DivideConquerOrdinal(**{k: getattr(self, k) for k in keys})

    def _validate(self) -> DivideConquerOrdinal:
        owner = type(self).__name__
        g = self.granularity
        if not (is_real(g) and 0.0 <= g <= 1.0):
            raise param_error(owner, "granularity", "a float in [0, 1]", g)
        m = self.min_subset_size
        if m is not None and (not is_int(m) or m < 1):
            raise param_error(owner, "min_subset_size", "an int >= 1 or None", m)
        if self.meta not in META:
            raise param_error(owner, "meta", f"one of {META}", self.meta)
        gm = self._global_estimator()
        try:
            gm._validate()
        except ValueError as exc:
            raise ValueError(str(exc).replace(type(gm).__name__, owner)) from None
        return gm

    def _min_size(self, n: int, d: int) -> int:
        from .divide_conquer import MIN_ROWS_PER_PARAM

        if self.min_subset_size is None:
            return min(MIN_LEAF_ROWS_PER_PARAM * d, n)
        m = int(self.min_subset_size)
        if m > n:
            raise DataError(
                f"min_subset_size={m:,} is larger than the data ({n:,} rows); use at most {n:,} "
                "or leave it at None.")
        if m < MIN_ROWS_PER_PARAM * d:
            raise DataError(
                f"min_subset_size={m:,} leaves fewer than {MIN_ROWS_PER_PARAM} rows per "
                f"parameter (d = {d}) in a leaf, too few to estimate its covariance; use "
                f"min_subset_size >= {MIN_ROWS_PER_PARAM * d}.")
        return m

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None, partition: PartitionTree | None = None):
        """Profile, partition, schedule, fit every leaf, pool.

        ``partition`` fits on a given tree (for example one grown earlier, or split by hand
        with :meth:`PartitionTree.split`) instead of growing one.
        """
        with local.one_blas_thread():
            return self._fit(X, y, sample_weight, partition)

    def _fit(self, X, y, sample_weight, partition):
        clock = _Clock()
        gm = self._validate()
        owner = type(self).__name__
        data = prepare_fit(X, y, levels=self.levels, categorical=self.categorical,
                           sample_weight=sample_weight, estimator_name=owner)
        Xm, codes, w = data.X, data.codes, data.weights
        n, p = Xm.shape
        K = data.target.n_classes
        d = p + K - 1
        names = data.schema.output_names
        backend = get_backend(self.backend, self.n_jobs, owner=owner)
        own_backend = backend is not self.backend
        try:
            n_pieces = gm._resolve_subsets(n, d, backend, owner)
            min_size = self._min_size(n, d)
            seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
            std = Standardizer.fit(Xm, w)
            clock.lap("prepare")
            if partition is None:
                grown = grow(Xm, codes, w, std=std, n_classes=K,
                             granularity=float(self.granularity), min_size=min_size,
                             n_pieces=n_pieces, seed=seed, feature_names=names)
                tree, labels, prof = grown.tree, grown.leaf, grown.profile
                if self.granularity > 0 and n < 2 * min_size:
                    how = (f"min_subset_size={min_size:,}" if self.min_subset_size is not None
                           else f"{MIN_LEAF_ROWS_PER_PARAM} rows per parameter, d = {d}")
                    warn(f"The data ({n:,} rows) are too small to split into two regions of "
                         f"at least {min(MIN_LEAF_ROWS_PER_PARAM * d, min_size):,} rows each "
                         f"({how}); fitting one region.", UserWarning)
            else:
                tree, labels, prof = self._given_partition(partition, Xm, codes, w, std, p, K,
                                                           min_size, seed, names)
            clock.lap("profile and partition")
            self._fit_leaves(gm, data, tree, labels, prof, backend, seed, clock)
            self.timings_ = clock.laps
        finally:
            if own_backend:
                backend.close()
        return self

    def _given_partition(self, tree, Xm, codes, w, std, p, K, min_size, seed, names):
        if not isinstance(tree, PartitionTree):
            raise TypeError(f"partition must be a fedgrain PartitionTree. Got "
                            f"{type(tree).__name__} instead.")
        if tree.n_features != p or tree.n_classes != K:
            raise DataError(f"The partition was made for {tree.n_features} features and "
                            f"{tree.n_classes} classes; the data have {p} and {K}.")
        labels = tree.route(Xm, codes)
        tree.count(labels)
        small = [(nid, s) for nid, s in zip(tree.leaves, tree.sizes, strict=True)
                 if s < min_size]
        if small:
            raise DataError(
                f"Leaf {small[0][0]} of the given partition has {small[0][1]:,} rows, fewer "
                f"than min_subset_size={min_size:,}; merge it (PartitionTree.merge) or lower "
                "min_subset_size.")
        tree.standardizer = std
        prof = profile_leaves(tree, Xm, codes, w, labels, seed=seed, feature_names=names)
        return tree, labels, prof

    def _fit_leaves(self, gm, data, tree: PartitionTree, labels, prof: DataProfile,
                    backend: Backend, seed: int, clock: _Clock) -> None:
        Xm, codes, w = data.X, data.codes, data.weights
        p = Xm.shape[1]
        K = data.target.n_classes
        std = tree.standardizer
        names = parameter_names(data.schema.output_names, data.target.classes)
        sizes = tree.sizes
        sched = schedule(sizes, len(names), backend.n_workers, groups=tree.siblings(),
                         row_bytes=(p + 2) * 8)
        settings = gm._settings(K)
        refs = []
        try:
            clock.lap("schedule")
            refs = build_shards(backend, Xm, codes, w, labels, tree.n_leaves, std)
            clock.lap("place leaves")
            run = fit_partition(backend, refs, sched, settings, leaf_seeds(tree, seed),
                                names=names, p=p, sizes=sizes,
                                refine_rounds=self.refine_rounds, owner=self, unit="leaf")
            regions = _region_estimates(backend, refs, sched, run, tree, settings,
                                        self.refine_rounds, names, sizes)
            clock.lap("fit leaves and pool")
        finally:
            backend.release(refs)
        gm._set_from_run(data, std, run, sizes,
                         title="Adaptive federated ordinal regression: global model")
        self.global_model_ = gm
        self.partition_ = tree
        self.n_leaves_ = tree.n_leaves
        self.schedule_ = sched
        self.n_iter_ = gm.n_iter_
        self._set_fitted(data.schema, data.target, gm.results_.params, gm.cov_, gm.results_)
        leaf_params, leaf_cov, notes = [], [], []
        region_of = tree.region_of()
        for pos, nid in enumerate(tree.leaves):
            est, cov, filled = regions.get(int(region_of[pos])) or _leaf_view(
                run.fits[pos], run.estimate, run.cov, p)
            params, cov = std.to_raw(est, cov)
            params[p:] = combine.monotonise(params[p:], np.diag(cov)[p:])
            leaf_params.append(params)
            leaf_cov.append(0.5 * (cov + cov.T))
            notes.append([names[j] for j in filled])
            prof.with_importance(nid, est[:p])
        self.profile_ = prof
        self._set_leaf_models(np.array(leaf_params), np.array(leaf_cov), notes)
        clock.lap("results")

    def _set_leaf_models(self, params: np.ndarray, covs: np.ndarray, notes: list) -> None:
        self._leaf_params = params
        self._leaf_notes = notes
        p = self.schema_.n_features
        models = []
        for pos, nid in enumerate(self.partition_.leaves):
            info = {"Leaf": nid, "Rows": f"{int(self.partition_.sizes[pos]):,}"}
            if notes[pos]:
                info["Not identified in the leaf"] = ", ".join(notes[pos])
            results = OrdinalResults(params[pos], covs[pos], self.schema_.output_names,
                                     self.target_.classes, title=f"Leaf {nid} model",
                                     info=info)
            m = LeafModel(leaf=nid)
            m._set_fitted(self.schema_, self.target_, params[pos], covs[pos], results)
            models.append(m)
        self.local_models_ = models
        self._leaf_coef = params[:, :p]
        self._leaf_thresholds = params[:, p:]

    # ---- prediction -------------------------------------------------------------------------
    def apply(self, X) -> np.ndarray:
        """The leaf (position in ``partition_.leaves`` and ``local_models_``) of each row."""
        return self.partition_.route(self._encode(X))

    def _routed(self, X):
        Xe = self._encode(X)
        leaf = self.partition_.route(Xe)
        eta = np.einsum("ij,ij->i", Xe, self._leaf_coef[leaf]) if Xe.shape[0] else np.zeros(0)
        return eta, self._leaf_thresholds[leaf]

    def predict_linear(self, X) -> np.ndarray:
        """``x @ coef`` with each row's leaf coefficients."""
        return self._routed(X)[0]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities from each row's leaf model, shape ``(n, K)``."""
        return class_proba(*self._routed(X))

    def predict_cumulative_proba(self, X) -> np.ndarray:
        return cumulative_proba(*self._routed(X))

    def predict_proba_ci(self, X, alpha: float = 0.05):
        """Class probabilities with delta-method intervals, each row from its leaf model."""
        Xe = self._encode(X)
        leaf = self.partition_.route(Xe)
        K = self.classes_.shape[0]
        out = [np.empty((Xe.shape[0], K)) for _ in range(3)]
        for pos in np.unique(leaf):
            rows = leaf == pos
            for o, v in zip(out, self.local_models_[pos].results_.predict_proba_ci(
                    Xe[rows], alpha), strict=True):
                o[rows] = v
        return tuple(out)

    # ---- persistence ------------------------------------------------------------------------
    def _extra_state(self):
        g_meta, g_arrays = self.global_model_._extra_state()
        meta = {"tree": self.partition_.to_dict(), "profile": self.profile_.to_dict(),
                "schedule": self.schedule_.to_dict(), "global": g_meta,
                "global_info": {k: str(v) for k, v in self.results_.info.items()},
                "leaf_notes": self._leaf_notes}
        arrays = {"leaf_params": self._leaf_params,
                  "leaf_cov": np.array([m.cov_ for m in self.local_models_]),
                  **{f"global_{k}": v for k, v in g_arrays.items()}}
        return meta, arrays

    def _restore_extra(self, meta, arrays):
        self.partition_ = PartitionTree.from_dict(meta["tree"])
        self.profile_ = DataProfile.from_dict(meta["profile"])
        self.schedule_ = Schedule.from_dict(meta["schedule"])
        self.n_leaves_ = self.partition_.n_leaves
        gm = self._global_estimator()
        gm._set_fitted(self.schema_, self.target_, self.results_.params, self.cov_,
                       self.results_)
        gm._restore_extra(meta["global"], {k[len("global_"):]: v for k, v in arrays.items()
                                           if k.startswith("global_")})
        self.global_model_ = gm
        self.n_iter_ = gm.n_iter_
        L, d = self.n_leaves_, self.results_.params.shape[0]
        if arrays["leaf_params"].shape != (L, d) or arrays["leaf_cov"].shape != (L, d, d):
            raise ValueError("the leaf arrays do not match the partition")
        self._set_leaf_models(arrays["leaf_params"], arrays["leaf_cov"], meta["leaf_notes"])


class _Clock:
    """Wall time of the phases of a fit, in seconds (``timings_``)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now


def _leaf_view(fit: local.LocalFit, fallback: np.ndarray, fallback_cov: np.ndarray, p: int):
    """A leaf's estimate over all parameters (standardised coordinates), with its covariance.

    Parameters the leaf does not identify are filled in (see :class:`LeafModel`) from
    ``fallback`` (the global estimate) and the leaf's edge estimates; their covariance is the
    global one. Returns ``(estimate, cov, filled)`` where ``filled`` lists them.
    """
    A, est_leaf = fit.design, fit.estimate
    d = A.shape[1]
    full = fallback.copy()
    S = np.zeros((d, A.shape[0]))
    known = np.zeros(d, dtype=bool)
    rows = sorted(range(A.shape[0]), key=lambda r: int(np.flatnonzero(A[r]).max()) >= p)
    for r in rows:
        cols = np.flatnonzero(A[r])
        k = cols.max()  # a feature row has one column; a threshold row's largest is its own
        others = cols[cols != k]
        full[k] = est_leaf[r] - A[r, others] @ full[others]
        S[k, r] = 1.0
        known[k] = True
    # thresholds of classes the leaf never saw: the one next to the identified thresholds at
    # the leaf's own edge estimate (local._edges), shifted back like the leaf's other
    # thresholds; any further ones at the global model's gaps from it
    placed = known.copy()
    if fit.edges is not None:
        absent = np.setdiff1d(np.arange(p), np.flatnonzero(known[:p]))
        th_rows = np.flatnonzero(A[:, p:].any(axis=1))
        offset = (-A[th_rows[0], absent] @ full[absent]) if absent.size and th_rows.size \
            else 0.0
        for k in np.flatnonzero(np.isfinite(fit.edges)):
            full[p + k] = fit.edges[k] + offset
            placed[p + k] = True
    th_placed = np.flatnonzero(placed[p:])
    for k in np.flatnonzero(~placed[p:]):
        if th_placed.size:
            j = th_placed[np.argmin(np.abs(th_placed - k))]
            full[p + k] = full[p + j] + fallback[p + k] - fallback[p + j]
    cov = S @ fit.cov @ S.T
    miss = ~known
    cov[np.ix_(miss, miss)] = fallback_cov[np.ix_(miss, miss)]
    return full, cov, np.flatnonzero(miss).tolist()


def _region_estimates(backend, refs, sched, run, tree: PartitionTree, settings,
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
    est = {r: _identified(combine.pool, names, [run.fits[i] for i in m]) for r, m in
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
        evals = _values(backend.map_bundles(local.evaluate_task, tasks,
                                            [b for b in bundles if b]),
                        sizes[members], "leaf")
        for r, m in multi.items():
            ev = [evals[where[int(i)]] for i in m]
            est[r] = _identified(combine.refine, names, est[r][0], ev, settings.variance)
    return {r: (e, c, []) for r, (e, c) in est.items()}
