"""Streams that every batch updates: forgetting chosen from the data, the global model following,
drift judged against the model's own expectation, and the state saved and resumed (issue 13)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedgrain import AdaptiveFederatedOrdinal, load
from fedgrain.core.likelihood import class_proba, row_log_loss
from fedgrain.datasets import make_regions
from fedgrain.inference.contributions import combine
from fedgrain.monitor.detectors import ReferenceCUSUM, standardised_excess
from fedgrain.monitor.online import MEMORIES, LeafFollower, Track, decay, true_class_loss

K = 4
BATCH = 5_000


def _labels(X, region, coef, rng):
    latent = np.einsum("ij,ij->i", X, coef[region]) + rng.logistic(size=X.shape[0])
    return np.digitize(latent, [-1.5, 0.0, 1.5])


@pytest.fixture(scope="module")
def world():
    X, _, region, coef, _ = make_regions(220_000, n_features=4, n_classes=K, n_regions=2,
                                         heterogeneity=1.0, random_state=21)
    rng = np.random.default_rng(0)
    y = _labels(X, region, coef, rng)
    af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial", random_state=0).fit(
        X[:20_000], y[:20_000])
    return af, X[20_000:], region[20_000:], coef


def _stream(model, X, y):
    """Feed the stream; each batch's log-loss predicted before the model sees it."""
    model = copy.deepcopy(model)
    losses = []
    for a in range(0, X.shape[0], BATCH):
        losses.append(row_log_loss(model.predict_proba(X[a:a + BATCH]), y[a:a + BATCH]))
        model.partial_fit(X[a:a + BATCH], y[a:a + BATCH])
    return model, np.concatenate(losses)


# ---- the pieces ---------------------------------------------------------------------------------
def test_decay_is_one_for_no_forgetting_and_one_over_e_after_a_memory():
    assert decay(float("inf"), 10_000) == 1.0
    assert decay(5_000.0, 5_000) == pytest.approx(np.exp(-1.0), rel=1e-3)


def test_true_class_loss_is_the_log_loss_of_the_class_probabilities():
    rng = np.random.default_rng(1)
    eta = rng.normal(0, 3, 2000)
    theta = np.array([-2.0, -0.3, 1.0, 4.0])
    codes = rng.integers(0, 5, 2000)
    np.testing.assert_allclose(true_class_loss(eta, theta, codes),
                               row_log_loss(class_proba(eta, theta), codes), rtol=1e-12)


def test_a_track_without_forgetting_converges_to_the_fit_on_all_its_rows():
    """Started from a fit on the first rows (as a leaf's tracks start from its fitted model and
    information), recursive Newton steps over the later batches stay within a small fraction
    of a standard error of the composite maximum likelihood estimate on all the rows."""
    from fedgrain.inference.local import evaluate_local

    def mle(X, y):
        theta = np.array([0.0, 0.0, 0.0, -1.0, 1.0])
        for _ in range(8):
            ev = evaluate_local(X, y, None, theta, "cluster", loss=False)
            theta = theta + np.linalg.solve(ev.hess, ev.score)
        return theta, ev.hess

    rng = np.random.default_rng(2)
    n, p, first = 60_000, 3, 5_000
    X = rng.standard_normal((n, p))
    y = np.digitize(X @ np.array([1.0, -0.5, 0.25]) + rng.logistic(size=n), [-1.0, 1.0])
    theta, info = mle(X[:first], y[:first])
    track = Track.start(float("inf"), theta, info)
    free = np.ones(theta.shape[0], dtype=bool)
    for a in range(first, n, 2_000):
        ev = evaluate_local(X[a:a + 2_000], y[a:a + 2_000], None, track.theta, "cluster",
                            loss=False)
        track.take(ev, track.theta, 2_000, free, p)
    best, hess = mle(X, y)
    se = np.sqrt(np.diag(np.linalg.inv(hess)))
    assert np.max(np.abs(track.theta - best) / se) < 0.1
    assert np.all(np.isfinite(track.cov(free, np.zeros((5, 5)))))


def test_reference_cusum_flags_a_clear_excess_fast_and_stays_quiet_under_the_model():
    rng = np.random.default_rng(3)
    # rows drawn from the model's own predictions: the standardised excess has mean 0
    proba = rng.dirichlet(np.ones(K), 300_000)
    codes = (proba.cumsum(axis=1) < rng.random(300_000)[:, None]).sum(axis=1)
    u = standardised_excess(proba, codes)
    assert abs(u.mean()) < 0.01 and 0.9 < u.std() < 1.1
    det = ReferenceCUSUM()
    det.update(u)
    assert not det.drift_detected
    flipped = standardised_excess(proba[:2000], K - 1 - codes[:2000])
    det.update(flipped)
    assert det.drift_detected and det.detection_index - 300_000 < 200


# ---- on a model ---------------------------------------------------------------------------------
def test_every_batch_updates_the_model_and_the_global_model_is_the_pool_of_its_parts(world):
    af, X, region, coef = world
    y = _labels(X[:BATCH], region[:BATCH], coef, np.random.default_rng(5))
    model = copy.deepcopy(af)
    model.partial_fit(X[:BATCH], y)
    assert model.events_ == []  # nothing detected, yet the model moved
    assert not np.allclose(model.predict_proba(X[:50]), af.predict_proba(X[:50]))
    assert not np.allclose(model.coef_, af.coef_)
    est, cov = combine(model._contributions, model.variance)
    params, raw_cov = model.partition_.standardizer.to_raw_model(est, cov)
    np.testing.assert_allclose(model.results_.params, params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.cov_, raw_cov, rtol=1e-10, atol=1e-14)
    served = [f.label(f.chosen) for f in model.stream_.followers.values()]
    assert served == ["no forgetting"] * len(served)


def test_a_stationary_stream_keeps_no_forgetting_and_does_at_least_as_well_as_leaving_it(world):
    af, X, region, coef = world
    y = _labels(X[:100_000], region[:100_000], coef, np.random.default_rng(6))
    model, streamed = _stream(af, X[:100_000], y)
    frozen = row_log_loss(af.predict_proba(X[:100_000]), y)
    assert [e for e in model.events_ if e["kind"] != "profile refreshed"] == []
    assert streamed.mean() <= frozen.mean() + 1e-3


def test_a_stream_wrong_from_its_first_row_is_flagged_within_2000_rows(world):
    af, X, region, coef = world
    y = K - 1 - _labels(X[:20_000], region[:20_000], coef, np.random.default_rng(7))
    model, _ = _stream(af, X[:20_000], y)
    drift = [e for e in model.events_ if e["kind"] == "concept drift"]
    assert drift and drift[0]["rows_seen"] < 2_000
    assert "above what its model expects" in drift[0]["detail"]
    assert {e["leaf"] for e in drift} == set(model.partition_.leaves) or len(drift) >= 1


def test_gradual_drift_is_followed_and_reported(world):
    """Region 0's slopes rotate slowly over the stream: the streamed model must beat the model
    left alone clearly, and say that it now forgets (a gradual drift, with its evidence)."""
    af, X, region, coef = world
    n = 200_000
    t = np.linspace(0.0, 1.0, n)[:, None]
    c0 = coef[region[:n]]
    turned = np.where((region[:n] == 0)[:, None], np.cos(np.pi * t) * c0
                      + np.sin(np.pi * t) * np.roll(c0, 1, axis=1), c0)
    rng = np.random.default_rng(8)
    latent = np.einsum("ij,ij->i", X[:n], turned) + rng.logistic(size=n)
    y = np.digitize(latent, [-1.5, 0.0, 1.5])
    model, streamed = _stream(af, X[:n], y)
    frozen = row_log_loss(af.predict_proba(X[:n]), y)
    assert streamed.mean() < 0.95 * frozen.mean()
    kinds = [e["kind"] for e in model.events_]
    assert "gradual drift" in kinds or "concept drift" in kinds
    switched = [e for e in model.events_ if e["kind"] in ("gradual drift", "forgetting")]
    assert all("prequential log-loss" in e["detail"] for e in switched)


def test_the_stream_state_resumes_identically_after_save_and_load(world, tmp_path):
    af, X, region, coef = world
    n = 40_000
    c = coef.copy()
    c[0] = -c[0]
    rng = np.random.default_rng(9)
    y = np.where(np.arange(n) < 15_000, _labels(X[:n], region[:n], coef, rng),
                 _labels(X[:n], region[:n], c, rng))
    whole, _ = _stream(af, X[:n], y)
    half, _ = _stream(af, X[:20_000], y[:20_000])
    back = load(half.save(tmp_path / "m"))
    assert set(back.stream_.followers) == set(half.stream_.followers)
    rest, _ = _stream(back, X[20_000:n], y[20_000:n])
    np.testing.assert_allclose(rest.predict_proba(X[:200]), whole.predict_proba(X[:200]),
                               rtol=1e-9, atol=1e-12)
    strip = [{k: v for k, v in e.items() if k != "time"} for e in whole.events_]
    assert [{k: v for k, v in e.items() if k != "time"} for e in rest.events_] == strip


def test_followers_start_from_the_leaves_and_keep_what_a_leaf_does_not_identify():
    rng = np.random.default_rng(10)
    theta = np.array([0.5, 0.0, -1.0, 1.0])
    cov = np.diag([0.01, 0.04, 0.02, 0.02])
    free = np.array([True, False, True, True])
    fol = LeafFollower.start(theta, cov, free)
    assert len(fol.tracks) == len(MEMORIES) and fol.label(fol.chosen) == "no forgetting"
    X = np.c_[rng.standard_normal(3000), np.full(3000, 0.3)]  # the second feature constant
    y = np.digitize(0.8 * X[:, 0] + rng.logistic(size=3000), [-1.0, 1.0])
    fol.take(X, y, "cluster")
    est, c = fol.served()
    assert est[1] == 0.0 and c[1, 1] == cov[1, 1]  # kept as filled in
    assert est[0] > 0.5  # moved toward the rows' 0.8


def test_a_refit_restarts_every_candidate_from_it_and_keeps_the_memory_that_served():
    rng = np.random.default_rng(12)
    theta = np.array([0.5, -1.0, 1.0])
    cov = np.diag([0.01, 0.02, 0.02])
    free = np.ones(3, dtype=bool)
    fol = LeafFollower.start(theta, cov, free)
    X = rng.standard_normal((3000, 1))
    y = np.digitize(-0.8 * X[:, 0] + rng.logistic(size=3000), [-1.0, 1.0])
    for a in range(0, 3000, 500):
        fol.take(X[a:a + 500], y[a:a + 500], "cluster")
    assert len(set(fol.stats.mean().round(6))) > 1  # the candidates' losses differ
    fol.chosen = 3  # a forgetting memory served
    refit = np.array([-0.8, -1.0, 1.0])
    new = fol.reseed(refit, cov, free)
    assert new.chosen == 3 and new.rows == fol.rows
    for t in new.tracks:  # every candidate starts from the refitted model
        np.testing.assert_array_equal(t.theta, refit)
    np.testing.assert_array_equal(new.frozen, refit)
    # all start even, with the history of the one that served: no switch on old losses
    np.testing.assert_allclose(new.stats.mean(), fol.stats.mean()[3])
    assert new.stats.clearly_better(3, 1) == 0.0
    # the fitted model or the unforgetting track served: the refit serves through the latter
    fol.chosen = 0
    assert fol.reseed(refit, cov, free).chosen == 1
    # a refit that identifies other coordinates starts a new follower
    other = fol.reseed(refit, cov, np.array([True, False, True]))
    assert other.chosen == 1 and other.stats.w == 0.0


def test_a_leaf_that_keeps_drifting_raises_the_working_granularity(world, tmp_path):
    af, X, region, coef = world
    n = 150_000
    c = coef.copy()
    c[0] = -c[0]
    rng = np.random.default_rng(11)
    flipped = (np.arange(n) >= 30_000) & (np.arange(n) < 90_000)  # region 0 flips, then back
    y = np.where(flipped, _labels(X[:n], region[:n], c, rng), _labels(X[:n], region[:n], coef,
                                                                        rng))
    model, _ = _stream(af, X[:n], y)
    drifts = [e for e in model.events_ if e["kind"] == "concept drift"]
    assert len(drifts) >= 2
    moved = [e for e in model.events_ if e["kind"] == "granularity"
             and "granularity factor" in e["detail"]]
    assert moved and moved[0]["statistic"] == pytest.approx(af.granularity + 0.1)
    assert "drifted 2 times" in moved[0]["detail"]
    assert model.stream_.granularity == pytest.approx(moved[-1]["statistic"])
    assert load(model.save(tmp_path / "g")).stream_.granularity == model.stream_.granularity


def test_a_batch_that_fails_after_updating_leaves_everything_as_before(world, monkeypatch):
    """The continuous update runs before the refits of a batch: a refit that fails must undo
    it too (leaf table, leaf models, global model and its parts, the followers)."""
    af, X, region, coef = world
    rng = np.random.default_rng(12)
    y = _labels(X[:30_000], region[:30_000], coef, rng)
    model, _ = _stream(af, X[:10_000], y[:10_000])
    before = (model.predict_proba(X[:100]), model.results_.params.copy(),
              [c.target.copy() for c in model._contributions],
              {r: f.served_point().copy() for r, f in model.stream_.followers.items()},
              model.stream_.rows_seen)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "_fit_rows", broken)
    flipped = K - 1 - y[10_000:15_000]  # drift found and refitted within this batch: fails
    with pytest.raises(RuntimeError, match="disk full"):
        model.partial_fit(X[10_000:15_000], flipped)
    np.testing.assert_array_equal(model.predict_proba(X[:100]), before[0])
    np.testing.assert_array_equal(model.results_.params, before[1])
    for c, t in zip(model._contributions, before[2], strict=True):
        np.testing.assert_array_equal(c.target, t)
    for r, f in model.stream_.followers.items():
        np.testing.assert_array_equal(f.served_point(), before[3][r])
    assert model.stream_.rows_seen == before[4]
