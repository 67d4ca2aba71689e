"""How well could any model draw each structure on a synthetic case's thick-slice grid?

A synthetic case's truth on a view's grid is the work-grid label at each voxel's centre
(nearest neighbour), while its image averages a whole slab, smoothed in plane. Where a thin
plate crosses a 3-mm slab obliquely, the image cannot say which side of the centre the
boundary lies on. The *partial-volume oracle* knows the exact fraction of each structure in
each voxel (the one-hot work-grid labels acquired like the image: same resolution, slab, gap
and motion) and takes the largest; its Dice against the truth is a practical ceiling for a
model that reads the image voxel by voxel, and a scale for a Dice target on these cases.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..evaluate import dice
from .acquire import acquire_like, recorded_motion

__all__ = ["partial_volume_oracle", "oracle_dice"]


def partial_volume_oracle(
    work_labels: sitk.Image, truth: sitk.Image, plane: str, params: dict, motion: sitk.Transform | None = None
) -> np.ndarray:
    """The oracle's labels (k, j, i) on ``truth``'s grid: per voxel, the label with the largest
    acquired fraction. ``motion`` defaults to the one ``params`` records."""
    motion = recorded_motion(work_labels, params) if motion is None else motion
    # case.json rounds the spacings to 1 um, which over 400 voxels drifts a quarter voxel: the
    # truth grid has the exact in-plane spacing and slice step (thickness + gap)
    in_plane, _, step = truth.GetSpacing()
    params = {**params, "in_plane_mm": in_plane, "gap_mm": max(step - params["thickness_mm"], 0.0)}
    work = sitk.GetArrayViewFromImage(work_labels)
    labels = np.union1d(np.unique(work), [0])
    best = np.full(sitk.GetArrayViewFromImage(truth).shape, -1.0, np.float32)
    oracle = np.zeros(best.shape, np.uint8)
    for label in labels:  # one class at a time, keeping the running maximum: not twelve fraction volumes
        mask = sitk.GetImageFromArray((work == label).astype(np.float32))
        mask.CopyInformation(work_labels)
        acquired = acquire_like(mask, plane, params, motion, output_type=sitk.sitkFloat32)
        fraction = sitk.GetArrayFromImage(
            sitk.Resample(acquired, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
        )
        better = fraction > best
        best[better], oracle[better] = fraction[better], label
    return oracle


def oracle_dice(oracle: np.ndarray, truth: np.ndarray, labels) -> dict[int, float]:
    """Dice of the oracle per label present in the truth."""
    out = {}
    for label in labels:
        t = truth == label
        if t.any():
            out[int(label)] = dice(oracle == label, t)
    return out
