"""A PNG contact sheet per case: the three views with their labels outlined, for people."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..labels import DEFAULT_CATALOG

__all__ = ["contact_sheet", "outline_slice"]

_COLORS = np.full((256, 3), 255, dtype=np.uint8)  # labels the catalog lacks (kept source labels): white
for _s in DEFAULT_CATALOG.structures:
    _COLORS[_s.label] = _s.color


def _window(slice_: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice_, [1, 99.5])
    return (np.clip((slice_ - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def outline_slice(image_slice: np.ndarray, label_slice: np.ndarray | None) -> np.ndarray:
    """RGB uint8: grey image with one-pixel label outlines in the catalog colors."""
    grey = _window(image_slice.astype(np.float32))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if label_slice is not None:
        lab = label_slice.astype(np.int32)
        edge = np.zeros(lab.shape, dtype=bool)
        rows = lab[1:, :] != lab[:-1, :]
        cols = lab[:, 1:] != lab[:, :-1]
        edge[1:, :] |= rows  # both pixels of every label change are boundary pixels;
        edge[:-1, :] |= rows  # only the labelled one is drawn, so each outline is closed
        edge[:, 1:] |= cols
        edge[:, :-1] |= cols
        edge &= lab > 0
        rgb[edge] = _COLORS[lab[edge]]
    return rgb


def contact_sheet(views: dict[str, tuple[sitk.Image, sitk.Image | None]], path: Path, title: str = "") -> Path:
    """Each view's slice through the labelled anatomy's centre, side by side, 256 px high."""
    from PIL import Image, ImageDraw

    tiles = []
    for plane, (image, labels) in views.items():
        array = sitk.GetArrayFromImage(image)
        lab = sitk.GetArrayFromImage(labels) if labels is not None else None
        if lab is not None and lab.any():
            k = int(np.argwhere(lab > 0)[:, 0].mean())
        else:
            k = array.shape[0] // 2
        rgb = outline_slice(array[k], lab[k] if lab is not None else None)
        tile = Image.fromarray(rgb)
        scale = 256 / tile.height
        tile = tile.resize((max(1, int(tile.width * scale)), 256), Image.NEAREST)
        ImageDraw.Draw(tile).text((4, 4), f"{plane} {k + 1}/{array.shape[0]}", fill=(255, 255, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), 256 + 16), (0, 0, 0))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 16))
        x += t.width + 4
    ImageDraw.Draw(sheet).text((4, 2), title, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
