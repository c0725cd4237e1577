"""Input tables: files, frames and arrays as tables, and the target column taken out of them.

Whatever is passed as X (a numpy array or list of rows, a pandas or polars DataFrame, a pyarrow
Table or RecordBatch, or the path of a CSV or Parquet file) becomes a numeric ndarray or a pandas
DataFrame. :func:`read_table` reads a file with pyarrow, choosing the format from the file name;
:func:`split_target` takes the target column out of a frame or table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
from scipy import sparse

from fedgrain.exceptions import DataError, DataTypeError

from ._common import as_array, complex_error, did_you_mean, is_polars, quote

__all__ = ["read_table", "split_target"]

_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": None}
PARQUET_SUFFIXES = (".parquet", ".pq")
_SUPPORTED = ".csv, .tsv, .txt (each also gzipped, e.g. .csv.gz), .parquet, .pq"


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


def refuse_remote(path: Any) -> None:
    """A URL (``s3://``, ``gs://``, ``hdfs://``, ``https://``...) is not a local path: say how to
    read it instead of looking for a local file of that name."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(text, str) and "://" in text and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise DataError(
            f"'{text}' is a {scheme}:// address; fedgrain reads local files by path. Read it "
            f"as a dask DataFrame, dask.dataframe.read_parquet('{text}') (or read_csv), and fit "
            "DivideConquerOrdinal or AdaptiveFederatedOrdinal on (frame, 'target column'): "
            "they read it one partition at a time.")


def coerce_X(X: Any) -> np.ndarray | pd.DataFrame:
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


def _file_format(path: Path, shown: str) -> tuple[str, str | None]:
    """``("CSV", delimiter)`` or ``("Parquet", None)`` from the file name."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    suffix = Path(name[:-3] if gzipped else name).suffix
    if suffix in _CSV_SUFFIXES:
        return "CSV", _CSV_SUFFIXES[suffix]
    if suffix in PARQUET_SUFFIXES and not gzipped:
        return "Parquet", None
    raise DataError(f"Cannot read '{shown}': its extension is not a supported one ({_SUPPORTED}).")


def _check_columns(wanted: list[str] | None, names: list[str], shown: str) -> None:
    absent = [c for c in wanted or () if c not in names]
    if absent:
        raise DataError(
            f"The file '{shown}' has no column(s) {quote(absent)}; {did_you_mean(absent[0], names)}"
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


def error_reason(exc: Exception) -> str:
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
    refuse_remote(path)
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
        raise DataError(f"Could not read '{shown}' as {kind}: {error_reason(exc)}.") from None
    if table.num_rows == 0:
        raise DataError(f"The file '{shown}' is empty: it has column names but no data rows.")
    return table.to_pandas(split_blocks=True)


def iter_table(path: str | os.PathLike, batch_rows: int):
    """Read a CSV or Parquet file batch by batch: DataFrames of ``batch_rows`` rows (the last
    may be shorter), without holding the whole file. Checks the file as :func:`read_table`."""
    path = Path(path)
    shown = os.path.abspath(path)
    if not path.exists():
        raise DataError(f"The file '{shown}' does not exist; check the path.")
    kind, delimiter = _file_format(path, shown)
    if path.is_dir() or path.stat().st_size == 0:
        raise DataError(f"The file '{shown}' is empty or a directory.")
    if kind == "CSV":  # pandas infers each chunk's types afresh (pyarrow fixes them from the
        try:          # first block, so a float late in an integer column would fail)
            yield from pd.read_csv(path, sep=delimiter, chunksize=batch_rows,
                                   engine="python" if delimiter is None else "c")
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
            raise DataError(f"Could not read '{shown}' as CSV: {error_reason(exc)}.") from None
        return
    try:
        batches = pa_parquet.ParquetFile(str(path)).iter_batches(batch_size=batch_rows)
        pending: list = []
        held = 0
        for rb in batches:
            pending.append(rb)
            held += rb.num_rows
            while held >= batch_rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch_rows).to_pandas(split_blocks=True)
                rest = table.slice(batch_rows)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            yield pa.Table.from_batches(pending).to_pandas(split_blocks=True)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Could not read '{shown}' as {kind}: {error_reason(exc)}.") from None


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
