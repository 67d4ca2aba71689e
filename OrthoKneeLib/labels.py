"""The label catalogs: 11 knee structures and 8 findings.

Every file and JSON output refers to a structure or finding by its stable ``key``; names
and colors are for people, codes are for machines. Codes are DICOM / SNOMED CT concepts in
the form Slicer's Terminologies module uses (category, type, type modifier, anatomic
region), so a segment exported to Slicer or to DICOM SEG keeps its standard meaning.

Every code here was checked against Slicer's own DICOM master terminology (the copy that
ships with trame-slicer), except the tibia (SCT 12611008 "Bone structure of tibia"), which
that list lacks; ``Testing/test_labels.py`` enforces this. Where no fitting concept exists
in those lists (most tears), ``code`` is ``None`` rather than an invented one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

__all__ = [
    "Code",
    "Terminology",
    "Structure",
    "Finding",
    "Catalog",
    "DEFAULT_CATALOG",
    "STRUCTURE_KEYS",
    "FINDING_KEYS",
]

SEGMENTATION_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """One coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def serialize(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def to_json(self) -> dict[str, str]:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> "Code":
        return cls(str(data["scheme"]), str(data["value"]), str(data["meaning"]))


@dataclass(frozen=True)
class Terminology:
    """A Slicer terminology entry: what a segment *is*, in standard codes."""

    category: Code
    type: Code
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None

    def slicer_string(self) -> str:
        """The entry as Slicer stores it in a segment's ``TerminologyEntry`` tag.

        Same layout as ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``
        (checked against it in the tests), written here so the engine needs no Slicer.
        """

        def part(code: Code | None) -> str:
            return code.serialize() if code else "^^"

        return "~".join(
            [
                SEGMENTATION_CONTEXT,
                part(self.category),
                part(self.type),
                part(self.type_modifier),
                ANATOMIC_CONTEXT,
                part(self.region),
                part(self.region_modifier),
            ]
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"category": self.category.to_json(), "type": self.type.to_json()}
        for name in ("type_modifier", "region", "region_modifier"):
            value = getattr(self, name)
            out[name] = value.to_json() if value else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Terminology":
        def opt(name: str) -> Code | None:
            value = data.get(name)
            return Code.from_json(value) if value else None

        return cls(
            category=Code.from_json(data["category"]),
            type=Code.from_json(data["type"]),
            type_modifier=opt("type_modifier"),
            region=opt("region"),
            region_modifier=opt("region_modifier"),
        )


Color = tuple[int, int, int]


@dataclass(frozen=True)
class _Entry:
    key: str
    name: str
    color: Color
    terminology: Terminology | None = None

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Color as 0..1 floats, the form VTK and MRML display nodes take."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        term = self.terminology
        return {
            "key": self.key,
            "name": self.name,
            "color": list(self.color),
            "code": term.type.to_json() if term else None,
            "terminology": term.to_json() if term else None,
            "slicer_terminology": term.slicer_string() if term else None,
        }


@dataclass(frozen=True)
class Structure(_Entry):
    """An anatomical structure the segmentation head labels; ``label`` is its labelmap value."""

    label: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "label": self.label}


@dataclass(frozen=True)
class Finding(_Entry):
    """An abnormality the finding head scores; ``structures`` are where it is looked for."""

    structures: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "structures": list(self.structures)}


def _new_key(name: str, taken: set[str], fallback: str) -> str:
    """A key for an annotator's new label or finding: its name in lower case with every other
    character an underscore (``fallback`` when nothing is left), made unique against ``taken``."""
    key = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or fallback
    while key in taken:
        key += "_"
    return key


def _unknown_names(names: Iterable[str], known: set[str]) -> Iterator[str]:
    """Each of ``names`` whose lower case ``known`` lacks, once, in order: what an annotator's new
    labels or findings add to a catalog."""
    seen = set(known)
    for name in names:
        if name.lower() not in seen:
            seen.add(name.lower())
            yield name


def _entry_from_json(data: dict[str, Any]) -> dict[str, Any]:
    term = data.get("terminology")
    color = data["color"]
    if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
        raise ValueError(f"label {data.get('key')!r}: color must be three integers 0..255, got {color!r}")
    return {
        "key": str(data["key"]),
        "name": str(data["name"]),
        "color": tuple(int(c) for c in color),
        "terminology": Terminology.from_json(term) if term else None,
    }


# colours for labels an annotator adds (distinct from the catalog's own)
_NEW_LABEL_COLORS: tuple[Color, ...] = ((255, 127, 0), (0, 200, 200), (200, 0, 200), (120, 200, 60), (250, 60, 60))


@dataclass(frozen=True)
class Catalog:
    """The structures and findings a model knows, in label order.

    A bundle carries its own catalog in its metadata; front ends take names, colors and
    codes from there, never from constants in the widget.
    """

    structures: tuple[Structure, ...]
    findings: tuple[Finding, ...]

    def __post_init__(self) -> None:
        keys = [s.key for s in self.structures] + [f.key for f in self.findings]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"catalog keys must be unique; repeated: {', '.join(duplicates)}")
        labels = [s.label for s in self.structures]
        if sorted(labels) != list(range(1, len(labels) + 1)):
            raise ValueError(f"structure labels must be 1..{len(labels)} without gaps, got {labels}")

    def with_structures(self, names: Iterable[str]) -> "Catalog":
        """This catalog and a new structure per name it does not already have (an annotator's new
        label), each with the next label value, a key made from its name and a colour of its own."""
        added = list(self.structures)
        for name in _unknown_names(names, {s.name.lower() for s in self.structures}):
            key = _new_key(name, {e.key for e in added} | set(self.finding_keys), f"label_{len(added) + 1}")
            label = len(added) + 1
            color = _NEW_LABEL_COLORS[(label - len(self.structures) - 1) % len(_NEW_LABEL_COLORS)]
            added.append(Structure(key=key, name=name, color=color, label=label))
        return Catalog(structures=tuple(added), findings=self.findings)

    def with_findings(self, names: Iterable[str]) -> "Catalog":
        """This catalog and a new finding per name it does not already have (a yes / no an annotator
        recorded per case), each with a key made from its name and a colour of its own."""
        added = list(self.findings)
        for name in _unknown_names(names, {f.name.lower() for f in self.findings} | set(self.finding_keys)):
            key = _new_key(name, {e.key for e in added} | set(self.structure_keys), f"finding_{len(added) + 1}")
            color = _NEW_LABEL_COLORS[(len(added) - len(self.findings)) % len(_NEW_LABEL_COLORS)]
            added.append(Finding(key=key, name=name, color=color))
        return Catalog(structures=self.structures, findings=tuple(added))

    def new_finding_answer(self, name: str, answer: str) -> dict[str, int]:
        """An annotator's yes / no for a finding this catalog lacks, as ``export_training_case``
        takes it (``{name: 1 or 0}``; ``{}`` for no name). The module's *New finding* row calls
        this before exporting, so a typo'd known finding or an answer other than present / absent
        is refused with what to do instead of becoming a second finding of the same name."""
        from .errors import OrthoKneeError

        name = " ".join(name.split())
        if not name:
            return {}
        known = {f.name.lower(): f.name for f in self.findings} | {f.key: f.name for f in self.findings}
        if name.lower() in known:
            raise OrthoKneeError(
                f"'{name}' is already a finding of this model ({known[name.lower()]}): accept or reject it in "
                "the findings table instead of adding it again."
            )
        value = {"present": 1, "yes": 1, "absent": 0, "no": 0}.get(answer.strip().lower())
        if value is None:
            raise OrthoKneeError(f"the answer for '{name}' is {answer!r}: give present or absent.")
        return {name: value}

    def structure(self, key: str) -> Structure:
        for s in self.structures:
            if s.key == key:
                return s
        raise KeyError(f"unknown structure {key!r}; known: {', '.join(self.structure_keys)}")

    def finding(self, key: str) -> Finding:
        for f in self.findings:
            if f.key == key:
                return f
        raise KeyError(f"unknown finding {key!r}; known: {', '.join(self.finding_keys)}")

    def by_label(self, label: int) -> Structure:
        for s in self.structures:
            if s.label == label:
                return s
        raise KeyError(f"no structure has label {label}")

    @property
    def structure_keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.structures)

    @property
    def finding_keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.findings)

    def __iter__(self) -> Iterator[Structure | Finding]:
        yield from self.structures
        yield from self.findings

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "structures": [s.to_json() for s in self.structures],
            "findings": [f.to_json() for f in self.findings],
        }

    @classmethod
    def from_json(cls, data: dict[str, Iterable[dict[str, Any]]]) -> "Catalog":
        structures = tuple(Structure(**_entry_from_json(d), label=int(d["label"])) for d in data["structures"])
        findings = tuple(
            Finding(**_entry_from_json(d), structures=tuple(d.get("structures", ()))) for d in data["findings"]
        )
        return cls(structures, findings)


# --- codes (SCT = SNOMED CT) -------------------------------------------------------------
_ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
_TISSUE = Code("SCT", "85756007", "Tissue")
_ALTERED = Code("SCT", "49755003", "Morphologically Altered Structure")
_BODY_SUBSTANCE = Code("SCT", "91720002", "Body Substance")

_FEMUR = Code("SCT", "71341001", "Femur")
_TIBIA = Code("SCT", "12611008", "Tibia")
_FIBULA = Code("SCT", "87342007", "Fibula")
_PATELLA = Code("SCT", "64234005", "Patella")
_KNEE = Code("SCT", "72696002", "Knee")
_BONE_OF_LOWER_LIMB = Code("SCT", "72001000", "Bone of lower limb")

_CARTILAGE = Code("SCT", "309312004", "Cartilage")
_MENISCUS = Code("SCT", "74135004", "Meniscus")
_LIGAMENT = Code("SCT", "52082005", "Ligament")
_EDEMA = Code("SCT", "79654002", "Edema")
_BODY_FLUID = Code("SCT", "32457005", "Body fluid")

_MEDIAL = Code("SCT", "255561001", "Medial")
_LATERAL = Code("SCT", "49370004", "Lateral")
_ANTERIOR = Code("SCT", "255549009", "Anterior")
_POSTERIOR = Code("SCT", "255551008", "Posterior")


def _bone(code: Code) -> Terminology:
    return Terminology(_ANATOMICAL_STRUCTURE, code)


def _tissue(code: Code, modifier: Code | None = None, region: Code | None = None) -> Terminology:
    return Terminology(_TISSUE, code, type_modifier=modifier, region=region)


_STRUCTURES = (
    Structure("femur", "Femur", (241, 214, 145), _bone(_FEMUR), label=1),
    Structure("tibia", "Tibia", (196, 145, 95), _bone(_TIBIA), label=2),
    Structure("fibula", "Fibula", (170, 130, 190), _bone(_FIBULA), label=3),
    Structure("patella", "Patella", (250, 180, 100), _bone(_PATELLA), label=4),
    Structure("femoral_cartilage", "Femoral cartilage", (111, 184, 210), _tissue(_CARTILAGE, region=_FEMUR), label=5),
    Structure("tibial_cartilage", "Tibial cartilage", (50, 120, 200), _tissue(_CARTILAGE, region=_TIBIA), label=6),
    Structure(
        "patellar_cartilage", "Patellar cartilage", (150, 225, 245), _tissue(_CARTILAGE, region=_PATELLA), label=7
    ),
    Structure("medial_meniscus", "Medial meniscus", (230, 100, 180), _tissue(_MENISCUS, _MEDIAL, _KNEE), label=8),
    Structure("lateral_meniscus", "Lateral meniscus", (160, 90, 230), _tissue(_MENISCUS, _LATERAL, _KNEE), label=9),
    Structure("acl", "Anterior cruciate ligament", (80, 210, 90), _tissue(_LIGAMENT, _ANTERIOR, _KNEE), label=10),
    Structure("pcl", "Posterior cruciate ligament", (225, 225, 70), _tissue(_LIGAMENT, _POSTERIOR, _KNEE), label=11),
)

_FINDINGS = (
    Finding("acl_tear", "ACL tear", (255, 90, 60), None, ("acl",)),
    Finding("pcl_tear", "PCL tear", (255, 150, 40), None, ("pcl",)),
    Finding("collateral_ligament_injury", "Collateral ligament injury", (255, 210, 40), None, ()),
    Finding("medial_meniscal_tear", "Medial meniscal tear", (240, 60, 160), None, ("medial_meniscus",)),
    Finding("lateral_meniscal_tear", "Lateral meniscal tear", (180, 60, 240), None, ("lateral_meniscus",)),
    Finding(
        "cartilage_lesion",
        "Cartilage lesion",
        (60, 200, 255),
        None,
        ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage"),
    ),
    Finding(
        "bone_marrow_lesion",
        "Bone marrow lesion (edema)",
        (255, 60, 60),
        Terminology(_ALTERED, _EDEMA, region=_BONE_OF_LOWER_LIMB),
        ("femur", "tibia", "patella"),
    ),
    Finding(
        "joint_effusion",
        "Joint effusion",
        (60, 140, 255),
        Terminology(_BODY_SUBSTANCE, _BODY_FLUID, region=_KNEE),
        (),
    ),
)

DEFAULT_CATALOG = Catalog(_STRUCTURES, _FINDINGS)
STRUCTURE_KEYS = DEFAULT_CATALOG.structure_keys
FINDING_KEYS = DEFAULT_CATALOG.finding_keys
