"""MixedOrdinalRegression: the Laplace-REML criterion against an independent dense computation,
recovery of known variances and fixed effects, the zero-variance boundary, predictions, and
bad input."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize
from scipy.special import expit

from fedgrain import MixedOrdinalRegression, OrdinalRegression, load
from fedgrain.core.likelihood import class_proba
from fedgrain.core.standardize import Standardizer
from fedgrain.estimators.mixed import _Laplace
from fedgrain.exceptions import DataError, ParameterError


def world(n_groups, n_rows, sd_int, sd_slope, seed, p=2, cuts=(-1.0, 0.5, 1.5)):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), n_rows)
    X = rng.standard_normal((g.size, p))
    beta = np.linspace(1.0, -0.5, p)
    b = rng.normal(0.0, sd_slope, (n_groups, p))
    a = rng.normal(0.0, sd_int, n_groups)
    eta = np.einsum("ij,ij->i", X, beta + b[g]) + a[g]
    y = np.digitize(eta + rng.logistic(size=g.size), cuts)
    return X, y, g, beta, np.asarray(cuts)


def _nll(phi, v, lam, X, y, g, Z, p):
    """The joint penalised loss written independently of fedgrain's derivatives."""
    beta, theta = phi[:p], phi[p:]
    if np.any(np.diff(theta) <= 0):
        return np.inf
    eta = X @ beta + np.einsum("ij,ij->i", Z @ lam, v[g])
    t = np.concatenate(([-np.inf], theta, [np.inf]))
    pi = expit(t[y + 1] - eta) - expit(t[y] - eta)
    return -np.sum(np.log(pi)) + 0.5 * np.sum(v * v)


def test_reml_criterion_matches_a_dense_laplace_computation():
    """At a fixed Lambda, the criterion is f at the joint mode plus half the log-determinant of
    the joint Hessian; here both come from scipy on the plain likelihood and a finite-difference
    Hessian of all (d + J q) parameters, with no block elimination."""
    X, y, g, _, _ = world(6, 40, 0.7, 0.4, seed=3, p=1)
    std = Standardizer.fit(X)
    Xs = std.transform(X.copy())
    Zs = np.column_stack([np.ones(len(y)), Xs[:, 0]])
    lap = _Laplace(Xs, Zs, y, None, g, 4, "full")
    psi = np.array([0.6, 0.1, 0.3])  # Lambda = [[0.6, 0], [0.1, 0.3]]
    phi0 = np.array([0.0, -1.0, 0.0, 1.0])
    lap.mode(np.zeros(3), phi0)
    ours = lap.criterion(psi)  # what the fit minimises: REML, log|S| included
    m = lap.mode(psi)
    assert m.converged

    lam = np.zeros((2, 2))
    lam[np.tril_indices(2)] = psi
    Z = np.column_stack([np.ones(len(y)), Xs[:, 0]])
    d, J, q = 4, 6, 2

    def f(x):
        return _nll(x[:d], x[d:].reshape(J, q), lam, Xs, y, g, Z, 1)

    x0 = np.concatenate([phi0, np.zeros(J * q)])
    res = optimize.minimize(f, x0, method="BFGS", options={"gtol": 1e-9})
    assert np.allclose(res.x[:d], m.phi, atol=1e-4)
    assert np.allclose(res.x[d:].reshape(J, q), m.v, atol=1e-4)
    h = 1e-4
    n = x0.size
    H = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            e_i, e_j = np.eye(n)[i] * h, np.eye(n)[j] * h
            H[i, j] = H[j, i] = (f(res.x + e_i + e_j) - f(res.x + e_i - e_j)
                                 - f(res.x - e_i + e_j) + f(res.x - e_i - e_j)) / (4 * h * h)
    dense = res.fun + 0.5 * np.linalg.slogdet(H)[1]
    assert ours == pytest.approx(dense, abs=1e-4)


def test_zero_variance_is_the_pooled_fit():
    """With Lambda = 0 the joint mode is the ordinary maximum likelihood fit."""
    X, y, g, _, _ = world(10, 80, 0.5, 0.2, seed=1)
    std = Standardizer.fit(X)
    Xs = std.transform(X.copy())
    lap = _Laplace(Xs, np.column_stack([np.ones(len(y)), Xs]), y, None, g, 4, "full")
    m = lap.mode(np.zeros(6), np.array([0.0, 0.0, -1.0, 0.0, 1.0]))
    raw = std.to_raw(m.phi)
    ref = OrdinalRegression().fit(X, y)
    assert np.allclose(raw, np.r_[ref.coef_, ref.thresholds_], atol=1e-7)
    assert np.allclose(m.v, 0.0)


@pytest.mark.slow
def test_known_variances_and_fixed_effects_are_recovered():
    """Over 8 simulated data sets (40 groups of 100 rows, intercept sd 0.8, slopes' sd 0.4),
    the mean estimated sds are within 0.1 of the truth, and the fixed effects' errors match
    their standard errors: 40 z-scores, at least 85% within 1.96 and none beyond 4 (the
    thresholds move with the mean of the 40 drawn intercepts, whose sd is 0.8 / sqrt(40); the
    pooled fit is attenuated toward zero instead)."""
    est, zs = [], []
    for seed in range(8):
        X, y, g, beta, cuts = world(40, 100, 0.8, 0.4, seed=seed)
        m = MixedOrdinalRegression(covariance="diagonal").fit(X, y, groups=g)
        est.append(m.random_sd_)
        zs.append((np.r_[m.coef_, m.thresholds_] - np.r_[beta, cuts]) / m.bse_)
    zs = np.abs(np.concatenate(zs))
    assert np.mean(zs < 1.96) >= 0.85 and zs.max() < 4.0, zs
    assert np.allclose(np.mean(est, axis=0), [0.8, 0.4, 0.4], atol=0.1)


def test_without_spread_the_variances_are_small_and_the_fit_is_the_pooled_one():
    X, y, g, _, _ = world(30, 80, 0.0, 0.0, seed=5)
    m = MixedOrdinalRegression().fit(X, y, groups=g)
    ref = OrdinalRegression().fit(X, y)
    assert np.all(m.random_sd_ < 0.15)
    assert np.all(np.abs(m.coef_ - ref.coef_) < 0.1 * ref.bse_[:2])


def test_random_effects_are_invariant_to_feature_location_and_scale():
    """A full covariance makes the model the same whatever the features' origin and units."""
    X, y, g, _, _ = world(15, 60, 0.6, 0.3, seed=2)
    a = MixedOrdinalRegression().fit(X, y, groups=g)
    X2 = X * [10.0, 0.1] + [50.0, -3.0]
    b = MixedOrdinalRegression().fit(X2, y, groups=g)
    assert np.allclose(a.predict_proba(X, groups=g), b.predict_proba(X2, groups=g), atol=1e-4)
    assert np.allclose(b.coef_ * [10.0, 0.1], a.coef_, rtol=1e-3)
    assert b.random_sd_[1:] * [10.0, 0.1] == pytest.approx(a.random_sd_[1:], rel=1e-3)


def test_predictions_for_known_and_new_groups():
    X, y, g, _, _ = world(12, 60, 0.8, 0.3, seed=4)
    m = MixedOrdinalRegression().fit(X, y, groups=g)
    # a known group: fixed effects plus its conditional mode
    rows = g == 3
    z = np.column_stack([np.ones(rows.sum()), X[rows]])
    eta = X[rows] @ m.coef_ + z @ m.random_effects_[m.groups_.index("3")]
    assert np.allclose(m.predict_proba(X[rows], groups=g[rows]),
                       class_proba(eta, m.thresholds_), atol=1e-12)
    # group_params: the same model written as each group's own slopes and thresholds
    own = m.group_params()[m.groups_.index("3")]
    assert np.allclose(class_proba(X[rows] @ own[:2], own[2:]), class_proba(eta, m.thresholds_),
                       atol=1e-12)
    assert np.allclose(m.predict_linear(X[rows], groups=g[rows]), eta)
    assert np.allclose(m.predict_cumulative_proba(X[rows], groups=g[rows]),
                       np.cumsum(class_proba(eta, m.thresholds_), axis=1)[:, :-1])
    with pytest.raises(DataError, match="no intervals"):
        m.predict_proba_ci(X[rows])
    with pytest.raises(DataError, match="no intervals"):  # through the shared table, too
        m.predicted_probabilities(X[rows][:2])
    # a new group: the probabilities integrated over the random effects
    x = X[:3]
    P = m.predict_proba(x)
    for i in range(3):
        zi = np.r_[1.0, x[i]]
        sd = np.sqrt(zi @ m.random_cov_ @ zi)
        for k in range(4):
            ref = integrate.quad(lambda s, i=i, k=k, sd=sd: class_proba(
                np.array([x[i] @ m.coef_ + s]), m.thresholds_)[0, k]
                * np.exp(-0.5 * (s / sd) ** 2) / (sd * np.sqrt(2 * np.pi)),
                -12 * sd, 12 * sd, epsabs=1e-12)[0]
            assert P[i, k] == pytest.approx(ref, abs=1e-10)
    with pytest.warns(UserWarning, match="not fitted on"):
        Q = m.predict_proba(x, groups=["new"] * 3)
    assert np.allclose(Q, P)
    assert np.array_equal(m.predict(X[:5], groups=g[:5]),
                          m.classes_[np.argmax(m.predict_proba(X[:5], groups=g[:5]), axis=1)])


def test_group_models_beat_pooled_and_population_average_on_new_rows():
    X, y, g, _, _ = world(30, 200, 0.9, 0.4, seed=8)
    tr = np.tile(np.r_[np.ones(100, bool), np.zeros(100, bool)], 30)
    m = MixedOrdinalRegression().fit(X[tr], y[tr], groups=g[tr])
    pooled = OrdinalRegression().fit(X[tr], y[tr])

    def ll(P):
        return -np.mean(np.log(P[np.arange((~tr).sum()), y[~tr]]))

    own = ll(m.predict_proba(X[~tr], groups=g[~tr]))
    assert own < ll(m.predict_proba(X[~tr])) < ll(pooled.predict_proba(X[~tr])) + 0.01
    assert own < ll(pooled.predict_proba(X[~tr])) - 0.05


def test_frame_groups_column_weights_and_persistence(tmp_path):
    X, y, g, _, _ = world(10, 50, 0.7, 0.2, seed=6)
    df = pd.DataFrame(X, columns=["age", "dose"]).assign(site=[f"s{i}" for i in g], y=y)
    m = MixedOrdinalRegression(random=["dose"]).fit(df, "y", groups="site")
    assert m.random_names_ == ["(intercept)", "dose"]
    assert m.groups_[0] == "s0"
    # zero weights: those rows are left out, groups and all
    w = np.ones(len(y))
    w[g == 9] = 0.0
    m2 = MixedOrdinalRegression(random="intercept").fit(X, y, groups=g, sample_weight=w)
    ref = MixedOrdinalRegression(random="intercept").fit(X[g < 9], y[g < 9], groups=g[g < 9])
    assert m2.n_groups_ == 9 and np.allclose(m2.coef_, ref.coef_, atol=1e-8)
    assert np.allclose(m2.random_sd_, ref.random_sd_, atol=1e-6)
    path = m.save(tmp_path / "mixed")
    back = load(path)
    new = df.drop(columns="y").iloc[:20]
    assert np.array_equal(back.predict_proba(new, groups="site"),
                          m.predict_proba(new, groups="site"))
    assert np.array_equal(back.predict_proba(new.drop(columns="site")),  # new groups
                          m.predict_proba(new.drop(columns="site")))
    # labels read back as floats find the groups fitted as integers
    mi = MixedOrdinalRegression(random="intercept").fit(X, y, groups=g)
    assert np.array_equal(mi.predict_proba(X[:30], groups=g[:30].astype(float)),
                          mi.predict_proba(X[:30], groups=g[:30]))
    assert back.groups_ == m.groups_ and back.random_names_ == m.random_names_
    assert "Groups" in str(back.summary())


def test_bad_input():
    X, y, g, _, _ = world(6, 40, 0.5, 0.2, seed=7)
    with pytest.raises(DataError, match="needs groups="):
        MixedOrdinalRegression().fit(X, y)
    with pytest.raises(DataError, match="at least 2 groups"):
        MixedOrdinalRegression().fit(X, y, groups=np.zeros(len(y)))
    with pytest.raises(DataError, match="labels for"):
        MixedOrdinalRegression().fit(X, y, groups=g[:-1])
    with pytest.raises(DataError, match="missing label"):
        MixedOrdinalRegression().fit(X, y, groups=np.where(g == 2, None, g))
    with pytest.raises(DataError, match="not a feature"):
        MixedOrdinalRegression(random=["nope"]).fit(X, y, groups=g)
    with pytest.raises(DataError, match="position 5"):
        MixedOrdinalRegression(random=[5]).fit(X, y, groups=g)
    with pytest.raises(ParameterError, match="covariance"):
        MixedOrdinalRegression(covariance="banded").fit(X, y, groups=g)
    with pytest.raises(ParameterError, match="random"):
        MixedOrdinalRegression(random=3).fit(X, y, groups=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="poorly determined"):
            MixedOrdinalRegression().fit(X[g < 3], y[g < 3], groups=g[g < 3])


def test_the_command_line_and_the_report(tmp_path, capsys):
    from fedgrain.cli import main

    X, y, g, _, _ = world(8, 60, 0.8, 0.2, seed=9)
    frame = pd.DataFrame(X, columns=["age", "dose"]).assign(site=[f"h{i}" for i in g],
                                                            grade=y)
    data = str(tmp_path / "d.csv")
    frame.to_csv(data, index=False)
    assert main(["--quiet", "fit", data, "--target", "grade", "--estimator", "mixed",
                 "--groups", "site", "--out", str(tmp_path / "m")]) == 0
    assert "Random effects:" in capsys.readouterr().out
    model = load(tmp_path / "m")
    ref = MixedOrdinalRegression().fit(frame.drop(columns="grade"), y, groups="site")
    np.testing.assert_allclose(model.coef_, ref.coef_, atol=1e-10)
    assert main(["--quiet", "predict", str(tmp_path / "m"), data, "--groups", "site",
                 "--out", str(tmp_path / "p.csv")]) == 0
    pred = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(pred.filter(like="proba_").to_numpy(),
                               ref.predict_proba(frame.drop(columns="grade"), groups="site"),
                               atol=1e-9)
    assert main(["--quiet", "report", str(tmp_path / "m"), "--out", str(tmp_path / "r.html"),
                 "--data", data, "--target", "grade", "--groups", "site"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Random effects</h2>" in page and "corr. with (intercept)" in page
    assert main(["--quiet", "fit", data, "--target", "grade", "--estimator", "mixed",
                 "--groups", "site", "--random", "dose", "--covariance", "diagonal",
                 "--out", str(tmp_path / "m2")]) == 0
    m2 = load(tmp_path / "m2")
    assert m2.random_names_ == ["(intercept)", "dose"] and m2.covariance == "diagonal"
    capsys.readouterr()
    for bad, msg in ((["--estimator", "mixed"], "needs --groups"),
                     (["--random", "intercept"], "--random apply to --estimator mixed only"),
                     (["--estimator", "mixed", "--groups", "site", "--meta", "fomaml"],
                      "--meta does not apply to --estimator mixed")):
        code = main(["--quiet", "fit", data, "--target", "grade", *bad,
                     "--out", str(tmp_path / "x")])
        assert code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_new_group_probabilities_are_exact_for_a_large_spread():
    """The average over the random effect is exact to 1e-10 even when its sd is 5 (the
    trapezoid rule on an analytic integrand), against a dense quadrature."""
    from fedgrain.estimators.mixed import _averaged_proba

    theta = np.array([-1.0, 0.5, 2.0])
    eta = np.array([1.3, -0.4])
    for sd in (0.05, 1.0, 2.0, 5.0):
        got = _averaged_proba(eta, np.full(2, sd), theta)
        s = np.linspace(-12 * sd, 12 * sd, 400_001)
        dens = np.exp(-0.5 * (s / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
        for i in range(2):
            P = class_proba(eta[i] + s, theta)
            ref = np.trapezoid(P * dens[:, None], s, axis=0)
            np.testing.assert_allclose(got[i], ref, atol=1e-10)


def test_diagonal_covariance_is_independent_on_the_features_own_origin():
    """With covariance='diagonal' the fitted random-effects covariance on the original scale
    is diagonal, and shifting a feature changes the model (as in lme4); collinear columns and
    a random slope of a group-level feature are named."""
    X, y, g, _, _ = world(20, 60, 0.7, 0.3, seed=12)
    a = MixedOrdinalRegression(covariance="diagonal").fit(X, y, groups=g)
    assert np.allclose(a.random_cov_, np.diag(np.diag(a.random_cov_)))
    b = MixedOrdinalRegression(covariance="diagonal").fit(X + [3.0, 0.0], y, groups=g)
    assert np.allclose(b.random_cov_, np.diag(np.diag(b.random_cov_)))
    assert not np.allclose(a.predict_proba(X, groups=g), b.predict_proba(X + [3.0, 0.0],
                                                                          groups=g), atol=1e-4)
    with pytest.raises(DataError, match="collinear"):
        MixedOrdinalRegression().fit(np.column_stack([X, 2 * X[:, 0] + 1]), y, groups=g)
    level = np.random.default_rng(0).standard_normal(20)[g]  # one value per group
    with pytest.warns(UserWarning, match="does not vary within any group"):
        MixedOrdinalRegression(random=[2]).fit(np.column_stack([X, level]), y, groups=g)


def test_a_damaged_model_file_fails_clearly(tmp_path):
    from fedgrain.exceptions import ModelFileError
    from fedgrain.persist import read_model_dir, write_model_dir

    X, y, g, _, _ = world(8, 50, 0.7, 0.2, seed=13)
    path = MixedOrdinalRegression().fit(X, y, groups=g).save(tmp_path / "m")

    def edits():
        yield lambda m, a: m.__setitem__("groups", ["0"] * len(m["groups"]))
        yield lambda m, a: m.__setitem__("converged", "no")
        yield lambda m, a: a.__setitem__("random_cov", np.full_like(a["random_cov"], np.nan))
        yield lambda m, a: a.__setitem__("random_cov", -np.eye(a["random_cov"].shape[0]))
        yield lambda m, a: a.__setitem__("random_effects", a["random_effects"].astype(str))
        yield lambda m, a: m.__setitem__("random_names", ["(intercept)", "nope"])

    for i, edit in enumerate(edits()):
        meta, arrays = read_model_dir(path)
        edit(meta, arrays)
        write_model_dir(tmp_path / f"bad{i}", meta, arrays)  # valid checksums
        with pytest.raises(ModelFileError, match="incomplete or inconsistent"):
            load(tmp_path / f"bad{i}")
