"""The `predict` and `demo` commands: one case, a folder of cases, the shipped sample."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..io import json_text
from .args import (
    positive_int,
)
from .common import max_voxels_option


def _load_case(args: argparse.Namespace):
    """The case the arguments name; every volume goes through the same checks (in Case)."""
    from ..volumes import Case, load_volume, series_volumes

    def load(path):
        return load_volume(path, series=args.series, echo=args.echo, max_voxels=args.max_voxels)

    named = {p: load(getattr(args, p)) for p in ("sagittal", "coronal", "axial") if getattr(args, p)}
    loose = []
    for path in args.paths:
        if args.series is not None or args.echo is not None:
            loose.append(load(path))
            continue
        volumes = series_volumes(path, max_voxels=args.max_voxels)
        if len(volumes) > 1 and Path(path).is_file():
            volumes = [load(path)]  # one file of a series: its own series only
        loose.extend(volumes)
    if not named and not loose:
        raise InputError(
            None, "no input series were given.", "Give files or DICOM folders, or --sagittal/--coronal/--axial."
        )
    case = Case.from_volumes(loose) if loose else None
    views = dict(case.views) if case else {}
    views.update(named)
    return Case(**views, name=args.name)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..montage import montage
    from ..outfolder import check_output_folder, locked_folder
    from ..predict import Predictor
    from ..progress import TextProgress

    if args.batch:
        return _predict_batch(args)
    if args.workers or args.scheduler or args.force:
        raise InputError(
            None,
            "--workers, --scheduler and --force are for a folder of cases.",
            "Add --batch and give the folder whose subfolders are the cases.",
        )
    check_output_folder(args.out)  # before minutes of compute, not after
    with locked_folder(args.out):  # a second run into the same folder is refused now, not mixed in later
        case = _load_case(args)
        predictor = Predictor(args.bundle, device=args.device, postprocess=not args.raw)
        prediction = predictor.predict(case, progress=TextProgress("predict", unit="stage"))
        extra = {} if args.no_montage else {"montage.png": lambda path: montage(prediction, case, path)}
        if args.dicom_seg:
            from ..dicomseg import dicom_seg_writer

            writer = dicom_seg_writer(prediction, case)
            if writer is None:
                raise InputError(
                    case.reference.path,
                    "is not a DICOM series, so a DICOM SEG cannot reference it.",
                    "Leave out --dicom-seg for NIfTI, NRRD or MHA inputs.",
                )
            extra["structures.seg.dcm"] = writer
        written = prediction.save(args.out, extra=extra)
    if args.json:
        print(json_text({**prediction.summary(), "files": {k: str(v) for k, v in written.items()}}))
        return 0
    print(
        f"{case.name}: views {', '.join(case.planes)} (reference {case.reference_plane}), "
        f"bundle {prediction.bundle['name']} {prediction.bundle['version']}, {prediction.timings['total']:.1f} s "
        f"on {prediction.device}"
    )
    for key, p in sorted(prediction.finding_probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {prediction.catalog.finding(key).name:32} {p:6.3f}  {_where(prediction, key)}")
    if prediction.knee_side.get("side"):
        print(f"  {prediction.knee_side['side']} knee ({prediction.knee_side['from']})")
    vols = prediction.measurements["volume_ml"]
    print("  volumes (mL): " + ", ".join(f"{k} {v:.1f}" for k, v in vols.items() if v > 0))
    thick = prediction.measurements["mean_thickness_mm"]
    if thick:
        print("  mean cartilage thickness (mm): " + ", ".join(f"{k} {v:.2f}" for k, v in thick.items() if v))
    for w in prediction.warnings:
        print(f"  warning: {w}")
    for what, path in written.items():
        if not what.startswith("overlay:"):
            print(f"  wrote {path}")
    print(f"  wrote {len(prediction.overlays)} overlays in {Path(args.out) / 'overlays'}")
    return 0


def _predict_batch(args: argparse.Namespace) -> int:
    """Every subfolder of the one PATH is a case; results and failures as they finish."""
    from ..batch import BatchOptions, format_summary, run_batch
    from ..progress import TextProgress

    if len(args.paths) != 1 or any(getattr(args, p) for p in ("sagittal", "coronal", "axial")):
        raise InputError(
            None,
            "--batch takes one folder whose subfolders are the cases.",
            "Give e.g. `orthoknee predict --batch CASES --out RESULTS`.",
        )
    if args.series or args.echo or args.name:
        raise InputError(
            None,
            "--series, --echo and --name choose within one case, not a batch.",
            "Leave them out with --batch (views are picked by each series' orientation).",
        )
    if args.device == "auto" and (args.workers or args.scheduler):
        args.device = "cpu"  # workers share the machine; a GPU per worker is the cluster's business
    options = BatchOptions(
        bundle=str(args.bundle) if args.bundle else None,
        device=args.device,
        montage=not args.no_montage,
        dicom_seg=args.dicom_seg,
        force=args.force,
        max_voxels=args.max_voxels,
    )
    rows = run_batch(
        args.paths[0],
        args.out,
        options,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=TextProgress("predict", unit="case"),
    )
    if args.json:
        print(json_text({"cases": rows, "summary_csv": str(Path(args.out) / "summary.csv")}))
    else:
        print(format_summary(rows))
        print(f"wrote {Path(args.out) / 'summary.csv'}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole product on the shipped real sample: load its three series, predict with the
    shipped bundle, write the outputs and the montage, say how to look at them."""
    from ..resources import SAMPLE_VIEWS, sample_case_dir

    folder = Path(args.sample) if args.sample else sample_case_dir()
    paths = {plane: folder / name for plane, name in SAMPLE_VIEWS.items()}
    print(f"OrthoKnee demo: the shipped sample case (real sagittal DESS knee MRI and two reformats) from {folder}")
    commands = argparse.ArgumentParser(prog="orthoknee")  # the predict command as typed: each option its default
    register(commands.add_subparsers())
    argv = ["predict", "--name", "OrthoKnee sample (DESS)", "--out", str(args.out), "--device", args.device]
    argv += [arg for plane in ("sagittal", "coronal", "axial") for arg in (f"--{plane}", str(paths[plane]))]
    argv += ["--bundle", str(args.bundle)] if args.bundle else []
    predict_args = commands.parse_args(argv)
    code = cmd_predict(predict_args)
    out = Path(args.out).resolve()
    print(
        f"\nOpen the result: in a browser, `orthoknee serve {args.out}` then http://127.0.0.1:8080/; the montage "
        f"{out / 'montage.png'}; in 3D Slicer, {out / 'structures.seg.nrrd'} over {paths['sagittal']} "
        "(overlays/*.nrrd are the probability maps). Not for clinical use."
    )
    return code


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("predict", help="structures, finding probabilities and overlays for one case")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="series files or DICOM folders (views by plane)")
    for plane in ("sagittal", "coronal", "axial"):
        p.add_argument(f"--{plane}", type=Path, help=f"the {plane} series (overrides plane detection)")
    p.add_argument("--bundle", type=Path, help="model bundle (default: the shipped demo bundle)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--series", help="series UID, number or description, when a folder holds several")
    p.add_argument("--echo", type=positive_int, help="echo number of a multi-echo series (or frame of a 4D file)")
    max_voxels_option(p)
    p.add_argument("--name", help="case name (default: from the reference series)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--no-montage", action="store_true", help="skip montage.png")
    p.add_argument(
        "--raw",
        action="store_true",
        help="write the heads' raw argmax, without the post-processing: femur, tibia and patella "
        "each kept as its largest piece, cartilage off its bone removed, menisci split by side",
    )
    p.add_argument("--json", action="store_true", help="print the findings.json summary")
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="also write structures.seg.dcm, a DICOM Segmentation referencing the DICOM reference series",
    )
    batch = p.add_argument_group("a folder of cases (--batch)")
    batch.add_argument(
        "--batch",
        action="store_true",
        help="PATH is a folder whose subfolders are cases; each is predicted into OUT/<case>, "
        "with OUT/summary.csv; exit code 1 when any case failed",
    )
    batch.add_argument("--workers", type=positive_int, metavar="N", help="run N cases at a time on a Dask LocalCluster")
    batch.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing Dask cluster, e.g. tcp://host:8786 (dask-jobqueue on SLURM)",
    )
    batch.add_argument("--force", action="store_true", help="predict again the cases already done with these inputs")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="predict the shipped real sample case and write the outputs and the montage")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("orthoknee-demo-output"),
        help="output folder (default ./orthoknee-demo-output)",
    )
    p.add_argument("--sample", type=Path, help="folder holding the sample case (default: the shipped one)")
    p.add_argument("--bundle", type=Path, help="model bundle (default: the shipped demo bundle)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.set_defaults(func=cmd_demo)


def _where(prediction, key: str) -> str:
    """Where a finding is, for the summary: its map's place and size over the display threshold
    (e.g. "medial femoral condyle, 0.8 mL"), or where its faint map peaks."""
    from ..gating import TOP_ML

    location = (prediction.finding_locations or {}).get(key) or {}
    where, ml = location.get("where"), location.get("map_ml")
    if not where:
        return ""
    if ml is not None and ml >= TOP_ML:
        return f"{where}, {ml:.2f} mL"
    return f"(no map over 0.5; peaks at the {where})"
