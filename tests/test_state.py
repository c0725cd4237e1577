"""Typed state and the engine's pieces on their own: recent rows, the stream's and the
meta-learner's state through their dicts, and the refinement loop over groups of subsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedgrain import AdaptiveFederatedOrdinal
from fedgrain.backends import SerialBackend
from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import make_ordinal, make_regions
from fedgrain.federation.engine import (
    EngineSettings,
    Units,
    fit_partition,
    refine_groups,
    values_or_raise,
)
from fedgrain.federation.personalise import MetaState
from fedgrain.federation.schedule import schedule
from fedgrain.federation.shards import build_shards
from fedgrain.inference.local import LocalSettings
from fedgrain.inference.results import parameter_names
from fedgrain.monitor.detectors import ADWIN
from fedgrain.monitor.state import WINDOW_ROWS, RecentRows, StreamState, Window


def _window(start, n, p=2):
    rows = np.arange(start, start + n)
    return Window(np.full((n, p), float(start)), rows % 3, rows)


def test_recent_rows_keep_the_newest_chunks_up_to_the_window():
    recent = RecentRows(2)
    assert not recent and recent.since(0).X.shape == (0, 2)
    for k in range(5):
        recent.add(_window(k * 6_000, 6_000))
    # the oldest chunks go while the rest still hold WINDOW_ROWS rows
    kept = sum(c.codes.shape[0] for c in recent.chunks)
    assert WINDOW_ROWS <= kept < WINDOW_ROWS + 6_000 and kept == 24_000
    assert recent.chunks[0].rows[0] == 6_000
    tail = recent.since(25_000)
    assert tail.rows[0] == 25_000 and tail.rows[-1] == 29_999
    assert tail.X.shape == (5_000, 2) and np.all(tail.codes == tail.rows % 3)


def test_stream_state_goes_through_its_dict_and_back():
    X, y, *_ = make_regions(6_000, n_regions=2, random_state=0)
    af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
    af.partial_fit(X[:3_000], y[:3_000])
    st = af.stream_
    assert isinstance(st, StreamState) and st.rows_seen == 3_000
    meta, arrays = st.to_dict()
    json.dumps(meta)  # plain JSON
    back = StreamState.start(af.partition_.leaves, af.profile_.leaves,
                             list(af.schema_.output_names), ADWIN)
    back.load(json.loads(json.dumps(meta)), arrays)
    assert back.rows_seen == st.rows_seen and back.pending == st.pending
    for nid in af.partition_.leaves:
        a, b = st.windows[nid].since(-1), back.windows[nid].since(-1)
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.rows, b.rows)
        assert back.detectors[nid].state() == st.detectors[nid].state()


def test_meta_state_goes_through_its_dict_and_back():
    rng = np.random.default_rng(0)
    for rho in (12.5, np.inf):
        state = MetaState(rng.normal(size=4), rho, 3.0, np.eye(4))
        meta, arrays = state.to_dict()
        back = MetaState.from_dict(json.loads(json.dumps(meta)), arrays)
        assert back.rho == rho and back.adapt_rho == 3.0
        np.testing.assert_array_equal(back.theta, state.theta)


def _placed(n_subsets=4):
    X, y, *_ = make_ordinal(8_000, 3, 3, random_state=1)
    std = Standardizer.fit(X)
    labels = np.arange(X.shape[0]) % n_subsets
    backend = SerialBackend()
    refs = build_shards(backend, X, y, None, labels, n_subsets, std)
    sizes = np.bincount(labels)
    names = parameter_names(["a", "b", "c"], [0, 1, 2])
    sched = schedule(sizes, len(names), 1)
    return backend, refs, sched, sizes, names


def test_refining_groups_equals_refining_each_group_alone():
    backend, refs, sched, sizes, names = _placed()
    settings = EngineSettings(LocalSettings(n_classes=3), refine_rounds=2)
    run = fit_partition(backend, refs, sched, settings, [1, 2, 3, 4], names=names, sizes=sizes)
    start = {0: (run.estimate, run.cov), 1: (run.estimate, run.cov)}
    both = refine_groups(backend, refs, sched, {0: np.array([0, 1]), 1: np.array([2, 3])},
                         start, settings, names=names, sizes=sizes)
    alone = refine_groups(backend, refs, sched, {1: np.array([2, 3])}, {1: start[1]}, settings,
                          names=names, sizes=sizes)
    np.testing.assert_allclose(both[1].estimate, alone[1].estimate, rtol=1e-12)
    np.testing.assert_allclose(both[1].cov, alone[1].cov, rtol=1e-12)
    # one group of every subset is the global refinement
    whole = refine_groups(backend, refs, sched, {0: np.arange(4)}, {0: (run.pooled.estimate,
                          run.pooled.cov)}, settings, names=names, sizes=sizes)
    np.testing.assert_allclose(whole[0].estimate, run.estimate, rtol=1e-12)


def test_failures_name_the_subset_by_position_or_by_id():
    from fedgrain.backends import Outcome
    from fedgrain.exceptions import SubsetError

    bad = [Outcome(0, 1.0), Outcome(1, None, "boom", "ValueError")]
    with pytest.raises(SubsetError, match=r"subset 2 of 2 \(20 rows\) failed: ValueError: boom"):
        values_or_raise(bad, [10, 20])
    with pytest.raises(SubsetError, match=r"leaf 7 \(20 rows\)"):
        values_or_raise(bad, [10, 20], Units("leaf", [3, 7]))
