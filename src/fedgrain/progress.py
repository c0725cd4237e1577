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
    #: How deep the step is nested in others (0: a step of the fit itself).
    depth: int = 0


class _Reporter:
    def __init__(self, callback: Callable[[ProgressEvent], None] | None):
        self.callback = callback
        self.stack: list[list] = []  # [stage, done, total, unit, start, takes ticks]

    def _emit(self, finished: bool = False) -> None:
        stage, done, total, unit, start, _ = self.stack[-1]
        event = ProgressEvent(stage, done, total, unit, time.perf_counter() - start, finished,
                              len(self.stack) - 1)
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
    """A callback drawing one bar per step on a terminal (stderr by default), with tqdm.

    Each step gets a bar with its count, elapsed time and, when its total is known, an
    estimate of the time left; a nested step gets a bar below its parent's that goes away
    when it ends. A step that ends before its total (early stopping) ends its bar at what was
    done, marked "stopped early". :meth:`write` prints a line above the bars (events as they
    happen) without breaking them.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(out, min_interval=0)
    >>> bar(ProgressEvent("placing subsets", 5, 10, "rows", 0.2))
    >>> bar(ProgressEvent("placing subsets", 10, 10, "rows", 0.4, finished=True))
    >>> "10/10 rows" in out.getvalue()
    True

    Give it to an estimator as ``callback=ProgressBar()`` for bars in a script.
    """

    def __init__(self, stream=None, width: int = 24, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.width, self.min_interval = width, min_interval
        self._bars: dict[int, tuple[str, object]] = {}  # depth -> (stage, tqdm bar)

    def _open_bar(self, e: ProgressEvent):
        from tqdm import tqdm

        unit = f" {e.unit}" if e.unit else ""
        fmt = (f"{{desc:<28}} |{{bar:{self.width}}}| {{n_fmt}}/{{total_fmt}}{unit} "
               "[{elapsed}<{remaining}]{postfix}" if e.total else
               f"{{desc:<28}} {{n_fmt}}{unit} [{{elapsed}}]{{postfix}}")
        import shutil

        # the terminal's width; a terminal that does not say (0) gets 100 columns, not none
        size = shutil.get_terminal_size(fallback=(100, 24))
        return tqdm(total=e.total, desc=e.stage[:28], file=self.stream, position=e.depth,
                    leave=e.depth == 0, mininterval=self.min_interval, bar_format=fmt,
                    ascii=True, ncols=size.columns if size.columns >= 40 else 100,
                    nrows=size.lines if size.lines >= 5 else 24)

    def __call__(self, e: ProgressEvent) -> None:
        held = self._bars.get(e.depth)
        if held is None or held[0] != e.stage:
            for depth in sorted((d for d in self._bars if d >= e.depth), reverse=True):
                self._bars.pop(depth)[1].close()  # a new step at this depth ends the old
            held = (e.stage, self._open_bar(e))
            self._bars[e.depth] = held
        bar = held[1]
        if e.done > bar.n:
            bar.update(e.done - bar.n)
        if e.finished:
            if e.total is not None and e.done < e.total:
                bar.total = e.done  # ended early: the bar ends full at what was done
                bar.set_postfix_str("stopped early", refresh=False)
            bar.refresh()
            bar.close()
            del self._bars[e.depth]

    def write(self, text: str, file=None) -> None:
        """Print ``text`` to ``file`` (standard output by default) above the bars: they are
        cleared first and drawn again below it."""
        from tqdm import tqdm

        tqdm.write(text, file=file or sys.stdout)

    def close(self) -> None:
        """End the bars left open by a step that failed, so what follows starts a new line."""
        for depth in sorted(self._bars, reverse=True):
            self._bars.pop(depth)[1].close()
