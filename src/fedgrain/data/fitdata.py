"""What a fit receives from the data layer: :class:`FitData`.

Its own module because both ways of preparing training data build it: in memory
(:func:`fedgrain.data.prepare.prepare_fit`) and batch by batch from Parquet
(:func:`fedgrain.data.streamed.prepare_streamed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .features import FeatureSchema
    from .streamed import StreamedRows
    from .target import TargetEncoding

__all__ = ["FitData"]


@dataclass(frozen=True, eq=False)
class FitData:
    """Validated training data.

    Parameters
    ----------
    X : numpy.ndarray or StreamedRows
        ``(n, n_features)`` float64, C-contiguous; the caller's array itself (no copy) when it
        already was one. For a Parquet source read batch by batch
        (:func:`fedgrain.data.streamed.prepare_streamed`), the
        :class:`~fedgrain.data.streamed.StreamedRows` that stand for it.
    codes : numpy.ndarray
        ``(n,)`` ``np.intp`` class codes ``0..K-1`` (compact integers when streamed).
    weights : numpy.ndarray or None
        ``(n,)`` float64 copy of ``sample_weight``, or None when none was given.
    schema : FeatureSchema
        The feature schema for predict time.
    target : TargetEncoding
        The ordinal levels.
    moments : (numpy.ndarray, numpy.ndarray) or None
        The columns' weighted means and standard deviations
        (:func:`fedgrain.core.standardize.column_moments` of ``X`` and ``weights``), taken
        with the checks; None where not taken.

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain.data import prepare_fit
    >>> fit = prepare_fit(np.array([[0.5], [1.5], [2.5]]), [1, 3, 3])
    >>> fit.codes.tolist(), fit.target.classes
    ([0, 1, 1], (1, 3))
    """

    X: np.ndarray | StreamedRows
    codes: np.ndarray
    weights: np.ndarray | None
    schema: FeatureSchema
    target: TargetEncoding
    moments: tuple[np.ndarray, np.ndarray] | None = None

    def column_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """``moments``, taken now if they were not taken with the checks."""
        if self.moments is not None:
            return self.moments
        from ..core.standardize import column_moments

        return column_moments(self.X, self.weights)
