"""Feature-distribution drift of each leaf against its reference profile.

For every leaf and feature the profile holds the reference CDF at up to 19 quantiles
(:class:`fedgrain.partition.profile.LeafProfile`). New rows routed to the leaf are counted below
each
of those points; once a leaf has ``test_rows`` new rows, each feature gets

- a two-sample Kolmogorov-Smirnov statistic ``D = max |F_new - F_ref|`` at the points (the
  sup over a grid, so slightly conservative), with its asymptotic p-value for the effective
  size ``n_ref n_new / (n_ref + n_new)``, and
- the population stability index over the bins between the points,
  ``PSI = sum (p_new - p_ref) log(p_new / p_ref)``,

and the counts start again. A shift is reported when Holm's procedure over all the tests of
that update (every feature of every leaf tested) rejects at ``alpha`` *and* the PSI is at least
``min_psi`` (a practically relevant change, not only a detectable one).
"""

from __future__ import annotations

import numpy as np
from scipy import special


class FeatureMonitor:
    """Feature drift per leaf (``update`` with routed rows; ``shifts`` after each update)."""

    def __init__(self, profiles: dict, leaves: list[int], feature_names: list[str],
                 test_rows: int = 2_000, alpha: float = 1e-3, min_psi: float = 0.1):
        self.profiles = profiles
        self.leaves = list(leaves)
        self.feature_names = list(feature_names)
        self.test_rows, self.alpha, self.min_psi = test_rows, alpha, min_psi
        self._below: dict[int, list[np.ndarray]] = {}
        self._n: dict[int, int] = {}
        self._since: dict[int, int] = {}
        self.shifts: list[dict] = []

    def restart(self, nid: int) -> None:
        """Forget the leaf's counts (its reference changed)."""
        self._below.pop(nid, None)
        self._n.pop(nid, None)
        self._since.pop(nid, None)

    def set_leaves(self, leaves: list[int]) -> None:
        """The partition's leaves changed: keep the counts of the leaves that remain."""
        self.leaves = list(leaves)
        for nid in list(self._below):
            if nid not in self.leaves:
                self.restart(nid)

    def _start(self, nid: int, row: int) -> None:
        lp = self.profiles[nid]
        self._below[nid] = [np.zeros(e.shape[0]) for e in lp.edges]
        self._n[nid] = 0
        self._since[nid] = row

    def update(self, X: np.ndarray, leaf: np.ndarray, first_row: int = 0) -> list[dict]:
        """Count the new rows (``leaf``: positions in ``leaves``; ``first_row``: the stream row
        of the first of them); test leaves with enough rows.

        Returns the shifts found (each: leaf, feature, ks, p_value, psi, and ``since``: the
        stream row where the tested rows began), also in ``shifts``.
        """
        tests = []
        for pos, nid in enumerate(self.leaves):
            lp = self.profiles.get(nid)
            if lp is None or lp.edges is None:
                continue
            rows = np.flatnonzero(leaf == pos)
            if rows.size == 0:
                continue
            if nid not in self._below:
                self._start(nid, first_row + int(rows[0]))
            Xl = np.sort(X[rows], axis=0)  # rows at or below each edge: a sorted search
            for j, e in enumerate(lp.edges):
                self._below[nid][j] += np.searchsorted(Xl[:, j], e, side="right")
            self._n[nid] += rows.size
            if self._n[nid] >= self.test_rows:
                tests += self._test(nid, lp)
                self.restart(nid)
        self.shifts = self._holm(tests)
        return self.shifts

    def _test(self, nid: int, lp) -> list[dict]:
        return [dict(t, leaf=nid, since=self._since[nid])
                for t in profile_shift(lp, self._below[nid], self._n[nid], self.feature_names)]

    def _holm(self, tests: list[dict]) -> list[dict]:
        """Holm's step-down over the tests; significant and practically large ones."""
        order = sorted(range(len(tests)), key=lambda i: tests[i]["p_value"])
        m = len(tests)
        found = []
        for rank, i in enumerate(order):
            if tests[i]["p_value"] > self.alpha / (m - rank):
                break
            if tests[i]["psi"] >= self.min_psi:
                found.append(tests[i])
        return found

    def state(self) -> dict:
        """Plain JSON of the counts (for saving a model)."""
        return {str(n): {"below": [b.tolist() for b in self._below[n]], "n": self._n[n],
                         "since": self._since[n]} for n in self._below}

    def load_state(self, state: dict) -> None:
        for key, v in state.items():
            n = int(key)
            self._below[n] = [np.asarray(b, dtype=float) for b in v["below"]]
            self._n[n], self._since[n] = int(v["n"]), int(v["since"])


def rows_below(lp, X: np.ndarray) -> list[np.ndarray]:
    """Per feature, the rows of ``X`` at or below each of the profile's points."""
    Xs = np.sort(X, axis=0)
    return [np.searchsorted(Xs[:, j], e, side="right").astype(float)
            for j, e in enumerate(lp.edges)]


def profile_shift(lp, below: list[np.ndarray], n_new: int, feature_names: list[str]) -> list[dict]:
    """Per feature: the Kolmogorov-Smirnov statistic of ``n_new`` rows (``below``: their
    counts at or below the profile's points) against the leaf profile ``lp``, its asymptotic
    p-value and the PSI (see the module's docstring)."""
    n_ref = max(lp.n_ref or lp.n_rows, 1)
    n_eff = n_ref * n_new / (n_ref + n_new)
    out = []
    for j, (e, F) in enumerate(zip(lp.edges, lp.cdf, strict=True)):
        Fn = below[j] / n_new
        D = float(np.max(np.abs(Fn - F))) if e.size else 0.0
        p = float(special.kolmogorov(np.sqrt(n_eff) * D)) if D > 0 else 1.0
        ref = np.diff(np.concatenate([[0.0], F, [1.0]]))
        new = np.diff(np.concatenate([[0.0], Fn, [1.0]]))
        ref, new = np.clip(ref, 1e-4, None), np.clip(new, 1e-4, None)
        psi = float(np.sum((new - ref) * np.log(new / ref)))
        out.append({"feature": feature_names[j], "ks": D, "p_value": p, "psi": psi})
    return out
