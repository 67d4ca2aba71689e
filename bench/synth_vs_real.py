"""How rendered contrasts compare with the real series they imitate.

    python bench/synth_vs_real.py [--cases DIR]

Normalises each series the way the model will (robust percentiles of the foreground) and
prints foreground intensity quantiles for the real DESS, the real MESE (echo 1 and 3) and the
synthetic sagittal series of each contrast found under --cases. Close quantiles mean similar
overall brightness structure; they do not say the anatomy looks alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from OrthoKneeLib.volumes import load_volume, normalize_intensity  # noqa: E402

QUANTILES = (10, 25, 50, 75, 90, 99)


def profile(image: sitk.Image) -> np.ndarray:
    a = sitk.GetArrayFromImage(normalize_intensity(image))
    fg = a[a > 0.02]
    return np.percentile(fg, QUANTILES)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cases", type=Path, help="a folder written by `orthoknee synth`")
    args = parser.parse_args()
    rows = [
        ("real DESS", profile(load_volume(args.data / "dess-pykneer").image)),
        ("real MESE echo 1", profile(load_volume(args.data / "mese-pymskt", echo=1).image)),
        ("real MESE echo 3", profile(load_volume(args.data / "mese-pymskt", echo=3).image)),
    ]
    if args.cases:
        by_contrast: dict[str, list[np.ndarray]] = {}
        for meta_path in sorted((args.cases / "cases").glob("*/case.json"))[:60]:
            contrast = json.loads(meta_path.read_text())["contrast"]["contrast"]
            by_contrast.setdefault(contrast, []).append(profile(sitk.ReadImage(str(meta_path.parent / "sagittal.nrrd"))))
        for contrast, profiles in sorted(by_contrast.items()):
            rows.append((f"synthetic {contrast} (n={len(profiles)})", np.mean(profiles, axis=0)))
    print(f"{'series':28}" + "".join(f"{'p' + str(q):>8}" for q in QUANTILES))
    for name, values in rows:
        print(f"{name:28}" + "".join(f"{v:8.3f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
