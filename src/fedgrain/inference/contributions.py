"""Each subset's part of the composite likelihood, kept so the global model can be pooled again.

The global model of an adaptive partition is the composite fit on all rows (docs/method.md,
"Non-random partitions"). Its refinement rounds end with every subset's score ``s_m``,
Hessian ``H_m`` and meat ``J_m`` at the last point ``a``: around ``a`` the subset's part of the
log-likelihood is the quadratic with gradient ``s_m - H_m (x - a)``, so the global estimate is
``(sum H_m)^-1 sum (H_m a + s_m)`` and its covariance the sandwich
``(sum H)^-1 (sum J) (sum H)^-1`` - what the last round computed. Storing the *target*
``b_m = H_m a + s_m`` with ``H_m`` and ``J_m`` lets a stream replace one subset (a leaf refitted
on new rows, split or merged: its new rows evaluated at the current global point) and pool the
global model again from the current subsets alone, the old rows being gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.linalg import inverse
from ..core.linalg import precision as cov_precision
from .local import Evaluation, LocalFit


@dataclass(frozen=True)
class Contribution:
    """One subset's quadratic part of the composite log-likelihood (standardised
    coordinates): ``target = H a + s(a)``, ``hess = H`` and ``meat = J``."""

    target: np.ndarray
    hess: np.ndarray
    meat: np.ndarray

    @classmethod
    def at(cls, point: np.ndarray, ev: Evaluation) -> Contribution:
        """From a subset's score, Hessian and meat evaluated at ``point`` (a model-based
        variance sends no meat: the Hessian stands in)."""
        meat = ev.hess if ev.meat is None else ev.meat
        return cls(ev.hess @ point + ev.score, ev.hess, meat)

    @classmethod
    def of_fit(cls, fit: LocalFit) -> Contribution:
        """From a subset's de-biased fit alone (no refinement round): its precision as the
        information, so that pooling gives the one-shot inverse-variance pool."""
        A = fit.design
        om = cov_precision(fit.cov)[0]
        info = A.T @ om @ A
        return cls(A.T @ (om @ fit.estimate), info, info)

    @classmethod
    def of_model(cls, params: np.ndarray, cov: np.ndarray) -> Contribution:
        """From a model's estimate and covariance (standardised): its precision as the
        information (for models saved before contributions were kept)."""
        om = cov_precision(cov)[0]
        return cls(om @ params, om, om)

    def __add__(self, other: Contribution) -> Contribution:
        return Contribution(self.target + other.target, self.hess + other.hess,
                            self.meat + other.meat)


def combine(parts: Sequence[Contribution], variance: str) -> tuple[np.ndarray, np.ndarray]:
    """The pooled estimate ``(sum H)^-1 sum b`` and its covariance: the sandwich
    ``(sum H)^-1 (sum J) (sum H)^-1``, or ``(sum H)^-1`` for ``variance="model"``."""
    total = parts[0]
    for c in parts[1:]:
        total = total + c
    Hinv = inverse(total.hess)
    est = Hinv @ total.target
    cov = Hinv if variance == "model" else Hinv @ total.meat @ Hinv
    return est, 0.5 * (cov + cov.T)


def repool(parts: Sequence[Contribution], fresh: dict, start: np.ndarray, variance: str, *,
           tol: float, max_steps: int) -> tuple[np.ndarray, np.ndarray, list[Contribution]]:
    """Pool again after some subsets got new rows: ``fresh`` maps their positions in
    ``parts`` to a function giving the new rows' :class:`~.local.Evaluation` at a point.

    The other parts are their quadratics; the new rows are evaluated again at every point:
    Newton steps from ``start`` on the sum, each halved while it raises the loss (the new rows
    may pull the model far from where the quadratics were taken), until a step moves no
    parameter more than ``tol`` standard errors. Returns ``(estimate, cov, parts)`` with the
    new rows' parts at the last point, so that :func:`combine` of them gives the estimate.
    """
    parts = list(parts)
    fixed = [i for i in range(len(parts)) if i not in fresh]

    def at(x: np.ndarray) -> float:
        loss = sum(0.5 * x @ parts[i].hess @ x - parts[i].target @ x for i in fixed)
        for pos, evaluate in fresh.items():
            ev = evaluate(x)
            parts[pos] = Contribution.at(x, ev)
            loss += ev.loss
        return float(loss)

    x = np.asarray(start, dtype=float)
    f = at(x)
    est, cov = combine(parts, variance)
    for _ in range(max_steps):
        se = np.sqrt(np.maximum(np.diag(cov), 1e-300))
        if np.max(np.abs(est - x) / se) < tol:
            break
        step = est - x
        for _ in range(30):  # halve while the step raises the loss
            trial = x + step
            f_trial = at(trial)
            if np.isfinite(f_trial) and f_trial <= f + 1e-12 * abs(f):
                break
            step = 0.5 * step
        else:
            at(x)  # no step lowers the loss: stay
            break
        x, f = trial, f_trial
        est, cov = combine(parts, variance)
    return est, cov, parts


def stack(parts: Sequence[Contribution]) -> dict[str, np.ndarray]:
    """The contributions as three arrays (for saving)."""
    return {"target": np.array([c.target for c in parts]),
            "hess": np.array([c.hess for c in parts]),
            "meat": np.array([c.meat for c in parts])}


def unstack(arrays: dict[str, np.ndarray]) -> list[Contribution]:
    return [Contribution(t, h, m) for t, h, m in
            zip(arrays["target"], arrays["hess"], arrays["meat"], strict=True)]
