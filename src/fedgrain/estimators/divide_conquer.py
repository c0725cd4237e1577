"""Divide-and-conquer ordinal regression (US patent 11269974) with a refinement round."""

from __future__ import annotations

from dataclasses import replace

from sklearn.utils import check_random_state

from .. import progress
from .._warnings import warn
from ..backends import get_backend
from ..core.links import LINKS
from ..core.standardize import fit_standardizer
from ..data import prepare_data
from ..data.streamed import is_streamed, open_streamed
from ..exceptions import DataError, ParameterError
from ..federation import rowgroups
from ..federation.engine import (
    ROWS_PER_PARAM_FOR_ROUNDS,
    fit_partition,
    resolve_subsets,
    summarise,
)
from ..federation.schedule import schedule
from ..federation.shards import build_shards, route_rows
from ..inference import local
from ..inference.results import parameter_names
from ..partition.growth import leaf_seeds
from ..partition.tree import PartitionTree
from .base import is_int, param_error, register
from .models import PooledModel

#: What else fixes a refused division by row groups (by the reason's start).
_FIX = {"the data": ", or write the files with smaller row groups (pyarrow's row_group_size)",
        "a subset": ", fewer subsets, or smaller row groups"}


@register
class DivideConquerOrdinal(PooledModel):
    """Divide-and-conquer ordinal regression with valid inference (US patent 11269974).

    The rows are divided at random, stratified by class, into ``n_subsets`` subsets (large
    Parquet data: into sets of whole row groups, read by the workers; see ``division``). On each,
    in parallel, an L1-penalised cumulative-logit model is fitted on the implicitly expanded
    binary problem and de-biased by one Newton step; each estimate is weighted by its robust
    (cluster-sandwich) inverse variance and the estimates are pooled. A refinement round
    (``refine_rounds=1``, the default) then takes one global Newton step from the pooled
    estimate, which removes the subsets' finite-sample bias; more rounds (``refine_rounds`` is a
    maximum) stop once a step moves no parameter more than 0.01 standard errors;
    ``refine_rounds=0`` is the patent's one-shot method.

    Parameters
    ----------
    n_subsets : int or None
        Number of subsets; by default the number of workers, reduced when the data are too
        small for that many subsets.
    alpha : {"rate", "cv", "bic"} or float
        L1 penalty per subset on the per-row scale: ``"rate"`` is ``0.5 sqrt(log(d) / n_m)``,
        ``"cv"`` picks it by stratified K-fold deviance, ``"bic"`` by BIC along a path; a float
        fixes it (0 for no penalty).
    variance : {"cluster", "sandwich", "model"}
        Cluster sandwich over original rows (valid for the composite likelihood), row-level
        sandwich, or model-based ``H^-1``; the last two under-cover and exist for study.
    backend : {"processes", "serial"} or Backend
        With ``"processes"``, each subset's rows are copied, standardised, into shared memory
        for the workers (the data then take about twice their size in RAM), unless ``X``
        already lies in a buffer the workers can map: a ``numpy.memmap`` /
        ``np.load(path, mmap_mode="r")`` of a file, an array over a
        ``multiprocessing.shared_memory.SharedMemory``, or :func:`fedgrain.shared_rows`. Then
        the subsets are views of it (each worker standardises its rows as it reads them) and
        the model is the same to the last bit (docs/guide.md, "Scale");
        ``ProcessesBackend(views=False)`` copies them all the same (faster, where memory
        allows).
    n_jobs : int or None
        Worker processes for ``backend="processes"`` (default: all CPUs).
    random_state : int, RandomState or None
        Seeds the division into subsets and the cross-validation folds.
    refine_rounds : int
        Global Newton steps after pooling (method.md 4b); 0 reproduces the one-shot method.
    debias : {"auto", "inverse", "nodewise"}
        How each subset's inverse Hessian is formed: ``"inverse"`` is ``H^-1``; ``"nodewise"``
        the nodewise lasso; ``"auto"`` takes the nodewise lasso when the subset's standardised
        Hessian is ill-conditioned (too few rows for its d, or collinear features) and the
        exact inverse otherwise.
    ridge : float
        Ridge stabiliser ``H + ridge * n_m * I`` for ``debias="inverse"``.
    penalize_thresholds : bool
        Penalise the thresholds too (the patent claim's literal text); off by default.
    device : {None, "cuda", "cuda:N", "cpu"}
        Run each subset's composite passes with PyTorch on this device (with
        ``backend="serial"``, logit link): the subsets take turns on it, and the model equals
        the CPU one to 1e-8.
    link : {"logit", "probit", "cloglog", "loglog", "cauchit"}
        The cumulative link, as in :class:`OrdinalRegression`: every subset fits the
        composite likelihood with this link (the binary rows ``P(Y > k | x) =
        1 - F(theta_k - x'beta)``) and the pooled model predicts with it.
    levels, categorical : see :class:`OrdinalRegression`
    cv_folds : int
        Folds for ``alpha="cv"``.
    max_iter, tol : solver settings of each subset's proximal Newton.
    division : {"auto", "rows", "row_groups"}
        How data read from Parquet files (a path or a ``DatasetSource``) are divided.
        ``"rows"``: at random, stratified by class, row by row, as in memory (the fitting
        process reads every row and copies it into its subset's file). ``"row_groups"``: each
        subset is a set of whole Parquet row groups, dealt out at random with the sizes
        balanced, and each worker reads, checks, encodes and writes its own subset, so no row
        passes through the fitting process (much faster on large data; the subsets are then
        not stratified by class, see ``docs/operations.md``). ``"auto"`` (default) divides
        by row groups from 10,000,000 rows when there are at least 4 row groups a subset, the
        data are Parquet files without a filter and the workers read this machine's files;
        by rows otherwise. Arrays and frames in memory are always divided by rows, and so are
        files fitted with ``sample_weight`` or with ``y`` as an array (read into memory;
        ``"row_groups"`` is then an error).

    Attributes
    ----------
    classes_, coef_, thresholds_, cov_, bse_, results_ : see the module docstring
    n_subsets_ : int
    subset_sizes_ : ndarray of int
    subset_estimates_ : ndarray of shape (n_subsets_, d)
        Each subset's de-biased estimate on the original scale (NaN where not identified).
    subset_lasso_estimates_ : ndarray of shape (n_subsets_, d)
        Each subset's L1-penalised fit before de-biasing (for study: their plain average is
        the naive, biased combination that de-biasing and pooling improve on).
    subset_alphas_ : ndarray
    n_iter_ : ndarray of int
        Proximal Newton iterations of each subset's lasso fit.
    q_, q_df_, q_pvalue_, i2_ : heterogeneity of the one-shot pooling (method.md 4)
    oneshot_results_ : OrdinalResults
        The patent's one-shot pooled estimate and covariance, before the refinement round
        (equal to ``results_`` when ``refine_rounds=0``), kept for comparison.

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain import DivideConquerOrdinal
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((4000, 3))
    >>> y = np.digitize(X @ [1.0, 0.0, -0.5] + rng.logistic(size=4000), [-1, 0, 1])
    >>> dc = DivideConquerOrdinal(n_subsets=4, backend="serial").fit(X, y)
    >>> dc.coef_.round(1)
    array([ 1. ,  0. , -0.5])
    """

    def __init__(self, n_subsets=None, alpha="rate", variance="cluster", backend="processes",
                 n_jobs=None, random_state=0, *, refine_rounds=1, debias="auto", ridge=0.0,
                 penalize_thresholds=False, levels=None, categorical=None, cv_folds=5,
                 max_iter=100, tol=1e-8, callback=None, link="logit", device=None,
                 division="auto"):
        self.n_subsets = n_subsets
        self.division = division
        self.link = link
        self.device = device
        self.alpha = alpha
        self.variance = variance
        self.backend = backend
        self.n_jobs = n_jobs
        self.random_state = random_state
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
        ns = self.n_subsets
        if ns is not None and (not is_int(ns) or ns < 1):
            raise param_error(type(self).__name__, "n_subsets", "an int >= 1 or None", ns)
        if self.link not in LINKS:
            raise param_error(type(self).__name__, "link", f"one of {LINKS}", self.link)
        if self.device is not None:
            from ..core.gpu import torch_device

            torch_device(self.device)
            name = getattr(self.backend, "name", self.backend)
            if name != "serial" or self.link != "logit":
                raise param_error(type(self).__name__, "device",
                                  "None unless backend='serial' and link='logit' (the subsets "
                                  "take turns on the one device)", self.device)
        self._validate_engine()
        rowgroups.check_division(self.division, type(self).__name__)

    def fit(self, X, y, sample_weight=None):
        """Divide, fit the subsets in parallel, pool, refine.

        ``y`` may name a column when ``X`` is a frame, table or file path. The path of a Parquet
        file or folder is streamed batch by batch, never loaded whole (data beyond memory; the
        same model as in memory; see ``docs/operations.md``). Rows in a shared buffer (a
        memory-mapped file, shared memory, :func:`fedgrain.shared_rows`) are not copied with
        the processes backend: see ``backend``.
        """
        # One BLAS thread here too: the server side only does d x d algebra, which threads slow
        # down, and the workers set their own limit.
        from ..core.gpu import device_of, on_host

        # rows on a GPU: the subsets' passes run there when they can (serial, logit)
        self._input_device = device_of(X) if self.device is None and self.link == "logit" \
            and getattr(self.backend, "name", self.backend) == "serial" else None
        X, y, sample_weight = on_host(X), on_host(y), on_host(sample_weight)
        with local.one_blas_thread(), progress.reporting(self.callback):
            return self._fit(X, y, sample_weight)

    def _fit(self, X, y, sample_weight):
        self._validate()
        owner = type(self).__name__
        head = data = None
        if self.division == "row_groups" and is_streamed(X) and (
                sample_weight is not None or not isinstance(y, str)):
            # asked for, and not done: an error, as for the other reasons (not silently rows)
            why = ("sample weights are read into memory with the rows"
                   if sample_weight is not None else
                   "y is given as an array, not as the name of the files' target column")
            raise ParameterError(
                f"{owner}(division='row_groups') cannot divide these files by row groups: "
                f"{why}; use division='rows' (or 'auto').")
        with progress.step("checking data"):
            if self.division != "rows" and is_streamed(X) and isinstance(y, str) and \
                    sample_weight is None:
                head = open_streamed(X, y, levels=self.levels, categorical=self.categorical,
                                     estimator_name=owner)
            else:
                data = prepare_data(X, y, levels=self.levels, categorical=self.categorical,
                                    sample_weight=sample_weight, estimator_name=owner)
        first = head if head is not None else data
        schema, target = first.schema, first.target
        n = head.source.n_rows if head is not None else data.X.shape[0]
        p = schema.n_features
        K = target.n_classes
        d = p + K - 1
        backend = get_backend(self.backend, self.n_jobs, owner=owner)
        own_backend = backend is not self.backend
        refs = []
        try:  # from here on the backend is closed whatever happens
            M = resolve_subsets(n, d, self.n_subsets, self._n_workers(backend),
                                self.refine_rounds, owner)
            self._warn_small_subsets(n, M, d)
            split_seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
            division = self._row_groups(head, backend, n, M, d, split_seed) \
                if head is not None else None
            if division is None and head is not None:
                with progress.step("checking data"):
                    data = head.scan()
            settings = self._engine_settings(K)
            names = parameter_names(schema.output_names, target.classes)
            if division is not None:  # the workers read their own row groups
                try:
                    refs, sizes, std = rowgroups.build_by_row_groups(backend, head,
                                                                     *division)
                except rowgroups.UnevenClasses as exc:
                    if self.division == "row_groups":
                        raise DataError(f"{exc} Divide them by rows (division='rows'), or "
                                        "shuffle the rows across the files.") from None
                    warn(f"{exc} Dividing them by rows instead (division='rows').",
                         UserWarning)
                    division = None
                    with progress.step("checking data"):
                        data = head.scan()
            if division is not None:
                tree = PartitionTree(p, K, std, split_seed)
                if M > 1:
                    tree.split_random(tree.root, M)
                tree.count_sizes(sizes)
                stratified = False
            else:
                Xm, codes, w = data.X, data.codes, data.weights
                tree = PartitionTree(p, K, fit_standardizer(Xm, w, data.moments), split_seed)
                if M > 1:
                    tree.split_random(tree.root, M)
                labels = route_rows(tree, Xm, codes)
                tree.count(labels)
                refs = build_shards(backend, Xm, codes, w, labels, M, tree.standardizer)
                # a byte or two a row: not held while the subsets fit
                del labels, codes, Xm, w, first
                data = None
                stratified = M > 1  # split_random deals every class out evenly
                if M > 1:  # a class-stratified division: Q's reference needs the within-class view
                    settings = replace(settings, local=replace(settings.local, within_class=True))
            sched = schedule(tree.sizes, d, backend.n_workers, row_bytes=(p + 2) * 8)
            run = fit_partition(backend, refs, sched, settings, leaf_seeds(tree, split_seed),
                                names=names, sizes=tree.sizes)
        finally:
            backend.release(refs)
            if own_backend:
                backend.close()
        self.division_ = "rows" if division is None else "row_groups"
        self._set_pooled(schema, target, summarise(
            run, tree.standardizer, tree.sizes, settings,
            feature_names=schema.output_names, classes=target.classes,
            title=f"Divide-and-conquer ordinal regression (cumulative {self.link})",
            stratified=stratified))
        return self

    def _row_groups(self, head, backend, n: int, M: int, d: int, seed: int):
        """The row groups and each subset's share of them when the data are divided by row
        groups (``division``), else None."""
        from ..federation.engine import MIN_ROWS_PER_PARAM

        owner = type(self).__name__
        if self.division == "auto" and n < rowgroups.AUTO_MIN_ROWS:
            return None
        reason = rowgroups.why_not(head.source, backend, None, M)
        groups = head.source.row_groups() if reason is None else []
        reason = reason or rowgroups.why_not(head.source, backend, len(groups), M)
        dealt = rowgroups.deal(groups, M, seed) if reason is None else []
        if reason is None and self.division == "auto" and \
                len(groups) < rowgroups.AUTO_GROUPS_PER_SUBSET * M:
            reason = "too few row groups"
        smallest = min((sum(groups[i].rows for i in g) for g in dealt), default=0)
        if reason is None and M > 1 and smallest < MIN_ROWS_PER_PARAM * d:
            reason = (f"a subset of whole row groups would hold only {smallest:,} rows, fewer "
                      f"than {MIN_ROWS_PER_PARAM} x d = {MIN_ROWS_PER_PARAM * d:,}")
        if reason is None:
            return groups, dealt
        if self.division == "row_groups":
            raise ParameterError(
                f"{owner}(division='row_groups') cannot divide '{head.source.shown}' by row "
                f"groups: {reason}; use division='rows' (or 'auto'){_FIX.get(reason[:8], '')}.")
        return None

    def _warn_small_subsets(self, n: int, M: int, d: int) -> None:
        need = ROWS_PER_PARAM_FOR_ROUNDS.get(self.refine_rounds, 0)
        if M > 1 and n / M < need * d:
            what = ("one-shot pooling (refine_rounds=0) is biased there"
                    if self.refine_rounds == 0 else
                    "one refinement round does not remove all of their bias")
            warn(
                f"Subsets of about {n // M:,} rows have fewer than {need} rows per parameter "
                f"(d = {d}); {what}. Use refine_rounds={self.refine_rounds + 1} or fewer "
                "subsets.", UserWarning)
