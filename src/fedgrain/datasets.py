"""Real ordinal data sets that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import pandas as pd

from .exceptions import FedgrainError

RANDHIE_LEVELS = ("poor", "fair", "good", "excellent")
RANDHIE_FEATURES = ("lncoins", "idp", "lpi", "fmde", "physlm", "disea", "mdvis")


def load_randhie() -> pd.DataFrame:
    """The RAND Health Insurance Experiment data: 20,190 people, self-rated health in 4 levels.

    Taken from the copy inside statsmodels (public domain; ``pip install 'fedgrain[demo]'``).
    The target ``health`` is an ordered categorical poor < fair < good < excellent, built from
    the data's ``hlthg`` / ``hlthf`` / ``hlthp`` indicators (excellent is the omitted level).
    Features: ``lncoins`` (log coinsurance + 1), ``idp`` (individual deductible plan), ``lpi``
    (log participation incentive), ``fmde`` (log maximum dollar expenditure), ``physlm``
    (physical limitation), ``disea`` (number of chronic diseases), ``mdvis`` (outpatient visits).
    """
    try:
        from statsmodels.datasets import randhie
    except ImportError:
        raise FedgrainError(
            "The demo data ship with statsmodels, which is not installed; run "
            "pip install 'fedgrain[demo]' (or make demo)."
        ) from None
    raw = randhie.load_pandas().data
    level = (raw["hlthg"] * 1 + raw["hlthf"] * 2 + raw["hlthp"] * 3).map(
        {0: "excellent", 1: "good", 2: "fair", 3: "poor"}
    )
    frame = raw.loc[:, list(RANDHIE_FEATURES)].astype(float)
    frame["health"] = pd.Categorical(level, categories=list(RANDHIE_LEVELS), ordered=True)
    return frame


def make_ordinal(
    n_samples: int = 1000,
    n_features: int = 20,
    n_classes: int = 5,
    *,
    n_informative: int | None = None,
    rho: float = 0.5,
    mean: float = 0.0,
    random_state: int | None = 0,
):
    """Simulate proportional-odds data with known truth.

    Features are Gaussian with AR(1) correlation ``rho**|i - j|`` (plus ``mean``); the first
    ``n_informative`` slopes (default: a quarter of the features, at least one) alternate in
    sign with sizes between 1 and 0.25, the rest are zero; the ``K - 1`` thresholds are spread
    evenly over +-2 latent standard deviations. ``y = #{k : theta_k < x'beta + e}`` with
    logistic ``e``.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of int, values 0 .. n_classes - 1
    coef : ndarray of shape (n_features,)
    thresholds : ndarray of shape (n_classes - 1,)
    """
    import numpy as np

    rng = np.random.default_rng(random_state)
    p = n_features
    k = max(1, p // 4) if n_informative is None else n_informative
    coef = np.zeros(p)
    coef[:k] = np.linspace(1.0, 0.25, k) * np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
    # AR(1) features by the recursion x_j = rho x_{j-1} + sqrt(1 - rho^2) z_j, in place.
    X = rng.standard_normal((n_samples, p))
    c = np.sqrt(1.0 - rho * rho)
    for j in range(1, p):
        X[:, j] *= c
        X[:, j] += rho * X[:, j - 1]
    cov = rho ** np.abs(np.subtract.outer(np.arange(p), np.arange(p)))
    sd = np.sqrt(coef @ cov @ coef + np.pi**2 / 3)
    thresholds = np.linspace(-2.0, 2.0, n_classes - 1) * sd / 1.5 + mean * coef.sum()
    latent = X @ coef + rng.logistic(size=n_samples)
    if mean:
        X += mean
        latent += mean * coef.sum()
    y = np.searchsorted(thresholds, latent)
    return X, y, coef, thresholds


def make_regions(
    n_samples: int = 20_000,
    n_features: int = 5,
    n_classes: int = 4,
    n_regions: int = 3,
    *,
    separation: float = 6.0,
    heterogeneity: float = 1.0,
    weights=None,
    random_state: int | None = 0,
):
    """Simulate ordinal data from regions of feature space with different true models.

    Region ``r`` is a Gaussian blob (unit covariance) centred at ``separation`` times the
    ``r``-th vertex of a regular simplex-like set of directions (coordinate axes, then their
    negatives), with its own slopes ``coef[r] = base + heterogeneity * N(0, I)`` and thresholds
    spread over the region's own latent range plus ``heterogeneity`` times a random shift.
    ``heterogeneity=0`` gives one model everywhere (regions in the features only).

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of int, values 0 .. n_classes - 1
    region : ndarray of int, the true region of each row
    coef : ndarray of shape (n_regions, n_features)
    thresholds : ndarray of shape (n_regions, n_classes - 1)
    """
    import numpy as np

    rng = np.random.default_rng(random_state)
    p, R = n_features, n_regions
    if R > 2 * p:
        raise ValueError(f"make_regions places at most 2 * n_features = {2 * p} regions; "
                         f"got n_regions={R}.")
    prob = np.full(R, 1.0 / R) if weights is None else np.asarray(weights, float) / np.sum(
        weights)
    region = rng.choice(R, size=n_samples, p=prob)
    centres = np.zeros((R, p))
    for r in range(R):
        centres[r, r % p] = separation * (1.0 if r < p else -1.0)
    X = rng.standard_normal((n_samples, p)) + centres[region]
    base = np.linspace(1.0, -0.5, p)
    coef = base + heterogeneity * rng.standard_normal((R, p))
    sd = np.sqrt((coef**2).sum(axis=1) + np.pi**2 / 3)
    spread = np.linspace(-1.5, 1.5, n_classes - 1)
    shift = heterogeneity * rng.standard_normal(R)
    # each region's thresholds follow its own latent range as heterogeneity grows to 1; at 0
    # they are common to all regions (one model everywhere)
    h = min(heterogeneity, 1.0)
    middle = (1 - h) * (centres @ base).mean() + h * ((centres * coef).sum(axis=1) + shift)
    sd = (1 - h) * np.sqrt(base @ base + np.pi**2 / 3) + h * sd
    thresholds = middle[:, None] + spread * sd[:, None]
    latent = np.einsum("ij,ij->i", X, coef[region]) + rng.logistic(size=n_samples)
    y = (latent[:, None] > thresholds[region]).sum(axis=1)
    return X, y, region, coef, thresholds
