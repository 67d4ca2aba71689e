"""Checks every input series passes before a model sees it, whichever way it arrived.

Three moments, cheapest first:

1. :func:`check_file_header` before any voxel is read: the size the header claims (a 1 KB
   header may claim 10^10 voxels, which would exhaust memory), NIfTI spacing and whether the
   file holds all the voxels its header promises (ITK zero-fills a truncated NIfTI silently).
2. :func:`check_dicom_extent` before a DICOM series is decoded: the same size limit.
3. :func:`check_voxel_values` after reading: finite values after the float32 cast the model
   makes, contrast, and :func:`not_a_knee_reason`: inputs whose statistics no knee MRI has
   (white noise, CT's Hounsfield range).

Every failure is an :class:`~OrthoKneeLib.errors.InputError` that names the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import EmptyVolumeError, ImageDimensionError, InputError, InvalidVoxelsError, UnreadableFileError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "TooLargeError",
    "NotAKneeError",
    "check_file_header",
    "check_dicom_extent",
    "check_voxel_values",
    "not_a_knee_reason",
]

# 2^28 voxels is 1 GiB as float32: five times a native 512 x 512 x 200 knee series.
DEFAULT_MAX_VOXELS = 2**28
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class TooLargeError(InputError):
    """The header claims more voxels than the limit allows."""


class NotAKneeError(InputError):
    """The image's statistics are not those of a knee MRI (noise, CT)."""


def _limit_advice(max_voxels: int) -> str:
    return (
        f"A knee MRI series has well under {max_voxels:,} voxels; if this one really is that large, "
        "raise the limit with --max-voxels N (or max_voxels= in Python)."
    )


def _check_voxel_count(path, size, max_voxels: int) -> None:
    count = int(np.prod([int(s) for s in size], dtype=object))
    if count > max_voxels:
        dims = "x".join(str(int(s)) for s in size)
        raise TooLargeError(
            path, f"claims {dims} = {count:,} voxels, more than the limit of {max_voxels:,}.", _limit_advice(max_voxels)
        )


# --------------------------------------------------------------------------- files


def check_file_header(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Refuse a file from its header alone: oversized, or (NIfTI) zero spacing or missing data."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # not an image ITK knows; the read that follows reports it with ITK's reason
    _check_voxel_count(path, reader.GetSize(), max_voxels)
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        _check_nifti(path, name.endswith(".gz"))


def _nifti_header(path: Path, compressed: bool) -> bytes:
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            return fh.read(352)
    except (OSError, EOFError, zlib.error) as exc:
        raise UnreadableFileError(
            path, f"is not a readable NIfTI file ({exc}).", "Export the series again; the file is damaged."
        ) from None


def _check_nifti(path: Path, compressed: bool) -> None:
    header = _nifti_header(path, compressed)
    if len(header) < 348:
        raise UnreadableFileError(path, "is shorter than a NIfTI header.", "Export the series again.")
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    dims = struct.unpack(endian + "8h", header[40:56])
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    pixdim = struct.unpack(endian + "8f", header[76:108])
    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    ndim = max(1, min(int(dims[0]), 7))
    spatial = pixdim[1 : min(ndim, 3) + 1]
    if any(not np.isfinite(p) or p <= 0 for p in spatial):
        raise InputError(
            path,
            f"has voxel spacing {', '.join(f'{p:g}' for p in spatial)} mm in its header; spacing must be positive.",
            "The export lost the geometry; export the series again (e.g. with dcm2niix).",
        )
    expected = int(vox_offset) + int(np.prod([max(1, d) for d in dims[1 : ndim + 1]], dtype=np.int64)) * bitpix // 8
    got = _data_length(path, compressed)
    if got < expected:
        raise UnreadableFileError(
            path,
            f"is truncated: its header promises {expected:,} bytes of image data but the file holds {got:,}.",
            "Copy or export the file again; it was cut short.",
        )


def _data_length(path: Path, compressed: bool) -> int:
    """Bytes in the file, after decompression for .gz (streamed: no more memory than a chunk)."""
    if not compressed:
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return total  # a cut gzip stream: count what it held
    return total


# --------------------------------------------------------------------------- DICOM


def check_dicom_extent(
    folder: str | os.PathLike, rows: int, columns: int, slices: int, max_voxels: int = DEFAULT_MAX_VOXELS
) -> None:
    _check_voxel_count(folder, (columns, rows, slices), max_voxels)


# --------------------------------------------------------------------------- voxels


def check_voxel_values(image: sitk.Image, path) -> None:
    """Refuse what no model should see: not 3D, one slice, complex or vector voxels, values
    that are not finite in float32 (where the model computes), no contrast, not a knee."""
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise UnreadableFileError(
            path,
            "holds complex voxels (raw k-space or phase data), not a magnitude image.",
            "Give the magnitude image of the series.",
        )
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise UnreadableFileError(
            path,
            f"holds {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a colour, vector or complex image), not a grey-level MR series.",
            "Give a magnitude image.",
        )
    if image.GetDimension() != 3:
        raise ImageDimensionError(path, f"is {image.GetDimension()}D; a 3D volume is needed.", "Give a 3D series.")
    size = image.GetSize()
    if any(n < 2 for n in size):
        raise ImageDimensionError(
            path,
            f"is a single slice ({size[0]}x{size[1]}x{size[2]} voxels), i.e. a 2D image.",
            "Give the whole series (all its slices).",
        )
    spacing = image.GetSpacing()
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(path, f"has voxel spacing {spacing}; spacing must be positive.", "Export the series again.")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InvalidVoxelsError(
                path,
                f"has {bad} NaN or infinite voxels.",
                "Re-export the series; a reconstruction or conversion step failed.",
            )
    lo, hi = float(array.min()), float(array.max())
    if max(abs(lo), abs(hi)) > _FLOAT32_MAX / 16:
        raise InvalidVoxelsError(
            path,
            f"has values up to {max(abs(lo), abs(hi)):.3g}, beyond what single precision holds.",
            "Rescale the series (an MR image's values are well below 1e30).",
        )
    if lo == hi:
        raise EmptyVolumeError(
            path, f"has no contrast: every voxel is {array.flat[0]}.", "The series is blank; check the export."
        )
    reason = not_a_knee_reason(array)
    if reason:
        raise NotAKneeError(
            path, f"does not look like an MR image: {reason}.", "Give a knee MRI series (sagittal, coronal or axial)."
        )


def _sample(array: np.ndarray, target: int = 2_000_000) -> np.ndarray:
    """A strided view with at most about ``target`` voxels, keeping neighbours adjacent in-plane."""
    k = max(1, int(np.ceil(array.shape[0] * array.shape[1] * array.shape[2] / target)))
    return np.asarray(array[::k], dtype=np.float32)


def neighbour_correlation(array: np.ndarray) -> float:
    """Mean correlation of each voxel with its in-plane neighbours. Anatomy is smooth at the
    voxel scale (an MR knee gives 0.6-0.99); white noise gives about 0."""
    a = _sample(array)
    a = a - a.mean()
    var = float((a * a).mean())
    if var == 0:
        return 1.0
    rows = float((a[:, 1:, :] * a[:, :-1, :]).mean()) / var
    cols = float((a[:, :, 1:] * a[:, :, :-1]).mean()) / var
    return (rows + cols) / 2


def not_a_knee_reason(array: np.ndarray) -> str | None:
    """Why these voxels cannot be an MR image, or None. Deliberately loose: it catches inputs
    no scanner makes (noise, CT's air at -1000); whether the anatomy is a knee is judged from
    the model's own segmentation afterwards (plausibility)."""
    a = _sample(array)
    air = float(np.mean(a < -500))
    if air > 0.01:
        return (
            f"{air:.0%} of its voxels are below -500, as air is in CT's Hounsfield units "
            "(MR intensities are not negative)"
        )
    corr = neighbour_correlation(a)
    if corr < 0.3:
        return f"neighbouring voxels are uncorrelated (correlation {corr:.2f}; MR anatomy gives above 0.6), as in noise"
    return None
