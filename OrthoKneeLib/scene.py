"""MRML glue: volume nodes <-> Case, Prediction -> segmentation + overlay nodes, edits -> training cases.

Needs Slicer's Python (the application, or ``slicer-core`` from PyPI with a host such as
trame-slicer's ``SlicerApp``); everything here works on a plain ``vtkMRMLScene`` so it is
tested headless against real MRML. The widget only calls these functions.

Geometry: SimpleITK images are LPS, MRML is RAS. The only LPS->RAS conversion of the engine
is :func:`OrthoKneeLib.volumes.ijk_to_ras`; :func:`image_from_node` is its inverse. Geometry is
compared physically, never matrix to matrix (Slicer reorders a left-handed volume's slices).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import json_text
from .predict import OVERLAY_DISPLAY_THRESHOLD
from .volumes import Case, Volume, VolumeSource, detect_plane, ijk_to_ras

if TYPE_CHECKING:
    from .labels import Catalog
    from .predict import Prediction

__all__ = [
    "PREDICTION_ATTRIBUTE",
    "volume_node_from_image",
    "image_from_node",
    "assign_views",
    "case_from_nodes",
    "probability_color_table",
    "add_prediction",
    "segmentation_labelmap",
    "segmentation_edited",
    "show_overlay",
    "export_training_case",
    "set_segment_mask",
]

PREDICTION_ATTRIBUTE = "OrthoKnee.LabelmapSha256"  # what the node held when OrthoKnee made it
CASE_ATTRIBUTE = "OrthoKnee.Case"


def _slicer():
    import slicer

    return slicer


def _vtk_matrix(array: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _numpy_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _image_data(array_kji: np.ndarray):
    """vtkImageData holding a copy of ``array_kji`` (x = i fastest, as VTK and SimpleITK agree)."""
    import vtk
    from vtk.util import numpy_support

    array_kji = np.ascontiguousarray(array_kji)
    data = vtk.vtkImageData()
    data.SetDimensions(array_kji.shape[2], array_kji.shape[1], array_kji.shape[0])
    scalars = numpy_support.numpy_to_vtk(array_kji.ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    return data


def _array_of(node) -> np.ndarray:
    from vtk.util import numpy_support

    data = node.GetImageData()
    i, j, k = data.GetDimensions()
    return numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(k, j, i).copy()


def volume_node_from_image(scene, image: sitk.Image, name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A volume node showing ``image`` where it is in the patient (LPS -> RAS here, once)."""
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(image)))
    node.SetAndObserveImageData(_image_data(sitk.GetArrayFromImage(image)))
    node.CreateDefaultDisplayNodes()
    return node


def image_from_node(node) -> sitk.Image:
    """The node's voxels as a SimpleITK image in LPS (the inverse of :func:`volume_node_from_image`)."""
    if node is None or node.GetImageData() is None:
        raise InputError(
            None,
            f"volume node {getattr(node, 'GetName', lambda: '?')()} holds no image.",
            "Load a series into it first.",
        )
    image = sitk.GetImageFromArray(_array_of(node))
    _set_geometry(image, node)
    return image


def _set_geometry(image: sitk.Image, node) -> None:
    """Spacing, direction and origin of ``node`` (RAS) onto ``image`` (LPS)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _numpy_matrix(m)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(o) for o in lps[:3, 3]))


def node_plane(node) -> str:
    """The plane of a volume node from its geometry alone: no voxel is read or copied (this runs
    on every node Slicer adds, and a native series is tens of megabytes)."""
    geometry = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    _set_geometry(geometry, node)
    return detect_plane(geometry)


def assign_views(nodes: Iterable) -> dict[str, object]:
    """Plane detection over loaded volume nodes: the first node of each plane fills its selector."""
    out: dict[str, object] = {}
    for node in nodes:
        if node is None or node.GetImageData() is None or node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        plane = node_plane(node)
        if plane in ("sagittal", "coronal", "axial") and plane not in out:
            out[plane] = node
    return out


def case_from_nodes(sagittal=None, coronal=None, axial=None, name: str | None = None) -> Case:
    views = {}
    for plane, node in (("sagittal", sagittal), ("coronal", coronal), ("axial", axial)):
        if node is not None:
            source = VolumeSource(path=f"scene:{node.GetName()}", description=node.GetName())
            views[plane] = Volume(image_from_node(node), source)
    return Case(**views, name=name or (sagittal or coronal or axial).GetName())


# ---------------------------------------------------------------------------------- results


def probability_color_table(scene, threshold: float = OVERLAY_DISPLAY_THRESHOLD, name: str = "OrthoKnee probability"):
    """A 256-entry color table for [0, 1] probabilities: transparent below ``threshold``, then
    yellow to red. One table per threshold, reused across findings."""
    slicer = _slicer()
    full_name = f"{name} {threshold:.2f}"
    existing = scene.GetFirstNodeByName(full_name)
    if existing is not None:
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(full_name)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for n in range(256):
        v = n / 255.0
        if v < threshold:
            table.SetColor(n, f"p{n}", 0.0, 0.0, 0.0, 0.0)
        else:
            u = (v - threshold) / max(1 - threshold, 1e-6)
            table.SetColor(n, f"p{n}", 1.0, 1.0 - u, 0.0, 1.0)
    table.SetAttribute("OrthoKnee.Threshold", f"{threshold:g}")
    scene.AddNode(table)
    return table


def _labelmap_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def _node_ids(scene, node_class: str) -> set[str]:
    nodes = scene.GetNodesByClass(node_class)
    return {nodes.GetItemAsObject(n).GetID() for n in range(nodes.GetNumberOfItems())}


def segment_labels(segmentation_node, catalog=None) -> dict[str, int]:
    """segment ID -> label value in an exported labelmap, by ID, never by the segment's own label
    value: the Segment Editor renumbers those when it moves a segment to another layer. A segment
    whose ID is a catalog structure key gets that structure's label; any other segment (one an
    annotator added) keeps its own label value when no other segment has it, else takes the next
    free value above the catalog's, in segment order."""
    from .labels import DEFAULT_CATALOG

    catalog = catalog or DEFAULT_CATALOG
    known = {s.key: s.label for s in catalog.structures}
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    labels = {segment_id: known[segment_id] for segment_id in ids if segment_id in known}
    taken = set(labels.values())
    next_free = max(known.values(), default=0) + 1
    for segment_id in ids:
        if segment_id in known:
            continue
        own = int(segmentation.GetSegment(segment_id).GetLabelValue())
        if own < 1 or own > 255 or own in taken:
            while next_free in taken:
                next_free += 1
            own = next_free
        labels[segment_id] = own
        taken.add(own)
    return labels


def segmentation_labelmap(segmentation_node, reference_node, catalog=None) -> np.ndarray:
    """The segmentation as one labelmap on ``reference_node``'s grid, labels by segment ID
    (:func:`segment_labels`)."""
    import vtk

    slicer = _slicer()
    scene = segmentation_node.GetScene()
    values = segment_labels(segmentation_node, catalog)
    colour_tables = _node_ids(scene, "vtkMRMLColorTableNode")
    out = None
    for segment_id, value in values.items():  # one segment at a time: its mask does not depend on layers
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "orthoknee-export")
        try:
            id_list = vtk.vtkStringArray()
            id_list.InsertNextValue(segment_id)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, id_list, labelmap, reference_node
            )
            if not ok:
                raise RuntimeError(f"Slicer could not export segment {segment_id} to a labelmap")
            mask = _array_of(labelmap) > 0
            if out is None:
                out = np.zeros(mask.shape, np.uint8)
            out[mask] = value
        finally:  # the export adds a display node and a colour table ("<segmentation>_ColorTable"): leave none
            display = labelmap.GetDisplayNode()
            scene.RemoveNode(labelmap)
            if display is not None and display.GetScene() is not None:
                scene.RemoveNode(display)
            for node_id in _node_ids(scene, "vtkMRMLColorTableNode") - colour_tables:
                scene.RemoveNode(scene.GetNodeByID(node_id))
    if out is None:
        image = image_from_node(reference_node)
        out = np.zeros(image.GetSize()[::-1], np.uint8)
    return out


def segmentation_edited(segmentation_node, reference_node) -> bool:
    """True when the node no longer holds what OrthoKnee put in it (or was not made by OrthoKnee)."""
    recorded = segmentation_node.GetAttribute(PREDICTION_ATTRIBUTE)
    if not recorded:
        return True
    return _labelmap_hash(segmentation_labelmap(segmentation_node, reference_node)) != recorded


def _result_name(scene, base: str, reference_node) -> tuple[str, object | None]:
    """(name, node to replace or None): an unedited earlier result is replaced, an edited one kept."""
    existing = scene.GetFirstNodeByName(base)
    if existing is None:
        return base, None
    if existing.IsA("vtkMRMLSegmentationNode") and not segmentation_edited(existing, reference_node):
        return base, existing
    n = 2
    while scene.GetFirstNodeByName(f"{base} ({n})") is not None:
        n += 1
    return f"{base} ({n})", None


def set_segment_mask(segmentation_node, segment_id: str, mask_kji: np.ndarray, reference_node) -> None:
    """Replace a segment's voxels by ``mask_kji`` (on ``reference_node``'s grid), as Segment Editor
    effects do (``SetBinaryLabelmapToSegment``, replace mode)."""
    slicer = _slicer()
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "orthoknee-mask")
    try:
        labelmap.CopyOrientation(reference_node)
        labelmap.SetAndObserveImageData(_image_data((np.asarray(mask_kji) > 0).astype(np.uint8)))
        oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            oriented,
            segmentation_node,
            segment_id,
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
            oriented.GetExtent(),
        ):
            raise RuntimeError(f"Slicer could not set the voxels of segment {segment_id}")
    finally:
        scene.RemoveNode(labelmap)


def _import_structures(scene, segmentation, reference_node, prediction: "Prediction") -> None:
    """One segment per catalog structure, ID = structure key (a stable handle for the widget, the
    review and the export), with name, color and terminology; absent structures stay empty."""
    catalog = prediction.catalog
    seg = segmentation.GetSegmentation()
    for index, structure in enumerate(catalog.structures):
        seg.AddEmptySegment(structure.key, structure.name)
        mask = prediction.labelmap == structure.label
        if mask.any():
            set_segment_mask(segmentation, structure.key, mask, reference_node)
        segment = seg.GetSegment(structure.key)
        segment.SetColor(*(c / 255.0 for c in structure.color))
        segment.SetLabelValue(structure.label)
        if structure.terminology:
            if hasattr(segment, "SetTerminology"):  # Slicer >= 5.8
                segment.SetTerminology(structure.terminology.slicer_string())
            else:  # older Slicer keeps the terminology as a tag
                segment.SetTag("TerminologyEntry", structure.terminology.slicer_string())
        seg.SetSegmentIndex(structure.key, index)


def add_prediction(
    scene,
    prediction: "Prediction",
    reference_node=None,
    threshold: float = OVERLAY_DISPLAY_THRESHOLD,
    opacity: float = 0.6,
    surfaces: bool = True,
) -> dict:
    """Segmentation node (one named, colored, terminology-tagged segment per structure) and one
    overlay volume per finding. Returns {"segmentation": node, "overlays": {key: node},
    "reference": node, "warnings": [...]}. A segmentation the user edited is never replaced."""
    warnings = []
    if reference_node is None:
        reference_node = volume_node_from_image(
            scene,
            prediction.reference_grid.image(np.zeros(prediction.labelmap.shape, np.float32)),
            f"{prediction.case_name} reference",
        )
    base = f"{prediction.case_name} structures"
    name, replace = _result_name(scene, base, reference_node)
    if name != base:
        warnings.append(f"'{base}' was edited; the new result is '{name}' and the edited one was kept.")
    if replace is not None:
        scene.RemoveNode(replace)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    _import_structures(scene, segmentation, reference_node, prediction)
    segmentation.SetAttribute(PREDICTION_ATTRIBUTE, _labelmap_hash(segmentation_labelmap(segmentation, reference_node)))
    segmentation.SetAttribute(CASE_ATTRIBUTE, json_text(prediction.summary()))
    segmentation.GetDisplayNode().SetVisibility(True)
    if surfaces:  # for the 3D view; costs seconds, so a caller without one can skip it
        segmentation.CreateClosedSurfaceRepresentation()
    table = probability_color_table(scene, threshold)
    overlays = {}
    for key, values in prediction.overlays.items():
        finding = prediction.catalog.finding(key)
        node = volume_node_from_image(scene, prediction.overlay_image(key), f"{prediction.case_name} {finding.name}")
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(table.GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(threshold)
        display.SetUpperThreshold(1.0)
        node.SetAttribute("OrthoKnee.Finding", key)
        node.SetAttribute("OrthoKnee.Probability", f"{prediction.finding_probabilities[key]:.6f}")
        overlays[key] = node
    top = prediction.top_finding()
    if top:
        show_overlay(scene, reference_node, overlays[top], opacity)
    return {"segmentation": segmentation, "overlays": overlays, "reference": reference_node, "warnings": warnings}


def set_overlay_threshold(scene, overlay_nodes, threshold: float) -> None:
    """Show each overlay from ``threshold`` up: its colour table (transparent below the threshold)
    and its display threshold both move, so a live slider changes what is seen."""
    table = probability_color_table(scene, threshold)
    for node in overlay_nodes:
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(table.GetID())
        display.SetLowerThreshold(threshold)


def show_overlay(scene, background_node, overlay_node, opacity: float = 0.6) -> None:
    """Reference volume as background, the overlay as foreground at ``opacity``, in every slice view."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    if composites.GetNumberOfItems() == 0:  # a bare scene: make one so the setting is kept
        composites.AddItem(scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode"))
    for n in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(n)
        composite.SetBackgroundVolumeID(background_node.GetID() if background_node else None)
        composite.SetForegroundVolumeID(overlay_node.GetID() if overlay_node else None)
        composite.SetForegroundOpacity(opacity)


# ---------------------------------------------------------------------------------- export


def export_training_case(
    folder: str | os.PathLike,
    segmentation_node,
    view_nodes: dict,
    catalog: "Catalog",
    review: dict | None = None,
    case_id: str | None = None,
    extra_findings: dict[str, int | None] | None = None,
) -> Path:
    """Write the edited segmentation and its views in the training-case layout (synth/dataset.py).

    ``extra_findings``: yes (1) / no (0) answers for findings the catalog lacks, by name; with
    ``finetune --new-labels`` each becomes a new finding of the next bundle version.

    Labels are written on every view's own grid (``<view>_labels.nrrd``) and the reference
    grid (``labels.nrrd``); segments the catalog does not know keep their label values and are
    listed under ``extra_labels``. Findings come from the review: accepted -> 1, rejected -> 0,
    not reviewed -> null (unknown, ignored by training).
    """
    from .io import write_image_atomic, write_json_atomic
    from .synth.dataset import CASE_LAYOUT

    folder = Path(folder)
    reference_plane = next(p for p in ("sagittal", "coronal", "axial") if view_nodes.get(p) is not None)
    reference_node = view_nodes[reference_plane]
    labels = segmentation_labelmap(segmentation_node, reference_node, catalog)
    reference_image = image_from_node(reference_node)
    labels_image = sitk.GetImageFromArray(labels)
    labels_image.CopyInformation(reference_image)
    folder.mkdir(parents=True, exist_ok=True)
    for plane, node in view_nodes.items():
        if node is None:
            continue
        image = image_from_node(node)
        write_image_atomic(image, folder / f"{plane}.nrrd")
        on_view = sitk.Resample(labels_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        write_image_atomic(on_view, folder / f"{plane}_labels.nrrd")
    write_image_atomic(labels_image, folder / "labels.nrrd")
    seg = segmentation_node.GetSegmentation()
    values = segment_labels(segmentation_node, catalog)
    annotated, extra = [], {}
    for segment_id, value in values.items():
        if segment_id in catalog.structure_keys:
            annotated.append(segment_id)
        else:  # a label the catalog does not know: its name and colour travel with the case
            segment = seg.GetSegment(segment_id)
            extra[str(value)] = segment.GetName()
    review = review or {}
    findings = {}
    for f in catalog.findings:
        decision = (review.get(f.key) or {}).get("decision")
        findings[f.key] = {
            "present": 1 if decision == "accept" else 0 if decision == "reject" else None,
            "voxels": 0,
            "real": True,
        }
    meta = {
        "layout": CASE_LAYOUT,
        "case_id": case_id or folder.name,
        "source": "slicer",
        "subject": case_id or folder.name,
        "split": "train",
        "synthetic": False,
        "annotated": annotated,
        "extra_labels": extra,
        "extra_findings": dict(extra_findings or {}),
        "findings": findings,
        "review": review,
    }
    write_json_atomic(meta, folder / "case.json")  # last: marks the case complete
    return folder


# ---------------------------------------------------------------------------------- reading aids

_DECISION_ATTRIBUTE = "OrthoKnee.Decision."
# Slicer's default slice views: Red shows the axial plane, Yellow the sagittal, Green the coronal
_VIEW_OF_PLANE = {"axial": "Red", "sagittal": "Yellow", "coronal": "Green"}


def set_finding_decision(segmentation_node, key: str, decision: str | None, note: str = "") -> None:
    """A reader's accept / reject (and note) of a finding, kept on the segmentation node: it is saved
    with the scene and reloads with it, unlike text typed into a table widget."""
    if decision not in (None, "accept", "reject"):
        raise ValueError(f"decision must be accept, reject or None, not {decision!r}")
    segmentation_node.SetAttribute(_DECISION_ATTRIBUTE + key, json.dumps({"decision": decision, "note": note}))


def finding_decisions(segmentation_node) -> dict[str, dict]:
    """finding key -> {"decision", "note"} as :func:`set_finding_decision` stored them."""
    out = {}
    for name in segmentation_node.GetAttributeNames() or ():
        if name.startswith(_DECISION_ATTRIBUTE):
            out[name[len(_DECISION_ATTRIBUTE) :]] = json.loads(segmentation_node.GetAttribute(name))
    return out


def add_measurements_table(scene, prediction: "Prediction", name: str | None = None):
    """A table node: each structure's volume (mL) and, for cartilage plates, mean thickness (mm)."""
    slicer = _slicer()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name or f"{prediction.case_name} measurements")
    volumes = (prediction.measurements or {}).get("volume_ml", {})
    thickness = (prediction.measurements or {}).get("mean_thickness_mm", {})
    del slicer
    for title in ("Structure", "Volume (mL)", "Mean thickness (mm)"):
        table.AddColumn().SetName(title)
    for s in prediction.catalog.structures:
        row = table.AddEmptyRow()
        table.SetCellText(row, 0, s.name)
        table.SetCellText(row, 1, f"{volumes.get(s.key, 0.0):.2f}")
        t = thickness.get(s.key)
        table.SetCellText(row, 2, f"{t:.2f}" if t else "")
    return table


def add_comparison_table(scene, diff: dict, name: str = "OrthoKnee version comparison"):
    """A table node of two versions' outputs on one case (compare.compare_predictions): Dice and
    volumes per structure, then each finding's probability in both and whether it changed."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)

    def version(side: str) -> str:
        bundle = diff[side].get("bundle") or {}
        return f"{bundle.get('name', '?')} {bundle.get('version', '?')}"

    for title in ("Structure or finding", "Dice A vs B", f"A: {version('a')}", f"B: {version('b')}", "Changed"):
        table.AddColumn().SetName(title)

    def add(cells: list[str]) -> None:
        row = table.AddEmptyRow()
        for column, text in enumerate(cells):
            table.SetCellText(row, column, text)

    for key, row in diff["structures"].items():
        dice = "-" if row["dice"] is None else f"{row['dice']:.3f}"
        add([row.get("name", key), dice, f"{row['volume_ml_a']:.2f} mL", f"{row['volume_ml_b']:.2f} mL", ""])
    for key, row in diff["findings"].items():
        add([key, "", f"p {row['a']:.2f}", f"p {row['b']:.2f}", "yes" if row["changed"] else ""])
    for side in ("a", "b"):
        for key in diff.get(f"only_in_{side}", []) + diff.get(f"findings_only_in_{side}", []):
            add([key, "", "yes" if side == "a" else "-", "yes" if side == "b" else "-", f"only in {side.upper()}"])
    return table


def show_native_views(scene, view_nodes: dict, overlay_node=None, opacity: float = 0.6) -> None:
    """Each slice view shows the series acquired in its plane (at its own resolution), where there is
    one; the overlay on top in all of them."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for n in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(n)
        plane = next((p for p, view in _VIEW_OF_PLANE.items() if view == composite.GetLayoutName()), None)
        node = view_nodes.get(plane) if plane else None
        if node is not None:
            composite.SetBackgroundVolumeID(node.GetID())
        if overlay_node is not None:
            composite.SetForegroundVolumeID(overlay_node.GetID())
            composite.SetForegroundOpacity(opacity)
