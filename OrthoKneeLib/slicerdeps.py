"""The Python packages the Slicer module needs, read from its requirements file.

Slicer installs an extension's Python dependencies with its own pip on first use. The file is
one requirement per line with comments; comment words must never reach pip as package names.
Lower bounds, not pins: an exact torch pin would replace a CUDA build another extension (or
PyTorchUtils) installed with a CPU one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["read_requirements", "requirement_name", "missing"]

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(path: str | os.PathLike) -> list[str]:
    """The requirement lines of ``path``: comments (whole-line or trailing) and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(requirement: str) -> str:
    """The distribution name a requirement line installs ("torch>=2.1" -> "torch")."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def missing(requirements: list[str], import_names: dict[str, str] | None = None) -> list[str]:
    """The requirements whose module cannot be imported here (``import_names`` maps distribution
    names that differ from their module, e.g. {"SimpleITK": "SimpleITK"})."""
    import importlib.util

    import_names = import_names or {}
    out = []
    for requirement in requirements:
        name = requirement_name(requirement)
        module = import_names.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            out.append(requirement)
    return out
