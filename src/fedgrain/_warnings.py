"""Warnings that point at the user's line, not at fedgrain's internals."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue a warning attributed to the first caller outside the fedgrain package.

    A fixed ``stacklevel`` is wrong as soon as the same check is reached through another call
    path (``predict`` vs ``predict_proba``, an estimator vs the command line); walking the
    stack is always right.
    """
    level = 2  # 1 would be this function, 2 its caller
    frame = sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
