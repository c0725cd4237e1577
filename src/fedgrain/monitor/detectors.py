"""Page-Hinkley and ADWIN, for increases of a leaf's loss, vectorised over batches.

- :class:`PageHinkley`: the cumulative deviation ``m_t = sum_i (x_i - mean_i - delta)`` from
  the running mean, and an alarm when ``m_t - min_s m_s > threshold``. Exact per value: the
  batch is processed with cumulative sums, and the detection indices are the same as value
  by value.
- :class:`ADWIN` (Bifet & Gavalda, 2007): an adaptive window of recent values, kept as buckets
  of ``bucket`` values (count, sum, sum of squares). Beyond ``max_buckets`` the two oldest are
  merged, so the old end of the window is one coarse bucket that grows: each test compares the
  newest parts with everything older since the last change. After each bucket, every split of
  the window into an older and a newer part is tested with the Bernstein bound of the paper,
  with ``ln(2 ln N / delta)`` as River has it; when the newer part's mean exceeds the older
  one's by more than the bound, the older part is dropped and a drift reported (only
  increases: a leaf whose loss falls is not in trouble). Detection is at bucket resolution.
"""

from __future__ import annotations

import copy

import numpy as np

from .base import Detector


class PageHinkley(Detector):
    """Page-Hinkley test for an increase in the mean.

    Parameters
    ----------
    delta : float
        Tolerated increase (in the values' units) before deviations accumulate.
    threshold : float
        Alarm level of ``m_t - min m``.
    min_instances : int
        No alarm before this many values since the last reset.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> losses = np.r_[rng.exponential(1.0, 5000), rng.exponential(3.0, 1000)]
    >>> ph = PageHinkley()
    >>> for a in range(0, losses.size, 500):
    ...     _ = ph.update(losses[a:a + 500])
    ...     if ph.drift_detected:
    ...         print(ph.detection_index >= 5000)
    ...         break
    True
    """

    def __init__(self, delta: float = 0.05, threshold: float = 50.0, min_instances: int = 100):
        super().__init__()
        self.delta, self.threshold, self.min_instances = delta, threshold, min_instances
        self._reset()

    def _reset(self):
        self._n, self._sum, self._m, self._min = 0, 0.0, 0.0, 0.0

    def _update(self, x):
        first, offset = None, 0
        while x.size:
            n = self._n + np.arange(1, x.shape[0] + 1)
            mean = (self._sum + np.cumsum(x)) / n
            m = self._m + np.cumsum(x - mean - self.delta)
            low = np.minimum(self._min, np.minimum.accumulate(m))
            alarm = np.flatnonzero((m - low > self.threshold) & (n >= self.min_instances))
            if alarm.size == 0:
                self._n, self._sum = int(n[-1]), float(self._sum + x.sum())
                self._m, self._min = float(m[-1]), float(low[-1])
                return first
            hit = int(alarm[0])
            if first is None:
                first = offset + hit
                self.last_gap, self.last_bound = float(m[hit] - low[hit]), self.threshold
            self._reset()
            x, offset = x[hit + 1 :], offset + hit + 1  # go on from the change
        return first

    def statistic(self) -> tuple[float, float]:
        """``m_t - min m`` and the threshold (NaN before ``min_instances`` values: no alarm
        can be raised yet)."""
        if self._n < self.min_instances:
            return float("nan"), float(self.threshold)
        return float(self._m - self._min), float(self.threshold)

    def state(self):
        return {"n": self._n, "sum": self._sum, "m": self._m, "min": self._min,
                "n_seen": self.n_seen}

    def load_state(self, s):
        self._n, self._sum, self._m, self._min = int(s["n"]), s["sum"], s["m"], s["min"]
        self.n_seen = int(s["n_seen"])


class ADWIN(Detector):
    """ADWIN for an increase in the mean, on buckets of ``bucket`` values.

    Parameters
    ----------
    delta : float
        Confidence of the cut test (smaller: fewer false alarms, later detection).
    bucket : int
        Values per bucket: the resolution of detection.
    max_buckets : int
        Beyond this, the two oldest buckets are merged (the window keeps its length, the old
        end loses resolution).
    min_window : int
        No test until the window holds this many values.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> adwin = ADWIN(delta=1e-5)
    >>> adwin.update(rng.exponential(1.0, 20_000)).drift_detected
    False
    >>> adwin.update(rng.exponential(2.0, 2_000)).drift_detected
    True
    """

    def __init__(self, delta: float = 1e-3, bucket: int = 100, max_buckets: int = 64,
                 min_window: int = 500):
        super().__init__()
        self.delta, self.bucket = delta, bucket
        self.max_buckets, self.min_window = max_buckets, min_window
        # [count, sum, sum of squares] per bucket, oldest first: rows [:_m] of _B
        self._B = np.zeros((max_buckets + 1, 3))
        self._m = 0
        self._partial = [0.0, 0.0, 0.0]

    @property
    def _buckets(self) -> np.ndarray:
        return self._B[: self._m]

    def _update(self, x):
        pos, first = 0, None
        while pos < x.shape[0]:
            room = self.bucket - int(self._partial[0])
            chunk = x[pos : pos + room]
            self._partial[0] += chunk.shape[0]
            self._partial[1] += float(chunk.sum())
            self._partial[2] += float(chunk @ chunk)
            pos += chunk.shape[0]
            if self._partial[0] >= self.bucket:
                self._B[self._m] = self._partial
                self._m += 1
                self._partial = [0.0, 0.0, 0.0]
                if self._m > self.max_buckets:  # merge the two oldest
                    self._B[0] += self._B[1]
                    self._B[1 : self._m - 1] = self._B[2 : self._m]
                    self._m -= 1
                if self._cut() and first is None:
                    first = pos - 1  # the rest of the batch goes on after the cut
        return first

    def _gaps(self):
        """Per split of the window into older and newer buckets: the newer part's mean minus
        the older part's, and the bound it must exceed (None before the test can run)."""
        m = self._m
        if m < 2:
            return None
        B = self._B[:m]
        n, s, q = B[:, 0], B[:, 1], B[:, 2]
        cn, cs = np.cumsum(n), np.cumsum(s)
        N, S = cn[-1], cs[-1]
        if N < self.min_window:
            return None
        var = max(q.sum() / N - (S / N) ** 2, 1e-12)
        n0, s0 = cn[:-1], cs[:-1]  # older part: buckets up to the split
        n1, s1 = N - n0, S - s0
        inv = 1.0 / n0 + 1.0 / n1  # 1 / m, m the harmonic size of the two parts
        dd = np.log(2.0 * np.log(N) / self.delta) if N > 1 else np.log(2.0 / self.delta)
        eps = np.sqrt(2.0 * inv * var * dd) + 2.0 / 3.0 * inv * dd
        return s1 / n1 - s0 / n0, eps  # newer minus older

    def _cut(self) -> bool:
        found = self._gaps()
        if found is None:
            return False
        gap, eps = found
        cut = np.flatnonzero(gap > eps)
        if cut.size == 0:
            return False
        i = int(cut[-1])
        self.last_gap, self.last_bound = float(gap[i]), float(eps[i])
        keep = self._m - (i + 1)  # keep the part after the change
        self._B[:keep] = self._B[i + 1 : self._m]
        self._m = keep
        return True

    def statistic(self) -> tuple[float, float]:
        """The split of the window nearest to a cut: its gap between the means and its
        bound (NaN while the window is too short to test)."""
        found = self._gaps()
        if found is None:
            return float("nan"), float("nan")
        gap, eps = found
        i = int(np.argmax(gap / eps))
        return float(gap[i]), float(eps[i])

    @property
    def width(self) -> int:
        """Values in the window."""
        return int(sum(b[0] for b in self._buckets) + self._partial[0])

    def state(self):
        return {"buckets": self._buckets.tolist(), "partial": list(self._partial),
                "n_seen": self.n_seen}

    def load_state(self, s):
        buckets = np.asarray(s["buckets"], dtype=float).reshape(-1, 3)
        self._B = np.zeros((max(self.max_buckets, buckets.shape[0]) + 1, 3))
        self._B[: buckets.shape[0]] = buckets
        self._m = buckets.shape[0]
        self._partial = list(map(float, s["partial"]))
        self.n_seen = int(s["n_seen"])

    def copy(self) -> ADWIN:
        """A copy that the original's updates leave alone."""
        c = copy.copy(self)
        c._B = self._B.copy()
        c._partial = list(self._partial)
        return c


class ReferenceCUSUM(Detector):
    """Page's CUSUM of a leaf's losses against what its own model expects.

    Each value is a row's *standardised excess*: its log-loss minus the entropy of the
    model's predicted distribution for the row, over the standard deviation of the log-loss
    under that distribution, minus the leaf's mean of the same at fit time (so a model that
    was a little misspecified when fitted is not in drift for it), clipped to
    ``[-clip, clip]``. Under the model the values have mean about 0 and variance about 1,
    whatever the rows' features: a covariate shift alone does not move them, unlike a loss
    level. ``S_t = max(0, S_{t-1} + u_t - allowance)``, alarm when ``S_t > threshold``: a
    stream whose labels are off from its first row is flagged within tens of rows, where
    detectors that compare the stream only with itself never are. Exact per value (the
    batch by cumulative sums).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> cusum = ReferenceCUSUM()
    >>> _ = cusum.update(rng.standard_normal(100_000))   # as the model expects
    >>> cusum.drift_detected
    False
    >>> _ = cusum.update(rng.standard_normal(1000) + 2.0)   # two standard deviations worse
    >>> cusum.drift_detected, cusum.detection_index - 100_000 < 50
    (True, True)
    """

    def __init__(self, allowance: float = 0.5, threshold: float = 25.0, clip: float = 5.0):
        super().__init__()
        self.allowance, self.threshold, self.clip = allowance, threshold, clip
        self._s = 0.0

    def _update(self, x):
        first, offset = None, 0
        while x.size:
            c = np.cumsum(np.clip(x, -self.clip, self.clip) - self.allowance)
            s = c - np.minimum(-self._s, np.minimum.accumulate(c))
            alarm = np.flatnonzero(s > self.threshold)
            if alarm.size == 0:
                self._s = float(s[-1])
                return first
            hit = int(alarm[0])
            if first is None:
                first = offset + hit
                self.last_gap, self.last_bound = float(s[hit]), self.threshold
            self._s = 0.0
            x, offset = x[hit + 1 :], offset + hit + 1
        return first

    def statistic(self) -> tuple[float, float]:
        return float(self._s), float(self.threshold)

    def state(self):
        return {"s": self._s, "n_seen": self.n_seen}

    def load_state(self, s):
        self._s, self.n_seen = float(s["s"]), int(s["n_seen"])


def standardised_excess(proba: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each row's log-loss minus its expectation under the predicted distribution, over its
    standard deviation there (the values :class:`ReferenceCUSUM` takes, before the fit-time
    mean is subtracted)."""
    p = np.clip(proba, 1e-15, 1.0)
    logp = np.log(p)
    entropy = -np.einsum("ij,ij->i", p, logp)
    second = np.einsum("ij,ij->i", p, logp * logp)
    sd = np.sqrt(np.maximum(second - entropy * entropy, 1e-6))
    loss = -logp[np.arange(codes.shape[0]), codes]
    return (loss - entropy) / sd
