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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from .. import progress
from ..backends.base import FileShardRef, _new_npy, no_room, unlink_files
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
    if not isinstance(source.filesystem, pafs.LocalFileSystem):
        return "the files are not on this machine's file system (the workers read them)"
    if not files_visible(backend):
        return "the backend's workers cannot read this machine's files"
    shared = getattr(backend, "shared_folder", None)
    if getattr(backend, "name", "") == "dask" and getattr(backend, "_cluster", None) is None \
            and shared is not None:
        # another cluster's workers see this machine's shared_folder, and nothing else of it
        root = Path(shared).resolve()
        if not all(Path(f.path).resolve().is_relative_to(root) for f in source._fragments):
            return ("the files are not in the Dask cluster's shared_folder (its workers, "
                    "which may run elsewhere, read them)")
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
class SubsetTask:
    """What a worker needs to check, then write, one subset (picklable). ``std``: None to
    check the rows and take their moments; the global standardisation to write them."""

    reader: RowGroupReader
    pieces: tuple[RowGroup, ...]
    features: tuple[str, ...]
    y: str
    schema: FeatureSchema
    target: Any
    stem: str
    n_rows: int
    std: Standardizer | None = None
    #: Write the encoded rows while checking them (subsets in RAM: standardised in place
    #: after, which costs less than reading the files again).
    fused: bool = False

    def batches(self):
        """``(piece, start, class codes, encoded rows)`` for every batch of the subset's row
        groups, checked as the fitting process checks rows it reads (errors name the file,
        the row group and the rows)."""
        cols = [*self.features, self.y]
        features = list(self.features)
        for piece in self.pieces:
            for start, frame in self.reader.frames(piece, cols):
                try:
                    codes = self.target.encode(frame[self.y])
                    Xb = encode_features(frame[features], self.schema)
                except DataError as exc:
                    raise DataError(f"{exc} {piece.where(start, frame.shape[0])}") from None
                yield piece, start, codes, Xb


@dataclass(frozen=True)
class Scanned:
    """A subset's summary: its rows, column moments about its first row, raw extremes and
    class counts."""

    n: int
    shift: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    counts: np.ndarray


def check_subset(task: SubsetTask) -> Scanned:
    """On a worker, the first pass: read the subset's row groups batch by batch, check and
    encode them, and return their moments and class counts; with ``task.fused``, also write
    the encoded rows (not yet standardised) and their class codes to the subset's files."""
    p, K = task.schema.n_features, task.target.n_classes
    shift = None
    s1, s2 = np.zeros(p), np.zeros(p)
    lo, hi = np.full(p, np.inf), np.full(p, -np.inf)
    counts = np.zeros(K, dtype=np.int64)
    n = 0
    files = _open_files(task) if task.fused else None
    try:
        for piece, start, codes, Xb in task.batches():
            if np.abs(Xb).max(initial=0.0) > MAGNITUDE_LIMIT:  # before any square overflows
                try:
                    check_magnitude(Xb, task.schema.output_names)
                except DataError as exc:
                    raise DataError(f"{exc} {piece.where(start, Xb.shape[0])}") from None
            if files is not None:
                if n + Xb.shape[0] > task.n_rows:
                    break
                _write(files[0], n, Xb)
                _write(files[1], n, codes)
            np.minimum(lo, Xb.min(axis=0), out=lo)
            np.maximum(hi, Xb.max(axis=0), out=hi)
            if shift is None:
                shift = Xb[0].copy()
            Xb -= shift
            s1 += Xb.sum(axis=0)
            s2 += np.einsum("ij,ij->j", Xb, Xb)
            counts += np.bincount(codes, minlength=K)
            n += Xb.shape[0]
        _check_count(task, n)
    except BaseException:
        if files is not None:
            _close(*files)
            unlink_files([_ref(task)])
        raise
    if files is not None:
        _close(*files)
    return Scanned(n, np.zeros(p) if shift is None else shift, s1, s2, lo, hi, counts)


def _ref(task: SubsetTask) -> FileShardRef:
    return FileShardRef(f"{task.stem}-X.npy", f"{task.stem}-y.npy", None)


def _open_files(task: SubsetTask) -> tuple:
    xs = _new_npy(f"{task.stem}-X.npy", np.float64, (task.n_rows, task.schema.n_features))
    try:
        return xs, _new_npy(f"{task.stem}-y.npy", np.intp, (task.n_rows,))
    except BaseException:
        _close(xs)
        Path(xs[0]).unlink(missing_ok=True)
        raise


def standardise_subset(task: SubsetTask) -> FileShardRef:
    """On a worker, after a fused first pass: standardise the subset's file in place."""
    ref = _ref(task)
    X = np.load(ref.X, mmap_mode="r+")
    for a in range(0, X.shape[0], BLOCK_ROWS):
        block = X[a : a + BLOCK_ROWS]
        task.std.transform(block, out=block)
    X.flush()
    del X
    return ref


def write_subset(task: SubsetTask) -> FileShardRef:
    """On a worker, the second pass: read the subset's row groups again and write them,
    standardised, and their class codes to the subset's files (plain writes at offsets: the
    worker's memory stays at a batch)."""
    ref = _ref(task)
    xs = ys = None
    try:
        xs = _Appender(ref.X, np.float64, (task.n_rows, task.schema.n_features))
        ys = _Appender(ref.y, np.intp, (task.n_rows,))
        at = 0
        for _piece, _start, codes, Xb in task.batches():
            if at + Xb.shape[0] > task.n_rows:
                break
            xs.append(task.std.transform(Xb, out=Xb))
            ys.append(codes)
            at += Xb.shape[0]
        _check_count(task, at)
        xs.close()
        ys.close()
    except BaseException:
        for f in (xs, ys):
            if f is not None:
                f.abort()
        unlink_files([ref])
        raise
    return ref


class _Appender:
    """Writes a ``.npy`` file from front to back through ``O_DIRECT`` where the file system
    takes it (a disk: the rows go to it at the disk's speed, not at the page cache's
    write-back rate, which on this kind of machine is a quarter of it), else with plain
    writes. The header is padded to a 4 KiB block and the data go in aligned 8 MiB chunks;
    the last chunk is padded, then the file cut to its size."""

    ALIGN = 4096
    CHUNK = 8 << 20

    def __init__(self, path: str, dtype, shape: tuple):
        import mmap

        self.path, self.dtype = path, np.dtype(dtype)
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
        pad = self.ALIGN - 10 - len(text) - 1
        header = b"\x93NUMPY\x01\x00" + (self.ALIGN - 10).to_bytes(2, "little") + \
            (text + " " * pad + "\n").encode("latin1")
        self.size = self.ALIGN + int(np.prod(shape)) * self.dtype.itemsize
        self.fd = -1
        with open(path, "wb") as fh:
            fh.write(header)
        flags = os.O_WRONLY | getattr(os, "O_DIRECT", 0)
        try:
            self.fd = os.open(path, flags)
        except OSError:  # no O_DIRECT here (tmpfs): plain writes
            self.fd = os.open(path, os.O_WRONLY)
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except OSError as exc:
            full = no_room(exc, path, self.size)
            if full is not None:
                self.abort()
                raise full from None
        self.buf = mmap.mmap(-1, self.CHUNK)  # page-aligned, as O_DIRECT needs
        self.fill, self.pos = 0, self.ALIGN

    def append(self, block: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(block, dtype=self.dtype)).cast("B")
        done = 0
        while done < len(data):
            k = min(len(data) - done, self.CHUNK - self.fill)
            self.buf[self.fill : self.fill + k] = data[done : done + k]
            self.fill += k
            done += k
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)

    def _flush(self, n: int) -> None:
        view = memoryview(self.buf)[:n]
        done = 0
        try:  # the views released even on a failed write (else the buffer cannot be closed)
            while done < n:
                with view[done:] as part:
                    k = _pwrite(self.fd, part, self.pos + done, self.path,
                                self.size - self.pos - done)
                if k <= 0:
                    raise OSError(f"could not write to {self.path}")
                done += k
        finally:
            view.release()
        self.pos += self.fill
        self.fill = 0

    def close(self) -> None:
        if self.fill:
            end = self.pos + self.fill
            self._flush(-(-self.fill // self.ALIGN) * self.ALIGN)
            self.pos = end
        os.ftruncate(self.fd, self.size)
        if self.pos != self.size:
            raise OSError(f"{self.path}: wrote {self.pos:,} bytes of {self.size:,}")
        self.abort()
        # Written past the page cache: have the kernel read the file back into it now, at the
        # disk's speed, in the background (the fit maps it; page faults one by one on a file
        # not in the cache read it a few pages at a time).
        if hasattr(os, "posix_fadvise"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        buf = getattr(self, "buf", None)
        if buf is not None:
            buf.close()
            self.buf = None


def _check_count(task: SubsetTask, n: int) -> None:
    if n != task.n_rows:
        raise DataError(f"The row groups of a subset ({task.pieces[0].shown}, ...) gave {n:,} "
                        f"rows where the files' metadata count {task.n_rows:,}: a file "
                        "changed while it was read; fit again.")


def _write(entry: tuple, at: int, block: np.ndarray) -> None:
    path, fd, offset, dtype, row = entry
    data = memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B")
    pos, done = offset + at * row, 0
    while done < len(data):  # a write may be short
        n = _pwrite(fd, data[done:], pos + done, path, len(data) - done)
        if n <= 0:
            raise OSError(f"could not write to {path}")
        done += n


def _pwrite(fd: int, data, at: int, path: str, left: int) -> int:
    """``os.pwrite``; a full disk (where the file system did not claim the file's blocks up
    front) is the same :class:`ResourceError` as when claiming them."""
    try:
        return os.pwrite(fd, data, at)
    except OSError as exc:
        full = no_room(exc, path, left, at_least=True)
        if full is not None:
            raise full from None
        raise


def _close(*entries) -> None:
    for e in entries:
        try:
            os.close(e[1])
        except OSError:
            pass


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


def check_subsets(backend, tasks: list[SubsetTask], shown: str, classes, y: str
                  ) -> tuple[list[Scanned], Standardizer]:
    """The first pass, on the workers: every subset's rows checked; their moments merged."""
    out = backend.map(check_subset, tasks)
    _raise_failed(out, "Reading a subset's row groups")
    parts = [o.value for o in out]
    std, counts = merge(parts, tasks[0].schema.output_names, shown)
    absent = [c for c, k in zip(classes, counts, strict=True) if k == 0]
    if absent:
        raise DataError(f"The level(s) {quote(absent)} never occur in {y!r}, so their "
                        "thresholds cannot be estimated; drop them from levels or add such rows.")
    return parts, std


def write_subsets(backend, tasks: list[SubsetTask]) -> list:
    """The second pass, on the workers: every subset written, standardised, to its files;
    placed with the backend. Nothing stays on disk after a failure."""
    files = [_ref(t) for t in tasks]
    try:
        out = backend.map(standardise_subset if tasks[0].fused else write_subset, tasks)
        _raise_failed(out, "Writing a subset")
        return backend.adopt([o.value for o in out])
    except BaseException:
        unlink_files(files)
        raise


def build_by_row_groups(backend, head, groups: list[RowGroup], division: list[list[int]]
                        ) -> tuple[list, np.ndarray, Standardizer]:
    """Have the workers check their subsets (``division``: row groups per subset), then,
    with the moments merged here, write them standardised; returns the placed shards, the
    subsets' sizes and the standardisation."""
    source = head.source
    folder, in_ram = subset_folder(backend, sum(groups[i].rows for d in division for i in d),
                                   head.schema.n_features)
    reader = source.row_group_reader()

    def tasks_in(folder: Path, fused: bool) -> list[SubsetTask]:
        return [SubsetTask(reader, tuple(groups[i] for i in gs), tuple(head.features), head.y,
                           head.schema, head.target, str(folder / uuid.uuid4().hex),
                           int(sum(groups[i].rows for i in gs)), fused=fused)
                for gs in division]

    def check(tasks: list[SubsetTask]):
        with progress.step("checking values", source.n_rows, "rows"):
            return check_subsets(backend, tasks, source.shown, head.target.classes, head.y)

    tasks = tasks_in(folder, in_ram)
    try:
        try:
            parts, std = check(tasks)
        except ResourceError:
            if not in_ram:
                raise
            # /dev/shm filled up after it was chosen (another fit writing there at the same
            # time): the subsets go to disk, as they would have had it been full at the start
            unlink_files([_ref(t) for t in tasks])
            tasks = tasks_in(backend.spill_folder(), False)
            parts, std = check(tasks)
        uneven_classes(parts, head.target.classes, source.shown)
    except BaseException:
        unlink_files([_ref(t) for t in tasks])
        raise
    with progress.step("writing subsets", source.n_rows, "rows"):
        refs = write_subsets(backend, [replace(t, std=std) for t in tasks])
    return refs, np.array([s.n for s in parts], dtype=np.int64), std


#: The largest relative difference between a class's share of a subset and of all rows for
#: which the subsets count as drawn from the same rows (differences come from files sorted or
#: grouped by the target; a random division differs by a few percent at most on small data).
CLASS_SHARE_TOLERANCE = 0.25
#: ... and a difference counts only beyond this many binomial standard deviations of the
#: subset's class count: a rare class's share of honest (shuffled) rows varies by more than
#: 25% from subset to subset by chance alone (60 rows expected: 13% is one standard deviation),
#: and a guard on the share alone refused such data (issue 18 review). Six standard deviations
#: over 10,000 subsets and classes are passed by chance about once in 50,000 fits;
#: files sorted by the target are hundreds of standard deviations off.
CLASS_SHARE_SIGMAS = 6.0


class UnevenClasses(FedgrainError):
    """The classes' shares differ between the subsets of whole row groups."""


def uneven_classes(parts: list[Scanned], classes, shown: str) -> None:
    """Raise :class:`UnevenClasses` when a class is missing from a subset, or its share of a
    subset is off its share of all rows by more than :data:`CLASS_SHARE_TOLERANCE` (relative)
    and by more than chance allows (:data:`CLASS_SHARE_SIGMAS` binomial standard deviations of
    the subset's count): the row groups then hold the classes unevenly, the files being sorted
    or grouped by the target, and subsets selected on the target estimate biased slopes."""
    counts = np.array([s.counts for s in parts], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = counts / rows
    overall = counts.sum(axis=0) / counts.sum()
    off = np.abs(share - overall) / overall
    sd = np.sqrt(rows * overall * (1.0 - overall))
    sigmas = np.abs(counts - rows * overall) / np.where(sd > 0, sd, 1.0)
    uneven = (off > CLASS_SHARE_TOLERANCE) & (sigmas > CLASS_SHARE_SIGMAS)
    if (counts == 0).any() or uneven.any():
        worst = np.where(counts == 0, np.inf, np.where(uneven, sigmas, -np.inf))
        m, k = np.unravel_index(np.argmax(worst), worst.shape)
        raise UnevenClasses(
            f"The row groups of '{shown}' hold the classes unevenly (sorted or grouped by the "
            f"target?): level {classes[k]!r} is {_share(share[m, k])} of subset {m} and "
            f"{_share(overall[k])} of all rows, and subsets of whole row groups would estimate "
            "biased slopes.")


def _share(x: float) -> str:
    """A share for messages, with enough digits to tell a rare class's shares apart."""
    return f"{100 * x:.3g}%"


#: Subsets go to RAM-backed ``/dev/shm`` when they take at most this share of the memory
#: available (and it has room): a disk's write-back is slower than reading the files.
SHM_SHARE = 0.5


def subset_folder(backend, n_rows: int, n_features: int) -> tuple[Path, bool]:
    """Where the workers write the subsets, and whether it is in RAM: the backend's folder
    in ``/dev/shm`` when the subsets fit well within the memory available, else on disk."""
    nbytes = n_rows * (n_features + 1) * 8
    from ..backends.processes import SHM, _free_bytes

    chosen = getattr(backend, "_temp_folder", None) is not None or \
        getattr(backend, "shared_folder", None) is not None  # a folder given: the user's choice
    if not chosen and nbytes <= SHM_SHARE * _available_memory() and SHM.is_dir() and \
            os.access(SHM, os.W_OK) and _free_bytes(SHM) >= nbytes * 1.05 + (64 << 20):
        return backend.spill_folder(in_ram=True), True
    return backend.spill_folder(), False


def _available_memory() -> int:
    """The memory available to this process: the system's (``MemAvailable``), and no more than
    its memory cgroup's limit leaves (a container's: ``/dev/shm`` pages are charged to it, and
    the system's figure is the whole machine's)."""
    avail = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


#: Where the memory cgroup's files are (cgroup v2 at the top, v1 under ``memory/``).
_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup can still take (its limit less its usage, plus the
    file pages it could drop), or None when it has no limit (or none is visible)."""
    for limit_f, usage_f, stat_f, key in (
            (_CGROUP / "memory.max", _CGROUP / "memory.current", _CGROUP / "memory.stat",
             "inactive_file"),
            (_CGROUP / "memory" / "memory.limit_in_bytes",
             _CGROUP / "memory" / "memory.usage_in_bytes", _CGROUP / "memory" / "memory.stat",
             "total_inactive_file")):
        try:
            text = limit_f.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit
                return None
            limit, usage = int(text), int(usage_f.read_text().strip())
        except (OSError, ValueError):
            continue
        inactive = 0
        try:
            for line in stat_f.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    inactive = int(value)
                    break
        except (OSError, ValueError):
            pass
        return max(0, limit - usage + inactive)
    return None


def check_division(division: str, owner: str) -> None:
    if division not in DIVISIONS:
        raise ParameterError(f"The 'division' parameter of {owner} must be one of "
                             f"{DIVISIONS}. Got {division!r} instead.")
