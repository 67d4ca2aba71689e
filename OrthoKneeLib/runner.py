"""``orthoknee predict`` and ``orthoknee finetune`` in a child process: how the Slicer module runs them.

A child process keeps torch's memory and threads out of Slicer's, can be stopped at once (SIGTERM,
then SIGKILL: a thread cannot be), and leaves a log. The child writes its outputs as one unit
(outfolder.py; a bundle is written whole or not at all), so a stopped run leaves nothing behind,
and the parent reads the result back (``results.load_prediction``, ``Bundle.open``). Progress
comes from the child's progress bars on stderr.
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

__all__ = ["CliProcess", "PredictProcess", "FinetuneProcess"]

_PROGRESS = re.compile(r"\] (\d+)/(\d+)(.*)$")
_TIMES = re.compile(r"^\s*(?:[\d.]+ s(?:/\w+)?\s*)?(?:ETA \d+ s\s*)?")


class CliProcess:
    """An ``orthoknee`` command in a child process: ``start()``, then ``progress()``, ``cancel()``, ``wait()``.

    ``launcher``: how to start the child (Slicer passes ``slicer.util.launchConsoleProcess``, which sets
    up Slicer's Python environment); by default ``subprocess.Popen``. ``bars``: the progress bars
    (their labels) whose counts ``progress()`` reports, e.g. ("features", "finetune").
    """

    command = ""

    def __init__(
        self,
        args: list[str],
        log_path: str | os.PathLike,
        bars: tuple[str, ...],
        python: str = sys.executable,
        launcher: Callable[..., subprocess.Popen] | None = None,
    ) -> None:
        self.args = [python, "-m", "OrthoKneeLib.cli", *args]
        self.log_path = Path(log_path)
        self.bars = bars
        self.launcher = launcher
        self.process: subprocess.Popen | None = None
        self._progress = (0, 1, "starting")
        self._last_line = ""
        self._reader: threading.Thread | None = None

    def start(self) -> CliProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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
        bar = next((b for b in self.bars if line.startswith(f"{b} [")), None)
        if match and bar:
            detail = _TIMES.sub("", match.group(3)).strip()
            self._progress = (int(match.group(1)), int(match.group(2)), f"{bar}: {detail}" if detail else bar)
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

    def _wait_ok(self, timeout: float | None) -> None:
        """Wait for the child; an OrthoKneeError with its own last line if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        code = self.process.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._reader is not None:
            self._reader.join(timeout=5)
        if code != 0:
            reason = self._last_line or f"exit code {code}"
            raise OrthoKneeError(f"orthoknee {self.command} stopped ({reason}); the log is {self.log_path}.")


class PredictProcess(CliProcess):
    """``orthoknee predict`` of ``series`` (view -> file; the module writes its volume nodes to NRRD first) into ``out``."""

    command = "predict"

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
        args = ["predict", "--out", str(self.out), "--device", device]
        for plane, path in series.items():
            args += [f"--{plane}", str(path)]
        if bundle:
            args += ["--bundle", str(bundle)]
        super().__init__(args, self.out.parent / f"{self.out.name}.log", ("predict",), python, launcher)

    def wait(self, timeout: float | None = None):
        """The Prediction the child saved."""
        from .results import load_prediction

        self._wait_ok(timeout)
        return load_prediction(self.out)


class FinetuneProcess(CliProcess):
    """``orthoknee finetune`` of ``bundle`` on exported cases into bundle ``out`` (the annotator's button).

    Early stopping and the parent bundle's held-out comparison are the command's own; ``steps`` is
    an upper bound. New segments the annotator added become classes (``--new-labels``) when
    ``new_labels``.
    """

    command = "finetune"

    def __init__(
        self,
        bundle: str | os.PathLike,
        cases: list[str | os.PathLike],
        out: str | os.PathLike,
        steps: int = 300,
        new_labels: bool = False,
        device: str = "auto",
        python: str = sys.executable,
        launcher: Callable[..., subprocess.Popen] | None = None,
    ) -> None:
        self.out = Path(out)
        args = ["finetune", "--bundle", str(bundle), "--cases", *map(str, cases), "--out", str(self.out)]
        args += ["--steps", str(steps), "--device", device, "--early-stop", "3", "--validate-every", "50"]
        # a few corrections: a gentle rate and a pull toward the parent's weights, so that the other
        # cases are not forgotten (bench/correction.py: held-out Dice kept within 0.02); hard negative
        # cells, so that a rejected finding's score falls (0.34 -> 0.16 there; 0.34 without)
        args += ["--lr", "3e-4", "--anchor", "1", "--hard-negative-cells", "32"]
        if new_labels:
            args.append("--new-labels")
        super().__init__(args, self.out.parent / f"{self.out.name}.log", ("features", "finetune"), python, launcher)

    def wait(self, timeout: float | None = None):
        """The new Bundle."""
        from .bundle import Bundle

        self._wait_ok(timeout)
        return Bundle.open(self.out)
