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


def check_finetune_config(bundle: Bundle, config: FinetuneConfig) -> None:
    """Refuse settings that cannot train, before any feature is cached: a negative hard-negative
    count, or one head trained alone when the other would be left untrained (or does not exist)."""
    if config.hard_negative_cells < 0:
        raise InputError(
            None,
            f"--hard-negative-cells {config.hard_negative_cells}: the count cannot be negative.",
            "Give 0 (off) or a number of cells, e.g. 32.",
        )
    if config.train_heads not in ("both", "segmentation", "findings"):
        raise ValueError(f"train_heads must be both, segmentation or findings, not {config.train_heads!r}")
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
            f"--train-heads {config.train_heads} trains one head and keeps the other as it is, but {why}.",
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


def _finding_loss(heads, case: CachedCase, planes: list[str], catalog: Catalog, config: FinetuneConfig, dev):
    import torch
    import torch.nn.functional as F

    feats = {p: torch.from_numpy(case.pooled_features[p].astype(np.float32))[None].to(dev) for p in planes}
    cover = {p: torch.from_numpy(case.pooled_coverage[p].astype(np.float32))[None].to(dev) for p in planes}
    inside = heads.findings.seen_cells(cover)
    image = torch.from_numpy(case.pooled_image.astype(np.float32))[None].to(dev)
    case_logits, cell_logits, _ = heads.findings(feats, cover, image, inside)
    values, known = case.finding_targets(catalog)
    known_t = torch.from_numpy(known).to(dev)
    if not known.any():
        return case_logits.sum() * 0
    target = torch.from_numpy(values).to(dev)[None]
    case_loss = F.binary_cross_entropy_with_logits(case_logits[0][known_t], target[0][known_t])
    masks = torch.from_numpy(case.pooled_masks.astype(np.float32))[None].to(dev).clamp(0, 1)
    cell_loss = balanced_cell_loss(
        cell_logits, masks, inside, config.hard_negative_cells, config.other_lesion_negatives
    )[0][known_t].mean()
    return config.finding_weight * case_loss + config.cell_weight * cell_loss


def balanced_cell_loss(cell_logits, masks, inside, hard_negatives: int = 0, other_lesions: bool = False):
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
    """
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(cell_logits, masks, reduction="none")
    lesion, rest = masks * inside, (1 - masks) * inside
    dims = (2, 3, 4)
    lesion_term = (bce * lesion).sum(dims) / lesion.sum(dims).clamp_min(1e-6)
    rest_term = (bce * rest).sum(dims) / rest.sum(dims).clamp_min(1e-6)
    loss = rest_term + (lesion.sum(dims) > 0.5).float() * lesion_term
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
        negative_logits = cell_logits.masked_fill(~clear, float("-inf")).flatten(2)
        k = min(hard_negatives, negative_logits.shape[-1])
        top = negative_logits.topk(k, dim=-1).values  # the highest logits cost the most: softplus grows
        counted = torch.isfinite(top)
        hard = (F.softplus(top.masked_fill(~counted, 0.0)) * counted).sum(-1) / counted.sum(-1).clamp_min(1)
        loss = loss + hard
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
    labels_f = torch.from_numpy(np.asarray(case.array("labels_fusion")[fbox], np.int64))[None].to(dev)
    image_r = torch.from_numpy(np.asarray(case.array("image_reference")[(slice(None), *rbox)], np.float32))[None].to(
        dev
    )
    labels_r = torch.from_numpy(np.asarray(case.array("labels_reference")[rbox], np.int64))[None].to(dev)
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
    from .model.heads import HeadsConfig, OrthoKneeHeads, build_baseline, marginal_seg_loss

    dev = select_device(device)
    torch.manual_seed(config.seed)
    catalog = bundle.catalog
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
    val_cases = [CachedCase(c) for c in validation_caches][: config.validation_cases]
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
        model = build_baseline(len(catalog.structures) + 1).to(dev)
        heads_config = None
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
    if start_from:  # the annotator's loop: corrections refine the heads the bundle already has
        bundle.load_into(model, start_from["weights"], "heads")
        log(f"continuing from the heads of {bundle.path} ({bundle.metadata.get('version')})")
        replayed = _replayed_steps(start_from.get("training") or {}, config, len(cases_all))
        if replayed:
            log(
                f"note: these heads were last trained on the same cases with seed {config.seed}; steps "
                f"0-{replayed - 1} of this run draw the same patches in the same order as that run did "
                "(pass another --seed for new ones)"
            )
    params = sum(p.numel() for p in model.parameters())
    trained = (
        model
        if baseline or config.train_heads == "both"
        else (model.segmentation if config.train_heads == "segmentation" else model.findings)
    )
    # each head is clipped on its own (see the training loop)
    clipped = [model.segmentation, model.findings] if trained is model and not baseline else [trained]
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    history, losses, first_step, elapsed_before = [], [], 0, 0.0
    checkpoint = Path(str(out).rstrip("/\\") + ".checkpoint.pt")
    fingerprint = {"config": config.to_json(), "cases": [c.case_id for c in cases], "bundle": bundle.hash}
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint, dev)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            first_step, losses, history = state["step"], state["losses"], state["history"]
            elapsed_before = state["elapsed"]
            log(f"resuming from {checkpoint} at step {first_step}")
        else:
            log(f"ignoring {checkpoint}: it belongs to another run (config, cases or backbone differ)")
    start = time.perf_counter()

    def save_checkpoint(step_done: int) -> None:
        with atomic_path(checkpoint) as tmp:
            torch.save(
                {
                    "fingerprint": fingerprint,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step_done,
                    "losses": losses,
                    "history": history,
                    "elapsed": elapsed_before + time.perf_counter() - start,
                },
                tmp,
            )

    model.train()
    for step in range(first_step, config.steps):
        if cancel:
            cancel.raise_if_cancelled()
        rng = np.random.default_rng([config.seed, step])
        case = cases[draw_case(rng, len(cases), draw_p)]
        if baseline:
            x, y, annotated = _baseline_batch(case, config, rng, dev, catalog)
            loss = marginal_seg_loss(model(x), y, annotated)
        else:
            usable = [p for p in case.planes if p in model.segmentation.fusion.planes]
            planes = [p for p in usable if p == usable[0] or rng.random() >= config.view_dropout]
            if rng.random() < config.view_dropout / 2 and len(planes) > 1:
                planes = planes[1:]  # sometimes without the reference view's own features
            loss = torch.zeros((), device=dev)
            if config.train_heads != "findings":
                feats, cover, image_f, labels_f, image_r, labels_r, coords, patch, annotated = _seg_batch(
                    case, planes, config, rng, dev, catalog
                )
                coarse = model.segmentation.coarse_logits(feats, cover, image_f)
                refined = model.segmentation.refined_logits(_upsample_patch(coarse, coords, patch), image_r)
                loss = marginal_seg_loss(refined, labels_r, annotated) + 0.5 * marginal_seg_loss(
                    coarse, labels_f, annotated
                )
            finding_step = config.train_heads == "findings" or (
                config.train_heads == "both" and step % config.finding_every == 0
            )
            if finding_step:  # a whole pooled case: ~40 % of a joint step's cost
                loss = loss + _finding_loss(model, case, planes, catalog, config, dev)
        optimizer.zero_grad(set_to_none=True)
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
        for part in clipped:
            torch.nn.utils.clip_grad_norm_(part.parameters(), config.clip_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress(step + 1, config.steps, f"loss {np.mean(losses[-20:]):.3f}")
        if val_cases and ((step + 1) % config.validate_every == 0 or step + 1 == config.steps):
            from .evaluate import evaluate_cached

            model.eval()
            scores = evaluate_cached(kind, model, val_cases, catalog, device=dev, with_hd95=False)
            model.train()
            entry = {
                "step": step + 1,
                "loss": float(np.mean(losses[-config.validate_every :])),
                "mean_dice": scores["mean_dice"],
                "mean_auc": scores["mean_auc"],
            }
            history.append(entry)
            log(
                f"step {step + 1}: loss {entry['loss']:.3f}  validation mean Dice {entry['mean_dice']:.3f}"
                + (f"  mean AUC {entry['mean_auc']:.3f}" if entry["mean_auc"] is not None else "")
            )
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(step + 1)
    seconds = elapsed_before + time.perf_counter() - start
    model.eval()
    out_bundle = derive_bundle(bundle, out, version)
    n_avg = max(1, min(20, len(losses) // 4))  # a short run's first and last steps must not overlap
    relative = "weights/heads.pt"
    digest = out_bundle.save_weights(relative, model.state_dict())
    out_bundle.metadata["heads"] = {
        "kind": kind,
        "config": heads_config.to_json() if heads_config else {"patch_kji": list(config.patch_kji)},
        "weights": relative,
        "sha256": digest,
        "parameters": params,
        "training": {
            "command": command,
            "config": config.to_json(),
            "seconds": round(seconds, 1),
            "device": str(dev),
            "cases": len(cases_all),
            "labelled_cases": len(cases),
            "subjects": sorted({c.meta["subject"] for c in cases}),
            "sources": sorted({c.meta["source"] for c in cases}),
            "started_from": None
            if not start_from
            else {"version": bundle.metadata.get("version"), "sha256": start_from.get("sha256")},
            "first_loss": float(np.mean(losses[:n_avg])),  # over the first / last n_avg steps
            "final_loss": float(np.mean(losses[-n_avg:])),
            "loss_average_steps": n_avg,
            "validation": history,
        },
    }
    out_bundle.save_metadata()
    checkpoint.unlink(missing_ok=True)
    return out_bundle
