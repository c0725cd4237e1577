"""One subset: L1 cumulative-logit fit, de-biasing and robust variance.

The statistics are described in docs/method.md, "One subset".

Everything here is a pure function of (shard, settings, seed), so every backend gives the same
numbers. A shard's features are already standardised with the *global* mean and scale (see
:mod:`fedgrain.federation.shards`); the L1 penalty is weighted by the subset's own column scales,
which is
the same as standardising inside the subset. Parameters are ordered ``(beta, theta)``.

Some parameters are not identified in a subset. A threshold with every row of the subset on
one side of it carries no information there and is left out. A feature that is constant in the
subset (value ``c`` after standardisation) is left out too, and then the subset's thresholds
estimate ``theta_k - c beta_j`` rather than ``theta_k``. So a subset reports its estimate over
the coordinates it does identify together with the linear map ``design`` (``A``) from the full
parameters to those coordinates, and pooling weighs it by ``A' Omega A`` (see
:mod:`fedgrain.inference.pooling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import linalg, optimize

from ..core.blocks import blas_controller
from ..core.likelihood import Pass, composite_pass, initial_thresholds
from ..core.linalg import solve_psd
from ..core.links import get_link
from ..core.solvers import proximal_newton, runaway, warm_start
from ..core.standardize import column_moments

#: ``alpha="rate"`` is ``RATE_C * sqrt(log(d) / n)`` on the per-row loss scale. 0.5 was measured
#: best among 1, 0.5, 0.25, 0.1 for the pooled estimate after refinement (docs/method.md).
RATE_C = 0.5
#: The nodewise lasso's penalty is ``NODEWISE_C * sqrt(log(d) / n)`` on the correlation scale.
NODEWISE_C = 1.0
#: ``debias="auto"`` uses the nodewise lasso when the standardised Hessian's condition number
#: exceeds this (a subset too small for its d, or collinear features); otherwise the exact
#: inverse, which de-biased better in every well-conditioned case measured, down to 3 rows per
#: parameter (docs/method.md).
NODEWISE_MAX_COND = 1e8
#: Lambda path for ``"cv"`` and ``"bic"``: this many values down to this fraction of lambda_max.
PATH_LENGTH = 12
PATH_MIN_RATIO = 1e-3

VARIANCES = ("cluster", "sandwich", "model")
DEBIAS = ("auto", "inverse", "nodewise")


@dataclass(frozen=True)
class LocalSettings:
    """How a subset is fitted; the same object goes to every subset."""

    n_classes: int
    alpha: str | float = "rate"
    variance: str = "cluster"
    debias: str = "auto"
    ridge: float = 0.0
    penalize_thresholds: bool = False
    cv_folds: int = 5
    max_iter: int = 100
    tol: float = 1e-8
    #: Newton steps after de-biasing, until a step moves no parameter more than ``polish_tol``
    #: standard errors (0: the one-step de-biased estimate, as pooled subsets use it). A
    #: leaf's own model is reported converged (docs/method.md, "Non-random partitions").
    polish_rounds: int = 0
    polish_tol: float = 0.01
    #: Compute the within-class view for Q (a class-stratified division: two more passes).
    within_class: bool = False
    #: The link of the binary rows (:mod:`fedgrain.core.links`): the composite likelihood of
    #: the cumulative-link model with this link.
    link: str = "logit"
    #: Run the composite passes with PyTorch on this device (:mod:`fedgrain.core.gpu`).
    device: str | None = None


@dataclass(frozen=True)
class WithinClass:
    """A subset as heterogeneity tests compare it across a class-stratified division, where
    every subset has the same class shares (docs/method.md, "Pooling and refinement").

    ``estimate`` is one Newton step beyond the subset's reported estimate: the de-biased
    estimate's second-order remainder is small beside its own spread, not beside the smaller
    spread within classes. ``cov`` is its variance given the subset's class counts,
    ``Theta J_w Theta'`` with ``J_w`` the cluster meat of the rows' scores centred on their
    class's mean (stratified sampling). ``class_weights`` holds the subset's weight of each
    class and ``class_shift`` (``K x d_m``) what one unit of weight more of each class, at
    that class's mean score, adds to ``estimate`` (``Theta sbar_h``): pooling moves every
    subset to the common class shares with it before comparing (the shares differ by at most
    a row per class). Over the subset's own coordinates, like ``LocalFit.estimate``.
    ``ratio`` is the smallest ratio of ``cov`` to the covariance under a plain random division
    (``Theta J Theta'``) over all directions: times the rows, it says whether the
    first-order within-class spread dominates the second-order one that the normal
    approximation leaves out (it does not when the features barely predict the class, then
    the thresholds are pinned by the class counts; see ``pooling.heterogeneity``).
    """

    estimate: np.ndarray
    cov: np.ndarray
    class_weights: np.ndarray
    class_shift: np.ndarray
    ratio: float


@dataclass(frozen=True)
class LocalFit:
    """What a subset sends back: about ``d + 2 d^2`` numbers and diagnostics.

    ``estimate``, ``lasso``, ``cov`` and ``hess`` (the Hessian of the composite loss at the
    lasso fit, the data's own information, before any regularised inverse) are over the
    subset's own coordinates, which are ``design @ gamma`` for the full parameter vector
    ``gamma = (beta, theta)`` in standardised coordinates. ``separated`` lists full-vector
    indices along which the fit ran off to infinity (then the estimates are meaningless and the
    caller reports the separation).
    """

    estimate: np.ndarray
    cov: np.ndarray
    lasso: np.ndarray
    hess: np.ndarray
    design: np.ndarray
    alpha: float
    n_iter: int
    converged: bool
    debias: str
    separated: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    edges: np.ndarray | None = None
    #: For each threshold ``k`` whose class ``k`` lies between classes the subset has but never
    #: occurs in it (a middle class absent), the subset's width for that class: the two
    #: thresholds around it estimate the same value (their rows' binary labels are identical),
    #: so the width is set where the rows expect half an observation of the absent class(es)
    #: (:func:`_gaps`). NaN elsewhere; None when no middle class is absent.
    gaps: np.ndarray | None = None
    #: Whether the Newton steps after de-biasing settled (``polish_rounds``; None: not asked).
    polished: bool | None = None
    #: The subset as heterogeneity tests compare it across a class-stratified division
    #: (:class:`WithinClass`); None when not computed (variance other than "cluster").
    within: WithinClass | None = None


@dataclass(frozen=True)
class Evaluation:
    """Score, Hessian and meat of the composite loss at given parameters (one subset)."""

    score: np.ndarray
    hess: np.ndarray
    meat: np.ndarray | None
    loss: float | None = None  # the composite loss (negative log-likelihood) at the point


@dataclass(frozen=True)
class Problem:
    """A subset's data with the identified coordinates, and an oracle over them
    (built by :func:`identified_problem`)."""

    X: np.ndarray
    y: np.ndarray
    w: np.ndarray | None
    n_features: int
    n_thresholds: int
    features: np.ndarray  # identified feature indices
    thresholds: np.ndarray  # identified threshold indices
    link: str = "logit"
    device: str | None = None

    @property
    def size(self) -> int:
        return self.features.shape[0] + self.thresholds.shape[0]

    def full_index(self) -> np.ndarray:
        return np.concatenate([self.features, self.n_features + self.thresholds])

    def design(self, means: np.ndarray) -> np.ndarray:
        """``A`` with ``A @ gamma`` = the subset's coordinates, for full parameters ``gamma``.

        A feature left out because it is constant (at ``means[j]``) shifts every threshold:
        the subset's threshold ``k`` is ``theta_k - sum_j means[j] beta_j``.
        """
        full = self.full_index()
        A = np.zeros((full.shape[0], self.n_features + self.n_thresholds))
        A[np.arange(full.shape[0]), full] = 1.0
        absent = np.setdiff1d(np.arange(self.n_features), self.features)
        if absent.size:
            A[self.features.shape[0] :, absent] = -means[absent]
        return A

    def expand(self, xr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        beta = np.zeros(self.n_features)
        theta = np.zeros(self.n_thresholds)
        beta[self.features] = xr[: self.features.shape[0]]
        theta[self.thresholds] = xr[self.features.shape[0] :]
        return beta, theta

    def oracle(self, w: np.ndarray | None = None):
        """Oracle over the identified coordinates, optionally with other row weights."""
        weights = self.w if w is None else w
        sel = np.concatenate(
            [self.features, self.n_features + np.arange(self.thresholds.shape[0])]
        )
        subset_features = self.features.shape[0] < self.n_features

        link = get_link(self.link)
        rows = None
        if self.device is not None:  # the subset's rows on the device, once per oracle
            from ..core.gpu import DeviceRows

            rows = DeviceRows(self.X, self.y, weights, self.device)

        def call(xr, *, loss=True, order=2, meat=None, by_class=False):
            beta, theta = self.expand(xr)
            if rows is not None and not by_class:
                P = rows.composite_pass(beta, theta, thresholds=self.thresholds, loss=loss,
                                        order=order, meat=meat)
            else:
                P = composite_pass(
                    self.X, self.y, weights, beta, theta, thresholds=self.thresholds,
                    loss=loss, order=order, meat=meat, by_class=by_class, link=link,
                )
            if not subset_features:
                return P
            return Pass(
                P.loss,
                None if P.grad is None else P.grad[sel],
                None if P.hess is None else P.hess[np.ix_(sel, sel)],
                None if P.meat is None else P.meat[np.ix_(sel, sel)],
                None if P.class_grad is None else P.class_grad[:, sel],
            )

        return call


class _Centring:
    """Coordinates ``(beta, theta - m' beta)``: thresholds of features centred at ``m``.

    With ``x = B xc`` (``B`` adds ``m' beta`` to every threshold), an oracle in ``x`` becomes one
    in ``xc`` by the chain rule: gradient ``B' g``, Hessian and meat ``B' H B``. The map leaves
    ``beta`` alone, so an L1 penalty on the slopes means the same in both coordinates (one on
    the thresholds would not: ``fit_local`` does not centre then).
    """

    def __init__(self, n_features: int, m: np.ndarray):
        self.nf = n_features
        self.m = m

    def _B(self, d: int) -> np.ndarray:
        B = np.eye(d)
        B[self.nf :, : self.nf] = self.m[None, :]
        return B

    def forward(self, x: np.ndarray) -> np.ndarray:
        xc = x.copy()
        xc[self.nf :] -= self.m @ x[: self.nf]
        return xc

    def to_global(self, xc: np.ndarray) -> np.ndarray:
        x = xc.copy()
        x[self.nf :] += self.m @ xc[: self.nf]
        return x

    def wrap(self, oracle):
        def call(xc, *, loss=True, order=2, meat=None):
            P = oracle(self.to_global(xc), loss=loss, order=order, meat=meat)
            B = self._B(xc.shape[0])
            return Pass(
                P.loss,
                None if P.grad is None else B.T @ P.grad,
                None if P.hess is None else B.T @ P.hess @ B,
                None if P.meat is None else B.T @ P.meat @ B,
            )

        return call

    def back(self, res):
        """A solver result in the global coordinates (``g = B^-T gc``, ``H = B^-T Hc B^-1``)."""
        d = res.x.shape[0]
        Binv = np.linalg.inv(self._B(d))
        return replace(res, x=self.to_global(res.x), grad=Binv.T @ res.grad,
                       hess=Binv.T @ res.hess @ Binv, step=self.to_global(res.step))


def two_sided(y: np.ndarray, w: np.ndarray | None, n_classes: int) -> np.ndarray:
    """For each threshold, whether rows (of positive weight) lie on both sides of it."""
    counts = np.bincount(y if w is None else y[w > 0], minlength=n_classes)
    below = np.cumsum(counts)[:-1]
    return (below > 0) & (below < counts.sum())


def identified_problem(X, y, w, n_classes: int, link: str = "logit",
                       device: str | None = None) -> tuple[Problem, np.ndarray, np.ndarray, list]:
    """The rows' problem over the coordinates they identify: ``(problem, means, scales, notes)``.

    A feature is identified when it varies in the rows (scale above ``1e-10``), a threshold
    when rows lie on both sides of it (:func:`two_sided`); ``notes`` name the others
    (``"feature:j"``, ``"threshold:k"``), ``means`` and ``scales`` are the columns' moments.
    """
    p = X.shape[1]
    notes = []
    th_ok = two_sided(y, w, n_classes)
    notes += [f"threshold:{k}" for k in np.flatnonzero(~th_ok)]
    means, scales = column_moments(X, w)
    f_ok = scales > 1e-10
    notes += [f"feature:{j}" for j in np.flatnonzero(~f_ok)]
    prob = Problem(X, y, w, p, n_classes - 1, np.flatnonzero(f_ok), np.flatnonzero(th_ok),
                   link, device)
    return prob, means, scales, notes


def _start(prob: Problem) -> np.ndarray:
    """Slopes zero and thresholds at the logits (the link's quantiles) of the cumulative class
    shares."""
    theta = initial_thresholds(prob.y, prob.w, prob.n_thresholds + 1, link=get_link(prob.link))
    return np.concatenate([np.zeros(prob.features.shape[0]), theta[prob.thresholds]])


def _subsample(prob: Problem, rows: np.ndarray):
    """The subsample's oracle, or None when it misses a side of an identified threshold."""
    ys = prob.y[rows]
    ws = None if prob.w is None else prob.w[rows]
    if not two_sided(ys, ws, prob.n_thresholds + 1)[prob.thresholds].all():
        return None
    sub = Problem(np.ascontiguousarray(prob.X[rows]), ys, ws, prob.n_features,
                   prob.n_thresholds, prob.features, prob.thresholds, prob.link, prob.device)
    return sub.oracle(), float(rows.size if ws is None else ws.sum())


def _lambda_max(prob: Problem, pen: np.ndarray, n_eff: float) -> float:
    """Smallest lambda at which every penalised slope is zero."""
    x0 = _start(prob)
    g = prob.oracle()(x0, loss=False, order=1).grad / n_eff
    nf = prob.features.shape[0]
    ratio = np.abs(g[:nf]) / np.where(pen[:nf] > 0, pen[:nf], np.inf)
    return float(max(ratio.max(initial=0.0), 1e-8))


def _fit_path(prob, oracle, pen, n_eff, lambdas, settings, centre):
    """Lasso fits along ``lambdas``, warm-started, in ``centre``'s coordinates."""
    oracle = centre.wrap(oracle)
    x = centre.forward(_start(prob))
    out = []
    for lam in lambdas:
        res = proximal_newton(
            oracle, x, n_eff, lam * pen, max_iter=settings.max_iter, tol=settings.tol
        )
        x = res.x
        out.append(res)
    return out


def _choose_alpha(prob, pen, n_eff, settings, rng, centre) -> float:
    alpha = settings.alpha
    d = prob.size
    if not isinstance(alpha, str):
        return float(alpha)
    if alpha == "rate":
        return RATE_C * np.sqrt(np.log(max(d, 2)) / n_eff)
    lmax = _lambda_max(prob, pen, n_eff)
    lambdas = lmax * np.geomspace(1.0, PATH_MIN_RATIO, PATH_LENGTH)
    if alpha == "bic":
        fits = _fit_path(prob, prob.oracle(), pen, n_eff, lambdas, settings, centre)
        n_th = prob.thresholds.shape[0]
        nf = prob.features.shape[0]
        bic = [
            2.0 * r.objective * n_eff
            - 2.0 * n_eff * lam * float(pen @ np.abs(r.x))
            + np.log(n_eff) * (np.count_nonzero(r.x[:nf]) + n_th)
            for lam, r in zip(lambdas, fits, strict=True)
        ]
        return float(lambdas[int(np.argmin(bic))])
    # "cv": K-fold composite deviance; folds by zero weights, so no copy of the data.
    n = prob.y.shape[0]
    folds = np.empty(n, dtype=np.intp)
    for c in np.unique(prob.y):  # stratified by class
        idx = np.flatnonzero(prob.y == c)
        folds[idx] = rng.permutation(idx.shape[0]) % settings.cv_folds
    base = np.ones(n) if prob.w is None else prob.w
    dev = np.zeros(PATH_LENGTH)
    for f in range(settings.cv_folds):
        test = folds == f
        w_train = np.where(test, 0.0, base)
        w_test = np.where(test, base, 0.0)
        n_train = float(w_train.sum())
        fits = _fit_path(prob, prob.oracle(w_train), pen, n_train, lambdas, settings, centre)
        test_oracle = centre.wrap(prob.oracle(w_test))
        for i, r in enumerate(fits):
            dev[i] += test_oracle(r.x, loss=True, order=0).loss
    return float(lambdas[int(np.argmin(dev))])


def _nodewise_theta(H: np.ndarray, n_eff: float, tol: float = 1e-10,
                    max_sweeps: int = 1000) -> np.ndarray:
    """Approximate inverse of ``H`` by the nodewise lasso (van de Geer et al. 2014).

    On the correlation-scaled ``R`` of ``Sigma = H / n``, regression ``j`` is
    ``min_g 1/2 g'Rg - R[:, j]'g + lam |g|_1`` with ``g_j = 0``; it stays well defined when ``H``
    is singular. All ``d`` regressions are solved together by coordinate descent: sweeping
    coordinate ``k`` updates row ``k`` of the coefficient matrix ``G`` (column ``j`` is
    regression ``j``) for every regression at once.
    """
    d = H.shape[0]
    S = H / n_eff
    dg = np.sqrt(np.maximum(np.diag(S), 1e-300))
    R = S / np.outer(dg, dg)
    lam = NODEWISE_C * np.sqrt(np.log(max(d, 2)) / n_eff)
    G = np.zeros((d, d))
    for _ in range(max_sweeps):
        max_change = 0.0
        for k in range(d):
            # R has a unit diagonal: the coordinate step is z = G[k] - ((R G)[k] - R[k]).
            z = G[k] - (R[k] @ G - R[k])
            new = np.sign(z) * np.maximum(np.abs(z) - lam, 0.0)
            new[k] = 0.0
            change = np.abs(new - G[k]).max()
            if change > 0.0:
                G[k] = new
                max_change = max(max_change, change)
        if max_change <= tol:
            break
    RG = R @ G
    # tau_j^2 = ||x_j - X_{-j} g_j||^2 / n + lam ||g_j||_1 in correlation units
    tau2 = np.maximum(1.0 - 2 * np.einsum("kj,kj->j", R, G) + np.einsum("kj,kj->j", G, RG)
                      + lam * np.abs(G).sum(axis=0), 1e-12)
    T = (np.eye(d) - G.T) / tau2[:, None]
    return T / np.outer(dg, dg) / n_eff


def _theta(H: np.ndarray, n_eff: float, settings: LocalSettings) -> tuple[np.ndarray, str]:
    d = H.shape[0]
    method = settings.debias
    if method == "auto":
        dg = np.sqrt(np.maximum(np.diag(H), 1e-300))
        cond = np.linalg.cond(H / np.outer(dg, dg))
        method = "nodewise" if not np.isfinite(cond) or cond > NODEWISE_MAX_COND else "inverse"
    if method == "nodewise":
        return _nodewise_theta(H, n_eff), method
    Hr = H + settings.ridge * n_eff * np.eye(d) if settings.ridge > 0 else H
    return solve_psd(Hr, np.eye(d)), method


def fit_local(
    X: np.ndarray, y: np.ndarray, w: np.ndarray | None, settings: LocalSettings, seed: int = 0
) -> LocalFit:
    """Fit one subset: lasso, one-step de-biasing, robust covariance.

    Parameters
    ----------
    X : ndarray of shape (n, p)
        Standardised features of the subset.
    y : ndarray of shape (n,)
        Class codes ``0 .. K-1``.
    w : ndarray of shape (n,) or None
        Frequency weights.
    settings : LocalSettings
    seed : int
        Seed for the cross-validation folds (the only random step).

    Returns
    -------
    LocalFit
    """
    prob, means, scales, notes = identified_problem(X, y, w, settings.n_classes, settings.link,
                                                    settings.device)
    n_eff = float(y.shape[0] if w is None else w.sum())
    pen = np.concatenate(
        [scales[prob.features],
         np.full(prob.thresholds.shape[0], 1.0 if settings.penalize_thresholds else 0.0)]
    )
    # Solve with the thresholds of locally centred features: a subset whose features sit far
    # from the global means (an adaptive leaf) otherwise has thresholds and slopes so
    # correlated that coordinate descent crawls. The map is linear and leaves the slopes (the
    # penalised coordinates) alone; results come back in the global coordinates. Not when the
    # thresholds are penalised too: the penalty would then fall on the centred thresholds.
    m = np.zeros(prob.features.shape[0]) if settings.penalize_thresholds else \
        means[prob.features]
    centre = _Centring(prob.features.shape[0], m)
    alpha = _choose_alpha(prob, pen, n_eff, settings, np.random.default_rng(seed), centre)
    oracle = prob.oracle()
    lam = alpha * pen

    def sub_oracle(rows):
        made = _subsample(prob, rows)
        return None if made is None else (centre.wrap(made[0]), made[1])

    x0 = warm_start(sub_oracle, y.shape[0], centre.forward(_start(prob)), lam,
                    max_iter=settings.max_iter)
    res = centre.back(proximal_newton(centre.wrap(oracle), x0, n_eff, lam,
                                      max_iter=settings.max_iter, tol=settings.tol))
    common = {"design": prob.design(means),
              "hess": res.hess, "alpha": alpha, "n_iter": res.n_iter,
              "converged": res.converged, "notes": tuple(notes)}
    # Coordinates are standardised globally; the step in the subset's own units:
    step = res.step * np.concatenate([scales[prob.features], np.ones(prob.thresholds.size)])
    if res.diverged or (res.converged and runaway(step).any()):
        moving = runaway(step) | ~np.isfinite(step)
        return LocalFit(estimate=res.x, cov=np.zeros((res.x.size,) * 2), lasso=res.x,
                        debias="none", separated=tuple(prob.full_index()[moving].tolist()),
                        **common)
    H = res.hess
    s = -res.grad  # score of the log-likelihood
    Theta, method = _theta(H, n_eff, settings)
    est = res.x + Theta @ s
    moving = _runs_off(prob, oracle, centre, res.x, est, scales[prob.features], n_eff,
                       settings)
    if moving.size:  # the L1 penalty kept the lasso finite; the unpenalised fit is not
        return LocalFit(estimate=est, cov=np.zeros((est.size,) * 2), lasso=res.x, debias="none",
                        separated=tuple(prob.full_index()[moving].tolist()), **common)
    if settings.variance == "model":
        V = Theta @ H @ Theta.T
    else:
        meat = oracle(res.x, loss=False, order=0, meat=meat_kind(settings.variance)).meat
        V = Theta @ meat @ Theta.T
    polished = None  # not asked, or nodewise de-biasing (ill-conditioned: no Newton steps)
    if settings.polish_rounds > 0 and method == "inverse":
        est, V, polished = _polish(oracle, est, 0.5 * (V + V.T), settings)
    return LocalFit(estimate=est, cov=0.5 * (V + V.T), lasso=res.x, debias=method,
                    edges=_edges(prob, est), gaps=_gaps(prob, est), polished=polished,
                    within=(_within_class(oracle, est, y, w, n_eff, method, settings,
                                          converged=bool(polished))
                            if settings.within_class and settings.variance == "cluster"
                            else None), **common)


def within_class_meat(meat: np.ndarray, class_grad: np.ndarray,
                      class_weights: np.ndarray) -> np.ndarray:
    """The cluster meat with each row's score centred on its class's mean in these rows:
    ``J - sum_h g_h g_h' / n_h`` (``g_h`` the score summed over class ``h``, ``n_h`` its
    weight), the variance of the score sum given the class counts (stratified sampling)."""
    ok = class_weights > 0
    g = class_grad[ok] / np.sqrt(class_weights[ok])[:, None]
    return meat - g.T @ g


def _within_class(oracle, est: np.ndarray, y: np.ndarray, w: np.ndarray | None, n_eff: float,
                  method: str, settings: LocalSettings, converged: bool = False
                  ) -> WithinClass | None:
    """The subset's :class:`WithinClass` view. Two passes: a Newton step from ``est`` (none
    when ``est`` is ``converged``), then score, Hessian, meat and the score of each class
    there, and the Newton step from that point is the view's estimate. (Evaluated at ``est``
    itself, the within-class variance comes out a few percent small: the de-biased slopes are
    still a little shrunk, and the rows vary within a class by ``x'beta``.) None if it is not
    finite."""
    debias = replace(settings, debias=method)
    x = est
    if not converged:
        P = oracle(x, loss=False, order=2)
        x = x - _theta(P.hess, n_eff, debias)[0] @ P.grad
    P = oracle(x, loss=False, order=2, meat="cluster", by_class=True)
    Theta, _ = _theta(P.hess, n_eff, debias)
    n_h = np.bincount(y, weights=w, minlength=P.class_grad.shape[0]).astype(float)
    # residual degrees of freedom: the scores are centred by the fit (d parameters) and by the
    # classes' means; without this factor Q runs 3-9% large at 20-55 rows per parameter
    dof = n_eff / max(n_eff - x.shape[0] - np.count_nonzero(n_h), 1.0)
    V = dof * (Theta @ within_class_meat(P.meat, P.class_grad, n_h) @ Theta.T)
    # mean score (of the log-likelihood) of a row of each class, through Theta: what a unit of
    # weight more of that class would add to the estimate (zero for a class the subset lacks)
    shift = (-P.class_grad / np.where(n_h > 0, n_h, 1.0)[:, None]) @ Theta.T
    x = x - Theta @ P.grad
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(V)) and np.all(np.isfinite(shift))):
        return None
    V = 0.5 * (V + V.T)
    plain = Theta @ P.meat @ Theta.T
    try:
        ratio = float(linalg.eigh(V, 0.5 * (plain + plain.T), eigvals_only=True)[0]) / dof
    except (linalg.LinAlgError, ValueError):
        return None
    return WithinClass(x, V, n_h, shift, max(ratio, 0.0))


def _polish(oracle, est: np.ndarray, V: np.ndarray, settings: LocalSettings):
    """Newton steps on the unpenalised composite loss from the de-biased estimate until a step
    moves no parameter more than ``polish_tol`` standard errors: ``(estimate, cov, converged)``
    with the covariance (sandwich, or inverse Hessian) at the last point. A run that does not
    settle (separation in the rows, a flat direction) keeps the de-biased estimate."""
    kind = meat_kind(settings.variance)
    x = est
    for _ in range(settings.polish_rounds):
        P = oracle(x, loss=False, order=2, meat=kind)
        Hinv = solve_psd(P.hess, np.eye(x.shape[0]))
        Vx = Hinv if kind is None else Hinv @ P.meat @ Hinv
        step = -Hinv @ P.grad
        se = np.sqrt(np.maximum(np.diag(Vx), 1e-300))
        if not (np.all(np.isfinite(step)) and np.all(np.isfinite(Vx))):
            return est, V, False
        x = x + step
        if np.max(np.abs(step) / se) < settings.polish_tol:
            return x, 0.5 * (Vx + Vx.T), True
    return est, V, False


#: A de-biasing step longer than this in standardised units (slopes times the subset's own
#: feature scales, thresholds as they are) is checked for separation by Newton steps without
#: the penalty (:func:`_runs_off`). Legitimate steps measured up to 0.8 on subsets of 100 rows
#: and below 0.25 from 2,000 rows; under separation the step is about one over the classes'
#: margin along the separating direction (4.6 on a feature that separates three classes).
SEPARATION_STEP = 0.5
#: The same for the other links, whose slopes are on smaller scales (a probit slope is about
#: 0.6 times the logit one) and whose separating de-biasing steps measured 0.16-0.41.
SEPARATION_STEP_LINKS = 0.1
#: An unpenalised fit that settles beyond this in standardised units has run off too: the
#: cauchit's loss falls only polynomially along a separating direction, so its Newton steps
#: shrink there as at a finite optimum (a slope of 1e5 with a last step of 1e-10, measured).
RUNAWAY_SIZE = 1e3


def _runs_off(prob: Problem, oracle, centre: _Centring, lasso: np.ndarray, est: np.ndarray,
              scales: np.ndarray, n_eff: float, settings: LocalSettings) -> np.ndarray:
    """The subset's coordinates along which the *unpenalised* fit runs off to infinity.

    The lasso is finite whatever the data, but de-biasing is a Newton step on the unpenalised
    loss, which has no finite optimum when the classes are (quasi-)separated: the de-biased
    estimate and its standard errors are then meaningless (a slope of 10.8 with standard error
    0.25 on data ``OrdinalRegression`` rightly refuses). Two checks:

    1. exact and cheap: a direction among the lasso's slopes, the de-biased ones and the
       de-biasing step (either sign) that orders the rows' classes: for every identified
       threshold no row at or below it lies above a row beyond it, with a gap at one at least.
       Along such a direction the composite loss falls for ever;
    2. when the de-biasing step is long (:data:`SEPARATION_STEP`), Newton steps without the
       penalty from the de-biased estimate, judged as ``OrdinalRegression`` judges its fit: the
       steps still of order one once the decrement is negligible.

    Returns the separating features (those carrying a tenth of the direction at least, in the
    subset's units), or the moving coordinates; empty when the fit is finite.
    """
    nf = prob.features.shape[0]
    none = np.zeros(0, dtype=np.intp)
    if nf == 0:
        return none
    kept = np.ones(prob.y.shape[0], dtype=bool) if prob.w is None else prob.w > 0
    classes = [np.flatnonzero(kept & (prob.y == c)) for c in range(prob.n_thresholds + 1)]
    v_full = np.zeros(prob.n_features)
    for v in (lasso[:nf], est[:nf], est[:nf] - lasso[:nf]):
        u = np.abs(v) * scales
        if not (np.all(np.isfinite(v)) and u.max(initial=0.0) > 0):
            continue
        v_full[prob.features] = v
        eta = prob.X @ v_full
        if _orders(eta, classes, prob.thresholds) or _orders(-eta, classes, prob.thresholds):
            return np.flatnonzero(u >= 0.1 * u.max())
    step = centre.forward(est) - centre.forward(lasso)
    step[:nf] *= scales
    gate = SEPARATION_STEP if prob.link == "logit" else SEPARATION_STEP_LINKS
    if not np.abs(step).max() > gate:
        return none
    res = centre.back(proximal_newton(centre.wrap(oracle), centre.forward(est), n_eff, None,
                                      max_iter=settings.max_iter, tol=settings.tol))
    units = np.concatenate([scales, np.ones(prob.thresholds.size)])
    step = res.step * units
    moving = runaway(step) | ~np.isfinite(step) | \
        ~(np.abs(centre.forward(res.x) * units) < RUNAWAY_SIZE)
    if not (res.diverged or (res.converged and moving.any())):
        return none
    size = np.where(np.isfinite(step[:nf]), np.abs(step[:nf]), np.inf)
    if size.max(initial=0.0) > 1e-3:
        return np.flatnonzero(size >= 0.1 * size.max())
    return np.flatnonzero(moving) if moving.any() else np.arange(step.size)


def _orders(eta: np.ndarray, classes: list, thresholds: np.ndarray) -> bool:
    """Whether ``eta`` orders the classes (``classes[c]``: the rows of class ``c``) at every
    threshold in ``thresholds``, weakly, and strictly at one at least: the rows' classes are
    separated along it."""
    top = np.array([eta[r].max() if r.size else -np.inf for r in classes])
    bottom = np.array([eta[r].min() if r.size else np.inf for r in classes])
    spread = float(top.max() - bottom.min())
    if not spread > 0:
        return False
    below = np.maximum.accumulate(top)[:-1]  # largest eta at or below each threshold
    above = np.minimum.accumulate(bottom[::-1])[::-1][1:]  # smallest beyond it
    gap = above[thresholds] - below[thresholds]
    tol = 1e-9 * spread
    return bool(np.all(gap >= -tol) and np.any(gap > tol))


def _gaps(prob: Problem, est: np.ndarray) -> np.ndarray | None:
    """The widths of middle classes that never occur among the rows (:attr:`LocalFit.gaps`).

    With class ``c`` absent but classes on both sides present, the binary labels of
    thresholds ``c - 1`` and ``c`` are identical, so the two estimates coincide and the fit
    says ``P(Y = c) = 0`` with a standard error of zero for the difference. What zero counts
    in ``n`` rows say is rather a small probability: the width ``G`` of the absent run
    (opened symmetrically around the thresholds' common value ``t``) is set where the rows
    expect half an observation in it, ``sum_i P(Y_i in run) = 1/2`` (the rule the subset's
    edges follow, :func:`_edges`), shared equally by the run's classes.
    """
    K1 = prob.n_thresholds
    present = np.bincount(prob.y if prob.w is None else prob.y[prob.w > 0],
                          minlength=K1 + 1) > 0
    have = np.flatnonzero(present)
    absent = [c for c in range(int(have.min()) + 1, int(have.max())) if not present[c]]
    if not absent:
        return None
    nf = prob.features.shape[0]
    eta = prob.X[:, prob.features] @ est[:nf] if nf else np.zeros(prob.y.shape[0])
    w = np.ones_like(eta) if prob.w is None else prob.w
    where = {int(k): nf + i for i, k in enumerate(prob.thresholds)}
    F = get_link(prob.link).cdf
    out = np.full(K1, np.nan)
    runs: list[list[int]] = []
    for c in absent:
        if runs and runs[-1][-1] == c - 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    for run in runs:
        ks = [k for k in range(run[0] - 1, run[-1] + 1) if k in where]
        if not ks:
            continue
        t = float(np.mean(est[[where[k] for k in ks]]))

        def mass(G, t=t):
            return float(w @ (F(t + 0.5 * G - eta) - F(t - 0.5 * G - eta))) - 0.5

        hi = 1.0
        while mass(hi) < 0 and hi < 1e4:
            hi *= 2.0
        if mass(hi) > 0:
            out[run] = optimize.brentq(mass, 0.0, hi, xtol=1e-10) / len(run)
    return out


def _edges(prob: Problem, est: np.ndarray) -> np.ndarray | None:
    """Where the subset would put thresholds it does not identify, from its own rows.

    A threshold with every row below it (the top classes never occur here) has no finite
    estimate: the likelihood pushes it to infinity. Its *edge* is the value at which the
    subset's rows would expect half an observation above it (a rule-of-succession estimate:
    what zero counts in ``n`` rows say); likewise below for missing bottom classes. Computed
    for the missing threshold next to the classes present, on each side, in the subset's
    coordinates (shifted like its other thresholds); NaN elsewhere. None when every threshold
    is identified.
    """
    K1 = prob.n_thresholds
    missing = np.setdiff1d(np.arange(K1), prob.thresholds)
    if missing.size == 0:
        return None
    nf = prob.features.shape[0]
    eta = prob.X[:, prob.features] @ est[:nf] if nf else np.zeros(prob.y.shape[0])
    w = np.ones_like(eta) if prob.w is None else prob.w
    out = np.full(K1, np.nan)
    present = prob.y if prob.w is None else prob.y[prob.w > 0]
    top, bottom = int(present.max()), int(present.min()) - 1
    # threshold ``top`` is the first with no row above it, ``bottom`` the last with none at or
    # below it: the missing thresholds next to the classes the subset has
    link = get_link(prob.link)
    for k in {top, bottom}:
        if not 0 <= k < K1:
            continue
        if k == top:  # nothing above threshold k: P(Y > k) sums to 1/2
            def target(t):
                return w @ link.sf(t - eta) - 0.5
        else:  # nothing at or below threshold k: P(Y <= k) sums to 1/2
            def target(t):
                return w @ link.cdf(t - eta) - 0.5
        lo, hi = eta.min() - 50.0, eta.max() + 50.0
        if target(lo) * target(hi) < 0:
            out[k] = optimize.brentq(target, lo, hi, xtol=1e-8)
    return out


def evaluate_local(
    X: np.ndarray, y: np.ndarray, w: np.ndarray | None, params: np.ndarray, meat: str | None,
    loss: bool = True, link: str = "logit", device: str | None = None,
) -> Evaluation:
    """Score (of the log-likelihood), Hessian and meat of the composite loss at ``params``.

    This is the message of the refinement round (docs/method.md, "Pooling and refinement"):
    ``d + 2 d^2`` numbers.
    """
    p = X.shape[1]
    if device is not None:
        from ..core.gpu import DeviceRows

        P = DeviceRows(X, y, w, device).composite_pass(params[:p], params[p:], loss=loss,
                                                       order=2, meat=meat)
    else:
        P = composite_pass(X, y, w, params[:p], params[p:], loss=loss, order=2, meat=meat,
                           link=get_link(link))
    return Evaluation(-P.grad, P.hess, P.meat, float(P.loss) if loss else None)


def one_blas_thread():
    """Context manager limiting BLAS to one thread (bit-identical results on every backend).

    The controller is built once per process: building it scans the loaded libraries, which
    costs milliseconds per task otherwise.
    """
    return blas_controller().limit(limits=1, user_api="blas")


def fit_task(task: dict) -> LocalFit:
    """Backend entry point: fit the shard named in ``task`` (one BLAS thread, for determinism)."""
    shard = task["shard"].load()
    X, y, w = shard.X, shard.y, task_weights(shard, task)
    if task.get("rows") is not None:  # the fit's many passes run on the selected rows only
        keep = w > 0
        X, y, w = X[keep], y[keep], (None if shard.w is None else w[keep])
    with one_blas_thread():
        return fit_local(X, y, w, task["settings"], task["seed"])


def evaluate_task(task: dict) -> Evaluation:
    """Backend entry point of the refinement round."""
    shard = task["shard"].load()
    with one_blas_thread():
        return evaluate_local(shard.X, shard.y, task_weights(shard, task), task["params"],
                              task["meat"], loss=task.get("loss", True),
                              link=task.get("link", "logit"), device=task.get("device"))


def pack_rows(mask: np.ndarray) -> np.ndarray:
    """A shard's row selection as bits (what a task carries: n / 8 bytes)."""
    return np.packbits(np.asarray(mask, dtype=bool))


def task_weights(shard, task: dict) -> np.ndarray | None:
    """The shard's row weights for this task: its own, times 0/1 for the rows the task
    selects (``task["rows"]``, packed bits; absent or None: every row). Selecting by weight
    leaves the shard's arrays as they are, with no copy."""
    rows = task.get("rows")
    if rows is None:
        return shard.w
    keep = np.unpackbits(rows, count=shard.y.shape[0]).astype(np.float64)
    return keep if shard.w is None else shard.w * keep


def meat_kind(variance: str) -> str | None:
    """The meat a variance option needs: cluster, row or none."""
    return {"cluster": "cluster", "sandwich": "row", "model": None}[variance]


