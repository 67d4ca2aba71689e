"""Where the files that ship with OrthoKnee live (sample case, later the demo bundle)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingFileError

__all__ = ["resources_dir", "sample_case_dir", "demo_bundle_dir", "SAMPLE_VIEWS", "DEMO_BUNDLE"]

DEMO_BUNDLE = "orthoknee-demo"

# The shipped sample case: one real sagittal DESS series plus two reformats of it.
SAMPLE_VIEWS = {
    "sagittal": "dess_sagittal.nrrd",
    "coronal": "dess_coronal_reformat.nrrd",
    "axial": "dess_axial_reformat.nrrd",
}


def resources_dir() -> Path:
    """The repository's Resources folder, or $ORTHOKNEE_RESOURCES when set."""
    env = os.environ.get("ORTHOKNEE_RESOURCES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "Resources"


def sample_case_dir() -> Path:
    folder = resources_dir() / "SampleData"
    missing = [name for name in SAMPLE_VIEWS.values() if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(
            folder,
            f"the sample case is incomplete (missing {', '.join(missing)}).",
            "Install OrthoKnee from a full clone of its repository (pip install -e .), "
            "or set ORTHOKNEE_RESOURCES to a folder holding SampleData/.",
        )
    return folder


def demo_bundle_dir() -> Path:
    """The shipped demo bundle (checked when it is opened, see bundle.Bundle.open)."""
    return resources_dir() / "Models" / DEMO_BUNDLE
