"""The `pretrain` command: self-supervised pretraining of one view's backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .args import (
    nonnegative_int,
    positive_float,
    positive_int,
)


def cmd_pretrain(args: argparse.Namespace) -> int:
    import shlex

    from ..bundle import Bundle, create_bundle, derive_bundle
    from ..model.diffusion import PretrainConfig, ViewModelConfig, pretrain
    from ..progress import TextProgress

    architecture = {"spacing": args.spacing, "patch": args.patch, "window": args.window, "channels": args.channels}
    init_state, started_from = None, None
    if args.init_from:
        parent = Bundle.open(args.init_from)
        view = parent.view_config(args.view)
        given = [f"--{k}" for k, v in architecture.items() if v is not None and tuple(v) != tuple(getattr(view, k))]
        if given:
            raise InputError(
                args.init_from,
                f"has a {args.view} backbone of another architecture than {' '.join(given)} asks for.",
                "Leave those options out with --init-from (the "
                "bundle's architecture is used), or pretrain from scratch without --init-from.",
            )
        entry = parent.metadata["views"][args.view]
        init_state = parent.load_state(entry["weights"], f"{args.view} backbone")
        started_from = {
            "bundle": parent.metadata.get("name"),
            "version": parent.metadata.get("version"),
            "sha256": entry["sha256"],
            "steps": (entry.get("training") or {}).get("steps"),
            "command": (entry.get("training") or {}).get("command"),
        }
        if (Path(args.out) / "metadata.json").is_file():
            bundle = Bundle.open(args.out, verify=False)  # a rerun: resume, keep what is there
        else:
            bundle = derive_bundle(parent, args.out, args.version)
    else:
        defaults = {
            "spacing": (1.0, 1.0, 3.0),
            "patch": (64, 64, 16),
            "window": (256, 256, 16),
            "channels": (8, 16, 32),
        }
        view = ViewModelConfig(
            plane=args.view, **{k: tuple(v if v is not None else defaults[k]) for k, v in architecture.items()}
        )
        bundle = create_bundle(args.out, name=args.name, version=args.version or "0.1.0")
    config = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        learning_rate=args.lr,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        max_volumes=args.max_volumes,
    )
    checkpoint = Path(args.out) / "checkpoints" / f"backbone_{args.view}.pt"
    summary = pretrain(
        view,
        args.data,
        checkpoint,
        config,
        device=args.device,
        resume=not args.fresh,
        progress=TextProgress(f"pretrain {args.view}", unit="step"),
        init_state=init_state,
    )
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


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("pretrain", help="self-supervised pretraining of one view's diffusion backbone")
    p.add_argument("--view", required=True, choices=["sagittal", "coronal", "axial"])
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        metavar="PATH",
        help="DICOM folders, volume files, `orthoknee synth` outputs (no labels are used)",
    )
    p.add_argument("--out", type=Path, required=True, help="bundle folder (created or updated)")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument(
        "--spacing",
        type=positive_float,
        nargs=3,
        metavar=("I", "J", "K"),
        help="model spacing in mm along the view's in-plane and through-plane axes (default 1 1 3)",
    )
    p.add_argument(
        "--patch", type=positive_int, nargs=3, metavar=("I", "J", "K"), help="training patch (default 64 64 16)"
    )
    p.add_argument(
        "--window",
        type=positive_int,
        nargs=3,
        metavar=("I", "J", "K"),
        help="largest sliding window for feature extraction (default 256 256 16)",
    )
    p.add_argument("--channels", type=positive_int, nargs="+", help="block widths (default 8 16 32)")
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="BUNDLE",
        help="continue the pretraining of BUNDLE's backbone for --view: same architecture, its weights "
        "as the start; --out becomes a new version of BUNDLE (its other backbones copied, no heads)",
    )
    p.add_argument("--checkpoint-every", type=positive_int, default=100)
    p.add_argument("--max-volumes", type=positive_int, help="use at most this many volumes")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint instead of resuming")
    p.add_argument("--name", default="orthoknee", help="bundle name, when creating it")
    p.add_argument(
        "--version",
        help="bundle version, when creating it (default 0.1.0; with --init-from, BUNDLE's next minor version)",
    )
    p.set_defaults(func=cmd_pretrain)
