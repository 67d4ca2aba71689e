"""How much of a structure a model finds at each depth below the tibia's top, and how deep each
labelled source shows it.

    ORTHOKNEE_CACHE=/work/data/cache python bench/depth_recall.py --bundle B [B2 ...] --cases DIR
        [--structure fibula] [--band-mm 15] [--shared ../shared/data] [--max-cases N]

The fibula is labelled by two sources only, one subject each: the heads learn it from the SPL
atlas and are scored on pymskt. A low Dice there could be a field of view (the training map may
stop above where the scored one still shows the structure) or a drawing too thin everywhere.
First table: for each source map that labels the structure, its volume and how far below the
tibia's most superior voxel it and the map's field of view reach. Second: per bundle, the
truth's share and the recall (as `orthoknee predict` labels it) in bands of depth below the
tibia's top, pooled over the cases, with the precision. Depth is along the patient's superior
axis (LPS +z), which the synthetic renders and both source maps keep upright.
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
from OrthoKneeLib.model.heads import Grid, grid_of  # noqa: E402
from OrthoKneeLib.postprocess import finish_prediction  # noqa: E402
from OrthoKneeLib.predict import load_heads, run_on_cached, views_fused  # noqa: E402
from OrthoKneeLib.synth.sources import SOURCES, load_source_maps, map_labels  # noqa: E402
from OrthoKneeLib.train import CachedCase, cache_case, find_cases  # noqa: E402


def superior_mm(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Patient-superior coordinate (LPS z, mm) of each voxel of ``mask`` (k, j, i), in
    ``np.argwhere`` order, which is also the order of ``array[mask]``."""
    matrix = grid.index_to_physical()
    ijk = np.argwhere(mask)[:, ::-1].astype(np.float64)
    return ijk @ matrix[2, :3] + matrix[2, 3]


def field_depth_mm(grid: Grid, tibia_top_mm: float) -> float:
    """How far below the tibia's top the grid reaches: its lowest voxel centre, in mm."""
    corners = np.array(
        [[i, j, k] for i in (0, grid.size[0] - 1) for j in (0, grid.size[1] - 1) for k in (0, grid.size[2] - 1)],
        np.float64,
    )
    matrix = grid.index_to_physical()
    return float(tibia_top_mm - (corners @ matrix[2, :3] + matrix[2, 3]).min())


def recall_by_band(depth_mm: np.ndarray, found: np.ndarray, band_mm: float, n_bands: int) -> list[tuple[int, int]]:
    """(true voxels, found voxels) per band of depth; the last band takes everything deeper."""
    index = np.clip(np.floor(depth_mm / band_mm).astype(int), 0, n_bands - 1)
    return [(int((index == b).sum()), int(found[index == b].sum())) for b in range(n_bands)]


def source_rows(shared: Path, key: str, catalog) -> list[str]:
    label, tibia = catalog.structure(key).label, catalog.structure("tibia").label
    rows = []
    for source, spec in SOURCES.items():
        if key not in spec.structures.values():
            rows.append(f"| {source} | (labels no {key}) | | | | |")
            continue
        for m in load_source_maps(shared / spec.shared_folder, source):
            labels = map_labels(m.source, sitk.GetArrayFromImage(m.image))[0]
            grid = grid_of(m.image)
            top = superior_mm(labels == tibia, grid).max()
            depth = top - superior_mm(labels == label, grid)
            ml = float((labels == label).sum() * np.prod(grid.spacing) / 1000)
            rows.append(
                f"| {source}: {m.path.name} | {ml:.1f} | {depth.min():.1f} | {depth.max():.1f} | "
                f"{field_depth_mm(grid, top):.1f} | {float(np.median(depth)):.1f} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", nargs="+", required=True)
    parser.add_argument("--cases", required=True, help="a folder of synthetic cases (as for orthoknee evaluate)")
    parser.add_argument("--structure", default="fibula")
    parser.add_argument("--band-mm", type=float, default=15.0)
    parser.add_argument("--bands", type=int, default=5, help="the last band takes everything deeper")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--max-cases", type=int)
    parser.add_argument(
        "--cache", default=default_cache_dir(), help="feature cache (default $ORTHOKNEE_CACHE, as for the CLI)"
    )
    args = parser.parse_args(argv)

    bundles = [Bundle.open(p) for p in args.bundle]
    catalog = bundles[0].catalog
    if args.structure not in catalog.structure_keys:
        raise InputError(
            None, f"unknown structure {args.structure!r}.", f"Choose among {list(catalog.structure_keys)}."
        )
    key, label, tibia = args.structure, catalog.structure(args.structure).label, catalog.structure("tibia").label
    print(
        f"| source map | {key} mL | its top, mm below the tibia's top | its bottom | the map's field of view "
        "reaches | median depth |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(source_rows(args.shared, key, catalog)))

    folders = find_cases([args.cases])[: args.max_cases]
    names = [f"{b * args.band_mm:g}-{(b + 1) * args.band_mm:g}" for b in range(args.bands - 1)]
    names.append(f">= {(args.bands - 1) * args.band_mm:g}")
    print(
        f"\nRecall of the {key} by depth below the tibia's top (mm), pooled over the cases that label it; "
        "each cell: share of the true voxels / recall"
    )
    print("| bundle | cases | " + " | ".join(names) + " | precision | Dice (pooled) |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for path, bundle in zip(args.bundle, bundles):
        kind, model = load_heads(bundle, device="cpu")
        totals = np.zeros((args.bands, 2), np.int64)
        predicted = true_positive = cases = 0
        for folder in folders:
            case = CachedCase(cache_case(bundle, folder, args.cache, views=views_fused(kind, model)))
            truth = np.asarray(case.array("labels_reference"))
            if key not in case.meta["annotated"] or not (truth == label).any():
                continue
            probs = run_on_cached(kind, model, case)["probabilities"]
            pred = finish_prediction(probs, case.reference_grid, catalog)[1] == label
            grid = case.reference_grid
            depth = superior_mm(truth == tibia, grid).max() - superior_mm(truth == label, grid)
            totals += np.array(recall_by_band(depth, pred[truth == label], args.band_mm, args.bands))
            predicted += int(pred.sum())
            true_positive += int((pred & (truth == label)).sum())
            cases += 1
        if not cases:
            print(f"| {Path(path).name} | 0 | (no case labels the {key}) |")
            continue
        cells = [f"{n / max(totals[:, 0].sum(), 1):.2f} / {(f / n if n else float('nan')):.2f}" for n, f in totals]
        dice = 2 * true_positive / (predicted + totals[:, 0].sum())
        print(
            f"| {Path(path).name} | {cases} | "
            + " | ".join(cells)
            + f" | {true_positive / max(predicted, 1):.2f} | {dice:.3f} |"
        )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except OrthoKneeError as error:
        raise SystemExit(f"error: {error}")
