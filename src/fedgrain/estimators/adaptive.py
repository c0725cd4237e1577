"""Adaptive federated ordinal regression: profile, partition, schedule, fit leaves, pool.

The estimator validates its parameters, grows (or takes) the partition tree
(:mod:`fedgrain.partition.growth`), places the leaves and hands them to the engine
(:mod:`fedgrain.federation.engine`: leaf fits, pooling, refinement), personalises them
(:mod:`fedgrain.federation.personalise`), and holds the results: the global model, one model per
leaf (:mod:`fedgrain.federation.leaves` routes rows to them) and, on streams, the monitor's state
(:mod:`fedgrain.monitor.stream` reacts to drift).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .. import progress
from .._warnings import warn
from ..backends import Backend, get_backend
from ..core.blocks import take_rows
from ..core.likelihood import class_proba, cumulative_proba
from ..core.standardize import fit_standardizer
from ..data import partitionwise as dask_parts
from ..data import prepare_data
from ..data.groups import check_groups, kept_groups, split_groups_column
from ..exceptions import DataError, SeparationError
from ..federation import meta
from ..federation.engine import (
    MIN_LEAF_ROWS_PER_PARAM,
    MIN_ROWS_PER_PARAM,
    REFINE_TOL,
    ROWS_PER_PARAM_FOR_ROUNDS,
    fit_partition,
    region_estimates,
    resolve_subsets,
    summarise,
)
from ..federation.leaves import LeafTable, leaf_units, leaf_view, unseen_rows
from ..federation.personalise import MetaConfig, MetaState, adapt_rows, fit_leaf_rows, meta_rounds
from ..federation.schedule import Schedule, schedule
from ..federation.shards import build_shards, route_rows
from ..inference import local
from ..inference.contributions import Contribution, combine, repool, stack, unstack
from ..inference.random_effects import RandomEffects, random_effects
from ..inference.results import parameter_names
from ..monitor.detectors import standardised_excess
from ..monitor.stream import DriftMonitor
from ..partition.growth import (
    SAMPLE_ROWS,
    grow,
    leaf_seeds,
    measure_stability,
    profile_leaves,
)
from ..partition.profile import DataProfile
from ..partition.tree import PartitionTree
from .base import OrdinalModel, is_int, is_real, param_error, register
from .models import GlobalModel, LeafModel

#: The arrays of a saved model that hold a stream's raw rows (features, labels, row numbers).
_RAW_ROWS = re.compile(r"stream_\d+_(X|y|rows)")

META = ("none", *meta.METHODS)
#: An honest tree is grown on half the rows, at most this many (the growth sample); the other
#: rows estimate the leaves.
HONEST_GROW_ROWS = SAMPLE_ROWS
#: Newton steps a leaf's own model may take from its de-biased start (it stops once a step
#: moves no parameter more than 0.01 standard errors; usually after two or three).
LEAF_NEWTON_STEPS = 25
GLOBAL_TITLE = "Adaptive federated ordinal regression: global model"
#: Training rows (evenly spaced) on which each leaf's fit-time loss level is measured, for the
#: stream's reference CUSUM.
REFERENCE_ROWS = 100_000


@register
class AdaptiveFederatedOrdinal(OrdinalModel):
    """Ordinal regression on an adaptive partition of the data, pooled with valid inference.

    ``fit`` profiles the data (density, feature importance, clusters), grows a partition tree
    whose splits go where the model changes most (judged by a robust score test of one model on
    both sides, on cuts between clusters and at density valleys of the features), assigns the
    leaves to workers, fits the patent's de-biased L1 estimator on every
    leaf in parallel, and pools the leaves into a global model with inference. ``predict``
    routes each row to its leaf's model. With ``meta=...`` the leaves are personalised by a
    federated meta-learner; ``partial_fit`` keeps the model on a stream, watching every leaf
    for drift and refitting, splitting or merging only where the data changed
    (:mod:`fedgrain.monitor.stream`).

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
        number of rows. With ``groups`` the groups are the leaves (each needs ``5 d`` rows);
        ``granularity`` and ``min_subset_size`` do not apply.
    meta : {"none", "fomaml", "reptile", "fedavg", "fedprox", "ditto"}
        ``"none"``: each leaf keeps its own local fit. Otherwise the leaves go through rounds of
        federated meta-learning (:mod:`fedgrain.federation.meta`) and ``local_models_`` are
        personalised:
        adapted from a learned global model with a learned pull toward it (``"fedavg"`` and
        ``"fedprox"`` are baselines that keep one global model; ``"ditto"`` personalises from
        FedAvg's model with a Euclidean pull).
    max_rounds : int
        Meta-learning rounds at most.
    meta_tol : float
        A round must lower the validation log-loss by this share to continue.
    inner_steps : int
        Newton steps of a leaf's adaptation in a round (the personalised models and ``adapt``
        converge).
    validation_fraction : float in [0.05, 0.5]
        Share of each leaf's rows, stratified by class, set aside once: half scores the outer
        step (query), half chooses the pull and stops the rounds (selection).
    fedprox_mu : float or None
        FedProx's fixed pull, in pseudo-rows (default ``10 d``).
    drift_detector : {"adwin", "page_hinkley"}
        The detector of concept drift on each leaf's loss stream (``partial_fit``).
    refine_rounds : int, default=20
        At most this many refinement rounds: the global model's (and each region's) rounds
        stop once a round moves no parameter more than 0.01 standard errors, so the global
        model is the composite fit on all rows at any heterogeneity, and a leaf's own model
        takes Newton steps from its de-biased start until it converges. 0 is the patent's
        one-shot pooling, with one-step de-biased leaves.
    backend, n_jobs, random_state, alpha, variance, debias, ridge,
    penalize_thresholds, levels, categorical, cv_folds, max_iter, tol :
        As for :class:`fedgrain.DivideConquerOrdinal`; they set every leaf's fit and the
        pooling. With fewer regions than workers (``n_jobs``, default all CPUs) regions are
        dealt out into random pieces, one per worker: set ``n_jobs`` for a model that does not
        depend on the machine. Rows in a shared buffer (a memory-mapped file, shared memory,
        :func:`fedgrain.shared_rows`) are not copied with the processes backend: the leaves
        are views of them (the meta-learning rounds gather a leaf's rows on its worker).

    Attributes
    ----------
    coef_, thresholds_, cov_, bse_, results_ : the global model's (pooled over the leaves)
    global_model_ : fedgrain.estimators.models.GlobalModel
        The population-averaged model: the composite fit on all rows (refined until
        converged), with inference valid for it; ``global_model_.q_`` is the leaves'
        heterogeneity. When leaves differ it is an average over them, not any leaf's model.
    random_effects_ : fedgrain.inference.random_effects.RandomEffects
        Beside it, a random-effects summary of the regions' models: their mean, the
        between-region variance ``tau2`` of each parameter and a prediction interval for a new
        region (``random_effects_.summary()``).
    local_models_ : list of LeafModel
        One per leaf, in the order of ``partition_.leaves``: its local fit (converged), or with
        a meta-learner its personalised model. Random pieces of one region share one model.
        When the tree was grown from the data, leaves are estimated honestly: the splits are
        chosen on one part of the rows (half of them, at most ``HONEST_GROW_ROWS``) and the
        leaves fitted on the others, so their intervals do not inherit the selection.
    meta_model_ : LeafModel
        The meta-learned global parameters (the pooled model with ``meta="none"``); it predicts
        rows of regions no leaf has seen (``unseen``) when there is a meta-learner, and is what
        ``adapt`` starts from. Its covariance is the pooled model's, a stand-in.
    history_ : list of dict
        Per meta round: the selection rows' log-loss (``val_loss``; rows that took no part in
        the fits or the outer step) and that of the global model alone, per-leaf losses, the
        pull ``rho`` (None: no adaptation) and each leaf's adaptation strength, bytes moved,
        seconds, leaves that failed.
    events_ : list of dict
        Leaves that failed in a meta round or in personalisation, a meta-learner that ran no
        rounds because the leaves do not differ (with Cochran's p), and on streams every drift
        detection, refit, reference refresh, split, merge and granularity change (with the
        rows seen, the leaf, the statistic and its threshold). Saved with the model.
    meta_state_ : fedgrain.federation.personalise.MetaState
        What the meta-learner learned (global parameters, pull, the pull's metric), in
        standardised coordinates.
    stream_ : fedgrain.monitor.state.StreamState or None
        The monitored stream's state (rows seen, each leaf's detectors and recent rows, each
        region's models that follow every batch with their forgetting), from the first
        ``partial_fit`` on; saved with the model.
    reference_excess_ : dict
        Per leaf (node id), its mean standardised excess loss at fit time (log-loss minus the
        entropy of its predictions, over their standard deviation): the level the stream's
        reference CUSUM holds the leaf to.
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
                 variance="cluster", refine_rounds=20, debias="auto", ridge=0.0,
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


    def _validate(self) -> None:
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
        self._validate_engine()

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

    def _engine_settings(self, n_classes: int):
        """The engine's settings; a leaf's own model is converged (Newton steps from its
        de-biased start) unless ``refine_rounds=0`` asks for the one-shot method."""
        settings = super()._engine_settings(n_classes)
        if settings.refine_rounds == 0:
            return settings
        return replace(settings, local=replace(settings.local,
                                                polish_rounds=LEAF_NEWTON_STEPS))

    def _meta_config(self) -> MetaConfig:
        return MetaConfig(self.meta, int(self.max_rounds), float(self.meta_tol),
                          int(self.inner_steps), float(self.validation_fraction),
                          None if self.fedprox_mu is None else float(self.fedprox_mu))

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None, partition: PartitionTree | None = None,
            groups=None):
        """Profile, partition, schedule, fit every leaf, pool.

        ``partition`` fits on a given tree (for example one grown earlier, or split by hand
        with :meth:`PartitionTree.split`) instead of growing one. ``X`` may be the path of a
        Parquet file or folder with ``y`` naming the target column: it is streamed batch by
        batch, never loaded whole (the tree is grown on a sample of at most 50,000 rows).

        ``groups`` (one label per row, or the name of a column of the DataFrame ``X``) makes
        every group a client of its own (federated sites): one leaf per group, its rows placed
        on one worker and never mixed with another group's, its model personalised (with a
        meta-learner) or its own fit. ``predict(X, groups=...)`` then uses each known group's
        model and the global (meta-learned) model for a group it did not see; ``adapt()``
        personalises to a new group from its labelled rows. Each group needs rows enough for
        its own fit (5 per parameter) and two classes.
        """
        with local.one_blas_thread(), progress.reporting(self.callback):
            return self._fit(X, y, sample_weight, partition, groups)

    def _fit(self, X, y, sample_weight, partition, groups=None):
        clock = _Clock()
        self.stream_ = None  # a stream's state belongs to the model it watched
        self._validate()
        owner = type(self).__name__
        if groups is not None:
            if partition is not None:
                raise DataError("Give groups or a partition, not both: with groups the "
                                "partition is one leaf per group.")
            X, groups = split_groups_column(X, groups)
            groups = kept_groups(groups, sample_weight)
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
            n_pieces = resolve_subsets(n, d, None, self._n_workers(backend),
                                       self.refine_rounds, owner)
            min_size = self._min_size(n, d)
            seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
            std = fit_standardizer(Xm, w, data.moments)
            clock.lap("prepare")
            estimation = None
            if groups is not None:
                with progress.step("profiling the groups"):
                    tree, labels, prof = self._group_partition(
                        groups, Xm, codes, w, std, p, K, seed, names, data.target.classes)
            elif partition is None:
                with progress.step("profiling and partitioning"):
                    tree, labels, prof, estimation = self._grow_honestly(
                        Xm, codes, w, std, K, min_size, n_pieces, seed, names)
                self._warn_too_small(n, min_size, d)
            else:
                tree, labels, prof = self._given_partition(partition, Xm, codes, w, std, p, K,
                                                           min_size, seed, names)
            clock.lap("profile and partition")
            while True:
                try:
                    self._fit_leaves(data, tree, labels, prof, backend, seed, clock,
                                     estimation)
                    break
                except SeparationError as exc:
                    merged = None if partition is not None or groups is not None else \
                        self._merge_separated(
                        tree, exc, Xm, codes, w, estimation, seed, names)
                    if merged is None:
                        raise
                    labels, prof, estimation = merged
            self.timings_ = clock.laps
        finally:
            if own_backend:
                backend.close()
        return self

    def _grow_honestly(self, Xm, codes, w, std, K, min_size, n_pieces, seed, names):
        """Grow the tree on some rows and keep the others to estimate the leaves.

        The splits are chosen on a random part of the rows (half, at most
        :data:`HONEST_GROW_ROWS`); every row is then routed to its leaf. When the tree has
        more than one region, ``estimation`` marks the rows the leaves are fitted on (the
        others'), so leaf intervals and sibling tests do not inherit the selection of the
        splits (honest trees, as in Athey and Imbens' causal trees); otherwise None (one
        region: nothing was selected). Returns ``(tree, labels, profile, estimation)``.
        """
        n = Xm.shape[0]
        if float(self.granularity) == 0 or n < 2 * min_size:
            grown = grow(Xm, codes, w, std=std, n_classes=K, granularity=0.0,
                         min_size=min_size, n_pieces=n_pieces, seed=seed, feature_names=names)
            return grown.tree, grown.leaf, grown.profile, None
        rng = np.random.default_rng([seed, 7])
        n_grow = min(n // 2, HONEST_GROW_ROWS)
        chosen = np.sort(rng.choice(n, n_grow, replace=False))
        share = n_grow / n
        grown = grow(take_rows(Xm, chosen), codes[chosen],
                     None if w is None else w[chosen], std=std, n_classes=K,
                     granularity=float(self.granularity),
                     min_size=max(1, int(np.ceil(min_size * share))), n_pieces=n_pieces,
                     seed=seed, feature_names=names)
        tree = grown.tree
        tree.growth["fraction"] = share  # grown on this share of the rows (for stability())
        labels = route_rows(tree, Xm, codes)
        tree.count(labels)
        estimation = np.ones(n, dtype=bool)
        estimation[chosen] = False
        need = MIN_ROWS_PER_PARAM * (Xm.shape[1] + K - 1)
        while tree.n_leaves > 1:  # a leaf needs rows of its own to be estimated on
            fitted = np.bincount(labels[estimation], minlength=tree.n_leaves)
            small = np.flatnonzero(fitted < need)
            if not small.size:
                break
            tree.merge(tree.nodes[tree.leaves[small[0]]].parent)
            labels = route_rows(tree, Xm, codes)
            tree.count(labels)
        if np.unique(tree.region_of()).shape[0] == 1:
            estimation = None
        if set(grown.profile.leaves) == set(tree.leaves):
            # the growth's profile (its sample: half the rows) with every row's counts
            counts = np.bincount(labels * K + codes, weights=w,
                                 minlength=tree.n_leaves * K).reshape(tree.n_leaves, K)
            prof = grown.profile
            for pos, nid in enumerate(tree.leaves):
                prof.leaves[nid] = replace(prof.leaves[nid], n_rows=int(tree.sizes[pos]),
                                           class_counts=counts[pos].astype(float))
        else:  # leaves merged after growth: profile them again
            prof = profile_leaves(tree, Xm, codes, w, labels, seed=seed, feature_names=names)
        return tree, labels, prof, estimation

    def _merge_separated(self, tree: PartitionTree, exc: SeparationError, Xm, codes, w,
                         estimation, seed: int, names):
        """Undo the grown splits that left the classes separated in a leaf, with a warning.

        The fit chose the splits, so a leaf where the classes are (quasi-)separated (a few rows
        of a rare feature value, all in one class) is merged back into the node above its
        nearest cut rather than failing the fit. Returns ``(labels, profile, estimation)``
        for the fit to run again, or None when there is no grown cut to undo.
        """
        tops = []
        for pos in exc.units:
            nid = tree.leaves[pos]
            parent = tree.nodes[nid].parent
            while parent >= 0 and tree.nodes[parent].kind != "hyperplane":
                parent = tree.nodes[parent].parent
            if parent < 0:
                return None
            tops.append((nid, parent))
        if not tops:
            return None
        for nid, parent in tops:
            if parent in tree.nodes and tree.nodes[parent].kind == "hyperplane":
                cut = tree.nodes[parent].evidence.get("candidate", "a hyperplane")
                warn(f"The classes are (quasi-)separated in leaf {nid}, so its model does not "
                     f"exist; the split above it (node {parent}, {cut}) is undone and the "
                     "leaf merged with its sibling.", UserWarning)
                tree.merge(parent)
        labels = route_rows(tree, Xm, codes)
        tree.count(labels)
        if estimation is not None and np.unique(tree.region_of()).shape[0] == 1:
            estimation = None
        prof = profile_leaves(tree, Xm, codes, w, labels, seed=seed, feature_names=names)
        return labels, prof, estimation

    def _warn_too_small(self, n: int, min_size: int, d: int) -> None:
        if self.granularity > 0 and n < 2 * min_size:
            how = (f"min_subset_size={min_size:,}" if self.min_subset_size is not None
                   else f"the default min_subset_size, {MIN_LEAF_ROWS_PER_PARAM} rows "
                        f"per parameter for d = {d}, capped at the rows")
            warn(f"The data ({n:,} rows) are too small to split into two regions of "
                 f"at least {min_size:,} rows each ({how}); fitting one region.", UserWarning)

    def _group_partition(self, groups, Xm, codes, w, std, p, K, seed, names, classes):
        """One leaf per group: a tree whose root sends each group's rows to its own leaf.

        Raises a :class:`DataError` naming the groups that cannot have a model of their own
        (too few rows, one class only)."""
        n = Xm.shape[0]
        labels_in = check_groups(groups, n)
        found, labels = np.unique(labels_in, return_inverse=True)
        found = [str(g) for g in found]
        d = p + K - 1
        need = MIN_ROWS_PER_PARAM * d
        sizes = np.bincount(labels, minlength=len(found))
        small = [f"{found[i]!r} ({sizes[i]:,} rows)" for i in np.flatnonzero(sizes < need)]
        if small:
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise DataError(
                f"Group(s) {', '.join(small[:5])}{more} have fewer than {MIN_ROWS_PER_PARAM} "
                f"rows per parameter (d = {d}: {need:,} rows) for a model of their own. Leave "
                "them out of the fit and personalise to each afterwards with adapt(X, y) on "
                "its rows, or use fewer features.")
        per_class = np.bincount(labels * K + codes, minlength=len(found) * K).reshape(-1, K)
        single = np.flatnonzero((per_class > 0).sum(axis=1) < 2)
        if single.size:
            which = ", ".join(f"{found[i]!r} (all {classes[int(np.argmax(per_class[i]))]!r})"
                              for i in single[:5])
            raise DataError(f"Group(s) {which} hold one class only: no model of their own. "
                            "Leave them out of the fit and use adapt(X, y) for them.")
        tree = PartitionTree(p, K, std, seed=seed)
        tree.split_groups(tree.root, found)
        labels = labels.astype(np.int32)
        tree.count(labels)
        prof = profile_leaves(tree, Xm, codes, w, labels, seed=seed, feature_names=names)
        return tree, labels, prof

    def _given_partition(self, tree, Xm, codes, w, std, p, K, min_size, seed, names):
        if not isinstance(tree, PartitionTree):
            raise TypeError(f"partition must be a fedgrain PartitionTree. Got "
                            f"{type(tree).__name__} instead.")
        if tree.n_features != p or tree.n_classes != K:
            raise DataError(f"The partition was made for {tree.n_features} features and "
                            f"{tree.n_classes} classes; the data have {p} and {K}.")
        if tree.group_labels is not None:
            raise DataError("The partition sends rows to groups (a model fitted with groups=); "
                            "fit with fit(X, y, groups=...) instead.")
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

    def _fit_leaves(self, data, tree: PartitionTree, labels, prof: DataProfile,
                    backend: Backend, seed: int, clock: _Clock,
                    estimation: np.ndarray | None = None) -> None:
        Xm, codes, w = data.X, data.codes, data.weights
        p = Xm.shape[1]
        K = data.target.n_classes
        std = tree.standardizer
        names = parameter_names(data.schema.output_names, data.target.classes)
        sizes = tree.sizes
        sched = schedule(sizes, len(names), backend.n_workers, groups=tree.siblings(),
                         row_bytes=(p + 2) * 8)
        self._warn_small_leaves(sizes, len(names), tree.n_leaves)
        settings = self._engine_settings(K)
        units = leaf_units(tree)
        region_of = tree.region_of()
        rows = None if estimation is None else _rows_by_leaf(labels, estimation, tree.n_leaves)
        refs = []
        try:
            clock.lap("schedule")
            refs = build_shards(backend, Xm, codes, w, labels, tree.n_leaves, std)
            clock.lap("place leaves")
            run = fit_partition(backend, refs, sched, settings, leaf_seeds(tree, seed),
                                names=names, sizes=sizes, units=units, rows=rows,
                                local_settings=_own_fits(settings.local, region_of))
            if not run.converged:
                warn(f"The refinement rounds did not converge in refine_rounds="
                     f"{self.refine_rounds} rounds: the global model is not yet the composite "
                     "fit on all rows (where the leaves differ a lot, more rounds are needed); "
                     "increase refine_rounds.", ConvergenceWarning)
            regions = region_estimates(backend, refs, sched, run, region_of, settings,
                                       names=names, sizes=sizes, units=units, rows=rows)
            clock.lap("fit leaves and pool")
            n_fitted = float(sizes.sum() if estimation is None else estimation.sum())
            learned = meta_rounds(backend, refs, sched, run, region_of, tree.leaves, p,
                                  n_fitted, leaf_seeds(tree, seed, tag=1),
                                  self._meta_config(),
                                  class_counts=np.bincount(codes, weights=w, minlength=K))
            if self.meta != "none":
                clock.lap("meta-learning")
        finally:
            backend.release(refs)
        pooled = summarise(run, std, sizes, settings, feature_names=data.schema.output_names,
                           classes=data.target.classes, title=GLOBAL_TITLE)
        self.global_model_ = GlobalModel.of(data.schema, data.target, pooled)
        self.partition_ = tree
        self.n_leaves_ = tree.n_leaves
        self.schedule_ = sched
        self.n_iter_ = pooled.n_iter
        self._set_fitted(data.schema, data.target, pooled.results.params, pooled.results.cov,
                         pooled.results)
        self.history_, self.events_ = learned.history, learned.events
        self.meta_state_ = learned.state
        self.meta_model_ = self._meta_model(learned.state.theta, run.cov)
        table = self._leaf_table(tree, run, regions, learned.personal, names, prof)
        prof.cover(tree, Xm, labels)  # no training row is unseen
        self.profile_ = prof
        self._contributions = list(run.contributions)
        # personalised leaves adapt on every row of their leaf: no honest count to report
        honest = estimation is not None and learned.personal is None
        self._estimation_rows = {} if not honest else {
            int(nid): int(c) for nid, c in zip(
                tree.leaves, np.bincount(labels[estimation], minlength=tree.n_leaves),
                strict=True)}
        self._warn_unsettled(run.fits, tree.leaves, region_of, regions)
        self._set_leaves(table)
        self.effective_granularity_ = self._effective_granularity(0)
        self.reference_excess_ = self._reference_excess(Xm, codes, labels, estimation)
        clock.lap("results")

    def _reference_excess(self, Xm, codes, labels, estimation) -> dict[int, float]:
        """Each leaf's mean standardised excess loss (:func:`fedgrain.monitor.detectors.
        standardised_excess`) on its rows, at most :data:`REFERENCE_ROWS` of them evenly spaced
        (the estimation rows of an honest tree): the level its model had when fitted, which
        the stream's reference CUSUM is measured against."""
        n = codes.shape[0]
        pool = np.arange(n) if estimation is None else np.flatnonzero(estimation)
        if pool.shape[0] > REFERENCE_ROWS:
            pool = pool[np.linspace(0, pool.shape[0] - 1, REFERENCE_ROWS).round().astype(int)]
        Xe = take_rows(Xm, pool)
        lab = labels[pool]
        u = standardised_excess(class_proba(*self._leaves.routed(Xe, lab, None,
                                                                   self.results_.params)),
                                codes[pool])
        sums = np.bincount(lab, weights=u, minlength=self.n_leaves_)
        counts = np.bincount(lab, minlength=self.n_leaves_)
        return {int(nid): float(sums[i] / counts[i]) if counts[i] else 0.0
                for i, nid in enumerate(self.partition_.leaves)}

    def _mean_excess(self, Xs: np.ndarray, codes: np.ndarray, nid: int) -> float:
        """The leaf's mean standardised excess on these standardised rows, under its model."""
        pos = self.partition_.leaves.index(nid)
        theta, _, _ = self._leaf_standardised_at(pos)
        p = Xs.shape[1]
        return float(np.mean(standardised_excess(class_proba(Xs @ theta[:p], theta[p:]),
                                                 codes)))

    def _global_point(self) -> np.ndarray:
        """The global model's point in the standardised coordinates (its parts' pool)."""
        return combine(self._contributions, self.variance)[0]

    def _leaf_standardised_at(self, pos: int):
        """Leaf ``pos``'s model in the standardised coordinates ``(theta, cov, free)``;
        ``free`` marks the parameters it identifies (not filled in from the global model)."""
        std = self.partition_.standardizer
        d = self.cov_.shape[0]
        Tinv = np.linalg.inv(std.jacobian(d - std.mean.shape[0]))
        theta = Tinv @ self._leaves.params[pos]
        cov = Tinv @ self._leaves.covs[pos] @ Tinv.T
        names = parameter_names(self.schema_.output_names, self.target_.classes)
        free = np.ones(d, dtype=bool)
        for note in self._leaves.notes[pos]:
            if note in names:
                free[names.index(note)] = False
        return theta, 0.5 * (cov + cov.T), free

    def _leaf_standardised(self, region: int):
        """:meth:`_leaf_standardised_at` for the first leaf of a region (pieces share its
        model)."""
        return self._leaf_standardised_at(int(np.flatnonzero(
            self.partition_.region_of() == region)[0]))

    def _follow_leaves(self, served: dict, parts: dict) -> None:
        """A batch's continuous update: leaf positions' served models (standardised ``(theta,
        cov)``) and their new parts of the global model; the global model pooled from the
        parts (:func:`fedgrain.inference.contributions.combine`)."""
        std = self.partition_.standardizer
        old = self._leaves  # replaced, not written into: a failed batch restores it
        self._leaves = LeafTable(list(old.ids), old.params.copy(), old.covs.copy(),
                                 list(old.notes))
        self.local_models_ = list(self.local_models_)
        for pos, (theta, cov) in served.items():
            params, cov = std.to_raw_model(theta, cov)
            self._leaves.params[pos] = params
            self._leaves.covs[pos] = 0.5 * (cov + cov.T)
            self._leaf_model_at(pos)
        for pos, part in parts.items():
            self._contributions[pos] = part
        if parts:
            est, cov = combine(self._contributions, self.variance)
            self._set_global(est, cov, GLOBAL_TITLE + " (following the stream)")

    @staticmethod
    def _leaf_table(tree: PartitionTree, run, regions: dict, personal, names: list[str],
                    prof: DataProfile) -> LeafTable:
        """Each leaf's model on the original scale: the meta-learner's personalised one, its
        region's pooled and refined one, the global one (one region), or its own converged
        fit with what it does not identify filled in from the global model."""
        region_of, std = tree.region_of(), tree.standardizer
        p = std.mean.shape[0]
        one_region = np.unique(region_of).shape[0] == 1
        params_, covs, notes = [], [], []
        for pos, nid in enumerate(tree.leaves):
            if personal is not None:  # the meta-learner's personalised (or global) model
                (est, cov), filled = personal[pos], []
            elif int(region_of[pos]) in regions:
                (est, cov), filled = regions[int(region_of[pos])], []
            elif one_region:  # its model is the global one
                (est, cov), filled = (run.estimate, run.cov), []
            else:
                est, cov, filled = leaf_view(run.fits[pos], run.estimate, run.cov, p)
            params, cov = std.to_raw_model(est, cov)
            params_.append(params)
            covs.append(0.5 * (cov + cov.T))
            notes.append([names[j] for j in filled])
            prof.with_importance(nid, est[:p], std.scale)
        return LeafTable(list(tree.leaves), np.array(params_), np.array(covs), notes)

    def _warn_unsettled(self, fits, leaves, region_of, regions) -> None:
        """Leaves whose own model kept its one-step de-biased estimate: Newton steps from it
        did not settle (nearly separated classes in the leaf, or a flat direction)."""
        bad = [nid for f, nid, r in zip(fits, leaves, region_of, strict=True)
               if f.polished is False and int(r) not in regions]
        if bad:
            warn(f"The model of leaf(s) {bad} did not converge from its de-biased start (the "
                 "classes are nearly separated there, or a direction is flat); it keeps the "
                 "one-step estimate, whose intervals may be too narrow. Use a larger "
                 "min_subset_size or fewer features.", UserWarning)

    def _warn_small_leaves(self, sizes, d: int, n_leaves: int) -> None:
        need = ROWS_PER_PARAM_FOR_ROUNDS.get(self.refine_rounds, 0) * d
        if n_leaves > 1 and sizes.min() < need:
            warn(f"Leaves of {int(sizes.min()):,} rows have fewer than "
                 f"{need // d} rows per parameter (d = {d}): with "
                 f"refine_rounds={self.refine_rounds} the pooled (global) estimate keeps part of "
                 "their finite-sample bias. Use a larger refine_rounds or min_subset_size.",
                 UserWarning)

    def _meta_model(self, theta: np.ndarray, cov_std: np.ndarray) -> LeafModel:
        """The meta-learned global parameters as a model (the pooled one for meta="none").

        Its covariance is the pooled model's, a stand-in once ``theta`` has moved from it.
        """
        params, cov = self.partition_.standardizer.to_raw_model(theta, cov_std)
        title = ("Pooled global model" if self.meta == "none" else
                 f"Meta-learned global model ({self.meta})")
        return LeafModel.of(-1, self.schema_, self.target_, params, cov, title, {})

    def _set_leaves(self, table: LeafTable) -> None:
        """The leaves' models (``local_models_``) from a table in the tree's leaf order."""
        self._leaves = table
        self.local_models_ = [None] * len(table.ids)
        sizes = self.partition_.sizes
        for pos in range(len(table.ids)):
            self._leaf_model_at(pos, int(sizes[pos]))

    def _leaf_model_at(self, pos: int, rows: int | None = None) -> None:
        """``local_models_[pos]`` from the table's row ``pos`` (``rows``: its training rows,
        when the caller has them at hand)."""
        table = self._leaves
        nid = table.ids[pos]
        rows = int(self.partition_.sizes[pos]) if rows is None else rows
        info = {"Leaf": nid, "Rows": f"{rows:,}"}
        honest = self._estimation_rows.get(nid)
        if honest is not None:
            info["Rows estimating it"] = f"{honest:,} (the others chose the splits)"
        if table.notes[pos]:
            info["Not identified in the leaf"] = ", ".join(table.notes[pos])
        self.local_models_[pos] = LeafModel.of(nid, self.schema_, self.target_,
                                               table.params[pos], table.covs[pos],
                                               f"Leaf {nid} model", info)

    def stability(self, X, y, sample_weight=None, *, n_resamples: int = 5,
                  fraction: float | None = None, random_state: int = 0):
        """How stable the partition is: the tree grown again on ``n_resamples`` random parts
        of these rows (the share it was grown on), its regions compared by the adjusted Rand
        index (:func:`fedgrain.partition.growth.measure_stability`). Kept as
        ``partition_.stability_`` and shown in the report. Costs ``n_resamples`` tree
        growths, no leaf fits.

        Examples
        --------
        >>> from fedgrain import AdaptiveFederatedOrdinal
        >>> from fedgrain.datasets import make_regions
        >>> X, y, *_ = make_regions(4000, n_regions=2, random_state=0)
        >>> af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
        >>> af.stability(X, y).ari > 0.9
        True
        """
        check_is_fitted(self, "coef_")
        self._no_groups("stability", "the groups are given, not grown")
        return measure_stability(self.partition_, self.encode(X),
                                 self.target_.encode(y, what="y"), sample_weight,
                                 n_resamples=n_resamples, fraction=fraction,
                                 random_state=random_state)

    def refresh_profile(self, X, y, sample_weight=None) -> DataProfile:
        """Profile the leaves again from new labelled rows (``profile_``, updated in place).

        Rows go to their leaves as in prediction; leaves that receive none keep their profile.
        """
        self._no_groups("refresh_profile", "fit again")
        Xe = self.encode(X)
        codes = self.target_.encode(y, what="y")
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        self._route(Xe)  # the partition must still be the fitted one
        self.profile_.refresh(self.partition_, Xe, codes, w)
        return self.profile_

    # ---- prediction: each row by its leaf's model ---------------------------------------------
    @dask_parts.partitionwise(dask_parts.leaves_meta)
    def apply(self, X, groups=None) -> np.ndarray:
        """The leaf of each row, by its id: the node id that ``partition_.describe()``, the
        leaves' models (``leaf_model(id)``, ``LeafModel.leaf``), ``evaluate``, the report,
        warnings and stream events use (``leaf_ids_`` lists them in the order of
        ``local_models_``).

        Rows of a region dealt out into random pieces go to a piece by a fixed pseudo-random
        function of the row, not by the class-stratified deal of the training rows (use
        ``partition_.route(X_encoded, class_codes)`` for that); the pieces share one model, so
        predictions do not depend on which. On a model fitted with ``groups``, a row goes to
        its group's leaf (``groups``: one label per row, or a column of the DataFrame ``X``);
        a row of a group the fit did not see, or every row without ``groups``, to none: -1
        (the global model predicts it).
        """
        pos = self._leaf_positions(X, groups)
        ids = self.leaf_ids_
        return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)

    def _leaf_positions(self, X, groups=None) -> np.ndarray:
        """Each row's position in ``local_models_`` (-1: none)."""
        X, groups = self._groups_of(X, groups)
        return self._route(self.encode(X), groups)

    @property
    def leaf_ids_(self) -> np.ndarray:
        """The leaves' ids (node ids), in the order of ``local_models_``."""
        check_is_fitted(self, "partition_")
        return np.asarray(self.partition_.leaves, dtype=np.int64)

    def leaf_model(self, leaf: int) -> LeafModel:
        """The model of the leaf with this id (as :meth:`apply` gives it)."""
        ids = self.leaf_ids_.tolist()
        if leaf not in ids:
            raise DataError(f"No leaf {leaf!r}; the leaves are {ids}.")
        return self.local_models_[ids.index(leaf)]

    def _no_groups(self, what: str, instead: str) -> None:
        """A :class:`DataError` for ``what`` on a model fitted with groups."""
        if hasattr(self, "partition_") and self.partition_.group_labels is not None:
            raise DataError(f"{what} is not available on a model fitted with groups "
                            f"(federated sites); {instead}.")

    @property
    def groups_(self) -> list[str] | None:
        """The groups the model was fitted on (as text), one leaf each; None without groups."""
        check_is_fitted(self, "coef_")
        return self.partition_.group_labels

    def _groups_of(self, X, groups):
        """``(X, labels)`` for a prediction: the labels checked (taken from ``X``'s column when
        named); groups given to a model fitted without them is an error."""
        if groups is None:
            return X, None
        check_is_fitted(self, "coef_")
        if self.partition_.group_labels is None:
            raise DataError("This model was fitted without groups; predict without groups=, "
                            "or fit with fit(X, y, groups=...).")
        X, groups = split_groups_column(X, groups)
        return X, groups

    def _route(self, Xe: np.ndarray, groups=None) -> np.ndarray:
        if self.partition_.leaves != self._leaves.ids:
            raise ValueError(
                "partition_ was changed (split or merged) after fitting, so its leaves no longer "
                "match local_models_; fit again, or fit(X, y, partition=...) with the new tree.")
        if groups is None:
            return self.partition_.route(Xe)
        groups = check_groups(groups, Xe.shape[0])
        leaf = self.partition_.route(Xe, groups=groups)
        unknown = leaf < 0
        if unknown.any():
            names = sorted(set(groups[unknown].tolist()))
            shown = ", ".join(repr(g) for g in names[:5]) + (" ..." if len(names) > 5 else "")
            warn(f"{int(unknown.sum()):,} row(s) belong to group(s) the model was not fitted on "
                 f"({shown}; the fitted groups are compared as text, e.g. "
                 f"{self.partition_.group_labels[0]!r}): the global model predicts them.",
                 UserWarning)
        return leaf

    @dask_parts.partitionwise(dask_parts.flags_meta)
    def unseen(self, X, groups=None) -> np.ndarray:
        """Which rows lie outside the region their leaf was trained on (predicted by the
        global model instead, with a meta-learner): some feature lies outside its leaf's range
        (``profile_``) by more than a quarter of that range
        (:func:`fedgrain.federation.leaves.unseen_rows`). A row that reaches no leaf (an
        unknown group) is unseen."""
        X, groups = self._groups_of(X, groups)
        Xe = self.encode(X)
        return self._unseen(Xe, self._route(Xe, groups))

    def _unseen(self, Xe: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        return unseen_rows(Xe, leaf, [self.profile_[nid] for nid in self.partition_.leaves])

    def _falls_back(self, Xe: np.ndarray, leaf: np.ndarray) -> np.ndarray | None:
        """Rows the meta-learned global model predicts: unseen ones, with a meta-learner (with
        ``meta="none"`` every row keeps its leaf's fit, as the partition alone decides)."""
        return None if self.meta == "none" else self._unseen(Xe, leaf)

    def _routed_encoded(self, Xe: np.ndarray, leaf: np.ndarray):
        """Each row's linear predictor and thresholds: its leaf's model, or for rows of an
        unseen region the (meta-learned) global model."""
        return self._leaves.routed(Xe, leaf, self._falls_back(Xe, leaf),
                                   self.meta_model_.results_.params)

    def _routed(self, X, groups=None):
        X, groups = self._groups_of(X, groups)
        Xe = self.encode(X)
        return self._routed_encoded(Xe, self._route(Xe, groups))

    @dask_parts.partitionwise(dask_parts.linear_meta)
    def predict_linear(self, X, groups=None) -> np.ndarray:
        """``x @ coef`` with each row's leaf coefficients (the global model's for unseen rows
        when there is a meta-learner, and for rows of no known group)."""
        return self._routed(X, groups)[0]

    @dask_parts.partitionwise(dask_parts.proba_meta)
    def predict_proba(self, X, groups=None, *, order: str = "classes") -> np.ndarray:
        """Class probabilities from each row's leaf model, shape ``(n, K)``; with ``groups``
        (a model fitted on groups), each row's group's model. Columns in the order of
        ``classes_``, or of ``levels_`` with ``order="levels"``."""
        return self._ordered(class_proba(*self._routed(X, groups)), order)

    @dask_parts.partitionwise(dask_parts.cumulative_meta)
    def predict_cumulative_proba(self, X, groups=None) -> np.ndarray:
        return cumulative_proba(*self._routed(X, groups))

    @dask_parts.partitionwise(dask_parts.labels_meta)
    def predict(self, X, groups=None) -> np.ndarray:
        """The most probable level of each row (its leaf's, or its group's, model)."""
        proba = self.predict_proba(X, groups, order="levels")  # first: raises if not fitted
        return self.levels_[np.argmax(proba, axis=1)]

    def score(self, X, y, sample_weight=None, groups=None) -> float:
        """Accuracy of :meth:`predict` (with ``groups``: each row by its group's model)."""
        from sklearn.metrics import accuracy_score

        pred = self.predict(X, groups)
        self._warn_unknown_labels(y)
        return float(accuracy_score(y, pred, sample_weight=sample_weight))

    def predict_proba_ci(self, X, alpha: float = 0.05, groups=None, *,
                         order: str = "classes"):
        """Class probabilities with delta-method intervals, each row from its leaf model (the
        global model for unseen rows when there is a meta-learner, and rows of no known
        group); columns ordered as :meth:`predict_proba`'s."""
        X, groups = self._groups_of(X, groups)
        Xe = self.encode(X)
        leaf = self._route(Xe, groups)
        fallback = self._falls_back(Xe, leaf)
        which = leaf if fallback is None else np.where(fallback, -1, leaf)
        K = self.classes_.shape[0]
        out = [np.empty((Xe.shape[0], K)) for _ in range(3)]
        for pos in np.unique(which):
            rows = which == pos
            model = self.meta_model_ if pos < 0 else self.local_models_[pos]
            for o, v in zip(out, model.results_.predict_proba_ci(Xe[rows], alpha), strict=True):
                o[rows] = v
        return self._ordered(tuple(out), order)

    # ---- personalisation to new subsets -----------------------------------------------------
    def adapt(self, X, y, sample_weight=None) -> LeafModel:
        """A model personalised to a new subset from a few labelled rows.

        Newton steps, to convergence, from the meta-learned global parameters (``meta_model_``)
        on these rows, pulled toward them with the empirical-Bayes pull of the training leaves'
        spread (``adapt_pull_``, pseudo-rows: what the leaves' differences say a new region's
        model may differ by). So a handful of rows moves the model a little and many rows move
        it far; on data where the leaves do not differ the pull is huge and the result is the
        global model. Parameters the rows do not identify (an absent class, a constant
        feature) stay at the global value. Returns a :class:`LeafModel` whose covariance is
        the sandwich of the rows plus the global model's uncertainty carried by the pull.
        """
        Xe = self.encode(X)
        codes = self.target_.encode(y, what="y")
        if codes.shape[0] != Xe.shape[0]:
            raise DataError(f"adapt got {Xe.shape[0]:,} rows of X and {codes.shape[0]:,} "
                            "labels; give one label per row.")
        if Xe.shape[0] < 1:
            raise DataError("adapt needs at least one labelled row.")
        w = None
        if sample_weight is not None:
            w = np.asarray(sample_weight, dtype=float).reshape(-1)
            if w.shape[0] != Xe.shape[0] or not np.all(np.isfinite(w)) or np.any(w < 0) \
                    or not w.sum() > 0:
                raise DataError("sample_weight must hold one finite, non-negative weight per "
                                "row, not all zero.")
        std = self.partition_.standardizer
        Xs = np.ascontiguousarray(std.transform(Xe))
        est, cov = adapt_rows(Xs, codes, w, self.meta_state_, self._pooled_cov_std(),
                              self.classes_.shape[0])
        params, cov = std.to_raw_model(est, cov)
        return LeafModel.of(-1, self.schema_, self.target_, params, cov,
                            "Model adapted to new rows",
                            {"Rows": f"{Xe.shape[0]:,}",
                             "Pull (pseudo-rows)": f"{self.meta_state_.adapt_rho:.4g}"})

    @property
    def adapt_pull_(self) -> float:
        """The pull (pseudo-rows) ``adapt`` uses toward the meta-learned global model."""
        return float(self.meta_state_.adapt_rho)

    def _pooled_cov_std(self) -> np.ndarray:
        """The global model's covariance in the standardised coordinates."""
        p = self.schema_.n_features
        T = self.partition_.standardizer.jacobian(self.cov_.shape[0] - p)
        Tinv = np.linalg.inv(T)
        return Tinv @ self.cov_ @ Tinv.T

    @property
    def random_effects_(self) -> RandomEffects:
        """The random-effects summary of the regions' models (one per region: random pieces
        of a region share theirs), on the original scale."""
        check_is_fitted(self, "coef_")
        region = self.partition_.region_of()
        first = np.unique(region, return_index=True)[1]
        names = parameter_names(self.schema_.output_names, self.target_.classes)
        est = self._leaves.params[first].copy()
        for row, pos in enumerate(first):  # filled in from the global model: not the region's
            est[row, [names.index(n) for n in self._leaves.notes[pos] if n in names]] = np.nan
        return random_effects(est, self._leaves.covs[first], names, self.schema_.n_features)

    def summary(self, alpha: float = 0.05):
        """The global model's coefficient table, followed by the random-effects summary of
        the regions and a plain statement of what the global model is when they differ."""
        check_is_fitted(self, "coef_")
        out = self.results_.summary(alpha)
        re = self.random_effects_
        if re.n_regions < 2:
            return out
        return replace(out, notes=(*out.notes, re.statement()),
                       sections=(re.summary(statement=False),))

    # ---- streams ------------------------------------------------------------------------------
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Update the model with a labelled batch, watching each leaf for drift.

        On a model not fitted yet, the first batch fits it. ``classes`` (as scikit-learn passes
        it) must then be the levels of the labels if given. A bad batch (other columns, an
        unknown label, no rows) raises before anything changes, and an error while reacting to
        drift restores the model as it was before the batch. What happens to a batch is
        :class:`fedgrain.monitor.stream.DriftMonitor`'s. Returns ``self``.
        """
        if not hasattr(self, "coef_"):
            self.fit(X, y, sample_weight=sample_weight)
            if classes is not None and not np.array_equal(np.asarray(classes),
                                                          self.levels_):
                raise DataError(f"classes={list(classes)} differs from the levels of the labels "
                                f"{list(self.levels_)}; give levels=[...] for their order.")
            return self
        self._no_groups("partial_fit", "fit again on all the groups' rows")
        Xe = self.encode(X)
        if Xe.shape[0] == 0:
            raise DataError("The batch is empty; pass at least one row.")
        codes = self.target_.encode(y, what="y")
        if codes.shape[0] != Xe.shape[0]:
            raise DataError(f"The batch has {Xe.shape[0]:,} rows of X and {codes.shape[0]:,} "
                            "labels; give one label per row.")
        if sample_weight is not None:
            raise DataError("partial_fit takes unweighted rows; repeat rows instead of "
                            "weighting them.")
        leaf = self._route(Xe)  # raises if the partition changed
        saved = self._snapshot()
        try:
            DriftMonitor(self).take_batch(Xe, codes, leaf)
        except BaseException:
            self.__dict__.update(saved)
            raise
        return self

    def _snapshot(self) -> dict:
        """What a batch may change, copied, to restore if reacting to it fails."""
        out = copy.copy(self.__dict__)
        out["partition_"] = copy.deepcopy(self.partition_)
        out["profile_"] = copy.deepcopy(self.profile_)
        out["events_"] = list(self.events_)
        out["stream_"] = None if self.stream_ is None else self.stream_.snapshot()
        out["_estimation_rows"] = dict(self._estimation_rows)
        out["_contributions"] = list(self._contributions)
        return out

    def _fit_rows(self, X: np.ndarray, codes: np.ndarray, seed: int) -> LeafFit:
        """A leaf model fitted on these rows (a streaming refit, converged like the leaves of
        a fit; :func:`fedgrain.federation.personalise.fit_leaf_rows`), with the rows' part of
        the global model, evaluated when the leaf goes in (:meth:`_replace_leaves`)."""
        std = self.partition_.standardizer
        params, cov, notes = fit_leaf_rows(
            X, codes, std, self._engine_settings(self.classes_.shape[0]).local,
            self.meta_state_, self._pooled_cov_std(), self.meta,
            parameter_names(self.schema_.output_names, self.target_.classes), seed)
        return LeafFit(params, cov, notes, np.ascontiguousarray(std.transform(X)), codes)

    def _replace_leaves(self, models: dict, rows_seen: int) -> None:
        """Leaf models in the tree's current leaf order: ``models`` (``nid: (params, cov,
        notes)``) for new or changed leaves, the current ones for the rest; the global model
        with the replaced leaves' information swapped for the new ones'."""
        old = self._leaves
        leaves = self.partition_.leaves
        start = combine(self._contributions, self.variance)[0]  # the current global point
        parts = dict(zip(old.ids, self._contributions, strict=True))
        parts.update({nid: None for nid in models})  # evaluated by the re-pooling
        self._contributions = [parts[nid] for nid in leaves]
        # refitted on stream rows (no split was chosen on them), or gone
        self._estimation_rows = {n: c for n, c in self._estimation_rows.items()
                                 if n in leaves and n not in models}
        changed = bool(models) or list(old.ids) != list(leaves)
        self._set_leaves(old.replace(leaves, {n: tuple(m[:3]) for n, m in models.items()}))
        self.n_leaves_ = len(leaves)
        if changed:
            self._repool({leaves.index(n): (m.X, m.codes) for n, m in models.items()}, start)
        self.effective_granularity_ = self._effective_granularity(rows_seen)

    def _repool(self, new_rows: dict, start: np.ndarray) -> None:
        """The global model pooled again from the current leaves' parts of the composite
        likelihood (:func:`fedgrain.inference.contributions.repool`): the same pooling as at
        fit time, with the replaced leaves' new rows in place of their old ones; the new rows
        are at hand, so they are evaluated again at each point (damped Newton steps from the
        last global model, converged like the refinement rounds of a fit)."""
        meat = local.meat_kind(self.variance)

        def rows_at(Xs, codes):
            return lambda x: local.evaluate_local(Xs, codes, None, x, meat)

        est, cov, self._contributions = repool(
            self._contributions, {pos: rows_at(*r) for pos, r in new_rows.items()}, start,
            self.variance, tol=REFINE_TOL, max_steps=int(self.refine_rounds))
        self._set_global(est, cov, GLOBAL_TITLE + " (leaves replaced on the stream)")

    def _set_global(self, est: np.ndarray, cov: np.ndarray, title: str) -> None:
        """The global model from its standardised estimate and covariance."""
        params, cov = self.partition_.standardizer.to_raw_model(est, cov)
        fit = self.global_model_.pooled_fit_.with_model(params, cov, title)
        self._set_fitted(self.schema_, self.target_, params, cov, fit.results)
        self.global_model_ = GlobalModel.of(self.schema_, self.target_, fit)

    def _stream_min_size(self) -> int:
        return int(self.min_subset_size or MIN_LEAF_ROWS_PER_PARAM * self.cov_.shape[0])

    def _effective_granularity(self, rows_seen: int) -> float:
        regions = np.unique(self.partition_.region_of()).shape[0]
        rows = int(self.partition_.nodes[0].n_rows) + rows_seen
        scale = np.log(max(rows / self._stream_min_size(), 2.0))
        return float(np.clip(np.log(regions) / scale, 0.0, 1.0))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False, key: str | bytes | None = None,
             stream_rows: bool = True) -> Path:
        """Save the model (see :meth:`OrdinalModel.save`). A model that has followed a stream
        keeps each leaf's most recent raw rows (up to 20,000 per leaf: features and labels) to
        refit from after a change; ``stream_rows=False`` saves without them (the loaded model
        monitors as before, and a refit then waits for new rows)."""
        from ..persist import write_model_dir

        meta, arrays = self._save_state()
        if not stream_rows:
            arrays = {k: v for k, v in arrays.items() if not _RAW_ROWS.fullmatch(k)}
        return write_model_dir(path, meta, arrays, overwrite=overwrite, key=key)

    def _extra_state(self):
        g_meta, g_arrays = self.global_model_._extra_state()
        m_meta, m_arrays = self.meta_state_.to_dict()
        p_meta, p_arrays = self.profile_.to_state()
        s_meta, s_arrays = (None, {}) if self.stream_ is None else self.stream_.to_dict()
        meta_ = {"estimation_rows": {str(k): v for k, v in self._estimation_rows.items()},
                 "tree": self.partition_.to_dict(), "profile_state": p_meta,
                 "schedule": self.schedule_.to_dict(), "global": g_meta,
                 "leaf_notes": self._leaves.notes, "timings": dict(self.timings_),
                 "effective_granularity": float(self.effective_granularity_),
                 "reference_excess": {str(k): v for k, v in self.reference_excess_.items()},
                 "history": self.history_, "events": self.events_, **m_meta,
                 "stream": s_meta}
        arrays = {**s_arrays, **m_arrays, **p_arrays,
                  "meta_params": self.meta_model_.results_.params,
                  "meta_cov": self.meta_model_.cov_,
                  "leaf_params": self._leaves.params, "leaf_cov": self._leaves.covs,
                  **{f"contrib_{k}": v for k, v in stack(self._contributions).items()},
                  **{f"global_{k}": v for k, v in g_arrays.items()}}
        return meta_, arrays

    def _restore_contributions(self, arrays) -> list[Contribution]:
        """The leaves' parts of the global model; for a model saved without them, the global
        model's information shared out by leaf size (pooling them gives the saved global
        model; a leaf replaced on a stream then swaps its share for its new rows')."""
        if "contrib_target" in arrays:
            parts = unstack({k: arrays[f"contrib_{k}"] for k in ("target", "hess", "meat")})
            if len(parts) != self.n_leaves_:
                raise ValueError("the leaves' contributions do not match the partition")
            return parts
        p = self.schema_.n_features
        T = self.partition_.standardizer.jacobian(self.cov_.shape[0] - p)
        Tinv = np.linalg.inv(T)
        whole = Contribution.of_model(Tinv @ self.results_.params, Tinv @ self.cov_ @ Tinv.T)
        shares = self.partition_.sizes / self.partition_.sizes.sum()
        return [Contribution(a * whole.target, a * whole.hess, a * whole.meat) for a in shares]

    def _restore_extra(self, meta_, arrays):
        self.partition_ = PartitionTree.from_dict(meta_["tree"])
        self.profile_ = (DataProfile.from_dict(meta_["profile"]) if "profile" in meta_ else
                         DataProfile.from_state(meta_["profile_state"], arrays))
        if set(self.profile_.leaves) - set(self.partition_.leaves):
            raise ValueError("the saved profile describes leaves the saved tree does not have")
        self.schedule_ = Schedule.from_dict(meta_["schedule"])
        self.n_leaves_ = self.partition_.n_leaves
        gm = GlobalModel()
        gm._set_fitted(self.schema_, self.target_, self.results_.params, self.cov_,
                       self.results_)
        gm._restore_extra(meta_["global"], {k[len("global_"):]: v for k, v in arrays.items()
                                            if k.startswith("global_")})
        self.global_model_ = gm
        self.n_iter_ = gm.n_iter_
        self.timings_ = dict(meta_["timings"])
        self.effective_granularity_ = float(meta_["effective_granularity"])
        self.reference_excess_ = {int(k): float(v) for k, v in
                                  meta_.get("reference_excess", {}).items()}
        self.history_, self.events_ = list(meta_["history"]), list(meta_["events"])
        self.meta_state_ = MetaState.from_dict(meta_, arrays)
        self.meta_model_ = LeafModel.of(-1, self.schema_, self.target_, arrays["meta_params"],
                                        arrays["meta_cov"], "Pooled global model"
                                        if self.meta == "none" else
                                        f"Meta-learned global model ({self.meta})", {})
        L, d = self.n_leaves_, self.results_.params.shape[0]
        if arrays["leaf_params"].shape != (L, d) or arrays["leaf_cov"].shape != (L, d, d):
            raise ValueError("the leaf arrays do not match the partition")
        self._estimation_rows = {int(k): int(v) for k, v in
                                 meta_.get("estimation_rows", {}).items()}
        self._set_leaves(LeafTable(list(self.partition_.leaves), arrays["leaf_params"],
                                   arrays["leaf_cov"], meta_["leaf_notes"]))
        self._contributions = self._restore_contributions(arrays)
        self.stream_ = None
        if meta_.get("stream") is not None:
            self.stream_ = DriftMonitor.new_state(self)
            self.stream_.load(meta_["stream"], arrays)


def _own_fits(settings, region_of: np.ndarray) -> list:
    """Each piece's fit settings: converged (``polish_rounds``) where the piece is a region's
    whole model (a region alone in its piece, when there are several regions); elsewhere the
    region's pooled and refined model is reported, and the one-step fit only starts it."""
    regions, count = np.unique(region_of, return_counts=True)
    alone = dict(zip(regions.tolist(), (count == 1).tolist(), strict=True))
    plain = replace(settings, polish_rounds=0)
    many = regions.shape[0] > 1
    return [settings if many and alone[int(r)] else plain for r in region_of]


def _rows_by_leaf(labels: np.ndarray, keep: np.ndarray, n_leaves: int) -> list[np.ndarray]:
    """Each leaf's selection of its rows (``keep``), in shard row order (the rows' order),
    packed for the tasks."""
    order = np.argsort(labels, kind="stable")
    cuts = np.cumsum(np.bincount(labels, minlength=n_leaves))[:-1]
    return [local.pack_rows(keep[idx]) for idx in np.split(order, cuts)]


class LeafFit(NamedTuple):
    """A leaf model fitted on stream rows: raw parameters, covariance, names filled in from
    the global model, and the rows' part of the global model."""

    params: np.ndarray
    cov: np.ndarray
    notes: list
    X: np.ndarray  # the rows, standardised, and their codes: the leaf's part of the global
    codes: np.ndarray  # model is evaluated from them at each point of the re-pooling


class _Clock:
    """Wall time of the phases of a fit, in seconds (``timings_``)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now
