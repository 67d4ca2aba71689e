"""Writing files so that an interrupted write never leaves a half file behind."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import SimpleITK as sitk

__all__ = ["atomic_path", "write_image_atomic", "write_json_atomic", "json_text", "finite_json", "load_checkpoint"]


def _suffix(path: Path) -> str:
    """Full suffix including double ones (.nii.gz, .seg.nrrd), so writers pick the format."""
    name = path.name
    return name[name.index(".") :] if "." in name else ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return Path(path)


def finite_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None (JSON null).

    Python's json writes bare ``NaN``, which is not JSON: browsers, jq and most other readers
    refuse the whole file. An undefined number (an AUC over one class) is null instead.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    if hasattr(data, "item") and getattr(data, "ndim", None) == 0:  # numpy scalars
        return finite_json(data.item())
    return data


def json_text(data: Any) -> str:
    """Strict JSON text (see :func:`finite_json`), indented for people."""
    return json.dumps(finite_json(data), indent=2, allow_nan=False)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Strict JSON (no NaN or Infinity, see :func:`finite_json`), written whole or not at all."""
    text = json_text(data) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    """A training checkpoint, unpickled with ``weights_only=True``.

    Checkpoints hold only tensors, numbers, strings, lists and dicts, so nothing else is
    accepted: a planted file cannot run code when training resumes from it. A file that is
    not such a checkpoint is an error naming it, with what to do.
    """
    import pickle

    import torch

    from .errors import InputError

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file holds more than data
        raise InputError(
            path,
            "is not a plain OrthoKnee training checkpoint: it holds Python objects besides "
            "tensors and numbers, and loading those could run code (refused).",
            "Delete it to start the training afresh.",
        ) from None
    except Exception as exc:  # a corrupt or foreign archive
        raise InputError(
            path,
            f"is not a plain OrthoKnee training checkpoint (unreadable: {type(exc).__name__}).",
            "Delete it to start the training afresh.",
        ) from None
    if not isinstance(state, dict):
        raise InputError(
            path,
            f"holds a {type(state).__name__}, not a training checkpoint.",
            "Delete it to start the training afresh.",
        )
    return state
