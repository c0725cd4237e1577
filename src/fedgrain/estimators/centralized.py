"""The centralized reference fit: exact proportional-odds maximum likelihood."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from .._warnings import warn
from ..core.blocks import block_rows, row_threads
from ..core.likelihood import Pass, class_proba, exact_pass, exact_row_terms, initial_thresholds
from ..core.linalg import NotIdentifiedError, chi2_sf, inverse, unidentified_directions
from ..core.links import LINKS, get_link
from ..core.solvers import newton, runaway, warm_start
from ..core.standardize import Standardizer
from ..data import partitionwise as dask_parts
from ..data import prepare_fit
from ..data.features import resolve_columns
from ..data.groups import check_groups, kept_groups, split_groups_column
from ..exceptions import DataError, ParameterError, SeparationError
from ..inference import local
from ..inference.results import LRTest, OrdinalResults, parameter_names
from .base import OrdinalModel, is_real, param_error, register


@register
class OrdinalRegression(OrdinalModel):
    """Proportional-odds (cumulative logit) regression by exact maximum likelihood.

    The centralized, single-machine reference fit: Newton's method on the exact multinomial
    likelihood with analytic gradient and Hessian, each iteration one pass over the rows in
    blocks. It matches R's ``MASS::polr`` and statsmodels' ``OrderedModel`` (logit) and is
    typically two or more orders of magnitude faster than the latter.

    Parameters
    ----------
    link : {"logit", "probit", "cloglog", "loglog", "cauchit"}
        ``F`` in ``P(Y <= k | x) = F(threshold_k - x @ coef)``: the logistic (proportional
        odds, the default), the standard normal, the Gumbel minimum (``1 - exp(-exp(a))``,
        proportional hazards), the Gumbel maximum, or the Cauchy (heavy tails). As R's
        ``clm(link=...)`` and statsmodels' ``OrderedModel(distr=...)``.
    nominal : list, optional
        Features (output names or positions) whose slope may differ at every cut of the scale:
        the partial proportional-odds model ``P(Y <= k | x) = F(threshold_k - x @ coef -
        x_nominal @ delta_k)`` with ``delta_0 = 0`` (``gologit2``, R's ``clm(nominal=)``).
        ``coef_`` then holds these features' slopes at the first cut and ``slopes_by_cut_``
        their slope at every cut. Fitted by the same Newton method on the exact likelihood;
        frequency weights only, no ridge.
    alpha : float
        Optional ridge penalty on the standardised slopes: the fit minimises
        ``-loglik / n + alpha / 2 * sum_j (sd_j * coef_j)^2``. 0 (the default) is the exact
        maximum likelihood; a small positive value keeps the fit finite on separated data, and
        the standard errors are then those of the penalised fit (inverse penalised Hessian).
    variance : {"model", "sandwich"}
        Model-based standard errors (inverse observed information, as R and statsmodels
        report) or the robust sandwich.
    weights : {"frequency", "probability"}
        What ``sample_weight`` means: counts of identical rows (the default), or survey /
        inverse-probability weights, with robust standard errors that do not depend on the
        weights' scale (the log-likelihood is then a pseudo-likelihood: no ``lr_test``).
    levels : sequence, optional
        The ordered levels of the target, lowest first; needed when they are strings.
    categorical : sequence of str, optional
        Feature columns to one-hot encode (first level is the reference).
    max_iter : int
    tol : float
        Newton stops when it promises less than ``tol`` gain in log-likelihood (the estimate is
        then within about ``sqrt(2 tol)`` standard errors of the optimum).
    device : {None, "cuda", "cuda:N", "cpu"}
        Run the passes over the rows with PyTorch on this device (the rows are moved there
        once, in float64; the Newton algebra stays on the CPU); by default the CPU's own passes,
        or the GPU the input is on when ``X`` is a CUDA tensor or a CuPy array. Logit link,
        without nominal features. The fit equals the CPU fit to 1e-8.

    On the CPU the passes over the rows share their chunks of rows among as many threads as
    the process has CPUs that other processes do not keep busy, at most the BLAS libraries'
    thread limit: ``with
    threadpoolctl.threadpool_limits(1):`` (or ``OMP_NUM_THREADS=1``) keeps a fit on one core.
    The model is the same to the last bit whatever the number of threads.

    Attributes
    ----------
    classes_, coef_, thresholds_, cov_, bse_ : see the module docstring
    results_ : OrdinalResults
    loglik_ : float
        Maximised log-likelihood (without the ridge penalty when ``alpha > 0``).
    llnull_ : float
        Log-likelihood of the model without features (thresholds at the class shares).
    nobs_ : float
        Rows (the sum of the weights with ``sample_weight``).
    df_model_ : int
        Slopes estimated (``p``); the model has ``p + K - 1`` parameters.
    aic_, bic_ : float
        ``-2 loglik + 2 (p + K - 1)`` and ``-2 loglik + log(nobs) (p + K - 1)``, as R's
        ``AIC()`` / ``BIC()`` and statsmodels.
    pseudo_r2_ : float
        McFadden's ``1 - loglik / llnull``.
    n_iter_ : int
    converged_ : bool

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain import OrdinalRegression
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((500, 2))
    >>> y = np.digitize(X @ [1.0, -0.5] + rng.logistic(size=500), [-1, 1])
    >>> m = OrdinalRegression().fit(X, y)
    >>> m.coef_.round(1)
    array([ 1.1, -0.5])
    """

    def __init__(self, *, link="logit", nominal=None, alpha=0.0, variance="model",
                 weights="frequency", levels=None, categorical=None, max_iter=100, tol=1e-8,
                 device=None):
        self.device = device
        self.link = link
        self.nominal = nominal
        self.alpha = alpha
        self.variance = variance
        self.weights = weights
        self.levels = levels
        self.categorical = categorical
        self.max_iter = max_iter
        self.tol = tol

    def _validate(self) -> None:
        owner = type(self).__name__
        if not is_real(self.alpha) or not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise param_error(owner, "alpha", "a float >= 0", self.alpha)
        if self.variance not in ("model", "sandwich"):
            raise param_error(owner, "variance", "'model' or 'sandwich'", self.variance)
        if self.link not in LINKS:
            raise param_error(owner, "link", f"one of {LINKS}", self.link)
        if self.weights not in ("frequency", "probability"):
            raise param_error(owner, "weights", "'frequency' or 'probability'", self.weights)
        if self.device is not None:
            from ..core.gpu import torch_device

            torch_device(self.device)  # PyTorch and the device are there, or a clear error
        self._validate_solver(owner)

    def fit(self, X, y, sample_weight=None, cov_groups=None):
        """Fit by exact maximum likelihood. ``y`` may name a column when ``X`` is a frame.

        ``sample_weight`` are frequency weights (a row of weight 3 is three rows) or, with
        ``weights="probability"``, survey / inverse-probability weights (the standard errors
        are then the robust sandwich's, and do not change when the weights are multiplied by a
        constant). ``cov_groups`` (labels, or a column of the DataFrame ``X``) makes the
        standard errors cluster-robust: rows of one group (a respondent answering several
        times, a school) may be correlated, groups are independent.
        """
        self._validate()
        owner = type(self).__name__
        from ..core.gpu import device_of, on_host

        logit_only = self.link == "logit" and not _nominal_list(self.nominal)
        device = self.device
        if device is None and logit_only:
            device = device_of(X)  # rows on a GPU: fitted there (other models on the CPU)
        X, y, sample_weight = on_host(X), on_host(y), on_host(sample_weight)
        if device is not None and not logit_only:
            raise ParameterError(f"device={device!r} runs the logit model's passes; fit "
                                 f"link={self.link!r} or nominal features on the CPU "
                                 "(device=None).")
        if cov_groups is not None:
            X, cov_groups = split_groups_column(X, cov_groups)
            cov_groups = kept_groups(cov_groups, sample_weight)
        if self.weights == "probability" and sample_weight is None:
            raise DataError("weights='probability' describes sample_weight, and none was given.")
        data = prepare_fit(X, y, levels=self.levels, categorical=self.categorical,
                           sample_weight=sample_weight, estimator_name=owner)
        Xm, codes, w = data.X, data.codes, data.weights
        self._nominal_idx = None
        for stale in ("nominal_delta_", "nominal_cov_"):
            if hasattr(self, stale):
                delattr(self, stale)
        if _nominal_list(self.nominal):
            if cov_groups is not None or self.weights == "probability" or self.alpha:
                raise DataError("nominal= (partial proportional odds) is fitted with frequency "
                                "weights and model-based or sandwich errors only: drop "
                                "cov_groups, weights='probability' and alpha.")
            return self._fit_nominal(data)
        clusters = None
        if cov_groups is not None:
            _, clusters = np.unique(check_groups(cov_groups, codes.shape[0]),
                                    return_inverse=True)
            if clusters.max() < 1:
                raise DataError("cov_groups has one group only: a cluster-robust variance "
                                "needs many groups (at least 20 or so to be trusted).")
        n_eff = float(codes.shape[0] if w is None else w.sum())
        p, K = Xm.shape[1], data.target.n_classes
        means, scales = data.column_moments()
        link = get_link(self.link)
        x0 = np.concatenate([np.zeros(p), initial_thresholds(codes, w, K, floor=1e-10,
                                                             link=link)])
        # ridge per row on the standardised slopes: alpha/2 sum_j (sd_j coef_j)^2
        ridge = float(self.alpha) * np.concatenate([scales**2, np.zeros(K - 1)])

        def increasing(x):
            return bool(np.all(np.diff(x[p:]) > 0))

        # The fit runs in centred coordinates (thresholds at the features' means), mapped back
        # to the original scale at the end: exact at any feature location.
        def subsample(rows):
            ys = codes[rows]
            ws = None if w is None else w[rows]
            if np.count_nonzero(np.bincount(ys, weights=ws, minlength=K)) < K:
                return None  # a level is missing from the subsample
            n_sub = float(rows.size if ws is None else ws.sum())
            return _exact_oracle(Xm[rows], ys, ws, ridge * n_sub, means, link), n_sub

        if device is None:
            oracle = _exact_oracle(Xm, codes, w, ridge * n_eff, means, link)
        else:  # the passes on the device; the Newton algebra (d x d) stays here
            from ..core.gpu import DeviceRows

            oracle = _ridged(DeviceRows(Xm, codes, w, device).exact_oracle(means),
                             ridge * n_eff)
        # The passes share their chunks of rows among the threads the BLAS thread limit allows
        # (every core by default; threadpoolctl or OMP_NUM_THREADS=1 for one), each product on
        # one BLAS thread: the per-block products are too small to gain from BLAS threads, and
        # threads that wait for a busy core slow every block down. The sums are the same
        # whatever the number of threads.
        with row_threads(), local.one_blas_thread():
            x0 = warm_start(subsample, codes.shape[0], x0, max_iter=self.max_iter,
                            feasible=increasing)
            res = newton(oracle, x0, n_eff, max_iter=self.max_iter, tol=self.tol,
                         feasible=increasing)
            J = None
            robust = self.variance == "sandwich" or self.weights == "probability" or \
                clusters is not None
            if robust:
                J = _meat(Xm, codes, w, res.x, means, clusters,
                          squared=self.weights == "probability", link=link)
        names = data.schema.output_names
        labels = parameter_names(names, data.target.classes)
        unit = np.where(scales > 0, scales, 1.0)
        self._check(res, unit, labels, lambda: _collinear_columns(Xm, w, means, unit))
        # inverted on the features' standard scale (then scaled back): a column of values
        # around 1e80 next to others around 1 must not look like a dependence
        D = np.concatenate([unit, np.ones(K - 1)])
        try:
            cov = inverse(res.hess / np.outer(D, D)) / np.outer(D, D)
        except NotIdentifiedError as exc:
            raise _collinear_error(labels, exc.indices) from None
        if J is not None:
            cov = cov @ J @ cov
        params, cov = Standardizer(means, np.ones(p)).to_raw(res.x, 0.5 * (cov + cov.T))
        # the likelihood itself: the ridge term taken off the minimised objective
        penalty = 0.5 * float((ridge * n_eff) @ (res.x * res.x))
        self.loglik_ = -float(res.objective * n_eff - penalty)
        counts = np.bincount(codes, weights=w, minlength=K)
        seen = counts > 0
        self.llnull_ = float(counts[seen] @ np.log(counts[seen] / n_eff))
        self.nobs_ = n_eff if self.weights == "frequency" else float(codes.shape[0])
        self.df_model_ = p
        self.n_iter_ = res.n_iter
        self.converged_ = bool(res.converged)
        self._set_statistics(K - 1)
        pseudo = self.weights == "probability"
        stats = ({"Log-likelihood (pseudo)": f"{self.loglik_:.4f}"} if pseudo else
                 {"Log-likelihood": f"{self.loglik_:.4f}",
                  "Null log-likelihood": f"{self.llnull_:.4f}",
                  "AIC": f"{self.aic_:.4f}", "BIC": f"{self.bic_:.4f}",
                  "McFadden pseudo-R^2": f"{self.pseudo_r2_:.4f}"})
        results = OrdinalResults(
            params, cov, names, data.target.classes,
            title="Ordinal regression: exact maximum likelihood", link=self.link,
            info={
                "Rows": f"{codes.shape[0]:,}", "Classes": K, "Link": self.link, **stats,
                "Standard errors": _variance_label(robust, clusters, self.weights),
                "Ridge alpha": self.alpha,
                "Newton iterations": f"{res.n_iter} "
                                     f"({'converged' if res.converged else 'NOT converged'})",
            },
        )
        self._set_fitted(data.schema, data.target, params, cov, results)
        return self

    # ---- partial proportional odds ---------------------------------------------------------
    def _nominal_columns(self, names: list[str]) -> list[int]:
        """Positions of the nominal features among the encoded ones; a categorical feature's
        name stands for all its one-hot columns (``color`` for ``color[green]``, ...)."""
        return resolve_columns(_nominal_list(self.nominal), names, "nominal=")

    def _fit_nominal(self, data):
        from ..core.nominal import nominal_pass

        Xm, codes, w = data.X, data.codes, data.weights
        names = data.schema.output_names
        p, K = Xm.shape[1], data.target.n_classes
        if K < 3:
            raise DataError("nominal= gives the features a slope at every cut of the scale; "
                            "with two levels there is one cut (a binary logit).")
        R = self._nominal_columns(names)
        r = len(R)
        link = get_link(self.link)
        n_eff = float(codes.shape[0] if w is None else w.sum())
        means, scales = data.column_moments()
        Xc = Xm - means
        unit = np.where(scales > 0, scales, 1.0)
        dependent = _collinear_columns(Xm, w, means, unit)
        labels = parameter_names(names, data.target.classes)
        if dependent.size:
            raise _collinear_error(labels, dependent)
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # only a starting point
                po = OrdinalRegression(link=self.link, levels=list(range(K)),
                                       max_iter=self.max_iter, tol=self.tol).fit(
                    pd.DataFrame(Xc, columns=names), codes, sample_weight=w)
        except SeparationError as exc:
            raise SeparationError(f"{exc}".split(" Remove or merge")[0] + " Remove or merge "
                                  "the separating feature, or merge sparse levels (nominal= "
                                  "fits take no ridge penalty).") from None
        x0 = np.concatenate([po.coef_, po.thresholds_, np.zeros((K - 2) * r)])
        Wc = Xc[:, R]

        def oracle(x, loss=True, order=2, meat=False):
            return nominal_pass(Xc, Wc, codes, w, x, K, link, order=order, meat=meat)

        with local.one_blas_thread():
            res = newton(oracle, x0, n_eff, max_iter=self.max_iter, tol=self.tol)
            J = oracle(res.x, order=0, meat=True).meat if self.variance == "sandwich" else None
        # the last step in standardised units: slopes and deltas times the features' sds
        scaled = res.step * np.concatenate([unit, np.ones(K - 1), np.tile(unit[R], K - 2)])
        if res.diverged or not np.all(np.isfinite(res.x)) or \
                np.any(runaway(scaled) | ~np.isfinite(scaled)):
            raise SeparationError("The partial proportional-odds fit does not settle: the "
                                  "cut-specific slopes separate some levels (a level with few "
                                  "rows, say). Make fewer features nominal, or merge levels.")
        if not res.converged:
            warn(f"OrdinalRegression(nominal=...) did not converge in max_iter="
                 f"{self.max_iter} Newton iterations; increase max_iter.", ConvergenceWarning)
        try:
            cov = inverse(res.hess)
        except NotIdentifiedError:
            raise DataError("The partial proportional-odds model is not identified on these "
                            "rows (a cut with too few rows on one side for the nominal "
                            "slopes); make fewer features nominal.") from None
        if J is not None:
            cov = cov @ J @ cov
        # back from centred features: theta_k = theta_c_k + m'beta + m_R'delta_k
        d = res.x.size
        T = np.eye(d)
        T[p:p + K - 1, :p] += means[None, :]
        for k in range(1, K - 1):
            T[p + k, p + K - 1 + (k - 1) * r:p + K - 1 + k * r] += means[R]
        params = T @ res.x
        cov = T @ (0.5 * (cov + cov.T)) @ T.T
        self._nominal_idx = R
        self.nominal_cov_ = cov
        self.nominal_delta_ = params[p + K - 1:].reshape(K - 2, r)
        self.loglik_ = -float(res.objective * n_eff)
        counts = np.bincount(codes, weights=w, minlength=K)
        self.llnull_ = float(counts[counts > 0] @ np.log(counts[counts > 0] / n_eff))
        self.nobs_ = n_eff
        self.df_model_ = p + r * (K - 2)
        self.n_iter_ = res.n_iter
        self.converged_ = bool(res.converged)
        self._set_statistics(K - 1)
        nominal_names = [names[j] for j in R]
        from ..core.nominal import row_thresholds

        t_fit = row_thresholds(params[p:p + K - 1], Xm[:, R], self.nominal_delta_)
        crossed = int(np.count_nonzero(np.any(np.diff(t_fit, axis=1) <= 0, axis=1)))
        if crossed:
            warn(f"At {crossed:,} of the fitted rows the nominal features' cut-specific lines "
                 "cross: the model gives them no proper distribution (their likelihood terms "
                 "use their own level's cuts only; predict_proba makes their cumulative "
                 "probabilities non-decreasing). Make fewer features nominal, or look at "
                 "those rows.", UserWarning)
        info = {"Rows": f"{codes.shape[0]:,}", "Classes": K, "Link": self.link,
                "Nominal (slope per cut)": ", ".join(nominal_names),
                "Log-likelihood": f"{self.loglik_:.4f}", "AIC": f"{self.aic_:.4f}",
                "BIC": f"{self.bic_:.4f}",
                "Standard errors": "model-based" if J is None else "sandwich",
                "Newton iterations": f"{res.n_iter} "
                                     f"({'converged' if res.converged else 'NOT converged'})"}
        q = p + K - 1
        results = OrdinalResults(params[:q], cov[:q, :q], names, data.target.classes,
                                 title="Ordinal regression: partial proportional odds "
                                       "(exact maximum likelihood)", info=info,
                                 link=self.link)
        self._set_fitted(data.schema, data.target, params[:q], cov[:q, :q], results)
        return self

    @property
    def slopes_by_cut_(self) -> np.ndarray | None:
        """With ``nominal``: each nominal feature's slope at every cut, ``(K - 1, r)`` (rows:
        the cuts ``"a|b"`` in order); None without."""
        if getattr(self, "_nominal_idx", None) is None:
            return None
        R = self._nominal_idx
        return self.coef_[R][None, :] + np.vstack([np.zeros((1, len(R))), self.nominal_delta_])

    def _slopes_table(self, alpha: float) -> pd.DataFrame:
        """The nominal features' slope at every cut with standard errors and intervals."""
        from scipy import stats

        R = self._nominal_idx
        p, K1, r = self.coef_.size, self.thresholds_.size, len(R)
        names = self.schema_.output_names
        cuts = self.results_.param_names[p:]
        rows, est, se = [], [], []
        for k in range(K1):
            for i, j in enumerate(R):
                g = np.zeros(self.nominal_cov_.shape[0])
                g[j] = 1.0
                if k:
                    g[p + K1 + (k - 1) * r + i] = 1.0
                rows.append(f"{names[j]} @ {cuts[k]}")
                est.append(float(g @ np.r_[self.coef_, self.thresholds_,
                                           self.nominal_delta_.reshape(-1)]))
                se.append(float(np.sqrt(max(g @ self.nominal_cov_ @ g, 0.0))))
        est, se = np.array(est), np.array(se)
        z = stats.norm.isf(alpha / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            zv = np.where(se > 0, est / se, np.nan)
        return pd.DataFrame({"coef": est, "std err": se, "z": zv,
                             "P>|z|": 2 * stats.norm.sf(np.abs(zv)),
                             f"[{alpha / 2:.3g}": est - z * se,
                             f"{1 - alpha / 2:.3g}]": est + z * se},
                            index=pd.Index(rows, name="slope at cut"))

    def summary(self, alpha: float = 0.05):
        out = super().summary(alpha)
        if getattr(self, "_nominal_idx", None) is None:
            return out
        from dataclasses import replace

        from ..inference.results import Summary

        section = Summary("Slopes of the nominal features at every cut", (),
                          self._slopes_table(alpha))
        return replace(out, sections=(section, *out.sections))

    def _level_proba(self, X) -> np.ndarray:
        if getattr(self, "_nominal_idx", None) is None:
            return super()._level_proba(X)
        from ..core.nominal import row_thresholds

        Xe = self.encode(X)
        t = row_thresholds(self.thresholds_, Xe[:, self._nominal_idx], self.nominal_delta_)
        crossed = np.any(np.diff(t, axis=1) <= 0, axis=1)
        P = class_proba(Xe @ self.coef_, np.maximum.accumulate(t, axis=1), self._link())
        if crossed.any():
            warn(f"{int(crossed.sum()):,} row(s) lie where the nominal features' cut-specific "
                 "lines cross: their cumulative probabilities were made non-decreasing.",
                 UserWarning)
        return P

    @dask_parts.partitionwise(dask_parts.cumulative_meta)
    def predict_cumulative_proba(self, X) -> np.ndarray:
        if getattr(self, "_nominal_idx", None) is None:
            return super().predict_cumulative_proba(X)
        return np.cumsum(self._level_proba(X), axis=1)[:, :-1]

    def _po_only(self, what: str) -> None:
        if getattr(self, "_nominal_idx", None) is not None:
            raise DataError(f"{what} is for the proportional-odds model; this one has nominal "
                            "features (use predict_proba, summary and lr_test).")

    def _level_proba_ci(self, X, alpha: float):
        self._po_only("predict_proba_ci")
        return super()._level_proba_ci(X, alpha)

    def marginal_effects(self, X, alpha: float = 0.05):
        self._po_only("marginal_effects")
        return super().marginal_effects(X, alpha)

    def proportional_odds_test(self, X, y, method: str = "brant", sample_weight=None):
        self._po_only("proportional_odds_test")
        return super().proportional_odds_test(X, y, method, sample_weight)

    def composite_criteria(self, X, y, sample_weight=None):
        self._po_only("composite_criteria")
        return super().composite_criteria(X, y, sample_weight)

    def _set_statistics(self, n_thresholds: int) -> None:
        """AIC, BIC and McFadden's R^2 from the log-likelihoods and counts (NaN with
        probability weights: the weighted log-likelihood is a pseudo-likelihood, and these
        would change with the weights' scale)."""
        if self.weights == "probability":
            self.aic_ = self.bic_ = self.pseudo_r2_ = float("nan")
            return
        k = self.df_model_ + n_thresholds
        self.aic_ = 2.0 * k - 2.0 * self.loglik_
        self.bic_ = np.log(self.nobs_) * k - 2.0 * self.loglik_
        self.pseudo_r2_ = 1.0 - self.loglik_ / self.llnull_ if self.llnull_ < 0 else np.nan

    def lr_test(self, restricted) -> LRTest:
        """Likelihood-ratio test of a nested, smaller model fitted on the same rows.

        ``restricted`` is an :class:`OrdinalRegression` whose features are a subset of this
        model's (the hypothesis: the slopes of the others are zero); with named columns (a
        DataFrame) the nesting is checked by name, with arrays (columns named by position) it
        is the caller's to ensure. The statistic ``2 (loglik
        - loglik_restricted)`` is referred to chi-square on the difference in parameters.

        Raises a :class:`DataError` when the two were not fitted on the same rows and levels, are
        not nested, or either is penalised (``alpha > 0``: no likelihood-ratio theory).
        """
        check_is_fitted(self, "coef_")
        if not isinstance(restricted, OrdinalRegression) or not hasattr(restricted, "coef_"):
            raise DataError("lr_test compares two fitted OrdinalRegression models; got "
                            f"{type(restricted).__name__}.")
        big, small = self, restricted
        if small.df_model_ > big.df_model_:
            big, small = small, big
        if list(big.levels_) != list(small.levels_) or \
                not np.isclose(big.nobs_, small.nobs_) or \
                not np.isclose(big.llnull_, small.llnull_, rtol=1e-10, atol=1e-8):
            raise DataError("lr_test needs both models fitted on the same rows (their row "
                            "counts, levels or class counts differ).")
        if big.link != small.link:
            raise DataError(f"The models have different links ({big.link!r} and "
                            f"{small.link!r}): they are not nested.")
        if "probability" in (big.weights, small.weights):
            raise DataError("lr_test compares likelihoods; with probability weights the "
                            "weighted log-likelihood is a pseudo-likelihood (use a Wald test, "
                            "results_.wald_test).")
        if big.alpha or small.alpha:
            raise DataError("lr_test compares maximum likelihood fits; a ridge fit (alpha > 0) "
                            "maximises a penalised likelihood.")
        df = big.df_model_ - small.df_model_
        if df == 0:
            raise DataError("The models have the same number of slopes: nothing to test.")
        stat = max(2.0 * (big.loglik_ - small.loglik_), 0.0)
        extra = [f for f in big._nominal_names() if f not in small._nominal_names()]
        same_features = big.coef_.size == small.coef_.size
        if (extra or small._nominal_names()) and not (
                big.schema_.has_names and small.schema_.has_names) and not same_features:
            raise DataError("Comparing models with nominal features needs named columns (a "
                            "DataFrame), so that the nesting can be checked.")
        if not (big.schema_.has_names and small.schema_.has_names) and not (
                extra and same_features):
            # array columns are named by position: nesting cannot be checked by name
            return LRTest(stat, df, chi2_sf(stat, df),
                          f"the {df} slope(s) only the larger model has = 0")
        names_big = list(big.results_.feature_names)
        missing = [f for f in small.results_.feature_names if f not in names_big]
        if missing:
            raise DataError(f"The models are not nested: {missing} are features of the smaller "
                            "model only. Fit the smaller model on a subset of the larger's "
                            "features.")
        dropped = [f for f in names_big if f not in small.results_.feature_names]
        lost = [f for f in small._nominal_names() if f not in big._nominal_names()]
        if lost:
            raise DataError(f"The models are not nested: {lost} have a slope per cut in the "
                            "smaller model only.")
        label = " = ".join(dropped) + " = 0" if dropped else ""
        if extra:
            label += (", and " if label else "") + \
                f"the same slope at every cut for {', '.join(extra)}"
        return LRTest(stat, df, chi2_sf(stat, df), label)

    def _nominal_names(self) -> list[str]:
        R = getattr(self, "_nominal_idx", None)
        return [] if R is None else [self.schema_.output_names[j] for j in R]

    def _check(self, res, scales: np.ndarray, labels: list[str], collinear) -> None:
        """Collinear columns and separation are errors; running out of iterations a warning.

        Newton's last step is judged in standardised units (slopes times the features' standard
        deviations; the centred thresholds as they are), where one unit means the same whatever
        the data's scale. A step that keeps moving means separation only when the Hessian is
        regular: along a linear dependence of the columns it is singular, and the step there
        is rounding noise of any size. So whenever the fit did not settle, ``collinear()`` (the
        features in a dependence of the design, :func:`_collinear_columns`) is asked first:
        collinearity is a property of the columns alone, separation one of the columns and the
        labels.
        """
        step = res.step * np.concatenate([scales, np.ones(len(labels) - scales.size)])
        moving = np.flatnonzero(runaway(step) | ~np.isfinite(step))
        if not res.converged or res.diverged or moving.size:
            dependent = collinear()
            if dependent.size:
                raise _collinear_error(labels, dependent)
        if res.converged or res.diverged:
            if moving.size or res.diverged:
                raise SeparationError(
                    "The classes are (quasi-)separated: the maximum likelihood estimate does "
                    f"not exist ({', '.join(labels[j] for j in moving)} grow without bound). "
                    "Remove or merge the separating feature, or set alpha > 0 for a ridge "
                    "penalty (DivideConquerOrdinal refuses such data too: its L1 fit is finite, "
                    "but not the de-biased estimate)."
                )
        else:
            warn(f"OrdinalRegression did not converge in max_iter={self.max_iter} Newton "
                 "iterations; increase max_iter.", ConvergenceWarning)

    def _extra_state(self):
        meta = {"loglik": self.loglik_, "n_iter": self.n_iter_, "llnull": self.llnull_,
                "nobs": self.nobs_, "converged": self.converged_}
        arrays = {}
        if getattr(self, "_nominal_idx", None) is not None:
            meta["nominal_idx"] = list(self._nominal_idx)
            arrays = {"nominal_delta": self.nominal_delta_, "nominal_cov": self.nominal_cov_}
        return meta, arrays

    def _restore_extra(self, meta, arrays):
        self.loglik_ = float(meta["loglik"])
        self.n_iter_ = int(meta["n_iter"])
        # models saved before these were kept: unknown, not made up
        self.llnull_ = float(meta.get("llnull", np.nan))
        self.nobs_ = float(meta.get("nobs", np.nan))
        self.converged_ = bool(meta.get("converged", True))
        self._nominal_idx = None
        self.df_model_ = self.coef_.shape[0]
        if bool(_nominal_list(self.nominal)) != bool(meta.get("nominal_idx")):
            raise ValueError("the nominal features do not match the model's parameters")
        if "nominal_idx" in meta:
            R = self._nominal_columns(self.schema_.output_names)  # from the saved parameter
            p, K1 = self.coef_.shape[0], self.thresholds_.shape[0]
            delta, cov = arrays["nominal_delta"], arrays["nominal_cov"]
            d = p + K1 + (K1 - 1) * len(R)
            if list(meta["nominal_idx"]) != R or any(isinstance(j, bool) for j in
                                                      meta["nominal_idx"]) or \
                    delta.shape != (K1 - 1, len(R)) or cov.shape != (d, d) or \
                    delta.dtype.kind != "f" or cov.dtype.kind != "f" or \
                    not (np.all(np.isfinite(delta)) and np.all(np.isfinite(cov))):
                raise ValueError("the nominal features' parameters do not match the model")
            self._nominal_idx, self.nominal_delta_, self.nominal_cov_ = R, delta, cov
            self.df_model_ = p + len(R) * (K1 - 1)
        self._set_statistics(self.thresholds_.shape[0])


def _nominal_list(nominal) -> list:
    """``nominal=`` as a list: None or empty for none, one name for one feature."""
    if nominal is None:
        return []
    if isinstance(nominal, (str, int, np.integer)):
        return [nominal]
    return list(nominal)


def _variance_label(robust: bool, clusters, weights: str) -> str:
    if clusters is not None:
        return f"cluster-robust ({int(clusters.max()) + 1:,} groups)"
    if weights == "probability":
        return "robust sandwich (probability weights)"
    return "sandwich" if robust else "model-based"


def _meat(X, codes, w, x, means, clusters, squared: bool, link=None) -> np.ndarray:
    """The sandwich meat at ``x`` (centred coordinates): sums over clusters (each row its own
    without ``clusters``) of the outer products of their weighted scores. Frequency weights
    count rows (``w s s'`` per row), probability weights scale scores (``w^2 s s'``). With
    ``G`` clusters of ``N`` rows and ``k`` parameters the meat is scaled by ``G / (G - 1) (N
    - 1) / (N - k)`` (Stata's and statsmodels' small-sample factor) when clustered, and by
    ``N / (N - k)`` for probability weights without clusters."""
    n, p = X.shape
    d = x.shape[0]
    meat = np.zeros((d, d))
    n_groups = n if clusters is None else int(clusters.max()) + 1
    sums = np.zeros((n_groups, d)) if clusters is not None else None
    for a in range(0, n, block_rows(d)):
        b = min(n, a + block_rows(d))
        t = exact_row_terms((X[a:b] - means) @ x[:p], codes[a:b], x[p:], link)
        S = np.concatenate([(X[a:b] - means) * t.s[:, None], t.grad_theta], axis=1)
        wb = np.ones(b - a) if w is None else w[a:b]
        if clusters is None:
            f = wb * wb if squared else wb
            meat += (S * f[:, None]).T @ S
        else:
            np.add.at(sums, clusters[a:b], S * wb[:, None])
    # N: rows, counted with their frequency weights (a row of weight 3 is three rows)
    N = float(n if w is None or squared else w.sum())
    if clusters is not None:  # a cluster's score: its rows' weighted scores, summed
        meat = sums.T @ sums
        return meat * n_groups / (n_groups - 1) * (N - 1) / max(N - d, 1)
    return meat * (N / max(N - d, 1) if squared else 1.0)


def _collinear_columns(X: np.ndarray, w: np.ndarray | None, means: np.ndarray,
                      scales: np.ndarray) -> np.ndarray:
    """Indices of the columns of ``X`` in a linear dependence (up to a constant), if any.

    The thresholds act as intercepts, so the columns are centred at ``means`` and scaled by
    ``scales`` first; a dependence is a numerically zero-information direction of their
    weighted Gram matrix (:func:`fedgrain.core.linalg.unidentified_directions`). One pass over
    the rows, in blocks; it depends on ``X`` and the weights only, never on the labels.
    """
    p = X.shape[1]
    G = np.zeros((p, p))
    block = block_rows(p)
    for a in range(0, X.shape[0], block):
        Z = (X[a : a + block] - means) / scales
        G += (Z if w is None else Z * w[a : a + block, None]).T @ Z
    return unidentified_directions(G)


def _collinear_error(labels: list[str], indices) -> DataError:
    return DataError(
        f"The data do not identify {', '.join(repr(labels[j]) for j in indices)}: "
        "the columns are linearly dependent (collinear); drop one of them."
    )


def _exact_oracle(X, y, w, ridge, shift=None, link=None):
    """Oracle of the exact likelihood plus ``1/2 sum_j ridge_j x_j^2`` (no penalty when zero).

    With ``shift``, the features are centred at it (see
    :func:`fedgrain.core.likelihood.exact_pass`).
    """
    p = X.shape[1]

    def oracle(x, loss=True, order=2, meat=False):
        return exact_pass(X, y, w, x[:p], x[p:], order=order, meat=meat, shift=shift,
                          link=link)

    return _ridged(oracle, ridge)


def _ridged(oracle, ridge):
    """``oracle`` plus ``1/2 sum_j ridge_j x_j^2`` (itself when the ridge is zero)."""
    if not np.any(ridge):
        return oracle

    def call(x, loss=True, order=2, meat=False):
        P = oracle(x, loss=loss, order=order, meat=meat)
        return Pass(P.loss + 0.5 * float(ridge @ (x * x)),
                    None if P.grad is None else P.grad + ridge * x,
                    None if P.hess is None else P.hess + np.diag(ridge), P.meat)

    return call


