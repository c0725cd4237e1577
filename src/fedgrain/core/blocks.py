"""Rows in blocks: the block size of the likelihood passes, the row threads that share a pass's
chunks of blocks, and iteration over an array or over rows streamed from disk, with progress."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from threadpoolctl import ThreadpoolController

from .. import progress

#: Elements per block of rows: about 1.5 MB, so a block stays in cache between the elementwise
#: work and the products that read it (measured best: 8192 rows at p = 20, 2048 at p = 100).
BLOCK_ELEMENTS = 200_000


def block_rows(p: int) -> int:
    """Rows per block for ``p`` features: a power of two between 1024 and 16384."""
    return int(2 ** np.clip(np.round(np.log2(BLOCK_ELEMENTS / max(p, 1))), 10, 14))


#: Blocks per chunk: a pass sums its blocks chunk by chunk, then the chunks' sums in row order.
#: The chunks are the row threads' unit of work, so the sums (and every fit) are the same
#: whatever the number of threads; 4 blocks (32,768 rows at p = 20) leave a 1e5-row fit
#: three chunks to share.
CHUNK_BLOCKS = 4

_ROW_THREADS: ContextVar[list | None] = ContextVar("fedgrain_row_threads", default=None)
_POOL: list = [None, None]  # the executor and (its size, the process it was made in)
_CONTROLLER: list = [None]


def blas_controller() -> ThreadpoolController:
    """threadpoolctl's controller, built once per process (building it scans the loaded
    libraries, milliseconds each time)."""
    if _CONTROLLER[0] is None:
        _CONTROLLER[0] = ThreadpoolController()
    return _CONTROLLER[0]


def allowed_threads() -> int:
    """Threads a pass may use: the CPUs this process may run on, at most the BLAS libraries'
    current thread limit (``threadpoolctl.threadpool_limits``, ``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``), so a caller that limits BLAS limits the passes too."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limits = [lib["num_threads"] for lib in blas_controller().select(user_api="blas").info()]
    return max(1, min([cpus or 1, *limits]))


def busy_elsewhere(reads: int = 3) -> int:
    """Threads of other processes running at this moment (Linux: ``/proc/loadavg``; the
    fewest over ``reads`` reads a millisecond apart, so a passing one does not count); 0
    where not known."""
    seen = []
    for i in range(reads):
        try:
            with open("/proc/loadavg") as fh:
                seen.append(max(0, int(fh.read().split()[3].split("/")[0]) - 1))
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < reads:
            time.sleep(0.001)
    return min(seen)


@contextmanager
def row_threads(n: int | None = None):
    """Passes over rows inside this context share their chunks of blocks among ``n`` threads.

    None: :func:`allowed_threads`, less the cores that other processes keep busy when the
    first pass with more than one chunk starts: a second thread on a core that another
    process keeps busy gains nothing and evicts the first one's blocks from the cache (a pass
    at 1e6 x 20 took 1.7 times as long on two threads as on one with both cores busy,
    ``docs/benchmarks.md``). The choice changes the time, never the result. numpy releases
    the GIL in its loops and BLAS calls, so the threads run at once; outside this context
    passes run on the calling thread only (a worker process of a backend, one per core, never
    adds threads of its own).
    """
    token = _ROW_THREADS.set([None, allowed_threads()] if n is None else [max(1, int(n))])
    try:
        yield
    finally:
        _ROW_THREADS.reset(token)


def _threads() -> int:
    """The row threads of this context, the automatic choice made once, on first use."""
    holder = _ROW_THREADS.get()
    if holder is None:
        return 1
    if holder[0] is None:
        holder[0] = max(1, holder[1] - busy_elsewhere())
    return holder[0]


def chunk_sums(body: Callable[[int, int], list], n: int, block: int) -> list:
    """``body(start, stop)`` over consecutive chunks of ``CHUNK_BLOCKS`` blocks of ``n`` rows,
    its results (lists of arrays, floats or None) added element by element in chunk order.

    Each chunk runs on one thread; with :func:`row_threads` the chunks are shared among
    threads, and the sum is the same to the last bit whatever their number.
    """
    step = CHUNK_BLOCKS * block
    bounds = [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]
    threads = _threads() if len(bounds) > 1 else 1
    if threads > 1:
        if _POOL[1] != (threads, os.getpid()):  # a forked child has no threads of its pool
            if _POOL[0] is not None and _POOL[1][1] == os.getpid():
                _POOL[0].shutdown()
            _POOL[:] = [ThreadPoolExecutor(threads, thread_name_prefix="fedgrain-rows"),
                        (threads, os.getpid())]
        parts = _POOL[0].map(lambda ab: body(*ab), bounds)
    else:
        parts = (body(a, b) for a, b in bounds)
    total = None
    for part in parts:
        if total is None:
            total = list(part)
            continue
        for i, v in enumerate(part):
            if v is not None:
                total[i] = total[i] + v
    return total


def row_blocks(X, block: int | None = None):
    """``(start, rows)`` blocks of the encoded rows ``X``: an array, or rows streamed from disk
    (any object with a ``blocks()`` method, such as :class:`fedgrain.data.streamed.StreamedRows`).
    """
    if hasattr(X, "blocks"):
        for a, Xb in X.blocks():
            yield a, Xb
            progress.advance(Xb.shape[0])
        return
    block = block or block_rows(X.shape[1])
    for a in range(0, X.shape[0], block):
        yield a, X[a : a + block]
        progress.advance(min(block, X.shape[0] - a))


def is_streamed(X) -> bool:
    """Whether ``X`` stands for rows read from disk on every pass (not an array)."""
    return hasattr(X, "blocks")


def take_rows(X, index: np.ndarray) -> np.ndarray:
    """The rows at ``index`` (sorted) of an array or of streamed rows."""
    if is_streamed(X):
        with progress.step("sampling rows", X.shape[0], "rows"):
            return X.take(index)
    return X[index]
