"""Subsets as views: workers read the caller's rows from a shared buffer instead of a copy.

A worker process cannot read the caller's private memory, so by default every subset's rows
are copied, standardised, into a shard (:mod:`fedgrain.federation.shards`): the data then take
about twice their size in RAM. When the caller's encoded rows already lie in a buffer other
processes can map -- a ``numpy.memmap`` or ``np.load(path, mmap_mode="r")`` of a ``.npy``
file (in ``/dev/shm`` or on disk), an array over a
``multiprocessing.shared_memory.SharedMemory``, or what :func:`shared_array` and
:func:`shared_rows` return -- the processes backend (and Dask's local cluster, whose workers
run on this machine) places each subset as a *view*: a file of
its row numbers (4 bytes a row), its class codes and weights, and a small description of the
buffer (:class:`~fedgrain.core.rowsource.SharedBuffer`) and of the global standardisation.
Each worker maps the buffer read-only and gathers and standardises its subset's rows block by
block inside every pass (:class:`~fedgrain.core.rowsource.SharedRows`); the fit is the same,
to the last bit, as with copied subsets.

Which buffer an array lies in is read from ``/proc/self/maps`` (Linux): the mapping that holds
the array's memory, its file and the offset in it. The mapping must be shared (a copy-on-write
map, ``mmap_mode="c"``, is private) and the file still in place; the rows C-ordered float64.
Anything else -- a private array, rows the encoding changed (categorical columns, another dtype)
-- keeps the copied subsets. The rows must not change while a fit runs.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._warnings import warn
from ..core.rowsource import SharedBuffer, SharedRows
from ..exceptions import DataError
from .base import FileShardRef, Shard, private_folder, unlink_files

__all__ = ["ViewShardRef", "find_shared", "place_views", "shared_array", "shared_rows"]


@dataclass(frozen=True, eq=False)
class ViewShardRef(FileShardRef):
    """A subset placed as a view: ``X`` is the file of its row numbers in ``buffer`` (not of
    rows), ``y`` and ``w`` its class codes and weights; ``mean`` and ``scale`` the global
    standardisation. :meth:`load` gives a :class:`~fedgrain.backends.base.Shard` whose ``X`` is
    a :class:`~fedgrain.core.rowsource.SharedRows`."""

    buffer: SharedBuffer = None  # type: ignore[assignment]
    mean: np.ndarray = None  # type: ignore[assignment]
    scale: np.ndarray = None  # type: ignore[assignment]

    def load(self) -> Shard:
        index = np.load(self.X, mmap_mode="r")
        return Shard(SharedRows(self.buffer.open(), index, self.mean, self.scale,
                                buffer=self.buffer),
                     np.load(self.y, mmap_mode="r"),
                     None if self.w is None else np.load(self.w, mmap_mode="r"))


def _maps():
    """``(start, end, perms, offset, device, inode, path)`` of this process's mappings.

    Read as bytes and decoded as Python decodes file names (``os.fsdecode``): a name that is
    not text in the locale's encoding must not stop a fit."""
    with open("/proc/self/maps", "rb") as fh:
        for raw in fh:
            parts = os.fsdecode(raw).split(None, 5)
            if len(parts) < 6:
                continue
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            major, minor = (int(v, 16) for v in parts[3].split(":"))
            yield lo, hi, parts[1], int(parts[2], 16), os.makedev(major, minor), \
                int(parts[4]), parts[5].rstrip("\n")


def find_shared(X) -> tuple[SharedBuffer | None, str]:
    """The shared buffer ``X`` lies in, or ``(None, why not)``.

    ``X`` must be a C-ordered float64 ``(n, p)`` array whose memory is a shared map of a file
    that other processes can open (see the module docstring).
    """
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        return None, "the rows are not a 2-D array"
    if X.dtype != np.float64 or not X.dtype.isnative:
        return None, f"the rows are {X.dtype}, not float64"
    if not X.flags.c_contiguous:
        return None, "the rows are not C-ordered (row after row)"
    if X.size == 0:
        return None, "no rows"
    start, stop = X.ctypes.data, X.ctypes.data + X.nbytes
    try:
        found = [m for m in _maps() if m[0] < stop and m[1] > start]
    except (OSError, ValueError):
        return None, "this system does not say which file a memory map holds (/proc/self/maps)"
    if not found:
        return None, "the rows are in private memory, not a map of a file"
    found.sort()
    lo, _, perms, offset, dev, inode, path = found[0]
    for prev, m in zip(found, found[1:], strict=False):  # one map, maybe split in pieces
        if m[0] != prev[1] or m[4:] != prev[4:] or m[3] - prev[3] != prev[1] - prev[0]:
            return None, "the rows span several memory maps"
    if found[0][0] > start or found[-1][1] < stop:
        return None, "the rows are only partly in a memory map"
    if not path.startswith("/") or inode == 0:
        return None, "the rows are private memory, not a map of a file"
    if path == "/dev/zero (deleted)" or path.startswith("/SYSV"):
        return None, "the rows are in anonymous shared memory, which no file name opens"
    if any("s" not in m[2] for m in found):
        return None, (f"the rows' map of {_shown(path)} is private (copy-on-write, as "
                      "mmap_mode='c' opens it): other processes would not see its changes; "
                      "open it with mmap_mode='r'")
    path, why = _file_of(path, inode, dev)
    if path is None:
        return None, why
    if not os.access(path, os.R_OK):
        return None, f"the rows' file {path} is not readable"
    return SharedBuffer(path, offset + (start - lo), (int(X.shape[0]), int(X.shape[1])),
                        inode, dev), ""


def _names(path: str) -> list[str]:
    """The file names a path of ``/proc/self/maps`` may stand for: the kernel writes a newline
    in a name as ``\\012`` and adds `` (deleted)`` to the name of a removed file (a name may
    also hold these characters itself)."""
    names = [path]
    if "\\012" in path:
        names.append(path.replace("\\012", "\n"))
    if path.endswith(" (deleted)"):
        names += [n[:-10] for n in names]
    return names


def _shown(path: str) -> str:
    return path[:-10] if path.endswith(" (deleted)") else path


def _file_of(path: str, inode: int, dev: int) -> tuple[str | None, str]:
    """The name of the mapped file (``inode`` on ``dev``) that ``path`` of
    ``/proc/self/maps`` stands for, or ``(None, why not)``."""
    other = error = None
    for name in _names(path):
        try:
            st = os.stat(name)
        except OSError as exc:
            error = error or exc
            continue
        if (st.st_ino, st.st_dev) == (inode, dev):
            return name, ""
        other = other or name
    if other is not None:
        return None, f"the rows' file {other} was replaced since it was mapped"
    if path.endswith(" (deleted)"):
        return None, f"the file of the rows' memory map, {_shown(path)}, was deleted"
    return None, f"the rows' file {path} cannot be opened ({error.strerror})"


def _mapped(X) -> bool:
    """Whether ``X`` (or an array it views) is a memory map: the caller meant to share it."""
    import mmap

    seen = 0
    while X is not None and seen < 32:
        if isinstance(X, (np.memmap, mmap.mmap)):
            return True
        X = getattr(X, "base", None) if not isinstance(X, memoryview) else X.obj
        seen += 1
    return False


def place_views(backend, X, codes: np.ndarray, weights: np.ndarray | None,
                labels: np.ndarray, n_subsets: int, standardizer) -> list | None:
    """Place the subsets as views when ``backend`` lets its workers map this machine's files
    (its ``view_folder`` gives a folder: the processes backend, Dask's local cluster) and ``X``
    lies in a shared buffer (:func:`find_shared`); None otherwise (then the caller copies the
    rows). A memory-mapped ``X`` that cannot be shared is copied with a warning
    that says why; with the backend's ``views=False`` every ``X`` is copied, without one."""
    folder_for = getattr(backend, "view_folder", None)
    if folder_for is None or not getattr(backend, "views", True) or \
            not isinstance(X, np.ndarray):
        return None
    buffer, why = find_shared(X)
    if buffer is None:
        if _mapped(X):
            warn(f"The rows are memory-mapped but the workers cannot read them there ({why}); "
                 "each subset's rows are copied instead (about twice the data's size in "
                 "memory).", UserWarning)
        return None
    sizes = np.bincount(labels, minlength=n_subsets)
    idx_type = np.int32 if X.shape[0] < 2**31 else np.int64
    per_row = np.dtype(idx_type).itemsize + np.dtype(np.intp).itemsize + \
        (8 if weights is not None else 0)
    folder = folder_for(int(sizes.sum()) * per_row)
    if folder is None:
        return None
    folder = Path(folder)
    refs: list[ViewShardRef] = []
    mean = np.array(standardizer.mean, dtype=np.float64)
    scale = np.array(standardizer.scale, dtype=np.float64)
    # every subset's rows in row order (as the copied shard's), from one stable sort
    order = np.argsort(labels, kind="stable").astype(idx_type, copy=False)
    ends = np.cumsum(sizes)
    try:
        for m in range(n_subsets):
            rows = order[ends[m] - sizes[m] : ends[m]]
            stem = folder / f"{os.urandom(16).hex()}"
            paths = [f"{stem}-rows.npy", f"{stem}-y.npy",
                     None if weights is None else f"{stem}-w.npy"]
            # the ref first: a failure below removes what was written
            refs.append(ViewShardRef(*paths, buffer=buffer, mean=mean, scale=scale))
            np.save(paths[0], rows.astype(idx_type))
            np.save(paths[1], np.asarray(codes[rows], dtype=np.intp))
            if weights is not None:
                np.save(paths[2], np.asarray(weights[rows], dtype=np.float64))
    except BaseException:
        unlink_files(refs)
        raise
    try:  # with the workers: the processes backend's map the files per task, Dask's hold them
        return backend.adopt(refs)
    except BaseException:
        unlink_files(refs)
        raise


def shared_array(shape, *, folder: str | os.PathLike | None = None) -> np.memmap:
    """A new, zeroed float64 array of ``shape`` in a file that worker processes can map: fill
    it with your rows and fit on it, and every subset is a view of it, not a copy.

    The file lies in a private folder in ``folder`` (``/dev/shm`` by default, which holds it
    in RAM; any folder this machine's processes can open will do) and is removed when the
    array (and every array viewing it) is gone, or at exit. Do not change the rows while a fit
    runs.

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain import DivideConquerOrdinal
    >>> from fedgrain.backends import shared_array
    >>> X = shared_array((4000, 3))
    >>> X[:] = np.random.default_rng(0).standard_normal((4000, 3))
    >>> y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 1)
    >>> DivideConquerOrdinal(n_subsets=2, n_jobs=2).fit(X, y).n_subsets_
    2
    """
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if len(shape) != 2 or min(shape) < 1:
        raise DataError(f"shared_array needs a shape (rows, columns) of at least one each; "
                        f"got {shape}.")
    base = Path(folder) if folder is not None else Path("/dev/shm")
    if folder is None and not (base.is_dir() and os.access(base, os.W_OK)):
        import tempfile

        base = Path(tempfile.gettempdir())
    if not base.is_dir():
        raise DataError(f"shared_array: the folder {base} does not exist.")
    nbytes = shape[0] * shape[1] * 8
    st = os.statvfs(base)
    if st.f_bavail * st.f_frsize < nbytes + (64 << 20):
        raise DataError(f"shared_array: {base} has {st.f_bavail * st.f_frsize / 2**20:,.0f} MB "
                        f"free; the rows need {nbytes / 2**20:,.0f} MB. Pass another folder.")
    where = private_folder("", base)
    path = where / "rows.npy"
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)
    except BaseException:
        _remove(str(where))
        raise
    weakref.finalize(arr, _remove, str(where))
    return arr


def shared_rows(X, *, folder: str | os.PathLike | None = None) -> np.memmap:
    """A read-only copy of ``X``'s rows in a file worker processes can map
    (:func:`shared_array`): fit on it and drop ``X``, and the fit's subsets are views of it,
    so the data are in memory once, not twice. ``X`` is any 2-D numeric array(-like) of
    features already encoded as the fit uses them (categorical columns are encoded, and so
    copied, by the fit)."""
    src = np.asarray(X)
    if src.ndim != 2:
        raise DataError(f"shared_rows needs a 2-D array of rows; got shape {src.shape}.")
    if src.dtype.kind not in "biuf":
        raise DataError(f"shared_rows needs numeric rows; got dtype {src.dtype}.")
    out = shared_array(src.shape, folder=folder)
    step = max(1, (1 << 24) // max(1, src.shape[1] * 8))
    for a in range(0, src.shape[0], step):  # in blocks: no second full copy on the way
        out[a : a + step] = src[a : a + step]
    out.flush()
    out.flags.writeable = False
    return out


def _remove(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
