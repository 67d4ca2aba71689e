"""Two models scored on the same held-out cases, compared case by case.

    python bench/compare_two.py A.eval.json B.eval.json [--names A B] [--bootstrap N]

Both files are `orthoknee evaluate --json --per-case` outputs on the same cases (e.g. the shipped
sagittal heads against three-view heads). A difference of means hides how much of it is a few
cases; the cases, not the voxels, are the independent units, so every difference here is paired
over the cases both models were scored on, with a 95 % bootstrap interval over those cases:
Dice per structure and its mean over structures, HD95 per structure, and AUC per finding (the
same resampled cases for both models). Positive differences mean B is better (for HD95, B's
distances are shorter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.evaluate import roc_auc  # noqa: E402


def _per_case(scores: dict, path: Path) -> dict[str, dict]:
    rows = scores.get("per_case")
    if not rows:
        raise SystemExit(f"{path}: no per-case scores. Score it again with `orthoknee evaluate --json --per-case`.")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--names", nargs=2, default=None, help="column names for A and B")
    parser.add_argument("--bootstrap", type=int, default=10000, help="resamples of the cases")
    parser.add_argument("--auc-bootstrap", type=int, default=2000, help="resamples for the AUC intervals")
    args = parser.parse_args(argv)
    loaded = []
    for path in (args.a, args.b):
        try:
            loaded.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"{path}: cannot read an evaluate JSON ({e})")
    a, b = (_per_case(s, p) for s, p in zip(loaded, (args.a, args.b)))
    cases = sorted(set(a) & set(b))
    if not cases:
        parser.error(f"{args.a} and {args.b} share no case: score both on the same cases")
    name_a, name_b = args.names or (args.a.name, args.b.name)
    rng = np.random.default_rng(0)

    print(
        f"A = {name_a}, B = {name_b}; {len(cases)} cases scored by both "
        f"({len(a) - len(cases)} only in A, {len(b) - len(cases)} only in B)\n"
    )
    print("| structure | Dice A | Dice B | B - A (95 % interval) | B better on | HD95 mm A | HD95 mm B |")
    print("|---|---|---|---|---|---|---|")
    for key in loaded[0]["dice"]:
        d = paired_metric(a, b, cases, "dice", key, rng, args.bootstrap)
        h = paired_metric(a, b, cases, "hd95", key, rng, args.bootstrap, lower_is_better=True)
        if d is None:
            continue
        hd = f"| {h['a']:.1f} | {h['b']:.1f} |" if h else "| - | - |"
        print(
            f"| {key} | {d['a']:.3f} | {d['b']:.3f} | {d['diff']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f}) "
            f"| {d['b_better']} of {d['n']} {hd}"
        )
    m = mean_dice_per_case(a, b, cases, rng, args.bootstrap)
    if m:
        print(
            f"| **mean per case** | {m['a']:.3f} | {m['b']:.3f} | {m['diff']:+.3f} ({m['lo']:+.3f} to "
            f"{m['hi']:+.3f}) | {m['b_better']} of {m['n']} | | |"
        )
    findings = list(loaded[0].get("auc", {}))
    if findings:
        print("\n| finding | AUC A | AUC B | B - A (95 % interval) | cases (positive) |")
        print("|---|---|---|---|---|")
        for f in findings:
            r = paired_auc(a, b, cases, f, rng, args.auc_bootstrap)
            if r:
                print(
                    f"| {f} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} ({r['lo']:+.3f} to {r['hi']:+.3f}) "
                    f"| {r['n']} ({r['positive']}) |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
