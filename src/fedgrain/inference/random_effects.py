"""A random-effects summary of regions' models: their mean, the spread between them, and the
range in which a new region's parameter is expected.

Beside the population-averaged (global) model, an adaptive partition reports, per parameter,
the random-effects model ``theta_r ~ N(mu, tau^2)`` of its regions' estimates ``theta_r`` (with
their own variances ``v_r``): the mean ``mu``, the between-region variance ``tau^2`` by
restricted maximum likelihood (REML, started from DerSimonian-Laird), Cochran's Q and I^2, and
the 95% prediction interval ``mu +- t_{k-2} sqrt(tau^2 + se(mu)^2)`` for the parameter of a new
region (Higgins, Thompson and Spiegelhalter 2009). The summary is marginal: one parameter at a
time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .results import Summary

#: I^2 above this (on any coefficient) is reported as leaves that differ.
LARGE_I2 = 0.5
#: REML iterations (Fisher scoring) and their tolerance on tau^2, relative.
REML_ITER = 100
REML_TOL = 1e-10


def dersimonian_laird(est: np.ndarray, var: np.ndarray) -> tuple[float, float, int]:
    """``(tau2, Q, df)`` by DerSimonian and Laird's moment estimator, for one parameter."""
    w = 1.0 / var
    mu = np.sum(w * est) / np.sum(w)
    q = float(np.sum(w * (est - mu) ** 2))
    df = est.shape[0] - 1
    c = np.sum(w) - np.sum(w**2) / np.sum(w)
    tau2 = max(0.0, (q - df) / c) if c > 0 else 0.0
    return tau2, q, df


def reml_tau2(est: np.ndarray, var: np.ndarray) -> float:
    """The between-region variance by REML (Fisher scoring from DerSimonian-Laird), >= 0."""
    tau2 = dersimonian_laird(est, var)[0]
    for _ in range(REML_ITER):
        w = 1.0 / (var + tau2)
        sw = np.sum(w)
        mu = np.sum(w * est) / sw
        r2 = (est - mu) ** 2
        # REML score and expected information for tau^2
        score = 0.5 * (np.sum(w**2 * r2) - np.sum(w) + np.sum(w**2) / sw)
        info = 0.5 * (np.sum(w**2) - 2 * np.sum(w**3) / sw + (np.sum(w**2) / sw) ** 2)
        new = max(0.0, tau2 + score / info) if info > 0 else tau2
        if abs(new - tau2) <= REML_TOL * max(tau2, np.mean(var)):
            tau2 = new
            break
        tau2 = new
    return float(tau2)


@dataclass(frozen=True)
class RandomEffects:
    """Per parameter: random-effects mean and its standard error, ``tau2`` (and ``tau``),
    Q, its p-value, I^2, and the prediction interval for a new region; ``n_regions`` the
    number of distinct region models summarised."""

    names: list[str]
    mean: np.ndarray
    se: np.ndarray
    tau2: np.ndarray
    q: np.ndarray
    q_pvalue: np.ndarray
    i2: np.ndarray
    pred_low: np.ndarray
    pred_high: np.ndarray
    n_regions: int
    n_features: int

    @property
    def tau(self) -> np.ndarray:
        return np.sqrt(self.tau2)

    @property
    def differ(self) -> bool:
        """Whether the regions' slopes differ beyond chance (I^2 above :data:`LARGE_I2` on a
        coefficient)."""
        i2 = self.i2[: self.n_features]
        return bool(self.n_regions > 1 and np.nanmax(i2, initial=0.0) > LARGE_I2)

    def statement(self) -> str:
        """One plain sentence on what the global model is, given the spread of the regions."""
        if self.n_regions < 2:
            return "One region: the global model is its model."
        i2 = self.i2[: self.n_features]
        if self.differ:
            j = int(np.nanargmax(i2))
            return (f"The {self.n_regions} regions' models differ (I^2 up to {i2[j]:.2f}, on "
                    f"'{self.names[j]}'): the global model is the population average over "
                    "them, not the model of any region; see each leaf's model and the "
                    "random-effects summary.")
        return (f"The {self.n_regions} regions' models agree within chance (I^2 at most "
                f"{np.nanmax(i2, initial=0.0):.2f} on the coefficients).")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"mean": self.mean, "std err": self.se, "tau": self.tau, "I2": self.i2,
             "Q p": self.q_pvalue, "pred low": self.pred_low, "pred high": self.pred_high},
            index=pd.Index(self.names, name="parameter"))

    def summary(self, statement: bool = True) -> Summary:
        """The table, with :meth:`statement` among its notes unless ``statement=False`` (when
        it is said elsewhere, as in the adaptive estimator's summary)."""
        info = (("Regions", str(self.n_regions)), ("tau^2", "REML, per parameter"),
                ("Prediction interval", "95%, for a new region"))
        notes = ((self.statement(),) if statement else ()) + (
                 "mean: the random-effects mean of the regions' models; tau: the standard "
                 "deviation between regions; pred low/high: where a new region's parameter "
                 "is expected (NaN with fewer than 3 regions).",)
        return Summary("Random-effects summary of the regions' models", info,
                       self.to_frame(), notes)


def random_effects(estimates: np.ndarray, covs: np.ndarray, names: Sequence[str],
                   n_features: int, level: float = 0.95) -> RandomEffects:
    """The random-effects summary of ``estimates`` (``(k, d)``, one row per region) with
    their covariances ``(k, d, d)`` (their diagonals are used)."""
    est = np.asarray(estimates, dtype=float)
    var = np.array([np.diag(c) for c in covs], dtype=float)
    k, d = est.shape
    out = {key: np.full(d, np.nan) for key in
           ("mean", "se", "tau2", "q", "q_pvalue", "i2", "pred_low", "pred_high")}
    for j in range(d):
        ok = np.isfinite(est[:, j]) & (var[:, j] > 0) & np.isfinite(var[:, j])
        e, v = est[ok, j], var[ok, j]
        if e.shape[0] == 0:
            continue
        if e.shape[0] == 1:
            out["mean"][j], out["se"][j], out["tau2"][j] = e[0], np.sqrt(v[0]), 0.0
            continue
        tau2 = reml_tau2(e, v)
        _, q, df = dersimonian_laird(e, v)
        w = 1.0 / (v + tau2)
        mu = np.sum(w * e) / np.sum(w)
        se = np.sqrt(1.0 / np.sum(w))
        out["mean"][j], out["se"][j], out["tau2"][j] = mu, se, tau2
        out["q"][j], out["q_pvalue"][j] = q, stats.chi2.sf(q, df)
        out["i2"][j] = max(0.0, (q - df) / q) if q > 0 else 0.0
        if e.shape[0] >= 3:
            half = stats.t.ppf(0.5 + level / 2, e.shape[0] - 2) * np.sqrt(tau2 + se**2)
            out["pred_low"][j], out["pred_high"][j] = mu - half, mu + half
    return RandomEffects(list(names), n_regions=k, n_features=n_features, **out)
