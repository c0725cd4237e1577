"""Backends: where local fits run. See :mod:`fedgrain.backends.base` for the protocol."""

from __future__ import annotations

from ..exceptions import ParameterError
from .base import Backend, Outcome, Shard, ShardRef
from .processes import ProcessesBackend
from .serial import SerialBackend
from .views import shared_array, shared_rows

BACKENDS = ("serial", "processes", "dask")


def get_backend(backend: str | Backend, n_jobs: int | None = None, *, owner: str) -> Backend:
    """Resolve the ``backend`` parameter of an estimator into a :class:`Backend`.

    ``owner`` names the estimator in error messages.
    """
    if isinstance(backend, Backend):
        return backend
    if backend == "serial":
        return SerialBackend()
    if backend == "processes":
        return ProcessesBackend(n_jobs)
    if backend == "dask":
        from .dask import DaskBackend

        return DaskBackend(n_workers=n_jobs)
    raise ParameterError(
        f"The 'backend' parameter of {owner} must be one of {BACKENDS} or a "
        f"fedgrain.backends.Backend instance. Got {backend!r} instead."
    )


__all__ = [
    "BACKENDS", "Backend", "Outcome", "ProcessesBackend", "SerialBackend", "Shard", "ShardRef",
    "get_backend", "shared_array", "shared_rows",
]
