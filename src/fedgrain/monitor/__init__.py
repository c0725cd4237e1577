"""Monitoring and adjustment on streams: drift detectors on each leaf's loss stream
(``detectors``) and on its features (``features``), the stream's typed state (``state``), the
drift reaction of ``partial_fit`` (``stream``) and the granularity controller (``controller``).

The detectors follow River's API (``update(...)`` and a read-only ``drift_detected``) but take a
batch of values at a time, vectorised, and report the exact index of detection in the stream.
"""

from .base import Detector
from .detectors import ADWIN, PageHinkley
from .features import FeatureMonitor

__all__ = ["ADWIN", "Detector", "FeatureMonitor", "PageHinkley"]
