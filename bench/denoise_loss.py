"""How well two bundles' backbones denoise series they never trained on, at fixed noise levels.

    python bench/denoise_loss.py --bundles A B --data DIR... [--view sagittal] [--patches 64]

The backbones are pretrained by denoising; their decoder features are what the heads read. A
backbone trained longer should predict the noise better on held-out series, and most of all at
the timesteps the features are taken at (the bundle's `features.timesteps`). Every bundle sees
the same patches and the same noise (fixed seeds), so the differences are the backbones' alone.
Prints the mean squared error of the predicted noise per timestep for each bundle and the ratio
B / A (below 1: B denoises better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.bundle import Bundle  # noqa: E402
from OrthoKneeLib.model.diffusion import _collect_volumes, _sample_patch, to_network  # noqa: E402


def denoise_errors(
    bundle: Bundle, view: str, volumes: list[np.ndarray], timesteps: list[int], patches: int, seed: int = 0
) -> dict[int, float]:
    """Mean squared error of the predicted noise at each timestep, over the same patches and noise."""
    import torch

    unet, scheduler = bundle.load_backbone(view)
    patch_kji = tuple(bundle.view_config(view).patch[::-1])
    errors = {}
    with torch.inference_mode():
        for t in timesteps:
            rng = np.random.default_rng([seed, 1])
            generator = torch.Generator().manual_seed(seed)
            total = 0.0
            for n in range(patches):
                patch = _sample_patch(volumes[n % len(volumes)], patch_kji, rng)
                x = to_network(torch.from_numpy(patch[None, None].astype(np.float32)))
                noise = torch.randn(x.shape, generator=generator)
                step = torch.full((1,), t, dtype=torch.long)
                predicted = unet(scheduler.add_noise(x, noise, step), step)
                total += float(torch.nn.functional.mse_loss(predicted, noise))
            errors[t] = total / patches
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--data", nargs="+", required=True, help="held-out series or synth outputs")
    parser.add_argument("--view", default="sagittal")
    parser.add_argument("--timesteps", type=int, nargs="+", help="default: the bundle's feature timesteps and 500")
    parser.add_argument("--patches", type=int, default=64, help="patches per timestep (the same for both)")
    parser.add_argument("--max-volumes", type=int, default=40)
    args = parser.parse_args(argv)

    bundles = [Bundle.open(b) for b in args.bundles]
    configs = [b.view_config(args.view) for b in bundles]
    if configs[0] != configs[1]:
        raise SystemExit(
            f"the two bundles' {args.view} backbones differ in architecture; this compares weights of one architecture."
        )
    timesteps = args.timesteps or sorted(set(bundles[0].features["timesteps"].get(args.view, [])) | {500})
    volumes, names = _collect_volumes(args.data, configs[0], reformat_others=False, max_volumes=args.max_volumes)
    print(f"{len(volumes)} {args.view} volumes ({names[0]} ...), {args.patches} patches per timestep")
    results = []
    for path, bundle in zip(args.bundles, bundles):
        start = time.perf_counter()
        results.append(denoise_errors(bundle, args.view, volumes, timesteps, args.patches))
        training = bundle.metadata["views"][args.view].get("training") or {}
        steps, started = training.get("steps"), (training.get("started_from") or {}).get("steps")
        total = steps + started if steps is not None and started else steps
        print(
            f"{path}: {bundle.metadata.get('version')}, {total} pretraining steps, {time.perf_counter() - start:.0f} s"
        )
    print("\n| timestep | A: noise MSE | B: noise MSE | B / A |\n|---|---|---|---|")
    for t in timesteps:
        a, b = results[0][t], results[1][t]
        print(f"| {t} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
