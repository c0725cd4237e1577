"""AdaptiveFederatedOrdinal through its public API (issue 3: profile, partition, schedule, fit).

Checks against known truth (simulated regions with their own models), against the estimators it
must reduce to (g = 0 is the static divide-and-conquer fit), and bad input.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, log_loss

from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load
from fedgrain.core.likelihood import class_proba
from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import make_regions
from fedgrain.exceptions import (
    DataError,
    IdentificationWarning,
    ModelFileError,
)
from fedgrain.partition.tree import PartitionTree


@pytest.fixture(scope="module")
def regions():
    """Three regions of feature space with clearly different models; 12,000 train, 6,000 test."""
    X, y, region, coef, thr = make_regions(18_000, n_features=4, n_classes=4, n_regions=3,
                                           heterogeneity=1.5, random_state=3)
    return (X[:12_000], y[:12_000], region[:12_000]), (X[12_000:], y[12_000:], region[12_000:]), \
        (coef, thr)


@pytest.fixture(scope="module")
def fitted(regions):
    (X, y, _), _, _ = regions
    return AdaptiveFederatedOrdinal(granularity=0.5, backend="serial").fit(X, y)


def _oracle_proba(X, region, coef, thr):
    eta = np.einsum("ij,ij->i", X, coef[region])
    return class_proba(eta, thr[region])


def test_leaves_recover_the_regions_and_beat_the_global_model(regions, fitted):
    (X, y, region), (Xt, yt, rt), (coef, thr) = regions
    af = fitted
    assert af.n_leaves_ == 3
    assert adjusted_rand_score(region, af.apply(X)) >= 0.8
    assert adjusted_rand_score(rt, af.apply(Xt)) >= 0.8
    leaf_ll = log_loss(yt, af.predict_proba(Xt), labels=[0, 1, 2, 3])
    global_ll = log_loss(yt, af.global_model_.predict_proba(Xt), labels=[0, 1, 2, 3])
    central_ll = log_loss(yt, OrdinalRegression().fit(X, y).predict_proba(Xt),
                          labels=[0, 1, 2, 3])
    oracle_ll = log_loss(yt, _oracle_proba(Xt, rt, coef, thr), labels=[0, 1, 2, 3])
    assert leaf_ll < 0.9 * global_ll
    assert leaf_ll < 0.9 * central_ll
    assert leaf_ll < 1.03 * oracle_ll


def test_leaf_models_estimate_their_regions(regions, fitted):
    (X, _, region), _, (coef, _) = regions
    af = fitted
    leaf = af.apply(X)  # leaf ids, as the leaves' models carry them
    for model in af.local_models_:
        r = np.bincount(region[leaf == model.leaf]).argmax()
        z = np.abs(model.coef_ - coef[r]) / model.bse_[: coef.shape[1]]
        assert z.max() < 4.5, (model.leaf, z)
    assert af.leaf_model(af.leaf_ids_[-1]) is af.local_models_[-1]
    with pytest.raises(DataError, match="No leaf"):
        af.leaf_model(-7)


def test_prediction_routes_each_row_to_its_leaf_model(regions, fitted):
    _, (Xt, _, _), _ = regions
    af = fitted
    leaf = af.apply(Xt)
    assert af.unseen(Xt).mean() < 0.01  # held-out rows of the same regions are nearly all seen
    proba = af.predict_proba(Xt)
    for model in af.local_models_:
        rows = leaf == model.leaf
        np.testing.assert_allclose(proba[rows], model.predict_proba(Xt[rows]), rtol=1e-12)
    far = Xt[:5] + 50.0  # far outside every region: reported, but with meta="none" every
    assert af.unseen(far).all()  # row keeps its leaf's fit (the meta-learner falls back)
    leaf_far = af.apply(far)
    np.testing.assert_allclose(af.predict_proba(far)[0],
                               af.leaf_model(leaf_far[0]).predict_proba(far[:1])[0])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    cum = af.predict_cumulative_proba(Xt)
    np.testing.assert_allclose(cum[:, 0], proba[:, 0])
    p, lo, hi = af.predict_proba_ci(Xt[:50])
    np.testing.assert_allclose(p, proba[:50])
    assert np.all((lo <= p + 1e-12) & (p <= hi + 1e-12))
    assert np.array_equal(af.predict(Xt), af.classes_[proba.argmax(axis=1)])


def test_fitted_attributes(regions, fitted):
    (X, _, _), _, _ = regions
    af = fitted
    tree = af.partition_
    assert tree.n_leaves == af.n_leaves_ == len(af.local_models_)
    assert tree.sizes.sum() == X.shape[0]
    assert af.global_model_.n_subsets_ == af.n_leaves_
    np.testing.assert_array_equal(af.coef_, af.global_model_.coef_)
    assert af.global_model_.q_pvalue_ < 1e-10  # the leaves differ, and Q says so
    assert set(af.profile_.leaves) == set(tree.leaves)
    assert all(lp.importance_source == "local model" for lp in af.profile_.leaves.values())
    assert af.schedule_.imbalance >= 1.0
    assert af.schedule_.bytes_to_move == X.shape[0] * (X.shape[1] + 2) * 8
    assert {"profile and partition", "fit leaves and pool"} <= set(af.timings_)
    assert "Leaf" in str(af.local_models_[0].summary())
    assert len(tree.describe()) == len(tree.nodes)


def test_granularity_zero_is_the_static_divide_and_conquer_fit(regions):
    (X, y, _), _, _ = regions
    af = AdaptiveFederatedOrdinal(granularity=0.0, backend="serial", n_jobs=3,
                                  random_state=4).fit(X, y)
    # both refine to convergence (the adaptive pieces start from converged fits, the static
    # ones from one-step de-biased fits): the same composite fit, to a sliver of an SE
    dc = DivideConquerOrdinal(backend="serial", n_jobs=3, random_state=4,
                              refine_rounds=20).fit(X, y)
    assert af.n_leaves_ == dc.n_subsets_ == 3
    assert np.max(np.abs(af.results_.params - dc.results_.params) / dc.bse_) < 0.01
    np.testing.assert_allclose(af.bse_, dc.bse_, rtol=1e-3)
    # one region: every piece predicts with the pooled (global) model
    np.testing.assert_allclose(af.predict_proba(X[:100]), dc.predict_proba(X[:100]), atol=1e-3)
    assert all(np.array_equal(m.coef_, af.coef_) for m in af.local_models_)


def test_more_workers_than_regions_deals_regions_out_into_pieces(regions):
    (X, y, _), (Xt, _, _), _ = regions
    af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial", n_jobs=5).fit(X, y)
    tree = af.partition_
    region_of = tree.region_of()
    assert af.n_leaves_ == 5 and np.unique(region_of).shape[0] == 3
    for r in np.unique(region_of):
        members = np.flatnonzero(region_of == r)
        for m in members[1:]:  # pieces of one region share its pooled model
            np.testing.assert_array_equal(af.local_models_[m].coef_,
                                          af.local_models_[members[0]].coef_)
    # new rows reach the region's pieces, whose model is the same whichever piece
    assert set(np.unique(af.apply(Xt))) == set(af.leaf_ids_.tolist())


def test_serial_and_processes_give_bit_identical_results(regions, monkeypatch):
    from fedgrain.backends import processes

    monkeypatch.setattr(processes, "MIN_PARALLEL_WORK", 0)
    (X, y, _), _, _ = regions
    a = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial", random_state=2).fit(X, y)
    b = AdaptiveFederatedOrdinal(granularity=0.5, backend="processes", n_jobs=2,
                                 random_state=2).fit(X, y)
    assert json.dumps(a.partition_.to_dict()) == json.dumps(b.partition_.to_dict())
    for attr in ("coef_", "thresholds_", "cov_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    for ma, mb in zip(a.local_models_, b.local_models_, strict=True):
        np.testing.assert_array_equal(ma.cov_, mb.cov_)


def test_same_seed_same_model(regions):
    (X, y, _), _, _ = regions
    a = AdaptiveFederatedOrdinal(granularity=0.75, backend="serial", random_state=8).fit(X, y)
    b = AdaptiveFederatedOrdinal(granularity=0.75, backend="serial", random_state=8).fit(X, y)
    assert a.partition_.to_dict() == b.partition_.to_dict()
    np.testing.assert_array_equal(a.predict_proba(X[:200]), b.predict_proba(X[:200]))


def test_save_and_load_round_trip(regions, fitted, tmp_path):
    _, (Xt, _, _), _ = regions
    af = fitted
    path = af.save(tmp_path / "model")
    back = load(path)
    assert isinstance(back, AdaptiveFederatedOrdinal)
    np.testing.assert_array_equal(back.predict_proba(Xt), af.predict_proba(Xt))
    np.testing.assert_array_equal(back.apply(Xt), af.apply(Xt))
    assert back.partition_.to_dict() == af.partition_.to_dict()
    assert back.profile_.to_dict() == af.profile_.to_dict()
    assert back.schedule_.to_dict() == af.schedule_.to_dict()
    assert back.timings_ == af.timings_
    np.testing.assert_array_equal(back.global_model_.subset_estimates_,
                                  af.global_model_.subset_estimates_)
    assert str(back.summary()) == str(af.summary())
    assert str(back.local_models_[1].summary()) == str(af.local_models_[1].summary())


def test_a_model_file_with_a_damaged_tree_fails_clearly(fitted, tmp_path):
    from fedgrain.persist import read_model_dir, write_model_dir

    path = fitted.save(tmp_path / "model")
    meta, arrays = read_model_dir(path)
    meta["tree"]["nodes"][1]["parent"] = 5  # a child that does not name its parent
    write_model_dir(tmp_path / "bad", meta, arrays)  # valid checksums, inconsistent content
    with pytest.raises(ModelFileError, match="incomplete or inconsistent"):
        load(tmp_path / "bad")


def test_homogeneous_data_lose_nothing_against_the_centralized_fit():
    X, y, *_ = make_regions(24_000, n_features=5, n_classes=4, n_regions=3, heterogeneity=0.0,
                            random_state=11)
    X, Xt, y, yt = X[:16_000], X[16_000:], y[:16_000], y[16_000:]
    af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial").fit(X, y)
    central = OrdinalRegression().fit(X, y)
    ll_af = log_loss(yt, af.predict_proba(Xt), labels=[0, 1, 2, 3])
    ll_c = log_loss(yt, central.predict_proba(Xt), labels=[0, 1, 2, 3])
    assert np.unique(af.partition_.region_of()).shape[0] == 1  # nothing worth a split
    assert ll_af <= 1.01 * ll_c
    z = np.abs(np.r_[af.coef_, af.thresholds_] - np.r_[central.coef_, central.thresholds_])
    assert np.all(z / central.bse_ < 0.5)


def test_a_given_partition_is_used_as_it_is(regions):
    (X, y, region), _, _ = regions
    tree = PartitionTree(X.shape[1], 4, Standardizer.fit(X))
    tree.split(tree.root, np.array([1.0, 0.0, 0.0, 0.0]), 3.0)
    before = tree.to_dict()
    af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tree)
    assert af.n_leaves_ == 2
    np.testing.assert_array_equal(af.apply(X), af.leaf_ids_[(X[:, 0] > 3.0).astype(int)])
    # the model owns a copy: the caller's tree is left as it was
    assert af.partition_ is not tree and tree.to_dict() == before
    # changing the fitted partition afterwards is caught, not silently mispredicted
    af.partition_.split(af.partition_.leaves[0], np.array([0.0, 1.0, 0.0, 0.0]), 0.0)
    with pytest.raises(ValueError, match="partition_ was changed .* after fitting"):
        af.predict_proba(X[:5])


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [1.5, -0.1, "fine", None, float("nan"), True])
def test_granularity_outside_the_unit_interval(regions, g):
    (X, y, _), _, _ = regions
    with pytest.raises(ValueError, match="'granularity' parameter of AdaptiveFederatedOrdinal "
                                         "must be a float in \\[0, 1\\]"):
        AdaptiveFederatedOrdinal(granularity=g).fit(X[:500], y[:500])


@pytest.mark.parametrize("m", [0, -5, 2.5, "10"])
def test_bad_minimum_size_parameter(m):
    X, y, *_ = make_regions(500, n_features=3, random_state=0)
    with pytest.raises(ValueError, match="'min_subset_size' parameter"):
        AdaptiveFederatedOrdinal(min_subset_size=m).fit(X, y)


def test_minimum_size_larger_than_the_data():
    X, y, *_ = make_regions(500, n_features=3, random_state=0)
    with pytest.raises(DataError, match="min_subset_size=600 is larger than the data \\(500 "):
        AdaptiveFederatedOrdinal(min_subset_size=600, backend="serial").fit(X, y)


def test_minimum_size_too_small_for_a_covariance():
    X, y, *_ = make_regions(2000, n_features=3, n_classes=4, random_state=0)
    with pytest.raises(DataError, match="min_subset_size >= 30"):  # 5 x d, d = 3 + 3
        AdaptiveFederatedOrdinal(min_subset_size=20, backend="serial").fit(X, y)


@pytest.mark.parametrize("name, value, allowed", [
    ("meta", "maml", "one of \\('none', 'fomaml', 'reptile', 'fedavg', 'fedprox', 'ditto'\\)"),
    ("max_rounds", 0, "an int >= 1"), ("meta_tol", -1.0, "a float >= 0"),
    ("inner_steps", 0, "an int >= 1"), ("validation_fraction", 0.9, "a float in \\[0.05, 0.5\\]"),
    ("fedprox_mu", -1.0, "a float > 0 or None"),
])
def test_bad_meta_learning_parameters(name, value, allowed):
    X, y, *_ = make_regions(500, n_features=3, random_state=0)
    with pytest.raises(ValueError, match=f"'{name}' parameter of AdaptiveFederatedOrdinal must "
                                         f"be {allowed}"):
        AdaptiveFederatedOrdinal(**{name: value}).fit(X, y)


def test_inherited_parameters_are_checked_under_their_own_name():
    X, y, *_ = make_regions(500, n_features=3, random_state=0)
    with pytest.raises(ValueError, match="'alpha' parameter of AdaptiveFederatedOrdinal"):
        AdaptiveFederatedOrdinal(alpha=-1.0).fit(X, y)


def test_data_too_small_to_split_give_one_region_with_a_warning():
    X, y, *_ = make_regions(150, n_features=3, n_classes=3, n_regions=2, random_state=0)
    with pytest.warns(UserWarning, match="too small to split into two regions"):
        af = AdaptiveFederatedOrdinal(granularity=1.0, backend="serial").fit(X, y)
    assert np.unique(af.partition_.region_of()).shape[0] == 1


def test_fewer_rows_than_parameters_name_the_estimator():
    X, y, *_ = make_regions(6, n_features=5, n_classes=3, random_state=0)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(DataError, match="AdaptiveFederatedOrdinal needs more rows than"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y)


def test_a_feature_constant_inside_a_region_takes_its_slope_from_the_global_model():
    rng = np.random.default_rng(5)
    n = 8000
    group = rng.integers(0, 2, n).astype(float)  # the regions: a 0/1 feature
    dose = np.where(group == 1, 1.0, rng.normal(size=n))  # constant where group == 1
    x2 = rng.normal(size=n)
    X = np.c_[group, dose, x2]
    slope2 = np.where(group == 1, -1.5, 1.5)  # the model differs between the groups
    latent = 0.8 * dose + slope2 * x2 + rng.logistic(size=n)
    y = np.digitize(latent, [-1.0, 1.0])
    tree = PartitionTree(3, 3, Standardizer.fit(X))
    tree.split(tree.root, np.array([1.0, 0.0, 0.0]), 0.5)
    with pytest.warns(IdentificationWarning,
                      match=r"feature 'x1' is constant in leaf\(s\) \[2\]: its slope there is "
                            "the global model's") as rec:
        af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tree)
    # x0 is constant in both leaves because the tree cut on it: expected, not warned about
    assert not [w for w in rec if "'x0'" in str(w.message)]
    constant_leaf = af.local_models_[1]
    assert "x1" in constant_leaf.results_.info["Not identified in the leaf"]
    assert constant_leaf.coef_[1] == pytest.approx(af.coef_[1])
    assert np.all(np.isfinite(constant_leaf.cov_))
    # the leaf's own slope of x2 and its predictions are right despite the missing slope
    assert constant_leaf.coef_[2] == pytest.approx(-1.5, abs=0.15)
    assert af.local_models_[0].coef_[2] == pytest.approx(1.5, abs=0.15)
    held = af.predict_proba(X)
    assert np.all(np.isfinite(held)) and np.allclose(held.sum(axis=1), 1.0)


def test_a_class_missing_from_a_leaf_is_not_identified_there():
    rng = np.random.default_rng(6)
    n = 6000
    x0 = rng.normal(size=n)
    x1 = rng.normal(size=n)
    latent = 1.0 * x1 + rng.logistic(size=n)
    y = np.digitize(latent, [-1.0, 0.5, 1.5])
    y[(x0 > 0) & (y == 3)] = 2  # the top class never occurs in the right half
    X = np.c_[x0, x1]
    tree = PartitionTree(2, 4, Standardizer.fit(X))
    tree.split(tree.root, np.array([1.0, 0.0]), 0.0)
    with pytest.warns(IdentificationWarning,
                      match=r"class '3' never occurs in leaf\(s\) \[2\]: threshold '2\|3'"):
        af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tree)
    right = af.local_models_[1]
    assert np.all(np.diff(right.thresholds_) > 0)
    assert "2|3" in right.results_.info["Not identified in the leaf"]
    # half an expected observation of the top class among the leaf's rows (not the global
    # model's share of it): what zero counts in the leaf say
    assert right.predict_proba(X[x0 > 0])[:, 3].sum() == pytest.approx(0.5, abs=0.05)


def test_a_given_partition_must_fit_the_data():
    X, y, *_ = make_regions(2000, n_features=3, n_classes=4, random_state=0)
    with pytest.raises(TypeError, match="partition must be a fedgrain PartitionTree"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition={"nodes": []})
    wrong = PartitionTree(2, 4, Standardizer.fit(X[:, :2]))
    with pytest.raises(DataError, match="made for 2 features and 4 classes; the data have 3"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=wrong)
    tiny = PartitionTree(3, 4, Standardizer.fit(X))
    tiny.split(tiny.root, np.array([1.0, 0.0, 0.0]), np.sort(X[:, 0])[10])
    with pytest.raises(DataError, match="fewer than min_subset_size"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tiny)


def test_no_warnings_on_clean_data(regions):
    (X, y, _), _, _ = regions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptiveFederatedOrdinal(granularity=0.25, backend="serial").fit(X, y)


def test_regions_without_a_density_gap_are_cut_where_the_model_changes():
    rng = np.random.default_rng(0)
    n = 30_000  # the tree is grown on half the 24,000 training rows (honest leaves)
    X = rng.standard_normal((n, 2))
    slope = np.where(X[:, 0] > 0, 1.5, -1.5)  # the slope of x1 flips at x0 = 0
    y = np.digitize(slope * X[:, 1] + 0.5 * X[:, 0] + rng.logistic(size=n), [-1.5, 0, 1.5])
    af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial").fit(X[:24_000], y[:24_000])
    Xt, yt = X[24_000:], y[24_000:]
    assert af.n_leaves_ == 2
    assert adjusted_rand_score(Xt[:, 0] > 0, af.apply(Xt)) >= 0.9
    oracle = class_proba(slope[24_000:] * Xt[:, 1] + 0.5 * Xt[:, 0], np.array([-1.5, 0, 1.5]))
    assert log_loss(yt, af.predict_proba(Xt)) < 1.02 * log_loss(yt, oracle)


def _group_data(n, seed):
    """Regions given by a 0/1 feature, with the slope of x2 flipping between them."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n).astype(float)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    latent = 0.8 * x1 + np.where(group == 1, -1.5, 1.5) * x2 + rng.logistic(size=n)
    return np.c_[group, x1, x2], np.digitize(latent, [-1.0, 1.0])


def test_regions_with_a_constant_feature_are_not_dealt_into_pieces():
    X, y = _group_data(20_000, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentificationWarning)
        af = AdaptiveFederatedOrdinal(granularity=0.5, backend="serial", n_jobs=4).fit(X, y)
    assert af.n_leaves_ == 2  # two regions, each constant in the group: no pieces
    assert adjusted_rand_score(X[:, 0], af.apply(X)) == 1.0
    for model in af.local_models_:
        assert "x0" in model.results_.info["Not identified in the leaf"]


def test_a_filled_slope_leaves_the_leaf_rows_with_the_leaf_uncertainty():
    X, y = _group_data(12_000, 2)
    tree = PartitionTree(3, 3, Standardizer.fit(X))
    tree.split(tree.root, np.array([1.0, 0.0, 0.0]), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentificationWarning)
        af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tree)
    rows = X[:, 0] == 1
    _, lo, hi = af.predict_proba_ci(X[rows][:400])
    # the same leaf fitted alone, without its constant column
    alone = DivideConquerOrdinal(n_subsets=1, backend="serial").fit(X[rows][:, 1:], y[rows])
    _, lo1, hi1 = alone.predict_proba_ci(X[rows][:400, 1:])
    np.testing.assert_allclose((hi - lo).mean(axis=0), (hi1 - lo1).mean(axis=0), rtol=0.1)


def test_no_leaf_holds_a_single_class():
    rng = np.random.default_rng(3)
    n = 8000
    X = np.r_[rng.normal(-4, 1, (n // 2, 2)), rng.normal(4, 1, (n // 2, 2))]
    y = np.digitize(X[:, 1] + rng.logistic(size=n), [-5.5, -4, -2.5])
    y[X[:, 0] > 0] = 1  # the right cluster is all class 1
    # a side of class 1 plus a few stragglers (no finite fit) is not a cut either
    af = AdaptiveFederatedOrdinal(granularity=1.0, backend="serial").fit(X, y)
    leaf = af.apply(X)
    for nid in af.leaf_ids_:
        counts = np.bincount(y[leaf == nid], minlength=4)
        assert counts.sum() - counts.max() >= 20
    tree = PartitionTree(2, 4, Standardizer.fit(X))
    tree.split(tree.root, np.array([1.0, 0.0]), 0.0)
    with pytest.raises(DataError, match="holds one class only"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tree)


def test_a_bottom_class_missing_from_a_leaf_gets_an_edge_threshold():
    rng = np.random.default_rng(7)
    n = 6000
    x0, x1 = rng.normal(size=n), rng.normal(size=n)
    y = np.digitize(1.0 * x1 + rng.logistic(size=n), [-1.5, -0.5, 1.0])
    y[(x0 > 0) & (y == 0)] = 1  # the bottom class never occurs in the right half
    X = np.c_[x0, x1]
    tree = PartitionTree(2, 4, Standardizer.fit(X))
    tree.split(tree.root, np.array([1.0, 0.0]), 0.0)
    with pytest.warns(IdentificationWarning,
                      match=r"class '0' never occurs in leaf\(s\) \[2\]: threshold '0\|1'"):
        af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=tree)
    right = af.local_models_[1]
    assert np.all(np.diff(right.thresholds_) > 0)
    # half an expected observation of class 0 among the leaf's rows: what zero counts say
    expected = right.predict_proba(X[x0 > 0])[:, 0].sum()
    assert expected == pytest.approx(0.5, abs=0.05)


def test_refresh_profile_from_new_labelled_rows(regions, fitted):
    import copy

    _, (Xt, yt, _), _ = regions
    af = copy.deepcopy(fitted)
    before = {k: v.n_rows for k, v in af.profile_.leaves.items()}
    prof = af.refresh_profile(Xt[:3000], yt[:3000])
    leaf = af.apply(Xt[:3000])
    for nid in af.partition_.leaves:
        assert prof[nid].n_rows == int((leaf == nid).sum()) != before[nid]
        np.testing.assert_array_equal(prof[nid].class_counts,
                                      np.bincount(yt[:3000][leaf == nid], minlength=4))
        assert prof[nid].importance_source == "screening"
    with pytest.raises(ValueError, match="y"):
        af.refresh_profile(Xt[:10], np.full(10, 9))


def test_a_saved_tree_with_a_cycle_or_a_foreign_profile_is_refused_not_looped(fitted, tmp_path):
    from fedgrain.persist import read_model_dir, write_model_dir

    path = fitted.save(tmp_path / "model")
    meta, arrays = read_model_dir(path)
    nodes = meta["tree"]["nodes"]
    root = next(n for n in nodes if n["id"] == 0)
    leaf = next(n for n in nodes if n["kind"] == "leaf")
    # a root with two leaves, and apart from it two random nodes that are each other's child
    # (with a leaf each, parents agreeing): every local check passes, the counts too; only the
    # walk from the root finds the cycle
    big = 10**6
    root = {**root, "kind": "hyperplane", "children": [big, big + 3]}
    a = {**leaf, "id": big + 10, "kind": "random", "children": [big + 11, big + 1],
         "parent": big + 11}
    b = {**leaf, "id": big + 11, "kind": "random", "children": [big + 10, big + 2],
         "parent": big + 10}
    meta["tree"]["nodes"] = [root, a, b] + [
        {**leaf, "id": big + i, "kind": "leaf", "children": [], "parent": par}
        for i, par in ((0, 0), (1, a["id"]), (2, b["id"]), (3, 0))]
    write_model_dir(tmp_path / "cycle", meta, arrays)  # valid checksums
    with pytest.raises(ModelFileError, match="form a cycle"):
        load(tmp_path / "cycle")
    meta, arrays = read_model_dir(path)
    key = next(k for k in meta if "profile" in k)
    meta[key] = [1, 2, 3]  # a profile of a type the model does not know
    write_model_dir(tmp_path / "profile", meta, arrays)
    with pytest.raises(ModelFileError, match="incomplete or inconsistent"):
        load(tmp_path / "profile")
