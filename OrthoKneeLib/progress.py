"""Progress reporting and cancellation shared by every long job (synth, train, predict).

Engines take ``progress`` (a callable ``(done, total, message)``) and ``cancel`` (a
:class:`CancelToken`); front ends decide how to show them: a text bar in the CLI, a
progress bar and a Cancel button in Slicer.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Protocol, TextIO

from .errors import OrthoKneeError

__all__ = ["Cancelled", "CancelToken", "ProgressCallback", "TextProgress", "no_progress"]


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
    """A one-line text progress bar with rate and ETA, for terminals and CI logs."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30, unit: str = "item") -> None:
        self.label, self.width, self.unit = label, width, unit
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._first_done: int | None = None  # a resumed job starts counting mid-way

    def __call__(self, done: int, total: int, message: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        if self._first_done is None:
            self._first_done = max(done - 1, 0)
        counted = done - self._first_done  # items done since this bar started
        frac = done / total if total else 1.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        rate = f"{elapsed / counted:.1f} s/{self.unit}" if counted > 0 else ""
        eta = f"ETA {elapsed / counted * (total - done):.0f} s" if counted > 0 and done < total else f"{elapsed:.0f} s"
        line = f"{self.label} [{bar}] {done}/{total} {rate} {eta} {message}".rstrip()
        if self._tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


ProgressFn = Callable[[int, int, str], None]
