"""Two models scored on the same held-out cases, compared case by case (`orthoknee evaluate --compare`).

Both files are `orthoknee evaluate --json --per-case` outputs on the same cases. A difference of
means hides how much of it is a few cases; the cases, not the voxels, are the independent units,
so every difference here is paired over the cases both models were scored on, with a 95 %
bootstrap interval over those cases: Dice per structure and its mean over structures, HD95 per
structure, and AUC per finding (the same resampled cases for both models). Positive differences
mean B is better (for HD95, B's distances are shorter).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InputError
from .evaluate import roc_auc

__all__ = ["compare_table", "paired_metric", "paired_auc", "mean_dice_per_case", "load_per_case"]


def load_per_case(path: Path) -> tuple[dict, dict[str, dict]]:
    """An evaluate JSON and its per-case rows by case id."""
    try:
        scores = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"is not an `orthoknee evaluate --json` output ({exc}).", "Give one.") from None
    return scores, _per_case(scores, path)


def _per_case(scores: dict, path: Path) -> dict[str, dict]:
    rows = scores.get("per_case")
    if not rows:
        raise InputError(
            path, "holds no per-case scores.", "Score it again with `orthoknee evaluate --json --per-case`."
        )
    return {r["case_id"]: r for r in rows}


def _interval(values: np.ndarray, rng, resamples: int) -> tuple[float, float]:
    boot = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def paired_metric(
    a: dict[str, dict],
    b: dict[str, dict],
    cases: list[str],
    metric: str,
    key: str,
    rng,
    resamples: int,
    lower_is_better: bool = False,
) -> dict | None:
    """B minus A on ``metric`` (dice or hd95) of structure ``key`` over the cases both scored."""
    pairs = [
        (a[c][metric][key], b[c][metric][key])
        for c in cases
        if a[c][metric].get(key) is not None and b[c][metric].get(key) is not None
    ]
    if not pairs:
        return None
    va, vb = np.array(pairs, dtype=float).T
    diff = (va - vb) if lower_is_better else (vb - va)
    lo, hi = _interval(diff, rng, resamples)
    return {
        "n": len(diff),
        "a": va.mean(),
        "b": vb.mean(),
        "diff": diff.mean(),
        "lo": lo,
        "hi": hi,
        "b_better": int((diff > 0).sum()),
    }


def mean_dice_per_case(a: dict[str, dict], b: dict[str, dict], cases: list[str], rng, resamples: int) -> dict | None:
    """Per case, the mean Dice over the structures both models were scored on; then paired."""
    diffs, va, vb = [], [], []
    for c in cases:
        common = [s for s in a[c]["dice"] if a[c]["dice"][s] is not None and b[c]["dice"].get(s) is not None]
        if common:
            va.append(np.mean([a[c]["dice"][s] for s in common]))
            vb.append(np.mean([b[c]["dice"][s] for s in common]))
            diffs.append(vb[-1] - va[-1])
    if not diffs:
        return None
    diff = np.array(diffs)
    lo, hi = _interval(diff, rng, resamples)
    return {
        "n": len(diff),
        "a": float(np.mean(va)),
        "b": float(np.mean(vb)),
        "diff": float(diff.mean()),
        "lo": lo,
        "hi": hi,
        "b_better": int((diff > 0).sum()),
    }


def paired_auc(
    a: dict[str, dict], b: dict[str, dict], cases: list[str], finding: str, rng, resamples: int
) -> dict | None:
    """AUC of A and B for one finding and B - A, bootstrapped over the same resampled cases."""
    rows = [
        (a[c]["findings"][finding], b[c]["findings"][finding], bool(a[c]["finding_truth"][finding]))
        for c in cases
        if finding in a[c].get("findings", {})
        and finding in b[c].get("findings", {})
        and a[c].get("finding_truth", {}).get(finding) is not None
    ]
    if not rows:
        return None
    pa, pb, truth = (np.array(x) for x in zip(*rows))
    auc_a, auc_b = roc_auc(pa, truth), roc_auc(pb, truth)
    if auc_a is None or auc_b is None:
        return None
    boot = []
    for _ in range(resamples):
        idx = rng.integers(len(truth), size=len(truth))
        x, y = roc_auc(pa[idx], truth[idx]), roc_auc(pb[idx], truth[idx])
        if x is not None and y is not None:
            boot.append(y - x)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "n": len(truth),
        "positive": int(truth.sum()),
        "a": auc_a,
        "b": auc_b,
        "diff": auc_b - auc_a,
        "lo": float(lo),
        "hi": float(hi),
    }


def compare_table(
    path_a: Path, path_b: Path, names: tuple[str, str] | None = None, bootstrap: int = 10000, auc_bootstrap: int = 2000
) -> str:
    """The Markdown tables of B - A (Dice, HD95, mean per case, AUC) with 95 % intervals."""
    loaded_a, a = load_per_case(path_a)
    loaded_b, b = load_per_case(path_b)
    cases = sorted(set(a) & set(b))
    if not cases:
        raise InputError(path_b, f"shares no case with {path_a}.", "Score both models on the same cases.")
    name_a, name_b = names or (Path(path_a).name, Path(path_b).name)
    rng = np.random.default_rng(0)
    lines = [
        f"A = {name_a}, B = {name_b}; {len(cases)} cases scored by both "
        f"({len(a) - len(cases)} only in A, {len(b) - len(cases)} only in B)",
        "",
        "| structure | Dice A | Dice B | B - A (95 % interval) | B better on | HD95 mm A | HD95 mm B |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in loaded_a["dice"]:
        d = paired_metric(a, b, cases, "dice", key, rng, bootstrap)
        h = paired_metric(a, b, cases, "hd95", key, rng, bootstrap, lower_is_better=True)
        if d is None:
            continue
        hd = f"| {h['a']:.1f} | {h['b']:.1f} |" if h else "| - | - |"
        lines.append(
            f"| {key} | {d['a']:.3f} | {d['b']:.3f} | {d['diff']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f}) "
            f"| {d['b_better']} of {d['n']} {hd}"
        )
    m = mean_dice_per_case(a, b, cases, rng, bootstrap)
    if m:
        lines.append(
            f"| **mean per case** | {m['a']:.3f} | {m['b']:.3f} | {m['diff']:+.3f} ({m['lo']:+.3f} to "
            f"{m['hi']:+.3f}) | {m['b_better']} of {m['n']} | | |"
        )
    findings = list(loaded_a.get("auc", {}))
    if findings:
        lines += ["", "| finding | AUC A | AUC B | B - A (95 % interval) | cases (positive) |", "|---|---|---|---|---|"]
        for f in findings:
            r = paired_auc(a, b, cases, f, rng, auc_bootstrap)
            if r:
                lines.append(
                    f"| {f} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} ({r['lo']:+.3f} to {r['hi']:+.3f}) "
                    f"| {r['n']} ({r['positive']}) |"
                )
    return "\n".join(lines)


def compare_predictions(folder_a: Path, folder_b: Path, threshold: float = 0.5, moved: float = 0.1) -> dict:
    """Two saved predictions of one case (e.g. by two bundle versions): Dice and volume difference per
    structure between them, and the findings whose probability moved by ``moved`` or crossed ``threshold``."""
    from .results import load_prediction

    a, b = load_prediction(folder_a), load_prediction(folder_b)
    if a.reference_grid != b.reference_grid:
        raise InputError(
            folder_b,
            f"is a prediction on another grid than {folder_a} (another case or series).",
            "Compare two predictions of the same case.",
        )
    shared = set(a.input_hashes) & set(b.input_hashes)  # a version may read fewer of the case's series
    if any(a.input_hashes[v] != b.input_hashes[v] for v in shared):
        raise InputError(
            folder_b, f"was predicted from other images than {folder_a}.", "Compare two predictions of the same series."
        )
    voxel_ml = float(np.prod(a.reference_grid.spacing)) / 1000.0
    labels_b = {s.key: s.label for s in b.catalog.structures}  # by key: versions may number labels differently
    structures = {}
    for s in a.catalog.structures:
        if s.key not in labels_b:
            continue
        in_a, in_b = a.labelmap == s.label, b.labelmap == labels_b[s.key]
        total = int(in_a.sum() + in_b.sum())
        structures[s.key] = {
            "name": s.name,
            "dice": (2.0 * int((in_a & in_b).sum()) / total) if total else None,
            "volume_ml_a": round(int(in_a.sum()) * voxel_ml, 3),
            "volume_ml_b": round(int(in_b.sum()) * voxel_ml, 3),
        }
    findings = {}
    for key, pa in a.finding_probabilities.items():
        pb = b.finding_probabilities.get(key)
        if pb is None:
            continue
        findings[key] = {"a": pa, "b": pb, "changed": abs(pb - pa) >= moved or (pa >= threshold) != (pb >= threshold)}
    keys_a = [s.key for s in a.catalog.structures]
    return {
        "a": {"folder": str(folder_a), "bundle": a.bundle},
        "b": {"folder": str(folder_b), "bundle": b.bundle},
        "structures": structures,
        "findings": findings,
        # what only one version segments or scores (a new label, a finding added): shown, not compared
        "only_in_a": [k for k in keys_a if k not in labels_b],
        "only_in_b": [k for k in labels_b if k not in keys_a],
        "findings_only_in_a": sorted(set(a.finding_probabilities) - set(b.finding_probabilities)),
        "findings_only_in_b": sorted(set(b.finding_probabilities) - set(a.finding_probabilities)),
    }


def format_prediction_diff(diff: dict) -> str:
    def version(side: dict) -> str:
        bundle = side["bundle"] or {}
        return f"{bundle.get('name', '?')} {bundle.get('version', '?')} ({side['folder']})"

    lines = [
        f"A = {version(diff['a'])}",
        f"B = {version(diff['b'])}",
        "",
        "| structure | Dice A vs B | volume A (mL) | volume B (mL) |",
        "|---|---|---|---|",
    ]
    for key, row in diff["structures"].items():
        d = "-" if row["dice"] is None else f"{row['dice']:.3f}"
        lines.append(f"| {key} | {d} | {row['volume_ml_a']:.1f} | {row['volume_ml_b']:.1f} |")
    changed = {k: v for k, v in diff["findings"].items() if v["changed"]}
    for side in ("a", "b"):
        only = diff.get(f"only_in_{side}", []) + diff.get(f"findings_only_in_{side}", [])
        if only:
            lines.append(f"only {side.upper()} has: {', '.join(only)}")
    lines.append("")
    lines.append(
        "findings that changed: "
        + (", ".join(f"{k} {v['a']:.2f} -> {v['b']:.2f}" for k, v in changed.items()) or "none")
    )
    return "\n".join(lines)
