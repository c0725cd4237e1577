"""Predictions on a dask DataFrame, partition by partition: a lazy dask array, never collected.

:func:`partitionwise` wraps a prediction method (``predict``, ``predict_proba``, ``apply``,
...): given a pandas frame, an array or a path it does what it did; given a dask DataFrame it
returns ``X.map_partitions(method)``, a dask array whose row chunks are the frame's partitions
(their lengths unknown until computed, as dask-ml's wrappers return them). Nothing is computed
when it is called; each partition is predicted where the frame's scheduler computes it, by a
copy of the fitted model that leaves its backend and callback behind.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np

from fedgrain.exceptions import DataError

__all__ = ["partitionwise"]


def _predict_part(part, model, name: str, meta: np.ndarray, args, kwargs) -> np.ndarray:
    if len(part) == 0:  # an empty partition (after a filter): an empty block
        return meta
    return getattr(model, name)(part, *args, **kwargs)


def _light_copy(model):
    """The fitted model without what a worker cannot use (a backend holding a client, a
    progress callback holding a terminal)."""
    light = copy.copy(model)
    if not isinstance(getattr(light, "backend", "serial"), str):
        light.backend = "serial"
    if getattr(light, "callback", None) is not None:
        light.callback = None
    return light


def partitionwise(meta: Callable) -> Callable:
    """Decorate a prediction method ``method(self, X, *args, **kwargs) -> ndarray`` so that a
    dask DataFrame ``X`` gives the lazy ``X.map_partitions`` of it. ``meta(model)`` is an
    empty array of the result's type and width (``np.empty((0, K))`` for probabilities)."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self, X, *args, **kwargs):
            from .streamed import is_dask_frame

            if not is_dask_frame(X):
                return method(self, X, *args, **kwargs)
            from sklearn.utils.validation import check_is_fitted

            check_is_fitted(self, "coef_")
            groups = kwargs.get("groups", args[0] if args else None)
            if groups is not None and not isinstance(groups, str):
                raise DataError("X is a dask DataFrame, so groups= must name a column of it "
                                "(labels given apart cannot be matched to its partitions).")
            _check_columns(self, X, groups)
            empty = meta(self)
            return X.map_partitions(_predict_part, _light_copy(self), method.__name__, empty,
                                    args, kwargs, meta=empty)

        return wrapper

    return decorate


def _check_columns(model, X, groups) -> None:
    """The frame's columns against those seen at fit, before anything is computed."""
    schema = model.schema_
    if getattr(model, "formula_", None) is not None or not schema.has_names:
        return
    names = tuple(str(c) for c in X.columns if c != groups)
    schema._check_names(names, True, type(model).__name__)


# The empty results of the prediction methods, for their dask forms.
def proba_meta(model) -> np.ndarray:
    return np.empty((0, len(model.levels_)))


def cumulative_meta(model) -> np.ndarray:
    return np.empty((0, len(model.levels_) - 1))


def linear_meta(model) -> np.ndarray:
    return np.empty(0)


def labels_meta(model) -> np.ndarray:
    return np.empty(0, dtype=model.levels_.dtype)


def leaves_meta(model) -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def flags_meta(model) -> np.ndarray:
    return np.empty(0, dtype=bool)
