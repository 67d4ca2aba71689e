"""Simulated findings: each changes the knee's tissue (what is rendered) and yields a mask.

Only the OAI bone-marrow lesions are real; everything else is simulated on real anatomy,
and every model card trained on these cases must say so. A finding is *eligible* only
where its structure exists (annotated or implanted); elsewhere its label is unknown
(``None``), never a false "absent".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..labels import FINDING_KEYS
from .anatomy import CARTILAGES, Knee, dilate, distance_mm
from .sources import Tissue

__all__ = ["FindingResult", "simulate_findings", "eligible_findings"]

_SOFT = (Tissue.MUSCLE, Tissue.FAT, Tissue.FLUID, Tissue.AIR)


@dataclass
class FindingResult:
    present: bool | None  # None: not eligible in this case (label unknown)
    mask: np.ndarray | None
    real: bool = False

    def to_json(self) -> dict:
        return {
            "present": None if self.present is None else int(self.present),
            "voxels": int(self.mask.sum()) if self.mask is not None else 0,
            "real": self.real,
        }


def _ligament(knee: Knee, key: str) -> np.ndarray:
    if key in knee.annotated:
        return knee.mask(key)
    return knee.implants.get(key, np.zeros(knee.structures.shape, bool))


def eligible_findings(knee: Knee) -> dict[str, bool]:
    return {
        "acl_tear": bool(_ligament(knee, "acl").any()),
        "pcl_tear": bool(_ligament(knee, "pcl").any()),
        "collateral_ligament_injury": bool(knee.collateral.any() and knee.frame),
        "medial_meniscal_tear": "medial_meniscus" in knee.annotated and bool(knee.mask("medial_meniscus").any()),
        "lateral_meniscal_tear": "lateral_meniscus" in knee.annotated and bool(knee.mask("lateral_meniscus").any()),
        "cartilage_lesion": any(c in knee.annotated for c in CARTILAGES),
        "bone_marrow_lesion": bool(knee.mask("femur", "tibia", "patella").any()),
        "joint_effusion": bool(knee.frame),
    }


def _coords_mm(shape: tuple[int, ...], spacing: float) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.float32) * spacing for n in shape]


def _pick_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return np.asarray(np.unravel_index(idx[rng.integers(len(idx))], mask.shape), dtype=float)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _ellipsoid(shape, centre_vox, radii_mm, spacing, rng) -> np.ndarray:
    """Randomly oriented ellipsoid, computed only in its bounding box."""
    r = max(radii_mm) / spacing
    lo = np.maximum(np.floor(centre_vox - r - 1), 0).astype(int)
    hi = np.minimum(np.ceil(centre_vox + r + 2), shape).astype(int)
    out = np.zeros(shape, dtype=bool)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    pts = (np.stack(grids, axis=-1) - centre_vox) * spacing
    local = pts @ q
    inside = ((local / np.asarray(radii_mm)) ** 2).sum(axis=-1) <= 1.0
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = inside
    return out


def _ligament_tear(knee: Knee, key: str, rng: np.random.Generator) -> np.ndarray:
    lig = _ligament(knee, key)
    pts = np.argwhere(lig).astype(float)
    centre = pts.mean(axis=0)
    _, _, vt = np.linalg.svd(pts - centre, full_matrices=False)
    t = (pts - centre) @ vt[0] * knee.spacing
    t0 = rng.uniform(np.quantile(t, 0.3), np.quantile(t, 0.7))
    half = rng.uniform(2.5, 4.5)
    segment = np.zeros_like(lig)
    sel = np.abs(t - t0) <= half
    segment[tuple(pts[sel].astype(int).T)] = True
    # fluid fills the gap and its immediate surroundings
    mask = (distance_mm(segment, knee.spacing, max_mm=1.0) <= 1.0) & (lig | np.isin(knee.tissue, _SOFT))
    knee.tissue[mask] = Tissue.FLUID
    if key in knee.annotated:
        knee.structures[segment] = 0
    return mask


def _meniscal_tear(knee: Knee, key: str, rng: np.random.Generator) -> np.ndarray:
    meniscus = knee.mask(key)
    p = _pick_voxel(meniscus, rng)
    if rng.random() < 0.5:  # horizontal cleavage tear: normal close to the I axis
        n = np.array([0.0, 1.0, 0.0]) + 0.3 * rng.standard_normal(3)
    else:  # vertical / radial tear: normal in the R-P plane
        n = np.array([rng.standard_normal(), 0.0, rng.standard_normal()])
    n /= np.linalg.norm(n)
    zs, ys, xs = _coords_mm(meniscus.shape, knee.spacing)
    q = p * knee.spacing
    plane = np.abs(
        ((zs[:, None, None] - q[0]) * n[0]) + ((ys[None, :, None] - q[1]) * n[1]) + ((xs[None, None, :] - q[2]) * n[2])
    )
    near = (
        (zs[:, None, None] - q[0]) ** 2 + (ys[None, :, None] - q[1]) ** 2 + (xs[None, None, :] - q[2]) ** 2
    ) <= rng.uniform(6, 10) ** 2
    cleft = meniscus & (plane <= max(0.75, 0.6 * knee.spacing)) & near
    knee.tissue[cleft] = Tissue.FLUID
    return cleft


def _cartilage_lesion(knee: Knee, rng: np.random.Generator) -> np.ndarray:
    plates = [c for c in CARTILAGES if c in knee.annotated and knee.mask(c).any()]
    sizes = np.array([knee.mask(c).sum() for c in plates], dtype=float)
    plate = plates[rng.choice(len(plates), p=sizes / sizes.sum())]
    cart = knee.mask(plate)
    centre = _pick_voxel(cart, rng)
    radius = rng.uniform(2.5, 5.0)
    defect = _ellipsoid(cart.shape, centre, (radius, radius, radius * rng.uniform(0.6, 1.0)), knee.spacing, rng) & cart
    knee.tissue[defect] = Tissue.FLUID  # joint fluid fills a full-thickness defect
    knee.structures[defect] = 0
    return defect


def _bone_marrow_lesion(knee: Knee, rng: np.random.Generator) -> np.ndarray:
    bone_key = rng.choice(["femur", "tibia", "tibia", "femur", "patella"])
    bone = knee.mask(bone_key)
    if not bone.any():
        bone = knee.mask("femur", "tibia", "patella")
    cartilage = knee.mask(*CARTILAGES)
    subchondral = bone & (distance_mm(cartilage, knee.spacing, max_mm=7.0) <= 7.0) if cartilage.any() else bone
    centre = _pick_voxel(subchondral if subchondral.any() else bone, rng)
    radii = rng.uniform(4.0, 10.0, 3)
    lesion = _ellipsoid(bone.shape, centre, radii, knee.spacing, rng) & bone
    knee.tissue[lesion & (knee.tissue == Tissue.MARROW)] = Tissue.EDEMA_MARROW
    return lesion


def _effusion(knee: Knee, rng: np.random.Generator) -> np.ndarray:
    f, s = knee.frame, knee.spacing
    soft = np.isin(knee.tissue, _SOFT) & (knee.structures == 0) & ~knee.collateral
    femoral = knee.mask("femur", "femoral_cartilage")
    size = rng.uniform(2.5, 7.0)
    d_femur = distance_mm(femoral, s, max_mm=size)
    shape = knee.structures.shape
    above_joint = np.arange(shape[1])[None, :, None] <= f["joint"]
    anterior = np.arange(shape[2])[None, None, :] <= f["centre_p"]
    recess_top = f["joint"] - 45.0 / s  # the suprapatellar recess reaches ~4-5 cm above the joint
    high_enough = np.arange(shape[1])[None, :, None] >= recess_top  # j grows downwards
    recess = soft & (d_femur > 0) & (d_femur <= size) & above_joint & anterior & high_enough
    tibial = knee.mask("tibia", "tibial_cartilage")
    joint_space = soft & (d_femur <= 2.5) & dilate(tibial, max(1, round(2.5 / s)))
    mask = recess | joint_space
    knee.tissue[mask] = Tissue.FLUID
    return mask


def _collateral_injury(knee: Knee, rng: np.random.Generator) -> np.ndarray:
    f, s = knee.frame, knee.spacing
    r_index = np.arange(knee.structures.shape[0])[:, None, None]
    side = (r_index < f["centre_r"]) if rng.random() < 0.5 else (r_index >= f["centre_r"])
    lig = knee.collateral & side
    if not lig.any():
        lig = knee.collateral
    d = distance_mm(lig, s, max_mm=6.0)
    soft = np.isin(knee.tissue, _SOFT) & (knee.structures == 0)
    thick = (d <= rng.uniform(1.0, 2.0)) & (soft | lig)
    shell = (d <= rng.uniform(3.0, 6.0)) & soft & ~thick
    knee.tissue[thick] = Tissue.LIGAMENT
    knee.tissue[shell] = Tissue.EDEMA_SOFT
    return thick | shell


_SIMULATORS = {
    "acl_tear": lambda k, r: _ligament_tear(k, "acl", r),
    "pcl_tear": lambda k, r: _ligament_tear(k, "pcl", r),
    "collateral_ligament_injury": _collateral_injury,
    "medial_meniscal_tear": lambda k, r: _meniscal_tear(k, "medial_meniscus", r),
    "lateral_meniscal_tear": lambda k, r: _meniscal_tear(k, "lateral_meniscus", r),
    "cartilage_lesion": _cartilage_lesion,
    "bone_marrow_lesion": _bone_marrow_lesion,
    "joint_effusion": _effusion,
}


def simulate_findings(knee: Knee, rng: np.random.Generator, prevalence: dict[str, float]) -> dict[str, FindingResult]:
    """Draw each eligible finding with its prevalence and simulate the drawn ones.

    Real OAI bone lesions make ``bone_marrow_lesion`` present regardless of the draw.
    Findings are drawn in catalog order from one generator, so a seed fixes them all.
    """
    eligible = eligible_findings(knee)
    results: dict[str, FindingResult] = {}
    for key in FINDING_KEYS:
        draw = rng.random()  # always drawn, so eligibility does not shift later draws
        sub_rng = np.random.default_rng(rng.integers(2**63))
        if not eligible[key]:
            results[key] = FindingResult(None, None)
            continue
        if key == "bone_marrow_lesion" and knee.real_lesion.any():
            results[key] = FindingResult(True, knee.real_lesion.copy(), real=True)
            continue
        if draw < prevalence.get(key, 0.0):
            mask = _SIMULATORS[key](knee, sub_rng)
            results[key] = FindingResult(bool(mask.any()), mask if mask.any() else None)
        else:
            results[key] = FindingResult(False, None)
    return results
