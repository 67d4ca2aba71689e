"""What the browser viewer does to the scene, without the browser: one reviewed case.

A ViewerSession holds a Slicer scene (slicer-core, hosted by trame-slicer's SlicerApp) with
the case's series, the structures as a segmentation and one overlay per finding, made by
``scene.py`` exactly as the Slicer module makes them. The trame UI (app.py) only forwards
clicks here, so every behaviour is testable on real MRML without a browser.

Saving writes the edited segmentation and the review beside the outputs as
``structures-reviewed-N.seg.nrrd`` and ``review-N.json``, N the next free number: a save
never replaces an earlier one, and the files of one save appear together (outfolder.py).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

__all__ = ["ViewerSession", "DECISIONS"]

DECISIONS = ("accepted", "rejected")


def _hex(color) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in color)


class ViewerSession:
    def __init__(self, slicer_app, output_folder: str | Path, threshold: float = 0.5, opacity: float = 0.6) -> None:
        from ..results import load_prediction
        from ..scene import add_prediction, volume_node_from_image
        from ..volumes import load_volume

        self.app = slicer_app
        self.scene = slicer_app.scene
        self.folder = Path(output_folder)
        self.prediction = load_prediction(self.folder)
        self.view_nodes = {}
        for plane, path in (self.prediction.input_paths or {}).items():
            if Path(path).exists():
                volume = load_volume(path)
                self.view_nodes[plane] = volume_node_from_image(self.scene, volume.image, f"{plane} series")
        self.reference_node = self.view_nodes.get(self.prediction.reference_plane)
        result = add_prediction(
            self.scene, self.prediction, reference_node=self.reference_node, threshold=threshold, opacity=opacity
        )
        self.reference_node = result["reference"]
        self.segmentation_node = result["segmentation"]
        self.overlay_nodes = result["overlays"]
        self.threshold, self.opacity = threshold, opacity
        self.overlay_key = self.prediction.top_finding()
        self.decisions: dict[str, str | None] = {k: None for k in self.prediction.finding_probabilities}
        self.notes: dict[str, str] = {}
        self.visible = {s.key: True for s in self.prediction.catalog.structures}

    # ------------------------------------------------------------------ what the panels list
    def structures(self) -> list[dict]:
        volumes = (self.prediction.measurements or {}).get("volume_ml", {})
        return [
            {
                "key": s.key,
                "name": s.name,
                "color": _hex(s.color),
                "visible": self.visible[s.key],
                "volume_ml": round(float(volumes.get(s.key, 0.0)), 1),
            }
            for s in self.prediction.catalog.structures
        ]

    def findings(self) -> list[dict]:
        rows = []
        for key, p in sorted(self.prediction.finding_probabilities.items(), key=lambda kv: -kv[1]):
            where = self.prediction.finding_locations.get(key, {})
            rows.append(
                {
                    "key": key,
                    "name": self.prediction.catalog.finding(key).name,
                    "probability": round(p, 4),
                    "where": where.get("where", ""),
                    "map_ml": where.get("map_ml", 0.0),
                    "decision": self.decisions[key] or "",
                }
            )
        return rows

    # ------------------------------------------------------------------ display
    def slice_views(self):
        return self.app.view_manager.get_slice_views()

    def show_background(self) -> None:
        """Each slice view shows the series acquired in its plane (native resolution) when there is one."""
        for view in self.slice_views():
            orientation = view.get_orientation().lower()
            node = self.view_nodes.get(orientation) or self.reference_node
            view.set_background_volume_id(node.GetID())
            view.fit_view_to_content()
        self.show_overlay(self.overlay_key)

    def set_structure_visible(self, key: str, visible: bool) -> None:
        self.visible[key] = bool(visible)
        self.segmentation_node.GetDisplayNode().SetSegmentVisibility(key, bool(visible))

    def show_overlay(self, key: str | None) -> None:
        self.overlay_key = key if key in self.overlay_nodes else None
        node = self.overlay_nodes.get(self.overlay_key) if self.overlay_key else None
        for view in self.slice_views():
            view.set_foreground_volume_id(node.GetID() if node is not None else None)
            view.set_foreground_opacity(self.opacity)

    def set_opacity(self, opacity: float) -> None:
        self.opacity = float(np.clip(opacity, 0.0, 1.0))
        for view in self.slice_views():
            view.set_foreground_opacity(self.opacity)

    def set_threshold(self, threshold: float) -> None:
        """Overlay voxels below the threshold are transparent (the display threshold of each overlay)."""
        from ..scene import set_overlay_threshold

        self.threshold = float(np.clip(threshold, 0.0, 1.0))
        set_overlay_threshold(self.scene, self.overlay_nodes.values(), self.threshold)

    # ------------------------------------------------------------------ review and editing
    def decide(self, key: str, decision: str | None) -> None:
        if key not in self.decisions:
            raise KeyError(key)
        if decision not in (None, "", *DECISIONS):
            raise ValueError(f"decision must be one of {DECISIONS} or empty, not {decision!r}")
        self.decisions[key] = decision or None

    def start_editing(self, structure_key: str, erase: bool = False) -> None:
        """Paint (or erase) ``structure_key`` with trame-slicer's segment editor in the slice views."""
        from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint

        editor = self.app.segmentation_editor
        if editor.active_segmentation_node is not self.segmentation_node:
            editor.set_active_segmentation(self.segmentation_node, self.reference_node)
        editor.set_active_segment_id(structure_key)
        editor.set_active_effect_type(SegmentationEffectErase if erase else SegmentationEffectPaint)

    def stop_editing(self) -> None:
        self.app.segmentation_editor.deactivate_effect()

    def labelmap(self) -> np.ndarray:
        from ..scene import segmentation_labelmap

        return segmentation_labelmap(self.segmentation_node, self.reference_node, self.prediction.catalog)

    def review(self) -> dict:
        return {
            "case": self.prediction.case_name,
            "bundle": self.prediction.bundle,
            "reviewed": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "findings": {
                key: {
                    "probability": self.prediction.finding_probabilities[key],
                    "decision": self.decisions[key],
                    "note": self.notes.get(key, ""),
                    **self.prediction.finding_locations.get(key, {}),
                }
                for key in self.decisions
            },
            "not_for_clinical_use": True,
        }

    def save(self) -> dict[str, Path]:
        """The edited segmentation and the review, under the next free number; nothing is replaced."""
        from ..io import write_json_atomic
        from ..outfolder import locked_folder, staged_files
        from ..segfile import catalog_segments, write_seg_nrrd

        labelmap = self.labelmap()
        with locked_folder(self.folder) as folder:
            n = 1
            while (folder / f"structures-reviewed-{n}.seg.nrrd").exists() or (folder / f"review-{n}.json").exists():
                n += 1
            seg_name, review_name = f"structures-reviewed-{n}.seg.nrrd", f"review-{n}.json"
            with staged_files(folder) as stage:
                image = self.prediction.reference_grid.image(labelmap.astype(np.uint8))
                write_seg_nrrd(image, catalog_segments(self.prediction.catalog), stage.path(seg_name))
                review = dict(self.review(), segmentation=seg_name)
                write_json_atomic(review, stage.path(review_name))
        return {"segmentation": folder / seg_name, "review": folder / review_name}
