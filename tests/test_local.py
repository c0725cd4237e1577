"""One subset's options: penalty choice, de-biasing, variance, identification."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgrain import DivideConquerOrdinal
from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import make_ordinal
from fedgrain.inference.local import LocalSettings, fit_local
from fedgrain.inference.pooling import pool


@pytest.fixture(scope="module")
def shard():
    X, y, coef, thr = make_ordinal(3000, 12, 4, n_informative=3, random_state=9)
    return Standardizer.fit(X).transform(X.copy()), y, coef


@pytest.mark.parametrize("alpha", ["cv", "bic"])
def test_data_driven_penalties_pick_a_path_value_and_are_reproducible(shard, alpha):
    X, y, _ = shard
    s = LocalSettings(n_classes=4, alpha=alpha)
    a, b = fit_local(X, y, None, s, seed=1), fit_local(X, y, None, s, seed=1)
    assert a.alpha == b.alpha and np.array_equal(a.estimate, b.estimate)
    assert 0 < a.alpha < 1
    rate = fit_local(X, y, None, LocalSettings(n_classes=4), seed=1)
    # whatever the penalty, the de-biased estimates agree to a fraction of a standard error
    se = np.sqrt(np.diag(rate.cov))
    assert np.max(np.abs(a.estimate - rate.estimate) / se) < 0.5


def test_bic_is_sparser_than_cv(shard):
    X, y, _ = shard
    cv = fit_local(X, y, None, LocalSettings(n_classes=4, alpha="cv"), seed=0)
    bic = fit_local(X, y, None, LocalSettings(n_classes=4, alpha="bic"), seed=0)
    assert bic.alpha >= cv.alpha
    assert np.count_nonzero(bic.lasso[:12]) <= np.count_nonzero(cv.lasso[:12])


def test_fixed_penalty_is_used_as_given_and_zero_is_the_mle(shard):
    X, y, _ = shard
    big = fit_local(X, y, None, LocalSettings(n_classes=4, alpha=0.3))
    assert big.alpha == 0.3 and np.count_nonzero(big.lasso[:12]) < 12
    mle = fit_local(X, y, None, LocalSettings(n_classes=4, alpha=0.0))
    # without a penalty the lasso is the composite MLE and de-biasing does not move it
    np.testing.assert_allclose(mle.estimate, mle.lasso, atol=1e-8)


def test_debias_options_agree_on_well_conditioned_data(shard):
    X, y, _ = shard
    fits = {m: fit_local(X, y, None, LocalSettings(n_classes=4, debias=m))
            for m in ("inverse", "nodewise", "auto")}
    assert fits["auto"].debias == "inverse"
    se = np.sqrt(np.diag(fits["inverse"].cov))
    assert np.max(np.abs(fits["nodewise"].estimate - fits["inverse"].estimate) / se) < 1.0
    ridge = fit_local(X, y, None, LocalSettings(n_classes=4, debias="inverse", ridge=0.5))
    assert not np.allclose(ridge.estimate, fits["inverse"].estimate)


def test_auto_uses_nodewise_when_the_hessian_is_ill_conditioned():
    rng = np.random.default_rng(0)
    X, y, _, _ = make_ordinal(800, 4, 3, random_state=3)
    X = np.c_[X, X[:, 0] + 1e-7 * rng.standard_normal(800)]  # a near copy of column 0
    Xs = Standardizer.fit(X).transform(X.copy())
    fit = fit_local(Xs, y, None, LocalSettings(n_classes=3))
    assert fit.debias == "nodewise"
    assert np.all(np.isfinite(fit.estimate)) and np.all(np.isfinite(fit.cov))


def test_variance_options_order(shard):
    X, y, _ = shard
    se = {v: np.sqrt(np.diag(fit_local(X, y, None, LocalSettings(n_classes=4,
                                                                  variance=v)).cov))
          for v in ("cluster", "sandwich", "model")}
    p = 12
    # each row's K - 1 labels are positively correlated: the cluster sandwich is wider on slopes
    assert np.all(se["cluster"][:p] > se["model"][:p])
    assert np.all(se["cluster"][:p] > se["sandwich"][:p])


def test_penalised_thresholds_run(shard):
    X, y, _ = shard
    fit = fit_local(X, y, None, LocalSettings(n_classes=4, penalize_thresholds=True))
    assert np.all(np.isfinite(fit.estimate))


def test_feature_constant_in_a_subset_enters_through_the_thresholds():
    X, y, coef, thr = make_ordinal(6000, 3, 3, n_informative=3, random_state=1)
    X[:, 2] = (X[:, 2] > 0).astype(float)  # a binary feature
    y = np.searchsorted(thr, X @ coef + np.random.default_rng(1).logistic(size=6000))
    Xs = Standardizer.fit(X).transform(X.copy())
    low = Xs[:, 2] == Xs[:, 2].min()
    settings_ = LocalSettings(n_classes=3)
    fit = fit_local(Xs[low], y[low], None, settings_)
    c = Xs[low, 2][0]
    assert fit.notes == ("feature:2",)
    # the subset's thresholds are theta_k - c beta_2
    np.testing.assert_allclose(fit.design[2:], [[0, 0, -c, 1, 0], [0, 0, -c, 0, 1]])
    # Each half has the feature constant (at different values), so only pooling the halves
    # identifies its slope; the pool must agree with the fit on all rows.
    other = fit_local(Xs[~low], y[~low], None, settings_)
    pooled = pool([fit, other])
    full = fit_local(Xs, y, None, LocalSettings(n_classes=3, alpha=0.0))
    se = np.sqrt(np.diag(full.cov))
    assert np.max(np.abs(pooled.estimate - full.estimate) / se) < 1.0
    assert pooled.q_df == 3  # 4 + 4 coordinates for 5 parameters


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(2, 6), M=st.integers(1, 4))
def test_fitted_models_are_proper_ordinal_models(seed, K, M):
    X, y, _, _ = make_ordinal(400 * M, 3, K, random_state=seed)
    est = DivideConquerOrdinal(n_subsets=M, backend="serial", random_state=seed).fit(X, y)
    assert np.all(np.diff(est.thresholds_) >= 0)
    proba = est.predict_proba(X[:50])
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.all(np.isfinite(est.bse_)) and np.all(est.bse_ > 0)


@pytest.mark.parametrize("penalize_thresholds", [False, True])
def test_lasso_on_a_shifted_subset_solves_the_uncentred_problem(penalize_thresholds):
    """An adaptive leaf's features sit far from the global means; the solver works in centred
    coordinates, but the lasso it returns must satisfy the optimality (KKT) conditions of the
    problem as posed, with the penalty on the original coordinates."""
    from fedgrain.core.likelihood import composite_pass

    X, y, _, _ = make_ordinal(4000, 3, 4, random_state=2)
    Xs = Standardizer.fit(X).transform(X.copy()) + np.array([3.0, -2.0, 1.0])
    alpha = 0.05
    s = LocalSettings(n_classes=4, alpha=alpha, penalize_thresholds=penalize_thresholds,
                      tol=1e-12)
    fit = fit_local(Xs, y, None, s)
    x = fit.lasso
    g = composite_pass(Xs, y, None, x[:3], x[3:], order=1, loss=False).grad / y.shape[0]
    pen = np.r_[Xs.std(axis=0), np.full(3, 1.0 if penalize_thresholds else 0.0)] * alpha
    nonzero = x != 0
    np.testing.assert_allclose(g[nonzero], -pen[nonzero] * np.sign(x[nonzero]), atol=1e-6)
    assert np.all(np.abs(g[~nonzero]) <= pen[~nonzero] + 1e-6)
