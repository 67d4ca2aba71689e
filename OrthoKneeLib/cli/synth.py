"""The `synth` command: synthetic training cases from real label maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import (
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
    value_name,
)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..progress import TextProgress
    from ..synth import SynthConfig, synthesize

    config = SynthConfig(
        source=args.source,
        n=args.n,
        seed=args.seed,
        contrast=args.contrast,
        prevalence=args.prevalence,
        val_fraction=args.val_fraction,
        work_spacing=args.work_spacing,
        mirror_fraction=args.mirror_fraction,
        contact_sheets=not args.no_sheets,
        keep_labels=dict(args.keep_label or []),
    )
    manifest = synthesize(
        args.labels, args.out, config, workers=args.workers, progress=TextProgress("synth", unit="case")
    )
    splits = [c["split"] for c in manifest["cases"]]
    per_case = manifest["seconds_per_case"]
    print(
        f"{args.out}: {len(splits)} cases ({splits.count('train')} train, {splits.count('validation')} validation, "
        f"split by subject over {len(manifest['subjects'])} subjects); rendered now: {manifest['rendered_now']}"
        + (f", {per_case:.1f} s/case per worker" if per_case else "")
    )
    return 0


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("synth", help="render training cases from real label maps (synthetic MR images)")
    p.add_argument("--labels", type=Path, required=True, help="folder (or file) of the source's label maps")
    p.add_argument("--source", required=True, choices=["oai", "pymskt", "spl"], help="which label set it is")
    p.add_argument("--out", type=Path, required=True, help="output folder (existing complete cases are kept)")
    p.add_argument("--n", type=positive_int, required=True, help="number of cases")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--contrast",
        default="mixed",
        choices=["mixed", "dess", "pdfs", "t2", "random"],
        help="tissue contrast; mixed draws DESS, random (SynthSeg-like), PD fat-sat and T2",
    )
    p.add_argument("--prevalence", type=probability, default=0.35, help="probability of each simulated finding")
    p.add_argument("--val-fraction", type=open_fraction, default=0.2, help="fraction of *subjects* held out")
    p.add_argument("--work-spacing", type=positive_float, default=0.9, metavar="MM", help="rendering grid spacing")
    p.add_argument(
        "--mirror-fraction",
        type=probability,
        default=0.0,
        metavar="F",
        help="share of the cases drawn as the other knee (the label map mirrored left-right); "
        "0 keeps every case the side its source is",
    )
    p.add_argument(
        "--keep-label",
        type=value_name,
        action="append",
        metavar="VALUE=NAME",
        help="also label this source structure the catalog lacks, as an extra label named NAME (repeatable), "
        "e.g. --keep-label '35=Patellar ligament' on the SPL atlas: cases to train a new label on",
    )
    p.add_argument("--workers", type=positive_int, default=1, help="parallel processes")
    p.add_argument("--no-sheets", action="store_true", help="skip the PNG contact sheets")
    p.set_defaults(func=cmd_synth)
