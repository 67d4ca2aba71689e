"""Predictor: a Case in, a Prediction out (structures, finding scores and overlays).

Stages, each reported to ``progress`` and interruptible by ``cancel``:
1. per view: resample to the backbone spacing and normalize; decoder features (features.py);
2. every view's features resampled onto the fusion grid (the reference view at backbone
   spacing) with its coverage;
3. heads: segmentation (coarse on the fusion grid, refined on the reference grid) and findings
   (pooled grid, gated attention);
4. everything expressed on the reference series' grid, plus measurements.

Training (train.py) reuses stages 1-2 through :func:`fusion_inputs`, so the heads learn from
exactly what they will see here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle, BundleError, file_sha256
from .errors import OrthoKneeError
from .progress import CancelToken, ProgressFn, no_progress
from .volumes import Case, normalize_intensity, resample_to_spacing

if TYPE_CHECKING:
    from .labels import Catalog
    from .model.heads import Grid

__all__ = [
    "FusionInputs",
    "fusion_inputs",
    "view_timesteps",
    "Predictor",
    "Prediction",
    "load_heads",
    "run_heads",
    "measure",
    "window_scale_ladder",
]

_log = logging.getLogger(__name__)


def view_timesteps(bundle: Bundle, plane: str) -> list[int]:
    """The bundle's feature timesteps for one view (a list for all views, or per view)."""
    t = bundle.features["timesteps"]
    return list(t[plane] if isinstance(t, dict) else t)


@dataclass
class FusionInputs:
    """What the heads read: per-view features on the fusion grid and the reference image."""

    fusion_grid: "Grid"
    reference_grid: "Grid"
    features: dict[str, np.ndarray]  # plane -> (C, k, j, i) float32
    coverage: dict[str, np.ndarray]  # plane -> (1, k, j, i) in [0, 1]
    image_fusion: np.ndarray  # (1, k, j, i) reference image on the fusion grid, [0, 1]
    image_reference: np.ndarray  # (1, k, j, i) reference image on its own grid, [0, 1]
    timings: dict[str, float] = field(default_factory=dict)
    input_hashes: dict[str, str] = field(default_factory=dict)


def _extract(
    bundle: Bundle, plane: str, view_kji: np.ndarray, device, cancel: CancelToken | None, window_scale: float = 1.0
) -> np.ndarray:
    from .model.features import FeatureExtractor

    config = bundle.view_config(plane)
    unet, scheduler = bundle.load_backbone(plane, device=str(device))
    window = [max(16, int(w * window_scale) // 4 * 4) if n < 2 else w for n, w in enumerate(config.window)]
    extractor = FeatureExtractor(
        unet,
        scheduler,
        timesteps=view_timesteps(bundle, plane),
        budget_per_block=bundle.features["budget_per_block"],
        window_ijk=window,
        overlap=bundle.features["overlap"],
        seed=bundle.features["seed"],
        device=device,
        span_slices=bundle.span_slices,
    )
    try:
        return extractor(view_kji, cancel=cancel)
    finally:
        extractor.close()


# pre-flight: ~1.2 kB of activations per window voxel at fp16 for the demo widths
_BYTES_PER_WINDOW_VOXEL = 1200
_SMALLEST_WINDOW_SCALE = 0.25


def window_scale_ladder(run_at_scale, run_on_cpu, window_voxels: int, free_bytes: int, plane: str, warnings: list[str]):
    """Run ``run_at_scale(scale)`` at the largest window scale the free memory allows, halving the
    scale on out-of-memory down to a quarter, then ``run_on_cpu()``: a reader on a small GPU
    gets a slower result with a warning saying why, never a crash.

    Separate from the CUDA calls so that the ladder itself runs (and is tested) on the CPU.
    Returns (result, ran_on_cpu).
    """
    import torch

    scale = 1.0
    while scale > _SMALLEST_WINDOW_SCALE and window_voxels * scale * scale * _BYTES_PER_WINDOW_VOXEL > 0.8 * free_bytes:
        scale /= 2
    if scale < 1.0:
        warnings.append(f"{plane}: {free_bytes / 2**30:.1f} GiB of GPU memory free; windows scaled by {scale:g}.")
    while scale >= _SMALLEST_WINDOW_SCALE:
        try:
            return run_at_scale(scale), False
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            scale /= 2
            if scale >= _SMALLEST_WINDOW_SCALE:
                warnings.append(f"{plane}: GPU out of memory; retrying with windows scaled by {scale:g}.")
    warnings.append(
        f"{plane}: GPU out of memory even with windows scaled by {_SMALLEST_WINDOW_SCALE:g}; this view ran on the CPU."
    )
    return run_on_cpu(), True


def _window_voxels(bundle: Bundle, plane: str, view_shape_kji: Sequence[int]) -> int:
    """Voxels of one backbone window on this view: the configured window, clipped to the view,
    and over every slice when the bundle's windows span the slices."""
    from .model.features import window_roi

    config = bundle.view_config(plane)
    roi = window_roi(config.window, tuple(view_shape_kji)[::-1], len(config.channels), bundle.span_slices)
    return int(np.prod(roi))


def _extract_with_fallback(bundle: Bundle, plane: str, view_kji: np.ndarray, device, cancel, warnings: list[str]):
    """On CUDA: fp16 windows as large as free memory allows, smaller on out-of-memory, then the CPU."""
    import torch

    if device.type != "cuda":
        return _extract(bundle, plane, view_kji, device, cancel), device

    def on_gpu(scale: float):
        with torch.autocast("cuda", dtype=torch.float16):
            return _extract(bundle, plane, view_kji, device, cancel, window_scale=scale)

    cpu = torch.device("cpu")
    free, _total = torch.cuda.mem_get_info(device)
    features, on_cpu = window_scale_ladder(
        on_gpu,
        lambda: _extract(bundle, plane, view_kji, cpu, cancel),
        _window_voxels(bundle, plane, view_kji.shape),
        free,
        plane,
        warnings,
    )
    return features, (cpu if on_cpu else device)


def fusion_inputs(
    bundle: Bundle,
    case: Case,
    device="cpu",
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    warnings: list[str] | None = None,
    steps: tuple[int, int] = (0, 1),
    use: Sequence[str] | None = None,
) -> FusionInputs:
    """Stages 1-2 for every view of ``case`` the bundle has a backbone for (and, when ``use``
    is given, the heads fuse: a view they ignore is not worth a backbone pass)."""
    import torch

    from .model.features import array_hash
    from .model.heads import grid_of, resample_to_grid

    warnings = warnings if warnings is not None else []
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    planes = [p for p in case.planes if p in bundle.planes and (use is None or p in use)]
    for p in case.planes:
        if p not in bundle.planes:
            warnings.append(f"the bundle has no {p} backbone; the {p} series was not used.")
        elif use is not None and p not in use:
            warnings.append(f"this bundle's heads do not use the {p} view; the {p} series was not used.")
    if not planes:
        needed = ", ".join(use) if use is not None else ", ".join(bundle.planes)
        raise BundleError(
            bundle.path,
            f"its heads need the {needed} series, and this case has only {', '.join(case.planes)}.",
            f"Load the {needed} series of this case.",
        )
    ref_plane = case.reference_plane
    ref_image = case.reference.image
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    reference_norm = sitk.GetArrayFromImage(normalize_intensity(ref_image))[None]
    fusion_image = None
    view_features: dict[str, tuple[np.ndarray, object]] = {}
    hashes = {}
    done, total = steps
    for plane in planes:
        if cancel:
            cancel.raise_if_cancelled()
        progress(done, total, f"features: {plane}")
        t = time.perf_counter()
        config = bundle.view_config(plane)
        resampled = resample_to_spacing(case.views[plane].image, config.spacing)
        normalized = sitk.GetArrayFromImage(normalize_intensity(resampled))
        hashes[plane] = array_hash(sitk.GetArrayViewFromImage(case.views[plane].image))
        if plane == ref_plane:
            fusion_grid = grid_of(resampled)
            fusion_image = normalized[None]
        feats, _device_used = _extract_with_fallback(bundle, plane, normalized * 2.0 - 1.0, dev, cancel, warnings)
        view_features[plane] = (feats, grid_of(resampled))
        timings[f"features_{plane}"] = time.perf_counter() - t
        done += 1
    if ref_plane not in view_features:  # the reference view has no backbone: fuse on its grid anyway
        config = bundle.view_config(planes[0])
        resampled = resample_to_spacing(ref_image, config.spacing)
        fusion_grid = grid_of(resampled)
        fusion_image = sitk.GetArrayFromImage(normalize_intensity(resampled))[None]
    t = time.perf_counter()
    features, coverage = {}, {}
    for plane, (feats, grid) in view_features.items():
        if cancel:
            cancel.raise_if_cancelled()
        values = torch.from_numpy(feats)
        if grid == fusion_grid:
            features[plane], coverage[plane] = feats, np.ones((1, *feats.shape[1:]), np.float32)
        else:
            v, c = resample_to_grid(values, grid, fusion_grid)
            features[plane], coverage[plane] = v.numpy(), c.numpy()
    timings["fusion_resampling"] = time.perf_counter() - t
    timings["preparation_total"] = time.perf_counter() - t0
    return FusionInputs(
        fusion_grid,
        grid_of(ref_image),
        features,
        coverage,
        fusion_image.astype(np.float32),
        reference_norm.astype(np.float32),
        timings,
        hashes,
    )


# ------------------------------------------------------------------------------------ heads


def load_heads(bundle: Bundle, device="cpu"):
    """(kind, module) of the bundle's trained heads; a bundle without heads is a clear error."""
    from .model.heads import HeadsConfig, OrthoKneeHeads, build_baseline

    entry = bundle.metadata.get("heads")
    if not entry:
        raise BundleError(
            bundle.path,
            "has backbones but no trained heads, so it cannot predict.",
            "Train them: `orthoknee finetune --bundle <this bundle> --cases <synth output> --out <new bundle>`.",
        )
    kind = entry.get("kind", "diffusion-heads")
    if kind == "diffusion-heads":
        module = OrthoKneeHeads(HeadsConfig.from_json(entry["config"]))
    elif kind == "supervised-baseline":
        module = build_baseline(len(bundle.catalog.structures) + 1)
    else:
        raise BundleError(
            bundle.path / "metadata.json",
            f"has heads of unknown kind {kind!r}.",
            "Use the OrthoKnee release that made this bundle.",
        )
    bundle.load_into(module, entry["weights"], "heads")
    return kind, module.to(device).eval()


# Overlays are shown where they exceed this (the Slicer module's default, the montage's): a
# finding head's flat low-level map would otherwise cover the whole image.
OVERLAY_DISPLAY_THRESHOLD = 0.5


def views_fused(kind: str, heads) -> tuple[str, ...]:
    """The backbone views a bundle's heads read; none for the baseline, which reads the
    reference image only. A view outside them is not worth a backbone pass or a cache entry."""
    return tuple(heads.segmentation.fusion.planes) if kind == "diffusion-heads" else ()


def _t(array: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(device)


def coarse_logits_of(heads, inputs: FusionInputs, device="cpu"):
    """The segmentation head's coarse logits (C, k, j, i) on the whole fusion grid, from the
    views the heads fuse (call under ``torch.inference_mode`` or ``no_grad``)."""
    planes = [p for p in inputs.features if p in heads.segmentation.fusion.planes]
    feats = {p: _t(inputs.features[p], device) for p in planes}
    cover = {p: _t(inputs.coverage[p], device) for p in planes}
    return heads.segmentation.coarse_logits(feats, cover, _t(inputs.image_fusion, device))[0]


def cell_hosts(heads, coarse_logits, fusion_grid, catalog, device="cpu"):
    """Each finding's host anatomy on the finding head's cells (1, F, k, j, i), from the
    segmentation head's coarse logits (C, k, j, i) on the fusion grid: the same function in
    prediction and in training (:func:`OrthoKneeLib.train` reads it from the starting heads), so
    the attention learns on the hosts it will meet."""
    import torch

    from .gating import finding_hosts
    from .model.heads import pooled, pooled_grid

    pool_kji = tuple(heads.config.finding_pool[::-1])
    cells = pooled(torch.softmax(coarse_logits.float(), dim=0).cpu(), pool_kji).numpy()
    hosts = finding_hosts(cells, pooled_grid(fusion_grid, heads.config.finding_pool), catalog)
    return torch.from_numpy(hosts)[None].to(device)


def run_heads(
    heads, inputs: FusionInputs, device="cpu", cancel: CancelToken | None = None, slab: int = 8, catalog=None
) -> dict:
    """Both heads on whole inputs. Returns reference-grid probabilities (C, k, j, i) float32,
    case-level finding probabilities (F,), overlays on the reference grid (F, k, j, i), and on
    the finding head's pooled cells: per-cell probabilities, overlays and which cells a view saw.
    Heads whose finding attention reads host anatomy (``finding_hosts``) need the ``catalog``."""
    import torch

    if heads.config.finding_hosts and catalog is None:
        raise ValueError("these heads read each finding's host anatomy: run_heads needs the bundle's catalog")

    from .model.heads import FindingHead, pooled, pooled_grid, resample_to_grid

    planes = [p for p in inputs.features if p in heads.segmentation.fusion.planes]
    with torch.inference_mode():
        coarse = coarse_logits_of(heads, inputs, device)
        if cancel:
            cancel.raise_if_cancelled()
        coarse_ref, _ = resample_to_grid(coarse.float().cpu(), inputs.fusion_grid, inputs.reference_grid)
        image_ref = torch.from_numpy(inputs.image_reference)
        probs = torch.empty_like(coarse_ref)
        for k0 in range(0, coarse_ref.shape[1], slab):  # in-plane kernels: slabs are exact
            part = coarse_ref[None, :, k0 : k0 + slab].to(device)
            logits = heads.segmentation.refined_logits(part, image_ref[None, :, k0 : k0 + slab].to(device))
            probs[:, k0 : k0 + slab] = torch.softmax(logits.float(), dim=1)[0].cpu()
        if cancel:
            cancel.raise_if_cancelled()
        pool_kji = tuple(heads.config.finding_pool[::-1])
        pf = {p: pooled(inputs.features[p], pool_kji)[None].to(device) for p in planes}
        pc = {p: pooled(inputs.coverage[p], pool_kji)[None].to(device) for p in planes}
        inside = FindingHead.seen_cells(pc)
        hosts = cell_hosts(heads, coarse, inputs.fusion_grid, catalog, device) if heads.config.finding_hosts else None
        case_logits, cell_logits, attention = heads.findings(
            pf, pc, pooled(inputs.image_fusion, pool_kji)[None].to(device), inside, hosts
        )
        overlay_cells = heads.findings.map_cells(cell_logits, attention, hosts)[0].float().cpu()
        grid = pooled_grid(inputs.fusion_grid, heads.config.finding_pool)
        overlays, _ = resample_to_grid(overlay_cells, grid, inputs.reference_grid)
    return {
        "probabilities": probs.numpy(),
        "finding_probabilities": torch.sigmoid(case_logits[0].float()).cpu().numpy(),
        "overlays": overlays.clamp(0, 1).numpy(),
        # the same maps on the heads' own cells, for scoring them against lesion masks
        "cell_probabilities": torch.sigmoid(cell_logits[0].float()).cpu().numpy(),
        "overlay_cells": overlay_cells.numpy(),
        "cells_inside": (inside[0, 0] > 0.5).cpu().numpy(),
        # each finding's host anatomy on the cells (heads with finding_hosts), else None
        "cell_hosts": None if hosts is None else hosts[0].float().cpu().numpy(),
    }


def run_baseline(net, image_reference: np.ndarray, device="cpu") -> np.ndarray:
    """The supervised baseline's probabilities (C, k, j, i) on the reference grid."""
    import torch
    from monai.inferers import sliding_window_inference

    from .model.heads import BASELINE_PATCH_KJI

    x = _t(image_reference, device)
    with torch.inference_mode():  # windows the size it trained on (smaller inputs are padded)
        logits = sliding_window_inference(
            x, BASELINE_PATCH_KJI, 4, net, overlap=0.25, mode="gaussian", padding_mode="replicate"
        )
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


def run_on_cached(kind: str, model, case, device="cpu", cancel: CancelToken | None = None, catalog=None) -> dict:
    """A model's output on a cached case (train.CachedCase): the heads' whole result, or the
    baseline's probabilities under the same key, so that scoring and the benches read both
    kinds of model one way."""
    if kind == "supervised-baseline":
        return {
            "probabilities": run_baseline(model, np.asarray(case.array("image_reference"), np.float32), device=device)
        }
    return run_heads(model, case.fusion_inputs(), device=device, cancel=cancel, catalog=catalog)


# ------------------------------------------------------------------------------- prediction

CARTILAGE_PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")


def measure(labelmap: sitk.Image, catalog) -> dict:
    """What a reader measures: each structure's volume (mL) and each cartilage plate's mean
    thickness (mm), estimated as 2 x volume / surface area (a thin plate has two faces)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOn()
    stats.Execute(labelmap)
    present = set(stats.GetLabels())
    volumes, thickness = {}, {}
    for s in catalog.structures:
        if s.label not in present:
            volumes[s.key] = 0.0
            continue
        volume_mm3 = stats.GetPhysicalSize(s.label)
        volumes[s.key] = round(volume_mm3 / 1000.0, 3)
        if s.key in CARTILAGE_PLATES:
            area = stats.GetPerimeter(s.label)
            thickness[s.key] = round(2.0 * volume_mm3 / area, 3) if area > 0 else None
    return {"volume_ml": volumes, "mean_thickness_mm": thickness}


@dataclass
class Prediction:
    """Everything a front end shows, in the reference series' geometry. Renders never recompute it."""

    case_name: str
    reference_plane: str
    reference_grid: "Grid"
    labelmap: np.ndarray  # (k, j, i) uint8 structure labels
    probabilities: np.ndarray  # (1 + structures, k, j, i) float16, softmax
    finding_probabilities: dict[str, float]
    overlays: dict[str, np.ndarray]  # finding key -> (k, j, i) float32 in [0, 1]
    catalog: "Catalog"
    measurements: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bundle: dict = field(default_factory=dict)
    input_hashes: dict[str, str] = field(default_factory=dict)
    views: list[str] = field(default_factory=list)
    device: str = "cpu"
    # {"side": "left" | "right" | None, "from": how it was told, "dicom_laterality": what the headers say}
    knee_side: dict = field(default_factory=dict)
    # {"plausible": bool, "knee_found": bool, "checks": [{"check", "ok", "detail"}]} (plausibility.py)
    plausibility: dict = field(default_factory=dict)
    # finding key -> {"structure", "where", "peak_lps_mm", "map_ml"} (localize.py)
    finding_locations: dict = field(default_factory=dict)
    input_paths: dict[str, str] = field(default_factory=dict)  # view -> the series' file or folder
    work_grid: "Grid | None" = None  # where probabilities and overlays are, when not the reference grid
    # the finding head's own case probabilities, when the reported ones come from the gated maps
    head_probabilities: dict[str, float] = field(default_factory=dict)

    def labelmap_image(self) -> sitk.Image:
        return self.reference_grid.image(self.labelmap.astype(np.uint8))

    @property
    def map_grid(self) -> "Grid":
        """The grid of ``probabilities`` and ``overlays``: the working grid of a fine series, else the reference."""
        return self.work_grid or self.reference_grid

    def probability_image(self, structure_key: str) -> sitk.Image:
        """A structure's probability on the grid it was computed on (``map_grid``)."""
        label = self.catalog.structure(structure_key).label
        return self.map_grid.image(self.probabilities[label].astype(np.float32))

    def lift_to(self, reference_image: sitk.Image) -> None:
        """Put the labelmap on ``reference_image``'s grid (nearest neighbour); the maps stay where they are."""
        from .model.heads import grid_of

        work_labels = self.labelmap_image()
        lifted = sitk.Resample(
            work_labels, reference_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
        )
        self.work_grid = self.reference_grid
        self.reference_grid = grid_of(reference_image)
        self.labelmap = sitk.GetArrayFromImage(lifted)

    def overlay_image(self, finding_key: str, decimals: int | None = None) -> sitk.Image:
        """The finding's overlay on the grid it was computed on (``map_grid``; the overlay is a
        map of coarse cells, nothing is gained on a finer grid), optionally rounded to ``decimals``."""
        overlay = self.overlays[finding_key]
        if decimals is not None:
            overlay = np.round(overlay, decimals)
        return self.map_grid.image(overlay.astype(np.float32))

    def top_finding(self) -> str | None:
        if not self.finding_probabilities:
            return None
        return max(self.finding_probabilities, key=self.finding_probabilities.get)

    def summary(self) -> dict:
        return {
            "case": self.case_name,
            "reference_view": self.reference_plane,
            "views": self.views,
            "findings": {
                k: {
                    "name": self.catalog.finding(k).name,
                    "probability": round(float(v), 4),
                    **(
                        {"head_probability": round(float(self.head_probabilities[k]), 4)}
                        if k in self.head_probabilities
                        else {}
                    ),
                    **self.finding_locations.get(k, {}),
                }
                for k, v in self.finding_probabilities.items()
            },
            "measurements": self.measurements,
            "knee_side": self.knee_side,
            "plausibility": self.plausibility,
            "bundle": self.bundle,
            "input_sha256": self.input_hashes,
            "inputs": self.input_paths,
            "catalog": self.catalog.to_json(),
            "device": self.device,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            # a fine series is predicted on a coarser working grid; the overlays are written on it
            "working_spacing_mm": [round(s, 4) for s in self.work_grid.spacing] if self.work_grid else None,
            "warnings": self.warnings,
            "not_for_clinical_use": True,
        }

    def save(
        self,
        folder: str | os.PathLike,
        cancel: CancelToken | None = None,
        extra: dict[str, Callable[[Path], Path]] | None = None,
    ) -> dict[str, Path]:
        """Write structures.seg.nrrd, overlays/<finding>.nrrd, findings.json and any ``extra``
        files (file name -> writer given the path to write to; listed by stem) into ``folder``, as one unit.

        The folder is locked against a second writer; every file is staged and the files are
        moved into place together (outfolder.py), so an interrupted or failed save leaves the
        earlier result whole. A structures.seg.nrrd that differs from what the last save wrote
        (the user edited it) is never replaced: the new one gets the next free name and a warning.
        """
        from .io import write_image_atomic, write_json_atomic
        from .outfolder import locked_folder, staged_files
        from .segfile import catalog_segments, write_seg_nrrd

        bad = [k for k, p in self.finding_probabilities.items() if not np.isfinite(p)]
        if bad:
            raise OrthoKneeError(
                f"{self.case_name}: the model gave no number for {', '.join(bad)} (NaN); nothing "
                "was written. Check the input series; report this with the bundle version."
            )
        with locked_folder(folder) as folder, staged_files(folder) as stage:
            written: dict[str, Path] = {}
            seg_path = _free_segmentation_path(folder, self.warnings)
            write_seg_nrrd(self.labelmap_image(), catalog_segments(self.catalog), stage.path(seg_path.name))
            written["structures"] = seg_path
            for key in self.overlays:
                if cancel:
                    cancel.raise_if_cancelled()
                # rounded to 1e-3 (invisible on a probability map): gzip then packs the smooth map
                # 5x smaller and 4x faster than the full float noise of its low bits
                target = Path("overlays") / f"{key}.nrrd"
                write_image_atomic(self.overlay_image(key, decimals=3), stage.path(target))
                written[f"overlay:{key}"] = folder / target
            for name, writer in (extra or {}).items():
                if cancel:
                    cancel.raise_if_cancelled()
                writer(stage.path(name))
                written[Path(name).stem] = folder / name
            summary = self.summary()
            summary["files"] = {k: str(p.relative_to(folder)) for k, p in written.items()}
            summary["structures_sha256"] = file_sha256(stage.folder / seg_path.name)
            write_json_atomic(summary, stage.path("findings.json"))
            written["findings"] = folder / "findings.json"
        return written


def _half(array: np.ndarray) -> np.ndarray:
    """float16 copy through torch (vectorised; numpy's own conversion took 4 s for 12 native-size maps)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).half().numpy()


def _has_menisci(labelmap: np.ndarray, catalog) -> bool:
    keys = [k for k in ("medial_meniscus", "lateral_meniscus") if k in catalog.structure_keys]
    return any((labelmap == catalog.structure(k).label).any() for k in keys)


def _free_segmentation_path(folder: Path, warnings: list[str]) -> Path:
    """structures.seg.nrrd unless that file was edited since OrthoKnee wrote it."""
    import json

    target = folder / "structures.seg.nrrd"
    if not target.exists():
        return target
    recorded = None
    summary = folder / "findings.json"
    if summary.is_file():
        try:
            recorded = json.loads(summary.read_text()).get("structures_sha256")
        except ValueError:
            recorded = None
    if recorded and recorded == file_sha256(target):
        return target  # our own earlier output, untouched: safe to refresh
    n = 2
    while (folder / f"structures-{n}.seg.nrrd").exists():
        n += 1
    new = folder / f"structures-{n}.seg.nrrd"
    warnings.append(
        f"{target} was edited after OrthoKnee wrote it (or is not OrthoKnee's); it was kept and "
        f"this result was written to {new.name}."
    )
    return new


class Predictor:
    """``Predictor(bundle, device="auto").predict(case, progress=cb, cancel=token) -> Prediction``.

    Loads and checks the bundle once; each ``predict`` call is independent (thread-safe to
    call from a worker thread; the front end keeps the CancelToken).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike | None = None,
        device: str = "auto",
        postprocess: bool = True,
        gate: bool | None = None,
        score_from_map: bool | None = None,
    ) -> None:
        """``postprocess``: femur, tibia and patella each in one piece and the menisci medial and lateral by the
        fibula's side (postprocess.py); False keeps the raw argmax. ``gate``: each finding's map confined to
        its anatomy (gating.py; None: the bundle's ``features.gate_findings``, default on).
        ``score_from_map``: the case probability is the level the gated map reaches over 0.05 mL instead of
        the finding head's own (None: the bundle's ``features.finding_score == "gated_map"``, default off:
        on held-out renders it separated the findings less well, docs/experiments.md)."""
        from .model.device import select_device
        from .resources import demo_bundle_dir

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle or demo_bundle_dir())
        self.device = select_device(device)
        self.kind, self.heads = load_heads(self.bundle, device=self.device)
        self.postprocess = postprocess
        self.gate = bool(self.bundle.features.get("gate_findings", True) if gate is None else gate)
        from_bundle = self.bundle.features.get("finding_score", "head") == "gated_map"
        self.score_from_map = self.gate and bool(from_bundle if score_from_map is None else score_from_map)

    def predict(self, case: Case, progress: ProgressFn = no_progress, cancel: CancelToken | None = None) -> Prediction:
        """Predict on a working copy of ``case`` whose reference series is at most as fine as
        WORKING_INPLANE_MM in plane (the heads resolve no finer), then lift the labelmap onto the
        reference series' own grid (nearest neighbour). Probabilities and overlays stay on the
        working grid (``Prediction.work_grid``): a native 512 x 512 series never holds 19 float
        maps at full size."""
        from .model.features import array_hash

        t0 = time.perf_counter()
        native = case.reference
        work_case = working_case(case)
        prediction = self._predict(work_case, progress, cancel, t0)
        if work_case is not case:
            prediction.lift_to(native.image)
            prediction.input_hashes[case.reference_plane] = array_hash(sitk.GetArrayViewFromImage(native.image))
        prediction.case_name = case.name
        prediction.input_paths = {p: str(Path(v.path).resolve()) for p, v in case.views.items()}
        prediction.timings["total"] = time.perf_counter() - t0
        return prediction

    def _predict(self, case: Case, progress: ProgressFn, cancel: CancelToken | None, t0: float) -> Prediction:
        from .postprocess import finish_prediction

        warnings = list(case.warnings)
        used = views_fused(self.kind, self.heads)
        for p in used:
            if p not in case.views:
                warnings.append(
                    f"no {p} series: the result uses {', '.join(case.planes)} only and may be less accurate."
                )
        catalog = self.bundle.catalog
        n_steps = len([p for p in case.planes if p in used]) + 3
        probs, findings, overlays, timings, hashes, ref_grid, views_used = self._run_model(
            case, used, n_steps, progress, cancel, warnings
        )
        if cancel:
            cancel.raise_if_cancelled()
        progress(n_steps - 1, n_steps, "measurements")
        probs, labelmap, side = finish_prediction(probs, ref_grid, catalog, self.postprocess, tagged=case.laterality)
        head_probabilities = dict(findings)
        if self.gate and overlays:  # findings' maps on their anatomy (gating.py)
            from .gating import TOP_ML, case_score_from_map, gate_maps

            overlays = gate_maps(overlays, probs, ref_grid, catalog)
            if self.score_from_map:
                findings = {k: case_score_from_map(overlays[k], ref_grid) for k in findings}
            for key, p in findings.items():  # a score without a place on its anatomy is said to be one
                level = case_score_from_map(overlays[key], ref_grid)
                if p >= 0.5 and level < OVERLAY_DISPLAY_THRESHOLD:
                    warnings.append(
                        f"{catalog.finding(key).name} has probability {p:.2f} but its map shows less than "
                        f"{TOP_ML:g} mL on its anatomy at the {OVERLAY_DISPLAY_THRESHOLD:g} threshold: a score "
                        "without a place; check the images."
                    )
        if side is not None and side.warning:
            warnings.append(side.warning)
        elif side is not None and side.side is None and _has_menisci(labelmap, catalog):
            warnings.append(f"medial and lateral menisci are as the heads labelled them, unchecked: {side.reason}.")
        prediction = Prediction(
            case_name=case.name,
            reference_plane=case.reference_plane,
            reference_grid=ref_grid,
            labelmap=labelmap,
            probabilities=_half(probs),
            finding_probabilities=findings,
            overlays=overlays,
            catalog=catalog,
            warnings=warnings,
            input_hashes=hashes,
            views=views_used,
            device=str(self.device),
            bundle={
                "name": self.bundle.metadata.get("name"),
                "version": self.bundle.metadata.get("version"),
                "hash": self.bundle.hash,  # the backbones and feature settings
                "heads_sha256": (self.bundle.metadata.get("heads") or {}).get("sha256"),
                "heads": self.kind,
                "path": str(self.bundle.path),
            },
        )
        prediction.head_probabilities = head_probabilities if self.score_from_map and overlays else {}
        if side is not None:
            prediction.knee_side = {"side": side.side, "from": side.reason, "dicom_laterality": case.laterality}
        prediction.measurements = measure(prediction.labelmap_image(), catalog)
        if {"femur", "tibia"} <= set(catalog.structure_keys):  # a knee catalog: is this reading a knee's?
            from .plausibility import check_reading, summarize, warnings_for

            prediction.plausibility = summarize(
                check_reading(prediction.labelmap_image(), prediction.measurements["volume_ml"], catalog)
            )
            prediction.warnings.extend(warnings_for(prediction.plausibility))
            if not prediction.plausibility["knee_found"] and prediction.knee_side:
                # no knee, no side: a side read off a "fibula" in a non-knee image would be one more false answer
                prediction.knee_side = dict(prediction.knee_side, side=None, **{"from": "no knee found"})
        from .localize import locate_findings

        prediction.finding_locations = locate_findings(prediction)
        prediction.timings = dict(timings, total=time.perf_counter() - t0)
        progress(n_steps, n_steps, "done")
        return prediction

    def _run_model(self, case: Case, used, n_steps: int, progress: ProgressFn, cancel, warnings: list):
        """The network part: (probabilities, finding probabilities, overlays, timings, input hashes,
        the grid of it all, the views used), from the baseline or from the backbones and heads."""
        import torch

        from .model.features import array_hash
        from .model.heads import grid_of

        catalog = self.bundle.catalog
        if self.kind == "supervised-baseline":
            image = sitk.GetArrayFromImage(normalize_intensity(case.reference.image))[None]
            probs = run_baseline(self.heads, image, device=self.device)
            hashes = {p: array_hash(sitk.GetArrayViewFromImage(v.image)) for p, v in case.views.items()}
            return probs, {}, {}, {}, hashes, grid_of(case.reference.image), [case.reference_plane]
        inputs = fusion_inputs(
            self.bundle,
            case,
            device=self.device,
            progress=progress,
            cancel=cancel,
            warnings=warnings,
            steps=(0, n_steps),
            use=used,
        )
        progress(n_steps - 2, n_steps, "heads")
        t = time.perf_counter()
        try:
            out = run_heads(self.heads, inputs, device=self.device, cancel=cancel, catalog=catalog)
        except torch.OutOfMemoryError:
            warnings.append("GPU out of memory in the heads; they ran on the CPU.")
            out = run_heads(self.heads.to("cpu"), inputs, device="cpu", cancel=cancel, catalog=catalog)
            self.heads.to(self.device)
        timings = dict(inputs.timings, heads=time.perf_counter() - t)
        findings = {f.key: float(p) for f, p in zip(catalog.findings, out["finding_probabilities"])}
        overlays = {f.key: out["overlays"][n] for n, f in enumerate(catalog.findings)}
        return (
            out["probabilities"],
            findings,
            overlays,
            timings,
            inputs.input_hashes,
            inputs.reference_grid,
            list(inputs.features),
        )


# The heads' finest useful in-plane spacing: they were trained on series of 0.6-1 mm pixels, and the
# finding maps come from 3 x 3 x 1 cells of 1 mm features. A finer reference series is predicted on a
# copy resampled to this spacing and its labelmap lifted back onto the series' own grid.
WORKING_INPLANE_MM = 0.625


def working_case(case: Case, inplane_mm: float = WORKING_INPLANE_MM) -> Case:
    """``case`` itself, or a copy whose reference series is resampled to ``inplane_mm`` in plane
    (its slice spacing kept) when it is finer than that."""
    from .volumes import Volume, slice_axis

    ref = case.reference
    spacing = list(ref.image.GetSpacing())
    through = slice_axis(spacing)
    if all(spacing[a] >= inplane_mm * 0.95 for a in range(3) if a != through):
        return case
    target = [s if a == through else max(s, inplane_mm) for a, s in enumerate(spacing)]
    coarse = Volume(resample_to_spacing(ref.image, target), ref.source)
    coarse._checked = True  # the same voxels, smoothed: the checks the series passed still hold
    views = dict(case.views, **{case.reference_plane: coarse})
    work = Case(**views, name=case.name)
    work.warnings = list(case.warnings)
    return work
