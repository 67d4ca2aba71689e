"""Cases as training and evaluation read them: labelled case folders, and their backbone
features computed once and cached.

Both fine-tuning (train.py) and evaluation (evaluate.py) read cases through here, so neither
imports the other for it. Features are computed by the Predictor's own feature stage
(predict.fusion_inputs) and cached per (bundle backbone, case); training then reads random
patches and whole pooled cases from memory-mapped files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle
from .errors import InputError
from .featurecache import CACHE_LAYOUT, cache_key, ensure_free_space, load_cached_array, save_features, save_npy
from .io import write_json_atomic
from .labels import Catalog
from .progress import CancelToken

__all__ = ["find_cases", "cache_case", "CachedCase"]


# ------------------------------------------------------------------------------------ cases


def find_cases(folders: Sequence[str | os.PathLike], split: str | None = None) -> list[Path]:
    """Case folders under `orthoknee synth` outputs (or case folders themselves), optionally one split."""
    out: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if (folder / "case.json").is_file():
            candidates = [folder]
        elif (folder / "cases").is_dir():
            candidates = sorted(p for p in (folder / "cases").iterdir() if (p / "case.json").is_file())
        else:
            raise InputError(
                folder,
                "holds no training cases (no case.json, no cases/ folder).",
                "Give the output folder of `orthoknee synth` or of the Slicer module's export.",
            )
        for c in candidates:
            if split in (None, "all") or json.loads((c / "case.json").read_text()).get("split") == split:
                out.append(c)
    return out


def cache_case(
    bundle: Bundle,
    case_folder: str | os.PathLike,
    cache_root: str | os.PathLike,
    pool_kji: Sequence[int] = (1, 3, 3),
    device="cpu",
    cancel: CancelToken | None = None,
    views: Sequence[str] | None = None,
) -> Path:
    """Compute (or find) the cached head inputs of one training case; returns its cache folder.

    ``views`` limits the backbone passes to the views the heads fuse: each view costs a
    backbone pass and ~60-120 MB of cache per case, wasted when the heads ignore it. Empty
    ``views`` (the supervised baseline, which reads only the reference image and labels that
    every entry holds) takes any entry the case already has, else the cheapest: the reference
    view's alone.
    """
    from .model.heads import pooled, pooled_grid
    from .predict import fusion_inputs
    from .synth.dataset import read_case
    from .volumes import resample_like

    case_folder = Path(case_folder)
    if views is not None and not views:
        for candidate in (None, *((p,) for p in bundle.planes)):
            found = Path(cache_root) / f"{case_folder.name}-{cache_key(bundle.hash, case_folder, candidate)}"
            if (found / "meta.json").is_file():
                return found
        views = (read_case(case_folder).case.reference_plane,)
    if views is not None and set(bundle.planes) <= set(views):
        views = None  # every view: the same entry as when none are named
    if views is not None:  # an entry with every view serves any subset of them
        every = Path(cache_root) / f"{case_folder.name}-{cache_key(bundle.hash, case_folder, None)}"
        if (every / "meta.json").is_file():
            return every
    out = Path(cache_root) / f"{case_folder.name}-{cache_key(bundle.hash, case_folder, views)}"
    if (out / "meta.json").is_file():
        return out
    sc = read_case(case_folder)
    warnings: list[str] = []
    fi = fusion_inputs(bundle, sc.case, device=device, cancel=cancel, warnings=warnings, use=views)
    ref_plane = sc.case.reference_plane
    arrays = [fi.image_reference, fi.image_fusion, *fi.coverage.values()]
    needed = int(
        1.15
        * (
            2 * sum(a.size for a in arrays)  # float16, plus pooled copies, labels, masks
            + sum(f.size for f in fi.features.values())
        )
    )  # 8-bit features
    ensure_free_space(out.parent, needed, f"the feature cache entry of {case_folder.name}")
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str, array: np.ndarray, dtype=np.float16) -> None:
        save_npy(out / f"{name}.npy", np.ascontiguousarray(array, dtype=dtype))

    fusion_ref = fi.fusion_grid.image()
    labels_ref = sc.labels[ref_plane]
    labels_ref_array = sitk.GetArrayFromImage(labels_ref)
    save("labels_reference", labels_ref_array, np.uint8)
    save("labels_fusion", sitk.GetArrayFromImage(resample_like(labels_ref, fusion_ref, kind="label")), np.uint8)
    save("image_reference", fi.image_reference)
    save("image_fusion", fi.image_fusion)
    for plane in fi.features:
        save_features(out, f"features_{plane}", fi.features[plane])
        save(f"coverage_{plane}", fi.coverage[plane])
        save(f"pooled_features_{plane}", pooled(fi.features[plane], pool_kji).numpy())
        save(f"pooled_coverage_{plane}", pooled(fi.coverage[plane], pool_kji).numpy())
    save("pooled_image", pooled(fi.image_fusion, pool_kji).numpy())
    findings = sc.findings
    masks = []
    for key in bundle.catalog.finding_keys:
        mask = sc.finding_mask(key)
        if mask is None:
            masks.append(np.zeros(fi.image_fusion.shape[1:], np.float32))
        else:
            m = resample_like(sitk.Cast(mask > 0, sitk.sitkFloat32), fusion_ref, kind="linear")
            masks.append(sitk.GetArrayFromImage(m))
    save("pooled_finding_masks", pooled(np.stack(masks), pool_kji).numpy())
    meta = {
        "layout": CACHE_LAYOUT,
        "case_id": sc.meta["case_id"],
        "case_folder": str(case_folder),
        "subject": sc.meta.get("subject"),
        "split": sc.meta.get("split"),
        "source": sc.meta.get("source"),
        "contrast": (sc.meta.get("contrast") or {}).get("contrast"),
        "planes": list(fi.features),
        "reference_plane": ref_plane,
        "annotated": list(sc.annotated),
        "extra_labels": dict(sc.meta.get("extra_labels") or {}),  # label value -> name, labels the catalog lacks
        # finding name -> 1 / 0 / None: yes / no answers an annotator recorded for findings the catalog lacks
        "extra_findings": dict(sc.meta.get("extra_findings") or {}),
        "label_values": [int(v) for v in np.unique(labels_ref_array)],  # checked against a bundle's catalog
        "findings": findings,
        "fusion_grid": fi.fusion_grid.to_json(),
        "reference_grid": fi.reference_grid.to_json(),
        "pooled_grid": pooled_grid(fi.fusion_grid, pool_kji[::-1]).to_json(),
        "pool_kji": list(pool_kji),
        "timings": fi.timings,
        "warnings": warnings,
        "bundle_hash": bundle.hash,
        "input_sha256": dict(fi.input_hashes),  # which images these features are of (a bundle's lineage cites them)
    }
    write_json_atomic(meta, out / "meta.json")  # last: its presence marks a complete entry
    return out


class CachedCase:
    """One cached training case: arrays memory-mapped, pooled finding inputs in memory."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from .model.heads import Grid

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.planes: list[str] = self.meta["planes"]
        self.fusion_grid = Grid(**{k: tuple(v) for k, v in self.meta["fusion_grid"].items()})
        self.reference_grid = Grid(**{k: tuple(v) for k, v in self.meta["reference_grid"].items()})
        self.pooled_grid = Grid(**{k: tuple(v) for k, v in self.meta["pooled_grid"].items()})
        self.pooled_features = {p: self.array(f"pooled_features_{p}", mmap=False) for p in self.planes}
        self.pooled_coverage = {p: self.array(f"pooled_coverage_{p}", mmap=False) for p in self.planes}
        self.pooled_image = self.array("pooled_image", mmap=False)
        self.pooled_masks = self.array("pooled_finding_masks", mmap=False)

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        """A cached array, memory-mapped unless ``mmap`` is False (8-bit features: a
        featurecache.QuantizedArray, which reads back float32 slices)."""
        return load_cached_array(self.folder / f"{name}.npy", mmap)

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @property
    def contrast(self) -> str | None:
        """The synthetic render's contrast ("dess", "t2", ...); None for a real case.

        Scores differ by contrast far more than by subject, so evaluation reports them per
        contrast. Entries cached before the field existed read it from the case folder.
        """
        if "contrast" in self.meta:
            return self.meta["contrast"]
        return (self._from_case("contrast") or {}).get("contrast")

    def _from_case(self, key: str):
        """``key`` of the case folder's case.json (None if absent): for entries cached before their
        meta recorded it."""
        folder = self.meta.get("case_folder")
        case_json = Path(folder) / "case.json" if folder else None
        if case_json is None or not case_json.is_file():
            return None
        return json.loads(case_json.read_text()).get(key)

    @property
    def extra_labels(self) -> dict[int, str]:
        """Label values of this case that the catalog does not know -> their names (an annotator's
        new labels), from the cache entry or, for entries made before it recorded them, the case."""
        extra = self.meta.get("extra_labels")
        if extra is None:
            extra = self._from_case("extra_labels") or {}
        return {int(v): str(name) for v, name in extra.items()}

    @property
    def label_values(self) -> list[int]:
        """The label values the case's labelmap holds (0 included); entries cached before the
        meta recorded them read the fusion-grid labels."""
        if "label_values" in self.meta:
            return [int(v) for v in self.meta["label_values"]]
        return [int(v) for v in np.unique(self.array("labels_fusion"))]

    def unknown_labels(self, catalog: Catalog) -> tuple[list[int], list[str]]:
        """What of this case ``catalog`` cannot train on: (label values neither the catalog's nor
        named by the case, names of added labels the catalog lacks)."""
        known = {s.label for s in catalog.structures} | set(self.extra_labels)
        unnamed = [v for v in self.label_values if v and v not in known]
        names = {s.name.lower() for s in catalog.structures}
        missing = [n for n in self.extra_labels.values() if n.lower() not in names]
        return unnamed, missing

    def annotated_mask(self, catalog: Catalog) -> np.ndarray:
        """(n_classes,) bool: background and the structures this case annotates (its new labels too)."""
        keys = set(self.meta["annotated"])
        names = {n.lower() for n in self.extra_labels.values()}
        return np.array([True] + [s.key in keys or s.name.lower() in names for s in catalog.structures])

    def label_lut(self, catalog: Catalog) -> np.ndarray:
        """(256,) label value in this case -> class of ``catalog``: the catalog's own labels as they are, an
        annotator's label to the catalog structure of its name, anything else to background."""
        lut = np.zeros(256, np.int64)
        for s in catalog.structures:
            if s.label < 256 and s.label not in self.extra_labels:
                lut[s.label] = s.label
        by_name = {s.name.lower(): s.label for s in catalog.structures}
        for value, name in self.extra_labels.items():
            if 0 <= value < 256:
                lut[value] = by_name.get(name.lower(), 0)
        return lut

    @property
    def extra_findings(self) -> dict[str, int | None]:
        """Findings the catalog lacks that an annotator answered for this case: name -> 1 / 0 / None."""
        extra = self.meta.get("extra_findings")
        if extra is None:
            extra = self._from_case("extra_findings") or {}
        return {str(name): (None if v is None else int(v)) for name, v in extra.items()}

    def finding_targets(self, catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
        """(values, known) per finding of ``catalog``; unknown (null) findings are ignored by losses and
        AUC. A finding the case's own catalog lacked is read from its extra findings, by name."""
        f = dict(self.meta["findings"])
        extra = {name.lower(): v for name, v in self.extra_findings.items()}
        for finding in catalog.findings:
            if finding.key not in f and finding.name.lower() in extra:
                f[finding.key] = extra[finding.name.lower()]
        values = np.array([float(f.get(k) or 0) for k in catalog.finding_keys], np.float32)
        known = np.array([f.get(k) is not None for k in catalog.finding_keys])
        return values, known

    def finding_masks(self, catalog: Catalog) -> np.ndarray:
        """(findings, cells) lesion masks in ``catalog``'s order: the cached ones, and none (zeros) for
        findings added after the case was cached (an annotator's yes / no carries no region)."""
        masks = self.pooled_masks
        n = len(catalog.findings)
        if masks.shape[0] >= n:
            return masks[:n]
        return np.concatenate([masks, np.zeros((n - masks.shape[0], *masks.shape[1:]), masks.dtype)])

    def fusion_inputs(self):
        """The same object the Predictor builds, read back from the cache."""
        from .predict import FusionInputs

        return FusionInputs(
            self.fusion_grid,
            self.reference_grid,
            {p: np.asarray(self.array(f"features_{p}"), np.float32) for p in self.planes},
            {p: np.asarray(self.array(f"coverage_{p}"), np.float32) for p in self.planes},
            np.asarray(self.array("image_fusion"), np.float32),
            np.asarray(self.array("image_reference"), np.float32),
        )


def _axis_map(fusion, reference) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (scale, offset) with fusion_index = scale * reference_index + offset (i, j, k).

    The fusion grid is the reference series resampled to the backbone spacing, so both share
    their direction and the map is axis-aligned.
    """
    d = np.asarray(fusion.direction).reshape(3, 3)
    if not np.allclose(d, np.asarray(reference.direction).reshape(3, 3), atol=1e-4):
        raise ValueError("fusion and reference grids must share their direction")
    scale = np.asarray(reference.spacing) / np.asarray(fusion.spacing)
    offset = (d.T @ (np.asarray(reference.origin) - np.asarray(fusion.origin))) / np.asarray(fusion.spacing)
    return scale, offset
