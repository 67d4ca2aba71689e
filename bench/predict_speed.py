"""End-to-end cost of one three-view case: ``Predictor.predict`` plus ``Prediction.save``.

    python bench/predict_speed.py [--bundle B] [--case FOLDER_OR_SAMPLE] [--threads N]

Runs in a fresh process (so peak RSS is this case's own) on the shipped real sample case by
default (or a synthetic case folder), prints seconds per stage, the total against the
30-second budget, and peak resident memory against the 4 GiB budget.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUDGET_S = 30.0
BUDGET_RSS_MB = 4096.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--case", type=Path, help="synthetic case folder (default: the shipped sample case)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--native",
        type=Path,
        nargs="?",
        const=REPO.parent / "shared" / "data" / "dess-pykneer",
        metavar="DICOM_FOLDER",
        help="a clinical series at native resolution (default: the real DESS, 512 x 512 x 80) with 3 mm "
        "coronal and axial reformats of it; budget 20 s and 3 GiB",
    )
    args = parser.parse_args()
    global BUDGET_S, BUDGET_RSS_MB
    if args.native:
        BUDGET_S, BUDGET_RSS_MB = 20.0, 3072.0

    import torch

    from OrthoKneeLib.predict import Predictor
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir
    from OrthoKneeLib.volumes import Case, load_volume

    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory()
    if args.native:  # the other two series, made before the clock starts: a user has them as files
        import SimpleITK as sitk

        from OrthoKneeLib.volumes import reformat

        for plane in ("coronal", "axial"):
            image = reformat(load_volume(args.native), plane, 0.625, 3.0)
            sitk.WriteImage(image, str(Path(scratch.name) / f"{plane}.nrrd"))
    t0 = time.perf_counter()
    if args.native:
        views = {"sagittal": load_volume(args.native)}
        views.update({p: load_volume(Path(scratch.name) / f"{p}.nrrd") for p in ("coronal", "axial")})
        case = Case(**views, name="native DESS")
    elif args.case:
        from OrthoKneeLib.synth.dataset import read_case

        case = read_case(args.case).case
    else:
        folder = sample_case_dir()
        case = Case(**{p: load_volume(folder / n) for p, n in SAMPLE_VIEWS.items()}, name="sample")
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    predictor = Predictor(args.bundle, device="cpu")
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    prediction = predictor.predict(case)
    predict_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        prediction.save(out)
        save_s = time.perf_counter() - t
    total = load_s + open_s + predict_s + save_s
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sizes = {p: "x".join(map(str, v.size)) for p, v in case.views.items()}
    print(f"case {case.name}: {sizes}, {args.threads} threads, bundle {predictor.bundle.metadata['version']}")
    print(f"  read series          {load_s:6.2f} s")
    print(f"  open bundle          {open_s:6.2f} s")
    for k, v in prediction.timings.items():
        if k != "total":
            print(f"    {k:<20} {v:6.2f} s")
    print(f"  predict              {predict_s:6.2f} s")
    print(f"  save                 {save_s:6.2f} s")
    print(f"  total                {total:6.2f} s  = {total / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")
    print(
        f"  peak RSS             {rss:6.0f} MB = {rss / BUDGET_RSS_MB:.2f} x the {BUDGET_RSS_MB / 1024:.0f} GiB budget"
    )
    gflops = _matmul_gflops(torch)
    model_s = sum(v for k, v in prediction.timings.items() if k.startswith("features") or k == "heads")
    print(
        f"  fp32 matmul          {gflops:6.0f} GFLOP/s measured now; model stages {model_s:.1f} s of {predict_s:.1f} s"
    )
    return 0


def _matmul_gflops(torch, n: int = 1024, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate now (the machine is noisy: compare stage times against it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


if __name__ == "__main__":
    sys.exit(main())
