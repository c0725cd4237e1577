"""Inference read off an estimate and its covariance: tables, tests and intervals.

:class:`OrdinalResults` holds ``params`` over ``(coefficients, thresholds)`` and their covariance,
and derives everything else (standard errors, z, p-values, confidence intervals, joint Wald
tests, simultaneous intervals, intervals for predicted class probabilities). ``summary()``
returns a :class:`Summary` that prints as text, renders as HTML in notebooks and converts to a
DataFrame.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit

from ..core.likelihood import class_proba
from ..core.linalg import chi2_sf, wald
from ..core.links import get_link

#: Draws used for the max-|Z| simultaneous critical value (fixed seed: deterministic).
MAXZ_DRAWS = 200_000


def parameter_names(feature_names: Sequence[str], classes: Sequence) -> list[str]:
    """Names of ``(coef, thresholds)``: the features, then ``"a|b"`` between consecutive levels."""
    lv = [str(c) for c in classes]
    return [str(f) for f in feature_names] + [f"{lv[k]}|{lv[k + 1]}" for k in range(len(lv) - 1)]


@dataclass(frozen=True)
class ChiSquareTest:
    """A test statistic referred to chi-square: statistic, degrees of freedom, p-value and the
    hypothesis in words; :class:`WaldTest` and :class:`LRTest` say which test it was."""

    statistic: float
    df: int
    pvalue: float
    hypothesis: str

    kind = "Chi-square test"

    def __str__(self) -> str:
        return (f"{self.kind} of {self.hypothesis}: chi2({self.df}) = {self.statistic:.4g}, "
                f"p = {self.pvalue:.4g}")


class WaldTest(ChiSquareTest):
    """A joint Wald test of ``R params = q``: chi-square statistic, degrees of freedom, p.

    Examples
    --------
    >>> from fedgrain import OrdinalRegression
    >>> from fedgrain.datasets import make_ordinal
    >>> X, y, *_ = make_ordinal(2000, 3, 3, random_state=0)
    >>> test = OrdinalRegression().fit(X, y).results_.wald_test(["x0", "x1"])
    >>> test.df, bool(test.pvalue < 0.05)
    (2, True)
    """

    kind = "Wald test"


class LRTest(ChiSquareTest):
    """A likelihood-ratio test: ``2 (loglik_full - loglik_restricted)`` against chi-square.

    Examples
    --------
    >>> from fedgrain import OrdinalRegression
    >>> from fedgrain.datasets import make_ordinal
    >>> X, y, *_ = make_ordinal(2000, 3, 3, random_state=0)
    >>> full = OrdinalRegression().fit(X, y)
    >>> test = full.lr_test(OrdinalRegression().fit(X[:, 1:], y))  # without x0
    >>> test.df, bool(test.pvalue < 0.05)
    (1, True)
    """

    kind = "Likelihood-ratio test"


@dataclass(frozen=True)
class Summary:
    """A coefficient table with a header; ``str()`` gives text, ``_repr_html_`` HTML.

    Examples
    --------
    >>> from fedgrain import OrdinalRegression
    >>> from fedgrain.datasets import make_ordinal
    >>> X, y, *_ = make_ordinal(2000, 2, 3, random_state=0)
    >>> summary = OrdinalRegression().fit(X, y).summary()
    >>> list(summary.to_frame().columns)[:4]
    ['coef', 'std err', 'z', 'P>|z|']
    >>> summary.as_html().startswith("<")
    True
    """

    title: str
    info: tuple[tuple[str, str], ...]
    table: pd.DataFrame
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Further summaries shown after this one (an adaptive model's random-effects summary).
    sections: tuple[Summary, ...] = field(default_factory=tuple)

    def to_frame(self) -> pd.DataFrame:
        """The table: one row per parameter; coef, se, z, p and the interval bounds."""
        return self.table.copy()

    def as_text(self) -> str:
        t = self.table
        names = [str(i) for i in t.index]
        wn = max([len(n) for n in names] + [9])
        cols = list(t.columns)
        header = f"{'':<{wn}}" + "".join(f"{c:>11}" for c in cols)
        rule = "=" * len(header)
        lines = [self.title.center(len(header))]
        if self.info:
            lines.append(rule)
        half = (len(self.info) + 1) // 2
        left, right = self.info[:half], self.info[half:]
        cw = len(header) // 2
        for i in range(half):
            a = f"{left[i][0] + ':':<22}{left[i][1]:>{cw - 24}}  "
            b = f"{right[i][0] + ':':<22}{right[i][1]:>{cw - 24}}" if i < len(right) else ""
            lines.append((a + b).rstrip())
        lines += [rule, header, "-" * len(header)]
        for n, (_, row) in zip(names, t.iterrows(), strict=True):
            cells = []
            for c in cols:
                v = row[c]
                cells.append(f"{_cell(c, v):>11}")
            lines.append(f"{n:<{wn}}" + "".join(cells))
        lines.append(rule)
        lines += list(self.notes)
        for section in self.sections:
            lines += ["", section.as_text()]
        return "\n".join(lines)

    def as_html(self) -> str:
        info = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in self.info
        )
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        table = self.table.to_html(float_format=lambda v: f"{v:.4g}", border=0)
        more = "".join(section.as_html() for section in self.sections)
        return (f"<div class='fedgrain-summary'><h4>{html.escape(self.title)}</h4>"
                f"<table>{info}</table>{table}{notes}</div>{more}")

    def __str__(self) -> str:
        return self.as_text()

    def _repr_html_(self) -> str:
        return self.as_html()


class LabelledResults:
    """:class:`OrdinalResults`' estimates as pandas objects indexed by parameter name.

    Examples
    --------
    >>> import numpy as np
    >>> r = OrdinalResults(np.array([0.5, -1.0, 1.0]), np.diag([0.01, 0.04, 0.04]),
    ...                    ["x"], ["low", "mid", "high"])
    >>> r.labelled.params["x"], list(r.labelled.conf_int().columns)
    (np.float64(0.5), ['lower', 'upper'])
    """

    def __init__(self, results: OrdinalResults):
        self._r = results
        self._index = pd.Index(results.param_names, name="parameter")

    def _series(self, values, name: str) -> pd.Series:
        return pd.Series(np.asarray(values, dtype=float), index=self._index, name=name)

    @property
    def params(self) -> pd.Series:
        return self._series(self._r.params, "coef")

    @property
    def bse(self) -> pd.Series:
        return self._series(self._r.bse, "std err")

    @property
    def zvalues(self) -> pd.Series:
        return self._series(self._r.zvalues, "z")

    @property
    def pvalues(self) -> pd.Series:
        return self._series(self._r.pvalues, "P>|z|")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        ci = self._r.conf_int(alpha)
        return pd.DataFrame({"lower": ci[:, 0], "upper": ci[:, 1]}, index=self._index)


class OrdinalResults:
    """Estimates and their covariance, with the inference that follows.

    Parameters
    ----------
    params : ndarray of shape (d,)
        ``(coefficients, thresholds)``.
    cov : ndarray of shape (d, d)
    feature_names : sequence of str
    classes : sequence
        The ordered levels; thresholds are named ``"a|b"`` between consecutive levels.
    info : dict
        Extra header lines for the summary (method, rows, subsets, heterogeneity, ...).
    heterogeneity : dict, optional
        ``q_param``, ``i2_param`` and ``n_contrib`` arrays over the parameters (pooled fits),
        shown as extra columns of the table.

    Examples
    --------
    >>> import numpy as np
    >>> r = OrdinalResults(np.array([0.5, -1.0, 1.0]), np.diag([0.01, 0.04, 0.04]),
    ...                    ["x"], ["low", "mid", "high"])
    >>> r.bse.round(2).tolist()
    [0.1, 0.2, 0.2]
    >>> r.param_names
    ['x', 'low|mid', 'mid|high']
    """

    def __init__(
        self,
        params: np.ndarray,
        cov: np.ndarray,
        feature_names: Sequence[str],
        classes: Sequence,
        *,
        title: str = "Ordinal regression (cumulative logit)",
        info: dict | None = None,
        heterogeneity: dict | None = None,
        link: str = "logit",
    ):
        self.link = link
        self.params = np.asarray(params, dtype=float)
        self.cov = np.asarray(cov, dtype=float)
        self.feature_names = [str(f) for f in feature_names]
        self.classes = list(classes)
        self.title = title
        self.info = dict(info or {})
        self.heterogeneity = heterogeneity

    # ---- basic quantities ------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def param_names(self) -> list[str]:
        return parameter_names(self.feature_names, self.classes)

    @property
    def coef(self) -> np.ndarray:
        return self.params[: self.n_features]

    @property
    def thresholds(self) -> np.ndarray:
        return self.params[self.n_features :]

    @property
    def bse(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.diag(self.cov), 0.0))

    @property
    def zvalues(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.params / self.bse

    @property
    def pvalues(self) -> np.ndarray:
        return 2.0 * stats.norm.sf(np.abs(self.zvalues))

    def conf_int(self, alpha: float = 0.05) -> np.ndarray:
        """Wald intervals, shape ``(d, 2)``."""
        _check_alpha(alpha)
        z = stats.norm.isf(alpha / 2)
        return np.column_stack([self.params - z * self.bse, self.params + z * self.bse])

    @property
    def labelled(self) -> LabelledResults:
        """The same quantities as pandas objects indexed by parameter name: ``params``,
        ``bse``, ``zvalues``, ``pvalues`` (Series) and ``conf_int(alpha)`` (a DataFrame with
        ``lower`` and ``upper``), as statsmodels returns them for pandas input."""
        return LabelledResults(self)

    # ---- joint inference -------------------------------------------------------------------
    def _index(self, names) -> np.ndarray:
        allnames = self.param_names
        out = []
        for n in names:
            if isinstance(n, (int, np.integer)):
                if not 0 <= n < len(allnames):
                    raise ValueError(f"parameter index {n} is out of range 0..{len(allnames) - 1}")
                out.append(int(n))
            elif n in allnames:
                out.append(allnames.index(n))
            else:
                raise ValueError(f"unknown parameter {n!r}; the parameters are {allnames}")
        return np.asarray(out, dtype=np.intp)

    def wald_test(self, R=None, q=None) -> WaldTest:
        """Joint Wald test of ``R params = q`` (chi-square).

        ``R`` is a list of parameter names (or indices) to test jointly equal to zero; a
        hypothesis written as text, ``"age = income"`` or ``"age + 2*income = 1"`` (a list of
        such strings is one joint test); or a 2-D restriction matrix of shape ``(r, d)``, with
        ``q`` (default zeros).

        Examples
        --------
        ``res.wald_test(["age", "income"])`` tests that both slopes are zero;
        ``res.wald_test("age = income")`` that they are equal.
        """
        d = self.params.shape[0]
        if R is None:
            R = list(range(self.n_features))
        if isinstance(R, (list, tuple)) and any(isinstance(r, str) and "=" in r for r in R) \
                and not all(isinstance(r, str) and "=" in r for r in R):
            raise ValueError("write every restriction of a list as text with '=' ('x = 0'), "
                             "or give parameter names only")
        if isinstance(R, str) or (isinstance(R, (list, tuple)) and R
                                  and all(isinstance(r, str) and "=" in r for r in R)):
            if q is not None:
                raise ValueError("q goes with a matrix R; a hypothesis written as text holds "
                                 "its own constants ('age + 2*income = 1')")
            exprs = [R] if isinstance(R, str) else list(R)
            rows = [self._parse_restriction(e) for e in exprs]
            Rm = np.array([r for r, _ in rows])
            qv = np.array([c for _, c in rows])
            stat, df = wald(Rm @ self.params - qv, Rm @ self.cov @ Rm.T)
            return WaldTest(stat, df, chi2_sf(stat, df), ", ".join(e.strip() for e in exprs))
        if isinstance(R, (list, tuple)) and all(isinstance(r, (str, int, np.integer)) for r in R):
            if not R:
                raise ValueError("name at least one parameter to test")
            idx = self._index(R)
            if np.unique(idx).size != idx.size:
                raise ValueError(
                    f"parameters listed twice in {list(R)}; to test a linear combination pass "
                    "R as a 2-D matrix (one row per restriction)"
                )
            names = [self.param_names[i] for i in idx]
            Rm = np.zeros((idx.size, d))
            Rm[np.arange(idx.size), idx] = 1.0
            label = " = ".join(names) + " = 0" if len(names) > 1 else f"{names[0]} = 0"
        else:
            Rm = np.asarray(R, dtype=float)
            if Rm.ndim != 2:
                raise ValueError("R must be a list of parameter names or a 2-D matrix")
            if Rm.shape[1] != d:
                raise ValueError(f"R must have {d} columns (one per parameter); got {Rm.shape[1]}")
            label = "R params = q"
        qv = np.zeros(Rm.shape[0]) if q is None else np.atleast_1d(np.asarray(q, dtype=float))
        if qv.shape[0] != Rm.shape[0]:
            raise ValueError(f"q must have {Rm.shape[0]} entries; got {qv.shape[0]}")
        stat, df = wald(Rm @ self.params - qv, Rm @ self.cov @ Rm.T)
        return WaldTest(stat, df, chi2_sf(stat, df), label)

    def _parse_restriction(self, text: str) -> tuple[np.ndarray, float]:
        """One linear restriction written as text: ``"age = income"``, ``"age + 2*income =
        0"``, ``"0.5*x1 - x2 = 1"``, several comma-separated in one string being separate
        restrictions is handled by the caller. Parameter names (features and thresholds
        ``"a|b"``) are matched longest first, so names holding ``-`` or ``|`` work. Returns the
        row ``r`` and constant ``c`` of ``r' params = c``."""
        names = self.param_names
        order = sorted(range(len(names)), key=lambda i: -len(names[i]))
        sides = text.split("=")
        if len(sides) == 1:
            sides.append("0")
        if len(sides) != 2:
            raise ValueError(f"{text!r}: write one '=' per restriction (several restrictions "
                             "as a list of strings)")
        row = np.zeros(len(names))
        const = 0.0
        for side, sign in ((sides[0], 1.0), (sides[1], -1.0)):
            if not side.strip():
                raise ValueError(f"{text!r}: a side of '=' is empty")
            r, c = self._parse_linear(side, names, order, text)
            row += sign * r
            const -= sign * c
        if not np.any(row):
            raise ValueError(f"{text!r} names no parameter; the parameters are {names}")
        return row, const

    @staticmethod
    def _parse_linear(side: str, names, order, text: str) -> tuple[np.ndarray, float]:
        """``sum_i coef_i * name_i + constant`` from text (see :meth:`_parse_restriction`)."""
        import re

        number = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
        row = np.zeros(len(names))
        const = 0.0
        i, n = 0, len(side)
        expect_term = True
        sign = 1.0
        while True:
            while i < n and side[i].isspace():
                i += 1
            if i >= n:
                break
            starts_name = any(side.startswith(names[k], i) for k in order)
            if expect_term and side[i] in "+-" and not starts_name:
                sign *= -1.0 if side[i] == "-" else 1.0
                i += 1
                continue
            if not expect_term:
                if side[i] not in "+-":
                    raise ValueError(f"{text!r}: expected '+' or '-' at {side[i:]!r}")
                sign = -1.0 if side[i] == "-" else 1.0
                i += 1
                expect_term = True
                continue
            coef, name = 1.0, None
            hit = next((k for k in order if side.startswith(names[k], i)), None)
            m = number.match(side, i)
            if hit is not None and (m is None or len(names[hit]) >= m.end() - i):
                name, i = hit, i + len(names[hit])
                j = i
                while j < n and side[j].isspace():
                    j += 1
                if j < n and side[j] == "*":  # name * number (signed)
                    j += 1
                    while j < n and side[j].isspace():
                        j += 1
                    neg = j < n and side[j] in "+-"
                    sgn = -1.0 if neg and side[j] == "-" else 1.0
                    m2 = number.match(side, j + 1 if neg else j)
                    if m2 is None:
                        raise ValueError(f"{text!r}: expected a number after '*'")
                    coef, i = sgn * float(m2.group(0)), m2.end()
            elif m is not None:
                coef, i = float(m.group(0)), m.end()
                j = i
                while j < n and side[j].isspace():
                    j += 1
                if j < n and side[j] == "*":  # number * name
                    j += 1
                    while j < n and side[j].isspace():
                        j += 1
                    hit = next((k for k in order if side.startswith(names[k], j)), None)
                    if hit is None:
                        raise ValueError(f"{text!r}: unknown parameter at {side[j:]!r}; the "
                                         f"parameters are {names}")
                    name, i = hit, j + len(names[hit])
            else:
                raise ValueError(f"{text!r}: unknown parameter at {side[i:]!r}; the "
                                 f"parameters are {names}")
            if name is None:
                const += sign * coef
            else:
                row[name] += sign * coef
            sign = 1.0
            expect_term = False
        if expect_term and (np.any(row) or const):
            raise ValueError(f"{text!r}: it ends with an operator")
        return row, const

    def simultaneous_conf_int(self, alpha: float = 0.05, method: str = "max-z",
                              params=None) -> np.ndarray:
        """Intervals that hold jointly with probability ``1 - alpha``.

        ``method="bonferroni"`` splits alpha evenly; ``"max-z"`` uses the ``1 - alpha`` quantile
        of ``max |Z_j|`` under the estimated correlation (simulated with a fixed seed, so the
        same every time), which is never wider than Bonferroni. ``params`` restricts the family
        to some parameters (names or indices); the rows returned follow it.
        """
        _check_alpha(alpha)
        idx = np.arange(self.params.shape[0]) if params is None else self._index(params)
        se = self.bse[idx]
        m = idx.size
        if method == "bonferroni":
            crit = stats.norm.isf(alpha / (2 * m))
        elif method == "max-z":
            C = self.cov[np.ix_(idx, idx)] / np.outer(se, se)
            vals, vecs = np.linalg.eigh(C)
            L = vecs * np.sqrt(np.maximum(vals, 0.0))
            rng = np.random.default_rng(0)
            step = max(1, 2_000_000 // m)  # draws per block: at most 16 MB at a time
            maxima = np.concatenate([
                np.abs(rng.standard_normal((min(step, MAXZ_DRAWS - a), m)) @ L.T).max(axis=1)
                for a in range(0, MAXZ_DRAWS, step)
            ])
            crit = float(np.quantile(maxima, 1 - alpha))
        else:
            raise ValueError(f"method must be 'bonferroni' or 'max-z'; got {method!r}")
        p = self.params[idx]
        return np.column_stack([p - crit * se, p + crit * se])

    def predict_proba_ci(self, X: np.ndarray, alpha: float = 0.05):
        """Class probabilities with delta-method intervals for already-encoded ``X``.

        Intervals are built on the logit scale of each probability and mapped back, so they
        stay inside (0, 1); probabilities far in the tails keep their relative precision.
        Returns ``(proba, lower, upper)``, each of shape ``(n, K)``.
        """
        _check_alpha(alpha)
        X = np.asarray(X, dtype=float)
        p, n = self.n_features, X.shape[0]
        eta = X @ self.coef
        link = get_link(self.link)
        proba = class_proba(eta, self.thresholds, link)
        a = self.thresholds[None, :] - eta[:, None]
        f = link.pdf(a)  # the density at each cut, (n, K-1)
        fpad = np.concatenate([np.zeros((n, 1)), f, np.zeros((n, 1))], axis=1)
        K1 = f.shape[1]
        z = stats.norm.isf(alpha / 2)
        lower = np.empty_like(proba)
        upper = np.empty_like(proba)
        for k in range(K1 + 1):
            # d pi_k / d beta = -x (f_k - f_{k-1}); d / d theta_k = f_k;
            # d pi_k / d theta_{k-1} = -f_{k-1}
            G = np.zeros((n, p + K1))
            G[:, :p] = -X * (fpad[:, k + 1] - fpad[:, k])[:, None]
            if k < K1:
                G[:, p + k] = f[:, k]
            if k > 0:
                G[:, p + k - 1] -= f[:, k - 1]
            sd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", G, self.cov, G), 0.0))
            pk = proba[:, k]
            qk = proba[:, :k].sum(axis=1) + proba[:, k + 1 :].sum(axis=1)  # 1 - pk, exactly
            inside = (pk > 0) & (qk > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                lg = np.log(pk) - np.log(qk)
                se_logit = sd / (pk * qk)
                lower[:, k] = np.where(inside, expit(lg - z * se_logit), pk)
                upper[:, k] = np.where(inside, expit(lg + z * se_logit), pk)
        return proba, lower, upper

    def marginal_effects(self, X: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
        """Average marginal effects of each feature on each class's probability, for
        already-encoded ``X``, with delta-method standard errors.

        ``dy/dx`` of feature ``j`` on class ``k`` is the mean over the rows of ``d pi_k /
        d x_j = -coef_j (f(theta_k - eta) - f(theta_{k-1} - eta))`` (``f`` the logistic
        density; the effects on the ``K`` classes sum to zero). Its gradient in the
        parameters is exact, so the standard error is ``sqrt(g' cov g)``. For a one-hot column
        (a level of a categorical feature) it is the derivative, not the discrete change.
        Returns a frame indexed by ``(feature, level)`` with ``dy/dx``, ``std err``, ``z``,
        ``P>|z|`` and the ``1 - alpha`` interval.
        """
        _check_alpha(alpha)
        X = np.asarray(X, dtype=float)
        n, p = X.shape
        if n == 0:
            raise ValueError("marginal effects average over rows; X has none")
        beta, theta = self.coef, self.thresholds
        K1 = theta.shape[0]
        a = theta[None, :] - (X @ beta)[:, None]
        link = get_link(self.link)
        f = link.pdf(a)
        fp = f * link.ratio(a)  # f'

        def diff(v):  # per class: v at its upper cut minus v at its lower cut
            pad = np.concatenate([np.zeros((n, 1)), v, np.zeros((n, 1))], axis=1)
            return pad[:, 1:] - pad[:, :-1]  # (n, K)

        D, Dp = diff(f), diff(fp)
        mD = D.mean(axis=0)  # (K,)
        ame = -beta[:, None] * mD[None, :]  # (p, K)
        K = K1 + 1
        G = np.zeros((p, K, p + K1))
        G[:, :, :p] = beta[:, None, None] * ((X.T @ Dp) / n).T[None, :, :]
        G[np.arange(p), :, np.arange(p)] -= mD[None, :]
        mfp = fp.mean(axis=0)
        for k in range(K):
            if k < K1:
                G[:, k, p + k] -= beta * mfp[k]
            if k > 0:
                G[:, k, p + k - 1] += beta * mfp[k - 1]
        G = G.reshape(p * K, -1)
        se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", G, self.cov, G), 0.0))
        est = ame.reshape(-1)
        z = stats.norm.isf(alpha / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            zval = np.where(se > 0, est / se, np.nan)  # an effect rounded to 0: no test
        index = pd.MultiIndex.from_product([self.feature_names, [str(c) for c in self.classes]],
                                           names=["feature", "level"])
        return pd.DataFrame({"dy/dx": est, "std err": se, "z": zval,
                             "P>|z|": 2.0 * stats.norm.sf(np.abs(zval)),
                             f"[{alpha / 2:.3g}": est - z * se,
                             f"{1 - alpha / 2:.3g}]": est + z * se}, index=index)

    # ---- tables ----------------------------------------------------------------------------
    def summary(self, alpha: float = 0.05) -> Summary:
        """Coefficient table: coef, std err, z, P>|z| and the ``1 - alpha`` interval.

        Pooled fits add per-parameter heterogeneity: I^2 across subsets and how many subsets
        carried information about the parameter.
        """
        ci = self.conf_int(alpha)
        lo = f"[{alpha / 2:.3g}"
        hi = f"{1 - alpha / 2:.3g}]"
        table = pd.DataFrame(
            {"coef": self.params, "std err": self.bse, "z": self.zvalues, "P>|z|": self.pvalues,
             lo: ci[:, 0], hi: ci[:, 1]},
            index=pd.Index(self.param_names, name="parameter"),
        )
        if self.heterogeneity is not None:
            table["I2"] = self.heterogeneity["i2_param"]
            table["n_subsets"] = self.heterogeneity["n_contrib"]
        info = tuple((k, str(v)) for k, v in self.info.items())
        F = {"logit": "sigmoid", "probit": "Phi (standard normal)",
             "cloglog": "F(a) = 1 - exp(-exp(a))", "loglog": "F(a) = exp(-exp(-a))",
             "cauchit": "F (Cauchy)"}.get(self.link, self.link)
        notes = (
            "Thresholds: P(Y <= k | x) = sigmoid(threshold_k - x'coef)." if self.link == "logit"
            else f"Thresholds: P(Y <= k | x) = F(threshold_k - x'coef), {F}.",
        )
        return Summary(self.title, info, table, notes)

    def __repr__(self) -> str:
        return f"<OrdinalResults: {len(self.param_names)} parameters>"


def _cell(column: str, v: float) -> str:
    """One table cell: p-values R-style, counts as integers, small numbers in significant digits."""
    if column in ("P>|z|", "P>chi2"):
        return "<2e-16" if v < 2e-16 else (f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}")
    if column in ("n_subsets", "df"):
        return f"{int(v):d}"
    if v != 0 and abs(v) < 1e-3 or abs(v) >= 1e6:
        return f"{v:.4g}"
    return f"{v:.4f}"


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (float, int)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be a number in (0, 1); got {alpha!r}")
