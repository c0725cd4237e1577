"""Adaptive federated ordinal regression: profile, partition, schedule, fit leaves, pool.

The first form (``meta="none"``): every leaf of the partition tree keeps its own de-biased local
fit, and the leaves' fits are pooled into a global model with inference exactly as the
divide-and-conquer estimator pools its subsets (method.md 4-5; with adaptive, non-random leaves
the pooled estimate stays valid when one model holds everywhere, and ``Q`` measures how much the
leaves differ when it does not).
"""

from __future__ import annotations

import copy
import time

import numpy as np
from sklearn.utils import check_random_state

from .. import progress
from .._warnings import warn
from ..backends import Backend, get_backend
from ..core.standardize import fit_standardizer
from ..data import prepare_data
from ..exceptions import DataError, ParameterError
from ..federation import meta
from ..federation.schedule import Schedule, schedule
from ..federation.shards import build_shards, route_rows
from ..inference import local
from ..inference.results import OrdinalResults, parameter_names
from ..partition.growth import grow, leaf_seeds, profile_leaves
from ..partition.profile import DataProfile
from ..partition.tree import PartitionTree
from .base import OrdinalModel, is_int, is_real, param_error, register
from .controller import GranularityControl
from .divide_conquer import (
    MIN_ROWS_PER_PARAM,
    ROWS_PER_PARAM_FOR_ROUNDS,
    DivideConquerOrdinal,
    fit_partition,
)
from .leaves import LeafModel, leaf_view, region_estimates
from .personalise import Personalisation
from .routing import RoutedPrediction
from .streaming import Streaming

#: Default minimum leaf size, in rows per parameter: ``min_subset_size = 20 d`` (capped at the
#: number of rows). A leaf's own model is used for prediction, so it needs more rows than the
#: pooling alone would (``5 d``, method.md 6).
MIN_LEAF_ROWS_PER_PARAM = 20
META = ("none", *meta.METHODS)


@register
class AdaptiveFederatedOrdinal(RoutedPrediction, Personalisation, Streaming,
                               GranularityControl, OrdinalModel):
    """Ordinal regression on an adaptive partition of the data, pooled with valid inference.

    ``fit`` profiles the data (density, feature importance, clusters), grows a partition tree
    whose splits go where the model changes most (judged by a robust score test of one model on
    both sides, on cuts between clusters and at density valleys of the features), assigns the
    leaves to workers, fits the patent's de-biased L1 estimator on every
    leaf in parallel, and pools the leaves into a global model with inference. ``predict``
    routes each row to its leaf's model. With ``meta=...`` the leaves are personalised by a
    federated meta-learner; ``partial_fit`` keeps the model on a stream, watching every leaf
    for drift and refitting, splitting or merging only where the data changed
    (:mod:`fedgrain.estimators.streaming`).

    Parameters
    ----------
    granularity : float in [0, 1]
        How far splitting goes. 0 is the patent's static division (random stratified subsets,
        one per worker, and one global model); 1 splits down to ``min_subset_size`` wherever
        the children's models differ at the 5% level. In between, a split must be significant
        at ``0.05 * 10^(-6 (1 - g))`` and there are at most ``(n / min_subset_size)^g`` regions
        (see :mod:`fedgrain.partition.growth`); more granularity never gives fewer leaves.
    min_subset_size : int or None
        No leaf has fewer rows. Default ``20 d`` (d = features plus thresholds), at most the
        number of rows.
    meta : {"none", "fomaml", "reptile", "fedavg", "fedprox"}
        ``"none"``: each leaf keeps its own local fit. Otherwise the leaves go through rounds of
        federated meta-learning (:mod:`fedgrain.federation.meta`) and ``local_models_`` are
        personalised:
        adapted from a learned global model with a learned pull toward it (``"fedavg"`` and
        ``"fedprox"`` are baselines that keep one global model).
    max_rounds : int
        Meta-learning rounds at most.
    meta_tol : float
        A round must lower the validation log-loss by this share to continue.
    inner_steps : int
        Newton steps of a leaf's adaptation in a round (the personalised models and ``adapt``
        converge).
    validation_fraction : float in [0.05, 0.5]
        Share of each leaf's rows, stratified by class, set aside once to judge the rounds.
    fedprox_mu : float or None
        FedProx's fixed pull, in pseudo-rows (default ``10 d``).
    drift_detector : {"adwin", "page_hinkley"}
        The detector of concept drift on each leaf's loss stream (``partial_fit``).
    backend, n_jobs, random_state, alpha, variance, refine_rounds, debias, ridge,
    penalize_thresholds, levels, categorical, cv_folds, max_iter, tol :
        As for :class:`fedgrain.DivideConquerOrdinal`; they set every leaf's fit and the
        pooling. With fewer regions than workers (``n_jobs``, default all CPUs) regions are
        dealt out into random pieces, one per worker: set ``n_jobs`` for a model that does not
        depend on the machine.

    Attributes
    ----------
    coef_, thresholds_, cov_, bse_, results_ : the global model's (pooled over the leaves)
    global_model_ : DivideConquerOrdinal
        The pooled model with inference; ``global_model_.q_`` is the leaves' heterogeneity.
    local_models_ : list of LeafModel
        One per leaf, in the order of ``partition_.leaves``: its local fit, or with a
        meta-learner its personalised model. Random pieces of one region share one model.
    meta_model_ : LeafModel
        The meta-learned global parameters (the pooled model with ``meta="none"``); it predicts
        rows of regions no leaf has seen (``unseen``) when there is a meta-learner, and is what
        ``adapt`` starts from. Its covariance is the pooled model's, a stand-in.
    history_ : list of dict
        Per meta round: validation log-loss (``val_loss``) and that of the global model alone,
        per-leaf validation loss, the pull ``rho`` (None: no adaptation) and each leaf's
        adaptation strength, bytes moved, seconds, leaves that failed.
    events_ : list of dict
        Leaves that failed in a meta round or in personalisation, and on streams every drift
        detection, refit, reference refresh, split, merge and granularity change (with the
        rows seen, the leaf, the statistic and its threshold). Saved with the model.
    effective_granularity_ : float
        Where the partition stands on the granularity scale: ``log(regions) / log(n /
        min_subset_size)`` (updated by ``partial_fit`` as leaves split and merge).
    partition_ : fedgrain.partition.tree.PartitionTree
        ``leaves``, ``sizes``, ``route(X)`` (leaf positions of encoded rows), ``describe()``.
    profile_ : fedgrain.partition.profile.DataProfile
        Per leaf: rows, class counts, density, feature importance (of the leaf's local model),
        2-means centres.
    n_leaves_ : int
    schedule_ : fedgrain.federation.schedule.Schedule
        Leaves to workers, with ``imbalance`` and ``bytes_to_move``.
    timings_ : dict
        Wall time of each phase of the fit, in seconds ("prepare", "profile and partition",
        "schedule", "place leaves", "fit leaves and pool", "meta-learning", "results").

    Examples
    --------
    >>> from fedgrain import AdaptiveFederatedOrdinal
    >>> from fedgrain.datasets import make_regions
    >>> X, y, region, *_ = make_regions(6000, n_regions=2, random_state=0)
    >>> af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial").fit(X, y)
    >>> af.n_leaves_
    2
    """

    def __init__(self, granularity=0.5, min_subset_size=None, meta="none", max_rounds=20,
                 backend="processes", n_jobs=None, random_state=0, *, meta_tol=1e-3,
                 inner_steps=3, validation_fraction=0.2, fedprox_mu=None,
                 drift_detector="adwin", alpha="rate",
                 variance="cluster", refine_rounds=1, debias="auto", ridge=0.0,
                 penalize_thresholds=False, levels=None, categorical=None, cv_folds=5,
                 max_iter=100, tol=1e-8, callback=None):
        self.granularity = granularity
        self.min_subset_size = min_subset_size
        self.meta = meta
        self.max_rounds = max_rounds
        self.meta_tol = meta_tol
        self.inner_steps = inner_steps
        self.validation_fraction = validation_fraction
        self.fedprox_mu = fedprox_mu
        self.drift_detector = drift_detector
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
        self.callback = callback

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
        if not is_int(self.max_rounds) or self.max_rounds < 1:
            raise param_error(owner, "max_rounds", "an int >= 1", self.max_rounds)
        if not is_real(self.meta_tol) or not self.meta_tol >= 0:
            raise param_error(owner, "meta_tol", "a float >= 0", self.meta_tol)
        if not is_int(self.inner_steps) or self.inner_steps < 1:
            raise param_error(owner, "inner_steps", "an int >= 1", self.inner_steps)
        vf = self.validation_fraction
        if not (is_real(vf) and 0.05 <= vf <= 0.5):
            raise param_error(owner, "validation_fraction", "a float in [0.05, 0.5]", vf)
        mu = self.fedprox_mu
        if mu is not None and not (is_real(mu) and mu > 0 and np.isfinite(mu)):
            raise param_error(owner, "fedprox_mu", "a float > 0 or None", mu)
        if self.drift_detector not in ("adwin", "page_hinkley"):
            raise param_error(owner, "drift_detector", "'adwin' or 'page_hinkley'",
                              self.drift_detector)
        gm = self._global_estimator()
        try:
            gm._validate()
        except ValueError as exc:
            raise ParameterError(str(exc).replace(type(gm).__name__, owner)) from None
        return gm

    def _min_size(self, n: int, d: int) -> int:
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
        with :meth:`PartitionTree.split`) instead of growing one. ``X`` may be the path of a
        Parquet file or folder with ``y`` naming the target column: it is streamed batch by
        batch, never loaded whole (the tree is grown on a sample of at most 50,000 rows).
        """
        with local.one_blas_thread(), progress.reporting(self.callback):
            return self._fit(X, y, sample_weight, partition)

    def _fit(self, X, y, sample_weight, partition):
        clock = _Clock()
        self._stream = None  # a stream's state belongs to the model it watched
        gm = self._validate()
        owner = type(self).__name__
        with progress.step("checking data"):
            data = prepare_data(X, y, levels=self.levels, categorical=self.categorical,
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
            std = fit_standardizer(Xm, w)
            clock.lap("prepare")
            if partition is None:
                with progress.step("profiling and partitioning"):
                    grown = grow(Xm, codes, w, std=std, n_classes=K,
                                 granularity=float(self.granularity), min_size=min_size,
                                 n_pieces=n_pieces, seed=seed, feature_names=names)
                tree, labels, prof = grown.tree, grown.leaf, grown.profile
                if self.granularity > 0 and n < 2 * min_size:
                    how = (f"min_subset_size={min_size:,}" if self.min_subset_size is not None
                           else f"the default min_subset_size, {MIN_LEAF_ROWS_PER_PARAM} rows "
                                f"per parameter for d = {d}, capped at the rows")
                    warn(f"The data ({n:,} rows) are too small to split into two regions of "
                         f"at least {min_size:,} rows each ({how}); fitting one region.",
                         UserWarning)
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
        tree = copy.deepcopy(tree)  # the model owns its tree; the caller's is left alone
        tree.standardizer = std
        labels = route_rows(tree, Xm, codes)
        tree.count(labels)
        small = [(nid, s) for nid, s in zip(tree.leaves, tree.sizes, strict=True)
                 if s < min_size]
        if small:
            raise DataError(
                f"Leaf {small[0][0]} of the given partition has {small[0][1]:,} rows, fewer "
                f"than min_subset_size={min_size:,}; merge it (PartitionTree.merge) or lower "
                "min_subset_size.")
        classes = np.bincount(labels * K + codes, minlength=tree.n_leaves * K).reshape(-1, K)
        single = np.flatnonzero((classes > 0).sum(axis=1) < 2)
        if single.size:
            raise DataError(
                f"Leaf {tree.leaves[single[0]]} of the given partition holds one class only; "
                "its rows carry no model of their own. Merge it with its sibling "
                "(PartitionTree.merge on its parent).")
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
        need = ROWS_PER_PARAM_FOR_ROUNDS.get(self.refine_rounds, 0) * len(names)
        if tree.n_leaves > 1 and sizes.min() < need:
            warn(f"Leaves of {int(sizes.min()):,} rows have fewer than "
                 f"{need // len(names)} rows per parameter (d = {len(names)}): with "
                 f"refine_rounds={self.refine_rounds} the pooled (global) estimate keeps part of "
                 "their finite-sample bias. Use a larger refine_rounds or min_subset_size.",
                 UserWarning)
        settings = gm._settings(K)
        refs = []
        try:
            clock.lap("schedule")
            refs = build_shards(backend, Xm, codes, w, labels, tree.n_leaves, std)
            clock.lap("place leaves")
            run = fit_partition(backend, refs, sched, settings, leaf_seeds(tree, seed),
                                names=names, p=p, sizes=sizes,
                                refine_rounds=self.refine_rounds, owner=self, unit="leaf",
                                ids=tree.leaves)
            regions = region_estimates(backend, refs, sched, run, tree, settings,
                                        self.refine_rounds, names, sizes)
            clock.lap("fit leaves and pool")
            learned = self._meta_rounds(backend, refs, sched, run, tree, p, seed)
            if self.meta != "none":
                clock.lap("meta-learning")
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
        theta, rho, adapt_rho, P, personal = learned
        self._meta_state = {"theta": theta, "rho": rho, "adapt_rho": adapt_rho, "P": P}
        self.meta_model_ = self._meta_model(theta, run.cov)
        leaf_params, leaf_cov, notes = [], [], []
        region_of = tree.region_of()
        for pos, nid in enumerate(tree.leaves):
            est, cov, filled = regions.get(int(region_of[pos])) or leaf_view(
                run.fits[pos], run.estimate, run.cov, p)
            if personal is not None:  # the meta-learner's personalised (or global) model
                est, cov = personal[pos]
                filled = []
            params, cov = std.to_raw_model(est, cov)
            leaf_params.append(params)
            leaf_cov.append(0.5 * (cov + cov.T))
            notes.append([names[j] for j in filled])
            prof.with_importance(nid, est[:p])
        self.profile_ = prof
        self._set_leaf_models(np.array(leaf_params), np.array(leaf_cov), notes)
        self.effective_granularity_ = self._effective_granularity({"rows_seen": 0})
        clock.lap("results")

    def _meta_model(self, theta: np.ndarray, cov_std: np.ndarray) -> LeafModel:
        """The meta-learned global parameters as a model (the pooled one for meta="none").

        Its covariance is the pooled model's, a stand-in once ``theta`` has moved from it.
        """
        params, cov = self.partition_.standardizer.to_raw_model(theta, cov_std)
        title = ("Pooled global model" if self.meta == "none" else
                 f"Meta-learned global model ({self.meta})")
        return self._leaf_model(-1, params, cov, title, {})

    def _leaf_model(self, nid: int, params, cov, title: str, info: dict) -> LeafModel:
        results = OrdinalResults(params, cov, self.schema_.output_names, self.target_.classes,
                                 title=title, info=info)
        m = LeafModel(leaf=nid)
        m._set_fitted(self.schema_, self.target_, params, cov, results)
        return m

    def _set_leaf_models(self, params: np.ndarray, covs: np.ndarray, notes: list) -> None:
        self._leaf_params = params
        self._leaf_notes = notes
        p = self.schema_.n_features
        models = []
        for pos, nid in enumerate(self.partition_.leaves):
            info = {"Leaf": nid, "Rows": f"{int(self.partition_.sizes[pos]):,}"}
            if notes[pos]:
                info["Not identified in the leaf"] = ", ".join(notes[pos])
            models.append(self._leaf_model(nid, params[pos], covs[pos], f"Leaf {nid} model",
                                           info))
        self.local_models_ = models
        self._leaf_ids = list(self.partition_.leaves)
        self._leaf_coef = params[:, :p]
        self._leaf_thresholds = params[:, p:]

    def refresh_profile(self, X, y, sample_weight=None) -> DataProfile:
        """Profile the leaves again from new labelled rows (``profile_``, updated in place).

        Rows go to their leaves as in prediction; leaves that receive none keep their profile.
        """
        Xe = self._encode(X)
        codes = self.target_.encode(y, what="y")
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        self._route(Xe)  # the partition must still be the fitted one
        self.profile_.refresh(self.partition_, Xe, codes, w)
        return self.profile_

    # ---- persistence ------------------------------------------------------------------------
    def _extra_state(self):
        g_meta, g_arrays = self.global_model_._extra_state()
        meta = {"tree": self.partition_.to_dict(), "profile": self.profile_.to_dict(),
                "schedule": self.schedule_.to_dict(), "global": g_meta,
                "leaf_notes": self._leaf_notes, "timings": dict(self.timings_),
                "effective_granularity": float(self.effective_granularity_),
                "history": self.history_, "events": self.events_,
                "meta_rho": None if not np.isfinite(self._meta_state["rho"])
                else float(self._meta_state["rho"]),
                "adapt_rho": float(self._meta_state["adapt_rho"])}
        meta["stream"], stream_arrays = self._stream_extra()
        arrays = {**stream_arrays,
                  "meta_theta": self._meta_state["theta"], "meta_P": self._meta_state["P"],
                  "meta_params": self.meta_model_.results_.params,
                  "meta_cov": self.meta_model_.cov_,
                  "leaf_params": self._leaf_params,
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
        self.timings_ = dict(meta["timings"])
        self.effective_granularity_ = float(meta["effective_granularity"])
        self.history_, self.events_ = list(meta["history"]), list(meta["events"])
        rho = np.inf if meta["meta_rho"] is None else float(meta["meta_rho"])
        self._meta_state = {"theta": arrays["meta_theta"], "rho": rho,
                            "adapt_rho": float(meta["adapt_rho"]), "P": arrays["meta_P"]}
        self.meta_model_ = self._leaf_model(-1, arrays["meta_params"], arrays["meta_cov"],
                                            "Pooled global model" if self.meta == "none" else
                                            f"Meta-learned global model ({self.meta})", {})
        L, d = self.n_leaves_, self.results_.params.shape[0]
        if arrays["leaf_params"].shape != (L, d) or arrays["leaf_cov"].shape != (L, d, d):
            raise ValueError("the leaf arrays do not match the partition")
        self._set_leaf_models(arrays["leaf_params"], arrays["leaf_cov"], meta["leaf_notes"])
        self._restore_stream(meta.get("stream"), arrays)


class _Clock:
    """Wall time of the phases of a fit, in seconds (``timings_``)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now
