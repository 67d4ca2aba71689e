"""A PNG montage of a Prediction: each acquired view, structures outlined, the top finding's overlay.

Each view is shown in its own series (native in-plane resolution), with the prediction (made on
the reference grid) resampled onto it in physical space, so the montage also shows whether
the views agree geometrically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .io import atomic_path
from .predict import OVERLAY_DISPLAY_THRESHOLD
from .synth.sheet import outline_slice
from .volumes import Case, resample_like

__all__ = ["montage"]

_BONES = ("femur", "tibia", "patella")  # the slice shown in each view goes through their centre


def _heat(rgb: np.ndarray, overlay: np.ndarray, threshold: float = OVERLAY_DISPLAY_THRESHOLD) -> np.ndarray:
    """Blend a red-to-yellow map of ``overlay`` (0..1) over ``rgb`` where it exceeds ``threshold``
    (by default the Slicer module's display threshold: the montage shows what a reader sees)."""
    out = rgb.astype(np.float32)
    v = np.clip(overlay, 0, 1)
    color = np.stack([np.full_like(v, 255), 255 * v, np.zeros_like(v)], axis=-1)
    alpha = np.where(v > threshold, 0.25 + 0.5 * v, 0.0)[..., None]
    return (out * (1 - alpha) + color * alpha).astype(np.uint8)


def montage(prediction, case: Case, path: str | os.PathLike, finding: str | None = None, height: int = 320) -> Path:
    """Write the montage; ``finding`` defaults to the most probable one."""
    from PIL import Image, ImageDraw

    finding = finding or prediction.top_finding()
    labels_ref = prediction.labelmap_image()
    overlay_ref = prediction.overlay_image(finding) if finding else None
    bones_labels = [prediction.catalog.structure(k).label for k in _BONES if k in prediction.catalog.structure_keys]
    tiles = []
    for plane, volume in case.views.items():
        image = volume.image
        labels = sitk.GetArrayFromImage(resample_like(labels_ref, image, kind="label"))
        array = sitk.GetArrayFromImage(image)
        bones = np.isin(labels, bones_labels)
        k = int(np.argwhere(bones)[:, 0].mean()) if bones.any() else array.shape[0] // 2
        rgb = outline_slice(array[k], labels[k])
        if overlay_ref is not None:
            overlay = sitk.GetArrayFromImage(resample_like(overlay_ref, image, kind="linear"))
            rgb = _heat(rgb, overlay[k])
        tile = Image.fromarray(rgb)
        tile = tile.resize((max(1, int(tile.width * height / tile.height)), height), Image.BILINEAR)
        ImageDraw.Draw(tile).text((4, 4), f"{plane} slice {k + 1}/{array.shape[0]}", fill=(255, 255, 0))
        tiles.append(tile)
    banner = 34
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), height + banner), (0, 0, 0))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, banner))
        x += t.width + 4
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"{prediction.case_name}: structures outlined (catalog colors)", fill=(255, 255, 255))
    if finding:
        name = prediction.catalog.finding(finding).name
        draw.text(
            (4, 17),
            f"overlay: {name}, p = {prediction.finding_probabilities[finding]:.2f} "
            "(research demo, not for clinical use)",
            fill=(255, 200, 0),
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
