"""Average marginal effects and predicted probabilities with delta-method standard errors:
against finite differences, a numerical-Jacobian delta method and a bootstrap."""

import numpy as np
import pytest

from fedgrain import DivideConquerOrdinal, OrdinalRegression
from fedgrain.core.likelihood import class_proba
from fedgrain.datasets import load_randhie


@pytest.fixture(scope="module")
def hie():
    df = load_randhie().sample(3000, random_state=1)
    X = df.drop(columns="health")
    return X, df["health"], OrdinalRegression().fit(X, df["health"])


def _ame(params, X, p):
    """Average predicted probabilities' derivative in each feature, by central differences."""
    out = []
    h = 1e-5
    for j in range(p):
        Xp, Xm = X.copy(), X.copy()
        Xp[:, j] += h
        Xm[:, j] -= h
        out.append((class_proba(Xp @ params[:p], params[p:]).mean(0)
                    - class_proba(Xm @ params[:p], params[p:]).mean(0)) / (2 * h))
    return np.concatenate(out)


def _ame_closed(params, X, p):
    """The same effects from the closed form, -beta_j times the mean change of the logistic
    density across each level's cuts (written here without fedgrain)."""
    a = params[p:][None, :] - (X @ params[:p])[:, None]
    f = np.exp(-np.abs(a)) / (1 + np.exp(-np.abs(a))) ** 2
    pad = np.pad(f, ((0, 0), (1, 1)))
    return (-params[:p, None] * (pad[:, 1:] - pad[:, :-1]).mean(axis=0)[None, :]).reshape(-1)


def test_average_marginal_effects_match_finite_differences_and_their_delta_method(hie):
    X, y, m = hie
    me = m.marginal_effects(X)
    Xn = X.to_numpy(float)
    p = Xn.shape[1]
    params = np.r_[m.coef_, m.thresholds_]
    np.testing.assert_allclose(me["dy/dx"].to_numpy(), _ame(params, Xn, p), atol=1e-8)
    # each feature's effects on the K levels sum to zero
    assert np.allclose(me["dy/dx"].to_numpy().reshape(p, -1).sum(axis=1), 0.0, atol=1e-12)
    # the delta method with a numerical Jacobian of the effects in the parameters
    e = 1e-5
    assert np.allclose(_ame_closed(params, Xn, p), me["dy/dx"].to_numpy(), atol=1e-12)
    J = np.column_stack([(_ame_closed(params + e * np.eye(params.size)[i], Xn, p)
                          - _ame_closed(params - e * np.eye(params.size)[i], Xn, p)) / (2 * e)
                         for i in range(params.size)])
    se = np.sqrt(np.einsum("ij,jk,ik->i", J, m.cov_, J))
    np.testing.assert_allclose(me["std err"].to_numpy(), se, rtol=1e-5, atol=1e-10)
    assert list(me.index.names) == ["feature", "level"]
    assert me.loc[("physlm", "excellent"), "dy/dx"] < 0  # limitations: worse health


@pytest.mark.slow
def test_the_delta_method_agrees_with_a_bootstrap(hie):
    """The standard errors of the effects on the top level agree with 300 bootstrap refits
    within 15%."""
    X, y, m = hie
    me = m.marginal_effects(X)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(300):
        idx = rng.integers(0, len(y), len(y))
        b = OrdinalRegression().fit(X.iloc[idx], y.iloc[idx])
        draws.append(b.marginal_effects(X.iloc[idx]).xs("excellent", level="level")["dy/dx"])
    boot = np.std(np.array(draws), axis=0, ddof=1)
    delta = me.xs("excellent", level="level")["std err"].to_numpy()
    np.testing.assert_allclose(delta, boot, rtol=0.15)


def test_predicted_probabilities_at_chosen_values(hie):
    X, y, m = hie
    at = X.head(3)
    frame = m.predicted_probabilities(at)
    assert list(frame.columns) == ["row", "level", "proba", "std err", "lower", "upper"]
    assert frame.shape[0] == 3 * 4
    proba, lo, hi = m.predict_proba_ci(at, order="levels")
    np.testing.assert_allclose(frame["proba"], proba.reshape(-1))
    np.testing.assert_allclose(frame["lower"], lo.reshape(-1))
    # the standard error is the delta method's on the probability scale
    params = np.r_[m.coef_, m.thresholds_]
    Xn = at.to_numpy(float)
    p = Xn.shape[1]
    e = 1e-6
    J = np.column_stack([(class_proba(Xn @ (params + e * d)[:p], (params + e * d)[p:])
                          - class_proba(Xn @ (params - e * d)[:p], (params - e * d)[p:]))
                         .reshape(-1) / (2 * e) for d in np.eye(params.size)])
    se = np.sqrt(np.einsum("ij,jk,ik->i", J, m.cov_, J))
    np.testing.assert_allclose(frame["std err"], se, rtol=1e-5)


def test_every_estimator_has_them():
    df = load_randhie().sample(3000, random_state=2)
    X, y = df.drop(columns="health"), df["health"]
    dc = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, y)
    me = dc.marginal_effects(X)
    assert me.shape == (7 * 4, 6) and np.all(me["std err"] > 0)
    with pytest.raises(ValueError, match="alpha"):
        dc.marginal_effects(X, alpha=2)


def test_composite_criteria_from_the_expanded_rows():
    """cl, tr(J H^-1), CLAIC and CLBIC of a divide-and-conquer fit, against the same
    quantities summed over the explicitly expanded binary rows."""
    from scipy.special import expit

    df = load_randhie().sample(2000, random_state=5)
    X, y = df.drop(columns="health"), df["health"]
    dc = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, y)
    crit = dc.composite_criteria(X, y)
    Xn, codes = X.to_numpy(float), y.cat.codes.to_numpy()
    n, p = Xn.shape
    K1 = dc.thresholds_.size
    cl, H, J = 0.0, 0.0, 0.0
    S = np.zeros((n, p + K1))
    for k in range(K1):
        Z = np.column_stack([Xn, -np.eye(K1)[k][None, :].repeat(n, axis=0)])
        u = (codes > k).astype(float)
        q = expit(Z @ np.r_[dc.coef_, dc.thresholds_])
        cl += np.sum(u * np.log(q) + (1 - u) * np.log1p(-q))
        H = H + (Z * (q * (1 - q))[:, None]).T @ Z
        S += Z * (u - q)[:, None]  # each person's score over the cuts: the cluster
    J = S.T @ S
    eff = np.trace(np.linalg.solve(H, J))
    assert crit["composite loglik"] == pytest.approx(cl, rel=1e-10)
    assert crit["effective parameters"] == pytest.approx(eff, rel=1e-8)
    assert crit["CLAIC"] == pytest.approx(-2 * cl + 2 * eff, rel=1e-10)
    assert crit["CLBIC"] == pytest.approx(-2 * cl + np.log(n) * eff, rel=1e-10)
