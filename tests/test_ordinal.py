"""The likelihood kernels: derivatives, the materialised expansion, probabilities."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from fedgrain import OrdinalRegression
from fedgrain.core import blocks
from fedgrain.core.blocks import allowed_threads, busy_elsewhere, row_threads
from fedgrain.core.likelihood import class_proba, composite_pass, exact_pass, row_log_loss
from fedgrain.core.links import get_link
from fedgrain.datasets import make_ordinal
from fedgrain.metrics import ordinal_scores

from .conftest import expand


def _fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h
        g[j] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.fixture
def problem():
    X, y, coef, thr = make_ordinal(400, 4, 5, random_state=3)
    w = np.random.default_rng(3).uniform(0.5, 2.0, size=400)
    return X, y, w, np.r_[coef * 0.8 + 0.1, thr + 0.2]


@pytest.mark.parametrize("kernel", [composite_pass, exact_pass])
def test_gradient_and_hessian_match_finite_differences(problem, kernel):
    X, y, w, x = problem
    p = X.shape[1]

    def loss(z):
        return kernel(X, y, w, z[:p], z[p:], order=0).loss

    def grad(z):
        return kernel(X, y, w, z[:p], z[p:], order=1).grad

    P = kernel(X, y, w, x[:p], x[p:], block=37)  # odd block size: block edges are exercised
    g = _fd_grad(loss, x)
    H = np.array([_fd_grad(lambda z, j=j: grad(z)[j], x) for j in range(x.size)])
    assert np.allclose(P.grad, g, rtol=1e-6, atol=1e-6 * np.abs(g).max())
    assert np.allclose(P.hess, H, rtol=1e-6, atol=1e-6 * np.abs(H).max())
    assert np.allclose(P.hess, P.hess.T)


def test_composite_equals_materialised_expansion(problem):
    X, y, w, x = problem
    p, K = X.shape[1], 5
    Z, u, ww = expand(X, y, K, w)
    a = Z @ x
    mu = 1 / (1 + np.exp(-a))
    loss = np.sum(ww * (np.logaddexp(0, a) - u * a))
    grad = Z.T @ (ww * (mu - u))
    H = (Z * (ww * mu * (1 - mu))[:, None]).T @ Z
    S = Z * (u - mu)[:, None]
    J_row = (S * ww[:, None]).T @ S
    Sc = S.reshape(X.shape[0], K - 1, -1).sum(axis=1)  # sum over each row's expanded rows
    J_cluster = (Sc * w[:, None]).T @ Sc
    Pc = composite_pass(X, y, w, x[:p], x[p:], meat="cluster", block=64)
    Pr = composite_pass(X, y, w, x[:p], x[p:], meat="row", block=64)
    assert Pc.loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(Pc.grad, grad, atol=1e-10)
    np.testing.assert_allclose(Pc.hess, H, atol=1e-10)
    np.testing.assert_allclose(Pc.meat, J_cluster, atol=1e-10)
    np.testing.assert_allclose(Pr.meat, J_row, atol=1e-10)


def test_threshold_subset_is_the_reduced_problem(problem):
    X, y, w, x = problem
    p, K = X.shape[1], 5
    keep = np.array([1, 3])
    Z, u, ww = expand(X, y, K, w)
    rows = np.isin(np.tile(np.arange(K - 1), X.shape[0]), keep)
    cols = np.r_[np.arange(p), p + keep]
    Zs, us, ws = Z[rows][:, cols], u[rows], ww[rows]
    xs = x[cols]
    a = Zs @ xs
    mu = 1 / (1 + np.exp(-a))
    P = composite_pass(X, y, w, x[:p], x[p:], thresholds=keep)
    np.testing.assert_allclose(P.grad, Zs.T @ (ws * (mu - us)), atol=1e-10)
    np.testing.assert_allclose(P.hess, (Zs * (ws * mu * (1 - mu))[:, None]).T @ Zs, atol=1e-10)


def test_exact_loss_is_the_multinomial_likelihood(problem):
    X, y, w, x = problem
    p = X.shape[1]
    proba = class_proba(X @ x[:p], x[p:])
    expected = -np.sum(w * np.log(proba[np.arange(y.size), y]))
    assert exact_pass(X, y, w, x[:p], x[p:], order=0).loss == pytest.approx(expected, rel=1e-10)


def test_exact_meat_is_sum_of_row_score_outer_products(problem):
    X, y, w, x = problem
    X, y, w = X[:40], y[:40], w[:40]
    p = X.shape[1]
    rows = [
        _fd_grad(lambda z, i=i: exact_pass(X[i : i + 1], y[i : i + 1], None, z[:p], z[p:],
                                           order=0).loss, x)
        for i in range(40)
    ]
    S = np.array(rows)
    J = (S * w[:, None]).T @ S
    M = exact_pass(X, y, w, x[:p], x[p:], order=0, meat=True).meat
    np.testing.assert_allclose(M, J, rtol=1e-5, atol=1e-7 * np.abs(J).max())


def test_extreme_linear_predictors_stay_finite():
    X = np.array([[-500.0], [0.0], [500.0]])
    y = np.array([0, 1, 2])
    for kernel in (composite_pass, exact_pass):
        P = kernel(X, y, None, np.array([1.0]), np.array([-1.0, 1.0]))
        assert np.isfinite(P.loss) and np.all(np.isfinite(P.grad)) and np.all(np.isfinite(P.hess))


@settings(max_examples=50, deadline=None)
@given(
    eta=st.lists(st.floats(-50, 50), min_size=1, max_size=20),
    gaps=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=6),
    start=st.floats(-10, 10),
)
def test_class_probabilities_are_a_distribution(eta, gaps, start):
    theta = start + np.cumsum(gaps)
    P = class_proba(np.asarray(eta), theta)
    assert P.shape == (len(eta), len(gaps) + 1)
    assert np.all(P >= 0)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)


def test_row_log_loss_is_the_clipped_negative_log_probability_of_the_true_class():
    X, y, beta, theta = make_ordinal(500, 2, 4, random_state=1)
    proba = class_proba(X @ beta, theta)
    proba[0] = [1.0, 0.0, 0.0, 0.0]  # a true class predicted at probability zero
    y[0] = 3
    loss = row_log_loss(proba, y)
    expected = -np.log(np.clip(proba[np.arange(500), y], 1e-15, 1.0))
    np.testing.assert_array_equal(loss, expected)
    assert loss[0] == pytest.approx(-np.log(1e-15))
    assert ordinal_scores(y, proba)["log_loss"] == float(np.mean(expected))


@pytest.mark.parametrize("kernel", ["composite", "exact"])
@pytest.mark.parametrize("link", ["logit", "probit"])
def test_passes_are_bit_identical_whatever_the_number_of_row_threads(kernel, link):
    X, y, coef, thr = make_ordinal(7000, 5, 4, random_state=1)
    w = np.random.default_rng(1).uniform(0.0, 2.0, size=7000)
    X = X + 3.0  # away from zero: the exact pass's shift matters
    lk = get_link(link)

    def run(block=200):  # blocks of 200 rows: 9 chunks of 4 blocks, the last one short
        if kernel == "composite":
            return composite_pass(X, y, w, coef, thr - 3.0 * coef.sum(), meat="cluster",
                                  by_class=True, block=block, link=lk)
        return exact_pass(X, y, w, coef, thr - 3.0 * coef.sum(), meat=True,
                          shift=X.mean(axis=0), block=block, link=lk)

    with row_threads(1):
        one = run()
    for n in (2, 3):
        with row_threads(n):
            many = run()
        for field in ("loss", "grad", "hess", "meat", "class_grad"):
            a, b = getattr(one, field), getattr(many, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert np.array_equal(a, b), field
    ref = run(block=7000)  # one block, one chunk: the chunks' sums are its sums, to rounding
    for field in ("grad", "hess", "meat"):
        np.testing.assert_allclose(getattr(one, field), getattr(ref, field), rtol=1e-12,
                                   atol=1e-12 * np.abs(getattr(ref, field)).max())


def test_row_threads_follow_the_blas_thread_limit():
    cpus = len(os.sched_getaffinity(0))
    assert 1 <= allowed_threads() <= cpus
    with threadpool_limits(limits=1, user_api="blas"):
        assert allowed_threads() == 1
        X, y, *_ = make_ordinal(70_000, 3, 4, random_state=2)
        one = OrdinalRegression().fit(X, y)
    with row_threads(2):
        two = OrdinalRegression().fit(X, y)
    np.testing.assert_array_equal(one.coef_, two.coef_)
    np.testing.assert_array_equal(one.bse_, two.bse_)


def test_automatic_row_threads_leave_busy_cores_to_other_processes():
    cpus = len(os.sched_getaffinity(0))
    spin = "import sys; print('ready', flush=True)\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE)
             for _ in range(cpus)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == b"ready"
        assert busy_elsewhere() >= cpus
        X, y, coef, thr = make_ordinal(100_000, 3, 4, random_state=0)
        with row_threads():
            exact_pass(X, y, None, coef, thr)  # more than one chunk: the choice is made
            assert blocks._threads() == 1
        with row_threads(2):
            assert blocks._threads() == 2  # asked for: as asked
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
