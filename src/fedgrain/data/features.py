"""The features: encode the columns of X into a validated float64 matrix, and the schema.

Numeric columns are checked for NaN and infinite values, categorical columns (declared, or of a
categorical dtype) are one-hot encoded with the first level as the reference, and
:class:`FeatureSchema` remembers the columns and categories seen at fit so that new data are
checked against them with scikit-learn's feature-name rules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedgrain.exceptions import DataError, DataTypeError

from .._warnings import warn
from ._common import (
    SHOW,
    Scalar,
    as_categories,
    complex_error,
    describe_rows,
    did_you_mean,
    occurring_categories,
    plain,
    quote,
)
from .files import coerce_X

__all__ = ["FeatureSchema"]

_TEXT_KINDS = frozenset(
    {"string", "bytes", "categorical", "datetime", "datetime64", "date", "time", "timedelta",
     "timedelta64", "period", "interval", "unknown-array"}
)  # fmt: skip


def column_names(table: np.ndarray | pd.DataFrame) -> tuple[tuple[str, ...], bool]:
    """Input column names and whether they are real names (all strings, from a frame)."""
    if isinstance(table, pd.DataFrame):
        labels = list(table.columns)
        if isinstance(table.columns, pd.MultiIndex):
            raise DataError(
                f"X has column names on {table.columns.nlevels} levels (a MultiIndex, e.g. "
                f"{labels[0]!r}); flatten them to strings first, e.g. X.columns = "
                "['_'.join(map(str, c)) for c in X.columns]."
            )
        kinds = {type(c).__name__ for c in labels}
        if any(isinstance(c, str) for c in labels) and len(kinds) > 1:
            raise DataError(
                f"The column names of X mix types ({', '.join(sorted(kinds))}: "
                f"{quote(labels, 6)}), so columns could be matched neither by name nor safely "
                "by position; make them all strings: X.columns = X.columns.astype(str)."
            )
        if labels and all(isinstance(c, str) for c in labels):
            duplicated = [c for c, count in Counter(labels).items() if count > 1]
            if duplicated:
                raise DataError(
                    f"The column names of X must be unique, but {quote(duplicated)} appear "
                    "more than once; rename or drop the duplicates."
                )
            return tuple(str(c) for c in labels), True
    return tuple(f"x{i}" for i in range(table.shape[1])), False


def check_shape(table: np.ndarray | pd.DataFrame) -> None:
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


def resolve_categorical(categorical: Any, names: tuple[str, ...]) -> set[int]:
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
        item = plain(item)
        if isinstance(item, str) and item in names:
            positions.add(names.index(item))
        elif isinstance(item, str):
            raise DataError(
                f"categorical names {item!r}, which is not a column of X; "
                f"{did_you_mean(item, names)}"
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


def is_numeric(column: pd.Series, name: str) -> bool:
    """Whether a column converts to float64; raises for complex numbers."""
    dtype = column.dtype
    if pd.api.types.is_complex_dtype(dtype):
        raise complex_error(f"column {name!r} of X")
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        kind = pd.api.types.infer_dtype(column, skipna=True)
        if kind == "complex":
            raise complex_error(f"column {name!r} of X")
        return kind not in _TEXT_KINDS
    if isinstance(dtype, np.dtype):
        return dtype.kind in "biuf"
    return pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype)


def not_numeric_error(columns: list[tuple[str, Any]]) -> DataError:
    names = [name for name, _ in columns]
    listed = ", ".join(f"{name!r} ({dtype})" for name, dtype in columns[:SHOW])
    if len(columns) == 1:
        subject, them = f"Column {listed} of X is", "it"
    else:
        subject, them = (
            f"Columns {listed}{', ...' if len(columns) > SHOW else ''} of X are",
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


def check_no_missing_category(column: pd.Series, name: str) -> None:
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"Categorical column {name!r} of X has missing values in {describe_rows(missing)}; "
            "fill them (for example with a 'missing' category) or drop those rows."
        )


def fit_categories(column: pd.Series, name: str) -> tuple[Scalar, ...]:
    """The occurring categories of a column in encoding order; the first is the reference."""
    check_no_missing_category(column, name)
    where = f"Categorical column {name!r} of X"
    if isinstance(column.dtype, pd.CategoricalDtype):
        levels = occurring_categories(column, where)[0]
    else:
        found = as_categories(list(column.unique()), where)
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
    check_no_missing_category(column, name)
    codes = pd.Index(levels).get_indexer(column)
    unseen = codes < 0
    if unseen.any():
        raise DataError(
            f"Column {name!r} of X has categories not seen at fit: "
            f"{quote(pd.unique(column.to_numpy()[unseen]))} in {describe_rows(unseen)}; the known "
            f"categories are {quote(levels, 20)}, so map the new values to one of them or refit."
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
                f"Column {names[j]!r} of X has NaN (missing) values in {describe_rows(nan)}; "
                "fill them (for example frame.fillna(...)) or drop those rows."
            )
        infinite = np.isinf(column)
        if infinite.any():
            raise DataError(
                f"Column {names[j]!r} of X has infinite values (inf) in {describe_rows(infinite)}; "
                "replace them with finite numbers or drop those rows."
            )


#: Features must lie within this magnitude (their squares, summed over rows, must stay finite
#: in double precision) and vary by more than its inverse.
MAGNITUDE_LIMIT = 1e150


def check_magnitude(out: np.ndarray, names: tuple[str, ...]) -> None:
    """Name a column whose values are too large to square in double precision, or whose
    spread is too small to tell from rounding: every fit would end in NaN or infinite
    standard errors there. Rescaling (a power of ten) is the fix."""
    if out.shape[0] == 0:
        return
    top, bottom = out.max(axis=0), out.min(axis=0)  # column reductions: no n x p temporary
    check_range(top, bottom, names)


def check_range(top: np.ndarray, bottom: np.ndarray, names: tuple[str, ...],
                spread_only: bool = False) -> None:
    """:func:`check_magnitude` from the columns' largest and smallest values (for data seen
    batch by batch); ``spread_only`` for values shifted by a reference row."""
    big = np.maximum(np.abs(top), np.abs(bottom)) if not spread_only else np.zeros(len(top))
    for j in np.flatnonzero(big > MAGNITUDE_LIMIT):
        raise DataError(
            f"Column {names[j]!r} of X holds values as large as {big[j]:.3g}, beyond what "
            f"double precision can square and sum ({MAGNITUDE_LIMIT:.0e}); rescale it, for "
            "example divide it by a power of ten (its coefficient scales with it)."
        )
    spread = top - bottom
    for j in np.flatnonzero((spread > 0) & (spread < 1.0 / MAGNITUDE_LIMIT)):
        raise DataError(
            f"Column {names[j]!r} of X varies by only {spread[j]:.3g}, too little to tell from "
            "rounding; rescale it, for example multiply it by a power of ten."
        )


def check_constant(out: np.ndarray, names: tuple[str, ...],
                   columns: np.ndarray | None = None) -> None:
    """Name the constant columns (of ``columns``, by default all); only columns constant over
    the first rows are scanned fully."""
    cols = np.arange(out.shape[1]) if columns is None else np.asarray(columns)
    candidates = cols[(out[:1024, cols] == out[0, cols]).all(axis=0)]
    constant = [j for j in candidates if out[:, j].max() == out[:, j].min()]
    if constant:
        listed = quote([names[j] for j in constant])
        verb = "is" if len(constant) == 1 else "are"
        value = float(out[0, constant[0]])
        raise DataError(
            f"Column{'s' if len(constant) > 1 else ''} {listed} of X {verb} constant "
            f"({names[constant[0]]!r} is {value!r} in every row); fedgrain's thresholds play the "
            "role of the intercept, so remove constant columns such as a column of ones."
        )


def checked_moments(out: np.ndarray, weights: np.ndarray | None,
                    names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The training matrix's checks (no missing or infinite value, no constant column, every
    column within :data:`MAGNITUDE_LIMIT` and varying by more than its inverse) and its column
    moments (:func:`fedgrain.core.standardize.column_moments`, which the fits need anyway), in
    as few reads of ``out`` as the checks allow.

    Two whole-array reductions (the largest and smallest value of all) clear every row of the
    missing, infinite and magnitude checks at once; a column is looked at alone only when its
    standard deviation is below the smallest spread allowed (a column's range is at least its
    standard deviation), so constant columns are found from the moments. Where a check fails,
    the column-by-column checks name the column, in the same order as before (missing values,
    constant columns, magnitude).
    """
    from ..core.standardize import column_moments

    if out.size == 0:
        return column_moments(out, weights)
    top, bottom = float(out.max()), float(out.min())  # NaN propagates
    if not (np.isfinite(top) and np.isfinite(bottom)):
        _check_finite(out, names)
    if max(abs(top), abs(bottom)) > MAGNITUDE_LIMIT:
        check_constant(out, names)
        check_magnitude(out, names)
    mean, sd = column_moments(out, weights)
    tiny = np.flatnonzero(~(sd >= 1.0 / MAGNITUDE_LIMIT))
    if tiny.size:
        check_constant(out, names, tiny)
        sub = out[:, tiny]
        check_range(sub.max(axis=0), sub.min(axis=0), tuple(names[j] for j in tiny))
    return mean, sd


#: Below this many rows a column of distinct whole numbers is not remarked on (a few rows of
#: counts can all differ).
IDENTIFIER_MIN_ROWS = 50


def warn_identifiers(out: np.ndarray, schema: FeatureSchema) -> None:
    """Warn about numeric features that look like row identifiers: a different whole number in
    every row (a customer number, a row index). Used as a feature, such a column fits noise
    or a trend in the order of the rows. Categorical features with a level per row are named
    too. Columns that are not whole numbers in the first 1,024 rows are not scanned further."""
    n = out.shape[0]
    if n < IDENTIFIER_MIN_ROWS:
        return
    head = out[:1024]
    numeric = [j for j, name in enumerate(schema.output_names)
               if name in schema.input_columns and name not in schema.categorical]
    suspects = [j for j in numeric
                if np.all(head[:, j] == np.round(head[:, j]))
                and np.unique(head[:, j]).shape[0] == head.shape[0]]
    ids = [schema.output_names[j] for j in suspects if _looks_like_ids(out[:, j])]
    ids += [name for name, levels in schema.categorical.items() if len(levels) == n]
    if ids:
        warn(f"Column{'s' if len(ids) > 1 else ''} {quote(ids)} of X "
             f"{'hold' if len(ids) > 1 else 'holds'} a different value in every row, like a row "
             "identifier, and "
             f"{'are' if len(ids) > 1 else 'is'} used as a feature; drop "
             f"{'them' if len(ids) > 1 else 'it'} if so (command line: --drop).", UserWarning)


def _looks_like_ids(column: np.ndarray) -> bool:
    """Distinct whole numbers that run in the rows' order or fill a range about as long as
    the rows (a row number, a shuffled index, consecutive customer numbers); rounded
    measurements (incomes, weights) that merely never repeat do not count."""
    n = column.shape[0]
    if not np.all(column == np.round(column)):
        return False
    values = np.unique(column)
    if values.shape[0] != n:
        return False
    d = np.diff(column)
    return bool(np.all(d > 0) or np.all(d < 0) or values[-1] - values[0] < 2 * n)


def fit_schema(
    table: np.ndarray | pd.DataFrame, names: tuple[str, ...], has_names: bool, categorical: Any
) -> FeatureSchema:
    declared = resolve_categorical(categorical, names)
    if isinstance(table, np.ndarray) and not declared:
        return FeatureSchema(names, has_names, {}, names)
    frame = pd.DataFrame(table, copy=False) if isinstance(table, np.ndarray) else table
    categories = {}
    not_numeric = []
    output: list[str] = []
    for j, name in enumerate(names):
        column = frame.iloc[:, j]
        if j in declared or isinstance(column.dtype, pd.CategoricalDtype):
            categories[name] = fit_categories(column, name)
            output.extend(f"{name}[{level}]" for level in categories[name][1:])
        elif is_numeric(column, name):
            output.append(name)
        else:
            not_numeric.append((name, column.dtype))
    if not_numeric:
        raise not_numeric_error(not_numeric)
    return FeatureSchema(names, has_names, categories, tuple(output))


def encode_features(table: np.ndarray | pd.DataFrame, schema: FeatureSchema, *,
                    check_finite: bool = True) -> np.ndarray:
    """Validated float64 C-contiguous features; the input itself when it already is one.
    ``check_finite=False`` leaves the check for missing and infinite values to the caller
    (:func:`checked_moments` makes it in its own pass)."""
    if isinstance(table, np.ndarray) and not schema.categorical:
        if table.dtype == np.float64 and table.flags.c_contiguous:
            out = table
        else:
            out = np.ascontiguousarray(table, dtype=np.float64)
        if check_finite:
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
        if is_numeric(column, name):
            out[:, k] = _numeric_values(column, name)
        else:
            not_numeric.append((name, column.dtype))
        k += 1
    if not_numeric:
        raise not_numeric_error(not_numeric)
    if check_finite:
        _check_finite(out, schema.output_names)
    return out


def _bullets(names: list[str]) -> str:
    shown = "".join(f"- {name}\n" for name in names[:SHOW])
    return shown + ("- ...\n" if len(names) > SHOW else "")


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
    >>> from fedgrain.data import prepare_fit
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
        table = coerce_X(X)
        names, has_names = column_names(table)
        self._check_names(names, has_names, estimator_name)
        if table.shape[1] != self.n_features_in:
            raise DataError(
                f"X has {table.shape[1]} features, but {estimator_name} is expecting "
                f"{self.n_features_in} features as input. Pass the columns seen at fit: "
                f"{quote(self.input_columns, 10)}."
            )
        check_shape(table)
        return encode_features(table, self)

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
                message + f"Pass X with the columns {quote(self.input_columns, 10)}, in order."
            )
        if self.has_names:
            warn(
                f"X does not have valid feature names, but {estimator_name} was fitted with "
                "feature names",
                UserWarning)
        elif has_names:
            warn(
                f"X has feature names, but {estimator_name} was fitted without feature names",
                UserWarning)

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


def resolve_columns(given, names: list[str], option: str) -> list[int]:
    """Positions among the encoded feature ``names`` of the features an option lists by
    output name or position; a categorical feature's own name stands for all its one-hot
    columns (``color`` for ``color[green]``, ...). Sorted; a :class:`DataError` for an unknown
    feature or one listed twice."""
    out: list[int] = []
    for v in given:
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if not 0 <= v < len(names):
                raise DataError(f"{option} names feature position {v}, but the model has "
                                f"{len(names)} features (0 to {len(names) - 1}).")
            out.append(int(v))
        elif isinstance(v, str) and v in names:
            out.append(names.index(v))
        elif isinstance(v, str) and any(n.startswith(f"{v}[") for n in names):
            out.extend(i for i, n in enumerate(names) if n.startswith(f"{v}["))
        else:
            raise DataError(f"{option} names {v!r}, which is not a feature; the features are "
                            f"{names[:20]}.")
    if len(set(out)) != len(out):
        raise DataError(f"{option} names a feature twice: {list(given)}.")
    return sorted(out)
