"""Is the argmax the labelmap with the best Dice? Dice per structure as a function of a bias on
that structure's log-probability, one structure against the rest.

    python bench/class_bias.py --bundle B --cases DIR [DIR ...] [--out SWEEP.json]
    python bench/class_bias.py --sweep SWEEP.json

Thin structures are often drawn too thin by a softmax argmax (precision above recall), and
adding a constant to their log-probability before the argmax is the cheapest fix there is. For
each case and structure this records, for biases from -1 to +3, the voxels the structure would
get (``log p_s + bias > max over the others of log p``) and how many of them are right; then it
prints the mean precision and recall at no bias, the bias with the best mean Dice and that Dice.
The probabilities are the Predictor's (menisci split by side), on the reference grid. A bias is
only worth shipping if it is chosen on cases other than the held-out ones and holds on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BIASES = [round(-1.0 + 0.25 * n, 2) for n in range(17)]  # -1.0 ... +3.0


def sweep_case(probabilities, truth, catalog, annotated) -> dict:
    """structure -> {"truth": voxels, "pred": [voxels per bias], "inter": [correct voxels per bias]}."""
    import numpy as np

    log_p = np.log(np.clip(probabilities, 1e-8, None))
    rows = {}
    for s in catalog.structures:
        if s.key not in annotated:
            continue
        margin = log_p[s.label] - np.delete(log_p, s.label, axis=0).max(0)
        near = margin > -max(BIASES) - 1e-6  # voxels no bias in the sweep reaches are never the structure's
        truth_mask = truth == s.label
        m, right = margin[near], truth_mask[near]
        rows[s.key] = {
            "truth": int(truth_mask.sum()),
            "pred": [int((m > -b).sum()) for b in BIASES],
            "inter": [int((right & (m > -b)).sum()) for b in BIASES],
        }
    return rows


def summary(sweep: dict) -> str:
    import numpy as np

    biases = np.asarray(sweep["biases"])
    zero = int(np.flatnonzero(biases == 0)[0])
    keys = [k for k in sweep["structures"] if any(k in r["structures"] for r in sweep["rows"])]
    lines = [
        f"{len(sweep['rows'])} cases; bundle {sweep['bundle']}",
        f"{'structure':<20} {'cases':>5} {'precision':>9} {'recall':>6} {'Dice':>6} {'best bias':>9} "
        f"{'its Dice':>8} {'gain':>6}",
    ]
    for key in keys:
        dice, precision, recall = [], [], []
        for row in sweep["rows"]:
            s = row["structures"].get(key)
            if not s or not s["truth"]:
                continue
            inter, pred = np.asarray(s["inter"], float), np.asarray(s["pred"], float)
            dice.append(2 * inter / (pred + s["truth"]))
            precision.append(inter[zero] / max(pred[zero], 1))
            recall.append(inter[zero] / s["truth"])
        if not dice:
            continue
        mean = np.mean(dice, axis=0)
        best = int(mean.argmax())
        lines.append(
            f"{key:<20} {len(dice):5d} {np.mean(precision):9.3f} {np.mean(recall):6.3f} {mean[zero]:6.3f} "
            f"{biases[best]:+9.2f} {mean[best]:8.3f} {mean[best] - mean[zero]:+6.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--cases", type=Path, nargs="+", help="`orthoknee synth` outputs or case folders")
    parser.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE)")
    parser.add_argument("--out", type=Path, help="write the sweep here (JSON), to summarize again with --sweep")
    parser.add_argument("--sweep", type=Path, help="summarize a sweep written by --out instead of running one")
    args = parser.parse_args(argv)
    if args.sweep:
        print(summary(json.loads(args.sweep.read_text())))
        return 0
    if not args.bundle or not args.cases:
        parser.error("give --bundle and --cases, or --sweep")

    import numpy as np

    from OrthoKneeLib.bundle import Bundle
    from OrthoKneeLib.errors import InputError
    from OrthoKneeLib.featurecache import default_cache_dir
    from OrthoKneeLib.postprocess import assign_meniscus_sides
    from OrthoKneeLib.predict import load_heads, run_on_cached, views_fused
    from OrthoKneeLib.train import CachedCase, cache_case, find_cases

    bundle = Bundle.open(args.bundle)
    folders = find_cases(args.cases, None)
    if not folders:
        raise InputError(
            None, f"no case folders under {', '.join(map(str, args.cases))}.", "Give `orthoknee synth` outputs."
        )
    cache = args.cache or default_cache_dir()
    kind, heads = load_heads(bundle, device="cpu")
    sweep = {
        "bundle": f"{bundle.metadata.get('name')} {bundle.metadata.get('version')}",
        "biases": BIASES,
        "structures": bundle.catalog.structure_keys,
        "rows": [],
    }
    for n, folder in enumerate(folders):
        case = CachedCase(cache_case(bundle, folder, cache, views=views_fused(kind, heads)))
        probabilities = run_on_cached(kind, heads, case)["probabilities"]
        probabilities, _ = assign_meniscus_sides(probabilities, case.reference_grid, bundle.catalog)
        truth = np.asarray(case.array("labels_reference"))
        sweep["rows"].append(
            {
                "case_id": case.case_id,
                "contrast": case.contrast,
                "structures": sweep_case(probabilities, truth, bundle.catalog, set(case.meta["annotated"])),
            }
        )
        print(f"{n + 1}/{len(folders)} {case.case_id}", file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(sweep))
    print(summary(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
