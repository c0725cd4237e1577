"""Partial proportional odds (nominal=): against the same likelihood written out and maximised
by scipy, known cut-specific slopes recovered, the LR test of proportional odds, persistence and
bad input."""

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.special import expit

from fedgrain import OrdinalRegression, load
from fedgrain.datasets import load_randhie
from fedgrain.exceptions import DataError


@pytest.fixture(scope="module")
def hie():
    df = load_randhie().sample(4000, random_state=8)
    return df.drop(columns="health"), df["health"]


def _nll(par, X, codes, R, K1, F=expit):
    n, p = X.shape
    b, th = par[:p], par[p:p + K1]
    de = par[p + K1:].reshape(K1 - 1, len(R))
    t = th[None, :] - (X @ b)[:, None] - np.column_stack([np.zeros(n), X[:, R] @ de.T])
    C = np.column_stack([np.zeros(n), F(t), np.ones(n)])
    pi = C[np.arange(n), codes + 1] - C[np.arange(n), codes]
    return 1e300 if np.any(pi <= 0) else -np.log(pi).sum()


@pytest.mark.parametrize("link,F", [("logit", expit), ("probit", stats.norm.cdf)])
def test_matches_the_likelihood_written_out_and_maximised_by_scipy(hie, link, F):
    X, y = hie
    m = OrdinalRegression(nominal=["physlm", "disea"], link=link).fit(X, y)
    Xn, codes = X.to_numpy(float), y.cat.codes.to_numpy()
    R, K1 = [4, 5], 3
    po = OrdinalRegression(link=link).fit(X, y)
    x0 = np.r_[po.coef_, po.thresholds_, np.zeros(4)]
    ref = optimize.minimize(_nll, x0, args=(Xn, codes, R, K1, F), method="BFGS",
                            options={"gtol": 1e-7, "maxiter": 10_000})
    ours = np.r_[m.coef_, m.thresholds_, m.nominal_delta_.reshape(-1)]
    np.testing.assert_allclose(ours, ref.x, atol=1e-4)
    assert m.loglik_ == pytest.approx(-ref.fun, abs=1e-6)
    # standard errors: the inverse of a finite-difference Hessian of the same likelihood
    h, d = 1e-4, ours.size
    E = np.eye(d) * h
    H = np.array([[(_nll(ours + E[i] + E[j], Xn, codes, R, K1, F)
                    - _nll(ours + E[i] - E[j], Xn, codes, R, K1, F)
                    - _nll(ours - E[i] + E[j], Xn, codes, R, K1, F)
                    + _nll(ours - E[i] - E[j], Xn, codes, R, K1, F)) / (4 * h * h)
                   for j in range(d)] for i in range(d)])
    se = np.sqrt(np.diag(np.linalg.inv(H)))
    np.testing.assert_allclose(np.sqrt(np.diag(m.nominal_cov_)), se, rtol=2e-3)
    # the slope at each cut, with its standard error, in summary()
    table = m._slopes_table(0.05)
    assert table.shape[0] == 6 and "Slopes of the nominal features" in str(m.summary())
    np.testing.assert_allclose(table["coef"].to_numpy(), m.slopes_by_cut_.reshape(-1))


def test_known_cut_specific_slopes_are_recovered_and_tested():
    rng = np.random.default_rng(3)
    n = 20_000
    X = rng.standard_normal((n, 2))
    slopes = np.array([[0.5, -0.5], [0.8, -0.5], [1.1, -0.5]])  # x0's slope grows by cut
    cuts = np.array([-1.0, 0.3, 1.4])
    Fc = np.maximum.accumulate(expit(cuts[None, :] - X @ slopes.T), axis=1)
    y = (rng.random(n)[:, None] > Fc).sum(axis=1)
    m = OrdinalRegression(nominal=[0]).fit(X, y)
    se = np.sqrt(np.diag(m.nominal_cov_))
    assert np.all(np.abs(m.slopes_by_cut_[:, 0] - slopes[:, 0])
                  < 3 * np.r_[se[0], np.hypot(se[0], se[5:])])
    po = OrdinalRegression().fit(X, y)
    test = m.lr_test(po)
    assert test.df == 2 and test.pvalue < 1e-6
    assert "same slope at every cut for x0" in test.hypothesis
    # where proportional odds hold, the nominal fit finds equal slopes
    y0 = (rng.random(n)[:, None] > expit(cuts[None, :] - X @ slopes[1][:, None])).sum(axis=1)
    m0 = OrdinalRegression(nominal=[0]).fit(X, y0)
    assert np.ptp(m0.slopes_by_cut_[:, 0]) < 0.15


def test_saved_predicted_and_refused(hie, tmp_path):
    X, y = hie
    m = OrdinalRegression(nominal=["physlm"]).fit(X, y)
    back = load(m.save(tmp_path / "m"))
    np.testing.assert_array_equal(back.predict_proba(X.head(20)), m.predict_proba(X.head(20)))
    np.testing.assert_array_equal(back.slopes_by_cut_, m.slopes_by_cut_)
    P = m.predict_proba(X.head(50))
    assert np.allclose(P.sum(axis=1), 1.0) and np.all(P >= 0)
    for call in (lambda: m.predict_proba_ci(X.head()), lambda: m.marginal_effects(X),
                 lambda: m.proportional_odds_test(X, y)):
        with pytest.raises(DataError, match="nominal features"):
            call()
    with pytest.raises(DataError, match="not a feature"):
        OrdinalRegression(nominal=["nope"]).fit(X, y)
    with pytest.raises(DataError, match="one cut"):
        OrdinalRegression(nominal=[0]).fit(X, (y.cat.codes > 1).astype(int))
    with pytest.raises(DataError, match="frequency"):
        OrdinalRegression(nominal=[0]).fit(X, y, cov_groups=np.arange(len(y)) // 5)


def test_the_command_line_fits_nominal_features(hie, tmp_path, capsys):
    from fedgrain.cli import main

    X, y = hie
    data = str(tmp_path / "d.csv")
    X.assign(health=y).to_csv(data, index=False)
    assert main(["--quiet", "fit", data, "--target", "health", "--levels",
                 "poor,fair,good,excellent", "--estimator", "mle", "--nominal", "physlm",
                 "--out", str(tmp_path / "m")]) == 0
    assert "physlm @ good|excellent" in capsys.readouterr().out
    ref = OrdinalRegression(nominal=["physlm"]).fit(X, y)
    np.testing.assert_allclose(load(tmp_path / "m").slopes_by_cut_, ref.slopes_by_cut_,
                               atol=1e-10)


def test_review_cases_crossings_runaway_nesting_input_and_tampering(tmp_path):
    """The cuts never cross at a fitted row (whatever its level); a delta that runs off is
    separation, not convergence; lr_test refuses models that are not nested; nominal= takes
    one name, an array, or a categorical's name; a tampered nominal_idx is refused."""
    import pandas as pd

    from fedgrain.exceptions import ModelFileError, SeparationError
    from fedgrain.persist import read_model_dir, write_model_dir

    rng = np.random.default_rng(5)
    n = 3000
    x = rng.standard_normal(n)
    # the two cuts' lines cross at large |x|: slopes 1.0 and -0.2
    F0 = expit(-0.5 - x)
    F1 = np.maximum(expit(0.5 + 0.2 * x), F0)
    u = rng.random(n)
    y = (u > F0).astype(int) + (u > F1)
    X = np.column_stack([np.r_[x, -6.0, -6.5, -7.0], rng.standard_normal(n + 3)])
    y = np.r_[y, 0, 0, 0]  # three rows of the bottom level far left
    with pytest.warns(UserWarning, match="fitted rows the nominal features' cut-specific "
                                         "lines cross"):
        m = OrdinalRegression(nominal=[0]).fit(X, y)
    from fedgrain.core.nominal import row_thresholds

    t = row_thresholds(m.thresholds_, X[:, [0]], m.nominal_delta_)
    crossed = np.any(np.diff(t, axis=1) <= 0, axis=1)
    assert crossed.any()
    with pytest.warns(UserWarning, match="made non-decreasing"):
        P = m.predict_proba(X)
    assert np.allclose(P.sum(axis=1), 1.0) and np.all(P >= 0)
    from fedgrain.core.likelihood import class_proba

    ok = ~crossed  # elsewhere the predictions are the model's own
    np.testing.assert_allclose(P[ok], class_proba(X[ok] @ m.coef_, t[ok]), atol=1e-15)
    # the top level of five holds the two largest x only: its delta runs off
    Xs = rng.standard_normal((800, 1))
    ys = np.digitize(Xs[:, 0] + rng.logistic(size=800), [-1.5, -0.5, 0.5])
    ys[np.argsort(Xs[:, 0])[-2:]] = 4
    with pytest.raises(SeparationError):
        OrdinalRegression(nominal=[0]).fit(Xs, ys)
    frame = pd.DataFrame(X, columns=["a", "b"]).assign(c=rng.standard_normal(len(y)))
    small = OrdinalRegression(nominal="a").fit(frame[["a", "b"]], y)
    big = OrdinalRegression(nominal=["b"]).fit(frame, y)
    with pytest.raises(DataError, match="not nested"):
        big.lr_test(small)
    same = OrdinalRegression(nominal=np.array([0])).fit(frame[["a", "b"]], y)
    np.testing.assert_allclose(same.slopes_by_cut_, small.slopes_by_cut_)
    cat = frame.assign(color=rng.choice(["red", "green", "blue"], len(y)))
    mc = OrdinalRegression(nominal=["color"], categorical=["color"]).fit(cat, y)
    assert mc.slopes_by_cut_.shape == (2, 2)
    path = small.save(tmp_path / "m")
    for i, idx in enumerate(([1], [0, 0], [True], [])):
        meta, arrays = read_model_dir(path)
        meta["nominal_idx"] = idx
        write_model_dir(tmp_path / f"bad{i}", meta, arrays)
        with pytest.raises(ModelFileError):
            load(tmp_path / f"bad{i}")
