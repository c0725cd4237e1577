"""Personalised leaf models from the federated meta-learner (docs/method.md 5).

:func:`meta_rounds` runs the meta-learner (:mod:`fedgrain.federation.meta`) over the placed
leaves and personalises every leaf from the learned global parameters; :class:`MetaState` is
what it learns (the global parameters, the pull, the pull's metric) and what a fitted
model keeps; :func:`adapt_rows` personalises to new labelled rows and :func:`fit_leaf_rows` fits
a leaf model on rows at hand (a streaming refit), both from that state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..backends import Backend
from ..core.likelihood import composite_pass
from ..core.linalg import solve_psd
from ..core.standardize import Standardizer
from ..exceptions import SubsetError
from ..inference import local, pooling
from . import meta
from .engine import PartitionRun
from .leaves import leaf_view
from .schedule import Schedule
from .strategies import get_strategy

#: The meta-learner's FedProx pull by default, in pseudo-rows per parameter.
DEFAULT_PULL_PER_PARAM = 10.0
#: FO-MAML and Reptile run their rounds only when Cochran's test of the leaves' fits rejects one
#: common model at this level; otherwise every leaf keeps the pooled model.
HOMOGENEITY_LEVEL = 0.05


@dataclass(frozen=True)
class MetaState:
    """What the meta-learner learned, in standardised coordinates.

    ``theta`` the global parameters every leaf adapts from (the pooled ones without a
    meta-learner), ``rho`` the learned pull in pseudo-rows (infinite: no adaptation pays),
    ``adapt_rho`` the pull ``adapt`` uses (the empirical-Bayes pull of the leaves' spread
    around the pooled model), ``P`` the metric of the pull per row: the leaves' spread (an
    empirical-Bayes prior), the global information, or Euclidean, by strategy.
    """

    theta: np.ndarray
    rho: float
    adapt_rho: float
    P: np.ndarray

    def to_dict(self) -> tuple[dict, dict]:
        """JSON and arrays (the keys of saved models: keep them)."""
        meta_ = {"meta_rho": None if not np.isfinite(self.rho) else float(self.rho),
                 "adapt_rho": float(self.adapt_rho)}
        return meta_, {"meta_theta": self.theta, "meta_P": self.P}

    @classmethod
    def from_dict(cls, meta_: dict, arrays: dict) -> MetaState:
        rho = np.inf if meta_["meta_rho"] is None else float(meta_["meta_rho"])
        return cls(arrays["meta_theta"], rho, float(meta_["adapt_rho"]), arrays["meta_P"])


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learning settings of an adaptive estimator (see its parameters)."""

    method: str
    max_rounds: int = 20
    tol: float = 1e-3
    inner_steps: int = 3
    validation_fraction: float = 0.2
    fedprox_mu: float | None = None

    @property
    def learns(self) -> bool:
        """Whether there is a meta-learner at all (``method`` other than "none")."""
        return self.method != "none"


@dataclass
class MetaOutcome:
    """:func:`meta_rounds`' result: the learned state, each leaf's personalised ``(params,
    cov)`` in standardised coordinates (None: each leaf keeps its local fit), and the rounds'
    record."""

    state: MetaState
    personal: list | None
    history: list = field(default_factory=list)
    events: list = field(default_factory=list)


def meta_rounds(backend: Backend, refs, sched: Schedule, run: PartitionRun,
                region_of: np.ndarray, leaf_ids: list[int], p: int, n_rows: float,
                seeds: list[int], config: MetaConfig,
                class_counts: np.ndarray | None = None) -> MetaOutcome:
    """Run the meta-learner over the placed leaves (``n_rows`` rows in all) and personalise
    every leaf.

    ``seeds`` are the leaves' validation-split seeds. Without a meta-learner the state is the
    pooled model with the empirical pull and each leaf keeps its own fit. FO-MAML and Reptile
    start from the pooled model (and run no rounds when Cochran's test finds no difference
    between the leaves); the federated baselines (FedAvg, FedProx, Ditto) from the model
    without features (``class_counts``: the rows of each class over all leaves, the
    only numbers they share before their rounds), as McMahan et al.'s and Li et al.'s do from
    an uninformed start, so that their rounds, not the pooling, make their model.
    """
    d = run.estimate.shape[0]
    info = run.pooled.information / n_rows
    views = [leaf_view(f, run.estimate, run.cov, p) for f in run.fits]
    fits, covs, filled = [v[0] for v in views], [v[1] for v in views], [v[2] for v in views]
    # the empirical-Bayes pull, and (for the strategies that learn a pull, and adapt()) its
    # metric shaped by the leaves' spread: at that pull, the prior N(theta, Sigma)
    pull0 = meta.empirical_pull(fits, covs, run.estimate, info)
    strategy = get_strategy(config.method) if config.learns else None
    metric = strategy.metric if strategy is not None else "spread"
    P = {"spread": lambda: meta.between_metric(fits, covs, run.estimate, info, pull0),
         "information": lambda: info,
         "euclidean": lambda: np.eye(d) * np.trace(info) / d}[metric]()
    if not config.learns:
        return MetaOutcome(MetaState(run.estimate, np.inf, pull0, P), None)
    L = len(leaf_ids)
    if np.unique(region_of).shape[0] == 1:
        # one region (maybe dealt out into identical pieces): nothing to learn across
        # leaves; every leaf keeps the pooled (refined) model
        return MetaOutcome(MetaState(run.estimate, np.inf, meta.RHO_MAX, P),
                           [(run.estimate, run.cov)] * L)
    if strategy.learns_pull and strategy.start == "pooled":
        # the leaves' own fits show no difference beyond their noise: nothing to personalise
        pvalue = meta.homogeneity_pvalue(fits, covs, run.estimate, filled)
        if pvalue > HOMOGENEITY_LEVEL:
            out = MetaOutcome(MetaState(run.estimate, np.inf, meta.RHO_MAX, P),
                              [(run.estimate, run.cov)] * L)
            out.events.append({
                "round": 0, "leaf": -1, "kind": "no meta-learning rounds",
                "error": f"the leaves' fits do not differ beyond their noise (Cochran's Q, "
                         f"p = {pvalue:.3g} > {HOMOGENEITY_LEVEL}): every leaf uses the pooled "
                         "model"})
            return out
    K = d - p + 1
    settings = meta.MetaSettings(config.method, p, K, int(config.inner_steps),
                                 float(config.validation_fraction))
    work = n_rows * d * d * config.inner_steps * (len(meta.RHO_STEPS) + 2)
    mu = DEFAULT_PULL_PER_PARAM * d if config.fedprox_mu is None else float(config.fedprox_mu)
    start = run.estimate
    if strategy.start == "uninformed" and class_counts is not None:
        start = intercept_only(class_counts, p)
    res = meta.run(backend, refs, sched.bundles(), settings, start, P, seeds, leaf_ids,
                   rho0=pull0,
                   max_rounds=int(config.max_rounds), tol=float(config.tol),
                   fedprox_rho=mu, work=work)
    state = MetaState(res.theta, res.rho, pull0, P)
    out = MetaOutcome(state, None, res.history, res.events)
    if not np.isfinite(res.rho):  # no adaptation pays: every leaf uses the global model
        out.personal = [(res.theta, run.cov)] * L
        return out
    outcomes = meta.personalise(backend, refs, sched.bundles(), settings, res, P, run.cov, work)
    if not any(o.ok for o in outcomes):
        o = outcomes[0]
        raise SubsetError(f"Personalising every leaf failed: {o.error_type}: {o.error}",
                          o.traceback)
    got = {}
    for o in outcomes:
        if o.ok:
            got[o.index] = o.value
        else:
            out.events.append({"round": len(res.history) + 1, "leaf": int(leaf_ids[o.index]),
                               "kind": "personalisation failed; the leaf uses the global model",
                               "error": f"{o.error_type}: {o.error}"})
    out.personal = [_region_model(got, np.flatnonzero(region_of == region_of[pos]), res.theta,
                                  run.cov) for pos in range(L)]
    return out


def intercept_only(class_counts: np.ndarray, p: int) -> np.ndarray:
    """The model without features (standardised coordinates): no slopes, and thresholds at the
    logits of the cumulative class shares (a class without rows gets a small share)."""
    shares = np.maximum(np.asarray(class_counts, dtype=float), 0.5)
    cum = np.cumsum(shares / shares.sum())[:-1]
    return np.concatenate([np.zeros(p), np.log(cum / (1.0 - cum))])


def _region_model(got: dict, pieces: np.ndarray, theta: np.ndarray, cov: np.ndarray):
    """A region's personalised model: its pieces' personalised fits pooled by information
    (exact for the information-weighted mean of the pieces); the global model if none came."""
    members = [i for i in pieces if i in got]
    if not members:
        return theta, cov
    if len(members) == 1:
        return got[members[0]][:2]
    return pooling.information_mean([got[i][0] for i in members], [got[i][1] for i in members],
                                    [got[i][2] for i in members])


def adapt_rows(Xs: np.ndarray, codes: np.ndarray, w: np.ndarray | None, state: MetaState,
               V_global: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Personalise to standardised labelled rows: Newton steps to convergence from ``theta``
    pulled toward it with ``adapt_rho``. Returns the estimate and its covariance: the rows'
    sandwich plus the global model's uncertainty (``V_global``) carried by the pull; the
    global covariance for what the rows do not identify."""
    p = Xs.shape[1]
    rho = state.adapt_rho
    with local.one_blas_thread():
        free = meta.free_coordinates(Xs, codes, w, n_classes)
        est, H = meta.adapt_params(Xs, codes, w, state.theta, rho, state.P,
                                   meta.PERSONAL_STEPS, p, free)
        J = composite_pass(Xs, codes, w, est[:p], est[p:], loss=False, order=0,
                           meat="cluster").meat
    idx = np.flatnonzero(free)
    prior = rho * state.P[np.ix_(idx, idx)]
    A = solve_psd(H[np.ix_(idx, idx)] + prior, np.eye(idx.size))
    cov = V_global.copy()
    cov[np.ix_(idx, ~free)] = 0.0
    cov[np.ix_(~free, idx)] = 0.0
    cov[np.ix_(idx, idx)] = A @ (J[np.ix_(idx, idx)] + prior @ V_global[np.ix_(idx, idx)] @
                                 prior) @ A.T
    return est, 0.5 * (cov + cov.T)


def fit_leaf_rows(X: np.ndarray, codes: np.ndarray, std: Standardizer,
                  settings: local.LocalSettings, state: MetaState, V_global: np.ndarray,
                  method: str, names: list[str], seed: int):
    """A leaf model fitted on these rows: raw parameters, covariance, filled-in names.

    With a learned pull (a strategy that learns it, and a finite ``state.rho``) the leaf
    is personalised from the meta-learned model with that pull, as at fit time; otherwise it is
    the leaf's own fit, with what it does not identify filled in from ``state.theta`` and
    ``V_global`` (the global covariance, standardised).
    """
    p = std.mean.shape[0]
    Xs = np.ascontiguousarray(std.transform(X))
    if learns_pull(method) and np.isfinite(state.rho):
        task = {"settings": meta.MetaSettings(method, p, settings.n_classes),
                "theta": state.theta, "rho": state.rho, "P": state.P, "V_global": V_global}
        est, cov, _ = meta.personalise_rows(Xs, codes, None, task)
        params, cov = std.to_raw_model(est, cov)
        return params, 0.5 * (cov + cov.T), []
    with local.one_blas_thread():
        fit = local.fit_local(Xs, codes, None, settings, seed=seed)
    est, cov, filled = leaf_view(fit, state.theta, V_global, p)
    params, cov = std.to_raw_model(est, cov)
    return params, 0.5 * (cov + cov.T), [names[j] for j in filled]


def learns_pull(method: str) -> bool:
    """Whether the meta-learning ``method`` ("none" for none) learns a pull toward its global
    model (FO-MAML, Reptile, Ditto), so that leaves are personalised with it."""
    return method != "none" and get_strategy(method).learns_pull


def with_theta(state: MetaState, theta: np.ndarray, rho: float) -> MetaState:
    """The state after more meta rounds (a stream's): new global parameters and pull."""
    return replace(state, theta=theta, rho=rho)
