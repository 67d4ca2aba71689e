"""Shared fixtures: where the real knee MRI samples are, and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """../shared/data beside the repository (as in CI), or $ORTHOKNEE_SHARED_DATA."""
    env = os.environ.get("ORTHOKNEE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = shared_data_dir()
    if not (folder / "dess-pykneer").is_dir():
        pytest.skip(
            f"real knee MRI samples not found at {folder}; put ../shared/data beside the repository "
            "or set ORTHOKNEE_SHARED_DATA"
        )
    return folder


def make_image(
    array_kji: np.ndarray,
    spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


@pytest.fixture(scope="session")
def bench_script():
    """Load a script of bench/ as a module by name, to call its main() and helpers."""
    import importlib.util

    def _load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return _load


@pytest.fixture
def write_volume(tmp_path):
    """Write a synthetic image to a file under tmp_path and return the path."""

    def _write(name: str, array_kji: np.ndarray, **geometry) -> Path:
        path = tmp_path / name
        sitk.WriteImage(make_image(array_kji, **geometry), str(path))
        return path

    return _write
