"""``orthoknee predict`` in a child process: how the Slicer module runs the model.

A child process keeps torch's memory and threads out of Slicer's, can be stopped at once (SIGTERM,
then SIGKILL: a thread cannot be), and leaves a log. The child writes its outputs as one unit
(outfolder.py), so a stopped run leaves nothing behind, and the parent reads the result back with
``results.load_prediction``. Progress comes from the child's progress bar on stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import OrthoKneeError

__all__ = ["PredictProcess"]

_PROGRESS = re.compile(r"\] (\d+)/(\d+)(.*)$")
_TIMES = re.compile(r"^\s*(?:[\d.]+ s(?:/\w+)?\s*)?(?:ETA \d+ s\s*)?")


class PredictProcess:
    """``PredictProcess(series, out).start()``; then ``progress()``, ``cancel()``, ``wait()``.

    ``series``: view -> file of the series (the Slicer module writes its volume nodes to NRRD first).
    ``launcher``: how to start the child (Slicer passes ``slicer.util.launchConsoleProcess``, which sets
    up Slicer's Python environment); by default ``subprocess.Popen``.
    """

    def __init__(
        self,
        series: dict[str, str | os.PathLike],
        out: str | os.PathLike,
        bundle: str | os.PathLike | None = None,
        device: str = "auto",
        python: str = sys.executable,
        launcher: Callable[..., subprocess.Popen] | None = None,
    ) -> None:
        self.out = Path(out)
        self.log_path = self.out.parent / f"{self.out.name}.log"
        self.args = [python, "-m", "OrthoKneeLib.cli", "predict", "--out", str(self.out), "--device", device]
        for plane, path in series.items():
            self.args += [f"--{plane}", str(path)]
        if bundle:
            self.args += ["--bundle", str(bundle)]
        self.launcher = launcher
        self.process: subprocess.Popen | None = None
        self._progress = (0, 1, "starting")
        self._last_line = ""
        self._reader: threading.Thread | None = None

    def start(self) -> PredictProcess:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.launcher is not None:
            self.process = self.launcher(self.args)
        else:
            self.process = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
        self._reader = threading.Thread(target=self._read, name="orthoknee log", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        """Copy the child's output to the log; keep its latest progress and its last line."""
        with open(self.log_path, "w", encoding="utf-8") as log:
            buffer = ""
            while True:
                char = self.process.stdout.read(1)
                if not char:
                    break
                if char in "\r\n":
                    self._take(buffer, log)
                    buffer = ""
                else:
                    buffer += char
            self._take(buffer, log)

    def _take(self, line: str, log) -> None:
        line = line.strip()
        if not line:
            return
        log.write(line + "\n")
        log.flush()
        match = _PROGRESS.search(line)
        if match and line.startswith("predict ["):
            self._progress = (int(match.group(1)), int(match.group(2)), _TIMES.sub("", match.group(3)).strip())
        else:
            self._last_line = line

    def progress(self) -> tuple[int, int, str]:
        return self._progress

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the child discards what it was writing and exits), SIGKILL after ``grace_s``."""
        if not self.running():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def wait(self, timeout: float | None = None):
        """The Prediction the child saved; an OrthoKneeError with the child's own message if it failed."""
        from .results import load_prediction

        deadline = None if timeout is None else time.monotonic() + timeout
        code = self.process.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._reader is not None:
            self._reader.join(timeout=5)
        if code != 0:
            reason = self._last_line or f"exit code {code}"
            raise OrthoKneeError(f"orthoknee predict stopped ({reason}); the log is {self.log_path}.")
        return load_prediction(self.out)
