"""Helpers shared by the target, feature and file modules.

Message formatting (quoting values, naming rows, suggesting close column names), the complex
numbers error, array conversion, polars detection, and the categories of a categorical series.
"""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np
import pandas as pd

from fedgrain.exceptions import ComplexDataError, DataError, DataTypeError

Scalar = bool | int | float | str

SHOW = 5  # values or row numbers quoted in a message


def plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def quote(values: Any, limit: int = SHOW) -> str:
    """Comma-separated reprs of the first ``limit`` values, with ``...`` when there are more."""
    values = list(values)
    shown = ", ".join(repr(plain(v)) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def describe_rows(mask: np.ndarray) -> str:
    """``'3 rows (rows 0, 4, 9, ...)'`` for a boolean mask over rows."""
    where = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in where[:SHOW]) + (", ..." if where.size > SHOW else "")
    plural = "s" if where.size != 1 else ""
    return f"{where.size} row{plural} (row{plural} {shown}, counting from 0)"


def did_you_mean(name: str, names: tuple[str, ...] | list[str]) -> str:
    """A ``did you mean`` clause followed by the available names."""
    lowered = {str(n).lower(): str(n) for n in names}
    matches = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3)]
    available = f"available columns are {quote(names, 20)}."
    return f"did you mean {quote(matches)}? The {available}" if matches else f"the {available}"


def complex_error(where: str) -> ComplexDataError:
    return ComplexDataError(
        f"Complex data not supported: {where} holds complex numbers; pass real numbers "
        "(for example np.real(X) or np.abs(X))."
    )


def as_array(obj: Any, what: str) -> np.ndarray:
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


def is_polars(obj: Any, name: str | None = None) -> bool:
    """Whether ``obj`` comes from polars (and, when ``name`` is given, is of that class)."""
    kind = type(obj)
    return kind.__module__.split(".")[0] == "polars" and name in (None, kind.__name__)


def compact_codes(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``0..size-1`` occur in ``codes``, and ``codes`` renumbered over those alone."""
    present = np.bincount(codes, minlength=size) > 0
    remap = np.cumsum(present, dtype=np.intp) - 1
    return present, remap[codes]


def occurring_categories(series: pd.Series, where: str) -> tuple[tuple[Scalar, ...], np.ndarray]:
    """The categories of a categorical series that occur in it, in order, and its codes.

    The codes are renumbered ``0..m-1`` over the occurring categories; ``series`` must have no
    missing values.
    """
    raw = series.cat.codes.to_numpy().astype(np.intp)
    present, codes = compact_codes(raw, len(series.cat.categories))
    return as_categories(series.cat.categories[present].tolist(), where), codes


def as_categories(values: list, where: str) -> tuple[Scalar, ...]:
    """Categories as plain Python scalars; ``where`` names their column in the message."""
    out = []
    for value in values:
        value = plain(value)
        if not isinstance(value, (bool, int, float, str)):
            raise DataTypeError(
                f"{where} has a category {value!r} of type {type(value).__name__}; categories "
                "must be numbers, booleans or strings, so convert them (e.g. astype(str))."
            )
        out.append(value)
    return tuple(out)
