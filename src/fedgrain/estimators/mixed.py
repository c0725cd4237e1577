"""Hierarchical ordinal regression: random intercepts and slopes by group, fitted centrally.

The model (a cumulative-logit mixed model, as R's ``ordinal::clmm``): a row ``i`` of group ``j``
has

    P(Y_i <= k | x_i, u_j) = sigmoid(theta_k - x_i'beta - z_i'u_j),   u_j ~ N(0, Sigma),

with ``z_i = (1, x_i[R])``: a random intercept (a shift of all the group's thresholds) and
random slopes for the features ``R``. ``Sigma`` is full (intercept and slopes correlated) or
diagonal. ``beta`` and ``theta`` are the *fixed effects*: the model of a typical group
(``u = 0``).

Fit: Laplace-approximate REML (docs/method.md, "The hierarchical anchor"). With ``u_j =
Lambda v_j`` (``Lambda`` lower triangular, ``Sigma = Lambda Lambda'``, ``v_j ~ N(0, I)``) and
``f(phi, v) = -loglik(phi, v) + |v|^2 / 2`` over the fixed effects ``phi = (beta, theta)`` and
all ``v_j``, the criterion minimised over ``Lambda`` is

    f(phi_hat, v_hat) + 1/2 sum_j log|A_j| + 1/2 log|S|,

at the joint mode ``(phi_hat, v_hat)`` of ``f``, where ``A_j`` is the Hessian of ``f`` in
``v_j`` and ``S`` the Schur complement of the ``v`` blocks in the joint Hessian: the Laplace
approximation of the likelihood integrated over the random effects *and* (with a flat prior)
the fixed effects. For a linear mixed model this is exactly REML. Without the last term it is
the joint-mode Laplace approximation of the marginal likelihood. The joint Hessian has one
``q x q`` block per group plus their borders with ``phi``, so every Newton step solves the
groups' blocks separately and one ``d x d`` system (``S``): the cost grows linearly in the
number of groups. The outer minimisation is L-BFGS-B over the entries of ``Lambda`` (diagonal
``>= 0``, so a zero variance is reached exactly) with forward-difference gradients; each
criterion starts its inner Newton from the last mode.

The fixed effects' covariance is ``S^-1`` (lme4's ``vcov``); the random effects reported are
the conditional modes ``u_j = Lambda v_j`` (empirical Bayes estimates). Everything runs on
standardised features and is mapped back exactly: with the full covariance the model does not
depend on the features' location or scale; with ``covariance="diagonal"`` the random effects
are independent on the features' own origin (the intercept is the effect at ``x = 0``), so
shifting a feature changes that model, as in R and lme4.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from .._warnings import warn
from ..core.likelihood import class_proba, exact_row_terms, initial_thresholds
from ..core.standardize import Standardizer
from ..data import partitionwise as dask_parts
from ..data import prepare_fit
from ..data.features import resolve_columns
from ..data.groups import check_groups, kept_groups, split_groups_column
from ..exceptions import DataError, SeparationError
from ..inference.results import OrdinalResults
from .base import OrdinalModel, is_int, param_error, register
from .centralized import _collinear_columns, _collinear_error

#: The probabilities of a group the fit did not see integrate the random effect ``s = z'u ~
#: N(0, sd^2)`` out by the trapezoid rule on ``t = s / sd`` over +-9, with steps of at most
#: 0.5 in ``t`` and in ``s``: the integrand is analytic (the logistic's nearest poles are
#: ``pi`` away), so the error falls like ``exp(-2 pi^2 / step)``, below 1e-12 at any sd.
QUAD_RANGE, QUAD_STEP = 9.0, 0.5
#: The inner Newton stops when it promises less than this gain (nats, absolute).
INNER_TOL = 1e-11
#: Forward-difference step of the outer gradient (in the entries of Lambda, standardised
#: units): with the inner tolerance, the gradient is good to about 1e-5.
FD_STEP = 1e-5
#: Upper bound of every entry of Lambda (an sd of 20 on the logit scale per standardised unit).
LAMBDA_MAX = 20.0
#: Fewer groups than this give a variance estimate the data barely determine: a warning.
MIN_GROUPS = 5
#: Per-group sums are built over slices of rows of at most this many numbers (16 MB).
GSUM_ELEMENTS = 2_000_000


@register
class MixedOrdinalRegression(OrdinalModel):
    """Cumulative-logit regression with random intercepts and slopes by group.

    The statistical anchor for data from many sites (hospitals, stores, schools): one model
    fitted on all rows at once, each group with its own intercept and slopes drawn from a
    common normal distribution whose covariance is estimated from the data (Laplace-approximate
    REML). A group's model is shrunk toward the common one by exactly as much as its own rows
    and the spread between groups warrant (empirical Bayes). It needs every row in one place;
    :class:`AdaptiveFederatedOrdinal` with ``groups=`` keeps each site's rows where they are.

    Parameters
    ----------
    random : "slopes", "intercept" or list
        The random effects: an intercept and a slope for every feature (``"slopes"``), the
        intercept only, or the intercept and slopes for the features named (output column names,
        or positions, of the encoded features).
    covariance : {"full", "diagonal"}
        Correlated random effects (``q (q + 1) / 2`` parameters) or independent ones (``q``).
    levels, categorical
        As in :class:`OrdinalRegression`.
    max_iter : int
        Outer (variance) iterations; the inner Newton has its own limit of 100 per step.
    tol : float
        Outer stopping tolerance on the REML criterion (relative, L-BFGS-B's ``ftol``).

    Attributes
    ----------
    coef_, thresholds_, cov_, bse_, results_ : the fixed effects (a typical group, ``u = 0``)
        and their covariance.
    random_names_ : list of str
        ``"(intercept)"`` then the features with random slopes.
    random_cov_ : ndarray (q, q)
        ``Sigma`` on the original scale of the features; ``random_sd_`` its square-root diagonal.
    groups_ : list of str
        The groups of the fit, as text.
    random_effects_ : ndarray (n_groups, q)
        Each group's conditional mode ``u_j`` (empirical Bayes estimate), rows in the order of
        ``groups_``.
    loglik_ : float
        The Laplace-approximate marginal log-likelihood at the estimates.
    reml_criterion_ : float
        The REML criterion minimised (``-2`` times the restricted log-likelihood, up to the
        constant ``d log(2 pi)``).
    n_iter_ : int
        Outer iterations.

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain import MixedOrdinalRegression
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(30), 60)
    >>> X = rng.standard_normal((g.size, 2))
    >>> shift = rng.normal(0.0, 1.0, 30)[g]
    >>> y = np.digitize(X @ [1.0, -0.5] + shift + rng.logistic(size=g.size), [-1, 1])
    >>> m = MixedOrdinalRegression(random="intercept").fit(X, y, groups=g)
    >>> m.random_sd_.round(1)
    array([1.])
    """

    def __init__(self, *, random="slopes", covariance="full", levels=None, categorical=None,
                 max_iter=200, tol=1e-9):
        self.random = random
        self.covariance = covariance
        self.levels = levels
        self.categorical = categorical
        self.max_iter = max_iter
        self.tol = tol

    def _validate(self) -> None:
        owner = type(self).__name__
        r = self.random
        if not (r in ("slopes", "intercept") if isinstance(r, str) else
                isinstance(r, (list, tuple))
                and all(isinstance(v, str) or is_int(v) for v in r)):
            raise param_error(owner, "random", "'slopes', 'intercept' or a list of feature "
                              "names or positions", r)
        if self.covariance not in ("full", "diagonal"):
            raise param_error(owner, "covariance", "'full' or 'diagonal'", self.covariance)
        self._validate_solver(owner)

    def _random_columns(self, names: list[str]) -> list[int]:
        r = self.random
        if r == "slopes":
            return list(range(len(names)))
        if r == "intercept":
            return []
        return resolve_columns(r, names, "random=")

    def fit(self, X, y, sample_weight=None, *, groups=None):
        """Fit by Laplace-approximate REML.

        ``groups`` (required, by keyword): one label per row, or the name of a column of the
        DataFrame ``X``; labels are compared as text (``1``, ``1.0`` and ``"1"`` are one
        group). ``sample_weight``: frequency weights.
        """
        self._validate()
        owner = type(self).__name__
        if groups is None:
            raise DataError(f"{owner} needs groups=: one group label per row (or the name of "
                            "the group column of the DataFrame X).")
        X, groups = split_groups_column(X, groups)
        data = prepare_fit(X, y, levels=self.levels, categorical=self.categorical,
                           sample_weight=sample_weight, estimator_name=owner)
        labels = check_groups(kept_groups(groups, sample_weight), data.codes.shape[0])
        found, gidx = np.unique(labels, return_inverse=True)
        if found.size < 2:
            raise DataError(f"{owner} needs at least 2 groups to estimate how they differ; "
                            f"all rows are in group {found[0]!r}. Use OrdinalRegression.")
        if found.size < MIN_GROUPS:
            warn(f"{found.size} groups: the random-effect variances are poorly determined "
                 f"by fewer than {MIN_GROUPS}.", UserWarning)
        Xm, codes, w = data.X, data.codes, data.weights
        names = data.schema.output_names
        p, K = Xm.shape[1], data.target.n_classes
        counts = np.bincount(codes, weights=w, minlength=K)
        if np.any(counts <= 0):
            absent = [data.target.classes[k] for k in np.flatnonzero(counts <= 0)]
            raise DataError(f"No rows of level(s) {absent}: their thresholds are not "
                            "identified; drop them from levels=.")
        R = self._random_columns(names)
        std = Standardizer.of_moments(*data.column_moments())
        dependent = _collinear_columns(Xm, w, std.mean, std.scale)
        if dependent.size:
            raise _collinear_error(names, dependent)
        self._check_within(Xm, gidx, R, names)
        Xs = std.transform(np.array(Xm, dtype=float))
        # the random effects' design: (1, x_R) standardised; with a diagonal covariance not
        # centred, so that independence holds at the features' own zero (a full covariance
        # does not depend on the origin, and centring conditions it better)
        Z = Xs[:, R] if self.covariance == "full" else Xm[:, R] / std.scale[R]
        fit = _Laplace(Xs, np.column_stack([np.ones(Xs.shape[0]), Z]), codes, w, gidx, K,
                       self.covariance)
        phi0 = np.concatenate([np.zeros(p), initial_thresholds(codes, w, K, floor=1e-10)])
        psi, n_iter, converged = fit.optimise(phi0, self.max_iter, float(self.tol))
        m = fit.mode(psi)
        if not m.converged or not np.all(np.isfinite(m.phi)) or \
                np.max(np.abs(m.phi)) > 1e3:
            raise SeparationError(
                "The fixed effects do not settle (the classes are (quasi-)separated by the "
                "features): the maximum of the restricted likelihood does not exist. Remove or "
                "merge the separating feature.")
        cov_std = np.linalg.inv(m.S)
        params, cov = std.to_raw(m.phi, 0.5 * (cov_std + cov_std.T))
        # random effects on the original scale: z'u with z = (1, x_R) instead of standardised
        q = len(R) + 1
        M = np.eye(q)
        if self.covariance == "full":
            M[0, 1:] = -std.mean[R] / std.scale[R]
        M[np.arange(1, q), np.arange(1, q)] = 1.0 / std.scale[R]
        Lam = fit.lam(psi)
        self.random_cov_ = M @ Lam @ Lam.T @ M.T
        self.random_sd_ = np.sqrt(np.maximum(np.diag(self.random_cov_), 0.0))
        self.random_effects_ = (m.v @ Lam.T) @ M.T
        self.random_names_ = ["(intercept)"] + [names[j] for j in R]
        self.groups_ = [str(g) for g in found]
        self.n_groups_ = len(self.groups_)
        self.loglik_ = -float(m.f + 0.5 * m.logdet_A)
        self.reml_criterion_ = 2.0 * float(m.f + 0.5 * m.logdet_A + 0.5 * m.logdet_S)
        self.n_iter_ = int(n_iter)
        self.converged_ = bool(converged)
        if not converged:
            warn(f"{owner}: the variance estimates did not converge in max_iter="
                 f"{self.max_iter} iterations; increase max_iter.", ConvergenceWarning)
        sds = ", ".join(f"{n} {s:.4g}" for n, s in
                        zip(self.random_names_, self.random_sd_, strict=True))
        results = OrdinalResults(
            params, cov, names, data.target.classes,
            title="Mixed ordinal regression: Laplace-approximate REML (fixed effects)",
            info={"Rows": f"{codes.shape[0]:,}", "Groups": f"{self.n_groups_:,}", "Classes": K,
                  "Random effects": f"{self.covariance} covariance; sd: {sds}",
                  "Log-likelihood (Laplace)": f"{self.loglik_:.4f}",
                  "REML criterion": f"{self.reml_criterion_:.4f}",
                  "Outer iterations": self.n_iter_})
        self._set_fitted(data.schema, data.target, params, cov, results)
        return self

    @staticmethod
    def _check_within(Xm, gidx, R, names) -> None:
        """Warn about random slopes of features that do not vary within any group: such a
        slope is not told apart from the random intercept (a group-level covariate)."""
        if not R:
            return
        counts = np.bincount(gidx)
        for j in R:
            x = Xm[:, j]
            mean = np.bincount(gidx, weights=x) / counts
            within = np.bincount(gidx, weights=(x - mean[gidx]) ** 2)
            if np.all(within <= 1e-12 * max(1.0, float(np.sum(x * x)))):
                warn(f"Feature {names[j]!r} does not vary within any group: its random slope "
                     "is not identified apart from the random intercept. Leave it out of "
                     "random= (it can stay a fixed effect).", UserWarning)

    # ---- prediction ------------------------------------------------------------------------
    def _group_index(self, groups, n: int) -> np.ndarray:
        labels = check_groups(groups, n)
        known = {g: i for i, g in enumerate(self.groups_)}
        idx = np.fromiter((known.get(g, -1) for g in labels), dtype=np.intp, count=n)
        unknown = int(np.count_nonzero(idx < 0))
        if unknown:
            warn(f"{unknown:,} row(s) belong to groups the model was not fitted on; they get "
                 "the population-average probabilities (random effects integrated out).",
                 UserWarning)
        return idx

    @dask_parts.partitionwise(dask_parts.proba_meta)
    def predict_proba(self, X, groups=None, *, order: str = "classes") -> np.ndarray:
        """Class probabilities, ``(n, K)``, columns in the order of ``classes_`` (of
        ``levels_`` with ``order="levels"``).

        A row of a known group (``groups=``: labels, or a column of the DataFrame ``X``) gets
        its group's model (fixed effects plus the group's conditional mode); any other row the
        population average: the probabilities integrated over the random effects' normal
        distribution (Gauss-Hermite quadrature), the right forecast for a new group.
        """
        Xe, idx, Z = self._linear(X, groups)
        eta = Xe @ self.coef_
        out = np.empty((Xe.shape[0], self.thresholds_.shape[0] + 1))
        known = idx >= 0
        if known.any():
            out[known] = class_proba(
                eta[known] + np.einsum("ij,ij->i", Z[known], self.random_effects_[idx[known]]),
                self.thresholds_)
        if (~known).any():
            Zu = Z[~known]
            sd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", Zu, self.random_cov_, Zu), 0.0))
            out[~known] = _averaged_proba(eta[~known], sd, self.thresholds_)
        return self._ordered(out, order)

    def _linear(self, X, groups):
        """Encoded rows, the known groups' positions (-1: none) and ``z`` of each row."""
        check_is_fitted(self, "coef_")
        if isinstance(groups, str):
            X, groups = split_groups_column(X, groups)
        Xe = self.encode(X)
        n = Xe.shape[0]
        R = [self.schema_.output_names.index(c) for c in self.random_names_[1:]]
        idx = np.full(n, -1) if groups is None else self._group_index(groups, n)
        return Xe, idx, np.column_stack([np.ones(n), Xe[:, R]])

    @dask_parts.partitionwise(dask_parts.linear_meta)
    def predict_linear(self, X, groups=None) -> np.ndarray:
        """``x @ coef_`` plus, for a row of a known group, ``z @ u_group``: the linear predictor
        of the row's group model (of a typical group, ``u = 0``, for the other rows)."""
        Xe, idx, Z = self._linear(X, groups)
        eta = Xe @ self.coef_
        known = idx >= 0
        eta[known] += np.einsum("ij,ij->i", Z[known], self.random_effects_[idx[known]])
        return eta

    @dask_parts.partitionwise(dask_parts.cumulative_meta)
    def predict_cumulative_proba(self, X, groups=None) -> np.ndarray:
        """``P(Y <= k)`` for the first ``K - 1`` levels, as :meth:`predict_proba` gives them
        (a known group's model, else the population average)."""
        return np.cumsum(self.predict_proba(X, groups, order="levels"), axis=1)[:, :-1]

    def predict_proba_ci(self, X, alpha: float = 0.05, groups=None, *, order="classes"):
        """Not available: a group's probabilities rest on its predicted random effects and a
        new group's on the estimated spread, whose uncertainty a delta-method interval of the
        fixed effects leaves out. Raises a :class:`DataError` that says what to use."""
        raise DataError(
            "MixedOrdinalRegression gives no intervals for predicted probabilities: they depend "
            "on the groups' predicted random effects and the estimated variances, which a "
            "delta-method interval does not cover. For a typical group (random effects zero) "
            "use model.results_.predict_proba_ci(model.encode(X)).")

    @dask_parts.partitionwise(dask_parts.labels_meta)
    def predict(self, X, groups=None) -> np.ndarray:
        """The most probable level of each row (see :meth:`predict_proba`)."""
        return self.levels_[np.argmax(self.predict_proba(X, groups, order="levels"), axis=1)]

    def score(self, X, y, sample_weight=None, *, groups=None) -> float:
        """Accuracy of :meth:`predict` (with the groups' own models when ``groups`` is given)."""
        from sklearn.metrics import accuracy_score

        if isinstance(groups, str):
            X, groups = split_groups_column(X, groups)
        pred = self.predict(X, groups)
        self._warn_unknown_labels(y)
        return float(accuracy_score(y, pred, sample_weight=sample_weight))

    def group_params(self) -> np.ndarray:
        """Each group's own ``(coef, thresholds)``: the fixed effects plus its conditional
        modes (random slopes added to ``coef_``, the random intercept taken from every
        threshold); shape ``(n_groups, p + K - 1)``, rows in the order of ``groups_``."""
        check_is_fitted(self, "coef_")
        p = self.coef_.shape[0]
        R = [self.schema_.output_names.index(c) for c in self.random_names_[1:]]
        out = np.tile(np.r_[self.coef_, self.thresholds_], (self.n_groups_, 1))
        out[:, R] += self.random_effects_[:, 1:]
        out[:, p:] -= self.random_effects_[:, :1]
        return out

    # ---- persistence -----------------------------------------------------------------------
    def _extra_state(self):
        meta = {"loglik": self.loglik_, "reml": self.reml_criterion_, "n_iter": self.n_iter_,
                "converged": self.converged_, "groups": self.groups_,
                "random_names": self.random_names_}
        return meta, {"random_cov": self.random_cov_, "random_effects": self.random_effects_}

    def _restore_extra(self, meta, arrays):
        q = len(meta["random_names"])
        names = self.schema_.output_names
        cov, eff = arrays["random_cov"], arrays["random_effects"]
        groups = [str(g) for g in meta["groups"]]
        if any(c not in names for c in meta["random_names"][1:]) or \
                cov.shape != (q, q) or eff.shape != (len(groups), q) or \
                cov.dtype.kind != "f" or eff.dtype.kind != "f" or \
                not (np.all(np.isfinite(cov)) and np.all(np.isfinite(eff))) or \
                len(set(groups)) != len(groups) or not isinstance(meta["converged"], bool):
            raise ValueError("random effects do not match the features and groups")
        if not np.allclose(cov, cov.T) or \
                np.linalg.eigvalsh(cov).min() < -1e-9 * max(1.0, float(np.abs(cov).max())):
            raise ValueError("the random effects' covariance is not positive semi-definite")
        self.loglik_ = float(meta["loglik"])
        self.reml_criterion_ = float(meta["reml"])
        self.n_iter_ = int(meta["n_iter"])
        self.converged_ = meta["converged"]
        self.groups_ = groups
        self.n_groups_ = len(self.groups_)
        self.random_names_ = [str(c) for c in meta["random_names"]]
        self.random_cov_ = arrays["random_cov"]
        self.random_sd_ = np.sqrt(np.maximum(np.diag(self.random_cov_), 0.0))
        self.random_effects_ = arrays["random_effects"]


def _averaged_proba(eta: np.ndarray, sd: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``E[class_proba(eta + s)]`` over ``s ~ N(0, sd^2)``, row by row (see QUAD_STEP)."""
    step = min(QUAD_STEP, QUAD_STEP / max(float(sd.max(initial=0.0)), 1e-300))
    t = np.arange(-QUAD_RANGE, QUAD_RANGE + step / 2, step)
    wt = np.exp(-0.5 * t * t) * step / np.sqrt(2.0 * np.pi)
    wt /= wt.sum()  # the truncated tails (beyond 9 sd) are below 1e-18
    out = np.zeros((eta.shape[0], theta.shape[0] + 1))
    for tk, wk in zip(t, wt, strict=True):
        out += wk * class_proba(eta + sd * tk, theta)
    return out


class _Mode:
    """The joint mode of ``f`` at one ``Lambda``, with the log-determinants of the criterion."""

    __slots__ = ("phi", "v", "f", "logdet_A", "logdet_S", "S", "converged")

    def __init__(self, phi, v, f, logdet_A, logdet_S, S, converged):
        self.phi, self.v, self.f = phi, v, f
        self.logdet_A, self.logdet_S, self.S, self.converged = logdet_A, logdet_S, S, converged


class _Laplace:
    """The REML criterion of the mixed model on standardised features, and its minimisation."""

    def __init__(self, Xs, Z, codes, w, gidx, K, covariance):
        order = np.argsort(gidx, kind="stable")
        self.X = Xs[order]
        self.y = codes[order]
        self.w = np.ones(order.size) if w is None else w[order]
        g = gidx[order]
        self.starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        self.g = g
        self.J = self.starts.size
        self.Z = Z[order]
        self.p, self.K1, self.q = Xs.shape[1], K - 1, Z.shape[1]
        self.full = covariance == "full"
        q = self.q
        self.tril = np.tril_indices(q) if self.full else (np.arange(q), np.arange(q))
        self.diag_pos = np.flatnonzero(self.tril[0] == self.tril[1])
        self.phi = self.v = None  # the last mode: the next inner Newton starts there

    def lam(self, psi):
        L = np.zeros((self.q, self.q))
        L[self.tril] = psi
        return L

    def _gsum(self, make, shape):
        """Per-group sums of ``make(rows)`` (an array with one entry per row of the slice),
        built in slices of rows so that no ``(n, d, q)`` array is ever whole."""
        out = np.zeros((self.J, *shape))
        n = self.g.shape[0]
        size = max(1, GSUM_ELEMENTS // max(1, int(np.prod(shape))))
        for a in range(0, n, size):
            b = min(a + size, n)
            g = self.g[a:b]
            local = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            out[g[local]] += np.add.reduceat(make(slice(a, b)), local, axis=0)
        return out

    def _loss(self, phi, v, W):
        p = self.p
        theta = phi[p:]
        if not np.all(np.diff(theta) > 0):
            return np.inf
        eta = self.X @ phi[:p] + np.einsum("ij,ij->i", W, v[self.g])
        t = exact_row_terms(eta, self.y, theta)
        return float(self.w @ t.loss) + 0.5 * float(np.sum(v * v))

    def _derivatives(self, phi, v, W):
        p, q = self.p, self.q
        theta = phi[p:]
        eta = self.X @ phi[:p] + np.einsum("ij,ij->i", W, v[self.g])
        t = exact_row_terms(eta, self.y, theta)
        w = self.w
        ws, wc = w * t.s, w * t.c
        f = float(w @ t.loss) + 0.5 * float(np.sum(v * v))
        g_phi = np.concatenate([self.X.T @ ws, w @ t.grad_theta])
        g_v = self._gsum(lambda r: ws[r, None] * W[r], (self.q,)) + v
        Xc = self.X * wc[:, None]
        wcross = t.cross * w[:, None]
        H = np.empty((p + self.K1,) * 2)
        H[:p, :p] = self.X.T @ Xc
        H[:p, p:] = self.X.T @ wcross
        H[p:, :p] = H[:p, p:].T
        H[p:, p:] = t.theta_hessian(w)
        A = self._gsum(lambda r: (wc[r, None] * W[r])[:, :, None] * W[r, None, :],
                       (q, q)) + np.eye(q)
        D = np.concatenate([Xc, wcross], axis=1)
        B = self._gsum(lambda r: D[r, :, None] * W[r, None, :], (D.shape[1], q))  # (J, d, q)
        return f, g_phi, g_v, H, A, B

    def mode(self, psi, phi0=None, max_newton=100) -> _Mode:
        """Newton on the joint ``(phi, v)`` with the groups' blocks eliminated (Schur)."""
        Lam = self.lam(psi)
        W = self.Z @ Lam
        phi = (self.phi if phi0 is None else phi0).copy()
        v = np.zeros((self.J, self.q)) if self.v is None else self.v.copy()
        converged = current = False
        for _ in range(max_newton):
            f, g_phi, g_v, H, A, B = self._derivatives(phi, v, W)
            current = True
            Ag = np.linalg.solve(A, g_v[:, :, None])[:, :, 0]
            AB = np.linalg.solve(A, B.transpose(0, 2, 1))  # (J, q, d)
            S = H - np.einsum("jdq,jqe->de", B, AB)
            rhs = -g_phi + np.einsum("jdq,jq->d", B, Ag)
            try:
                d_phi = np.linalg.solve(S, rhs)
            except np.linalg.LinAlgError:
                d_phi = np.linalg.lstsq(S, rhs, rcond=None)[0]
            d_v = -(Ag + np.einsum("jqd,d->jq", AB, d_phi))
            dec = -(g_phi @ d_phi + np.sum(g_v * d_v))
            if not np.isfinite(dec):
                break
            if dec < 2 * INNER_TOL:
                converged = True
                break
            step = 1.0
            while step > 1e-10:
                f_new = self._loss(phi + step * d_phi, v + step * d_v, W)
                if f_new <= f - 1e-4 * step * dec:
                    break
                step *= 0.5
            else:
                break
            phi, v = phi + step * d_phi, v + step * d_v
            current = False
        # the criterion's determinants at the final point (where the last derivatives were
        # taken when Newton stopped there)
        if not current:
            f, g_phi, g_v, H, A, B = self._derivatives(phi, v, W)
            AB = np.linalg.solve(A, B.transpose(0, 2, 1))
            S = H - np.einsum("jdq,jqe->de", B, AB)
        sign_A, ld_A = np.linalg.slogdet(A)
        sign_S, ld_S = np.linalg.slogdet(S)
        ok = converged and np.all(sign_A > 0) and sign_S > 0
        self.phi, self.v = phi, v
        return _Mode(phi, v, f, float(np.sum(ld_A)), float(ld_S) if sign_S > 0 else np.inf,
                     0.5 * (S + S.T), ok)

    def criterion(self, psi) -> float:
        m = self.mode(psi)
        if not m.converged:
            return 1e300
        return m.f + 0.5 * m.logdet_A + 0.5 * m.logdet_S

    def optimise(self, phi0, max_iter, tol):
        """L-BFGS-B over the entries of ``Lambda`` from ``0.5 I``; returns ``(psi, iterations,
        converged)``."""
        n_par = self.tril[0].size
        lower = np.full(n_par, -LAMBDA_MAX)
        lower[self.diag_pos] = 0.0
        upper = np.full(n_par, LAMBDA_MAX)
        self.mode(np.zeros(n_par), phi0)  # the pooled fit: where the inner Newton starts
        psi0 = np.zeros(n_par)
        psi0[self.diag_pos] = 0.5

        def value_and_grad(psi):
            # forward differences from the criterion at psi (one more mode per parameter),
            # backward at the upper bound
            base = self.criterion(psi)
            start = self.phi, self.v  # every moved criterion starts from the mode at psi
            g = np.empty(n_par)
            for k in range(n_par):
                h = FD_STEP if psi[k] + FD_STEP <= upper[k] else -FD_STEP
                moved = psi.copy()
                moved[k] += h
                self.phi, self.v = start
                g[k] = (self.criterion(moved) - base) / h
            self.phi, self.v = start
            return base, g

        res = minimize(value_and_grad, psi0, jac=True, method="L-BFGS-B",
                       bounds=list(zip(lower, upper, strict=True)),
                       options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-6})
        psi = np.where(np.abs(res.x) < 1e-6, 0.0, res.x)  # a variance at its bound is zero
        return psi, res.nit, bool(res.success)
