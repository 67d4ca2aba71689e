"""Backbone cost: feature extraction for one view at 1x, 2x and 4x the voxels.

    python bench/backbone_speed.py [--bundle B] [--plane sagittal] [--threads N]

Prints, per size: seconds per view (all feature timesteps), FLOP counted by torch's
FlopCounterMode, achieved FLOP/s, the machine's measured fp32 matmul FLOP/s, their ratio
(the efficiency), and peak resident memory. Each size runs in its own process so that peak
memory is that size's own. Cost should grow linearly with the voxels (sliding windows).
Budget: the 1x view (a sagittal series at the model's spacing) in 15 s, a third of what a
three-view prediction may spend on features within its 30-second budget (bench/predict_speed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BUDGET_1X_S = 15.0

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def view_shape(factor: int) -> tuple[int, int, int]:
    """[k, j, i] at model spacing: 1x is a 160 x 160 mm field of view, 40 slices of 3 mm."""
    k, j, i = 40, 160, 160
    if factor == 2:
        k *= 2
    elif factor == 4:
        k, j = k * 2, j * 2
    return k, j, i


def run_one(args) -> dict:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from OrthoKneeLib.bundle import DEFAULT_FEATURES, Bundle
    from OrthoKneeLib.model.diffusion import ViewModelConfig, build_scheduler, build_unet
    from OrthoKneeLib.model.features import FeatureExtractor

    torch.set_num_threads(args.threads)
    if args.bundle:
        bundle = Bundle.open(args.bundle)
        unet, scheduler = bundle.load_backbone(args.plane)
        config = bundle.view_config(args.plane)
        features = bundle.features
    else:
        config = ViewModelConfig(plane=args.plane)
        unet, scheduler, features = build_unet(config).eval(), build_scheduler(config), DEFAULT_FEATURES
    timesteps = features["timesteps"]
    timesteps = timesteps[args.plane] if isinstance(timesteps, dict) else timesteps
    extractor = FeatureExtractor(
        unet, scheduler, timesteps, features["budget_per_block"], window_ijk=config.window, overlap=features["overlap"]
    )
    view = np.random.default_rng(0).uniform(-1, 1, view_shape(args.factor)).astype(np.float32)
    small = view[: config.window[2], : config.window[1], : config.window[0]]
    extractor(small)  # warm-up
    with FlopCounterMode(display=False) as counter:
        extractor(view)
    flops = counter.get_total_flops()
    start = time.perf_counter()
    out = extractor(view)
    seconds = time.perf_counter() - start
    return {
        "factor": args.factor,
        "shape_kji": list(view.shape),
        "voxels": int(view.size),
        "seconds": seconds,
        "flops": flops,
        "flop_per_s": flops / seconds,
        "feature_channels": int(out.shape[0]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_flop_per_s": matmul_flops(),
        "threads": args.threads,
        "config": {
            "channels": list(config.channels),
            "window": list(config.window),
            "timesteps": timesteps,
            "overlap": features["overlap"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--plane", default="sagittal")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--factor", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.factor:
        print(json.dumps(run_one(args)))
        return 0
    rows = []
    for factor in (1, 2, 4):
        cmd = [sys.executable, __file__, "--factor", str(factor), "--plane", args.plane, "--threads", str(args.threads)]
        if args.bundle:
            cmd += ["--bundle", str(args.bundle)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        f"backbone {args.plane}: channels {base['config']['channels']}, window {base['config']['window']} (i,j,k), overlap {base['config']['overlap']}, "
        f"timesteps {base['config']['timesteps']}, {base['threads']} threads, {base['feature_channels']} feature channels"
    )
    print(
        f"{'size':>5} {'voxels':>10} {'s/view':>8} {'x time':>7} {'GFLOP':>8} {'GFLOP/s':>8} "
        f"{'matmul GFLOP/s':>15} {'efficiency':>10} {'peak RSS MB':>12}"
    )
    for r in rows:
        print(
            f"{r['factor']:>4}x {r['voxels']:>10} {r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>7.2f} "
            f"{r['flops'] / 1e9:>8.1f} {r['flop_per_s'] / 1e9:>8.1f} {r['matmul_flop_per_s'] / 1e9:>15.1f} "
            f"{r['flop_per_s'] / r['matmul_flop_per_s']:>10.1%} {r['peak_rss_mb']:>12.0f}"
        )
    print(
        f"1x view: {base['seconds']:.1f} s = {base['seconds'] / BUDGET_1X_S:.2f} x the {BUDGET_1X_S:.0f}-second budget"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
