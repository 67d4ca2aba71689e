"""One exception family for everything a user can get wrong.

Front ends (Slicer module, CLI, web viewer) catch :class:`OrthoKneeError` and show
``str(error)`` as it is: every message names the file (or node) at fault, says what is
wrong with it and what to do instead, so no front end has to translate numpy or ITK
tracebacks into advice.
"""

from __future__ import annotations

from os import PathLike

__all__ = [
    "OrthoKneeError",
    "InputError",
    "MissingFileError",
    "UnreadableFileError",
    "AmbiguousSeriesError",
    "ImageDimensionError",
    "EchoChoiceRequiredError",
    "DuplicatePlaneError",
    "NoOverlapError",
    "InvalidVoxelsError",
    "EmptyVolumeError",
    "itk_error_detail",
    "advised_message",
]


def itk_error_detail(exc: BaseException) -> str:
    """The informative part of an ITK exception: its last non-empty line.

    ITK messages start with a source file location; the last line says what failed.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def advised_message(path: str | PathLike | None, problem: str, advice: str = "") -> str:
    """ "where: what is wrong. What to do." Front ends print messages as they are, so every
    error class that has a place, a problem and advice lays them out in this one way."""
    where = f"{path}: " if path else ""
    return f"{where}{problem}" + (f" {advice}" if advice else "")


class OrthoKneeError(Exception):
    """Base of every error OrthoKnee raises on purpose.

    One argument, the whole message: front ends show ``str(error)``, and an error raised with
    the (path, problem, advice) triple of :class:`InputError` would print as a tuple.
    """

    def __init__(self, message: str) -> None:
        if not isinstance(message, str):
            raise TypeError(f"{type(self).__name__} takes one message string, not {message!r}")
        super().__init__(message)


class InputError(OrthoKneeError):
    """Something is wrong with an input series; ``path`` names the file or folder."""

    def __init__(self, path: str | PathLike | None, problem: str, advice: str = "") -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.advice = advice
        super().__init__(advised_message(self.path, problem, advice))


class MissingFileError(InputError):
    """The path does not exist."""


class UnreadableFileError(InputError):
    """The file exists but is not an image OrthoKnee can read (corrupt, wrong format)."""


class AmbiguousSeriesError(InputError):
    """A folder holds several series and none was chosen."""

    def __init__(self, path, problem: str, advice: str = "", choices: list[str] | None = None) -> None:
        super().__init__(path, problem, advice)
        self.choices = list(choices or [])


class ImageDimensionError(InputError):
    """The image is 2D (a single slice) or has more dimensions than a 3D volume."""


class EchoChoiceRequiredError(InputError):
    """A multi-echo (or other 4D) series was given without saying which echo to use."""

    def __init__(self, path, problem: str, advice: str = "", echoes: list[float | None] | None = None) -> None:
        super().__init__(path, problem, advice)
        self.echoes = list(echoes or [])


class DuplicatePlaneError(InputError):
    """Two views of a case have the same plane (or a view is given for the wrong plane)."""


class NoOverlapError(InputError):
    """Two views of a case do not overlap in physical space: they cannot show one knee."""


class InvalidVoxelsError(InputError):
    """The image holds NaN or infinite voxels."""


class EmptyVolumeError(InputError):
    """The image has no voxels or no contrast (every voxel has the same value)."""
