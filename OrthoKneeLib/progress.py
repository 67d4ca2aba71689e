"""Progress reporting and cancellation shared by every long job (synth, train, predict).

Engines take ``progress`` (a callable ``(done, total, message)``) and ``cancel`` (a
:class:`CancelToken`); front ends decide how to show them: a text bar in the CLI, a
progress bar and a Cancel button in Slicer.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import Callable, Protocol, TextIO

from .errors import OrthoKneeError

__all__ = [
    "Cancelled",
    "CancelToken",
    "ProgressCallback",
    "Terminated",
    "TextProgress",
    "interrupt_on_signal",
    "no_progress",
    "raise_if_interrupted",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: files being written are discarded, one line is printed."""


_signals: list[int] = []  # SIGINT / SIGTERM received by interrupt_on_signal since the command began


def _interrupt(signum: int) -> KeyboardInterrupt:
    import signal

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def interrupt_on_signal(signum, frame) -> None:
    """The command line's SIGINT and SIGTERM handler: raises KeyboardInterrupt (Terminated for
    SIGTERM) and remembers the signal. An exception raised where Python ignores exceptions (a
    weakref callback of the import machinery, a ``__del__``) is printed and dropped, and the run
    would go on to write its result; :class:`TextProgress` raises it again at its next report."""
    _signals.append(signum)
    raise _interrupt(signum)


def raise_if_interrupted() -> None:
    """Raise the interrupt of a signal :func:`interrupt_on_signal` received, if any."""
    if _signals:
        raise _interrupt(_signals[0])


def forget_interrupts() -> None:
    _signals.clear()


class Cancelled(OrthoKneeError):
    """The user cancelled a long job; partial results were discarded."""


class CancelToken:
    """Thread-safe flag a front end sets and an engine checks between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user.")


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, message: str = "") -> None: ...


def no_progress(done: int, total: int, message: str = "") -> None:
    """The default callback: report nothing."""


class TextProgress:
    """A one-line text progress bar with rate and ETA, for terminals and CI logs.

    The rate is taken over the recent updates (the last ``window``, or a twentieth of the job
    if that is more), not since the start: when most items are found done (cached features,
    rendered cases) and the rest take seconds each, a rate since the start would put the ETA
    ten times too early. The twentieth keeps one slow step (a validation pass) from swinging it.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        width: int = 30,
        unit: str = "item",
        window: int = 20,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.width, self.unit = label, width, unit
        self.stream = stream or sys.stderr
        self.clock = clock  # seconds; tests pass a fake one so that rates are exact
        self.start = clock()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.window = window
        self._marks: deque[tuple[float, int]] = deque()  # (seconds since start, done) of recent updates

    def __call__(self, done: int, total: int, message: str = "") -> None:
        raise_if_interrupted()  # a signal whose exception was swallowed still stops the run here
        elapsed = self.clock() - self.start
        if not self._marks:  # a resumed job starts counting mid-way, at the first item it does
            self._marks.append((0.0, max(done - 1, 0)))
        self._marks.append((elapsed, done))
        while len(self._marks) > max(self.window, total // 20) + 1:
            self._marks.popleft()
        since, first = self._marks[0]
        counted = done - first
        per_item = (elapsed - since) / counted if counted > 0 else 0.0
        frac = done / total if total else 1.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        rate = f"{per_item:.1f} s/{self.unit}" if counted > 0 else ""
        eta = f"ETA {per_item * (total - done):.0f} s" if counted > 0 and done < total else f"{elapsed:.0f} s"
        line = f"{self.label} [{bar}] {done}/{total} {rate} {eta} {message}".rstrip()
        if self._tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


ProgressFn = Callable[[int, int, str], None]
