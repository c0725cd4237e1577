"""The estimators: :class:`DivideConquerOrdinal`, :class:`OrdinalRegression`,
:class:`AdaptiveFederatedOrdinal`, and :func:`load`.

See :mod:`fedgrain.estimators.base` for what they share.
"""

from .adaptive import AdaptiveFederatedOrdinal, LeafModel
from .base import ESTIMATORS, OrdinalModel, load
from .centralized import OrdinalRegression
from .divide_conquer import DivideConquerOrdinal

__all__ = ["ESTIMATORS", "AdaptiveFederatedOrdinal", "DivideConquerOrdinal", "LeafModel",
           "OrdinalModel", "OrdinalRegression", "load"]
