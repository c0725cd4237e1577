"""The meta-learner's strategies: what a round asks of the leaves and how it aggregates them.

In the spirit of Flower's server strategies, the loop in :mod:`fedgrain.federation.meta` is one
template and a :class:`Strategy` fills in its few choices: where the pull starts, whether it is
learned from validation loss, whether the leaves send the validation gradient and Hessian, how
the global parameters move (a pure function of the leaves' answers) and whether the final model
is the global one. Strategies are looked up by name in :data:`STRATEGIES`; adding one is an
update function and a :func:`register` call, with no change to the loop (see
``docs/method.md``, "Federated meta-learning", for the five built in).

Examples
--------
>>> from fedgrain.federation.strategies import STRATEGIES, get_strategy
>>> tuple(STRATEGIES)
('fomaml', 'reptile', 'fedavg', 'fedprox', 'ditto')
>>> s = get_strategy("fedprox")
>>> s.learns_pull, s.global_model, s.start_pull(250.0, 40.0)
(False, True, 40.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.linalg import solve_psd
from ..exceptions import ParameterError

#: The smallest pull, in pseudo-rows: adaptation never goes below it, and FedAvg adapts at it.
RHO_MIN = 1.0


@dataclass(frozen=True)
class Adapted:
    """What a leaf sends back in a round: about ``d + 2 d^2`` numbers."""

    val_loss: np.ndarray  # summed selection rows' log-loss, one per pull scored
    n_val: float
    n_train: float
    params: np.ndarray  # adapted at the round's pull
    train_hess: np.ndarray  # the training part's Hessian there (its information)
    grad: np.ndarray | None  # FO-MAML: gradient of the query rows' composite loss there
    hess: np.ndarray | None  # FO-MAML: its Hessian there


#: ``update(theta, answers, n_train)``: the next global parameters from the leaves' answers.
Update = Callable[[np.ndarray, Sequence[Adapted], np.ndarray], np.ndarray]
#: ``start_pull(empirical, fixed)``: the first round's pull from the empirical-Bayes pull and
#: the fixed (FedProx) pull.
StartPull = Callable[[float, float], float]


@dataclass(frozen=True)
class Strategy:
    """One meta-learning strategy: the choices the loop leaves open.

    Parameters
    ----------
    name : str
        The name the estimators' ``meta`` parameter takes.
    update : callable
        ``update(theta, answers, n_train) -> theta``: the next global parameters from the
        current ones, the answering leaves' :class:`Adapted` records and their training rows
        (an array, in the order of ``answers``). Pure: it must not change its arguments.
    learns_pull : bool
        True: every round scores multiples of the pull and the next round uses the best.
        False: the pull stays where it started and only it (and no adaptation) is scored.
    start_pull : callable
        ``start_pull(empirical, fixed) -> float``: the first round's pull (pseudo-rows) from
        the empirical-Bayes pull and the fixed (FedProx) pull.
    meta_gradient : bool
        Whether leaves must send the validation gradient and Hessian at the adapted
        parameters (``Adapted.grad`` and ``Adapted.hess``; None otherwise).
    global_model : bool
        Whether the strategy's model is the global one (the final pull is infinite: leaves do
        not adapt).
    start : {"pooled", "uninformed"}
        Where the global parameters start: the pooled model, or the model without features
        (no slopes, thresholds from the class counts), as the federated baselines do.
    metric : {"spread", "information", "euclidean"}
        The metric of the pull: the empirical-Bayes prior of the leaves' spread, the global
        information per row, or plain Euclidean distance (scaled to the information's mean
        diagonal, so the pull still counts pseudo-rows).
    global_step : bool
        Whether the leaves send, for the update, their local step at the smallest pull
        (FedAvg's) instead of their adaptation at the learned pull (Ditto: the global model is
        FedAvg's while the personalised models use the learned pull).
    """

    name: str
    update: Update
    learns_pull: bool
    start_pull: StartPull
    meta_gradient: bool = False
    global_model: bool = False
    start: str = "pooled"
    metric: str = "spread"
    global_step: bool = False


def _ridge(H: np.ndarray) -> float:
    """The tiny ridge that keeps a sum of Hessians invertible, per diagonal element."""
    return 1e-8 * np.trace(H) / H.shape[0]


def fomaml_update(theta: np.ndarray, answers: Sequence[Adapted],
                  n_train: np.ndarray) -> np.ndarray:
    """First-order MAML: the summed validation gradient, preconditioned by all information.

    ``theta - (sum_m (H_val,m + H_train,m))^-1 sum_m g_val,m``: a damped step, not a jump to
    the validation rows' own optimum. ``n_train`` is not used.
    """
    d = theta.shape[0]
    g = sum(a.grad for a in answers)
    H = sum(a.hess + a.train_hess for a in answers)
    return theta - solve_psd(H + _ridge(H) * np.eye(d), g)


def reptile_update(theta: np.ndarray, answers: Sequence[Adapted],
                   n_train: np.ndarray) -> np.ndarray:
    """Reptile: the adapted parameters' information-weighted mean ``(sum H_m)^-1 sum H_m g_m``.

    The ridge pulls toward ``theta`` where the leaves carry no information. ``n_train`` is not
    used.
    """
    d = theta.shape[0]
    H = sum(a.train_hess for a in answers)
    Hs = H + _ridge(H) * np.eye(d)
    return solve_psd(Hs, sum(a.train_hess @ a.params for a in answers) + _ridge(H) * theta)


def rows_mean_update(theta: np.ndarray, answers: Sequence[Adapted],
                     n_train: np.ndarray) -> np.ndarray:
    """FedAvg, FedProx and Ditto: the local steps' mean weighted by training rows. ``theta``
    unused."""
    return sum(n * a.params for n, a in zip(n_train, answers, strict=True)) / n_train.sum()


def empirical_start(empirical: float, fixed: float) -> float:
    """Start at the empirical-Bayes pull (the learned strategies)."""
    return float(empirical)


def fixed_start(empirical: float, fixed: float) -> float:
    """Start (and stay) at the fixed pull (FedProx)."""
    return float(fixed)


def smallest_start(empirical: float, fixed: float) -> float:
    """Start (and stay) at the smallest pull, :data:`RHO_MIN` (FedAvg: almost no pull)."""
    return RHO_MIN


#: The strategies by name, in the order the estimators list them.
STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`STRATEGIES` under its name; returns it.

    Raises
    ------
    ParameterError
        If a strategy of that name is already registered.
    """
    if strategy.name in STRATEGIES:
        raise ParameterError(f"A meta-learning strategy named {strategy.name!r} is already "
                             f"registered.")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``.

    Raises
    ------
    ParameterError
        If no strategy has that name (the message lists the known ones).
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ParameterError(f"Unknown meta-learning strategy {name!r}; the known ones are "
                             f"{tuple(STRATEGIES)}.") from None


register(Strategy("fomaml", fomaml_update, learns_pull=True, start_pull=empirical_start,
                  meta_gradient=True))
register(Strategy("reptile", reptile_update, learns_pull=True, start_pull=empirical_start))
register(Strategy("fedavg", rows_mean_update, learns_pull=False, start_pull=smallest_start,
                  global_model=True, start="uninformed", metric="information"))
register(Strategy("fedprox", rows_mean_update, learns_pull=False, start_pull=fixed_start,
                  global_model=True, start="uninformed", metric="information"))
#: Ditto (Li et al. 2021): the global model is FedAvg's; each leaf's model is its own fit
#: regularised toward it by ``lambda/2 ||gamma - theta||^2``, ``lambda`` chosen on held-out rows.
register(Strategy("ditto", rows_mean_update, learns_pull=True, start_pull=empirical_start,
                  start="uninformed", metric="euclidean", global_step=True))
