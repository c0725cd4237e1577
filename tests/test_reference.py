"""Agreement with independent implementations: R MASS::polr, statsmodels, scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels
import statsmodels.api as sm
from scipy import stats
from sklearn.linear_model import LogisticRegression
from statsmodels.miscmodels.ordinal_model import OrderedModel

from fedgrain import DivideConquerOrdinal, OrdinalRegression
from fedgrain.core.likelihood import exact_pass
from fedgrain.datasets import make_ordinal

from .conftest import expand

UCLA = Path(statsmodels.__file__).parent / "miscmodels/tests/results/ologit_ucla.csv"
UCLA_LEVELS = ["unlikely", "somewhat likely", "very likely"]

# R 3.4.4, MASS::polr(apply ~ pared + public + gpa, method = "logit", Hess = TRUE), as recorded
# in statsmodels/miscmodels/tests/results/results_ordinal_model.py.
R_COEF = np.array([1.04769011, -0.05878572, 0.61594057])
R_SE = np.array([0.2658, 0.2979, 0.2606])
R_THRESHOLDS = np.array([2.203915, 4.299363])
R_PROBA_FIRST7 = np.array([
    [0.5488310, 0.3593310, 0.09183798], [0.3055632, 0.4759496, 0.21848725],
    [0.2293835, 0.4781951, 0.29242138], [0.6161224, 0.3126888, 0.07118879],
    [0.6560149, 0.2833901, 0.06059505], [0.6609240, 0.2797117, 0.05936431],
    [0.6518332, 0.2865114, 0.06165547],
])


@pytest.fixture(scope="module")
def ucla():
    df = pd.read_csv(UCLA)
    return df[["pared", "public", "gpa"]], df["apply"]


def test_matches_r_polr_on_ucla(ucla):
    X, y = ucla
    m = OrdinalRegression(levels=UCLA_LEVELS).fit(X, y)
    np.testing.assert_allclose(m.coef_, R_COEF, atol=3e-4)
    np.testing.assert_allclose(m.thresholds_, R_THRESHOLDS, atol=1e-3)
    np.testing.assert_allclose(m.bse_[:3], R_SE, rtol=3e-3)
    np.testing.assert_allclose(m.predict_proba(X.head(7), order="levels"), R_PROBA_FIRST7,
                               atol=2e-4)
    # R's optimiser stopped early; ours reaches the optimum, so its log-likelihood is at least R's.
    codes = pd.Categorical(y, categories=UCLA_LEVELS).codes.astype(np.intp)
    ll_r = -exact_pass(X.to_numpy(float), codes, None, R_COEF, R_THRESHOLDS, order=0).loss
    assert m.loglik_ >= ll_r
    assert m.results_.param_names == ["pared", "public", "gpa",
                                      "unlikely|somewhat likely", "somewhat likely|very likely"]


def _statsmodels_fit(X, y):
    res = OrderedModel(y, X, distr="logit").fit(method="bfgs", disp=False, maxiter=2000,
                                                gtol=1e-7)
    p = X.shape[1]
    thr = res.model.transform_threshold_params(res.params)[1:-1]
    return res, np.r_[np.asarray(res.params)[:p], thr]


def test_matches_statsmodels_ordered_model(ucla):
    X, y = ucla
    m = OrdinalRegression(levels=UCLA_LEVELS).fit(X, y)
    res, params = _statsmodels_fit(X, pd.Series(pd.Categorical(y, categories=UCLA_LEVELS,
                                                               ordered=True)))
    np.testing.assert_allclose(np.r_[m.coef_, m.thresholds_], params, atol=1e-5)
    np.testing.assert_allclose(m.bse_[:3], np.asarray(res.bse)[:3], rtol=1e-4)
    assert m.loglik_ == pytest.approx(res.llf, abs=1e-8)


def test_matches_statsmodels_on_simulated_data_with_five_levels():
    X, y, _, _ = make_ordinal(3000, 6, 5, random_state=11)
    m = OrdinalRegression().fit(X, y)
    res, params = _statsmodels_fit(X, y)
    np.testing.assert_allclose(np.r_[m.coef_, m.thresholds_], params, atol=1e-5)
    np.testing.assert_allclose(m.bse_[:6], np.asarray(res.bse)[:6], rtol=1e-4)


def test_one_subset_without_penalty_equals_logistic_regression_on_expanded_rows():
    X, y, _, _ = make_ordinal(3000, 5, 4, rho=0.3, mean=2.0, random_state=3)
    Z, u, _ = expand(X, y, 4)
    lr = LogisticRegression(C=np.inf, fit_intercept=False, solver="newton-cholesky",
                            tol=1e-12, max_iter=200).fit(Z, u)
    for refine in (0, 1):
        dc = DivideConquerOrdinal(n_subsets=1, alpha=0.0, refine_rounds=refine,
                                  backend="serial").fit(X, y)
        np.testing.assert_allclose(np.r_[dc.coef_, dc.thresholds_], lr.coef_[0], atol=1e-6)


def test_cluster_sandwich_equals_statsmodels_cluster_robust_glm():
    X, y, _, _ = make_ordinal(2500, 4, 4, random_state=5)
    Z, u, _ = expand(X, y, 4)
    groups = np.repeat(np.arange(X.shape[0]), 3)  # the 3 expanded rows of one original row
    glm = sm.GLM(u, Z, family=sm.families.Binomial()).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}, tol=1e-12)
    dc = DivideConquerOrdinal(n_subsets=1, alpha=0.0, backend="serial").fit(X, y)
    np.testing.assert_allclose(np.r_[dc.coef_, dc.thresholds_], glm.params, atol=1e-6)
    np.testing.assert_allclose(dc.cov_, glm.cov_params(), rtol=1e-5, atol=1e-12)
    # ... and the row-level sandwich equals statsmodels' heteroscedasticity-robust HC0
    glm_hc0 = sm.GLM(u, Z, family=sm.families.Binomial()).fit(cov_type="HC0", tol=1e-12)
    dc_row = DivideConquerOrdinal(n_subsets=1, alpha=0.0, variance="sandwich",
                                  backend="serial").fit(X, y)
    np.testing.assert_allclose(dc_row.cov_, glm_hc0.cov_params(), rtol=1e-5, atol=1e-12)


def test_fit_statistics_and_the_likelihood_ratio_test_match_statsmodels(ucla, tmp_path):
    """Log-likelihood, null log-likelihood, AIC, BIC and McFadden's R^2 as statsmodels'
    OrderedModel reports them (to 1e-6), and the LR test of two nested fits."""
    from fedgrain import load
    from fedgrain.exceptions import DataError

    X, y = ucla
    m = OrdinalRegression(levels=UCLA_LEVELS).fit(X, y)
    yc = pd.Series(pd.Categorical(y, categories=UCLA_LEVELS, ordered=True))
    res, _ = _statsmodels_fit(X, yc)
    for ours, theirs in ((m.loglik_, res.llf), (m.llnull_, res.llnull), (m.aic_, res.aic),
                         (m.bic_, res.bic), (m.pseudo_r2_, res.prsquared)):
        assert ours == pytest.approx(theirs, abs=1e-6)
    assert m.df_model_ == res.df_model and m.nobs_ == res.nobs and m.converged_
    small = OrdinalRegression(levels=UCLA_LEVELS).fit(X[["pared"]], y)
    res0, _ = _statsmodels_fit(X[["pared"]], yc)
    test = m.lr_test(small)
    assert test.df == 2 and test.hypothesis == "public = gpa = 0"
    assert test.statistic == pytest.approx(2 * (res.llf - res0.llf), abs=1e-6)
    assert test.pvalue == pytest.approx(stats.chi2.sf(test.statistic, 2), rel=1e-9)
    assert small.lr_test(m).statistic == test.statistic  # either order
    back = load(m.save(tmp_path / "m"))
    assert back.aic_ == m.aic_ and back.lr_test(small).statistic == test.statistic
    with pytest.raises(DataError, match="same rows"):
        m.lr_test(OrdinalRegression(levels=UCLA_LEVELS).fit(X[["pared"]][:300], y[:300]))
    with pytest.raises(DataError, match="not nested"):
        OrdinalRegression(levels=UCLA_LEVELS).fit(X[["gpa"]], y).lr_test(
            OrdinalRegression(levels=UCLA_LEVELS).fit(X[["pared", "public"]], y))
    with pytest.raises(DataError, match="penalised"):
        m.lr_test(OrdinalRegression(levels=UCLA_LEVELS, alpha=0.1).fit(X[["pared"]], y))


def test_cluster_robust_errors_match_statsmodels(ucla):
    """cov_groups: statsmodels' OrderedModel fitted with cov_type='cluster' (its default
    small-sample factor G/(G-1) (N-1)/(N-k)) on the same groups of 4 rows, to 1e-4."""
    X, y = ucla
    g = np.arange(len(y)) // 4
    m = OrdinalRegression(levels=UCLA_LEVELS).fit(X, y, cov_groups=g)
    yc = pd.Series(pd.Categorical(y, categories=UCLA_LEVELS, ordered=True))
    res = OrderedModel(yc, X, distr="logit").fit(method="bfgs", disp=False, maxiter=2000,
                                                 gtol=1e-9, cov_type="cluster",
                                                 cov_kwds={"groups": g})
    np.testing.assert_allclose(m.bse_[:4], np.asarray(res.bse)[:4], rtol=1e-4)
    assert m.results_.info["Standard errors"] == "cluster-robust (100 groups)"
    # a column of the frame names the groups just as well
    framed = OrdinalRegression(levels=UCLA_LEVELS).fit(X.assign(g=g), y, cov_groups="g")
    np.testing.assert_allclose(framed.bse_, m.bse_, rtol=1e-12)


def test_probability_weights_give_a_sandwich_that_ignores_their_scale(ucla):
    """weights='probability': the estimate of the weighted likelihood with the sandwich
    H^-1 (sum w^2 s s') H^-1 N / (N - k), here rebuilt from numerical derivatives of the
    likelihood written out, and unchanged when the weights are multiplied by 7."""
    from scipy.special import expit

    from fedgrain.exceptions import DataError

    X, y = ucla
    w = np.random.default_rng(0).uniform(0.5, 3.0, len(y))
    m = OrdinalRegression(levels=UCLA_LEVELS, weights="probability").fit(X, y,
                                                                         sample_weight=w)
    m7 = OrdinalRegression(levels=UCLA_LEVELS, weights="probability").fit(X, y,
                                                                          sample_weight=7 * w)
    np.testing.assert_allclose(m7.bse_, m.bse_, rtol=1e-8)
    freq = OrdinalRegression(levels=UCLA_LEVELS).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(freq.coef_, m.coef_, atol=1e-10)  # the same estimate
    Xn = X.to_numpy(float)
    codes = pd.Categorical(y, categories=UCLA_LEVELS).codes.astype(int)
    n, p = Xn.shape

    def rows(par):
        t = np.r_[-np.inf, par[p:], np.inf]
        eta = Xn @ par[:p]
        return np.log(expit(t[codes + 1] - eta) - expit(t[codes] - eta))

    x0 = np.r_[m.coef_, m.thresholds_]
    d = x0.size

    def scores(x, h=1e-6):  # per-row scores, (n, d)
        E = np.eye(d) * h
        return np.column_stack([(rows(x + E[i]) - rows(x - E[i])) / (2 * h) for i in range(d)])

    S = scores(x0)
    E = np.eye(d) * 1e-4
    H = np.column_stack([(scores(x0 + E[j]).T @ w - scores(x0 - E[j]).T @ w) / 2e-4
                         for j in range(d)])
    Hinv = np.linalg.inv(-0.5 * (H + H.T))
    V = Hinv @ ((S * (w * w)[:, None]).T @ S) @ Hinv * n / (n - d)
    np.testing.assert_allclose(m.bse_, np.sqrt(np.diag(V)), rtol=1e-4)
    with pytest.raises(DataError, match="pseudo-likelihood"):
        m.lr_test(OrdinalRegression(levels=UCLA_LEVELS, weights="probability").fit(
            X[["pared"]], y, sample_weight=w))
    with pytest.raises(DataError, match="none was given"):
        OrdinalRegression(weights="probability").fit(X, y)
    with pytest.raises(DataError, match="one group only"):
        OrdinalRegression(levels=UCLA_LEVELS).fit(X, y, cov_groups=np.zeros(len(y)))


def test_the_command_line_takes_clusters_and_probability_weights(ucla, tmp_path, capsys):
    from fedgrain import load
    from fedgrain.cli import main

    X, y = ucla
    w = np.random.default_rng(1).uniform(0.5, 3.0, len(y))
    frame = X.assign(apply=y, school=np.arange(len(y)) // 4, w=w)
    data = str(tmp_path / "d.csv")
    frame.to_csv(data, index=False)
    levels = ",".join(UCLA_LEVELS)
    assert main(["--quiet", "fit", data, "--target", "apply", "--levels", levels,
                 "--estimator", "mle", "--cov-groups", "school", "--weights", "w",
                 "--weights-type", "probability", "--out", str(tmp_path / "m")]) == 0
    assert "cluster-robust (100 groups)" in capsys.readouterr().out
    ref = OrdinalRegression(levels=UCLA_LEVELS, weights="probability").fit(
        X, y, sample_weight=w, cov_groups=np.arange(len(y)) // 4)
    np.testing.assert_allclose(load(tmp_path / "m").bse_, ref.bse_, rtol=1e-8)
    code = main(["--quiet", "fit", data, "--target", "apply", "--levels", levels,
                 "--cov-groups", "school", "--out", str(tmp_path / "x")])
    assert code == 2 and "--cov-groups apply to --estimator mle only" in capsys.readouterr().err


def test_weights_and_links_where_likelihood_statistics_do_not_apply(ucla):
    """Probability weights: no AIC/BIC, no LR, proportional-odds or composite criteria (they
    would change with the weights' scale); models with different links are not nested;
    frequency weights in clusters count as rows (equal to the expanded data)."""
    from fedgrain.exceptions import DataError

    X, y = ucla
    w = np.random.default_rng(2).integers(1, 4, len(y)).astype(float)
    pw = OrdinalRegression(levels=UCLA_LEVELS, weights="probability").fit(X, y, sample_weight=w)
    assert np.isnan(pw.aic_) and "AIC" not in pw.results_.info
    for call in (lambda: pw.proportional_odds_test(X, y),
                 lambda: pw.composite_criteria(X, y)):
        with pytest.raises(DataError, match="probability weights"):
            call()
    with pytest.raises(DataError, match="different links"):
        OrdinalRegression(levels=UCLA_LEVELS).fit(X, y).lr_test(
            OrdinalRegression(levels=UCLA_LEVELS, link="cauchit").fit(X[["gpa"]], y))
    g = np.arange(len(y)) // 4
    fw = OrdinalRegression(levels=UCLA_LEVELS).fit(X, y, sample_weight=w, cov_groups=g)
    rep = np.repeat(np.arange(len(y)), w.astype(int))
    ex = OrdinalRegression(levels=UCLA_LEVELS).fit(X.iloc[rep], y.iloc[rep], cov_groups=g[rep])
    np.testing.assert_allclose(fw.bse_, ex.bse_, rtol=1e-8)
