"""The meta-learner's strategies: each update on its own against closed forms, the registry."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrain.backends import SerialBackend
from fedgrain.core.likelihood import composite_pass
from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import make_regions
from fedgrain.exceptions import ParameterError
from fedgrain.federation import meta, strategies
from fedgrain.federation.shards import build_shards
from fedgrain.federation.strategies import RHO_MIN, Adapted, Strategy, get_strategy

D = 4


def _spd(rng, d=D):
    A = rng.normal(size=(d, d))
    return A @ A.T + d * np.eye(d)


def _answer(params, train_hess, n_train=100.0, grad=None, hess=None):
    return Adapted(np.array([1.0, 2.0]), 20.0, n_train, params, train_hess, grad, hess)


def test_the_registry_lists_the_four_strategies_in_the_estimators_order():
    assert meta.METHODS == ("fomaml", "reptile", "fedavg", "fedprox", "ditto")
    assert tuple(strategies.STRATEGIES) == meta.METHODS
    assert meta.Adapted is Adapted


def test_fedavg_is_the_rows_weighted_mean_of_the_leaves_parameters():
    rng = np.random.default_rng(0)
    params = rng.normal(size=(3, D))
    n = np.array([10.0, 30.0, 60.0])
    answers = [_answer(g, _spd(rng), m) for g, m in zip(params, n, strict=True)]
    theta = rng.normal(size=D)
    new = get_strategy("fedavg").update(theta, answers, n)
    np.testing.assert_allclose(new, (0.1 * params[0] + 0.3 * params[1] + 0.6 * params[2]),
                               rtol=1e-12)
    assert get_strategy("fedprox").update is get_strategy("fedavg").update


def test_reptile_is_the_information_weighted_mean_of_the_adapted_parameters():
    rng = np.random.default_rng(1)
    params = rng.normal(size=(3, D))
    H = [_spd(rng) for _ in range(3)]
    answers = [_answer(g, h) for g, h in zip(params, H, strict=True)]
    new = get_strategy("reptile").update(rng.normal(size=D), answers, np.full(3, 100.0))
    expected = np.linalg.solve(sum(H), sum(h @ g for h, g in zip(H, params, strict=True)))
    np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-8)
    # equal information: the plain mean
    same = [_answer(g, H[0]) for g in params]
    new = get_strategy("reptile").update(rng.normal(size=D), same, np.full(3, 100.0))
    np.testing.assert_allclose(new, params.mean(axis=0), rtol=1e-6, atol=1e-8)


def test_fomaml_takes_the_preconditioned_validation_step():
    """Quadratic validation losses ``1/2 (x - a_m)' A_m (x - a_m)``: at the adapted parameters
    ``gamma_m`` the gradient is ``A_m (gamma_m - a_m)`` and the Hessian ``A_m``."""
    rng = np.random.default_rng(2)
    theta = rng.normal(size=D)
    a = rng.normal(size=(3, D))
    A = [_spd(rng) for _ in range(3)]
    B = [_spd(rng) for _ in range(3)]
    gamma = theta + 0.1 * rng.normal(size=(3, D))
    g = [Am @ (gm - am) for Am, gm, am in zip(A, gamma, a, strict=True)]
    answers = [_answer(gm, Bm, grad=gm_, hess=Am)
               for gm, Bm, gm_, Am in zip(gamma, B, g, A, strict=True)]
    new = get_strategy("fomaml").update(theta, answers, np.full(3, 100.0))
    step = -np.linalg.solve(sum(Am + Bm for Am, Bm in zip(A, B, strict=True)), sum(g))
    np.testing.assert_allclose(new - theta, step, rtol=1e-6, atol=1e-9)
    # no adaptation and no training information: one Newton step on the summed validation
    # loss, which lands on its minimum
    at_theta = [_answer(theta, np.zeros((D, D)), grad=Am @ (theta - am), hess=Am)
                for Am, am in zip(A, a, strict=True)]
    new = get_strategy("fomaml").update(theta, at_theta, np.full(3, 100.0))
    optimum = np.linalg.solve(sum(A), sum(Am @ am for Am, am in zip(A, a, strict=True)))
    np.testing.assert_allclose(new, optimum, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["fomaml", "reptile", "fedavg", "fedprox"])
def test_updates_leave_their_arguments_alone(name):
    rng = np.random.default_rng(3)
    answers = [_answer(rng.normal(size=D), _spd(rng), 50.0 + k, rng.normal(size=D), _spd(rng))
               for k in range(3)]
    theta, n = rng.normal(size=D), np.array([50.0, 51.0, 52.0])
    copies = [(a.params.copy(), a.train_hess.copy(), a.grad.copy(), a.hess.copy())
              for a in answers]
    before = theta.copy()
    get_strategy(name).update(theta, answers, n)
    np.testing.assert_array_equal(theta, before)
    for a, c in zip(answers, copies, strict=True):
        for x, y in zip((a.params, a.train_hess, a.grad, a.hess), c, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("name", "start"), [("fomaml", 250.0), ("reptile", 250.0),
                                             ("fedavg", RHO_MIN), ("fedprox", 40.0)])
def test_where_the_pull_starts(name, start):
    assert get_strategy(name).start_pull(250.0, 40.0) == start


def test_what_each_strategy_asks_for_and_keeps():
    learned = {n for n, s in strategies.STRATEGIES.items() if s.learns_pull}
    sends = {n for n, s in strategies.STRATEGIES.items() if s.meta_gradient}
    global_ = {n for n, s in strategies.STRATEGIES.items() if s.global_model}
    assert learned == {"fomaml", "reptile", "ditto"}
    assert sends == {"fomaml"}
    assert global_ == {"fedavg", "fedprox"}


def test_the_pulls_a_round_scores_and_the_one_it_picks():
    fomaml, fedprox = get_strategy("fomaml"), get_strategy("fedprox")
    assert meta.pull_grid(fomaml, 8.0) == [2.0, 4.0, 8.0, 16.0, 32.0, np.inf]
    assert meta.pull_grid(fedprox, 8.0) == [8.0, np.inf]
    grid = meta.pull_grid(fomaml, 8.0)
    losses = np.array([1.0, 0.5, 0.50001, 0.6, 0.7, 0.9])  # 4 and 8 tie: the larger
    assert meta.choose_pull(fomaml, losses, grid) == 2
    assert meta.choose_pull(fedprox, np.array([0.5, 0.9]), [8.0, np.inf]) == 1  # global model



def test_an_unknown_strategy_is_an_error_that_names_the_known_ones():
    known = r"\('fomaml', 'reptile', 'fedavg', 'fedprox', 'ditto'\)"
    with pytest.raises(ParameterError, match=f"Unknown meta-learning strategy 'maml'; the "
                                             f"known ones are {known}"):
        get_strategy("maml")
    with pytest.raises(ParameterError, match="Unknown meta-learning strategy 'maml'"):
        meta.run(SerialBackend(), [], [], meta.MetaSettings("maml", 2, 3), np.zeros(4),
                 np.eye(4), [], [], rho0=1.0, max_rounds=2, tol=1e-3, fedprox_rho=1.0,
                 work=None)


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))
    with pytest.raises(ParameterError, match="strategy named 'fedavg' is already registered"):
        strategies.register(get_strategy("fedavg"))


def test_a_registered_strategy_runs_in_the_loop_unchanged(monkeypatch):
    """A toy strategy (the plain mean of the adapted parameters, at a fixed pull) is one
    function and one registry entry; ``meta.run`` uses it as it is."""
    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))
    calls = []

    def plain_mean(theta, answers, n_train):
        calls.append((theta.copy(), answers))
        return np.mean([a.params for a in answers], axis=0)

    strategies.register(Strategy("mean", plain_mean, learns_pull=False,
                                 start_pull=strategies.fixed_start, global_model=True))
    K, p = 4, 3
    X, y, region, *_ = make_regions(4_000, n_features=p, n_classes=K, n_regions=3,
                                    heterogeneity=1.0, random_state=1)
    standardizer = Standardizer.fit(X)
    theta0 = np.concatenate([np.zeros(p), np.linspace(-1.0, 1.0, K - 1)])
    Xs = standardizer.transform(X)
    P = composite_pass(Xs, y, None, theta0[:p], theta0[p:], loss=False).hess / y.shape[0]
    backend = SerialBackend()
    refs = build_shards(backend, X, y, None, region, 3, standardizer)
    try:
        res = meta.run(backend, refs, [[0, 1, 2]], meta.MetaSettings("mean", p, K), theta0, P,
                       [5, 6, 7], [10, 11, 12], rho0=50.0, max_rounds=3, tol=0.0,
                       fedprox_rho=30.0, work=None)
    finally:
        backend.release(refs)
    assert len(res.history) >= 2 and len(calls) == len(res.history)
    np.testing.assert_array_equal(calls[0][0], theta0)
    for (_, answers), (theta_next, _) in zip(calls, calls[1:], strict=False):
        np.testing.assert_array_equal(theta_next, np.mean([a.params for a in answers], axis=0))
    assert all(a.grad is None and a.hess is None for _, answers in calls for a in answers)
    assert all(h["rho"] is None for h in res.history)  # the global model is what it deploys
    assert res.rho == np.inf
    # a fixed pull: each leaf scores it and no adaptation, and the round deploys the latter
    assert all(a.val_loss.shape == (2,) for _, answers in calls for a in answers)
    assert all(h["val_loss"] == h["no_adaptation_loss"] for h in res.history)
