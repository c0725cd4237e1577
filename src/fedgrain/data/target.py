"""The ordinal target: its levels, the map from labels to codes, and label validation.

A target is resolved into integer codes ``0..K-1`` held by :class:`TargetEncoding`: from
``levels=[...]`` when given, else from the natural order of integers, booleans and discrete
floats, or from the category order of an ordered categorical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import sparse
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import type_of_target

from fedgrain.exceptions import DataError, DataTypeError

from .._warnings import warn
from ._common import (
    Scalar,
    as_array,
    compact_codes,
    complex_error,
    describe_rows,
    is_polars,
    occurring_categories,
    plain,
    quote,
)

__all__ = ["TargetEncoding"]

_MAX_FLOAT_LEVELS = 20  # a non-integral float target with at most this many values is ordinal
_NUMERIC_LABEL_KINDS = {
    "integer": np.int64,
    "floating": np.float64,
    "mixed-integer-float": np.float64,
    "decimal": np.float64,
    "boolean": np.bool_,
}


def as_levels(levels: Any, what: str = "levels") -> tuple[Scalar, ...]:
    """Validate a sequence of ordinal levels and return it as a tuple of plain Python scalars."""
    if isinstance(levels, (str, bytes)) or not np.iterable(levels):
        raise DataTypeError(
            f"{what} must be a list of levels, lowest first, such as ['low', 'mid', 'high']; "
            f"got {levels!r}."
        )
    out = []
    for value in np.asarray(levels, dtype=object).ravel().tolist():
        value = plain(value)
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
        raise DataError(f"{what} must be unique; repeated: {quote(duplicated)}.")
    if len({isinstance(v, str) for v in out}) > 1:
        raise DataError(
            f"{what} mix strings and numbers ({quote(out)}); give them all as one type."
        )
    return tuple(out)


def target_array(y: Any, what: str = "y") -> np.ndarray | pd.Series:
    """1-D values of a target: a pandas Series when categorical, else a numpy array."""
    if is_polars(y) or isinstance(y, (pa.Array, pa.ChunkedArray)):
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
    values = as_array(y, what)
    if values.ndim == 2 and values.shape[1] == 1:
        _warn_column_vector()
        values = values.ravel()
    if values.ndim != 1:
        raise DataError(
            f"{what} must be a 1-D array of ordinal labels, but it has shape {values.shape}; "
            "pass one target column."
        )
    if values.dtype.kind == "c":
        raise complex_error(what)
    return values


def _warn_column_vector() -> None:
    warn(
        "A column-vector y was passed when a 1d array was expected; fedgrain uses y.ravel().",
        DataConversionWarning)


def check_missing(values: np.ndarray | pd.Series, what: str) -> None:
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuUS":
        return
    missing = np.asarray(pd.isna(values))
    if missing.any():
        raise DataError(
            f"{what} has missing values (None/NaN) in {describe_rows(missing)}; drop those rows "
            "or fill in their labels."
        )
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        infinite = np.isinf(values)
        if infinite.any():
            raise DataError(
                f"{what} has infinite values in {describe_rows(infinite)}; an ordinal target needs "
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
        raise complex_error(what)
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
    present, codes = compact_codes(shifted, high - low + 1)
    return tuple((np.flatnonzero(present) + low).tolist()), codes


def _natural_codes(values: np.ndarray, what: str) -> tuple[tuple[Scalar, ...], np.ndarray]:
    """Classes in natural order and codes for a target that carries no explicit order."""
    kind = values.dtype.kind
    if kind in "US":
        found = np.unique(values)
        raise DataError(
            f"The labels of {what} ({quote(found, 10)}) have no known order; pass "
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
                f"distinct values such as {quote(np.round(uniques, 6))}); an ordinal target "
                "needs discrete levels, so round or bin it, or pass levels=[...]."
            )
    uniques, codes = np.unique(values, return_inverse=True)
    return tuple(uniques.tolist()), codes.astype(np.intp, copy=False)


def _categorical_codes(series: pd.Series, what: str) -> tuple[tuple[Scalar, ...], np.ndarray]:
    """Occurring categories of an ordered categorical target, in category order, and codes."""
    if not series.cat.ordered:
        raise DataError(
            f"The labels of {what} are an unordered categorical "
            f"({quote(series.cat.categories, 10)}), so they have no known order; pass "
            "levels=[...] lowest first, or make it ordered (series.cat.as_ordered())."
        )
    return occurring_categories(series, what)


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
        object.__setattr__(self, "classes", as_levels(self.classes, "classes"))

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
        values = target_array(y, what)
        check_missing(values, what)
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
                f"{what} has labels that are not among the levels: {quote(labels)} in "
                f"{describe_rows(unknown)}; the known levels, lowest first, are "
                f"{quote(self.classes, 20)}.{hint}"
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


def resolve_target(
    values: np.ndarray | pd.Series, levels: Any, weights: np.ndarray | None
) -> tuple[TargetEncoding, np.ndarray]:
    """Levels and codes of a fit-time target; checks the class counts."""
    check_missing(values, "y")
    if levels is not None:
        target = TargetEncoding(as_levels(levels))
        codes = target.encode(values)
    else:
        if isinstance(values, pd.Series):
            classes, codes = _categorical_codes(values, "y")
        else:
            classes, codes = _natural_codes(_label_values(values, "y"), "y")
        if len(classes) < 2:
            raise DataError(
                "y has only one class"
                f"{' with positive sample_weight' if weights is not None else ''} "
                f"({quote(classes)}); an ordinal model needs at least 2 classes."
            )
        target = TargetEncoding(classes)
    counts = np.bincount(codes, weights=weights, minlength=target.n_classes)
    if np.count_nonzero(counts) < 2:
        raise DataError(
            "y has only one class"
            f"{' with positive sample_weight' if weights is not None else ''} "
            f"({quote(np.asarray(target.classes, dtype=object)[counts > 0])}); an ordinal model "
            "needs at least 2 classes."
        )
    absent = [c for c, n in zip(target.classes, counts, strict=True) if n == 0]
    if absent:
        source = "levels" if levels is not None else "the classes of y"
        raise DataError(
            f"The level(s) {quote(absent)} in {source} never occur in y"
            f"{' with positive sample_weight' if weights is not None else ''}, so their "
            "thresholds cannot be estimated; drop them from levels or add such rows."
        )
    return target, codes
