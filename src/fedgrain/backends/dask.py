"""The Dask backend: subsets live on the workers of a Dask cluster for the whole fit.

With no address, a ``LocalCluster`` of worker processes is started on 127.0.0.1 (one thread
each, no dashboard) and stopped with the backend; with ``scheduler="tcp://host:port"`` an
existing cluster is used and left running. Each subset is scattered once to one worker and
stays there: tasks carry the subset's future, which Dask resolves on the worker that holds it,
so a round of tasks moves parameters only. Bundles of tasks (:meth:`map_bundles`) run on the
worker that holds their subsets. Tasks run with one BLAS thread, so the numbers are the same as
on the other backends.

Where the workers can read this machine's files (the local cluster, or ``shared_folder`` for
a cluster started elsewhere), shards are written once to files (in RAM-backed ``/dev/shm`` when
it has room; on disk for data beyond memory) and each worker maps its own, as local processes
do; the shard stays on that worker. Otherwise shards are scattered from here (data beyond
memory are read back from their spill files and sent one at a time).

Faults: a worker that dies takes its shards with it. Tasks that fail because of that are sent
again (``retries`` times) after their shards are placed again on a live worker: scattered
shards from the copy kept here, file shards by loading them anew. A lost scheduler is a
:class:`~fedgrain.exceptions.FedgrainError` naming it, not a hang.

Needs the ``dask`` extra: ``pip install 'fedgrain[dask]'``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._process import quiet_resource_trackers
from ..exceptions import DataError, FedgrainError
from ..progress import tick
from .base import (
    Backend,
    FileShardRef,
    FileShardWriter,
    Outcome,
    Shard,
    ShardRef,
    aligned_shard,
    allocate_shard,
    run_bundle,
    unlink_files,
)

#: While a task runs, the scheduler is asked to answer this often (seconds).
PING_SECONDS = 5.0

#: How often a request to the scheduler checks that the client is still connected (seconds).
WATCH_SECONDS = 0.2

#: Sending a shard from here may take ``timeout`` plus its bytes at this rate before the
#: scheduler counts as silent.
MIN_BYTES_PER_SECOND = 20e6

#: The Dask setting that names the allocator variable its nanny sets in worker processes.
TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def _distributed():
    try:
        import dask.distributed as dd
    except ImportError:
        raise FedgrainError(
            "backend='dask' needs Dask's distributed scheduler, which is not installed; run "
            "pip install 'fedgrain[dask]'."
        ) from None
    return dd


class DaskShardRef(ShardRef):
    """A subset placed on one worker: its future, the worker's address, and where it came from
    (the shard kept here, or its files), to place it again if the worker dies."""

    def __init__(self, future, worker: str, source: Shard | FileShardRef):
        self.future = future
        self.worker = worker
        self.source = source

    def load(self) -> Shard:  # on a worker the future has become the shard itself
        raise RuntimeError("a Dask shard is resolved by Dask on the worker that holds it")


#: A Dask scheduler's first message (its handshake) is far below this many bytes.
HANDSHAKE_MAX = 1 << 24


def _probe_scheduler(address: str, timeout: float) -> None:
    """Check that ``address`` answers as a Dask scheduler before a client talks to it.

    A Dask scheduler sends its handshake as soon as a connection opens: eight bytes of message
    length first. A server of another kind sends nothing (an HTTP server waits for a request;
    a Dask client would then wait for ever) or other bytes (which a Dask client reads as a
    frame length, and tries to allocate: exabytes). Either is refused here, within
    ``timeout``, with a message that says so. Addresses other than TCP are not probed.
    """
    import socket
    import struct

    text = address.strip()
    if "://" in text and not text.startswith("tcp://"):
        return
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        return  # let Dask word its own complaint about the address
    host = host.strip("[]")
    import time

    deadline = time.monotonic() + timeout
    while True:  # a scheduler still starting refuses connections for a moment, as Dask allows
        try:
            sock = socket.create_connection((host, int(port)),
                                            timeout=max(deadline - time.monotonic(), 0.1))
            break
        except (ConnectionRefusedError, ConnectionResetError, socket.gaierror):
            if time.monotonic() >= deadline:  # a name not resolved yet is retried too, as
                raise  # Dask's own connect does
            time.sleep(0.1)
    with sock:
        sock.settimeout(max(deadline - time.monotonic(), 0.5))
        head = b""
        try:
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    break
                head += chunk
        except TimeoutError:
            raise DataError(
                f"{address} accepted a connection but sent nothing within {timeout:g} s, as a "
                "Dask scheduler does at once: it is another kind of server (an HTTP server, "
                "the dashboard?). Give the scheduler's address (tcp://HOST:8786 by default)."
            ) from None
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    if not 0 < length < HANDSHAKE_MAX:
        shown = head[:8].decode("latin-1").encode("unicode_escape").decode()
        raise DataError(
            f"{address} does not answer as a Dask scheduler (it sent {shown!r}): it is another "
            "kind of server. Give the scheduler's address (tcp://HOST:8786 by default)."
        )


def _local_cluster(dd, n_workers: int, attempts: int = 3):
    """A ``LocalCluster`` of ``n_workers`` one-thread worker processes on 127.0.0.1. A worker
    that dies while the cluster starts (killed, out of memory) makes Dask give up on the whole
    cluster ("Nanny failed to start"); it is started again, as a worker lost later is
    replaced, and after ``attempts`` a :class:`~fedgrain.exceptions.ResourceError`."""
    import dask

    from ..exceptions import ResourceError

    for attempt in range(attempts):
        try:
            # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which makes
            # glibc hand every large temporary back to the system, so each pass of a
            # solver touches fresh pages: fits were 1.45x slower than on local processes
            # (docs/benchmarks.md). Our workers keep glibc's adaptive default.
            # No memory limit: Dask pauses a worker whose resident memory passes 80% of its
            # limit (and kills it at 95%), and the pages of the memory-mapped subset files a
            # worker reads count as resident although the system can drop them: a worker of
            # an 8 GB subset (1e8 rows out of core) stopped working half-way through its fit.
            # Local processes have no such watch either.
            with dask.config.set({TRIM_KEY: None}):
                return dd.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                       processes=True, host="127.0.0.1",
                                       dashboard_address=None, memory_limit=0)
        except RuntimeError as exc:
            if "failed to start" not in str(exc):
                raise
            if attempt == attempts - 1:
                raise ResourceError(
                    f"The local Dask cluster could not start its {n_workers} workers "
                    f"({attempts} tries; {exc}): killed, or out of memory? Use fewer workers "
                    "(n_jobs, --workers) or free memory, and fit again.") from None


class DaskBackend(Backend):
    """Runs tasks on a Dask cluster (a local one by default).

    Parameters
    ----------
    scheduler : str or None
        Address of a running scheduler (``"tcp://host:8786"``); None starts a local cluster.
    n_workers : int or None
        Worker processes of the local cluster (default: the CPUs).
    timeout : float
        Seconds to wait for a scheduler (or, after a worker died, for a live worker) before
        giving up with a clear error.
    retries : int
        How many times a task whose worker died is sent again.
    shared_folder : str or None
        A folder every worker can read, for shards spilled to files (data beyond memory) when
        the cluster was started elsewhere; the local cluster uses a private temporary folder.
    views : bool
        As for :class:`~fedgrain.backends.ProcessesBackend`: on the local cluster, rows
        already in a shared buffer are placed as views unless ``views=False``.

    Examples
    --------
    A local cluster for one fit (``backend="dask"`` does the same), or a running cluster kept
    for several (see ``docs/operations.md``):

    >>> from fedgrain import AdaptiveFederatedOrdinal
    >>> from fedgrain.backends.dask import DaskBackend
    >>> with DaskBackend(scheduler="tcp://10.0.0.1:8786") as backend:  # doctest: +SKIP
    ...     model = AdaptiveFederatedOrdinal(meta="fomaml", backend=backend).fit(X, y)
    ...     print(backend.resent_, "tasks sent again after a worker died")
    """

    name = "dask"

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None,
                 timeout: float = 30.0, retries: int = 3, shared_folder: str | None = None,
                 views: bool = True):
        from .processes import check_views, resolve_n_jobs

        self.views = check_views(views)
        dd = _distributed()
        self._cluster = None
        self.client = None
        self.address = scheduler or "the local cluster"
        self.timeout, self.retries = float(timeout), int(retries)
        self.shared_folder = shared_folder
        self.resent_ = 0  # tasks sent again after their worker died
        self._dir = None
        try:
            if scheduler is None:
                quiet_resource_trackers()  # the nannies' semaphores, after a SIGKILL
                self._cluster = _local_cluster(dd, resolve_n_jobs(n_workers))
                self.client = dd.Client(self._cluster, timeout=timeout)
            else:
                _probe_scheduler(scheduler, self.timeout)
                self.client = dd.Client(scheduler, timeout=timeout)
        except OSError as exc:
            self.close()
            if isinstance(exc, FedgrainError):  # the local cluster did not start
                raise
            raise FedgrainError(f"Could not reach the Dask scheduler at {scheduler}: {exc}. "
                                "Start it (dask scheduler) or check the address.") from None
        self._placed = 0

    @property
    def workers(self) -> list[str]:
        info = self._ask(self.client.scheduler.identity, n_workers=-1) \
            if self.client is not None else None
        return sorted(info["workers"]) if info else []

    def _ask(self, call, *args, deadline: float | None = None, **kwargs):
        """Run one request to the scheduler (a coroutine function) within ``deadline`` seconds
        (default ``timeout``). A scheduler that is gone or does not answer in time is a
        :class:`FedgrainError`, wherever in the fit it happens, never a hang."""
        self._check_scheduler()
        try:
            return self.client.sync(self._watched, call, *args,
                                    callback_timeout=deadline or self.timeout, **kwargs)
        except FedgrainError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted out just below
            if not (_lost(exc) or isinstance(exc, OSError)):
                raise
            self._check_lost_scheduler()
            raise self._silent(deadline or self.timeout) from None

    async def _watched(self, call, *args, **kwargs):
        """``call`` on the client's event loop, given up as soon as the client has lost its
        scheduler (a killed scheduler would otherwise be noticed only at the deadline)."""
        import asyncio

        task = asyncio.ensure_future(call(*args, **kwargs))
        while True:
            done, _ = await asyncio.wait([task], timeout=WATCH_SECONDS)
            if done:
                return task.result()
            if self.client is None or self.client.status != "running":
                task.cancel()
                self._check_scheduler()

    def _silent(self, waited: float) -> FedgrainError:
        return FedgrainError(
            f"The Dask scheduler at {self.address} does not answer (waited {waited:.3g} s): the "
            "fit cannot go on. Check that it is running and reachable, and fit again.")

    def _check_scheduler(self) -> None:
        if self.client is None or self.client.status != "running":
            raise FedgrainError(
                f"Lost the Dask scheduler at {self.address}: the fit cannot go on. Check that "
                "the scheduler is running (dask scheduler) and fit again.")

    def _live_worker(self) -> str:
        """The next worker in turn; waits (up to ``timeout``) when none is alive."""
        workers = self.workers
        give_up = time.monotonic() + self.timeout
        while not workers:
            if time.monotonic() > give_up:
                raise FedgrainError(
                    f"No Dask worker is left at {self.address} (waited {self.timeout:g} s); "
                    "start workers (dask worker ADDRESS) and fit again.")
            time.sleep(0.1)
            workers = self.workers
        worker = workers[self._placed % len(workers)]  # round robin; bundles follow the data
        self._placed += 1
        return worker

    @property
    def n_workers(self) -> int:
        return max(1, len(self.workers))

    def allocate(self, n_rows: int, n_features: int, weighted: bool) -> Shard:
        return allocate_shard(n_rows, n_features, weighted)

    def put(self, shard: Shard) -> ShardRef:
        ref = DaskShardRef(None, "", shard)
        self._place(ref)
        return ref

    def _files_visible(self) -> bool:
        return self._cluster is not None or self.shared_folder is not None

    def writer(self, sizes, n_features: int, weighted: bool, *, spill: bool = False):
        """Where the workers can read this machine's files (the local cluster, or a
        ``shared_folder``), shards are written to files (in RAM-backed ``/dev/shm`` when it has
        room, on disk when spilled) and each worker maps its own; otherwise they are built here
        and scattered (spilled ones one at a time)."""
        if not self._files_visible():
            return super().writer(sizes, n_features, weighted, spill=spill)
        from .processes import shard_folder

        sizes = [int(n) for n in sizes]
        if spill or self.shared_folder is not None:
            folder = self.spill_folder()
        else:
            if self._dir is None:
                self._dir = shard_folder(sum(sizes) * (n_features + 2) * 8)
            folder = self._dir
        return FileShardWriter(self, folder, sizes, n_features, weighted)

    # Hook (backends/views.py): the workers of the local cluster run on this machine and can
    # map its files, so subsets of rows in a shared buffer are placed as views (adopted below).
    def view_folder(self, nbytes: int):
        """The shard folder for views' row numbers and codes; None (copy the rows) when the
        workers are another cluster's, which may run elsewhere, or with ``views=False``."""
        if self._cluster is None or not self.views:
            return None
        from .processes import shard_folder

        if self._dir is None:
            self._dir = shard_folder(nbytes)
        return self._dir

    def adopt(self, refs: list[FileShardRef]) -> list[ShardRef]:
        """Each shard is loaded from its files by the worker that will hold it."""
        out: list[ShardRef] = []
        try:
            for r in refs:
                ref = DaskShardRef(None, "", r)
                self._place(ref)
                out.append(ref)
        except BaseException:
            self.release(out)
            raise
        return out

    def _place(self, ref: DaskShardRef) -> None:
        """Put a shard on a live worker: load its files there, or send it from here."""
        worker = self._live_worker()
        src = ref.source
        if isinstance(src, FileShardRef) and self._files_visible():
            future = self.client.submit(_load_shard, src,
                                        key=f"fedgrain-shard-{uuid.uuid4().hex}",
                                        workers=[worker], allow_other_workers=True)
        else:
            shard = _read_shard(src) if isinstance(src, FileShardRef) else src
            # Sending takes as long as the bytes need; the scheduler must answer meanwhile.
            deadline = self.timeout + shard.X.nbytes / MIN_BYTES_PER_SECOND
            future = self._ask(lambda: self.client.scatter(
                _Sent(shard), workers=[worker], direct=True, asynchronous=True),
                deadline=deadline)
        ref.future, ref.worker = future, worker

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *,
            work: float | None = None) -> list[Outcome]:
        return self.map_bundles(fn, tasks, [[i] for i in range(len(tasks))], work=work)

    def map_bundles(self, fn: Callable[[Any], Any], tasks: Sequence[Any],
                    bundles: Sequence[Sequence[int]], *, work: float | None = None
                    ) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(tasks)
        pending = [list(b) for b in bundles if len(b)]
        for attempt in range(self.retries + 1):
            self._check_scheduler()
            futures = [(b, self._submit_bundle(fn, tasks, b)) for b in pending]
            lost = []
            for b, f in futures:
                try:
                    results = self._result(f)
                except FedgrainError:
                    raise
                except Exception as exc:  # noqa: BLE001 - sorted out just below
                    if not _lost(exc):  # not a lost worker: an error no retry will mend
                        why = f"{type(exc).__name__}: {exc}"
                        for i in b:
                            out[i] = Outcome(i, None, why, type(exc).__name__)
                        continue
                    lost.append((b, exc))
                    continue
                for i, o in zip(b, results, strict=True):
                    out[i] = o
                tick(len(b))
            if not lost:
                break
            self._check_lost_scheduler()
            if attempt == self.retries:
                for b, exc in lost:
                    why = (f"its Dask worker was lost {self.retries + 1} times "
                           f"({type(exc).__name__}: {exc})")
                    for i in b:
                        out[i] = Outcome(i, None, why, type(exc).__name__)
                break
            pending = [b for b, _ in lost]
            self.resent_ += sum(len(b) for b in pending)
            self._replace_lost([tasks[i] for b in pending for i in b])
        if any(o is None for o in out):
            raise ValueError("every task must be in exactly one bundle")
        return out  # type: ignore[return-value]

    def _submit_bundle(self, fn, tasks, bundle):
        items = [(i, _with_futures(tasks[i])) for i in bundle]
        worker = _worker_of(tasks[bundle[0]])  # None: a task on no shard runs anywhere
        return self.client.submit(_run_bundle_resolved, fn, items, pure=False,
                                  workers=worker, allow_other_workers=worker is not None)

    def _result(self, future):
        """The future's result; while it runs, the scheduler must answer a ping every few
        seconds (a scheduler stopped or cut off without closing the connection would
        otherwise leave the fit waiting for ever)."""
        from distributed import wait

        every = min(PING_SECONDS, self.timeout)
        while True:
            try:
                wait([future], timeout=every)
            except TimeoutError:
                pass
            except Exception:  # noqa: BLE001 - cancelled or lost: result() says how, as usual
                return future.result()
            else:
                return self._fetch(future)
            self._ask(self.client.scheduler.identity)

    def _fetch(self, future):
        """A finished task's result (small: parameters and statistics), within ``timeout``."""
        if future.status != "finished":  # its error, or why it was lost, raised as usual
            return future.result()
        try:
            return future.result(timeout=self.timeout)
        except TimeoutError:  # the scheduler did not say where the result is
            self._check_lost_scheduler()
            raise self._silent(self.timeout) from None

    def _check_lost_scheduler(self) -> None:
        """After a lost task: is it the scheduler that went? (The client notices within a
        moment; a lost worker leaves it running.)"""
        for _ in range(10):
            self._check_scheduler()
            time.sleep(0.05)

    def _replace_lost(self, tasks) -> None:
        """Place again every shard of ``tasks`` whose worker is gone."""
        alive = set(self.workers)
        seen = set()
        for t in tasks:
            ref = t.get("shard") if isinstance(t, dict) else None
            if not isinstance(ref, DaskShardRef) or id(ref) in seen:
                continue
            seen.add(id(ref))
            if ref.future is None or ref.future.status in ("cancelled", "lost", "error") or \
                    ref.worker not in alive:
                self._place(ref)

    def release(self, refs: Sequence[ShardRef]) -> None:
        for r in refs:  # dropping our reference frees the shard on its worker; unlike
            # cancel(), it does not wait for the scheduler (which may be gone)
            if isinstance(r, DaskShardRef) and r.future is not None:
                r.future.release()
        unlink_files([r.source for r in refs if isinstance(r, DaskShardRef)])
        for r in refs:
            if isinstance(r, DaskShardRef):
                r.future, r.source = None, None

    def close(self) -> None:
        client = self.client
        if client is not None:
            self.client = None
            try:
                client.close(timeout=min(self.timeout, 5.0))
            except Exception:  # noqa: BLE001 - a scheduler already gone
                pass
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        self.remove_spill()
        from .processes import remove_folder

        remove_folder(self._dir)
        self._dir = None


def _worker_of(task) -> str | None:
    ref = task.get("shard") if isinstance(task, dict) else None
    return ref.worker if isinstance(ref, DaskShardRef) else None


def _with_futures(task):
    """The task with each Dask shard's future in place of its ref (Dask resolves futures)."""
    if isinstance(task, dict) and isinstance(task.get("shard"), DaskShardRef):
        return {**task, "shard": task["shard"].future}
    return task


class _Sent:
    """A shard on its way to a worker: it arrives there as a :class:`Shard` whose arrays are
    aligned as the other backends' are (the buffers Dask receives into are not), so that its
    sums have the same last bits on every backend."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def __reduce__(self):
        return aligned_shard, (self.shard.X, self.shard.y, self.shard.w)


class _Resolved(ShardRef):
    def __init__(self, shard: Shard):
        self.shard = shard

    def load(self) -> Shard:
        return self.shard


def _resolve(task):
    if isinstance(task, dict) and isinstance(task.get("shard"), Shard):
        return {**task, "shard": _Resolved(task["shard"])}
    return task


def _run_bundle_resolved(fn, items) -> list[Outcome]:
    return run_bundle((fn, [(i, _resolve(t)) for i, t in items]))


def _lost(exc: BaseException) -> bool:
    """Whether a task failed because a worker, its data or the connection went away (worth
    placing its shards again and resending it), rather than by an error of its own."""
    name = type(exc).__name__
    return (name in ("KilledWorker", "FutureCancelledError", "FuturesCancelledError",
                     "CancelledError", "CommClosedError", "FutureLost")
            or isinstance(exc, (ConnectionError, TimeoutError)))


def _read_shard(ref: FileShardRef) -> Shard:
    return Shard(np.load(ref.X), np.load(ref.y), None if ref.w is None else np.load(ref.w))


def _load_shard(ref: FileShardRef) -> Shard:  # runs on the worker: maps the files, no copy
    return ref.load()
