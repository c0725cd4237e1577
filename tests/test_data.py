"""Tests for fedgrain.data: input conversion, ordinal levels, encoding, validation, files."""

from __future__ import annotations

import json
import re
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from sklearn.exceptions import DataConversionWarning

from fedgrain.data import (
    ComplexDataError,
    FeatureSchema,
    FitData,
    TargetEncoding,
    prepare_fit,
    prepare_predict,
    read_table,
    split_target,
)
from fedgrain.exceptions import DataError, DataTypeError


@pytest.fixture
def X() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 3))


@pytest.fixture
def y() -> np.ndarray:
    return np.array([1, 2, 3, 1, 2, 3, 1, 2])


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [30.0, 41.0, 25.0, 50.0, 33.0, 29.0],
            "city": pd.Categorical(list("bacabb"), categories=["z", "b", "a", "c"]),
            "flag": [True, False, True, True, False, False],
            "count": pd.array([1, 2, 3, 4, 5, 6], dtype="Int64"),
            "rating": [1, 2, 3, 1, 2, 3],
        }
    )


# ----------------------------------------------------------------------------- numpy input


def test_float64_c_contiguous_array_is_not_copied(X, y):
    fit = prepare_fit(X, y)
    assert isinstance(fit, FitData)
    assert fit.X is X
    assert prepare_predict(X, fit.schema) is X
    assert fit.codes.dtype == np.intp
    assert fit.codes.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert fit.weights is None
    assert fit.schema.input_columns == ("x0", "x1", "x2")
    assert fit.schema.output_names == ("x0", "x1", "x2")
    assert not fit.schema.has_names
    assert fit.schema.n_features_in == fit.schema.n_features == 3


def test_memmap_input_is_viewed_not_copied(tmp_path, X, y):
    path = tmp_path / "x.dat"
    mapped = np.memmap(path, dtype=np.float64, mode="w+", shape=X.shape)
    mapped[:] = X
    mapped.flush()
    read_only = np.memmap(path, dtype=np.float64, mode="r", shape=X.shape)
    fit = prepare_fit(read_only, y)
    assert type(fit.X) is np.ndarray
    assert np.shares_memory(fit.X, read_only)


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.float32),
        lambda a: (a * 10).astype(np.int64),
        lambda a: a > 0,
        np.asfortranarray,
        lambda a: a.tolist(),
        lambda a: a.astype(object),
    ],
    ids=["float32", "int64", "bool", "fortran", "list", "object"],
)
def test_other_numeric_inputs_become_float64_c_contiguous(convert, X, y):
    given_X = convert(X)
    fit = prepare_fit(given_X, y)
    assert fit.X.dtype == np.float64 and fit.X.flags.c_contiguous
    np.testing.assert_array_equal(fit.X, np.asarray(given_X, dtype=np.float64))


def test_list_rows_mixing_numbers_and_strings_keep_numbers():
    fit = prepare_fit([[1, "a"], [2, "b"], [3, "a"]], [1, 2, 2], categorical=[1])
    np.testing.assert_array_equal(fit.X, [[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    assert fit.schema.output_names == ("x0", "x1[b]")


@pytest.mark.parametrize("categorical", [[2], ["x2"], 2, "x2", np.array([2])])
def test_numpy_categorical_by_position_or_name(categorical):
    X = np.column_stack([np.arange(6.0), np.arange(6.0) ** 2, [3, 1, 2, 1, 3, 3]])
    fit = prepare_fit(X, [1, 2] * 3, categorical=categorical)
    assert fit.schema.categorical == {"x2": (1.0, 2.0, 3.0)}
    assert fit.schema.output_names == ("x0", "x1", "x2[2.0]", "x2[3.0]")
    np.testing.assert_array_equal(fit.X[:, 2:], [[0, 1], [0, 0], [1, 0], [0, 0], [0, 1], [0, 1]])
    np.testing.assert_array_equal(fit.schema.transform(X[:2], estimator_name="m"), fit.X[:2])


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.arange(8.0), DataError, r"X must be 2-D .*Reshape your data: X\.reshape\(-1, 1\)"),
        (np.ones((8, 2, 2)), DataError, "X must be 2-D"),
        (pd.Series(np.arange(8.0)), DataError, "X must be 2-D"),
        (pl.Series(np.arange(8.0)), DataError, "X must be 2-D"),
        (pa.array(np.arange(8.0)), DataError, "X must be 2-D"),
        (sparse.csr_matrix(np.eye(8)), DataTypeError, r"sparse.*\.toarray\(\)"),
        (np.ones((8, 2)) + 1j, DataTypeError, "complex"),
        (np.ones((8, 2), dtype="datetime64[ns]"), DataTypeError, "dtype datetime64"),
        ([[1.0, 2.0]] * 7 + [[1.0]], DataError, "could not be turned into an array"),
        (pl.LazyFrame({"a": [1.0]}), DataTypeError, r"collect\(\)"),
    ],
    ids=[
        "1d",
        "3d",
        "series",
        "polars-series",
        "arrow-array",
        "sparse",
        "complex",
        "datetime",
        "ragged",
        "lazyframe",
    ],
)
def test_bad_feature_inputs(bad, error, match, y):
    with pytest.raises(error, match=match):
        prepare_fit(bad, y)


def test_complex_data_is_also_a_value_error_for_scikit_learn(y):
    with pytest.raises(ValueError, match="Complex data not supported") as info:
        prepare_fit(np.ones((8, 1)) + 1j, y + 1j)
    assert isinstance(info.value, ComplexDataError)
    with pytest.raises(ComplexDataError, match="column 'c'"):
        prepare_fit(pd.DataFrame({"c": np.ones(8) + 1j, "d": np.arange(8.0)}), y)
    with pytest.raises(ComplexDataError, match="y holds complex"):
        prepare_fit(np.arange(8.0)[:, None], y + 1j)


def test_object_array_with_non_number_is_a_type_error(X, y):
    bad = X.astype(object)
    bad[0, 0] = {"foo": "bar"}
    with pytest.raises(DataTypeError, match="argument must be .* string.* number"):
        prepare_fit(bad, y)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((0, 3), r"0 sample\(s\) \(shape=\(0, 3\)\) while a minimum of 1 is required"),
        ((8, 0), r"0 feature\(s\) \(shape=\(8, 0\)\) while a minimum of \d* is required."),
    ],
)
def test_empty_data(shape, match, y):
    with pytest.raises(DataError, match=match):
        prepare_fit(np.empty(shape), y[: shape[0]])


def test_lengths_must_match(X):
    with pytest.raises(DataError, match="X has 8 rows but y has 5 labels"):
        prepare_fit(X, [1, 2, 1, 2, 1])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.nan, r"Column 'x1' of X has NaN \(missing\) values in 2 rows \(rows 2, 5,"),
        (np.inf, r"Column 'x1' of X has infinite values \(inf\) in 2 rows \(rows 2, 5,"),
        (-np.inf, r"Column 'x1' of X has infinite values \(inf\)"),
    ],
)
def test_non_finite_features(value, match, X, y):
    X[[2, 5], 1] = value
    with pytest.raises(DataError, match=match):
        prepare_fit(X, y)
    schema = prepare_fit(np.random.default_rng(1).standard_normal((8, 3)), y).schema
    with pytest.raises(DataError, match=match):
        schema.transform(X, estimator_name="m")


def test_huge_finite_values_are_not_mistaken_for_inf(y):
    X = np.column_stack([np.full(8, 1e308), np.arange(8.0)])
    X[0, 0] = 1e307
    # not called infinite: called too large to square, with the fix
    with pytest.raises(DataError, match=r"Column 'x0' of X holds values as large as 1e\+308.*"
                                        r"rescale it"):
        prepare_fit(X, y)
    X[:, 0] /= 1e200
    assert prepare_fit(X, y).X is X


def test_constant_column_is_refused_with_intercept_hint(X, y):
    with pytest.raises(DataError, match=r"Column 'x3' of X is constant \('x3' is 1.0 .*intercept"):
        prepare_fit(np.column_stack([X, np.ones(8)]), y)
    with pytest.raises(DataError, match=r"Columns 'x0', 'x1' of X are constant"):
        prepare_fit(np.zeros((8, 2)), y)


def test_column_constant_only_after_the_first_rows_is_fine():
    X = np.column_stack([np.r_[np.zeros(2000), 1.0], np.arange(2001.0)])
    assert prepare_fit(X, np.arange(2001) % 3).X is X


# ------------------------------------------------------------------- pandas / polars / arrow


def test_pandas_frame_with_category_bool_and_nullable_columns(frame):
    fit = prepare_fit(frame, "rating")
    schema = fit.schema
    assert schema.has_names
    assert schema.input_columns == ("age", "city", "flag", "count")
    assert schema.categorical == {"city": ("b", "a", "c")}  # category order, unused 'z' dropped
    assert schema.output_names == ("age", "city[a]", "city[c]", "flag", "count")
    expected = np.column_stack(
        [frame["age"], frame["city"] == "a", frame["city"] == "c", frame["flag"], np.arange(1, 7)]
    )
    np.testing.assert_array_equal(fit.X, expected)
    assert fit.X.flags.c_contiguous
    assert fit.target.classes == (1, 2, 3)
    np.testing.assert_array_equal(
        schema.transform(frame.drop(columns="rating"), estimator_name="m"), fit.X
    )


def test_declared_categorical_columns_use_sorted_occurring_levels():
    frame = pd.DataFrame({"size": ["m", "s", "l", "s"], "w": [1.0, 2.0, 3.0, 5.0]})
    fit = prepare_fit(frame, [0, 1, 0, 1], categorical=["size"])
    assert fit.schema.categorical == {"size": ("l", "m", "s")}
    assert fit.schema.output_names == ("size[m]", "size[s]", "w")


def test_frame_with_integer_column_labels_has_no_names():
    frame = pd.DataFrame(np.arange(12.0).reshape(6, 2) ** 2)
    fit = prepare_fit(frame, [1, 2] * 3)
    assert not fit.schema.has_names
    assert fit.schema.input_columns == ("x0", "x1")


def test_pandas_frame_is_copied_at_most_once():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((100_000, 10))
    frame = pd.DataFrame(data, columns=[f"c{i}" for i in range(10)])
    y = rng.integers(0, 3, 100_000)
    tracemalloc.start()
    try:
        fit = prepare_fit(frame, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(fit.X, data)
    assert peak < 1.5 * data.nbytes


@pytest.mark.parametrize("kind", ["polars", "arrow", "batch"])
def test_polars_and_arrow_frames_match_pandas(kind, frame):
    if kind == "polars":
        # polars' Categorical has no declared order (only Enum does): its categories are sorted
        frame = frame.assign(city=frame.city.cat.reorder_categories(["a", "b", "c", "z"]))
    expected = prepare_fit(frame, "rating")
    other = {
        "polars": lambda: pl.from_pandas(frame),
        "arrow": lambda: pa.Table.from_pandas(frame),
        "batch": lambda: pa.RecordBatch.from_pandas(frame),
    }[kind]()
    fit = prepare_fit(other, "rating")
    np.testing.assert_array_equal(fit.X, expected.X)
    assert fit.schema == expected.schema
    np.testing.assert_array_equal(
        prepare_predict(
            other.drop("rating") if kind == "polars" else other.drop_columns("rating"), fit.schema
        ),
        expected.X,
    )


def test_polars_categorical_and_enum_features():
    frame = pl.DataFrame(
        {
            "c": pl.Series(["x", "y", "x", "y"], dtype=pl.Categorical),
            "e": pl.Series(["hi", "lo", "lo", "hi"], dtype=pl.Enum(["lo", "hi"])),
            "v": [1.0, 2.0, 4.0, 3.0],
        }
    )
    fit = prepare_fit(frame, [1, 2, 1, 2])
    assert fit.schema.categorical == {"c": ("x", "y"), "e": ("lo", "hi")}
    assert fit.schema.output_names == ("c[y]", "e[hi]", "v")
    # the reference level of a Categorical does not depend on the order of the rows
    flipped = prepare_fit(frame.reverse(), [2, 1, 2, 1])
    assert flipped.schema.categorical == fit.schema.categorical


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"s": ["u", "v"] * 3},
            DataError,
            r"Column 's' \(str\) of X is not numeric; declare it categorical with "
            r"categorical=\['s'\]",
        ),
        (
            {"s": ["u", "v"] * 3, "t": ["a", "b"] * 3},
            DataError,
            r"Columns 's' \(str\), 't' \(str\) of X are not numeric",
        ),
        ({"d": pd.date_range("2020-01-01", periods=6)}, DataError, r"'d' \(datetime64"),
        (
            {"count": pd.array([1, None] * 3, dtype="Int64")},
            DataError,
            r"Column 'count' of X has NaN .*rows 1, 3, 5",
        ),
        (
            {"city": pd.Categorical(["a", None] * 3)},
            DataError,
            r"Categorical column 'city' of X has missing values in 3 rows",
        ),
        (
            {"city": pd.Categorical(["a"] * 6, categories=["a", "b"])},
            DataError,
            r"Categorical column 'city' of X is constant \(only 'a' occurs\)",
        ),
    ],
    ids=["string", "two-strings", "datetime", "nullable-na", "category-na", "one-category"],
)
def test_bad_frame_columns(change, error, match, frame):
    with pytest.raises(error, match=match):
        prepare_fit(frame.assign(**change), "rating")


def test_mixed_type_declared_categorical(frame):
    with pytest.raises(DataError, match="mixes value types \\(int, str\\)"):
        prepare_fit(
            frame.assign(s=pd.Series([1, "a"] * 3, dtype=object)), "rating", categorical=["s"]
        )


def test_object_column_mixing_numbers_and_text_is_not_numeric(frame):
    with pytest.raises(
        DataError,
        match=r"Column 's' of X holds values that are not numbers .*"
        r"categorical=\['s'\]",
    ):
        prepare_fit(frame.assign(s=pd.Series([1, "a"] * 3, dtype=object)), "rating")


def test_categories_must_be_numbers_booleans_or_strings(frame):
    dates = pd.Categorical(pd.date_range("2020-01-01", periods=2).repeat(3))
    with pytest.raises(DataTypeError, match="categories must be numbers, booleans or strings"):
        prepare_fit(frame.assign(d=dates), "rating")


def test_integer_labels_too_large_for_int64():
    with pytest.raises(DataError, match="too large for 64 bits"):
        prepare_fit(np.arange(8.0).reshape(4, 2) ** 2, np.array([10**30, 1] * 2, dtype=object))


def test_categorical_argument_errors(frame):
    with pytest.raises(DataError, match=r"categorical names 'Age'.*did you mean 'age'\?"):
        prepare_fit(frame, "rating", categorical=["Age"])
    with pytest.raises(DataError, match="categorical has position 9, but X has 4 columns"):
        prepare_fit(frame, "rating", categorical=[9])
    with pytest.raises(DataTypeError, match="column names or integer positions; got True"):
        prepare_fit(frame, "rating", categorical=[True])
    with pytest.raises(DataTypeError, match="list of column names or positions"):
        prepare_fit(frame, "rating", categorical=1.5)


def test_duplicate_column_names(frame):
    bad = pd.concat([frame[["age"]], frame[["age"]]], axis=1)
    with pytest.raises(DataError, match="column names of X must be unique.*'age'"):
        prepare_fit(bad, frame["rating"])


# ----------------------------------------------------------------------------- the target


@pytest.mark.parametrize(
    ("labels", "classes", "dtype_kind"),
    [
        ([3, 1, 2, 3], (1, 2, 3), "i"),
        (np.array([3, 1, 2, 3], dtype=np.uint8), (1, 2, 3), "i"),
        (np.array([10**12, 1, 10**12, 5]), (1, 5, 10**12), "i"),
        ([2.0, 1.0, 2.0, 4.0], (1.0, 2.0, 4.0), "f"),
        ([0.5, 1.5, 0.5, 1.5], (0.5, 1.5), "f"),
        ([True, False, True, True], (False, True), "b"),
        (np.array([2, 1, 2, 1], dtype=object), (1, 2), "i"),
        (pd.Series([2, 1, 2, 1], dtype="Int64"), (1, 2), "i"),
        (pl.Series([2, 1, 2, 1]), (1, 2), "i"),
        (pa.chunked_array([[2, 1], [2, 1]]), (1, 2), "i"),
    ],
    ids=[
        "list",
        "uint8",
        "wide-range",
        "integral-float",
        "few-floats",
        "bool",
        "object",
        "Int64",
        "polars",
        "arrow",
    ],
)
def test_natural_order_targets(labels, classes, dtype_kind):
    fit = prepare_fit(np.arange(8.0).reshape(4, 2) ** 2, labels)
    assert fit.target.classes == classes
    assert all(type(c) is type(classes[0]) for c in fit.target.classes)
    assert fit.target.classes_array().dtype.kind == dtype_kind
    np.testing.assert_array_equal(fit.target.classes_array()[fit.codes], np.asarray(labels))


@pytest.mark.parametrize(
    "labels",
    [
        pd.Categorical(["lo", "hi", "lo", "hi"], categories=["lo", "mid", "hi"], ordered=True),
        pl.Series(["lo", "hi", "lo", "hi"], dtype=pl.Enum(["lo", "mid", "hi"])),
        pa.DictionaryArray.from_arrays([0, 2, 0, 2], ["lo", "mid", "hi"], ordered=True),
    ],
    ids=["pandas", "polars-enum", "arrow-dictionary"],
)
def test_ordered_categorical_target_keeps_category_order(labels):
    fit = prepare_fit(np.arange(8.0).reshape(4, 2) ** 2, labels)
    assert fit.target.classes == ("lo", "hi")  # unused 'mid' dropped
    assert fit.codes.tolist() == [0, 1, 0, 1]
    assert fit.target.classes_array().dtype.kind == "U"


def test_explicit_levels_win():
    X = np.arange(8.0).reshape(4, 2) ** 2
    assert prepare_fit(X, ["b", "a", "b", "c"], levels=["c", "b", "a"]).codes.tolist() == [
        1,
        2,
        1,
        0,
    ]
    assert prepare_fit(X, [1, 2, 1, 2], levels=[2, 1]).codes.tolist() == [1, 0, 1, 0]
    ordered = pd.Categorical(["x", "y", "x", "y"], categories=["x", "y"], ordered=True)
    assert prepare_fit(X, ordered, levels=("y", "x")).codes.tolist() == [1, 0, 1, 0]
    strings = pd.Series(["b", "a", "b", "a"], dtype="str")
    assert prepare_fit(X, strings, levels=np.array(["a", "b"])).codes.tolist() == [1, 0, 1, 0]


def test_target_given_as_a_column_name(frame):
    fit = prepare_fit(
        frame.assign(rating=["lo", "hi", "mid"] * 2), "rating", levels=["lo", "mid", "hi"]
    )
    assert "rating" not in fit.schema.input_columns
    assert fit.codes.tolist() == [0, 2, 1, 0, 2, 1]


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (None, {}, DataError, r"^MyModel requires y to be passed, but the target y is None"),
        (
            [0.1, 0.2, 0.3, 0.4],
            {},
            DataError,
            r"^Unknown label type: 'continuous'\. y looks continuous .* ordinal target needs "
            r"discrete levels",
        ),
        (
            ["a", "b", "a", "c"],
            {},
            DataError,
            r"labels of y \('a', 'b', 'c'\) have no known order; pass levels=\[\.\.\.\]",
        ),
        (pd.Categorical(["a", "b", "a", "b"]), {}, DataError, "unordered categorical"),
        (
            [1, "a", 1, "a"],
            {},
            DataError,
            r"mixes labels of different types \(int, str\).*cannot "
            r"be ordered",
        ),
        (
            [1, None, 2, np.nan],
            {},
            DataError,
            r"y has missing values \(None/NaN\) in 2 rows \(rows 1, 3, counting from 0\)",
        ),
        (pd.Series([1, pd.NA, 2, 1], dtype="Int64"), {}, DataError, r"missing values.*row 1,"),
        (pd.Series(["a", None, "b", "a"]), {}, DataError, "missing values"),
        ([1.0, np.inf, 2.0, 1.0], {}, DataError, r"y has infinite values in 1 row \(row 1,"),
        ([2, 2, 2, 2], {}, DataError, r"y has only one class \(2\)"),
        (
            np.array(["2020-01-01"] * 4, dtype="datetime64[ns]"),
            {},
            DataError,
            "Unknown label type: datetime64",
        ),
        (
            [1, 2, 1, 2],
            {"levels": [1, 2, 3]},
            DataError,
            r"level\(s\) 3 in levels never occur in y.*drop them from levels",
        ),
        (
            [1, 2, 5, 7],
            {"levels": [1, 2, 3]},
            DataError,
            r"labels that are not among the levels: 5, 7 in 2 rows .* known levels, lowest first, "
            r"are 1, 2, 3\.",
        ),
        (list(range(9)), {"levels": [0, 1]}, DataError, r"levels: 2, 3, 4, 5, 6, \.\.\. in 7 rows"),
        (
            [1, 2, 1, 2],
            {"levels": ["1", "2"]},
            DataError,
            "levels are strings but the labels are numbers",
        ),
        (
            ["1", "2", "1", "2"],
            {"levels": [1, 2]},
            DataError,
            "levels are numbers but the labels are strings",
        ),
        ([1, 2, 1, 2], {"levels": [1, 2, 1]}, DataError, r"levels must be unique; repeated: 1\."),
        ([1, 2, 1, 2], {"levels": [1]}, DataError, "at least 2 levels"),
        ([1, 2, 1, 2], {"levels": "12"}, DataTypeError, "levels must be a list of levels"),
        ([1, 2, 1, 2], {"levels": [1, "a"]}, DataError, "mix strings and numbers"),
        ([1, 2, 1, 2], {"levels": [1, np.nan]}, DataError, "must not contain NaN"),
        ([1, 2, 1, 2], {"levels": [1, {}]}, DataTypeError, "numbers, booleans or strings"),
        (np.ones((4, 2)), {}, DataError, r"y must be a 1-D array .* shape \(4, 2\)"),
        (
            pd.DataFrame({"a": [1, 2, 1, 2], "b": [1, 2, 1, 2]}),
            {},
            DataError,
            "frame with 2 columns",
        ),
        (sparse.csr_matrix(np.ones((4, 1))), {}, DataTypeError, "y is a sparse matrix"),
    ],
    ids=[
        "none",
        "continuous",
        "strings",
        "unordered-categorical",
        "mixed",
        "missing",
        "pd-NA",
        "missing-string",
        "inf",
        "one-class",
        "datetime",
        "unused-level",
        "unknown-labels",
        "many-unknown",
        "str-levels",
        "str-labels",
        "duplicate-levels",
        "one-level",
        "levels-string",
        "levels-mixed",
        "levels-nan",
        "levels-dict",
        "2d",
        "2d-frame",
        "sparse",
    ],
)
def test_bad_targets(labels, kwargs, error, match):
    n = labels.shape[0] if hasattr(labels, "shape") else 4 if labels is None else len(labels)
    X = np.column_stack([np.arange(n), np.arange(n) ** 2]).astype(float)
    with pytest.raises(error, match=match):
        prepare_fit(X, labels, estimator_name="MyModel", **kwargs)


def test_target_name_needs_a_table(X):
    with pytest.raises(DataError, match="y is the string 'rating', which names a target column"):
        prepare_fit(X, "rating")


def test_column_vector_target_warns_and_is_raveled(X, y):
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed when a 1d array"):
        fit = prepare_fit(X, y[:, None])
    assert fit.codes.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    with pytest.warns(DataConversionWarning):
        prepare_fit(X, pd.DataFrame({"y": y}))


# ----------------------------------------------------------------------------- sample weights


def test_zero_weight_rows_are_absent_rows(X, y):
    weights = np.array([1, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    fit = prepare_fit(X, y, sample_weight=weights)
    keep = weights > 0
    np.testing.assert_array_equal(fit.X, np.asarray(X, dtype=float)[keep])
    assert fit.weights.tolist() == [1.0] * 6
    # a class that only zero-weight rows have is not a class of the data
    assert 3 not in fit.target.classes
    with pytest.raises(DataError, match=r"level\(s\) 3 in levels never occur in y with positive"):
        prepare_fit(X, y, sample_weight=weights, levels=sorted(set(np.asarray(y).tolist())))


def test_sample_weight_is_a_float64_copy(X, y):
    weights = np.arange(1, 9)
    fit = prepare_fit(X, y, sample_weight=weights)
    assert fit.weights.dtype == np.float64
    assert not np.shares_memory(fit.weights, weights)
    float_weights = np.ones(8)
    assert not np.shares_memory(
        prepare_fit(X, y, sample_weight=float_weights).weights, float_weights
    )
    assert prepare_fit(X, y, sample_weight=pd.Series(weights)).weights.tolist() == list(range(1, 9))


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        (np.ones(5), DataError, "sample_weight has 5 values but X has 8 rows"),
        (np.ones((8, 1)), DataError, r"sample_weight must be 1-D .* shape \(8, 1\)"),
        (2.0, DataError, "sample_weight must be 1-D"),
        (np.r_[-1.0, np.ones(7)], DataError, r"negative values in 1 row \(row 0,"),
        (np.r_[np.ones(7), np.nan], DataError, r"NaN or infinite values in 1 row \(row 7,"),
        (np.zeros(8), DataError, "zero in every row"),
        (["a"] * 8, DataError, "sample_weight must hold numbers"),
        (np.ones(8) + 1j, DataTypeError, "complex"),
        (
            np.array([1, 0, 0, 1, 0, 0, 1, 0]),
            DataError,
            r"only one class with positive sample_weight \(1\)",
        ),
    ],
    ids=[
        "length",
        "2d",
        "scalar",
        "negative",
        "nan",
        "zeros",
        "strings",
        "complex",
        "one-weighted-class",
    ],
)
def test_bad_sample_weight(weights, error, match, X, y):
    with pytest.raises(error, match=match):
        prepare_fit(X, y, sample_weight=weights)


# ----------------------------------------------------------------------------- TargetEncoding


def test_encode_and_its_errors():
    target = TargetEncoding(["low", "mid", "high"])
    assert target.classes == ("low", "mid", "high")
    assert target.n_classes == 3
    codes = target.encode(pd.Series(["mid", "high", "low"]))
    assert codes.dtype == np.intp and codes.tolist() == [1, 2, 0]
    assert target.encode(pd.Categorical(["high", "low"])).tolist() == [2, 0]
    with pytest.raises(DataError, match=r"y_true has labels that are not among the levels: 'top'"):
        target.encode(["low", "top"], what="y_true")
    with pytest.raises(DataError, match="y has missing values"):
        target.encode(["low", None])
    assert TargetEncoding((1, 2)).encode(np.array([2.0, 1.0])).tolist() == [1, 0]
    assert TargetEncoding((False, True)).encode(np.array([True, False])).tolist() == [1, 0]


@pytest.mark.parametrize(
    "classes", [(1, 2, 3), (0.5, 1.5), (False, True), ("lo", "mid", "hi"), (1, 2.5)]
)
def test_target_encoding_json_round_trip_keeps_types(classes):
    target = TargetEncoding(classes)
    back = TargetEncoding.from_dict(json.loads(json.dumps(target.to_dict())))
    assert back == target
    assert [type(c) for c in back.classes] == [type(c) for c in classes]
    np.testing.assert_array_equal(back.classes_array(), target.classes_array())


def test_target_encoding_from_bad_dict():
    with pytest.raises(DataError, match="Not a saved TargetEncoding"):
        TargetEncoding.from_dict({"levels": [1, 2]})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=-(10**6), max_value=10**6), min_size=2, max_size=60).filter(
        lambda values: len(set(values)) >= 2
    )
)
def test_integer_targets_encode_to_codes_that_reproduce_y(values):
    labels = np.array(values)
    fit = prepare_fit(
        np.column_stack([np.arange(labels.size), np.arange(labels.size) ** 2]), labels
    )
    target = fit.target
    assert target.classes == tuple(sorted(set(values)))
    codes = target.encode(labels)
    np.testing.assert_array_equal(codes, fit.codes)
    assert codes.min() >= 0 and codes.max() <= target.n_classes - 1
    np.testing.assert_array_equal(target.classes_array()[codes], labels)


# ----------------------------------------------------------------------------- FeatureSchema


def test_feature_schema_json_round_trip(frame):
    fit = prepare_fit(frame.assign(size=["s", "m", "l"] * 2), "rating", categorical=["size"])
    back = FeatureSchema.from_dict(json.loads(json.dumps(fit.schema.to_dict())))
    assert back == fit.schema
    new = frame.drop(columns="rating").assign(size=["l", "m", "s"] * 2)
    np.testing.assert_array_equal(
        back.transform(new, estimator_name="m"), fit.schema.transform(new, estimator_name="m")
    )
    with pytest.raises(DataError, match="Not a saved FeatureSchema"):
        FeatureSchema.from_dict({"input_columns": ["a"]})


@pytest.fixture
def named():
    names = [f"col_{i}" for i in range(5)]
    data = np.random.default_rng(3).standard_normal((10, 5))
    return pd.DataFrame(data, columns=names), prepare_fit(
        pd.DataFrame(data, columns=names), np.arange(10) % 3
    ).schema


def test_wrong_number_of_features(X, y):
    schema = prepare_fit(X, y).schema
    message = "X has 2 features, but MyModel is expecting 3 features as input."
    with pytest.raises(DataError, match=re.escape(message)):
        schema.transform(X[:, :2], estimator_name="MyModel")


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (
            lambda f: f[f.columns[::-1]],
            "Feature names must be in the same order as they were in fit.\n",
        ),
        (
            lambda f: f.set_axis([f"other_{i}" for i in range(5)], axis=1),
            "Feature names unseen at fit time:\n- other_0\n- other_1\n- other_2\n- other_3\n"
            "- other_4\nFeature names seen at fit time, yet now missing:\n- col_0\n",
        ),
        (
            lambda f: f[f.columns[:3]],
            "Feature names seen at fit time, yet now missing:\n- col_3\n- col_4\n",
        ),
    ],
    ids=["order", "unseen", "missing"],
)
def test_feature_names_must_match(change, detail, named):
    frame, schema = named
    message = "The feature names should match those that were passed during fit.\n" + detail
    with pytest.raises(DataError, match=re.escape(message)):
        schema.transform(change(frame), estimator_name="m")


def test_predict_without_names_after_fit_with_names_warns(named):
    frame, schema = named
    with pytest.warns(
        UserWarning,
        match="X does not have valid feature names, but MyModel was fitted with feature names",
    ):
        out = schema.transform(frame.to_numpy(), estimator_name="MyModel")
    np.testing.assert_array_equal(out, frame.to_numpy())


def test_predict_with_names_after_fit_without_names_warns(X, y):
    schema = prepare_fit(X, y).schema
    with pytest.warns(
        UserWarning, match="X has feature names, but MyModel was fitted without feature names"
    ):
        out = schema.transform(pd.DataFrame(X, columns=["a", "b", "c"]), estimator_name="MyModel")
    np.testing.assert_array_equal(out, X)


def test_matching_names_do_not_warn(named):
    frame, schema = named
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema.transform(frame, estimator_name="m")
        schema.transform(pl.from_pandas(frame), estimator_name="m")


def test_unseen_category_at_predict(frame):
    schema = prepare_fit(frame, "rating").schema
    new = frame.drop(columns="rating").assign(city=["q", "a", "c", "w", "b", "b"])
    with pytest.raises(
        DataError,
        match=r"Column 'city' of X has categories not seen at fit: "
        r"'q', 'w' in 2 rows \(rows 0, 3,.*known categories are 'b', 'a', 'c'",
    ):
        schema.transform(new, estimator_name="m")


def test_type_and_missing_checks_at_predict(frame):
    schema = prepare_fit(frame, "rating").schema
    features = frame.drop(columns="rating")
    with pytest.raises(DataError, match=r"Column 'age' \(str\) of X is not numeric"):
        schema.transform(features.assign(age=["a"] * 6), estimator_name="m")
    with pytest.raises(DataError, match="Categorical column 'city' of X has missing values"):
        schema.transform(features.assign(city=["a", None] * 3), estimator_name="m")
    with pytest.raises(DataError, match="0 sample"):
        schema.transform(features.iloc[:0], estimator_name="m")


# ----------------------------------------------------------------------------- files


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {"age": [30.0, 41.0, 25.0, 50.0], "city": ["b", "a", "c", "a"], "rating": [1, 2, 3, 1]}
    )


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.txt", "d.csv.gz", "d.parquet", "d.pq"])
def test_read_table_formats(name, table, tmp_path):
    path = tmp_path / name
    if name.endswith((".parquet", ".pq")):
        table.to_parquet(path)
    else:
        table.to_csv(path, index=False, sep="," if ".csv" in name else "\t")
    back = read_table(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert read_table(str(path), columns=["rating", "age"]).columns.tolist() == ["rating", "age"]
    fit = prepare_fit(path, "rating", categorical=["city"])
    assert fit.schema.output_names == ("age", "city[b]", "city[c]")
    np.testing.assert_array_equal(prepare_predict(table.drop(columns="rating"), fit.schema), fit.X)


def test_parquet_keeps_categoricals(table, tmp_path):
    path = tmp_path / "cat.parquet"
    table.astype({"city": "category"}).to_parquet(path)
    assert isinstance(read_table(path)["city"].dtype, pd.CategoricalDtype)
    assert prepare_fit(path, "rating").schema.categorical == {"city": ("a", "b", "c")}


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.csv", b"", r"The file '.*empty\.csv' is empty\."),
        ("empty.parquet", b"", r"The file '.*empty\.parquet' is empty\."),
        ("header.csv", b"a,b\n", r"The file '.*header\.csv' is empty: it has column names but no"),
        (
            "garbage.parquet",
            b"not a parquet file" * 4,
            r"Could not read '.*garbage\.parquet' as Parquet: Parquet magic bytes not found",
        ),
        ("ragged.csv", b"a,b\n1,2\n3\n", r"Could not read '.*ragged\.csv' as CSV: CSV parse error"),
        ("data.json", b"{}", r"extension is not a supported one \(\.csv, \.tsv"),
        ("data.parquet.gz", b"x", "extension is not a supported one"),
    ],
    ids=[
        "empty-csv",
        "empty-parquet",
        "header-only",
        "garbage-parquet",
        "ragged-csv",
        "json",
        "gzipped-parquet",
    ],
)
def test_unreadable_files(name, content, match, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_table(path)


def test_zero_row_parquet_is_empty(tmp_path):
    path = tmp_path / "zero.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), path)
    with pytest.raises(DataError, match="is empty: it has column names but no data rows"):
        read_table(path)


def test_missing_file_and_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = re.escape(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=f"The file '{absolute}' does not exist"):
        read_table("nope.csv")
    with pytest.raises(DataError, match="does not exist"):
        prepare_fit("nope.parquet", "y")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(DataError, match="The folder '.*folder.csv' holds no data files"):
        read_table("folder.csv")
    with pytest.raises(DataTypeError, match="path must be a str or a path"):
        read_table(3)


def test_read_table_missing_columns(table, tmp_path):
    table.to_csv(tmp_path / "d.csv", index=False)
    table.to_parquet(tmp_path / "d.parquet")
    for name in ["d.csv", "d.parquet"]:
        with pytest.raises(
            DataError,
            match=r"has no column\(s\) 'ratng'; did you mean 'rating'\? "
            r"The available columns are 'age', 'city', 'rating'\.",
        ):
            read_table(tmp_path / name, columns=["age", "ratng"])
    with pytest.raises(DataTypeError, match="columns must be a list of column names"):
        read_table(tmp_path / "d.csv", columns=[1])


def test_split_target(table):
    features, target = split_target(table, "rating")
    assert features.columns.tolist() == ["age", "city"]
    assert target.tolist() == [1, 2, 3, 1]
    features, target = split_target(pl.from_pandas(table), "city")
    assert target.tolist() == ["b", "a", "c", "a"]
    with pytest.raises(
        DataError, match="target column 'Rating' is not in the data; did you mean 'rating'"
    ):
        split_target(table, "Rating")
    with pytest.raises(DataError, match="appears 2 times"):
        split_target(pd.concat([table, table[["rating"]]], axis=1), "rating")
    with pytest.raises(DataTypeError, match="split_target needs"):
        split_target(np.ones((2, 2)), "a")
    with pytest.raises(DataTypeError, match="must be a column name"):
        split_target(table, 0)


def test_wrong_target_name_for_a_file(table, tmp_path):
    table.to_parquet(tmp_path / "d.parquet")
    with pytest.raises(
        DataError, match="target column 'ratings' is not in the data; did you mean 'rating'"
    ):
        prepare_fit(tmp_path / "d.parquet", "ratings")


def test_identifier_like_columns_are_named_in_a_warning():
    import warnings

    from fedgrain import OrdinalRegression

    rng = np.random.default_rng(0)
    n = 400
    X = pd.DataFrame({"a": rng.standard_normal(n), "id": rng.permutation(n) + 1000,
                      "count": rng.poisson(3, n)})
    y = rng.integers(0, 3, n)
    with pytest.warns(UserWarning, match=r"Column 'id' of X holds a different value in every "
                                         r"row, like a row identifier"):
        OrdinalRegression().fit(X, y)
    with warnings.catch_warnings():  # repeated counts, continuous values, few rows: no word
        warnings.simplefilter("error")
        OrdinalRegression().fit(X[["a", "count"]], y)
        OrdinalRegression().fit(X.head(40), y[:40])


def test_rounded_measurements_and_masked_labels_get_no_false_warning():
    import warnings

    from fedgrain import OrdinalRegression

    rng = np.random.default_rng(1)
    n = 300
    income = np.round(rng.lognormal(10.5, 0.6, n))  # whole numbers that never repeat
    X = pd.DataFrame({"income": income, "a": rng.normal(size=n)})
    y = pd.Series(pd.Categorical(rng.integers(0, 3, n).astype(str), categories=["0", "1", "2"],
                                 ordered=True))
    y[:20] = np.nan  # unlabelled rows, masked out by weight zero
    w = np.r_[np.zeros(20), np.ones(n - 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OrdinalRegression().fit(X, y, sample_weight=w)


@pytest.mark.parametrize("url", ["https://example.org/data.csv", "ftp://host/data.parquet"])
def test_an_address_pyarrow_cannot_open_is_not_looked_for_as_a_local_file(url):
    """s3:// and the other addresses pyarrow opens are read (tests/test_datasets.py, on a local
    S3 server); others are a clear error saying what to pass instead."""
    from fedgrain import DivideConquerOrdinal, OrdinalRegression

    for model in (OrdinalRegression(), DivideConquerOrdinal(backend="serial")):
        with pytest.raises(DataError, match=r"Cannot open '.*'.*pass filesystem="):
            model.fit(url, "stars")


def _checks_one_by_one(out, names):
    """The checks as they were made before they shared the moments' pass: the reference."""
    from fedgrain.data.features import _check_finite, check_constant, check_magnitude

    _check_finite(out, names)
    check_constant(out, names)
    check_magnitude(out, names)


@pytest.mark.parametrize("case", ["clean", "nan", "inf", "huge", "huge_and_constant", "constant",
                                  "tiny_spread", "tiny_values", "large_mean", "weighted"])
def test_checked_moments_raise_what_the_column_checks_raise_and_give_the_moments(case):
    from fedgrain.core.standardize import column_moments
    from fedgrain.data.features import checked_moments

    rng = np.random.default_rng(3)
    out = rng.standard_normal((5000, 4))
    w = None
    if case == "nan":
        out[4000, 2] = np.nan
    elif case == "inf":
        out[17, 1] = -np.inf
    elif case == "huge":
        out[:, 3] *= 1e300
    elif case == "huge_and_constant":
        out[:, 3] *= 1e300
        out[:, 1] = 7.0
    elif case == "constant":
        out[:, 2] = 3.0
    elif case == "tiny_spread":
        out[:, 0] = 1e-200 * rng.integers(1, 3, size=5000)
    elif case == "tiny_values":  # small, but spread enough: accepted
        out[:, 0] *= 1e-140
    elif case == "large_mean":
        out[:, 1] = 1e9 + out[:, 1]
    elif case == "weighted":
        w = rng.uniform(0.5, 2.0, size=5000)
    names = ("a", "b", "c", "d")
    try:
        _checks_one_by_one(out, names)
        expected = None
    except DataError as exc:
        expected = str(exc)
    if expected is None:
        mean, sd = checked_moments(out, w, names)
        ref_mean, ref_sd = column_moments(out, w)
        np.testing.assert_array_equal(mean, ref_mean)
        np.testing.assert_array_equal(sd, ref_sd)
        assert case in ("clean", "tiny_values", "large_mean", "weighted")
    else:
        with pytest.raises(DataError) as got:
            checked_moments(out, w, names)
        assert str(got.value) == expected
        assert case not in ("clean", "tiny_values", "large_mean", "weighted")


def test_a_fit_reuses_the_moments_taken_with_the_checks():
    from fedgrain.core.standardize import column_moments
    from fedgrain.data import prepare_fit

    rng = np.random.default_rng(4)
    X = rng.standard_normal((3000, 3)) + [0.0, 1e6, -2.0]
    y = rng.integers(0, 3, size=3000)
    w = rng.uniform(0.1, 1.0, size=3000)
    data = prepare_fit(X, y, sample_weight=w)
    ref = column_moments(data.X, data.weights)
    for got, want in zip(data.moments, ref, strict=True):
        np.testing.assert_array_equal(got, want)
    assert data.column_moments() is data.moments
