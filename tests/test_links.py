"""Link functions: OrdinalRegression with every link against statsmodels' OrderedModel on real
data, the links' tails, and the score test and effects under another link."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels
from scipy import optimize, stats
from statsmodels.miscmodels.ordinal_model import OrderedModel

from fedgrain import DivideConquerOrdinal, OrdinalRegression, load
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
    np.testing.assert_allclose(m.predict_proba(X.head(20), order="levels"),
                               np.asarray(res.predict(X.head(20))), atol=1e-5)
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
    up = m.predict_proba(pd.DataFrame(Xp, columns=X.columns), order="levels")
    down = m.predict_proba(pd.DataFrame(Xm, columns=X.columns), order="levels")
    fd = (up.mean(0) - down.mean(0)) / (2 * h)
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


def _composite_reference(X, codes, link):
    """The composite likelihood written out with scipy's distributions and maximised by
    scipy, with its cluster sandwich from per-row scores by finite differences: an
    independent centralised composite fit."""
    dist = {"logit": stats.logistic, "probit": stats.norm}.get(link, DISTR[link])
    n, p = X.shape
    K1 = int(codes.max())
    U = codes[:, None] > np.arange(K1)[None, :]

    def rows(par):
        A = par[p:][None, :] - (X @ par[:p])[:, None]
        return -np.where(U, dist.logsf(A), dist.logcdf(A)).sum(axis=1)

    def scores(par, eps=1e-6):
        return np.column_stack([(rows(par + eps * e) - rows(par - eps * e)) / (2 * eps)
                                for e in np.eye(par.size)])

    from fedgrain.core.likelihood import initial_thresholds
    x0 = np.r_[np.zeros(p), initial_thresholds(codes, None, K1 + 1, link=get_link(link))]
    res = optimize.minimize(lambda v: rows(v).sum(), x0, jac=lambda v: scores(v).sum(axis=0),
                            method="BFGS", options={"gtol": 1e-9, "maxiter": 2000})
    x = res.x
    S = scores(x)
    H = np.column_stack([(scores(x + 1e-5 * e).sum(0) - scores(x - 1e-5 * e).sum(0)) / 2e-5
                         for e in np.eye(x.size)])
    Hinv = np.linalg.inv((H + H.T) / 2)
    return x, np.sqrt(np.diag(Hinv @ (S.T @ S) @ Hinv))


@pytest.mark.parametrize("link", LINKS)
def test_divide_and_conquer_matches_its_centralised_composite_fit_for_every_link(link):
    """Every link in the composite likelihood, on real data with a rare class (82 of 6,000
    rows): the divide-and-conquer fit is within 0.1 SE of the composite likelihood maximised
    centrally by scipy (written out with scipy's distributions, with its own sandwich) after
    the default one refinement round for the log-concave links, and for every link within
    0.01 SE, standard errors within 0.5%, when the rounds run to convergence. The cauchit's
    heavy tails leave the one-round estimate 0.17 SE away here (docs/guide.md, "Links")."""
    df = load_randhie().sample(6000, random_state=1)
    Xv = df.drop(columns="health").to_numpy(float)
    Xv = (Xv - Xv.mean(0)) / Xv.std(0)  # scipy's BFGS on standardised columns
    codes = df["health"].cat.codes.to_numpy()
    ref, se = _composite_reference(Xv, codes, link)
    if link != "cauchit":
        one = DivideConquerOrdinal(n_subsets=4, backend="serial", link=link).fit(Xv, codes)
        assert np.max(np.abs(np.r_[one.coef_, one.thresholds_] - ref) / se) < 0.1
    dc = DivideConquerOrdinal(n_subsets=4, backend="serial", link=link,
                              refine_rounds=5).fit(Xv, codes)
    assert np.max(np.abs(np.r_[dc.coef_, dc.thresholds_] - ref) / se) < 0.01
    np.testing.assert_allclose(dc.bse_, se, rtol=0.005)
    # the model predicts with its link: its probabilities are those of the link's cdf
    eta = Xv[:5] @ dc.coef_
    F = get_link(link).cdf(dc.thresholds_[None, :] - eta[:, None])
    np.testing.assert_allclose(dc.predict_proba(Xv[:5], order="levels"),
                               np.diff(F, prepend=0, append=1),
                               atol=1e-12)
    assert f"cumulative {link}" in dc.summary().as_text()


def test_divide_and_conquer_link_is_the_same_on_every_backend_and_survives_saving(tmp_path):
    import hashlib
    import json

    from fedgrain.exceptions import ModelFileError
    from fedgrain.persist import _canonical_json

    df = load_randhie().sample(3000, random_state=2)
    X, y = df.drop(columns="health"), df["health"]
    serial = DivideConquerOrdinal(n_subsets=3, backend="serial", link="cloglog").fit(X, y)
    procs = DivideConquerOrdinal(n_subsets=3, backend="processes", n_jobs=2,
                                 link="cloglog").fit(X, y)
    np.testing.assert_array_equal(serial.results_.params, procs.results_.params)
    np.testing.assert_array_equal(serial.cov_, procs.cov_)
    serial.save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert back.link == "cloglog" and back.results_.link == "cloglog"
    np.testing.assert_array_equal(back.predict_proba(X), serial.predict_proba(X))
    # the CLAIC is that of the composite likelihood with the model's link
    crit = serial.composite_criteria(X, y)
    assert crit["composite loglik"] < 0 and crit["effective parameters"] > 0
    # a link edited into the file (checksums recomputed) is refused on load
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    doc["meta"]["params"]["link"] = "os.system"
    doc["checksums"]["meta_sha256"] = hashlib.sha256(_canonical_json(doc["meta"])).hexdigest()
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="link must be one of"):
        load(tmp_path / "m")
    with pytest.raises(ParameterError, match="link"):
        DivideConquerOrdinal(link="identity").fit(X, y)


@pytest.mark.parametrize("name", LINKS)
def test_composite_pass_of_every_link_matches_finite_differences(name):
    from fedgrain.core.likelihood import _composite_pass_link, composite_pass

    rng = np.random.default_rng(0)
    n, p = 400, 3
    X, y = rng.standard_normal((n, p)), rng.integers(0, 4, n)
    w = rng.uniform(0.5, 2.0, n)
    x0 = np.r_[0.3 * rng.standard_normal(p), -1.0, 0.2, 1.1]
    link = get_link(name)

    def at(x, **kw):
        return composite_pass(X, y, w, x[:p], x[p:], link=link, **kw)

    P = at(x0, meat="cluster")
    eye = np.eye(x0.size)
    g = np.array([(at(x0 + 1e-6 * e, order=0).loss - at(x0 - 1e-6 * e, order=0).loss) / 2e-6
                  for e in eye])
    H = np.array([(at(x0 + 1e-6 * e, order=1).grad - at(x0 - 1e-6 * e, order=1).grad) / 2e-6
                  for e in eye])
    np.testing.assert_allclose(P.grad, g, atol=1e-5)
    np.testing.assert_allclose(P.hess, H, atol=1e-5)
    if name == "logit":  # the general pass reproduces the logit pass exactly
        for meat in ("cluster", "row"):
            a = _composite_pass_link(X, y, w, x0[:p], x0[p:], link, meat=meat, by_class=True,
                                     thresholds=[0, 2])
            b = composite_pass(X, y, w, x0[:p], x0[p:], meat=meat, by_class=True,
                               thresholds=[0, 2])
            for f in ("loss", "grad", "hess", "meat", "class_grad"):
                np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=1e-10)


def test_separation_is_found_for_every_link_in_the_composite_fit():
    """A feature positive only in (half of) the top class: the composite likelihood has no
    finite optimum along it, whatever the link (the probit's and cloglog's de-biasing steps
    are shorter than the logit's, the cauchit's Newton steps shrink as it runs off)."""
    from fedgrain.exceptions import SeparationError

    rng = np.random.default_rng(0)
    n = 2000
    X = rng.standard_normal((n, 3))
    y = np.digitize(X[:, :2] @ [0.8, -0.5] + rng.logistic(size=n), [-1, 0, 1, 2.5])
    X[:, 2] = 0.0
    top = np.flatnonzero(y == 4)[::2]
    X[top, 2] = rng.uniform(0.5, 2.0, top.size)
    for link in LINKS:
        with pytest.raises(SeparationError, match="separated"):
            DivideConquerOrdinal(n_subsets=4, backend="serial", link=link).fit(X, y)


def test_composite_curvature_is_exact_far_in_the_tails_and_zero_weights_add_nothing():
    from fedgrain.core.likelihood import composite_pass

    one = np.zeros((1, 1))
    # cloglog, a row above a cut at a = 40: V = h = exp(40) (not 0 from 1 - e^a + e^a)
    P = composite_pass(one, np.array([1]), None, np.zeros(1), np.array([40.0]),
                       link=get_link("cloglog"))
    assert P.hess[1, 1] == pytest.approx(np.exp(40.0), rel=1e-12)
    P = composite_pass(one, np.array([0]), None, np.zeros(1), np.array([-40.0]),
                       link=get_link("loglog"))
    assert P.hess[1, 1] == pytest.approx(np.exp(40.0), rel=1e-12)
    # a row of weight zero far in a tail adds nothing (no 0 * inf)
    X, y = np.array([[1.0], [0.2]]), np.array([0, 1])
    for name in LINKS[1:]:
        P = composite_pass(X, y, np.array([0.0, 1.0]), np.array([-900.0]), np.array([0.0]),
                           link=get_link(name), meat="cluster", by_class=True)
        Q = composite_pass(X[1:], y[1:], None, np.array([-900.0]), np.array([0.0]),
                           link=get_link(name), meat="cluster", by_class=True)
        for f in ("loss", "grad", "hess", "meat", "class_grad"):
            np.testing.assert_array_equal(getattr(P, f), getattr(Q, f))


def test_an_undeclared_link_attribute_changes_nothing_in_the_adaptive_estimator():
    from fedgrain import AdaptiveFederatedOrdinal
    from fedgrain.datasets import make_regions

    X, y, *_ = make_regions(3000, n_regions=2, random_state=0)
    a = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
    b = AdaptiveFederatedOrdinal(backend="serial")
    b.link = "probit"
    b.fit(X, y)
    np.testing.assert_array_equal(a.global_model_.results_.params,
                                  b.global_model_.results_.params)
    assert b.global_model_.results_.link == "logit"
