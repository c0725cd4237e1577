"""The federated meta-learner: a global model that the leaves adapt from quickly.

The loop is a short template, in the spirit of Flower's strategies: broadcast the global
parameters ``theta``; on every leaf, *adapt* them to the leaf's training part (support) and
score the adapted model on the leaf's validation part (a stratified share of its rows, fixed for
all rounds, halved: the query rows give the outer step, the selection rows choose the pull and
the stop); aggregate; stop when the selection rows' loss stops improving. Everything a round
sends is parameters (about ``d + 2 d^2`` numbers a leaf, counted in ``history``); the rows stay
where they were placed.

**Adaptation** is a few Newton steps on the leaf's composite loss plus a pull toward the global
parameters, ``L_train(gamma) + rho/2 (gamma - theta)' P (gamma - theta)``, with ``P`` the pull's
metric per row (by strategy: the empirical-Bayes prior of the leaves' spread,
:func:`between_metric`; the global information; or Euclidean), over the parameters the leaf
identifies (the others stay at ``theta``).
``rho`` counts pseudo-rows: a leaf of ``n`` rows moves with strength ``n / (n + rho)``. The pull
starts at the empirical-Bayes value of the leaves' spread around ``theta``
(:func:`empirical_pull`) and is learned from the selection rows' loss: every round each leaf
also scores the adaptation at ``rho`` times (1/4, 1/2, 2, 4) and at infinity (no adaptation),
and the next round uses the best (the largest pull among near-ties, so a flat loss does not
drift toward no pull at all). Strategies (:mod:`fedgrain.federation.strategies`, looked up by
name; the loop knows none of them):

- ``"fomaml"``: first-order MAML; the meta-gradient is the query rows' gradient at the adapted
  parameters, summed over leaves and preconditioned by all their information (training and
  query Hessians): a damped step, not a jump to the query rows' own optimum;
- ``"reptile"``: ``theta`` moves to the adapted parameters' information-weighted mean;
- ``"fedavg"`` and ``"fedprox"``: baselines in the same loop, from the model without features;
  local Newton steps with (almost) no pull or a fixed one, averaged by rows; their model is the
  global one;
- ``"ditto"``: FedAvg's global model, and each leaf personalised toward it with a Euclidean
  pull learned as above.

A leaf whose task fails in a round is left out of that round and the failure recorded, as
Flower's ``accept_failures``; such a round neither becomes the best nor stops the loop (its
loss covers other leaves). A round where every leaf fails is an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import progress
from ..backends import Backend
from ..core.likelihood import LN2, Pass, class_proba, composite_pass, row_log_loss
from ..core.linalg import chi2_sf, precision, solve_psd
from ..core.rowsource import materialise
from ..core.solvers import newton
from ..exceptions import SubsetError
from .strategies import RHO_MIN, STRATEGIES, Adapted, Strategy, get_strategy

#: The strategies' names, in the registry's order (built-in ones: FO-MAML, Reptile, FedAvg,
#: FedProx, Ditto).
METHODS = tuple(STRATEGIES)
#: Multiples of the current pull scored every round (plus no adaptation at all).
RHO_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: Pulls within this relative validation loss of the best count as equally good; the largest
#: of them is taken (on a flat loss, the most shrinkage: no drift toward no pull at all).
RHO_TIE = 1e-4
#: The largest pull, in pseudo-rows (the smallest, ``RHO_MIN``, is FedAvg's).
RHO_MAX = 1e9
#: Newton steps at most for a model that is kept (the personalised leaves, ``adapt``): the
#: penalised fit to convergence, where a round's adaptation takes ``inner_steps``.
PERSONAL_STEPS = 25


@dataclass(frozen=True)
class MetaSettings:
    """How the leaves adapt; the same object goes to every leaf in every round."""

    method: str
    n_features: int
    n_classes: int
    inner_steps: int = 3
    validation_fraction: float = 0.2


@dataclass
class MetaResult:
    """The loop's outcome: the best global parameters and pull, and the record of rounds."""

    theta: np.ndarray
    rho: float
    history: list = field(default_factory=list)
    events: list = field(default_factory=list)


def validation_mask(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share ``fraction`` of the rows (at least one per class with 2+ rows)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = int(round(fraction * rows.shape[0]))
        if rows.shape[0] >= 2:
            k = min(max(k, 1), rows.shape[0] - 1)
        mask[rng.choice(rows, size=k, replace=False)] = True
    return mask


def free_coordinates(X, y, w, n_classes: int) -> np.ndarray:
    """The parameters these rows identify: varying features, thresholds with rows on both sides.

    Adaptation moves only these; the others stay at the global value (an absent class's
    threshold would otherwise run off toward infinity, limited only by the pull).
    """
    from ..core.standardize import column_moments
    from ..inference.local import two_sided

    _, scale = column_moments(X, w)
    return np.concatenate([scale > 1e-10, two_sided(y, w, n_classes)])


def adapt_params(X, y, w, theta, rho, P, steps: int, p: int,
                 free: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Newton steps on ``L(gamma) + rho/2 (gamma - theta)' P (gamma - theta)`` over ``free``.

    Returns the adapted parameters and the data's Hessian there (zero outside ``free``).
    """
    d = theta.shape[0]
    free = np.ones(d, dtype=bool) if free is None else free
    if not np.isfinite(rho) or not free.any():
        return theta.copy(), np.zeros((d, d))
    rho = max(rho, RHO_MIN)
    idx = np.flatnonzero(free)
    Pf = P[np.ix_(idx, idx)]
    n = float(y.shape[0] if w is None else w.sum())
    res = newton(_penalised(X, y, w, theta, rho, Pf, idx, p), theta[idx].copy(), n,
                 max_iter=steps, tol=ADAPT_TOL)
    return _adapted(theta, idx, res.x, res.hess - rho * Pf)


#: Newton's stopping tolerance of an adaptation (log-likelihood units; see
#: :func:`fedgrain.core.solvers.proximal_newton`).
ADAPT_TOL = 1e-9


def _adapted(theta, idx, z, H_free) -> tuple[np.ndarray, np.ndarray]:
    """The full parameter vector and the data's Hessian (zero outside ``idx``)."""
    d = theta.shape[0]
    x = theta.copy()
    x[idx] = z
    H = np.zeros((d, d))
    H[np.ix_(idx, idx)] = H_free
    return x, H


def _penalised(X, y, w, theta, rho, Pf, idx, p):
    """The oracle of the penalised loss over the coordinates ``idx`` (the others at
    ``theta``), for :func:`fedgrain.core.solvers.newton`."""
    def oracle(z, *, loss=True, order=2, meat=None):
        x = theta.copy()
        x[idx] = z
        P0 = composite_pass(X, y, w, x[:p], x[p:], loss=loss, order=order)
        diff = z - theta[idx]
        Pd = Pf @ diff
        return Pass(None if P0.loss is None else P0.loss + 0.5 * rho * diff @ Pd,
                    None if P0.grad is None else P0.grad[idx] + rho * Pd,
                    None if P0.hess is None else P0.hess[np.ix_(idx, idx)] + rho * Pf, None)
    return oracle


def adapt_many(X, y, w, theta, rhos, P, steps: int, p: int,
               free: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`adapt_params` at several pulls on the same rows, in lock-step.

    A round scores every leaf's adaptation at six or seven pulls; on a site of a thousand rows
    each pass over its rows costs little more than the forty-odd numpy calls that make it, so
    the pulls' Newton iterations share their passes: every iteration evaluates all the pulls'
    trial points in one pass (:func:`_composite_many`). The iterations are
    :func:`fedgrain.core.solvers.newton`'s (the same directions, the same tests of a full
    step); a full step that does not lower the loss backtracks with that pull's own passes.
    The results equal :func:`adapt_params` at each pull to rounding (tested to 1e-10).
    """
    d = theta.shape[0]
    free = np.ones(d, dtype=bool) if free is None else free
    out: list = [None] * len(rhos)
    todo = [i for i, r in enumerate(rhos) if np.isfinite(r) and free.any()]
    for i in set(range(len(rhos))) - set(todo):
        out[i] = (theta.copy(), np.zeros((d, d)))
    if not todo:
        return out
    idx = np.flatnonzero(free)
    Pf = P[np.ix_(idx, idx)]
    n = float(y.shape[0] if w is None else w.sum())
    pulls = {i: max(float(rhos[i]), RHO_MIN) for i in todo}

    def passes(points: dict) -> dict:
        """Penalised loss, gradient and Hessian at ``{i: z}`` (one pass over the rows)."""
        keys = list(points)
        full = np.repeat(theta[None, :], len(keys), axis=0)
        full[:, idx] = np.array([points[i] for i in keys])
        loss, grad, hess = _composite_many(X, y, w, full[:, :p], full[:, p:])
        res = {}
        for m, i in enumerate(keys):
            diff = points[i] - theta[idx]
            Pd = Pf @ diff
            res[i] = Pass(loss[m] + 0.5 * pulls[i] * diff @ Pd, grad[m, idx] + pulls[i] * Pd,
                          hess[m][np.ix_(idx, idx)] + pulls[i] * Pf, None)
        return res

    def direction(P_):
        g, H = P_.grad / n, P_.hess / n
        step = -solve_psd(H, g)
        return step, float(g @ step)

    z = {i: theta[idx].copy() for i in todo}
    at = passes(z)
    F = {i: at[i].loss / n for i in todo}
    dirs = {i: direction(at[i]) for i in todo}
    it = dict.fromkeys(todo, 0)
    active = list(todo)
    while active:
        trial = {}
        for i in active:
            delta, pred = dirs[i]
            if (not (np.all(np.isfinite(delta)) and np.isfinite(F[i])) or -pred * n <= ADAPT_TOL
                    or it[i] == steps):
                continue
            it[i] += 1
            trial[i] = z[i] + delta
        if not trial:
            break
        tried = passes(trial)
        active = []
        for i, zn in trial.items():
            delta, pred = dirs[i]
            Fn = tried[i].loss / n
            if np.isfinite(Fn) and (Fn <= F[i] + 1e-4 * pred or Fn - F[i] <= 1e-13 * abs(F[i])):
                z[i], at[i], F[i] = zn, tried[i], Fn
            else:  # backtrack as the solver does, on this pull's own passes
                oracle = _penalised(X, y, w, theta, pulls[i], Pf, idx, p)
                t, moved = 0.5, False
                while t >= 1e-10:
                    zt = z[i] + t * delta
                    Ft = oracle(zt, loss=True, order=0).loss / n
                    if np.isfinite(Ft) and Ft <= F[i] + 1e-4 * t * pred:
                        z[i], F[i], moved = zt, Ft, True
                        at[i] = oracle(zt, loss=False, order=2)
                        break
                    t *= 0.5
                if not moved:
                    continue  # no decrease along the direction: this pull stops here
            dirs[i] = direction(at[i])
            active.append(i)
    for i in todo:
        out[i] = _adapted(theta, idx, z[i], at[i].hess - pulls[i] * Pf)
    return out


#: Elements (points x rows x thresholds) of one block of :func:`_composite_many`: its
#: temporaries stay near 8 MB each, whatever the leaf's rows.
MANY_BLOCK_ELEMENTS = 1 << 20


def _composite_many(X, y, w, B, Th) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The composite (logit) loss, gradient and Hessian at ``M`` points ``(B[m], Th[m])`` in
    one pass over the rows: :func:`fedgrain.core.likelihood.composite_pass` (every threshold
    taking part) for each point, the same formulas with the points as one more axis, summed
    over blocks of rows in order (memory bounded by :data:`MANY_BLOCK_ELEMENTS`). Returns
    ``(M,)``, ``(M, d)`` and ``(M, d, d)``."""
    n = X.shape[0]
    rows = max(256, MANY_BLOCK_ELEMENTS // max(1, B.shape[0] * Th.shape[1]))
    if n <= rows:
        return _composite_many_block(X, y, w, B, Th)
    total = None
    for a in range(0, n, rows):
        part = _composite_many_block(X[a : a + rows], y[a : a + rows],
                                     None if w is None else w[a : a + rows], B, Th)
        total = part if total is None else tuple(t + q for t, q in zip(total, part,
                                                                       strict=True))
    return total


def _composite_many_block(X, y, w, B, Th) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_composite_many` on one block of rows."""
    M, p = B.shape
    k1 = Th.shape[1]
    n = X.shape[0]
    ob = np.ones(n) if w is None else w
    below = np.arange(k1)[None, :] < np.arange(k1 + 1)[:, None]  # u_ik by class
    eta = B @ X.T  # (M, n)
    T = np.multiply(eta, 0.5)[:, :, None] - (0.5 * Th)[:, None, :]  # (M, n, k1)
    sp = np.maximum(T, 0.0)
    np.tanh(T, out=T)
    lt = np.log1p(np.abs(T))
    ones = np.ones(k1)  # sums over the cuts as products: a reduction over 3 is slow
    rows = (2.0 * (sp @ ones) - lt @ ones + k1 * LN2
            - (below.sum(axis=1)[y] * eta - (Th @ below.T)[:, y]))
    loss = rows @ ob
    E = np.multiply(T, -0.5)
    E += (below - 0.5)[y][None]  # u_ik - mu_ik
    wr = (E @ ones) * ob
    V = np.multiply(T, T, out=T)
    V *= -0.25
    V += 0.25  # mu (1 - mu)
    grad = np.empty((M, p + k1))
    grad[:, :p] = -(wr @ X)
    grad[:, p:] = np.einsum("mnk,n->mk", E, ob)
    hess = np.zeros((M, p + k1, p + k1))
    wv = (V @ ones) * ob
    for m in range(M):
        Z = X * np.sqrt(wv[m])[:, None]
        hess[m, :p, :p] = Z.T @ Z
    cross = X.T @ (V * ob[None, :, None]).transpose(1, 0, 2).reshape(n, M * k1)
    hess[:, :p, p:] = -cross.reshape(p, M, k1).transpose(1, 0, 2)
    hess[:, p:, :p] = hess[:, :p, p:].transpose(0, 2, 1)
    diag = np.einsum("mnk,n->mk", V, ob)
    hess[:, np.arange(p, p + k1), np.arange(p, p + k1)] = diag
    return loss, grad, hess


def log_loss_sum(X, y, w, params, p: int) -> float:
    """Summed negative log-likelihood of the classes (thresholds ordered by running max)."""
    lp = row_log_loss(class_proba(X @ params[:p], np.maximum.accumulate(params[p:])), y)
    return float(lp.sum() if w is None else w @ lp)


def adapt_task(task: dict) -> Adapted:
    """Backend entry point of a round: adapt on the training part, score on the validation."""
    from ..inference.local import one_blas_thread

    shard = task["shard"].load()
    s: MetaSettings = task["settings"]
    p = s.n_features
    with one_blas_thread():
        X, y = materialise(shard.X), shard.y  # rows of a view: gathered (a copy of the leaf)
        w = np.ones(y.shape[0]) if shard.w is None else shard.w
        val = validation_mask(y, s.validation_fraction, task["seed"])
        # three roles: the training part fits (support), half the validation part scores the
        # outer step (query: the meta-gradient), the other half chooses the pull and stops
        # the loop (selection: the losses in history_)
        query = np.zeros_like(val)
        rows = np.flatnonzero(val)
        query[rows[validation_mask(y[rows], 0.5, task["seed"] + 1)]] = True
        w_tr = np.where(val, 0.0, w)
        w_val = np.where(val & ~query, w, 0.0)
        w_q = np.where(query, w, 0.0)
        theta, P = task["theta"], task["P"]
        free = free_coordinates(X, y, w_tr, s.n_classes)
        grid = list(task["grid"])
        # the model the leaf answers with: the global model's FedAvg step (Ditto), or the
        # adaptation at the round's pull, one of the grid's as a rule
        step = RHO_MIN if task.get("global_step") else task["rho"]
        extra = [] if step in grid and not task.get("global_step") else [step]
        models = adapt_many(X, y, w_tr, theta, grid + extra, P, s.inner_steps, p, free)
        losses = np.array([log_loss_sum(X, y, w_val, g, p) for g, _ in models[:len(grid)]])
        adapted = models[-1] if extra else models[grid.index(step)]
        grad = hess = None
        if task["meta_gradient"]:  # the query rows' gradient and Hessian, if the strategy asks
            V = composite_pass(X, y, w_q, adapted[0][:p], adapted[0][p:], loss=False,
                               order=2)
            grad, hess = V.grad, V.hess
        return Adapted(losses, float(w_val.sum()), float(w_tr.sum()), adapted[0], adapted[1],
                       grad, hess)


def personalise_task(task: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backend entry point of the last step: adapt on all of the leaf's rows, to convergence.

    Returns the parameters, their sandwich covariance (the data's meat through the penalised
    Hessian, plus the global model's uncertainty carried by the pull; the global covariance
    for parameters the leaf does not identify) and the data's Hessian (for pooling pieces).
    """
    from ..inference.local import one_blas_thread

    shard = task["shard"].load()
    with one_blas_thread():
        return personalise_rows(materialise(shard.X), shard.y, shard.w, task)


def personalise_rows(X, y, w, task: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`personalise_task` on rows at hand (a streaming leaf's recent rows)."""
    s: MetaSettings = task["settings"]
    p = s.n_features
    theta, rho, P, Vg = task["theta"], task["rho"], task["P"], task["V_global"]
    free = free_coordinates(X, y, w, s.n_classes)
    g, H = adapt_params(X, y, w, theta, rho, P, PERSONAL_STEPS, p, free)
    if not np.isfinite(rho):
        return g, Vg.copy(), H
    idx = np.flatnonzero(free)
    J = composite_pass(X, y, w, g[:p], g[p:], loss=False, order=0, meat="cluster").meat
    prior = max(rho, RHO_MIN) * P[np.ix_(idx, idx)]
    A = solve_psd(H[np.ix_(idx, idx)] + prior, np.eye(idx.size))
    cov = Vg.copy()
    block = A @ (J[np.ix_(idx, idx)] + prior @ Vg[np.ix_(idx, idx)] @ prior) @ A.T
    cov[np.ix_(idx, idx)] = 0.5 * (block + block.T)
    cov[np.ix_(idx, ~free)] = 0.0
    cov[np.ix_(~free, idx)] = 0.0
    return g, cov, H


def empirical_pull(estimates: list[np.ndarray], covs: list[np.ndarray], theta: np.ndarray,
                   P: np.ndarray) -> float:
    """The pull (pseudo-rows) that the spread of the leaves around ``theta`` calls for.

    Under a normal prior of precision ``rho P`` around ``theta``, a leaf's estimate (covariance
    ``V``) deviates by ``E[(gamma - theta)' P (gamma - theta)] = d / rho + tr(P V)``: the prior's
    spread plus the leaf's own noise. Solving for ``rho`` is a method-of-moments (empirical
    Bayes) estimate; the leaves' excesses are averaged with weights ``1 / (d / rho + tr(P
    V))^2`` (their precision, iterated as Paule and Mandel's estimator is), so one leaf with a
    nearly unidentified parameter (a huge ``V``) cannot hide the others' spread. Clipped to
    [:data:`RHO_MIN`, :data:`RHO_MAX`]: leaves no more spread than their noise give the largest
    pull.
    """
    d = theta.shape[0]
    spread, _ = _spread(estimates, covs, theta, P)
    return float(np.clip(d / spread if spread > 0 else RHO_MAX, RHO_MIN, RHO_MAX))


def _spread(estimates: list[np.ndarray], covs: list[np.ndarray], theta: np.ndarray,
            P: np.ndarray) -> tuple[float, np.ndarray]:
    """The prior's spread per leaf, ``d / rho`` in the metric ``P``, and the leaves' weights
    (see :func:`empirical_pull`)."""
    dev = np.array([float((e - theta) @ P @ (e - theta)) for e in estimates])
    noise = np.array([float(np.trace(P @ V)) for V in covs])
    excess = dev - noise
    s = max(float(np.median(excess)), 0.0)
    w = np.ones_like(excess)
    for _ in range(50):
        w = 1.0 / np.maximum(s + noise, 1e-12) ** 2
        new = max(float(w @ excess / w.sum()), 0.0)
        if abs(new - s) <= 1e-10 * max(s, 1e-300):
            s = new
            break
        s = new
    return s, w / w.sum()


def homogeneity_pvalue(estimates: list[np.ndarray], covs: list[np.ndarray],
                       theta: np.ndarray, filled: list | None = None) -> float:
    """Cochran's test that the leaves share one model: ``Q = sum_m (est_m - theta)'
    V_m^+ (est_m - theta)`` against chi-square on ``sum_m rank(V_m) - d`` degrees of freedom,
    each leaf over the parameters it identifies (``filled[m]``: the indices filled in from the
    global model, left out); ``theta`` their pooled estimate."""
    q, df = 0.0, -theta.shape[0]
    for m, (e, V) in enumerate(zip(estimates, covs, strict=True)):
        keep = np.ones(theta.shape[0], dtype=bool)
        if filled is not None:
            keep[list(filled[m])] = False
        if not keep.any():
            continue
        dev = (e - theta)[keep]
        prec, rank = precision(V[np.ix_(keep, keep)])
        q += float(dev @ prec @ dev)
        df += rank
    return 1.0 if df <= 0 else float(chi2_sf(q, df))


def between_metric(estimates: list[np.ndarray], covs: list[np.ndarray], theta: np.ndarray,
                   P: np.ndarray, pull: float) -> np.ndarray:
    """The metric of the pull shaped by the leaves' spread, per row: ``Sigma^-1 / pull``.

    ``Sigma`` is the between-leaf covariance of the parameters (the random-effects view: a
    leaf's true parameters ``gamma ~ N(theta, Sigma)``, its estimate ``N(gamma, V)``), by
    moments, ``mean((est - theta)(est - theta)' - V)``, made positive semi-definite. The pull
    toward ``theta`` at ``pull`` pseudo-rows is then the empirical-Bayes prior ``N(theta,
    Sigma)``: parameters the leaves share are held (a direction without spread gets the
    largest pull, :data:`RHO_MAX` rows of ``P``), parameters that differ are free, and large
    differences in the thresholds no longer lift the shrinkage of the slopes. The leaves are
    weighted by their precision as in :func:`empirical_pull`. With no more leaves than
    parameters (or no finite pull) the spread is not estimable: ``P`` itself (tried: one
    variance per parameter then, and it predicted worse on RAND HIE's 8 leaves, d = 10).
    """
    d = theta.shape[0]
    if len(estimates) <= d or not np.isfinite(pull) or pull <= 0:
        return P
    dev = np.array([e - theta for e in estimates])
    _, w = _spread(estimates, covs, theta, P)  # precision weights, as the pull's
    S = (dev * w[:, None]).T @ dev - np.tensordot(w, np.asarray(covs), axes=1)
    S = 0.5 * (S + S.T)
    # in the coordinates where P is the identity: the spread per row of information
    w, U = np.linalg.eigh(P)
    if w.min() <= 0:
        return P
    R = U * np.sqrt(w)  # P = R R'; z = R' (gamma - theta) has Cov(z) = R' Sigma R
    lam, Q = np.linalg.eigh(R.T @ S @ R)
    # each direction's pull in rows: 1 / lam (no spread: the largest pull)
    rows = 1.0 / np.maximum(lam, 1.0 / RHO_MAX)
    M = R @ (Q * rows) @ Q.T @ R.T
    return 0.5 * (M + M.T) / pull


def payload_bytes(obj) -> int:
    """The bytes of the numbers in a message: arrays at their size, scalars at 8 bytes."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(payload_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    if isinstance(obj, str):
        return len(obj.encode())
    return 0 if obj is None else 8


def run(backend: Backend, refs, bundles, settings: MetaSettings, theta0: np.ndarray,
        P: np.ndarray, seeds: list[int], leaf_ids: list[int], *, rho0: float,
        max_rounds: int, tol: float, fedprox_rho: float, work: float) -> MetaResult:
    """The meta-learning loop over placed leaves (see the module docstring).

    ``settings.method`` names the strategy; an unknown name is a
    :class:`~fedgrain.exceptions.ParameterError` that lists the known ones.
    """
    strategy = get_strategy(settings.method)
    with progress.step(f"meta-learning ({strategy.name})", max_rounds, "rounds"):
        return _rounds(backend, refs, bundles, settings, strategy, theta0, P, seeds, leaf_ids,
                       rho0=rho0, max_rounds=max_rounds, tol=tol, fedprox_rho=fedprox_rho,
                       work=work)


def _rounds(backend: Backend, refs, bundles, settings: MetaSettings, strategy: Strategy,
            theta0: np.ndarray, P: np.ndarray, seeds: list[int], leaf_ids: list[int], *,
            rho0: float, max_rounds: int, tol: float, fedprox_rho: float,
            work: float) -> MetaResult:
    """The rounds of :func:`run`, until one does not improve or ``max_rounds``."""
    theta, rho = theta0.copy(), strategy.start_pull(rho0, fedprox_rho)
    out = MetaResult(theta0.copy(), np.inf)
    best = np.inf
    for r in range(1, max_rounds + 1):
        t0 = time.perf_counter()
        grid = pull_grid(strategy, rho)
        tasks = _round_tasks(refs, seeds, settings, strategy, theta, P, rho, grid)
        outcomes = backend.map_bundles(adapt_task, tasks, bundles, work=work)
        ok, failed = _accept(outcomes, r, leaf_ids, out.events)
        answers = [o.value for o in ok]
        losses = sum(a.val_loss for a in answers) / sum(a.n_val for a in answers)
        pick = choose_pull(strategy, losses, grid)
        out.history.append(_history_entry(r, losses, grid, pick, tasks, ok, failed, leaf_ids))
        # A round with failures is not comparable with the others (other leaves): it neither
        # becomes the best nor stops the loop.
        round_loss = float(losses[pick])
        improved = not failed and (not np.isfinite(best) or round_loss < best * (1 - tol))
        if improved:
            best = round_loss
            out.theta, out.rho = theta.copy(), float(grid[pick])
        theta = strategy.update(theta, answers, np.array([a.n_train for a in answers]))
        rho = _next_pull(strategy, rho, grid[pick])
        out.history[-1]["seconds"] = time.perf_counter() - t0
        progress.advance()
        if not failed and not improved:
            break
    if strategy.global_model:
        out.rho = np.inf  # its model is the global one
    return out


def pull_grid(strategy: Strategy, rho: float) -> list[float]:
    """The pulls a round scores: multiples of ``rho`` (one if the pull is not learned) and
    infinity (no adaptation), last."""
    return ([rho * m for m in RHO_STEPS] if strategy.learns_pull else [rho]) + [np.inf]


def choose_pull(strategy: Strategy, losses: np.ndarray, grid: list[float]) -> int:
    """The index in ``grid`` of what the round would deploy.

    A learned pull: the largest pull within :data:`RHO_TIE` of the best validation loss (the
    personalised models there). Otherwise the global model: the infinite pull, last.
    """
    if not strategy.learns_pull:
        return len(grid) - 1
    near = np.flatnonzero(losses <= losses.min() * (1 + RHO_TIE))
    return int(max(near, key=lambda i: grid[i]))


def _next_pull(strategy: Strategy, rho: float, picked: float) -> float:
    """The next round's pull: the picked one (clipped) if learned and finite, else ``rho``."""
    if strategy.learns_pull and np.isfinite(picked):
        return float(np.clip(picked, RHO_MIN, RHO_MAX))
    return rho


def _round_tasks(refs, seeds: list[int], settings: MetaSettings, strategy: Strategy,
                 theta: np.ndarray, P: np.ndarray, rho: float, grid: list[float]) -> list[dict]:
    """One :func:`adapt_task` input per leaf.

    The strategy's ``meta_gradient`` travels as a flag, so the leaves need not know the
    registry (a strategy registered at run time works on workers in other processes).
    """
    return [{"shard": ref, "settings": settings, "seed": s, "theta": theta, "P": P, "rho": rho,
             "grid": grid, "meta_gradient": strategy.meta_gradient,
             "global_step": strategy.global_step}
            for ref, s in zip(refs, seeds, strict=True)]


def _accept(outcomes: list, r: int, leaf_ids: list[int], events: list) -> tuple[list, list]:
    """Split a round's outcomes into answers and failures, recording each failure in
    ``events``; every leaf failing is a :class:`~fedgrain.exceptions.SubsetError`."""
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        events.append({"round": r, "leaf": int(leaf_ids[o.index]), "kind": "leaf failed",
                       "error": f"{o.error_type}: {o.error}"})
    if not ok:
        first = outcomes[0]
        raise SubsetError(f"Every leaf failed in meta round {r}: {first.error_type}: "
                          f"{first.error}", first.traceback)
    return ok, failed


def _history_entry(r: int, losses: np.ndarray, grid: list[float], pick: int, tasks: list[dict],
                   ok: list, failed: list, leaf_ids: list[int]) -> dict:
    """The round's record (``seconds`` is filled in at the end of the round)."""
    # what the round moves: each task's numbers (not its shard handle, where the rows stay, nor
    # the strategy's flag), and each leaf's answer
    moved = sum(payload_bytes({k: v for k, v in t.items()
                               if k not in ("shard", "meta_gradient", "global_step")})
                for t in tasks) + sum(payload_bytes(o.value) for o in ok)
    return {
        "round": r, "val_loss": float(losses[pick]), "no_adaptation_loss": float(losses[-1]),
        "rho": float(grid[pick]) if np.isfinite(grid[pick]) else None,
        "leaf_val_loss": {str(leaf_ids[o.index]): float(o.value.val_loss[pick] /
                                                        max(o.value.n_val, 1e-300))
                          for o in ok},
        "leaf_global_loss": {str(leaf_ids[o.index]): float(o.value.val_loss[-1] /
                                                           max(o.value.n_val, 1e-300))
                             for o in ok},
        "strength": {str(leaf_ids[o.index]): float(o.value.n_train / (o.value.n_train +
                                                                      grid[pick]))
                     for o in ok},
        "leaves_failed": [int(leaf_ids[o.index]) for o in failed],
        "bytes": int(moved),
        "seconds": 0.0,
    }


def personalise(backend: Backend, refs, bundles, settings: MetaSettings, result: MetaResult,
                P: np.ndarray, V_global: np.ndarray, work: float) -> list:
    """Each leaf's model adapted from the learned global parameters on all of its rows."""
    tasks = [{"shard": ref, "settings": settings, "theta": result.theta, "rho": result.rho,
              "P": P, "V_global": V_global} for ref in refs]
    return backend.map_bundles(personalise_task, tasks, bundles, work=work)
