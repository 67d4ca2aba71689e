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


def _tile(image: sitk.Image, labels: sitk.Image | None, title: str):
    from PIL import Image, ImageDraw

    from OrthoKneeLib.synth.sheet import outline_slice

    array = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(labels) if labels is not None else None
    k = int(np.argwhere(lab > 0)[:, 0].mean()) if lab is not None and lab.any() else array.shape[0] // 2
    tile = Image.fromarray(outline_slice(array[k], lab[k] if lab is not None else None))
    sx, sy = image.GetSpacing()[:2]
    tile = tile.resize((int(tile.width * sx / 0.5), int(tile.height * sy / 0.5)))  # 0.5 mm per pixel
    ImageDraw.Draw(tile).text((4, 4), title, fill=(255, 255, 0))
    return tile


def save_figure(data: Path, cases: Path, out: Path) -> None:
    """Same scale (0.5 mm/pixel): real DESS mid-sagittal slice, a synthetic DESS case, its outlines."""
    from PIL import Image

    real = load_volume(data / "dess-pykneer").image
    chosen = None
    for meta_path in sorted((cases / "cases").glob("*/case.json")):
        if json.loads(meta_path.read_text())["contrast"]["contrast"] == "dess":
            chosen = meta_path.parent
            break
    if chosen is None:
        raise SystemExit(f"no DESS-contrast case under {cases}")
    synth = sitk.ReadImage(str(chosen / "sagittal.nrrd"))
    labels = sitk.ReadImage(str(chosen / "sagittal_labels.nrrd"))
    tiles = [
        _tile(real, None, "real DESS (pyKNEEr)"),
        _tile(synth, None, f"synthetic DESS {chosen.name}"),
        _tile(synth, labels, "same, labels outlined"),
    ]
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8, max(t.height for t in tiles)))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"figure: {out}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cases", type=Path, help="a folder written by `orthoknee synth`")
    parser.add_argument("--figure", type=Path, help="also save a PNG: a synthetic DESS case beside the real DESS")
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
            by_contrast.setdefault(contrast, []).append(
                profile(sitk.ReadImage(str(meta_path.parent / "sagittal.nrrd")))
            )
        for contrast, profiles in sorted(by_contrast.items()):
            rows.append((f"synthetic {contrast} (n={len(profiles)})", np.mean(profiles, axis=0)))
    if args.figure and args.cases:
        save_figure(args.data, args.cases, args.figure)
    print(f"{'series':28}" + "".join(f"{'p' + str(q):>8}" for q in QUANTILES))
    for name, values in rows:
        print(f"{name:28}" + "".join(f"{v:8.3f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
