"""An output folder written as a unit: checked before any compute, locked against a second
writer, files staged beside their targets and moved into place together.

Why: a prediction writes a segmentation, eight overlays, findings.json and a montage. Two
runs into one folder mixed their files; an interrupt between two renames left a new
segmentation beside the old findings.json. Here every file is first written into a hidden
staging folder inside the output folder (same file system, so moving is a rename), and the
renames happen in one short step during which SIGINT and SIGTERM wait. An interrupt before
that step leaves the earlier result as it was and no staging folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import InputError, OrthoKneeError

__all__ = [
    "OutputBusyError",
    "check_output_folder",
    "locked_folder",
    "staged_files",
    "signals_deferred",
    "STAGING_PREFIX",
]

STAGING_PREFIX = ".orthoknee-staging-"
_held: dict[Path, int] = {}  # folders this process has locked -> nesting depth
_held_lock = threading.Lock()


class OutputBusyError(OrthoKneeError):
    """Another OrthoKnee process is writing into the same output folder."""


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any compute, an output folder that is a file or cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is a file, not a folder.", "Give a folder for --out (new or existing).")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise InputError(folder, f"cannot be made: {existing} is a file.", "Give another --out.")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems all show here
        fd, probe = tempfile.mkstemp(prefix=".orthoknee-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            folder,
            f"cannot be written ({exc.strerror or exc} in {existing}).",
            "Give a folder you can write to for --out.",
        ) from None
    return folder


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Create ``folder`` if needed and hold an exclusive lock on it (flock on the folder
    itself: no lock file to leave behind). Re-entrant within one process; another process
    gets :class:`OutputBusyError` at once rather than waiting or mixing files. A folder this
    call created and nothing was written into is removed again on the way out."""
    folder = check_output_folder(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot be made ({exc.strerror or exc}).", "Give another --out.") from None
    key = folder.resolve()
    with _held_lock:
        depth = _held.get(key, 0)
        _held[key] = depth + 1
    fd = None
    try:
        if depth == 0:
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputBusyError(
                        f"{folder}: another OrthoKnee run is writing into this folder. Wait for it "
                        "to finish, or give another --out."
                    ) from None
                raise
            _remove_stale_staging(folder)
        yield folder
    finally:
        with _held_lock:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        if fd is not None:
            os.close(fd)
        if created and depth == 0:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def _remove_stale_staging(folder: Path) -> None:
    """Staging folders left by a killed run (SIGKILL, power loss): the lock is ours, so no one uses them."""
    for leftover in folder.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then take effect. Used around the
    renames that publish a result, so an interrupt never splits them. Off the main thread
    (a Slicer worker) signals are not ours to handle and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            os.kill(os.getpid(), pending[0])


class _Staging:
    """Names of files in a staging folder, each bound for a target path in the output folder."""

    def __init__(self, folder: Path, root: Path) -> None:
        self.folder, self.root, self.moves = folder, root, []

    def path(self, target: str | os.PathLike) -> Path:
        """Where to write the file that will become ``target`` (relative to the output folder)."""
        target = Path(target)
        relative = target.relative_to(self.root) if target.is_absolute() else target
        staged = self.folder / relative
        staged.parent.mkdir(parents=True, exist_ok=True)
        self.moves.append((staged, self.root / relative))
        return staged


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[_Staging]:
    """Stage files for ``folder`` (already locked) and move them in when the block succeeds,
    in the order they were staged (so put the index file, findings.json, last)."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        stage = _Staging(staging, folder)
        yield stage
        with signals_deferred():
            for staged, target in stage.moves:
                if staged.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
