"""Rendering many cases and writing them in the documented folder layout.

Layout of ``orthoknee synth --out OUT``::

    OUT/dataset.json                 config, seed, source, catalog, split (by subject)
    OUT/cases/<case_id>/case.json    subject, split, annotated structures, findings, parameters
    OUT/cases/<case_id>/{sagittal,coronal,axial}.nrrd           the three series (int16)
    OUT/cases/<case_id>/{sagittal,coronal,axial}_labels.nrrd    catalog labels on each view's grid
    OUT/cases/<case_id>/labels.nrrd  catalog labels on the working grid (the anatomy as rendered)
    OUT/cases/<case_id>/findings/<finding>.nrrd   mask of each present finding, sagittal grid
    OUT/cases/<case_id>/contact_sheet.png

Cases are deterministic: case ``i`` of seed ``S`` is the same wherever and whenever it is
rendered, alone or in a batch, by any number of workers.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io import write_image_atomic, write_json_atomic
from ..labels import DEFAULT_CATALOG, FINDING_KEYS
from ..progress import CancelToken, ProgressFn, no_progress
from ..volumes import Case, load_volume
from .acquire import acquire_views
from .anatomy import build_knee, mirror_left_right, working_grid
from .findings import simulate_findings
from .render import CONTRAST_MIX, CONTRASTS, render_intensity
from .sheet import contact_sheet
from .sources import SOURCES, SourceMap, load_source_maps

__all__ = ["CASE_LAYOUT", "SynthConfig", "synthesize", "render_case", "read_case", "SynthCase", "split_subjects"]

CASE_LAYOUT = 1  # bump when the folder layout changes
VIEWS = ("sagittal", "coronal", "axial")


EXTRA_LABEL_BASE = 20  # first label value of a kept source label (the catalog's are 1-11)


@dataclass
class SynthConfig:
    source: str
    n: int
    seed: int = 0
    contrast: str = "mixed"  # dess | pdfs | t2 | random | mixed (CONTRAST_MIX)
    prevalence: float = 0.35
    val_fraction: float = 0.2
    work_spacing: float = 0.9
    margin_mm: float = 25.0
    contact_sheets: bool = True
    deform: bool = True
    mirror_fraction: float = 0.0  # share of cases drawn as the other knee (the source mirrored)
    finding_prevalence: dict[str, float] = field(default_factory=dict)
    # source label value -> name: structures the catalog lacks, kept as extra labels (values from
    # EXTRA_LABEL_BASE on, listed in case.json's extra_labels as an annotator's added segment is),
    # e.g. {35: "Patellar ligament"} of the SPL atlas, to train and measure a new label
    keep_labels: dict[int, str] = field(default_factory=dict)

    def extra_labels(self) -> dict[str, str]:
        """case.json's extra_labels: label value in the case -> name."""
        return {str(EXTRA_LABEL_BASE + n): name for n, name in enumerate(self.keep_labels.values())}

    def prevalence_of(self) -> dict[str, float]:
        return {k: self.finding_prevalence.get(k, self.prevalence) for k in FINDING_KEYS}

    def mirrored(self, index: int) -> bool:
        """Whether case ``index`` shows the other knee. Drawn from its own stream, so that
        the cases of a seed are the same as before mirroring existed when the share is 0."""
        if self.mirror_fraction <= 0:
            return False
        return bool(np.random.default_rng([self.seed, index, 3]).random() < self.mirror_fraction)


def _check_keep_labels(config: SynthConfig, maps: list) -> None:
    """Refuse a kept label the source maps to a catalog structure or that no map holds."""
    source = SOURCES[config.source]
    present = set()
    if config.keep_labels:
        for m in maps[:3]:
            present.update(int(v) for v in np.unique(sitk.GetArrayViewFromImage(m.image)))
    for value, name in config.keep_labels.items():
        if value in source.structures:
            raise InputError(
                None,
                f"--keep-label {value}: in {config.source} label maps, {value} is already the catalog's "
                f"{source.structures[value]}.",
                "Keep labels the catalog lacks (for the SPL atlas, its knee.ctbl names them).",
            )
        if value not in present:
            raise InputError(
                None,
                f"--keep-label {value}={name}: no {config.source} label map holds the value {value}.",
                "Check the value against the label set's colour table.",
            )


def split_subjects(subjects: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """subject -> 'train' | 'validation'. A subject's cases never straddle the split."""
    unique = sorted(set(subjects))
    order = np.random.default_rng([seed, 7]).permutation(len(unique))
    n_val = int(round(val_fraction * len(unique)))
    if len(unique) >= 2:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(unique) - 1)
    else:
        n_val = 0
    val = {unique[i] for i in order[:n_val]}
    return {s: ("validation" if s in val else "train") for s in unique}


def render_case(
    smap: SourceMap, grid: sitk.Image, config: SynthConfig, index: int, mirrored_source: SourceMap | None = None
) -> dict:
    """Everything one case holds, in memory (written by :func:`write_case`).

    ``mirrored_source`` is ``smap`` already mirrored, for a caller that renders many mirrored
    cases of one map (mirroring the SPL atlas takes about a sixth of a render).
    """
    rng = np.random.default_rng([config.seed, index])
    if config.contrast == "mixed":
        names = sorted(CONTRAST_MIX)
        contrast = str(rng.choice(names, p=[CONTRAST_MIX[n] for n in names]))
    else:
        contrast = config.contrast
    mirrored = config.mirrored(index)
    if mirrored:
        smap = mirrored_source or replace(smap, image=mirror_left_right(smap.image))
    knee = build_knee(smap, grid, rng, deform=config.deform, keep=tuple(config.keep_labels))
    findings = simulate_findings(knee, rng, config.prevalence_of())
    intensity, render_params = render_intensity(knee.tissue, contrast, rng, knee.spacing)
    intensity_image = sitk.GetImageFromArray(intensity)
    intensity_image.CopyInformation(grid)
    labels = knee.structures
    if knee.kept is not None:  # kept source labels where no catalog structure is
        labels = np.where((knee.kept > 0) & (labels == 0), knee.kept + (EXTRA_LABEL_BASE - 1), labels).astype(np.uint8)
    labels_image = sitk.GetImageFromArray(labels)
    labels_image.CopyInformation(grid)
    views = acquire_views(intensity_image, labels_image, rng)
    masks = {}
    for key, result in findings.items():
        if result.mask is not None:
            mask = sitk.GetImageFromArray(result.mask.astype(np.uint8))
            mask.CopyInformation(grid)
            sag = views["sagittal"]
            masks[key] = sitk.Resample(mask, sag["image"], sag["motion"], sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return {
        "knee": knee,
        "labels": labels_image,
        "views": views,
        "findings": findings,
        "masks": masks,
        "meta": {
            "contrast": render_params,
            "views": {p: v["params"] for p, v in views.items()},
            "annotated": list(knee.annotated),
            "mirrored": mirrored,
            "implanted": knee.implanted,
            "findings": {k: r.to_json() for k, r in findings.items()},
        },
    }


def write_case(case_dir: Path, rendered: dict, header: dict, sheet: bool) -> None:
    case_dir.mkdir(parents=True, exist_ok=True)
    for plane, view in rendered["views"].items():
        write_image_atomic(view["image"], case_dir / f"{plane}.nrrd")
        write_image_atomic(view["labels"], case_dir / f"{plane}_labels.nrrd")
    write_image_atomic(rendered["labels"], case_dir / "labels.nrrd")
    for key, mask in rendered["masks"].items():
        write_image_atomic(mask, case_dir / "findings" / f"{key}.nrrd")
    if sheet:
        contact_sheet(
            {p: (v["image"], v["labels"]) for p, v in rendered["views"].items()},
            case_dir / "contact_sheet.png",
            title=f"{header['case_id']} ({header['source']}{', mirrored' if rendered['meta']['mirrored'] else ''}, "
            f"{rendered['meta']['contrast']['contrast']}) "
            + ", ".join(k for k, r in rendered["findings"].items() if r.present),
        )
    # case.json last: its presence marks a complete case (an interrupted run is redone).
    write_json_atomic({**header, **rendered["meta"]}, case_dir / "case.json")


# --- batch ---------------------------------------------------------------------------------

_WORKER_STATE: dict = {}


def _init_worker(labels_dir: str, config: SynthConfig, single_thread: bool = True) -> None:
    if single_thread:  # pool workers: one thread each, so N workers use N cores, not N x N
        import torch

        torch.set_num_threads(1)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    maps = load_source_maps(labels_dir, config.source)
    _WORKER_STATE["maps"] = {str(m.path): m for m in maps}
    _WORKER_STATE["grids"] = {}
    _WORKER_STATE["mirrored"] = None  # (map path, that map mirrored)
    _WORKER_STATE["config"] = config


def _render_and_write(job: tuple) -> tuple[str, float]:
    index, map_path, case_dir, header = job
    start = time.perf_counter()
    config: SynthConfig = _WORKER_STATE["config"]
    smap = _WORKER_STATE["maps"][map_path]
    grids = _WORKER_STATE["grids"]
    if map_path not in grids:
        grids[map_path] = working_grid(smap.image, config.work_spacing, config.margin_mm)
    mirrored_source = None
    if config.mirrored(index):  # the last map mirrored is kept: all of a one-subject source's cases
        last = _WORKER_STATE.get("mirrored")
        if last is None or last[0] != map_path:
            last = _WORKER_STATE["mirrored"] = (map_path, replace(smap, image=mirror_left_right(smap.image)))
        mirrored_source = last[1]
    rendered = render_case(smap, grids[map_path], config, index, mirrored_source)
    write_case(Path(case_dir), rendered, header, config.contact_sheets)
    return header["case_id"], time.perf_counter() - start


def synthesize(
    labels_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: SynthConfig,
    workers: int = 1,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict:
    """Render ``config.n`` cases into ``out_dir``; cases already complete are kept (resume)."""
    if config.contrast != "mixed" and config.contrast not in CONTRASTS:
        raise InputError(
            None, f"unknown contrast {config.contrast!r}.", f"Choose mixed or one of {', '.join(CONTRASTS)}."
        )
    if config.n < 1:
        raise InputError(None, "--n must be at least 1.")
    if not 0.0 <= config.mirror_fraction <= 1.0:
        raise InputError(
            None,
            f"--mirror-fraction is {config.mirror_fraction}; it is a share of the cases.",
            "Give a number from 0 (no case mirrored) to 1 (every case).",
        )
    maps = load_source_maps(labels_dir, config.source)
    _check_keep_labels(config, maps)
    out = Path(out_dir)
    split = split_subjects([m.subject for m in maps], config.val_fraction, config.seed)
    order = np.random.default_rng([config.seed, 11]).permutation(len(maps))
    jobs, cases = [], []
    for i in range(config.n):
        smap = maps[order[i % len(maps)]]
        case_id = f"{config.source}-{config.seed}-{i:04d}"
        header = {
            "layout": CASE_LAYOUT,
            "case_id": case_id,
            "index": i,
            "seed": config.seed,
            "source": config.source,
            "source_file": smap.path.name,
            "subject": smap.subject,
            "split": split[smap.subject],
            "synthetic": True,
            **({"extra_labels": config.extra_labels()} if config.keep_labels else {}),
        }
        cases.append({k: header[k] for k in ("case_id", "subject", "split")})
        case_dir = out / "cases" / case_id
        if (case_dir / "case.json").is_file():
            continue  # already rendered by an earlier run
        jobs.append((i, str(smap.path), str(case_dir), header))

    manifest = {
        "layout": CASE_LAYOUT,
        "generator": "orthoknee synth",
        "synthetic": True,
        "note": "MR-like images rendered from real label maps; findings other than OAI bone lesions are simulated.",
        "config": asdict(config),
        "labels_dir": str(labels_dir),
        "catalog": DEFAULT_CATALOG.to_json(),
        "annotated_structures": list(SOURCES[config.source].annotated),
        "subjects": split,
        "cases": cases,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, out / "dataset.json")

    done_before = config.n - len(jobs)
    progress(done_before, config.n, "")
    timings: list[float] = []
    if workers <= 1:
        _init_worker(str(labels_dir), config, single_thread=False)
        for n, job in enumerate(jobs, start=1):
            if cancel:
                cancel.raise_if_cancelled()
            case_id, seconds = _render_and_write(job)
            timings.append(seconds)
            progress(done_before + n, config.n, case_id)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(labels_dir), config)) as pool:
            for n, (case_id, seconds) in enumerate(pool.map(_render_and_write, jobs), start=1):
                timings.append(seconds)
                progress(done_before + n, config.n, case_id)
                if cancel and cancel.cancelled:
                    pool.shutdown(cancel_futures=True)
                    cancel.raise_if_cancelled()
    manifest["rendered_now"] = len(jobs)
    manifest["seconds_per_case"] = float(np.mean(timings)) if timings else None
    return manifest


# --- reading ----------------------------------------------------------------------------------


@dataclass
class SynthCase:
    """A written case, read back: the Case, its labels and finding labels."""

    folder: Path
    meta: dict
    case: Case
    labels: dict[str, sitk.Image]  # view -> labels on that view's grid

    @property
    def findings(self) -> dict[str, int | None]:
        return {k: v["present"] for k, v in self.meta["findings"].items()}

    @property
    def annotated(self) -> tuple[str, ...]:
        return tuple(self.meta["annotated"])

    def finding_mask(self, key: str) -> sitk.Image | None:
        path = self.folder / "findings" / f"{key}.nrrd"
        return sitk.ReadImage(str(path)) if path.is_file() else None


def read_case(folder: str | os.PathLike) -> SynthCase:
    folder = Path(folder)
    meta_path = folder / "case.json"
    if not meta_path.is_file():
        raise InputError(folder, "is not a complete training case (no case.json).", "Re-run `orthoknee synth` on it.")
    meta = json.loads(meta_path.read_text())
    if meta.get("layout") != CASE_LAYOUT:
        raise InputError(folder, f"has case layout {meta.get('layout')}, this OrthoKnee reads {CASE_LAYOUT}.")
    views = {p: load_volume(folder / f"{p}.nrrd") for p in VIEWS if (folder / f"{p}.nrrd").is_file()}
    labels = {p: sitk.ReadImage(str(folder / f"{p}_labels.nrrd")) for p in views}
    return SynthCase(folder, meta, Case(**views, name=meta["case_id"]), labels)
