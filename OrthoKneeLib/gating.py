"""Findings on their anatomy: each finding's voxel map confined to the structure it can occur in.

The finding head's maps point at simulated lesions on renders, but on a real scan a map can peak
in soft tissue or on another finding's lesion, and a score without a place (or with a place off
the anatomy) is what makes a reader stop trusting a tool. Here each map is multiplied by a soft
host mask taken from the segmentation's own probabilities, widened by 2 mm so that a missed bone
edge does not cut a lesion:

- bone marrow lesion: femur, tibia, patella, fibula
- cartilage lesion: the three cartilages
- medial / lateral meniscal tear: that meniscus; ACL / PCL tear: that ligament
- collateral ligament injury: the soft tissue beside the joint line, medial and lateral of the
  tibial plateau, within 15 mm of femur or tibia
- joint effusion: the joint recesses: soft tissue within 10 mm of the cartilage, and the
  suprapatellar pouch (in front of the femur, above the patella's lower pole)

The case score is then taken from the gated map (:func:`case_score_from_map`): the level the map
reaches over 0.05 mL, so a high score always shows where, and a map with nothing on the anatomy
cannot give one.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["HOSTS", "host_masks", "finding_hosts", "gate_maps", "case_score_from_map", "TOP_ML"]

HOSTS = {
    "bone_marrow_lesion": ("femur", "tibia", "patella", "fibula"),
    "cartilage_lesion": ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage"),
    "medial_meniscal_tear": ("medial_meniscus",),
    "lateral_meniscal_tear": ("lateral_meniscus",),
    "acl_tear": ("acl",),
    "pcl_tear": ("pcl",),
}
_BONES = ("femur", "tibia", "patella", "fibula")
_CARTILAGE = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")
DILATE_MM = 2.0
TOP_ML = 0.05


def _sum(probs: np.ndarray, catalog, keys) -> np.ndarray:
    labels = [catalog.structure(k).label for k in keys if k in catalog.structure_keys]
    if not labels:
        return np.zeros(probs.shape[1:], np.float32)
    return np.clip(np.asarray(probs[labels], np.float32).sum(axis=0), 0, 1)


def _image(array: np.ndarray, grid) -> sitk.Image:
    return grid.image(np.asarray(array, np.float32))


def _widen(mask: np.ndarray, grid, mm: float) -> np.ndarray:
    """A grey dilation (a max filter over a box reaching ``mm`` along each axis, at least one voxel):
    keeps the soft values, reaches ``mm`` further along each axis. Separable max pooling in torch:
    a fraction of a second per map where ITK's ball took half a second and a 3D pool a second."""
    import torch

    if mm <= 0:
        return mask
    radius_kji = [max(1, int(round(mm / s))) for s in grid.spacing][::-1]
    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    with torch.inference_mode():  # a box max filter is separable: one axis at a time, 1D windows
        for axis, r in enumerate(radius_kji):
            kernel, padding = [1, 1, 1], [0, 0, 0]
            kernel[axis], padding[axis] = 2 * r + 1, r
            x = torch.nn.functional.max_pool3d(x, kernel, stride=1, padding=padding)
    return x[0, 0].numpy()


def _distance_mm(mask: np.ndarray, grid) -> np.ndarray:
    """Distance (mm) of every voxel to ``mask`` (> 0.5); large where the mask is empty."""
    binary = sitk.Cast(_image(mask > 0.5, grid), sitk.sitkUInt8)
    if not np.any(mask > 0.5):
        return np.full(mask.shape, 1e6, np.float32)
    return sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(binary, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    ).clip(min=0)


def _lps(grid, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates (x, y, z; mm) of every voxel of a (k, j, i) array on ``grid``."""
    k, j, i = np.indices(shape, dtype=np.float32)
    m = grid.index_to_physical().astype(np.float32)
    return tuple(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3))


def host_masks(probs: np.ndarray, grid, catalog, widen_mm: float = DILATE_MM) -> dict[str, np.ndarray]:
    """finding key -> soft host mask in [0, 1] on ``grid`` (the grid of ``probs``), widened by
    ``widen_mm`` (0: as the probabilities give it)."""
    hosts = {f: _widen(_sum(probs, catalog, keys), grid, widen_mm) for f, keys in HOSTS.items()}
    bone = _sum(probs, catalog, _BONES)
    cartilage = _sum(probs, catalog, _CARTILAGE)
    # soft tissue: neither bone nor cartilage nor meniscus (fluid and ligaments lie outside those)
    soft = 1.0 - np.clip(bone + cartilage + _sum(probs, catalog, ("medial_meniscus", "lateral_meniscus")), 0, 1)
    femur, tibia, patella = (_sum(probs, catalog, (k,)) for k in ("femur", "tibia", "patella"))
    x, y, z = _lps(grid, probs.shape[1:])
    # effusion: the recesses around the cartilage, and the suprapatellar pouch
    near_cartilage = _distance_mm(cartilage, grid) <= 10.0
    pouch = np.zeros(bone.shape, bool)
    if (femur > 0.5).any() and (patella > 0.5).any():
        patella_bottom = float(z[patella > 0.5].min())
        femur_front = float(np.percentile(y[femur > 0.5], 5))  # LPS y grows posterior: front = small y
        pouch = (z >= patella_bottom) & (y <= femur_front + 10.0) & (_distance_mm(femur, grid) <= 25.0)
    hosts["joint_effusion"] = _widen(soft * (near_cartilage | pouch), grid, widen_mm)
    # collateral ligaments: beside the joint line, outside the plateau's central part
    collateral = np.zeros(bone.shape, np.float32)
    if (tibia > 0.5).any() and (femur > 0.5).any():
        joint_z = float(np.percentile(z[tibia > 0.5], 98))  # the top of the tibia
        tibia_x = x[(tibia > 0.5) & (z >= joint_z - 15.0)]
        centre, half = float(np.median(tibia_x)), float(np.percentile(tibia_x, 98) - np.percentile(tibia_x, 2)) / 2
        near_bones = _distance_mm(np.maximum(femur, tibia), grid) <= 15.0
        beside = (np.abs(z - joint_z) <= 25.0) & (np.abs(x - centre) >= 0.6 * half)
        collateral = soft * (near_bones & beside)
    hosts["collateral_ligament_injury"] = _widen(collateral, grid, widen_mm)
    return {k: np.clip(v, 0, 1).astype(np.float32) for k, v in hosts.items()}


def finding_hosts(probs: np.ndarray, grid, catalog) -> np.ndarray:
    """(findings, k, j, i) host masks in ``catalog``'s finding order, for the finding head's
    attention (heads with ``finding_hosts``): ``probs`` are class probabilities on the head's
    3-mm cells, where the hosts are not widened: a cell is as much host as the segmentation says
    (widened by a cell, the bones' hosts took in the soft tissue around them, and the bone marrow
    lesion's attention peaked there). A finding without a known host (an annotator's new finding)
    is open everywhere."""
    hosts = host_masks(np.asarray(probs, np.float32), grid, catalog, widen_mm=0.0)
    everywhere = np.ones(probs.shape[1:], np.float32)
    return np.stack([hosts.get(f.key, everywhere) for f in catalog.findings])


def _coarser(probs: np.ndarray, grid, step: int):
    """Every ``step``-th voxel in plane (the two finest axes) and the grid they lie on."""
    from dataclasses import replace

    spacing = np.asarray(grid.spacing)
    through = int(np.argmax(spacing))  # i, j, k order
    steps_ijk = [1 if a == through else step for a in range(3)]
    sub = probs[:, :: steps_ijk[2], :: steps_ijk[1], :: steps_ijk[0]]
    coarse = replace(
        grid,
        spacing=tuple(float(s * f) for s, f in zip(grid.spacing, steps_ijk)),
        size=tuple(int(n) for n in sub.shape[1:][::-1]),
    )
    return sub, coarse, steps_ijk[::-1]


def gate_maps(overlays: dict[str, np.ndarray], probs: np.ndarray, grid, catalog) -> dict[str, np.ndarray]:
    """Each overlay times its host mask (findings without a known host are left as they are).

    The hosts of a fine grid are found on every second voxel in plane and repeated back: they are
    widened by 2 mm anyway, and the maps they gate come from 3 mm cells."""
    fine = probs.shape[2] * probs.shape[3] > 200 * 200
    if fine:
        sub, coarse_grid, steps_kji = _coarser(probs, grid, 2)
        small = host_masks(np.ascontiguousarray(sub), coarse_grid, catalog)
        hosts = {}
        for key, mask in small.items():
            for axis, n in enumerate(steps_kji):
                mask = np.repeat(mask, n, axis=axis) if n > 1 else mask
            hosts[key] = mask[: probs.shape[1], : probs.shape[2], : probs.shape[3]]
    else:
        hosts = host_masks(probs, grid, catalog)
    return {k: (v * hosts[k]).astype(np.float32) if k in hosts else v for k, v in overlays.items()}


def case_score_from_map(gated: np.ndarray, grid, top_ml: float = TOP_ML) -> float:
    """The level the map reaches over ``top_ml`` millilitres: its n-th highest value, n voxels
    making ``top_ml``. So a score of p means at least ``top_ml`` of the map is at p or above:
    a finding shown at 0.5 or more always has that much map to show at the 0.5 threshold."""
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    n = max(1, int(round(top_ml / voxel_ml)))
    flat = np.asarray(gated, np.float32).ravel()
    if flat.size <= n:
        return float(flat.min())
    return float(np.partition(flat, flat.size - n)[flat.size - n])
