"""Training and prediction data: the target, the features and the sample weights, together.

:func:`prepare_fit` resolves the target, checks the weights, fits the feature schema and encodes
the features into :class:`FitData`; :func:`prepare_predict` encodes new data with that schema.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fedgrain.exceptions import DataError

from ._common import as_array, complex_error, describe_rows, quote
from .features import (
    FeatureSchema,
    check_shape,
    checked_moments,
    column_names,
    encode_features,
    fit_schema,
    warn_identifiers,
)
from .files import coerce_X, split_target
from .fitdata import FitData
from .streamed import is_streamed, prepare_streamed
from .target import resolve_target, target_array

__all__ = ["FitData", "prepare_data", "prepare_fit", "prepare_predict"]


def _check_weights(sample_weight: Any, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    raw = as_array(sample_weight, "sample_weight")
    if raw.dtype.kind == "c":
        raise complex_error("sample_weight")
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
            f"sample_weight has NaN or infinite values in {describe_rows(bad)}; "
            "give finite weights."
        )
    negative = weights < 0
    if negative.any():
        raise DataError(
            f"sample_weight has negative values in {describe_rows(negative)}; weights must be >= 0."
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
        Non-negative finite frequency weights, one per row; rows of weight zero are dropped.
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
    refuse_dask_frame(X, estimator_name)
    table = coerce_X(X)
    if y is None:
        raise DataError(
            f"{estimator_name} requires y to be passed, but the target y is None; pass the "
            "ordinal labels, or the name of the target column when X is a table."
        )
    if isinstance(y, str):
        if not column_names(table)[1]:
            raise DataError(
                f"y is the string {y!r}, which names a target column only when X is a frame, "
                "table or file with named columns; pass y as an array of labels."
            )
        table, y = split_target(table, y)
    names, has_names = column_names(table)
    check_shape(table)
    values = target_array(y)
    if values.shape[0] != table.shape[0]:
        raise DataError(
            f"X has {table.shape[0]} rows but y has {values.shape[0]} labels; pass one label "
            "per row."
        )
    weights = _check_weights(sample_weight, table.shape[0])
    if weights is not None and not np.all(weights > 0):
        # Frequency weights: a row of weight zero is a row that is not there. Dropping it here
        # lets every later check (levels, categories, constant columns, subset sizes) count
        # only real rows.
        keep = weights > 0
        dropped = values.iloc[~keep] if isinstance(values, pd.Series) else values[~keep]
        table, values, weights = (
            a.iloc[keep] if isinstance(a, (pd.DataFrame, pd.Series)) else a[keep]
            for a in (table, values, weights)
        )
        target, codes = resolve_target(values, levels, weights)
        if levels is None:
            _warn_weightless_levels(dropped, target)
    else:
        target, codes = resolve_target(values, levels, weights)
    schema = fit_schema(table, names, has_names, categorical)
    matrix = encode_features(table, schema, check_finite=False)
    moments = checked_moments(matrix, weights, schema.output_names)
    warn_identifiers(matrix, schema)
    return FitData(matrix, codes, weights, schema, target, moments)


def _warn_weightless_levels(dropped, target) -> None:
    """Name the labels that occur only in rows of weight zero: they are left out of the
    model's levels (rows of weight zero are not there), which a user may not expect."""
    known = set(target.classes)
    lost = [v for v in pd.unique(np.asarray(dropped, dtype=object))
            if not pd.isna(v) and v not in known]  # unlabelled rows masked out: not levels
    if lost:
        from .._warnings import warn

        warn(f"Level(s) {quote(lost)} of y occur only in rows of sample_weight zero, so the model "
             f"leaves them out (its levels are {quote(target.classes)}) and never predicts "
             "them: their thresholds need rows of positive weight.", UserWarning)


def prepare_data(X: Any, y: Any, **kwargs) -> FitData:
    """:func:`prepare_fit`, or, when ``X`` is read in batches (a Parquet file, a folder, an
    address, a :class:`~fedgrain.data.dataset.DatasetSource` or a dask DataFrame:
    :func:`fedgrain.data.streamed.is_streamed`) and ``y`` names its target column (without
    ``sample_weight``), the same checks without loading it
    (:func:`fedgrain.data.streamed.prepare_streamed`): the estimators that divide the data
    then stream it and never hold it whole."""
    if is_streamed(X) and isinstance(y, str) and kwargs.get("sample_weight") is None:
        return prepare_streamed(X, y, **kwargs)
    return prepare_fit(X, y, **kwargs)


def refuse_dask_frame(X: Any, owner: str) -> None:
    """A dask DataFrame given to an estimator that holds its rows in memory: refused, never
    collected behind the user's back."""
    from .streamed import is_dask_frame

    if is_dask_frame(X):
        raise DataError(
            f"{owner} holds its rows in memory, and X is a dask DataFrame, which fedgrain does "
            "not collect by itself: fit DivideConquerOrdinal or AdaptiveFederatedOrdinal with "
            "(frame, 'target column'), which read it one partition at a time, or call "
            ".compute() yourself.")


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
    from .streamed import is_dask_frame

    if is_dask_frame(X):
        raise DataError(
            f"X is a dask DataFrame, which fedgrain does not collect by itself, and this "
            f"method of {estimator_name} does not take one: predict, predict_proba, "
            "predict_linear, predict_cumulative_proba (and apply, unseen) return lazy dask "
            "arrays; otherwise call it on each partition with X.map_partitions, or .compute() "
            "yourself.")
    return schema.transform(X, estimator_name=estimator_name)
