"""Inference read off a fit: tables, Wald tests, simultaneous intervals, probability intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedgrain import DivideConquerOrdinal, OrdinalRegression
from fedgrain.datasets import make_ordinal
from fedgrain.inference.results import OrdinalResults


@pytest.fixture(scope="module")
def fitted():
    X, y, _, _ = make_ordinal(3000, 4, 4, random_state=2)
    X = pd.DataFrame(X, columns=["age", "income", "score", "noise"])
    return OrdinalRegression().fit(X, y), X


def test_summary_table_is_consistent(fitted):
    model, _ = fitted
    frame = model.summary().to_frame()
    r = model.results_
    assert list(frame.index) == ["age", "income", "score", "noise", "0|1", "1|2", "2|3"]
    assert list(frame.columns) == ["coef", "std err", "z", "P>|z|", "[0.025", "0.975]"]
    np.testing.assert_allclose(frame["coef"], np.r_[model.coef_, model.thresholds_])
    np.testing.assert_allclose(frame["std err"], model.bse_)
    np.testing.assert_allclose(frame["z"], frame["coef"] / frame["std err"])
    np.testing.assert_allclose(frame["P>|z|"], 2 * stats.norm.sf(np.abs(frame["z"])))
    np.testing.assert_allclose(frame["[0.025"], frame["coef"] - 1.959964 * frame["std err"],
                               rtol=1e-6)
    ci90 = r.conf_int(0.10)
    np.testing.assert_allclose(ci90[:, 1] - ci90[:, 0], 2 * 1.644854 * r.bse, rtol=1e-6)
    text = str(model.summary())
    assert "age" in text and "std err" in text and "Log-likelihood" in text
    html = model.summary()._repr_html_()
    assert html.count("<table") == 2 and "income" in html


def test_pooled_summary_shows_heterogeneity():
    X, y, _, _ = make_ordinal(8000, 3, 3, random_state=4)
    dc = DivideConquerOrdinal(n_subsets=4, backend="serial").fit(X, y)
    frame = dc.summary().to_frame()
    assert {"I2", "n_subsets"} <= set(frame.columns)
    assert (frame["n_subsets"] == 4).all() and frame["I2"].between(0, 1).all()
    assert "Heterogeneity Q" in str(dc.summary())


def test_wald_tests(fitted):
    model, _ = fitted
    r = model.results_
    single = r.wald_test(["income"])
    assert single.df == 1
    assert single.statistic == pytest.approx(r.zvalues[1] ** 2)
    assert single.pvalue == pytest.approx(r.pvalues[1])
    joint = r.wald_test(["age", "noise"])
    idx = [0, 3]
    diff = r.params[idx]
    expected = diff @ np.linalg.solve(r.cov[np.ix_(idx, idx)], diff)
    assert joint.statistic == pytest.approx(expected) and joint.df == 2
    # R matrix form: age = income (one restriction)
    R = np.zeros((1, r.params.size))
    R[0, 0], R[0, 1] = 1, -1
    contrast = r.wald_test(R)
    var = r.cov[0, 0] + r.cov[1, 1] - 2 * r.cov[0, 1]
    assert contrast.statistic == pytest.approx((r.params[0] - r.params[1]) ** 2 / var)
    assert "age = noise = 0" in str(joint)
    with pytest.raises(ValueError, match="unknown parameter 'salary'"):
        r.wald_test(["salary"])


def test_simultaneous_intervals_lie_between_marginal_and_bonferroni(fitted):
    model, _ = fitted
    r = model.results_
    marginal = np.diff(r.conf_int(0.05), axis=1).ravel()
    bonf = np.diff(r.simultaneous_conf_int(0.05, "bonferroni"), axis=1).ravel()
    maxz = np.diff(r.simultaneous_conf_int(0.05, "max-z"), axis=1).ravel()
    m = r.params.size
    np.testing.assert_allclose(bonf, 2 * stats.norm.isf(0.05 / (2 * m)) * r.bse)
    assert np.all(marginal < maxz) and np.all(maxz <= bonf)
    # uncorrelated parameters: max-|Z| is the Sidak value (up to simulation error)
    ind = OrdinalResults(np.zeros(3), np.eye(3), ["a"], [0, 1, 2])
    crit = ind.simultaneous_conf_int(0.05, "max-z")[0, 1]
    assert crit == pytest.approx(stats.norm.isf((1 - 0.95 ** (1 / 3)) / 2), abs=0.01)


def test_probability_intervals_match_numerical_delta_method(fitted):
    model, X = fitted
    r = model.results_
    x = X.to_numpy()[:5]
    proba, lo, hi = model.predict_proba_ci(X.head(5), alpha=0.05)
    np.testing.assert_allclose(proba, model.predict_proba(X.head(5)))
    assert np.all((lo < proba) & (proba < hi)) and np.all(lo > 0) and np.all(hi < 1)
    # numerical gradient of logit(pi_k) in the parameters, then the delta method
    p = x.shape[1]

    def logit_proba(params):
        eta = x @ params[:p]
        F = 1 / (1 + np.exp(-(params[p:][None, :] - eta[:, None])))
        pk = np.diff(np.c_[np.zeros(5), F, np.ones(5)], axis=1)
        return np.log(pk / (1 - pk))

    h = 1e-6
    G = np.array([(logit_proba(r.params + h * e) - logit_proba(r.params - h * e)) / (2 * h)
                  for e in np.eye(r.params.size)])  # (d, n, K)
    se = np.sqrt(np.einsum("inj,ik,knj->nj", G, r.cov, G))
    z = stats.norm.isf(0.025)
    lg = np.log(proba / (1 - proba))
    np.testing.assert_allclose(lo, 1 / (1 + np.exp(-(lg - z * se))), rtol=1e-5)
    np.testing.assert_allclose(hi, 1 / (1 + np.exp(-(lg + z * se))), rtol=1e-5)


def test_wald_test_refuses_ambiguous_requests(fitted):
    model, _ = fitted
    with pytest.raises(ValueError, match="listed twice"):
        model.results_.wald_test([1, 1, 0, 0])
    with pytest.raises(ValueError, match="at least one parameter"):
        model.results_.wald_test([])
    with pytest.raises(ValueError, match="2-D matrix"):
        model.results_.wald_test(np.ones(7))


def test_probability_intervals_far_in_the_tails():
    r = OrdinalResults(np.array([1.0, -1.0, 1.0]), np.diag([0.01, 0.02, 0.02]), ["x"],
                       ["lo", "mid", "hi"])
    proba, lo, hi = r.predict_proba_ci(np.array([[45.0], [0.0], [-45.0]]))
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    assert 0 < proba[0, 0] < 1e-15  # a tiny probability, not rounded to zero
    assert np.all((lo <= proba) & (proba <= hi))
    assert hi[0, 0] < 1e-10  # and its interval stays tiny too


def test_wald_tests_written_as_text_equal_the_matrix_form():
    r = OrdinalResults(np.array([0.5, 0.3, -1.0, 1.0]), np.array(
        [[0.01, 0.002, 0, 0], [0.002, 0.02, 0, 0], [0, 0, 0.04, 0.01], [0, 0, 0.01, 0.04]]),
        ["age", "in-come"], ["-1", "0", "1"])
    d = 4

    def matrix(rows, q):
        return r.wald_test(np.array(rows, dtype=float).reshape(-1, d), q)

    cases = [("age = in-come", [1, -1, 0, 0], [0]),
             ("age + 2*in-come = 0", [1, 2, 0, 0], [0]),
             ("0.5 * age - in-come = 1", [0.5, -1, 0, 0], [1]),
             ("2*age = 1e-1 + in-come", [2, -1, 0, 0], [0.1]),
             ("-1|0 + 1 = 0|1 - 1", [0, 0, 1, -1], [-2]),  # threshold names with '-' and '|'
             ("age", [1, 0, 0, 0], [0])]
    for text, row, q in cases:
        got, ref = r.wald_test(text), matrix(row, q)
        assert got.statistic == pytest.approx(ref.statistic, rel=1e-12), text
        assert got.df == 1 and got.hypothesis == text
    joint = r.wald_test(["age = 0", "in-come = 0"])
    assert joint.df == 2 and joint.statistic == pytest.approx(
        r.wald_test(["age", "in-come"]).statistic)
    for bad, msg in (("age = = 1", "one '='"), ("foo = 1", "unknown parameter"),
                     ("age +", "ends with an operator"), ("age in-come = 0", "expected '\\+'"),
                     ("1 = 2", "names no parameter")):
        with pytest.raises(ValueError, match=msg):
            r.wald_test(bad)
    with pytest.raises(ValueError, match="q goes with a matrix"):
        r.wald_test("age = 0", q=[1.0])
    with pytest.raises(ValueError, match="side of '=' is empty"):
        r.wald_test("age = ")
    with pytest.raises(ValueError, match="every restriction of a list"):
        r.wald_test(["age = in-come", "age"])
    assert r.wald_test("age*-2 = 1").statistic == pytest.approx(
        matrix([-2, 0, 0, 0], [1]).statistic)


def test_labelled_results_are_the_arrays_with_names(fitted):
    model, _ = fitted
    r = model.results_
    lab = r.labelled
    assert list(lab.params.index) == r.param_names
    np.testing.assert_array_equal(lab.params.to_numpy(), r.params)
    np.testing.assert_array_equal(lab.bse.to_numpy(), r.bse)
    np.testing.assert_array_equal(lab.pvalues.to_numpy(), r.pvalues)
    np.testing.assert_array_equal(lab.zvalues.to_numpy(), r.zvalues)
    np.testing.assert_array_equal(lab.conf_int(0.1).to_numpy(), r.conf_int(0.1))
    assert lab.params["age"] == model.coef_[0]
