"""Federated sites: fit(X, y, groups=...), one client per group, predictions by group."""

import numpy as np
import pandas as pd
import pytest

from fedgrain import AdaptiveFederatedOrdinal, load
from fedgrain.exceptions import DataError


def _sites(n_sites=8, rows=300, spread=0.8, seed=0, p=3):
    """Sites with related models: slopes and thresholds vary around common ones."""
    rng = np.random.default_rng(seed)
    beta = np.array([1.0, -0.5, 0.3])[:p]
    cuts = np.array([-1.0, 0.8])
    X, y, g, slopes = [], [], [], []
    for s in range(n_sites):
        b = beta + spread * rng.standard_normal(p)
        c = cuts + 0.5 * spread * rng.standard_normal()
        x = rng.standard_normal((rows, p))
        y.append(np.digitize(x @ b + rng.logistic(size=rows), c))
        X.append(x)
        g.append(np.full(rows, f"site{s}"))
        slopes.append(b)
    return np.vstack(X), np.concatenate(y), np.concatenate(g), np.array(slopes)


def test_each_group_is_one_leaf_holding_exactly_its_rows():
    X, y, g, _ = _sites()
    af = AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(X, y, groups=g)
    assert af.n_leaves_ == 8 and af.groups_ == [f"site{s}" for s in range(8)]
    leaf = af.apply(X, groups=g)
    for s, label in enumerate(af.groups_):
        assert set(leaf[g == label]) == {af.leaf_ids_[s]}  # the group's rows, in its own leaf
    assert af.partition_.sizes.tolist() == [300] * 8
    # a group's model is its own: the leaves' slopes differ as the sites' do
    slopes = np.array([m.coef_ for m in af.local_models_])
    assert np.std(slopes[:, 0]) > 0.2


def test_predictions_use_the_groups_model_and_the_global_one_for_unknown_groups():
    X, y, g, _ = _sites()
    af = AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(X, y, groups=g)
    rows = slice(0, 50)  # site0's rows
    own = af.local_models_[0].predict_proba(X[rows])
    np.testing.assert_allclose(af.predict_proba(X[rows], groups=g[rows]), own)
    glob = af.meta_model_.predict_proba(X[rows])
    np.testing.assert_allclose(af.predict_proba(X[rows]), glob)  # no groups: global model
    with pytest.warns(UserWarning, match=r"50 row\(s\) belong to group\(s\) the model was not "
                                         r"fitted on \('new'; .*'site0'\): the global model"):
        np.testing.assert_allclose(af.predict_proba(X[rows], groups=["new"] * 50), glob)
    with pytest.warns(UserWarning, match="not fitted on"):
        assert af.apply(X[rows], groups=["new"] * 50).tolist() == [-1] * 50
        assert af.unseen(X[rows], groups=["new"] * 50).all()
    assert af.predict(X[rows], groups=g[rows]).shape == (50,)
    # the group model predicts its own site better than the global model
    assert af.score(X, y, groups=g) >= af.score(X, y) - 1e-9


def test_groups_as_a_column_of_the_frame_and_saved_with_the_model(tmp_path):
    X, y, g, _ = _sites(n_sites=4)
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(site=g)
    af = AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(frame, y,
                                                                        groups="site")
    assert list(af.feature_names_in_) == ["a", "b", "c"]
    back = load(af.save(tmp_path / "m"))
    assert back.groups_ == af.groups_
    np.testing.assert_allclose(back.predict_proba(frame, groups="site"),
                               af.predict_proba(frame.drop(columns="site"), groups=g))


def test_the_same_random_state_gives_the_same_group_models():
    X, y, g, _ = _sites(n_sites=4)
    a = AdaptiveFederatedOrdinal(backend="serial", random_state=3).fit(X, y, groups=g)
    b = AdaptiveFederatedOrdinal(backend="serial", random_state=3).fit(X, y, groups=g)
    np.testing.assert_array_equal(a._leaves.params, b._leaves.params)


@pytest.mark.parametrize("bad, match", [
    (lambda g: g[:-1], r"groups has 2,399 labels for 2,400 rows"),
    (lambda g: np.where(np.arange(g.shape[0]) == 7, None, g), r"missing label at row 7"),
])
def test_bad_group_labels_are_refused_clearly(bad, match):
    X, y, g, _ = _sites()
    with pytest.raises(DataError, match=match):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, groups=bad(g.astype(object)))


def test_groups_too_small_or_with_one_class_are_named():
    X, y, g, _ = _sites(n_sites=4)
    g = g.copy()
    g[:10] = "tiny"
    with pytest.raises(DataError, match=r"Group\(s\) 'tiny' \(10 rows\) have fewer than 5 rows "
                                        r"per parameter"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, groups=g)
    y2 = y.copy()
    y2[g == "site1"] = 0
    _, _, g3, _ = _sites(n_sites=4)
    with pytest.raises(DataError, match=r"'site1' \(all 0\) hold one class only"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y2, groups=g3)


def test_groups_and_other_options_that_do_not_mix_are_refused():
    X, y, g, _ = _sites(n_sites=4)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    with pytest.raises(DataError, match="'site' is not a column of X"):
        AdaptiveFederatedOrdinal(backend="serial").fit(frame, y, groups="site")
    with pytest.raises(DataError, match="names a column, but X has no columns"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, groups="site")
    plain = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
    with pytest.raises(DataError, match="fitted without groups"):
        plain.predict(X, groups=g)
    af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, groups=g)
    with pytest.raises(DataError, match="partial_fit is not available on a model fitted with "
                                        "groups"):
        af.partial_fit(X[:100], y[:100])


def test_the_command_line_fits_and_predicts_by_site(tmp_path, capsys):
    from fedgrain.cli import main

    X, y, g, _ = _sites(n_sites=4)
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(site=g, grade=y)
    frame.to_csv(tmp_path / "d.csv", index=False)
    assert main(["--quiet", "fit", str(tmp_path / "d.csv"), "--target", "grade", "--groups",
                 "site", "--backend", "serial", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "groups (4)" in out and "(group site3)" in out
    assert main(["--quiet", "predict", str(tmp_path / "m"), str(tmp_path / "d.csv"),
                 "--groups", "site", "--out", str(tmp_path / "p.csv")]) == 0
    pred = pd.read_csv(tmp_path / "p.csv")
    model = load(tmp_path / "m")
    np.testing.assert_allclose(pred.filter(like="proba_").to_numpy(),
                               model.predict_proba(frame.drop(columns="grade"), groups="site"),
                               atol=1e-12)
    assert main(["--quiet", "evaluate", str(tmp_path / "m"), str(tmp_path / "d.csv"),
                 "--target", "grade", "--groups", "site"]) == 0
    assert "Per leaf" in capsys.readouterr().out
    code = main(["--quiet", "fit", str(tmp_path / "d.csv"), "--target", "grade", "--groups",
                 "region", "--backend", "serial", "--out", str(tmp_path / "m2")])
    assert code != 0 and "--groups: ['region'] not among the feature columns" in \
        capsys.readouterr().err


def test_the_report_names_the_sites_and_scores_them(tmp_path):
    X, y, g, _ = _sites(n_sites=4)
    af = AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(X, y, groups=g)
    page = af.report(tmp_path / "r.html", X, y, groups=g).read_text()
    assert "<td>site site2 (leaf " in page
    bare = af.report(tmp_path / "r2.html").read_text()  # no rows: no projection of sites
    assert "The leaves are the 4 sites (groups), not regions of feature space" in bare


def test_the_report_shows_the_learned_pull_per_parameter_and_the_gain_per_site(tmp_path):
    X, y, g, _ = _sites(n_sites=12, rows=200, spread=0.8)
    af = AdaptiveFederatedOrdinal(backend="serial", meta="fomaml", random_state=0).fit(
        X, y, groups=g)
    assert np.isfinite(af.meta_state_.rho)
    page = af.report(tmp_path / "r.html").read_text()
    assert "How far a leaf may differ" in page and "Prior sd" in page
    assert "Gain per leaf" in page and "<td>site site3 (leaf " in page
    last = af.history_[-1]
    assert set(last["leaf_global_loss"]) == set(last["leaf_val_loss"])


def test_groups_edge_cases_get_clear_errors(tmp_path):
    """A tree with groups given as partition=, --groups with --stability, groups for a report
    of a model without them, and a frame whose column labels are not text."""
    from fedgrain import DivideConquerOrdinal
    from fedgrain.cli import main

    X, y, g, _ = _sites(n_sites=4)
    af = AdaptiveFederatedOrdinal(backend="serial").fit(X, y, groups=g)
    with pytest.raises(DataError, match="fit with fit\\(X, y, groups=...\\) instead"):
        AdaptiveFederatedOrdinal(backend="serial").fit(X, y, partition=af.partition_)
    dc = DivideConquerOrdinal(backend="serial").fit(X, y)
    with pytest.raises(DataError, match="groups= applies to a model fitted with groups"):
        dc.report(tmp_path / "r.html", X, y, groups=g)
    frame = pd.DataFrame(X).assign(**{"9": g})  # int column labels, and one named "9"
    by_name = AdaptiveFederatedOrdinal(backend="serial").fit(frame, y, groups="9")
    assert by_name.groups_ == af.groups_
    pd.DataFrame(X, columns=["a", "b", "c"]).assign(site=g, grade=y).to_csv(tmp_path / "d.csv",
                                                                           index=False)
    code = main(["--quiet", "fit", str(tmp_path / "d.csv"), "--target", "grade", "--groups",
                 "site", "--stability", "3", "--out", str(tmp_path / "m")])
    assert code != 0 and not (tmp_path / "m").exists()


def test_rows_of_weight_zero_leave_with_their_group_labels():
    """Frequency weights of zero drop rows before the fit; their labels go with them (a whole
    site of weight zero is then not a site of the fit)."""
    X, y, g, _ = _sites(n_sites=4)
    w = np.ones(len(y))
    w[:7] = 0.0
    w[g == "site3"] = 0.0
    af = AdaptiveFederatedOrdinal(backend="serial", random_state=0).fit(X, y, groups=g,
                                                                        sample_weight=w)
    assert af.groups_ == ["site0", "site1", "site2"]
    assert af.partition_.sizes.tolist() == [293, 300, 300]


def test_two_hundred_sites_fit_save_and_load_exactly(tmp_path):
    """Many small leaves: the fit, a save and a load give back every leaf's model, profile
    and prediction exactly, and the leaves' profiles travel as arrays, not JSON."""
    X, y, g, _ = _sites(n_sites=200, rows=60, spread=0.6, seed=3)
    af = AdaptiveFederatedOrdinal(meta="reptile", max_rounds=2, backend="serial",
                                  random_state=0)
    af.fit(X, y, groups=g)
    assert af.n_leaves_ == 200 and len(af.history_) >= 1
    af.save(tmp_path / "m")
    header = (tmp_path / "m" / "model.json").read_text()
    assert len(header) < 400_000 and '"edges"' not in header  # 200 leaves' profiles: arrays
    back = load(tmp_path / "m")
    assert list(back.leaf_ids_) == list(af.leaf_ids_) and back.groups_ == af.groups_
    np.testing.assert_array_equal(back._leaves.params, af._leaves.params)
    np.testing.assert_array_equal(back._leaves.covs, af._leaves.covs)
    assert back.profile_.to_dict() == af.profile_.to_dict()
    assert back.partition_.describe() == af.partition_.describe()
    assert [m.summary().as_text() for m in back.local_models_[:3]] == \
        [m.summary().as_text() for m in af.local_models_[:3]]
    np.testing.assert_array_equal(back.predict_proba(X, groups=g), af.predict_proba(X, groups=g))
    np.testing.assert_array_equal(back.unseen(X * 3, groups=g), af.unseen(X * 3, groups=g))
