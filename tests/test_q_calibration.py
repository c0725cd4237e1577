"""Calibration and power of the heterogeneity statistic Q under the default, class-stratified
division (docs/method.md, "Pooling and refinement").

Each subset of a stratified division has the same class shares, so the subsets' estimates
vary less than a plain random division would make them, most of all the thresholds; Q then
compares them within classes. Under one true model its p-values must be uniform and the
per-parameter Q near its degrees of freedom; when subsets really differ, Q must reject.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedgrain import DivideConquerOrdinal
from fedgrain.core.standardize import fit_standardizer
from fedgrain.datasets import make_ordinal
from fedgrain.inference import local, pooling
from fedgrain.partition.tree import stratified_split

M, N_PER = 8, 500


def _subset_fits(X, y, labels, K, seed):
    Z = fit_standardizer(X, None).transform(X)
    settings = local.LocalSettings(n_classes=K, within_class=True)
    return [local.fit_local(Z[labels == m], y[labels == m], None, settings, seed)
            for m in range(M)]


@pytest.mark.slow
def test_q_is_calibrated_under_one_model_with_the_default_division():
    reps, p, K = 200, 5, 5
    pvals, q_param = [], []
    for r in range(reps):
        X, y, _, _ = make_ordinal(M * N_PER, p, K, n_informative=3, random_state=10_000 + r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dc = DivideConquerOrdinal(n_subsets=M, backend="serial", random_state=r,
                                      refine_rounds=0).fit(X, y)
        assert dc.q_df_ == (M - 1) * (p + K - 1)
        pvals.append(dc.q_pvalue_)
        q_param.append(dc.results_.heterogeneity["q_param"])
    pvals, q_param = np.array(pvals), np.array(q_param)
    # before: median p 0.99, none below 0.05, per-threshold Q 1.4 on 7 df
    assert 0.02 <= np.mean(pvals < 0.05) <= 0.09
    assert 0.35 <= np.median(pvals) <= 0.65
    mean_q = q_param.mean(axis=0)  # each on M - 1 = 7 df; SE of a mean about 0.26
    assert np.all((mean_q[p:] > 6.0) & (mean_q[p:] < 8.0)), mean_q
    assert np.all((mean_q[:p] > 6.0) & (mean_q[:p] < 8.0)), mean_q


def test_q_rejects_when_stratified_subsets_really_differ():
    # stratified subsets (the same class counts); in half of them the first feature is
    # measured on another scale, so its slope there is 1 / 1.3 of the others'
    p, K, reps = 5, 5, 12
    new, old = [], []
    for r in range(reps):
        X, y, _, _ = make_ordinal(M * N_PER, p, K, n_informative=3, random_state=500 + r)
        labels = stratified_split(y, M, np.random.default_rng(r))
        X[labels < M // 2, 0] *= 1.3
        fits = _subset_fits(X, y, labels, K, r)
        new.append(pooling.pool(fits, stratified=True).q_pvalue)
        old.append(pooling.pool(fits).q_pvalue)
    assert np.mean(np.array(new) < 0.05) >= 0.9
    assert np.mean(np.array(new) < 0.05) >= np.mean(np.array(old) < 0.05)


def test_stratified_q_leaves_the_estimate_and_plain_q_alone():
    X, y, _, _ = make_ordinal(M * N_PER, 5, 5, n_informative=3, random_state=3)
    labels = stratified_split(y, M, np.random.default_rng(3))
    fits = _subset_fits(X, y, labels, 5, 3)
    plain, strat = pooling.pool(fits), pooling.pool(fits, stratified=True)
    np.testing.assert_array_equal(plain.estimate, strat.estimate)
    np.testing.assert_array_equal(plain.cov, strat.cov)
    assert strat.q_df == plain.q_df and strat.q != plain.q
    for f in fits:  # within classes the thresholds vary much less, the slopes a little less
        w, full = np.diag(f.within.cov), np.diag(f.cov)
        assert np.all(w[5:] < 0.6 * full[5:])
        assert f.within.class_weights.sum() == f.within.class_weights @ np.ones(5) == N_PER


def test_stratified_q_falls_back_when_the_features_do_not_predict_the_class():
    # no signal: the thresholds are pinned by the class counts (second-order spread only),
    # so Q keeps the plain covariances
    rng = np.random.default_rng(0)
    X = rng.standard_normal((M * N_PER, 4))
    y = rng.integers(0, 4, M * N_PER)
    labels = stratified_split(y, M, rng)
    fits = _subset_fits(X, y, labels, 4, 0)
    plain, strat = pooling.pool(fits), pooling.pool(fits, stratified=True)
    assert strat.q == plain.q and strat.q_pvalue == plain.q_pvalue
