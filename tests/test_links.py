"""Link functions: OrdinalRegression with every link against statsmodels' OrderedModel on real
data, the links' tails, and the score test and effects under another link."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels
from scipy import stats
from statsmodels.miscmodels.ordinal_model import OrderedModel

from fedgrain import OrdinalRegression, load
from fedgrain.core.likelihood import class_proba, exact_pass
from fedgrain.core.links import LINKS, get_link
from fedgrain.datasets import load_randhie
from fedgrain.exceptions import DataError, ParameterError

UCLA = Path(statsmodels.__file__).parent / "miscmodels/tests/results/ologit_ucla.csv"
UCLA_LEVELS = ["unlikely", "somewhat likely", "very likely"]
DISTR = {"logit": "logit", "probit": "probit", "cloglog": stats.gumbel_l,
         "loglog": stats.gumbel_r, "cauchit": stats.cauchy}


def _statsmodels(X, y, link):
    res = OrderedModel(y, X, distr=DISTR[link]).fit(method="bfgs", disp=False, maxiter=5000,
                                                    gtol=1e-10)
    p = X.shape[1]
    thr = res.model.transform_threshold_params(res.params)[1:-1]
    return res, np.r_[np.asarray(res.params)[:p], thr]


@pytest.mark.parametrize("link", LINKS)
def test_every_link_matches_statsmodels_on_ucla(link):
    df = pd.read_csv(UCLA)
    X = df[["pared", "public", "gpa"]]
    y = pd.Series(pd.Categorical(df["apply"], categories=UCLA_LEVELS, ordered=True))
    m = OrdinalRegression(levels=UCLA_LEVELS, link=link).fit(X, df["apply"])
    res, params = _statsmodels(X, y, link)
    np.testing.assert_allclose(np.r_[m.coef_, m.thresholds_], params, atol=1e-5)
    np.testing.assert_allclose(m.bse_[:3], np.asarray(res.bse)[:3], rtol=1e-5)
    assert m.loglik_ == pytest.approx(res.llf, abs=1e-6)
    np.testing.assert_allclose(m.predict_proba(X.head(20)), np.asarray(res.predict(X.head(20))),
                               atol=1e-5)
    assert m.summary().notes[0].startswith("Thresholds: P(Y <= k | x) =")


@pytest.mark.parametrize("link", ["probit", "cloglog"])
def test_links_match_statsmodels_on_rand_hie(link):
    df = load_randhie().sample(1500, random_state=3)
    X = df.drop(columns="health")
    m = OrdinalRegression(link=link).fit(X, df["health"])
    res, params = _statsmodels(X, df["health"], link)
    np.testing.assert_allclose(np.r_[m.coef_, m.thresholds_], params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m.bse_[:7], np.asarray(res.bse)[:7], rtol=1e-4)


@pytest.mark.parametrize("name", LINKS)
def test_link_functions_are_accurate_in_both_tails(name):
    link = get_link(name)
    dist = {"logit": stats.logistic, "probit": stats.norm, "cloglog": stats.gumbel_l,
            "loglog": stats.gumbel_r, "cauchit": stats.cauchy}[name]
    a = np.array([-30.0, -8.0, -1.0, 0.0, 0.7, 8.0, 30.0])
    np.testing.assert_allclose(link.cdf(a), dist.cdf(a), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(link.sf(a), dist.sf(a), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(link.logcdf(a), dist.logcdf(a), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(link.logsf(a), dist.logsf(a), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(link.logpdf(a), dist.logpdf(a), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(link.pdf(a), dist.pdf(a), rtol=1e-9, atol=1e-300)
    h = 1e-5
    mid = a[1:-1]
    np.testing.assert_allclose(link.ratio(mid) * link.pdf(mid),
                               (link.pdf(mid + h) - link.pdf(mid - h)) / (2 * h), atol=1e-8)
    q = np.array([1e-9, 0.2, 0.5, 0.9, 1 - 1e-9])
    np.testing.assert_allclose(link.cdf(link.ppf(q)), q, rtol=1e-9)
    # the exact likelihood's probabilities from both tails: rows far out keep their value
    theta = np.array([-1.0, 0.5])
    eta = np.array([-40.0, 0.0, 40.0])
    P = class_proba(eta, theta, link)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)
    ref = np.where(eta < 0, dist.sf(-1.0 - eta) - dist.sf(0.5 - eta),
                   dist.cdf(0.5 - eta) - dist.cdf(-1.0 - eta))
    np.testing.assert_allclose(P[:, 1], ref, rtol=1e-9, atol=1e-300)
    codes = np.array([0, 1, 2])
    loss = exact_pass(np.zeros((3, 1)), codes, None, np.zeros(1), theta, order=0,
                      shift=-eta[:, None], link=link).loss
    assert np.isfinite(loss)


def test_score_test_effects_and_saving_under_another_link(tmp_path):
    df = load_randhie().sample(3000, random_state=4)
    X, y = df.drop(columns="health"), df["health"]
    m = OrdinalRegression(link="probit").fit(X, y)
    test = m.proportional_odds_test(X, y, method="score")
    assert test.table.shape == (8, 3)
    with pytest.raises(DataError, match="Brant's test compares binary logits"):
        m.proportional_odds_test(X, y)
    me = m.marginal_effects(X)
    Xn = X.to_numpy(float)
    h = 1e-5
    Xp, Xm = Xn.copy(), Xn.copy()
    Xp[:, 4] += h
    Xm[:, 4] -= h
    fd = (m.predict_proba(pd.DataFrame(Xp, columns=X.columns)).mean(0)
          - m.predict_proba(pd.DataFrame(Xm, columns=X.columns)).mean(0)) / (2 * h)
    np.testing.assert_allclose(me.loc["physlm", "dy/dx"].to_numpy(), fd, atol=1e-7)
    back = load(m.save(tmp_path / "m"))
    assert back.link == "probit" and back.results_.link == "probit"
    np.testing.assert_array_equal(back.predict_proba(X.head()), m.predict_proba(X.head()))
    np.testing.assert_allclose(back.predict_proba_ci(X.head())[1],
                               m.predict_proba_ci(X.head())[1])
    with pytest.raises(ParameterError, match="link"):
        OrdinalRegression(link="identity").fit(X, y)


@pytest.mark.parametrize("name", LINKS)
def test_the_likelihood_derivatives_hold_far_in_the_tails(name):
    """The top level's row far below its cut has d log pi / d a0 = -f/(1 - F) (the hazard),
    the bottom level's row far above its cut f/F: against their closed forms (cloglog and
    loglog exp(|a|), where a subtraction would lose every digit), with no warning."""
    import warnings

    from fedgrain.core.likelihood import _cut_parts_link

    link = get_link(name)
    dist = {"logit": stats.logistic, "probit": stats.norm, "cloglog": stats.gumbel_l,
            "loglog": stats.gumbel_r, "cauchit": stats.cauchy}[name]
    theta = np.array([-1.0, 0.5])
    for a in (5.0, 37.0, 100.0, 600.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, _, g0, _, _ = _cut_parts_link(np.array([theta[-1] - a]), np.array([2]), theta,
                                             link)
            _, g1, _, _, _ = _cut_parts_link(np.array([theta[0] + a]), np.array([0]), theta,
                                             link)
        hazard = {"cloglog": np.exp(a), "loglog": 1.0}.get(
            name, np.exp(dist.logpdf(a) - dist.logsf(a)))
        rhazard = {"cloglog": 1.0, "loglog": np.exp(a)}.get(
            name, np.exp(dist.logpdf(-a) - dist.logcdf(-a)))
        if name == "loglog":
            hazard = np.exp(dist.logpdf(a) - dist.logsf(a))
        if name == "cloglog":
            rhazard = np.exp(dist.logpdf(-a) - dist.logcdf(-a))
        assert g0[0] == pytest.approx(hazard, rel=1e-9), (a, "hazard")
        assert g1[0] == pytest.approx(rhazard, rel=1e-9), (a, "reversed hazard")
