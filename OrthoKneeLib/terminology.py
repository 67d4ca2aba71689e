"""The knee structures as a Slicer terminology file (``.term.json``), so an annotator picks them,
with their codes and colours, in Slicer's terminology selector when adding or relabelling a segment.

The file follows the segment-context schema Slicer's own lists use (dcmqi's
segment-context-schema): categories, their types, and a type's modifiers (medial / lateral
meniscus, anterior / posterior cruciate ligament). It is generated from the catalog:
``python -m OrthoKneeLib.terminology OrthoKnee/Resources/Terminology/OrthoKnee.term.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["CONTEXT_NAME", "slicer_terminology", "TERMINOLOGY_FILE"]

CONTEXT_NAME = "Segmentation category and type - OrthoKnee knee structures"
TERMINOLOGY_FILE = (
    Path(__file__).resolve().parent.parent / "OrthoKnee" / "Resources" / "Terminology" / "OrthoKnee.term.json"
)


def _code(code) -> dict:
    return {"CodingSchemeDesignator": code.scheme, "CodeValue": code.value, "CodeMeaning": code.meaning}


def slicer_terminology(catalog) -> dict:
    """The catalog's structures grouped by category, type and modifier, with recommended colours."""
    categories: dict[tuple, dict] = {}
    for s in catalog.structures:
        t = s.terminology
        if t is None:
            continue
        category = categories.setdefault(
            (t.category.scheme, t.category.value), dict(_code(t.category), showAnatomy=True, Type=[])
        )
        type_entry = next((e for e in category["Type"] if e["CodeValue"] == t.type.value), None)
        if type_entry is None:
            type_entry = dict(
                _code(t.type), recommendedDisplayRGBValue=list(s.color), **{"3dSlicerLabel": s.name.lower()}
            )
            category["Type"].append(type_entry)
        if t.type_modifier is not None:
            type_entry.setdefault("Modifier", []).append(
                dict(
                    _code(t.type_modifier),
                    recommendedDisplayRGBValue=list(s.color),
                    **{"3dSlicerLabel": s.name.lower()},
                )
            )
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
        "SegmentationCodes": {"Category": list(categories.values())},
    }


if __name__ == "__main__":
    from .io import json_text
    from .labels import DEFAULT_CATALOG

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else TERMINOLOGY_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json_text(slicer_terminology(DEFAULT_CATALOG)) + "\n")
    print(target)
