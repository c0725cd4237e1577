"""The estimators: :class:`DivideConquerOrdinal`, :class:`OrdinalRegression`,
:class:`AdaptiveFederatedOrdinal`, :class:`MixedOrdinalRegression`, and :func:`load`.

See :mod:`fedgrain.estimators.base` for what they share.
"""

from .adaptive import AdaptiveFederatedOrdinal
from .base import ESTIMATORS, OrdinalModel, load
from .centralized import OrdinalRegression
from .divide_conquer import DivideConquerOrdinal
from .mixed import MixedOrdinalRegression
from .models import GlobalModel, LeafModel

__all__ = ["ESTIMATORS", "AdaptiveFederatedOrdinal", "DivideConquerOrdinal", "GlobalModel",
           "LeafModel",
           "MixedOrdinalRegression", "OrdinalModel", "OrdinalRegression", "load"]
