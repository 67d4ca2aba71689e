"""The model card's comparison tables, from `orthoknee evaluate --json` outputs.

    python bench/compare_models.py DIR [--prefix P] [--suffix S]

DIR holds <P>heads-100<S>.eval.json, <P>heads-10<S>.eval.json, <P>baseline-100<S>.eval.json and
<P>baseline-10<S>.eval.json (see Resources/Models/make_demo_bundle.sh; P is e.g. "v3-", S empty
or ".findings-test"). Prints Markdown: Dice and
HD95 per structure for every model, the Dice lost going from 100 % to 10 % of the labels
(with a paired bootstrap over cases of the difference between the two models' losses; needs
`--per-case` outputs), and AUC per finding with an approximate 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RUNS = [
    ("heads-100", "diffusion heads, 100 %"),
    ("heads-10", "diffusion heads, 10 %"),
    ("baseline-100", "supervised UNet, 100 %"),
    ("baseline-10", "supervised UNet, 10 %"),
]


def _f(v, fmt="{:.3f}"):
    return fmt.format(v) if v is not None else "-"


def auc_interval(auc: float, positive: int, negative: int) -> tuple[float, float]:
    """Approximate 95 % interval of an AUC from its value and class sizes (Hanley & McNeil 1982).

    The eval JSONs hold the AUC and the counts, so the interval needs nothing else; with a few
    dozen cases it shows which AUCs are distinguishable from chance (0.5) at all. At 0 or 1 the
    formula has no width, so it is taken half a case pair inside; with fewer than two cases of
    a class it says nothing, and the interval is all of [0, 1].
    """
    if positive < 2 or negative < 2:
        return 0.0, 1.0
    half_pair = 0.5 / (positive * negative)
    auc = min(max(auc, half_pair), 1 - half_pair)
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positive - 1) * (q1 - auc**2) + (negative - 1) * (q2 - auc**2)) / (positive * negative)
    half = 1.96 * max(var, 0.0) ** 0.5
    return max(auc - half, 0.0), min(auc + half, 1.0)


def _auc_cell(scores: dict, key: str) -> str:
    auc, counts = scores.get("auc", {}).get(key), scores.get("finding_counts", {}).get(key)
    if auc is None or not counts:
        return "-"
    lo, hi = auc_interval(auc, counts["positive"], counts["cases"] - counts["positive"])
    return f"{auc:.3f} ({lo:.2f}-{hi:.2f})"


def per_case_dice(scores: dict) -> dict[str, dict[str, float]]:
    """case id -> {structure: Dice} (needs `orthoknee evaluate --per-case`)."""
    rows = scores.get("per_case")
    if not rows:
        raise SystemExit("the eval JSONs hold no per-case scores: run `orthoknee evaluate --json --per-case`")
    return {r["case_id"]: r["dice"] for r in rows}


def paired_loss_comparison(scores: dict, resamples: int, seed: int = 0) -> str:
    """Does the baseline lose more Dice than the heads going to 10 % labels?

    Per case: mean Dice over the structures all four models were scored on for that case (a
    structure neither predicted nor present is not scored), each model's loss, and the
    difference of the two losses; its mean with a 95 % bootstrap interval over cases (the
    cases, not the voxels, are the independent units).
    """
    per = {name: per_case_dice(scores[name]) for name, _ in RUNS}
    cases = sorted(set.intersection(*(set(v) for v in per.values())))
    diff = []
    for c in cases:
        common = set.intersection(*(set(per[name][c]) for name, _ in RUNS))
        if not common:
            continue
        mean = {name: np.mean([per[name][c][s] for s in common]) for name, _ in RUNS}
        diff.append((mean["baseline-100"] - mean["baseline-10"]) - (mean["heads-100"] - mean["heads-10"]))
    diff = np.array(diff)  # > 0: the heads lose less
    if not len(diff):
        return "- per case: no case was scored on a common structure by all four models"
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(len(diff), size=(resamples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return (
        f"- per case (n = {len(diff)}): Dice lost by the baseline minus Dice lost by the heads = "
        f"{diff.mean():+.3f} (95 % bootstrap interval {lo:+.3f} to {hi:+.3f}; positive = the heads lose less); "
        f"the heads lose less on {int((diff > 0).sum())} of {len(diff)} cases"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prefix", default="", help="file name prefix of the runs, e.g. v3-")
    parser.add_argument("--suffix", default="", help="before .eval.json: which test set, e.g. .findings-test")
    parser.add_argument("--bootstrap", type=int, default=10000, help="resamples of the cases for the interval")
    args = parser.parse_args()
    files = {name: args.folder / f"{args.prefix}{name}{args.suffix}.eval.json" for name, _ in RUNS}
    scores = {name: json.loads(f.read_text()) for name, f in files.items() if f.is_file()}
    if not scores:
        parser.error(f"no {args.prefix}<run>{args.suffix}.eval.json in {args.folder}")
    structures = list(next(iter(scores.values()))["dice"])
    print(
        "| structure | "
        + " | ".join(f"Dice {label}" for name, label in RUNS if name in scores)
        + " | HD95 mm heads 100 % | HD95 mm UNet 100 % |"
    )
    print("|---" * (len(scores) + 3) + "|")
    for s in structures:
        row = [_f(scores[n]["dice"].get(s)) for n, _ in RUNS if n in scores]
        row += [
            _f(scores.get("heads-100", {}).get("hd95", {}).get(s), "{:.1f}"),
            _f(scores.get("baseline-100", {}).get("hd95", {}).get(s), "{:.1f}"),
        ]
        print(f"| {s} | " + " | ".join(row) + " |")
    means = {n: scores[n]["mean_dice"] for n in scores}
    print("| **mean** | " + " | ".join(_f(means[n]) for n, _ in RUNS if n in scores) + " | | |")
    print()
    for kind in ("heads", "baseline"):
        a, b = scores.get(f"{kind}-100"), scores.get(f"{kind}-10")
        if a and b and a.get("mean_dice") is not None and b.get("mean_dice") is not None:
            lost = a["mean_dice"] - b["mean_dice"]
            share = f" ({100 * lost / a['mean_dice']:.0f} % of its 100 % Dice)" if a["mean_dice"] > 0 else ""
            print(
                f"- {kind}: mean Dice {a['mean_dice']:.3f} (100 %) -> {b['mean_dice']:.3f} (10 %), "
                f"lost {lost:.3f}{share}"
            )
    if all(name in scores for name, _ in RUNS):
        print(paired_loss_comparison(scores, args.bootstrap))
    print()
    print("| finding | AUC heads 100 % (95 % interval) | AUC heads 10 % (95 % interval) | test cases (positive) |")
    print("|---|---|---|---|")
    h100, h10 = scores.get("heads-100", {}), scores.get("heads-10", {})
    for key, counts in h100.get("finding_counts", {}).items():
        print(f"| {key} | {_auc_cell(h100, key)} | {_auc_cell(h10, key)} | {counts['cases']} ({counts['positive']}) |")
    n = next(iter(scores.values()))["cases"]
    print(f"\n{n} held-out cases; Dice and HD95 are means over the cases that annotate the structure.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
