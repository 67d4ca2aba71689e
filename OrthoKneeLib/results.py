"""Reading a saved prediction back: an output folder of ``orthoknee predict`` as a Prediction.

The browser viewer opens output folders, and comparing two bundle versions reads two of
them; both need the same object a fresh prediction gives, without running the model. The
labelmap comes from the newest segmentation in the folder (an edited one wins, see
``Prediction.save``), the overlays from ``overlays/``, everything else from findings.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["load_prediction", "is_output_folder", "segmentation_files"]


def is_output_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "findings.json").is_file()


def segmentation_files(folder: str | os.PathLike) -> list[Path]:
    """The segmentations of an output folder, the one a viewer should open last: structures.seg.nrrd,
    structures-2.seg.nrrd, ... (a rerun beside an edited result), then the viewer's saves
    structures-reviewed-1.seg.nrrd, ... (newest last)."""
    folder = Path(folder)

    def number(p: Path, prefix: str) -> int:
        tail = p.name[len(prefix) : -len(".seg.nrrd")]
        return int(tail) if tail.isdigit() else 1

    predicted = [
        p
        for p in folder.glob("structures*.seg.nrrd")
        if p.name == "structures.seg.nrrd" or p.name[len("structures-") : -len(".seg.nrrd")].isdigit()
    ]
    reviewed = list(folder.glob("structures-reviewed-*.seg.nrrd"))
    return sorted(predicted, key=lambda p: number(p, "structures-")) + sorted(
        reviewed, key=lambda p: number(p, "structures-reviewed-")
    )


def load_prediction(folder: str | os.PathLike):
    """The Prediction saved in ``folder`` (an ``orthoknee predict`` output)."""
    from .labels import DEFAULT_CATALOG, Catalog
    from .model.heads import grid_of
    from .predict import Prediction

    folder = Path(folder)
    if not is_output_folder(folder):
        raise InputError(
            folder,
            "holds no findings.json: it is not an OrthoKnee output folder.",
            "Give the --out folder of `orthoknee predict`, or a case folder to predict.",
        )
    try:
        summary = json.loads((folder / "findings.json").read_text())
    except ValueError as exc:
        raise InputError(folder / "findings.json", f"is not valid JSON ({exc}).", "Predict the case again.") from None
    catalog = Catalog.from_json(summary["catalog"]) if summary.get("catalog") else DEFAULT_CATALOG
    segs = segmentation_files(folder)
    if not segs:
        raise InputError(folder, "holds no structures.seg.nrrd.", "Predict the case again.")
    labels_image = sitk.ReadImage(str(segs[-1]))
    labelmap = sitk.GetArrayFromImage(labels_image).astype(np.uint8)
    overlays, map_grid = {}, None
    for key in summary.get("findings", {}):
        path = folder / "overlays" / f"{key}.nrrd"
        if path.is_file():  # overlays of a fine series are on the working grid, not the labelmap's
            image = sitk.ReadImage(str(path))
            map_grid = map_grid or grid_of(image)
            overlays[key] = sitk.GetArrayFromImage(image).astype(np.float32)
    reference_grid = grid_of(labels_image)
    map_grid = map_grid or reference_grid
    for key in summary.get("findings", {}):
        overlays.setdefault(key, np.zeros(map_grid.size[::-1], np.float32))
    prediction = Prediction(
        case_name=summary.get("case", folder.name),
        reference_plane=summary.get("reference_view", "sagittal"),
        reference_grid=reference_grid,
        labelmap=labelmap,
        probabilities=np.zeros((1, *map_grid.size[::-1]), np.float16),  # not saved; viewers do not need them
        finding_probabilities={k: float(v["probability"]) for k, v in summary.get("findings", {}).items()},
        overlays=overlays,
        catalog=catalog,
        measurements=summary.get("measurements", {}),
        timings=summary.get("timings_s", {}),
        warnings=list(summary.get("warnings", [])),
        bundle=summary.get("bundle", {}),
        input_hashes=summary.get("input_sha256", {}),
        views=summary.get("views", []),
        device=summary.get("device", "cpu"),
        knee_side=summary.get("knee_side", {}),
        plausibility=summary.get("plausibility", {}),
        finding_locations={
            k: {f: v[f] for f in ("structure", "where", "peak_lps_mm", "map_ml") if f in v}
            for k, v in summary.get("findings", {}).items()
        },
        input_paths=summary.get("inputs", {}),
        work_grid=None if map_grid == reference_grid else map_grid,
    )
    return prediction
