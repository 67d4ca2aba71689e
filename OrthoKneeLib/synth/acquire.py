"""Three separately acquired thick-slice series of one rendered knee.

Each view gets its own in-plane resolution, slice thickness, gap, field of view and a small
random rigid misregistration (patient motion between series), and Rician noise added in
the acquired voxels, as in a real knee protocol.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..volumes import VIEW_PLANES, reformat

__all__ = ["acquire_views", "acquire_like", "recorded_motion", "SLAB_SUBSAMPLES"]

SLAB_SUBSAMPLES = 3  # thin samples averaged into each acquired slice

# plane -> (in-plane mm range, thickness mm range)
PROTOCOL = {
    "sagittal": ((0.5, 0.7), (2.5, 3.5)),
    "coronal": ((0.5, 0.7), (3.0, 4.0)),
    "axial": ((0.55, 0.75), (3.0, 4.0)),
}


def _rigid_about_centre(grid: sitk.Image, rotation_rad, translation_mm) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]))
    t.SetRotation(*(float(a) for a in rotation_rad))
    t.SetTranslation(tuple(float(v) for v in translation_mm))
    return t


def _misregistration(grid: sitk.Image, rng: np.random.Generator, shift_mm: float, rotate_deg: float):
    rotation = np.radians(rng.uniform(-rotate_deg, rotate_deg, 3))
    return _rigid_about_centre(grid, rotation, rng.uniform(-shift_mm, shift_mm, 3))


def _crop_fov(image: sitk.Image, rng: np.random.Generator, keep: float) -> sitk.Image:
    """A random in-plane field of view covering ``keep`` of each in-plane extent."""
    size = list(image.GetSize())
    new = [max(8, int(round(size[a] * keep))) if a < 2 else size[a] for a in range(3)]
    start = [int(rng.integers(0, size[a] - new[a] + 1)) if a < 2 else 0 for a in range(3)]
    return sitk.RegionOfInterest(image, new, start)


def acquire_views(
    intensity: sitk.Image,
    labels: sitk.Image,
    rng: np.random.Generator,
    shift_mm: float = 1.5,
    rotate_deg: float = 1.5,
) -> dict[str, dict]:
    """view -> {"image": int16 sitk image, "labels": uint8 labels on its grid, "params": {...}}."""
    views = {}
    for plane in VIEW_PLANES:
        (ip_lo, ip_hi), (th_lo, th_hi) = PROTOCOL[plane]
        in_plane = float(rng.uniform(ip_lo, ip_hi))
        thickness = float(rng.uniform(th_lo, th_hi))
        gap = float(thickness * rng.uniform(0.0, 0.15))
        motion = _misregistration(intensity, rng, shift_mm, rotate_deg)
        # Motion moves the anatomy (the transform maps view points to points of the knee).
        acquired = reformat(
            intensity, plane, in_plane, thickness, slice_gap=gap, subsamples=SLAB_SUBSAMPLES, transform=motion
        )
        acquired = _crop_fov(acquired, rng, keep=float(rng.uniform(0.85, 1.0)))
        noise_sigma = float(rng.uniform(0.01, 0.04))
        array = sitk.GetArrayFromImage(acquired)
        real = array + rng.normal(0, noise_sigma, array.shape)
        imag = rng.normal(0, noise_sigma, array.shape)
        magnitude = np.sqrt(real**2 + imag**2)  # Rician: magnitude of complex Gaussian noise
        scaled = np.clip(np.round(magnitude * 1000.0), 0, 32767).astype(np.int16)
        image = sitk.GetImageFromArray(scaled)
        image.CopyInformation(acquired)
        view_labels = sitk.Resample(labels, image, motion, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        views[plane] = {
            "image": image,
            "labels": view_labels,
            "motion": motion,
            "params": {
                "in_plane_mm": round(in_plane, 3),
                "thickness_mm": round(thickness, 3),
                "gap_mm": round(gap, 3),
                "noise_sigma": round(noise_sigma, 4),
                "misregistration": {
                    "translation_mm": [round(v, 3) for v in motion.GetTranslation()],
                    "rotation_deg": [
                        round(float(np.degrees(a)), 3)
                        for a in (motion.GetAngleX(), motion.GetAngleY(), motion.GetAngleZ())
                    ],
                },
            },
        }
    return views


def recorded_motion(work_grid: sitk.Image, params: dict) -> sitk.Euler3DTransform:
    """A view's misregistration rebuilt from the parameters case.json records for it (rounded to
    1 um and 0.001 degree), about the centre of the work grid it was drawn on: to acquire other
    volumes of the same knee (a label's partial-volume fraction, say) exactly as that view was."""
    motion = params["misregistration"]
    return _rigid_about_centre(work_grid, np.radians(motion["rotation_deg"]), motion["translation_mm"])


def acquire_like(
    volume: sitk.Image, plane: str, params: dict, motion: sitk.Transform, output_type: int | None = None
) -> sitk.Image:
    """``volume`` (on the work grid) acquired with a view's recorded resolution, slab and gap."""
    return reformat(
        volume,
        plane,
        params["in_plane_mm"],
        params["thickness_mm"],
        slice_gap=params["gap_mm"],
        subsamples=SLAB_SUBSAMPLES,
        transform=motion,
        output_type=output_type,
    )
