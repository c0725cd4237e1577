"""Divide-and-conquer ordinal regression (US patent 11269974) with a refinement round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from .. import progress
from .._warnings import warn
from ..backends import BACKENDS, Backend, get_backend
from ..backends.processes import resolve_n_jobs
from ..core.standardize import Standardizer, fit_standardizer
from ..data import prepare_data
from ..exceptions import DataError, IdentificationWarning, SeparationError, SubsetError
from ..federation.schedule import schedule
from ..federation.shards import build_shards, route_rows
from ..inference import local, pooling
from ..inference.results import OrdinalResults, parameter_names
from ..partition.growth import leaf_seeds
from ..partition.tree import PartitionTree
from .base import OrdinalModel, is_int, is_real, param_error, register

#: Every subset needs at least this many original rows per parameter (method.md 4b, 6).
MIN_ROWS_PER_PARAM = 5
#: Below this many rows per parameter in a subset, the pooled estimate keeps a bias that the
#: given number of refinement rounds does not remove (measured, docs/method.md: one round is
#: enough at 7.5 rows per parameter, not at 4.7). Two or more rounds converge to the
#: centralized fit from any subset size allowed.
ROWS_PER_PARAM_FOR_ROUNDS = {0: 40, 1: 6}



@register
class DivideConquerOrdinal(OrdinalModel):
    """Divide-and-conquer ordinal regression with valid inference (US patent 11269974).

    The rows are divided at random, stratified by class, into ``n_subsets`` subsets. On each,
    in parallel, an L1-penalised cumulative-logit model is fitted on the implicitly expanded
    binary problem and de-biased by one Newton step; each estimate is weighted by its robust
    (cluster-sandwich) inverse variance and the estimates are pooled. A refinement round
    (``refine_rounds=1``, the default) then takes one global Newton step from the pooled
    estimate, which removes the subsets' finite-sample bias; ``refine_rounds=0`` is the patent's
    one-shot method.

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
    levels, categorical : see :class:`OrdinalRegression`
    cv_folds : int
        Folds for ``alpha="cv"``.
    max_iter, tol : solver settings of each subset's proximal Newton.

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
                 max_iter=100, tol=1e-8, callback=None):
        self.n_subsets = n_subsets
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
        owner = type(self).__name__
        ns = self.n_subsets
        if ns is not None and (not is_int(ns) or ns < 1):
            raise param_error(owner, "n_subsets", "an int >= 1 or None", ns)
        a = self.alpha
        if not ((isinstance(a, str) and a in ("rate", "cv", "bic"))
                or (is_real(a) and np.isfinite(a) and a >= 0)):
            raise param_error(owner, "alpha", "'rate', 'cv', 'bic' or a float >= 0", a)
        if self.variance not in local.VARIANCES:
            raise param_error(owner, "variance", "'cluster', 'sandwich' or 'model'",
                               self.variance)
        if not (isinstance(self.backend, Backend) or self.backend in BACKENDS):
            raise param_error(owner, "backend", f"one of {BACKENDS} or a Backend instance",
                               self.backend)
        if self.n_jobs is not None and (not is_int(self.n_jobs) or self.n_jobs == 0):
            raise param_error(owner, "n_jobs", "a non-zero int or None", self.n_jobs)
        if not is_int(self.refine_rounds) or self.refine_rounds < 0:
            raise param_error(owner, "refine_rounds", "an int >= 0", self.refine_rounds)
        if self.debias not in local.DEBIAS:
            raise param_error(owner, "debias", "'auto', 'inverse' or 'nodewise'", self.debias)
        if not is_real(self.ridge) or not self.ridge >= 0:
            raise param_error(owner, "ridge", "a float >= 0", self.ridge)
        if not isinstance(self.penalize_thresholds, (bool, np.bool_)):
            raise param_error(owner, "penalize_thresholds", "a bool", self.penalize_thresholds)
        if not is_int(self.cv_folds) or self.cv_folds < 2:
            raise param_error(owner, "cv_folds", "an int >= 2", self.cv_folds)
        self._validate_solver(owner)

    def _resolve_subsets(self, n_rows: int, d: int, backend: Backend,
                         owner: str | None = None) -> int:
        """The number of subsets: ``n_subsets``, or by default the number of workers.

        "Workers" are those of ``n_jobs`` (or the CPUs) for the built-in backends, serial
        included, so the default model does not depend on the backend chosen.
        """
        if n_rows <= d:
            raise DataError(
                f"{owner or type(self).__name__} needs more rows than parameters to estimate their "
                f"covariance: {n_rows} rows for d = {d} parameters (features plus thresholds). "
                "Use fewer features, more data, or OrdinalRegression(alpha=...) for a ridge fit."
            )
        min_rows = MIN_ROWS_PER_PARAM * d
        most = n_rows // min_rows
        if self.n_subsets is None:
            n_workers = (backend.n_workers if isinstance(self.backend, Backend)
                         else resolve_n_jobs(self.n_jobs))
            # by default also keep the rows per parameter the refinement rounds need
            need = max(MIN_ROWS_PER_PARAM, ROWS_PER_PARAM_FOR_ROUNDS.get(self.refine_rounds, 0))
            return max(1, min(n_workers, n_rows // (need * d)))
        m = self.n_subsets
        if m > 1 and m > most:
            fix = f"use n_subsets <= {most}" if most >= 1 else "use n_subsets=1"
            raise DataError(
                f"n_subsets={m} would give subsets of about {n_rows // m:,} rows, fewer than "
                f"{MIN_ROWS_PER_PARAM} x d = {min_rows:,} rows for d = {d} parameters; {fix}, "
                "or fit on more data."
            )
        return m

    def fit(self, X, y, sample_weight=None):
        """Divide, fit the subsets in parallel, pool, refine.

        ``y`` may name a column when ``X`` is a frame, table or file path. The path of a Parquet
        file or folder is streamed batch by batch, never loaded whole (data beyond memory; the
        same model as in memory; see ``docs/operations.md``).
        """
        # One BLAS thread here too: the server side only does d x d algebra, which threads slow
        # down, and the workers set their own limit.
        with local.one_blas_thread(), progress.reporting(self.callback):
            return self._fit(X, y, sample_weight)

    def _fit(self, X, y, sample_weight):
        self._validate()
        owner = type(self).__name__
        with progress.step("checking data"):
            data = prepare_data(X, y, levels=self.levels, categorical=self.categorical,
                                sample_weight=sample_weight, estimator_name=owner)
        Xm, codes, w = data.X, data.codes, data.weights
        n, p = Xm.shape
        K = data.target.n_classes
        d = p + K - 1
        backend = get_backend(self.backend, self.n_jobs, owner=owner)
        own_backend = backend is not self.backend
        refs = []
        try:  # from here on the backend is closed whatever happens
            M = self._resolve_subsets(n, d, backend)
            need = ROWS_PER_PARAM_FOR_ROUNDS.get(self.refine_rounds, 0)
            if M > 1 and n / M < need * d:
                what = ("one-shot pooling (refine_rounds=0) is biased there"
                        if self.refine_rounds == 0 else
                        "one refinement round does not remove all of their bias")
                warn(
                    f"Subsets of about {n // M:,} rows have fewer than {need} rows per parameter "
                    f"(d = {d}); {what}. Use refine_rounds={self.refine_rounds + 1} or fewer "
                    "subsets.", UserWarning)
            rs = check_random_state(self.random_state)
            split_seed = int(rs.randint(0, 2**31 - 1))
            tree = PartitionTree(p, K, fit_standardizer(Xm, w), split_seed)
            if M > 1:
                tree.split_random(tree.root, M)
            labels = route_rows(tree, Xm, codes)
            tree.count(labels)
            settings = self._settings(K)
            names = parameter_names(data.schema.output_names, data.target.classes)
            sched = schedule(tree.sizes, d, backend.n_workers, row_bytes=(p + 2) * 8)
            refs = build_shards(backend, Xm, codes, w, labels, M, tree.standardizer)
            run = fit_partition(backend, refs, sched, settings, leaf_seeds(tree, split_seed),
                                names=names, p=p, sizes=tree.sizes,
                                refine_rounds=self.refine_rounds, owner=self)
        finally:
            backend.release(refs)
            if own_backend:
                backend.close()
        self._set_from_run(data, tree.standardizer, run, tree.sizes)
        return self

    def _settings(self, n_classes: int) -> local.LocalSettings:
        return local.LocalSettings(
            n_classes=n_classes, alpha=self.alpha, variance=self.variance, debias=self.debias,
            ridge=float(self.ridge), penalize_thresholds=bool(self.penalize_thresholds),
            cv_folds=self.cv_folds, max_iter=self.max_iter, tol=float(self.tol),
        )

    def _set_from_run(self, data, std: Standardizer, run: PartitionRun, sizes,
                      title: str = "Divide-and-conquer ordinal regression (cumulative logit)"):
        """Set the fitted attributes from the subsets' fits and the pooled estimate."""
        p = data.schema.n_features
        M, K = len(run.fits), data.target.n_classes
        fits, pooled, est, cov = run.fits, run.pooled, run.estimate, run.cov
        params, cov = _on_raw_scale(std, est, cov, p)
        one_params, one_cov = _on_raw_scale(std, pooled.estimate, pooled.cov, p)
        self.n_subsets_ = M
        self.subset_sizes_ = sizes
        raw, raw_lasso, raw_var, resolved = _subsets_on_raw_scale(fits, std)
        self.subset_estimates_ = np.where(resolved, raw, np.nan)
        self.subset_lasso_estimates_ = np.where(resolved, raw_lasso, np.nan)
        self.subset_alphas_ = np.array([f.alpha for f in fits])
        self.n_iter_ = np.array([f.n_iter for f in fits])
        self.q_, self.q_df_, self.q_pvalue_, self.i2_ = (
            pooled.q, pooled.q_df, pooled.q_pvalue, pooled.i2)
        het = pooling.marginal_heterogeneity(raw, raw_var, resolved)
        results = OrdinalResults(
            params, cov, data.schema.output_names, data.target.classes,
            title=title, info=self._info(sizes, K, pooled, fits),
            heterogeneity=het,
        )
        self._set_fitted(data.schema, data.target, params, cov, results)
        self.oneshot_results_ = OrdinalResults(
            one_params, one_cov, data.schema.output_names, data.target.classes,
            title="One-shot pooled estimate (before refinement)", info=results.info,
            heterogeneity=het,
        )

    def _info(self, subset_sizes, K, pooled, fits) -> dict:
        n, M = int(subset_sizes.sum()), len(fits)
        lo, hi = int(subset_sizes.min()), int(subset_sizes.max())
        sizes = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
        q = f"{pooled.q:.2f} (df {pooled.q_df}, p {pooled.q_pvalue:.3g})" if pooled.q_df > 0 \
            else "n/a (one subset)"
        alpha = self.alpha if isinstance(self.alpha, str) else "fixed"
        return {
            "Rows": f"{n:,}", "Classes": K, "Subsets": M, "Rows per subset": sizes,
            "Penalty": f"{alpha} (mean {np.mean([f.alpha for f in fits]):.3g})",
            "De-biasing": ", ".join(sorted({f.debias for f in fits})),
            "Variance": self.variance, "Refinement rounds": self.refine_rounds,
            "Heterogeneity Q": q, "I^2": f"{pooled.i2:.3f}",
        }

    def _extra_state(self):
        meta = {"n_subsets": int(self.n_subsets_), "q": self.q_, "q_df": int(self.q_df_),
                "q_pvalue": None if np.isnan(self.q_pvalue_) else self.q_pvalue_,
                "i2": self.i2_}
        arrays = {"subset_sizes": self.subset_sizes_, "subset_estimates": self.subset_estimates_,
                  "subset_lasso_estimates": self.subset_lasso_estimates_,
                  "subset_alphas": self.subset_alphas_, "n_iter": self.n_iter_,
                  "oneshot_params": self.oneshot_results_.params,
                  "oneshot_cov": self.oneshot_results_.cov}
        return meta, arrays

    def _restore_extra(self, meta, arrays):
        self.n_subsets_ = meta["n_subsets"]
        self.q_, self.q_df_, self.i2_ = meta["q"], meta["q_df"], meta["i2"]
        self.q_pvalue_ = np.nan if meta["q_pvalue"] is None else meta["q_pvalue"]
        self.subset_sizes_ = arrays["subset_sizes"]
        self.subset_estimates_ = arrays["subset_estimates"]
        self.subset_lasso_estimates_ = arrays["subset_lasso_estimates"]
        self.subset_alphas_ = arrays["subset_alphas"]
        self.n_iter_ = arrays["n_iter"]
        r = self.results_
        self.oneshot_results_ = OrdinalResults(
            arrays["oneshot_params"], arrays["oneshot_cov"], r.feature_names, r.classes,
            title="One-shot pooled estimate (before refinement)", info=r.info,
            heterogeneity=r.heterogeneity,
        )


@dataclass(frozen=True)
class PartitionRun:
    """The subsets' fits, their one-shot pooling, and the refined estimate and covariance."""

    fits: list
    pooled: pooling.Pooled
    estimate: np.ndarray
    cov: np.ndarray


def fit_partition(backend: Backend, refs, sched, settings: local.LocalSettings,
                  seeds: list[int], *, names: list[str], p: int, sizes, refine_rounds: int,
                  owner, unit: str = "subset", ids=None) -> PartitionRun:
    """Fit every placed subset, pool the fits and run the refinement rounds (method.md 2-4b).

    The tasks run in the bundles of ``sched`` (a :class:`fedgrain.federation.schedule.Schedule`);
    the
    data stay where ``refs`` placed them, so each round moves parameters only. ``owner`` is the
    estimator whose ``alpha`` and ``max_iter`` the messages quote.
    """
    d = len(names)
    work = float(np.sum(sizes)) * d * d
    bundles = sched.bundles()
    tasks = [{"shard": r, "settings": settings, "seed": s}
             for r, s in zip(refs, seeds, strict=True)]
    units = "leaves" if unit == "leaf" else f"{unit}s"
    with progress.step(f"fitting {units}", len(tasks), units, ticks=True):
        outcomes = backend.map_bundles(local.fit_task, tasks, bundles, work=work)
    fits = values_or_raise(outcomes, sizes, unit, ids)
    check_fits(fits, names, p, sizes, alpha=owner.alpha, max_iter=owner.max_iter, unit=unit,
               ids=ids)
    pooled = pool_or_explain(pooling.pool, names, fits)
    est, cov = pooled.estimate, pooled.cov
    meat = local.meat_kind(settings.variance)
    with progress.step("refinement rounds", refine_rounds, "rounds"):
        for _ in range(refine_rounds):
            evals = values_or_raise(
                backend.map_bundles(local.evaluate_task,
                                    [{"shard": r, "params": est, "meat": meat} for r in refs],
                                    bundles, work=work),
                sizes, unit, ids,
            )
            est, cov = pool_or_explain(pooling.refine, names, est, evals, settings.variance)
            progress.advance()
    return PartitionRun(fits, pooled, est, cov)


def check_fits(fits, names: list[str], p: int, sizes, *, alpha, max_iter: int,
               unit: str = "subset", ids=None) -> None:
    """Separation is an error; non-convergence and unidentified parameters are warnings.

    ``ids`` name the subsets in messages (default ``1 .. M``, "of M"); the adaptive estimator
    passes its leaves' node ids, as ``partition_.describe()`` shows them.
    """
    ids, of = (list(range(1, len(fits) + 1)), f" of {len(fits)}") if ids is None else (ids, "")
    separated = {m: f.separated for m, f in enumerate(fits) if f.separated}
    if separated:
        m, idx = next(iter(separated.items()))
        fix = ("use a positive alpha (for example alpha='rate')" if alpha == 0 else
               "remove or merge the separating feature(s)")
        raise SeparationError(
            f"The classes are (quasi-)separated in {unit} {ids[m]}{of} "
            f"({int(sizes[m]):,} rows): the fit runs off to infinity along "
            f"{', '.join(names[j] for j in idx)}; {fix}."
        )
    slow = [ids[m] for m, f in enumerate(fits) if not f.converged]
    if slow:
        warn(f"The lasso fit of {unit}(s) {slow}{of} did not converge in max_iter="
             f"{max_iter} iterations; increase max_iter.", ConvergenceWarning)
    where: dict[str, list[int]] = {}
    for m, f in enumerate(fits):
        for note in f.notes:
            kind, j = note.split(":")
            label = (f"threshold '{names[p + int(j)]}' (no rows on one side)"
                     if kind == "threshold" else f"feature '{names[int(j)]}' (constant)")
            where.setdefault(label, []).append(ids[m])
    for label, subsets in where.items():
        warn(
            f"{label} carries no information in {unit}(s) {subsets}{of}; it gets zero weight "
            "there.", IdentificationWarning)


def _on_raw_scale(std: Standardizer, est, cov, p: int):
    """Map an estimate and its covariance back to the original scale; order the thresholds."""
    params, cov = std.to_raw_model(est, cov)
    return params, cov


def pool_or_explain(step, names: list[str], *args):
    """Run a pooling step; parameters the data do not identify are a clear data error."""
    try:
        return step(*args)
    except pooling.NotIdentifiedError as exc:
        involved = ", ".join(f"'{names[j]}'" for j in exc.indices)
        raise DataError(
            f"The data do not identify {involved}: the columns are linearly dependent "
            "(collinear, or constant within every subset); drop one of them."
        ) from None


def _subsets_on_raw_scale(fits, std: Standardizer):
    """Each subset's estimates, lasso fits and variances on the original scale.

    A raw parameter is resolved in a subset when every standardised parameter it is made of
    is (a raw threshold involves all slopes); returns ``(est, lasso, var, resolved)``, each
    ``(M, d)``.
    """
    d = fits[0].design.shape[1]
    T = std.jacobian(d - std.mean.shape[0])
    uses = T != 0
    out = [], [], [], []
    for f in fits:
        est, las, cov, res = pooling.full_view(f)
        out[0].append(T @ est)
        out[1].append(T @ las)
        out[2].append(np.diag(T @ cov @ T.T))
        out[3].append(~(uses @ ~res))
    return tuple(np.array(a) for a in out)


def values_or_raise(outcomes, sizes, unit: str = "subset", ids=None) -> list:
    """The values of successful outcomes; a failed subset is an error naming it (see
    :func:`check_fits` for ``ids``)."""
    for o in outcomes:
        if not o.ok:
            rows = int(sizes[o.index])
            name = f"{o.index + 1} of {len(outcomes)}" if ids is None else f"{ids[o.index]}"
            where = f"{unit} {name} ({rows:,} rows)"
            raise SubsetError(f"Fitting {where} failed: {o.error_type}: {o.error}", o.traceback)
    return [o.value for o in outcomes]


