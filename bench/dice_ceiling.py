"""The partial-volume ceiling of Dice on synthetic cases, beside a model's Dice on the same cases.

    python bench/dice_ceiling.py --cases DIR [--plane sagittal] [--eval EVAL.json ...] [--max-cases N]

Per structure: the Dice of the partial-volume oracle (OrthoKneeLib/synth/ceiling.py: the exact
fraction of each structure in each voxel, the largest taken) against the case's truth on the
view's grid, averaged over the cases that annotate the structure; with ``--eval`` (the output of
`orthoknee evaluate --json --per-case` on the same cases), each model's mean Dice over the same
cases and its fraction of the ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", type=Path, nargs="+", required=True, help="`orthoknee synth` outputs or case folders"
    )
    parser.add_argument("--plane", default="sagittal", choices=["sagittal", "coronal", "axial"])
    parser.add_argument(
        "--eval", type=Path, nargs="*", default=[], help="`orthoknee evaluate --json --per-case` outputs"
    )
    parser.add_argument("--max-cases", type=int)
    args = parser.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk

    from OrthoKneeLib.errors import InputError
    from OrthoKneeLib.labels import DEFAULT_CATALOG
    from OrthoKneeLib.synth.ceiling import oracle_dice, partial_volume_oracle
    from OrthoKneeLib.train import find_cases

    folders = find_cases(args.cases, None)[: args.max_cases]
    if not folders:
        raise InputError(
            None, f"no case folders under {', '.join(map(str, args.cases))}.", "Give `orthoknee synth` outputs."
        )
    models = {}
    for path in args.eval:
        scores = json.loads(path.read_text())
        if "per_case" not in scores:
            raise InputError(path, "has no per-case rows.", "Run `orthoknee evaluate` with --json --per-case.")
        models[path.name.split(".")[0]] = {row["case_id"]: row["dice"] for row in scores["per_case"]}
    structures = DEFAULT_CATALOG.structures
    ceiling: dict[str, dict[str, float]] = {s.key: {} for s in structures}
    for n, folder in enumerate(folders):
        meta = json.loads((folder / "case.json").read_text())
        needed = [folder / "labels.nrrd", folder / f"{args.plane}_labels.nrrd"]
        if not all(p.is_file() for p in needed) or args.plane not in meta.get("views", {}):
            raise InputError(
                folder,
                f"lacks the work-grid labels or the {args.plane} view's labels and parameters.",
                "The ceiling needs a case written by `orthoknee synth`.",
            )
        truth = sitk.ReadImage(str(needed[1]))
        oracle = partial_volume_oracle(sitk.ReadImage(str(needed[0])), truth, args.plane, meta["views"][args.plane])
        scores = oracle_dice(oracle, sitk.GetArrayViewFromImage(truth), [s.label for s in structures])
        annotated = set(meta.get("annotated", [s.key for s in structures]))
        for s in structures:
            if s.key in annotated and s.label in scores:
                ceiling[s.key][meta["case_id"]] = scores[s.label]
        print(f"  {n + 1}/{len(folders)} {meta['case_id']}", file=sys.stderr, flush=True)

    header = "| structure | cases | ceiling |" + "".join(f" {m} | of ceiling |" for m in models)
    print(header)
    print("|---|---|---|" + "---|---|" * len(models))
    for s in structures:
        cases = ceiling[s.key]
        if not cases:
            continue
        row = f"| {s.key} | {len(cases)} | {np.mean(list(cases.values())):.3f} |"
        for per_case in models.values():
            both = [c for c in cases if s.key in per_case.get(c, {})]
            if both:
                model, ceil = np.mean([per_case[c][s.key] for c in both]), np.mean([cases[c] for c in both])
                row += f" {model:.3f} | {model / ceil:.2f} |"
            else:
                row += " - | - |"
        print(row)
    return 0


if __name__ == "__main__":
    from OrthoKneeLib.errors import OrthoKneeError

    try:
        raise SystemExit(main())
    except OrthoKneeError as error:  # which case, what is wrong, what to do: not a traceback
        raise SystemExit(f"error: {error}")
