"""The structures as a DICOM Segmentation (highdicom), so results go back to a PACS.

The segmentation references the source series (the reference view, which the labelmap is
on), one frame per source slice in the order the series was read, and carries each
structure's coded terminology (SNOMED CT category and type from the catalog) and colour.
Only DICOM inputs can be referenced; for a NIfTI or NRRD reference there is nothing to point
at, and :func:`dicom_seg_writer` returns None.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import OrthoKneeError

__all__ = ["dicom_seg_writer", "write_dicom_seg", "describe_dicom_seg", "is_dicom_seg", "datasets_in_slice_order"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _source_datasets(case) -> list | None:
    """The reference series' DICOM datasets, in the slice order of the reference image."""
    import pydicom

    from .dicom import scan_dicom_folder

    source = case.reference.source
    if not source.series_uid:
        return None
    matches = [
        s
        for s in scan_dicom_folder(source.path)
        if s.series_uid == source.series_uid and s.echo_number == source.echo_number
    ]
    if len(matches) != 1:
        return None
    return [_complete(pydicom.dcmread(f)) for f in matches[0].files]


def _complete(ds):
    """Anonymised series drop type-2 patient and study attributes a SEG must copy (empty is valid)."""
    for keyword in _PATIENT_AND_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def datasets_in_slice_order(files: list[str | os.PathLike], reference_image) -> list:
    """The DICOM files of a series, read and ordered as the slices of ``reference_image`` (its third
    axis): how the Slicer module finds the sources of a volume node loaded from the DICOM database,
    whose instance files come in database order, not slice order."""
    import pydicom

    if not files:
        raise OrthoKneeError("the series has no DICOM files to reference; the DICOM SEG was not written.")
    datasets = [_complete(pydicom.dcmread(str(f))) for f in files]
    normal = np.asarray(reference_image.GetDirection(), float).reshape(3, 3)[:, 2]
    origin = np.asarray(reference_image.GetOrigin(), float)
    try:
        along = [float(np.dot(np.asarray(ds.ImagePositionPatient, float) - origin, normal)) for ds in datasets]
    except AttributeError:
        raise OrthoKneeError(
            "a file of the series has no ImagePositionPatient; the DICOM SEG was not written."
        ) from None
    if len(set(np.round(along, 3))) != len(datasets) or len(datasets) != reference_image.GetSize()[2]:
        raise OrthoKneeError(
            f"the series' {len(datasets)} files are not the {reference_image.GetSize()[2]} distinct slices of the "
            "volume (several echoes or series mixed?); the DICOM SEG was not written."
        )
    return [ds for _, ds in sorted(zip(along, datasets), key=lambda pair: pair[0])]


_PATIENT_AND_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _code(code):
    from pydicom.sr.coding import Code

    return Code(code.value, code.scheme, code.meaning)


def write_dicom_seg(prediction, source_datasets: list, path: str | os.PathLike) -> Path:
    """Write the labelmap of ``prediction`` as a binary DICOM SEG referencing ``source_datasets``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__
    from .io import atomic_path

    labelmap = np.asarray(prediction.labelmap)
    if labelmap.shape[0] != len(source_datasets):
        raise OrthoKneeError(
            f"the labelmap has {labelmap.shape[0]} slices but the source series "
            f"{len(source_datasets)} files; the DICOM SEG was not written."
        )
    structures = [s for s in prediction.catalog.structures if s.terminology]
    masks = np.stack([labelmap == s.label for s in structures], axis=-1)  # (frames, rows, columns, segments)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"OrthoKnee {prediction.bundle.get('name', '')}".strip(),
        family=codes.cid7162.ArtificialIntelligence,
        version=str(prediction.bundle.get("version", "")),
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=s.name,
            segmented_property_category=_code(s.terminology.category),
            segmented_property_type=_code(s.terminology.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=s.key,
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*[int(c) for c in s.color]),
        )
        for n, s in enumerate(structures)
    ]
    seg = hd.seg.Segmentation(
        source_images=source_datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(source_datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="OrthoKnee",
        manufacturer_model_name=str(prediction.bundle.get("name", "orthoknee")),
        software_versions=str(__version__),
        device_serial_number="none",
        series_description="OrthoKnee structures (research, not for clinical use)",
        omit_empty_frames=False,
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


def dicom_seg_writer(prediction, case) -> Callable[[Path], Path] | None:
    """A writer for Prediction.save's ``extra`` files, or None when the reference is not DICOM."""
    sources = _source_datasets(case)
    if sources is None:
        return None
    return lambda path: write_dicom_seg(prediction, sources, path)


def is_dicom_seg(path: str | os.PathLike) -> bool:
    import pydicom

    from .dicom import is_dicom_file

    if not Path(path).is_file() or not is_dicom_file(path):
        return False
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) == SEG_SOP_CLASS
    except Exception:
        return False


def describe_dicom_seg(path: str | os.PathLike) -> dict:
    """What `orthoknee info` prints for a DICOM SEG: its segments and the series it references."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    referenced = [s.SeriesInstanceUID for s in getattr(seg, "ReferencedSeriesSequence", [])]
    return {
        "path": str(path),
        "series_description": str(getattr(seg, "SeriesDescription", "")),
        "referenced_series": referenced,
        "frames": int(seg.NumberOfFrames),
        "segments": [
            {
                "number": int(d.SegmentNumber),
                "label": str(d.SegmentLabel),
                "type": f"{d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator} "
                f"{d.SegmentedPropertyTypeCodeSequence[0].CodeValue} "
                f"{d.SegmentedPropertyTypeCodeSequence[0].CodeMeaning}",
            }
            for d in seg.SegmentSequence
        ],
    }
