"""The serial backend: every task in this process, one after the other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import Backend, Outcome, Shard, ShardRef, allocate_shard, run_task


@dataclass(frozen=True)
class MemoryShardRef(ShardRef):
    """A shard held in this process's memory."""

    shard: Shard

    def load(self) -> Shard:
        return self.shard


class SerialBackend(Backend):
    """Runs tasks in the calling process. The reference every other backend must match.

    Examples
    --------
    >>> from fedgrain import DivideConquerOrdinal
    >>> from fedgrain.datasets import make_ordinal
    >>> X, y, *_ = make_ordinal(3000, 3, 3, random_state=0)
    >>> a = DivideConquerOrdinal(n_subsets=3, backend="serial").fit(X, y)
    >>> b = DivideConquerOrdinal(n_subsets=3, backend="processes", n_jobs=2).fit(X, y)
    >>> bool(abs(a.coef_ - b.coef_).max() < 1e-10)
    True
    """

    name = "serial"

    @property
    def n_workers(self) -> int:
        return 1

    def allocate(self, n_rows: int, n_features: int, weighted: bool) -> Shard:
        return allocate_shard(n_rows, n_features, weighted)

    def put(self, shard: Shard) -> ShardRef:
        return MemoryShardRef(shard)

    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, work: float | None = None
    ) -> list[Outcome]:
        return list(self.imap(fn, tasks, work=work))

    def imap(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *,
             work: float | None = None):
        for i, t in enumerate(tasks):
            yield run_task(fn, i, t)
