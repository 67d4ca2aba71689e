"""Where a model's wrong voxels lie, by distance to the true structure, on synthetic cases.

    ORTHOKNEE_CACHE=/work/data/cache python bench/error_distance.py --bundle B [B2 ...] --cases DIR
        [--structures femoral_cartilage tibial_cartilage patellar_cartilage] [--max-cases N]

Per bundle and structure, as fractions of the true volume: false-positive voxels within one
voxel (0.7 mm) of the structure, where thick slices blur every edge (bench/dice_ceiling.py);
false positives 0.7-4.5 mm *beside* the structure in the same slice (a plate drawn too long or
too thick); all other false positives (another slice, or far away); and false negatives. The
first kind the partial-volume ceiling shares; the second is the model's own misreading.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.bundle import Bundle  # noqa: E402
from OrthoKneeLib.errors import InputError, OrthoKneeError  # noqa: E402
from OrthoKneeLib.featurecache import default_cache_dir  # noqa: E402
from OrthoKneeLib.predict import load_heads, run_on_cached, views_fused  # noqa: E402
from OrthoKneeLib.train import CachedCase, cache_case, find_cases  # noqa: E402

NEAR_MM, BESIDE_MM = 0.7, 4.5


def distance_to(mask: np.ndarray, spacing_ijk, in_slice: bool = False) -> np.ndarray:
    """Distance (mm) of every voxel to ``mask`` (k, j, i); with ``in_slice``, within its own slice
    only (a slice without the structure is infinitely far)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_ijk[:2]) + ((1e6,) if in_slice else (float(spacing_ijk[2]),)))
    d = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(d))


def error_bands(pred: np.ndarray, truth: np.ndarray, spacing_ijk) -> dict[str, int]:
    """Voxel counts: truth, false positives near / beside in the slice / elsewhere, false negatives."""
    fp, fn = pred & ~truth, truth & ~pred
    d3, d2 = distance_to(truth, spacing_ijk), distance_to(truth, spacing_ijk, in_slice=True)
    near = fp & (d3 <= NEAR_MM)
    beside = fp & ~near & (d2 <= BESIDE_MM)
    return {
        "truth": int(truth.sum()),
        "fp_near": int(near.sum()),
        "fp_beside": int(beside.sum()),
        "fp_other": int((fp & ~near & ~beside).sum()),
        "fn": int(fn.sum()),
        "tp": int((pred & truth).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", nargs="+", required=True)
    parser.add_argument("--cases", required=True, help="a folder of synthetic cases (as for orthoknee evaluate)")
    parser.add_argument(
        "--structures", nargs="+", default=["femoral_cartilage", "tibial_cartilage", "patellar_cartilage"]
    )
    parser.add_argument("--max-cases", type=int)
    parser.add_argument(
        "--cache", default=default_cache_dir(), help="feature cache (default $ORTHOKNEE_CACHE, as for the CLI)"
    )
    args = parser.parse_args(argv)

    folders = find_cases([args.cases])[: args.max_cases]
    print(
        "| bundle | structure | cases | FP within 0.7 mm | FP 0.7-4.5 mm beside, same slice | FP elsewhere "
        "| FN | Dice (pooled voxels) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.bundle:
        bundle = Bundle.open(path)
        catalog = bundle.catalog
        unknown = [s for s in args.structures if s not in catalog.structure_keys]
        if unknown:
            raise InputError(None, f"unknown structures {unknown}.", f"Choose among {list(catalog.structure_keys)}.")
        kind, model = load_heads(bundle, device="cpu")
        label = {s.key: s.label for s in catalog.structures}
        totals = {s: {} for s in args.structures}
        cases = {s: 0 for s in args.structures}
        for folder in folders:
            case = CachedCase(cache_case(bundle, folder, args.cache, views=views_fused(kind, model)))
            probs = run_on_cached(kind, model, case)["probabilities"]
            pred, truth = probs.argmax(0), np.asarray(case.array("labels_reference"))
            for key in args.structures:
                if key not in case.meta["annotated"] or not (truth == label[key]).any():
                    continue
                bands = error_bands(pred == label[key], truth == label[key], case.reference_grid.spacing)
                totals[key] = {k: totals[key].get(k, 0) + v for k, v in bands.items()}
                cases[key] += 1
        for key, t in totals.items():
            if not t:
                continue
            share = {k: t[k] / t["truth"] for k in ("fp_near", "fp_beside", "fp_other", "fn")}
            dice = 2 * t["tp"] / (2 * t["tp"] + t["fp_near"] + t["fp_beside"] + t["fp_other"] + t["fn"])
            print(
                f"| {Path(path).name} | {key} | {cases[key]} | {share['fp_near']:.2f} | {share['fp_beside']:.2f} | "
                f"{share['fp_other']:.2f} | {share['fn']:.2f} | {dice:.3f} |"
            )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except OrthoKneeError as error:
        raise SystemExit(f"error: {error}")
