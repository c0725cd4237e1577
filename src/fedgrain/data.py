"""Data layer: turn user input into validated float64 matrices and hold the predict-time schema.

Accepted feature inputs are numpy arrays (and lists of lists), pandas, polars and pyarrow frames,
and paths to CSV or Parquet files. The ordinal target is resolved into integer codes ``0..K-1``
(:class:`TargetEncoding`), categorical features are one-hot encoded with the first level as the
reference (:class:`FeatureSchema`), and every user mistake is reported as a one-sentence
:class:`~fedgrain.exceptions.DataError` (or :class:`~fedgrain.exceptions.DataTypeError`) that says
what is wrong, where, and how to fix it. Row numbers in messages count from 0.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
from scipy import sparse
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import type_of_target

from fedgrain.exceptions import DataError, DataTypeError

__all__ = [
    "ComplexDataError",
    "FeatureSchema",
    "FitData",
    "TargetEncoding",
    "prepare_fit",
    "prepare_predict",
    "read_table",
    "split_target",
]

Scalar = bool | int | float | str

_SHOW = 5  # values or row numbers quoted in a message
_MAX_FLOAT_LEVELS = 20  # a non-integral float target with at most this many values is ordinal
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": None}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_SUPPORTED = ".csv, .tsv, .txt (each also gzipped, e.g. .csv.gz), .parquet, .pq"
_TEXT_KINDS = frozenset(
    {"string", "bytes", "categorical", "datetime", "datetime64", "date", "time", "timedelta",
     "timedelta64", "period", "interval", "unknown-array"}
)  # fmt: skip
_NUMERIC_LABEL_KINDS = {
    "integer": np.int64,
    "floating": np.float64,
    "mixed-integer-float": np.float64,
    "decimal": np.float64,
    "boolean": np.bool_,
}


class ComplexDataError(DataTypeError, DataError):
    """Complex numbers were passed where real numbers are needed.

    It is a :class:`~fedgrain.exceptions.DataTypeError` and also a ``ValueError``, because
    scikit-learn's estimator checks expect ``ValueError("Complex data not supported ...")``.
    """


# ----------------------------------------------------------------------------- message helpers


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _quote(values: Any, limit: int = _SHOW) -> str:
    """Comma-separated reprs of the first ``limit`` values, with ``...`` when there are more."""
    values = list(values)
    shown = ", ".join(repr(_plain(v)) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _rows(mask: np.ndarray) -> str:
    """``'3 rows (rows 0, 4, 9, ...)'`` for a boolean mask over rows."""
    where = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in where[:_SHOW]) + (", ..." if where.size > _SHOW else "")
    plural = "s" if where.size != 1 else ""
    return f"{where.size} row{plural} (row{plural} {shown}, counting from 0)"


def _close(name: str, names: tuple[str, ...] | list[str]) -> str:
    """A ``did you mean`` clause followed by the available names."""
    lowered = {str(n).lower(): str(n) for n in names}
    matches = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3)]
    available = f"available columns are {_quote(names, 20)}."
    return f"did you mean {_quote(matches)}? The {available}" if matches else f"the {available}"


def _complex_error(where: str) -> ComplexDataError:
    return ComplexDataError(
        f"Complex data not supported: {where} holds complex numbers; pass real numbers "
        "(for example np.real(X) or np.abs(X))."
    )


# ----------------------------------------------------------------------------- target


def _as_levels(levels: Any, what: str = "levels") -> tuple[Scalar, ...]:
    """Validate a sequence of ordinal levels and return it as a tuple of plain Python scalars."""
    if isinstance(levels, (str, bytes)) or not np.iterable(levels):
        raise DataTypeError(
            f"{what} must be a list of levels, lowest first, such as ['low', 'mid', 'high']; "
            f"got {levels!r}."
        )
    out = []
    for value in np.asarray(levels, dtype=object).ravel().tolist():
        value = _plain(value)
        if not isinstance(value, (bool, int, float, str)):
            raise DataTypeError(
                f"{what} must hold numbers, booleans or strings; {value!r} is a "
                f"{type(value).__name__}."
            )
        if isinstance(value, float) and not np.isfinite(value):
            raise DataError(f"{what} must not contain NaN or infinite values; got {levels!r}.")
        out.append(value)
    if len(out) < 2:
        raise DataError(f"{what} must list at least 2 levels, lowest first; got {out!r}.")
    duplicated = [v for v, count in Counter(out).items() if count > 1]
    if duplicated:
        raise DataError(f"{what} must be unique; repeated: {_quote(duplicated)}.")
    if len({isinstance(v, str) for v in out}) > 1:
        raise DataError(
            f"{what} mix strings and numbers ({_quote(out)}); give them all as one type."
        )
    return tuple(out)


def _target_array(y: Any, what: str = "y") -> np.ndarray | pd.Series:
    """1-D values of a target: a pandas Series when categorical, else a numpy array."""
    module = type(y).__module__.split(".")[0]
    if module == "polars":
        y = y.to_pandas()
    elif isinstance(y, (pa.Array, pa.ChunkedArray)):
        y = y.to_pandas()
    elif isinstance(y, pd.Categorical):
        y = pd.Series(y)
    elif sparse.issparse(y):
        raise DataTypeError(f"{what} is a sparse matrix; pass a dense 1-D array (y.toarray()).")
    if isinstance(y, pd.DataFrame):
        if y.shape[1] != 1:
            raise DataError(
                f"{what} must be 1-D (one ordinal target), but it is a frame with "
                f"{y.shape[1]} columns; pass the target column only."
            )
        _warn_column_vector()
        y = y.iloc[:, 0]
    if isinstance(y, pd.Series):
        if isinstance(y.dtype, pd.CategoricalDtype):
            return y
        if isinstance(y.dtype, np.dtype):
            return y.to_numpy()
        dtype = object if y.hasnans else getattr(y.dtype, "numpy_dtype", object)
        return y.to_numpy(dtype=dtype, na_value=np.nan)
    values = _asarray(y, what)
    if values.ndim == 2 and values.shape[1] == 1:
        _warn_column_vector()
        values = values.ravel()
    if values.ndim != 1:
        raise DataError(
            f"{what} must be a 1-D array of ordinal labels, but it has shape {values.shape}; "
            "pass one target column."
        )
    if values.dtype.kind == "c":
        raise _complex_error(what)
    return values


def _warn_column_vector() -> None:
    warnings.warn(
        "A column-vector y was passed when a 1d array was expected; fedgrain uses y.ravel().",
        DataConversionWarning,
        stacklevel=4,
    )


def _asarray(obj: Any, what: str) -> np.ndarray:
    """``np.asarray`` that keeps Python types for lists of mixed labels and explains failures."""
    try:
        values = np.asarray(obj)
        if values.dtype.kind in "US" and not isinstance(obj, np.ndarray):
            values = np.asarray(obj, dtype=object)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{what} could not be turned into an array ({exc}); pass a numpy array, a list of "
            "equal-length rows, or a frame."
        ) from None
    return values


def _check_missing(values: np.ndarray | pd.Series, what: str) -> None:
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuUS":
        return
    missing = np.asarray(pd.isna(values))
    if missing.any():
        raise DataError(
            f"{what} has missing values (None/NaN) in {_rows(missing)}; drop those rows or fill "
            "in their labels."
        )
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        infinite = np.isinf(values)
        if infinite.any():
            raise DataError(
                f"{what} has infinite values in {_rows(infinite)}; an ordinal target needs "
                "finite labels."
            )


def _label_values(values: np.ndarray, what: str) -> np.ndarray:
    """Object labels as a typed array (int, float, bool or str), or a clear error."""
    if values.dtype != object:
        if values.dtype.kind not in "biufUS":
            raise DataError(
                f"Unknown label type: {values.dtype}. {what} must hold integers, booleans, "
                "ordered categories, or labels listed in levels=[...]."
            )
        return values
    kind = pd.api.types.infer_dtype(values, skipna=False)
    if kind in _NUMERIC_LABEL_KINDS:
        try:
            return values.astype(_NUMERIC_LABEL_KINDS[kind])
        except OverflowError:
            raise DataError(
                f"{what} has integer labels too large for 64 bits; use smaller codes."
            ) from None
    if kind == "string":
        return values.astype(str)
    if kind == "complex":
        raise _complex_error(what)
    types = sorted({type(v).__name__ for v in values[:1000].tolist()})
    raise DataError(
        f"{what} mixes labels of different types ({', '.join(types)}), which cannot be ordered; "
        "convert them to one type, or pass levels=[...] in the intended order."
    )


def _int_codes(values: np.ndarray) -> tuple[tuple[Scalar, ...], np.ndarray]:
    """Sorted distinct integers and codes, by counting when the range is small."""
    low, high = int(values.min()), int(values.max())
    if high - low > 4 * values.size + 1024 or high > np.iinfo(np.intp).max:
        uniques, codes = np.unique(values, return_inverse=True)
        return tuple(uniques.tolist()), codes.astype(np.intp, copy=False)
    shifted = values.astype(np.intp)
    shifted -= low
    present = np.bincount(shifted, minlength=high - low + 1) > 0
    remap = np.cumsum(present, dtype=np.intp) - 1
    return tuple((np.flatnonzero(present) + low).tolist()), remap[shifted]


def _natural_codes(values: np.ndarray, what: str) -> tuple[tuple[Scalar, ...], np.ndarray]:
    """Classes in natural order and codes for a target that carries no explicit order."""
    kind = values.dtype.kind
    if kind in "US":
        found = np.unique(values)
        raise DataError(
            f"The labels of {what} ({_quote(found, 10)}) have no known order; pass "
            "levels=[...] listing them lowest first, or use an ordered categorical."
        )
    if kind in "iu":
        return _int_codes(values)
    if kind == "b":
        classes = tuple(bool(v) for v in np.unique(values))
        return classes, values.astype(np.intp) - int(classes[0])
    if type_of_target(values) == "continuous":
        uniques = np.unique(values)
        if uniques.size > _MAX_FLOAT_LEVELS or 2 * uniques.size > values.size:
            raise DataError(
                f"Unknown label type: 'continuous'. {what} looks continuous ({uniques.size} "
                f"distinct values such as {_quote(np.round(uniques, 6))}); an ordinal target "
                "needs discrete levels, so round or bin it, or pass levels=[...]."
            )
    uniques, codes = np.unique(values, return_inverse=True)
    return tuple(uniques.tolist()), codes.astype(np.intp, copy=False)


def _categorical_codes(series: pd.Series, what: str) -> tuple[tuple[Scalar, ...], np.ndarray]:
    """Occurring categories of an ordered categorical target, in category order, and codes."""
    if not series.cat.ordered:
        raise DataError(
            f"The labels of {what} are an unordered categorical "
            f"({_quote(series.cat.categories, 10)}), so they have no known order; pass "
            "levels=[...] lowest first, or make it ordered (series.cat.as_ordered())."
        )
    raw = series.cat.codes.to_numpy().astype(np.intp)
    present = np.bincount(raw, minlength=len(series.cat.categories)) > 0
    remap = np.cumsum(present, dtype=np.intp) - 1
    classes = _as_categories(series.cat.categories[present].tolist(), what)
    return classes, remap[raw]


def _as_categories(values: list, where: str) -> tuple[Scalar, ...]:
    out = []
    for value in values:
        value = _plain(value)
        if not isinstance(value, (bool, int, float, str)):
            raise DataTypeError(
                f"{where} has a category {value!r} of type {type(value).__name__}; categories "
                "must be numbers, booleans or strings, so convert them (e.g. astype(str))."
            )
        out.append(value)
    return tuple(out)


@dataclass(frozen=True)
class TargetEncoding:
    """The ordered levels of an ordinal target and the map from labels to codes ``0..K-1``.

    Parameters
    ----------
    classes : tuple
        Levels as plain Python scalars (int, float, bool or str), lowest first.

    Examples
    --------
    >>> enc = TargetEncoding(("low", "mid", "high"))
    >>> enc.encode(["mid", "high", "low"]).tolist()
    [1, 2, 0]
    """

    classes: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", _as_levels(self.classes, "classes"))

    @property
    def n_classes(self) -> int:
        """Number of levels ``K``."""
        return len(self.classes)

    def classes_array(self) -> np.ndarray:
        """The levels as a numpy array (numeric dtype for numbers, str dtype for strings)."""
        return np.asarray(self.classes)

    def encode(self, y: Any, *, what: str = "y") -> np.ndarray:
        """Map labels to integer codes ``0..K-1`` (dtype ``np.intp``).

        Parameters
        ----------
        y : array-like
            Labels, 1-D.
        what : str, default="y"
            How the labels are named in error messages.

        Returns
        -------
        numpy.ndarray
            The codes.

        Raises
        ------
        DataError
            When a label is missing or not one of the levels.
        """
        values = _target_array(y, what)
        _check_missing(values, what)
        if isinstance(values, pd.Series):
            values = values.to_numpy(dtype=object)
        values = _label_values(values, what)
        codes = pd.Index(self.classes_array()).get_indexer(values)
        unknown = codes < 0
        if unknown.any():
            labels = pd.unique(values[unknown])
            hint = ""
            if isinstance(self.classes[0], str) and values.dtype.kind in "biuf":
                hint = " The levels are strings but the labels are numbers; give both one type."
            elif not isinstance(self.classes[0], str) and values.dtype.kind in "US":
                hint = " The levels are numbers but the labels are strings; give both one type."
            raise DataError(
                f"{what} has labels that are not among the levels: {_quote(labels)} in "
                f"{_rows(unknown)}; the known levels, lowest first, are "
                f"{_quote(self.classes, 20)}.{hint}"
            )
        return codes.astype(np.intp, copy=False)

    def to_dict(self) -> dict:
        """JSON-safe form; :meth:`from_dict` restores it with the same Python types."""
        return {"classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict) -> TargetEncoding:
        """Rebuild from :meth:`to_dict` output."""
        try:
            return cls(tuple(d["classes"]))
        except (KeyError, TypeError):
            raise DataError(
                f"Not a saved TargetEncoding: expected a dict with a 'classes' list, got {d!r}."
            ) from None


def _resolve_target(
    values: np.ndarray | pd.Series, levels: Any, weights: np.ndarray | None
) -> tuple[TargetEncoding, np.ndarray]:
    """Levels and codes of a fit-time target; checks the class counts."""
    _check_missing(values, "y")
    if levels is not None:
        target = TargetEncoding(_as_levels(levels))
        codes = target.encode(values)
    else:
        if isinstance(values, pd.Series):
            classes, codes = _categorical_codes(values, "y")
        else:
            classes, codes = _natural_codes(_label_values(values, "y"), "y")
        if len(classes) < 2:
            raise DataError(
                f"y has only one class ({_quote(classes)}); an ordinal model needs at least "
                "2 classes."
            )
        target = TargetEncoding(classes)
    counts = np.bincount(codes, weights=weights, minlength=target.n_classes)
    if np.count_nonzero(counts) < 2:
        raise DataError(
            "y has only one class with positive sample_weight "
            f"({_quote(np.asarray(target.classes, dtype=object)[counts > 0])}); an ordinal model "
            "needs at least 2 classes."
        )
    absent = [c for c, n in zip(target.classes, counts, strict=True) if n == 0]
    if absent:
        source = "levels" if levels is not None else "the classes of y"
        raise DataError(
            f"The level(s) {_quote(absent)} in {source} never occur in y"
            f"{' with positive sample_weight' if weights is not None else ''}, so their "
            "thresholds cannot be estimated; drop them from levels or add such rows."
        )
    return target, codes


# ----------------------------------------------------------------------------- features


def _is_polars(obj: Any, name: str) -> bool:
    kind = type(obj)
    return kind.__module__.split(".")[0] == "polars" and kind.__name__ == name


def _as_frame(X: Any) -> pd.DataFrame | None:
    """X as a pandas DataFrame when it is a pandas, polars or pyarrow frame, else None."""
    if isinstance(X, pd.DataFrame):
        return X
    if _is_polars(X, "LazyFrame"):
        raise DataTypeError("X is a polars LazyFrame; call .collect() on it first.")
    if _is_polars(X, "DataFrame"):
        X = X.to_arrow()
    elif isinstance(X, pa.RecordBatch):
        X = pa.Table.from_batches([X])
    if isinstance(X, pa.Table):
        return X.to_pandas(split_blocks=True)
    return None


def _coerce_X(X: Any) -> np.ndarray | pd.DataFrame:
    """A numeric 2-D ndarray (the fast path) or a pandas DataFrame holding the features."""
    if isinstance(X, (str, os.PathLike)):
        return read_table(X)
    frame = _as_frame(X)
    if frame is not None:
        return frame
    if sparse.issparse(X):
        raise DataTypeError(
            "X is a scipy sparse matrix, which fedgrain does not support; pass a dense array "
            "(X.toarray()) or a frame."
        )
    if isinstance(X, (pd.Series, pa.Array, pa.ChunkedArray)) or _is_polars(X, "Series"):
        raise DataError(
            "X must be 2-D (rows x features), but it is a 1-D series. Reshape your data: pass "
            "a one-column frame (frame[['col']]) or values.reshape(-1, 1) for a single feature."
        )
    array = _asarray(X, "X")
    if array.ndim != 2:
        raise DataError(
            f"X must be 2-D (rows x features), but it has shape {array.shape}. Reshape your "
            "data: X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for a single row."
        )
    kind = array.dtype.kind
    if kind == "c":
        raise _complex_error("X")
    if kind in "biuf":
        return array
    if kind in "OUS":
        return pd.DataFrame(array, copy=False)
    raise DataTypeError(f"X has dtype {array.dtype}, which fedgrain cannot use; pass numbers.")


def _column_names(table: np.ndarray | pd.DataFrame) -> tuple[tuple[str, ...], bool]:
    """Input column names and whether they are real names (all strings, from a frame)."""
    if isinstance(table, pd.DataFrame):
        labels = list(table.columns)
        if labels and all(isinstance(c, str) for c in labels):
            duplicated = [c for c, count in Counter(labels).items() if count > 1]
            if duplicated:
                raise DataError(
                    f"The column names of X must be unique, but {_quote(duplicated)} appear "
                    "more than once; rename or drop the duplicates."
                )
            return tuple(str(c) for c in labels), True
    return tuple(f"x{i}" for i in range(table.shape[1])), False


def _check_shape(table: np.ndarray | pd.DataFrame) -> None:
    n, p = table.shape
    if n == 0:
        raise DataError(
            f"X has 0 sample(s) (shape=({n}, {p})) while a minimum of 1 is required; pass at "
            "least one row."
        )
    if p == 0:
        raise DataError(
            f"X has 0 feature(s) (shape=({n}, {p})) while a minimum of 1 is required; pass at "
            "least one feature column."
        )


def _resolve_categorical(categorical: Any, names: tuple[str, ...]) -> set[int]:
    """Positions of the columns declared categorical by name or position."""
    if categorical is None:
        return set()
    items = [categorical] if isinstance(categorical, (str, int, np.integer)) else categorical
    if not np.iterable(items):
        raise DataTypeError(
            f"categorical must be a list of column names or positions; got {categorical!r}."
        )
    positions = set()
    for item in items:
        item = _plain(item)
        if isinstance(item, str) and item in names:
            positions.add(names.index(item))
        elif isinstance(item, str):
            raise DataError(
                f"categorical names {item!r}, which is not a column of X; {_close(item, names)}"
            )
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < len(names):
                raise DataError(
                    f"categorical has position {item}, but X has {len(names)} columns "
                    f"(positions 0 to {len(names) - 1})."
                )
            positions.add(item)
        else:
            raise DataTypeError(
                f"categorical entries must be column names or integer positions; got {item!r}."
            )
    return positions


def _is_numeric(column: pd.Series, name: str) -> bool:
    """Whether a column converts to float64; raises for complex numbers."""
    dtype = column.dtype
    if pd.api.types.is_complex_dtype(dtype):
        raise _complex_error(f"column {name!r} of X")
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        kind = pd.api.types.infer_dtype(column, skipna=True)
        if kind == "complex":
            raise _complex_error(f"column {name!r} of X")
        return kind not in _TEXT_KINDS
    if isinstance(dtype, np.dtype):
        return dtype.kind in "biuf"
    return pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype)


def _not_numeric_error(columns: list[tuple[str, Any]]) -> DataError:
    names = [name for name, _ in columns]
    listed = ", ".join(f"{name!r} ({dtype})" for name, dtype in columns[:_SHOW])
    if len(columns) == 1:
        subject, them = f"Column {listed} of X is", "it"
    else:
        subject, them = (
            f"Columns {listed}{', ...' if len(columns) > _SHOW else ''} of X are",
            "them",
        )
    return DataError(
        f"{subject} not numeric; declare {them} categorical with categorical={names!r} or "
        f"convert {them} to numbers."
    )


def _numeric_values(column: pd.Series, name: str) -> np.ndarray:
    """A numeric column as a numpy array, without a copy when it already is one."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
        return column.to_numpy()
    try:
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    except TypeError as exc:
        raise DataTypeError(
            f"Column {name!r} of X holds values that are not numbers ({exc}); convert them to "
            "numbers."
        ) from None
    except ValueError as exc:
        raise DataError(
            f"Column {name!r} of X holds values that are not numbers ({exc}); convert them to "
            f"numbers or declare the column categorical with categorical=[{name!r}]."
        ) from None


def _check_no_missing_category(column: pd.Series, name: str) -> None:
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"Categorical column {name!r} of X has missing values in {_rows(missing)}; fill them "
            "(for example with a 'missing' category) or drop those rows."
        )


def _fit_categories(column: pd.Series, name: str) -> tuple[Scalar, ...]:
    """The occurring categories of a column in encoding order; the first is the reference."""
    _check_no_missing_category(column, name)
    where = f"Categorical column {name!r} of X"
    if isinstance(column.dtype, pd.CategoricalDtype):
        categories = column.cat.categories
        present = np.bincount(
            column.cat.codes.to_numpy().astype(np.intp), minlength=len(categories)
        )
        levels = _as_categories(categories[present > 0].tolist(), where)
    else:
        found = _as_categories(list(column.unique()), where)
        try:
            levels = tuple(sorted(found))
        except TypeError:
            types = sorted({type(v).__name__ for v in found})
            raise DataError(
                f"{where} mixes value types ({', '.join(types)}), which cannot be sorted; "
                "convert it to one type (for example astype(str))."
            ) from None
    if len(levels) < 2:
        raise DataError(
            f"{where} is constant (only {levels[0]!r} occurs), so it carries no information; "
            "remove it."
        )
    return levels


def _one_hot(column: pd.Series, name: str, levels: tuple, block: np.ndarray) -> None:
    """Write the indicator columns of every non-reference level into ``block``."""
    _check_no_missing_category(column, name)
    codes = pd.Index(levels).get_indexer(column)
    unseen = codes < 0
    if unseen.any():
        raise DataError(
            f"Column {name!r} of X has categories not seen at fit: "
            f"{_quote(pd.unique(column.to_numpy()[unseen]))} in {_rows(unseen)}; the known "
            f"categories are {_quote(levels, 20)}, so map the new values to one of them or refit."
        )
    block[...] = 0.0
    rows = np.flatnonzero(codes > 0)
    block[rows, codes[rows] - 1] = 1.0


def _check_finite(out: np.ndarray, names: tuple[str, ...]) -> None:
    """Name the first column holding NaN or inf, using column sums to avoid an n x p mask."""
    with np.errstate(over="ignore", invalid="ignore"):
        sums = out.sum(axis=0)
    for j in np.flatnonzero(~np.isfinite(sums)):
        column = out[:, j]
        nan = np.isnan(column)
        if nan.any():
            raise DataError(
                f"Column {names[j]!r} of X has NaN (missing) values in {_rows(nan)}; fill them "
                "(for example frame.fillna(...)) or drop those rows."
            )
        infinite = np.isinf(column)
        if infinite.any():
            raise DataError(
                f"Column {names[j]!r} of X has infinite values (inf) in {_rows(infinite)}; "
                "replace them with finite numbers or drop those rows."
            )


def _check_constant(out: np.ndarray, names: tuple[str, ...]) -> None:
    """Name the constant columns; only columns constant over the first rows are scanned fully."""
    candidates = np.flatnonzero((out[:1024] == out[0]).all(axis=0))
    constant = [j for j in candidates if out[:, j].max() == out[:, j].min()]
    if constant:
        listed = _quote([names[j] for j in constant])
        verb = "is" if len(constant) == 1 else "are"
        value = float(out[0, constant[0]])
        raise DataError(
            f"Column{'s' if len(constant) > 1 else ''} {listed} of X {verb} constant "
            f"({names[constant[0]]!r} is {value!r} in every row); fedgrain's thresholds play the "
            "role of the intercept, so remove constant columns such as a column of ones."
        )


def _fit_schema(
    table: np.ndarray | pd.DataFrame, names: tuple[str, ...], has_names: bool, categorical: Any
) -> FeatureSchema:
    declared = _resolve_categorical(categorical, names)
    if isinstance(table, np.ndarray) and not declared:
        return FeatureSchema(names, has_names, {}, names)
    frame = pd.DataFrame(table, copy=False) if isinstance(table, np.ndarray) else table
    categories = {}
    not_numeric = []
    output: list[str] = []
    for j, name in enumerate(names):
        column = frame.iloc[:, j]
        if j in declared or isinstance(column.dtype, pd.CategoricalDtype):
            categories[name] = _fit_categories(column, name)
            output.extend(f"{name}[{level}]" for level in categories[name][1:])
        elif _is_numeric(column, name):
            output.append(name)
        else:
            not_numeric.append((name, column.dtype))
    if not_numeric:
        raise _not_numeric_error(not_numeric)
    return FeatureSchema(names, has_names, categories, tuple(output))


def _encode(table: np.ndarray | pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    """Validated float64 C-contiguous features; the input itself when it already is one."""
    if isinstance(table, np.ndarray) and not schema.categorical:
        if table.dtype == np.float64 and table.flags.c_contiguous:
            out = table
        else:
            out = np.ascontiguousarray(table, dtype=np.float64)
        _check_finite(out, schema.output_names)
        return out
    frame = pd.DataFrame(table, copy=False) if isinstance(table, np.ndarray) else table
    out = np.empty((frame.shape[0], schema.n_features))
    not_numeric = []
    k = 0
    for j, name in enumerate(schema.input_columns):
        column = frame.iloc[:, j]
        levels = schema.categorical.get(name)
        if levels is not None:
            _one_hot(column, name, levels, out[:, k : k + len(levels) - 1])
            k += len(levels) - 1
            continue
        if _is_numeric(column, name):
            out[:, k] = _numeric_values(column, name)
        else:
            not_numeric.append((name, column.dtype))
        k += 1
    if not_numeric:
        raise _not_numeric_error(not_numeric)
    _check_finite(out, schema.output_names)
    return out


def _bullets(names: list[str]) -> str:
    shown = "".join(f"- {name}\n" for name in names[:_SHOW])
    return shown + ("- ...\n" if len(names) > _SHOW else "")


@dataclass(frozen=True)
class FeatureSchema:
    """The input columns seen at fit and how they are encoded, for use at predict time.

    Parameters
    ----------
    input_columns : tuple of str
        Input column names in order; ``"x0", "x1", ...`` when the input had no string names.
    has_names : bool
        Whether the fitted input was a frame whose column names are all strings.
    categorical : dict
        Column name -> tuple of categories in encoding order; the first is the reference level.
    output_names : tuple of str
        Encoded feature names: numeric columns as they are, each categorical column replaced in
        place by ``"col[level]"`` for every non-reference level.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"age": [30.0, 41.0, 25.0], "city": ["b", "a", "c"]})
    >>> fit = prepare_fit(frame, [1, 2, 1], categorical=["city"])
    >>> fit.schema.output_names
    ('age', 'city[b]', 'city[c]')
    >>> fit.schema.transform(frame.iloc[:1], estimator_name="model").tolist()
    [[30.0, 1.0, 0.0]]
    """

    input_columns: tuple[str, ...]
    has_names: bool
    categorical: dict
    output_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_columns", tuple(self.input_columns))
        object.__setattr__(self, "has_names", bool(self.has_names))
        object.__setattr__(
            self, "categorical", {str(k): tuple(v) for k, v in self.categorical.items()}
        )
        object.__setattr__(self, "output_names", tuple(self.output_names))

    @property
    def n_features_in(self) -> int:
        """Number of input columns."""
        return len(self.input_columns)

    @property
    def n_features(self) -> int:
        """Number of encoded feature columns."""
        return len(self.output_names)

    def transform(self, X: Any, *, estimator_name: str) -> np.ndarray:
        """Validate and encode new data for prediction.

        Parameters
        ----------
        X : array-like, frame, table or path
            New data with the input columns seen at fit.
        estimator_name : str
            How the estimator is named in messages.

        Returns
        -------
        numpy.ndarray
            ``(n, n_features)`` float64, C-contiguous; ``X`` itself when it already is one and
            there are no categorical columns.

        Raises
        ------
        DataError
            On different columns, unseen categories, NaN or infinite values.
        """
        table = _coerce_X(X)
        names, has_names = _column_names(table)
        self._check_names(names, has_names, estimator_name)
        if table.shape[1] != self.n_features_in:
            raise DataError(
                f"X has {table.shape[1]} features, but {estimator_name} is expecting "
                f"{self.n_features_in} features as input. Pass the columns seen at fit: "
                f"{_quote(self.input_columns, 10)}."
            )
        _check_shape(table)
        return _encode(table, self)

    def _check_names(self, names: tuple[str, ...], has_names: bool, estimator_name: str) -> None:
        """scikit-learn's feature-name rules (and messages) for data given at predict time."""
        if self.has_names and has_names:
            if names == self.input_columns:
                return
            unseen = sorted(set(names) - set(self.input_columns))
            missing = sorted(set(self.input_columns) - set(names))
            message = "The feature names should match those that were passed during fit.\n"
            if unseen:
                message += "Feature names unseen at fit time:\n" + _bullets(unseen)
            if missing:
                message += "Feature names seen at fit time, yet now missing:\n" + _bullets(missing)
            if not unseen and not missing:
                message += "Feature names must be in the same order as they were in fit.\n"
            raise DataError(
                message + f"Pass X with the columns {_quote(self.input_columns, 10)}, in order."
            )
        if self.has_names:
            warnings.warn(
                f"X does not have valid feature names, but {estimator_name} was fitted with "
                "feature names",
                UserWarning,
                stacklevel=3,
            )
        elif has_names:
            warnings.warn(
                f"X has feature names, but {estimator_name} was fitted without feature names",
                UserWarning,
                stacklevel=3,
            )

    def to_dict(self) -> dict:
        """JSON-safe form; :meth:`from_dict` restores it."""
        return {
            "input_columns": list(self.input_columns),
            "has_names": self.has_names,
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "output_names": list(self.output_names),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSchema:
        """Rebuild from :meth:`to_dict` output."""
        try:
            return cls(d["input_columns"], d["has_names"], d["categorical"], d["output_names"])
        except (KeyError, TypeError, AttributeError):
            raise DataError(
                "Not a saved FeatureSchema: expected a dict with 'input_columns', 'has_names', "
                f"'categorical' and 'output_names'; got {d!r}."
            ) from None


# ----------------------------------------------------------------------------- fit / predict


@dataclass(frozen=True, eq=False)
class FitData:
    """Validated training data.

    Parameters
    ----------
    X : numpy.ndarray
        ``(n, n_features)`` float64, C-contiguous; the caller's array itself (no copy) when it
        already was one.
    codes : numpy.ndarray
        ``(n,)`` ``np.intp`` class codes ``0..K-1``.
    weights : numpy.ndarray or None
        ``(n,)`` float64 copy of ``sample_weight``, or None when none was given.
    schema : FeatureSchema
        The feature schema for predict time.
    target : TargetEncoding
        The ordinal levels.

    Examples
    --------
    >>> import numpy as np
    >>> fit = prepare_fit(np.array([[0.5], [1.5], [2.5]]), [1, 3, 3])
    >>> fit.codes.tolist(), fit.target.classes
    ([0, 1, 1], (1, 3))
    """

    X: np.ndarray
    codes: np.ndarray
    weights: np.ndarray | None
    schema: FeatureSchema
    target: TargetEncoding


def _check_weights(sample_weight: Any, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    raw = _asarray(sample_weight, "sample_weight")
    if raw.dtype.kind == "c":
        raise _complex_error("sample_weight")
    if raw.ndim != 1:
        raise DataError(
            f"sample_weight must be 1-D with one weight per row, but it has shape {raw.shape}."
        )
    if raw.shape[0] != n:
        raise DataError(
            f"sample_weight has {raw.shape[0]} values but X has {n} rows; pass one weight per row."
        )
    try:
        weights = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"sample_weight must hold numbers, but it has dtype {raw.dtype}; convert it."
        ) from None
    bad = ~np.isfinite(weights)
    if bad.any():
        raise DataError(
            f"sample_weight has NaN or infinite values in {_rows(bad)}; give finite weights."
        )
    negative = weights < 0
    if negative.any():
        raise DataError(
            f"sample_weight has negative values in {_rows(negative)}; weights must be >= 0."
        )
    if not weights.any():
        raise DataError("sample_weight is zero in every row; give some rows a positive weight.")
    return weights


def prepare_fit(
    X: Any,
    y: Any,
    *,
    levels: Any = None,
    categorical: Any = None,
    sample_weight: Any = None,
    estimator_name: str = "estimator",
) -> FitData:
    """Validate and encode training data.

    Parameters
    ----------
    X : array-like, frame, table or path
        Features: a 2-D numpy array (or list of rows), a pandas / polars DataFrame, a pyarrow
        Table or RecordBatch, or the path of a CSV or Parquet file.
    y : array-like or str
        Ordinal labels, one per row; or, when ``X`` is a frame, table or path, the name of the
        target column inside it (which is then removed from the features).
    levels : sequence, optional
        The ordinal levels, lowest first. When omitted, integers, booleans and floats with
        integral (or at most 20, each used twice on average) values take their natural order,
        and ordered categoricals their category order.
    categorical : sequence of str or int, optional
        Columns to one-hot encode, by name or position (``"x<i>"`` names for arrays). Columns
        with a categorical dtype are always encoded.
    sample_weight : array-like, optional
        Non-negative finite weights, one per row.
    estimator_name : str, default="estimator"
        How the estimator is named in messages.

    Returns
    -------
    FitData
        The encoded matrix, codes, weights, schema and target encoding.

    Raises
    ------
    DataError
        For unusable data; the message says what, where and how to fix it.
    DataTypeError
        For unusable types (sparse matrices, complex numbers, ...).
    """
    table = _coerce_X(X)
    if y is None:
        raise DataError(
            f"{estimator_name} requires y to be passed, but the target y is None; pass the "
            "ordinal labels, or the name of the target column when X is a table."
        )
    if isinstance(y, str):
        if not _column_names(table)[1]:
            raise DataError(
                f"y is the string {y!r}, which names a target column only when X is a frame, "
                "table or file with named columns; pass y as an array of labels."
            )
        table, y = split_target(table, y)
    names, has_names = _column_names(table)
    _check_shape(table)
    values = _target_array(y)
    if values.shape[0] != table.shape[0]:
        raise DataError(
            f"X has {table.shape[0]} rows but y has {values.shape[0]} labels; pass one label "
            "per row."
        )
    weights = _check_weights(sample_weight, table.shape[0])
    target, codes = _resolve_target(values, levels, weights)
    schema = _fit_schema(table, names, has_names, categorical)
    matrix = _encode(table, schema)
    _check_constant(matrix, schema.output_names)
    return FitData(matrix, codes, weights, schema, target)


def prepare_predict(
    X: Any, schema: FeatureSchema, *, estimator_name: str = "estimator"
) -> np.ndarray:
    """Validate and encode data for prediction; the same as ``schema.transform``.

    Parameters
    ----------
    X : array-like, frame, table or path
        New data with the columns seen at fit.
    schema : FeatureSchema
        The schema from :func:`prepare_fit`.
    estimator_name : str, default="estimator"
        How the estimator is named in messages.

    Returns
    -------
    numpy.ndarray
        ``(n, schema.n_features)`` float64, C-contiguous.
    """
    return schema.transform(X, estimator_name=estimator_name)


# ----------------------------------------------------------------------------- files


def _file_format(path: Path, shown: str) -> tuple[str, str | None]:
    """``("CSV", delimiter)`` or ``("Parquet", None)`` from the file name."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    suffix = Path(name[:-3] if gzipped else name).suffix
    if suffix in _CSV_SUFFIXES:
        return "CSV", _CSV_SUFFIXES[suffix]
    if suffix in _PARQUET_SUFFIXES and not gzipped:
        return "Parquet", None
    raise DataError(f"Cannot read '{shown}': its extension is not a supported one ({_SUPPORTED}).")


def _check_columns(wanted: list[str] | None, names: list[str], shown: str) -> None:
    absent = [c for c in wanted or () if c not in names]
    if absent:
        raise DataError(
            f"The file '{shown}' has no column(s) {_quote(absent)}; {_close(absent[0], names)}"
        )


def _read_csv(path: Path, delimiter: str | None, wanted: list[str] | None, shown: str) -> pa.Table:
    if delimiter is None:
        with pa.input_stream(str(path), compression="detect") as stream:
            head = stream.read(65536).decode("utf-8", errors="replace")
        delimiter = "\t" if "\t" in head.partition("\n")[0] else ","
    parse = pa_csv.ParseOptions(delimiter=delimiter)
    reader = pa_csv.open_csv(str(path), parse_options=parse)
    names = reader.schema.names
    reader.close()
    _check_columns(wanted, names, shown)
    convert = pa_csv.ConvertOptions(include_columns=wanted) if wanted else None
    return pa_csv.read_csv(str(path), parse_options=parse, convert_options=convert)


def _read_parquet(path: Path, wanted: list[str] | None, shown: str) -> pa.Table:
    _check_columns(wanted, pa_parquet.read_schema(str(path)).names, shown)
    return pa_parquet.read_table(str(path), columns=wanted)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    return first[:200].rstrip(".")


def read_table(path: str | os.PathLike, *, columns: Any = None) -> pd.DataFrame:
    """Read a CSV or Parquet file into a pandas DataFrame with pyarrow.

    Parameters
    ----------
    path : str or path-like
        ``.csv``, ``.tsv`` or ``.txt`` (each optionally gzipped, e.g. ``.csv.gz``; ``.txt`` is
        tab-separated when its first line holds a tab, else comma-separated), or ``.parquet`` /
        ``.pq``.
    columns : sequence of str, optional
        Read only these columns.

    Returns
    -------
    pandas.DataFrame
        The table; dictionary-encoded columns become pandas categoricals.

    Raises
    ------
    DataError
        When the file does not exist, is empty, cannot be parsed, has an unknown extension, or
        lacks a requested column.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DataTypeError(f"path must be a str or a path, not {type(path).__name__}.")
    path = Path(path)
    shown = os.path.abspath(path)
    if not path.exists():
        raise DataError(f"The file '{shown}' does not exist; check the path.")
    kind, delimiter = _file_format(path, shown)
    if path.is_dir():
        raise DataError(f"Could not read '{shown}' as {kind}: it is a directory, not a file.")
    if path.stat().st_size == 0:
        raise DataError(f"The file '{shown}' is empty.")
    if columns is None:
        wanted = None
    else:
        wanted = list(dict.fromkeys([columns] if isinstance(columns, str) else columns))
        if not all(isinstance(c, str) for c in wanted):
            raise DataTypeError(f"columns must be a list of column names; got {columns!r}.")
    try:
        if kind == "CSV":
            table = _read_csv(path, delimiter, wanted, shown)
        else:
            table = _read_parquet(path, wanted, shown)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Could not read '{shown}' as {kind}: {_reason(exc)}.") from None
    if table.num_rows == 0:
        raise DataError(f"The file '{shown}' is empty: it has column names but no data rows.")
    return table.to_pandas(split_blocks=True)


def split_target(frame: Any, target: str) -> tuple[pd.DataFrame, pd.Series]:
    """Split a frame into its feature columns and its target column.

    Parameters
    ----------
    frame : pandas / polars DataFrame or pyarrow Table
        The data, target column included.
    target : str
        Name of the target column.

    Returns
    -------
    features : pandas.DataFrame
        The frame without the target column.
    y : pandas.Series
        The target column.

    Raises
    ------
    DataError
        When the target column is missing (with close matches) or appears more than once.
    """
    table = _as_frame(frame)
    if table is None:
        raise DataTypeError(
            f"split_target needs a pandas or polars DataFrame or a pyarrow Table, not "
            f"{type(frame).__name__}."
        )
    if not isinstance(target, str):
        raise DataTypeError(f"The target must be a column name (str), not {target!r}.")
    labels = list(table.columns)
    count = labels.count(target)
    if count == 0:
        raise DataError(
            f"The target column {target!r} is not in the data; {_close(target, labels)}"
        )
    if count > 1:
        raise DataError(
            f"The target column {target!r} appears {count} times; rename the duplicates."
        )
    return table.drop(columns=[target]), table[target]
