"""The federated meta-learner (design.md 7): a global model that the leaves adapt from quickly.

The loop is a short template, in the spirit of Flower's strategies: broadcast the global
parameters ``theta``; on every leaf, *adapt* them to the leaf's training part and score the
adapted model on the leaf's validation part (a stratified share of its rows, fixed for all
rounds); aggregate; stop when the validation loss stops improving. Everything a round sends is
parameters (about ``d + d^2`` numbers a leaf); the rows stay where they were placed.

**Adaptation** is a few Newton steps on the leaf's composite loss plus a pull toward the global
parameters, ``L_train(gamma) + rho/2 (gamma - theta)' P (gamma - theta)``, with ``P`` the global
information per row: ``rho`` counts pseudo-rows, so a leaf with many more rows than ``rho``
moves freely and a small leaf stays near the global model (the adaptation strength of a leaf of
``n`` rows is ``n / (n + rho)``). ``rho`` is learned from validation loss: every round each leaf
also scores the adaptation at ``rho`` times (1/8, 1/2, 2, 8) and at infinity (no adaptation),
and the next round uses the best. Strategies:

- ``"fomaml"``: first-order MAML; the meta-gradient is the validation gradient at the adapted
  parameters, summed over leaves (weighted by their information) and preconditioned by the
  summed validation Hessian: ``theta -= (sum H_val)^-1 sum g_val``;
- ``"reptile"``: ``theta += sum n_m (gamma_m - theta) / sum n_m``, the adapted parameters'
  information-weighted mean;
- ``"fedavg"`` and ``"fedprox"``: baselines in the same loop; local Newton steps without a pull
  (FedAvg) or with a fixed one (FedProx), averaged; their model is the global one.

A leaf whose task fails in a round is left out of that round and the failure recorded, as
Flower's ``accept_failures``; a round where every leaf fails is an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backends import Backend
from .exceptions import SubsetError
from .ordinal import Pass, class_proba, composite_pass
from .solvers import newton, solve_psd

METHODS = ("fomaml", "reptile", "fedavg", "fedprox")
#: Multiples of the current pull scored every round (plus no adaptation at all).
RHO_STEPS = (0.125, 0.5, 1.0, 2.0, 8.0)
#: FedAvg's pull (pseudo-rows): only enough to keep unidentified directions finite.
FEDAVG_RHO = 1e-3
#: Newton steps at most for a model that is kept (the personalised leaves, ``adapt``): the
#: penalised fit to convergence, where a round's adaptation takes ``inner_steps``.
PERSONAL_STEPS = 25


@dataclass(frozen=True)
class MetaSettings:
    """How the leaves adapt; the same object goes to every leaf in every round."""

    method: str
    n_features: int
    inner_steps: int = 3
    validation_fraction: float = 0.2


@dataclass(frozen=True)
class Adapted:
    """What a leaf sends back in a round: about ``d + d^2`` numbers."""

    val_loss: np.ndarray  # summed validation log-loss, one per pull scored
    n_val: float
    n_train: float
    params: np.ndarray  # adapted at the round's pull
    grad: np.ndarray  # gradient of the validation composite loss there
    hess: np.ndarray  # its Hessian there


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


def adapt_params(X, y, w, theta, rho, P, steps: int, p: int) -> np.ndarray:
    """``steps`` Newton steps on ``L(gamma) + rho/2 (gamma - theta)' P (gamma - theta)``."""
    if not np.isfinite(rho):
        return theta.copy()
    rho = max(rho, FEDAVG_RHO)

    def oracle(x, *, loss=True, order=2, meat=None):
        P0 = composite_pass(X, y, w, x[:p], x[p:], loss=loss, order=order)
        diff = x - theta
        Pd = P @ diff
        return Pass(None if P0.loss is None else P0.loss + 0.5 * rho * diff @ Pd,
                    None if P0.grad is None else P0.grad + rho * Pd,
                    None if P0.hess is None else P0.hess + rho * P, None)

    n = float(y.shape[0] if w is None else w.sum())
    return newton(oracle, theta.copy(), n, max_iter=steps, tol=1e-9).x


def log_loss_sum(X, y, w, params, p: int) -> float:
    """Summed negative log-likelihood of the classes (thresholds ordered by running max)."""
    eta = X @ params[:p]
    proba = class_proba(eta, np.maximum.accumulate(params[p:]))
    lp = -np.log(np.clip(proba[np.arange(y.shape[0]), y], 1e-15, 1.0))
    return float(lp.sum() if w is None else w @ lp)


def adapt_task(task: dict) -> Adapted:
    """Backend entry point of a round: adapt on the training part, score on the validation."""
    from .local import one_blas_thread

    shard = task["shard"].load()
    s: MetaSettings = task["settings"]
    p = s.n_features
    with one_blas_thread():
        X, y = shard.X, shard.y
        w = np.ones(y.shape[0]) if shard.w is None else shard.w
        val = validation_mask(y, s.validation_fraction, task["seed"])
        w_tr, w_val = np.where(val, 0.0, w), np.where(val, w, 0.0)
        theta, P = task["theta"], task["P"]
        losses = []
        adapted = None
        for rho in task["grid"]:
            g = adapt_params(X, y, w_tr, theta, rho, P, s.inner_steps, p)
            losses.append(log_loss_sum(X, y, w_val, g, p))
            if rho == task["rho"]:
                adapted = g
        if adapted is None:
            adapted = adapt_params(X, y, w_tr, theta, task["rho"], P, s.inner_steps, p)
        V = composite_pass(X, y, w_val, adapted[:p], adapted[p:], loss=False, order=2)
        return Adapted(np.array(losses), float(w_val.sum()), float(w_tr.sum()), adapted,
                       V.grad, V.hess)


def personalise_task(task: dict) -> np.ndarray:
    """Backend entry point of the last step: adapt on all of the leaf's rows, to convergence."""
    from .local import one_blas_thread

    shard = task["shard"].load()
    s: MetaSettings = task["settings"]
    with one_blas_thread():
        return adapt_params(shard.X, shard.y, shard.w, task["theta"], task["rho"], task["P"],
                            PERSONAL_STEPS, s.n_features)


def run(backend: Backend, refs, bundles, settings: MetaSettings, theta0: np.ndarray,
        P: np.ndarray, seeds: list[int], leaf_ids: list[int], *, rho0: float,
        max_rounds: int, tol: float, fedprox_rho: float, work: float) -> MetaResult:
    """The meta-learning loop over placed leaves (see the module docstring)."""
    method = settings.method
    d = theta0.shape[0]
    theta, rho = theta0.copy(), float(rho0)
    if method == "fedavg":
        rho = FEDAVG_RHO
    elif method == "fedprox":
        rho = float(fedprox_rho)
    out = MetaResult(theta0.copy(), np.inf)
    best = np.inf
    for r in range(1, max_rounds + 1):
        t0 = time.perf_counter()
        learned = method in ("fomaml", "reptile")
        grid = [rho * m for m in RHO_STEPS] if learned else [rho]
        grid = grid + [np.inf]
        tasks = [{"shard": ref, "settings": settings, "seed": s, "theta": theta, "P": P,
                  "rho": rho, "grid": grid} for ref, s in zip(refs, seeds, strict=True)]
        outcomes = backend.map_bundles(adapt_task, tasks, bundles, work=work)
        ok = [o for o in outcomes if o.ok]
        for o in outcomes:
            if not o.ok:
                out.events.append({"round": r, "leaf": int(leaf_ids[o.index]),
                                   "kind": "leaf failed", "error": f"{o.error_type}: {o.error}"})
        if not ok:
            first = outcomes[0]
            raise SubsetError(f"Every leaf failed in meta round {r}: {first.error_type}: "
                              f"{first.error}", first.traceback)
        n_val = sum(o.value.n_val for o in ok)
        losses = sum(o.value.val_loss for o in ok) / n_val
        # what would be deployed this round: the personalised models (learned pull) or the
        # global one (FedAvg, FedProx)
        pick = int(np.argmin(losses)) if learned else len(grid) - 1
        round_loss = float(losses[pick])
        sent = 8 * (d + len(grid) + d * d)  # theta, the pulls, P; then back per leaf:
        back = 8 * (len(grid) + 2 + 2 * d + d * d)
        out.history.append({
            "round": r, "val_loss": round_loss, "no_adaptation_loss": float(losses[-1]),
            "rho": float(grid[pick]) if np.isfinite(grid[pick]) else None,
            "leaf_val_loss": {str(leaf_ids[o.index]): float(o.value.val_loss[pick] /
                                                            max(o.value.n_val, 1e-300))
                              for o in ok},
            "strength": {str(leaf_ids[o.index]): float(o.value.n_train / (o.value.n_train +
                                                                          grid[pick]))
                         for o in ok},
            "leaves_failed": [int(leaf_ids[o.index]) for o in outcomes if not o.ok],
            "bytes": int(len(outcomes) * sent + len(ok) * back),
            "seconds": 0.0,
        })
        improved = not np.isfinite(best) or round_loss < best - tol * abs(best)
        if improved:
            best = round_loss
            out.theta, out.rho = theta.copy(), float(grid[pick])
        # the next round's parameters
        n_tr = np.array([o.value.n_train for o in ok])
        if method == "fomaml":
            g = sum(o.value.grad for o in ok)
            H = sum(o.value.hess for o in ok)
            theta = theta - solve_psd(H + 1e-8 * np.trace(H) / d * np.eye(d), g)
        else:  # Reptile and the baselines: the information-weighted mean of the adapted
            theta = sum(n * o.value.params for n, o in zip(n_tr, ok, strict=True)) / n_tr.sum()
        if learned and np.isfinite(grid[pick]):
            rho = float(grid[pick])
        out.history[-1]["seconds"] = time.perf_counter() - t0
        if not improved:
            break
    if method in ("fedavg", "fedprox"):
        out.rho = np.inf  # their model is the global one
    return out


def personalise(backend: Backend, refs, bundles, settings: MetaSettings, result: MetaResult,
                P: np.ndarray, work: float) -> list:
    """Each leaf's model adapted from the learned global parameters on all of its rows."""
    tasks = [{"shard": ref, "settings": settings, "theta": result.theta, "rho": result.rho,
              "P": P} for ref in refs]
    return backend.map_bundles(personalise_task, tasks, bundles, work=work)
