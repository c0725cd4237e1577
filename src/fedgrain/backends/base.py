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
  them to workers (:mod:`fedgrain.schedule`): one backend task per bundle, which runs its
  tasks in turn; still one :class:`Outcome` per task, in task order.
- ``release(refs)`` frees placed subsets; ``close()`` releases everything.

Seeds travel inside tasks, and tasks run with one BLAS thread, so all backends return
bit-identical results.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shard:
    """One subset's rows: standardised features, class codes and optional weights."""

    X: np.ndarray
    y: np.ndarray
    w: np.ndarray | None


class ShardRef(ABC):
    """Picklable handle of a placed shard."""

    @abstractmethod
    def load(self) -> Shard:
        """Return the shard's arrays (on the worker that runs the task)."""


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
    """Runs tasks over placed subsets. Use as a context manager, or call :meth:`close`."""

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
        packed = [(fn, [(i, tasks[i]) for i in b]) for b in bundles]
        out: list[Outcome | None] = [None] * len(tasks)
        for b, res in zip(bundles, self.map(run_bundle, packed, work=work), strict=True):
            for i, o in zip(b, res.value if res.ok else [res] * len(b), strict=True):
                out[i] = o if res.ok else Outcome(i, None, res.error, res.error_type,
                                                 res.traceback)
        if any(o is None for o in out):
            raise ValueError("every task must be in exactly one bundle")
        return out  # type: ignore[return-value]

    def reserve(self, nbytes: int) -> None:  # noqa: B027 - optional hook
        """Announce that shards totalling ``nbytes`` will be placed (fail early if no room)."""

    def release(self, refs: Sequence[ShardRef]) -> None:  # noqa: B027 - optional hook
        """Free placed shards (default: nothing to do)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything this backend holds."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
