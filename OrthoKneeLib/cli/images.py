"""The `reformat` and `resample` commands: series in another plane or spacing."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import (
    nonnegative_float,
    positive_float,
    positive_int,
)
from .common import check_image_out, fmt_size, fmt_spacing, max_voxels_option


def cmd_reformat(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from ..io import write_image_atomic
    from ..volumes import detect_plane, load_volume, orientation_code, reformat

    check_image_out(args.out)
    volume = load_volume(args.input, series=args.series, echo=args.echo, max_voxels=args.max_voxels)
    image = reformat(volume, args.plane, args.in_plane, args.thickness, slice_gap=args.gap)
    write_image_atomic(image, args.out)
    print(
        f"{args.out}: {detect_plane(image)} {fmt_size(image.GetSize())} at "
        f"{fmt_spacing(image.GetSpacing())} mm, {orientation_code(image)}, "
        f"{sitk.GetPixelIDValueAsString(image.GetPixelID())}"
    )
    return 0


def cmd_resample(args: argparse.Namespace) -> int:
    from ..io import write_image_atomic
    from ..volumes import load_volume, resample_to_spacing

    check_image_out(args.out)
    volume = load_volume(args.input, series=args.series, echo=args.echo, max_voxels=args.max_voxels)
    image = resample_to_spacing(volume.image, args.spacing, kind="label" if args.label else "linear")
    write_image_atomic(image, args.out)
    print(f"{args.out}: {fmt_size(image.GetSize())} at {fmt_spacing(image.GetSpacing())} mm")
    return 0


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("reformat", help="make a thick-slice series in another plane from a volume")
    p.add_argument("input", type=Path, help="volume file or DICOM folder")
    p.add_argument("--plane", required=True, choices=["sagittal", "coronal", "axial"])
    p.add_argument("--in-plane", type=positive_float, required=True, metavar="MM", help="in-plane pixel spacing")
    p.add_argument("--thickness", type=positive_float, required=True, metavar="MM", help="slice thickness")
    p.add_argument("--gap", type=nonnegative_float, default=0.0, metavar="MM", help="gap between slices (default 0)")
    p.add_argument("--series", help="series UID, number or description, when the folder holds several")
    p.add_argument("--echo", type=positive_int, help="echo number of a multi-echo series")
    p.add_argument("--out", type=Path, required=True, help="output file (.nrrd, .nii.gz, .mha)")
    max_voxels_option(p)
    p.set_defaults(func=cmd_reformat)

    p = sub.add_parser("resample", help="resample a volume to a new voxel spacing, same field of view")
    p.add_argument("input", type=Path, help="volume file or DICOM folder")
    p.add_argument(
        "--spacing", type=positive_float, nargs=3, required=True, metavar=("I", "J", "K"), help="mm per axis"
    )
    p.add_argument("--label", action="store_true", help="input is a label map (nearest neighbour)")
    p.add_argument("--series", help="series UID, number or description, when the folder holds several")
    p.add_argument("--echo", type=positive_int, help="echo number of a multi-echo series")
    p.add_argument("--out", type=Path, required=True, help="output file (.nrrd, .nii.gz, .mha)")
    max_voxels_option(p)
    p.set_defaults(func=cmd_resample)
