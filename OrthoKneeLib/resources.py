"""Where the files that ship with OrthoKnee live (sample case, later the demo bundle)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingFileError

__all__ = ["resources_dir", "sample_case_dir", "demo_bundle_dir", "sample_data_source", "SAMPLE_VIEWS", "DEMO_BUNDLE"]

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


def sample_data_source(thumbnail: str | os.PathLike | None = None) -> dict:
    """The sample case as Slicer's SampleData module registers it (the keyword arguments of
    ``SampleDataLogic.registerCustomSampleDataSource``): local file URIs, node names per view, and
    the SHA-256 of each file from SampleData/SHA256SUMS, which SampleData checks when it copies
    them into its cache (a damaged install shows as a checksum error, not as a wrong image)."""
    folder = sample_case_dir()
    sums = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name:
            sums[name] = digest
    names = list(SAMPLE_VIEWS.values())
    missing = [n for n in names if n not in sums]
    if missing:
        raise MissingFileError(
            folder / "SHA256SUMS", f"lists no checksum for {', '.join(missing)}.", "Reinstall OrthoKnee."
        )
    return {
        "category": "OrthoKnee",
        "sampleName": "OrthoKneeSampleDESS",
        "uris": [(folder / n).resolve().as_uri() for n in names],
        "fileNames": names,
        "nodeNames": [f"OrthoKnee sample {plane}" for plane in SAMPLE_VIEWS],
        "checksums": [f"SHA256:{sums[n]}" for n in names],
        "loadFileTypes": ["VolumeFile"] * len(names),
        "thumbnailFileName": str(thumbnail) if thumbnail else None,
    }
