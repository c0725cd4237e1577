"""The exact likelihood of the partial proportional-odds model (threshold-specific slopes).

``P(Y <= k | x) = F(theta_k - x'beta - w'delta_k)`` with ``w`` the *nominal* features (a subset
of the columns of ``x``) and ``delta_0 = 0``: feature ``j`` of ``w`` has the slope ``beta_j +
delta_kj`` at cut ``k``, as in ``gologit2`` (``pl``/``npl``) and R's ``clm(nominal = ~ w)``.
Parameters are ordered ``(beta, theta, delta_1, ..., delta_{K-2})`` (each ``delta_k`` over the
nominal features). The model is a distribution at a row only where its cuts ``theta_k -
w'delta_k`` increase in ``k``. The likelihood needs that only around each row's own level (a
row whose two cuts cross has an infinite loss, which Newton's line search avoids); requiring it
at every cut of every fitted row would put the maximum on that boundary whenever the true
lines cross somewhere in the range of the data (they do, for any non-zero ``delta``, far
enough out), and Newton would not converge there. Rows where the lines cross, fitted or new,
are reported (see ``OrdinalRegression.predict_proba``), as ``gologit2`` reports negative
predicted probabilities.
"""

from __future__ import annotations

import numpy as np

from .blocks import block_rows
from .likelihood import Pass, cut_parts_at, second_derivatives


def row_thresholds(theta: np.ndarray, W: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Each row's effective thresholds ``theta_k - w'delta_k``: ``(n, K-1)``."""
    shift = np.zeros((W.shape[0], theta.shape[0]))
    if delta.size:
        shift[:, 1:] = W @ delta.T
    return theta[None, :] - shift


def nominal_pass(X: np.ndarray, W: np.ndarray, y: np.ndarray, w: np.ndarray | None,
                 params: np.ndarray, n_classes: int, link=None, order: int = 2,
                 meat: bool = False) -> Pass:
    """Loss, gradient, Hessian (and the per-row meat) of the partial proportional-odds
    likelihood at ``params`` (see the module docstring), over the rows in blocks."""
    n, p = X.shape
    r = W.shape[1]
    K1 = n_classes - 1
    beta, theta = params[:p], params[p:p + K1]
    delta = params[p + K1:].reshape(K1 - 1, r) if r else np.zeros((K1 - 1, 0))
    d = params.shape[0]
    total = 0.0
    grad = np.zeros(d) if order >= 1 else None
    hess = np.zeros((d, d)) if order >= 2 else None
    mt = np.zeros((d, d)) if meat else None
    block = block_rows(d)
    for a in range(0, n, block):
        b = min(a + block, n)
        Xb, Wb, yb = X[a:b], W[a:b], y[a:b]
        wb = np.ones(b - a) if w is None else w[a:b]
        eta = Xb @ beta
        t_rows = row_thresholds(theta, Wb, delta)
        m = b - a
        t_ext = np.concatenate([np.full((m, 1), -np.inf), t_rows, np.full((m, 1), np.inf)], 1)
        rows = np.arange(m)
        hi, lo = t_ext[rows, yb + 1], t_ext[rows, yb]
        if np.any(hi <= lo):
            return Pass(np.inf, None, None, None)  # a row's own level has no probability
        logpi, g1, g0, r1, r0 = cut_parts_at(hi - eta, lo - eta, link)
        total -= float(wb @ logpi)
        if order == 0 and not meat:
            continue
        # derivatives of a1 (upper cut of the row's class) and a0 (lower cut) in the params
        D1 = _cut_design(Xb, Wb, yb, p, K1, r, upper=True)
        D0 = _cut_design(Xb, Wb, yb, p, K1, r, upper=False)
        score = D1 * g1[:, None] - D0 * g0[:, None]  # d log pi / d params, per row
        if order >= 1:
            grad -= score.T @ wb
        if meat:
            mt += (score * wb[:, None]).T @ score
        if order >= 2:
            h11, h00, h10 = second_derivatives(g1, g0, r1, r0)
            # -d2 log pi = -(h11 D1 D1' + h00 D0 D0' + h10 (D1 D0' + D0 D1'))
            hess -= (D1 * (wb * h11)[:, None]).T @ D1 + (D0 * (wb * h00)[:, None]).T @ D0
            cross = (D1 * (wb * h10)[:, None]).T @ D0
            hess -= cross + cross.T
    return Pass(total, grad, hess, mt)


def _cut_design(Xb, Wb, yb, p, K1, r, upper: bool) -> np.ndarray:
    """``d a / d params`` of each row's upper (``a1``) or lower (``a0``) cut; zero where the
    cut is infinite (the end levels)."""
    m = Xb.shape[0]
    k = yb if upper else yb - 1
    valid = (k >= 0) & (k < K1)
    D = np.zeros((m, p + K1 + (K1 - 1) * r))
    D[:, :p] = -Xb
    rows = np.flatnonzero(valid)
    D[rows, p + k[rows]] = 1.0
    if r:
        for kk in range(1, K1):
            sel = rows[k[rows] == kk]
            D[sel, p + K1 + (kk - 1) * r:p + K1 + kk * r] = -Wb[sel]
    D[~valid] = 0.0
    return D
