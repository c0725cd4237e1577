"""What every drift detector provides (River's API, batch-wise)."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import numpy as np


class Detector(ABC):
    """A detector of an increase in the mean of a stream of values (a leaf's losses).

    ``update(x)`` takes one value or a batch (1-D array) in stream order. After it,
    ``drift_detected`` says whether a change was detected in that update, and
    ``detection_index`` is the position in the whole stream (0-based, counting every value
    ever passed) at which it was; ``last_gap`` and ``last_bound`` the statistic that crossed its
    bound. After a detection the detector goes on with the rest of the batch from a state that
    forgets what came before the change (a second detection in the same batch updates the
    state but only the first is reported).

    Examples
    --------
    A detector of your own returns, from ``_update``, the position in the batch where it
    detects a change (None for none), and saves its state as plain JSON:

    >>> import numpy as np
    >>> class Threshold(Detector):
    ...     def _update(self, x):
    ...         above = np.flatnonzero(x > 5.0)
    ...         return int(above[0]) if above.size else None
    ...     def state(self):
    ...         return {}
    ...     def load_state(self, state):
    ...         pass
    >>> d = Threshold().update([1.0, 2.0, 9.0])
    >>> d.drift_detected, d.detection_index
    (True, 2)
    """

    def __init__(self):
        self.n_seen = 0
        self._drift = False
        self.detection_index: int | None = None
        self.last_gap = float("nan")
        self.last_bound = float("nan")

    @property
    def drift_detected(self) -> bool:
        return self._drift

    def update(self, x) -> Detector:
        x = np.atleast_1d(np.asarray(x, dtype=float)).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("drift detectors take finite values only")
        self._drift = False
        start = self.n_seen
        hit = self._update(x)
        self.n_seen += x.shape[0]
        if hit is not None:
            self._drift = True
            self.detection_index = start + hit
        return self

    @abstractmethod
    def _update(self, x: np.ndarray) -> int | None:
        """Take the batch; return the position within it where a drift is detected, if any."""

    def statistic(self) -> tuple[float, float]:
        """The detector's statistic now and the bound it alarms above (NaN where a detector
        does not say): what a report draws over the stream."""
        return float("nan"), float("nan")

    def copy(self) -> Detector:
        """A copy that the original's updates leave alone (a stream's snapshot)."""
        return copy.deepcopy(self)

    @abstractmethod
    def state(self) -> dict:
        """Plain JSON of the detector's state (for saving a model)."""

    @abstractmethod
    def load_state(self, state: dict) -> None:
        """Restore :meth:`state`."""
