"""Input tables: files, frames and arrays as tables, and the target column taken out of them.

Whatever is passed as X (a numpy array or list of rows, a pandas or polars DataFrame, a pyarrow
Table or RecordBatch, or the path of CSV or Parquet data) becomes a numeric ndarray or a pandas
DataFrame. :func:`read_table` reads a file, a folder or an address whole through the shared
reader (:class:`~fedgrain.data.dataset.DatasetSource`), :func:`iter_table` batch by batch;
:func:`split_target` takes the target column out of a frame or table.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import sparse

from fedgrain.exceptions import DataError, DataTypeError

from ._common import as_array, complex_error, did_you_mean, is_polars
from .dataset import DatasetSource

__all__ = ["iter_table", "read_table", "split_target"]


def _as_frame(X: Any) -> pd.DataFrame | None:
    """X as a pandas DataFrame when it is a pandas, polars or pyarrow frame, else None."""
    if isinstance(X, pd.DataFrame):
        return X
    if is_polars(X, "LazyFrame"):
        raise DataTypeError("X is a polars LazyFrame; call .collect() on it first.")
    if is_polars(X, "DataFrame"):
        # polars' Categorical lists its categories in the order rows (and its global string
        # cache) met them; sort them so the reference level does not depend on row order.
        # Enum columns keep their declared order.
        incidental = [c for c, dt in X.schema.items() if type(dt).__name__ == "Categorical"]
        frame = X.to_arrow().to_pandas(split_blocks=True)
        for c in incidental:
            cats = frame[c].cat.categories
            try:
                frame[c] = frame[c].cat.reorder_categories(sorted(cats))
            except TypeError:
                pass  # unsortable categories keep their order
        return frame
    if isinstance(X, pa.RecordBatch):
        X = pa.Table.from_batches([X])
    if isinstance(X, pa.Table):
        return X.to_pandas(split_blocks=True)
    return None


def coerce_X(X: Any) -> np.ndarray | pd.DataFrame:
    """A numeric 2-D ndarray (the fast path) or a pandas DataFrame holding the features."""
    if isinstance(X, (str, os.PathLike)):
        return read_table(X)
    if isinstance(X, DatasetSource):  # its rows, filter and columns, read whole
        frame = X.read()
        if frame.shape[0] == 0:
            X.n_rows  # noqa: B018 - the error that says why (empty, or no row passes)
        return frame
    frame = _as_frame(X)
    if frame is not None:
        return frame
    if sparse.issparse(X):
        raise DataTypeError(
            "X is a scipy sparse matrix, which fedgrain does not support; pass a dense array "
            "(X.toarray()) or a frame."
        )
    if isinstance(X, (pd.Series, pa.Array, pa.ChunkedArray)) or is_polars(X, "Series"):
        raise DataError(
            "X must be 2-D (rows x features), but it is a 1-D series. Reshape your data: pass "
            "a one-column frame (frame[['col']]) or values.reshape(-1, 1) for a single feature."
        )
    array = as_array(X, "X")
    if array.ndim != 2:
        raise DataError(
            f"X must be 2-D (rows x features), but it has shape {array.shape}. Reshape your "
            "data: X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for a single row."
        )
    kind = array.dtype.kind
    if kind == "c":
        raise complex_error("X")
    if kind in "biuf":
        return array
    if kind in "OUS":
        return pd.DataFrame(array, copy=False)
    raise DataTypeError(f"X has dtype {array.dtype}, which fedgrain cannot use; pass numbers.")


def read_table(path: str | os.PathLike, *, columns: Any = None, filter: Any = None,
               filesystem: Any = None, storage_options: dict | None = None) -> pd.DataFrame:
    """Read CSV or Parquet data into a pandas DataFrame with ``pyarrow.dataset``.

    Parameters
    ----------
    path : str or path-like
        A file, a folder of files or a Hive-partitioned folder (``key=value`` folders become
        columns), locally or at an address such as ``s3://bucket/data/``
        (:class:`~fedgrain.data.dataset.DatasetSource` says how each is read). Files are
        ``.csv``, ``.tsv`` or ``.txt`` (each optionally compressed: ``.csv.gz``, ``.bz2``,
        ``.lz4``, ``.zstd``; ``.txt`` is tab-separated when its first line holds a tab, else
        comma-separated), or ``.parquet`` / ``.pq``.
    columns : sequence of str, optional
        Read only these columns.
    filter : str, pyarrow expression or list of tuples, optional
        Read only the rows where it holds, e.g. ``"year >= 2020 and region == 'north'"``.
    filesystem : pyarrow.fs.FileSystem or fsspec file system, optional
        Read ``path`` on this file system.
    storage_options : dict, optional
        Keyword arguments of the pyarrow file system of the address's scheme.

    Returns
    -------
    pandas.DataFrame
        The table; dictionary-encoded columns become pandas categoricals.

    Raises
    ------
    DataError
        When the data do not exist, are empty, cannot be parsed (naming the file), have an
        unknown extension, lack a requested column, or their files do not hold one table.
    """
    source = DatasetSource(path, columns=columns, filter=filter, filesystem=filesystem,
                           storage_options=storage_options)
    frame = source.read()
    if frame.shape[0] == 0:
        if source.filter is not None:
            raise DataError(f"No row of '{source.shown}' passes the filter {source.filter}.")
        what = "folder" if len(source.files) > 1 else "file"
        raise DataError(f"The {what} '{source.shown}' is empty: it has column names but no data "
                        "rows.")
    return frame


def iter_table(path: str | os.PathLike, batch_rows: int, **options):
    """Read CSV or Parquet data batch by batch: DataFrames of ``batch_rows`` rows (a file's
    last batch may be shorter), without holding the whole table. ``options`` as for
    :func:`read_table`."""
    source = DatasetSource(path, batch_rows, **options)
    for _, frame in source.frames():
        yield frame


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
            f"The target column {target!r} is not in the data; {did_you_mean(target, labels)}"
        )
    if count > 1:
        raise DataError(
            f"The target column {target!r} appears {count} times; rename the duplicates."
        )
    return table.drop(columns=[target]), table[target]
