"""What the ordinal estimators share: parameter checks, prediction, inference, persistence.

Every estimator is a scikit-learn classifier with the same fitted attributes: ``levels_`` (the
levels in their ordinal order), ``classes_`` (the same labels sorted, scikit-learn's contract:
``predict_proba``'s columns follow it), ``coef_`` (p), ``thresholds_`` (K-1, increasing;
``P(Y <= k | x) = sigmoid(thresholds_[k] - x @ coef_)``), ``cov_`` over
``(coef_, thresholds_)`` in that order, ``bse_`` and ``results_`` (an
:class:`fedgrain.inference.results.OrdinalResults` with the coefficient table). :func:`load`
restores any of them from a saved directory.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ..backends import BACKENDS, Backend
from ..backends.processes import resolve_n_jobs
from ..core.likelihood import class_proba, cumulative_proba
from ..data import FeatureSchema, TargetEncoding, prepare_predict
from ..data import partitionwise as dask_parts
from ..exceptions import DataError, ModelFileError, ParameterError
from ..federation.engine import EngineSettings
from ..inference.local import DEBIAS, VARIANCES, LocalSettings
from ..inference.results import OrdinalResults, Summary
from ..persist import read_model_dir, write_model_dir


def param_error(owner: str, name: str, allowed: str, value) -> ValueError:
    return ParameterError(
        f"The '{name}' parameter of {owner} must be {allowed}. Got {value!r} instead."
    )


def class_order(levels: np.ndarray) -> np.ndarray:
    """The positions of the levels in sorted order: ``levels[class_order(levels)]`` is
    ``classes_``, the labels as scikit-learn sorts them (``np.unique``), which its scorers
    assume for the columns of ``predict_proba``. Labels that cannot be compared keep their
    ordinal order.

    >>> class_order(np.array(["low", "mid", "high"]))
    array([2, 0, 1])
    """
    try:
        return np.argsort(np.asarray(levels), kind="stable")
    except TypeError:
        return np.arange(len(levels))


def _plain(value):
    """A parameter value as plain JSON types: numpy scalars and arrays to Python, tuples to lists.

    Other objects (a backend instance, a generator) are returned as they are, for the caller.
    """
    if isinstance(value, np.generic):
        return value.item()
    if type(value).__module__.startswith("torch"):  # a torch.device: its name
        return str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class OrdinalModel(ClassifierMixin, BaseEstimator):
    """Prediction, inference and persistence shared by the ordinal estimators."""

    # ---- prediction ------------------------------------------------------------------------
    def encode(self, X) -> np.ndarray:
        """The numeric feature matrix the model sees for ``X`` (checked like the data at
        fit, categorical columns one-hot encoded, columns in the order of ``coef_``; for a
        model fitted from a formula, ``X`` is first transformed by it)."""
        check_is_fitted(self, "coef_")
        if getattr(self, "formula_", None) is not None:
            X = self.formula_.design(X)
        return prepare_predict(X, self.schema_, estimator_name=type(self).__name__)

    @classmethod
    def from_formula(cls, formula: str, data, sample_weight=None, **kwargs):
        """Fit from a model formula, ``"rating ~ age + C(region) + np.log(income)"``.

        The right-hand side is built by formulaic (``C(x)``: a categorical feature with its
        first level as reference; ``I(x ** 2)``, ``np.log(x)``, ``center(x)``, ``poly(x,
        2)``, interactions ``a:b`` and ``a*b``); the thresholds are the intercept. The
        transformation is kept: ``predict(new_data)`` takes a DataFrame with the columns the
        formula names, and a saved model keeps its formula. ``kwargs`` are the estimator's
        parameters, and ``groups=`` / ``cov_groups=`` (labels or a column of ``data``) for
        the fits that take them. Returns the fitted estimator.

        Examples
        --------
        ``OrdinalRegression.from_formula("health ~ physlm + disea + C(idp)", df)``
        """
        fit_kw = {k: kwargs.pop(k) for k in ("groups", "cov_groups") if k in kwargs}
        return cls(**kwargs).fit_formula(formula, data, sample_weight=sample_weight, **fit_kw)

    def fit_formula(self, formula: str, data, sample_weight=None, **fit_kw):
        """:meth:`from_formula` for an estimator already made (its parameters set)."""
        from ..data.formula import FormulaDesign

        for k, v in fit_kw.items():
            if isinstance(v, str):
                if not isinstance(data, pd.DataFrame) or v not in data.columns:
                    raise DataError(f"{k}={v!r} is not a column of the data.")
                fit_kw[k] = data[v].to_numpy()
        design, features, target = FormulaDesign.fit(formula, data)
        self.fit(features, data[target], sample_weight=sample_weight, **fit_kw)
        self.formula_ = design
        return self

    @dask_parts.partitionwise(dask_parts.linear_meta)
    def predict_linear(self, X) -> np.ndarray:
        """The latent linear predictor ``x @ coef_`` (higher means higher classes)."""
        return self.encode(X) @ self.coef_

    @dask_parts.partitionwise(dask_parts.proba_meta)
    def predict_proba(self, X, *, order: str = "classes") -> np.ndarray:
        """Class probabilities, shape ``(n, K)``: columns in the order of ``classes_`` (sorted,
        as scikit-learn's scorers expect), or with ``order="levels"`` in the ordinal order of
        ``levels_``."""
        return self._ordered(self._level_proba(X), order)

    def _level_proba(self, X) -> np.ndarray:
        """Class probabilities with columns in the order of ``levels_``."""
        return class_proba(self.predict_linear(X), self.thresholds_, self._link())

    def _ordered(self, proba, order: str):
        """Columns in the order of ``levels_`` (``order="levels"``) to those of ``classes_``
        (``"classes"``); a tuple of arrays column by column alike."""
        if order not in ("classes", "levels"):
            raise ParameterError(f"order must be 'classes' (the order of classes_) or 'levels' "
                                 f"(the ordinal order of levels_); got {order!r}.")
        perm = self._class_order
        if order == "levels" or np.array_equal(perm, np.arange(perm.shape[0])):
            return proba
        if isinstance(proba, tuple):
            return tuple(a[:, perm] for a in proba)
        return proba[:, perm]

    @dask_parts.partitionwise(dask_parts.cumulative_meta)
    def predict_cumulative_proba(self, X) -> np.ndarray:
        """``P(Y <= k | x)`` for the first ``K - 1`` levels, shape ``(n, K - 1)``."""
        return cumulative_proba(self.predict_linear(X), self.thresholds_, self._link())

    def _link(self):
        """The model's link (:mod:`fedgrain.core.links`); the logit for estimators without
        the parameter."""
        from ..core.links import get_link

        # a declared parameter only: an attribute set on another estimator changes nothing
        return get_link(self.get_params(deep=False).get("link", "logit"))

    @dask_parts.partitionwise(dask_parts.labels_meta)
    def predict(self, X) -> np.ndarray:
        """The most probable level of each row."""
        proba = self._level_proba(X)  # first: raises if not fitted
        return self.levels_[np.argmax(proba, axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy of :meth:`predict`; labels the model does not know count as wrong, with a
        warning naming them."""
        from sklearn.metrics import accuracy_score

        pred = self.predict(X)
        self._warn_unknown_labels(y)
        return float(accuracy_score(y, pred, sample_weight=sample_weight))

    def _warn_unknown_labels(self, y) -> None:
        known = set(self.levels_.tolist())
        values = y.to_numpy() if isinstance(y, (pd.Series, pd.Index)) else np.asarray(y)
        unknown = [v for v in pd.unique(values.astype(object).ravel()) if v not in known]
        if unknown:
            from .._warnings import warn

            warn(f"y holds label(s) {unknown[:10]!r} that the model was not fitted on (its "
                 f"levels are {self.levels_.tolist()!r}); their rows count as wrong.",
                 UserWarning)

    def predict_proba_ci(self, X, alpha: float = 0.05, *, order: str = "classes"):
        """Class probabilities with delta-method ``1 - alpha`` intervals.

        Returns ``(proba, lower, upper)``, each of shape ``(n, K)``, columns ordered as
        :meth:`predict_proba`'s.
        """
        return self._ordered(self._level_proba_ci(X, alpha), order)

    def _level_proba_ci(self, X, alpha: float):
        return self.results_.predict_proba_ci(self.encode(X), alpha)

    def predicted_probabilities(self, X, alpha: float = 0.05, **kwargs) -> pd.DataFrame:
        """Each level's predicted probability for each row of ``X`` (chosen values: a typical
        person, a grid), with its delta-method standard error and ``1 - alpha`` interval, as a
        long frame: ``row`` (the position in ``X``), ``level``, ``proba``, ``std err``,
        ``lower``, ``upper``. The intervals are those of :meth:`predict_proba_ci` (built on
        the logit scale of each probability, so inside (0, 1)); ``std err`` is the delta-method
        one on the probability scale. Further keyword arguments go to
        :meth:`predict_proba_ci` (``groups=`` for a model fitted with groups)."""
        from scipy import stats
        from scipy.special import logit

        proba, lower, upper = self.predict_proba_ci(X, alpha, order="levels", **kwargs)
        z = stats.norm.isf(alpha / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            se = (logit(upper) - logit(lower)) / (2 * z) * proba * (1 - proba)
        se = np.where(np.isfinite(se), se, 0.0)
        n, K = proba.shape
        return pd.DataFrame({"row": np.repeat(np.arange(n), K),
                             "level": np.tile(np.array(self.levels_, dtype=object), n),
                             "proba": proba.reshape(-1), "std err": se.reshape(-1),
                             "lower": lower.reshape(-1), "upper": upper.reshape(-1)})

    def composite_criteria(self, X, y, sample_weight=None) -> pd.Series:
        """Composite-likelihood information criteria of this model on labelled rows (the
        fit's rows).

        The federated estimators maximise the composite likelihood of the ``K - 1`` binary
        splits ``Y > k`` (with the model's link), not the likelihood, so AIC and BIC do not
        apply to them; their
        analogues (Varin and Vidoni 2005) charge the *effective* number of parameters
        ``tr(J H^-1)`` (``H`` the composite information, ``J`` the variance of its score by
        row) instead of ``d``: ``CLAIC = -2 cl + 2 tr(J H^-1)`` and ``CLBIC = -2 cl + log(n)
        tr(J H^-1)``, smaller is better, for comparing models fitted on the same rows. For an
        adaptive model they are the global model's. Returns a Series: ``composite loglik``,
        ``effective parameters``, ``CLAIC``, ``CLBIC``, ``rows``.
        """
        from ..core.likelihood import composite_pass
        from ..core.standardize import Standardizer

        check_is_fitted(self, "coef_")
        self._likelihood_only("composite_criteria")
        Xe = self.encode(X)
        codes = self.target_.encode(y, what="y")
        if Xe.shape[0] != codes.shape[0]:
            raise DataError(f"X has {Xe.shape[0]:,} rows but y has {codes.shape[0]:,} labels.")
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        std = Standardizer.fit(Xe, w)
        beta = self.coef_ * std.scale
        theta = self.thresholds_ - std.mean @ self.coef_
        P = composite_pass(std.transform(np.array(Xe, dtype=float)), codes, w, beta, theta,
                           order=2, meat="cluster", link=self._link())
        from ..core.linalg import solve_psd

        eff = float(np.trace(solve_psd(P.hess, P.meat)))
        n = float(codes.shape[0] if w is None else w.sum())
        cl = -float(P.loss)
        return pd.Series({"composite loglik": cl, "effective parameters": eff,
                          "CLAIC": -2.0 * cl + 2.0 * eff, "CLBIC": -2.0 * cl + np.log(n) * eff,
                          "rows": n})

    def _likelihood_only(self, what: str) -> None:
        """A DataError for ``what`` on a model fitted with probability weights: its weighted
        log-likelihood is a pseudo-likelihood, and model-based tests and criteria computed
        from it would change with the weights' scale."""
        if getattr(self, "weights", "frequency") == "probability":
            raise DataError(f"{what} treats weights as frequencies; this model was fitted with "
                            "probability weights (a pseudo-likelihood), where its statistics "
                            "would change with the weights' scale. Use Wald tests "
                            "(results_.wald_test), whose errors are the robust sandwich's.")

    def marginal_effects(self, X, alpha: float = 0.05):
        """Average marginal effects of each feature on each level's probability over the rows
        of ``X`` (the fit's rows, or a population of interest), with delta-method standard
        errors and ``1 - alpha`` intervals: a frame indexed by ``(feature, level)``. See
        :meth:`fedgrain.inference.results.OrdinalResults.marginal_effects`. For the federated
        estimators these are the global model's; for :class:`MixedOrdinalRegression` a typical
        group's (random effects zero)."""
        check_is_fitted(self, "coef_")
        return self.results_.marginal_effects(self.encode(X), alpha)

    def summary(self, alpha: float = 0.05):
        """Shortcut for ``results_.summary(alpha)``; with the last
        :meth:`proportional_odds_test` below the table."""
        check_is_fitted(self, "coef_")
        out = self.results_.summary(alpha)
        test = getattr(self, "po_test_", None)
        if test is not None:
            t = test.table
            section = Summary(test.title(), (), t.rename(columns={"p": "P>chi2"}))
            out = replace(out, sections=(*out.sections, section))
        return out

    def proportional_odds_test(self, X, y, method: str = "brant", sample_weight=None):
        """Test the proportional-odds assumption on labelled rows (those of the fit, say).

        ``method="brant"``: Brant's Wald test from separate binary logits of ``Y > k``;
        ``"score"``: the score test of the general model (threshold-specific slopes) at the
        proportional-odds maximum likelihood fit of these rows (refitted exactly, whatever
        this model's estimator). Per feature (``K - 2`` df) and jointly. A small p-value says
        the feature's effect differs between cuts of the scale. The result is kept as
        ``po_test_`` (shown by :meth:`summary` and the report, and saved with the model).

        Returns a :class:`fedgrain.inference.po_tests.ProportionalOddsTest`.
        """
        from ..inference import po_tests

        check_is_fitted(self, "coef_")
        self._likelihood_only("proportional_odds_test")
        if method not in po_tests.METHODS:
            raise param_error("proportional_odds_test", "method", "'brant' or 'score'", method)
        Xe = self.encode(X)
        codes = self.target_.encode(y, what="y")
        if Xe.shape[0] != codes.shape[0]:
            raise DataError(f"X has {Xe.shape[0]:,} rows but y has {codes.shape[0]:,} labels.")
        w = None
        if sample_weight is not None:
            w = np.asarray(sample_weight, dtype=float).reshape(-1)
            if w.shape[0] != codes.shape[0] or not np.all(np.isfinite(w) & (w >= 0)):
                raise DataError("sample_weight must hold one finite, non-negative weight per "
                                "row.")
            keep = w > 0
            Xe, codes, w = Xe[keep], codes[keep], w[keep]
        K = len(self.classes_)
        present = np.bincount(codes, minlength=K) > 0
        if not present.all():
            raise DataError(f"Level(s) {list(self.levels_[~present])} have no rows here; the "
                            "test compares the slopes at every cut and needs rows of every "
                            "level.")
        names = list(self.schema_.output_names)
        link = getattr(self, "link", "logit")
        if method == "brant" and link != "logit":
            raise DataError(f"Brant's test compares binary logits: it tests the logit model. "
                            f"For link={link!r} use method='score'.")
        if method == "brant":
            test = po_tests.brant(Xe, codes, w, K, names, self.results_.param_names[len(names):])
        else:
            from .centralized import OrdinalRegression

            ref = OrdinalRegression(levels=list(range(K)), tol=1e-12, link=link).fit(
                Xe, codes, sample_weight=w)
            test = po_tests.score(Xe, codes, w, ref.coef_, ref.thresholds_, names,
                                  self._link())
        self.po_test_ = test
        return test

    def report(self, path, X=None, y=None, *, alpha: float = 0.05, groups=None,
               source: str | None = None):
        """Write the HTML report of this model (see :func:`fedgrain.report.write_report`).

        ``X`` and ``y`` (labelled rows, held out say) add the scores per leaf beside the null
        model, confusion matrices, calibration and real rows on the partition's splits;
        ``groups`` their groups (a model fitted with groups); ``source`` says where they come
        from in the report's header. Returns the path written.
        """
        from ..report import write_report

        check_is_fitted(self, "coef_")
        if groups is not None and getattr(self, "groups_", None) is None:
            raise DataError(f"groups= applies to a model fitted with groups; this "
                            f"{type(self).__name__} has none.")
        return write_report(self, path, X, y, alpha=alpha, groups=groups, source=source)

    # ---- fitted state shared by both estimators ---------------------------------------------
    def _set_fitted(self, schema: FeatureSchema, target: TargetEncoding, params, cov,
                    results: OrdinalResults) -> None:
        p = schema.n_features
        self.schema_ = schema
        self.target_ = target
        self.levels_ = target.classes_array()
        self._class_order = class_order(self.levels_)
        self.classes_ = self.levels_[self._class_order]
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

    def _validate_solver(self, owner: str) -> None:
        """Checks of the solver parameters every estimator has."""
        if not is_int(self.max_iter) or self.max_iter < 1:
            raise param_error(owner, "max_iter", "an int >= 1", self.max_iter)
        if not is_real(self.tol) or not self.tol > 0:
            raise param_error(owner, "tol", "a float > 0", self.tol)

    def _validate_engine(self) -> None:
        """Checks of the parameters the divide-and-conquer engine takes (both federated
        estimators have them)."""
        owner = type(self).__name__
        a = self.alpha
        if not ((isinstance(a, str) and a in ("rate", "cv", "bic"))
                or (is_real(a) and np.isfinite(a) and a >= 0)):
            raise param_error(owner, "alpha", "'rate', 'cv', 'bic' or a float >= 0", a)
        if self.variance not in VARIANCES:
            raise param_error(owner, "variance", "'cluster', 'sandwich' or 'model'",
                              self.variance)
        if not (isinstance(self.backend, Backend) or self.backend in BACKENDS):
            raise param_error(owner, "backend", f"one of {BACKENDS} or a Backend instance",
                              self.backend)
        if self.n_jobs is not None and (not is_int(self.n_jobs) or self.n_jobs == 0):
            raise param_error(owner, "n_jobs", "a non-zero int or None", self.n_jobs)
        if not is_int(self.refine_rounds) or self.refine_rounds < 0:
            raise param_error(owner, "refine_rounds", "an int >= 0", self.refine_rounds)
        if self.debias not in DEBIAS:
            raise param_error(owner, "debias", "'auto', 'inverse' or 'nodewise'", self.debias)
        if not is_real(self.ridge) or not self.ridge >= 0:
            raise param_error(owner, "ridge", "a float >= 0", self.ridge)
        if not isinstance(self.penalize_thresholds, (bool, np.bool_)):
            raise param_error(owner, "penalize_thresholds", "a bool", self.penalize_thresholds)
        if not is_int(self.cv_folds) or self.cv_folds < 2:
            raise param_error(owner, "cv_folds", "an int >= 2", self.cv_folds)
        self._validate_solver(owner)

    def _engine_settings(self, n_classes: int) -> EngineSettings:
        """The engine's settings from this estimator's parameters."""
        return EngineSettings(
            LocalSettings(n_classes=n_classes, alpha=self.alpha, variance=self.variance,
                          debias=self.debias, ridge=float(self.ridge),
                          penalize_thresholds=bool(self.penalize_thresholds),
                          cv_folds=self.cv_folds, max_iter=self.max_iter, tol=float(self.tol),
                          link=self._link().name,
                          device=self.get_params(deep=False).get("device")
                          or getattr(self, "_input_device", None)),
            refine_rounds=int(self.refine_rounds), alpha=self.alpha)

    def _n_workers(self, backend: Backend) -> int:
        """Workers for the default number of subsets: those of ``n_jobs`` (or the CPUs) for the
        built-in backends, serial included, so the default model does not depend on the
        backend chosen; a backend instance's own."""
        return (backend.n_workers if isinstance(self.backend, Backend)
                else resolve_n_jobs(self.n_jobs))

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

    def save(self, path, *, overwrite: bool = False, key: str | bytes | None = None) -> Path:
        """Save the fitted model as a directory of JSON and ``.npz`` (no pickle).

        Written atomically: a crash never leaves a half-written model that loads, and a
        model replaced with ``overwrite=True`` is swapped whole under readers. Load it with
        :func:`fedgrain.load`. ``key`` (or ``$FEDGRAIN_MODEL_KEY``) signs the model
        (HMAC-SHA256): ``load`` with the same key refuses models not signed with it.
        """
        meta, arrays = self._save_state()
        return write_model_dir(path, meta, arrays, overwrite=overwrite, key=key)

    def _save_state(self) -> tuple[dict, dict]:
        """What :meth:`save` writes: the description and the arrays."""
        check_is_fitted(self, "coef_")
        given = self.get_params()
        if given.get("callback") is not None:
            given["callback"] = None  # code is not saved: a loaded model reports to logging
        params = {k: _plain(v) for k, v in given.items()}
        if isinstance(given.get("backend"), Backend):
            params["backend"] = given["backend"].name
        if "random_state" in params and not (
            params["random_state"] is None or is_int(params["random_state"])
        ):
            params["random_state"] = None  # a generator object cannot be stored as JSON
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
        if getattr(self, "po_test_", None) is not None:
            meta["po_test"] = self.po_test_.to_dict()
        if getattr(self, "formula_", None) is not None:
            meta["formula"] = self.formula_.to_dict()
        arrays = {"coef": self.coef_, "thresholds": self.thresholds_, "cov": self.cov_,
                  **extra_arrays}
        if r.heterogeneity is not None:
            arrays.update({f"het_{k}": np.asarray(v) for k, v in r.heterogeneity.items()})
        return meta, arrays



#: Estimator classes :func:`load` may restore, by name: filled by the modules that define them,
#: so a model file can never name (and so import or run) anything else.
ESTIMATORS: dict[str, type[OrdinalModel]] = {}


def register(cls: type[OrdinalModel]) -> type[OrdinalModel]:
    """Class decorator: make ``cls`` loadable by :func:`load`."""
    ESTIMATORS[cls.__name__] = cls
    return cls


def load(path: str | os.PathLike, *, key: str | bytes | None = None) -> OrdinalModel:
    """Load a model saved with ``save()``; verifies format version and checksums.

    Loading never executes code: the directory holds JSON and ``.npz`` arrays only. With
    ``key`` (or ``$FEDGRAIN_MODEL_KEY``), only a model signed with that key loads: the
    checksums alone detect damage, not an edit whose author recomputed them.

    Raises
    ------
    fedgrain.exceptions.ModelFileError
        When the directory is missing, truncated, tampered with or of an unknown version.
    """
    meta, arrays = read_model_dir(path, key=key)
    try:
        cls = ESTIMATORS[meta["estimator"]]
        est = cls(**meta["params"])
        if hasattr(est, "link"):
            from ..core.links import get_link

            get_link(est.link)  # an unknown link is a damaged file (ValueError)
        schema = FeatureSchema.from_dict(meta["schema"])
        target = TargetEncoding.from_dict(meta["target"])
        het = None
        if "het_q_param" in arrays:
            het = {k[4:]: arrays[k] for k in arrays if k.startswith("het_")}
        p = schema.n_features
        params = np.concatenate([arrays["coef"], arrays["thresholds"]])
        results = OrdinalResults(params, arrays["cov"], schema.output_names, target.classes,
                                 title=meta["results"]["title"], info=meta["results"]["info"],
                                 heterogeneity=het, link=getattr(est, "link", "logit"))
        est._set_fitted(schema, target, params, arrays["cov"], results)
        est._restore_extra(meta, arrays)
        if "po_test" in meta:
            from ..inference.po_tests import ProportionalOddsTest

            est.po_test_ = ProportionalOddsTest.from_dict(meta["po_test"])
        if "formula" in meta:
            from ..data.formula import FormulaDesign

            est.formula_ = FormulaDesign.from_dict(meta["formula"])
        ok = (arrays["coef"].shape == (p,) and arrays["cov"].shape == (params.size,) * 2
              and arrays["thresholds"].shape == (target.n_classes - 1,))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError,
            OverflowError) as exc:  # whatever a damaged description makes the restore meet
        raise ModelFileError(
            f"{path}: the model description is incomplete or inconsistent ({exc!r}); "
            "save the model again."
        ) from None
    if not ok:
        raise ModelFileError(f"{path}: array shapes do not match the model description; "
                             "save the model again.")
    return est
