"""Training data read batch by batch, never whole: fitting beyond memory.

When ``fit`` is given the path of a Parquet file, of a folder of CSV or Parquet files (Hive
partitions included), an address such as ``s3://bucket/data/``, a
:class:`~fedgrain.data.dataset.DatasetSource` (with a row filter, chosen columns, a file
system) or a dask DataFrame, the rows are not loaded. :func:`prepare_streamed` reads the target
(and any categorical) columns to fix the ordinal levels and the feature schema, then reads
every column once, batch by batch, to check the values and take the column moments and the
class codes (one byte a row). What it returns,
:class:`StreamedRows`, stands where the feature matrix would: the estimators route, sample and
copy its rows into shard files in further passes over the file (:meth:`StreamedRows.blocks`),
so memory holds one batch, the class codes and a partition label per row, whatever the file's
size. ``DivideConquerOrdinal`` divides large Parquet data by row groups instead
(:mod:`fedgrain.federation.rowgroups`): after the first pass (:func:`open_streamed`), the
workers check, encode and write their own row groups and this process holds no row at all.

The result equals the in-memory fit of the same data up to rounding in the column moments (the
sums run over different blocks): the same subsets, the same rows in each, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedgrain.exceptions import DataError

from ._common import did_you_mean, quote
from .dataset import BATCH_ROWS, PARQUET_SUFFIXES, DatasetSource, is_uri
from .features import (
    MAGNITUDE_LIMIT,
    FeatureSchema,
    check_magnitude,
    check_no_missing_category,
    check_range,
    encode_features,
    fit_categories,
    is_numeric,
    not_numeric_error,
    resolve_categorical,
)
from .fitdata import FitData
from .target import TargetEncoding, as_levels, check_missing, resolve_target, target_array

__all__ = ["BATCH_ROWS", "DatasetSource", "ParquetSource", "StreamedHead", "StreamedRows",
           "is_streamed", "open_streamed", "prepare_streamed"]


def is_dask_frame(X: Any) -> bool:
    """Whether ``X`` is a ``dask.dataframe`` DataFrame (checked without importing dask)."""
    mod = type(X).__module__
    return mod.startswith(("dask.dataframe", "dask_expr")) and hasattr(X, "npartitions") \
        and hasattr(X, "columns")


def is_streamed(X: Any) -> bool:
    """Whether ``X`` is read batch by batch by the estimators that divide the data: the path
    of a Parquet file, of a folder (of CSV or Parquet files) or an address (``s3://...``), a
    :class:`DatasetSource`, or a dask DataFrame. A local CSV file is read whole."""
    if isinstance(X, (DatasetSource, DaskFrameSource)) or is_dask_frame(X):
        return True
    if not isinstance(X, (str, os.PathLike)):
        return False
    if is_uri(X):
        return True
    path = Path(X)
    return path.is_dir() or path.name.lower().endswith(PARQUET_SUFFIXES)


#: The name this reader had when it read Parquet only.
ParquetSource = DatasetSource


class DaskFrameSource:
    """A ``dask.dataframe`` DataFrame as batches of rows, one partition at a time: the frame is
    never collected whole (each partition is computed, by the frame's own scheduler, when its
    rows are read). The same interface as :class:`~fedgrain.data.dataset.DatasetSource`.
    """

    def __init__(self, frame, batch_rows: int = BATCH_ROWS, columns: list[str] | None = None):
        self.frame = frame
        self.batch_rows = int(batch_rows)
        self.columns = [str(c) for c in frame.columns] if columns is None else list(columns)
        if any(not isinstance(c, str) for c in frame.columns):
            raise DataError("The dask DataFrame's column names must be strings; rename them.")
        self.shown = f"the dask DataFrame ({frame.npartitions} partitions)"
        self.rows = [int(n) for n in frame.map_partitions(len).compute()]
        self.n_rows = int(sum(self.rows))
        if self.n_rows == 0:
            raise DataError(f"{self.shown} has no rows.")

    def frames(self, columns: list[str] | None = None):
        columns = self.columns if columns is None else columns
        start = 0
        for i in range(self.frame.npartitions):
            part = self.frame.partitions[i][list(columns)].compute()
            for a in range(0, len(part), self.batch_rows):
                batch = part.iloc[a : a + self.batch_rows].reset_index(drop=True)
                yield start, batch
                start += len(batch)

    def where(self, start: int, k: int) -> str:
        for i, n in enumerate(self.rows):
            if start < n:
                return (f"(row numbers count within the batch of rows {start:,} to "
                        f"{start + k - 1:,} of partition {i} of the dask DataFrame)")
            start -= n
        return f"(in {self.shown})"


#: What the estimators read in batches.
Source = DatasetSource | DaskFrameSource


class StreamedRows:
    """The encoded feature rows of a source read in batches, read again on every pass.

    Stands for the feature matrix in a fit: ``shape``, ``blocks()`` (``(start, rows)`` float64
    blocks), ``take(index)`` (some rows, in one pass) and the ``standardizer`` measured when
    the data were checked.
    """

    def __init__(self, source: Source, features: list[str], schema: FeatureSchema,
                 standardizer):
        self.source = source
        self.features = features
        self.schema = schema
        self.standardizer = standardizer
        self.shape = (source.n_rows, schema.n_features)
        self.passes = 0  # passes over the file so far (reported by the benchmarks)

    def blocks(self):
        self.passes += 1
        for start, frame in self.source.frames(self.features):
            yield start, self._encode(frame, start)

    def _encode(self, frame: pd.DataFrame, start: int) -> np.ndarray:
        try:
            return encode_features(frame, self.schema)
        except DataError as exc:
            raise DataError(f"{exc} {self.source.where(start, frame.shape[0])}") from None

    def take(self, index: np.ndarray) -> np.ndarray:
        """The rows at ``index`` (sorted, distinct), encoded, in one pass."""
        from .. import progress

        index = np.asarray(index, dtype=np.int64)
        out = np.empty((index.shape[0], self.shape[1]))
        self.passes += 1
        at = 0
        for start, frame in self.source.frames(self.features):
            lo = np.searchsorted(index, start)
            hi = np.searchsorted(index, start + frame.shape[0])
            if hi > lo:
                out[at : at + hi - lo] = self._encode(frame.iloc[index[lo:hi] - start], start)
                at += hi - lo
            progress.advance(frame.shape[0])
        return out


def prepare_streamed(path: Any, y: Any, *, levels: Any = None, categorical: Any = None,
                     sample_weight: Any = None, estimator_name: str = "estimator",
                     batch_rows: int = BATCH_ROWS) -> FitData:
    """Check a data set read in batches and fix its encoding without loading it.

    Returns a :class:`~fedgrain.data.FitData` whose ``X`` is a :class:`StreamedRows`
    and whose ``codes`` are compact (one byte a row for up to 127 classes).
    """
    return open_streamed(path, y, levels=levels, categorical=categorical,
                         sample_weight=sample_weight, estimator_name=estimator_name,
                         batch_rows=batch_rows).scan()


@dataclass(frozen=True)
class StreamedHead:
    """A source read in batches whose levels and feature schema are fixed (the first pass),
    before its values are checked: :meth:`scan` checks them here, batch by batch; the
    division by row groups (:mod:`fedgrain.federation.rowgroups`) has the workers check them."""

    source: Any
    y: str
    features: list[str]
    target: TargetEncoding
    schema: FeatureSchema

    def scan(self) -> FitData:
        from .. import progress

        with progress.step("checking values", self.source.n_rows, "rows"):
            return _scan_values(self.source, self.y, self.features, self.target, self.schema)


def open_streamed(path: Any, y: Any, *, levels: Any = None, categorical: Any = None,
                  sample_weight: Any = None, estimator_name: str = "estimator",
                  batch_rows: int = BATCH_ROWS) -> StreamedHead:
    """The first pass of :func:`prepare_streamed`: the source, its ordinal levels and its
    feature schema, from the target and categorical columns only."""
    if not isinstance(y, str):
        shown = (path.shown if isinstance(path, (DatasetSource, DaskFrameSource)) else
                 "the dask DataFrame" if is_dask_frame(path) else
                 os.fspath(path) if is_uri(path) else os.path.abspath(path))
        raise DataError(
            f"{estimator_name} reads '{shown}' batch by batch, so y must name its target "
            f"column (a str), not {type(y).__name__}.")
    if sample_weight is not None:
        raise DataError(
            "sample_weight is not available when fitting from data read in batches (the rows "
            "are streamed); fit on a frame read into memory, or drop the weights.")
    if isinstance(path, DatasetSource):
        source = path.with_target(y) if y in path.columns else path
    elif isinstance(path, DaskFrameSource):
        source = path
    elif is_dask_frame(path):
        source = DaskFrameSource(path, batch_rows)
    else:
        source = DatasetSource(path, batch_rows, target=y)
    if y not in source.columns:
        raise DataError(f"The target column {y!r} is not in '{source.shown}'; "
                        f"{did_you_mean(y, source.columns)}")
    features = [c for c in source.columns if c != y]
    if not features:
        raise DataError(f"'{source.shown}' has no feature columns besides the target {y!r}.")
    from .. import progress

    with progress.step("reading levels", source.n_rows, "rows"):
        target, schema = _scan_levels(source, y, features, levels, categorical, estimator_name)
    return StreamedHead(source, y, features, target, schema)


#: A target with more distinct values than this is refused while reading (an ordinal target
#: has a few levels; the in-memory check is the same for floats, at 20).
MAX_TARGET_VALUES = 100_000


def _first_batch(source: Source) -> pd.DataFrame:
    frames = source.frames()
    try:
        return next(frames)[1]
    finally:
        frames.close()


def _merge_order(acc: list, cats, ordered: bool, where: str) -> None:
    """Add a batch's categories to ``acc`` in order of appearance (as pyarrow unifies the
    dictionaries of a column read whole); ordered categories must agree in their order."""
    cats = list(cats)
    if ordered:
        common_acc = [c for c in acc if c in set(cats)]
        common_new = [c for c in cats if c in set(acc)]
        if common_acc != common_new:
            raise DataError(f"{where} has ordered categories {quote(cats)} in another order "
                            f"than earlier batches ({quote(acc)}); give every file the same "
                            "order.")
    acc.extend(c for c in cats if c not in set(acc))


def _scan_levels(source: Source, y: str, features: list[str], levels, categorical,
                 estimator_name: str):
    """First pass, over the target and the categorical columns only: levels and schema.

    Every check that names rows runs batch by batch, so its rows are the file's; the levels
    are those of the whole file, in the order the in-memory fit would give them.
    """
    from .. import progress

    first = _first_batch(source)
    cats = _categorical_columns(first, features, categorical)
    seen: dict[str, dict] = {c: {} for c in cats}
    order: dict[str, list] = {c: [] for c in cats}
    counts: dict[Any, int] = {}
    y_order: list = []
    y_dtype = first[y].dtype
    y_ordered = isinstance(y_dtype, pd.CategoricalDtype) and bool(y_dtype.ordered)
    given = None if levels is None else TargetEncoding(as_levels(levels))
    for start, frame in source.frames([y, *cats]):
        where = source.where(start, frame.shape[0])
        values = frame[y]
        try:
            check_missing(target_array(values), "y")
            if given is not None:
                given.encode(values)
        except DataError as exc:
            raise DataError(f"The target column {y!r}: {exc} {where}") from None
        try:
            for c in cats:
                check_no_missing_category(frame[c], c)
        except DataError as exc:
            raise DataError(f"{exc} {where}") from None
        for v, k in values.value_counts(sort=False).items():
            if k:
                counts[v] = counts.get(v, 0) + int(k)
        if len(counts) > MAX_TARGET_VALUES:
            raise DataError(
                f"The target column {y!r} has more than {MAX_TARGET_VALUES:,} distinct "
                "values; an ordinal target needs discrete levels, so round or bin it.")
        if isinstance(values.dtype, pd.CategoricalDtype):
            _merge_order(y_order, values.cat.categories, y_ordered,
                         f"The target column {y!r} {where}")
        for c in cats:
            column = frame[c]
            if isinstance(column.dtype, pd.CategoricalDtype):
                _merge_order(order[c], column.cat.categories, False, c)
                codes = np.unique(column.cat.codes.to_numpy())
                present = column.cat.categories[codes[codes >= 0]]
                seen[c].update(dict.fromkeys(present.tolist()))
            else:
                seen[c].update(dict.fromkeys(pd.unique(column.to_numpy(dtype=object)).tolist()))
        progress.advance(frame.shape[0])
    target = _target_of_counts(counts, y_dtype, y_order, y_ordered, levels)
    return target, _schema_of_levels(features, seen, order)


def _categorical_columns(first: pd.DataFrame, features: list[str], categorical) -> list[str]:
    """The features encoded as categories (declared, or of a category dtype); every other
    feature must be numeric."""
    names = tuple(features)
    declared = resolve_categorical(categorical, names)
    cats, not_numeric = [], []
    for j, name in enumerate(names):
        column = first[name]
        if j in declared or isinstance(column.dtype, pd.CategoricalDtype):
            cats.append(name)
        elif not is_numeric(column, name):
            not_numeric.append((name, column.dtype))
    if not_numeric:
        raise not_numeric_error(not_numeric)
    return cats


def _target_of_counts(counts: dict, y_dtype, y_order: list, y_ordered: bool, levels):
    """The target's levels from the counts of its values over the whole file, resolved as the
    in-memory fit resolves them (on a stand-in column with those values)."""
    uniques = list(counts)
    reps = np.minimum([counts[u] for u in uniques], 1 << 16)
    if isinstance(y_dtype, pd.CategoricalDtype):
        synthetic = pd.Series(pd.Categorical(np.repeat(np.array(uniques, dtype=object), reps),
                                             categories=y_order, ordered=y_ordered))
        return resolve_target(synthetic, levels, None)[0]
    synthetic = pd.Series(np.repeat(np.array(uniques, dtype=object), reps)).infer_objects()
    if y_dtype.kind in "biuf" and synthetic.dtype != y_dtype:
        synthetic = synthetic.astype(y_dtype)
    return resolve_target(synthetic.to_numpy(), levels, None)[0]


def _schema_of_levels(features: list[str], seen: dict, order: dict) -> FeatureSchema:
    """The feature schema from each categorical column's levels seen in the file."""
    categories = {}
    for c in seen:
        values = list(seen[c])
        if order[c]:  # a categorical column: its categories' order, as in memory
            column = pd.Series(pd.Categorical(values, categories=order[c]))
        else:
            column = pd.Series(values, dtype=object)
        categories[c] = fit_categories(column, c)
    output: list[str] = []
    for name in features:
        if name in categories:
            output.extend(f"{name}[{lv}]" for lv in categories[name][1:])
        else:
            output.append(name)
    return FeatureSchema(tuple(features), True, categories, tuple(output))


def _scan_values(source: Source, y: str, features: list[str], target,
                 schema: FeatureSchema) -> FitData:
    """Second pass, over every column: checks, column moments and class codes."""
    from .. import progress
    from ..core.standardize import Standardizer

    n, p = source.n_rows, schema.n_features
    K = target.n_classes
    codes = np.empty(n, dtype=np.int8 if K <= 127 else np.int16 if K <= 32_767 else np.int32)
    shift = None
    s1, s2 = np.zeros(p), np.zeros(p)
    lo, hi = np.full(p, np.inf), np.full(p, -np.inf)
    rows = StreamedRows(source, features, schema, None)
    for start, frame in source.frames([*features, y]):
        k = frame.shape[0]
        try:
            codes[start : start + k] = target.encode(frame[y])
        except DataError as exc:
            raise DataError(f"{exc} {source.where(start, k)}") from None
        Xb = rows._encode(frame[features], start)
        if np.abs(Xb).max(initial=0.0) > MAGNITUDE_LIMIT:  # before any square overflows
            check_magnitude(Xb, schema.output_names)
        if shift is None:
            shift = Xb[0].copy()
        Xb = Xb - shift
        s1 += Xb.sum(axis=0)
        s2 += np.einsum("ij,ij->j", Xb, Xb)
        np.minimum(lo, Xb.min(axis=0), out=lo)
        np.maximum(hi, Xb.max(axis=0), out=hi)
        progress.advance(k)
    rows.passes = 2
    check_range(hi, lo, schema.output_names, spread_only=True)  # lo, hi: shifted values
    constant = [schema.output_names[j] for j in np.flatnonzero(lo == hi)]
    if constant:
        raise DataError(
            f"Column{'s' if len(constant) > 1 else ''} {quote(constant)} of "
            f"'{source.shown}' {'are' if len(constant) > 1 else 'is'} constant; fedgrain's "
            "thresholds play the role of the intercept, so remove constant columns.")
    m = s1 / n
    scale = np.sqrt(np.maximum(s2 / n - m * m, 0.0))
    rows.standardizer = Standardizer(shift + m, np.where(scale > 0, scale, 1.0))
    counts = np.bincount(codes, minlength=K)
    absent = [c for c, k in zip(target.classes, counts, strict=True) if k == 0]
    if absent:
        raise DataError(f"The level(s) {quote(absent)} never occur in {y!r}, so their "
                        "thresholds cannot be estimated; drop them from levels or add such rows.")
    return FitData(rows, codes, None, schema, target)
