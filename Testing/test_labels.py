"""The catalogs: keys every output relies on, colors, and codes Slicer recognises."""

import json
from pathlib import Path

import pytest

from OrthoKneeLib.labels import DEFAULT_CATALOG, FINDING_KEYS, STRUCTURE_KEYS, Catalog, Code

EXPECTED_STRUCTURES = (
    "femur",
    "tibia",
    "fibula",
    "patella",
    "femoral_cartilage",
    "tibial_cartilage",
    "patellar_cartilage",
    "medial_meniscus",
    "lateral_meniscus",
    "acl",
    "pcl",
)
EXPECTED_FINDINGS = (
    "acl_tear",
    "pcl_tear",
    "collateral_ligament_injury",
    "medial_meniscal_tear",
    "lateral_meniscal_tear",
    "cartilage_lesion",
    "bone_marrow_lesion",
    "joint_effusion",
)
# Codes that are right but missing from Slicer's shipped DICOM master lists.
NOT_IN_SLICER_LISTS = {("SCT", "12611008")}  # Tibia ("Bone structure of tibia")


def test_keys_and_label_values_are_stable():
    assert STRUCTURE_KEYS == EXPECTED_STRUCTURES
    assert FINDING_KEYS == EXPECTED_FINDINGS
    assert [s.label for s in DEFAULT_CATALOG.structures] == list(range(1, 12))
    assert DEFAULT_CATALOG.by_label(10).key == "acl"


def test_colors_are_distinct_rgb_triplets():
    structure_colors = [s.color for s in DEFAULT_CATALOG.structures]
    assert len(set(structure_colors)) == len(structure_colors)
    for entry in DEFAULT_CATALOG:
        assert len(entry.color) == 3 and all(0 <= c <= 255 for c in entry.color)


def test_findings_point_at_known_structures():
    for finding in DEFAULT_CATALOG.findings:
        for key in finding.structures:
            DEFAULT_CATALOG.structure(key)


def test_every_structure_has_a_code():
    assert all(s.terminology is not None for s in DEFAULT_CATALOG.structures)


def test_json_round_trip_is_lossless():
    data = json.loads(json.dumps(DEFAULT_CATALOG.to_json()))
    assert Catalog.from_json(data) == DEFAULT_CATALOG


def test_catalog_rejects_duplicate_keys_and_label_gaps():
    s = DEFAULT_CATALOG.structures
    with pytest.raises(ValueError, match="unique"):
        Catalog(s + (s[0],), ())
    with pytest.raises(ValueError, match="without gaps"):
        Catalog(s[1:], ())


def test_terminology_string_matches_slicer_serializer():
    """Our string must be exactly what Slicer's Terminologies logic writes and parses."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test dependencies")
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for entry in DEFAULT_CATALOG:
        t = entry.terminology
        if t is None:
            continue

        def triple(code):
            return (code.value, code.scheme, code.meaning) if code else ("", "", "")

        expected = logic.SerializeTerminologyEntry(
            "Segmentation category and type - DICOM master list",
            *triple(t.category),
            *triple(t.type),
            *triple(t.type_modifier),
            "Anatomic codes - DICOM master list",
            *triple(t.region),
            *triple(t.region_modifier),
        )
        assert t.slicer_string() == expected, entry.key


def _slicer_codes() -> set[tuple[str, str, str]]:
    trame_slicer = pytest.importorskip("trame_slicer", reason="trame-slicer ships Slicer's terminology files")
    folder = Path(trame_slicer.__file__).parent / "resources" / "terminologies"
    codes: set[tuple[str, str, str]] = set()

    def walk(node):
        if isinstance(node, dict):
            if "CodeValue" in node and "CodingSchemeDesignator" in node:
                codes.add((node["CodingSchemeDesignator"], node["CodeValue"], node.get("CodeMeaning", "")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in (
        "SegmentationCategoryTypeModifier-DICOM-Master.term.json",
        "AnatomicRegionAndModifier-DICOM-Master.term.json",
    ):
        walk(json.loads((folder / name).read_text()))
    return codes


# Modifiers (Medial, Lateral, Anterior, Posterior) are DICOM CID 2 qualifier values; Slicer's
# lists attach only Right/Left to these types, so they are checked against CID 2 here.
CID2_MODIFIERS = {
    Code("SCT", "255561001", "Medial"),
    Code("SCT", "49370004", "Lateral"),
    Code("SCT", "255549009", "Anterior"),
    Code("SCT", "255551008", "Posterior"),
}


def test_codes_are_the_ones_slicer_knows():
    known = _slicer_codes()
    checked = 0
    for entry in DEFAULT_CATALOG:
        t = entry.terminology
        if t is None:
            continue
        for code in (t.category, t.type, t.region):
            if code is None or (code.scheme, code.value) in NOT_IN_SLICER_LISTS:
                continue
            assert (code.scheme, code.value, code.meaning) in known, f"{entry.key}: {code}"
            checked += 1
        if t.type_modifier:
            assert t.type_modifier in CID2_MODIFIERS, entry.key
    assert checked >= 25


def test_a_new_finding_answer_is_checked_before_it_is_exported():
    """The module's New finding row: a name the catalog lacks with present / absent becomes
    {name: 1 / 0}; no name is no answer; a finding the model has, by name or key, is refused (it
    is accepted or rejected in the table), and so is an answer that is neither."""
    from OrthoKneeLib.errors import OrthoKneeError

    assert DEFAULT_CATALOG.new_finding_answer("  Baker's   cyst ", "present") == {"Baker's cyst": 1}
    assert DEFAULT_CATALOG.new_finding_answer("Baker's cyst", "absent") == {"Baker's cyst": 0}
    assert DEFAULT_CATALOG.new_finding_answer("   ", "present") == {}
    for known in ("ACL tear", "acl_tear", "acl TEAR"):
        with pytest.raises(OrthoKneeError, match="already a finding"):
            DEFAULT_CATALOG.new_finding_answer(known, "present")
    with pytest.raises(OrthoKneeError, match="present or absent"):
        DEFAULT_CATALOG.new_finding_answer("Baker's cyst", "maybe")
    # what it returns is what the next version learns: the grown catalog has the finding
    grown = DEFAULT_CATALOG.with_findings(DEFAULT_CATALOG.new_finding_answer("Baker's cyst", "present"))
    assert grown.findings[-1].name == "Baker's cyst"
