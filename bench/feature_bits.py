"""Could the feature cache hold 8-bit features? The heads' Dice and finding probabilities on
synthetic cases with the features as the Predictor computes them (float32), as the cache held
them until 8-bit features (float16), and rounded to N bits per channel (the cache now: 8).

    ORTHOKNEE_CACHE=/work/data/cache python bench/feature_bits.py --bundle B --cases DIR [--bits 8]
        [--max-cases N]

Why: each render's sagittal features took about 230 MB of cache at 16 bits. More renders of
the training subjects are the lever that moved the cartilages most, and the disk could not
hold them (model card, "What blocks the remaining targets"). The features are computed afresh
from the bundle's backbones (about 5 s a case), so the answer does not depend on what the
cache holds. Rounding is ``featurecache.quantize_channels``: per case and channel, the
channel's [min, max] in 2^N - 1 even steps. The truth and grids come from the cache entry;
each labelmap is post-processed as `orthoknee predict` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OrthoKneeLib.bundle import Bundle  # noqa: E402
from OrthoKneeLib.errors import InputError, OrthoKneeError  # noqa: E402
from OrthoKneeLib.evaluate import dice, roc_auc  # noqa: E402
from OrthoKneeLib.featurecache import default_cache_dir, dequantize_channels, quantize_channels  # noqa: E402
from OrthoKneeLib.postprocess import finish_prediction  # noqa: E402
from OrthoKneeLib.predict import fusion_inputs, load_heads, run_heads, views_fused  # noqa: E402
from OrthoKneeLib.synth.dataset import read_case  # noqa: E402
from OrthoKneeLib.train import CachedCase, cache_case, find_cases  # noqa: E402


def quantized(features: np.ndarray, bits: int) -> np.ndarray:
    """``features`` (C, ...) rounded as the cache rounds them, read back as float32."""
    return dequantize_channels(*quantize_channels(features, bits))


def case_scores(heads, inputs, case: CachedCase, catalog) -> tuple[dict[str, float], np.ndarray]:
    """Dice per annotated structure and the case-level finding probabilities."""
    result = run_heads(heads, inputs)
    labelmap = finish_prediction(result["probabilities"], case.reference_grid, catalog)[1]
    truth = np.asarray(case.array("labels_reference"))
    scores = {}
    for s in catalog.structures:
        if s.key in case.meta["annotated"] and (d := dice(labelmap == s.label, truth == s.label)) is not None:
            scores[s.key] = d
    return scores, np.asarray(result["finding_probabilities"], float)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--cases", required=True, help="a folder of synthetic cases (as for orthoknee evaluate)")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--max-cases", type=int)
    parser.add_argument(
        "--cache", default=default_cache_dir(), help="feature cache (default $ORTHOKNEE_CACHE, as for the CLI)"
    )
    args = parser.parse_args(argv)
    if not 2 <= args.bits <= 16:
        raise InputError(None, f"--bits {args.bits} is out of range.", "Give 2 to 16 bits.")

    bundle = Bundle.open(args.bundle)
    catalog = bundle.catalog
    kind, heads = load_heads(bundle, device="cpu")
    if kind != "diffusion-heads":
        raise InputError(
            Path(args.bundle),
            "holds the supervised baseline, which reads no features.",
            "Give a bundle with diffusion heads.",
        )
    folders = find_cases([args.cases])[: args.max_cases]
    precisions = ("float32", "float16", f"{args.bits} bits")
    dice_by: dict[str, dict[str, list[float]]] = {p: {s.key: [] for s in catalog.structures} for p in precisions}
    probs_by: dict[str, list[np.ndarray]] = {p: [] for p in precisions}
    truths, known = [], []
    bytes_16 = bytes_n = 0
    views = views_fused(kind, heads)
    for folder in folders:
        case = CachedCase(cache_case(bundle, folder, args.cache, views=views))
        inputs = fusion_inputs(bundle, read_case(folder).case, use=views)
        variants = {
            "float32": inputs,
            "float16": dataclasses.replace(
                inputs, features={p: f.astype(np.float16).astype(np.float32) for p, f in inputs.features.items()}
            ),
            precisions[2]: dataclasses.replace(
                inputs, features={p: quantized(f, args.bits) for p, f in inputs.features.items()}
            ),
        }
        case_means = []
        for precision, variant in variants.items():
            scores, probs = case_scores(heads, variant, case, catalog)
            for key, value in scores.items():
                dice_by[precision][key].append(value)
            probs_by[precision].append(probs)
            case_means.append(f"{np.mean(list(scores.values())):.4f} ({precision})")
        values, is_known = case.finding_targets(catalog)
        truths.append(np.asarray(values, int))
        known.append(np.asarray(is_known, bool))
        for f in inputs.features.values():
            bytes_16 += f.size * 2
            bytes_n += f.size * ((args.bits + 7) // 8) + f.shape[0] * 8  # whole bytes a value, two float32 a channel
        print(f"{case.case_id}: mean Dice " + ", ".join(case_means), file=sys.stderr, flush=True)

    low = precisions[2]
    print(
        f"{len(folders)} cases; features {bytes_16 / len(folders) / 1e6:.0f} MB a case at 16 bits, "
        f"{bytes_n / len(folders) / 1e6:.0f} MB at {args.bits} ({bytes_n / bytes_16:.2f} x)\n"
    )
    print(f"| structure | cases | Dice, float32 | float16 | {low} | {low} - float32, mean | largest in a case |")
    print("|---|---|---|---|---|---|---|")
    for key, full in dice_by["float32"].items():
        if full:
            diff = np.asarray(dice_by[low][key]) - np.asarray(full)
            print(
                f"| {key} | {len(full)} | "
                + " | ".join(f"{np.mean(dice_by[p][key]):.4f}" for p in precisions)
                + f" | {diff.mean():+.4f} | {diff[np.abs(diff).argmax()]:+.4f} |"
            )
    y, k = np.array(truths), np.array(known)
    probs = {p: np.array(v) for p, v in probs_by.items()}
    print(f"\n| finding | cases | positive | AUC, float32 | float16 | {low} | largest probability change, {low} |")
    print("|---|---|---|---|---|---|---|")
    for index, f in enumerate(catalog.findings):
        rows = k[:, index]
        if not rows.any():
            continue
        aucs = [roc_auc(probs[p][rows, index], y[rows, index]) for p in precisions]
        text = " | ".join(f"{a:.3f}" if a is not None else "-" for a in aucs)
        change = np.abs(probs[low][rows, index] - probs["float32"][rows, index]).max()
        print(f"| {f.key} | {int(rows.sum())} | {int(y[rows, index].sum())} | {text} | {change:.4f} |")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except OrthoKneeError as error:
        raise SystemExit(f"error: {error}")
