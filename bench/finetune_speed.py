"""Head fine-tuning on cached features: wall time for N cases against the 60-second budget.

    python bench/finetune_speed.py --cache DIR [--bundle B] [--cases 10] [--steps N] [--from-scratch] [--threads N]

The annotator's loop: an annotator corrected N cases and fine-tunes the bundle's heads on them.
Uses the first N complete entries of a feature cache (made by `orthoknee finetune` or
`orthoknee evaluate`), continues from the bundle's heads (or fresh heads with --from-scratch)
for the given steps, two per case by default (no validation passes), and prints seconds,
seconds per step, the ratio to the budget, and the training loss.
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

BUDGET_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--steps", type=int, help="default: two per case")
    parser.add_argument("--from-scratch", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    from OrthoKneeLib.bundle import Bundle
    from OrthoKneeLib.resources import demo_bundle_dir
    from OrthoKneeLib.train import FinetuneConfig, finetune

    torch.set_num_threads(args.threads)
    caches = sorted(p.parent for p in args.cache.glob("*/meta.json"))[: args.cases]
    if len(caches) < args.cases:
        print(f"only {len(caches)} cached cases in {args.cache}", file=sys.stderr)
    bundle = Bundle.open(args.bundle or demo_bundle_dir())
    args.steps = args.steps or 2 * len(caches)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        config = FinetuneConfig(steps=args.steps, from_scratch=args.from_scratch, validation_cases=0)
        result = finetune(bundle, caches, Path(out) / "b", config, device="cpu", log=lambda *_: None)
        seconds = time.perf_counter() - t
    training = result.metadata["heads"]["training"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = "fresh heads" if training["started_from"] is None else f"from the heads of {bundle.metadata['version']}"
    print(f"finetune heads ({start}): {len(caches)} cached cases, {args.steps} steps, {args.threads} threads")
    print(
        f"  {seconds:.1f} s total (incl. loading the cache and writing the bundle), "
        f"{training['seconds'] / args.steps:.2f} s/step = {seconds / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget"
    )
    print(
        f"  loss {training['first_loss']:.3f} -> {training['final_loss']:.3f} (mean of the first / last "
        f"{training['loss_average_steps']} steps), peak RSS {rss:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
