"""Helpers every command module shares: number formats, common options, output checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..inputcheck import DEFAULT_MAX_VOXELS
from .args import positive_int

EXIT_USAGE_OR_INPUT = 2
_IMAGE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")


def fmt_spacing(spacing) -> str:
    return "x".join(f"{s:.4g}" for s in spacing)


def fmt_size(size) -> str:
    return "x".join(str(s) for s in size)


def max_voxels_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-voxels",
        type=positive_int,
        default=DEFAULT_MAX_VOXELS,
        metavar="N",
        help=f"refuse a series whose header claims more voxels (default {DEFAULT_MAX_VOXELS:,})",
    )


def cache_dir(args: argparse.Namespace) -> Path:
    from ..featurecache import default_cache_dir

    return Path(args.cache) if args.cache else default_cache_dir()


def check_image_out(path: Path) -> None:
    """An --out image file that can be written, checked before the input is read."""
    from ..outfolder import check_output_folder

    if path.is_dir():
        raise InputError(path, "is a folder; --out names the image file to write.", "Give e.g. --out out.nrrd.")
    if not path.name.lower().endswith(_IMAGE_SUFFIXES):
        raise InputError(
            path,
            "does not end in an image format OrthoKnee writes.",
            f"End --out in one of {', '.join(_IMAGE_SUFFIXES)}.",
        )
    check_output_folder(path.parent)
