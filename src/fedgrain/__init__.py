"""fedgrain: divide-and-conquer and federated ordinal regression with valid inference.

>>> from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression, load

The estimators are imported on first use (PEP 562), so ``import fedgrain`` and the command
line's ``--help`` and ``--version`` do not load scikit-learn, scipy and the rest.
"""

from ._version import __version__

__all__ = ["AdaptiveFederatedOrdinal", "DivideConquerOrdinal", "MixedOrdinalRegression",
           "OrdinalRegression",
           "OrdinalResults", "load", "shared_rows", "__version__"]

_FROM = {"AdaptiveFederatedOrdinal": ".estimators", "DivideConquerOrdinal": ".estimators",
         "MixedOrdinalRegression": ".estimators", "OrdinalRegression": ".estimators",
         "load": ".estimators", "OrdinalResults": ".inference.results",
         "shared_rows": ".backends"}


def __getattr__(name: str):
    if name in _FROM:
        import importlib

        value = getattr(importlib.import_module(_FROM[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedgrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
