"""The `finetune` and `evaluate` commands: heads on cached features, and their scores."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import json_text
from .args import (
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from .common import cache_dir


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
            raise InputError(
                None,
                f"--oversample {spec!r} is not GLOB=FACTOR with a positive factor.",
                "Give e.g. --oversample 'spl-13-*=4' to draw those cases 4 times as often.",
            )
        factors[pattern] = factor
    return factors


def cmd_finetune(args: argparse.Namespace) -> int:
    import shlex

    from ..bundle import Bundle
    from ..model.device import select_device
    from ..progress import TextProgress
    from ..train import FinetuneConfig, cache_case, case_draw_weights, check_finetune_config, find_cases, finetune

    oversample = _oversample_factors(args.oversample)
    bundle = Bundle.open(args.bundle)
    train = find_cases(args.cases, "train")
    if args.max_cases:
        train = train[: args.max_cases]
    val = find_cases(args.validation or args.cases, "validation" if not args.validation else None)[
        : args.validation_cases
    ]
    if not train:
        raise InputError(
            None,
            f"no training cases (split 'train') under {', '.join(map(str, args.cases))}.",
            "Make some with `orthoknee synth`.",
        )
    if not val and not args.validation and args.validation_cases and len(train) >= 5:
        # an annotator's exported cases are all 'train': hold some out, so that early stopping and the
        # before / after scores in the new bundle's lineage are measured on cases it did not learn from
        held = max(1, len(train) // 5)
        order = np.random.default_rng(args.seed).permutation(len(train))
        val = [train[i] for i in sorted(order[:held])][: args.validation_cases]
        train = [train[i] for i in sorted(order[held:])]
        print(
            f"validation: {len(val)} of the {len(train) + len(val)} cases held out ({', '.join(c.name for c in val)})"
        )
    elif not val:
        print(
            f"validation: none ({len(train)} cases, no 'validation' split, no --validation): the run trains "
            f"{args.steps} steps without early stopping; give --validation CASES to measure it"
        )
    config = FinetuneConfig(
        steps=args.steps,
        label_fraction=args.label_fraction,
        seed=args.seed,
        learning_rate=args.lr,
        model=args.model,
        validate_every=args.validate_every,
        validation_cases=args.validation_cases,
        from_scratch=args.from_scratch,
        views=tuple(args.views) if args.views else None,
        oversample=oversample,
        train_heads=args.train_heads,
        hard_negative_cells=args.hard_negative_cells,
        other_lesion_negatives=args.other_lesion_negatives,
        early_stop_patience=args.early_stop,
        new_labels=args.new_labels,
        anchor=args.anchor,
        finding_hosts=args.finding_hosts,
    )
    # mistakes are refused now, not after every case's features are cached
    check_finetune_config(bundle, config)
    if oversample:
        case_draw_weights([json.loads((c / "case.json").read_text())["case_id"] for c in train], oversample)
    device = select_device(args.device)
    cache = cache_dir(args)
    bar = TextProgress("features", unit="case")
    train_c = []
    for n, c in enumerate(train + val):
        train_c.append(cache_case(bundle, c, cache, device=device, views=args.views or None))
        bar(n + 1, len(train) + len(val), c.name)
    out = finetune(
        bundle,
        train_c[: len(train)],
        args.out,
        config,
        validation_caches=train_c[len(train) :],
        version=args.version,
        device=args.device,
        progress=TextProgress("finetune", unit="step"),
        command="orthoknee " + " ".join(shlex.quote(str(a)) for a in args.argv),
    )
    t = out.metadata["heads"]["training"]
    print(
        f"{args.out}: {out.metadata['heads']['kind']} {out.metadata['version']}, {t['labelled_cases']} of "
        f"{t['cases']} cases labelled, {config.steps} steps in {t['seconds']:.0f} s, "
        f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..evaluate import evaluate_bundle, format_table
    from ..progress import TextProgress
    from ..train import find_cases

    if args.compare:
        from ..compare import compare_table

        if args.bundle or args.cases:
            raise InputError(
                None,
                "--compare reads two saved scores; it takes no --bundle or --cases.",
                "Score each model with `orthoknee evaluate --json --per-case` first.",
            )
        print(
            compare_table(
                args.compare[0],
                args.compare[1],
                names=tuple(args.names) if args.names else None,
                bootstrap=args.bootstrap,
            )
        )
        return 0
    if not args.bundle or not args.cases:
        raise InputError(
            None,
            "evaluate needs --bundle and --cases (or --compare A.json B.json).",
            "Give e.g. `orthoknee evaluate --bundle B --cases CASES`.",
        )
    bundle = Bundle.open(args.bundle)
    cases = find_cases(args.cases, args.split)
    if args.max_cases:
        cases = cases[: args.max_cases]
    if not cases:
        raise InputError(
            None,
            f"no cases with split {args.split!r} under {', '.join(map(str, args.cases))}.",
            "Use --split all, or give other folders.",
        )
    scores = evaluate_bundle(
        bundle,
        cases,
        cache_dir(args),
        device=args.device,
        progress=TextProgress("evaluate", unit="step"),
        with_hd95=not args.no_hd95,
        postprocess=not args.raw,
        gate=args.gate,
    )
    if args.json:
        print(json_text({k: v for k, v in scores.items() if args.per_case or k != "per_case"}))
    else:
        print(
            f"{bundle.metadata.get('name')} {bundle.metadata.get('version')} ({scores['bundle']['kind']}) "
            f"on {scores['cases']} cases"
        )
        print(format_table(scores, bundle.catalog))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Two bundle versions' outputs on one case, side by side."""
    from ..compare import compare_predictions, format_prediction_diff

    diff = compare_predictions(args.a, args.b)
    print(json_text(diff) if args.json else format_prediction_diff(diff))
    return 0


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("finetune", help="train the heads on cached features of labelled cases (backbone frozen)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle with pretrained backbones")
    p.add_argument("--cases", type=Path, nargs="+", required=True, help="`orthoknee synth` outputs or case folders")
    p.add_argument(
        "--validation", type=Path, nargs="+", help="validation cases (default: split 'validation' of --cases)"
    )
    p.add_argument("--out", type=Path, required=True, help="new bundle folder")
    p.add_argument("--label-fraction", type=fraction, default=1.0, help="use the labels of this fraction of cases")
    p.add_argument(
        "--model",
        default="heads",
        choices=["heads", "baseline"],
        help="heads on diffusion features, or the supervised MONAI UNet baseline",
    )
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument(
        "--anchor",
        type=nonnegative_float,
        default=0.0,
        metavar="WEIGHT",
        help="pull the heads toward the bundle's own weights (L2-SP) with this weight, so that a few "
        "corrected cases do not make the heads forget other cases (the Slicer module uses 1; 0: off)",
    )
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--max-cases", type=positive_int, help="use at most this many training cases")
    p.add_argument(
        "--oversample",
        nargs="+",
        default=[],
        metavar="GLOB=FACTOR",
        help="draw training cases whose id matches GLOB FACTOR times as often as the others, "
        "e.g. 'spl-13-*=4' (default: every case equally often)",
    )
    p.add_argument(
        "--train-heads",
        default="both",
        choices=["both", "segmentation", "findings", "fusion", "attention"],
        help="which heads learn; the rest keeps its weights exactly (default: both). fusion: only how "
        "the views are weighed and projected, e.g. after adding views with --views; attention: only "
        "which cells each finding's case score reads (e.g. with --finding-hosts)",
    )
    p.add_argument(
        "--hard-negative-cells",
        type=nonnegative_int,
        default=0,
        metavar="K",
        help="add to the finding cell loss the mean over the K highest-scoring cells away from any "
        "lesion, per finding (default 0: off)",
    )
    p.add_argument(
        "--finding-hosts",
        action="store_true",
        help="the finding head reads each finding's score and map from its host anatomy only (bone "
        "marrow lesions from the bones, tears from their ligament or meniscus), taken from the heads' "
        "own segmentation; needs heads to start from",
    )
    p.add_argument(
        "--other-lesion-negatives",
        action="store_true",
        help="add to each finding's cell loss the mean over the other findings' lesion cells, so that "
        "a map does not fire on every lesion (default: off)",
    )
    p.add_argument(
        "--views",
        nargs="+",
        choices=["sagittal", "coronal", "axial"],
        help="the backbone views the heads fuse (default: all the cases have)",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="fresh heads even when --bundle has trained ones (default: continue from them)",
    )
    p.add_argument("--validate-every", type=positive_int, default=100, metavar="STEPS")
    p.add_argument(
        "--new-labels",
        action="store_true",
        help="segments an annotator added (a case's extra_labels) become new classes of the segmentation head; "
        "the old classes keep their weights and the new bundle's catalog lists them",
    )
    p.add_argument(
        "--early-stop",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="stop after N validations without a better mean Dice and keep the best validated heads (default 0: off)",
    )
    p.add_argument("--validation-cases", type=nonnegative_int, default=4)
    p.add_argument("--version", help="version of the new bundle (default: next minor)")
    p.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE or ~/.cache/orthoknee/features)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="Dice/HD95 per structure and AUC per finding on labelled cases")
    p.add_argument("--bundle", type=Path)
    p.add_argument("--cases", type=Path, nargs="+", help="`orthoknee synth` outputs or case folders")
    p.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("A.json", "B.json"),
        help="compare two saved `evaluate --json --per-case` scores on the same cases, paired, with 95 %% "
        "bootstrap intervals (B - A)",
    )
    p.add_argument(
        "--gate",
        action="store_true",
        help="score findings from their maps confined to their anatomy (gating.py), and report how often "
        "a positive case's map peaks on its lesion",
    )
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="with --compare: names for the two models")
    p.add_argument("--bootstrap", type=positive_int, default=10000, help="with --compare: resamples of the cases")
    p.add_argument("--split", default="all", help="which split to score: validation, train or all (default)")
    p.add_argument("--max-cases", type=positive_int)
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="score the heads' raw argmax, without the post-processing: femur, tibia and patella "
        "each kept as its largest piece, cartilage off its bone removed, menisci split by side",
    )
    p.add_argument("--json", action="store_true", help="print JSON with keys dice, hd95 (mm), auc")
    p.add_argument("--per-case", action="store_true", help="with --json: include per-case scores")
    p.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE or ~/.cache/orthoknee/features)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("diff", help="two predictions of one case (e.g. two bundle versions): Dice, volumes, findings")
    p.add_argument("a", type=Path, metavar="OUT_A", help="an output folder of `orthoknee predict`")
    p.add_argument("b", type=Path, metavar="OUT_B", help="another output folder of the same case")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_diff)
