"""What every backend provides.

A backend runs tasks on workers and keeps subsets' data where the tasks run:

- ``reserve(nbytes)`` announces the total size of the shards about to be placed, so a backend
  short of room fails before writing anything;
- ``allocate(n_rows, n_features, weighted)`` gives writable destination arrays for one subset;
  the caller fills them (in row blocks, so nothing is copied twice) and hands them to
- ``put(shard)``, which places the subset with the workers and returns a small, picklable
  :class:`ShardRef`. Tasks carry refs, never data, so a loop of many rounds moves only
  parameters; ``ref.load()`` on the worker gives the :class:`Shard` back.
- ``map(fn, tasks, work=...)`` runs ``fn(task)`` for every task and returns one :class:`Outcome`
  per task, in task order, holding the value or the failure (failures are data, as in Flower:
  the caller decides whether one failed subset is fatal). ``work`` is an optional estimate of
  the total cost (about rows x d^2 summed over tasks); a backend may run small work in the
  calling process, where starting or feeding workers would cost more than the work itself.
- ``map_bundles(fn, tasks, bundles, work=...)`` runs the tasks grouped as a scheduler assigned
  them to workers (:mod:`fedgrain.federation.schedule`): one backend task per bundle, which runs its
  tasks in turn; still one :class:`Outcome` per task, in task order.
- ``writer(sizes, n_features, weighted, spill=False)`` gives a :class:`ShardWriter` that fills
  all the shards of a partition from row blocks in one pass over the data (rows keep their order
  within each shard) and places them with ``finish()``. With ``spill=True`` (data larger than
  memory) the shards are written to files as they fill, so the caller never holds them.
- ``release(refs)`` frees placed subsets; ``close()`` releases everything.

Seeds travel inside tasks, and tasks run with one BLAS thread, so all backends return
bit-identical results.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import tempfile
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._process import left_by_dead, leftovers, owner_tag
from ..exceptions import ResourceError

#: Spill folders of this process, removed at exit if a backend was never closed.
_SPILLED: set[Path] = set()

#: Temporary folders are named ``fedgrain-PID-...`` / ``fedgrain-spill-PID-...``: a later run
#: removes those of processes that no longer run (killed with SIGKILL, or a lost machine).
_OURS = re.compile(r"fedgrain-(?:spill-)?(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-\w{8}")


def private_folder(kind: str, base: str | os.PathLike | None = None) -> Path:
    """A new private temporary folder ``fedgrain-[spill-]PID-...`` in ``base`` (the system's
    temporary folder by default), after removing what dead fedgrain processes left there."""
    base = Path(base) if base is not None else Path(tempfile.gettempdir())
    sweep_dead(base)
    prefix = "fedgrain-" + (f"{kind}-" if kind else "") + f"{owner_tag()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


#: A dead process's temporary folder is removed once it is this old (seconds): a folder just
#: made by a process this one cannot see is never at risk.
SWEEP_AGE = 60.0


def sweep_dead(base: Path) -> None:
    """Remove the temporary folders of fedgrain processes that no longer run from ``base``."""
    for path, m, age in leftovers(base, _OURS):
        if left_by_dead(m["host"], m["pid"]) and age >= SWEEP_AGE:
            shutil.rmtree(path, ignore_errors=True)


_WATCHING = False


def watch_parent(parent: int) -> None:
    """In a worker process: exit as soon as ``parent`` is gone (checked every half second),
    so workers of a killed fit do not live on. Started once per worker; nothing when called in
    ``parent`` itself."""
    global _WATCHING
    if _WATCHING or os.getpid() == parent:
        return
    _WATCHING = True
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:  # re-parented: the parent died (a zombie counts)
                os._exit(1)

    threading.Thread(target=watch, name="fedgrain-parent-watch", daemon=True).start()


def run_worker_task(fn: Callable[[Any], Any], index: int, task: Any, parent: int) -> Outcome:
    """:func:`run_task` in a worker process that exits when ``parent`` dies."""
    watch_parent(parent)
    return run_task(fn, index, task)


@atexit.register
def _remove_spilled() -> None:
    for folder in list(_SPILLED):
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Shard:
    """One subset's rows: standardised features, class codes and optional weights."""

    X: np.ndarray
    y: np.ndarray
    w: np.ndarray | None


#: The alignment of the arrays the workers compute on: the vector kernels of BLAS handle the
#: elements before the first aligned one apart, so the order of a sum (and its last bits) can
#: depend on an array's address.
ALIGNMENT = 64


def aligned(a: np.ndarray | None) -> np.ndarray | None:
    """``a`` at an address that is a multiple of :data:`ALIGNMENT` bytes: itself when it is,
    else an aligned copy (as a shard arrives on a worker, once)."""
    if a is None or (a.ctypes.data % ALIGNMENT == 0 and a.flags.c_contiguous):
        return a
    out = empty_aligned(a.shape, a.dtype)
    out[...] = a
    return out


def empty_aligned(shape, dtype=np.float64) -> np.ndarray:
    """An uninitialised array at an address that is a multiple of :data:`ALIGNMENT` bytes."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-buf.ctypes.data) % ALIGNMENT
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def allocate_shard(n_rows: int, n_features: int, weighted: bool) -> Shard:
    """Writable aligned arrays for one shard held in this process (float64 X, intp y, float64
    w or None), as the backends' ``allocate``."""
    return Shard(empty_aligned((n_rows, n_features)), empty_aligned(n_rows, np.intp),
                 empty_aligned(n_rows) if weighted else None)


def aligned_shard(X: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> Shard:
    """A shard whose arrays are aligned (what a shard sent over the network unpickles to)."""
    return Shard(aligned(X), aligned(y), aligned(w))


class ShardRef(ABC):
    """Picklable handle of a placed shard."""

    @abstractmethod
    def load(self) -> Shard:
        """Return the shard's arrays (on the worker that runs the task)."""


@dataclass(frozen=True)
class FileShardRef(ShardRef):
    """A shard in ``.npy`` files, opened memory-mapped and read-only by the worker."""

    X: str
    y: str
    w: str | None

    def load(self) -> Shard:
        return Shard(
            np.load(self.X, mmap_mode="r"),
            np.load(self.y, mmap_mode="r"),
            None if self.w is None else np.load(self.w, mmap_mode="r"),
        )

    def paths(self) -> list[str]:
        return [p for p in (self.X, self.y, self.w) if p is not None]


def unlink_files(refs: Sequence[ShardRef]) -> None:
    """Delete the files of the file shards among ``refs``."""
    for ref in refs:
        if isinstance(ref, FileShardRef):
            for p in ref.paths():
                Path(p).unlink(missing_ok=True)


@dataclass(frozen=True)
class Outcome:
    """Result of one task: ``value`` when it succeeded, ``error`` (one line) when it failed."""

    index: int
    value: Any = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_task(fn: Callable[[Any], Any], index: int, task: Any) -> Outcome:
    """Run one task and turn an exception into a failed :class:`Outcome` (runs on the worker)."""
    try:
        return Outcome(index, fn(task))
    except Exception as exc:  # noqa: BLE001 - failures are returned, not raised, by design
        return Outcome(
            index, None, str(exc) or type(exc).__name__, type(exc).__name__,
            traceback.format_exc(),
        )


def run_bundle(bundle: tuple[Callable[[Any], Any], list[tuple[int, Any]]]) -> list[Outcome]:
    """Run a bundle of tasks in turn on one worker; each failure stays with its own task."""
    fn, items = bundle
    return [run_task(fn, i, t) for i, t in items]


class Backend(ABC):
    """Runs tasks over placed subsets. Use as a context manager, or call :meth:`close`.

    Examples
    --------
    The protocol in use: place a shard, run tasks on it, release it.

    >>> import numpy as np
    >>> from fedgrain.backends import SerialBackend
    >>> with SerialBackend() as backend:
    ...     writer = backend.writer([3], n_features=2, weighted=False)
    ...     writer.write(np.zeros(3, dtype=int), np.ones((3, 2)), np.array([0, 1, 1]))
    ...     (ref,) = writer.finish()
    ...     out = backend.map(lambda t: float(t["shard"].load().X.sum()), [{"shard": ref}])
    >>> out[0].ok, out[0].value
    (True, 6.0)
    """

    name: str = "base"

    @property
    @abstractmethod
    def n_workers(self) -> int:
        """How many tasks can run at once."""

    @abstractmethod
    def allocate(self, n_rows: int, n_features: int, weighted: bool) -> Shard:
        """Writable arrays for one shard (float64 X, intp y, float64 w or None)."""

    @abstractmethod
    def put(self, shard: Shard) -> ShardRef:
        """Place a filled shard with the workers and return its handle."""

    @abstractmethod
    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, work: float | None = None
    ) -> list[Outcome]:
        """Run ``fn`` on every task; one outcome per task, in order."""

    def map_bundles(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], bundles: Sequence[Sequence[int]],
        *, work: float | None = None,
    ) -> list[Outcome]:
        """Run ``fn`` on every task, the tasks of each bundle in turn on one worker.

        ``bundles`` lists task indices per worker (every task in exactly one bundle). A bundle
        that fails as a whole (its worker lost) fails each of its tasks.
        """
        from ..progress import tick

        packed = [(fn, [(i, tasks[i]) for i in b]) for b in bundles]
        out: list[Outcome | None] = [None] * len(tasks)
        for b, res in zip(bundles, self.imap(run_bundle, packed, work=work), strict=True):
            tick(len(b))
            for i, o in zip(b, res.value if res.ok else [res] * len(b), strict=True):
                out[i] = o if res.ok else Outcome(i, None, res.error, res.error_type,
                                                 res.traceback)
        if any(o is None for o in out):
            raise ValueError("every task must be in exactly one bundle")
        return out  # type: ignore[return-value]

    def imap(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *,
             work: float | None = None):
        """:meth:`map` as an iterator: outcomes in task order, each as soon as it is known."""
        yield from self.map(fn, tasks, work=work)

    def writer(self, sizes: Sequence[int], n_features: int, weighted: bool, *,
               spill: bool = False) -> ShardWriter:
        """A :class:`ShardWriter` for shards of ``sizes`` rows (see the module docstring)."""
        if spill:
            return FileShardWriter(self, self.spill_folder(), sizes, n_features, weighted)
        return ShardWriter(self, sizes, n_features, weighted)

    def spill_folder(self, in_ram: bool = False) -> Path:
        """A private folder on disk for shards too large for memory (removed by ``close``, or
        at exit): in the backend's ``temp_folder`` when it has one, else the system's; with
        ``in_ram``, in RAM-backed ``/dev/shm`` (for shards the workers write themselves)."""
        attr = "_spill_ram" if in_ram else "_spill"
        folder = getattr(self, attr, None)
        if folder is None:
            base = Path("/dev/shm") if in_ram else \
                getattr(self, "_temp_folder", None) or getattr(self, "shared_folder", None)
            folder = private_folder("spill", base)
            _SPILLED.add(folder)
            setattr(self, attr, folder)
        return folder

    def adopt(self, refs: list[FileShardRef]) -> list[ShardRef]:
        """Place shards written to files (by a spilling writer); by default workers map them."""
        return list(refs)

    def remove_spill(self) -> None:
        for attr in ("_spill", "_spill_ram"):
            folder = getattr(self, attr, None)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
                _SPILLED.discard(folder)
                setattr(self, attr, None)

    def reserve(self, nbytes: int) -> None:  # noqa: B027 - optional hook
        """Announce that shards totalling ``nbytes`` will be placed (fail early if no room)."""

    def release(self, refs: Sequence[ShardRef]) -> None:
        """Free placed shards (by default: delete the files of spilled ones)."""
        unlink_files(refs)

    def close(self) -> None:
        """Release everything this backend holds."""
        self.remove_spill()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Fills the shards of a partition from row blocks, in one pass over the data.

    ``write(labels, X, y, w)`` takes a block of standardised rows and the shard (position) of
    each; rows keep their order within every shard, so shards are the same however the data
    were cut into blocks. ``finish()`` checks that every shard is full and places them.
    """

    def __init__(self, backend: Backend, sizes: Sequence[int], n_features: int,
                 weighted: bool):
        self.backend = backend
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.n_features, self.weighted = n_features, weighted
        self.filled = np.zeros_like(self.sizes)
        self._open()

    def _open(self) -> None:
        self._shards = [self.backend.allocate(int(n), self.n_features, self.weighted)
                        for n in self.sizes]

    def _put(self, m: int, at: int, X: np.ndarray, y: np.ndarray, w) -> None:
        shard = self._shards[m]
        k = X.shape[0]
        shard.X[at : at + k] = X
        shard.y[at : at + k] = y
        if shard.w is not None:
            shard.w[at : at + k] = w

    def write(self, labels: np.ndarray, X: np.ndarray, y: np.ndarray,
              w: np.ndarray | None = None) -> None:
        labels = np.asarray(labels)
        counts = np.bincount(labels, minlength=self.sizes.shape[0])
        if (self.filled + counts > self.sizes).any():
            raise ValueError("more rows written to a shard than its size")
        order = np.argsort(labels, kind="stable")
        ends = np.cumsum(counts)
        for m in np.flatnonzero(counts):
            rows = order[ends[m] - counts[m] : ends[m]]
            self._put(int(m), int(self.filled[m]), X[rows], y[rows],
                      None if w is None else w[rows])
        self.filled += counts

    def finish(self) -> list[ShardRef]:
        if (self.filled != self.sizes).any():
            raise ValueError("a shard was not filled: the blocks did not cover the rows")
        refs: list[ShardRef] = []
        try:
            for shard in self._shards:
                refs.append(self.backend.put(shard))
        except BaseException:
            self.backend.release(refs)
            raise
        self._shards = []
        return refs

    def abort(self) -> None:
        """Drop what was written (after a failure)."""
        self._shards = []


class FileShardWriter(ShardWriter):
    """Writes each shard to ``.npy`` files in ``folder`` as blocks arrive, with plain writes at
    offsets (no memory map), so the caller's memory stays at one block whatever the size."""

    def __init__(self, backend: Backend, folder: Path, sizes: Sequence[int], n_features: int,
                 weighted: bool):
        self.folder = Path(folder)
        super().__init__(backend, sizes, n_features, weighted)

    def _open(self) -> None:
        self._files: list[dict] = []
        try:
            for n in self.sizes:
                stem = self.folder / uuid.uuid4().hex
                parts = {"X": (np.float64, (int(n), self.n_features)),
                         "y": (np.intp, (int(n),))}
                if self.weighted:
                    parts["w"] = (np.float64, (int(n),))
                entry: dict = {}
                self._files.append(entry)  # before its files: abort() sees a partial entry
                for key, (dtype, shape) in parts.items():
                    entry[key] = _new_npy(f"{stem}-{key}.npy", dtype, shape)
        except BaseException:
            self.abort()
            raise

    def _put(self, m: int, at: int, X: np.ndarray, y: np.ndarray, w) -> None:
        entry = self._files[m]
        for key, block in (("X", X), ("y", y), ("w", w)):
            if key in entry:
                path, fd, offset, dtype, row = entry[key]
                data = memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B")
                pos, done = offset + at * row, 0
                while done < len(data):  # a write may be short (2 GiB cap, network mounts)
                    n = os.pwrite(fd, data[done:], pos + done)
                    if n <= 0:
                        raise OSError(errno.EIO, f"could not write to {path}")
                    done += n

    def _refs(self) -> list[FileShardRef]:
        return [FileShardRef(e["X"][0], e["y"][0], e["w"][0] if "w" in e else None)
                for e in self._files]

    def _paths(self) -> list[str]:
        return [part[0] for e in self._files for part in e.values()]

    def _close_files(self) -> None:
        for entry in self._files:
            for _path, fd, *_ in entry.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def finish(self) -> list[ShardRef]:
        if (self.filled != self.sizes).any():
            raise ValueError("a shard was not filled: the blocks did not cover the rows")
        self._close_files()
        refs = self._refs()
        self._files = []
        try:
            return self.backend.adopt(refs)
        except BaseException:
            unlink_files(refs)
            raise

    def abort(self) -> None:
        self._close_files()
        for path in self._paths():
            Path(path).unlink(missing_ok=True)
        self._files = []


def no_room(exc: OSError, path: str | os.PathLike, nbytes: float | None = None,
            at_least: bool = False) -> ResourceError | None:
    """The :class:`ResourceError` of a full disk or an exhausted quota met while writing a
    subset's file ``path`` (``nbytes`` still to write), or None when ``exc`` is another error."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    more = "" if nbytes is None else \
        f" ({'at least ' if at_least else ''}{max(nbytes, 1) / 2**20:,.0f} MB more needed)"
    return ResourceError(f"No room left for the subsets in {Path(path).parent}{more}; free "
                         "space, or pass another temp_folder.")


def _new_npy(path: str, dtype, shape: tuple) -> tuple:
    """Create a ``.npy`` file of ``shape`` with its blocks claimed; (path, fd, data offset,
    dtype, bytes a row). A full disk is a :class:`ResourceError` here, not a crash later."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        offset = fh.tell()
    row = int(np.dtype(dtype).itemsize * (shape[1] if len(shape) > 1 else 1))
    fd = os.open(path, os.O_RDWR)
    size = offset + row * shape[0]
    try:
        try:
            if not hasattr(os, "posix_fallocate"):  # pragma: no cover - no fallocate here
                raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            full = no_room(exc, path, size)
            if full is not None:
                raise full from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)  # a file system without fallocate: a sparse file
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    return path, fd, offset, dtype, row
