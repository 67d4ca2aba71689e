"""Fine-tuning the heads on frozen features (and the supervised baseline they are compared with).

Features are computed once per (bundle backbone, case) by the Predictor's own feature stage
(predict.fusion_inputs) and cached as float16 arrays; training then reads random patches
(segmentation) and whole pooled cases (findings) from memory-mapped files, so a training
run costs seconds per epoch instead of a backbone pass per step.
"""

from __future__ import annotations

import fnmatch
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Bundle, derive_bundle

# cases and their cached features live in cachedcase.py, which evaluate.py reads too; re-exported here
from .cachedcase import CachedCase, _axis_map, cache_case, find_cases  # noqa: F401
from .errors import InputError
from .io import atomic_path, load_checkpoint
from .labels import Catalog
from .progress import CancelToken, ProgressFn, no_progress

__all__ = ["find_cases", "cache_case", "CachedCase", "FinetuneConfig", "finetune"]


@dataclass
class FinetuneConfig:
    steps: int = 600
    patch_kji: tuple[int, int, int] = (8, 128, 128)  # fusion-grid voxels (1 x 1 x 3 mm) of a segmentation patch
    learning_rate: float = 1e-3
    clip_grad_norm: float = 1.0
    weight_decay: float = 1e-4
    label_fraction: float = 1.0
    seed: int = 0
    view_dropout: float = 0.2
    finding_weight: float = 1.0
    cell_weight: float = 1.0
    finding_every: int = 2  # steps between finding-head updates (segmentation trains every step)
    validate_every: int = 100
    validation_cases: int = 6
    # > 0: stop after this many validations without a better mean Dice, and keep the best validated heads
    early_stop_patience: int = 0
    # True: labels an annotator added (a case's extra_labels) become new segmentation classes
    new_labels: bool = False
    checkpoint_every: int = 100  # steps; a stopped run resumes from ``<out>.checkpoint.pt``
    model: str = "heads"  # or "baseline": a supervised MONAI UNet on the reference series
    from_scratch: bool = False  # False: start from the bundle's heads of the same kind, if it has them
    views: tuple[str, ...] | None = None  # backbone views the heads fuse (None: every view of the cases)
    # case-id glob -> how many times more often a matching case is drawn than the others; a
    # case matching several patterns takes their product. Empty: every case equally often.
    oversample: dict[str, float] = field(default_factory=dict)
    # which of the two heads learn: "both", "segmentation" or "findings". One head alone keeps
    # the other's weights exactly (it is not in the optimizer), so a finding-head experiment
    # leaves the Dice untouched, and costs ~40 % of a joint step (no segmentation patch).
    train_heads: str = "both"
    # > 0: the cell loss also takes, per finding, the mean over this many highest-scoring cells
    # away from any lesion (one cell of margin). See balanced_cell_loss.
    hard_negative_cells: int = 0
    # True: the cell loss also takes, per finding, the mean over the other findings' lesion cells
    # (away from its own lesion). See balanced_cell_loss.
    other_lesion_negatives: bool = False
    # > 0: an L2 pull toward the starting heads' weights (L2-SP, Li et al. 2018), this weight times the
    # squared distance summed over the weights: a few corrected cases then move the heads toward
    # them without forgetting what the starting heads knew about every other case
    anchor: float = 0.0
    # True: the finding head's attention reads each finding's host anatomy (HeadsConfig.finding_hosts),
    # taken from the heads' own segmentation of each case, as prediction takes it
    finding_hosts: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _replayed_steps(previous: dict, config: FinetuneConfig, n_cases: int) -> int:
    """How many of this run's steps draw exactly the patches the starting heads' last run drew.

    Every step's case and patch come from ``default_rng([seed, step])``, so that a stopped run
    resumes exactly; a continuation with the same seed and cases replays the previous run's
    batches in order. (0.4.0, 0.5.0 and 0.6.0 were each such a continuation of seed 0.)
    """
    before = previous.get("config") or {}
    same_cases = previous.get("cases") == n_cases  # the record keeps the count (and the subjects)
    if (
        before.get("seed") != config.seed
        or not same_cases
        or before.get("model", "heads") != config.model
        or before.get("label_fraction", 1.0) != config.label_fraction
        or (before.get("oversample") or {}) != config.oversample
        or before.get("train_heads", "both") != config.train_heads
    ):
        return 0
    return min(int(before.get("steps", 0)), config.steps)


def case_draw_weights(case_ids: Sequence[str], oversample: dict[str, float]) -> np.ndarray | None:
    """Each case's chance of being drawn for a step, or None for uniform draws.

    Oversampling lets a few cases that matter more than their number (an annotator's own
    corrections, or the only renders of an anatomy, such as the mirrored atlas) take a larger
    share of the steps without copying them on disk. None keeps uniform draws exactly as
    before, so that runs without it replay their recorded patches.
    """
    if not oversample:
        return None
    weights = np.ones(len(case_ids))
    for pattern, factor in oversample.items():
        if not (np.isfinite(factor) and factor > 0):
            raise InputError(
                None,
                f"--oversample {pattern}={factor}: the factor must be a positive number.",
                "Give e.g. --oversample 'spl-13-*=4' (4 times as often as other cases).",
            )
        hits = np.array([fnmatch.fnmatchcase(c, pattern) for c in case_ids], dtype=bool)
        if not hits.any():
            raise InputError(
                None,
                f"--oversample {pattern}={factor:g}: no training case id matches {pattern!r} "
                f"(ids look like {', '.join(list(case_ids)[:3])}).",
                "Check the pattern against the case folders' names.",
            )
        weights[hits] *= factor
    return weights / weights.sum()


def draw_case(rng: np.random.Generator, n_cases: int, draw_p: np.ndarray | None) -> int:
    """The index of the case a step trains on (``draw_p`` from :func:`case_draw_weights`)."""
    return int(rng.integers(n_cases) if draw_p is None else rng.choice(n_cases, p=draw_p))


# what --train-heads may train: both heads, one of them, only the view fusion of each (views added
# to trained heads learn where they help while predictions from the old views stay as they were), or
# only the finding head's attention (which cells a case score reads; the maps stay as they were)
TRAIN_HEADS = ("both", "segmentation", "findings", "fusion", "attention")


def check_finetune_config(bundle: Bundle, config: FinetuneConfig) -> None:
    """Refuse settings that cannot train, before any feature is cached: a negative hard-negative
    count, or one head trained alone when the other would be left untrained (or does not exist)."""
    if config.hard_negative_cells < 0:
        raise InputError(
            None,
            f"--hard-negative-cells {config.hard_negative_cells}: the count cannot be negative.",
            "Give 0 (off) or a number of cells, e.g. 32.",
        )
    if config.train_heads not in TRAIN_HEADS:
        raise ValueError(f"train_heads must be one of {', '.join(TRAIN_HEADS)}, not {config.train_heads!r}")
    if config.train_heads == "both":
        return
    has_heads = (bundle.metadata.get("heads") or {}).get("kind") == "diffusion-heads"
    if config.model == "baseline" or config.from_scratch or not has_heads:
        why = (
            "the supervised baseline has no separate heads"
            if config.model == "baseline"
            else "--from-scratch starts both heads afresh"
            if config.from_scratch
            else f"{bundle.path} has no trained diffusion heads"
        )
        raise InputError(
            None,
            f"--train-heads {config.train_heads} keeps part of the heads as they are, but {why}.",
            "Train both heads (--train-heads both), or start from a bundle with trained heads.",
        )


def labelled_subset(cases: list, fraction: float, seed: int) -> list:
    """The cases whose labels a run may use: a fixed random ``fraction`` of them (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(cases))))
    order = np.random.default_rng([seed, 11]).permutation(len(cases))
    return [cases[i] for i in sorted(order[:n])]


def _patch_boxes(case: CachedCase, patch_kji, rng) -> tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray]:
    """A fusion-grid patch (foreground-biased) and the reference-grid voxels inside it.

    Returns (fusion slices, reference slices, and per axis k, j, i the fusion-index coordinates of
    the reference voxels relative to the patch start).
    """
    labels = case.array("labels_fusion")
    size = labels.shape
    patch = [min(p, s) for p, s in zip(patch_kji, size)]
    if rng.random() < 0.7:
        fg = np.flatnonzero(labels[::2, ::4, ::4] > 0)
        if fg.size:
            c = np.array(np.unravel_index(rng.choice(fg), labels[::2, ::4, ::4].shape)) * [2, 4, 4]
        else:
            c = np.array([rng.integers(s) for s in size])
    else:
        c = np.array([rng.integers(s) for s in size])
    start = [int(np.clip(ci - p // 2, 0, s - p)) for ci, p, s in zip(c, patch, size)]
    fusion_box = tuple(slice(a, a + p) for a, p in zip(start, patch))
    scale, offset = _axis_map(case.fusion_grid, case.reference_grid)  # i, j, k
    ref_size = case.reference_grid.size
    ref_box, coords = [], []
    for axis_kji, (a, p) in enumerate(zip(start, patch)):
        ax = 2 - axis_kji  # i, j, k index
        lo = int(np.ceil((a - offset[ax]) / scale[ax] - 1e-6))
        hi = int(np.floor((a + p - 1 - offset[ax]) / scale[ax] + 1e-6))
        lo, hi = max(lo, 0), min(hi, ref_size[ax] - 1)
        ref_box.append(slice(lo, hi + 1))
        coords.append(np.arange(lo, hi + 1) * scale[ax] + offset[ax] - a)
    return fusion_box, tuple(ref_box), coords


def _upsample_patch(coarse, coords, patch_kji):
    """Trilinear values of a coarse (N, C, k, j, i) patch at fusion-index ``coords`` (per axis k, j, i)."""
    import torch
    import torch.nn.functional as F

    norm = [torch.as_tensor(2 * c / max(p - 1, 1) - 1, dtype=torch.float32) for c, p in zip(coords, patch_kji)]
    kk, jj, ii = torch.meshgrid(*norm, indexing="ij")
    grid = torch.stack([ii, jj, kk], dim=-1)[None]
    return F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _finding_loss(
    heads, case: CachedCase, planes: list[str], catalog: Catalog, config: FinetuneConfig, dev, hosts=None
):
    import torch
    import torch.nn.functional as F

    feats = {p: torch.from_numpy(case.pooled_features[p].astype(np.float32))[None].to(dev) for p in planes}
    cover = {p: torch.from_numpy(case.pooled_coverage[p].astype(np.float32))[None].to(dev) for p in planes}
    inside = heads.findings.seen_cells(cover)
    image = torch.from_numpy(case.pooled_image.astype(np.float32))[None].to(dev)
    case_logits, cell_logits, _ = heads.findings(feats, cover, image, inside, hosts)
    values, known = case.finding_targets(catalog)
    known_t = torch.from_numpy(known).to(dev)
    if not known.any():
        return case_logits.sum() * 0
    target = torch.from_numpy(values).to(dev)[None]
    case_loss = F.binary_cross_entropy_with_logits(case_logits[0][known_t], target[0][known_t])
    masks = torch.from_numpy(case.finding_masks(catalog).astype(np.float32))[None].to(dev).clamp(0, 1)
    # hard negatives only where the case says where the finding is not: absent, or present with
    # its lesion drawn (an accepted finding without a region could lie under any high cell)
    hard_for = (target < 0.5) | (masks.flatten(2).amax(-1) > 0.5)
    cell_loss = balanced_cell_loss(
        cell_logits, masks, inside, config.hard_negative_cells, config.other_lesion_negatives, hosts, hard_for
    )[0][known_t].mean()
    return config.finding_weight * case_loss + config.cell_weight * cell_loss


def balanced_cell_loss(
    cell_logits, masks, inside, hard_negatives: int = 0, other_lesions: bool = False, hosts=None, hard_for=None
):
    """Per finding (N, F): mean cross-entropy over the lesion's cells plus mean over all others.

    A lesion is a few dozen of ~100 000 cells (a torn ACL ~12): weighted by count, or even
    21-fold, the lesion cells were too few to matter and the cells learnt a near-constant. Balanced,
    the lesion weighs as much as the rest of the knee. A case without the finding (or with the
    finding but no mask) has the negative term alone. Cells no view saw are left out.

    The mean over all other cells barely feels a few dozen false alarms: a case without the
    finding whose map peaks on an intact ACL pays ~1e-4 of its loss for it, and such peaks are
    what the case score reads (held-out ACL tears are their own case's highest cell, yet the
    highest cell separates the cases at AUC ~0.6). ``hard_negatives`` K > 0 adds the mean over
    the K highest cells away from any lesion (more than one cell from it), so those peaks cost.

    Most simulated lesions are fluid where none belongs, and the maps learn "fluid" more than
    "which finding": in held-out cases without an ACL tear, 7 of 10 ACL maps peaked on another
    finding's lesion (a torn PCL, an effusion). ``other_lesions`` adds the mean over the cells
    of the case's other lesions (at least half covered, more than one cell from this finding's
    own lesion), so each map learns to stay low on the others' lesions.

    Neither term moved the held-out case AUC past noise in 1500 finding-head steps (the model
    card's "The finding head alone"); both are off by default.

    ``hosts`` (N, F, k, j, i), for heads whose attention reads host anatomy: the host's own
    lesion-free cells get a mean of their own, as heavy as the lesion's. Those are the cells a
    case score reads, and among ~100 000 cells of soft tissue and air their false alarms (a bone
    marrow lesion map lit over hundreds of bone cells in cases without one) cost next to nothing.
    With hard negatives, the K highest cells are taken in the host.

    ``hard_for`` (N, F) bool, when given, limits the hard-negative term to those findings (see
    :func:`_finding_loss`: not for a finding accepted without a drawn region).

    An annotator's rejection is a case without the finding: with hard negatives its highest
    cells, the ones its case score reads, are pushed down, so a rejected finding's score falls
    (bench/correction.py: 0.34 -> 0.16 in 60 steps with K = 32; without them 0.34 -> 0.34).
    """
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(cell_logits, masks, reduction="none")
    lesion, rest = masks * inside, (1 - masks) * inside
    dims = (2, 3, 4)
    lesion_term = (bce * lesion).sum(dims) / lesion.sum(dims).clamp_min(1e-6)
    rest_term = (bce * rest).sum(dims) / rest.sum(dims).clamp_min(1e-6)
    loss = rest_term + (lesion.sum(dims) > 0.5).float() * lesion_term
    if hosts is not None:
        host_rest = (1 - masks) * inside * hosts
        loss = loss + (bce * host_rest).sum(dims) / host_rest.sum(dims).clamp_min(1e-6)
    if not (other_lesions or hard_negatives > 0):
        return loss
    near_lesion = F.max_pool3d(masks, 3, stride=1, padding=1) > 0
    if other_lesions:
        lesion_cells = (masks >= 0.5).float()
        others = ((lesion_cells.sum(1, keepdim=True) - lesion_cells) > 0) & (inside > 0.5) & ~near_lesion
        count = others.sum(dims)
        loss = loss + (F.softplus(cell_logits) * others).sum(dims) / count.clamp_min(1) * (count > 0)
    if hard_negatives > 0:
        clear = (inside > 0.5) & ~near_lesion
        if hosts is not None:
            clear = clear & (hosts > 0.5)
        negative_logits = cell_logits.masked_fill(~clear, float("-inf")).flatten(2)
        k = min(hard_negatives, negative_logits.shape[-1])
        top = negative_logits.topk(k, dim=-1).values  # the highest logits cost the most: softplus grows
        counted = torch.isfinite(top)
        hard = (F.softplus(top.masked_fill(~counted, 0.0)) * counted).sum(-1) / counted.sum(-1).clamp_min(1)
        loss = loss + (hard if hard_for is None else hard * hard_for.float())
    return loss


def _seg_batch(case: CachedCase, planes: list[str], config: FinetuneConfig, rng, dev, catalog: Catalog):
    import torch

    fbox, rbox, coords = _patch_boxes(case, config.patch_kji, rng)
    patch = tuple(s.stop - s.start for s in fbox)
    feats = {
        p: torch.from_numpy(np.asarray(case.array(f"features_{p}")[(slice(None), *fbox)], np.float32))[None].to(dev)
        for p in planes
    }
    cover = {
        p: torch.from_numpy(np.asarray(case.array(f"coverage_{p}")[(slice(None), *fbox)], np.float32))[None].to(dev)
        for p in planes
    }
    image_f = torch.from_numpy(np.asarray(case.array("image_fusion")[(slice(None), *fbox)], np.float32))[None].to(dev)
    lut = case.label_lut(catalog)  # an annotator's new labels to their classes, unknown values to background
    labels_f = torch.from_numpy(lut[np.asarray(case.array("labels_fusion")[fbox], np.int64)])[None].to(dev)
    image_r = torch.from_numpy(np.asarray(case.array("image_reference")[(slice(None), *rbox)], np.float32))[None].to(
        dev
    )
    labels_r = torch.from_numpy(lut[np.asarray(case.array("labels_reference")[rbox], np.int64)])[None].to(dev)
    annotated = torch.from_numpy(case.annotated_mask(catalog))[None].to(dev)
    return feats, cover, image_f, labels_f, image_r, labels_r, coords, patch, annotated


def _baseline_batch(case: CachedCase, config: FinetuneConfig, rng, dev, catalog: Catalog, batch: int = 2):
    import torch

    from .model.heads import BASELINE_PATCH_KJI

    images, labels = [], []
    ref_labels = case.array("labels_reference")
    ref_image = case.array("image_reference")
    size = ref_labels.shape
    for _ in range(batch):
        if rng.random() < 0.7 and (fg := np.flatnonzero(ref_labels[::2, ::8, ::8] > 0)).size:
            c = np.array(np.unravel_index(rng.choice(fg), ref_labels[::2, ::8, ::8].shape)) * [2, 8, 8]
        else:
            c = np.array([rng.integers(s) for s in size])
        start = [int(np.clip(ci - p // 2, 0, max(s - p, 0))) for ci, p, s in zip(c, BASELINE_PATCH_KJI, size)]
        box = tuple(slice(a, a + p) for a, p in zip(start, BASELINE_PATCH_KJI))
        img = np.asarray(ref_image[(slice(None), *box)], np.float32)
        lab = np.asarray(ref_labels[box], np.int64)
        pads = [(0, p - s) for p, s in zip(BASELINE_PATCH_KJI, lab.shape)]
        images.append(np.pad(img, [(0, 0), *pads]))
        labels.append(np.pad(lab, pads))
    annotated = torch.from_numpy(np.stack([case.annotated_mask(catalog)] * batch)).to(dev)
    return torch.from_numpy(np.stack(images)).to(dev), torch.from_numpy(np.stack(labels)).to(dev), annotated


def finetune(
    bundle: Bundle,
    train_caches: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: FinetuneConfig = FinetuneConfig(),
    validation_caches: Sequence[str | os.PathLike] = (),
    version: str | None = None,
    device: str = "auto",
    progress: ProgressFn = no_progress,
    log=print,
    cancel: CancelToken | None = None,
    command: str = "",
) -> Bundle:
    """Train the heads (or the supervised baseline) on cached cases; write a new bundle at ``out``.

    Every ``config.checkpoint_every`` steps the run is saved to ``<out>.checkpoint.pt``; the same
    command started again (same config, cases and backbone) resumes there.

    The backbone is frozen: its weights are copied unchanged, so the new bundle's feature
    cache key (and every cached feature) stays valid.
    """
    import torch

    from .model.device import select_device

    dev = select_device(device)
    torch.manual_seed(config.seed)
    cases_all, cases, draw_p = _training_cases(train_caches, config, log)
    val_cases = [CachedCase(c) for c in validation_caches][: config.validation_cases]
    catalog = _catalog_for(bundle.catalog, cases, config, log)
    check_cases_fit(bundle, catalog, [*cases_all, *val_cases], config.new_labels)
    setup = _build_model(bundle, catalog, config, cases, len(cases_all), dev, log)
    run = _TrainingRun(
        setup,
        config,
        Path(str(out).rstrip("/\\") + ".checkpoint.pt"),
        {"config": config.to_json(), "cases": [c.case_id for c in cases], "bundle": bundle.hash},
        dev,
    )
    run.resume(log)
    if val_cases and run.first_step == 0:  # where the run starts from, on the same validation cases
        run.validation_before = run.scores(val_cases, catalog)
        if config.early_stop_patience and setup.start_from:  # the start competes: a run never ships worse heads
            run.keep_if_best(0, run.validation_before["mean_dice"])
    setup.model.train()
    for step in range(run.first_step, config.steps):
        if cancel:
            cancel.raise_if_cancelled()
        rng = np.random.default_rng([config.seed, step])
        run.step(step, cases[draw_case(rng, len(cases), draw_p)], rng, catalog)
        progress(step + 1, config.steps, f"loss {np.mean(run.losses[-20:]):.3f}")
        if val_cases and ((step + 1) % config.validate_every == 0 or step + 1 == config.steps):
            run.validate(step + 1, val_cases, catalog, log)
            if run.should_stop():
                log(
                    f"stopping early at step {step + 1}: no better validation Dice in {config.early_stop_patience} "
                    f"validations; keeping the heads of step {run.best['step']}"
                )
                break
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            run.save(step + 1)
    run.restore_best()
    setup.model.eval()
    out_bundle = _write_bundle(bundle, catalog, out, version, setup, run, config, cases_all, cases, command, dev)
    run.checkpoint.unlink(missing_ok=True)
    return out_bundle


def _training_cases(train_caches, config: FinetuneConfig, log) -> tuple[list, list, np.ndarray | None]:
    """(every training case, the labelled subset, the draw weights of the oversampling)."""
    cases_all = [CachedCase(c) for c in train_caches]
    if not cases_all:
        raise InputError(None, "no training cases were given.", "Give `orthoknee synth` outputs with a train split.")
    cases = labelled_subset(cases_all, config.label_fraction, config.seed)
    draw_p = case_draw_weights([c.case_id for c in cases], config.oversample)
    if draw_p is not None:
        share = {
            pattern: float(draw_p[[fnmatch.fnmatchcase(c.case_id, pattern) for c in cases]].sum())
            for pattern in config.oversample
        }
        log("oversampling: " + ", ".join(f"{k} {100 * v:.0f} % of the steps" for k, v in share.items()))
    return cases_all, cases, draw_p


@dataclass
class _ModelSetup:
    """The model a run trains and what its bundle entry needs to say about it."""

    model: object
    kind: str
    baseline: bool
    heads_config: object
    start_from: dict | None
    trained: object  # the module the optimizer steps (both heads, or one of them)
    clipped: list  # the modules whose gradients are clipped, each on its own


def check_cases_fit(bundle: Bundle, catalog: Catalog, cases: list, new_labels: bool) -> None:
    """Refuse cached cases this bundle cannot train on, saying what differs and what to do: features
    of another backbone (they would be read as if they were this one's), label values its catalog
    does not name, or added segments it lacks without ``--new-labels`` (trained as background, they
    would teach the heads that the annotator's structure is not there)."""
    for case in cases:
        made_by = case.meta.get("bundle_hash")
        if made_by and made_by != bundle.hash:
            raise InputError(
                case.folder,
                f"holds the features of case {case.case_id} made by the backbone of bundle {made_by[:12]}; "
                f"{bundle.path} ({bundle.metadata.get('version')}) has backbone {bundle.hash[:12]}.",
                "Give the case folders (`--cases` caches them with this bundle), or fine-tune the bundle the "
                "features came from.",
            )
        unnamed, missing = case.unknown_labels(catalog)
        if unnamed:
            raise InputError(
                case.meta.get("case_folder") or case.folder,
                f"case {case.case_id} holds label values {', '.join(map(str, unnamed))}, which the catalog of "
                f"{bundle.path} ({', '.join(f'{s.label} {s.key}' for s in catalog.structures)}) does not have "
                "and the case's extra_labels do not name.",
                "Name them in case.json's extra_labels (the Slicer module's export names every segment) to train "
                "them with --new-labels, or remove them from the labelmaps.",
            )
        names = {f.name.lower() for f in catalog.findings}
        unknown_findings = [n for n in case.extra_findings if n.lower() not in names]
        if unknown_findings and not new_labels:
            raise InputError(
                case.meta.get("case_folder") or case.folder,
                f"case {case.case_id} answers findings the catalog of {bundle.path} lacks: {', '.join(unknown_findings)}.",
                "Add --new-labels to learn them as new findings (otherwise they would be ignored).",
            )
        if missing and not new_labels:
            raise InputError(
                case.meta.get("case_folder") or case.folder,
                f"case {case.case_id} has segments the catalog of {bundle.path} lacks: {', '.join(missing)}.",
                "Add --new-labels to learn them as new structures (otherwise they would train as background).",
            )


def _catalog_for(catalog: Catalog, cases: list, config: FinetuneConfig, log) -> Catalog:
    """The bundle's catalog, and with ``config.new_labels`` a new structure per label an annotator added."""
    if not config.new_labels:
        return catalog
    names = list(dict.fromkeys(name for c in cases for name in c.extra_labels.values()))
    finding_names = list(dict.fromkeys(name for c in cases for name in c.extra_findings))
    grown = catalog.with_structures(names).with_findings(finding_names)
    added = [s.name for s in grown.structures[len(catalog.structures) :]]
    added_findings = [f.name for f in grown.findings[len(catalog.findings) :]]
    if not added and not added_findings:
        raise InputError(
            None,
            "--new-labels, but no training case has a label or a finding the catalog lacks.",
            "Export the corrected cases with their added segments, or leave out --new-labels.",
        )
    if added:
        log(f"new labels: {', '.join(added)}")
    if added_findings:
        log(f"new findings: {', '.join(added_findings)}")
    return grown


def _build_model(
    bundle: Bundle, catalog: Catalog, config: FinetuneConfig, cases: list, n_cases_all: int, dev, log
) -> _ModelSetup:
    """The heads (from the bundle's, or fresh) or the baseline, on ``dev``; grown by the new labels of ``catalog``."""
    from .model.heads import (
        HeadsConfig,
        OrthoKneeHeads,
        add_views,
        build_baseline,
        grow_findings,
        grow_segmentation_classes,
        read_hosts,
    )

    view_channels = {
        p: int(cases[0].pooled_features[p].shape[0])
        for p in cases[0].planes
        if config.views is None or p in config.views
    }
    if not view_channels:
        raise InputError(
            None,
            f"the cases have none of the views {list(config.views or [])} (they have {', '.join(cases[0].planes)}).",
            "Choose --views among the cases' views.",
        )
    baseline = config.model == "baseline"
    kind = "supervised-baseline" if baseline else "diffusion-heads"
    existing = bundle.metadata.get("heads") or {}
    start_from = None if config.from_scratch or existing.get("kind") != kind else existing
    if baseline:
        model, heads_config = build_baseline(len(catalog.structures) + 1).to(dev), None
    else:
        heads_config = (
            HeadsConfig.from_json(start_from["config"])
            if start_from
            else HeadsConfig(
                view_channels=view_channels, n_classes=len(catalog.structures) + 1, n_findings=len(catalog.findings)
            )
        )
        model = OrthoKneeHeads(heads_config).to(dev)
    check_finetune_config(bundle, config)
    added_views = (
        [p for p in view_channels if p not in heads_config.view_channels] if start_from and not baseline else []
    )
    if config.train_heads == "fusion" and not added_views and heads_config.fusion != "per-voxel":
        raise InputError(
            None,
            "--train-heads fusion trains the per-voxel view fusion, but these heads fuse "
            f"{', '.join(heads_config.view_channels)} with per-view weights and no view is added.",
            "Add views with --views (e.g. --views sagittal coronal axial), or train both heads.",
        )
    if config.finding_hosts and not baseline:
        if not start_from:
            raise InputError(
                None,
                "--finding-hosts reads each finding's host anatomy from the heads' own segmentation, "
                "but these heads start untrained.",
                "Train the heads first, then continue from that bundle with --finding-hosts.",
            )
    if start_from:  # the annotator's loop: corrections refine the heads the bundle already has
        bundle.load_into(model, start_from["weights"], "heads")
        log(f"continuing from the heads of {bundle.path} ({bundle.metadata.get('version')})")
        extra = len(catalog.structures) + 1 - heads_config.n_classes
        if extra > 0 and not baseline:  # new labels: the old classes keep their weights
            model = grow_segmentation_classes(model, extra).to(dev)
            heads_config = model.config
        extra_findings = len(catalog.findings) - heads_config.n_findings
        if extra_findings > 0 and not baseline:  # new findings: the old findings keep their weights
            model = grow_findings(model, extra_findings).to(dev)
            heads_config = model.config
        if config.finding_hosts and not baseline:  # attention on each finding's host, scores rescaled
            model = read_hosts(model).to(dev)
            heads_config = model.config
        if added_views:  # views the heads never fused: added per voxel, the old views' weights kept
            model = add_views(model, {**heads_config.view_channels, **view_channels}, start_logit=0.0).to(dev)
            heads_config = model.config
            fit = fit_added_views(model, cases, added_views, dev)
            log(
                f"added views: {', '.join(added_views)} (per-voxel fusion; projections fitted to the old views' "
                f"fused features, R^2 {', '.join(f'{k} {v:.2f}' for k, v in fit.items())})"
            )
        replayed = _replayed_steps(start_from.get("training") or {}, config, n_cases_all)
        if replayed:
            log(
                f"note: these heads were last trained on the same cases with seed {config.seed}; steps "
                f"0-{replayed - 1} of this run draw the same patches in the same order as that run did "
                "(pass another --seed for new ones)"
            )
    import torch

    trained = (
        model
        if baseline or config.train_heads == "both"
        else torch.nn.ModuleList([model.segmentation.fusion, model.findings.fusion])
        if config.train_heads == "fusion"
        else _attention_of(model.findings)
        if config.train_heads == "attention"
        else (model.segmentation if config.train_heads == "segmentation" else model.findings)
    )
    if config.train_heads in ("fusion", "attention"):  # no gradients for the weights that stay
        kept = {id(q) for q in trained.parameters()}
        for q in model.parameters():
            q.requires_grad_(id(q) in kept)
    # each head is clipped on its own (see _TrainingRun.step)
    clipped = [model.segmentation, model.findings] if trained is model and not baseline else [trained]
    return _ModelSetup(model, kind, baseline, heads_config, start_from, trained, clipped)


def _attention_of(findings):
    """The finding head's attention weights as one module (the optimizer's and the clipping's unit)."""
    import torch

    part = torch.nn.Module()
    part.v, part.u, part.w = findings.attention_v, findings.attention_u, findings.attention_w
    if hasattr(findings, "case_scale"):
        part.scale, part.bias = findings.case_scale, findings.case_bias
    return part


def fit_added_views(model, cases: list, added: list[str], dev, max_cases: int = 12, ridge: float = 1e-2) -> dict:
    """Start each added view's projection where it agrees with the heads as they are: a ridge
    least-squares fit, per head, of the fused features of the old views from the new view's
    features, over the covered cells of up to ``max_cases`` cases (their pooled features: the
    projection is linear, so the fit on cell means holds for voxels). With equal starting weights
    the grown heads then begin close to the old ones, and training moves each view's weight per
    voxel from there, instead of from a random projection that either spoils the start (equal
    weights) or is too faint to learn from (a low weight). Returns R^2 per head and view."""
    import torch

    old = [p for p in model.segmentation.fusion.planes if p not in added]
    quality = {}
    with torch.no_grad():
        for name in ("segmentation", "findings"):
            fusion = getattr(model, name).fusion
            xs: dict[str, list] = {p: [] for p in added}
            ys = []
            for case in cases[:max_cases]:
                if not all(p in case.planes for p in (*old, *added)):
                    continue
                feats = {
                    p: torch.from_numpy(case.pooled_features[p].astype(np.float32))[None].to(dev) for p in case.planes
                }
                cover = {
                    p: torch.from_numpy(case.pooled_coverage[p].astype(np.float32))[None].to(dev) for p in case.planes
                }
                target = fusion({p: feats[p] for p in old}, {p: cover[p] for p in old})
                seen = torch.stack([cover[p][0, 0] > 0.99 for p in (*old, *added)]).all(dim=0).flatten()
                ys.append(target[0].flatten(1)[:, seen])
                for p in added:
                    xs[p].append(feats[p][0].flatten(1)[:, seen])
            if not ys:
                continue
            y = torch.cat(ys, dim=1)  # (out, cells)
            for p in added:
                x = torch.cat(xs[p], dim=1)
                x1 = torch.cat([x, torch.ones(1, x.shape[1], device=dev)])  # a bias row
                gram = x1 @ x1.T + ridge * x.shape[1] * torch.eye(x1.shape[0], device=dev)
                solution = torch.linalg.solve(gram, x1 @ y.T).T  # (out, in + 1)
                fusion.project[p].weight.copy_(solution[:, :-1])
                fusion.project[p].bias.copy_(solution[:, -1])
                residual = y - solution @ x1
                quality[f"{name}/{p}"] = float(1 - residual.pow(2).sum() / (y - y.mean(1, keepdim=True)).pow(2).sum())
    return quality


class _TrainingRun:
    """Optimizer, schedule, losses and validation history of one run, and its checkpoint."""

    def __init__(self, setup: _ModelSetup, config: FinetuneConfig, checkpoint: Path, fingerprint: dict, dev) -> None:
        import torch

        self.setup, self.config, self.checkpoint, self.fingerprint, self.dev = (
            setup,
            config,
            checkpoint,
            fingerprint,
            dev,
        )
        self.optimizer = torch.optim.AdamW(
            setup.trained.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        # one cycle over the run; a run too short for its warm-up (under 20 steps) keeps the rate constant
        self.schedule = (
            torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.1
            )
            if config.steps >= 20
            else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        )
        self.history: list[dict] = []
        self.losses: list[float] = []
        self.hosts: dict = {}  # case id -> its findings' host anatomy (see case_hosts)
        # the starting weights an anchored run is pulled toward (same shapes only: grown rows are free)
        self.anchor_state = (
            {n: q.detach().clone() for n, q in setup.model.named_parameters() if q.requires_grad}
            if config.anchor > 0 and setup.start_from
            else {}
        )
        self.validation_before: dict | None = None
        self.best: dict | None = None  # {"step", "mean_dice", "state"} of the best validation so far
        self.first_step, self.elapsed_before = 0, 0.0
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def resume(self, log) -> None:
        if not self.checkpoint.is_file():
            return
        state = load_checkpoint(self.checkpoint, self.dev)
        if state.get("fingerprint") != self.fingerprint:
            log(f"ignoring {self.checkpoint}: it belongs to another run (config, cases or backbone differ)")
            return
        self.setup.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.first_step, self.losses, self.history = state["step"], state["losses"], state["history"]
        self.elapsed_before = state["elapsed"]
        self.start = time.perf_counter()
        log(f"resuming from {self.checkpoint} at step {self.first_step}")

    def save(self, step_done: int) -> None:
        import torch

        with atomic_path(self.checkpoint) as tmp:
            torch.save(
                {
                    "fingerprint": self.fingerprint,
                    "model": self.setup.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "step": step_done,
                    "losses": self.losses,
                    "history": self.history,
                    "elapsed": self.seconds,
                },
                tmp,
            )

    def case_hosts(self, case, catalog: Catalog):
        """Each finding's host anatomy on ``case``'s cells, from the heads' segmentation of the
        whole case with every view (as prediction sees it), worked out once per case and run: when
        the segmentation head trains too, from the heads as they were at the case's first draw."""
        import torch

        from .predict import cell_hosts, coarse_logits_of

        if case.case_id not in self.hosts:
            model = self.setup.model
            with torch.no_grad():
                coarse = coarse_logits_of(model, case.fusion_inputs(), self.dev)
            self.hosts[case.case_id] = cell_hosts(model, coarse, case.fusion_grid, catalog, self.dev)
        return self.hosts[case.case_id]

    def step(self, step: int, case, rng, catalog: Catalog) -> None:
        """One optimizer step on a patch (segmentation) and, every few steps, a whole case (findings)."""
        import torch

        from .model.heads import marginal_seg_loss

        config, model, dev = self.config, self.setup.model, self.dev
        if self.setup.baseline:
            x, y, annotated = _baseline_batch(case, config, rng, dev, catalog)
            loss = marginal_seg_loss(model(x), y, annotated)
        else:
            usable = [p for p in case.planes if p in model.segmentation.fusion.planes]
            planes = [p for p in usable if p == usable[0] or rng.random() >= config.view_dropout]
            if rng.random() < config.view_dropout / 2 and len(planes) > 1:
                planes = planes[1:]  # sometimes without the reference view's own features
            loss = torch.zeros((), device=dev)
            if config.train_heads not in ("findings", "attention"):
                feats, cover, image_f, labels_f, image_r, labels_r, coords, patch, annotated = _seg_batch(
                    case, planes, config, rng, dev, catalog
                )
                coarse = model.segmentation.coarse_logits(feats, cover, image_f)
                refined = model.segmentation.refined_logits(_upsample_patch(coarse, coords, patch), image_r)
                loss = marginal_seg_loss(refined, labels_r, annotated) + 0.5 * marginal_seg_loss(
                    coarse, labels_f, annotated
                )
            finding_step = config.train_heads in ("findings", "attention") or (
                config.train_heads in ("both", "fusion") and step % config.finding_every == 0
            )
            if finding_step:  # a whole pooled case: ~40 % of a joint step's cost
                hosts = self.case_hosts(case, catalog) if model.config.finding_hosts else None
                loss = loss + _finding_loss(model, case, planes, catalog, config, dev, hosts)
        if config.anchor > 0 and self.anchor_state:
            pull = sum(
                ((q - self.anchor_state[n]) ** 2).sum() for n, q in model.named_parameters() if n in self.anchor_state
            )
            loss = loss + config.anchor * pull
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training diverged at step {step + 1} (loss {float(loss)}): "
                f"lower the learning rate (--lr, now {config.learning_rate:g})"
            )
        loss.backward()
        # no normalization layers in the heads (see ContextUNet): clipping keeps a rare large
        # gradient (a patch full of a rare class) from throwing the weights off. Each head is
        # clipped on its own: their parameters are disjoint, and a joint norm let the finding
        # loss shrink the segmentation head's steps on every finding step.
        for part in self.setup.clipped:
            torch.nn.utils.clip_grad_norm_(part.parameters(), config.clip_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.losses.append(float(loss.detach()))

    def scores(self, val_cases: list, catalog: Catalog) -> dict:
        """Mean Dice and AUC of the model as it is now on the validation cases."""
        from .evaluate import evaluate_cached

        model = self.setup.model
        model.eval()
        scores = evaluate_cached(self.setup.kind, model, val_cases, catalog, device=self.dev, with_hd95=False)
        model.train()
        return {
            "mean_dice": scores["mean_dice"],
            "mean_auc": scores["mean_auc"],
            "dice": scores["dice"],
            "auc": scores["auc"],
        }

    def should_stop(self) -> bool:
        """Early stopping: remember the best validated heads; stop after ``patience`` validations without one."""
        patience = self.config.early_stop_patience
        if patience <= 0 or not self.history:
            return False
        last = self.history[-1]
        if self.keep_if_best(last["step"], last["mean_dice"]):
            return False
        since = [h for h in self.history if h["step"] > (self.best or {"step": 0})["step"]]
        return len(since) >= patience

    def keep_if_best(self, step: int, mean_dice: float | None) -> bool:
        """Remember the model as it is now when its validation Dice is the best so far."""
        import copy

        if mean_dice is None or (self.best is not None and mean_dice <= self.best["mean_dice"]):
            return False
        self.best = {"step": step, "mean_dice": mean_dice, "state": copy.deepcopy(self.setup.model.state_dict())}
        return True

    def restore_best(self) -> None:
        """The best validated heads back, when the run went on past them."""
        if self.best is not None and (not self.history or self.history[-1]["step"] != self.best["step"]):
            self.setup.model.load_state_dict(self.best["state"])

    def validate(self, step_done: int, val_cases: list, catalog: Catalog, log) -> None:
        scores = self.scores(val_cases, catalog)
        entry = {
            "step": step_done,
            "loss": float(np.mean(self.losses[-self.config.validate_every :])),
            "mean_dice": scores["mean_dice"],
            "mean_auc": scores["mean_auc"],
        }
        self.history.append(entry)
        log(
            f"step {step_done}: loss {entry['loss']:.3f}  validation mean Dice {entry['mean_dice']:.3f}"
            + (f"  mean AUC {entry['mean_auc']:.3f}" if entry["mean_auc"] is not None else "")
        )


def _write_bundle(
    bundle: Bundle,
    catalog: Catalog,
    out,
    version,
    setup: _ModelSetup,
    run: _TrainingRun,
    config: FinetuneConfig,
    cases_all: list,
    cases: list,
    command: str,
    dev,
) -> Bundle:
    """The new bundle version: the backbones copied, the trained heads, and their lineage."""
    out_bundle = derive_bundle(bundle, out, version)
    out_bundle.metadata["catalog"] = catalog.to_json()  # with any new labels
    losses = run.losses
    n_avg = max(1, min(20, len(losses) // 4))  # a short run's first and last steps must not overlap
    relative = "weights/heads.pt"
    digest = out_bundle.save_weights(relative, setup.model.state_dict())
    start_from = setup.start_from
    out_bundle.metadata["heads"] = {
        "kind": setup.kind,
        "config": setup.heads_config.to_json() if setup.heads_config else {"patch_kji": list(config.patch_kji)},
        "weights": relative,
        "sha256": digest,
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        "training": {
            "command": command,
            "config": config.to_json(),
            "seconds": round(run.seconds, 1),
            "device": str(dev),
            "cases": len(cases_all),
            "labelled_cases": len(cases),
            # which cases, and which images of them: a version can be traced back to its corrections
            "case_inputs": [{"case_id": c.case_id, "input_sha256": c.meta.get("input_sha256")} for c in cases],
            "subjects": sorted({c.meta["subject"] for c in cases}),
            "sources": sorted({c.meta["source"] for c in cases}),
            "started_from": None
            if not start_from
            else {"version": bundle.metadata.get("version"), "sha256": start_from.get("sha256")},
            "first_loss": float(np.mean(losses[:n_avg])),  # over the first / last n_avg steps
            "final_loss": float(np.mean(losses[-n_avg:])),
            "loss_average_steps": n_avg,
            "validation": run.history,
            # the validation cases' scores before the run, and of the heads this bundle ships (the best
            # validated ones when stopping early)
            "validation_before": run.validation_before,
            "kept_step": run.best["step"] if run.best else (run.history[-1]["step"] if run.history else None),
        },
    }
    out_bundle.save_metadata()
    return out_bundle
