"""Leaf models that follow their data batch by batch (docs/method.md, "Monitoring on streams").

The composite log-likelihood is a sum over rows, so its score, Hessian and meat over the rows
seen so far can be carried from batch to batch. A :class:`Track` is one such recursive fit: a
quadratic ``(target, hess, meat)`` in the standardised coordinates, to which each batch adds its
own quadratic at the track's current point (one pass over the batch, ``d + 2 d^2`` numbers),
after shrinking what was there by ``(1 - 1/memory)^rows`` (exponential forgetting: a row
``memory`` rows old counts ``1/e``); the track then steps to the minimum, a recursive Newton
step. With ``memory = inf`` nothing is forgotten and the track follows the fit on every row so
far; shorter memories follow drift faster and pay in variance.

Which memory suits a leaf is chosen from its data: :class:`LeafFollower` runs the tracks of
:data:`MEMORIES` side by side with the leaf's model as it was fitted ("frozen"), scores each on
every batch *before* it sees the batch (prequential log-loss, exponentially weighted over about
:data:`COMPARE_ROWS` of the leaf's rows) and serves the one with the lowest loss, switching only
when the difference is clear (:data:`SWITCH_Z` standard errors of the paired per-row
differences, and at least :data:`MIN_GAIN` nats per row): on a stationary stream the
unforgetting track serves, which is the fit on all rows so far; under drift a shorter memory
wins. A switch away from the unforgetting track is evidence of gradual drift and is reported as
such.

Coordinates the leaf's rows do not identify (a feature constant in the leaf, a class absent
from it: filled in from the global model, see :class:`fedgrain.estimators.models.LeafModel`)
keep their values; the others move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import expit

from ..core.likelihood import PROBA_FLOOR
from ..core.linalg import solve_psd
from ..inference.contributions import Contribution
from ..inference.local import Evaluation, evaluate_local

#: Candidate memories of the recursive fits (rows: a row this old counts 1/e).
MEMORIES = (float("inf"), 20_000.0, 5_000.0, 1_000.0)
#: Rows of a leaf over which the candidates' prequential losses are compared (exponentially).
COMPARE_ROWS = 3_000.0
#: A candidate replaces the served one when its prequential loss is lower by this many standard
#: errors of the paired per-row differences (tested after every batch, so well beyond 2), by at
#: least MIN_GAIN nats per row (near-identical models can differ "significantly" by nothing
#: that matters), over at least MIN_COMPARE_ROWS effective rows.
SWITCH_Z = 4.0
MIN_GAIN = 0.002
MIN_COMPARE_ROWS = 500.0
#: Name of the candidate that keeps the leaf's model as fitted.
FROZEN = "as fitted"


def decay(memory: float, rows: int) -> float:
    """The weight left to what a track knew, ``rows`` rows later: ``(1 - 1/memory)^rows``."""
    if not np.isfinite(memory):
        return 1.0
    return float(np.exp(rows * np.log1p(-1.0 / memory)))


def ordered(theta: np.ndarray, p: int) -> bool:
    return bool(np.all(np.isfinite(theta)) and np.all(np.diff(theta[p:]) > 0))


@dataclass
class Track:
    """One recursive fit: its memory, point and accumulated quadratic (standardised)."""

    memory: float
    theta: np.ndarray
    hess: np.ndarray
    target: np.ndarray
    meat: np.ndarray

    @classmethod
    def start(cls, memory: float, theta: np.ndarray, info: np.ndarray) -> Track:
        """From a fitted model: its point and its information (the precision of its fit)."""
        return cls(memory, theta.copy(), info.copy(), info @ theta, info.copy())

    def take(self, ev: Evaluation, at: np.ndarray, rows: int, free: np.ndarray,
             p: int) -> None:
        """Add a batch's quadratic (``ev``, taken at the point ``at``) and step to the minimum
        over the ``free`` coordinates (no step that leaves the thresholds unordered)."""
        a = decay(self.memory, rows)
        meat = ev.hess if ev.meat is None else ev.meat
        self.hess = a * self.hess + ev.hess
        self.target = a * self.target + ev.hess @ at + ev.score
        self.meat = a * self.meat + meat
        H = self.hess[np.ix_(free, free)]
        g = (self.target - self.hess @ self.theta)[free]
        new = self.theta.copy()
        new[free] += solve_psd(H, g)
        if ordered(new, p):
            self.theta = new

    def cov(self, free: np.ndarray, base: np.ndarray) -> np.ndarray:
        """The sandwich over the free coordinates; the others keep ``base``'s (their filled-in
        covariance), with no covariance between the two."""
        Hinv = solve_psd(self.hess[np.ix_(free, free)], np.eye(int(free.sum())))
        V = Hinv @ self.meat[np.ix_(free, free)] @ Hinv
        cov = base.copy()
        cov[free, :] = 0.0
        cov[:, free] = 0.0
        cov[np.ix_(free, free)] = 0.5 * (V + V.T)
        return cov

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}_theta": self.theta, f"{prefix}_hess": self.hess,
                f"{prefix}_target": self.target, f"{prefix}_meat": self.meat}

    @classmethod
    def from_arrays(cls, memory: float, arrays: dict, prefix: str) -> Track:
        return cls(memory, *(np.asarray(arrays[f"{prefix}_{k}"], dtype=float)
                             for k in ("theta", "hess", "target", "meat")))


@dataclass
class Prequential:
    """Exponentially weighted sums of the candidates' per-row losses and their products."""

    s1: np.ndarray
    s2: np.ndarray
    w: float = 0.0
    w2: float = 0.0

    @classmethod
    def empty(cls, n: int) -> Prequential:
        return cls(np.zeros(n), np.zeros((n, n)))

    def add(self, losses: np.ndarray) -> None:
        """``losses``: (candidates, rows) of one batch."""
        n = losses.shape[1]
        g = decay(COMPARE_ROWS, n)
        self.s1 = g * self.s1 + losses.sum(axis=1)
        self.s2 = g * self.s2 + losses @ losses.T
        self.w = g * self.w + n
        self.w2 = g * g * self.w2 + n

    def mean(self) -> np.ndarray:
        return self.s1 / max(self.w, 1e-300)

    def clearly_better(self, a: int, b: int) -> float:
        """``z`` of "candidate b's loss is lower than a's" (0 before MIN_COMPARE_ROWS rows)."""
        n_eff = self.w * self.w / max(self.w2, 1e-300)
        if n_eff < MIN_COMPARE_ROWS:
            return 0.0
        m = self.mean()
        diff = m[a] - m[b]
        var = (self.s2[a, a] - 2 * self.s2[a, b] + self.s2[b, b]) / self.w - diff * diff
        return float(diff / np.sqrt(max(var, 1e-300) / n_eff))


@dataclass
class LeafFollower:
    """A leaf's candidate models on the stream and which one serves (see the module text).

    ``free`` marks the coordinates the leaf identifies; ``frozen``/``frozen_cov`` are its model
    as fitted (or last refitted), standardised; ``chosen`` indexes the candidates: 0 is the
    frozen model, ``1 + i`` the track of ``MEMORIES[i]``.
    """

    free: np.ndarray
    frozen: np.ndarray
    frozen_cov: np.ndarray
    tracks: list[Track]
    stats: Prequential
    chosen: int = 1
    rows: int = 0

    @classmethod
    def start(cls, theta: np.ndarray, cov: np.ndarray, free: np.ndarray) -> LeafFollower:
        """From the leaf's fitted model (standardised estimate and covariance)."""
        info = np.zeros_like(cov)
        f = np.ix_(free, free)
        info[f] = solve_psd(cov[f], np.eye(int(free.sum())))
        tracks = [Track.start(m, theta, info) for m in MEMORIES]
        return cls(free.copy(), theta.copy(), cov.copy(), tracks,
                   Prequential.empty(1 + len(tracks)))

    def reseed(self, theta: np.ndarray, cov: np.ndarray, free: np.ndarray) -> LeafFollower:
        """After the region's model was refitted on its rows since a detected change: every
        candidate starts again from the refitted model (the tracks carried the old regime,
        and took batches' quadratics far from the new one), and the choice of memory stays:
        a forgetting memory that served keeps serving, else the unforgetting track (the fit
        on every row since the change) serves. The candidates take over the prequential
        history of the one that served, so that they start even and a later switch rests on
        the rows since the refit only. A refit that identifies other coordinates than the
        follower's starts a new follower."""
        new = LeafFollower.start(theta, cov, free)
        if free.shape != self.free.shape or not np.array_equal(free, self.free):
            return new
        keep = self.chosen
        s1 = np.full_like(self.stats.s1, self.stats.s1[keep])
        s2 = np.full_like(self.stats.s2, self.stats.s2[keep, keep])
        new.stats = Prequential(s1, s2, self.stats.w, self.stats.w2)
        new.chosen = max(keep, 1)
        new.rows = self.rows
        return new

    def copy(self) -> LeafFollower:
        """A copy that a batch taken by either leaves the other as it was (a batch replaces
        the tracks' and sums' arrays, never writes into them)."""
        return replace(self, tracks=[copy.copy(t) for t in self.tracks],
                       stats=copy.copy(self.stats))

    @staticmethod
    def label(c: int) -> str:
        if c == 0:
            return FROZEN
        m = MEMORIES[c - 1]
        return "no forgetting" if not np.isfinite(m) else f"memory {m:,.0f} rows"

    def served_point(self) -> np.ndarray:
        return self.frozen if self.chosen == 0 else self.tracks[self.chosen - 1].theta

    def served(self) -> tuple[np.ndarray, np.ndarray]:
        """The served model's standardised estimate and covariance."""
        if self.chosen == 0:
            return self.frozen, self.frozen_cov
        t = self.tracks[self.chosen - 1]
        return t.theta, t.cov(self.free, self.frozen_cov)

    def take(self, Xs: np.ndarray, codes: np.ndarray, meat: str | None) -> dict | None:
        """A batch of the leaf's rows (standardised): score every candidate on it, then let
        the tracks learn from it, then choose. Returns the switch, if any, as
        ``{"from", "to", "z", "losses"}``."""
        p = Xs.shape[1]
        n = codes.shape[0]
        points = [self.frozen] + [t.theta for t in self.tracks]
        losses = np.array([true_class_loss(Xs @ th[:p], th[p:], codes) for th in points])
        # one pass at the served point gives every track the batch's quadratic (the tracks
        # are close where it matters: a track far from the served one is not served)
        at = self.served_point()
        ev = evaluate_local(Xs, codes, None, at, meat, loss=False)
        for t in self.tracks:
            t.take(ev, at, n, self.free, p)
        self.stats.add(losses)
        self.rows += n
        mean = self.stats.mean()
        best = int(np.argmin(mean))
        if best == self.chosen or mean[self.chosen] - mean[best] < MIN_GAIN:
            return None
        z = self.stats.clearly_better(self.chosen, best)
        if z < SWITCH_Z:
            return None
        before, self.chosen = self.chosen, best
        return {"from": before, "to": best, "z": z, "losses": self.stats.mean()}

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self, prefix: str) -> tuple[dict, dict]:
        meta = {"chosen": int(self.chosen), "rows": int(self.rows), "w": self.stats.w,
                "w2": self.stats.w2, "memories": [str(m) for m in MEMORIES]}
        arrays = {f"{prefix}_free": self.free, f"{prefix}_frozen": self.frozen,
                  f"{prefix}_frozen_cov": self.frozen_cov, f"{prefix}_s1": self.stats.s1,
                  f"{prefix}_s2": self.stats.s2}
        for i, t in enumerate(self.tracks):
            arrays.update(t.to_arrays(f"{prefix}_track{i}"))
        return meta, arrays

    @classmethod
    def from_dict(cls, meta: dict, arrays: dict, prefix: str) -> LeafFollower:
        if [float(m) for m in meta["memories"]] != list(MEMORIES):
            raise ValueError("the stream's forgetting tracks were saved with other memories")
        tracks = [Track.from_arrays(m, arrays, f"{prefix}_track{i}")
                  for i, m in enumerate(MEMORIES)]
        stats = Prequential(np.asarray(arrays[f"{prefix}_s1"], dtype=float),
                            np.asarray(arrays[f"{prefix}_s2"], dtype=float),
                            float(meta["w"]), float(meta["w2"]))
        return cls(np.asarray(arrays[f"{prefix}_free"], dtype=bool),
                   np.asarray(arrays[f"{prefix}_frozen"], dtype=float),
                   np.asarray(arrays[f"{prefix}_frozen_cov"], dtype=float), tracks, stats,
                   int(meta["chosen"]), int(meta["rows"]))


def true_class_loss(eta: np.ndarray, theta: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each row's log-loss, ``-log P(Y = y)``, from its true class's two cumulative terms only
    (the stable difference of :func:`fedgrain.core.likelihood.class_proba`, floored as
    :func:`fedgrain.core.likelihood.row_log_loss` floors it)."""
    edges = np.concatenate([[-np.inf], theta, [np.inf]])
    hi = edges[codes + 1] - eta
    lo = edges[codes] - eta
    with np.errstate(invalid="ignore"):
        gap = -np.expm1(np.minimum(lo - hi, 0.0))
    prob = expit(hi) * expit(-lo) * np.where(np.isfinite(gap), gap, 1.0)
    return -np.log(np.clip(prob, PROBA_FLOOR, 1.0))


def follow_global(part: Contribution, Xs: np.ndarray, codes: np.ndarray, point: np.ndarray,
                  memory: float, meat: str | None) -> Contribution:
    """A leaf's part of the global model after a batch of its rows: what it held, shrunk by the
    leaf's served memory, plus the batch's quadratic at the global ``point``."""
    a = decay(memory, codes.shape[0])
    ev = evaluate_local(Xs, codes, None, point, meat, loss=False)
    new = Contribution.at(point, ev)
    return Contribution(a * part.target + new.target, a * part.hess + new.hess,
                        a * part.meat + new.meat)
