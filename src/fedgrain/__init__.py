"""fedgrain: divide-and-conquer and federated ordinal regression with valid inference.

>>> from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load
"""

from ._version import __version__
from .estimators import (
                         AdaptiveFederatedOrdinal,
                         DivideConquerOrdinal,
                         MixedOrdinalRegression,
                         OrdinalRegression,
                         load,
)
from .inference.results import OrdinalResults

__all__ = ["AdaptiveFederatedOrdinal", "DivideConquerOrdinal", "MixedOrdinalRegression",
           "OrdinalRegression",
           "OrdinalResults", "load", "__version__"]
