"""One corrected case fine-tunes the shipped bundle: the case moves toward the correction, other cases do not suffer.

    python bench/correction.py [--bundle B] [--steps 60] [--held-out N] [--work DIR]

The annotator's loop on the real bundle: a reader corrects one case (here a render whose true
labels stand in for a perfect correction) and rejects the finding the model scored highest
among those the case does not have; `finetune` continues the bundle's heads on that one case.
Printed: Dice of the corrected case and the rejected finding's probability before and after,
and the mean Dice of held-out renders of another subject before and after, with the drop
against its budget (at most 0.02: a correction must not cost other cases). Renders come from
the pymskt label map (the corrected case) and the OAI maps of subjects the shipped heads never
saw (the held-out cases), both in ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MAX_DROP = 0.02  # mean held-out Dice may fall by at most this much


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-4, help="the Slicer module's fine-tuning rate")
    parser.add_argument("--anchor", type=float, default=1.0, help="L2-SP weight (the Slicer module's)")
    parser.add_argument(
        "--hard-negative-cells",
        type=int,
        default=32,
        help="K highest cells away from any lesion in the cell loss (the Slicer module's; 0: off)",
    )
    parser.add_argument("--held-out", type=int, default=4, help="held-out renders scored before and after")
    parser.add_argument("--work", type=Path, help="keep renders and features here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from OrthoKneeLib.bundle import Bundle
    from OrthoKneeLib.cachedcase import cache_case, find_cases
    from OrthoKneeLib.evaluate import evaluate_bundle
    from OrthoKneeLib.resources import demo_bundle_dir
    from OrthoKneeLib.synth import SynthConfig, synthesize
    from OrthoKneeLib.train import FinetuneConfig, finetune

    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle or demo_bundle_dir())
    planes = tuple(bundle.metadata["heads"]["config"]["view_channels"])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        pymskt = {"source": "pymskt", "val_fraction": 0.0, "contact_sheets": False, "prevalence": 0.5}
        synthesize(args.shared / "labels-pymskt", work / "corrected", SynthConfig(n=1, seed=31, **pymskt))
        # OAI subjects of the seed-123 split's validation side: never seen by the shipped heads
        oai = {"source": "oai", "contact_sheets": False, "prevalence": 0.5}
        synthesize(args.shared / "labels-oai", work / "oai", SynthConfig(n=35, seed=123, **oai))
        held = find_cases([work / "oai"], "validation")[: args.held_out]
        case_folder = find_cases([work / "corrected"], "all")[0]
        cache = work / "cache"

        def scores(b: Bundle, folders: list) -> dict:
            return evaluate_bundle(b, folders, cache, device="cpu", with_hd95=False)

        before_case = scores(bundle, [case_folder])
        probabilities = before_case["per_case"][0]["findings"]
        truth = before_case["per_case"][0]["finding_truth"]
        absent = {k: p for k, p in probabilities.items() if truth.get(k) == 0}
        rejected = max(absent, key=absent.get)
        meta_path = case_folder / "case.json"
        meta = json.loads(meta_path.read_text())
        meta["findings"][rejected]["present"] = 0  # the reader's rejection (the render agrees)
        meta_path.write_text(json.dumps(meta))
        before_held = scores(bundle, held)
        t = time.perf_counter()
        entry = cache_case(bundle, case_folder, cache, views=planes)  # case.json changed: a new entry
        config = FinetuneConfig(
            steps=args.steps,
            validation_cases=0,
            seed=5,
            learning_rate=args.lr,
            anchor=args.anchor,
            hard_negative_cells=args.hard_negative_cells,
        )
        out = work / "corrected-bundle"
        shutil.rmtree(out, ignore_errors=True)  # this benchmark's own scratch bundle
        Path(f"{out}.checkpoint.pt").unlink(missing_ok=True)
        new = finetune(bundle, [entry], out, config, device="cpu", log=lambda *_: None)
        seconds = time.perf_counter() - t
        after_case = scores(new, [case_folder])
        after_held = scores(new, held)
    case_dice = (before_case["mean_dice"], after_case["mean_dice"])
    p_rejected = (probabilities[rejected], after_case["per_case"][0]["findings"][rejected])
    drop = before_held["mean_dice"] - after_held["mean_dice"]
    print(
        f"bundle {bundle.metadata.get('version')} (heads on {', '.join(planes)}), one corrected case "
        f"({case_folder.name}), {args.steps} steps (lr {args.lr:g}, anchor {args.anchor:g}, hard negatives "
        f"{args.hard_negative_cells}) in {seconds:.0f} s, "
        f"{args.threads} threads"
    )
    print(f"  corrected case: mean Dice {case_dice[0]:.3f} -> {case_dice[1]:.3f}")
    print(f"  rejected finding {rejected}: p {p_rejected[0]:.3f} -> {p_rejected[1]:.3f}")
    print(
        f"  {len(held)} held-out renders (other subjects): mean Dice {before_held['mean_dice']:.3f} -> "
        f"{after_held['mean_dice']:.3f}, drop {drop:+.3f} = {max(drop, 0) / MAX_DROP:.2f} x the {MAX_DROP} budget"
    )
    moved = [
        abs(b["findings"][k] - a["findings"][k])
        for b, a in zip(before_held["per_case"], after_held["per_case"])
        for k in b["findings"]
    ]
    print(f"    their finding probabilities moved by {np.mean(moved):.3f} on average (at most {np.max(moved):.3f})")
    for key in before_held["dice"]:
        d0, d1 = before_held["dice"][key], after_held["dice"].get(key, np.nan)
        print(f"    {key:<22} {d0:.3f} -> {d1:.3f}")
    met = case_dice[1] > case_dice[0] and p_rejected[1] < p_rejected[0] and drop <= MAX_DROP
    print("closer to the correction, held-out Dice kept: " + ("met" if met else "NOT met"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
