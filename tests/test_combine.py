"""Pooling: one subset pools to itself, order does not matter, partial subsets weigh right."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgrain.core.likelihood import monotonise
from fedgrain.core.linalg import EIG_RTOL, NotIdentifiedError, chi2_sf, precision, wald
from fedgrain.inference import pooling
from fedgrain.inference.local import LocalFit
from fedgrain.inference.pooling import full_view, pool


def _fit(est, cov, design=None):
    est = np.asarray(est, float)
    A = np.eye(est.size) if design is None else np.asarray(design, float)
    cov = np.asarray(cov, float)
    return LocalFit(
        estimate=est, cov=cov, lasso=np.zeros(est.size),
        hess=np.linalg.pinv(cov), design=A, alpha=0.0, n_iter=1, converged=True,
        debias="inverse",
    )


def _random_fit(rng, d):
    A = rng.standard_normal((d, d))
    return _fit(rng.standard_normal(d), A @ A.T + d * np.eye(d))


def test_one_subset_pools_to_itself():
    f = _random_fit(np.random.default_rng(0), 4)
    P = pool([f])
    np.testing.assert_allclose(P.estimate, f.estimate, rtol=1e-12)
    np.testing.assert_allclose(P.cov, f.cov, rtol=1e-10)
    assert P.q == pytest.approx(0.0, abs=1e-18) and P.q_df == 0


def test_pooling_matches_inverse_variance_formula_and_q():
    rng = np.random.default_rng(1)
    fits = [_random_fit(rng, 3) for _ in range(5)]
    Om = [np.linalg.inv(f.cov) for f in fits]
    S = sum(Om)
    est = np.linalg.solve(S, sum(o @ f.estimate for o, f in zip(Om, fits, strict=True)))
    P = pool(fits)
    np.testing.assert_allclose(P.estimate, est, rtol=1e-10)
    np.testing.assert_allclose(P.cov, np.linalg.inv(S), rtol=1e-10)
    q = sum((f.estimate - est) @ o @ (f.estimate - est) for o, f in zip(Om, fits, strict=True))
    assert P.q == pytest.approx(q, rel=1e-10)
    assert P.q_df == 4 * 3
    assert P.i2 == pytest.approx(max(0, (q - 12) / q))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 6), perm_seed=st.integers(0, 100))
def test_pooling_is_invariant_to_subset_order(seed, m, perm_seed):
    rng = np.random.default_rng(seed)
    fits = [_random_fit(rng, 4) for _ in range(m)]
    order = np.random.default_rng(perm_seed).permutation(m)
    a, b = pool(fits), pool([fits[i] for i in order])
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-9, atol=1e-14)
    assert a.q == pytest.approx(b.q, rel=1e-8, abs=1e-12)


def test_a_subset_missing_a_parameter_gives_no_weight_to_it():
    good = _fit([1.0, 2.0], np.diag([0.1, 0.1]))
    part = _fit([1.2], [[0.1]], design=[[1.0, 0.0]])  # this subset only has the first parameter
    P = pool([good, part])
    assert P.estimate[0] == pytest.approx(1.1)
    assert P.estimate[1] == pytest.approx(2.0)
    om, rank = precision(part.cov)
    assert rank == 1 and om.shape == (1, 1)
    est, _, cov, resolved = full_view(part)
    assert resolved.tolist() == [True, False] and est[0] == 1.2 and cov[1, 1] == 0


def test_a_feature_constant_in_a_subset_shifts_its_thresholds_not_the_pool():
    # truth: slope 1, threshold 2. A subset where the feature is constant at c = 0.5 identifies
    # only theta - c beta = 1.5; pooled with a full subset it must agree, with Q = 0.
    full = _fit([1.0, 2.0], np.diag([0.01, 0.01]))
    shifted = _fit([1.5], [[0.01]], design=[[-0.5, 1.0]])
    P = pool([full, shifted])
    np.testing.assert_allclose(P.estimate, [1.0, 2.0], atol=1e-12)
    assert P.q == pytest.approx(0.0, abs=1e-12)
    assert not full_view(shifted)[3].any()  # it resolves no parameter on its own


def test_parameter_identified_nowhere_is_an_error():
    f = _fit([1.0], [[0.1]], design=[[1.0, 0.0]])
    with pytest.raises(NotIdentifiedError, match=r"parameters \[1\] are not identified") as err:
        pool([f, f])
    assert err.value.indices.tolist() == [1]


def test_monotonise_orders_and_keeps_ordered_input():
    ordered = np.array([-1.0, 0.0, 2.0])
    assert monotonise(ordered, np.ones(3)) is ordered
    out = monotonise(np.array([-1.0, 0.5, 0.3, 2.0]), np.array([1.0, 1.0, 3.0, 1.0]))
    assert np.all(np.diff(out) >= 0)
    # precise value pulls the pooled pair toward itself: weighted mean (0.5*1 + 0.3*(1/3))/(4/3)
    assert out[1] == pytest.approx((0.5 + 0.3 / 3) / (1 + 1 / 3))


def test_q_has_a_chi_square_p_value_and_none_without_degrees_of_freedom():
    rng = np.random.default_rng(3)
    P = pool([_random_fit(rng, 3), _random_fit(rng, 3)])
    assert P.q_df == 3 and P.q_pvalue == pytest.approx(chi2_sf(P.q, 3), rel=1e-14)
    assert np.isnan(pool([_random_fit(rng, 3)]).q_pvalue)  # one subset: nothing to test


def test_wald_drops_the_directions_without_variance():
    V = np.diag([2.0, 0.5, EIG_RTOL * 1e-3])  # the last direction is numerically zero
    q, df = wald(np.array([2.0, 1.0, 5.0]), V)
    assert df == 2 and q == pytest.approx(2.0 + 2.0)
    assert wald(np.zeros(0), np.zeros((0, 0))) == (0.0, 0)
    assert chi2_sf(3.0, 0) == 1.0 and chi2_sf(3.84, 1) == pytest.approx(0.05, abs=1e-4)


def test_information_mean_weighs_by_information_and_keeps_the_sandwich():
    rng = np.random.default_rng(3)
    H1, H2 = np.diag([1.0, 4.0]), np.diag([3.0, 4.0])
    e1, e2 = rng.normal(size=2), rng.normal(size=2)
    V1, V2 = np.diag([0.5, 0.1]), np.diag([0.2, 0.3])
    est, cov = pooling.information_mean([e1, e2], [V1, V2], [H1, H2])
    np.testing.assert_allclose(est, [(e1[0] + 3 * e2[0]) / 4, (e1[1] + e2[1]) / 2], rtol=1e-7)
    np.testing.assert_allclose(np.diag(cov), [(0.5 + 9 * 0.2) / 16, (16 * 0.1 + 16 * 0.3) / 64],
                               rtol=1e-7)


def test_contributions_pool_like_the_one_shot_pool_and_repool_to_the_fit_on_the_rows():
    from fedgrain.core.standardize import Standardizer
    from fedgrain.datasets import make_ordinal
    from fedgrain.inference import local
    from fedgrain.inference.contributions import Contribution, combine, repool

    a = (np.array([1.0, 2.0]), np.array([[0.2, 0.05], [0.05, 0.3]]))
    c = (np.array([0.5, 3.0]), np.diag([0.1, 0.2]))
    ac = pool([_fit(*a), _fit(*c)])
    est, cov = combine([Contribution.of_fit(_fit(*a)), Contribution.of_fit(_fit(*c))], "cluster")
    np.testing.assert_allclose(est, ac.estimate, rtol=1e-10)
    np.testing.assert_allclose(cov, ac.cov, rtol=1e-10)
    # every part fresh: the damped Newton steps reach the composite fit on all the rows
    X, y, *_ = make_ordinal(3000, 3, 3, random_state=2)
    Z = Standardizer.fit(X).transform(X)
    halves = [slice(0, 1500), slice(1500, None)]
    fresh = {i: (lambda x, h=h: local.evaluate_local(Z[h], y[h], None, x, "cluster"))
             for i, h in enumerate(halves)}
    start = np.r_[np.zeros(3), -1.0, 1.0]
    placeholder = [Contribution(np.zeros(5), np.eye(5), np.eye(5))] * 2
    est, cov, parts = repool(placeholder, fresh, start, "cluster", tol=1e-6, max_steps=50)
    whole = local.fit_local(Z, y, None, local.LocalSettings(n_classes=3, alpha=0.0,
                                                            polish_rounds=50, polish_tol=1e-8))
    np.testing.assert_allclose(est, whole.estimate, atol=1e-6)
    np.testing.assert_allclose(combine(parts, "cluster")[0], est, atol=1e-12)
