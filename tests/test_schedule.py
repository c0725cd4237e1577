"""Scheduling leaves: a valid assignment, Graham's bound, siblings together, bytes moved."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgrain.federation.schedule import FIXED_COST, Schedule, leaf_costs, schedule


@st.composite
def problems(draw, max_leaves=40, max_workers=8):
    """Keyword arguments for ``schedule``: sizes, d, workers, and optional groups/previous."""
    n = draw(st.integers(0, max_leaves))
    w = draw(st.integers(1, max_workers))
    leaf_ints = st.lists(st.integers(0, 5), min_size=n, max_size=n)
    return {
        "sizes": draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n)),
        "d": draw(st.integers(1, 30)),
        "n_workers": w,
        "groups": draw(st.none() | leaf_ints),
        "previous": draw(st.none() | st.lists(st.integers(-1, w), min_size=n, max_size=n)),
        "row_bytes": draw(st.integers(0, 100)),
        "slack": draw(st.sampled_from([0.0, 0.02, 0.1, 0.5])),
    }


def _optimal_makespan(cost, n_workers):
    """Smallest possible largest load, by trying every assignment (small problems only)."""
    assign = np.array(list(itertools.product(range(n_workers), repeat=cost.size)))
    onehot = assign[:, :, None] == np.arange(n_workers)
    return np.einsum("alw,l->aw", onehot, cost).max(axis=1).min()


@settings(max_examples=60, deadline=None)
@given(problems())
def test_assignment_is_valid_and_consistent(kw):
    s = schedule(**kw)
    n, w = len(kw["sizes"]), kw["n_workers"]
    assert s.worker.shape == (n,) and s.n_workers == w
    assert np.all((s.worker >= 0) & (s.worker < w))
    np.testing.assert_array_equal(s.cost, leaf_costs(kw["sizes"], kw["d"]))
    np.testing.assert_allclose(s.loads, np.bincount(s.worker, s.cost, minlength=w), rtol=1e-12)
    assert s.imbalance >= 1.0 - 1e-12
    bundles = s.bundles()
    assert sorted(i for b in bundles for i in b) == list(range(n))
    for b in bundles:
        assert len(set(s.worker[b])) == 1
        keys = [(-s.cost[i], i) for i in b]
        assert keys == sorted(keys)
    assert [s.worker[b[0]] for b in bundles] == sorted(set(s.worker.tolist()))
    prev = np.full(n, -1) if kw["previous"] is None else np.asarray(kw["previous"])
    moved = np.asarray(kw["sizes"], dtype=np.int64)[s.worker != prev].sum()
    assert s.bytes_to_move == moved * kw["row_bytes"]


@settings(max_examples=60, deadline=None)
@given(problems(max_leaves=8, max_workers=4))
def test_makespan_within_grahams_bound_of_the_optimum(kw):
    s = schedule(**kw)
    if s.cost.size == 0:
        return
    w = kw["n_workers"]
    opt = _optimal_makespan(s.cost, w)
    assert opt >= max(s.cost.sum() / w, s.cost.max())
    assert s.loads.max() <= (4 / 3 - 1 / (3 * w)) * opt * (1 + kw["slack"]) * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_deterministic_for_any_input_type_and_inputs_untouched(kw):
    copies = {k: np.array(v, dtype=np.int32) for k, v in kw.items() if isinstance(v, list)}
    first = schedule(**kw).to_dict()
    assert schedule(**{**kw, **copies}).to_dict() == first
    for k, v in copies.items():
        np.testing.assert_array_equal(v, kw[k])


@settings(max_examples=60, deadline=None)
@given(problems())
def test_dict_round_trip_through_json(kw):
    s = schedule(**kw)
    back = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    for name in ("worker", "cost", "loads"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
        assert getattr(back, name).dtype == getattr(s, name).dtype
    assert (back.n_workers, back.bytes_to_move) == (s.n_workers, s.bytes_to_move)
    assert back.bundles() == s.bundles() and back.imbalance == s.imbalance


def test_leaf_costs_follow_the_model():
    np.testing.assert_array_equal(leaf_costs([0, 3], d=2), [FIXED_COST, 3 * 4 + FIXED_COST])


def test_equal_leaves_balance_perfectly():
    s = schedule([1000] * 8, d=5, n_workers=2)
    assert s.imbalance == 1.0
    assert s.worker.tolist() == [0, 1] * 4
    assert s.bundles() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_no_leaves():
    s = schedule([], d=3, n_workers=2)
    assert s.imbalance == 1.0 and s.bundles() == [] and s.loads.tolist() == [0.0, 0.0]


def test_single_huge_leaf_sets_the_imbalance():
    # Costs (d = 10): 1e6 * 100 + 2e6 = 1.02e8 for the big leaf, 2e6 for each empty one.
    s = schedule([10**6, 0, 0, 0, 0], d=10, n_workers=2)
    assert s.worker.tolist() == [0, 1, 1, 1, 1]
    assert s.imbalance == pytest.approx(1.02e8 / ((1.02e8 + 4 * 2e6) / 2), rel=1e-12)
    assert s.imbalance == pytest.approx(102 / 55, rel=1e-12)


def test_siblings_share_a_worker_when_the_slack_allows():
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    # A leaf is a quarter of the mean load, so a preference may cost that much: slack 0.25.
    together = schedule([1000] * 8, d=5, n_workers=2, groups=groups, slack=0.25)
    assert together.worker.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert together.imbalance == 1.0
    # Without groups, or with slack just short of a quarter, LPT alternates and splits every pair.
    assert schedule([1000] * 8, d=5, n_workers=2, slack=0.25).worker.tolist() == [0, 1] * 4
    short = schedule([1000] * 8, d=5, n_workers=2, groups=groups, slack=0.24)
    assert short.worker.tolist() == [0, 1] * 4


def test_many_small_siblings_stay_together_at_the_default_slack():
    groups = np.repeat(np.arange(100), 2)
    s = schedule([1000] * 200, d=5, n_workers=2, groups=groups)
    assert np.all(s.worker[0::2] == s.worker[1::2])
    assert s.imbalance == 1.0


def test_previous_balanced_assignment_is_kept():
    previous = [1, 0] * 4
    s = schedule([1000] * 8, d=5, n_workers=2, previous=previous, row_bytes=56)
    assert s.worker.tolist() == previous
    assert s.bytes_to_move == 0


def test_bytes_to_move():
    sizes = [10, 20, 30, 40]
    assert schedule(sizes, d=3, n_workers=2, row_bytes=56).bytes_to_move == 100 * 56
    # Leaf 0 is nowhere yet and leaf 1 is on a worker that is gone: only they move.
    s = schedule(sizes, d=3, n_workers=2, row_bytes=56, previous=[-1, 5, 0, 1])
    assert s.worker.tolist()[2:] == [0, 1]
    assert s.bytes_to_move == (10 + 20) * 56


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_workers": 0}, r"n_workers must be an int >= 1\. Got 0 instead"),
        ({"n_workers": 2.0}, r"n_workers must be an int >= 1\. Got 2\.0 instead"),
        ({"n_workers": True}, r"n_workers must be an int >= 1\. Got True instead"),
        ({"d": 0}, r"d must be an int >= 1\. Got 0 instead"),
        ({"sizes": [5, -3, 1]}, r"sizes must be >= 0\. Got -3 instead"),
        ({"sizes": [5, 1.5, 1]}, r"sizes must be a 1-D array of ints\. Got .* dtype float64"),
        ({"sizes": [[5, 1, 2]]}, r"sizes must be a 1-D array of ints\. Got shape \(1, 3\)"),
        ({"groups": [0, 0]}, r"groups must be 3 ints, one per leaf\. Got shape \(2,\)"),
        ({"previous": [0, 1, 0, 1]}, r"previous must be 3 ints, one per leaf\. Got shape \(4,\)"),
        ({"previous": [0, -2, 1]}, r"previous must be >= -1\. Got -2 instead"),
        ({"row_bytes": -8}, r"row_bytes must be an int >= 0\. Got -8 instead"),
        ({"slack": -0.1}, r"slack must be a float >= 0\. Got -0\.1 instead"),
        ({"slack": float("nan")}, r"slack must be a float >= 0\. Got nan instead"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    args = {"sizes": [5, 1, 2], "d": 3, "n_workers": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        schedule(**args)
