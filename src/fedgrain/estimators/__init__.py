"""The estimators: :class:`DivideConquerOrdinal` and :class:`OrdinalRegression`, and :func:`load`.

See :mod:`fedgrain.estimators.base` for what they share.
"""

from .base import ESTIMATORS, OrdinalModel, load
from .centralized import OrdinalRegression
from .divide_conquer import DivideConquerOrdinal

__all__ = ["ESTIMATORS", "DivideConquerOrdinal", "OrdinalModel", "OrdinalRegression", "load"]
