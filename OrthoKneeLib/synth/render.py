"""MR-like intensities from a tissue map: contrast, texture, partial volume, bias field.

Tissue intensity ranges (fractions of the bright fluid signal) mimic three knee contrasts.
DESS ranges were measured on the real pyKNEEr DESS series (water excitation: marrow and fat
near black, muscle about half the fluid signal; regions of interest in femoral and tibial
marrow, muscle and subcutaneous fat after the model's percentile normalisation), the T2-like
ones against the real pymskt MESE series (first echoes); PD fat-sat follows textbook
appearance (fat and marrow dark, fluid and edema bright). ``bench/synth_vs_real.py`` prints
how the rendered intensity distribution compares with the real series.

A fourth, "random" contrast draws fat, muscle, marrow, cartilage and nerve anywhere in a wide
range, as SynthSeg does (Billot et al. 2023): heads trained on a few fixed contrasts learn
those intensities instead of the anatomy and fail on a real scan whose contrast differs a
little. Short-T2 tissues stay dark and fluid stays bright, as in every fluid-sensitive knee
sequence, so the simulated findings keep their look.
"""

from __future__ import annotations

import numpy as np

from .anatomy import random_smooth_field
from .sources import Tissue

__all__ = ["CONTRASTS", "CONTRAST_MIX", "render_intensity"]

T = Tissue
# tissue -> (low, high) of the tissue's mean intensity, drawn once per case.
CONTRASTS: dict[str, dict[int, tuple[float, float]]] = {
    "dess": {
        T.AIR: (0.0, 0.01),
        T.FAT: (0.02, 0.08),
        T.MUSCLE: (0.35, 0.55),
        T.MARROW: (0.03, 0.12),
        T.CORTEX: (0.0, 0.03),
        T.CARTILAGE: (0.45, 0.70),
        T.MENISCUS: (0.01, 0.05),
        T.LIGAMENT: (0.03, 0.10),
        T.TENDON: (0.01, 0.05),
        T.FLUID: (0.85, 1.0),
        T.EDEMA_SOFT: (0.60, 0.80),
        T.EDEMA_MARROW: (0.45, 0.65),
        T.VESSEL: (0.60, 0.90),
        T.NERVE: (0.30, 0.45),
    },
    "pdfs": {
        T.AIR: (0.0, 0.01),
        T.FAT: (0.05, 0.12),
        T.MUSCLE: (0.22, 0.32),
        T.MARROW: (0.06, 0.14),
        T.CORTEX: (0.0, 0.03),
        T.CARTILAGE: (0.40, 0.55),
        T.MENISCUS: (0.02, 0.06),
        T.LIGAMENT: (0.04, 0.10),
        T.TENDON: (0.02, 0.06),
        T.FLUID: (0.85, 1.0),
        T.EDEMA_SOFT: (0.60, 0.80),
        T.EDEMA_MARROW: (0.55, 0.80),
        T.VESSEL: (0.60, 0.90),
        T.NERVE: (0.30, 0.40),
    },
    "t2": {
        T.AIR: (0.0, 0.01),
        T.FAT: (0.50, 0.70),
        T.MUSCLE: (0.15, 0.25),
        T.MARROW: (0.45, 0.65),
        T.CORTEX: (0.0, 0.04),
        T.CARTILAGE: (0.28, 0.42),
        T.MENISCUS: (0.02, 0.06),
        T.LIGAMENT: (0.03, 0.08),
        T.TENDON: (0.02, 0.06),
        T.FLUID: (0.80, 1.0),
        T.EDEMA_SOFT: (0.70, 0.90),
        T.EDEMA_MARROW: (0.75, 0.95),
        T.VESSEL: (0.60, 0.90),
        T.NERVE: (0.30, 0.45),
    },
    "random": {
        T.AIR: (0.0, 0.01),
        T.FAT: (0.02, 0.75),
        T.MUSCLE: (0.02, 0.75),
        T.MARROW: (0.02, 0.75),
        T.CORTEX: (0.0, 0.04),
        T.CARTILAGE: (0.02, 0.75),
        T.MENISCUS: (0.01, 0.07),
        T.LIGAMENT: (0.02, 0.10),
        T.TENDON: (0.01, 0.07),
        T.FLUID: (0.85, 1.0),
        T.EDEMA_SOFT: (0.70, 0.95),
        T.EDEMA_MARROW: (0.70, 0.95),
        T.VESSEL: (0.60, 0.90),
        T.NERVE: (0.02, 0.75),
    },
}
# how often "mixed" picks each contrast: the real sample is DESS; random contrasts teach shape.
CONTRAST_MIX: dict[str, float] = {"dess": 0.4, "random": 0.3, "pdfs": 0.15, "t2": 0.15}


def render_intensity(
    tissue: np.ndarray, contrast: str, rng: np.random.Generator, spacing: float
) -> tuple[np.ndarray, dict]:
    """Float32 image in roughly [0, 1] and the parameters drawn (recorded in case.json)."""
    ranges = CONTRASTS[contrast]
    means = np.zeros(Tissue.COUNT, dtype=np.float32)
    for t, (lo, hi) in ranges.items():
        means[t] = rng.uniform(lo, hi)
    image = means[tissue]
    # texture: each tissue varies smoothly by a few percent (trabecular bone, muscle fibres)
    texture = 1.0 + rng.uniform(0.04, 0.10) * random_smooth_field(tissue.shape, rng, control=12)
    image = image * texture
    # partial-volume blur at the working resolution
    sigma_vox = rng.uniform(0.4, 0.8)
    image = _gaussian(image, sigma_vox)
    # bias field from the receive coil: smooth, multiplicative, up to +-25 %
    bias_strength = rng.uniform(0.05, 0.25)
    bias = np.exp(bias_strength * random_smooth_field(tissue.shape, rng, control=4)).astype(np.float32)
    # surface-coil proximity: tissue near the skin is brighter (up to ~2x at the surface on the
    # real DESS), so the brightest percentiles, and hence the normalisation, are not set by muscle.
    coil_gain = rng.uniform(0.3, 1.2)
    bias = bias * (1.0 + coil_gain * _skin_proximity(tissue != Tissue.AIR, spacing))
    image = image * bias
    params = {
        "contrast": contrast,
        "tissue_means": {Tissue.NAMES[t]: round(float(means[t]), 4) for t in range(Tissue.COUNT)},
        "blur_sigma_vox": round(float(sigma_vox), 3),
        "bias_strength": round(float(bias_strength), 3),
        "coil_gain": round(float(coil_gain), 3),
    }
    return image.astype(np.float32), params


def _gaussian(image: np.ndarray, sigma_vox: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    radius = max(1, int(np.ceil(3 * sigma_vox)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma_vox) ** 2)
    kernel = torch.from_numpy(kernel / kernel.sum())
    t = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        t = F.conv3d(F.pad(t, pad, mode="replicate"), kernel.view(shape))
    return t[0, 0].numpy()


def _skin_proximity(body: np.ndarray, spacing: float, depth_mm: float = 12.0) -> np.ndarray:
    """~1 at the skin falling to 0 about ``depth_mm`` inside the body (0 outside it)."""
    import torch
    import torch.nn.functional as F

    step = 4  # a smooth profile: computed on a coarse grid, then interpolated back
    air = torch.from_numpy(np.ascontiguousarray(~body, dtype=np.float32))[None, None]
    coarse = F.avg_pool3d(air, step, step, ceil_mode=True)[0, 0].numpy()
    near_air = _gaussian(coarse, max(depth_mm / (spacing * step), 0.5))
    fine = F.interpolate(
        torch.from_numpy(near_air)[None, None], size=body.shape, mode="trilinear", align_corners=False
    )[0, 0].numpy()
    return np.clip(2.0 * fine, 0.0, 1.0) * body
