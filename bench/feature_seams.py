"""Window seams in the backbone features: tiled slices against windows spanning the slices.

    python bench/feature_seams.py CASE_DIR [--bundle B] [--planes sagittal coronal axial] [--threads N]

For each view of a case, the features are extracted twice: with the bundle's windows tiling
the slice axis (16 slices, as bundles before ``span_slices`` did), and with each window
spanning every slice (``span_slices``). Prints, per view and mode, the seconds taken and the
feature change between neighbouring slices relative to its median: its largest value inside
the view (excluding two slices at each end, which are borders either way) and where it is.
Seams between tiled windows show as interior jumps of about 2x; without seams they stay near 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def slice_jumps(features: np.ndarray) -> np.ndarray:
    """Mean absolute feature change between slice k and k+1 (features C, K, J, I), over its median."""
    jumps = np.abs(np.diff(features, axis=1)).mean(axis=(0, 2, 3))
    return jumps / np.median(jumps)


def measure(bundle, case_dir: Path, plane: str, span: bool) -> dict:
    import SimpleITK as sitk

    from OrthoKneeLib.model.diffusion import prepare_view
    from OrthoKneeLib.model.features import FeatureExtractor
    from OrthoKneeLib.predict import view_timesteps

    config = bundle.view_config(plane)
    series = case_dir / f"{plane}.nrrd"
    if not series.is_file():
        raise SystemExit(
            f"{case_dir}: no {plane}.nrrd; give a case folder with that series, or leave {plane} out of --planes"
        )
    view = prepare_view(sitk.ReadImage(str(series)), config)
    unet, scheduler = bundle.load_backbone(plane)
    extractor = FeatureExtractor(
        unet,
        scheduler,
        timesteps=view_timesteps(bundle, plane),
        budget_per_block=bundle.features["budget_per_block"],
        window_ijk=config.window,
        overlap=bundle.features["overlap"],
        seed=bundle.features["seed"],
        span_slices=span,
    )
    start = time.perf_counter()
    try:
        features = extractor(view)
    finally:
        extractor.close()
    seconds = time.perf_counter() - start
    interior = slice_jumps(features)[2:-2]
    worst = int(np.argmax(interior))
    return {"slices": view.shape[0], "seconds": seconds, "max_jump": float(interior[worst]), "at": worst + 2}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", type=Path, help="a case folder with <plane>.nrrd series")
    parser.add_argument("--bundle", default=None, help="default: the shipped demo bundle")
    parser.add_argument("--planes", nargs="+", default=["sagittal", "coronal", "axial"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _table(args)
    finally:
        torch.set_num_threads(threads_before)  # main() also runs inside the test process


def _table(args) -> int:
    from OrthoKneeLib.bundle import Bundle
    from OrthoKneeLib.resources import demo_bundle_dir

    bundle = Bundle.open(args.bundle or demo_bundle_dir())
    print(
        f"{args.case.name}, bundle {bundle.metadata.get('name')} {bundle.metadata.get('version')}, "
        f"{args.threads} threads\n"
    )
    print("| view | slices | windows | seconds | largest interior jump / median | at slice |")
    print("|---|---|---|---|---|---|")
    for plane in args.planes:
        for span in (False, True):
            r = measure(bundle, args.case, plane, span)
            windows = "spanning the slices" if span else f"{bundle.view_config(plane).window[2]} slices"
            print(
                f"| {plane} | {r['slices']} | {windows} | {r['seconds']:.1f} | {r['max_jump']:.2f} | {r['at']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
