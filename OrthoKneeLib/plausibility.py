"""Is a reading plausible as a knee? Checks of the segmentation against real anatomy.

A model always answers; on a brain, a phantom or a badly failed scan it still draws a femur
and scores findings. These checks say when its answer does not look like a knee, so the
summary, findings.json and the front ends can warn instead of showing a confident reading:

- femur and tibia present, with volumes in the range of real knees;
- the bones and cartilages the OAI label maps annotate within their volume ranges;
- femur above the tibia, patella in front of the femur;
- each bone one connected piece; each cruciate ligament one piece running from femur to tibia.

The volume ranges come from the 54 real manual OAI label maps
(``python -m OrthoKneeLib.plausibility LABELS_OAI_FOLDER`` writes ``plausible_ranges.py``),
widened to half the smallest and 1.5 times the largest, because fields of view differ.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["Check", "check_reading", "RANGES_FILE", "volume_ranges"]

RANGES_FILE = Path(__file__).with_name("plausible_ranges.py")
_WIDEN_LOW, _WIDEN_HIGH = 0.5, 1.5
_TOUCH_MM = 3.0  # a ligament "reaches" a bone when its end lies within this distance


@dataclass
class Check:
    check: str
    ok: bool
    detail: str

    def __post_init__(self) -> None:
        self.ok = bool(self.ok)  # numpy comparisons give numpy bools, which json refuses


def volume_ranges() -> dict[str, tuple[float, float]]:
    """structure -> (low, high) mL a real knee's reading may show."""
    from .plausible_ranges import STRUCTURES

    return {k: (v["min_ml"] * _WIDEN_LOW, v["max_ml"] * _WIDEN_HIGH) for k, v in STRUCTURES.items()}


def _centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    index = (float(i.mean()), float(j.mean()), float(k.mean()))
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index))  # LPS


def _pieces(mask_image: sitk.Image, min_voxels: int) -> int:
    cc = sitk.ConnectedComponent(mask_image, True)  # 26-connected, as postprocess keeps pieces
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    return sum(1 for label in stats.GetLabels() if stats.GetNumberOfPixels(label) >= min_voxels)


def _near(a: sitk.Image, b: sitk.Image, mm: float) -> bool:
    """Whether mask ``a`` comes within ``mm`` of mask ``b`` (on a crop around ``a``: a distance
    map of the whole native grid would cost seconds)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(a)
    if not stats.GetLabels():
        return False
    box = stats.GetBoundingBox(1)
    margin = [int(np.ceil(mm / s)) + 1 for s in a.GetSpacing()]
    start = [max(0, box[d] - margin[d]) for d in range(3)]
    stop = [min(a.GetSize()[d], box[d] + box[d + 3] + margin[d]) for d in range(3)]
    size = [stop[d] - start[d] for d in range(3)]
    a, b = sitk.RegionOfInterest(a, size, start), sitk.RegionOfInterest(b, size, start)
    if not sitk.GetArrayViewFromImage(b).any():
        return False
    distance = sitk.SignedMaurerDistanceMap(b, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    values = sitk.GetArrayViewFromImage(distance)[sitk.GetArrayViewFromImage(a) > 0]
    return values.size > 0 and float(values.min()) <= mm


def check_reading(labelmap: sitk.Image, volumes_ml: dict[str, float], catalog) -> list[Check]:
    """The checks above on a prediction's labelmap (reference grid) and its volumes."""
    checks: list[Check] = []
    array = sitk.GetArrayViewFromImage(labelmap)
    voxel_ml = float(np.prod(labelmap.GetSpacing())) / 1000.0
    ranges = volume_ranges()
    label = {s.key: s.label for s in catalog.structures}
    for key, (low, high) in ranges.items():
        if key not in volumes_ml:
            continue
        v = volumes_ml[key]
        checks.append(Check(f"{key} volume", low <= v <= high, f"{v:.1f} mL (real knees: {low:.1f}-{high:.1f} mL)"))

    def mask(key: str) -> np.ndarray:
        return array == label[key]

    present = {k: k in label and mask(k).any() for k in ("femur", "tibia", "patella", "acl", "pcl")}
    if present["femur"] and present["tibia"]:
        femur, tibia = _centroid(labelmap, mask("femur")), _centroid(labelmap, mask("tibia"))
        above = femur[2] - tibia[2]  # LPS z points superior
        checks.append(Check("femur above tibia", above > 0, f"femur centre {above:+.0f} mm above the tibia's"))
        if present["patella"]:
            ahead = femur[1] - _centroid(labelmap, mask("patella"))[1]  # LPS y points posterior
            checks.append(
                Check("patella in front of femur", ahead > 0, f"patella centre {ahead:+.0f} mm anterior of the femur's")
            )
    min_voxels = max(1, int(round(0.05 / voxel_ml)))  # pieces under 0.05 mL are specks, not pieces
    for key in ("femur", "tibia", "patella"):
        if present.get(key):
            n = _pieces(labelmap == label[key], min_voxels)
            checks.append(Check(f"{key} one piece", n == 1, f"{n} pieces of 0.05 mL or more"))
    for key in ("acl", "pcl"):
        if not present.get(key):
            continue
        lig = labelmap == label[key]
        n = _pieces(lig, min_voxels)
        reach = all(_near(lig, labelmap == label[b], _TOUCH_MM) for b in ("femur", "tibia") if present[b])
        checks.append(
            Check(
                f"{key} one piece from femur to tibia",
                n == 1 and reach and present["femur"] and present["tibia"],
                f"{n} pieces; {'reaches' if reach else 'does not reach'} both bones",
            )
        )
    return checks


def summarize(checks: list[Check]) -> dict:
    """The findings.json block: whether the reading is plausible, whether a knee was found, the checks."""
    by_name = {c.check: c for c in checks}
    knee = all(by_name[k].ok for k in ("femur volume", "tibia volume", "femur above tibia") if k in by_name) and {
        "femur volume",
        "tibia volume",
        "femur above tibia",
    } <= set(by_name)
    return {"plausible": all(c.ok for c in checks), "knee_found": bool(knee), "checks": [asdict(c) for c in checks]}


def warnings_for(summary: dict) -> list[str]:
    """One warning line for a reading that failed checks (two when no knee was found)."""
    failed = [f"{c['check']} ({c['detail']})" for c in summary["checks"] if not c["ok"]]
    out = []
    if not summary["knee_found"]:
        out.append(
            "this does not look like a knee MRI: the model found no femur above a tibia of real size; "
            "the findings below are not a reading of a knee."
        )
    if failed:
        out.append("implausible reading, check it before use: " + "; ".join(failed) + ".")
    return out


def volume_ranges_from_maps(folder: str | Path) -> dict:
    """Min and max volume (mL) of each annotated structure over the OAI label maps in ``folder``,
    the maps read as training reads them (``synth.sources.map_labels``: a bone lesion counts to its bone)."""
    from .labels import DEFAULT_CATALOG
    from .synth.sources import SOURCES, map_labels

    source = SOURCES["oai"]
    per_structure: dict[str, list[float]] = {k: [] for k in source.structures.values()}
    files = sorted(Path(folder).glob(source.pattern))
    for path in files:
        image = sitk.ReadImage(str(path))
        labels = map_labels(source, sitk.GetArrayViewFromImage(image).astype(np.int64))[0]
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        counts = np.bincount(labels.ravel(), minlength=len(DEFAULT_CATALOG.structures) + 1)
        for key in per_structure:
            per_structure[key].append(float(counts[DEFAULT_CATALOG.structure(key).label]) * voxel_ml)
    return {
        "source": f"{len(files)} OAI label maps ({Path(folder).name})",
        "structures": {k: {"min_ml": round(min(v), 2), "max_ml": round(max(v), 2)} for k, v in per_structure.items()},
    }


def write_ranges_module(ranges: dict, path: Path = RANGES_FILE) -> Path:
    """plausible_ranges.py from :func:`volume_ranges_from_maps` (a module, so it ships wherever the code does)."""
    from .io import atomic_path

    text = (
        '"""Volumes (mL) of each structure over the real manual OAI label maps: the range a real knee\'s\n'
        "reading may show (plausibility.py widens it). Generated, do not edit:\n"
        '``python -m OrthoKneeLib.plausibility ../shared/data/labels-oai`` rewrites this file."""\n\n'
        f"SOURCE = {ranges['source']!r}\nSTRUCTURES = {json.dumps(ranges['structures'], indent=4)}\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


if __name__ == "__main__":  # maintainer command: python -m OrthoKneeLib.plausibility ../shared/data/labels-oai
    if len(sys.argv) != 2:
        sys.exit("usage: python -m OrthoKneeLib.plausibility LABELS_OAI_FOLDER")
    ranges = volume_ranges_from_maps(sys.argv[1])
    print(write_ranges_module(ranges))
    print(json.dumps(ranges, indent=2))
