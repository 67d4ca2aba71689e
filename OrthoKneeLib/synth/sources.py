"""Label-set mappings from each public source onto the 11-structure catalog.

Sources annotate different subsets (OAI: bones and cartilage only; pymskt: no ligaments;
SPL atlas: everything), so each mapped map records which structures it *annotates*:
training ignores the rest instead of learning "absent". Source labels that are not
catalog structures but are real tissue (muscles, tendons, collateral ligaments, fat pad,
vessels in the SPL atlas; bone lesions in OAI) are kept as extra tissue classes so the
renderer can draw them and the finding simulator can use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, MissingFileError
from ..labels import DEFAULT_CATALOG

__all__ = ["Tissue", "LabelSource", "SOURCES", "SourceMap", "load_source_maps", "map_labels"]


class Tissue:
    """Tissue classes of the rendering map (distinct from catalog structure labels)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    MARROW = 3
    CORTEX = 4
    CARTILAGE = 5
    MENISCUS = 6
    LIGAMENT = 7
    TENDON = 8
    FLUID = 9
    EDEMA_SOFT = 10
    EDEMA_MARROW = 11
    VESSEL = 12
    NERVE = 13
    COUNT = 14

    NAMES = (
        "air",
        "fat",
        "muscle",
        "marrow",
        "cortex",
        "cartilage",
        "meniscus",
        "ligament",
        "tendon",
        "fluid",
        "edema_soft",
        "edema_marrow",
        "vessel",
        "nerve",
    )


# Extra (non-catalog) source labels: value -> tissue, plus named roles used by findings.
COLLATERAL = "collateral_ligament"
BONE_LESION = "bone_lesion"


@dataclass(frozen=True)
class LabelSource:
    """How one public label-map collection maps onto the catalog."""

    name: str
    pattern: str  # glob of the label files inside the source folder
    structures: dict[int, str]  # source value -> catalog structure key
    extras: dict[int, tuple[int, str | None]] = field(default_factory=dict)  # value -> (tissue, role)
    subject_regex: str | None = None  # group(1) of the file name is the subject id
    shared_folder: str = ""  # the folder of ../shared/data that holds this collection

    @property
    def annotated(self) -> tuple[str, ...]:
        keys = set(self.structures.values())
        return tuple(k for k in DEFAULT_CATALOG.structure_keys if k in keys)

    def subject_of(self, path: Path) -> str:
        if self.subject_regex:
            match = re.match(self.subject_regex, path.name)
            if match:
                return f"{self.name}-{match.group(1)}"
        return f"{self.name}-{path.name.split('.')[0]}"


_SPL_EXTRAS: dict[int, tuple[int, str | None]] = {9: (Tissue.FAT, None)}
_SPL_EXTRAS.update({v: (Tissue.MUSCLE, None) for v in range(12, 27)})
_SPL_EXTRAS.update({33: (Tissue.LIGAMENT, COLLATERAL), 34: (Tissue.LIGAMENT, COLLATERAL), 35: (Tissue.TENDON, None)})
_SPL_EXTRAS.update({v: (Tissue.TENDON, None) for v in range(41, 49)})
_SPL_EXTRAS.update({v: (Tissue.NERVE, None) for v in range(61, 65)})
_SPL_EXTRAS.update({v: (Tissue.VESSEL, None) for v in range(71, 79)})
_SPL_EXTRAS[3] = (Tissue.MUSCLE, None)  # unnamed in knee.ctbl; small, rendered as soft tissue

SOURCES: dict[str, LabelSource] = {
    "pymskt": LabelSource(
        name="pymskt",
        pattern="SAG_3D_DESS_*-label.nrrd",
        shared_folder="labels-pymskt",
        structures={
            1: "femoral_cartilage",
            2: "tibial_cartilage",
            3: "tibial_cartilage",
            4: "patellar_cartilage",
            5: "femur",
            6: "tibia",
            7: "patella",
            8: "fibula",
            9: "lateral_meniscus",
            10: "medial_meniscus",
        },
    ),
    "spl": LabelSource(
        name="spl",
        pattern="seg.nrrd",
        shared_folder="labels-spl-atlas",
        structures={
            31: "acl",
            32: "pcl",
            81: "lateral_meniscus",
            82: "medial_meniscus",
            83: "femoral_cartilage",
            84: "tibial_cartilage",
            85: "tibial_cartilage",
            86: "patellar_cartilage",
            95: "femur",
            96: "tibia",
            97: "fibula",
            98: "patella",
        },
        extras=_SPL_EXTRAS,
    ),
    "oai": LabelSource(
        name="oai",
        pattern="*/*.nii.gz",
        shared_folder="labels-oai",
        structures={
            1: "femur",
            2: "femoral_cartilage",
            3: "tibia",
            4: "tibial_cartilage",
            5: "patella",
            6: "patellar_cartilage",
        },
        # Bone lesions lie inside their bone: structure = the bone, plus a real finding mask.
        extras={
            7: (Tissue.EDEMA_MARROW, BONE_LESION),
            8: (Tissue.EDEMA_MARROW, BONE_LESION),
            9: (Tissue.EDEMA_MARROW, BONE_LESION),
        },
        subject_regex=r"(\d{7})",
    ),
}
_LESION_BONE = {7: "femur", 8: "tibia", 9: "patella"}  # OAI lesion value -> the bone it is in


@dataclass
class SourceMap:
    """One real label map, read but not yet mapped."""

    source: LabelSource
    path: Path
    subject: str
    image: sitk.Image


def load_source_maps(folder: str | Path, source: str) -> list[SourceMap]:
    """The label maps of ``source`` found in ``folder`` (or the single file ``folder``)."""
    if source not in SOURCES:
        raise InputError(None, f"unknown label source {source!r}.", f"Choose one of {', '.join(SOURCES)}.")
    spec = SOURCES[source]
    folder = Path(folder)
    if not folder.exists():
        raise MissingFileError(folder, "does not exist.", "Give the folder holding the source's label maps.")
    files = [folder] if folder.is_file() else sorted(folder.glob(spec.pattern))
    if not files:
        raise MissingFileError(
            folder, f"holds no {source} label maps (looked for {spec.pattern}).", "Check --labels and --source."
        )
    maps = []
    for f in files:
        image = sitk.ReadImage(str(f))
        maps.append(SourceMap(spec, f, spec.subject_of(f), image))
    return maps


def map_labels(source: LabelSource, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source label array -> (catalog labels, extra tissue, collateral mask, bone-lesion mask).

    Catalog labels are uint8 in catalog order (0 = not a catalog structure); ``extra`` holds a
    Tissue class for non-catalog source labels (0 where none).
    """
    lut_structure = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    lut_tissue = np.zeros_like(lut_structure)
    lut_collateral = np.zeros(lut_structure.shape, dtype=bool)
    lut_lesion = np.zeros(lut_structure.shape, dtype=bool)
    for value, key in source.structures.items():
        if value < lut_structure.size:
            lut_structure[value] = DEFAULT_CATALOG.structure(key).label
    for value, (tissue, role) in source.extras.items():
        if value >= lut_structure.size:
            continue
        lut_tissue[value] = tissue
        lut_collateral[value] = role == COLLATERAL
        lut_lesion[value] = role == BONE_LESION
        if role == BONE_LESION:
            lut_structure[value] = DEFAULT_CATALOG.structure(_LESION_BONE[value]).label
    return lut_structure[values], lut_tissue[values], lut_collateral[values], lut_lesion[values]
