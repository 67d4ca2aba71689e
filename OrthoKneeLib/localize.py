"""Where each finding is: the structure and compartment under its map's peak, and how much
of the map is above the display threshold.

A reader wants "bone marrow lesion, medial femoral condyle, 0.8 mL, p 0.83", not a bare
probability. The peak of the finding's voxel map names the place: the structure there (or
the most common one within a few millimetres, because a lesion at a bone's edge may sit on
the boundary), the medial or lateral side from the knee's side and the tibia's centre line,
and the volume of the map above the display threshold.
"""

from __future__ import annotations

import numpy as np

from .gating import HOSTS as _HOSTS

__all__ = ["locate_findings", "side_of"]

_NEAR_MM = 4.0
_PHRASES = {
    "femur": "{side} femoral condyle",
    "tibia": "{side} tibial plateau",
    "fibula": "fibular head",
    "patella": "patella",
    "femoral_cartilage": "{side} femoral cartilage",
    "tibial_cartilage": "{side} tibial cartilage",
    "patellar_cartilage": "patellar cartilage",
    "medial_meniscus": "medial meniscus",
    "lateral_meniscus": "lateral meniscus",
    "acl": "anterior cruciate ligament",
    "pcl": "posterior cruciate ligament",
}


def side_of(x_lps: float, centre_x_lps: float, knee_side: str | None) -> str | None:
    """'medial' or 'lateral' for a point left or right of the knee's centre line (LPS x grows to
    the patient's left). The medial side of a right knee is towards the patient's left."""
    if knee_side not in ("left", "right"):
        return None
    towards_left = x_lps > centre_x_lps
    return "medial" if towards_left == (knee_side == "right") else "lateral"


def _index_to_lps(grid, index_kji) -> np.ndarray:
    """LPS millimetres of a (k, j, i) index on ``grid`` (the grid's own index-to-physical matrix)."""
    return (grid.index_to_physical() @ np.append(np.asarray(index_kji, float)[::-1], 1.0))[:3]


def locate_findings(prediction, threshold: float = 0.5) -> dict[str, dict]:
    """finding key -> {"structure", "where", "peak", "map_ml"} for each finding of ``prediction``."""
    labels = np.asarray(prediction.labelmap)
    catalog = prediction.catalog
    by_label = {s.label: s.key for s in catalog.structures}
    grid = prediction.reference_grid
    spacing_kji = np.asarray(grid.spacing, float)[::-1]
    voxel_ml = float(np.prod(spacing_kji)) / 1000.0
    centre_x = None
    for key in ("tibia", "femur"):
        if key in catalog.structure_keys:
            mask = labels == catalog.structure(key).label
            if mask.any():
                centre_x = float(_index_to_lps(grid, np.argwhere(mask).mean(axis=0))[0])
                break
    knee_side = (prediction.knee_side or {}).get("side")
    reach = np.maximum(1, np.round(_NEAR_MM / spacing_kji)).astype(int)
    out = {}
    for key, overlay in prediction.overlays.items():
        overlay = np.asarray(overlay)
        peak = np.unravel_index(int(np.argmax(overlay)), overlay.shape)
        box = tuple(slice(max(0, p - r), p + r + 1) for p, r in zip(peak, reach))
        around = labels[box]
        hosts = [catalog.structure(k).label for k in _HOSTS.get(key, ()) if k in catalog.structure_keys]
        near_hosts = [h for h in hosts if (around == h).any()]
        if near_hosts:  # a gated map sits on its host: name the host structure it touches most
            label = max(near_hosts, key=lambda h: int((around == h).sum()))
        else:
            label = int(labels[peak]) or (int(np.bincount(around[around > 0]).argmax()) if (around > 0).any() else 0)
        structure = by_label.get(label)
        peak_lps = _index_to_lps(grid, np.asarray(peak, float))
        side = side_of(float(peak_lps[0]), centre_x, knee_side) if centre_x is not None else None
        if structure:
            where = _PHRASES.get(structure, catalog.structure(structure).name).format(side=side or "").strip()
        else:
            where = f"{side} soft tissue" if side else "soft tissue"
        out[key] = {
            "structure": structure,
            "where": where,
            "peak_lps_mm": [round(float(v), 1) for v in peak_lps],
            "map_ml": round(float(np.count_nonzero(overlay >= threshold)) * voxel_ml, 3),
        }
    return out
