"""fedgrain: divide-and-conquer and federated ordinal regression with valid inference.

>>> from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load
"""

from .estimators import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load
from .inference.results import OrdinalResults

__version__ = "0.1.0"

__all__ = ["AdaptiveFederatedOrdinal", "DivideConquerOrdinal", "OrdinalRegression",
           "OrdinalResults", "load", "__version__"]
