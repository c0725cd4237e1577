"""The Dask backend: subsets live on the workers of a Dask cluster for the whole fit.

With no address, a ``LocalCluster`` of worker processes is started on 127.0.0.1 (one thread
each, no dashboard) and stopped with the backend; with ``scheduler="tcp://host:port"`` an
existing cluster is used and left running. Each subset is scattered once to one worker and
stays there: tasks carry the subset's future, which Dask resolves on the worker that holds it,
so a round of tasks moves parameters only. Bundles of tasks (:meth:`map_bundles`) run on the
worker that holds their subsets. Tasks run with one BLAS thread, so the numbers are the same as
on the other backends.

Needs the ``dask`` extra: ``pip install 'fedgrain[dask]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..exceptions import FedgrainError
from .base import Backend, Outcome, Shard, ShardRef, run_bundle, run_task


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
    """A subset scattered to one worker: its future, and the worker's address."""

    def __init__(self, future, worker: str):
        self.future = future
        self.worker = worker

    def load(self) -> Shard:  # on a worker the future has become the shard itself
        raise RuntimeError("a Dask shard is resolved by Dask on the worker that holds it")


class DaskBackend(Backend):
    """Runs tasks on a Dask cluster (a local one by default).

    Parameters
    ----------
    scheduler : str or None
        Address of a running scheduler (``"tcp://host:8786"``); None starts a local cluster.
    n_workers : int or None
        Worker processes of the local cluster (default: the CPUs).
    timeout : float
        Seconds to wait for a scheduler before giving up with a clear error.
    """

    name = "dask"

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None,
                 timeout: float = 30.0):
        from .processes import resolve_n_jobs

        dd = _distributed()
        self._cluster = None
        try:
            if scheduler is None:
                self._cluster = dd.LocalCluster(
                    n_workers=resolve_n_jobs(n_workers), threads_per_worker=1, processes=True,
                    host="127.0.0.1", dashboard_address=None)
                self.client = dd.Client(self._cluster, timeout=timeout)
            else:
                self.client = dd.Client(scheduler, timeout=timeout)
        except OSError as exc:
            self.close()
            raise FedgrainError(f"Could not reach the Dask scheduler at {scheduler}: {exc}. "
                                "Start it (dask scheduler) or check the address.") from None
        self._placed = 0

    @property
    def workers(self) -> list[str]:
        return sorted(self.client.scheduler_info()["workers"])

    @property
    def n_workers(self) -> int:
        return max(1, len(self.workers))

    def allocate(self, n_rows: int, n_features: int, weighted: bool) -> Shard:
        return Shard(np.empty((n_rows, n_features)), np.empty(n_rows, dtype=np.intp),
                     np.empty(n_rows) if weighted else None)

    def put(self, shard: Shard) -> ShardRef:
        workers = self.workers
        worker = workers[self._placed % len(workers)]  # round robin; bundles follow the data
        self._placed += 1
        future = self.client.scatter(shard, workers=[worker], direct=True)
        return DaskShardRef(future, worker)

    def _submit(self, fn, task, index, worker=None):
        return self.client.submit(_run_resolved, fn, index, _with_futures(task), pure=False,
                                  workers=worker, allow_other_workers=True)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *,
            work: float | None = None) -> list[Outcome]:
        futures = [self._submit(fn, t, i, _worker_of(t)) for i, t in enumerate(tasks)]
        return [_outcome(f, i) for i, f in enumerate(futures)]

    def map_bundles(self, fn: Callable[[Any], Any], tasks: Sequence[Any],
                    bundles: Sequence[Sequence[int]], *, work: float | None = None
                    ) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(tasks)
        futures = []
        for b in bundles:
            items = [(i, _with_futures(tasks[i])) for i in b]
            worker = _worker_of(tasks[b[0]]) if b else None
            futures.append((b, self.client.submit(_run_bundle_resolved, fn, items, pure=False,
                                                  workers=worker, allow_other_workers=True)))
        for b, f in futures:
            try:
                results = f.result()
            except Exception as exc:  # noqa: BLE001 - a lost bundle fails its tasks
                results = [Outcome(i, None, str(exc) or type(exc).__name__, type(exc).__name__)
                           for i in b]
            for i, o in zip(b, results, strict=True):
                out[i] = o
        if any(o is None for o in out):
            raise ValueError("every task must be in exactly one bundle")
        return out  # type: ignore[return-value]

    def release(self, refs: Sequence[ShardRef]) -> None:
        futures = [r.future for r in refs if isinstance(r, DaskShardRef)]
        if futures:
            self.client.cancel(futures)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            self.client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


def _worker_of(task) -> str | None:
    ref = task.get("shard") if isinstance(task, dict) else None
    return ref.worker if isinstance(ref, DaskShardRef) else None


def _with_futures(task):
    """The task with each Dask shard's future in place of its ref (Dask resolves futures)."""
    if isinstance(task, dict) and isinstance(task.get("shard"), DaskShardRef):
        return {**task, "shard": task["shard"].future}
    return task


class _Resolved(ShardRef):
    def __init__(self, shard: Shard):
        self.shard = shard

    def load(self) -> Shard:
        return self.shard


def _resolve(task):
    if isinstance(task, dict) and isinstance(task.get("shard"), Shard):
        return {**task, "shard": _Resolved(task["shard"])}
    return task


def _run_resolved(fn, index, task) -> Outcome:
    return run_task(fn, index, _resolve(task))


def _run_bundle_resolved(fn, items) -> list[Outcome]:
    return run_bundle((fn, [(i, _resolve(t)) for i, t in items]))


def _outcome(future, index: int) -> Outcome:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a lost task is a failed outcome
        return Outcome(index, None, str(exc) or type(exc).__name__, type(exc).__name__)
