"""From per-voxel probabilities to the labelmap a reader sees.

A knee has one femur, one tibia and one patella, each a single piece of bone. The heads label
voxel by voxel, and a few soft-tissue voxels whose features resemble marrow come out as bone
islands far from the bone (on the real sample, 7 mL of tibia-labelled islands). Keeping each
of these bones' largest 3D connected component removes them without touching the bone.

Cartilage covers its bone. A cartilage plate may be several pieces (a worn tibial plate, or
its medial and lateral halves), but each piece lies on the bone: :func:`drop_detached_cartilage`
removes the pieces with no voxel within MAX_CARTILAGE_GAP_MM of their bone. On one held-out
DESS render, heads labelled 2000 voxels 40-80 mm from the femur as femoral cartilage, which took
that case's HD95 from 1.3 to 70 mm (model card, "Heads 0.8.0").

Left alone:
- the menisci: the two are legitimately apart, and they lie on the tibia across a joint space
  the renders' thick slices blur;
- the fibula: thin, oblique to sagittal slabs 3-4 mm thick with gaps, and often cut by the
  field of view, so its true pieces need not touch. On the held-out sets (model card, "Heads
  0.4.0") keeping its largest piece lowered its Dice (0.477 -> 0.469 and 0.440 -> 0.387),
  while the other three bones gained in HD95 and lost nothing in Dice.

Medial and lateral are anatomy, not image position: in a right knee the lateral meniscus lies
toward the patient's right, in a left knee toward the left. The training renders' menisci all
come from one left knee (the SPL atlas), and the heads, whose through-plane view spans about
2 cm, cannot learn the difference: on the right knee of the held-out pymskt subject they called
most of both menisci "lateral". :func:`assign_meniscus_sides` therefore treats the two menisci
as one structure and splits it by side: the side of the fibula, which is always lateral, is the
lateral side. On the held-out sets this took the medial meniscus's Dice from 0.14-0.17 to
0.50-0.53 and the lateral's from 0.46-0.48 to 0.63-0.75 (model card, "Medial and lateral
menisci").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "SINGLE_PIECE",
    "CARTILAGE_ON_BONE",
    "MAX_CARTILAGE_GAP_MM",
    "keep_largest_component",
    "drop_detached_cartilage",
    "labelmap_from_probabilities",
    "KneeSide",
    "knee_side",
    "with_tagged_side",
    "assign_meniscus_sides",
    "finish_prediction",
]

SINGLE_PIECE = ("femur", "tibia", "patella")
CARTILAGE_ON_BONE = {"femoral_cartilage": "femur", "tibial_cartilage": "tibia", "patellar_cartilage": "patella"}
# One slice of a 3-4 mm sagittal series and then some: a piece farther than this from its bone
# is not separated from it by a missed slice of bone or cartilage, it lies on no bone at all.
MAX_CARTILAGE_GAP_MM = 5.0


def keep_largest_component(labelmap: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``labelmap`` (k, j, i) with each of ``labels`` reduced to its largest connected component
    (26-connected); the voxels removed become background."""
    out = labelmap.copy()
    for label in labels:
        mask = labelmap == label
        if not mask.any():
            continue
        components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
        # GetArrayFromImage copies: a GetArrayViewFromImage of the temporary relabelled image
        # pointed into freed memory once the image was collected (a segfault in one CI run).
        by_size = sitk.GetArrayFromImage(sitk.RelabelComponent(components, sortByObjectSize=True))
        out[mask & (by_size != 1)] = 0
    return out


def drop_detached_cartilage(
    labelmap: np.ndarray, spacing_ijk: Sequence[float], catalog, max_gap_mm: float = MAX_CARTILAGE_GAP_MM
) -> np.ndarray:
    """``labelmap`` (k, j, i) without the cartilage pieces (26-connected) that have no voxel within
    ``max_gap_mm`` of their bone (CARTILAGE_ON_BONE); they become background. A plate whose bone
    was not found at all is kept: there is nothing to judge it by."""
    out = labelmap.copy()
    known = set(catalog.structure_keys)
    for cartilage_key, bone_key in CARTILAGE_ON_BONE.items():
        if cartilage_key not in known or bone_key not in known:
            continue
        cartilage = labelmap == catalog.structure(cartilage_key).label
        bone = labelmap == catalog.structure(bone_key).label
        if not cartilage.any() or not bone.any():
            continue
        bone_image = sitk.GetImageFromArray(bone.astype(np.uint8))
        bone_image.SetSpacing(tuple(float(s) for s in spacing_ijk))
        distance = sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(
                bone_image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
            )
        )
        pieces_image = sitk.ConnectedComponent(sitk.GetImageFromArray(cartilage.astype(np.uint8)), True)
        pieces = sitk.GetArrayFromImage(pieces_image)  # a copy, as in keep_largest_component
        near = np.unique(pieces[cartilage & (distance <= max_gap_mm)])
        out[cartilage & ~np.isin(pieces, near)] = 0
    return out


def labelmap_from_probabilities(
    probabilities: np.ndarray, catalog, postprocess: bool = True, spacing_ijk: Sequence[float] | None = None
) -> np.ndarray:
    """The most probable structure per voxel (uint8), with each of SINGLE_PIECE in one piece
    and, given the voxel spacing, no cartilage off its bone, unless ``postprocess`` is False (the
    heads' raw output, for research)."""
    labelmap = probabilities.argmax(0).astype(np.uint8)
    if not postprocess:
        return labelmap
    known = set(catalog.structure_keys)
    labelmap = keep_largest_component(labelmap, [catalog.structure(k).label for k in SINGLE_PIECE if k in known])
    if spacing_ijk is not None:
        labelmap = drop_detached_cartilage(labelmap, spacing_ijk, catalog)
    return labelmap


MIN_FIBULA_ML = 0.3  # less than this is a few stray voxels, not a fibular head
MIN_FIBULA_OFFSET_MM = 8.0  # the fibula's centre lies 20-35 mm lateral of the tibia's
MIN_MENISCI_APART_MM = 30.0  # the two menisci's centres lie 45-48 mm apart (bench/label_sides.py)


@dataclass(frozen=True)
class KneeSide:
    """Which knee a case shows, as read from its own anatomy."""

    side: str | None  # "left", "right", or None when it could not be told
    reason: str  # how it was told, or why not (shown to the reader)
    lateral_sign: int = 0  # +1: lateral is toward +x (patient left, LPS); -1: toward -x; 0: unknown
    warning: str | None = None  # for the reader, e.g. when the anatomy and the DICOM header disagree


def _lateral_sign(side: str) -> int:
    return 1 if side == "left" else -1  # a left knee's lateral side is toward the patient's left (+x)


def with_tagged_side(anatomy: KneeSide, tagged: str | None) -> KneeSide:
    """The side from the anatomy, checked against (or, when the anatomy cannot tell, taken from)
    the side the DICOM header states.

    Where the two disagree the anatomy wins, because it is what the labels are drawn on, and the
    reader is warned: a wrong side in a header, or a series of the other knee, is worth a look.
    """
    if tagged not in ("left", "right"):
        return anatomy
    if anatomy.side is None:
        return KneeSide(tagged, f"the series' DICOM Laterality says {tagged} ({anatomy.reason})", _lateral_sign(tagged))
    if anatomy.side == tagged:
        return KneeSide(anatomy.side, f"{anatomy.reason}, as the DICOM Laterality says", anatomy.lateral_sign)
    return KneeSide(
        anatomy.side,
        anatomy.reason,
        anatomy.lateral_sign,
        warning=f"the series' DICOM Laterality says {tagged}, but {anatomy.reason}, which makes it a "
        f"{anatomy.side} knee: check which knee this is (the menisci were split by the anatomy).",
    )


def _lps_x(grid, shape_kji: Sequence[int]) -> np.ndarray:
    """The LPS x (patient right -> left, mm) of every voxel centre, as a (k, j, i) float32 array."""
    m = grid.index_to_physical()
    k, j, i = (np.arange(n, dtype=np.float32) for n in shape_kji)
    row = m[0].astype(np.float32)
    return row[0] * i[None, None, :] + row[1] * j[None, :, None] + row[2] * k[:, None, None] + row[3]


def knee_side(labelmap: np.ndarray, grid, catalog) -> KneeSide:
    """Left or right knee from where the fibula lies against the tibia (the fibula is lateral)."""
    if not {"tibia", "fibula"} <= set(catalog.structure_keys):
        return KneeSide(None, "the catalog has no tibia or fibula")
    return _side_from_fibula(labelmap, _tibia(labelmap, catalog), _lps_x(grid, labelmap.shape), grid, catalog)


def _tibia(labelmap: np.ndarray, catalog) -> np.ndarray:
    label = catalog.structure("tibia").label
    return keep_largest_component(labelmap, [label]) == label


def _side_from_fibula(labelmap: np.ndarray, tibia: np.ndarray, x: np.ndarray, grid, catalog) -> KneeSide:
    """:func:`knee_side` given the tibia's mask and the voxels' LPS x, which the caller may reuse."""
    fibula = labelmap == catalog.structure("fibula").label
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    if not tibia.any() or fibula.sum() * voxel_ml < MIN_FIBULA_ML:
        return KneeSide(None, "no tibia and fibula were found to tell the knee's side")
    offset = float(x[fibula].mean() - x[tibia].mean())
    if abs(offset) < MIN_FIBULA_OFFSET_MM:
        return KneeSide(None, f"the fibula's centre lies only {abs(offset):.0f} mm to the side of the tibia's")
    # the fibula is lateral: toward the patient's left (+x) in a left knee
    side = "left" if offset > 0 else "right"
    return KneeSide(
        side, f"the fibula lies {abs(offset):.0f} mm to the patient's {side} of the tibia", _lateral_sign(side)
    )


def _two_means_split(xs: np.ndarray, start: float) -> float:
    """The midpoint between two groups of ``xs`` (one-dimensional two-means from ``start``), or
    ``start`` when there are not two groups at least MIN_MENISCI_APART_MM apart."""
    split = start
    for _ in range(20):
        low, high = xs[xs < split], xs[xs >= split]
        if not len(low) or not len(high):
            return start
        means = float(low.mean()), float(high.mean())
        new = sum(means) / 2
        if abs(new - split) < 0.1:
            break
        split = new
    return split if means[1] - means[0] >= MIN_MENISCI_APART_MM else start


def assign_meniscus_sides(
    probabilities: np.ndarray, grid, catalog, labelmap: np.ndarray | None = None, tagged: str | None = None
) -> tuple[np.ndarray, KneeSide]:
    """``probabilities`` with the two menisci's summed probability given to the meniscus of the
    side each voxel lies on (the two meniscus channels are changed in place: a copy of the whole
    array would cost 0.4 GB on a fine reference grid); unchanged when the side cannot be told.

    The split is where the meniscus voxels fall into two groups along the patient's left-right
    axis (two-means, started at the tibia's centre), so the plane follows the menisci themselves;
    if those groups lie too close together to be two menisci (one meniscus found, not both), the
    split stays at the tibia's centre, so that one meniscus is not cut in two.
    ``labelmap``: the argmax of ``probabilities`` if already computed. ``tagged``: the side the
    series' DICOM headers state (``Case.laterality``), see :func:`with_tagged_side`.
    """
    keys = set(catalog.structure_keys)
    if not {"medial_meniscus", "lateral_meniscus"} <= keys:
        return probabilities, KneeSide(None, "the catalog has no menisci")
    if not {"tibia", "fibula"} <= keys:
        return probabilities, KneeSide(None, "the catalog has no tibia or fibula")
    if labelmap is None:
        labelmap = probabilities.argmax(0).astype(np.uint8)
    tibia, x = _tibia(labelmap, catalog), _lps_x(grid, labelmap.shape)
    side = with_tagged_side(_side_from_fibula(labelmap, tibia, x, grid, catalog), tagged)
    if side.side is None:
        return probabilities, side
    medial, lateral = catalog.structure("medial_meniscus").label, catalog.structure("lateral_meniscus").label
    meniscus = probabilities[medial] + probabilities[lateral]
    if not tibia.any():  # a side from the header alone, and no tibia to find the knee's middle by
        return probabilities, KneeSide(
            side.side,
            side.reason,
            side.lateral_sign,
            side.warning or "no tibia was found: the menisci are as the heads labelled them.",
        )
    tibia_centre = float(x[tibia].mean())
    split = _two_means_split(x[(labelmap == medial) | (labelmap == lateral)], tibia_centre)
    on_lateral = (side.lateral_sign * (x - split)) > 0
    probabilities[lateral] = np.where(on_lateral, meniscus, 0)
    probabilities[medial] = np.where(on_lateral, 0, meniscus)
    return probabilities, side


def finish_prediction(
    probabilities: np.ndarray, grid, catalog, postprocess: bool = True, tagged: str | None = None
) -> tuple[np.ndarray, np.ndarray, KneeSide | None]:
    """(probabilities, labelmap, knee side) as a reader gets them: the one sequence the Predictor
    writes and `orthoknee evaluate` scores, so the two cannot drift apart. Without ``postprocess``
    the raw argmax and no side."""
    side = None
    if postprocess:
        probabilities, side = assign_meniscus_sides(probabilities, grid, catalog, tagged=tagged)
    return probabilities, labelmap_from_probabilities(probabilities, catalog, postprocess, grid.spacing), side
