"""Finding the series in a DICOM folder, one volume per series *and echo*.

SimpleITK's GDCM series reader groups files by SeriesInstanceUID only, so a multi-echo
series (e.g. MESE T2 mapping: 8 echoes x 24 slices in one series) comes back as 192
stacked slices with a meaningless 0.48 mm spacing. Here files are grouped by series,
orientation, matrix size and echo, and each group is sorted along its own slice normal,
so every group is one geometrically valid 3D volume.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageDimensionError, UnreadableFileError, itk_error_detail

__all__ = ["DicomSeries", "scan_dicom_folder", "is_dicom_file", "laterality_of"]

_log = logging.getLogger(__name__)

# Files in a DICOM folder that are certainly not DICOM; skipping them saves a parse attempt.
_NOT_DICOM_SUFFIXES = {".txt", ".md", ".json", ".nrrd", ".nii", ".gz", ".mha", ".mhd", ".png", ".jpg", ".xml", ".csv"}


@dataclass
class DicomSeries:
    """One 3D volume's worth of DICOM files: a series, or one echo of a multi-echo series."""

    folder: str
    series_uid: str
    series_number: int | None
    description: str
    echo_number: int | None
    echo_time: float | None
    files: list[str]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM stores it
    orientation: tuple[float, ...]  # ImageOrientationPatient: row cosines then column cosines
    positions: list[tuple[float, float, float]] = field(repr=False)
    echoes_in_series: int = 1
    laterality: str | None = None  # "left" / "right" from the Laterality tags; None when absent or not L/R
    # why this group is not one 3D volume (e.g. a 4D series); raised only when it is the one chosen,
    # so one 4D series in a folder does not block the others
    problem: str | None = None
    # DICOM files in the folder that could not be parsed (named when a slice is missing)
    unreadable: list[str] = field(default_factory=list, repr=False)

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=float)
        return np.cross(o[:3], o[3:])

    @property
    def slice_spacing(self) -> float:
        """Distance between neighbouring slice centres along the slice normal (mm)."""
        if len(self.positions) < 2:
            return 0.0
        along = np.asarray(self.positions) @ self.normal
        return float(np.median(np.diff(along)))

    @property
    def label(self) -> str:
        """How a person names this volume in a list or an error message."""
        parts = [self.description or "(no description)"]
        if self.series_number is not None:
            parts.append(f"series {self.series_number}")
        if self.echoes_in_series > 1:
            parts.append(f"echo {self.echo_number} (TE {self.echo_time:g} ms)")
        return ", ".join(parts)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _float(value, default=None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value, default=None):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def laterality_of(ds) -> str | None:
    """The body side a DICOM header states: Laterality (0020,0060) of the series, else
    ImageLaterality (0020,0062); None when neither says L or R (B, U, empty or absent)."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return {"L": "left", "R": "right"}[value]
    return None


def _candidate_files(folder: Path, recursive: bool) -> list[Path]:
    walker = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in walker if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in _NOT_DICOM_SUFFIXES
    )


def scan_dicom_folder(folder: str | os.PathLike, recursive: bool = True) -> list[DicomSeries]:
    """Every 3D volume in a folder of DICOM files, split by series, orientation and echo.

    Files without pixel data (reports, presentation states) and localizer images whose
    orientation differs from the rest of their series end up in their own small groups;
    groups of fewer than 2 slices are dropped because they are not volumes.
    """
    import pydicom

    folder = Path(folder)
    groups: dict[tuple, list[tuple[str, object]]] = {}
    unreadable: list[str] = []
    for path in _candidate_files(folder, recursive):
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds on damaged files; each one is a damaged file
            _log.warning("%s: skipped, not a readable DICOM file (%s)", path, exc)
            unreadable.append(str(path))
            continue
        if "SOPClassUID" not in ds:  # every DICOM object names its class; garbage after a preamble does not
            unreadable.append(str(path))
            continue
        if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds or "Rows" not in ds:
            continue  # not an image with geometry (e.g. a structured report)
        iop = tuple(round(float(v), 4) for v in ds.ImageOrientationPatient)
        key = (
            str(ds.get("SeriesInstanceUID", "")),
            iop,
            int(ds.Rows),
            int(ds.Columns),
            _int(ds.get("EchoNumbers")),
            _float(ds.get("EchoTime")),
        )
        groups.setdefault(key, []).append((str(path), ds))

    echoes_per_series: dict[str, set] = {}
    for uid, _iop, _r, _c, echo_no, echo_time in groups:
        echoes_per_series.setdefault(uid, set()).add((echo_no, echo_time))

    result: list[DicomSeries] = []
    for key, members in groups.items():
        uid, iop, rows, cols, echo_no, echo_time = key
        if len(members) < 2:
            continue
        first = members[0][1]
        orientation = tuple(float(v) for v in first.ImageOrientationPatient)
        normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
        members.sort(key=lambda m: float(np.dot(normal, np.asarray(m[1].ImagePositionPatient, dtype=float))))
        positions = [tuple(float(v) for v in m[1].ImagePositionPatient) for m in members]
        along = np.asarray(positions) @ normal
        problem = None
        if np.any(np.diff(along) < 1e-3):
            repeats = len(along) - len(np.unique(np.round(along, 3)))
            problem = (
                f"series {uid} holds {len(members)} images at only {len(along) - repeats} slice positions: "
                "several images share a position (a 4D series, e.g. several time points or b-values)."
            )
        ps = first.get("PixelSpacing", [1.0, 1.0])
        result.append(
            DicomSeries(
                folder=str(folder),
                series_uid=uid,
                series_number=_int(first.get("SeriesNumber")),
                description=str(first.get("SeriesDescription", "") or ""),
                echo_number=echo_no,
                echo_time=echo_time,
                files=[m[0] for m in members],
                rows=rows,
                columns=cols,
                pixel_spacing=(float(ps[0]), float(ps[1])),
                orientation=orientation,
                positions=positions,
                echoes_in_series=len(echoes_per_series[uid]),
                laterality=laterality_of(first),
                problem=problem,
                unreadable=unreadable,
            )
        )
    result.sort(key=lambda s: (s.series_number or 0, s.series_uid, s.echo_number or 0, s.echo_time or 0.0))
    return result


def read_dicom_series(series: DicomSeries):
    """The series as a SimpleITK image (LPS), slices in the order scan_dicom_folder sorted them."""
    import SimpleITK as sitk

    if series.problem:
        raise ImageDimensionError(
            series.files[0], series.problem, "OrthoKnee reads 3D series; export one time point per folder first."
        )

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    reader.MetaDataDictionaryArrayUpdateOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UnreadableFileError(
            series.folder,
            f"DICOM series '{series.label}' could not be decoded ({itk_error_detail(exc)}).",
            "Check that the files are complete; compressed transfer syntaxes need GDCM support.",
        ) from None
    return image
