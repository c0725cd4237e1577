"""Simulations with known truth (method.md 4, 4b).

The fast tests check the pooled estimate against the centralized fit of the same composite
likelihood, with random subsets and with a partition by feature ranges (method.md 5). The slow
tests repeat fits over 200+ seeded data sets and check interval coverage: the cluster sandwich
covers 93-97%, model-based intervals clearly less, the naive average of
un-debiased lasso fits is biased, and in small subsets only the refinement round restores the
coverage of the extreme thresholds.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedgrain import DivideConquerOrdinal
from fedgrain.datasets import make_ordinal


def test_pooled_estimate_is_within_a_small_fraction_of_a_se_of_the_centralized_fit(medium_data):
    X, y, _, _ = medium_data
    central = DivideConquerOrdinal(n_subsets=1, alpha=0.0, backend="serial").fit(X, y)
    c = np.r_[central.coef_, central.thresholds_]
    se = central.bse_
    refined = DivideConquerOrdinal(n_subsets=8, backend="serial", random_state=1).fit(X, y)
    oneshot = DivideConquerOrdinal(n_subsets=8, backend="serial", random_state=1,
                                   refine_rounds=0).fit(X, y)
    z_refined = np.abs(np.r_[refined.coef_, refined.thresholds_] - c) / se
    z_oneshot = np.abs(np.r_[oneshot.coef_, oneshot.thresholds_] - c) / se
    assert z_refined.max() < 0.01
    # one-shot keeps each subset's O(d / n_m) bias: a fraction of a SE at 357 rows per parameter
    assert z_oneshot.max() < 0.5
    # The refined standard errors are those of the centralized fit. One-shot ones run a few
    # percent small: each subset's sandwich is taken at its shrunken lasso fit (method.md 3),
    # most visibly for the largest slope; the refinement round re-evaluates it at the pooled fit.
    np.testing.assert_allclose(refined.bse_, se, rtol=0.02)
    np.testing.assert_allclose(oneshot.bse_, se, rtol=0.08)


def _coverage(estimates, ses, truth):
    """Share of replications whose 95% interval holds the truth, per parameter."""
    return np.mean(np.abs(estimates - truth) <= 1.959964 * ses, axis=0)


@pytest.mark.slow
def test_coverage_of_cluster_sandwich_model_based_and_naive_average():
    reps, M, n_per, p, K = 240, 8, 1000, 5, 5
    est_c, se_c, est_m, se_m, naive = [], [], [], [], []
    for r in range(reps):
        X, y, coef, thr = make_ordinal(M * n_per, p, K, random_state=1000 + r)
        dc = DivideConquerOrdinal(n_subsets=M, backend="serial", random_state=r).fit(X, y)
        est_c.append(np.r_[dc.coef_, dc.thresholds_])
        se_c.append(dc.bse_)
        naive.append(dc.subset_lasso_estimates_.mean(axis=0))
        dm = DivideConquerOrdinal(n_subsets=M, backend="serial", random_state=r,
                                  variance="model").fit(X, y)
        est_m.append(np.r_[dm.coef_, dm.thresholds_])
        se_m.append(dm.bse_)
    truth = np.r_[coef, thr]
    cov_cluster = _coverage(np.array(est_c), np.array(se_c), truth)
    cov_model = _coverage(np.array(est_m), np.array(se_m), truth)
    assert 0.93 <= cov_cluster.mean() <= 0.97, cov_cluster
    assert cov_cluster.min() >= 0.90, cov_cluster
    # The composite likelihood's H^-1 ignores the positive correlation of each row's K - 1
    # binary labels, which inflates the slopes' variance (not the thresholds'): slopes under-cover.
    assert cov_model[:p].mean() <= 0.91, cov_model
    assert cov_cluster[:p].mean() - cov_model[:p].mean() >= 0.03, (cov_cluster, cov_model)
    # Naive averaging of lasso fits: slopes shrunk toward zero, by many Monte Carlo errors.
    naive = np.array(naive)
    nz = np.flatnonzero(coef != 0)
    shrink = np.abs(naive[:, nz]).mean(axis=0) - np.abs(coef[nz])
    mc_se = naive[:, nz].std(axis=0) / np.sqrt(reps)
    assert np.all(shrink < -5 * mc_se), (shrink, mc_se)
    dc_bias = np.abs(np.array(est_c)[:, nz].mean(axis=0) - coef[nz])
    assert np.all(dc_bias < np.abs(shrink))


@pytest.mark.slow
def test_refinement_restores_coverage_of_extreme_thresholds_in_small_subsets():
    # method.md 4b: N = 20,000, p = 50, K = 4 in 50 subsets of 400 rows (7.5 rows per parameter).
    reps, M, n_per, p, K = 200, 50, 400, 50, 4
    one, ref = [], []
    for r in range(reps):
        X, y, coef, thr = make_ordinal(M * n_per, p, K, n_informative=5, random_state=5000 + r)
        truth = np.r_[coef, thr]
        dc = DivideConquerOrdinal(n_subsets=M, backend="serial", random_state=r).fit(X, y)
        for res, out in ((dc.oneshot_results_, one), (dc.results_, ref)):
            out.append(np.abs(res.params - truth) <= 1.959964 * res.bse)
    one, ref = np.mean(one, axis=0), np.mean(ref, axis=0)
    extreme = [p, p + K - 2]  # the first and last thresholds
    assert np.all(one[extreme] < 0.20), one[extreme]
    assert np.all((ref[extreme] >= 0.93) & (ref[extreme] <= 0.97)), ref[extreme]
    null = np.flatnonzero(coef == 0)
    assert 0.93 <= ref[null].mean() <= 0.97, ref[null]
    assert ref[np.flatnonzero(coef)].min() >= 0.90, ref[:p]


def _feature_partition(X, K):
    """A non-random partition by feature ranges: x0 at its median, then x1 on the left."""
    from fedgrain.core.standardize import Standardizer
    from fedgrain.partition.tree import PartitionTree

    tree = PartitionTree(X.shape[1], K, Standardizer.fit(X))
    e = np.eye(X.shape[1])
    left, _ = tree.split(tree.root, e[0], float(np.median(X[:, 0])))
    tree.split(left, e[1], float(np.median(X[X[:, 0] <= np.median(X[:, 0]), 1])))
    return tree


def test_adaptive_partition_under_one_model_matches_the_centralized_fit():
    from fedgrain import AdaptiveFederatedOrdinal

    X, y, _, _ = make_ordinal(12_000, 5, 4, random_state=21)
    central = DivideConquerOrdinal(n_subsets=1, alpha=0.0, backend="serial").fit(X, y)
    af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=_feature_partition(X, 4))
    assert af.n_leaves_ == 3
    z = np.abs(np.r_[af.coef_, af.thresholds_] - np.r_[central.coef_, central.thresholds_])
    assert np.all(z / central.bse_ < 0.05), z / central.bse_
    np.testing.assert_allclose(af.bse_, central.bse_, rtol=0.03)
    # the leaves' ranges differ, their models do not: Q is unremarkable
    assert af.global_model_.q_pvalue_ > 0.001


@pytest.mark.slow
def test_coverage_with_adaptive_partitions_under_one_model():
    from fedgrain import AdaptiveFederatedOrdinal

    reps, n, p, K = 200, 6000, 5, 4
    hits, hits_central, z = [], [], []
    for r in range(reps):
        X, y, coef, thr = make_ordinal(n, p, K, random_state=7000 + r)
        truth = np.r_[coef, thr]
        af = AdaptiveFederatedOrdinal(backend="serial", random_state=r).fit(
            X, y, partition=_feature_partition(X, K))
        est = np.r_[af.coef_, af.thresholds_]
        hits.append(np.abs(est - truth) <= 1.959964 * af.bse_)
        central = DivideConquerOrdinal(n_subsets=1, alpha=0.0, backend="serial").fit(X, y)
        c = np.r_[central.coef_, central.thresholds_]
        hits_central.append(np.abs(c - truth) <= 1.959964 * central.bse_)
        z.append((est - c) / central.bse_)
    cover, cover_central = np.mean(hits, axis=0), np.mean(hits_central, axis=0)
    # 200 replications: the Monte Carlo SE of a 95% coverage is 1.5 points; the worst of the 8
    # parameters is 3 SE off in these seeds for the centralized fit as well
    assert 0.93 <= cover.mean() <= 0.97, cover
    assert cover.min() >= 0.88, cover
    np.testing.assert_allclose(cover, cover_central, atol=0.015)
    assert np.abs(np.array(z)).max() < 0.2
