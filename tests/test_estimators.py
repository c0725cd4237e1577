"""The estimators through their public API: scikit-learn contract, backends, persistence."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load
from fedgrain.datasets import make_ordinal
from fedgrain.exceptions import (
    DataError,
    IdentificationWarning,
    ModelFileError,
    SeparationError,
)

STRING_LABELS = (
    "string labels have no order an ordinal model can use: fedgrain asks for levels=[...] "
    "instead of guessing an alphabetical order"
)
SEPARATED = (
    "the check's data are perfectly separated (y is a function of X), so the unpenalised "
    "maximum likelihood estimate does not exist and OrdinalRegression raises SeparationError; "
    "the same checks pass with alpha > 0 (see the alpha=0.01 instance)"
)
SEPARATED_CHECKS = [
    "check_dont_overwrite_parameters", "check_positive_only_tag_during_fit",
    "check_sample_weights_shape", "check_sample_weights_not_overwritten",
    "check_sample_weight_equivalence_on_dense_data", "check_pipeline_consistency",
    "check_estimators_pickle", "check_f_contiguous_array_estimator",
    "check_non_transformer_estimators_n_iter", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_fit2d_1feature", "check_dict_unchanged",
    "check_fit2d_predict1d",
]


SEPARATED_POOLED = (
    "the check's data are perfectly separated (y is a function of X): the lasso is finite, but "
    "its de-biasing is a Newton step on the unpenalised likelihood, whose estimate does not "
    "exist, so the subsets' fits are refused with SeparationError, as OrdinalRegression's"
)
SEPARATED_CHECKS_POOLED = [
    "check_classifiers_train", "check_classifiers_train(readonly_memmap=True)",
    "check_classifiers_train(readonly_memmap=True,X_dtype=float32)",
    "check_estimators_partial_fit_n_features", "check_estimators_pickle(readonly_memmap=True)",
]


MORE_FEATURES_THAN_ROWS = (
    "the check fits 15 rows with 30 features: with more parameters than rows the de-biased "
    "estimates have no covariance, and the estimator refuses with a clear error"
)


def _expected_failures(estimator):
    failures = {"check_classifiers_classes": STRING_LABELS}
    if isinstance(estimator, OrdinalRegression) and estimator.alpha == 0:
        failures.update(dict.fromkeys(SEPARATED_CHECKS, SEPARATED))
    if isinstance(estimator, (DivideConquerOrdinal, AdaptiveFederatedOrdinal)):
        # the L1 penalty keeps the lasso finite, but the de-biased estimate is a Newton step on
        # the unpenalised likelihood: separation is refused as OrdinalRegression refuses it
        failures.update(dict.fromkeys(SEPARATED_CHECKS + SEPARATED_CHECKS_POOLED,
                                      SEPARATED_POOLED))
        failures["check_sample_weight_equivalence_on_dense_data"] = MORE_FEATURES_THAN_ROWS
    return failures


@parametrize_with_checks(
    [OrdinalRegression(), OrdinalRegression(alpha=0.01), DivideConquerOrdinal(),
     AdaptiveFederatedOrdinal(), AdaptiveFederatedOrdinal(granularity=1.0),
     AdaptiveFederatedOrdinal(meta="fomaml")],
    expected_failed_checks=_expected_failures,
)
def test_scikit_learn_contract(estimator, check):
    check(estimator)


def test_serial_and_processes_give_bit_identical_results(medium_data, monkeypatch):
    from fedgrain.backends import processes

    monkeypatch.setattr(processes, "MIN_PARALLEL_WORK", 0)  # force the worker processes
    X, y, _, _ = medium_data
    a = DivideConquerOrdinal(n_subsets=4, backend="serial", random_state=3).fit(X, y)
    b = DivideConquerOrdinal(n_subsets=4, backend="processes", n_jobs=2, random_state=3).fit(X, y)
    for attr in ("coef_", "thresholds_", "cov_", "subset_estimates_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))


def test_random_state_fixes_the_model(small_data):
    X, y, _, _ = small_data
    kw = {"n_subsets": 4, "backend": "serial"}
    a = DivideConquerOrdinal(random_state=5, **kw).fit(X, y)
    b = DivideConquerOrdinal(random_state=5, **kw).fit(X, y)
    c = DivideConquerOrdinal(random_state=6, **kw).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert not np.array_equal(a.subset_estimates_, c.subset_estimates_)


def test_fitted_attributes_follow_the_contract(small_data):
    X, y, coef, thr = small_data
    for est in (OrdinalRegression(), DivideConquerOrdinal(n_subsets=2, backend="serial")):
        est.fit(X, y)
        p, K = X.shape[1], 4
        assert est.coef_.shape == (p,) and est.thresholds_.shape == (K - 1,)
        assert np.all(np.diff(est.thresholds_) > 0)
        assert est.cov_.shape == (p + K - 1,) * 2
        np.testing.assert_allclose(est.bse_, np.sqrt(np.diag(est.cov_)))
        np.testing.assert_array_equal(est.classes_, np.arange(K))
        proba = est.predict_proba(X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        # P(Y <= k | x) = sigmoid(threshold_k - x @ coef)
        cum = 1 / (1 + np.exp(-(est.thresholds_[None, :] - (X @ est.coef_)[:, None])))
        np.testing.assert_allclose(np.cumsum(proba, axis=1)[:, :-1], cum, atol=1e-12)
        np.testing.assert_allclose(est.coef_, coef, atol=0.25)
        np.testing.assert_allclose(est.thresholds_, thr, atol=0.35)


def test_default_number_of_subsets_shrinks_for_small_data():
    X, y, _, _ = make_ordinal(150, 4, 3, random_state=0)  # d = 6
    # the default follows n_jobs whatever the backend, so serial and processes agree
    a = DivideConquerOrdinal(backend="serial", n_jobs=2).fit(X, y)
    b = DivideConquerOrdinal(backend="processes", n_jobs=2).fit(X, y)
    assert a.n_subsets_ == b.n_subsets_ == 2
    np.testing.assert_array_equal(a.coef_, b.coef_)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default never makes subsets too small
        est = DivideConquerOrdinal(backend="processes", n_jobs=8).fit(X, y)
        assert est.n_subsets_ == 4  # 6 rows per parameter for one refinement round: 150 // 36
        est = DivideConquerOrdinal(backend="processes", n_jobs=8, refine_rounds=0).fit(X, y)
        assert est.n_subsets_ == 1  # one-shot pooling needs 40 rows per parameter


def test_too_many_subsets_is_a_clear_error():
    X, y, _, _ = make_ordinal(300, 4, 3, random_state=0)
    with pytest.raises(DataError, match=r"n_subsets=20 would give subsets of about 15 rows.*"
                                        r"d = 6 parameters; use n_subsets <= 10"):
        DivideConquerOrdinal(n_subsets=20, backend="serial").fit(X, y)


def test_rare_extreme_class_gets_zero_weight_where_absent_with_a_warning():
    X, y, _, _ = make_ordinal(8000, 3, 4, random_state=2)
    y = np.where(y == 0, 1, y)
    y[np.argsort(X[:, 0])[:2]] = 0  # class 0: two rows only, so most subsets lack it
    with pytest.warns(IdentificationWarning, match=r"threshold '0\|1' \(no rows on one side\)"
                                                   r" carries no information in subset") as rec:
        est = DivideConquerOrdinal(n_subsets=4, backend="serial").fit(X, y)
    assert rec[0].filename == __file__
    assert np.all(np.isfinite(est.coef_)) and np.all(np.isfinite(est.bse_))
    assert np.isnan(est.subset_estimates_[:, X.shape[1]]).sum() == 2  # two subsets lack it


def test_more_parameters_than_rows_is_refused():
    X, y, _, _ = make_ordinal(20, 30, 3, random_state=0)
    with pytest.raises(DataError, match=r"needs more rows than parameters .*: 20 rows for d = 32"):
        DivideConquerOrdinal(backend="serial").fit(X, y)


def test_frames_with_categorical_features_and_ordered_target():
    rng = np.random.default_rng(0)
    n = 3000
    city = rng.choice(["lyon", "nice", "paris"], size=n)
    age = rng.normal(40, 10, size=n)
    latent = 0.05 * (age - 40) + np.select([city == "nice", city == "paris"], [0.8, -0.5], 0.0)
    y = np.digitize(latent + rng.logistic(size=n), [-1.0, 0.0, 1.0])
    levels = ["low", "mid", "high", "top"]
    df = pd.DataFrame({"age": age, "city": pd.Categorical(city),
                       "rating": pd.Categorical.from_codes(y, levels, ordered=True)})
    est = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(df, "rating")
    names = est.results_.param_names
    assert names[:3] == ["age", "city[nice]", "city[paris]"]
    assert names[3:] == ["low|mid", "mid|high", "high|top"]
    assert list(est.levels_) == levels
    assert list(est.feature_names_in_) == ["age", "city"]
    np.testing.assert_allclose(est.coef_, [0.05, 0.8, -0.5], atol=0.2)
    assert set(est.predict(df.drop(columns="rating").head(20))) <= set(levels)


@pytest.mark.parametrize("make", [
    lambda: OrdinalRegression(),
    lambda: DivideConquerOrdinal(n_subsets=3, backend="serial"),
])
def test_save_load_round_trip(tmp_path, small_data, make):
    X, y, _, _ = small_data
    est = make().fit(X, y)
    path = est.save(tmp_path / "model")
    again = load(path)
    assert type(again) is type(est)
    assert again.get_params() == est.get_params()
    for attr in ("coef_", "thresholds_", "cov_", "bse_", "classes_"):
        np.testing.assert_array_equal(getattr(again, attr), getattr(est, attr))
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    assert str(again.summary()) == str(est.summary())


def test_tampered_model_directory_is_refused(tmp_path, small_data):
    X, y, _, _ = small_data
    path = OrdinalRegression().fit(X, y).save(tmp_path / "model")
    doc = json.loads((path / "model.json").read_text())
    doc["meta"]["params"]["max_iter"] = 7
    (path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="checksum"):
        load(path)


def test_truncated_model_directory_is_refused(tmp_path, small_data):
    X, y, _, _ = small_data
    path = DivideConquerOrdinal(n_subsets=2, backend="serial").fit(X, y).save(tmp_path / "m")
    data = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        load(path)


def test_sample_weights_act_as_frequency_weights(small_data):
    X, y, _, _ = small_data
    X, y = X[:600], y[:600]
    w = np.random.default_rng(0).integers(0, 4, size=600)
    rep = np.repeat(np.arange(600), w)
    a = OrdinalRegression().fit(X, y, sample_weight=w.astype(float))
    b = OrdinalRegression().fit(X[rep], y[rep])
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-7)
    np.testing.assert_allclose(a.cov_, b.cov_, rtol=1e-6)
    c = DivideConquerOrdinal(n_subsets=1, backend="serial").fit(X, y, sample_weight=w.astype(float))
    d = DivideConquerOrdinal(n_subsets=1, backend="serial").fit(X[rep], y[rep])
    np.testing.assert_allclose(c.coef_, d.coef_, atol=1e-7)
    np.testing.assert_allclose(c.cov_, d.cov_, rtol=1e-6)


def test_invalid_parameters_are_named():
    X, y, _, _ = make_ordinal(200, 2, 3)
    cases = [
        (DivideConquerOrdinal(alpha="lots"), "'alpha' parameter of DivideConquerOrdinal must be"),
        (DivideConquerOrdinal(n_subsets=0), "'n_subsets' parameter"),
        (DivideConquerOrdinal(variance="robust"), "'variance' parameter"),
        (DivideConquerOrdinal(backend="ray"), "'backend' parameter"),
        (DivideConquerOrdinal(refine_rounds=-1), "'refine_rounds' parameter"),
        (OrdinalRegression(alpha=-1.0), "'alpha' parameter of OrdinalRegression"),
        (OrdinalRegression(variance="cluster"), "'variance' parameter of OrdinalRegression"),
    ]
    for est, msg in cases:
        with pytest.raises(ValueError, match=msg):
            est.fit(X, y)


def test_warns_when_subsets_are_too_small_for_the_rounds():
    X, y, _, _ = make_ordinal(4000, 10, 4, random_state=0)  # d = 13: 40 rows/param = 520 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DivideConquerOrdinal(n_subsets=4, refine_rounds=0, backend="serial").fit(X, y)
        DivideConquerOrdinal(n_subsets=50, refine_rounds=1, backend="serial").fit(X, y)
        DivideConquerOrdinal(n_subsets=60, refine_rounds=2, backend="serial").fit(X, y)
    with pytest.warns(UserWarning, match="one-shot pooling.*Use refine_rounds=1"):
        DivideConquerOrdinal(n_subsets=10, refine_rounds=0, backend="serial").fit(X, y)
    with pytest.warns(UserWarning, match="one refinement round does not remove.*refine_rounds=2"):
        DivideConquerOrdinal(n_subsets=60, refine_rounds=1, backend="serial").fit(X, y)


@pytest.mark.parametrize("kind", ["polars", "pyarrow", "parquet", "csv"])
def test_frames_and_files_through_the_estimator(tmp_path, kind):
    import polars as pl
    import pyarrow as pa

    X, y, _, _ = make_ordinal(1500, 3, 4, random_state=8)
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(stars=y + 1)
    ref = OrdinalRegression().fit(df[["a", "b", "c"]], df["stars"])
    if kind == "polars":
        data = pl.from_pandas(df)
    elif kind == "pyarrow":
        data = pa.Table.from_pandas(df, preserve_index=False)
    else:
        path = tmp_path / f"d.{kind}"
        df.to_parquet(path) if kind == "parquet" else df.to_csv(path, index=False)
        data = str(path)
    est = OrdinalRegression().fit(data, "stars")
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-10)
    assert list(est.classes_) == [1, 2, 3, 4]
    assert list(est.feature_names_in_) == ["a", "b", "c"]
    features = df[["a", "b", "c"]]
    np.testing.assert_allclose(est.predict_proba(features), ref.predict_proba(features))


@pytest.mark.parametrize("shift", [1e3, 1e6])
def test_features_with_large_means_fit_exactly(shift):
    X, y, _, _ = make_ordinal(4000, 3, 4, random_state=0)
    Xs = X.copy()
    Xs[:, 0] += shift
    for make in (OrdinalRegression, lambda: DivideConquerOrdinal(n_subsets=2, backend="serial")):
        a, b = make().fit(X, y), make().fit(Xs, y)
        np.testing.assert_allclose(b.coef_, a.coef_, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b.bse_[:3], a.bse_[:3], rtol=1e-5)
        np.testing.assert_allclose(b.thresholds_ - shift * b.coef_[0], a.thresholds_,
                                   rtol=1e-6, atol=1e-6 * shift)


def test_running_out_of_iterations_warns_instead_of_claiming_separation():
    from sklearn.exceptions import ConvergenceWarning

    X, y, _, _ = make_ordinal(3000, 3, 4, random_state=0)
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=1"):
        OrdinalRegression(max_iter=1).fit(X, y)
    with pytest.warns(ConvergenceWarning, match=r"subset\(s\) \[1, 2\] of 2 did not converge"):
        DivideConquerOrdinal(max_iter=1, n_subsets=2, backend="serial").fit(X, y)


def test_zero_weights_remove_rows_everywhere():
    X, y, _, _ = make_ordinal(2000, 2, 3, random_state=0)
    X = np.c_[X, np.where(np.arange(2000) < 10, 1.0, 0.0)]  # varies only in the first 10 rows
    w = np.where(np.arange(2000) < 10, 0.0, 1.0)
    for est in (OrdinalRegression(), DivideConquerOrdinal(n_subsets=2, backend="serial")):
        with pytest.raises(DataError, match="Column 'x2' of X is constant"):
            est.fit(X, y, sample_weight=w)
    a = OrdinalRegression().fit(X[10:, :2], y[10:])
    b = OrdinalRegression().fit(X[:, :2], y, sample_weight=w)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-10)


def test_collinear_features_are_named():
    X, y, _, _ = make_ordinal(2000, 2, 3, random_state=0)
    X = np.c_[X, X[:, 0] - 2 * X[:, 1]]
    for est in (OrdinalRegression(), DivideConquerOrdinal(n_subsets=2, backend="serial")):
        with pytest.raises(DataError, match=r"do not identify 'x0', 'x1', 'x2'.*collinear"):
            est.fit(X, y)


def test_collinearity_is_told_from_separation():
    # Along a dependence of the columns Newton's step is rounding noise of any size, which must
    # not read as separation: the columns are judged first (here up to a constant, weighted).
    X, y, _, _ = make_ordinal(2000, 2, 3, random_state=0)
    Xc = np.c_[X, 3.0 + X[:, 0] - 2 * X[:, 1]]
    w = np.r_[np.ones(1000), np.full(1000, 2.0)]
    with pytest.raises(DataError, match=r"do not identify 'x0', 'x1', 'x2'.*collinear"):
        OrdinalRegression().fit(Xc, y, sample_weight=w)
    # columns of full rank and classes separated by x0: separation, as before
    Xs = np.random.default_rng(1).standard_normal((600, 3))
    with pytest.raises(SeparationError, match=r"separated.*set alpha > 0"):
        OrdinalRegression().fit(Xs, np.digitize(Xs[:, 0], [-0.5, 0.5]))


def test_shared_memory_too_small_is_a_clear_error(monkeypatch, tmp_path):
    from fedgrain.backends import processes
    from fedgrain.exceptions import ResourceError

    monkeypatch.setattr(processes, "_free_bytes", lambda path: 1 << 20)  # 1 MB everywhere
    X, y, _, _ = make_ordinal(200_000, 5, 3, random_state=0)
    with pytest.raises(ResourceError, match=r"need 11 MB of temporary space.*use backend='serial'"):
        DivideConquerOrdinal(n_subsets=2, backend="processes").fit(X, y)


def test_save_accepts_numpy_and_scalar_parameters(tmp_path):
    X, y, _, _ = make_ordinal(600, 2, 3, random_state=0)
    df = pd.DataFrame(X, columns=["a", "b"]).assign(city=np.where(np.arange(600) % 3, "x", "y"))
    est = DivideConquerOrdinal(n_subsets=np.int64(2), alpha=np.float64(0.01),
                               tol=np.float64(1e-8), random_state=np.int64(3),
                               categorical="city", backend="serial").fit(df, y)
    again = load(est.save(tmp_path / "m"))
    assert again.get_params()["categorical"] == "city"
    assert again.get_params()["n_subsets"] == 2 and again.get_params()["random_state"] == 3
    from sklearn.base import clone

    refit = clone(again).fit(df, y)  # the restored parameters fit again
    np.testing.assert_allclose(refit.coef_, est.coef_)
