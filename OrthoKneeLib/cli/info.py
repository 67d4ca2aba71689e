"""The `info` and `catalog` commands: what a file holds, what the model reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OrthoKneeError
from ..io import json_text
from .common import EXIT_USAGE_OR_INPUT, fmt_size, fmt_spacing, max_voxels_option


def cmd_info(args: argparse.Namespace) -> int:
    from ..dicomseg import describe_dicom_seg, is_dicom_seg
    from ..volumes import list_volumes

    volumes, errors, segmentations = [], [], []
    for path in args.paths:
        try:
            if is_dicom_seg(path):  # a result, not a series: list its segments
                segmentations.append(describe_dicom_seg(path))
                continue
            volumes.extend(v.describe() for v in list_volumes(path, max_voxels=args.max_voxels))
        except OrthoKneeError as exc:
            errors.append({"path": str(path), "error": str(exc), "type": type(exc).__name__})
    if args.json:
        print(json_text({"volumes": volumes, "segmentations": segmentations, "errors": errors}))
    else:
        header = f"{'plane':9} {'size':13} {'spacing (mm)':22} {'orient':6} {'TE (ms)':10} {'description':34} path"
        print(header)
        print("-" * len(header))
        for v in volumes:
            te = f"{v['echo_time']:g}" if v["echo_time"] is not None else "-"
            if v["echoes_in_series"] > 1:
                te += f" #{v['echo_number']}"
            print(
                f"{v['plane']:9} {fmt_size(v['size']):13} {fmt_spacing(v['spacing']):22} "
                f"{v['orientation']:6} {te:10} {(v['description'] or '-')[:34]:34} {v['path']}"
            )
        print(f"{len(volumes)} volume(s)")
        for seg in segmentations:
            print(
                f"{seg['path']}: DICOM SEG '{seg['series_description']}', {len(seg['segments'])} segments over "
                f"{seg['frames']} frames, referencing series {', '.join(seg['referenced_series'])}"
            )
            for d in seg["segments"]:
                print(f"  {d['number']:3} {d['label']:30} {d['type']}")
        for e in errors:
            print(f"error: {e['error']}", file=sys.stderr)
    return EXIT_USAGE_OR_INPUT if errors else 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from ..labels import DEFAULT_CATALOG

    if args.json:
        print(json_text(DEFAULT_CATALOG.to_json()))
        return 0
    for title, entries in (("Structures", DEFAULT_CATALOG.structures), ("Findings", DEFAULT_CATALOG.findings)):
        print(title)
        for e in entries:
            code = e.terminology.type if e.terminology else None
            code_text = f"{code.scheme} {code.value} {code.meaning}" if code else "-"
            modifier = e.terminology.type_modifier if e.terminology else None
            if modifier:
                code_text += f" ({modifier.meaning})"
            label = f"{e.label:>3} " if hasattr(e, "label") else "    "
            print(f"  {label}{e.key:28} {e.name:30} rgb{tuple(e.color)!s:16} {code_text}")
    return 0


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("info", help="list the volumes a file or folder holds")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON (key 'volumes') instead of a table")
    max_voxels_option(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("catalog", help="print the structures and findings with colors and codes")
    p.add_argument("--json", action="store_true", help="print JSON (keys 'structures', 'findings')")
    p.set_defaults(func=cmd_catalog)
