"""Monitoring and adjustment (design.md 8): drift detectors on each leaf's loss stream and on
its features, and what the adaptive estimator does about them (``partial_fit``).

The detectors follow River's API (``update(...)`` and a read-only ``drift_detected``) but take a
batch of values at a time, vectorised, and report the exact index of detection in the stream.
"""

from .base import Detector
from .detectors import ADWIN, PageHinkley
from .features import FeatureMonitor

__all__ = ["ADWIN", "Detector", "FeatureMonitor", "PageHinkley"]
