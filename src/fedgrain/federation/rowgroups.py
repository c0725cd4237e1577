"""Subsets made of whole Parquet row groups, read by the workers themselves.

The division by rows (:func:`fedgrain.partition.tree.stratified_split`) deals every row out at
random, stratified by class: the fitting process then reads every row again and copies it,
standardised, into its subset's file. With many row groups there is a cheaper division: each
subset is a set of whole row groups (dealt out at random, sizes balanced), and each worker reads
its own row groups, checks and encodes them, takes their column moments and class counts, and
writes its subset's file itself. The fitting process only merges the workers' small summaries
(in subset order, so the result is the same on every backend) and never holds a row.

What changes is which rows form a subset: a subset is no longer a random, class-stratified
sample of the rows but a random set of row groups. The pooled estimate and its standard errors
stay valid when the rows follow one model (every subset estimates the same parameters); the
refinement round's global Newton step makes the estimate the same as the division by rows'
to well within its standard errors. Where the row groups differ systematically (files sorted
by date, or by the target), the subsets differ too, and the heterogeneity statistics (Q,
I^2) say so, as they should; they are not computed within classes (the division is not
stratified by class).
"""

from __future__ import annotations

import heapq
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import progress
from ..backends.base import FileShardRef, _new_npy, unlink_files
from ..core.standardize import Standardizer
from ..data._common import quote
from ..data.dataset import DatasetSource, RowGroup, RowGroupReader
from ..data.features import (
    MAGNITUDE_LIMIT,
    FeatureSchema,
    check_magnitude,
    check_range,
    encode_features,
)
from ..exceptions import (
    DataError,
    DataTypeError,
    FedgrainError,
    ParameterError,
    ResourceError,
)

#: ``division="auto"`` divides by row groups from this many rows (below it the copy through
#: the fitting process costs a few seconds at most, and the division by rows is kept).
AUTO_MIN_ROWS = 10_000_000
#: ... and when every subset gets at least this many row groups (so the sizes balance).
AUTO_GROUPS_PER_SUBSET = 4
#: Rows standardised at a time in a subset's file.
BLOCK_ROWS = 65_536

DIVISIONS = ("auto", "rows", "row_groups")


def files_visible(backend) -> bool:
    """Whether the backend's workers read this machine's files (so they can read the Parquet
    files and write the subsets' files where the fitting process finds them)."""
    name = getattr(backend, "name", "")
    if name in ("serial", "processes"):
        return True
    visible = getattr(backend, "_files_visible", None)
    return bool(visible()) if callable(visible) else False


def why_not(source: Any, backend, n_groups: int | None, n_subsets: int) -> str | None:
    """Why these data cannot be divided by row groups on this backend (None: they can)."""
    if not isinstance(source, DatasetSource) or source.format != "Parquet":
        return "only Parquet files are divided by row groups"
    if source.filter is not None:
        return "a filter keeps rows the files' metadata do not count"
    if not files_visible(backend):
        return "the backend's workers cannot read this machine's files"
    if n_groups is not None and n_groups < n_subsets:
        return f"the data have {n_groups} row group(s) for {n_subsets} subsets"
    return None


def deal(groups: list[RowGroup], n_subsets: int, seed: int) -> list[list[int]]:
    """Row groups (indices into ``groups``) for each subset: in a random order drawn from
    ``seed``, each to the subset with the fewest rows so far (the lowest-numbered on a tie);
    each subset's row groups then in reading order."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(groups))
    heap = [(0, m) for m in range(n_subsets)]
    out: list[list[int]] = [[] for _ in range(n_subsets)]
    for i in order:
        rows, m = heapq.heappop(heap)
        out[m].append(int(i))
        heapq.heappush(heap, (rows + groups[i].rows, m))
    return [sorted(g) for g in out]


@dataclass(frozen=True)
class ScanTask:
    """What a worker needs to check, encode and write one subset (picklable)."""

    reader: RowGroupReader
    pieces: tuple[RowGroup, ...]
    features: tuple[str, ...]
    y: str
    schema: FeatureSchema
    target: Any
    stem: str
    n_rows: int


@dataclass(frozen=True)
class Scanned:
    """A subset's summary: its rows, column moments about its first row, raw extremes, class
    counts, and its files."""

    n: int
    shift: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    counts: np.ndarray
    ref: FileShardRef


def scan_subset(task: ScanTask) -> Scanned:
    """On a worker: read the subset's row groups batch by batch, check and encode them, write
    the encoded (not yet standardised) rows and the class codes to the subset's files, and
    return the subset's moments and class counts."""
    p, K = task.schema.n_features, task.target.n_classes
    cols = [*task.features, task.y]
    xs = _new_npy(f"{task.stem}-X.npy", np.float64, (task.n_rows, p))
    ys = _new_npy(f"{task.stem}-y.npy", np.intp, (task.n_rows,))
    ref = FileShardRef(xs[0], ys[0], None)
    try:
        shift = None
        s1, s2 = np.zeros(p), np.zeros(p)
        lo, hi = np.full(p, np.inf), np.full(p, -np.inf)
        counts = np.zeros(K, dtype=np.int64)
        at = 0
        for piece in task.pieces:
            for start, frame in task.reader.frames(piece, cols):
                k = frame.shape[0]
                if at + k > task.n_rows:
                    raise DataError(f"'{piece.shown}' holds more rows than its metadata say; "
                                    "rewrite the file.")
                try:
                    codes = task.target.encode(frame[task.y])
                    Xb = encode_features(frame[list(task.features)], task.schema)
                except DataError as exc:
                    raise DataError(f"{exc} {piece.where(start, k)}") from None
                if np.abs(Xb).max(initial=0.0) > MAGNITUDE_LIMIT:
                    check_magnitude(Xb, task.schema.output_names)
                _write(xs, at, Xb)
                _write(ys, at, codes)
                np.minimum(lo, Xb.min(axis=0), out=lo)
                np.maximum(hi, Xb.max(axis=0), out=hi)
                if shift is None:
                    shift = Xb[0].copy()
                Xb -= shift
                s1 += Xb.sum(axis=0)
                s2 += np.einsum("ij,ij->j", Xb, Xb)
                counts += np.bincount(codes, minlength=K)
                at += k
        if at != task.n_rows:
            raise DataError(f"The row groups of subset file {Path(task.stem).name} gave {at:,} "
                            f"rows where the files' metadata count {task.n_rows:,}; a file "
                            "changed while it was read: fit again.")
    except BaseException:
        _close(xs, ys)
        unlink_files([ref])
        raise
    _close(xs, ys)
    return Scanned(at, np.zeros(p) if shift is None else shift, s1, s2, lo, hi, counts, ref)


def _write(entry: tuple, at: int, block: np.ndarray) -> None:
    path, fd, offset, dtype, row = entry
    data = memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B")
    pos, done = offset + at * row, 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], pos + done)
        if n <= 0:
            raise OSError(f"could not write to {path}")
        done += n


def _close(*entries) -> None:
    for e in entries:
        try:
            os.close(e[1])
        except OSError:
            pass


def standardise_subset(task: tuple[str, np.ndarray, np.ndarray]) -> None:
    """On a worker: standardise a subset's feature file in place, block by block."""
    path, mean, scale = task
    X = np.load(path, mmap_mode="r+")
    std = Standardizer(mean, scale)
    for a in range(0, X.shape[0], BLOCK_ROWS):
        block = X[a : a + BLOCK_ROWS]
        std.transform(block, out=block)
    X.flush()
    del X


def merge(parts: list[Scanned], names: tuple[str, ...], shown: str) -> tuple[Standardizer,
                                                                               np.ndarray]:
    """The global standardisation and class counts from the subsets' summaries, merged in
    subset order (pairwise updates of the mean and the sum of squares about it). Raises the
    checks of the values: their range, constant columns."""
    n = 0
    mean = m2 = None
    lo = np.min([s.lo for s in parts], axis=0)
    hi = np.max([s.hi for s in parts], axis=0)
    counts = np.sum([s.counts for s in parts], axis=0)
    for s in parts:
        if s.n == 0:
            continue
        mu = s.shift + s.s1 / s.n
        q = np.maximum(s.s2 - s.s1 * s.s1 / s.n, 0.0)
        if mean is None:
            n, mean, m2 = s.n, mu, q
            continue
        total = n + s.n
        delta = mu - mean
        mean = mean + delta * (s.n / total)
        m2 = m2 + q + delta * delta * (n * s.n / total)
        n = total
    check_range(hi, lo, names)
    constant = [names[j] for j in np.flatnonzero(lo == hi)]
    if constant:
        raise DataError(
            f"Column{'s' if len(constant) > 1 else ''} {quote(constant)} of "
            f"'{shown}' {'are' if len(constant) > 1 else 'is'} constant; fedgrain's "
            "thresholds play the role of the intercept, so remove constant columns.")
    scale = np.sqrt(m2 / n)
    return Standardizer(mean, np.where(scale > 0, scale, 1.0)), counts


#: Errors a worker raises that are the user's to fix: raised here as they were.
_USER_ERRORS = {"DataError": DataError, "DataTypeError": DataTypeError,
                "ResourceError": ResourceError}


def _raise_failed(outcomes, what: str) -> None:
    for o in outcomes:
        if not o.ok:
            if o.error_type in _USER_ERRORS:
                raise _USER_ERRORS[o.error_type](o.error)
            raise FedgrainError(f"{what} failed on a worker: {o.error_type}: {o.error}")


def build_by_row_groups(backend, head, groups: list[RowGroup], division: list[list[int]]
                        ) -> tuple[list, np.ndarray, Standardizer]:
    """Have the workers read, check and write their subsets (``division``: row groups per
    subset), then standardise them with the merged moments; returns the placed shards, the
    subsets' sizes and the standardisation. Nothing stays on disk after a failure."""
    source = head.source
    folder = backend.spill_folder()
    reader = source.row_group_reader()
    tasks = [ScanTask(reader, tuple(groups[i] for i in gs), tuple(head.features), head.y,
                      head.schema, head.target, str(folder / uuid.uuid4().hex),
                      int(sum(groups[i].rows for i in gs)))
             for gs in division]
    files = [FileShardRef(f"{t.stem}-X.npy", f"{t.stem}-y.npy", None) for t in tasks]
    try:
        with progress.step("checking values", source.n_rows, "rows"):
            out = backend.map(scan_subset, tasks)
        _raise_failed(out, "Reading a subset's row groups")
        parts = [o.value for o in out]
        std, counts = merge(parts, head.schema.output_names, source.shown)
        absent = [c for c, k in zip(head.target.classes, counts, strict=True) if k == 0]
        if absent:
            raise DataError(f"The level(s) {quote(absent)} never occur in {head.y!r}, so "
                            "their thresholds cannot be estimated; drop them from levels or "
                            "add such rows.")
        with progress.step("standardising subsets", len(tasks), "subsets"):
            out = backend.map(standardise_subset,
                              [(r.X, std.mean, std.scale) for r in files])
        _raise_failed(out, "Standardising a subset")
        refs = backend.adopt(files)
    except BaseException:
        unlink_files(files)
        raise
    return refs, np.array([s.n for s in parts], dtype=np.int64), std


def check_division(division: str, owner: str) -> None:
    if division not in DIVISIONS:
        raise ParameterError(f"The 'division' parameter of {owner} must be one of "
                             f"{DIVISIONS}. Got {division!r} instead.")
