"""Evaluating a bundle on labelled cases: Dice and HD95 per structure, AUC per finding.

Two more AUCs per finding say whether the finding maps point at the lesion: ``cell_auc`` (the
head's per-cell probability) and ``overlay_auc`` (the overlay a reader sees: probability times
relative attention), over the 3-mm cells of every case that knows the finding, lesion cells
(from the simulated lesion masks) against all others.

Scores are computed on the reference series' own grid (where a reader sees the result),
only for the structures a case annotates and the findings whose presence it knows. The
heads run on the same cached inputs the Predictor would compute (cachedcase.cache_case uses the
Predictor's feature stage), so these numbers are the Predictor's numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .labels import Catalog
from .progress import CancelToken, ProgressFn, no_progress

__all__ = [
    "dice",
    "hd95",
    "roc_auc",
    "auc_interval",
    "calibration",
    "evaluate_cached",
    "evaluate_bundle",
    "dice_by_contrast",
    "format_table",
]


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (nothing to score)."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = mask.copy()
    for axis in range(3):
        for shift in (1, -1):
            eroded &= np.roll(mask, shift, axis=axis)
    return mask & ~eroded


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_ijk: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's convention: the larger of the
    two directed 95th percentiles). None when either mask is empty."""
    if not pred.any() or not truth.any():
        return None
    both = pred | truth
    idx = np.argwhere(both)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = idx.max(0) + 3
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = np.pad(pred[box], 1), np.pad(truth[box], 1)
    distances = []
    for a, b in ((p, t), (t, p)):
        image = sitk.GetImageFromArray(b.astype(np.uint8))
        image.SetSpacing(tuple(float(s) for s in spacing_ijk))
        dist = sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
        )
        distances.append(np.percentile(np.abs(dist[_surface(a)]), 95))
    return float(max(distances))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes.

    By ranks (Mann-Whitney), so millions of lesion-map cells cost a sort, not a pairwise table.
    """
    s, y = np.asarray(scores, float).ravel(), np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based; tied values share their mean rank
    rank_sum = float(average_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auc_interval(
    scores: Sequence[float], labels: Sequence[int], resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % bootstrap interval of the AUC over cases (percentile; resamples lacking a class are
    redrawn as skipped). None when too few cases of either class (fewer than 2) to resample."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(int)
    if min(int(y.sum()), int((1 - y).sum())) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(len(s), size=len(s))
        a = roc_auc(s[pick], y[pick])
        if a is not None:
            values.append(a)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def calibration(pairs: Sequence[tuple[float, int]], bins: int = 5) -> dict:
    """Reliability of case probabilities pooled over findings: per equal-width bin the mean
    probability and the observed rate, and the expected calibration error (the bins' |gap|
    weighted by their share of the cases). A calibrated p = 0.8 is right four times in five."""
    if not pairs:
        return {"ece": None, "bins": [], "n": 0}
    p = np.asarray([a for a, _ in pairs], float)
    y = np.asarray([b for _, b in pairs], float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        if not inside.any():
            continue
        mean_p, observed = float(p[inside].mean()), float(y[inside].mean())
        ece += inside.mean() * abs(mean_p - observed)
        rows.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(inside.sum()),
                "mean_p": mean_p,
                "observed": observed,
            }
        )
    return {"ece": float(ece), "bins": rows, "n": len(p)}


class _LesionCells:
    """Per finding, every covered cell of the cases that know the finding: its map value, and
    whether the (simulated) lesion mask covers it. AUC over them says whether a map points at
    the lesion, which the case-level AUC cannot."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.values: dict[str, dict[str, list[np.ndarray]]] = {
            "cell_auc": {k: [] for k in keys},
            "overlay_auc": {k: [] for k in keys},
        }
        self.lesion: dict[str, list[np.ndarray]] = {k: [] for k in keys}

    def add(self, key: str, cells: np.ndarray, overlay: np.ndarray, mask: np.ndarray, inside: np.ndarray) -> None:
        self.values["cell_auc"][key].append(cells[inside])
        self.values["overlay_auc"][key].append(overlay[inside])
        self.lesion[key].append(mask[inside] >= 0.5)

    def aucs(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {name: {} for name in self.values}
        for key, parts in self.lesion.items():
            if not parts:
                continue
            lesion = np.concatenate(parts)
            for name, values in self.values.items():
                a = roc_auc(np.concatenate(values[key]), lesion)
                if a is not None:
                    out[name][key] = a
        return out


def evaluate_cached(
    kind: str,
    model,
    cases,
    catalog: Catalog,
    device="cpu",
    with_hd95: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    postprocess: bool = True,
    gate: bool = False,
) -> dict:
    """Scores of a heads (or baseline) module on cached cases (train.CachedCase), on the labelmap
    ``orthoknee predict`` writes (``postprocess``: femur, tibia and patella each in one piece,
    cartilage off its bone removed, menisci medial and lateral by the fibula's side; False scores
    the raw argmax). ``gate``: the finding scores come from the maps confined to their anatomy
    (gating.py). ``peak_in_lesion`` says how often a positive case's map (the gated one with
    ``gate``) peaks on its lesion."""
    from .postprocess import MAX_CARTILAGE_GAP_MM, SINGLE_PIECE, finish_prediction
    from .predict import run_on_cached

    per_dice: dict[str, list[float]] = {s.key: [] for s in catalog.structures}
    per_hd: dict[str, list[float]] = {s.key: [] for s in catalog.structures}
    finding_scores: dict[str, list[tuple[float, int]]] = {f.key: [] for f in catalog.findings}
    lesion_cells = _LesionCells(catalog.finding_keys)
    peak_hits: dict[str, list[bool]] = {}
    per_case = []
    for n, case in enumerate(cases):
        if cancel:
            cancel.raise_if_cancelled()
        result = run_on_cached(kind, model, case, device=device, cancel=cancel, catalog=catalog)
        probs, finding_probs = result["probabilities"], result.get("finding_probabilities")
        probs, labelmap, side = finish_prediction(probs, case.reference_grid, catalog, postprocess)
        truth = np.asarray(case.array("labels_reference"))
        spacing = case.reference_grid.spacing
        annotated = set(case.meta["annotated"])
        row = {
            "case_id": case.case_id,
            "subject": case.meta.get("subject"),
            "contrast": case.contrast,
            "dice": {},
            "hd95": {},
            "knee_side": side.side if side else None,
        }
        _score_structures(row, labelmap, truth, catalog, annotated, spacing, with_hd95, per_dice, per_hd)
        if finding_probs is not None and "overlays" in result:
            if gate:
                finding_probs, peaks = _gated_scores(result, probs, case, catalog)
            else:
                peaks = _cell_peaks(result, case, catalog)
            values, known = case.finding_targets(catalog)
            for f, v, k in zip(catalog.findings, values, known):
                if k and v > 0 and f.key in peaks:
                    peak_hits.setdefault(f.key, []).append(peaks[f.key])
        if finding_probs is not None:
            _score_findings(row, result, finding_probs, case, catalog, finding_scores, lesion_cells)
        per_case.append(row)
        progress(n + 1, len(cases), case.case_id)
    dice_mean = {k: float(np.mean(v)) for k, v in per_dice.items() if v}
    hd_mean = {k: float(np.mean(v)) for k, v in per_hd.items() if v}
    auc, auc_ci = {}, {}
    counts = {}
    for key, pairs in finding_scores.items():
        if pairs:
            a = roc_auc([p for p, _ in pairs], [y for _, y in pairs])
            counts[key] = {"cases": len(pairs), "positive": int(sum(y for _, y in pairs))}
            if a is not None:
                auc[key] = a
                auc_ci[key] = auc_interval([p for p, _ in pairs], [y for _, y in pairs])
    return {
        "dice": dice_mean,
        "hd95": hd_mean,
        "auc": auc,
        "auc_interval": auc_ci,  # 95 % bootstrap over cases
        "calibration": calibration([pair for pairs in finding_scores.values() for pair in pairs]),
        **lesion_cells.aucs(),
        "finding_counts": counts,
        "gated": gate,
        "peak_in_lesion": {k: {"cases": len(v), "share": float(np.mean(v))} for k, v in peak_hits.items()},
        "mean_dice": float(np.mean(list(dice_mean.values()))) if dice_mean else None,
        "mean_auc": float(np.mean(list(auc.values()))) if auc else None,
        "cases": len(cases),
        # outputs written before this key existed scored the raw argmax
        "postprocessing": (
            f"largest connected component of {', '.join(SINGLE_PIECE)}; cartilage pieces farther "
            f"than {MAX_CARTILAGE_GAP_MM:g} mm from their bone removed; menisci split by the "
            "fibula's side"
            if postprocess
            else "none"
        ),
        "by_contrast": dice_by_contrast(per_case),
        "per_case": per_case,
    }


def _score_structures(row, labelmap, truth, catalog, annotated, spacing, with_hd95, per_dice, per_hd) -> None:
    """Dice (and HD95) of each structure the case annotates, into ``row`` and the running lists."""
    for s in catalog.structures:
        if s.key not in annotated:
            continue
        d = dice(labelmap == s.label, truth == s.label)
        if d is None:
            continue
        per_dice[s.key].append(d)
        row["dice"][s.key] = d
        if with_hd95:
            h = hd95(labelmap == s.label, truth == s.label, spacing)
            if h is not None:
                per_hd[s.key].append(h)
                row["hd95"][s.key] = h


def _score_findings(row, result, finding_probs, case, catalog, finding_scores, lesion_cells) -> None:
    """Each known finding's score and truth into ``row``; its cells into the lesion-cell AUCs."""
    values, known = case.finding_targets(catalog)
    row["findings"], row["finding_truth"] = {}, {}
    for f, p, v, k in zip(catalog.findings, finding_probs, values, known):
        row["findings"][f.key] = float(p)
        if k:  # kept per case so that intervals over cases can be computed from the JSON
            finding_scores[f.key].append((float(p), int(v)))
            row["finding_truth"][f.key] = int(v)
    if "pooled_grid" in case.meta:  # how much of each finding's cells is above 0.5: a map lit everywhere shows
        cell_ml = float(np.prod(case.meta["pooled_grid"]["spacing"])) / 1000.0
        row["cells_over_half_ml"] = {
            f.key: float((result["cell_probabilities"][n] > 0.5).sum() * cell_ml)
            for n, f in enumerate(catalog.findings)
        }
    masks = case.finding_masks(catalog)
    if masks.shape[1:] == result["cell_probabilities"].shape[1:]:  # cached on the heads' cell grid
        inside = result["cells_inside"]
        for index, (f, k) in enumerate(zip(catalog.findings, known)):
            if k:
                lesion_cells.add(
                    f.key, result["cell_probabilities"][index], result["overlay_cells"][index], masks[index], inside
                )


def _cell_peaks(result: dict, case, catalog) -> dict[str, bool]:
    """Per finding whether its map's peak (the overlay on the head's cells) lies on the case's lesion
    (its pooled mask, widened by one cell: about 3 mm). Empty when the masks are on other cells."""
    masks = case.finding_masks(catalog)
    cells = result.get("overlay_cells")
    if cells is None or masks.shape[1:] != cells.shape[1:]:
        return {}
    peaks = {}
    for n, f in enumerate(catalog.findings):
        wide = _widen_cells(masks[n] > 0)
        peaks[f.key] = bool(wide.flat[int(np.argmax(cells[n]))])
    return peaks


def _widen_cells(mask: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), [1, 1, 1])) > 0


def _gated_scores(result: dict, probs: np.ndarray, case, catalog) -> tuple[np.ndarray, dict[str, bool]]:
    """Case scores from the gated maps, and per finding whether the gated map's peak lies on the
    case's lesion (its pooled mask, widened by one cell: about 2-3 mm)."""
    from .gating import case_score_from_map, gate_maps
    from .model.heads import Grid

    grid = case.reference_grid
    overlays = {f.key: result["overlays"][n] for n, f in enumerate(catalog.findings)}
    gated = gate_maps(overlays, probs, grid, catalog)
    scores = np.array([case_score_from_map(gated[f.key], grid) for f in catalog.findings], np.float32)
    masks = case.finding_masks(catalog)
    peaks: dict[str, bool] = {}
    if "pooled_grid" not in case.meta:
        return scores, peaks
    cells = Grid(**{k: tuple(v) for k, v in case.meta["pooled_grid"].items()})
    to_cells = np.linalg.inv(cells.index_to_physical()) @ grid.index_to_physical()
    for n, f in enumerate(catalog.findings):
        k, j, i = np.unravel_index(int(np.argmax(gated[f.key])), gated[f.key].shape)
        ci, cj, ck = np.rint((to_cells @ np.array([i, j, k, 1.0]))[:3]).astype(int)
        mask = _widen_cells(masks[n] > 0)
        inside = 0 <= ck < mask.shape[0] and 0 <= cj < mask.shape[1] and 0 <= ci < mask.shape[2]
        peaks[f.key] = bool(inside and mask[ck, cj, ci])
    return scores, peaks


def dice_by_contrast(per_case: Sequence[dict]) -> dict[str, dict]:
    """contrast -> {"cases", "dice" (structure -> mean), "mean_dice"} over the per-case rows of
    synthetic cases; empty when no case has a contrast (real cases).

    Dice can depend on the render's contrast more than on anything else, and a mean over a test
    set hides that behind its contrast mix: the 1000-step heads scored femur 0.92 on held-out
    DESS renders and 0.64 on T2-like ones, and as little on their own training cases, which is
    how they were found to be underfit (model card, "Heads 0.3.0").
    """
    groups: dict[str, list[dict]] = {}
    for row in per_case:
        if row.get("contrast"):
            groups.setdefault(row["contrast"], []).append(row)
    out = {}
    for contrast in sorted(groups):
        rows = groups[contrast]
        keys = sorted({k for r in rows for k, v in r["dice"].items() if v is not None})  # None: nothing to score
        means = {k: float(np.mean([r["dice"][k] for r in rows if r["dice"].get(k) is not None])) for k in keys}
        out[contrast] = {
            "cases": len(rows),
            "dice": means,
            "mean_dice": float(np.mean(list(means.values()))) if means else None,
        }
    return out


def evaluate_bundle(
    bundle,
    case_folders: Sequence[str | os.PathLike],
    cache_root: str | os.PathLike,
    device: str = "auto",
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    with_hd95: bool = True,
    postprocess: bool = True,
    gate: bool = False,
) -> dict:
    """Cache (if needed) and score every case folder; warns about subjects the heads trained on."""
    from .cachedcase import CachedCase, cache_case
    from .model.device import select_device
    from .predict import load_heads, views_fused

    dev = select_device(device)
    kind, model = load_heads(bundle, device=dev)
    views = views_fused(kind, model)
    cases = []
    for n, folder in enumerate(case_folders):
        cases.append(CachedCase(cache_case(bundle, folder, cache_root, device=dev, cancel=cancel, views=views)))
        progress(n + 1, 2 * len(case_folders), f"features {Path(folder).name}")
    scores = evaluate_cached(
        kind,
        model,
        cases,
        bundle.catalog,
        device=dev,
        with_hd95=with_hd95,
        cancel=cancel,
        progress=lambda d, t, m: progress(len(case_folders) + d, 2 * len(case_folders), m),
        postprocess=postprocess,
        gate=gate,
    )
    trained = set((bundle.metadata["heads"].get("training") or {}).get("subjects", []))
    seen = sorted({c.meta.get("subject") for c in cases} & trained)
    scores["warnings"] = (
        [
            f"{len(seen)} evaluated subject(s) were used to train these heads: {', '.join(seen)}; "
            "these scores are not held-out."
        ]
        if seen
        else []
    )
    scores["bundle"] = {"name": bundle.metadata.get("name"), "version": bundle.metadata.get("version"), "kind": kind}
    return scores


def _peak_text(peak: dict | None) -> str:
    """'7 of 9': positive cases whose map peaks on their lesion."""
    return f"{round(peak['share'] * peak['cases'])} of {peak['cases']}" if peak and peak["cases"] else "-"


def format_table(scores: dict, catalog: Catalog) -> str:
    """A plain-text table: structure | Dice | HD95, then finding | AUC | cases (positive) | cell
    and overlay AUC against the lesion masks, then Dice by render contrast."""
    nan = float("nan")
    lines = [f"{'structure':<24} {'Dice':>6} {'HD95 mm':>8}"]
    for s in catalog.structures:
        d, h = scores["dice"].get(s.key), scores["hd95"].get(s.key)
        if d is None:
            continue
        lines.append(f"{s.key:<24} {d:6.3f} {h if h is not None else nan:8.2f}")
    if scores.get("mean_dice") is not None:
        lines.append(f"{'mean':<24} {scores['mean_dice']:6.3f}")
    if scores["auc"] or scores.get("finding_counts"):
        lines.append("")
        lines.append(
            f"{'finding':<28} {'AUC':>6} {'95 % interval':>14} {'cases (positive)':>18} {'cell AUC':>9} "
            f"{'overlay AUC':>12} {'peak on lesion':>15}"
        )
        for f in catalog.findings:
            a = scores["auc"].get(f.key)
            c = scores.get("finding_counts", {}).get(f.key)
            if a is None and c is None:
                continue
            ci = (scores.get("auc_interval") or {}).get(f.key)
            lines.append(
                f"{f.key:<28} {a if a is not None else nan:6.3f} "
                f"{(f'{ci[0]:.2f}-{ci[1]:.2f}' if ci else '-'):>14} "
                f"{(str(c['cases']) + ' (' + str(c['positive']) + ')') if c else '-':>18} "
                f"{scores.get('cell_auc', {}).get(f.key, nan):9.3f} "
                f"{scores.get('overlay_auc', {}).get(f.key, nan):12.3f} "
                f"{_peak_text((scores.get('peak_in_lesion') or {}).get(f.key)):>15}"
            )
    cal = scores.get("calibration") or {}
    if cal.get("bins"):
        lines.append("")
        lines.append(f"calibration over {cal['n']} case scores: expected calibration error {cal['ece']:.3f}")
        lines.append(f"{'probability':<14} {'cases':>6} {'mean p':>7} {'observed':>9}")
        for b in cal["bins"]:
            lines.append(f"{b['lo']:.1f}-{b['hi']:.1f}{'':<7} {b['n']:>6} {b['mean_p']:7.2f} {b['observed']:9.2f}")
    by_contrast = scores.get("by_contrast") or {}
    if by_contrast:
        lines.append("")
        lines.append(
            f"{'Dice by contrast':<24}"
            + "".join(f" {c + ' (' + str(g['cases']) + ')':>12}" for c, g in by_contrast.items())
        )
        for s in catalog.structures:
            if not any(s.key in g["dice"] for g in by_contrast.values()):
                continue
            lines.append(f"{s.key:<24}" + "".join(f" {g['dice'].get(s.key, nan):12.3f}" for g in by_contrast.values()))
        lines.append(
            f"{'mean':<24}"
            + "".join(f" {g['mean_dice'] if g['mean_dice'] is not None else nan:12.3f}" for g in by_contrast.values())
        )
    for w in scores.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
