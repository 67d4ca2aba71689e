"""The ``orthoknee`` command.

Each subcommand is a thin shell over the engine: it parses arguments, calls
OrthoKneeLib, and prints either a table for people or ``--json`` for programs. Errors of
the OrthoKneeError family are printed as one line (file, problem, advice) with exit code
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import InputError, OrthoKneeError
from .cliargs import (
    OneLineParser,
    fraction,
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
)
from .inputcheck import DEFAULT_MAX_VOXELS
from .io import json_text

__all__ = ["main"]

EXIT_USAGE_OR_INPUT = 2


def _fmt_spacing(spacing) -> str:
    return "x".join(f"{s:.4g}" for s in spacing)


def _fmt_size(size) -> str:
    return "x".join(str(s) for s in size)


# --------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    from .volumes import list_volumes

    volumes, errors = [], []
    for path in args.paths:
        try:
            volumes.extend(v.describe() for v in list_volumes(path, max_voxels=args.max_voxels))
        except OrthoKneeError as exc:
            errors.append({"path": str(path), "error": str(exc), "type": type(exc).__name__})
    if args.json:
        print(json_text({"volumes": volumes, "errors": errors}))
    else:
        header = f"{'plane':9} {'size':13} {'spacing (mm)':22} {'orient':6} {'TE (ms)':10} {'description':34} path"
        print(header)
        print("-" * len(header))
        for v in volumes:
            te = f"{v['echo_time']:g}" if v["echo_time"] is not None else "-"
            if v["echoes_in_series"] > 1:
                te += f" #{v['echo_number']}"
            print(
                f"{v['plane']:9} {_fmt_size(v['size']):13} {_fmt_spacing(v['spacing']):22} "
                f"{v['orientation']:6} {te:10} {(v['description'] or '-')[:34]:34} {v['path']}"
            )
        print(f"{len(volumes)} volume(s)")
        for e in errors:
            print(f"error: {e['error']}", file=sys.stderr)
    return EXIT_USAGE_OR_INPUT if errors else 0


# --------------------------------------------------------------------------- catalog


def cmd_catalog(args: argparse.Namespace) -> int:
    from .labels import DEFAULT_CATALOG

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


# --------------------------------------------------------------------------- reformat


_IMAGE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")


def _check_image_out(path: Path) -> None:
    """An --out image file that can be written, checked before the input is read."""
    from .outfolder import check_output_folder

    if path.is_dir():
        raise InputError(path, "is a folder; --out names the image file to write.", "Give e.g. --out out.nrrd.")
    if not path.name.lower().endswith(_IMAGE_SUFFIXES):
        raise InputError(path, "does not end in an image format OrthoKnee writes.",
                         f"End --out in one of {', '.join(_IMAGE_SUFFIXES)}.")
    check_output_folder(path.parent)


def cmd_reformat(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .io import write_image_atomic
    from .volumes import detect_plane, load_volume, orientation_code, reformat

    _check_image_out(args.out)
    volume = load_volume(args.input, series=args.series, echo=args.echo, max_voxels=args.max_voxels)
    image = reformat(volume, args.plane, args.in_plane, args.thickness, slice_gap=args.gap)
    write_image_atomic(image, args.out)
    print(
        f"{args.out}: {detect_plane(image)} {_fmt_size(image.GetSize())} at "
        f"{_fmt_spacing(image.GetSpacing())} mm, {orientation_code(image)}, "
        f"{sitk.GetPixelIDValueAsString(image.GetPixelID())}"
    )
    return 0


# --------------------------------------------------------------------------- resample


def cmd_resample(args: argparse.Namespace) -> int:
    from .io import write_image_atomic
    from .volumes import load_volume, resample_to_spacing

    _check_image_out(args.out)
    volume = load_volume(args.input, series=args.series, echo=args.echo, max_voxels=args.max_voxels)
    image = resample_to_spacing(volume.image, args.spacing, kind="label" if args.label else "linear")
    write_image_atomic(image, args.out)
    print(f"{args.out}: {_fmt_size(image.GetSize())} at {_fmt_spacing(image.GetSpacing())} mm")
    return 0


# --------------------------------------------------------------------------- synth


def cmd_synth(args: argparse.Namespace) -> int:
    from .progress import TextProgress
    from .synth import SynthConfig, synthesize

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
    )
    manifest = synthesize(args.labels, args.out, config, workers=args.workers, progress=TextProgress("synth", unit="case"))
    splits = [c["split"] for c in manifest["cases"]]
    per_case = manifest["seconds_per_case"]
    print(
        f"{args.out}: {len(splits)} cases ({splits.count('train')} train, {splits.count('validation')} validation, "
        f"split by subject over {len(manifest['subjects'])} subjects); rendered now: {manifest['rendered_now']}"
        + (f", {per_case:.1f} s/case per worker" if per_case else "")
    )
    return 0


# --------------------------------------------------------------------------- pretrain


def cmd_pretrain(args: argparse.Namespace) -> int:
    import shlex

    from .bundle import Bundle, create_bundle, derive_bundle
    from .model.diffusion import PretrainConfig, ViewModelConfig, pretrain
    from .progress import TextProgress

    architecture = {"spacing": args.spacing, "patch": args.patch, "window": args.window, "channels": args.channels}
    init_state, started_from = None, None
    if args.init_from:
        parent = Bundle.open(args.init_from)
        view = parent.view_config(args.view)
        given = [f"--{k}" for k, v in architecture.items() if v is not None and tuple(v) != tuple(getattr(view, k))]
        if given:
            raise InputError(args.init_from, f"has a {args.view} backbone of another architecture than "
                             f"{' '.join(given)} asks for.", "Leave those options out with --init-from (the "
                             "bundle's architecture is used), or pretrain from scratch without --init-from.")
        entry = parent.metadata["views"][args.view]
        init_state = parent.load_state(entry["weights"], f"{args.view} backbone")
        started_from = {"bundle": parent.metadata.get("name"), "version": parent.metadata.get("version"),
                        "sha256": entry["sha256"], "steps": (entry.get("training") or {}).get("steps"),
                        "command": (entry.get("training") or {}).get("command")}
        if (Path(args.out) / "metadata.json").is_file():
            bundle = Bundle.open(args.out, verify=False)  # a rerun: resume, keep what is there
        else:
            bundle = derive_bundle(parent, args.out, args.version)
    else:
        defaults = {"spacing": (1.0, 1.0, 3.0), "patch": (64, 64, 16), "window": (256, 256, 16), "channels": (8, 16, 32)}
        view = ViewModelConfig(plane=args.view, **{k: tuple(v if v is not None else defaults[k])
                                                   for k, v in architecture.items()})
        bundle = create_bundle(args.out, name=args.name, version=args.version or "0.1.0")
    config = PretrainConfig(
        steps=args.steps, batch_size=args.batch, learning_rate=args.lr, checkpoint_every=args.checkpoint_every,
        seed=args.seed, max_volumes=args.max_volumes,
    )
    checkpoint = Path(args.out) / "checkpoints" / f"backbone_{args.view}.pt"
    summary = pretrain(view, args.data, checkpoint, config, device=args.device, resume=not args.fresh,
                       progress=TextProgress(f"pretrain {args.view}", unit="step"), init_state=init_state)
    training = {
        "command": "orthoknee " + " ".join(shlex.quote(str(a)) for a in args.argv),
        "steps": summary["steps"],
        "seconds": round(summary["seconds"], 1),
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
        "device": summary["device"],
        "volumes": summary["volumes"],
        "data": summary["data"],
        "config": config.__dict__,
        "weights": "EMA",
        "started_from": started_from,  # None: random initialisation
    }
    bundle.set_view(args.view, view, summary["ema"].state_dict(), training)
    print(
        f"{args.out}: {args.view} backbone, {summary['steps']} steps on {summary['volumes']} volumes, "
        f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, {summary['seconds']:.0f} s on {summary['device']}"
    )
    return 0


# --------------------------------------------------------------------------- predict


def _load_case(args: argparse.Namespace):
    """The case the arguments name; every volume goes through the same checks (in Case)."""
    from .volumes import Case, list_volumes, load_volume

    def load(path):
        return load_volume(path, series=args.series, echo=args.echo, max_voxels=args.max_voxels)

    named = {p: load(getattr(args, p)) for p in ("sagittal", "coronal", "axial") if getattr(args, p)}
    loose = []
    for path in args.paths:
        if args.series is not None or args.echo is not None:
            loose.append(load(path))
            continue
        volumes = [v for v in list_volumes(path, max_voxels=args.max_voxels) if "label" not in Path(v.path).name.lower()]
        if len(volumes) > 1 and Path(path).is_file():
            volumes = [load(path)]  # one file of a series: its own series only
        loose.extend(volumes)
    if not named and not loose:
        raise InputError(None, "no input series were given.",
                         "Give files or DICOM folders, or --sagittal/--coronal/--axial.")
    case = Case.from_volumes(loose) if loose else None
    views = dict(case.views) if case else {}
    views.update(named)
    return Case(**views, name=args.name)


def cmd_predict(args: argparse.Namespace) -> int:
    from .montage import montage
    from .outfolder import check_output_folder, locked_folder
    from .predict import Predictor
    from .progress import TextProgress

    check_output_folder(args.out)  # before minutes of compute, not after
    with locked_folder(args.out):  # a second run into the same folder is refused now, not mixed in later
        case = _load_case(args)
        predictor = Predictor(args.bundle, device=args.device, postprocess=not args.raw)
        prediction = predictor.predict(case, progress=TextProgress("predict", unit="stage"))
        extra = {} if args.no_montage else {"montage.png": lambda path: montage(prediction, case, path)}
        written = prediction.save(args.out, extra=extra)
    if args.json:
        print(json_text({**prediction.summary(), "files": {k: str(v) for k, v in written.items()}}))
        return 0
    print(f"{case.name}: views {', '.join(case.planes)} (reference {case.reference_plane}), "
          f"bundle {prediction.bundle['name']} {prediction.bundle['version']}, {prediction.timings['total']:.1f} s "
          f"on {prediction.device}")
    for key, p in sorted(prediction.finding_probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {prediction.catalog.finding(key).name:32} {p:6.3f}")
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


# --------------------------------------------------------------------------- finetune / evaluate


def _cache_dir(args: argparse.Namespace) -> Path:
    from .featurecache import default_cache_dir

    return Path(args.cache) if args.cache else default_cache_dir()


def _oversample_factors(specs: list[str]) -> dict[str, float]:
    """``GLOB=FACTOR`` arguments as a dict, refused with the offending argument named."""
    factors: dict[str, float] = {}
    for spec in specs:
        pattern, sep, value = spec.rpartition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not pattern or not (factor > 0 and factor != float("inf")):
            raise InputError(None, f"--oversample {spec!r} is not GLOB=FACTOR with a positive factor.",
                             "Give e.g. --oversample 'spl-13-*=4' to draw those cases 4 times as often.")
        factors[pattern] = factor
    return factors


def cmd_finetune(args: argparse.Namespace) -> int:
    import shlex

    from .bundle import Bundle
    from .model.device import select_device
    from .progress import TextProgress
    from .train import FinetuneConfig, cache_case, case_draw_weights, check_finetune_config, find_cases, finetune

    oversample = _oversample_factors(args.oversample)
    bundle = Bundle.open(args.bundle)
    train = find_cases(args.cases, "train")
    if args.max_cases:
        train = train[: args.max_cases]
    val = find_cases(args.validation or args.cases, "validation" if not args.validation else None)[: args.validation_cases]
    if not train:
        raise InputError(None, f"no training cases (split 'train') under {', '.join(map(str, args.cases))}.",
                             "Make some with `orthoknee synth`.")
    config = FinetuneConfig(steps=args.steps, label_fraction=args.label_fraction, seed=args.seed,
                            learning_rate=args.lr, model=args.model, validate_every=args.validate_every,
                            validation_cases=args.validation_cases, from_scratch=args.from_scratch,
                            views=tuple(args.views) if args.views else None, oversample=oversample,
                            train_heads=args.train_heads, hard_negative_cells=args.hard_negative_cells,
                            other_lesion_negatives=args.other_lesion_negatives)
    # mistakes are refused now, not after every case's features are cached
    check_finetune_config(bundle, config)
    if oversample:
        case_draw_weights([json.loads((c / "case.json").read_text())["case_id"] for c in train], oversample)
    device = select_device(args.device)
    cache = _cache_dir(args)
    bar = TextProgress("features", unit="case")
    train_c = []
    for n, c in enumerate(train + val):
        train_c.append(cache_case(bundle, c, cache, device=device, views=args.views or None))
        bar(n + 1, len(train) + len(val), c.name)
    out = finetune(bundle, train_c[: len(train)], args.out, config, validation_caches=train_c[len(train):],
                   version=args.version, device=args.device, progress=TextProgress("finetune", unit="step"),
                   command="orthoknee " + " ".join(shlex.quote(str(a)) for a in args.argv))
    t = out.metadata["heads"]["training"]
    print(f"{args.out}: {out.metadata['heads']['kind']} {out.metadata['version']}, {t['labelled_cases']} of "
          f"{t['cases']} cases labelled, {config.steps} steps in {t['seconds']:.0f} s, "
          f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .evaluate import evaluate_bundle, format_table
    from .progress import TextProgress
    from .train import find_cases

    bundle = Bundle.open(args.bundle)
    cases = find_cases(args.cases, args.split)
    if args.max_cases:
        cases = cases[: args.max_cases]
    if not cases:
        raise InputError(None, f"no cases with split {args.split!r} under {', '.join(map(str, args.cases))}.",
                             "Use --split all, or give other folders.")
    scores = evaluate_bundle(bundle, cases, _cache_dir(args), device=args.device,
                             progress=TextProgress("evaluate", unit="step"), with_hd95=not args.no_hd95,
                             postprocess=not args.raw)
    if args.json:
        print(json_text({k: v for k, v in scores.items() if args.per_case or k != "per_case"}))
    else:
        print(f"{bundle.metadata.get('name')} {bundle.metadata.get('version')} ({scores['bundle']['kind']}) "
              f"on {scores['cases']} cases")
        print(format_table(scores, bundle.catalog))
    return 0


# --------------------------------------------------------------------------- cache


def cmd_cache(args: argparse.Namespace) -> int:
    from collections import defaultdict

    from .bundle import Bundle
    from .featurecache import compact_cache, prune_cache, scan_cache
    from .progress import TextProgress

    if args.keep_bundle and not args.prune:
        raise InputError(None, "--keep-bundle only says what `--prune` keeps.", "Add --prune (and --dry-run to look first).")
    if args.compact and args.prune:
        raise InputError(None, "--compact and --prune are two runs.", "Run `--prune` first, then `--compact`.")
    root = _cache_dir(args)
    if args.compact:
        converted, before, after = compact_cache(root, dry_run=args.dry_run, progress=TextProgress("compact", unit="entry"))
        verb = "would rewrite" if args.dry_run else "rewrote"
        print(f"{root}: {verb} the features of {converted} entries in 8 bits: {before / 2**30:.2f} GB -> "
              f"{after / 2**30:.2f} GB{' (estimated)' if args.dry_run else ''}")
        return 0
    kept = {}
    for path in args.keep_bundle or []:
        bundle = Bundle.open(path)
        kept[bundle.hash] = f"{bundle.metadata.get('name')} {bundle.metadata.get('version')} ({path})"
    if args.prune:
        for bundle_hash, name in kept.items():
            print(f"  keeping bundle {bundle_hash[:12]}: {name}")
        removed = prune_cache(root, kept if args.keep_bundle else None, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for entry, reason in removed:
            print(f"  {verb} {entry.path.name} ({entry.bytes / 2**20:.0f} MB): {reason}")
        print(f"{root}: {verb} {len(removed)} entries, {sum(e.bytes for e, _ in removed) / 2**30:.2f} GB")
        return 0
    entries = scan_cache(root)
    if not entries:
        print(f"{root}: no cache entries")
        return 0
    by_bundle: dict[str, list] = defaultdict(list)
    for e in entries:
        by_bundle["stale" if e.stale else (e.bundle_hash or "being written")].append(e)
    print(f"{root}: {len(entries)} entries, {sum(e.bytes for e in entries) / 2**30:.2f} GB")
    for key, group in sorted(by_bundle.items(), key=lambda kv: -sum(e.bytes for e in kv[1])):
        label = key if key in ("stale", "being written") else f"bundle {key[:12]}"
        print(f"  {label}: {len(group)} entries, {sum(e.bytes for e in group) / 2**30:.2f} GB")
        if key == "stale":
            for e in group[:5]:
                print(f"    {e.path.name}: {e.stale}")
            if len(group) > 5:
                print(f"    ... and {len(group) - 5} more")
    if by_bundle.get("stale"):
        print("`orthoknee cache --prune` removes the stale entries; add --keep-bundle B to also remove other bundles'.")
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole product on the shipped real sample: load its three series, predict with the
    shipped bundle, write the outputs and the montage, say how to look at them."""
    import argparse as _argparse

    from .resources import SAMPLE_VIEWS, sample_case_dir

    folder = Path(args.sample) if args.sample else sample_case_dir()
    paths = {plane: folder / name for plane, name in SAMPLE_VIEWS.items()}
    print(f"OrthoKnee demo: the shipped sample case (real sagittal DESS knee MRI and two reformats) from {folder}")
    predict_args = _argparse.Namespace(
        paths=[], sagittal=paths["sagittal"], coronal=paths["coronal"], axial=paths["axial"], bundle=args.bundle,
        out=args.out, series=None, echo=None, max_voxels=DEFAULT_MAX_VOXELS, name="OrthoKnee sample (DESS)",
        device=args.device, raw=False, no_montage=False, json=False)
    code = cmd_predict(predict_args)
    out = Path(args.out).resolve()
    print(f"\nOpen the result: montage {out / 'montage.png'}; in 3D Slicer load {out / 'structures.seg.nrrd'} "
          f"over {paths['sagittal']} (and overlays/*.nrrd as probability maps). Not for clinical use.")
    return code


# --------------------------------------------------------------------------- main


def _max_voxels_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-voxels", type=positive_int, default=DEFAULT_MAX_VOXELS, metavar="N",
                   help=f"refuse a series whose header claims more voxels (default {DEFAULT_MAX_VOXELS:,})")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="orthoknee", description="Knee MRI: 11 structures and 8 findings.")
    parser.add_argument("--version", action="version", version=f"orthoknee {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="list the volumes a file or folder holds")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON (key 'volumes') instead of a table")
    _max_voxels_option(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("catalog", help="print the structures and findings with colors and codes")
    p.add_argument("--json", action="store_true", help="print JSON (keys 'structures', 'findings')")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("reformat", help="make a thick-slice series in another plane from a volume")
    p.add_argument("input", type=Path, help="volume file or DICOM folder")
    p.add_argument("--plane", required=True, choices=["sagittal", "coronal", "axial"])
    p.add_argument("--in-plane", type=positive_float, required=True, metavar="MM", help="in-plane pixel spacing")
    p.add_argument("--thickness", type=positive_float, required=True, metavar="MM", help="slice thickness")
    p.add_argument("--gap", type=nonnegative_float, default=0.0, metavar="MM", help="gap between slices (default 0)")
    p.add_argument("--series", help="series UID, number or description, when the folder holds several")
    p.add_argument("--echo", type=positive_int, help="echo number of a multi-echo series")
    p.add_argument("--out", type=Path, required=True, help="output file (.nrrd, .nii.gz, .mha)")
    _max_voxels_option(p)
    p.set_defaults(func=cmd_reformat)

    p = sub.add_parser("resample", help="resample a volume to a new voxel spacing, same field of view")
    p.add_argument("input", type=Path, help="volume file or DICOM folder")
    p.add_argument("--spacing", type=positive_float, nargs=3, required=True, metavar=("I", "J", "K"), help="mm per axis")
    p.add_argument("--label", action="store_true", help="input is a label map (nearest neighbour)")
    p.add_argument("--series", help="series UID, number or description, when the folder holds several")
    p.add_argument("--echo", type=positive_int, help="echo number of a multi-echo series")
    p.add_argument("--out", type=Path, required=True, help="output file (.nrrd, .nii.gz, .mha)")
    _max_voxels_option(p)
    p.set_defaults(func=cmd_resample)

    p = sub.add_parser("synth", help="render training cases from real label maps (synthetic MR images)")
    p.add_argument("--labels", type=Path, required=True, help="folder (or file) of the source's label maps")
    p.add_argument("--source", required=True, choices=["oai", "pymskt", "spl"], help="which label set it is")
    p.add_argument("--out", type=Path, required=True, help="output folder (existing complete cases are kept)")
    p.add_argument("--n", type=positive_int, required=True, help="number of cases")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--contrast", default="mixed", choices=["mixed", "dess", "pdfs", "t2", "random"],
                   help="tissue contrast; mixed draws DESS, random (SynthSeg-like), PD fat-sat and T2")
    p.add_argument("--prevalence", type=probability, default=0.35, help="probability of each simulated finding")
    p.add_argument("--val-fraction", type=open_fraction, default=0.2, help="fraction of *subjects* held out")
    p.add_argument("--work-spacing", type=positive_float, default=0.9, metavar="MM", help="rendering grid spacing")
    p.add_argument("--mirror-fraction", type=probability, default=0.0, metavar="F",
                   help="share of the cases drawn as the other knee (the label map mirrored left-right); "
                        "0 keeps every case the side its source is")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel processes")
    p.add_argument("--no-sheets", action="store_true", help="skip the PNG contact sheets")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pretrain", help="self-supervised pretraining of one view's diffusion backbone")
    p.add_argument("--view", required=True, choices=["sagittal", "coronal", "axial"])
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="PATH",
                   help="DICOM folders, volume files, `orthoknee synth` outputs (no labels are used)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder (created or updated)")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--spacing", type=positive_float, nargs=3, metavar=("I", "J", "K"),
                   help="model spacing in mm along the view's in-plane and through-plane axes (default 1 1 3)")
    p.add_argument("--patch", type=positive_int, nargs=3, metavar=("I", "J", "K"), help="training patch (default 64 64 16)")
    p.add_argument("--window", type=positive_int, nargs=3, metavar=("I", "J", "K"),
                   help="largest sliding window for feature extraction (default 256 256 16)")
    p.add_argument("--channels", type=positive_int, nargs="+", help="block widths (default 8 16 32)")
    p.add_argument("--init-from", type=Path, metavar="BUNDLE",
                   help="continue the pretraining of BUNDLE's backbone for --view: same architecture, its weights "
                        "as the start; --out becomes a new version of BUNDLE (its other backbones copied, no heads)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100)
    p.add_argument("--max-volumes", type=positive_int, help="use at most this many volumes")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint instead of resuming")
    p.add_argument("--name", default="orthoknee", help="bundle name, when creating it")
    p.add_argument("--version", help="bundle version, when creating it (default 0.1.0; with --init-from, "
                                     "BUNDLE's next minor version)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("predict", help="structures, finding probabilities and overlays for one case")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="series files or DICOM folders (views by plane)")
    for plane in ("sagittal", "coronal", "axial"):
        p.add_argument(f"--{plane}", type=Path, help=f"the {plane} series (overrides plane detection)")
    p.add_argument("--bundle", type=Path, help="model bundle (default: the shipped demo bundle)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--series", help="series UID, number or description, when a folder holds several")
    p.add_argument("--echo", type=positive_int, help="echo number of a multi-echo series (or frame of a 4D file)")
    _max_voxels_option(p)
    p.add_argument("--name", help="case name (default: from the reference series)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--no-montage", action="store_true", help="skip montage.png")
    p.add_argument("--raw", action="store_true",
                   help="write the heads' raw argmax, without the post-processing: femur, tibia and patella "
                        "each kept as its largest piece, cartilage off its bone removed, menisci split by side")
    p.add_argument("--json", action="store_true", help="print the findings.json summary")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="train the heads on cached features of labelled cases (backbone frozen)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle with pretrained backbones")
    p.add_argument("--cases", type=Path, nargs="+", required=True, help="`orthoknee synth` outputs or case folders")
    p.add_argument("--validation", type=Path, nargs="+", help="validation cases (default: split 'validation' of --cases)")
    p.add_argument("--out", type=Path, required=True, help="new bundle folder")
    p.add_argument("--label-fraction", type=fraction, default=1.0, help="use the labels of this fraction of cases")
    p.add_argument("--model", default="heads", choices=["heads", "baseline"],
                   help="heads on diffusion features, or the supervised MONAI UNet baseline")
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--max-cases", type=positive_int, help="use at most this many training cases")
    p.add_argument("--oversample", nargs="+", default=[], metavar="GLOB=FACTOR",
                   help="draw training cases whose id matches GLOB FACTOR times as often as the others, "
                        "e.g. 'spl-13-*=4' (default: every case equally often)")
    p.add_argument("--train-heads", default="both", choices=["both", "segmentation", "findings"],
                   help="which heads learn; the other keeps its weights exactly (default: both)")
    p.add_argument("--hard-negative-cells", type=nonnegative_int, default=0, metavar="K",
                   help="add to the finding cell loss the mean over the K highest-scoring cells away from any "
                        "lesion, per finding (default 0: off)")
    p.add_argument("--other-lesion-negatives", action="store_true",
                   help="add to each finding's cell loss the mean over the other findings' lesion cells, so that "
                        "a map does not fire on every lesion (default: off)")
    p.add_argument("--views", nargs="+", choices=["sagittal", "coronal", "axial"],
                   help="the backbone views the heads fuse (default: all the cases have)")
    p.add_argument("--from-scratch", action="store_true",
                   help="fresh heads even when --bundle has trained ones (default: continue from them)")
    p.add_argument("--validate-every", type=positive_int, default=100, metavar="STEPS")
    p.add_argument("--validation-cases", type=nonnegative_int, default=4)
    p.add_argument("--version", help="version of the new bundle (default: next minor)")
    p.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE or ~/.cache/orthoknee/features)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="Dice/HD95 per structure and AUC per finding on labelled cases")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--cases", type=Path, nargs="+", required=True, help="`orthoknee synth` outputs or case folders")
    p.add_argument("--split", default="all", help="which split to score: validation, train or all (default)")
    p.add_argument("--max-cases", type=positive_int)
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument("--raw", action="store_true",
                   help="score the heads' raw argmax, without the post-processing: femur, tibia and patella "
                        "each kept as its largest piece, cartilage off its bone removed, menisci split by side")
    p.add_argument("--json", action="store_true", help="print JSON with keys dice, hd95 (mm), auc")
    p.add_argument("--per-case", action="store_true", help="with --json: include per-case scores")
    p.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE or ~/.cache/orthoknee/features)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("cache", help="what the feature cache holds; --prune frees what no case or bundle can use")
    p.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE or ~/.cache/orthoknee/features)")
    p.add_argument("--prune", action="store_true",
                   help="remove stale entries (case folder gone, case files changed, interrupted writes)")
    p.add_argument("--keep-bundle", type=Path, nargs="+", metavar="BUNDLE",
                   help="with --prune: also remove every entry of a bundle not named here")
    p.add_argument("--compact", action="store_true",
                   help="rewrite the float16 features of entries cached before 8-bit features, in place (half the disk)")
    p.add_argument("--dry-run", action="store_true", help="with --prune or --compact: say what would change, change nothing")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", help="predict the shipped real sample case and write the outputs and the montage")
    p.add_argument("--out", type=Path, default=Path("orthoknee-demo-output"),
                   help="output folder (default ./orthoknee-demo-output)")
    p.add_argument("--sample", type=Path, help="folder holding the sample case (default: the shipped one)")
    p.add_argument("--bundle", type=Path, help="model bundle (default: the shipped demo bundle)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.set_defaults(func=cmd_demo)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: files being written are discarded, one line is printed."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in bundles, so a model card can quote the exact command
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except OrthoKneeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, _Terminated) else "cancelled"
        print(f"orthoknee {args.command}: {what}; files being written were discarded, earlier results are "
              "as they were.", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
