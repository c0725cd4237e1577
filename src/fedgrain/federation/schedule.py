"""Leaves of the partition tree to workers: a cost model and longest-processing-time first.

Cost model: fitting a leaf takes a few passes, each building a weighted d x d Gram matrix over
the leaf's rows, so its work is about ``rows * d**2``; on top comes a fixed price per task
(starting it, shipping parameters, the d x d algebra), ``FIXED_COST`` in the same units.

Assignment: leaves in descending cost, each to the least-loaded worker (Graham's LPT rule). Its
makespan is at most ``4/3 - 1/(3W)`` times the optimum on ``W`` workers, for any costs, at the
price of one sort. Two preferences may override the least-loaded choice, but only among workers
whose load after taking the leaf exceeds that choice's by at most ``slack`` times the mean load:
first a worker already holding a sibling leaf (children of one parent share data locality and
are re-split together), then the worker the leaf is on now (so its rows need not move). Each
such placement gives up at most ``slack`` times the mean load, which loosens the bound by about
the factor ``1 + slack``.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

#: Fixed cost of one leaf's task in the cost model's units (rows x d^2): the price of starting a
#: task and its d x d algebra.
FIXED_COST: float = 2e6


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}. Got {value!r} instead.")
    return int(value)


def _int_array(name: str, values, low: int | None = None, n_leaves: int | None = None):
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.dtype.kind not in "iu" and arr.size) or (
        n_leaves is not None and arr.size != n_leaves
    ):
        shape = "a 1-D array of ints" if n_leaves is None else f"{n_leaves} ints, one per leaf"
        raise ValueError(
            f"{name} must be {shape}. Got shape {arr.shape} and dtype {arr.dtype} instead."
        )
    if low is not None and arr.size and arr.min() < low:
        raise ValueError(f"{name} must be >= {low}. Got {arr.min()} instead.")
    return arr.astype(np.int64)


def leaf_costs(sizes, d: int) -> np.ndarray:
    """Cost of each leaf: ``sizes * d**2 + FIXED_COST``.

    Parameters
    ----------
    sizes : array-like of int, shape (L,)
        Rows per leaf, each >= 0.
    d : int
        Number of model parameters, >= 1.

    Returns
    -------
    ndarray of float, shape (L,)
    """
    d = _check_int("d", d, 1)
    return _int_array("sizes", sizes, low=0) * float(d * d) + FIXED_COST


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which worker runs each leaf, and what that costs.

    ``worker`` (L,) and ``cost`` (L,) are per leaf, ``loads`` (W,) the total cost per worker and
    ``bytes_to_move`` the bytes sent to place the leaves. Holding arrays, it compares by identity:
    compare ``to_dict()`` for equality.

    Examples
    --------
    >>> s = schedule([100, 100, 100, 100], d=10, n_workers=2)
    >>> s.worker.tolist(), s.imbalance, s.bundles()
    ([0, 1, 0, 1], 1.0, [[0, 2], [1, 3]])
    """

    worker: np.ndarray
    cost: np.ndarray
    loads: np.ndarray
    n_workers: int
    bytes_to_move: int

    @property
    def imbalance(self) -> float:
        """Largest load over the mean load; 1.0 is perfect (and the value with no work)."""
        total = float(self.loads.sum())
        return 1.0 if total == 0 else float(self.loads.max()) * self.n_workers / total

    def bundles(self) -> list[list[int]]:
        """Leaf indices of each worker that has leaves, in workers' order, costliest first."""
        order = np.lexsort((np.arange(self.cost.size), -self.cost))
        return [order[self.worker[order] == w].tolist() for w in np.unique(self.worker)]

    def to_dict(self) -> dict:
        """Plain JSON types, for saving in a model file."""
        return {
            "worker": self.worker.tolist(), "cost": self.cost.tolist(),
            "loads": self.loads.tolist(), "n_workers": self.n_workers,
            "bytes_to_move": self.bytes_to_move,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        """The inverse of :meth:`to_dict`."""
        return cls(
            worker=np.asarray(d["worker"], dtype=np.int64),
            cost=np.asarray(d["cost"], dtype=float), loads=np.asarray(d["loads"], dtype=float),
            n_workers=int(d["n_workers"]), bytes_to_move=int(d["bytes_to_move"]),
        )


def schedule(sizes, d: int, n_workers: int, *, groups=None, row_bytes: int = 0,
             previous=None, slack: float = 0.02) -> Schedule:
    """Assign leaves to workers, longest-processing-time first, keeping siblings together.

    Parameters
    ----------
    sizes : array-like of int, shape (L,)
        Rows per leaf, each >= 0.
    d : int
        Number of model parameters; a leaf costs ``sizes * d**2 + FIXED_COST``.
    n_workers : int
        Number of workers, >= 1.
    groups : array-like of int, shape (L,), optional
        Leaves with the same id are siblings, kept on one worker when that costs little.
    row_bytes : int, default 0
        Bytes one row occupies (``(p + 2) * 8`` for ``p`` features).
    previous : array-like of int, shape (L,), optional
        Worker each leaf is on now; -1 for nowhere yet. Indices >= ``n_workers`` name workers
        that are gone: those leaves move.
    slack : float, default 0.02
        A preference may raise the load after placing a leaf by at most ``slack`` times the mean
        load over the least-loaded choice.

    Returns
    -------
    Schedule
    """
    sizes = _int_array("sizes", sizes, low=0)
    cost = leaf_costs(sizes, d)
    n_workers = _check_int("n_workers", n_workers, 1)
    row_bytes = _check_int("row_bytes", row_bytes, 0)
    if not isinstance(slack, Real) or not slack >= 0:
        raise ValueError(f"slack must be a float >= 0. Got {slack!r} instead.")
    n = cost.size
    # Without groups every leaf is its own group: no leaf has a sibling.
    group = np.arange(n) if groups is None else np.unique(
        _int_array("groups", groups, n_leaves=n), return_inverse=True)[1]
    prev = np.full(n, -1) if previous is None else _int_array("previous", previous, -1, n)

    holds = np.zeros((n, n_workers), dtype=bool)  # holds[g, w]: worker w has a leaf of group g
    loads = np.zeros(n_workers)
    worker = np.empty(n, dtype=np.int64)
    window = slack * cost.sum() / n_workers
    for leaf in np.lexsort((np.arange(n), -cost)):
        ok = np.flatnonzero(loads <= loads.min() + window)
        best = ok[np.lexsort((ok, loads[ok], ok != prev[leaf], ~holds[group[leaf], ok]))[0]]
        worker[leaf] = best
        loads[best] += cost[leaf]
        holds[group[leaf], best] = True
    moved = int(sizes[worker != prev].sum()) * row_bytes
    return Schedule(worker=worker, cost=cost, loads=loads, n_workers=n_workers, bytes_to_move=moved)
