"""The cumulative-logit model: composite and exact likelihoods, computed over original rows.

Parameters are always ordered as ``(beta, theta)``: ``p`` slopes, then ``K - 1`` thresholds, with
``P(Y <= k | x) = sigmoid(theta_k - x'beta)``. This is the order of the public ``coef_`` /
``thresholds_`` / ``cov_`` attributes and of statsmodels' ``OrderedModel``.

Composite likelihood (docs/method.md, "The composite likelihood without expansion"). Each row
``(x_i, y_i)`` stands for ``K - 1`` binary rows with label ``u_ik = 1{y_i > k}`` and
``P(u_ik = 1) = sigmoid(x_i'beta - theta_k)``. The expanded ``N (K - 1) x d`` design is never
built: every quantity reduces to row-level sums, and one pass costs one weighted Gram matrix over
``N`` rows. All passes walk the rows in blocks, so temporaries are ``block x (p + K)`` whatever
``N`` is; per block, the weighted Gram matrix is one symmetric product ``Z'Z`` with
``Z = X_b sqrt(w)`` and the gradient and cross terms one thin product ``X_b' S``.

Exact likelihood: the proportional-odds multinomial likelihood ``pi_ik = F_k - F_{k-1}``, the
reference fit that must agree with statsmodels / R ``MASS::polr``.

Functions return *negative* log-likelihoods (losses), their gradients and Hessians, all as sums
over rows (not means). Optional sample weights act as frequency weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from sklearn.isotonic import isotonic_regression

from .blocks import block_rows, chunk_sums

MEATS = ("cluster", "row")
LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class Pass:
    """What one pass over the rows returns.

    ``loss`` is the negative log-likelihood, ``grad`` its gradient, ``hess`` its Hessian, and
    ``meat`` the sum of outer products of per-cluster (``"cluster"``: original row) or
    per-expanded-row (``"row"``) scores. ``class_grad`` (``K x d``, on request) is the gradient
    summed over the rows of each class: with the classes' weights ``n_h`` it gives the
    within-class meat ``meat - sum_h g_h g_h' / n_h`` (docs/method.md, "Pooling and
    refinement"). Entries not asked for are ``None``.
    """

    loss: float | None
    grad: np.ndarray | None
    hess: np.ndarray | None
    meat: np.ndarray | None
    class_grad: np.ndarray | None = None


def initial_thresholds(codes: np.ndarray, weights: np.ndarray | None, n_classes: int,
                       floor: float = 1e-6, link=None) -> np.ndarray:
    """Thresholds at the logits (or the link's quantiles) of the cumulative class shares: the
    fit with all slopes zero.

    Shares are clipped to ``[floor, 1 - floor]`` so that an absent class gives a finite start.
    """
    counts = np.bincount(codes, weights=weights, minlength=n_classes)
    cum = np.clip(np.cumsum(counts)[:-1] / counts.sum(), floor, 1.0 - floor)
    if link is not None and link.name != "logit":
        return link.ppf(cum)
    return np.log(cum / (1.0 - cum))


def composite_pass(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None,
    beta: np.ndarray,
    theta: np.ndarray,
    *,
    thresholds: np.ndarray | None = None,
    loss: bool = True,
    order: int = 2,
    meat: str | None = None,
    by_class: bool = False,
    block: int | None = None,
    link=None,
) -> Pass:
    """One pass of the composite (expanded binary) likelihood over the rows of ``X``.

    Parameters
    ----------
    X : ndarray of shape (n, p)
        Features (any scale; the caller standardises if it wants to).
    y : ndarray of shape (n,)
        Integer class codes ``0 .. K-1``.
    w : ndarray of shape (n,) or None
        Frequency weights.
    beta : ndarray of shape (p,)
    theta : ndarray of shape (K-1,)
        Thresholds. Only those listed in ``thresholds`` are used.
    thresholds : ndarray of int, optional
        The thresholds that take part (all by default). A threshold with every row on one side
        carries no information in these rows; the caller leaves it out. The returned gradient,
        Hessian and meat are over ``(beta, theta[thresholds])``.
    loss : bool
        Whether to compute the loss.
    order : {0, 1, 2}
        0: nothing else; 1: gradient; 2: gradient and Hessian.
    meat : {None, "cluster", "row"}
        Also return the meat of the sandwich: ``"cluster"`` sums the score over the ``K - 1``
        expanded rows of each original row before the outer product (the right variance for the
        composite likelihood); ``"row"`` treats the expanded rows as independent.
    by_class : bool
        Also return the gradient summed over the rows of each class (``Pass.class_grad``,
        ``K x d`` with ``K = len(theta) + 1``): a thin product per block.

    link : :class:`fedgrain.core.links.Link` or None
        The binary rows' link, ``P(u_ik = 0) = F(theta_k - x_i'beta)`` (the logit when None):
        the composite likelihood of a cumulative-link model is the same sum of binary
        likelihoods with ``F`` in place of the logistic function.

    Returns
    -------
    Pass
    """
    if link is not None and link.name != "logit":
        return _composite_pass_link(X, y, w, beta, theta, link, thresholds=thresholds,
                                    loss=loss, order=order, meat=meat, by_class=by_class,
                                    block=block)
    n, p = X.shape
    block = block or block_rows(p)
    ks = _composite_sums(p, theta, thresholds, 0, meat, False)[0]
    th = theta[ks]
    kk = ks.shape[0]
    n_cls = theta.shape[0] + 1
    # sum_k u_ik a_ik = c(y_i) eta_i - s(y_i), with c(y) = #{k in ks: k < y} and s(y) the sum of
    # those thresholds: per-class constants, so the loss needs no masked (n, kk) temporary.
    below = ks[None, :] < np.arange(n_cls)[:, None]
    cnt = below.sum(axis=1).astype(float)
    csum = below @ th
    u_half = np.ascontiguousarray((below - 0.5).T)  # (kk, K): u_ik - 1/2 of each class
    half_th = (0.5 * th)[:, None]
    classes = np.arange(n_cls)[:, None]
    # Rows of S, the columns of the one thin product X_b' S per block: the gradient's row
    # term, then the Hessian's cross terms, then the meat's.
    at_v = 1 if order >= 1 else 0
    at_m = at_v + (kk if order >= 2 else 0)
    n_s = at_m + (kk if meat is not None else 0)

    def body(a: int, b: int) -> list:
        _, _, grad, hess, mt, cg = _composite_sums(p, theta, thresholds, order, meat, by_class)
        total = 0.0
        m = max(min(block, b - a), 0)
        # Per-threshold work is laid out (kk, rows): every elementwise loop runs along rows.
        T, E, S = np.empty((kk, m)), np.empty((kk, m)), np.empty((n_s, m))
        Z = np.empty((m, p)) if order >= 2 or meat is not None else None
        for start in range(a, b, block):
            stop = min(start + block, b)
            nb = stop - start
            Xb, yb = X[start:stop], y[start:stop]
            wb = None if w is None else w[start:stop]
            eta = Xb @ beta
            # Everything from T = tanh(A / 2), A = eta - theta: sigmoid(A) = (1 + T) / 2,
            # sigmoid(A) (1 - sigmoid(A)) = 1/4 - (T / 2)^2, and
            # softplus(A) = max(A, 0) - log(sigmoid(|A|)) = 2 max(A / 2, 0) + log 2 - log1p(|T|).
            Tb, Eb = T[:, :nb], E[:, :nb]
            np.subtract(0.5 * eta, half_th, out=Tb)
            if loss:
                rows = 2.0 * np.maximum(Tb, 0.0, out=Eb).sum(axis=0)
            np.tanh(Tb, out=Tb)
            if loss:
                rows -= np.log1p(np.abs(Tb, out=Eb), out=Eb).sum(axis=0)
                rows -= cnt[yb] * eta - csum[yb]
                total += kk * LN2 * (nb if wb is None else float(wb.sum())) + \
                    float(rows.sum() if wb is None else rows @ wb)
            if order == 0 and meat is None and not by_class:
                continue
            Tb *= 0.5  # mu - 1/2
            np.take(u_half, yb, axis=1, out=Eb)
            Eb -= Tb  # u_ik - mu_ik
            r = Eb.sum(axis=0)
            if by_class:  # per class: slopes -sum w r x, thresholds sum w E
                C = np.equal(yb, classes) * (1.0 if wb is None else wb)
                cg[:, :p] -= (C * r) @ Xb
                cg[:, p:] += C @ Eb.T
            # The rows of S first, and their product with the block while it is in cache;
            # then the weighted Gram matrices.
            if order >= 1:
                if wb is None:
                    S[0, :nb] = r
                    grad[p:] += Eb.sum(axis=1)
                else:
                    np.multiply(r, wb, out=S[0, :nb])
                    grad[p:] += Eb @ wb
            if order >= 2:
                V = np.multiply(Tb, Tb, out=S[at_v:at_m, :nb])
                np.subtract(0.25, V, out=V)  # mu (1 - mu)
                vs = V.sum(axis=0)
                if wb is None:
                    hess[p:, p:] += np.diag(V.sum(axis=1))
                else:
                    hess[p:, p:] += np.diag(V @ wb)
                    V *= wb
                    vs *= wb
            if meat is not None:
                M = S[at_m:, :nb]
                if meat == "cluster":
                    m_row = r * r
                    np.multiply(Eb, r, out=M)
                    mt[p:, p:] += (Eb if wb is None else Eb * wb) @ Eb.T
                else:
                    np.multiply(Eb, Eb, out=M)
                    m_row = M.sum(axis=0)
                    mt[p:, p:] += np.diag(M.sum(axis=1) if wb is None else M @ wb)
                if wb is not None:
                    m_row *= wb
                    M *= wb
            if n_s:
                G = S[:, :nb] @ Xb
                if order >= 1:
                    grad[:p] -= G[0]
                if order >= 2:
                    hess[:p, p:] -= G[at_v:at_m].T
                if meat is not None:
                    mt[:p, p:] -= G[at_m:].T
            if order >= 2:
                Zb = np.einsum("ij,i->ij", Xb, np.sqrt(vs, out=vs), out=Z[:nb])
                hess[:p, :p] += Zb.T @ Zb
            if meat is not None:
                Zb = np.einsum("ij,i->ij", Xb, np.sqrt(m_row, out=m_row), out=Z[:nb])
                mt[:p, :p] += Zb.T @ Zb
        return [total, grad, hess, mt, cg]

    total, grad, hess, mt, cg = chunk_sums(body, n, block)
    if hess is not None:
        hess[p:, :p] = hess[:p, p:].T
    if mt is not None:
        mt[p:, :p] = mt[:p, p:].T
    return Pass(total if loss else None, grad, hess, mt, cg)


def _composite_sums(p: int, theta: np.ndarray, thresholds, order: int, meat, by_class: bool):
    """What a composite pass starts from: the thresholds taking part (``ks``) and their values,
    and the zeroed sums asked for (gradient, Hessian, meat, per-class gradients; None if not)."""
    ks = np.arange(theta.shape[0]) if thresholds is None else np.asarray(thresholds, dtype=np.intp)
    d = p + ks.shape[0]
    if meat is not None and meat not in MEATS:
        raise ValueError(f"meat must be one of {MEATS} or None; got {meat!r}.")
    return (ks, theta[ks], np.zeros(d) if order >= 1 else None,
            np.zeros((d, d)) if order >= 2 else None,
            np.zeros((d, d)) if meat is not None else None,
            np.zeros((theta.shape[0] + 1, d)) if by_class else None)


def _composite_pass_link(X, y, w, beta, theta, link, *, thresholds=None, loss=True, order=2,
                         meat=None, by_class=False, block=None) -> Pass:
    """:func:`composite_pass` for a link other than the logit.

    With ``a_ik = theta_k - eta_i`` and ``u_ik = 1{y_i > k}``, a binary row's loss is
    ``-(u log S(a) + (1 - u) log F(a))``; its derivative in ``a`` is
    ``E = u h(a) - (1 - u) g(a)`` with the hazard ``h = f / S`` and the reversed hazard
    ``g = f / F``, and its second derivative ``V = u h (r + h) - (1 - u) g (r - g)`` with
    ``r = f' / f`` (``r + h`` and ``r - g`` are the hazards' log-slopes, exact where they
    are constant: 1 for the cloglog's hazard, -1 for the loglog's reversed one; the observed
    information; for the logit ``E = u - mu`` and
    ``V = mu (1 - mu)``, as in the logit pass). Hazards come from the links' tail-exact
    logarithms, so rows far in the tails give finite derivatives. ``V`` is not negative for a
    log-concave ``F`` (probit, cloglog, loglog); the cauchit's can be, and is kept as it is.
    """
    n, p = X.shape
    block = block or block_rows(p)
    ks = _composite_sums(p, theta, thresholds, 0, meat, False)[0]
    th = theta[ks]
    n_cls = theta.shape[0] + 1
    above = ks[None, :] < np.arange(n_cls)[:, None]  # per class: u_ik

    def body(a: int, b: int) -> list:
        _, _, grad, hess, mt, cg = _composite_sums(p, theta, thresholds, order, meat, by_class)
        total = 0.0
        for start in range(a, b, block):
            stop = min(start + block, b)
            Xb = X[start:stop]
            yb = y[start:stop]
            nb = stop - start
            ob = np.ones(nb) if w is None else w[start:stop]
            if w is not None and not np.all(ob > 0):  # rows of weight zero: not part of the sum
                keep = ob > 0  # (their terms can be infinite far in a tail; 0 * inf is NaN)
                Xb, yb, ob = Xb[keep], yb[keep], ob[keep]
                nb = yb.shape[0]
            A = th[None, :] - (Xb @ beta)[:, None]
            U = above[yb]
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                if loss:
                    rows = -np.where(U, link.logsf(A), link.logcdf(A)).sum(axis=1)
                    total += float(rows @ ob)
                if order == 0 and meat is None and not by_class:
                    continue
                h = np.exp(link.log_hazard(A))
                g = np.exp(link.log_rhazard(A))
                E = np.where(U, h, -g)
            r = E.sum(axis=1)
            if by_class:
                C = np.zeros((nb, n_cls))
                C[np.arange(nb), yb] = ob
                cg[:, :p] -= (C * r[:, None]).T @ Xb
                cg[:, p:] += C.T @ E
            if order >= 1:
                grad[:p] -= Xb.T @ (ob * r)
                grad[p:] += ob @ E
            if order >= 2:
                V = np.where(U, h * link.hazard_slope(A), -g * link.rhazard_slope(A))
                V = np.where(np.isfinite(V), V, 0.0)
                vs = V.sum(axis=1)
                if link.name != "cauchit":
                    V = np.maximum(V, 0.0)
                    vs = np.maximum(vs, 0.0)
                hess[:p, :p] += Xb.T @ (Xb * (ob * vs)[:, None])
                hess[:p, p:] -= Xb.T @ (V * ob[:, None])
                hess[p:, p:] += np.diag(ob @ V)
            if meat is not None:
                if meat == "cluster":
                    m_row, m_cross = r * r, E * r[:, None]
                    mt[p:, p:] += (E * ob[:, None]).T @ E
                else:
                    m_cross = E * E
                    m_row = m_cross.sum(axis=1)
                    mt[p:, p:] += np.diag(ob @ m_cross)
                mt[:p, :p] += Xb.T @ (Xb * (ob * m_row)[:, None])
                mt[:p, p:] -= Xb.T @ (m_cross * ob[:, None])
        return [total, grad, hess, mt, cg]

    total, grad, hess, mt, cg = chunk_sums(body, n, block)
    if hess is not None:
        hess[p:, :p] = hess[:p, p:].T
    if mt is not None:
        mt[p:, :p] = mt[:p, p:].T
    return Pass(total if loss else None, grad, hess, mt, cg)


def _logit_cut_parts(a1: np.ndarray, a0: np.ndarray):
    """The exact likelihood's per-row pieces for the logit from the row's two cuts ``a1 > a0``
    (``+inf`` / ``-inf`` at the end levels): log pi, g1 = f1 / pi, g0 = f0 / pi and
    ``r = f'/f = 1 - 2 F`` at both cuts.

    With ``t = exp(-|a|)``: ``log F(a) = min(a, 0) - log1p(t)``, ``log(1 - F(a)) = log F(a) - a``
    and ``1 - 2 F(a) = -sign(a) (1 - t) / (1 + t)``; infinite cuts give the exact limits.
    """
    t1 = np.exp(-np.abs(a1))
    t0 = np.exp(-np.abs(a0))
    logF1 = np.minimum(a1, 0.0) - np.log1p(t1)
    logQ0 = np.minimum(-a0, 0.0) - np.log1p(t0)
    # pi = F(a1) - F(a0) = F(a1) (1 - F(a0)) (1 - exp(a0 - a1)), every factor kept in logs.
    log_gap = np.log(-np.expm1(a0 - a1))
    logpi = logF1 + logQ0 + log_gap
    # f1 / pi = (1 - F1) / ((1 - F0)(1 - e)); f0 / pi = F0 / (F1 (1 - e)): ratios of logs, so
    # rows far in the tails (|theta - eta| of hundreds) give finite values, not 0 / 0.
    base = logQ0 + log_gap
    g1 = np.exp(logF1 - a1 - base)
    g0 = np.exp(logQ0 + a0 - logF1 - log_gap)
    return logpi, g1, g0, _one_minus_2f(a1, t1), _one_minus_2f(a0, t0)


def _one_minus_2f(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``1 - 2 sigmoid(a)`` from ``t = exp(-|a|)``: ``-sign(a) (1 - t) / (1 + t)``."""
    r = np.subtract(1.0, t)
    r /= 1.0 + t
    return np.copysign(r, -a, out=r)


def second_derivatives(g1, g0, r1, r0):
    """``d2 log pi`` in the row's two cuts ``(a1, a0)``: ``(h11, h00, h10)`` from the parts of
    :func:`cut_parts_at` (``f'/pi = r f/pi``)."""
    return g1 * r1 - g1 * g1, -g0 * r0 - g0 * g0, g1 * g0


def _cut_parts_link(eta: np.ndarray, yb: np.ndarray, theta: np.ndarray, link):
    """:func:`_cut_parts` for any link (:mod:`fedgrain.core.links`): log pi, g1 = f1 / pi,
    g0 = f0 / pi and ``r = f'/f`` at both cuts (``1 - 2F`` for the logit).

    ``pi = F(a1) - F(a0)`` is taken from the lower tails where the row's cuts lie below zero
    on average and from the upper tails otherwise, each in logs, so no difference cancels.
    """
    t_ext = np.concatenate(([-np.inf], theta, [np.inf]))
    return cut_parts_at(t_ext[yb + 1] - eta, t_ext[yb] - eta, link)


def cut_parts_at(a1: np.ndarray, a0: np.ndarray, link=None):
    """:func:`_cut_parts_link` from each row's two cuts ``a1 > a0`` directly (``+inf`` /
    ``-inf`` for the end levels): for models whose cuts differ by row."""
    if link is None or link.name == "logit":
        return _logit_cut_parts(a1, a0)
    from .links import _log1mexp

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        lower = (a1 + a0) <= 0.0
        lower = np.where(np.isneginf(a0), True, np.where(np.isposinf(a1), False, lower))
        # lower tails: pi = F1 (1 - F0/F1); g1 = (f1/F1) / (1 - F0/F1), g0 = (f0/F0) (F0/F1)
        # / (1 - F0/F1); upper tails the same with survival functions. The links' hazards
        # (f/F and f/(1-F)) are exact in their tails, so no ratio cancels.
        lf1, lf0 = link.logcdf(a1), link.logcdf(a0)
        ls1, ls0 = link.logsf(a1), link.logsf(a0)
        dF = np.where(np.isneginf(lf0), -np.inf, lf0 - np.where(np.isneginf(lf1), 0.0, lf1))
        dS = np.where(np.isneginf(ls1), -np.inf, ls1 - np.where(np.isneginf(ls0), 0.0, ls0))
        L = _log1mexp(np.minimum(dF, 0.0))
        U = _log1mexp(np.minimum(dS, 0.0))
        logpi = np.where(lower, lf1 + L, ls0 + U)
        g1 = np.where(lower, np.exp(link.log_rhazard(a1) - L),
                      np.exp(link.log_hazard(a1) + dS - U))
        g0 = np.where(lower, np.exp(link.log_rhazard(a0) + dF - L),
                      np.exp(link.log_hazard(a0) - U))
        r1 = np.where(np.isfinite(a1), link.ratio(a1), 0.0)
        r0 = np.where(np.isfinite(a0), link.ratio(a0), 0.0)
    g1 = np.where(np.isfinite(a1), g1, 0.0)
    g0 = np.where(np.isfinite(a0), g0, 0.0)
    return logpi, g1, g0, r1, r0


def exact_pass(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None,
    beta: np.ndarray,
    theta: np.ndarray,
    *,
    order: int = 2,
    meat: bool = False,
    shift: np.ndarray | None = None,
    block: int | None = None,
    link=None,
) -> Pass:
    """One pass of the exact proportional-odds likelihood.

    Same conventions as :func:`composite_pass`; ``meat=True`` adds the sum of outer products
    of per-row scores (the sandwich meat; for this likelihood rows are the clusters).
    ``shift`` is subtracted from every row first (block by block, no copy of ``X``): with the
    features' means the thresholds are those at the mean, and the Hessian stays well
    conditioned however large the means are. Requires strictly increasing ``theta``.

    Each row touches two thresholds (its class's upper and lower cut); the per-row terms are
    summed by class with one ``(K, block)`` indicator matrix, and the slopes' gradient and the
    cross terms of a block are one thin product ``S X_b``.
    """
    n, p = X.shape
    block = block or block_rows(p)
    K1 = theta.shape[0]
    d = p + K1
    t_ext = np.concatenate(([-np.inf], theta, [np.inf]))
    upper, lower = t_ext[1:], t_ext[:-1]  # per class: its upper and lower cut
    classes = np.arange(K1 + 1)[:, None]
    keep_c = link is None or link.name != "cauchit"
    # The shift repeated over a block's rows: one flat subtraction per block (twice as fast
    # as broadcasting along rows of p numbers)
    tiled = np.tile(shift, block) if shift is not None and np.shape(shift) == (p,) and \
        X.flags.c_contiguous else None

    def body(a: int, b: int) -> list:
        total = 0.0
        grad = np.zeros(d) if order >= 1 else None
        hess = np.zeros((d, d)) if order >= 2 else None
        mt = np.zeros((d, d)) if meat else None
        m = max(min(block, b - a), 0)
        Xc = np.empty((m, p)) if shift is not None else None
        Z = np.empty((m, p))
        S = np.empty((1 + K1, m))  # rows: the slopes' gradient term, the cross terms
        for start in range(a, b, block):
            stop = min(start + block, b)
            nb = stop - start
            Xb = X[start:stop]
            if tiled is not None:
                Xb = np.subtract(Xb.reshape(-1), tiled[:nb * p], out=Xc[:nb].reshape(-1))
                Xb = Xb.reshape(nb, p)
            elif shift is not None:
                Xb = np.subtract(Xb, shift, out=Xc[:nb])
            yb = y[start:stop]
            wb = None if w is None else w[start:stop]
            eta = Xb @ beta
            logpi, g1, g0, r1, r0 = cut_parts_at(upper[yb] - eta, lower[yb] - eta, link)
            total -= float(logpi.sum() if wb is None else wb @ logpi)
            if order == 0 and not meat:
                continue
            # One row of H per class: the rows' sums by class are thin products with H, and
            # threshold k is the upper cut of class k and the lower cut of class k + 1.
            H = np.equal(yb, classes) * (1.0 if wb is None else wb)
            # d log pi / d eta = g0 - g1; d / d theta_y = g1; d / d theta_{y-1} = -g0
            deta = g0 - g1
            if meat:
                St = np.equal(yb, classes[:K1]) * g1 - np.equal(yb, classes[1:]) * g0
                wdeta = deta if wb is None else wb * deta
                sq = np.abs(deta) if wb is None else np.sqrt(wb) * np.abs(deta)
                Zb = np.einsum("ij,i->ij", Xb, sq, out=Z[:nb])
                mt[:p, :p] += Zb.T @ Zb
                mt[:p, p:] += ((St * wdeta) @ Xb).T
                mt[p:, p:] += (St if wb is None else St * wb) @ St.T
            if order >= 1:
                by_cls = H @ np.stack([g1, g0]).T  # (K, 2): sums of w g1 and w g0 by class
                grad[p:] += by_cls[1:, 1] - by_cls[:K1, 0]
                if wb is None:
                    S[0, :nb] = deta
                else:
                    np.multiply(wb, deta, out=S[0, :nb])
            rows = 1
            if order >= 2:
                # Second derivatives of log pi in the cuts (a1, a0) = (theta_y, theta_{y-1}) - eta
                h11, h00, h10 = second_derivatives(g1, g0, r1, r0)
                # -d2 log pi / d eta2 >= 0 by log-concavity (clipped against rounding; the
                # cauchit is not log-concave, and its curvature is kept as it is)
                c_eta = -(h11 + 2.0 * h10 + h00)
                if keep_c:
                    np.maximum(c_eta, 0.0, out=c_eta)
                if wb is not None:
                    c_eta *= wb
                # -d2 log pi / (d eta d theta_y) = h11 + h10; for theta_{y-1}: h10 + h00
                C = S[1:, :nb]
                np.multiply(H[:K1], h11 + h10, out=C)
                C += H[1:] * (h10 + h00)
                rows = 1 + K1
                by_cls = H @ np.stack([h11, h00, h10]).T  # (K, 3): sums of w h.. by class
                idx = np.arange(K1)
                hess[p + idx, p + idx] -= by_cls[:K1, 0] + by_cls[1:, 1]
                off = by_cls[1:-1, 2]  # rows with both cuts: the pair (y - 1, y)
                hess[p + idx[:-1], p + idx[:-1] + 1] -= off
                hess[p + idx[:-1] + 1, p + idx[:-1]] -= off
            if order >= 1:  # the thin product while the block is in cache, then the Gram
                G = S[:rows, :nb] @ Xb
                grad[:p] -= G[0]
                if order >= 2:
                    hess[:p, p:] += G[1:].T
            if order >= 2:
                if np.all(c_eta >= 0):
                    Zb = np.einsum("ij,i->ij", Xb, np.sqrt(c_eta, out=c_eta), out=Z[:nb])
                    hess[:p, :p] += Zb.T @ Zb
                else:
                    hess[:p, :p] += Xb.T @ (Xb * c_eta[:, None])
        return [total, grad, hess, mt]

    total, grad, hess, mt = chunk_sums(body, n, block)
    if hess is not None:
        hess[p:, :p] = hess[:p, p:].T
    if mt is not None:
        mt[p:, :p] = mt[:p, p:].T
    return Pass(total, grad, hess, mt)


@dataclass(frozen=True)
class RowTerms:
    """Per-row derivatives of the exact loss ``l_i = -log pi_i`` in ``(eta_i, theta)``.

    ``loss``, ``s = dl/deta`` and ``c = d2l/deta2 >= 0`` are ``(n,)``; ``grad_theta``
    (``dl/dtheta``) and ``cross`` (``d2l/(deta dtheta)``) are ``(n, K-1)``. A model whose
    linear predictor is ``eta = D @ params`` (slopes, random effects) gets its gradient and
    Hessian from these by the chain rule; :meth:`theta_hessian` sums ``d2l/dtheta2``.
    """

    loss: np.ndarray
    s: np.ndarray
    c: np.ndarray
    grad_theta: np.ndarray
    cross: np.ndarray
    _h: tuple

    def theta_hessian(self, w: np.ndarray | None = None) -> np.ndarray:
        """``sum_i w_i d2l_i / dtheta2``: ``(K-1, K-1)``, tridiagonal."""
        up, lo, h11, h00, h10 = self._h
        if w is not None:
            h11, h00, h10 = h11 * w, h00 * w, h10 * w
        K1 = up.shape[1]
        H = np.diag(-(h11 @ up) - (h00 @ lo))
        off = -(h10 @ lo)[:-1]  # rows with both cuts: the pair (y - 1, y)
        idx = np.arange(K1 - 1)
        H[idx, idx + 1] += off
        H[idx + 1, idx] += off
        return H


def exact_row_terms(eta: np.ndarray, y: np.ndarray, theta: np.ndarray,
                    link=None) -> RowTerms:
    """The exact likelihood's per-row loss and derivatives at linear predictors ``eta``.

    The same formulas as :func:`exact_pass`, kept per row for models whose linear predictor is
    not ``X @ beta`` alone (the random effects of
    :class:`fedgrain.estimators.mixed.MixedOrdinalRegression`) and for per-row scores.
    Requires increasing ``theta``.
    """
    logpi, g1, g0, r1, r0 = _cut_parts_link(eta, y, theta, link)
    levels = np.arange(theta.shape[0])
    up = (y[:, None] == levels[None, :]).astype(float)
    lo = (y[:, None] == levels[None, :] + 1).astype(float)
    h11, h00, h10 = second_derivatives(g1, g0, r1, r0)
    c = -(h11 + 2.0 * h10 + h00)
    if link is None or link.name != "cauchit":
        c = np.maximum(c, 0.0)
    grad_theta = lo * g0[:, None] - up * g1[:, None]
    cross = up * (h11 + h10)[:, None] + lo * (h10 + h00)[:, None]
    return RowTerms(-logpi, g1 - g0, c, grad_theta, cross, (up, lo, h11, h00, h10))


def cumulative_proba(eta: np.ndarray, theta: np.ndarray, link=None) -> np.ndarray:
    """``P(Y <= k | x)`` for ``k = 0 .. K-2``: shape ``(n, K-1)``, accurate in both tails.

    ``theta`` is ``(K-1,)``, or ``(n, K-1)`` for thresholds that differ by row; ``link`` a
    :class:`fedgrain.core.links.Link` (the logit when None).
    """
    a = np.atleast_2d(theta) - eta[:, None]
    return expit(a) if link is None or link.name == "logit" else link.cdf(a)


def class_proba(eta: np.ndarray, theta: np.ndarray, link=None) -> np.ndarray:
    """Class probabilities ``pi_k = F_k - F_{k-1}``: shape ``(n, K)``, rows sum to one.

    Each difference is computed as ``F(a) (1 - F(b)) (1 - exp(b - a))``, so probabilities far in
    the tails keep their relative precision instead of cancelling to zero. ``theta`` must be
    non-decreasing: ``(K-1,)``, or ``(n, K-1)`` for thresholds that differ by row.
    """
    if link is not None and link.name != "logit":
        return _class_proba_link(eta, theta, link)
    a = np.atleast_2d(theta) - eta[:, None]  # (n, K-1)
    n = eta.shape[0]
    out = np.empty((n, a.shape[1] + 1))
    out[:, 0] = expit(a[:, 0])
    out[:, -1] = expit(-a[:, -1])
    if a.shape[1] > 1:
        hi, lo = a[:, 1:], a[:, :-1]
        out[:, 1:-1] = expit(hi) * expit(-lo) * -np.expm1(np.minimum(lo - hi, 0.0))
    return out


def _class_proba_link(eta: np.ndarray, theta: np.ndarray, link) -> np.ndarray:
    """:func:`class_proba` for another link: each class's probability from the cuts around
    it, by the lower tails below zero and the upper tails above (no cancellation)."""
    a = np.atleast_2d(theta) - eta[:, None]
    n = eta.shape[0]
    lo = np.concatenate([np.full((n, 1), -np.inf), a], axis=1)
    hi = np.concatenate([a, np.full((n, 1), np.inf)], axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        lower = (lo + hi) <= 0
        lower = np.where(np.isneginf(lo), True, np.where(np.isposinf(hi), False, lower))
        out = np.where(lower, link.cdf(hi) - link.cdf(lo), link.sf(lo) - link.sf(hi))
    return np.clip(out, 0.0, 1.0)


#: Probabilities are floored here before their logarithm: a true class predicted with
#: probability 0 (to rounding) costs ``-log(1e-15) = 34.5``, not infinity.
PROBA_FLOOR = 1e-15


def row_log_loss(proba: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each row's negative log probability of its true class: shape ``(n,)``.

    ``proba`` is ``(n, K)`` class probabilities, ``codes`` the true class codes ``0 .. K-1``;
    probabilities are clipped to ``[PROBA_FLOOR, 1]`` first, so every loss is finite. The mean
    is the log-loss of :func:`fedgrain.metrics.ordinal_scores`.

    Examples
    --------
    >>> import numpy as np
    >>> row_log_loss(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([1, 0])).round(2)
    array([ 0.69, 34.54])
    """
    codes = np.asarray(codes)
    p_true = proba[np.arange(codes.shape[0]), codes]
    return -np.log(np.clip(p_true, PROBA_FLOOR, 1.0))


def monotonise(theta: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Increasing thresholds by weighted isotonic regression, weights ``1 / Var(theta_k)``.

    Ordered input is returned unchanged.
    """
    if np.all(np.diff(theta) > 0):
        return theta
    w = 1.0 / np.where(var > 0, var, np.inf)
    w = np.where(np.isfinite(w) & (w > 0), w, 1.0)
    return isotonic_regression(theta, sample_weight=w, increasing=True)
