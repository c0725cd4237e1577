"""Proximal Newton and Newton: optimality conditions and agreement with closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrain.core.likelihood import composite_pass
from fedgrain.core.solvers import newton, proximal_newton, runaway, solve_l1_quadratic
from fedgrain.datasets import make_ordinal


def _oracle(X, y, w=None):
    p = X.shape[1]

    def call(x, loss=True, order=2, meat=None):
        return composite_pass(X, y, w, x[:p], x[p:], loss=loss, order=order, meat=meat)

    return call


@pytest.mark.parametrize("lam", [0.002, 0.02, 0.2])
def test_lasso_solution_satisfies_kkt(lam):
    X, y, _, _ = make_ordinal(3000, 8, 4, random_state=2)
    p, n = X.shape[1], X.shape[0]
    pen = np.r_[np.ones(p), np.zeros(3)]
    res = proximal_newton(_oracle(X, y), np.zeros(p + 3), n, lam * pen)
    assert res.converged
    g = _oracle(X, y)(res.x, loss=False, order=1).grad / n
    nz = res.x != 0
    # stationarity: g_j = -lam sign(x_j) on non-zeros; |g_j| <= lam on zeros; 0 if unpenalised
    np.testing.assert_allclose(g[nz & (pen > 0)], -lam * np.sign(res.x[nz & (pen > 0)]), atol=1e-7)
    assert np.all(np.abs(g[~nz & (pen > 0)]) <= lam + 1e-7)
    np.testing.assert_allclose(g[pen == 0], 0.0, atol=1e-7)
    if lam == 0.2:
        assert (~nz[:p]).sum() >= 1  # a big penalty zeroes slopes out


def test_newton_reaches_zero_gradient_quadratically():
    X, y, _, _ = make_ordinal(5000, 6, 5, random_state=4)
    n = X.shape[0]
    res = newton(_oracle(X, y), np.zeros(6 + 4), n)
    assert res.converged and res.n_iter <= 10
    step = np.linalg.solve(res.hess, res.grad)
    assert res.grad @ step < 1e-8  # Newton decrement in log-likelihood units


def test_l1_quadratic_matches_closed_form_for_diagonal_hessian():
    rng = np.random.default_rng(0)
    d = 7
    H = np.diag(rng.uniform(0.5, 2.0, d))
    g = rng.standard_normal(d)
    x = rng.standard_normal(d)
    lam = np.full(d, 0.4)
    z = solve_l1_quadratic(g, H, x, lam)
    # separable: z_j = S(x_j - g_j / H_jj, lam_j / H_jj)
    u = x - g / np.diag(H)
    expected = np.sign(u) * np.maximum(np.abs(u) - lam / np.diag(H), 0.0)
    np.testing.assert_allclose(z, expected, atol=1e-12)


def test_separated_data_run_away_and_finite_optima_do_not():
    X = np.r_[np.linspace(-3, -1, 50), np.linspace(1, 3, 50)][:, None]
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    res = newton(_oracle(X, y), np.zeros(2), 100, max_iter=200)
    assert res.converged  # the decrement vanishes ...
    assert runaway(res.step)[0]  # ... but the slope keeps moving (the threshold is 0 by symmetry)
    # the same data with a few rows on the wrong side: a finite optimum
    y2 = y.copy()
    y2[[10, 60]] = 1 - y2[[10, 60]]
    res2 = newton(_oracle(X, y2), np.zeros(2), 100)
    assert res2.converged and not runaway(res2.step).any()


def test_running_out_of_iterations_is_not_convergence_and_the_step_is_at_x():
    X, y, _, _ = make_ordinal(3000, 4, 3, random_state=6)
    res = newton(_oracle(X, y), np.zeros(4 + 2), 3000, max_iter=1)
    assert not res.converged and res.n_iter == 1
    g, H = res.grad, res.hess
    np.testing.assert_allclose(res.step, -np.linalg.solve(H, g), rtol=1e-8)
