"""Link functions of the cumulative model ``P(Y <= k | x) = F(theta_k - x'beta)``.

Each link is a distribution function ``F`` with what the exact likelihood needs, every one
accurate in both tails: ``log F``, ``log(1 - F)``, ``log f`` (the density) and ``r = f' / f``.
The names and conventions are those of R's ``ordinal::clm`` and statsmodels' ``OrderedModel``:

============  ==========================================  ==================================
``logit``     ``1 / (1 + exp(-a))``                        the default; odds ratios
``probit``    standard normal ``Phi(a)``                  a latent normal variable
``cloglog``   ``1 - exp(-exp(a))`` (Gumbel minimum)        ratings grouped from a continuous
                                                            hazard (proportional hazards)
``loglog``    ``exp(-exp(-a))`` (Gumbel maximum)           its mirror image
``cauchit``   ``1/2 + arctan(a) / pi``                     heavy tails: robust to outliers
============  ==========================================  ==================================
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_ndtr, ndtr, ndtri

LINKS = ("logit", "probit", "cloglog", "loglog", "cauchit")
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Maechler's switch)."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


class Link:
    """One link's functions, vectorised over ``a``; see the module docstring."""

    name = "logit"

    def cdf(self, a):
        return expit(a)

    def sf(self, a):
        return expit(-a)

    def logcdf(self, a):
        return -np.logaddexp(0.0, -np.asarray(a, dtype=float))

    def logsf(self, a):
        return -np.logaddexp(0.0, np.asarray(a, dtype=float))

    def logpdf(self, a):
        return self.logcdf(a) + self.logsf(a)

    def pdf(self, a):
        return expit(a) * expit(-np.asarray(a, dtype=float))  # both tails keep their digits

    def ratio(self, a):
        """``f'(a) / f(a)``."""
        return expit(-np.asarray(a, dtype=float)) - expit(a)

    def log_rhazard(self, a):
        """``log(f(a) / F(a))``, accurate where ``F`` is small and where it is near 1."""
        return self.logsf(a)

    def log_hazard(self, a):
        """``log(f(a) / (1 - F(a)))``, accurate in both tails."""
        return self.logcdf(a)

    def hazard_slope(self, a):
        """``d log h / da = f'/f + h`` for the hazard ``h = f / (1 - F)``: the composite
        likelihood's curvature for a binary row above its cut is ``h * hazard_slope``."""
        return expit(-np.asarray(a, dtype=float))

    def rhazard_slope(self, a):
        """``d log g / da = f'/f - g`` for the reversed hazard ``g = f / F``."""
        return -expit(a)

    def ppf(self, q):
        q = np.asarray(q, dtype=float)
        return np.log(q) - np.log1p(-q)


class _Slopes:
    """The hazards' log-slopes from their definitions, ``r + h`` and ``r - g`` (the logit's
    are in closed form on :class:`Link`; a link overrides those it has exactly)."""

    def hazard_slope(self, a):
        return self.ratio(a) + np.exp(self.log_hazard(a))

    def rhazard_slope(self, a):
        return self.ratio(a) - np.exp(self.log_rhazard(a))


class Probit(_Slopes, Link):
    name = "probit"

    def cdf(self, a):
        return ndtr(a)

    def sf(self, a):
        return ndtr(-np.asarray(a, dtype=float))

    def logcdf(self, a):
        return log_ndtr(a)

    def logsf(self, a):
        return log_ndtr(-np.asarray(a, dtype=float))

    def logpdf(self, a):
        a = np.asarray(a, dtype=float)
        return -0.5 * a * a - _LOG_SQRT_2PI

    def pdf(self, a):
        return np.exp(self.logpdf(a))

    def ratio(self, a):
        return -np.asarray(a, dtype=float)

    def log_rhazard(self, a):
        return self.logpdf(a) - self.logcdf(a)

    def log_hazard(self, a):
        return self.logpdf(a) - self.logsf(a)

    def ppf(self, q):
        return ndtri(q)


class CLogLog(_Slopes, Link):
    name = "cloglog"

    def cdf(self, a):
        with np.errstate(over="ignore"):
            return -np.expm1(-np.exp(a))

    def sf(self, a):
        with np.errstate(over="ignore"):
            return np.exp(-np.exp(a))

    def logcdf(self, a):
        with np.errstate(over="ignore"):
            return _log1mexp(-np.exp(a))

    def logsf(self, a):
        with np.errstate(over="ignore"):
            return -np.exp(a)

    def logpdf(self, a):
        a = np.asarray(a, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):
            out = a - np.exp(a)
        return np.where(np.isposinf(a), -np.inf, out)

    def pdf(self, a):
        return np.exp(self.logpdf(a))

    def ratio(self, a):
        with np.errstate(over="ignore"):
            return 1.0 - np.exp(a)

    def log_rhazard(self, a):
        a = np.asarray(a, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):
            return a - np.exp(a) - self.logcdf(a)

    def log_hazard(self, a):
        return np.asarray(a, dtype=float)  # f / (1 - F) = exp(a) exactly

    def hazard_slope(self, a):
        return np.ones_like(np.asarray(a, dtype=float))  # the hazard exp(a) is its own slope

    def ppf(self, q):
        return np.log(-np.log1p(-np.asarray(q, dtype=float)))


class LogLog(_Slopes, Link):
    name = "loglog"

    def cdf(self, a):
        with np.errstate(over="ignore"):
            return np.exp(-np.exp(-np.asarray(a, dtype=float)))

    def sf(self, a):
        with np.errstate(over="ignore"):
            return -np.expm1(-np.exp(-np.asarray(a, dtype=float)))

    def logcdf(self, a):
        with np.errstate(over="ignore"):
            return -np.exp(-np.asarray(a, dtype=float))

    def logsf(self, a):
        with np.errstate(over="ignore"):
            return _log1mexp(-np.exp(-np.asarray(a, dtype=float)))

    def logpdf(self, a):
        a = np.asarray(a, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):
            out = -a - np.exp(-a)
        return np.where(np.isneginf(a), -np.inf, out)

    def pdf(self, a):
        return np.exp(self.logpdf(a))

    def ratio(self, a):
        with np.errstate(over="ignore"):
            return np.exp(-np.asarray(a, dtype=float)) - 1.0

    def log_rhazard(self, a):
        return -np.asarray(a, dtype=float)  # f / F = exp(-a) exactly

    def rhazard_slope(self, a):
        return -np.ones_like(np.asarray(a, dtype=float))

    def log_hazard(self, a):
        a = np.asarray(a, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):
            return -a - np.exp(-a) - self.logsf(a)

    def ppf(self, q):
        return -np.log(-np.log(np.asarray(q, dtype=float)))


class Cauchit(_Slopes, Link):
    name = "cauchit"

    def cdf(self, a):
        return np.arctan2(1.0, -np.asarray(a, dtype=float)) / np.pi

    def sf(self, a):
        return np.arctan2(1.0, np.asarray(a, dtype=float)) / np.pi

    def logcdf(self, a):
        with np.errstate(divide="ignore"):
            return np.log(self.cdf(a))

    def logsf(self, a):
        with np.errstate(divide="ignore"):
            return np.log(self.sf(a))

    def logpdf(self, a):
        a = np.asarray(a, dtype=float)
        return -np.log(np.pi) - np.log1p(a * a)

    def pdf(self, a):
        a = np.asarray(a, dtype=float)
        return 1.0 / (np.pi * (1.0 + a * a))

    def ratio(self, a):
        a = np.asarray(a, dtype=float)
        return -2.0 * a / (1.0 + a * a)

    def log_rhazard(self, a):
        return self.logpdf(a) - self.logcdf(a)

    def log_hazard(self, a):
        return self.logpdf(a) - self.logsf(a)

    def ppf(self, q):
        # tan(pi (q - 1/2)) = -1 / tan(pi q): no rounding of q - 1/2 in the tails
        q = np.asarray(q, dtype=float)
        with np.errstate(divide="ignore"):
            return np.where(q < 0.5, -1.0 / np.tan(np.pi * q), 1.0 / np.tan(np.pi * (1.0 - q)))


_BY_NAME = {c.name: c() for c in (Link, Probit, CLogLog, LogLog, Cauchit)}


def get_link(name) -> Link:
    """The link called ``name`` (a :class:`Link` is returned as it is)."""
    if isinstance(name, Link):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"link must be one of {LINKS}; got {name!r}") from None
