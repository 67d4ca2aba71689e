"""Which knee each labelled source shows, told from its own label map as the Predictor tells it.

    python bench/label_sides.py [--shared ../shared/data]

The heads learn the menisci and the fibula from the sources that label them; if those are all
one knee, medial and lateral are learnt for that side only (model card, "Medial and lateral
menisci"). For each source map with a fibula this prints the side that
``postprocess.knee_side`` reads from the fibula, and where the fibula's and each meniscus's
centres lie against the tibia's (LPS millimetres: +x is the patient's left, +y posterior, +z
superior), so the rule can be checked on reference labels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.labels import DEFAULT_CATALOG  # noqa: E402
from OrthoKneeLib.model.heads import grid_of  # noqa: E402
from OrthoKneeLib.postprocess import knee_side  # noqa: E402
from OrthoKneeLib.synth.sources import SOURCES, load_source_maps, map_labels  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    keys = ("fibula", "medial_meniscus", "lateral_meniscus")
    print(f"{'source map':<58} {'side':>6}  " + "  ".join(f"{k + ' x, y, z':>26}" for k in keys))
    for source, spec in SOURCES.items():
        if "fibula" not in spec.structures.values():
            print(f"{source:<58} {'-':>6}  (the source labels no fibula)")
            continue
        for m in load_source_maps(Path(args.shared) / spec.shared_folder, source):
            labels = map_labels(m.source, sitk.GetArrayFromImage(m.image))[0]
            grid = grid_of(m.image)
            side = knee_side(labels, grid, DEFAULT_CATALOG)
            matrix = grid.index_to_physical()

            def centre(key: str) -> np.ndarray:
                idx = np.argwhere(labels == DEFAULT_CATALOG.structure(key).label).mean(0)[::-1]
                return matrix[:3, :3] @ idx + matrix[:3, 3]

            tibia = centre("tibia")
            cells = ["{:>8.1f}{:>9.1f}{:>9.1f}".format(*(centre(k) - tibia)) for k in keys]
            print(f"{source + ': ' + m.path.name:<58} {side.side or '?':>6}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
