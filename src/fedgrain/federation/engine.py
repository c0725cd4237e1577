"""The engine both estimators run: fit the placed subsets, pool them, refine (docs/method.md 2-4b).

:class:`fedgrain.DivideConquerOrdinal` places random subsets and
:class:`fedgrain.AdaptiveFederatedOrdinal` the leaves of a partition tree; from there the work
is the same and lives here, with its settings passed as values:

- :func:`fit_partition`: every placed subset's de-biased L1 fit (in the bundles of a
  :class:`fedgrain.federation.schedule.Schedule`, the data staying where they were placed), the
  checks of the fits, the one-shot pooling and the refinement rounds;
- :func:`refine_groups`: the refinement loop, written once: global Newton steps from pooled
  estimates, for one group of subsets (the global model) or several (the random pieces of
  each region of an adaptive partition, :func:`region_estimates`);
- :func:`summarise`: the pooled model as a :class:`PooledFit`, on the original scale, with the
  subsets' estimates and heterogeneity: the fitted state of the divide-and-conquer estimator
  and the global model of the adaptive one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from .. import progress
from .._warnings import warn
from ..backends import Backend
from ..core.linalg import NotIdentifiedError
from ..core.standardize import Standardizer
from ..exceptions import DataError, IdentificationWarning, SeparationError, SubsetError
from ..inference import local, pooling
from ..inference.results import OrdinalResults
from .schedule import Schedule

#: Every subset needs at least this many original rows per parameter (docs/method.md 4b, 6).
MIN_ROWS_PER_PARAM = 5
#: Below this many rows per parameter in a subset, the pooled estimate keeps a bias that the
#: given number of refinement rounds does not remove (measured, docs/method.md: one round is
#: enough at 7.5 rows per parameter, not at 4.7). Two or more rounds converge to the
#: centralized fit from any subset size allowed.
ROWS_PER_PARAM_FOR_ROUNDS = {0: 40, 1: 6}
#: Default minimum leaf size of an adaptive partition, in rows per parameter (``20 d``, capped
#: at the number of rows). A leaf's own model is used for prediction, so it needs more rows than
#: the pooling alone would (``MIN_ROWS_PER_PARAM``).
MIN_LEAF_ROWS_PER_PARAM = 20


@dataclass(frozen=True)
class EngineSettings:
    """How every subset is fitted and the fits pooled.

    ``alpha`` is the penalty as the user gave it (quoted in messages and the summary);
    ``local`` carries the resolved settings each subset's fit receives.
    """

    local: local.LocalSettings
    refine_rounds: int = 1
    alpha: object = "rate"

    @property
    def variance(self) -> str:
        return self.local.variance


@dataclass(frozen=True)
class Units:
    """What the subsets are called in messages: ``subset 2 of 4``, or ``leaf 5`` by node id."""

    word: str = "subset"
    ids: Sequence[int] | None = None

    def name(self, index: int, total: int) -> str:
        return f"{index + 1} of {total}" if self.ids is None else f"{self.ids[index]}"

    def names(self, indices: Sequence[int], total: int) -> str:
        """``[1, 3] of 4`` or ``[5, 6]``."""
        if self.ids is None:
            return f"{[i + 1 for i in indices]} of {total}"
        return f"{[self.ids[i] for i in indices]}"

    def subset(self, indices: Sequence[int]) -> Units:
        """The naming of the subsets at ``indices``, by their ids."""
        ids = list(range(1, max(indices, default=0) + 2)) if self.ids is None else self.ids
        return Units(self.word, [ids[i] for i in indices])


@dataclass(frozen=True)
class PartitionRun:
    """The subsets' fits, their one-shot pooling, and the refined estimate and covariance."""

    fits: list
    pooled: pooling.Pooled
    estimate: np.ndarray
    cov: np.ndarray


def resolve_subsets(n_rows: int, d: int, n_subsets: int | None, n_workers: int,
                    refine_rounds: int, owner: str) -> int:
    """The number of subsets: ``n_subsets``, or by default ``n_workers``, fewer on small data.

    By default every subset also keeps the rows per parameter the refinement rounds need; a
    given ``n_subsets`` only needs :data:`MIN_ROWS_PER_PARAM` (too many is a clear error).
    """
    if n_rows <= d:
        raise DataError(
            f"{owner} needs more rows than parameters to estimate their "
            f"covariance: {n_rows} rows for d = {d} parameters (features plus thresholds). "
            "Use fewer features, more data, or OrdinalRegression(alpha=...) for a ridge fit."
        )
    min_rows = MIN_ROWS_PER_PARAM * d
    if n_subsets is None:
        need = max(MIN_ROWS_PER_PARAM, ROWS_PER_PARAM_FOR_ROUNDS.get(refine_rounds, 0))
        return max(1, min(n_workers, n_rows // (need * d)))
    most = n_rows // min_rows
    if n_subsets > 1 and n_subsets > most:
        fix = f"use n_subsets <= {most}" if most >= 1 else "use n_subsets=1"
        raise DataError(
            f"n_subsets={n_subsets} would give subsets of about {n_rows // n_subsets:,} rows, "
            f"fewer than {MIN_ROWS_PER_PARAM} x d = {min_rows:,} rows for d = {d} parameters; "
            f"{fix}, or fit on more data."
        )
    return n_subsets


def fit_partition(backend: Backend, refs, sched: Schedule, settings: EngineSettings,
                  seeds: list[int], *, names: list[str], sizes,
                  units: Units = Units()) -> PartitionRun:
    """Fit every placed subset, pool the fits and run the refinement rounds.

    The tasks run in the bundles of ``sched``; the data stay where ``refs`` placed them, so
    each round moves parameters only.
    """
    p = len(names) - (settings.local.n_classes - 1)
    tasks = [{"shard": r, "settings": settings.local, "seed": s}
             for r, s in zip(refs, seeds, strict=True)]
    plural = "leaves" if units.word == "leaf" else f"{units.word}s"
    with progress.step(f"fitting {plural}", len(tasks), plural, ticks=True):
        outcomes = backend.map_bundles(local.fit_task, tasks, sched.bundles(),
                                       work=_work(sizes, len(names)))
    fits = values_or_raise(outcomes, sizes, units)
    check_fits(fits, names, p, sizes, settings, units)
    pooled = pool_or_explain(pooling.pool, names, fits)
    with progress.step("refinement rounds", settings.refine_rounds, "rounds"):
        est, cov = refine_groups(backend, refs, sched, {0: np.arange(len(fits))},
                                 {0: (pooled.estimate, pooled.cov)}, settings,
                                 names=names, sizes=sizes, units=units, report=True)[0]
    return PartitionRun(fits, pooled, est, cov)


def refine_groups(backend: Backend, refs, sched: Schedule, groups: Mapping[int, np.ndarray],
                  start: Mapping[int, tuple[np.ndarray, np.ndarray]], settings: EngineSettings,
                  *, names: list[str], sizes, units: Units = Units(),
                  report: bool = False) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The refinement rounds (docs/method.md 4b), for each group of subsets on its own.

    Every round, each subset of a group evaluates its score, Hessian and meat at the group's
    current estimate and the group takes the global Newton step from them. ``start`` holds
    each group's pooled estimate and covariance; returns each group's refined pair (the start
    when ``settings.refine_rounds`` is 0).
    """
    est = dict(start)
    members = np.concatenate([np.asarray(m, dtype=np.intp) for m in groups.values()])
    owner = {int(i): g for g, m in groups.items() for i in m}
    where = {int(i): t for t, i in enumerate(members)}
    bundles = [b for b in ([where[i] for i in bundle if i in where]
                           for bundle in sched.bundles()) if b]
    meat = local.meat_kind(settings.variance)
    sub_sizes = np.asarray(sizes)[members]
    whole = np.array_equal(members, np.arange(len(sizes)))
    for _ in range(settings.refine_rounds):
        tasks = [{"shard": refs[i], "params": est[owner[int(i)]][0], "meat": meat}
                 for i in members]
        outcomes = backend.map_bundles(local.evaluate_task, tasks, bundles,
                                       work=_work(sub_sizes, len(names)))
        evals = values_or_raise(outcomes, sub_sizes, units if whole else units.subset(members))
        for g, m in groups.items():
            ev = [evals[where[int(i)]] for i in m]
            est[g] = pool_or_explain(pooling.refine, names, est[g][0], ev, settings.variance)
        if report:
            progress.advance()
    return est


def region_estimates(backend: Backend, refs, sched: Schedule, run: PartitionRun,
                     region_of: np.ndarray, settings: EngineSettings, *, names: list[str],
                     sizes, units: Units) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The pooled model of every region dealt out into random pieces: ``{region: (est, cov)}``.

    With one region the pieces' model is the global one; otherwise each region's pieces are
    pooled and refined like the global model, over the region's pieces only.
    """
    regions = np.unique(region_of)
    groups = {int(r): np.flatnonzero(region_of == r) for r in regions}
    multi = {r: m for r, m in groups.items() if m.shape[0] > 1}
    if not multi:
        return {}
    if regions.shape[0] == 1:
        return {int(regions[0]): (run.estimate, run.cov)}
    start = {}
    for r, m in multi.items():
        pooled = pool_or_explain(pooling.pool, names, [run.fits[i] for i in m])
        start[r] = (pooled.estimate, pooled.cov)
    return refine_groups(backend, refs, sched, multi, start, settings, names=names, sizes=sizes,
                         units=units)


def _work(sizes, d: int) -> float:
    """Rows x d^2: what a pass over these subsets costs (the backends' parallelism cue)."""
    return float(np.sum(sizes)) * d * d


def check_fits(fits, names: list[str], p: int, sizes, settings: EngineSettings,
               units: Units = Units()) -> None:
    """Separation is an error; non-convergence and unidentified parameters are warnings."""
    M = len(fits)
    separated = {m: f.separated for m, f in enumerate(fits) if f.separated}
    if separated:
        m, idx = next(iter(separated.items()))
        fix = ("use a positive alpha (for example alpha='rate')" if settings.alpha == 0 else
               "remove or merge the separating feature(s)")
        raise SeparationError(
            f"The classes are (quasi-)separated in {units.word} {units.name(m, M)} "
            f"({int(sizes[m]):,} rows): the fit runs off to infinity along "
            f"{', '.join(names[j] for j in idx)}; {fix}."
        )
    slow = [m for m, f in enumerate(fits) if not f.converged]
    if slow:
        warn(f"The lasso fit of {units.word}(s) {units.names(slow, M)} did not converge in "
             f"max_iter={settings.local.max_iter} iterations; increase max_iter.",
             ConvergenceWarning)
    where: dict[str, list[int]] = {}
    for m, f in enumerate(fits):
        for note in f.notes:
            kind, j = note.split(":")
            label = (f"threshold '{names[p + int(j)]}' (no rows on one side)"
                     if kind == "threshold" else f"feature '{names[int(j)]}' (constant)")
            where.setdefault(label, []).append(m)
    for label, subsets in where.items():
        warn(f"{label} carries no information in {units.word}(s) {units.names(subsets, M)}; "
             "it gets zero weight there.", IdentificationWarning)


def pool_or_explain(step, names: list[str], *args):
    """Run a pooling step; parameters the data do not identify are a clear data error."""
    try:
        return step(*args)
    except NotIdentifiedError as exc:
        involved = ", ".join(f"'{names[j]}'" for j in exc.indices)
        raise DataError(
            f"The data do not identify {involved}: the columns are linearly dependent "
            "(collinear, or constant within every subset); drop one of them."
        ) from None


def values_or_raise(outcomes, sizes, units: Units = Units()) -> list:
    """The values of successful outcomes; a failed subset is an error naming it."""
    for o in outcomes:
        if not o.ok:
            where = f"{units.word} {units.name(o.index, len(outcomes))} " \
                    f"({int(sizes[o.index]):,} rows)"
            raise SubsetError(f"Fitting {where} failed: {o.error_type}: {o.error}", o.traceback)
    return [o.value for o in outcomes]


@dataclass(frozen=True)
class PooledFit:
    """A pooled model on the original scale, with what it was pooled from.

    ``results`` is the refined model (thresholds ordered), ``oneshot`` the patent's one-shot
    pooling before refinement; ``subset_*`` each subset's de-biased estimate, L1 fit (NaN where
    the subset does not resolve the parameter), penalty and iterations; ``q``, ``q_df``,
    ``q_pvalue`` and ``i2`` the joint heterogeneity of the one-shot pooling.
    """

    results: OrdinalResults
    oneshot: OrdinalResults
    subset_sizes: np.ndarray
    subset_estimates: np.ndarray
    subset_lasso_estimates: np.ndarray
    subset_alphas: np.ndarray
    n_iter: np.ndarray
    q: float
    q_df: int
    q_pvalue: float
    i2: float

    ONESHOT_TITLE = "One-shot pooled estimate (before refinement)"

    @property
    def n_subsets(self) -> int:
        return int(self.subset_sizes.shape[0])

    def with_model(self, params: np.ndarray, cov: np.ndarray, title: str) -> PooledFit:
        """The same record with another refined model (a streaming update of the leaves)."""
        r = self.results
        results = OrdinalResults(params, cov, r.feature_names, r.classes, title=title,
                                 info=dict(r.info))
        return PooledFit(results, self.oneshot, self.subset_sizes, self.subset_estimates,
                         self.subset_lasso_estimates, self.subset_alphas, self.n_iter, self.q,
                         self.q_df, self.q_pvalue, self.i2)

    # ---- persistence (the keys of saved models: keep them) ----------------------------------
    def to_state(self) -> tuple[dict, dict]:
        meta = {"n_subsets": self.n_subsets, "q": self.q, "q_df": int(self.q_df),
                "q_pvalue": None if np.isnan(self.q_pvalue) else self.q_pvalue, "i2": self.i2}
        arrays = {"subset_sizes": self.subset_sizes, "subset_estimates": self.subset_estimates,
                  "subset_lasso_estimates": self.subset_lasso_estimates,
                  "subset_alphas": self.subset_alphas, "n_iter": self.n_iter,
                  "oneshot_params": self.oneshot.params, "oneshot_cov": self.oneshot.cov}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict, results: OrdinalResults) -> PooledFit:
        oneshot = OrdinalResults(arrays["oneshot_params"], arrays["oneshot_cov"],
                                 results.feature_names, results.classes, title=cls.ONESHOT_TITLE,
                                 info=results.info, heterogeneity=results.heterogeneity)
        q_pvalue = np.nan if meta["q_pvalue"] is None else meta["q_pvalue"]
        return cls(results, oneshot, arrays["subset_sizes"], arrays["subset_estimates"],
                   arrays["subset_lasso_estimates"], arrays["subset_alphas"], arrays["n_iter"],
                   meta["q"], meta["q_df"], q_pvalue, meta["i2"])


def summarise(run: PartitionRun, std: Standardizer, sizes, settings: EngineSettings, *,
              feature_names: list[str], classes: list, title: str) -> PooledFit:
    """The pooled model of a run on the original scale, with inference and heterogeneity."""
    fits, pooled = run.fits, run.pooled
    params, cov = std.to_raw_model(run.estimate, run.cov)
    one_params, one_cov = std.to_raw_model(pooled.estimate, pooled.cov)
    raw, raw_lasso, raw_var, resolved = _subsets_on_raw_scale(fits, std)
    het = pooling.marginal_heterogeneity(raw, raw_var, resolved)
    info = _info(sizes, len(classes), pooled, fits, settings)
    results = OrdinalResults(params, cov, feature_names, classes, title=title, info=info,
                             heterogeneity=het)
    oneshot = OrdinalResults(one_params, one_cov, feature_names, classes,
                             title=PooledFit.ONESHOT_TITLE, info=info, heterogeneity=het)
    return PooledFit(results, oneshot, np.asarray(sizes),
                     np.where(resolved, raw, np.nan), np.where(resolved, raw_lasso, np.nan),
                     np.array([f.alpha for f in fits]), np.array([f.n_iter for f in fits]),
                     pooled.q, pooled.q_df, pooled.q_pvalue, pooled.i2)


def _info(subset_sizes, K: int, pooled: pooling.Pooled, fits, settings: EngineSettings) -> dict:
    n, M = int(np.sum(subset_sizes)), len(fits)
    lo, hi = int(np.min(subset_sizes)), int(np.max(subset_sizes))
    sizes = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    q = f"{pooled.q:.2f} (df {pooled.q_df}, p {pooled.q_pvalue:.3g})" if pooled.q_df > 0 \
        else "n/a (one subset)"
    alpha = settings.alpha if isinstance(settings.alpha, str) else "fixed"
    return {
        "Rows": f"{n:,}", "Classes": K, "Subsets": M, "Rows per subset": sizes,
        "Penalty": f"{alpha} (mean {np.mean([f.alpha for f in fits]):.3g})",
        "De-biasing": ", ".join(sorted({f.debias for f in fits})),
        "Variance": settings.variance, "Refinement rounds": settings.refine_rounds,
        "Heterogeneity Q": q, "I^2": f"{pooled.i2:.3f}",
    }


def _subsets_on_raw_scale(fits, std: Standardizer):
    """Each subset's estimates, lasso fits and variances on the original scale.

    A raw parameter is resolved in a subset when every standardised parameter it is made of
    is (a raw threshold involves all slopes); returns ``(est, lasso, var, resolved)``, each
    ``(M, d)``.
    """
    d = fits[0].design.shape[1]
    T = std.jacobian(d - std.mean.shape[0])
    uses = T != 0
    out = [], [], [], []
    for f in fits:
        est, las, cov, res = pooling.full_view(f)
        out[0].append(T @ est)
        out[1].append(T @ las)
        out[2].append(np.diag(T @ cov @ T.T))
        out[3].append(~(uses @ ~res))
    return tuple(np.array(a) for a in out)
