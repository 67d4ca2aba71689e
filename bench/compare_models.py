"""The model card's comparison tables, from `orthoknee evaluate --json` outputs.

    python bench/compare_models.py DIR [--prefix P]

DIR holds <P>heads-100.eval.json, <P>heads-10.eval.json, <P>baseline-100.eval.json and
<P>baseline-10.eval.json (see Resources/Models/make_demo_bundle.sh; P is empty or "v2-"). Prints Markdown: Dice and
HD95 per structure for every model, the Dice lost going from 100 % to 10 % of the labels,
and AUC per finding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNS = [("heads-100", "diffusion heads, 100 %"), ("heads-10", "diffusion heads, 10 %"),
        ("baseline-100", "supervised UNet, 100 %"), ("baseline-10", "supervised UNet, 10 %")]


def _f(v, fmt="{:.3f}"):
    return fmt.format(v) if v is not None else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prefix", default="", help="file name prefix of the runs, e.g. v2-")
    args = parser.parse_args()
    scores = {name: json.loads((args.folder / f"{args.prefix}{name}.eval.json").read_text()) for name, _ in RUNS
              if (args.folder / f"{args.prefix}{name}.eval.json").is_file()}
    if not scores:
        parser.error(f"no {args.prefix}<run>.eval.json in {args.folder}")
    structures = list(next(iter(scores.values()))["dice"])
    print("| structure | " + " | ".join(f"Dice {label}" for name, label in RUNS if name in scores)
          + " | HD95 mm heads 100 % | HD95 mm UNet 100 % |")
    print("|---" * (len(scores) + 3) + "|")
    for s in structures:
        row = [_f(scores[n]["dice"].get(s)) for n, _ in RUNS if n in scores]
        row += [_f(scores.get("heads-100", {}).get("hd95", {}).get(s), "{:.1f}"),
                _f(scores.get("baseline-100", {}).get("hd95", {}).get(s), "{:.1f}")]
        print(f"| {s} | " + " | ".join(row) + " |")
    means = {n: scores[n]["mean_dice"] for n in scores}
    print("| **mean** | " + " | ".join(_f(means[n]) for n, _ in RUNS if n in scores) + " | | |")
    print()
    for kind in ("heads", "baseline"):
        a, b = scores.get(f"{kind}-100"), scores.get(f"{kind}-10")
        if a and b:
            print(f"- {kind}: mean Dice {a['mean_dice']:.3f} (100 %) -> {b['mean_dice']:.3f} (10 %), "
                  f"lost {a['mean_dice'] - b['mean_dice']:.3f}")
    print()
    print("| finding | AUC heads 100 % | AUC heads 10 % | test cases (positive) |")
    print("|---|---|---|---|")
    h100, h10 = scores.get("heads-100", {}), scores.get("heads-10", {})
    for key, counts in h100.get("finding_counts", {}).items():
        print(f"| {key} | {_f(h100['auc'].get(key))} | {_f(h10.get('auc', {}).get(key))} | "
              f"{counts['cases']} ({counts['positive']}) |")
    n = next(iter(scores.values()))["cases"]
    print(f"\n{n} held-out cases; Dice and HD95 are means over the cases that annotate the structure.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
