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
from dataclasses import dataclass, replace

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from .. import progress
from .._warnings import warn
from ..backends import Backend
from ..core.linalg import NotIdentifiedError
from ..core.standardize import Standardizer
from ..exceptions import DataError, IdentificationWarning, SeparationError, SubsetError
from ..inference import local, pooling
from ..inference.contributions import Contribution
from ..inference.results import OrdinalResults
from .schedule import Schedule

#: Every subset needs at least this many original rows per parameter (docs/method.md 4b, 6).
MIN_ROWS_PER_PARAM = 5
#: Below this many rows per parameter in a subset, the pooled estimate keeps a bias that the
#: given number of refinement rounds does not remove (measured, docs/method.md: one round is
#: enough at 7.5 rows per parameter, not at 4.7). Two or more rounds converge to the
#: centralized fit from any subset size allowed.
ROWS_PER_PARAM_FOR_ROUNDS = {0: 40, 1: 6}
#: Refinement rounds stop once a round moves no parameter more than this many standard errors
#: (``refine_rounds`` is then a maximum): the composite fit on all rows, converged at any
#: heterogeneity (docs/method.md, "Non-random partitions").
REFINE_TOL = 0.01
#: A refinement round after a step smaller than this (in SE) carries the meat: it is probably
#: the last one (Newton steps shrink quadratically).
MEAT_NEAR = 0.1
#: Rounds a refinement may spend halving steps that raised the loss, beyond ``refine_rounds``.
MAX_HALVINGS = 10
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
    refine_tol: float = REFINE_TOL

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
    """The subsets' fits, their one-shot pooling, the refined estimate and covariance, the
    rounds run, and each subset's part of the refined model (:mod:`..inference.contributions`:
    what the global model is pooled from again when a stream replaces subsets)."""

    fits: list
    pooled: pooling.Pooled
    estimate: np.ndarray
    cov: np.ndarray
    rounds: int = 0
    contributions: list | None = None
    converged: bool = True


@dataclass(frozen=True)
class Refined:
    """A group's refined estimate and covariance, the rounds run, and its members' last
    score, Hessian and meat (at ``point``, the estimate the last round started from)."""

    estimate: np.ndarray
    cov: np.ndarray
    rounds: int = 0
    point: np.ndarray | None = None
    evaluations: list | None = None
    loss: float = np.inf  # the composite loss at ``point``
    converged: bool = False  # the last step moved no parameter more than the tolerance
    halved: bool = False  # the estimate is a halved step not evaluated yet

    def contributions(self) -> list[Contribution] | None:
        if self.evaluations is None:
            return None
        return [Contribution.at(self.point, e) for e in self.evaluations]


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
                  seeds: list[int], *, names: list[str], sizes, units: Units = Units(),
                  rows: Sequence | None = None,
                  local_settings: Sequence | None = None) -> PartitionRun:
    """Fit every placed subset, pool the fits and run the refinement rounds.

    The tasks run in the bundles of ``sched``; the data stay where ``refs`` placed them, so
    each round moves parameters only. ``rows`` (one packed selection per subset, or None)
    restricts the subsets' own fits to some of their rows (an honest partition's estimation
    rows); the refinement rounds always use every row, so the refined model is the composite
    fit on all rows whatever the start. ``local_settings`` gives each subset its own fit
    settings (only leaves reported on their own are converged, for example).
    """
    p = len(names) - (settings.local.n_classes - 1)
    rows = [None] * len(refs) if rows is None else list(rows)
    each = [settings.local] * len(refs) if local_settings is None else list(local_settings)
    tasks = [{"shard": r, "settings": ls, "seed": s, "rows": m}
             for r, s, m, ls in zip(refs, seeds, rows, each, strict=True)]
    plural = "leaves" if units.word == "leaf" else f"{units.word}s"
    with progress.step(f"fitting {plural}", len(tasks), plural, ticks=True):
        outcomes = backend.map_bundles(local.fit_task, tasks, sched.bundles(),
                                       work=_work(sizes, len(names)))
    fits = values_or_raise(outcomes, sizes, units)
    check_fits(fits, names, p, sizes, settings, units)
    pooled = pool_or_explain(pooling.pool, names, fits)
    with progress.step("refinement rounds", settings.refine_rounds, "rounds"):
        ref = refine_groups(backend, refs, sched, {0: np.arange(len(fits))},
                            {0: (pooled.estimate, pooled.cov)}, settings,
                            names=names, sizes=sizes, units=units, report=True)[0]
    parts = ref.contributions() or [Contribution.of_fit(f) for f in fits]
    return PartitionRun(fits, pooled, ref.estimate, ref.cov, ref.rounds, parts,
                        ref.converged or settings.refine_rounds <= 1)


def refine_groups(backend: Backend, refs, sched: Schedule, groups: Mapping[int, np.ndarray],
                  start: Mapping[int, tuple[np.ndarray, np.ndarray]], settings: EngineSettings,
                  *, names: list[str], sizes, units: Units = Units(), report: bool = False,
                  rows: Sequence | None = None) -> dict[int, Refined]:
    """The refinement rounds (docs/method.md 4b), for each group of subsets on its own.

    Every round, each subset of a group evaluates its score, Hessian and meat at the group's
    current estimate and the group takes the global Newton step from them. A group stops once
    a step moves none of its parameters more than ``settings.refine_tol`` standard errors, or
    after ``settings.refine_rounds`` rounds. ``start`` holds each group's pooled estimate and
    covariance; ``rows`` optionally restricts each subset to some of its rows (packed, by
    subset index). Returns each group's :class:`Refined` (the start when no round ran).
    """
    out = {g: Refined(*start[g]) for g in groups}
    active = {g: np.asarray(m, dtype=np.intp) for g, m in groups.items()}
    kind = local.meat_kind(settings.variance)
    most = settings.refine_rounds
    steps = {g: 0 for g in groups}  # Newton steps taken (halvings not counted)
    # The meat (for the sandwich) is needed only where a group stops: before its last step
    # allowed, and after a step under MEAT_NEAR SE (the next one is then almost surely under
    # the tolerance). Other rounds take the same Newton step without it.
    near = {g: False for g in groups}
    for _ in range(most + MAX_HALVINGS if most else 0):
        if not active:
            break
        meat = {g: kind if kind is not None and (near[g] or steps[g] == most - 1) else None
                for g in active}
        members = np.concatenate(list(active.values()))
        where = {int(i): t for t, i in enumerate(members)}
        bundles = [b for b in ([where[i] for i in bundle if i in where]
                               for bundle in sched.bundles()) if b]
        owner = {int(i): g for g, m in active.items() for i in m}
        # the loss only judges a step against the one before: not needed with one round
        tasks = [{"shard": refs[i], "params": out[owner[int(i)]].estimate,
                  "meat": meat[owner[int(i)]], "rows": None if rows is None else rows[i],
                  "loss": most > 1, "link": settings.local.link,
                  "device": settings.local.device} for i in members]
        sub_sizes = np.asarray(sizes)[members]
        whole = np.array_equal(members, np.arange(len(sizes)))
        outcomes = backend.map_bundles(local.evaluate_task, tasks, bundles,
                                       work=_work(sub_sizes, len(names)))
        evals = values_or_raise(outcomes, sub_sizes, units if whole else units.subset(members))
        for g, m in list(active.items()):
            ev = [evals[where[int(i)]] for i in m]
            prev, here = out[g], out[g].estimate
            loss = sum(e.loss for e in ev) if most > 1 else np.inf
            if prev.evaluations is not None and loss > prev.loss + 1e-9 * abs(prev.loss):
                # the last step overshot (far from the optimum, where leaves differ): halve it
                # and evaluate again, keeping the last accepted point's evaluations
                out[g] = replace(prev, estimate=prev.point + 0.5 * (here - prev.point),
                                 rounds=prev.rounds + 1, halved=True)
                continue
            variance = settings.variance if meat[g] is not None or kind is None else "model"
            new, cov = pool_or_explain(pooling.refine, names, here, ev, variance)
            se = np.sqrt(np.maximum(np.diag(cov), 1e-300))
            step = float(np.max(np.abs(new - here) / se))
            steps[g] += 1
            done = step < settings.refine_tol and variance == settings.variance
            out[g] = Refined(new, cov, prev.rounds + 1, here, ev, loss, converged=done)
            if done or steps[g] == most:
                del active[g]
            near[g] = step < MEAT_NEAR
        if report:
            progress.advance()
    for g in active:  # halved to the end: keep the last point whose loss was checked
        if out[g].halved:
            out[g] = replace(out[g], estimate=out[g].point, halved=False)
    return out


def region_estimates(backend: Backend, refs, sched: Schedule, run: PartitionRun,
                     region_of: np.ndarray, settings: EngineSettings, *, names: list[str],
                     sizes, units: Units, rows: Sequence | None = None
                     ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The model of every region dealt out into random pieces: ``{region: (est, cov)}``.

    Each region's pieces are pooled and refined like the global model, over the region's
    pieces only (their ``rows`` when given: an honest partition's estimation rows), until
    converged. With one region and no row selection the model is the global one.
    """
    regions = np.unique(region_of)
    groups = {int(r): np.flatnonzero(region_of == r) for r in regions}
    multi = {r: m for r, m in groups.items() if m.shape[0] > 1}
    if not multi:
        return {}
    if regions.shape[0] == 1 and rows is None:
        return {int(regions[0]): (run.estimate, run.cov)}
    start = {}
    for r, m in multi.items():
        pooled = pool_or_explain(pooling.pool, names, [run.fits[i] for i in m])
        start[r] = (pooled.estimate, pooled.cov)
    refined = refine_groups(backend, refs, sched, multi, start, settings, names=names,
                            sizes=sizes, units=units, rows=rows)
    return {r: (f.estimate, f.cov) for r, f in refined.items()}


def _work(sizes, d: int) -> float:
    """Rows x d^2: what a pass over these subsets costs (the backends' parallelism cue)."""
    return float(np.sum(sizes)) * d * d


def check_fits(fits, names: list[str], p: int, sizes, settings: EngineSettings,
               units: Units = Units()) -> None:
    """Separation is an error; non-convergence and unidentified parameters are warnings.

    Separation is judged on the *unpenalised* fit (:func:`fedgrain.inference.local.fit_local`
    checks it even when the L1 penalty keeps the lasso finite), as ``OrdinalRegression``
    judges its own. For leaves (``units.word == "leaf"``) the warnings say what the leaf model
    does with what it lacks: a feature constant in the leaf takes the global slope, an absent
    class (at either end, or between classes the leaf has) is given the probability of half
    an observation. A feature constant in a leaf because one of the cuts above it uses that
    feature is expected and not warned about (``units.cut_features``, see
    :func:`fedgrain.federation.leaves.leaf_units`).
    """
    M = len(fits)
    separated = {m: f.separated for m, f in enumerate(fits) if f.separated}
    if separated:
        m, idx = next(iter(separated.items()))
        more = len(separated) - 1
        others = (f" (and {more} other {units.word if more == 1 else _plural(units.word)})"
                  if more else "")
        fix = ("remove or merge the separating feature(s), or fit OrdinalRegression(alpha=...) "
               "for a ridge-penalised model")
        if units.word == "leaf":
            fix += (", or grow fewer leaves (a lower granularity or a larger min_subset_size) "
                    "if only a small region is separated")
        raise SeparationError(
            f"The classes are (quasi-)separated in {units.word} {units.name(m, M)} "
            f"({int(sizes[m]):,} rows){others}: the maximum likelihood estimate does not exist "
            f"there ({', '.join(names[j] for j in idx)} grow without bound), so the de-biased "
            f"estimate and its standard errors would be meaningless; {fix}.",
            units=tuple(separated),
        )
    slow = [m for m, f in enumerate(fits) if not f.converged]
    if slow:
        warn(f"The lasso fit of {units.word}(s) {units.names(slow, M)} did not converge in "
             f"max_iter={settings.local.max_iter} iterations; increase max_iter.",
             ConvergenceWarning)
    leaves = units.word == "leaf"
    cut = getattr(units, "cut_features", None) or ()
    where: dict[str, list[int]] = {}
    for m, f in enumerate(fits):
        for note in f.notes:
            kind, j = note.split(":")
            j = int(j)
            if kind != "threshold" and leaves and m < len(cut) and j in cut[m]:
                continue  # constant because a cut above the leaf uses it: expected
            if not leaves:
                label = (f"threshold '{names[p + j]}' (no rows on one side)"
                         if kind == "threshold" else f"feature '{names[j]}' (constant)")
            elif kind == "threshold":
                label = _absent_end_class(f, names, p, j)
            else:
                label = (f"feature '{names[j]}' is constant in leaf(s) {{}}: its slope there is "
                         "the global model's (the leaf's thresholds absorb its effect)")
            where.setdefault(label, []).append(m)
        if leaves and getattr(f, "gaps", None) is not None:
            labels = _class_labels(names[p:])
            for c in np.flatnonzero(np.isfinite(f.gaps)):
                label = (f"class '{labels[c]}' never occurs in leaf(s) {{}}, though classes on "
                         f"both sides do: thresholds '{names[p + c - 1]}' and '{names[p + c]}' "
                         "are not identified apart there, so the class is given the probability "
                         "of half an observation among the leaf's rows, with an interval as "
                         "wide as zero counts allow")
                where.setdefault(label, []).append(m)
    for label, subsets in where.items():
        if leaves:
            warn(label.format(units.names(subsets, M)), IdentificationWarning)
        else:
            warn(f"{label} carries no information in {units.word}(s) "
                 f"{units.names(subsets, M)}; it gets zero weight there.", IdentificationWarning)


def _plural(word: str) -> str:
    return "leaves" if word == "leaf" else f"{word}s"


def _absent_end_class(fit, names: list[str], p: int, k: int) -> str:
    """The warning's text for a leaf's threshold ``k`` with no rows on one side: the class
    beyond it never occurs in the leaf (``{}`` stands for the leaves)."""
    K1 = len(names) - p
    noted = {int(n.split(":")[1]) for n in fit.notes if n.startswith("threshold:")}
    known = [t for t in range(K1) if t not in noted]
    labels = _class_labels(names[p:])
    low = bool(known) and k < min(known)
    cls = labels[k] if low else labels[k + 1]
    edges = getattr(fit, "edges", None)
    place = ("where the leaf's rows would expect half an observation beyond it"
             if edges is not None and np.isfinite(edges[k]) else
             "at the global model's gap from its neighbour")
    return (f"class '{cls}' never occurs in leaf(s) {{}}: threshold '{names[p + k]}' is placed "
            f"{place}, with the global model's standard error as a stand-in")


def _class_labels(thresholds: list[str]) -> list[str]:
    """The class labels from the threshold names ``"a|b"`` (labels may contain ``|``)."""
    if len(thresholds) == 1:
        a, _, b = thresholds[0].partition("|")
        return [a, b]
    inner = []
    for left, right in zip(thresholds[:-1], thresholds[1:], strict=True):
        cands = [left[i + 1:] for i, ch in enumerate(left) if ch == "|"
                 and right.startswith(left[i + 1:] + "|")]
        inner.append(cands[0] if cands else right.partition("|")[0])
    first = thresholds[0][: max(len(thresholds[0]) - len(inner[0]) - 1, 0)]
    last = thresholds[-1][len(inner[-1]) + 1:]
    return [first, *inner, last]


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
                                 info=dict(r.info), link=r.link)
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
                                 info=results.info, heterogeneity=results.heterogeneity,
                                 link=results.link)
        q_pvalue = np.nan if meta["q_pvalue"] is None else meta["q_pvalue"]
        return cls(results, oneshot, arrays["subset_sizes"], arrays["subset_estimates"],
                   arrays["subset_lasso_estimates"], arrays["subset_alphas"], arrays["n_iter"],
                   meta["q"], meta["q_df"], q_pvalue, meta["i2"])


def summarise(run: PartitionRun, std: Standardizer, sizes, settings: EngineSettings, *,
              feature_names: list[str], classes: list, title: str,
              stratified: bool = False) -> PooledFit:
    """The pooled model of a run on the original scale, with inference and heterogeneity.

    ``stratified``: the subsets are a class-stratified random division of the rows, so Q and
    the per-parameter Q and I^2 compare them within classes
    (:func:`fedgrain.inference.pooling.heterogeneity`); the estimates and intervals do not
    change.
    """
    fits, pooled = run.fits, run.pooled
    params, cov = std.to_raw_model(run.estimate, run.cov)
    one_params, one_cov = std.to_raw_model(pooled.estimate, pooled.cov)
    raw, raw_lasso, raw_var, resolved = _subsets_on_raw_scale(fits, std)
    het_raw, het_var = raw, raw_var
    if stratified:
        pooled = pooling.heterogeneity(pooled, fits)
        het_raw, _, het_var, _ = _subsets_on_raw_scale(pooling.within_class(fits), std)
    het = pooling.marginal_heterogeneity(het_raw, het_var, resolved)
    info = _info(sizes, len(classes), pooled, fits, settings, run.rounds, run.converged)
    link = settings.local.link
    results = OrdinalResults(params, cov, feature_names, classes, title=title, info=info,
                             heterogeneity=het, link=link)
    oneshot = OrdinalResults(one_params, one_cov, feature_names, classes,
                             title=PooledFit.ONESHOT_TITLE, info=info, heterogeneity=het,
                             link=link)
    return PooledFit(results, oneshot, np.asarray(sizes),
                     np.where(resolved, raw, np.nan), np.where(resolved, raw_lasso, np.nan),
                     np.array([f.alpha for f in fits]), np.array([f.n_iter for f in fits]),
                     pooled.q, pooled.q_df, pooled.q_pvalue, pooled.i2)


def _info(subset_sizes, K: int, pooled: pooling.Pooled, fits, settings: EngineSettings,
          ran: int, converged: bool = True) -> dict:
    n, M = int(np.sum(subset_sizes)), len(fits)
    lo, hi = int(np.min(subset_sizes)), int(np.max(subset_sizes))
    sizes = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    q = f"{pooled.q:.2f} (df {pooled.q_df}, p {pooled.q_pvalue:.3g})" if pooled.q_df > 0 \
        else "n/a (one subset)"
    alpha = settings.alpha if isinstance(settings.alpha, str) else "fixed"
    rounds = (f"{ran}" if settings.refine_rounds <= 1 else
              f"{ran} (converged; at most {settings.refine_rounds})" if converged else
              f"{ran} (NOT converged; at most {settings.refine_rounds})")
    return {
        "Rows": f"{n:,}", "Classes": K, "Subsets": M, "Rows per subset": sizes,
        "Penalty": f"{alpha} (mean {np.mean([f.alpha for f in fits]):.3g})",
        "De-biasing": ", ".join(sorted({f.debias for f in fits})),
        "Variance": settings.variance, "Refinement rounds": rounds,
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
