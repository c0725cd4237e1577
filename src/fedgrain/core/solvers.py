"""Proximal Newton for L1-penalised smooth losses, and plain Newton.

The loss is reached through an *oracle*: ``oracle(x, loss=..., order=...)`` returns a
:class:`fedgrain.core.likelihood.Pass` with the loss, gradient and Hessian as sums over rows. The
solver
divides by ``n`` itself, so penalties are on the per-row scale (the glmnet convention).

Each outer iteration builds the quadratic model from the Hessian (one weighted Gram matrix over
the data), minimises it plus the L1 penalty by coordinate descent on the small ``d x d`` problem,
and takes a backtracking line search on the true objective. Without any penalised coordinate the
inner problem is solved exactly by a Cholesky factorisation, which is plain Newton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .likelihood import Pass
from .linalg import solve_psd

Oracle = Callable[..., Pass]

#: Rows of the evenly spaced subsample that gives large fits their starting point.
WARM_START_ROWS = 20_000


@dataclass(frozen=True)
class SolverResult:
    """Outcome of a solve.

    ``grad`` and ``hess`` are the loss sums at ``x`` (not divided by ``n``), ready for
    de-biasing and variance estimation without another pass over the data. ``step`` is the
    (proximal) Newton direction at ``x``, the one not taken: at a finite optimum it is tiny,
    while under separation it stays of order one however small the gradient gets (see
    :func:`runaway`).
    """

    x: np.ndarray
    objective: float
    grad: np.ndarray
    hess: np.ndarray
    n_iter: int
    converged: bool
    diverged: bool
    step: np.ndarray


def runaway(step: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Coordinates that run away at a converged fit: the classes are separated along them.

    At a finite optimum Newton's step shrinks quadratically; when the classes are separated the
    loss decays exponentially along a direction and each step keeps moving about one unit along
    it, even after the decrement has fallen below any tolerance. ``step`` must be in
    standardised units (slopes times the features' standard deviations, thresholds at the
    features' means), where "one unit" means the same for every coordinate.
    """
    return np.abs(step) > tol


def soft_threshold(z: float, t: float) -> float:
    """``sign(z) max(|z| - t, 0)``."""
    if z > t:
        return z - t
    if z < -t:
        return z + t
    return 0.0


def solve_l1_quadratic(
    g: np.ndarray,
    H: np.ndarray,
    x: np.ndarray,
    lam: np.ndarray,
    *,
    tol: float = 1e-10,
    max_sweeps: int = 1000,
) -> np.ndarray:
    """Minimise ``g'(z - x) + 1/2 (z - x)' H (z - x) + sum_j lam_j |z_j|`` over ``z``.

    Cyclic coordinate descent with an active set: full sweeps alternate with sweeps over the
    non-zero coordinates until no coordinate moves by more than ``tol`` (relative to its scale).
    Coordinates with ``H_jj <= 0`` are kept at ``x_j``.
    """
    z = x.copy()
    c = g.copy()  # gradient of the smooth part at z: g + H (z - x)
    diag = np.diag(H)
    full = [j for j in range(x.shape[0]) if diag[j] > 0]
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    active = full
    for _ in range(max_sweeps):
        max_change = 0.0
        for j in active:
            zj = z[j]
            new = soft_threshold(zj - c[j] / diag[j], lam[j] / diag[j])
            if new != zj:
                step = new - zj
                z[j] = new
                c += step * H[j]
                max_change = max(max_change, abs(step) * scale[j])
        if max_change <= tol:
            if active is full:
                break
            active = full  # converged on the active set: confirm with a full sweep
        elif active is full:
            active = [j for j in full if z[j] != 0.0 or lam[j] == 0.0]
    return z


def proximal_newton(
    oracle: Oracle,
    x0: np.ndarray,
    n: float,
    lam: np.ndarray | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-8,
    feasible: Callable[[np.ndarray], bool] | None = None,
) -> SolverResult:
    """Minimise ``loss(x) / n + sum_j lam_j |x_j|`` by proximal Newton with line search.

    Parameters
    ----------
    oracle : callable
        ``oracle(x, loss=bool, order=int) -> Pass`` with sums over rows.
    x0 : ndarray of shape (d,)
        Starting point; must be feasible.
    n : float
        Number (or total weight) of rows; the loss is divided by it.
    lam : ndarray of shape (d,), optional
        Per-coordinate penalty; zero or None for plain Newton.
    max_iter : int
        Iterations (passes with a Hessian) at most; ``converged`` is False when they run out.
    tol : float
        Stop when the quadratic model promises less than ``tol`` decrease of the objective in
        log-likelihood units (the per-row objective times ``n``). Without a penalty this is half
        the squared Newton decrement, so the distance to the optimum is about ``sqrt(2 tol)``
        standard errors whatever ``n`` is.
    feasible : callable, optional
        Trial points for which it returns False are rejected by the line search (used to keep
        thresholds increasing in the exact likelihood).

    Returns
    -------
    SolverResult
        ``diverged`` is True when the direction or the objective stopped being finite.
    """
    x = np.asarray(x0, dtype=float).copy()
    model = _CompositeObjective(n, lam, x)
    P = oracle(x, loss=True, order=2)
    F = model.value(P.loss, x)
    converged = diverged = False
    it = 0
    delta, pred = model.direction(P, x)
    while True:
        if not (np.all(np.isfinite(delta)) and np.isfinite(F)):
            diverged = True
            break
        if -pred * n <= tol:
            converged = True
            break
        if it == max_iter:
            break
        it += 1
        step = _line_search(oracle, model, x, F, delta, pred, feasible)
        if step is None:
            break  # no decrease along the direction: not converged
        t, x, P, F = step
        if t != 1.0:
            P = oracle(x, loss=False, order=2)
        delta, pred = model.direction(P, x)
    return SolverResult(x, F, P.grad, P.hess, it, converged, diverged, delta)


class _CompositeObjective:
    """``loss / n + sum_j lam_j |x_j|`` and the (proximal) Newton step on its quadratic model."""

    def __init__(self, n: float, lam: np.ndarray | None, like: np.ndarray) -> None:
        self.n = n
        self.penalised = lam is not None and bool(np.any(lam > 0))
        self.lam = np.zeros_like(like) if lam is None else np.asarray(lam, dtype=float)

    def value(self, loss: float, z: np.ndarray) -> float:
        return loss / self.n + (float(self.lam @ np.abs(z)) if self.penalised else 0.0)

    def direction(self, P: Pass, z: np.ndarray) -> tuple[np.ndarray, float]:
        """The (proximal) Newton step at ``z`` and the decrease it promises per row."""
        g, H = P.grad / self.n, P.hess / self.n
        if self.penalised:
            znew = solve_l1_quadratic(g, H, z, self.lam)
            return znew - z, float(g @ (znew - z)) + float(self.lam @ (np.abs(znew) - np.abs(z)))
        step = -solve_psd(H, g)
        return step, float(g @ step)


def _line_search(
    oracle: Oracle,
    model: _CompositeObjective,
    x: np.ndarray,
    F: float,
    delta: np.ndarray,
    pred: float,
    feasible: Callable[[np.ndarray], bool] | None,
) -> tuple[float, np.ndarray, Pass, float] | None:
    """Backtrack from the full step until the objective decreases enough (Armijo).

    Returns the step length, the new point, its pass and its objective; None when no step
    down to ``1e-10`` decreases the objective. The full step is tried with the Hessian in the
    same pass over the data: it is accepted nearly always, and then the next iteration needs
    no other pass.
    """
    t = 1.0
    while t >= 1e-10:
        xn = x + t * delta
        if feasible is None or feasible(xn):
            Pn = oracle(xn, loss=True, order=2 if t == 1.0 else 0)
            Fn = model.value(Pn.loss, xn)
            # A full step whose change is lost in rounding is accepted: the quadratic model
            # is exact there, so it is the optimum to working precision.
            if np.isfinite(Fn) and (
                Fn <= F + 1e-4 * t * pred or (t == 1.0 and Fn - F <= 1e-13 * abs(F))
            ):
                return t, xn, Pn, Fn
        t *= 0.5
    return None


def newton(oracle: Oracle, x0: np.ndarray, n: float, **kwargs) -> SolverResult:
    """Plain Newton with line search: :func:`proximal_newton` without a penalty."""
    return proximal_newton(oracle, x0, n, None, **kwargs)


def warm_start(
    oracle_for: Callable[[np.ndarray], tuple[Oracle, float] | None],
    n: int,
    x0: np.ndarray,
    lam: np.ndarray | None = None,
    **kwargs,
) -> np.ndarray:
    """Starting point from a loose fit on an evenly spaced subsample of the rows.

    ``oracle_for(rows)`` returns the subsample's oracle and row count, or None when the
    subsample cannot stand in for the data (a level missing, say). The result is ``x0`` itself
    when the data are small (:func:`warm_start_rows`) or the subsample fit does not settle.
    ``lam`` is on the per-row scale, so the same penalty applies; ``kwargs`` go to the solver.
    """
    rows = warm_start_rows(n)
    made = None if rows is None else oracle_for(rows)
    if made is None:
        return x0
    oracle, n_sub = made
    res = proximal_newton(oracle, x0, n_sub, lam, tol=1e-2, **kwargs)
    return res.x if res.converged and np.all(np.isfinite(res.x)) else x0


def warm_start_rows(n: int, rows: int = WARM_START_ROWS) -> np.ndarray | None:
    """Evenly spaced row indices for a warm-start fit, or None when ``n`` is small.

    A fit on this subsample costs a fraction of one pass over all rows and lands within a few
    standard errors of the full optimum, from where Newton's method needs two or three full
    passes instead of five or six. Worth it from about four times ``rows`` rows.
    """
    if n < 4 * rows:
        return None
    return np.linspace(0, n - 1, rows).round().astype(np.intp)
