"""Why a finding map that points at the lesion does not yet make a case score.

    ORTHOKNEE_CACHE=/work/data/cache python bench/finding_maps.py --bundle B --cases DIR

Runs the finding head on every case of DIR (cached features, as `orthoknee evaluate` does) and
prints, per finding: the case-level AUC of the head's own score and of three plain readouts
of its cell map (the highest cell, the mean of the 30 highest, the number of cells above 0.5),
how many cells exceed 0.5 in the cases with and without the finding, and how many cells each
lesion half-covers (a lesion thinner than a 3-mm cell has none, and no map can show it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.bundle import Bundle  # noqa: E402
from OrthoKneeLib.evaluate import roc_auc  # noqa: E402
from OrthoKneeLib.predict import load_heads, run_heads, views_fused  # noqa: E402
from OrthoKneeLib.train import CachedCase, cache_case, find_cases  # noqa: E402


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--cases", required=True, help="a folder of synthetic cases (as for orthoknee evaluate)")
    parser.add_argument("--cache", default=os.environ.get("ORTHOKNEE_CACHE", ".orthoknee-cache"))
    args = parser.parse_args(argv)

    bundle = Bundle.open(args.bundle)
    kind, heads = load_heads(bundle, device="cpu")
    if kind != "diffusion-heads":
        parser.error(f"{args.bundle} has no finding head (its heads are {kind})")
    catalog = bundle.catalog
    rows: dict[str, list[dict]] = {k: [] for k in catalog.finding_keys}
    for folder in find_cases([args.cases]):
        case = CachedCase(cache_case(bundle, folder, args.cache, views=views_fused(kind, heads)))
        result = run_heads(heads, case.fusion_inputs())
        values, known = case.finding_targets(catalog)
        for n, key in enumerate(catalog.finding_keys):
            if not known[n]:
                continue
            cells = result["cell_probabilities"][n][result["cells_inside"]]
            top = np.sort(cells)[::-1]
            rows[key].append({"y": int(values[n]), "score": float(result["finding_probabilities"][n]),
                              "max": float(top[0]), "top30": float(top[:30].mean()), "above": int((cells > 0.5).sum()),
                              "lesion": int((case.pooled_masks[n] >= 0.5).sum())})
    print(f"bundle {args.bundle}, cases {args.cases}")
    print("| finding | AUC head | AUC max cell | AUC top-30 mean | AUC cells > 0.5 | cells > 0.5 with | without "
          "| lesion cells (>= half covered) | lesions with none |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, found in rows.items():
        y = [r["y"] for r in found]
        aucs = [roc_auc([r[m] for r in found], y) for m in ("score", "max", "top30", "above")]
        pos = [r for r in found if r["y"]]
        print(f"| {key} | " + " | ".join(f"{a:.2f}" if a is not None else "-" for a in aucs)
              + f" | {_range([r['above'] for r in pos])} | {_range([r['above'] for r in found if not r['y']])}"
              + f" | {_range([r['lesion'] for r in pos])} | {sum(r['lesion'] == 0 for r in pos)} of {len(pos)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
