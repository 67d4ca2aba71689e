"""Why a finding map that points at the lesion does not yet make a case score.

    ORTHOKNEE_CACHE=/work/data/cache python bench/finding_maps.py --bundle B --cases DIR

Runs the finding head on every case of DIR (cached features, as `orthoknee evaluate` does) and
prints, per finding: the case-level AUC of the head's own score and of three plain readouts
of its cell map (the highest cell, the mean of the 30 highest, the number of cells above 0.5),
how many cells exceed 0.5 in the cases with and without the finding, and how many cells each
lesion half-covers (a lesion thinner than a 3-mm cell has none, and no map can show it).

A second table asks where the case score is lost. "Cells above the lesion": in each case with
the finding, how many cells outside the lesion score higher than its best cell (0 = the lesion
is the map's peak). "AUC max cell in the true site": the highest cell within the finding's
structures (the reference labels, one cell of margin), over the cases that annotate them: if
the map only misfires elsewhere in the knee, this readout separates the cases even though the
plain maximum does not.

A third table asks what the map finds in the cases *without* its finding: how often its highest
cell lies on (within one cell of) the lesion of another finding the case has, and which, against
how often a cell drawn at random from the seen cells would (an effusion covers a lot of the knee). A map
that peaks on a torn PCL in a case with an intact ACL reads "a cruciate tear", not "an ACL tear".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.bundle import Bundle  # noqa: E402
from OrthoKneeLib.evaluate import roc_auc  # noqa: E402
from OrthoKneeLib.featurecache import default_cache_dir  # noqa: E402
from OrthoKneeLib.model.heads import pooled  # noqa: E402
from OrthoKneeLib.predict import load_heads, run_heads, views_fused  # noqa: E402
from OrthoKneeLib.train import CachedCase, cache_case, find_cases  # noqa: E402


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if values else "-"


def _median_range(values: list[int]) -> str:
    return f"{np.median(values):.0f} ({_range(values)})" if values else "-"


def true_site(case: CachedCase, labels: np.ndarray, structure_labels: list[int]) -> np.ndarray:
    """The finding head's cells that hold any of the structures (``labels``: the case's reference
    labels on the fusion grid), plus one cell of margin in plane: a torn ligament or a cartilage
    defect is cut out of its own label."""
    share = pooled(np.isin(labels, structure_labels).astype(np.float32)[None], case.meta["pool_kji"])[None]
    return F.max_pool3d(share, (1, 3, 3), 1, (0, 1, 1))[0, 0].numpy() > 0.1


def near_other_lesions(masks: np.ndarray, present: list[int], own: int) -> np.ndarray:
    """Cells within one cell of the lesion of a finding in ``present`` other than ``own``
    (``masks``: the case's pooled lesion masks (F, k, j, i), any coverage counting as lesion)."""
    others = [n for n in present if n != own]
    if not others:
        return np.zeros(masks.shape[1:], bool)
    lesion = torch.from_numpy((masks[others] > 0).any(0).astype(np.float32))[None, None]
    return F.max_pool3d(lesion, 3, 1, 1)[0, 0].numpy() > 0


def peak_on_other_lesion(
    cell_map: np.ndarray, inside: np.ndarray, masks: np.ndarray, present: list[int], own: int
) -> int | None:
    """The index of a finding in ``present`` (other than ``own``) whose lesion lies within one cell
    of ``cell_map``'s highest seen cell; None when the peak is on no other lesion."""
    peak = np.unravel_index(np.argmax(np.where(inside, cell_map, -np.inf)), cell_map.shape)
    for n in present:
        if n != own and near_other_lesions(masks, [n], own)[peak]:
            return n
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--cases", required=True, help="a folder of synthetic cases (as for orthoknee evaluate)")
    parser.add_argument(
        "--cache", default=default_cache_dir(), help="feature cache (default $ORTHOKNEE_CACHE, as for the CLI)"
    )
    args = parser.parse_args(argv)

    bundle = Bundle.open(args.bundle)
    kind, heads = load_heads(bundle, device="cpu")
    if kind != "diffusion-heads":
        parser.error(f"{args.bundle} has no finding head (its heads are {kind})")
    catalog = bundle.catalog
    rows: dict[str, list[dict]] = {k: [] for k in catalog.finding_keys}
    seen: list[int] = []
    for folder in find_cases([args.cases]):
        case = CachedCase(cache_case(bundle, folder, args.cache, views=views_fused(kind, heads)))
        result = run_heads(heads, case.fusion_inputs())
        values, known = case.finding_targets(catalog)
        annotated = set(case.meta["annotated"])
        labels = np.asarray(case.array("labels_fusion"))  # read once: several findings' sites use it
        inside = result["cells_inside"]
        seen.append(int(inside.sum()))
        present = [
            n for n in range(len(catalog.findings)) if known[n] and values[n] and (case.pooled_masks[n] > 0).any()
        ]
        for n, finding in enumerate(catalog.findings):
            if not known[n]:
                continue
            cell_map, lesion = result["cell_probabilities"][n], case.pooled_masks[n] >= 0.5
            cells = cell_map[inside]
            top = np.sort(cells)[::-1]
            row = {
                "y": int(values[n]),
                "score": float(result["finding_probabilities"][n]),
                "max": float(top[0]),
                "top30": float(top[:30].mean()),
                "above": int((cells > 0.5).sum()),
                "lesion": int(lesion.sum()),
            }
            if not values[n]:
                other = peak_on_other_lesion(cell_map, inside, case.pooled_masks, present, n)
                row["peak_on"] = None if other is None else catalog.findings[other].key
                row["chance"] = float(near_other_lesions(case.pooled_masks, present, n)[inside].mean())
            if values[n] and (lesion & inside).any():
                best = cell_map[lesion & inside].max()
                row["outranked_by"] = int((cell_map[inside & (case.pooled_masks[n] == 0)] > best).sum())
            if finding.structures and set(finding.structures) <= annotated:
                site = (
                    true_site(case, labels, [s.label for s in catalog.structures if s.key in finding.structures])
                    & inside
                )
                row["site_max"] = float(cell_map[site].max()) if site.any() else 0.0
            rows[finding.key].append(row)
    if not seen:
        parser.error(f"no cases in {args.cases}")
    print(f"bundle {args.bundle}, cases {args.cases}")
    print(
        "| finding | AUC head | AUC max cell | AUC top-30 mean | AUC cells > 0.5 | cells > 0.5 with | without "
        "| lesion cells (>= half covered) | lesions with none |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, found in rows.items():
        y = [r["y"] for r in found]
        aucs = [roc_auc([r[m] for r in found], y) for m in ("score", "max", "top30", "above")]
        pos = [r for r in found if r["y"]]
        print(
            f"| {key} | "
            + " | ".join(f"{a:.2f}" if a is not None else "-" for a in aucs)
            + f" | {_range([r['above'] for r in pos])} | {_range([r['above'] for r in found if not r['y']])}"
            + f" | {_range([r['lesion'] for r in pos])} | {sum(r['lesion'] == 0 for r in pos)} of {len(pos)} |"
        )
    print()
    print(
        f"| finding | cells above the lesion's best cell, median (range), of ~{int(np.median(seen))} seen | "
        "AUC max cell in the true site | cases annotating the site (with the finding) |"
    )
    print("|---|---|---|---|")
    for key, found in rows.items():
        ranked = [r["outranked_by"] for r in found if "outranked_by" in r]
        sited = [r for r in found if "site_max" in r]
        auc = roc_auc([r["site_max"] for r in sited], [r["y"] for r in sited]) if sited else None
        print(
            f"| {key} | {_median_range(ranked)} | "
            + (f"{auc:.2f}" if auc is not None else "-")
            + f" | {len(sited)} ({sum(r['y'] for r in sited)}) |"
        )
    print()
    print(
        "| finding | cases without it | their map peaks on another finding's lesion | a random seen cell would "
        "(expected cases) | on which |"
    )
    print("|---|---|---|---|---|")
    for key, found in rows.items():
        negatives = [r for r in found if not r["y"]]
        hits = [r["peak_on"] for r in negatives if r.get("peak_on")]
        which = ", ".join(f"{k} {hits.count(k)}" for k in sorted(set(hits), key=lambda k: -hits.count(k)))
        chance = sum(r["chance"] for r in negatives)
        print(f"| {key} | {len(negatives)} | {len(hits)} | {chance:.1f} | {which or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
