"""Dice per structure and render contrast, from `orthoknee evaluate --json --per-case` outputs.

    python bench/dice_by_contrast.py EVAL.json [EVAL.json ...] [--cases DIR ...] [--worst N]

A test set's mean Dice mixes contrasts, and the heads' Dice depends on the contrast more than
on anything else measured so far. Outputs written before `evaluate` recorded each case's
contrast are completed from the case folders given with ``--cases`` (``case.json``). Prints a
Markdown table per output: structure x contrast, with the number of cases per contrast.

``--worst N`` adds, per structure, the N lowest-scoring cases, the median, and the mean without
those cases: whether a set's mean is short of a target across the board or because of a case
or two (one failed case out of 29 moves a mean by up to 0.03).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.evaluate import dice_by_contrast  # noqa: E402

SHOWN = ("femur", "tibia", "patella", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage")


def contrasts_of(folders: list[str]) -> dict[str, str]:
    """case_id -> contrast of every case folder under ``folders`` (searched recursively)."""
    found = {}
    for folder in folders:
        for parent, _, files in os.walk(folder, followlinks=True):  # test sets are folders of links
            if "case.json" not in files:
                continue
            meta = json.loads((Path(parent) / "case.json").read_text())
            contrast = (meta.get("contrast") or {}).get("contrast")
            if contrast:
                found[meta["case_id"]] = contrast
    return found


def with_contrasts(scores: dict, known: dict[str, str]) -> list[dict]:
    """The per-case rows, each with its contrast (from the row, else from ``known``)."""
    rows = [dict(row, contrast=row.get("contrast") or known.get(row["case_id"])) for row in scores["per_case"]]
    missing = [r["case_id"] for r in rows if not r["contrast"]]
    if missing:
        raise SystemExit(
            f"no contrast for {len(missing)} case(s) ({', '.join(missing[:3])}, ...): "
            "give their case folders with --cases"
        )
    return rows


def table(rows: list[dict]) -> str:
    groups = dice_by_contrast(rows)
    head = "| structure | " + " | ".join(f"{c} ({g['cases']})" for c, g in groups.items()) + " |"
    lines = [head, "|---" * (len(groups) + 1) + "|"]
    for key in SHOWN:
        if any(key in g["dice"] for g in groups.values()):
            lines.append(
                f"| {key} | "
                + " | ".join(f"{g['dice'][key]:.3f}" if key in g["dice"] else "-" for g in groups.values())
                + " |"
            )
    # a fixed set: each group's own mean_dice averages whichever structures its cases annotate
    common = [k for k in SHOWN if all(k in g["dice"] for g in groups.values())]
    lines.append(
        f"| **mean of the {len(common)} above** | "
        + " | ".join(f"{sum(g['dice'][k] for k in common) / len(common):.3f}" for g in groups.values())
        + " |"
    )
    return "\n".join(lines)


def worst_cases(rows: list[dict], n: int) -> str:
    """Markdown: per structure, its ``n`` lowest Dice (case, contrast), the median, the mean
    over every case and over the others."""
    lines = [
        "| structure | lowest cases (contrast: Dice) | median | mean | mean without them |",
        "|---|---|---|---|---|",
    ]
    for key in SHOWN:
        scored = sorted(
            (row["dice"][key], row["case_id"], row["contrast"]) for row in rows if row["dice"].get(key) is not None
        )
        if not scored:
            continue
        values = np.array([d for d, _, _ in scored])
        lowest = ", ".join(f"{case} ({contrast}: {d:.3f})" for d, case, contrast in scored[:n])
        rest = f"{values[n:].mean():.3f}" if len(values) > n else "-"
        lines.append(f"| {key} | {lowest} | {np.median(values):.3f} | {values.mean():.3f} | {rest} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evals", nargs="+", help="outputs of `orthoknee evaluate --json --per-case`")
    parser.add_argument("--cases", nargs="*", default=[], help="case folders, for outputs without contrasts")
    parser.add_argument(
        "--worst",
        type=int,
        default=0,
        metavar="N",
        help="also list each structure's N lowest-scoring cases and the mean without them",
    )
    args = parser.parse_args(argv)
    known = contrasts_of(args.cases)
    for path in args.evals:
        scores = json.loads(Path(path).read_text())
        if "per_case" not in scores:
            raise SystemExit(f"{path}: no per-case rows; rerun `orthoknee evaluate` with --per-case")
        print(f"\n{Path(path).name}\n")
        rows = with_contrasts(scores, known)
        print(table(rows))
        if args.worst > 0:
            print()
            print(worst_cases(rows, args.worst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
