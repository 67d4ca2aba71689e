"""Reading knee MRI series and keeping their geometry straight.

Everything here works in physical space. Images are SimpleITK images, which live in
DICOM's LPS patient frame; Slicer works in RAS. The only place that converts between the
two is :func:`ijk_to_ras` / :data:`LPS_TO_RAS` (used by ``scene.py``), so a flipped axis
can only be wrong in one place and is tested there.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import SimpleITK as sitk

from .dicom import DicomSeries, is_dicom_file, read_dicom_series, scan_dicom_folder
from .errors import (
    AmbiguousSeriesError,
    DuplicatePlaneError,
    EchoChoiceRequiredError,
    ImageDimensionError,
    InputError,
    MissingFileError,
    NoOverlapError,
    UnreadableFileError,
    itk_error_detail,
)
from .inputcheck import DEFAULT_MAX_VOXELS, check_dicom_extent, check_file_header, check_voxel_values

__all__ = [
    "PLANES",
    "VIEW_PLANES",
    "LPS_TO_RAS",
    "Volume",
    "VolumeSource",
    "Case",
    "list_volumes",
    "series_volumes",
    "load_volume",
    "detect_plane",
    "orientation_code",
    "slice_axis",
    "plane_direction",
    "ijk_to_ras",
    "resample_like",
    "resample_to_spacing",
    "reformat",
    "normalize_intensity",
    "overlap_fraction",
    "box_corners",
]

_log = logging.getLogger(__name__)

Plane = Literal["sagittal", "coronal", "axial", "oblique"]
VIEW_PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")
PLANES: tuple[str, ...] = VIEW_PLANES + ("oblique",)

# A slice normal within this angle of a patient axis names the plane; beyond it the series
# is oblique. 30 degrees keeps the usual oblique-sagittal ACL series (10-20 degrees) sagittal.
OBLIQUE_TOLERANCE_DEG = 30.0

# diag(-1, -1, 1): x and y flip between DICOM/ITK (LPS) and Slicer (RAS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_NORMAL_AXIS_TO_PLANE = {0: "sagittal", 1: "coronal", 2: "axial"}  # LPS x, y, z

# Canonical axes of a freshly acquired slice in each plane (LPS): row, column, normal.
# They match what scanners write (sagittal PIR, coronal LIP, axial LPS), right-handed.
_PLANE_AXES = {
    "sagittal": ((0, 1, 0), (0, 0, -1), (-1, 0, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
}


# --------------------------------------------------------------------------- geometry


def _direction_matrix(image: sitk.Image) -> np.ndarray:
    d = image.GetDimension()
    return np.asarray(image.GetDirection(), dtype=float).reshape(d, d)


def slice_axis(spacing: Sequence[float]) -> int:
    """Index of the through-plane axis: the one with the coarsest spacing.

    DICOM stacks slices along the third axis, but NIfTI/NRRD files may store a sagittal
    series as (slices, rows, columns); the coarsest axis is the acquisition's slice axis in
    both. With (near) isotropic voxels there is no way to tell, and the last axis wins.
    """
    spacing = np.asarray(spacing, dtype=float)
    coarsest = spacing.max()
    candidates = [i for i, s in enumerate(spacing) if s >= coarsest * 0.99]
    return candidates[-1]


def detect_plane(image: sitk.Image) -> str:
    """'sagittal', 'coronal', 'axial' or 'oblique', from the direction cosines."""
    normal = _direction_matrix(image)[:, slice_axis(image.GetSpacing())]
    axis = int(np.argmax(np.abs(normal)))
    angle = math.degrees(math.acos(min(1.0, abs(normal[axis]) / np.linalg.norm(normal))))
    return _NORMAL_AXIS_TO_PLANE[axis] if angle <= OBLIQUE_TOLERANCE_DEG else "oblique"


def orientation_code(image: sitk.Image) -> str:
    """Three-letter orientation code (e.g. 'PIR'): where each array axis points, LPS letters."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def plane_direction(plane: str) -> tuple[float, ...]:
    """Row-major 3x3 direction matrix (columns = axis directions) of a canonical slice stack."""
    if plane not in _PLANE_AXES:
        raise ValueError(f"plane must be one of {', '.join(VIEW_PLANES)}, got {plane!r}")
    return tuple(np.asarray(_PLANE_AXES[plane], dtype=float).T.ravel())


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to Slicer's RAS coordinates (mm).

    This is the single LPS->RAS conversion of the project: scene.py builds MRML volume
    nodes from it and reads them back through its inverse.
    """
    direction = _direction_matrix(image)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    lps_to_ras = np.eye(4)
    lps_to_ras[:3, :3] = LPS_TO_RAS
    return lps_to_ras @ ijk_to_lps


def box_corners(image: sitk.Image, start: Sequence[int] | None = None, size: Sequence[int] | None = None) -> np.ndarray:
    """Physical (LPS) positions of the 8 outer voxel *edges* of an index box (default: the image)."""
    start = np.zeros(3) if start is None else np.asarray(start, dtype=float)
    size = np.asarray(image.GetSize() if size is None else size, dtype=float)
    lo, hi = start - 0.5, start + size - 0.5
    pts = []
    for i in (lo[0], hi[0]):
        for j in (lo[1], hi[1]):
            for k in (lo[2], hi[2]):
                pts.append(image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))))
    return np.asarray(pts)


def overlap_fraction(moving: sitk.Image, reference: sitk.Image, samples_per_axis: int = 12) -> float:
    """Fraction of ``moving``'s field of view that lies inside ``reference``'s.

    Sampled on a regular grid of voxel centres, so oblique and rotated grids are handled
    exactly rather than through axis-aligned boxes.
    """
    size = moving.GetSize()
    axes = [np.linspace(0, n - 1, min(n, samples_per_axis)) for n in size]
    ref_size = np.asarray(reference.GetSize(), dtype=float)
    inside = total = 0
    for i in axes[0]:
        for j in axes[1]:
            for k in axes[2]:
                p = moving.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                idx = np.asarray(reference.TransformPhysicalPointToContinuousIndex(p))
                total += 1
                inside += bool(np.all(idx >= -0.5) and np.all(idx <= ref_size - 0.5))
    return inside / max(total, 1)


# --------------------------------------------------------------------------- Volume


@dataclass
class VolumeSource:
    """Where a volume came from and how to get exactly it back (series, echo)."""

    path: str
    series_uid: str | None = None
    series_number: int | None = None
    description: str = ""
    echo_number: int | None = None
    echo_time: float | None = None
    echoes_in_series: int = 1
    files: int = 1
    laterality: str | None = None  # "left" / "right" as the DICOM header states it; None if it does not

    @property
    def label(self) -> str:
        p = Path(self.path)
        parts = [f"{p.parent.name}/{p.name}" if p.suffix else p.name]  # a file: say which case folder
        if self.description:
            parts.append(self.description)
        if self.echoes_in_series > 1:
            te = f", TE {self.echo_time:g} ms" if self.echo_time is not None else ""
            parts.append(f"echo {self.echo_number}{te}")
        return " | ".join(parts)


@dataclass
class Volume:
    """One 3D MR series with its geometry (a SimpleITK image, LPS) and where it came from."""

    image: sitk.Image
    source: VolumeSource

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def plane(self) -> str:
        return detect_plane(self.image)

    @property
    def orientation(self) -> str:
        return orientation_code(self.image)

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(self.image.GetSize())  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.image.GetSpacing())  # type: ignore[return-value]

    def array(self) -> np.ndarray:
        """Voxels as a numpy array indexed [k, j, i] (SimpleITK's order), a copy."""
        return sitk.GetArrayFromImage(self.image)

    def describe(self) -> dict:
        """The stable JSON form used by ``orthoknee info --json``."""
        return _describe(self.image, self.source)


def _describe(image: sitk.Image, source: VolumeSource) -> dict:
    return {
        "path": source.path,
        "plane": detect_plane(image),
        "size": list(image.GetSize()),
        "spacing": [round(s, 6) for s in image.GetSpacing()],
        "orientation": orientation_code(image),
        "origin": [round(o, 4) for o in image.GetOrigin()],
        "echo_time": source.echo_time,
        "echo_number": source.echo_number,
        "echoes_in_series": source.echoes_in_series,
        "description": source.description,
        "series_uid": source.series_uid,
        "series_number": source.series_number,
        "files": source.files,
        "laterality": source.laterality,
    }


# --------------------------------------------------------------------------- reading


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in _VOLUME_SUFFIXES)


def _read_image_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UnreadableFileError(
            path,
            f"is not a readable image ({itk_error_detail(exc)}).",
            "Check the file is a complete NIfTI, NRRD or MHA volume or a DICOM series folder.",
        ) from None


def _frames(image: sitk.Image, path: Path) -> list[sitk.Image]:
    """Split a 4D image into its 3D frames (echoes); a 3D image is its own single frame."""
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise UnreadableFileError(
            path,
            f"holds {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour or vector image), "
            "not an MR series.",
            "Give a grey-level 3D volume.",
        )
    if dim == 2:
        raise ImageDimensionError(
            path, f"is a 2D image ({image.GetSize()[0]}x{image.GetSize()[1]}), not a volume.", "Give a 3D series."
        )
    if dim == 3:
        return [image]
    if dim == 4:
        size = list(image.GetSize())
        frames = []
        for t in range(size[3]):
            frames.append(sitk.Extract(image, size[:3] + [0], [0, 0, 0, t]))
        return frames
    raise ImageDimensionError(path, f"has {dim} dimensions; OrthoKnee reads 3D volumes.", "Give a 3D series.")


def _file_sources(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[tuple[sitk.Image, VolumeSource]]:
    check_file_header(path, max_voxels)
    image = _read_image_file(path)
    frames = _frames(image, path)
    if len(frames) == 1:
        return [(frames[0], VolumeSource(str(path)))]
    return [
        (frame, VolumeSource(str(path), echo_number=t + 1, echoes_in_series=len(frames)))
        for t, frame in enumerate(frames)
    ]


def _dicom_source(series: DicomSeries) -> VolumeSource:
    return VolumeSource(
        path=series.folder,
        series_uid=series.series_uid,
        series_number=series.series_number,
        description=series.description,
        echo_number=series.echo_number,
        echo_time=series.echo_time,
        echoes_in_series=series.echoes_in_series,
        files=len(series.files),
        laterality=series.laterality,
    )


@dataclass
class _Listing:
    """What a path holds before any pixel data is decoded (DICOM) or split (4D files)."""

    path: Path
    dicom: list[DicomSeries] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _list(path: str | os.PathLike) -> _Listing:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(path, "does not exist.", "Check the path; give a NIfTI/NRRD/MHA file or a DICOM folder.")
    if path.is_file():
        if is_dicom_file(path):
            # One file of a series stands for its whole series.
            series = [s for s in scan_dicom_folder(path.parent, recursive=False) if str(path) in s.files]
            if not series:
                raise ImageDimensionError(
                    path, "is a single DICOM image, not part of a 3D series in its folder.", "Give the series folder."
                )
            return _Listing(path, dicom=series)
        # Any other file goes to ITK; a corrupt or foreign one gets a clear UnreadableFileError.
        return _Listing(path, files=[path])
    dicom = scan_dicom_folder(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_volume_file(p))
    if not dicom and not files:
        raise UnreadableFileError(
            path,
            "holds no DICOM series and no NIfTI, NRRD or MHA volume.",
            "Point to the folder that holds the series' DICOM files, or to a volume file.",
        )
    return _Listing(path, dicom=dicom, files=files)


def list_volumes(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Volume]:
    """Every 3D volume a file or folder holds: each DICOM series, each echo, each 4D frame."""
    listing = _list(path)
    volumes = [Volume(_read_dicom(series, max_voxels), _dicom_source(series)) for series in listing.dicom]
    for f in listing.files:
        volumes.extend(Volume(image, source) for image, source in _file_sources(f, max_voxels))
    return volumes


def _check_even_slices(series: DicomSeries) -> None:
    """Refuse a series with a missing slice: stitching it at the median spacing would put
    every later slice out of place."""
    along = np.asarray(series.positions) @ series.normal
    steps = np.diff(along)
    if not steps.size:
        return
    median = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - median) > 0.1 * median)
    if uneven.size:
        n = int(uneven[0])
        before, after = Path(series.files[n]).name, Path(series.files[n + 1]).name
        unreadable = (
            f" The folder also holds unreadable DICOM files: {', '.join(Path(f).name for f in series.unreadable[:3])}."
            if series.unreadable
            else ""
        )
        raise UnreadableFileError(
            series.folder,
            f"series '{series.label}' is not evenly spaced: slices {before} and {after} are {steps[n]:.2f} mm apart "
            f"where the others are {median:.2f} mm (a slice is missing or corrupt).{unreadable}",
            "Export the whole series again.",
        )


def series_volumes(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Volume]:
    """The series of a case folder (or file): :func:`list_volumes` without label maps (files named
    ``*label*``, e.g. a training case's ``sagittal_labels.nrrd``)."""
    return [v for v in list_volumes(path, max_voxels) if "label" not in Path(v.path).name.lower()]


def _read_dicom(series: DicomSeries, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    check_dicom_extent(series.folder, series.rows, series.columns, len(series.files), max_voxels)
    if not series.problem:
        _check_even_slices(series)
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # we check slice uniformity ourselves
    try:
        image = read_dicom_series(series)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    steps = np.diff(np.asarray(series.positions) @ series.normal)
    # Spacing along the true normal, from all slice positions (ITK uses only the first two).
    spacing = list(image.GetSpacing())
    spacing[2] = float(np.median(steps)) if steps.size else spacing[2]
    image.SetSpacing(spacing)
    return image


def load_volume(
    path: str | os.PathLike,
    series: str | int | None = None,
    echo: int | None = None,
    check: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Read one 3D volume from a file or a DICOM folder.

    ``series`` picks a series in a folder holding several: its SeriesInstanceUID, its
    SeriesNumber, or its description. ``echo`` picks an echo (1-based echo number) of a
    multi-echo series or a frame of a 4D file. Without them an ambiguous input is an error
    that lists the choices; nothing is guessed. ``max_voxels`` refuses, from the header and
    before anything is allocated, a file claiming more voxels.
    """
    listing = _list(path)
    candidates: list[tuple[str, object]] = [("dicom", s) for s in listing.dicom]
    candidates += [("file", f) for f in listing.files]

    if series is not None:
        wanted = str(series)
        candidates = [
            c
            for c in candidates
            if (c[0] == "dicom" and wanted in (c[1].series_uid, str(c[1].series_number), c[1].description))
            or (c[0] == "file" and wanted in (str(c[1]), c[1].name))
        ]
        if not candidates:
            raise AmbiguousSeriesError(
                listing.path,
                f"holds no series matching {wanted!r}.",
                "Run `orthoknee info` on it to see its series.",
                choices=_choices(listing),
            )

    # Several echoes of the same series are one choice for `series`, several for `echo`.
    groups = _group_by_series(candidates)
    if len(groups) > 1:
        raise AmbiguousSeriesError(
            listing.path,
            f"holds {len(groups)} series: " + "; ".join(groups) + ".",
            "Choose one (series UID, number or description; `--series` on the command line).",
            choices=list(groups),
        )
    ((label, members),) = groups.items()

    if len(members) == 1 and members[0][0] == "file":
        frames = [Volume(img, src) for img, src in _file_sources(members[0][1], max_voxels)]
        if len(frames) == 1:
            volume = frames[0]  # a 3D file: there is no echo to choose
        else:
            options = [(v.source.echo_number, v.source.echo_time, lambda v=v: v) for v in frames]
            volume = _pick_echo(options, echo, listing.path, f"is a 4D image with {len(frames)} frames (echoes)")
    else:
        series = [m[1] for m in members]
        options = [
            (s.echo_number, s.echo_time, lambda s=s: Volume(_read_dicom(s, max_voxels), _dicom_source(s)))
            for s in series
        ]
        holds = (
            f"series '{series[0].description or series[0].series_uid}' holds {len(series)} echoes "
            "(a multi-echo acquisition)"
        )
        volume = _pick_echo(options, echo, listing.path, holds)
    if check:
        check_volume(volume)
    return volume


def _choices(listing: _Listing) -> list[str]:
    return list(_group_by_series([("dicom", s) for s in listing.dicom] + [("file", f) for f in listing.files]))


def _group_by_series(candidates) -> dict[str, list]:
    groups: dict[str, list] = {}
    for kind, item in candidates:
        if kind == "dicom":
            name = item.description or "(no description)"
            label = f"'{name}' (series {item.series_number}, UID {item.series_uid})"
        else:
            label = str(item)
        groups.setdefault(label, []).append((kind, item))
    return groups


def _echo_advice(echoes: list[tuple[int | None, float | None]]) -> str:
    listed = ", ".join(f"{n}" + (f" (TE {te:g} ms)" if te is not None else "") for n, te in echoes)
    return f"Choose one echo by number: {listed} (`--echo N` on the command line)."


def _pick_echo(
    options: list[tuple[int | None, float | None, Callable[[], Volume]]], echo: int | None, path: Path, holds: str
) -> Volume:
    """One echo out of ``(echo number, TE, load)`` options; ``load`` runs only for the chosen one.

    ``holds`` completes the sentence "<path> ..." when no echo was chosen among several.
    """
    if echo is None and len(options) == 1:
        return options[0][2]()
    echoes = [(n, te) for n, te, _ in options]
    if echo is None:
        raise EchoChoiceRequiredError(
            path, f"{holds}; one 3D volume is needed.", _echo_advice(echoes), echoes=[te for _, te in echoes]
        )
    for number, _, load in options:
        if number == echo:
            return load()
    raise EchoChoiceRequiredError(path, f"has no echo {echo}.", _echo_advice(echoes), echoes=[te for _, te in echoes])


def check_volume(volume: Volume) -> None:
    """Refuse volumes no model should see (inputcheck.check_voxel_values); each volume is checked once."""
    if getattr(volume, "_checked", False):
        return
    check_voxel_values(volume.image, volume.path)
    volume._checked = True


# --------------------------------------------------------------------------- Case


class Case:
    """Up to three views (sagittal, coronal, axial) of one knee, each with its own geometry.

    The reference view, whose grid every output is expressed on, is the sagittal series
    when present, else the coronal, else the axial.
    """

    def __init__(
        self,
        sagittal: Volume | None = None,
        coronal: Volume | None = None,
        axial: Volume | None = None,
        name: str | None = None,
        min_overlap: float = 0.05,
    ) -> None:
        given = {"sagittal": sagittal, "coronal": coronal, "axial": axial}
        for role, volume in given.items():
            if volume is not None and not isinstance(volume, Volume):
                raise InputError(
                    None,
                    f"the {role} view is a {type(volume).__name__}, not a Volume.",
                    "Read series with OrthoKneeLib.volumes.load_volume(path), or wrap a SimpleITK "
                    "image as Volume(image, VolumeSource(name)).",
                )
            if volume is not None:
                if not isinstance(volume.image, sitk.Image):
                    raise InputError(
                        volume.path,
                        f"holds a {type(volume.image).__name__}, not a SimpleITK image.",
                        "Build the Volume from a SimpleITK image (sitk.GetImageFromArray and the "
                        "spacing, origin and direction).",
                    )
                check_volume(volume)  # one validation path, however the volume arrived
        self.views: dict[str, Volume] = {p: v for p, v in given.items() if v is not None}
        self.warnings: list[str] = []
        if not self.views:
            raise InputError(None, "a case needs at least one view.", "Give a sagittal, coronal or axial series.")
        self._check_planes()
        self._check_overlap(min_overlap)
        self._check_laterality()
        self.name = name or _case_name(self.reference)

    @classmethod
    def from_volumes(cls, volumes: Iterable[Volume], name: str | None = None) -> "Case":
        """Assign each volume to its view by plane detection."""
        by_plane: dict[str, Volume] = {}
        for v in volumes:
            plane = v.plane
            if plane == "oblique":
                raise DuplicatePlaneError(
                    v.path,
                    "is oblique (its slice normal is more than "
                    f"{OBLIQUE_TOLERANCE_DEG:g} degrees from every patient axis), so its view cannot be detected.",
                    "Say which view it is (`--sagittal/--coronal/--axial`).",
                )
            if plane in by_plane:
                raise DuplicatePlaneError(
                    v.path,
                    f"is a {plane} series, and so is {by_plane[plane].path}: a case has one series per plane.",
                    "Give one sagittal, one coronal and one axial series.",
                )
            by_plane[plane] = v
        return cls(**by_plane, name=name)

    def _check_planes(self) -> None:
        seen: dict[str, str] = {}
        for role, volume in self.views.items():
            plane = volume.plane
            if plane == "oblique":
                self.warnings.append(f"{role} view {volume.path} is oblique; used as {role} as given.")
                continue
            if plane in seen:
                raise DuplicatePlaneError(
                    volume.path,
                    f"was given as the {role} view but is a {plane} series, like the {seen[plane]} view "
                    f"({self.views[seen[plane]].path}).",
                    "Give one sagittal, one coronal and one axial series.",
                )
            if plane != role:
                raise DuplicatePlaneError(
                    volume.path,
                    f"was given as the {role} view but its slices are {plane}.",
                    f"Give it as the {plane} view, or give a {role} series.",
                )
            seen[plane] = role

    def _check_overlap(self, min_overlap: float) -> None:
        ref_plane = self.reference_plane
        ref = self.views[ref_plane]
        for plane, volume in self.views.items():
            if plane == ref_plane:
                continue
            fraction = overlap_fraction(volume.image, ref.image)
            if fraction < min_overlap:
                raise NoOverlapError(
                    volume.path,
                    f"({plane} view) covers {fraction:.0%} of the space of the {ref_plane} view {ref.path}: "
                    "the two series do not show the same knee region.",
                    "Check that both series come from the same study (same patient position / frame of reference).",
                )

    def _tagged_sides(self) -> dict[str, str]:
        """plane -> the side its series' DICOM Laterality states, for the series that state one."""
        return {p: v.source.laterality for p, v in self.views.items() if v.source.laterality}

    def _check_laterality(self) -> None:
        tagged = self._tagged_sides()
        if len(set(tagged.values())) > 1:
            said = ", ".join(f"the {p} series says {side}" for p, side in tagged.items())
            self.warnings.append(
                f"the series disagree on the knee's side ({said} in its DICOM Laterality): "
                "check that they show the same knee."
            )

    @property
    def laterality(self) -> str | None:
        """The knee's side as the series' DICOM headers state it, when they state one and agree."""
        sides = set(self._tagged_sides().values())
        return sides.pop() if len(sides) == 1 else None

    @property
    def reference_plane(self) -> str:
        return next(p for p in VIEW_PLANES if p in self.views)

    @property
    def reference(self) -> Volume:
        return self.views[self.reference_plane]

    @property
    def planes(self) -> tuple[str, ...]:
        return tuple(p for p in VIEW_PLANES if p in self.views)

    def on_reference_grid(self, plane: str, kind: str = "linear") -> sitk.Image:
        """A view resampled, in physical space, onto the reference view's voxel grid."""
        return resample_like(self.views[plane].image, self.reference.image, kind=kind)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "reference": self.reference_plane,
            "views": {p: v.describe() for p, v in self.views.items()},
            "laterality": self.laterality,
            "warnings": list(self.warnings),
        }


def _case_name(volume: Volume) -> str:
    name = Path(volume.path).name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- resampling

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
    "label": sitk.sitkNearestNeighbor,
}


def resample_like(
    image: sitk.Image,
    reference: sitk.Image,
    kind: str = "linear",
    default: float = 0.0,
    output_type: int | None = None,
) -> sitk.Image:
    """``image`` sampled on ``reference``'s grid, matched by physical position (never by index).

    ``kind='label'`` uses nearest-neighbour so label values stay labels.
    """
    if kind not in _INTERPOLATORS:
        raise ValueError(f"kind must be one of {', '.join(_INTERPOLATORS)}, got {kind!r}")
    out_type = output_type if output_type is not None else image.GetPixelID()
    return sitk.Resample(image, reference, sitk.Transform(), _INTERPOLATORS[kind], default, out_type)


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], kind: str = "linear") -> sitk.Image:
    """Same field of view and orientation, new voxel size (e.g. the model's spacing)."""
    if len(spacing) != image.GetDimension() or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(
            None,
            f"spacing {tuple(spacing)} is not {image.GetDimension()} positive numbers (mm).",
            "Give one positive spacing per axis, e.g. 0.625 0.625 1.5.",
        )
    old_size = np.asarray(image.GetSize(), dtype=float)
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    new_spacing = np.asarray(spacing, dtype=float)
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    # Keep the outer edge of the field of view where it was.
    direction = _direction_matrix(image)
    first_edge = np.asarray(image.GetOrigin()) - direction @ (old_spacing / 2)
    origin = first_edge + direction @ (new_spacing / 2)
    reference = sitk.Image([int(s) for s in new_size], image.GetPixelID())
    reference.SetSpacing(tuple(new_spacing))
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(origin))
    if kind != "label" and np.any(new_spacing > old_spacing * 1.01):
        sigma = [0.5 * math.sqrt(max(n * n - o * o, 0.0)) for n, o in zip(new_spacing, old_spacing)]
        if max(sigma) > 0:
            image = _smooth(image, sigma)
    return resample_like(image, reference, kind=kind)


def _smooth(image: sitk.Image, sigma_mm: Sequence[float]) -> sitk.Image:
    """Gaussian anti-aliasing before downsampling; sigma per image axis, in mm."""
    pixel_type = image.GetPixelID()
    f = sitk.Cast(image, sitk.sitkFloat32)
    sigma = [max(s, 1e-6) for s in sigma_mm]
    f = sitk.SmoothingRecursiveGaussian(f, sigma)
    return f if pixel_type == sitk.sitkFloat32 else _cast_like(f, pixel_type)


def _cast_like(image: sitk.Image, pixel_type: int) -> sitk.Image:
    if pixel_type in (sitk.sitkFloat32, sitk.sitkFloat64):
        return sitk.Cast(image, pixel_type)
    return sitk.Cast(sitk.Round(image), pixel_type)


def reformat(
    volume: Volume | sitk.Image,
    plane: str,
    in_plane_spacing: float,
    slice_thickness: float,
    slice_gap: float = 0.0,
    subsamples: int = 5,
    output_type: int | None = None,
    transform: sitk.Transform | None = None,
) -> sitk.Image:
    """A thick-slice series in ``plane``, as a scanner would acquire it from the same knee.

    Each output slice is the mean over its slab thickness (``subsamples`` thin samples per
    slab) after in-plane anti-aliasing, so partial-volume effects look like a real 2D
    acquisition, not like a nearest slice. The grid covers the source's field of view.
    ``transform`` (output point -> source point) moves the anatomy, e.g. patient motion
    between series, at no extra resampling cost.
    """
    image = volume.image if isinstance(volume, Volume) else volume
    finite = all(math.isfinite(v) for v in (in_plane_spacing, slice_thickness, slice_gap))
    if not finite or slice_thickness <= 0 or in_plane_spacing <= 0 or slice_gap < 0:
        raise InputError(
            None,
            f"in-plane spacing {in_plane_spacing}, thickness {slice_thickness} and gap "
            f"{slice_gap} mm: spacing and thickness must be positive, the gap zero or more.",
            "Give e.g. in-plane 0.625, thickness 3, gap 0.",
        )
    if plane not in _PLANE_AXES:
        raise InputError(None, f"plane {plane!r} is not sagittal, coronal or axial.", "Choose one of those.")
    axes = np.asarray(_PLANE_AXES[plane], dtype=float)  # rows: row dir, col dir, normal
    corners = box_corners(image) @ axes.T  # coordinates of the source's corners in the new frame
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    step = slice_thickness + slice_gap
    spacing = np.asarray([in_plane_spacing, in_plane_spacing, step])
    size = np.maximum(1, np.floor((hi - lo) / spacing)).astype(int)
    first_centre = lo + spacing / 2  # in the new frame
    direction = axes.T  # columns are the new axes, in LPS

    src = sitk.Cast(image, sitk.sitkFloat32)
    sigma = 0.5 * math.sqrt(max(in_plane_spacing**2 - float(min(image.GetSpacing())) ** 2, 0.0))
    if sigma > 0:
        src = _smooth(src, [sigma] * 3)

    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(s) for s in spacing))
    ref.SetDirection(tuple(direction.ravel()))
    accumulated = np.zeros(tuple(int(s) for s in size[::-1]), dtype=np.float32)
    for n in range(subsamples):
        offset = ((n + 0.5) / subsamples - 0.5) * slice_thickness
        ref.SetOrigin(tuple(direction @ (first_centre + np.array([0.0, 0.0, offset]))))
        sample = sitk.Resample(src, ref, transform or sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        accumulated += sitk.GetArrayViewFromImage(sample)
    slab = sitk.GetImageFromArray(accumulated / float(subsamples))
    slab.SetSpacing(ref.GetSpacing())
    slab.SetDirection(ref.GetDirection())
    slab.SetOrigin(tuple(direction @ first_centre))
    out_type = output_type if output_type is not None else image.GetPixelID()
    return _cast_like(slab, out_type)


# --------------------------------------------------------------------------- intensities


def normalize_intensity(image: sitk.Image, lower_percentile: float = 0.5, upper_percentile: float = 99.5) -> sitk.Image:
    """Float32 image scaled to [0, 1] between robust percentiles of the foreground.

    MR intensities have no absolute scale and a few very bright voxels (vessels, fat at the
    coil) would squash everything else under min-max scaling; percentiles ignore them. The
    foreground is the voxels above zero when there is enough background to exclude.
    """
    array = sitk.GetArrayViewFromImage(image).astype(np.float32, copy=False)
    foreground = array[array > 0]
    values = foreground if foreground.size > 0.01 * array.size else array.ravel()
    lo, hi = np.percentile(values, [lower_percentile, upper_percentile])
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    out = sitk.GetImageFromArray(scaled)
    out.CopyInformation(image)
    return out
