"""scene.py against real Slicer MRML (slicer-core hosted by trame-slicer's SlicerApp), and the
module's files (syntax, .ui, CMake lists) where the Slicer application itself is absent."""

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test dependencies")
trame_core = pytest.importorskip("trame_slicer.core", reason="trame-slicer hosts slicer-core headless")

from conftest import make_image  # noqa: E402

from OrthoKneeLib.labels import DEFAULT_CATALOG  # noqa: E402
from OrthoKneeLib.model.heads import grid_of  # noqa: E402
from OrthoKneeLib.predict import Prediction  # noqa: E402
from OrthoKneeLib.scene import (  # noqa: E402
    PREDICTION_ATTRIBUTE,
    add_prediction,
    assign_views,
    case_from_nodes,
    export_training_case,
    image_from_node,
    segmentation_edited,
    segmentation_labelmap,
    set_segment_mask,
    volume_node_from_image,
)
from OrthoKneeLib.synth.dataset import read_case  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAG = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # PIR
COR = (1, 0, 0, 0, 0, 1, 0, -1, 0)  # LIP
AX_LEFT_HANDED = (1, 0, 0, 0, -1, 0, 0, 0, 1)  # LAS


@pytest.fixture(scope="module")
def app():
    return trame_core.SlicerApp()


def _physical_corners(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return np.array([image.TransformIndexToPhysicalPoint(c) for c in corners])


def _value_at(image: sitk.Image, point) -> float:
    return float(image[image.TransformPhysicalPointToIndex(point)])


@pytest.mark.parametrize("direction", [SAG, COR, AX_LEFT_HANDED])
def test_volume_nodes_keep_the_files_geometry(app, tmp_path, direction):
    """A node made by OrthoKnee and one read by Slicer from the same file agree physically."""
    rng = np.random.default_rng(0)
    image = make_image(
        rng.integers(0, 1000, (7, 11, 13)).astype(np.int16),
        spacing=(0.7, 0.9, 3.0),
        origin=(12.0, -30.0, 45.0),
        direction=direction,
    )
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(image, str(path))
    ours = image_from_node(volume_node_from_image(app.scene, image, "ours"))
    storage = app.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    theirs_node = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "theirs")
    assert storage.ReadData(theirs_node)
    theirs = image_from_node(theirs_node)
    for other in (ours, theirs):
        assert np.allclose(
            np.sort(_physical_corners(other), axis=0), np.sort(_physical_corners(image), axis=0), atol=1e-4
        )
        for idx in [(0, 0, 0), (12, 10, 6), (5, 3, 2)]:  # same value at the same place in the patient
            point = image.TransformIndexToPhysicalPoint(idx)
            assert _value_at(other, point) == float(image[idx])


def _knee_like():
    """A small reference volume, a labelmap of a few structures and a hand-built Prediction."""
    labels = np.zeros((10, 40, 36), np.uint8)
    labels[2:8, 5:20, 5:30] = DEFAULT_CATALOG.structure("femur").label
    labels[2:8, 22:35, 5:30] = DEFAULT_CATALOG.structure("tibia").label
    labels[3:7, 19:21, 8:28] = DEFAULT_CATALOG.structure("femoral_cartilage").label
    image = make_image(
        (labels * 40 + 100).astype(np.int16), spacing=(0.6, 0.6, 3.0), origin=(5.0, -20.0, 30.0), direction=SAG
    )
    overlays = {f.key: np.zeros(labels.shape, np.float32) for f in DEFAULT_CATALOG.findings}
    overlays["bone_marrow_lesion"][4:6, 10:14, 10:14] = 0.9
    probs = {f.key: 0.1 for f in DEFAULT_CATALOG.findings}
    probs["bone_marrow_lesion"] = 0.8
    prediction = Prediction(
        "knee",
        "sagittal",
        grid_of(image),
        labels,
        np.zeros((1, *labels.shape), np.float16),
        probs,
        overlays,
        DEFAULT_CATALOG,
    )
    return image, prediction


def test_a_prediction_becomes_named_colored_tagged_segments_and_overlays(app):
    image, prediction = _knee_like()
    reference = volume_node_from_image(app.scene, image, "knee sagittal")
    result = add_prediction(
        app.scene, prediction, reference_node=reference, threshold=0.4, opacity=0.55, surfaces=False
    )
    segmentation = result["segmentation"]
    assert segmentation.GetName() == "knee structures"
    seg = segmentation.GetSegmentation()
    assert [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())] == list(DEFAULT_CATALOG.structure_keys)
    for structure in DEFAULT_CATALOG.structures:
        segment = seg.GetSegment(structure.key)
        assert segment.GetName() == structure.name
        assert np.allclose(segment.GetColor(), np.array(structure.color) / 255, atol=1e-3)
        assert segment.GetTerminology() == structure.terminology.slicer_string()
    assert np.array_equal(segmentation_labelmap(segmentation, reference), prediction.labelmap)
    assert not segmentation_edited(segmentation, reference)
    overlay = result["overlays"]["bone_marrow_lesion"]
    display = overlay.GetDisplayNode()
    table = display.GetColorNode()
    assert table.GetName().startswith("OrthoKnee probability")
    rgba = [0.0] * 4
    table.GetColor(int(0.3 * 255), rgba)
    assert rgba[3] == 0.0  # transparent below the threshold
    table.GetColor(255, rgba)
    assert rgba[3] == 1.0
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.4)
    assert overlay.GetAttribute("OrthoKnee.Probability") == "0.800000"
    composite = app.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetForegroundVolumeID() == overlay.GetID()  # the top finding is shown
    assert composite.GetBackgroundVolumeID() == reference.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.55)
    assert np.allclose(_physical_corners(image_from_node(overlay)), _physical_corners(image), atol=1e-4)


def test_a_user_edited_segmentation_survives_a_rerun(app):
    image, prediction = _knee_like()
    reference = volume_node_from_image(app.scene, image, "edit sagittal")
    prediction.case_name = "edit"
    first = add_prediction(app.scene, prediction, reference_node=reference, surfaces=False)["segmentation"]
    again = add_prediction(app.scene, prediction, reference_node=reference, surfaces=False)
    assert again["segmentation"].GetName() == "edit structures" and not again["warnings"]  # unedited: replaced
    first = again["segmentation"]
    edited = prediction.labelmap.copy()
    edited[5, 36:39, 10:12] = DEFAULT_CATALOG.structure("femur").label  # the user painted femur
    set_segment_mask(first, "femur", edited == DEFAULT_CATALOG.structure("femur").label, reference)
    assert segmentation_edited(first, reference)
    rerun = add_prediction(app.scene, prediction, reference_node=reference, surfaces=False)
    assert rerun["segmentation"].GetName() == "edit structures (2)" and rerun["warnings"]
    assert app.scene.GetFirstNodeByName("edit structures") is first
    assert np.array_equal(segmentation_labelmap(first, reference), edited)  # the user's work is intact


def test_an_exported_training_case_reloads_equal_with_the_annotators_extra_label(app, tmp_path):
    image, prediction = _knee_like()
    prediction.case_name = "export"
    sag = volume_node_from_image(app.scene, image, "export sagittal")
    cor_image = sitk.Resample(
        image,
        make_image(
            np.zeros((12, 10, 12), np.int16), spacing=(0.8, 0.8, 2.5), origin=(-5.0, -22.0, 30.0), direction=COR
        ),
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
    )
    cor = volume_node_from_image(app.scene, cor_image, "export coronal")
    result = add_prediction(app.scene, prediction, reference_node=sag, surfaces=False)
    segmentation = result["segmentation"]
    seg = segmentation.GetSegmentation()
    extra_id = seg.AddEmptySegment("bakers_cyst", "Baker's cyst")
    seg.GetSegment(extra_id).SetLabelValue(20)
    mask = np.zeros(prediction.labelmap.shape, np.uint8)
    mask[4:6, 36:39, 31:35] = 1  # away from the other structures
    with_cyst = prediction.labelmap.copy()
    with_cyst[mask > 0] = 20
    set_segment_mask(segmentation, extra_id, mask, sag)
    seg.GetSegment(extra_id).SetLabelValue(20)
    review = {"bone_marrow_lesion": {"decision": "accept"}, "joint_effusion": {"decision": "reject"}}
    folder = export_training_case(
        tmp_path / "case",
        segmentation,
        {"sagittal": sag, "coronal": cor},
        DEFAULT_CATALOG,
        review=review,
        case_id="export",
    )
    case = read_case(folder)
    labels = sitk.GetArrayFromImage(case.labels["sagittal"])
    assert np.array_equal(labels, with_cyst)
    assert np.array_equal(sitk.GetArrayFromImage(case.case.views["sagittal"].image), sitk.GetArrayFromImage(image))
    assert np.allclose(_physical_corners(case.case.views["coronal"].image), _physical_corners(cor_image), atol=1e-4)
    meta = json.loads((folder / "case.json").read_text())
    assert meta["extra_labels"] == {"20": "Baker's cyst"}
    assert set(meta["annotated"]) == set(DEFAULT_CATALOG.structure_keys)
    assert case.findings["bone_marrow_lesion"] == 1 and case.findings["joint_effusion"] == 0
    assert case.findings["acl_tear"] is None  # not reviewed: unknown, not absent


def test_views_are_assigned_by_plane_detection(app):
    rng = np.random.default_rng(1)

    def centred(direction):
        smooth = np.add.outer(np.zeros(6), np.add.outer(np.arange(20.0), np.arange(20.0)) ** 2)  # anatomy-like
        array = (smooth + rng.random((6, 20, 20)) * 5).astype(np.float32)
        image = make_image(array, spacing=(0.5, 0.5, 3.0), direction=direction)
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint([9.5, 9.5, 2.5]))
        image.SetOrigin(tuple(np.array(image.GetOrigin()) - centre))
        return image

    nodes = [
        volume_node_from_image(app.scene, centred(d), name)
        for name, d in (("c", COR), ("s", SAG), ("a", AX_LEFT_HANDED))
    ]
    views = assign_views(nodes)
    assert {p: n.GetName() for p, n in views.items()} == {"coronal": "c", "sagittal": "s", "axial": "a"}
    case = case_from_nodes(**views)
    assert case.reference_plane == "sagittal" and case.planes == ("sagittal", "coronal", "axial")
    assert views["sagittal"].GetAttribute(PREDICTION_ATTRIBUTE) is None


# ----------------------------------------------------------------------------- module files


MODULE = REPO / "OrthoKnee" / "OrthoKnee.py"
UI = REPO / "OrthoKnee" / "Resources" / "UI" / "OrthoKnee.ui"


def test_module_parses_and_imports_without_the_slicer_application():
    ast.parse(MODULE.read_text())
    import importlib.util

    spec = importlib.util.spec_from_file_location("OrthoKnee_module", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SLICER_GUI is False  # the guarded path: no qt here
    review = module.review_record(
        {"case": "c", "findings": {"acl_tear": {"name": "ACL tear", "probability": 0.7}}},
        {"acl_tear": {"decision": "accept", "note": "clear"}},
    )
    assert review["findings"]["acl_tear"] == {
        "name": "ACL tear",
        "probability": 0.7,
        "decision": "accept",
        "note": "clear",
    }
    assert "<td>ACL tear</td>" in module.review_html(review)


def test_ui_is_well_formed_and_has_every_widget_the_module_uses():
    tree = ET.parse(UI)
    names = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used and used <= names, sorted(used - names)
    params = {
        p.text
        for p in tree.iter("string")
        if p.text
        in {"sagittal", "coronal", "axial", "bundlePath", "device", "threshold", "opacity"}
        | {"trainingCases", "learnNewLabels"}
    }
    assert params == {"sagittal", "coronal", "axial", "bundlePath", "device", "threshold", "opacity"} | {
        "trainingCases",
        "learnNewLabels",
    }
    handlers = set(re.findall(r'\.connect\("clicked\(bool\)", self\.(\w+)\)', MODULE.read_text()))
    defined = set(re.findall(r"    def (\w+)\(self", MODULE.read_text()))
    assert handlers and handlers <= defined, sorted(handlers - defined)


def test_cmake_lists_name_files_that_exist():
    text = (REPO / "OrthoKnee" / "CMakeLists.txt").read_text()
    listed = re.findall(r"^\s+(\.\./\S+\.py|Resources/\S+|\$\{MODULE_NAME\}\.py)\s*$", text, flags=re.M)
    assert len(listed) > 20
    for entry in listed:
        path = REPO / "OrthoKnee" / entry.replace("${MODULE_NAME}", "OrthoKnee")
        assert path.is_file(), entry
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(OrthoKnee)" in top and "EXTENSION_DESCRIPTION" in top
    engine = {p.relative_to(REPO).as_posix() for p in (REPO / "OrthoKneeLib").rglob("*.py")}
    assert engine == {e[3:] for e in listed if e.startswith("../")}  # every engine file ships with the module


def test_export_maps_segments_by_id_after_a_layer_change_and_leaves_no_nodes(app, tmp_path):
    """The Segment Editor renumbers label values when it moves a segment to another layer;
    the export must still write each structure's catalog label, and leave no colour table."""
    from OrthoKneeLib.labels import DEFAULT_CATALOG
    from OrthoKneeLib.scene import segmentation_labelmap, set_segment_mask

    image = make_image(np.zeros((6, 20, 20), np.float32) + np.arange(20.0), spacing=(1.0, 1.0, 3.0))
    reference = volume_node_from_image(app.scene, image, "ref")
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    seg.CreateDefaultDisplayNodes()
    segmentation = seg.GetSegmentation()
    for key in ("femur", "tibia"):
        segmentation.AddEmptySegment(key, key)
    a, b = np.zeros((6, 20, 20), bool), np.zeros((6, 20, 20), bool)
    a[1:3, 2:8, 2:8], b[3:5, 10:16, 10:16] = True, True
    set_segment_mask(seg, "femur", a, reference)
    set_segment_mask(seg, "tibia", b, reference)
    segmentation.SeparateSegmentLabelmap("tibia")  # what the Segment Editor does on overlap: a layer of its own
    assert segmentation.GetSegment("tibia").GetLabelValue() == segmentation.GetSegment("femur").GetLabelValue() == 1
    colours = app.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
    nodes = app.scene.GetNumberOfNodes()
    labels = segmentation_labelmap(seg, reference, DEFAULT_CATALOG)
    assert (labels[a] == DEFAULT_CATALOG.structure("femur").label).all()
    assert (labels[b] == DEFAULT_CATALOG.structure("tibia").label).all()
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == colours
    assert app.scene.GetNumberOfNodes() == nodes


def test_plane_detection_of_nodes_reads_no_voxels(app, monkeypatch):
    """assign_views runs on every node Slicer adds: it must use the geometry alone."""
    import OrthoKneeLib.scene as scene_module

    nodes = {
        name: volume_node_from_image(
            app.scene, make_image(np.zeros((4, 8, 8), np.float32), spacing=(0.5, 0.5, 3.0), direction=d), f"geom {name}"
        )
        for name, d in (("c", COR), ("s", SAG), ("a", AX_LEFT_HANDED))
    }

    def no_voxels(node):
        raise AssertionError("assign_views read the voxels of a node")

    monkeypatch.setattr(scene_module, "_array_of", no_voxels)
    views = scene_module.assign_views(nodes.values())
    assert {p: n.GetName() for p, n in views.items()} == {"coronal": "geom c", "sagittal": "geom s", "axial": "geom a"}


def test_reading_aids_decisions_measurements_and_native_views(app, tmp_path):
    from OrthoKneeLib.scene import (
        add_measurements_table,
        finding_decisions,
        set_finding_decision,
        show_native_views,
    )

    image, prediction = _knee_like()
    prediction.measurements = {"volume_ml": {"femur": 12.5}, "mean_thickness_mm": {"femoral_cartilage": 2.25}}
    sag = volume_node_from_image(app.scene, image, "aids sagittal")
    result = add_prediction(app.scene, prediction, reference_node=sag, surfaces=False)
    segmentation = result["segmentation"]
    set_finding_decision(segmentation, "joint_effusion", "reject", "no fluid")
    set_finding_decision(segmentation, "acl_tear", "accept")
    path = tmp_path / "scene.mrml"  # decisions are node attributes: they are saved with the scene
    app.scene.SetURL(str(path))
    assert app.scene.Commit()
    assert f"{'OrthoKnee.Decision.joint_effusion'}" in path.read_text()
    assert finding_decisions(segmentation)["joint_effusion"] == {"decision": "reject", "note": "no fluid"}
    with pytest.raises(ValueError):
        set_finding_decision(segmentation, "acl_tear", "maybe")
    table = add_measurements_table(app.scene, prediction)
    assert table.GetNumberOfRows() == len(prediction.catalog.structures)
    assert table.GetCellText(0, 0) == "Femur" and table.GetCellText(0, 1) == "12.50"
    composites = {}
    for layout in ("Red", "Yellow", "Green"):
        node = app.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        node.SetLayoutName(layout)
        composites[layout] = node
    cor = volume_node_from_image(app.scene, image, "aids coronal")
    overlay = next(iter(result["overlays"].values()))
    show_native_views(app.scene, {"sagittal": sag, "coronal": cor}, overlay, 0.4)
    assert composites["Yellow"].GetBackgroundVolumeID() == sag.GetID()
    assert composites["Green"].GetBackgroundVolumeID() == cor.GetID()
    assert composites["Red"].GetForegroundVolumeID() == overlay.GetID()


def test_a_version_comparison_becomes_a_table(app):
    from OrthoKneeLib.scene import add_comparison_table

    diff = {
        "a": {"folder": "a", "bundle": {"name": "orthoknee-demo", "version": "0.10.0"}},
        "b": {"folder": "b", "bundle": {"name": "orthoknee-demo", "version": "0.11.0"}},
        "structures": {
            "femur": {"name": "Femur", "dice": 0.981, "volume_ml_a": 250.0, "volume_ml_b": 251.5},
            "fibula": {"name": "Fibula", "dice": None, "volume_ml_a": 0.0, "volume_ml_b": 0.0},
        },
        "findings": {"acl_tear": {"a": 0.2, "b": 0.7, "changed": True}},
        "only_in_b": ["patellar_ligament"],
    }
    table = add_comparison_table(app.scene, diff)
    assert table.GetNumberOfRows() == 4 and "0.11.0" in table.GetColumnName(3)
    assert [table.GetCellText(0, c) for c in range(4)] == ["Femur", "0.981", "250.00 mL", "251.50 mL"]
    assert table.GetCellText(1, 1) == "-"
    assert (table.GetCellText(2, 0), table.GetCellText(2, 4)) == ("acl_tear", "yes")
    assert (table.GetCellText(3, 0), table.GetCellText(3, 4)) == ("patellar_ligament", "only in B")
