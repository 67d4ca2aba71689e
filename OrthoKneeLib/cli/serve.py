"""The `serve` command: the browser viewer on one case, for people without Slicer."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .args import positive_int
from .common import max_voxels_option


def _case_predictor(args: argparse.Namespace, out: Path):
    """A callable(progress) that predicts the case ARGS name into ``out``, or None for an output folder."""
    from ..resources import SAMPLE_VIEWS, sample_case_dir

    path = args.path

    def predict(progress) -> None:
        from ..montage import montage
        from ..outfolder import locked_folder
        from ..predict import Predictor
        from ..volumes import Case, load_volume, series_volumes

        if path is None:
            folder = sample_case_dir()
            case = Case(**{p: load_volume(folder / n) for p, n in SAMPLE_VIEWS.items()}, name="OrthoKnee sample (DESS)")
        else:
            case = Case.from_volumes(series_volumes(path, max_voxels=args.max_voxels))
        with locked_folder(out):
            prediction = Predictor(args.bundle, device=args.device).predict(case, progress=progress)
            prediction.save(out, extra={"montage.png": lambda p: montage(prediction, case, p)})

    return predict


def cmd_serve(args: argparse.Namespace) -> int:
    from trame.app import get_server

    from ..outfolder import check_output_folder
    from ..results import is_output_folder
    from ..viewer.app import OrthoKneeViewer

    if args.path is not None and not Path(args.path).exists():
        raise InputError(args.path, "does not exist.", "Give a case folder, a series file or an output folder.")
    if args.path is not None and is_output_folder(args.path):
        out, predict = Path(args.path), None
    else:
        default = Path("orthoknee-demo-output") if args.path is None else Path(f"{Path(args.path).resolve()}-orthoknee")
        out = check_output_folder(args.out or default)
        predict = None if is_output_folder(out) else _case_predictor(args, out)
    server = get_server("orthoknee", client_type="vue3")
    OrthoKneeViewer(server, out, predict=predict, versions=args.versions or [], device=args.device)
    print(f"OrthoKnee viewer on http://{args.host}:{args.port}/ ({out}); Ctrl-C stops it.", flush=True)
    server.start(port=args.port, host=args.host, open_browser=False, show_connection_info=False)
    return 0


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("serve", help="the browser viewer: structures, findings and overlays of one case, editable")
    p.add_argument(
        "path",
        nargs="?",
        type=Path,
        metavar="CASE_OR_OUTPUT",
        help="an `orthoknee predict` output folder, or a case (series files or DICOM folder) to predict "
        "first; default: the shipped sample case",
    )
    p.add_argument("--port", type=positive_int, default=8080, help="port (default 8080)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--out", type=Path, help="where a case's prediction is written (default: beside it, '-orthoknee')")
    p.add_argument("--bundle", type=Path, help="model bundle (default: the shipped demo bundle)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument(
        "--versions",
        type=Path,
        nargs="+",
        metavar="BUNDLE",
        help="other bundle versions (bundles, or folders of bundles) the Versions panel offers to run on the case "
        "and compare; the shipped bundle is always offered",
    )
    max_voxels_option(p)
    p.set_defaults(func=cmd_serve)
