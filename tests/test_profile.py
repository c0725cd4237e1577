"""The data profiler: quick fits and their tests, density, importance, clusters, leaf profiles."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.miscmodels.ordinal_model import OrderedModel

from fedgrain import OrdinalRegression
from fedgrain.core.linalg import chi2_sf
from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import make_ordinal, make_regions
from fedgrain.inference import split_tests
from fedgrain.partition import profile as prof
from fedgrain.partition.growth import grow

from .conftest import expand

K4 = 4


def _standardised(X):
    return Standardizer.fit(X).transform(X)


def _quick_rows(n):
    """The rows a quick fit of ``n`` rows uses (all, or QUICK_ROWS evenly spaced ones)."""
    if n <= split_tests.QUICK_ROWS:
        return np.arange(n)
    return np.linspace(0, n - 1, split_tests.QUICK_ROWS).round().astype(np.intp)


def _homogeneous(seed, n=3000):
    """One model; standardised, and only the rows a quick fit uses (as the tree grower does)."""
    X, y, _, _, _ = make_regions(n, n_features=4, n_classes=K4, n_regions=1, heterogeneity=0.0,
                                 random_state=seed)
    rows = _quick_rows(n)
    return _standardised(X)[rows], y[rows]


def _two_regions(seed, n=3000):
    X, y, region, _, _ = make_regions(n, n_features=4, n_classes=K4, n_regions=2,
                                      heterogeneity=1.5, random_state=seed)
    rows = _quick_rows(n)
    return _standardised(X)[rows], y[rows], region[rows]


def _binary_effect(seed, n=3000):
    """One model everywhere; the last feature is 0/1 with a real effect on the outcome."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    X[:, 3] = rng.random(n) < 0.5
    latent = X @ np.array([1.0, -0.5, 0.25, 1.0]) + rng.logistic(size=n)
    rows = _quick_rows(n)
    return X[rows], np.searchsorted(np.array([-1.5, 0.0, 1.5]), latent)[rows]


def _pvalue(q_df):
    return chi2_sf(*q_df)


# ---- quick fits -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ordinal_data():
    """Standardised ordinal data: the rows a quick fit uses, so the references see them too."""
    X, y, _, _ = make_ordinal(4000, n_features=4, n_classes=K4, random_state=0)
    rows = _quick_rows(X.shape[0])
    return _standardised(X)[rows], y[rows]


def test_quick_fit_agrees_with_exact_maximum_likelihood(ordinal_data):
    Xs, y = ordinal_data
    fit = split_tests.quick_fit(Xs, y, None, K4)
    assert fit is not None and fit.identified.all() and not fit.shifted
    assert fit.n_rows == y.shape[0] == min(4000, split_tests.QUICK_ROWS)
    res = OrderedModel(y, Xs, distr="logit").fit(method="bfgs", disp=False, maxiter=2000,
                                                 gtol=1e-7)
    sm_slopes = np.asarray(res.params)[:4]
    sm_thresholds = res.model.transform_threshold_params(res.params)[1:-1]
    # composite and exact likelihood estimate the same parameters: close, not equal
    np.testing.assert_allclose(fit.estimate[:4], sm_slopes, atol=0.05)
    np.testing.assert_allclose(fit.estimate[4:], sm_thresholds, atol=0.05)
    m = OrdinalRegression().fit(Xs, y)
    np.testing.assert_allclose(fit.estimate[:4], m.coef_, atol=0.05)
    np.testing.assert_allclose(fit.estimate[4:], m.thresholds_, atol=0.05)
    assert np.abs(fit.estimate[:4] - m.coef_).max() > 1e-4  # it is not the exact fit itself


def test_quick_fit_is_the_composite_fit_with_cluster_covariance(ordinal_data):
    """Logistic regression on the expanded rows, clustered by original row (statsmodels GLM)."""
    Xs, y = ordinal_data
    fit = split_tests.quick_fit(Xs, y, None, K4)
    Z, u, _ = expand(Xs, y, K4)
    glm = sm.GLM(u, Z, family=sm.families.Binomial()).fit(
        cov_type="cluster", cov_kwds={"groups": np.repeat(np.arange(y.shape[0]), K4 - 1),
                                      "use_correction": False}, tol=1e-12)
    np.testing.assert_allclose(fit.estimate, glm.params, atol=1e-4)
    np.testing.assert_allclose(fit.cov, glm.cov_params(), rtol=1e-3)


def test_quick_fit_uses_evenly_spaced_rows_of_a_large_sample():
    X, y, _, _ = make_ordinal(9000, n_features=4, n_classes=K4, random_state=1)
    Xs = _standardised(X)
    rows = _quick_rows(9000)
    assert rows.shape[0] < 9000
    big = split_tests.quick_fit(Xs, y, None, K4)
    sub = split_tests.quick_fit(Xs[rows], y[rows], None, K4)
    assert big.n_rows == split_tests.QUICK_ROWS
    np.testing.assert_array_equal(big.estimate, sub.estimate)
    np.testing.assert_array_equal(big.cov, sub.cov)


def test_quick_fit_refuses_separated_classes():
    X = np.random.default_rng(0).standard_normal((500, 2))
    y = np.digitize(X[:, 0], [-0.5, 0.5])
    assert split_tests.quick_fit(X, y, None, 3) is None
    assert split_tests.quick_fit(X[:4], y[:4], None, 3) is None  # too few rows


def test_quick_fit_leaves_out_a_nearly_constant_feature_the_classes_are_separated_along():
    """RAND HIE: below a cut near physlm = 0, the few rows with small positive physlm were all
    in one class; the node's quick fit ran off and the node was never split further, or was,
    depending on where among physlm's rare values the cut fell."""
    rng = np.random.default_rng(2)
    n = 2000
    X = rng.standard_normal((n, 3))
    X[:, 2] = np.where(rng.random(n) < 0.03, 1.0, 0.0)  # 3% ones
    y = np.digitize(X[:, 0] + rng.logistic(size=n), [-1.0, 1.0])
    y[X[:, 2] == 1] = 2  # every one of them in the top class
    fit = split_tests.quick_fit(X, y, None, 3)
    assert fit is not None and fit.separated == frozenset({2}) and fit.shifted
    assert fit.identified.tolist() == [True, True, False, True, True]
    assert np.isnan(fit.estimate[2]) and np.all(np.isfinite(fit.estimate[[0, 1, 3, 4]]))
    # with the rare rows in every class the feature stays in, and nothing is marked
    y2 = np.digitize(X[:, 0] + rng.logistic(size=n), [-1.0, 1.0])
    fit2 = split_tests.quick_fit(X, y2, None, 3)
    assert fit2.separated == frozenset() and fit2.identified.all()
    # separated along a feature that varies as well: still no fit
    assert split_tests.quick_fit(X, np.digitize(X[:, 0], [-0.5, 0.5]), None, 3) is None


def test_quick_fit_marks_what_the_rows_do_not_identify(ordinal_data):
    Xs, y = ordinal_data
    Xc = Xs.copy()
    Xc[:, 1] = 0.7
    fit = split_tests.quick_fit(Xc, y, None, K4)
    assert fit.identified.tolist() == [True, False, True, True, True, True, True]
    assert fit.shifted and np.isnan(fit.estimate[1])
    assert not np.any(fit.cov[1]) and not np.any(fit.cov[:, 1])
    # the thresholds absorb the constant feature: they estimate theta_k - 0.7 beta_1
    full = split_tests.quick_fit(Xs, y, None, K4)
    np.testing.assert_allclose(fit.estimate[[0, 2, 3]], full.estimate[[0, 2, 3]], atol=0.1)
    # a threshold with no rows above it is not identified either
    top = y < K4 - 1
    fit = split_tests.quick_fit(Xs[top], y[top], None, K4)
    assert fit.identified.tolist() == [True] * 6 + [False]
    assert np.isnan(fit.estimate[-1]) and not fit.shifted


# ---- split test and heterogeneity ------------------------------------------------------------
@pytest.mark.slow
def test_split_test_is_calibrated_under_one_model_and_powerful_between_two():
    med, half = [], []
    for seed in range(300):
        Xs, y = _homogeneous(seed)
        fit = split_tests.quick_fit(Xs, y, None, K4)
        node = split_tests.node_terms(Xs, y, None, fit)
        q, df = split_tests.split_test(Xs, y, None, fit, Xs[:, 1] <= np.median(Xs[:, 1]), node)
        assert df == 4 + K4 - 1
        med.append(chi2_sf(q, df))
        random_half = np.random.default_rng([seed, 1]).permutation(y.shape[0]) < y.shape[0] // 2
        half.append(_pvalue(split_tests.split_test(Xs, y, None, fit, random_half)))
    # Monte Carlo SE of a 5% rate over 300 seeds: sqrt(0.05 * 0.95 / 300) = 0.013
    for pvalues in (med, half):
        assert 0.02 <= np.mean(np.array(pvalues) < 0.05) <= 0.09
        # and the p-values are roughly uniform, not just right at 5%
        assert stats.kstest(pvalues, "uniform").pvalue > 1e-3

    rejected = []
    for seed in range(40):
        Xs, y, region = _two_regions(seed)
        fit = split_tests.quick_fit(Xs, y, None, K4)
        rejected.append(_pvalue(split_tests.split_test(Xs, y, None, fit, region == 0)) < 1e-6)
    assert np.mean(rejected) >= 0.95


def test_split_test_in_the_tail_of_a_strong_feature_is_calibrated():
    """A cut in the tail of the feature that drives the outcome leaves a class (nearly) absent
    on one side; the score of its threshold there is a sum of tiny terms of one sign with a
    tinier empirical variance, and the test rejected one model with p < 1e-14 (the cut at a
    feature's quartiles found it). Such thresholds are left out of the comparison."""
    pvalues, dfs = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((3000, 3))
        y = np.digitize(2.5 * X[:, 0] + rng.logistic(size=3000), [-3.0, 0.0, 3.0])
        Xs = _standardised(X)
        fit = split_tests.quick_fit(Xs, y, None, K4)
        q, df = split_tests.split_test(Xs, y, None, fit, Xs[:, 0] <= np.quantile(Xs[:, 0], 0.8))
        pvalues.append(chi2_sf(q, df))
        dfs.append(df)
    assert 0.02 <= np.mean(np.array(pvalues) < 0.05) <= 0.09
    assert min(dfs) >= 3  # the slopes are always compared


def test_split_test_passed_the_node_pass_matches_the_one_made_inside():
    Xs, y, region = _two_regions(3)
    fit = split_tests.quick_fit(Xs, y, None, K4)
    node = split_tests.node_terms(Xs, y, None, fit)
    left = region == 0
    assert split_tests.split_test(Xs, y, None, fit, left, node) == \
        split_tests.split_test(Xs, y, None, fit, left)


@pytest.mark.parametrize("seed", range(3))
def test_split_test_corrects_for_a_fit_that_is_not_exactly_at_the_optimum(seed):
    """The score is corrected for the estimation of the fit: moving the fit by two standard
    errors changes the statistic by a second-order amount only."""
    Xs, y = _homogeneous(seed)
    fit = split_tests.quick_fit(Xs, y, None, K4)
    moved = dataclasses.replace(fit, estimate=fit.estimate + 2.0 * np.sqrt(np.diag(fit.cov))
                                * np.random.default_rng(seed).standard_normal(7))
    left = Xs[:, 1] <= np.median(Xs[:, 1])
    q, df = split_tests.split_test(Xs, y, None, fit, left)
    assert split_tests.split_test(Xs, y, None, moved, left) == pytest.approx((q, df), abs=1.0)


@pytest.mark.slow
def test_heterogeneity_is_chi_square_under_one_model():
    qs = []
    for seed in range(200):
        Xs, y = _homogeneous(seed)
        half = np.random.default_rng([seed, 2]).permutation(y.shape[0]) < y.shape[0] // 2
        a = split_tests.quick_fit(Xs[half], y[half], None, K4)
        b = split_tests.quick_fit(Xs[~half], y[~half], None, K4)
        q, df = split_tests.heterogeneity(a, b, 4)
        assert df == 4 + K4 - 1
        qs.append(q)
    # mean of chi2(7) over 200 seeds: 7 with SE sqrt(2 * 7 / 200) = 0.26; 20% is 1.4
    assert np.mean(qs) == pytest.approx(7.0, rel=0.2)


def test_heterogeneity_is_large_between_different_models_and_zero_within_one():
    Xs, y, region = _two_regions(0)
    a = split_tests.quick_fit(Xs[region == 0], y[region == 0], None, K4)
    b = split_tests.quick_fit(Xs[region == 1], y[region == 1], None, K4)
    q, df = split_tests.heterogeneity(a, b, 4)
    assert df == 7 and chi2_sf(q, df) < 1e-10
    assert split_tests.heterogeneity(b, a, 4) == pytest.approx((q, df))
    assert split_tests.heterogeneity(a, a, 4) == (0.0, 7)
    # a feature constant in one fit: that slope and every threshold are left out
    Xc = Xs[region == 1].copy()
    Xc[:, 2] = 0.0
    c = split_tests.quick_fit(Xc, y[region == 1], None, K4)
    assert split_tests.heterogeneity(a, c, 4)[1] == 3


@pytest.mark.slow
def test_split_on_a_binary_feature_with_a_real_effect_is_not_heterogeneity():
    rejected = []
    for seed in range(200):
        X, y = _binary_effect(seed)
        Xs = _standardised(X)
        fit = split_tests.quick_fit(Xs, y, None, K4)
        left = X[:, 3] == 0
        q, df = split_tests.split_test(Xs, y, None, fit, left)
        # the binary column is constant on each side, collinear with the thresholds there:
        # one direction dropped per side
        assert df == 4 + K4 - 1 - 2
        rejected.append(chi2_sf(q, df) < 0.05)
        if seed < 3:  # a naive comparison of the two sides' thresholds is fooled
            a = split_tests.quick_fit(Xs[left], y[left], None, K4)
            b = split_tests.quick_fit(Xs[~left], y[~left], None, K4)
            d = a.estimate[4:] - b.estimate[4:]
            naive = d @ np.linalg.solve(a.cov[4:, 4:] + b.cov[4:, 4:], d)
            assert stats.chi2.sf(naive, 3) < 1e-6
    # Monte Carlo SE of a 5% rate over 200 seeds: 0.015
    assert 0.02 <= np.mean(rejected) <= 0.10


# ---- clusters, density, importance -----------------------------------------------------------
def test_two_means_finds_two_blobs():
    rng = np.random.default_rng(0)
    truth = np.array([[-4.0, 1.0], [4.0, -1.0]])
    Xw = np.concatenate([rng.standard_normal((1500, 2)) + truth[0],
                         rng.standard_normal((1500, 2)) + truth[1]])  # over KMEANS_ROWS
    centres = prof.two_means(Xw, np.random.default_rng(1))
    assert centres.shape == (2, 2)
    if centres[0, 0] > centres[1, 0]:
        centres = centres[::-1]
    np.testing.assert_allclose(centres, truth, atol=0.2)
    again = prof.two_means(Xw, np.random.default_rng(1))
    np.testing.assert_array_equal(prof.two_means(Xw, np.random.default_rng(1)), again)
    assert prof.two_means(np.tile([1.0, 2.0], (50, 1)), rng) is None
    assert prof.two_means(Xw[:1], rng) is None


def test_log_density():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((2000, 2))
    tight = prof.log_density(0.5 * Z, 0.3, np.random.default_rng(1))
    wide = prof.log_density(2.0 * Z, 0.3, np.random.default_rng(1))
    assert tight > wide
    # scaling by 4 divides the density by 4^2
    assert tight - wide == pytest.approx(2 * np.log(4), abs=1e-9)
    single = prof.log_density(Z, 0.1, np.random.default_rng(2))
    double = prof.log_density(Z, 0.2, np.random.default_rng(2))
    assert double - single == pytest.approx(np.log(2), abs=0.05)
    # reference: E log f of a standard normal is -log(2 pi) - 1 in two dimensions; the
    # 10-nearest-neighbour estimate on 500 rows is biased up by about 0.1
    full = np.mean([prof.log_density(rng.standard_normal((2000, 2)), 1.0, rng)
                    for _ in range(10)])
    assert full == pytest.approx(-np.log(2 * np.pi) - 1, abs=0.2)
    assert np.isnan(prof.log_density(Z[:prof.KNN_K], 1.0, rng))


def test_importance_and_feature_weights(ordinal_data):
    Xs, y = ordinal_data
    fit = split_tests.quick_fit(Xs, y, None, K4)
    imp = prof.importance(fit, 4)
    assert imp.sum() == pytest.approx(1.0) and np.all(imp >= 0)
    assert np.argmax(imp) == 0  # make_ordinal: only the first of 4 features is informative
    assert prof.importance(None, 4).tolist() == [0.0] * 4
    Xc = Xs.copy()
    Xc[:, 2] = 1.0
    imp_c = prof.importance(split_tests.quick_fit(Xc, y, None, K4), 4)  # NaN slope: no importance
    assert imp_c[2] == 0.0 and imp_c.sum() == pytest.approx(1.0)
    for w in (prof.feature_weights(imp), prof.feature_weights(np.zeros(4)),
              prof.feature_weights(np.array([1.0, 0.0, 0.0, 0.0]))):
        assert np.all(w > 0)
    np.testing.assert_allclose(prof.feature_weights(np.zeros(4)), 0.5)
    assert np.sum(prof.feature_weights(imp) ** 2) == pytest.approx(1.0)


# ---- profiles of the leaves -----------------------------------------------------------------
@pytest.fixture(scope="module")
def grown():
    X, y, _, _, _ = make_regions(3000, n_features=3, n_classes=3, n_regions=3,
                                 heterogeneity=1.5, random_state=1)
    g = grow(X, y, None, std=Standardizer.fit(X), n_classes=3, granularity=0.5, min_size=50,
             n_pieces=5, seed=1, feature_names=["a", "b", "c"])
    assert len(np.unique(g.tree.region_of())) > 1 and g.tree.n_leaves == 5
    return X, y, g


def test_grown_profile_describes_the_training_rows(grown):
    X, y, g = grown
    for pos, nid in enumerate(g.tree.leaves):
        lp = g.profile[nid]
        rows = g.leaf == pos
        assert lp.n_rows == rows.sum() == g.tree.sizes[pos]
        np.testing.assert_array_equal(lp.class_counts, np.bincount(y[rows], minlength=3))
        np.testing.assert_allclose(lp.mean, X[rows].mean(axis=0), atol=1e-10)
        assert lp.importance.sum() == pytest.approx(1.0)
        assert lp.importance_source == "screening" and np.isfinite(lp.log_density)


def test_data_profile_json_round_trip(grown):
    profile = grown[2].profile
    ids = list(profile.leaves)
    # one leaf without a density and without centres
    profile = prof.DataProfile(dict(profile.leaves), profile.feature_names)
    profile.leaves[ids[0]] = dataclasses.replace(profile[ids[0]], log_density=float("nan"),
                                                 centres=np.empty((0, 3)))
    d = profile.to_dict()
    assert d["leaves"][str(ids[0])]["log_density"] is None
    back = prof.DataProfile.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back.feature_names == ["a", "b", "c"] and list(back.leaves) == ids
    assert np.isnan(back[ids[0]].log_density) and back[ids[0]].centres.shape == (0, 3)
    for nid in ids:
        a, b = profile[nid], back[nid]
        assert a.n_rows == b.n_rows and a.importance_source == b.importance_source
        for name in ("class_counts", "mean", "importance", "centres"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_equal(a.log_density, b.log_density)


def test_data_profile_frame(grown):
    profile = grown[2].profile
    frame = profile.frame()
    assert list(frame.columns) == ["rows", "log_density", "top_features", "importance_from"]
    assert frame.index.name == "leaf" and list(frame.index) == list(profile.leaves)
    assert frame["rows"].tolist() == [lp.n_rows for lp in profile.leaves.values()]
    for nid, row in frame.iterrows():
        names = row["top_features"].split(", ")
        assert 1 <= len(names) <= 3 and set(names) <= {"a", "b", "c"}
        assert names[0] == "abc"[int(np.argmax(profile[nid].importance))]


def test_with_importance_normalises_the_local_model(grown):
    profile = grown[2].profile
    nid = next(iter(profile.leaves))
    profile = prof.DataProfile(dict(profile.leaves), profile.feature_names)
    profile.with_importance(nid, np.array([2.0, -1.0, np.nan]))
    np.testing.assert_allclose(profile[nid].importance, [2 / 3, 1 / 3, 0.0])
    assert profile[nid].importance_source == "local model"
    profile.with_importance(nid, np.zeros(3))
    assert profile[nid].importance.tolist() == [0.0, 0.0, 0.0]
    # within the leaf: a feature constant there counts for nothing, the others by their range
    lp = profile[nid]
    profile.leaves[nid] = dataclasses.replace(lp, low=np.array([0.0, 1.0, -1.0]),
                                  high=np.array([2.0, 1.0, 1.0]))
    profile.with_importance(nid, np.array([1.0, 5.0, 1.0]), scale=np.array([1.0, 1.0, 2.0]))
    np.testing.assert_allclose(profile[nid].importance, [2 / 3, 0.0, 1 / 3])


def test_refresh_reprofiles_the_leaves_that_receive_rows(grown):
    _, _, g = grown
    tree = g.tree
    profile = prof.DataProfile(dict(g.profile.leaves), g.profile.feature_names)
    before = dict(profile.leaves)
    X_new, y_new, _, _, _ = make_regions(4000, n_features=3, n_classes=3, n_regions=3,
                                         heterogeneity=1.5, random_state=2)
    routed = tree.route(X_new)
    fed = tree.leaves[:2]  # only the first two leaves get new rows
    keep = np.isin(routed, [0, 1])
    assert 0 < keep.sum() < X_new.shape[0]
    X_new, y_new, routed = X_new[keep], y_new[keep], routed[keep]
    profile.refresh(tree, X_new, y_new)
    for pos, nid in enumerate(tree.leaves):
        lp = profile[nid]
        if nid in fed:
            rows = routed == pos
            assert lp.n_rows == rows.sum() > 0
            np.testing.assert_array_equal(lp.class_counts, np.bincount(y_new[rows],
                                                                       minlength=3))
            np.testing.assert_allclose(lp.mean, X_new[rows].mean(axis=0), atol=1e-10)
            assert lp is not before[nid] and lp.importance.sum() == pytest.approx(1.0)
        else:
            assert lp is before[nid]


def test_node_terms_sum_to_the_composite_pass():
    from fedgrain.core.likelihood import composite_pass

    X, y, _, _ = make_ordinal(2000, 4, 4, random_state=3)
    Xs = Standardizer.fit(X).transform(X.copy())
    w = np.random.default_rng(0).uniform(0.5, 2.0, 2000)
    fit = split_tests.quick_fit(Xs, y, w, 4)
    mask = Xs[:, 0] > 0
    s, H, J = split_tests.node_terms(Xs, y, w, fit).sums(mask)
    ref = composite_pass(Xs[mask], y[mask], w[mask], fit.estimate[:4], fit.estimate[4:],
                         loss=False, order=2, meat="cluster")
    np.testing.assert_allclose(s, -ref.grad, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(H, ref.hess, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(J, ref.meat, rtol=1e-10, atol=1e-8)
