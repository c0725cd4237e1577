"""Monitoring on streams (issue 5): detectors, concept drift and covariate shift, bad batches.

Seeded synthetic streams with known change points (River's style: the detection index must fall
in a stated window after the change).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from fedgrain import AdaptiveFederatedOrdinal, load
from fedgrain.cli import main
from fedgrain.core.likelihood import class_proba
from fedgrain.datasets import make_regions
from fedgrain.monitor import ADWIN, PageHinkley

K = 4
BATCH = 10_000


# ---- detectors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: ADWIN(delta=1e-5), lambda: PageHinkley()])
def test_detectors_find_an_abrupt_increase_soon_and_nothing_before(make):
    rng = np.random.default_rng(0)
    x = np.r_[rng.exponential(1.0, 30_000), rng.exponential(2.0, 5_000)]
    det = make()
    found = []
    for a in range(0, x.size, 1_000):
        det.update(x[a:a + 1_000])
        if det.drift_detected:
            found.append(det.detection_index)
    assert found and 30_000 <= found[0] <= 30_300, found
    assert all(f >= 30_000 for f in found)


def test_page_hinkley_gives_the_same_index_batch_by_batch_as_value_by_value():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, 5_000), rng.normal(1.0, 1, 2_000)]
    one = PageHinkley(delta=0.1, threshold=50.0)
    hits_one = []
    for v in x:
        one.update(v)
        if one.drift_detected:
            hits_one.append(one.detection_index)
    batch = PageHinkley(delta=0.1, threshold=50.0)
    hits_batch = []
    for a in range(0, x.size, 777):
        batch.update(x[a:a + 777])
        if batch.drift_detected:
            hits_batch.append(batch.detection_index)
    assert hits_one[0] == hits_batch[0] and hits_one[0] >= 5_000


def test_adwin_ignores_a_decrease_and_stays_quiet_on_a_stationary_stream():
    rng = np.random.default_rng(2)
    down = ADWIN(delta=1e-5).update(np.r_[rng.exponential(2.0, 20_000),
                                          rng.exponential(1.0, 20_000)])
    assert not down.drift_detected
    quiet = ADWIN(delta=1e-5)
    for _ in range(100):
        quiet.update(rng.exponential(1.0, 10_000))
        assert not quiet.drift_detected
    with pytest.raises(ValueError, match="finite values only"):
        quiet.update([1.0, np.nan])


# ---- streams -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    """Three regions; the first 30,000 rows train the model, the next 300,000 are the stream."""
    X, y, region, coef, thr = make_regions(330_000, n_features=4, n_classes=K, n_regions=3,
                                           heterogeneity=1.0, random_state=11)
    af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial").fit(X[:30_000], y[:30_000])
    return af, X[30_000:], y[30_000:], region[30_000:], coef, thr


def _labels(X, region, coef, thr, seed):
    rng = np.random.default_rng(seed)
    latent = np.einsum("ij,ij->i", X, coef[region]) + rng.logistic(size=X.shape[0])
    return (latent[:, None] > thr[region]).sum(axis=1)


def _stream(af, X, y):
    import copy

    model = copy.deepcopy(af)
    for a in range(0, X.shape[0], BATCH):
        model.partial_fit(X[a:a + BATCH], y[a:a + BATCH])
    return model


def _leaf_of_region(af, X, region, r):
    ids, counts = np.unique(af.apply(X[region == r]), return_counts=True)
    return int(ids[counts.argmax()])


def test_a_stationary_stream_raises_no_alarm(world):
    af, X, y, *_ = world
    model = _stream(af, X, y)
    assert [e for e in model.events_ if e["kind"] in ("concept drift", "covariate shift")] == []


def test_an_abrupt_concept_change_in_one_region_is_found_and_only_that_leaf_refitted(world):
    af, X, _, region, coef, thr = world
    change = 150_000
    new_coef = coef.copy()
    new_coef[1] = -coef[1]  # region 1's slopes flip
    y = np.where(np.arange(X.shape[0]) < change, _labels(X, region, coef, thr, 1),
                 _labels(X, region, new_coef, thr, 1))
    model = _stream(af, X, y)
    leaf = _leaf_of_region(af, X, region, 1)
    drift = [e for e in model.events_ if e["kind"] == "concept drift"]
    assert [e["leaf"] for e in drift] == [leaf]
    # detection within 2,000 of that region's rows after the change
    after = int(((region == 1) & (np.arange(X.shape[0]) >= change)
                 & (np.arange(X.shape[0]) <= drift[0]["rows_seen"])).sum())
    assert drift[0]["rows_seen"] >= change and after <= 2_000, after
    refits = [e for e in model.events_ if e["kind"] == "refit"]
    # one refit per change: afterwards the region's unforgetting track follows every new row
    assert [e["leaf"] for e in refits] == [leaf]
    assert not any(e["kind"] in ("split", "merge") for e in model.events_)
    # recovered: on fresh post-change rows of the region, the refitted leaf is about as good as
    # a model of the new relationship
    Xn, _, rn, *_ = make_regions(40_000, n_features=4, n_classes=K, n_regions=3,
                                 heterogeneity=1.0, random_state=11)
    Xn = Xn[rn == 1]
    yn = _labels(Xn, np.ones(Xn.shape[0], dtype=int), new_coef, thr, 2)
    p = model.predict_proba(Xn)
    ll = -np.mean(np.log(p[np.arange(yn.size), yn]))
    truth = class_proba(Xn @ new_coef[1], thr[1])
    best = -np.mean(np.log(truth[np.arange(yn.size), yn]))
    assert ll <= 1.05 * best, (ll, best)


def test_a_gradual_change_is_found_within_its_ramp(world):
    af, X, _, region, coef, thr = world
    start, ramp = 100_000, 100_000
    share = np.clip((np.arange(X.shape[0]) - start) / ramp, 0.0, 1.0)
    new_coef = coef.copy()
    new_coef[2] = -coef[2]
    moved = np.random.default_rng(3).random(X.shape[0]) < share
    y = np.where(moved, _labels(X, region, new_coef, thr, 4), _labels(X, region, coef, thr, 4))
    model = _stream(af, X, y)
    leaf = _leaf_of_region(af, X, region, 2)
    drift = [e for e in model.events_ if e["kind"] == "concept drift"]
    assert drift and drift[0]["leaf"] == leaf
    assert start <= drift[0]["rows_seen"] <= start + ramp


def test_a_covariate_shift_alone_is_reported_as_such_and_costs_no_accuracy(world):
    af, X, _, region, coef, thr = world
    change = 100_000
    Xs = X.copy()
    later = np.arange(X.shape[0]) >= change
    # region 0's rows move within the region (their second feature up by one), model unchanged
    Xs[later & (region == 0), 1] += 1.0
    y = _labels(Xs, region, coef, thr, 5)
    model = _stream(af, Xs, y)
    kinds = {e["kind"] for e in model.events_}
    assert "concept drift" not in kinds and "refit" not in kinds and "split" not in kinds
    shifts = [e for e in model.events_ if e["kind"] == "covariate shift"]
    assert shifts and {e["leaf"] for e in shifts} == {_leaf_of_region(af, X, region, 0)}
    assert shifts[0]["rows_seen"] >= change
    # the coefficients still fit: the model that followed the stream predicts the shifted rows
    # as well as the model left alone (its updates are fits on more rows of the same world)
    rows = later & (region == 0)
    y_new = _labels(Xs[rows], region[rows], coef, thr, 55)
    loss_new = log_loss(y_new, model.predict_proba(Xs[rows]), labels=range(K))
    loss_old = log_loss(y_new, af.predict_proba(Xs[rows]), labels=range(K))
    assert loss_new <= loss_old + 0.002


@pytest.mark.parametrize("bad, message", [
    (lambda X, y: (X.assign(extra=1.0), y), "extra"),
    (lambda X, y: (X.drop(columns="x2"), y), "x2"),
    (lambda X, y: (X, y.where(y != 1, 9)), "9"),
    (lambda X, y: (X.iloc[:0], y.iloc[:0]), "at least one row"),
])
def test_a_bad_batch_is_refused_and_leaves_the_model_unchanged(world, bad, message):
    import copy

    af, X, y, *_ = world
    cols = [f"x{j}" for j in range(X.shape[1])]
    model = copy.deepcopy(af)
    model.fit(pd.DataFrame(X[:20_000], columns=cols), y[:20_000])
    model.partial_fit(pd.DataFrame(X[:5_000], columns=cols), y[:5_000])
    before = (json.dumps(model.events_), model.predict_proba(pd.DataFrame(X[:100], columns=cols)),
              model.stream_.rows_seen)
    Xb, yb = bad(pd.DataFrame(X[5_000:6_000], columns=cols), pd.Series(y[5_000:6_000]))
    with pytest.raises(ValueError, match=message):
        model.partial_fit(Xb, yb)
    assert json.dumps(model.events_) == before[0]
    np.testing.assert_array_equal(model.predict_proba(pd.DataFrame(X[:100], columns=cols)),
                                  before[1])
    assert model.stream_.rows_seen == before[2]


def test_events_survive_save_and_load(world, tmp_path):
    af, X, _, region, coef, thr = world
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y = np.where(np.arange(60_000) < 20_000, _labels(X[:60_000], region[:60_000], coef, thr, 6),
                 _labels(X[:60_000], region[:60_000], new_coef, thr, 6))
    model = _stream(af, X[:60_000], y)
    assert model.events_
    back = load(model.save(tmp_path / "m"))
    assert back.events_ == model.events_
    np.testing.assert_array_equal(back.predict_proba(X[:50]), model.predict_proba(X[:50]))


def test_stream_command_reads_a_file_in_batches_and_writes_the_model_and_the_log(world, tmp_path,
                                                                                 capsys):
    af, X, _, region, coef, thr = world
    cols = [f"x{j}" for j in range(X.shape[1])]
    model = AdaptiveFederatedOrdinal(backend="serial").fit(
        pd.DataFrame(X[:20_000], columns=cols), _labels(X[:20_000], region[:20_000], coef, thr, 7))
    model.save(tmp_path / "m")
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    n = 60_000
    y = np.where(np.arange(n) < 20_000, _labels(X[:n], region[:n], coef, thr, 8),
                 _labels(X[:n], region[:n], new_coef, thr, 8))
    pd.DataFrame(X[:n], columns=cols).assign(grade=y).to_parquet(tmp_path / "s.parquet")
    code = main(["--quiet", "stream", str(tmp_path / "m"), str(tmp_path / "s.parquet"),
                 "--target", "grade", "--batch-size", "5000", "--out", str(tmp_path / "m2")])
    out = capsys.readouterr().out
    assert code == 0 and "concept drift" in out and "refit" in out
    log = [json.loads(line) for line in (tmp_path / "m2.events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in log] == [e["kind"] for e in load(tmp_path / "m2").events_]
    code = main(["stream", str(tmp_path / "m"), str(tmp_path / "s.parquet"), "--target", "nope"])
    assert code != 0
    # an unusable --events path is refused before any row changes the model in place
    before = (tmp_path / "m" / "model.json").read_bytes()
    (tmp_path / "events").mkdir()
    code = main(["--quiet", "stream", str(tmp_path / "m"), str(tmp_path / "s.parquet"),
                 "--target", "grade", "--events", str(tmp_path / "events")])
    assert code == 2 and "--events" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.json").read_bytes() == before


def test_a_leaf_whose_change_splits_it_in_two_is_split(world):
    af, X, _, region, coef, thr = world
    change = 100_000
    leaf = _leaf_of_region(af, X, region, 1)
    half = (region == 1) & (X[:, 0] > 0)  # only part of region 1 changes: a new boundary
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y_new = _labels(X, region, new_coef, thr, 9)
    y = np.where((np.arange(X.shape[0]) >= change) & half, y_new,
                 _labels(X, region, coef, thr, 9))
    model = _stream(af, X[:200_000], y[:200_000])
    splits = [e for e in model.events_ if e["kind"] == "split"]
    assert [e["leaf"] for e in splits] == [leaf], model.events_
    assert "x0" in splits[0]["detail"]
    assert model.n_leaves_ == af.n_leaves_ + 1
    assert any(e["kind"] == "granularity" for e in model.events_)
    # the two new leaves predict their halves with their own models
    rows = np.flatnonzero(region == 1)[-4_000:]
    moved = X[rows, 0] > 0
    p = model.predict_proba(X[rows])
    truth = np.where(moved[:, None], class_proba(X[rows] @ new_coef[1], thr[1]),
                     class_proba(X[rows] @ coef[1], thr[1]))
    yy = y[rows]
    ll = -np.mean(np.log(p[np.arange(yy.size), yy]))
    best = -np.mean(np.log(truth[np.arange(yy.size), yy]))
    assert ll < 1.05 * best, (ll, best)


def test_a_split_model_saves_and_loads(world, tmp_path):
    af, X, _, region, coef, thr = world
    half = (region == 1) & (X[:, 0] > 0)
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y = np.where((np.arange(X.shape[0]) >= 50_000) & half, _labels(X, region, new_coef, thr, 9),
                 _labels(X, region, coef, thr, 9))
    model = _stream(af, X[:120_000], y[:120_000])
    assert model.n_leaves_ == af.n_leaves_ + 1
    back = load(model.save(tmp_path / "m"))
    assert back.n_leaves_ == model.n_leaves_ and back.events_ == model.events_
    assert back.effective_granularity_ == model.effective_granularity_
    np.testing.assert_array_equal(back.predict_proba(X[:500]), model.predict_proba(X[:500]))
    back.partial_fit(X[120_000:130_000], y[120_000:130_000])  # and keeps streaming


def test_siblings_that_become_indistinguishable_are_merged():
    from fedgrain.core.standardize import Standardizer
    from fedgrain.partition.tree import PartitionTree

    X, _, region, coef, thr = make_regions(230_000, n_features=4, n_classes=K, n_regions=2,
                                           heterogeneity=1.0, random_state=12)
    # four leaves: each region cut in two at the median of another feature (one model each)
    tree = PartitionTree(4, K, Standardizer.fit(X[:30_000]))
    left, right = tree.split(tree.root, np.eye(4)[0], 3.0)  # region 1 (x0 <= 3), region 0
    tree.split(left, np.eye(4)[2], 0.0)
    tree.split(right, np.eye(4)[2], 0.0)
    y0 = _labels(X, region, coef, thr, 13)
    af = AdaptiveFederatedOrdinal(backend="serial").fit(X[:30_000], y0[:30_000], partition=tree)
    assert af.n_leaves_ == 4
    change = 50_000
    new_coef = coef.copy()
    new_coef[0] = -coef[0]  # region 0 changes as a whole: both of its leaves drift
    y = np.where(np.arange(200_000) >= change, _labels(X[30_000:], region[30_000:], new_coef,
                                                        thr, 14), y0[30_000:])
    model = _stream(af, X[30_000:], y)
    merges = [e for e in model.events_ if e["kind"] == "merge"]
    assert len(merges) == 1 and merges[0]["leaf"] == right, model.events_
    assert model.n_leaves_ == 3 and right in model.partition_.leaves
    assert model.effective_granularity_ > 0


def test_a_meta_learned_model_personalises_its_refitted_leaf(world):
    import copy

    af, X, _, region, coef, thr = world
    model = AdaptiveFederatedOrdinal(meta="fomaml", backend="serial").fit(
        X[:30_000], _labels(X[:30_000], region[:30_000], coef, thr, 15))
    assert np.isfinite(model.meta_state_.rho)
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y = np.where(np.arange(60_000) >= 20_000,
                 _labels(X[:60_000], region[:60_000], new_coef, thr, 16),
                 _labels(X[:60_000], region[:60_000], coef, thr, 16))
    streamed = _stream(model, X[:60_000], y)
    leaf = _leaf_of_region(model, X, region, 1)
    assert {e["leaf"] for e in streamed.events_ if e["kind"] == "refit"} == {leaf}
    pos = streamed.partition_.leaves.index(leaf)
    # the refitted leaf follows the new slopes (personalised with the learned pull)
    assert np.sign(streamed.local_models_[pos].coef_ @ new_coef[1]) > 0
    # and meta rounds ran on the recent rows (they keep the global model unless a round
    # lowers the validation loss)
    rounds = [e for e in streamed.events_ if e["kind"] == "meta rounds"]
    assert len(rounds) == 1 and "round(s) on the leaves' recent rows" in rounds[0]["detail"]
    assert copy.deepcopy(streamed).predict_proba(X[:5]).shape == (5, K)


def test_stream_state_survives_save_and_load_between_files(world, tmp_path):
    """A drift found at the end of one file is acted on in the next, after a save and load."""
    af, X, _, region, coef, thr = world
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y = np.where(np.arange(40_000) >= 18_000, _labels(X[:40_000], region[:40_000], new_coef,
                                                       thr, 17),
                 _labels(X[:40_000], region[:40_000], coef, thr, 17))
    first = _stream(af, X[:20_000], y[:20_000])  # ends right after the drift is found
    assert [e["kind"] for e in first.events_] == ["concept drift"]
    back = load(first.save(tmp_path / "m"))
    assert back.stream_.pending == first.stream_.pending
    assert back.stream_.rows_seen == 20_000
    later = _stream(back, X[20_000:40_000], y[20_000:40_000])
    assert any(e["kind"] == "refit" for e in later.events_)


def test_fit_after_partial_fit_starts_a_fresh_stream(world):
    import copy

    af, X, y, *_ = world
    model = copy.deepcopy(af)
    model.partial_fit(X[:10_000], y[:10_000])
    assert model.stream_.rows_seen == 10_000
    model.fit(X[:20_000], y[:20_000])
    model.partial_fit(X[20_000:30_000], y[20_000:30_000])
    assert model.stream_.rows_seen == 10_000


def test_an_error_while_reacting_restores_the_model(world, monkeypatch):
    import copy

    af, X, _, region, coef, thr = world
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y = np.where(np.arange(40_000) >= 10_000, _labels(X[:40_000], region[:40_000], new_coef,
                                                       thr, 18),
                 _labels(X[:40_000], region[:40_000], coef, thr, 18))
    model = _stream(af, X[:10_000], y[:10_000])  # up to the change: the refit comes next
    before = (copy.deepcopy(model.events_), model.predict_proba(X[:50]),
              model.stream_.rows_seen, model.partition_.to_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "_fit_rows", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        for a in range(10_000, 40_000, BATCH):
            model.partial_fit(X[a:a + BATCH], y[a:a + BATCH])
    assert model.stream_.rows_seen >= before[2]
    failed_at = model.stream_.rows_seen
    monkeypatch.undo()
    # the failing batch left nothing behind: the model is the one before it
    assert model.partition_.to_dict() == before[3]
    model.partial_fit(X[failed_at:failed_at + BATCH], y[failed_at:failed_at + BATCH])
    assert any(e["kind"] == "refit" for e in model.events_)


def test_stream_command_reads_csv_too(world, tmp_path, capsys):
    af, X, _, region, coef, thr = world
    cols = [f"x{j}" for j in range(X.shape[1])]
    model = AdaptiveFederatedOrdinal(backend="serial").fit(
        pd.DataFrame(X[:20_000], columns=cols), _labels(X[:20_000], region[:20_000], coef, thr, 19))
    model.save(tmp_path / "m")
    frame = pd.DataFrame(X[:30_000], columns=cols).assign(
        grade=_labels(X[:30_000], region[:30_000], coef, thr, 20))
    frame.loc[25_000:, "x0"] = frame.loc[25_000:, "x0"].round(0).astype(int)  # ints late on
    frame.to_csv(tmp_path / "s.csv", index=False)
    code = main(["--quiet", "stream", str(tmp_path / "m"), str(tmp_path / "s.csv"), "--target",
                 "grade", "--batch-size", "7000", "--out", str(tmp_path / "m2")])
    assert code == 0 and load(tmp_path / "m2").stream_.rows_seen == 30_000


def test_page_hinkley_can_watch_the_leaves_instead(world):
    af, X, _, region, coef, thr = world
    model = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial",
                                     drift_detector="page_hinkley").fit(
        X[:30_000], _labels(X[:30_000], region[:30_000], coef, thr, 21))
    new_coef = coef.copy()
    new_coef[1] = -coef[1]
    y = np.where(np.arange(60_000) >= 30_000, _labels(X[:60_000], region[:60_000], new_coef,
                                                       thr, 22),
                 _labels(X[:60_000], region[:60_000], coef, thr, 22))
    streamed = _stream(model, X[:60_000], y)
    drift = [e for e in streamed.events_ if e["kind"] == "concept drift"]
    assert drift and "PageHinkley" in drift[0]["detail"] and drift[0]["rows_seen"] >= 30_000
    with pytest.raises(ValueError, match="'drift_detector' parameter"):
        AdaptiveFederatedOrdinal(drift_detector="ddm").fit(X[:2_000], y[:2_000])


def test_discrete_and_leaf_constant_features_raise_no_covariate_alarm():
    """RAND HIE's physical limitation is split at 0.094, which leaves it constant (0) in one
    leaf: new people of the same population equal the reference's values exactly and must not
    look moved (the edges of the reference distribution once sat a few ulps below such values,
    and the demo's stationary stream raised a covariate shift every 3,000 rows)."""
    from fedgrain.datasets import load_randhie

    frame = load_randhie()
    X, y = frame.drop(columns="health"), frame["health"]
    order = np.random.default_rng(0).permutation(len(frame))
    model = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial", random_state=0).fit(
        X.iloc[order[:12_000]], y.iloc[order[:12_000]])
    assert any("physlm" in line for line in model.partition_.describe())
    draw = np.random.default_rng(1).choice(order[12_000:], 24_000)
    for a in range(0, 24_000, 2_000):
        model.partial_fit(X.iloc[draw[a : a + 2_000]], y.iloc[draw[a : a + 2_000]])
    assert [e for e in model.events_ if e["kind"] == "covariate shift"] == []


def test_a_model_can_be_saved_without_the_streams_raw_rows(world, tmp_path):
    from fedgrain.persist import read_model_dir

    af, X, _, region, coef, thr = world
    model = _stream(af, X[:30_000], _labels(X[:30_000], region[:30_000], coef, thr, 9))
    full = read_model_dir(model.save(tmp_path / "full"))[1]
    lean = read_model_dir(model.save(tmp_path / "lean", stream_rows=False))[1]
    raw = [k for k in full if k.startswith("stream_") and k.endswith(("_X", "_y", "_rows"))]
    assert raw and not any(k in lean for k in raw)
    back = load(tmp_path / "lean")
    np.testing.assert_array_equal(back.predict_proba(X[:50]), model.predict_proba(X[:50]))
    back.partial_fit(X[30_000:35_000], _labels(X[30_000:35_000], region[30_000:35_000], coef,
                                               thr, 10))  # it follows the stream on


def test_stream_command_run_again_on_the_same_input_does_not_feed_it_twice(world, tmp_path,
                                                                           capsys):
    # A run stopped after the model was saved but before its event log was written is finished
    # by running it again: the model records the files it took (name, size, time of last
    # change, filter, target), so their rows are not fed twice and only the log is written.
    af, X, _, region, coef, thr = world
    cols = [f"x{j}" for j in range(X.shape[1])]
    AdaptiveFederatedOrdinal(backend="serial").fit(
        pd.DataFrame(X[:20_000], columns=cols),
        _labels(X[:20_000], region[:20_000], coef, thr, 31)).save(tmp_path / "m")
    data = tmp_path / "s.parquet"
    pd.DataFrame(X[20_000:30_000], columns=cols).assign(
        grade=_labels(X[20_000:30_000], region[20_000:30_000], coef, thr, 32)).to_parquet(data)
    args = ["--quiet", "stream", str(tmp_path / "m"), str(data), "--target", "grade"]
    log = tmp_path / "m.events.jsonl"
    assert main(args) == 0
    saved = (tmp_path / "m" / "model.json").read_bytes()
    record = load(tmp_path / "m").stream_.inputs
    assert [(r["file"], r["rows"], r["rows_before"]) for r in record] == [(str(data), 10_000,
                                                                           0)]
    first_log = log.read_text()
    log.unlink()  # as if the run had been killed between the two writes
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already holds the 10,000 rows" in out and "--again" in out
    assert (tmp_path / "m" / "model.json").read_bytes() == saved  # not fed again
    assert log.read_text() == first_log
    # another filter reads other rows; --again feeds the same file once more
    assert main([*args, "--filter", "x0 > 0"]) == 0
    n_pos = int((X[20_000:30_000, 0] > 0).sum())
    assert load(tmp_path / "m").stream_.rows_seen == 10_000 + n_pos
    assert main([*args, "--again"]) == 0
    back = load(tmp_path / "m")
    assert back.stream_.rows_seen == 20_000 + n_pos
    assert [r["rows_before"] for r in back.stream_.inputs] == [0, 10_000, 10_000 + n_pos]
    # a file changed since it was fed is refused (fed whole, its old rows would count twice)
    before = (tmp_path / "m" / "model.json").read_bytes()
    pd.read_parquet(data).iloc[:100].to_parquet(data)
    os.utime(data, ns=(time.time_ns() + 10**9,) * 2)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "changed since the model took 10,000 rows from it" in err and "--again" in err
    assert (tmp_path / "m" / "model.json").read_bytes() == before
    assert main([*args, "--again"]) == 0
    assert load(tmp_path / "m").stream_.rows_seen == 20_100 + n_pos


def test_stream_command_on_a_growing_folder_feeds_only_its_new_files(world, tmp_path, capsys):
    af, X, _, region, coef, thr = world
    cols = [f"x{j}" for j in range(X.shape[1])]
    fitted = AdaptiveFederatedOrdinal(backend="serial").fit(
        pd.DataFrame(X[:20_000], columns=cols),
        _labels(X[:20_000], region[:20_000], coef, thr, 34))
    fitted.save(tmp_path / "m")
    folder = tmp_path / "incoming"
    folder.mkdir()
    y = _labels(X, region, coef, thr, 35)
    parts = [(20_000 + 4000 * i, 24_000 + 4000 * i) for i in range(3)]

    def write(i):
        a, b = parts[i]
        pd.DataFrame(X[a:b], columns=cols).assign(grade=y[a:b]).to_parquet(
            folder / f"day{i}.parquet")

    write(0)
    write(1)
    args = ["--quiet", "stream", str(tmp_path / "m"), str(folder), "--target", "grade",
            "--batch-size", "1500"]
    assert main(args) == 0
    write(2)
    capsys.readouterr()
    assert main(args) == 0
    assert "Skipping 2 files" in capsys.readouterr().out
    back = load(tmp_path / "m")
    assert back.stream_.rows_seen == 12_000
    assert [(Path(r["file"]).name, r["rows_before"]) for r in back.stream_.inputs] == [
        ("day0.parquet", 0), ("day1.parquet", 4000), ("day2.parquet", 8000)]
    # the same batches as partial_fit over the files in order
    ref = AdaptiveFederatedOrdinal(backend="serial").fit(
        pd.DataFrame(X[:20_000], columns=cols),
        _labels(X[:20_000], region[:20_000], coef, thr, 34))
    for a, b in parts:
        for s in range(a, b, 1500):
            e = min(s + 1500, b)
            ref.partial_fit(pd.DataFrame(X[s:e], columns=cols), y[s:e])
    np.testing.assert_array_equal(back.predict_proba(pd.DataFrame(X[:200], columns=cols)),
                                  ref.predict_proba(pd.DataFrame(X[:200], columns=cols)))


def test_saved_records_of_streamed_inputs_are_checked():
    from fedgrain.monitor.state import _input_entry

    good = {"file": "s.parquet", "size": 10, "mtime_ns": 5, "filter": None, "target": "g",
            "rows": 3, "rows_before": 0, "at": "2026-12-05T00:00:00+00:00"}
    assert _input_entry(good) == good
    assert _input_entry({**good, "size": None, "mtime_ns": None, "filter": "(x > 0)"})
    for bad in ({**good, "rows": -1}, {**good, "rows": "3"}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "at"}, ["ab"], {**good, "size": 1.5},
                {**good, "target": None}):
        with pytest.raises(ValueError, match="streamed file"):
            _input_entry(bad)


def test_a_saved_model_with_a_bad_record_of_its_inputs_is_refused(world, tmp_path):
    from fedgrain.exceptions import ModelFileError
    from fedgrain.persist import read_model_dir, write_model_dir

    af, X, _, region, coef, thr = world
    model = _stream(af, X[:20_000], _labels(X[:20_000], region[:20_000], coef, thr, 33))
    model.stream_.add_input("s.parquet", 10, 5, None, "g", 20_000, 0, "2026-12-05T00:00:00+00:00")
    meta, arrays = read_model_dir(model.save(tmp_path / "m"))
    assert load(tmp_path / "m").stream_.inputs == model.stream_.inputs
    meta["stream"]["inputs"][0]["rows"] = "many"
    write_model_dir(tmp_path / "bad", meta, arrays)  # valid checksums
    with pytest.raises(ModelFileError):
        load(tmp_path / "bad")


def test_stream_command_with_no_file_passing_the_filter_is_a_data_error(world, tmp_path, capsys):
    af, X, _, region, coef, thr = world
    cols = [f"x{j}" for j in range(X.shape[1])]
    AdaptiveFederatedOrdinal(backend="serial").fit(
        pd.DataFrame(X[:20_000], columns=cols),
        _labels(X[:20_000], region[:20_000], coef, thr, 36)).save(tmp_path / "m")
    (tmp_path / "d" / "region=a").mkdir(parents=True)
    pd.DataFrame(X[:100], columns=cols).assign(grade=1).to_parquet(
        tmp_path / "d" / "region=a" / "p.parquet")
    before = (tmp_path / "m" / "model.json").read_bytes()
    code = main(["--quiet", "stream", str(tmp_path / "m"), str(tmp_path / "d"), "--target",
                 "grade", "--filter", "region == 'b'"])
    err = capsys.readouterr().err
    assert code == 2 and "passes the filter" in err and err.count("\n") == 1
    assert (tmp_path / "m" / "model.json").read_bytes() == before
