"""The package version (read by the saved-model writer without importing the package)."""

__version__ = "0.1.0"
