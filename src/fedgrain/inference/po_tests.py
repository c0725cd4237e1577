"""Tests of the proportional-odds assumption: Brant's Wald test and a score test.

The proportional-odds model gives every cut ``k`` of the levels the same slopes:
``P(Y <= k | x) = F(theta_k - x'beta)``. The alternative lets them differ, ``F(theta_k -
x'beta_k)`` (the *general* or non-proportional model, ``gologit2``'s and R's
``clm(nominal = ~ x)``). Both tests compare ``beta_0 = ... = beta_{K-2}``, for each feature (``K -
2`` degrees of freedom) and jointly (``p (K - 2)``):

- **Brant** (Brant 1990): the ``K - 1`` binary logits of ``1{Y > k}`` fitted separately, their
  slopes compared by a Wald test whose covariance between cuts ``k < l`` is ``H_k^-1 X'
  diag(w pi_l (1 - pi_k)) X H_l^-1`` (``pi_k`` the fitted ``P(Y > k)``; ``H_k`` the information
  of fit ``k``, intercept included): the scores of two cuts are correlated because ``Y > l``
  implies ``Y > k``.
- **Score** (Rao): the general model's score and information at the proportional-odds
  maximum likelihood estimate, in the coordinates ``beta_k = beta + delta_k`` (``delta_0 = 0``);
  the statistic is ``U_delta' [I^-1]_delta,delta U_delta``, with ``theta`` and ``beta`` as
  nuisance parameters. It needs only the proportional-odds fit.

Both run on the features centred and scaled (the statistics do not change under that
reparametrisation). Rows with weights count as frequency weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.likelihood import _cut_parts_link, second_derivatives
from ..core.linalg import chi2_sf
from ..exceptions import DataError, SeparationError

METHODS = ("brant", "score")


@dataclass(frozen=True)
class ProportionalOddsTest:
    """A test of proportional odds: one row per feature, then the omnibus test.

    ``table`` has columns ``chi2``, ``df`` and ``p`` indexed by feature name and ``"omnibus"``.

    Examples
    --------
    >>> from fedgrain import OrdinalRegression
    >>> from fedgrain.datasets import make_ordinal
    >>> X, y, *_ = make_ordinal(2000, 2, 4, random_state=0)
    >>> test = OrdinalRegression().fit(X, y).proportional_odds_test(X, y)
    >>> list(test.table.index), int(test.omnibus["df"])
    (['x0', 'x1', 'omnibus'], 4)
    """

    method: str
    table: pd.DataFrame

    @property
    def omnibus(self) -> pd.Series:
        return self.table.loc["omnibus"]

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def to_dict(self) -> dict:
        return {"method": self.method, "names": [str(i) for i in self.table.index],
                "chi2": self.table["chi2"].tolist(), "df": self.table["df"].tolist(),
                "p": self.table["p"].tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ProportionalOddsTest:
        table = pd.DataFrame({"chi2": [float(v) for v in d["chi2"]],
                              "df": [int(v) for v in d["df"]],
                              "p": [float(v) for v in d["p"]]},
                             index=pd.Index([str(n) for n in d["names"]], name="feature"))
        if d["method"] not in METHODS or table.shape[0] < 2:
            raise ValueError("not a proportional-odds test")
        return cls(str(d["method"]), table)

    def title(self) -> str:
        name = "Brant's Wald test" if self.method == "brant" else "Score test"
        return f"Proportional odds: {name} (H0: the same slopes at every cut)"

    def __str__(self) -> str:
        t = self.table
        lines = [self.title(), f"{'':<24}{'chi2':>12}{'df':>6}{'p':>12}"]
        for name, row in t.iterrows():
            lines.append(f"{str(name):<24}{row['chi2']:>12.4f}{int(row['df']):>6}"
                         f"{row['p']:>12.4g}")
        return "\n".join(lines)


def _standardised(X, w):
    sw = float(X.shape[0] if w is None else w.sum())
    ww = np.ones(X.shape[0]) if w is None else w
    mean = (ww @ X) / sw
    sd = np.sqrt(np.maximum((ww @ (X - mean) ** 2) / sw, 0.0))
    if np.any(sd <= 0):
        raise DataError("A feature is constant; the proportional-odds test needs varying "
                        "features (drop the constant one).")
    return (X - mean) / sd


def _binary_logit(X1, z, w, cut: str, max_iter: int = 100):
    """Newton's method for one binary logit with design ``X1`` (intercept included)."""
    b = np.zeros(X1.shape[1])
    share = float(w @ z) / float(w.sum())
    b[0] = np.log(share / (1 - share))
    for _ in range(max_iter):
        eta = X1 @ b
        pi = 1.0 / (1.0 + np.exp(-eta))
        H = X1.T @ (X1 * (w * pi * (1 - pi))[:, None])
        g = X1.T @ (w * (z - pi))
        step = np.linalg.solve(H, g)
        b = b + step
        if float(g @ step) < 1e-12:
            if np.max(np.abs(b)) > 30:
                break
            return b, pi
    raise SeparationError(f"The binary split {cut} is (quasi-)separated by the features: its "
                          "logit has no finite estimate, so Brant's test cannot be computed. "
                          "Use method='score', or merge sparse levels.")


def brant(X: np.ndarray, codes: np.ndarray, w: np.ndarray | None, n_classes: int,
          names: list[str], cut_names: list[str]) -> ProportionalOddsTest:
    """Brant's test from the ``K - 1`` separate binary logits (see the module docstring)."""
    n, p = X.shape
    K1 = n_classes - 1
    if K1 < 2:
        raise DataError("The proportional-odds assumption concerns three or more levels; with "
                        "two the model is a binary logit.")
    ww = np.ones(n) if w is None else w
    X1 = np.column_stack([np.ones(n), _standardised(X, w)])
    fits = [_binary_logit(X1, (codes > k).astype(float), ww, f"'{cut_names[k]}'")
            for k in range(K1)]
    Hinv = [np.linalg.inv(X1.T @ (X1 * (ww * pi * (1 - pi))[:, None])) for _, pi in fits]
    q = p + 1
    V = np.zeros((K1 * q, K1 * q))
    for k in range(K1):
        V[k * q:(k + 1) * q, k * q:(k + 1) * q] = Hinv[k]
        for m in range(k + 1, K1):
            # Cov(1{Y > k}, 1{Y > m}) = pi_m (1 - pi_k) for k < m
            c = ww * fits[m][1] * (1 - fits[k][1])
            B = Hinv[k] @ (X1.T @ (X1 * c[:, None])) @ Hinv[m]
            V[k * q:(k + 1) * q, m * q:(m + 1) * q] = B
            V[m * q:(m + 1) * q, k * q:(k + 1) * q] = B.T
    b = np.concatenate([f[0] for f in fits])
    slope = np.array([k * q + 1 + j for k in range(K1) for j in range(p)])  # no intercepts
    return _table("brant", b[slope], V[np.ix_(slope, slope)], p, K1, names)


def _table(method, b, V, p, K1, names):
    """Wald tests of equal slopes across cuts, per feature and jointly; ``b`` is cut-major."""
    def wald(rows):
        D = np.zeros((len(rows), p * K1))
        for r, (j, k) in enumerate(rows):
            D[r, j] = 1.0  # cut 0
            D[r, k * p + j] = -1.0
        diff = D @ b
        return float(diff @ np.linalg.solve(D @ V @ D.T, diff))

    out = []
    for j in range(p):
        out.append(wald([(j, k) for k in range(1, K1)]))
    out.append(wald([(j, k) for j in range(p) for k in range(1, K1)]))
    return _frame(method, out, p, K1, names)


def _frame(method, stats, p, K1, names):
    dfs = [K1 - 1] * p + [p * (K1 - 1)]
    table = pd.DataFrame({"chi2": stats, "df": dfs,
                          "p": [chi2_sf(s, d) for s, d in zip(stats, dfs, strict=True)]},
                         index=pd.Index([*names, "omnibus"], name="feature"))
    return ProportionalOddsTest(method, table)


def score(X: np.ndarray, codes: np.ndarray, w: np.ndarray | None, coef: np.ndarray,
          thresholds: np.ndarray, names: list[str], link=None) -> ProportionalOddsTest:
    """The score test at the proportional-odds maximum likelihood fit ``(coef, thresholds)``
    of these rows (see the module docstring); ``link`` the model's
    (:mod:`fedgrain.core.links`; the logit when None): the test is then of equal slopes in
    that cumulative model."""
    n, p = X.shape
    K1 = thresholds.shape[0]
    if K1 < 2:
        raise DataError("The proportional-odds assumption concerns three or more levels; with "
                        "two the model is a binary logit.")
    ww = np.ones(n) if w is None else w
    sw = float(ww.sum())
    mean = (ww @ X) / sw
    sd = np.sqrt(np.maximum((ww @ (X - mean) ** 2) / sw, 0.0))
    if np.any(sd <= 0):
        raise DataError("A feature is constant; the proportional-odds test needs varying "
                        "features (drop the constant one).")
    Z = (X - mean) / sd
    beta = coef * sd
    theta = thresholds - mean @ coef
    eta = Z @ beta
    _, g1, g0, r1, r0 = _cut_parts_link(eta, codes, theta, link)
    h11, h00, h10 = second_derivatives(g1, g0, r1, r0)
    # d loglik / d a_k per row, a_k = theta_k - z'beta_k: the row's upper cut (k = y) and lower
    # cut (k = y - 1)
    levels = np.arange(K1)
    up = codes[:, None] == levels[None, :]
    lo = codes[:, None] == levels[None, :] + 1
    e = up * g1[:, None] - lo * g0[:, None]
    # general model parameters: (theta_0..theta_{K-2}, beta_0 (p), ..., beta_{K-2} (p))
    d = K1 + K1 * p
    U = np.zeros(d)
    U[:K1] = ww @ e
    for k in range(K1):
        U[K1 + k * p:K1 + (k + 1) * p] = -(Z.T @ (ww * e[:, k]))
    # second derivatives of loglik in (a_k, a_l): diagonal h11 (k = y) or h00 (k = y - 1),
    # off-diagonal h10 for (y - 1, y)
    info = np.zeros((d, d))

    def add(k, m, c):
        """Add the pair of cuts (k, m) with per-row second derivative ``c`` (times -1)."""
        cw = -ww * c
        sl_k = slice(K1 + k * p, K1 + (k + 1) * p)
        sl_m = slice(K1 + m * p, K1 + (m + 1) * p)
        info[k, m] += cw.sum()
        info[k, sl_m] += -(cw @ Z)
        info[sl_k, m] += -(cw @ Z)
        info[sl_k, sl_m] += Z.T @ (Z * cw[:, None])

    for k in range(K1):
        add(k, k, up[:, k] * h11 + lo[:, k] * h00)
        if k + 1 < K1:
            c = up[:, k + 1] * h10  # rows of class k + 1: lower cut k, upper cut k + 1
            add(k, k + 1, c)
            add(k + 1, k, c)
    # coordinates beta_k = beta + delta_k: (theta, beta, delta_1..delta_{K-2})
    T = np.zeros((d, d))
    T[:K1, :K1] = np.eye(K1)
    for k in range(K1):
        T[K1 + k * p:K1 + (k + 1) * p, K1:K1 + p] = np.eye(p)
        if k:
            T[K1 + k * p:K1 + (k + 1) * p, K1 + k * p:K1 + (k + 1) * p] = np.eye(p)
    Un, In = T.T @ U, T.T @ info @ T
    nuisance = np.arange(K1 + p)

    def stat(delta):
        keep = np.r_[nuisance, delta]
        Iinv = np.linalg.inv(In[np.ix_(keep, keep)])
        pos = np.arange(nuisance.size, keep.size)
        u = Un[delta]
        return float(u @ Iinv[np.ix_(pos, pos)] @ u)

    deltas = [np.array([K1 + k * p + j for k in range(1, K1)]) for j in range(p)]
    out = [stat(dj) for dj in deltas]
    out.append(stat(np.sort(np.concatenate(deltas))))
    return _frame("score", out, p, K1, names)
