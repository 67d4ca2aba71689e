"""A new structure learnt from a few drawn cases: held-out Dice and wall time against the 5-minute budget.

    python bench/new_label.py [--bundle B] [--counts 1 2 5 10] [--steps 200] [--held-out 3] [--work DIR]
                              [--keep VALUE=NAME ...]

The annotator's promise of a frozen backbone: draw a structure the model does not know on a few
cases, fine-tune, and the next bundle segments it. Here the structure is the patellar ligament
of the SPL knee atlas (label 35 of ../shared/data/labels-spl-atlas, which the shipped catalog
lacks): `orthoknee synth --keep-label` renders cases that carry it as an extra label, exactly as
the Slicer module's export carries a segment an annotator added. For each count of labelled
cases the bundle's heads are fine-tuned with `--new-labels` (the segmentation head grows a
class; the finding head is kept) and the new bundle predicts held-out renders, whose
ligament Dice is printed. The budget covers what the annotator waits for after drawing:
caching the cases' features and fine-tuning (rendering stands in for the drawing and is
reported apart). ``--keep`` names other atlas labels (a label set the bundle never learnt, e.g.
the collateral ligaments 33 and 34 with the patellar ligament); each gets its own Dice. Caveat:
the atlas is one volunteer, so held-out cases are other renders (pose, deformation, contrast,
noise) of the same knee, not other knees.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUDGET_S = 300.0  # caching + fine-tuning for 5 cases, 2 CPU cores
TARGET_DICE = 0.6  # held-out Dice of the new structure after 5 cases
LABEL, NAME = 35, "Patellar ligament"


def dice(a, b) -> float:
    inter = float((a & b).sum())
    total = float(a.sum() + b.sum())
    return 2 * inter / total if total else 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--labels", type=Path, default=REPO.parent / "shared" / "data" / "labels-spl-atlas")
    parser.add_argument("--counts", type=int, nargs="+", default=[5])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run")
    parser.add_argument("--held-out", type=int, default=3, help="held-out renders to score")
    parser.add_argument("--work", type=Path, help="keep renders and features here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--keep", nargs="+", metavar="VALUE=NAME", help=f"atlas labels to learn (default: {LABEL}={NAME})"
    )
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk
    import torch

    from OrthoKneeLib.bundle import Bundle
    from OrthoKneeLib.cachedcase import cache_case, find_cases
    from OrthoKneeLib.predict import Predictor
    from OrthoKneeLib.resources import demo_bundle_dir
    from OrthoKneeLib.synth import SynthConfig, synthesize
    from OrthoKneeLib.synth.dataset import read_case
    from OrthoKneeLib.train import FinetuneConfig, finetune

    if not args.labels.is_dir():
        print(f"{args.labels}: the SPL atlas label map is not there (it comes with ../shared/data)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle or demo_bundle_dir())
    planes = tuple(bundle.metadata["heads"]["config"]["view_channels"])
    keep = dict((int(v), n) for v, _, n in (k.partition("=") for k in args.keep)) if args.keep else {LABEL: NAME}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t = time.perf_counter()
        render = {"source": "spl", "val_fraction": 0.0, "contact_sheets": False, "keep_labels": keep}
        synthesize(args.labels, work / "train", SynthConfig(n=max(args.counts), seed=21, **render))
        synthesize(args.labels, work / "held_out", SynthConfig(n=args.held_out, seed=22, **render))
        rendered_s = time.perf_counter() - t
        train = find_cases([work / "train"], "all")
        held_out = find_cases([work / "held_out"], "all")
        print(
            f"new structures: {', '.join(f'{n} (SPL atlas label {v})' for v, n in keep.items())}; "
            f"{len(train)} + {len(held_out)} renders in "
            f"{rendered_s:.0f} s; bundle {bundle.metadata.get('version')}, heads on {', '.join(planes)}; "
            f"{args.steps} steps per run; {args.threads} threads"
        )
        cache_s: list[float] = []
        caches = []
        for case in train:
            t = time.perf_counter()
            caches.append(cache_case(bundle, case, work / "cache", views=planes))
            cache_s.append(time.perf_counter() - t)
        held_cases = [read_case(c) for c in held_out]
        values = {name: int(v) for v, name in held_cases[0].meta["extra_labels"].items()}
        truths = [sitk.GetArrayFromImage(c.labels[c.case.reference_plane]) for c in held_cases]
        rows = []
        for count in args.counts:
            t = time.perf_counter()
            config = FinetuneConfig(
                steps=args.steps, validation_cases=0, new_labels=True, train_heads="segmentation", seed=count
            )
            new = finetune(bundle, caches[:count], work / f"bundle-{count}", config, device="cpu", log=lambda *_: None)
            train_s = time.perf_counter() - t
            labels = {s["name"]: s["label"] for s in new.metadata["catalog"]["structures"]}
            predictor = Predictor(new, device="cpu")
            predicted = [predictor.predict(c.case).labelmap for c in held_cases]
            scores = {
                name: [dice(p == labels[name], t == values[name]) for p, t in zip(predicted, truths)]
                for name in keep.values()
            }
            total = sum(cache_s[:count]) + train_s
            for name, per_case in scores.items():
                rows.append(
                    (
                        count,
                        name,
                        float(np.mean(per_case)),
                        min(per_case),
                        max(per_case),
                        sum(cache_s[:count]),
                        train_s,
                        total,
                    )
                )
    print(
        f"{'cases':>5}  {'structure':<30} {'Dice (held out)':>22}  {'caching':>8}  {'fine-tune':>9}  {'total':>7}  ratio"
    )
    for count, name, mean, lo, hi, c_s, f_s, total in rows:
        print(
            f"{count:>5}  {name:<30} {mean:.3f} ({lo:.3f}-{hi:.3f}){'':>7}  {c_s:>6.0f} s  {f_s:>7.0f} s  {total:>5.0f} s  "
            f"{total / BUDGET_S:.2f} x {BUDGET_S:.0f} s"
        )
    five = [r for r in rows if r[0] == 5]
    for count, name, mean, *_, total in five:
        met = mean >= TARGET_DICE and total <= BUDGET_S
        print(
            f"5 cases, {name}: Dice {mean:.3f} (target >= {TARGET_DICE}), {total:.0f} s (budget {BUDGET_S:.0f} s): "
            + ("met" if met else "NOT met")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
