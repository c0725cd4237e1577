"""Bad input through the estimators' public API: a clear error naming what is wrong and the fix.

(The data layer's own tests check the messages in detail; these make sure every case reaches the
user through fit/predict/load of both estimators, and that nothing is left behind.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedgrain import DivideConquerOrdinal, OrdinalRegression, load
from fedgrain.datasets import make_ordinal
from fedgrain.exceptions import DataError, DataTypeError, ModelFileError, SeparationError

ESTIMATORS = [
    pytest.param(lambda: OrdinalRegression(), id="mle"),
    pytest.param(lambda: DivideConquerOrdinal(n_subsets=2, backend="serial"), id="dc"),
]


@pytest.fixture
def data():
    X, y, _, _ = make_ordinal(600, 3, 3, random_state=0)
    return pd.DataFrame(X, columns=["a", "b", "c"]), y


def _with(df, col, row, value):
    df = df.copy()
    df.loc[row, col] = value
    return df


def _mixed(y):
    labels = y.astype(object)
    labels[y == 0] = "none"  # ints and a string: no order between them
    return labels


CASES = [
    ("nan", lambda X, y: (_with(X, "b", 4, np.nan), y), DataError, r"Column 'b' of X has NaN"),
    ("inf", lambda X, y: (_with(X, "c", 9, np.inf), y), DataError, r"inf"),
    ("text", lambda X, y: (X.assign(town=np.where(np.arange(len(X)) % 2, "p", "q")), y),
     DataError, r"'town'.*not numeric; declare it categorical"),
    ("one class", lambda X, y: (X, np.zeros_like(y)), DataError, r"only one class"),
    ("unorderable", lambda X, y: (X, np.array(["x", "y", "z"])[y]), DataError,
     r"no known order; pass levels"),
    ("mixed labels", lambda X, y: (X, _mixed(y)), DataError, r"cannot be ordered|mix"),
    ("lengths", lambda X, y: (X, y[:-3]), DataError, r"600.*597|597.*600"),
    ("empty", lambda X, y: (X.iloc[:0], y[:0]), DataError, r"0 sample|empty|no rows"),
    ("sparse", lambda X, y: (__import__("scipy.sparse").sparse.csr_matrix(X.to_numpy()), y),
     DataTypeError, r"sparse"),
    ("missing target", lambda X, y: (X.assign(y=y), "rating"), DataError,
     r"target column 'rating' is not in the data"),
    ("missing file", lambda X, y: ("/nonexistent/data.parquet", "y"), DataError,
     r"does not exist"),
    ("constant", lambda X, y: (X.assign(one=1.0), y), DataError,
     r"Column 'one' of X is constant.*remove constant columns"),
]


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize(("name", "change", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_fit_rejects_bad_input_clearly(data, make, name, change, error, message):
    X, y = change(*data)
    with pytest.raises(error, match=message):
        make().fit(X, y)


def test_unknown_labels_with_explicit_levels(data):
    X, y = data
    with pytest.raises(DataError, match=r"not among the levels.*'lo', 'hi'"):
        OrdinalRegression(levels=["lo", "hi"]).fit(X, np.array(["lo", "hi", "mid"])[y])


@pytest.mark.parametrize("make", ESTIMATORS)
def test_predict_with_wrong_columns(data, make):
    X, y = data
    est = make().fit(X, y)
    with pytest.raises(DataError, match="The feature names should match"):
        est.predict(X.rename(columns={"c": "cc"}))
    with pytest.warns(UserWarning, match="X does not have valid feature names") as record, \
            pytest.raises(DataError, match="X has 2 features, but .* is expecting 3 features"):
        est.predict(X.to_numpy()[:, :2])
    assert record[0].filename == __file__  # the warning points at the caller's line


def test_unreadable_file(tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"Could not read .* as Parquet"):
        OrdinalRegression().fit(str(bad), "y")


def test_separated_data_get_a_clear_error_or_a_finite_penalised_fit():
    X = np.r_[np.linspace(-3, -1, 60), np.linspace(1, 3, 60)][:, None]
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    with pytest.raises(SeparationError, match=r"separated.*set alpha > 0"):
        OrdinalRegression().fit(X, y)
    with pytest.raises(SeparationError, match=r"separated in subset 1 of 1 .*\(x0 grow without "
                                              r"bound\).*OrdinalRegression\(alpha=\.\.\.\)"):
        DivideConquerOrdinal(n_subsets=1, alpha=0.0, backend="serial").fit(X, y)
    assert np.isfinite(OrdinalRegression(alpha=0.01).fit(X, y).coef_).all()
    # the L1 penalty keeps the lasso finite, but the de-biased estimate (a Newton step on the
    # unpenalised likelihood) and its standard errors would be meaningless: refused the same way
    with pytest.raises(SeparationError, match=r"separated in subset 1 of 2 .*x0 grow without"):
        DivideConquerOrdinal(backend="serial").fit(X, y)


def test_failed_save_leaves_nothing_and_failed_load_is_clear(tmp_path, data):
    X, y = data
    est = OrdinalRegression().fit(X, y)
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises((FileExistsError, ModelFileError)):
        est.save(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    with pytest.raises(ModelFileError, match="does not exist|no model|not exist"):
        load(tmp_path / "nothing-here")


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize("columns, message", [
    ([0, "b", "c"], r"mix types \(int, str"),
    (pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1)]), "a MultiIndex"),
])
def test_column_names_that_cannot_be_matched_are_refused(data, make, columns, message):
    X, y = data
    X = X.copy()
    X.columns = columns
    with pytest.raises(DataError, match=message):
        make().fit(X, y)


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize("scale, message", [(1e300, "holds values as large as"),
                                            (1e154, "holds values as large as"),
                                            (1e-200, "varies by only")])
def test_columns_beyond_double_precision_are_refused(data, make, scale, message, tmp_path):
    X, y = data
    X = X.copy()
    X["b"] *= scale
    with pytest.raises(DataError, match=f"Column 'b' of X {message}"):
        make().fit(X, y)
    X.assign(g=y).to_parquet(tmp_path / "d.parquet")  # the streamed path says the same
    with pytest.raises(DataError, match=f"Column 'b' of X {message}"):
        DivideConquerOrdinal(n_subsets=2, backend="serial").fit(tmp_path / "d.parquet", "g")


def test_exact_fit_is_the_same_on_any_scale_within_double_precision(data):
    """A column around 1e120 next to others around 1 is neither 'collinear' nor NaN: the
    covariance is inverted on the features' standard scale."""
    X, y = data
    ref = OrdinalRegression().fit(X, y)
    for e in (120, -120):
        Xs = X.assign(b=X["b"] * 10.0**e)
        m = OrdinalRegression().fit(Xs, y)
        assert m.coef_[1] * 10.0**e == pytest.approx(ref.coef_[1], rel=1e-9)
        assert m.bse_[1] * 10.0**e == pytest.approx(ref.bse_[1], rel=1e-9)


def test_a_level_only_in_rows_of_weight_zero_is_named_and_scored_as_unknown(data):
    X, y = data
    w = np.where(y == 2, 0.0, 1.0)
    with pytest.warns(UserWarning, match=r"Level\(s\) 2 of y occur only in rows of "
                                         r"sample_weight zero"):
        m = OrdinalRegression().fit(X, y, sample_weight=w)
    assert list(m.classes_) == [0, 1]
    with pytest.warns(UserWarning, match=r"label\(s\) \[2\] that the model was not fitted on"):
        m.score(X, y)
