"""Exceptions and warnings raised by fedgrain.

Every error a user can cause by what they pass in subclasses the built-in type that
scikit-learn users expect (``ValueError`` for bad values, ``TypeError`` for wrong types),
so ``except ValueError`` keeps working, and also :class:`FedgrainError`, so the command line
can tell our clear messages apart from genuine bugs.

Examples
--------
>>> import numpy as np
>>> from fedgrain import DivideConquerOrdinal
>>> from fedgrain.exceptions import DataError
>>> try:
...     DivideConquerOrdinal().fit(np.array([[1.0], [np.nan], [2.0]]), [0, 1, 1])
... except DataError as exc:
...     print(str(exc).split(";")[0])
Column 'x0' of X has NaN (missing) values in 1 row (row 1, counting from 0)
"""

from __future__ import annotations


class FedgrainError(Exception):
    """Base class of every error fedgrain raises on purpose."""


class DataError(FedgrainError, ValueError):
    """The data are unusable as given: missing values, wrong columns, one class, ..."""


class DataTypeError(FedgrainError, TypeError):
    """The data have a type fedgrain cannot use (sparse matrices, complex numbers, ...)."""


class ComplexDataError(DataTypeError, DataError):
    """Complex numbers were passed where real numbers are needed.

    It is a :class:`DataTypeError` and also a ``ValueError``, because scikit-learn's estimator
    checks expect ``ValueError("Complex data not supported ...")``.
    """


class SeparationError(DataError):
    """The classes are perfectly separated, so the maximum likelihood estimate does not exist.

    ``units`` are the positions of the separated subsets or leaves when the error comes from a
    divided fit (empty otherwise).
    """

    def __init__(self, *args, units: tuple[int, ...] = ()):
        super().__init__(*args)
        self.units = tuple(units)


class ParameterError(FedgrainError, ValueError):
    """An estimator parameter has a value it cannot take (names the parameter and the values
    it can take)."""


class ResourceError(FedgrainError, OSError):
    """Not enough memory or disk for the work asked for."""


class ModelFileError(FedgrainError, ValueError):
    """A saved model directory is missing, truncated, tampered with or of an unknown version."""


class SubsetError(FedgrainError, RuntimeError):
    """A subset's task failed unexpectedly; ``worker_traceback`` is the worker's traceback."""

    def __init__(self, message: str, worker_traceback: str | None = None):
        super().__init__(message)
        self.worker_traceback = worker_traceback or ""


class IdentificationWarning(UserWarning):
    """A parameter carries no information in one subset and gets zero weight there."""
