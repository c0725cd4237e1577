"""The estimators: :class:`DivideConquerOrdinal` and :class:`OrdinalRegression`.

Both are scikit-learn classifiers with the same fitted attributes: ``classes_``, ``coef_`` (p),
``thresholds_`` (K-1, increasing; ``P(Y <= k | x) = sigmoid(thresholds_[k] - x @ coef_)``),
``cov_`` over ``(coef_, thresholds_)`` in that order, ``bse_`` and ``results_`` (an
:class:`fedgrain.results.OrdinalResults` with the coefficient table).
"""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import combine, local
from ._warnings import warn
from .backends import BACKENDS, Backend, get_backend
from .data import FeatureSchema, TargetEncoding, prepare_fit, prepare_predict
from .exceptions import DataError, IdentificationWarning, SeparationError
from .io import read_model_dir, write_model_dir
from .ordinal import Pass, class_proba, exact_pass
from .partition import stratified_split
from .results import OrdinalResults
from .shards import Standardizer, build_shards, column_moments
from .solvers import newton, runaway, solve_psd, warm_start_rows

#: Every subset needs at least this many original rows per parameter (method.md 4b, 6).
MIN_ROWS_PER_PARAM = 5
#: Below this many rows per parameter in a subset, the pooled estimate keeps a bias that the
#: given number of refinement rounds does not remove (measured: docs/method.md). Two or more
#: rounds converge to the centralized fit from any subset size allowed.
ROWS_PER_PARAM_FOR_ROUNDS = {0: 40, 1: 8}


def _param_error(owner: str, name: str, allowed: str, value) -> ValueError:
    return ValueError(
        f"The '{name}' parameter of {owner} must be {allowed}. Got {value!r} instead."
    )


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _OrdinalModel(ClassifierMixin, BaseEstimator):
    """Prediction, inference and persistence shared by the ordinal estimators."""

    # ---- prediction ------------------------------------------------------------------------
    def _encode(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return prepare_predict(X, self.schema_, estimator_name=type(self).__name__)

    def predict_linear(self, X) -> np.ndarray:
        """The latent linear predictor ``x @ coef_`` (higher means higher classes)."""
        return self._encode(X) @ self.coef_

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape ``(n, K)``, columns in the order of ``classes_``."""
        return class_proba(self.predict_linear(X), self.thresholds_)

    def predict_cumulative_proba(self, X) -> np.ndarray:
        """``P(Y <= k | x)`` for the first ``K - 1`` levels, shape ``(n, K - 1)``."""
        eta = self.predict_linear(X)
        return 1.0 / (1.0 + np.exp(-(self.thresholds_[None, :] - eta[:, None])))

    def predict(self, X) -> np.ndarray:
        """The most probable level of each row."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def predict_proba_ci(self, X, alpha: float = 0.05):
        """Class probabilities with delta-method ``1 - alpha`` intervals.

        Returns ``(proba, lower, upper)``, each of shape ``(n, K)``.
        """
        return self.results_.predict_proba_ci(self._encode(X), alpha)

    def summary(self, alpha: float = 0.05):
        """Shortcut for ``results_.summary(alpha)``."""
        check_is_fitted(self, "coef_")
        return self.results_.summary(alpha)

    # ---- fitted state shared by both estimators ---------------------------------------------
    def _set_fitted(self, schema: FeatureSchema, target: TargetEncoding, params, cov,
                    results: OrdinalResults) -> None:
        p = schema.n_features
        self.schema_ = schema
        self.target_ = target
        self.classes_ = target.classes_array()
        self.n_features_in_ = schema.n_features_in
        if schema.has_names:
            self.feature_names_in_ = np.asarray(schema.input_columns, dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.coef_ = params[:p].copy()
        self.thresholds_ = params[p:].copy()
        self.cov_ = cov
        self.bse_ = np.sqrt(np.maximum(np.diag(cov), 0.0))
        self.results_ = results

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        # An ordinal model orders the classes along one direction; scikit-learn's accuracy
        # checks on make_blobs data (classes in no order) do not apply.
        tags.classifier_tags.poor_score = True
        return tags

    # ---- persistence -----------------------------------------------------------------------
    def _extra_state(self) -> tuple[dict, dict]:
        return {}, {}

    def _restore_extra(self, meta: dict, arrays: dict) -> None:
        """Restore estimator-specific state saved by :meth:`_extra_state`."""

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Save the fitted model as a directory of JSON and ``.npz`` (no pickle).

        Written atomically: a crash never leaves a half-written model that loads.
        Load it with :func:`fedgrain.load`.
        """
        check_is_fitted(self, "coef_")
        params = self.get_params()
        if isinstance(params.get("backend"), Backend):
            params["backend"] = params["backend"].name
        if "random_state" in params and not (
            params["random_state"] is None or _is_int(params["random_state"])
        ):
            params["random_state"] = None  # a generator object cannot be stored as JSON
        for key in ("levels", "categorical"):
            if params.get(key) is not None:
                params[key] = [v.item() if hasattr(v, "item") else v for v in params[key]]
        extra_meta, extra_arrays = self._extra_state()
        r = self.results_
        meta = {
            "estimator": type(self).__name__,
            "params": params,
            "schema": self.schema_.to_dict(),
            "target": self.target_.to_dict(),
            "results": {"title": r.title, "info": {k: str(v) for k, v in r.info.items()}},
            **extra_meta,
        }
        arrays = {"coef": self.coef_, "thresholds": self.thresholds_, "cov": self.cov_,
                  **extra_arrays}
        if r.heterogeneity is not None:
            arrays.update({f"het_{k}": np.asarray(v) for k, v in r.heterogeneity.items()})
        return write_model_dir(path, meta, arrays, overwrite=overwrite)


class OrdinalRegression(_OrdinalModel):
    """Proportional-odds (cumulative logit) regression by exact maximum likelihood.

    The centralized, single-machine reference fit: Newton's method on the exact multinomial
    likelihood with analytic gradient and Hessian, each iteration one pass over the rows in
    blocks. It matches R's ``MASS::polr`` and statsmodels' ``OrderedModel`` (logit) and is
    typically two or more orders of magnitude faster than the latter.

    Parameters
    ----------
    alpha : float
        Optional ridge penalty on the standardised slopes: the fit minimises
        ``-loglik / n + alpha / 2 * sum_j (sd_j * coef_j)^2``. 0 (the default) is the exact
        maximum likelihood; a small positive value keeps the fit finite on separated data, and
        the standard errors are then those of the penalised fit (inverse penalised Hessian).
    variance : {"model", "sandwich"}
        Model-based standard errors (inverse observed information, as R and statsmodels
        report) or the robust sandwich.
    levels : sequence, optional
        The ordered levels of the target, lowest first; needed when they are strings.
    categorical : sequence of str, optional
        Feature columns to one-hot encode (first level is the reference).
    max_iter : int
    tol : float
        Newton stops when it promises less than ``tol`` gain in log-likelihood (the estimate is
        then within about ``sqrt(2 tol)`` standard errors of the optimum).

    Attributes
    ----------
    classes_, coef_, thresholds_, cov_, bse_ : see the module docstring
    results_ : OrdinalResults
    loglik_ : float
        Maximised log-likelihood.
    n_iter_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain import OrdinalRegression
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((500, 2))
    >>> y = np.digitize(X @ [1.0, -0.5] + rng.logistic(size=500), [-1, 1])
    >>> m = OrdinalRegression().fit(X, y)
    >>> m.coef_.round(1)
    array([ 1. , -0.6])
    """

    def __init__(self, *, alpha=0.0, variance="model", levels=None, categorical=None,
                 max_iter=100, tol=1e-8):
        self.alpha = alpha
        self.variance = variance
        self.levels = levels
        self.categorical = categorical
        self.max_iter = max_iter
        self.tol = tol

    def _validate(self) -> None:
        owner = type(self).__name__
        if not _is_real(self.alpha) or not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise _param_error(owner, "alpha", "a float >= 0", self.alpha)
        if self.variance not in ("model", "sandwich"):
            raise _param_error(owner, "variance", "'model' or 'sandwich'", self.variance)
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise _param_error(owner, "max_iter", "an int >= 1", self.max_iter)
        if not _is_real(self.tol) or not self.tol > 0:
            raise _param_error(owner, "tol", "a float > 0", self.tol)

    def fit(self, X, y, sample_weight=None):
        """Fit by exact maximum likelihood. ``y`` may name a column when ``X`` is a frame."""
        self._validate()
        data = prepare_fit(X, y, levels=self.levels, categorical=self.categorical,
                           sample_weight=sample_weight, estimator_name=type(self).__name__)
        Xm, codes, w = data.X, data.codes, data.weights
        n_eff = float(codes.shape[0] if w is None else w.sum())
        p, K1 = Xm.shape[1], data.target.n_classes - 1
        _, scales = column_moments(Xm, w)
        counts = np.bincount(codes, weights=w, minlength=K1 + 1)
        cum = np.clip(np.cumsum(counts)[:-1] / counts.sum(), 1e-10, 1 - 1e-10)
        x0 = np.concatenate([np.zeros(p), np.log(cum / (1 - cum))])

        ridge = n_eff * float(self.alpha) * np.concatenate([scales**2, np.zeros(K1)])

        def oracle(x, loss=True, order=2, meat=False):
            P = exact_pass(Xm, codes, w, x[:p], x[p:], order=order, meat=meat)
            if not self.alpha:
                return P
            return Pass(P.loss + 0.5 * float(ridge @ (x * x)),
                        None if P.grad is None else P.grad + ridge * x,
                        None if P.hess is None else P.hess + np.diag(ridge), P.meat)

        def increasing(x):
            return bool(np.all(np.diff(x[p:]) > 0))

        # One BLAS thread: the per-block products are too small to gain from threads, and
        # threads that wait for a busy core slow every block down.
        with local.one_blas_thread():
            x0 = self._warm_start(Xm, codes, w, x0, ridge, increasing)
            res = newton(oracle, x0, n_eff, max_iter=self.max_iter, tol=self.tol,
                         feasible=increasing)
            J = oracle(res.x, order=0, meat=True).meat if self.variance == "sandwich" else None
        moving = runaway(res, np.concatenate([scales, np.ones(K1)]))
        if moving.any():
            names = [data.schema.output_names[j] if j < p else f"threshold {j - p}"
                     for j in np.flatnonzero(moving)]
            raise SeparationError(
                "The classes are (quasi-)separated: the maximum likelihood estimate does not "
                f"exist ({', '.join(names)} grow without bound). Remove or merge the separating "
                "feature, set alpha > 0 for a ridge penalty, or use DivideConquerOrdinal, whose "
                "L1 penalty keeps the fit finite."
            )
        if not res.converged:
            warn(
                f"OrdinalRegression did not converge in {self.max_iter} Newton iterations; "
                "increase max_iter.", RuntimeWarning)
        d = p + K1
        Hinv = solve_psd(res.hess, np.eye(d))
        cov = Hinv if J is None else Hinv @ J @ Hinv
        cov = 0.5 * (cov + cov.T)
        self.loglik_ = -float(res.objective * n_eff)
        self.n_iter_ = res.n_iter
        results = OrdinalResults(
            res.x, cov, data.schema.output_names, data.target.classes,
            title="Ordinal regression: exact maximum likelihood",
            info={
                "Rows": f"{codes.shape[0]:,}", "Classes": data.target.n_classes,
                "Log-likelihood": f"{self.loglik_:.4f}",
                "AIC": f"{2 * d - 2 * self.loglik_:.4f}",
                "Standard errors": "model-based" if self.variance == "model" else "sandwich",
                "Ridge alpha": self.alpha,
                "Newton iterations": res.n_iter,
            },
        )
        self._set_fitted(data.schema, data.target, res.x, cov, results)
        return self

    def _warm_start(self, X, codes, w, x0, ridge, feasible):
        """Start from a fit on an evenly spaced subsample (see ``solvers.warm_start_rows``)."""
        rows = warm_start_rows(codes.shape[0])
        if rows is None:
            return x0
        Xs, ys = X[rows], codes[rows]
        ws = None if w is None else w[rows]
        if np.count_nonzero(np.bincount(ys, weights=ws, minlength=x0.size - X.shape[1] + 1)) \
                < x0.size - X.shape[1] + 1:
            return x0  # a level is missing from the subsample
        p = X.shape[1]
        n_sub = float(rows.size if ws is None else ws.sum())
        sub_ridge = ridge * n_sub / max(float(codes.shape[0] if w is None else w.sum()), 1.0)

        def oracle(x, loss=True, order=2, meat=False):
            P = exact_pass(Xs, ys, ws, x[:p], x[p:], order=order, meat=meat)
            return Pass(P.loss + 0.5 * float(sub_ridge @ (x * x)),
                        None if P.grad is None else P.grad + sub_ridge * x,
                        None if P.hess is None else P.hess + np.diag(sub_ridge), P.meat)

        res = newton(oracle, x0, n_sub, max_iter=self.max_iter, tol=1e-2, feasible=feasible)
        return res.x if res.converged and np.all(np.isfinite(res.x)) else x0

    def _extra_state(self):
        return {"loglik": self.loglik_, "n_iter": self.n_iter_}, {}

    def _restore_extra(self, meta, arrays):
        self.loglik_ = meta["loglik"]
        self.n_iter_ = meta["n_iter"]


class DivideConquerOrdinal(_OrdinalModel):
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
                 max_iter=100, tol=1e-8):
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

    def _validate(self) -> None:
        owner = type(self).__name__
        ns = self.n_subsets
        if ns is not None and (not _is_int(ns) or ns < 1):
            raise _param_error(owner, "n_subsets", "an int >= 1 or None", ns)
        a = self.alpha
        if not ((isinstance(a, str) and a in ("rate", "cv", "bic"))
                or (_is_real(a) and np.isfinite(a) and a >= 0)):
            raise _param_error(owner, "alpha", "'rate', 'cv', 'bic' or a float >= 0", a)
        if self.variance not in local.VARIANCES:
            raise _param_error(owner, "variance", "'cluster', 'sandwich' or 'model'",
                               self.variance)
        if not (isinstance(self.backend, Backend) or self.backend in BACKENDS):
            raise _param_error(owner, "backend", f"one of {BACKENDS} or a Backend instance",
                               self.backend)
        if self.n_jobs is not None and (not _is_int(self.n_jobs) or self.n_jobs == 0):
            raise _param_error(owner, "n_jobs", "a non-zero int or None", self.n_jobs)
        if not _is_int(self.refine_rounds) or self.refine_rounds < 0:
            raise _param_error(owner, "refine_rounds", "an int >= 0", self.refine_rounds)
        if self.debias not in local.DEBIAS:
            raise _param_error(owner, "debias", "'auto', 'inverse' or 'nodewise'", self.debias)
        if not _is_real(self.ridge) or not self.ridge >= 0:
            raise _param_error(owner, "ridge", "a float >= 0", self.ridge)
        if not _is_int(self.cv_folds) or self.cv_folds < 2:
            raise _param_error(owner, "cv_folds", "an int >= 2", self.cv_folds)
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise _param_error(owner, "max_iter", "an int >= 1", self.max_iter)
        if not _is_real(self.tol) or not self.tol > 0:
            raise _param_error(owner, "tol", "a float > 0", self.tol)

    def _resolve_subsets(self, n_rows: int, d: int, n_workers: int) -> int:
        min_rows = MIN_ROWS_PER_PARAM * d
        most = n_rows // min_rows
        if self.n_subsets is None:
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
        if m > n_rows:
            raise DataError(f"n_subsets={m} exceeds the number of rows ({n_rows}).")
        return m

    def fit(self, X, y, sample_weight=None):
        """Divide, fit the subsets in parallel, pool, refine.

        ``y`` may name a column when ``X`` is a frame, table or file path.
        """
        # One BLAS thread here too: the server side only does d x d algebra, which threads slow
        # down, and the workers set their own limit.
        with local.one_blas_thread():
            return self._fit(X, y, sample_weight)

    def _fit(self, X, y, sample_weight):
        self._validate()
        owner = type(self).__name__
        data = prepare_fit(X, y, levels=self.levels, categorical=self.categorical,
                           sample_weight=sample_weight, estimator_name=owner)
        Xm, codes, w = data.X, data.codes, data.weights
        n, p = Xm.shape
        K = data.target.n_classes
        d = p + K - 1
        backend = get_backend(self.backend, self.n_jobs, owner=owner)
        own_backend = backend is not self.backend
        M = self._resolve_subsets(n, d, backend.n_workers)
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
        split_seed, *seeds = (int(s) for s in rs.randint(0, 2**31 - 1, size=M + 1))
        labels = stratified_split(codes, M, np.random.default_rng(split_seed))
        sizes = np.bincount(labels, minlength=M)
        std = Standardizer.fit(Xm, w)
        settings = local.LocalSettings(
            n_classes=K, alpha=self.alpha, variance=self.variance, debias=self.debias,
            ridge=float(self.ridge), penalize_thresholds=bool(self.penalize_thresholds),
            cv_folds=self.cv_folds, max_iter=self.max_iter, tol=float(self.tol),
        )
        refs = []
        try:
            refs = build_shards(backend, Xm, codes, w, labels, M, std)
            tasks = [{"shard": r, "settings": settings, "seed": s}
                     for r, s in zip(refs, seeds, strict=True)]
            work = float(n) * d * d
            fits = _values(backend.map(local.fit_task, tasks, work=work), sizes)
            self._warn_unidentified(fits, data.schema.output_names, data.target.classes)
            pooled = combine.pool(fits)
            est, cov = pooled.estimate, pooled.cov
            meat = local.meat_kind(self.variance)
            for _ in range(self.refine_rounds):
                evals = _values(
                    backend.map(local.evaluate_task,
                                [{"shard": r, "params": est, "meat": meat} for r in refs],
                                work=work),
                    sizes,
                )
                est, cov = combine.refine(est, evals, self.variance)
        finally:
            backend.release(refs)
            if own_backend:
                backend.close()

        params, cov = std.to_raw(est, cov)
        params[p:] = combine.monotonise(params[p:], np.diag(cov)[p:])
        one_params, one_cov = std.to_raw(pooled.estimate, pooled.cov)
        one_params[p:] = combine.monotonise(one_params[p:], np.diag(one_cov)[p:])
        self.n_subsets_ = M
        self.subset_sizes_ = sizes
        unidentified = ~np.array([f.identified for f in fits])
        self.subset_estimates_ = np.array([std.to_raw(f.estimate) for f in fits])
        self.subset_estimates_[unidentified] = np.nan
        self.subset_lasso_estimates_ = np.array([std.to_raw(f.lasso) for f in fits])
        self.subset_lasso_estimates_[unidentified] = np.nan
        self.subset_alphas_ = np.array([f.alpha for f in fits])
        self.n_iter_ = np.array([f.n_iter for f in fits])
        self.q_, self.q_df_, self.q_pvalue_, self.i2_ = (
            pooled.q, pooled.q_df, pooled.q_pvalue, pooled.i2)
        het = {"q_param": pooled.q_param, "i2_param": pooled.i2_param,
               "n_contrib": pooled.n_contrib}
        results = OrdinalResults(
            params, cov, data.schema.output_names, data.target.classes,
            title="Divide-and-conquer ordinal regression (cumulative logit)",
            info=self._info(n, M, K, pooled, fits),
            heterogeneity=het,
        )
        self._set_fitted(data.schema, data.target, params, cov, results)
        self.oneshot_results_ = OrdinalResults(
            one_params, one_cov, data.schema.output_names, data.target.classes,
            title="One-shot pooled estimate (before refinement)", info=results.info,
            heterogeneity=het,
        )
        return self

    def _info(self, n, M, K, pooled, fits) -> dict:
        sizes = f"{n // M:,}" if n % M == 0 else f"{n // M:,}-{n // M + 1:,}"
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

    @staticmethod
    def _warn_unidentified(fits, feature_names, classes) -> None:
        names = list(feature_names)
        lv = [str(c) for c in classes]
        where: dict[str, list[int]] = {}
        for m, f in enumerate(fits):
            for note in f.notes:
                kind, j = note.split(":")
                j = int(j)
                label = (f"threshold '{lv[j]}|{lv[j + 1]}' (no rows on one side)"
                         if kind == "threshold" else f"feature '{names[j]}' (constant)")
                where.setdefault(label, []).append(m)
        for label, subsets in where.items():
            warn(
                f"{label} carries no information in subset(s) {subsets} of {len(fits)}; it gets "
                "zero weight there.", IdentificationWarning)

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


def _values(outcomes, sizes) -> list:
    """The values of successful outcomes; a failed subset is an error naming it."""
    for o in outcomes:
        if not o.ok:
            rows = int(sizes[o.index])
            where = f"subset {o.index + 1} of {len(outcomes)} ({rows:,} rows)"
            if o.error_type == "SeparationError":
                raise SeparationError(f"In {where}, {o.error}")
            raise RuntimeError(f"Fitting {where} failed: {o.error_type}: {o.error}\n{o.traceback}")
    return [o.value for o in outcomes]


ESTIMATORS = {c.__name__: c for c in (DivideConquerOrdinal, OrdinalRegression)}


def load(path):
    """Load a model saved with ``save()``; verifies format version and checksums.

    Loading never executes code: the directory holds JSON and ``.npz`` arrays only.

    Raises
    ------
    fedgrain.exceptions.ModelFileError
        When the directory is missing, truncated, tampered with or of an unknown version.
    """
    from .exceptions import ModelFileError

    meta, arrays = read_model_dir(path)
    try:
        cls = ESTIMATORS[meta["estimator"]]
        est = cls(**meta["params"])
        schema = FeatureSchema.from_dict(meta["schema"])
        target = TargetEncoding.from_dict(meta["target"])
        het = None
        if "het_q_param" in arrays:
            het = {k[4:]: arrays[k] for k in arrays if k.startswith("het_")}
        p = schema.n_features
        params = np.concatenate([arrays["coef"], arrays["thresholds"]])
        results = OrdinalResults(params, arrays["cov"], schema.output_names, target.classes,
                                 title=meta["results"]["title"], info=meta["results"]["info"],
                                 heterogeneity=het)
        est._set_fitted(schema, target, params, arrays["cov"], results)
        est._restore_extra(meta, arrays)
        ok = (arrays["coef"].shape == (p,) and arrays["cov"].shape == (params.size,) * 2
              and arrays["thresholds"].shape == (target.n_classes - 1,))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: the model description is incomplete or inconsistent ({exc!r}); "
            "save the model again."
        ) from None
    if not ok:
        raise ModelFileError(f"{path}: array shapes do not match the model description; "
                             "save the model again.")
    return est
