"""Progress of long steps: reading, profiling, fitting leaves, meta-rounds, streaming.

Every step is reported through :mod:`logging` (logger ``"fedgrain"``: one INFO line when a
step ends, DEBUG lines as it advances) and, when one is given, to a callback: the estimators'
``callback`` parameter, called with a :class:`ProgressEvent` whenever a step starts, advances or
ends. The command line draws progress bars on stderr from these events (:class:`ProgressBar`),
unless ``--quiet`` is given or stderr is not a terminal.

Inside the library a step is opened with :func:`step` and advanced with :func:`advance`; both do
nothing beyond logging when no estimator is reporting (:func:`reporting` sets the reporter for
the duration of a fit).

Examples
--------
>>> from fedgrain import DivideConquerOrdinal
>>> from fedgrain.datasets import make_ordinal
>>> X, y, *_ = make_ordinal(2000, 3, 3, random_state=0)
>>> seen = []
>>> model = DivideConquerOrdinal(n_subsets=2, backend="serial",
...                              callback=lambda e: seen.append(e.stage)).fit(X, y)
>>> "fitting subsets" in seen
True
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["ProgressBar", "ProgressEvent", "advance", "reporting", "step", "tick"]

logger = logging.getLogger("fedgrain")


@dataclass(frozen=True)
class ProgressEvent:
    """One report: ``stage`` (what), ``done`` of ``total`` (``total`` None when unknown),
    ``unit`` (rows, leaves, rounds...), ``seconds`` since the step began, and ``finished``.

    Examples
    --------
    >>> e = ProgressEvent("fitting leaves", 3, 8, "leaves", 0.4)
    >>> f"{e.stage}: {e.done}/{e.total} {e.unit}"
    'fitting leaves: 3/8 leaves'
    """

    stage: str
    done: int
    total: int | None
    unit: str
    seconds: float
    finished: bool = False


class _Reporter:
    def __init__(self, callback: Callable[[ProgressEvent], None] | None):
        self.callback = callback
        self.stack: list[list] = []  # [stage, done, total, unit, start, takes ticks]

    def _emit(self, finished: bool = False) -> None:
        stage, done, total, unit, start, _ = self.stack[-1]
        event = ProgressEvent(stage, done, total, unit, time.perf_counter() - start, finished)
        if finished:
            if total is None and not done:
                logger.info("%s: done in %.2f s", stage, event.seconds)
            else:
                of = f"/{total:,}" if total is not None else ""
                logger.info("%s: %s%s %s in %.2f s", stage, f"{done:,}", of, unit,
                            event.seconds)
        else:
            logger.debug("%s: %s of %s %s", stage, done, total, unit)
        if self.callback is not None:
            self.callback(event)


_CURRENT: ContextVar[_Reporter | None] = ContextVar("fedgrain_progress", default=None)


@contextmanager
def reporting(callback: Callable[[ProgressEvent], None] | None) -> Iterator[None]:
    """Report the steps run inside the block to ``callback`` (and to logging)."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, not {type(callback).__name__}.")
    token = _CURRENT.set(_Reporter(callback))
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextmanager
def step(stage: str, total: int | None = None, unit: str = "", *,
         ticks: bool = False) -> Iterator[None]:
    """A step of ``total`` units (None: unknown); ends when the block does. With ``ticks``
    the backends advance it as their tasks finish (:func:`tick`)."""
    rep = _CURRENT.get()
    if rep is None:
        rep = _Reporter(None)
        token = _CURRENT.set(rep)
    else:
        token = None
    rep.stack.append([stage, 0, None if total is None else int(total), unit,
                      time.perf_counter(), ticks])
    rep._emit()
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            rep._emit(finished=True)
        rep.stack.pop()
        if token is not None:
            _CURRENT.reset(token)


def advance(n: int = 1) -> None:
    """Advance the innermost open step by ``n`` units (nothing when none is open)."""
    rep = _CURRENT.get()
    if rep is None or not rep.stack or n <= 0:
        return
    rep.stack[-1][1] += int(n)
    rep._emit()


def tick(n: int = 1) -> None:
    """A backend finished ``n`` tasks: advance the innermost step if it counts tasks."""
    rep = _CURRENT.get()
    if rep is not None and rep.stack and rep.stack[-1][5]:
        advance(n)


class ProgressBar:
    """A callback drawing one bar per step on a terminal (stderr by default).

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(out, width=10, min_interval=0)
    >>> bar(ProgressEvent("placing subsets", 5, 10, "rows", 0.2))
    >>> out.getvalue().strip()
    'placing subsets              [#####-----] 5/10 rows    0.2 s'

    Give it to an estimator as ``callback=ProgressBar()`` for bars in a script.
    """

    def __init__(self, stream=None, width: int = 28, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.width, self.min_interval = width, min_interval
        self._last = 0.0
        self._open = False  # a bar is drawn on the current line, without its newline

    def __call__(self, e: ProgressEvent) -> None:
        now = time.perf_counter()
        if not e.finished and e.done and now - self._last < self.min_interval:
            return
        self._last = now
        if e.total:
            frac = min(1.0, e.done / e.total)
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            count = f"{e.done:,}/{e.total:,} {e.unit}".rstrip()
        else:
            bar = ("." * (int(e.seconds * 4) % (self.width + 1))).ljust(self.width)
            count = f"{e.done:,} {e.unit}".rstrip() if e.done else ""
        line = f"\r{e.stage[:28]:<28} [{bar}] {count} {e.seconds:6.1f} s"
        self.stream.write(line + ("\n" if e.finished else ""))
        self.stream.flush()
        self._open = not e.finished

    def close(self) -> None:
        """End a bar left open by a step that failed, so what follows starts a new line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
