"""The processes backend: local worker processes through joblib's loky executor.

Shards are written once to memory-mapped ``.npy`` files in a private temporary folder (in
``/dev/shm`` when it has room for all of them, so they live in RAM) and workers map them
read-only: a subset is
copied exactly once, however many rounds use it, and a task pickles only file names and
parameters. The loky executor is reused across calls, so worker start-up is paid once a session.

Rows that already lie in a buffer the workers can map (a memory-mapped file, shared memory)
are not copied at all: each subset is placed as a view of them (:mod:`fedgrain.backends.views`).
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, cpu_count, delayed

from .._process import quiet_resource_trackers
from ..exceptions import ParameterError, ResourceError
from .base import (
    Backend,
    FileShardRef,
    FileShardWriter,
    Outcome,
    Shard,
    ShardRef,
    ShardWriter,
    no_room,
    private_folder,
    run_task,
    run_worker_task,
    unlink_files,
)

SHM = Path("/dev/shm")
#: Below this much work (rows x d^2 over all tasks; 2e7 is about 20 ms of Gram matrices) tasks run
#: in the calling process: results are identical, and a cold start of the workers costs seconds.
MIN_PARALLEL_WORK = 2e7


def resolve_n_jobs(n_jobs: int | None) -> int:
    """Worker count for ``n_jobs`` as in joblib: None is every usable CPU, -2 all but one."""
    cpus = cpu_count()
    if n_jobs is None:
        return cpus
    if n_jobs < 0:
        return max(1, cpus + 1 + n_jobs)
    return max(1, int(n_jobs))


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


#: Shard folders of this process, removed at exit if a backend was never closed.
_LIVE: set[Path] = set()


@atexit.register
def _remove_live_folders() -> None:
    for folder in list(_LIVE):
        shutil.rmtree(folder, ignore_errors=True)


def shard_folder(nbytes: int, temp_folder: str | None = None) -> Path:
    """A new private folder for shards totalling ``nbytes``: in ``temp_folder`` if given, else
    in ``/dev/shm`` (RAM) when it has room, else in the system's temporary folder.

    Raises :class:`~fedgrain.exceptions.ResourceError` when no candidate has room; checking up
    front matters because writing through a memory map to a full tmpfs kills the process
    (SIGBUS) instead of raising.
    """
    need = int(nbytes * 1.05) + (64 << 20)  # headroom for the file system's own use
    if temp_folder is not None:
        candidates = [Path(temp_folder)]
    else:
        shm_ok = SHM.is_dir() and os.access(SHM, os.W_OK)
        candidates = ([SHM] if shm_ok else []) + [Path(tempfile.gettempdir())]
    for base in candidates:
        if _free_bytes(base) >= need:
            folder = private_folder("", base)
            _LIVE.add(folder)
            return folder
    room = ", ".join(f"{b} has {_free_bytes(b) / 2**20:,.0f} MB free" for b in candidates)
    raise ResourceError(
        f"The subsets need {nbytes / 2**20:,.0f} MB of temporary space, but {room}. Free "
        "space, pass a larger folder as temp_folder, or use backend='serial'."
    )


def check_views(views) -> bool:
    """The backends' ``views`` option, checked."""
    if not isinstance(views, (bool, np.bool_)):
        raise ParameterError(f"views={views!r}: give True (rows already in a shared buffer "
                             "are placed as views, not copied) or False (always copy them).")
    return bool(views)


def remove_folder(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        _LIVE.discard(folder)


class ProcessesBackend(Backend):
    """Local worker processes (loky).

    Parameters
    ----------
    n_jobs : int or None
        Number of worker processes; None means every CPU this process may use, negative values
        count back from it as in joblib (-1: all, -2: all but one).
    temp_folder : str or None
        Where shard files go; by default ``/dev/shm`` when it has room for all of them, else
        the system's temporary folder.
    retries : int
        How many times the tasks of a worker process that died (killed, out of memory) are run
        again on fresh workers; tasks are pure, so the result is the same. After that, a
        :class:`~fedgrain.exceptions.ResourceError`.
    views : bool
        Whether rows that already lie in a buffer the workers can map (a memory-mapped file,
        shared memory, :func:`fedgrain.shared_rows`) are placed as views, not copied
        (:mod:`fedgrain.backends.views`; default True). Views keep the data in memory once, but
        every pass gathers and standardises its rows: the fit takes longer, most at small p
        (about a third longer at p = 20, docs/benchmarks.md). ``views=False`` copies the
        subsets as for any array: faster where memory allows a second copy of the rows. The
        model is the same either way.

    Examples
    --------
    One backend for several fits keeps its worker processes warm:

    >>> from fedgrain import DivideConquerOrdinal
    >>> from fedgrain.backends import ProcessesBackend
    >>> from fedgrain.datasets import make_ordinal
    >>> X, y, *_ = make_ordinal(4000, 3, 3, random_state=0)
    >>> with ProcessesBackend(n_jobs=2) as backend:
    ...     a = DivideConquerOrdinal(n_subsets=2, backend=backend).fit(X, y)
    ...     b = DivideConquerOrdinal(n_subsets=4, backend=backend).fit(X, y)
    >>> a.n_subsets_, b.n_subsets_
    (2, 4)
    """

    name = "processes"

    def __init__(self, n_jobs: int | None = None, temp_folder: str | None = None,
                 retries: int = 3, views: bool = True):
        self._n = resolve_n_jobs(n_jobs)
        self._temp_folder = temp_folder
        if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or \
                retries < 0:
            raise ParameterError(f"retries={retries!r}: give a whole number >= 0 (how often "
                                 "the tasks of a dead worker are sent again).")
        self.retries = int(retries)
        self.views = check_views(views)
        self.resent_ = 0  # tasks run again after their worker died
        self._dir: Path | None = None

    @property
    def n_workers(self) -> int:
        return self._n

    def reserve(self, nbytes: int) -> None:
        """Choose the folder for shards totalling ``nbytes``: RAM-backed when it has room.

        Raises :class:`~fedgrain.exceptions.ResourceError` when no candidate has room; checking
        up front matters because writing through a memory map to a full tmpfs kills the process
        (SIGBUS) instead of raising.
        """
        if self._dir is None:
            self._dir = shard_folder(nbytes, self._temp_folder)

    def allocate(self, n_rows: int, n_features: int, weighted: bool) -> Shard:
        self.reserve(n_rows * (n_features + 2) * 8)
        stem = self._dir / uuid.uuid4().hex

        def mm(suffix, shape, dtype):
            path = f"{stem}-{suffix}.npy"
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            _claim(path)
            return arr

        return Shard(
            mm("X", (n_rows, n_features), np.float64),
            mm("y", (n_rows,), np.intp),
            mm("w", (n_rows,), np.float64) if weighted else None,
        )

    def put(self, shard: Shard) -> ShardRef:
        for a in (shard.X, shard.y, shard.w):
            if a is not None:
                a.flush()
        return FileShardRef(
            shard.X.filename, shard.y.filename, None if shard.w is None else shard.w.filename
        )

    def writer(self, sizes, n_features: int, weighted: bool, *,
               spill: bool = False) -> ShardWriter:
        """Shards go straight to their files, with no memory map in this process: in the shard
        folder (RAM-backed when it has room), or on disk when ``spill`` (data beyond memory)."""
        sizes = [int(n) for n in sizes]
        if spill:
            folder = self.spill_folder()
        else:
            self.reserve(sum(sizes) * (n_features + 2) * 8)
            folder = self._dir
        return FileShardWriter(self, folder, sizes, n_features, weighted)

    # Hook (backends/views.py): the workers run on this machine and can map its files, so
    # subsets of rows in a shared buffer are placed as views, their small files in here.
    def view_folder(self, nbytes: int) -> Path | None:
        """The shard folder, with room for ``nbytes`` more (views' row numbers and codes);
        None (copy the rows) with ``views=False``."""
        if not self.views:
            return None
        self.reserve(nbytes)
        return self._dir

    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, work: float | None = None
    ) -> list[Outcome]:
        return list(self.imap(fn, tasks, work=work))

    def imap(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *,
             work: float | None = None):
        n_jobs = min(self._n, len(tasks))
        if n_jobs <= 1 or (work is not None and work < MIN_PARALLEL_WORK):
            for i, t in enumerate(tasks):
                yield run_task(fn, i, t)
            return
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        quiet_resource_trackers(loky=True)
        me, done = os.getpid(), 0
        for attempt in range(self.retries + 1):
            try:  # outcomes already given stand; the others run again on fresh workers
                outcomes = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator")(
                    delayed(run_worker_task)(fn, i, tasks[i], me)
                    for i in range(done, len(tasks)))
                # the executor has started (joblib dispatches the first tasks before it
                # returns the generator), so loky's exit hook is in place: ours goes after it
                _stop_workers_at_exit()
                for out in outcomes:
                    done += 1
                    yield out
                return
            except TerminatedWorkerError as exc:
                if attempt == self.retries:
                    codes = re.search(r"\{.*\}", str(exc))
                    raise ResourceError(
                        f"Worker processes died {attempt + 1} times during the fit (exit codes "
                        f"{codes[0] if codes else 'unknown'}): killed, or out of memory? Use "
                        "fewer workers (n_jobs, --workers) or free memory, and fit again."
                    ) from None
                self.resent_ += len(tasks) - done

    def release(self, refs: Sequence[ShardRef]) -> None:
        unlink_files(refs)

    def close(self) -> None:
        self.remove_spill()
        remove_folder(self._dir)
        self._dir = None


_STOPPING = False


def _stop_workers_at_exit() -> None:
    """At the interpreter's exit, stop loky's worker processes instead of waiting for them.

    loky waits for each worker to take its stop message from the shared task queue; a worker
    killed while it held that queue's lock (idle workers wait on it) leaves the others unable
    to read theirs, and the exit hangs until loky's idle timeout (300 s). Registered once, as
    soon as the first parallel batch has started its executor (which registers loky's own exit
    hook), so it runs before loky's: a program stopped during its first batch is covered too."""
    global _STOPPING
    register = getattr(threading, "_register_atexit", None)
    if _STOPPING or register is None:
        return
    _STOPPING = True

    def stop() -> None:
        # Hooks of this kind run before the interpreter waits for its other threads: wait
        # for them first, as it would, so that work they still do on the pool is not killed.
        # Not waited for: loky's manager thread (it ends with the executor) and the workers
        # of thread pools (they end when concurrent.futures' own exit hook runs, after this
        # one: waiting for them here would never end).
        from concurrent.futures import thread as pool_threads

        me = threading.current_thread()
        for thread in threading.enumerate():
            if thread is me or thread.daemon or not thread.is_alive() or \
                    type(thread).__module__.startswith("joblib.externals.loky") or \
                    getattr(thread, "_target", None) is pool_threads._worker:
                continue
            thread.join()
        from joblib.externals.loky import reusable_executor

        executor = getattr(reusable_executor, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, kill_workers=True)

    register(stop)


def _claim(path: str) -> None:
    """Allocate a new file's blocks now, so a full disk is an error here, not a crash later."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            full = no_room(exc, path)
            if full is not None:
                raise full from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
