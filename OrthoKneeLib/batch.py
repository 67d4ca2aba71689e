"""Prediction over a folder of cases, from a dozen on one machine to a cohort on a Dask cluster.

Each case is one task: a subfolder of series files or a DICOM folder with several series,
whose views are picked from the series' own orientation. A task loads its case, predicts and
saves into ``OUT/<case>/`` exactly as ``orthoknee predict`` does, and returns one summary row;
a bad case is a failed row with its reason, never the end of the run. Results come back as
they finish. Runs resume: a case whose outputs exist for the same inputs and bundle is
skipped unless ``force``.

Where the tasks run: in this process (the default), in a Dask ``LocalCluster`` of worker
processes (``workers=N``), or on an existing Dask cluster (``scheduler="tcp://host:port"``,
e.g. one dask-jobqueue started on SLURM). The worker code is this module's
:func:`predict_case`; the cluster needs OrthoKnee installed, nothing else.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError, OrthoKneeError
from .io import atomic_path
from .progress import ProgressFn, no_progress

__all__ = ["BatchOptions", "find_cases", "predict_case", "run_batch", "write_summary_csv", "format_summary"]

SUMMARY_CSV = "summary.csv"
_DONE_MARKER = "batch.json"  # in each case's output folder: the inputs and bundle it was made from


@dataclass(frozen=True)
class BatchOptions:
    """What every task needs, small enough to send to a worker."""

    bundle: str | None = None
    device: str = "cpu"
    threads: int = 0  # torch threads per task; 0: torch's default
    montage: bool = True
    dicom_seg: bool = False
    force: bool = False
    max_voxels: int | None = None


@dataclass
class CaseResult:
    case: str
    status: str  # "done", "skipped", "failed"
    seconds: float = 0.0
    reason: str = ""
    views: list[str] = field(default_factory=list)
    findings: dict[str, float] = field(default_factory=dict)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    plausible: bool | None = None


def find_cases(folder: str | os.PathLike) -> list[Path]:
    """The case folders under ``folder``: each subfolder (hidden ones aside), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            folder,
            "is not a folder of cases.",
            "Give a folder whose subfolders are cases (each one a folder of series files or DICOM series).",
        )
    cases = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise InputError(folder, "holds no case subfolders.", "Put each case's series into a subfolder of its own.")
    return cases


def _inputs_signature(case_dir: Path) -> str:
    """Names, sizes and modification times of a case's files: cheap, and changes when they do."""
    h = hashlib.sha256()
    for p in sorted(case_dir.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(case_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _already_done(case_dir: Path, out_dir: Path, bundle_hash: str) -> bool:
    marker = out_dir / _DONE_MARKER
    if not (marker.is_file() and (out_dir / "findings.json").is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("inputs") == _inputs_signature(case_dir) and recorded.get("bundle") == bundle_hash


def _load_case(case_dir: Path, max_voxels: int | None):
    from .volumes import Case, series_volumes

    kwargs = {"max_voxels": max_voxels} if max_voxels else {}
    case = Case.from_volumes(series_volumes(case_dir, **kwargs), name=case_dir.name)
    missing = [p for p in ("sagittal", "coronal", "axial") if p not in case.views]
    if missing:  # a reader expects three series; say which were not there, whatever the bundle uses
        case.warnings.append(
            f"the case folder holds no {' or '.join(missing)} series; read from {', '.join(case.planes)} only."
        )
    return case


_predictors: dict[tuple, object] = {}  # one Predictor per worker process and bundle: weights load once


def _predictor(options: BatchOptions):
    from .predict import Predictor

    key = (options.bundle, options.device)
    if key not in _predictors:
        _predictors[key] = Predictor(options.bundle, device=options.device)
    return _predictors[key]


def predict_case(case_dir: str, out_root: str, options: BatchOptions) -> dict:
    """One task: predict one case into ``out_root/<case name>``; a row for the summary.

    Runs on a Dask worker as well as in this process; never raises for a bad case."""
    case_dir, out_dir = Path(case_dir), Path(out_root) / Path(case_dir).name
    start = time.perf_counter()
    result = CaseResult(case=case_dir.name, status="failed")
    try:
        if options.threads:
            import torch

            torch.set_num_threads(options.threads)
        predictor = _predictor(options)
        if not options.force and _already_done(case_dir, out_dir, predictor.bundle.hash):
            summary = json.loads((out_dir / "findings.json").read_text())
            result.status = "skipped"
            _fill_from_summary(result, summary)
            return _row(result)
        case = _load_case(case_dir, options.max_voxels)
        result.views = list(case.planes)
        from .montage import montage
        from .outfolder import locked_folder

        with locked_folder(out_dir):
            prediction = predictor.predict(case)
            extra: dict[str, Callable[[Path], Path]] = {}
            if options.montage:
                extra["montage.png"] = lambda path: montage(prediction, case, path)
            if options.dicom_seg:
                from .dicomseg import dicom_seg_writer

                writer = dicom_seg_writer(prediction, case)
                if writer is None:
                    prediction.warnings.append("no DICOM SEG: the reference series is not a DICOM series.")
                else:
                    extra["structures.seg.dcm"] = writer
            signature = {"inputs": _inputs_signature(case_dir), "bundle": predictor.bundle.hash}
            extra[_DONE_MARKER] = lambda path: path.write_text(json.dumps(signature))
            prediction.save(out_dir, extra=extra)
        result.status = "done"
        _fill_from_summary(result, prediction.summary())
    except OrthoKneeError as exc:
        result.reason = str(exc)
    except Exception as exc:  # a bug, not the case's fault: keep the run going, report it in full
        result.reason = f"internal error ({type(exc).__name__}: {exc}); please report: " + traceback.format_exc(
            limit=3
        ).replace("\n", " | ")
    result.seconds = round(time.perf_counter() - start, 2)
    return _row(result)


def _fill_from_summary(result: CaseResult, summary: dict) -> None:
    result.views = list(summary.get("views") or result.views)
    result.findings = {k: v["probability"] for k, v in (summary.get("findings") or {}).items()}
    result.volumes_ml = dict((summary.get("measurements") or {}).get("volume_ml") or {})
    result.warnings = list(summary.get("warnings") or [])
    result.plausible = (summary.get("plausibility") or {}).get("plausible")


def _row(result: CaseResult) -> dict:
    return result.__dict__.copy()


def _results_in_process(cases: list[Path], out_root: Path, options: BatchOptions) -> Iterator[dict]:
    for case_dir in cases:
        yield predict_case(str(case_dir), str(out_root), options)


def _results_on_dask(
    cases: list[Path], out_root: Path, options: BatchOptions, workers: int | None, scheduler: str | None
) -> Iterator[dict]:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="30s")
    else:
        # processes, one thread each: torch is the parallel part, and the GIL would serialise threads
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = [
            client.submit(predict_case, str(c), str(out_root), options, key=f"orthoknee-{c.name}-{i}", pure=False)
            for i, c in enumerate(cases)
        ]
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker itself died (out of memory, killed)
                name = future.key.split("-", 1)[1].rsplit("-", 1)[0]
                yield _row(CaseResult(case=name, status="failed", reason=f"worker lost: {exc}"))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_batch(
    cases_folder: str | os.PathLike,
    out_root: str | os.PathLike,
    options: BatchOptions = BatchOptions(),
    workers: int | None = None,
    scheduler: str | None = None,
    progress: ProgressFn = no_progress,
) -> list[dict]:
    """Predict every case under ``cases_folder`` into ``out_root``; one row per case, sorted by
    case name, also written to ``out_root/summary.csv``."""
    from .outfolder import check_output_folder

    cases = find_cases(cases_folder)
    out_root = check_output_folder(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    if workers and scheduler:
        raise InputError(None, "--workers and --scheduler both say where to run.", "Give one of them.")
    if workers or scheduler:
        cores = os.cpu_count() or 1
        threads = options.threads or (max(1, cores // workers) if workers else 0)
        options = BatchOptions(**{**options.__dict__, "threads": threads})
        results = _results_on_dask(cases, out_root, options, workers, scheduler)
    else:
        results = _results_in_process(cases, out_root, options)
    rows: list[dict] = []
    try:
        for row in results:
            rows.append(row)
            progress(len(rows), len(cases), f"{row['case']} {row['status']}")
    finally:
        write_summary_csv(sorted(rows, key=lambda r: r["case"]), out_root / SUMMARY_CSV)
    return sorted(rows, key=lambda r: r["case"])


def write_summary_csv(rows: list[dict], path: Path) -> Path:
    """One row per case: status, time, views, each finding's probability, each volume, warnings."""
    findings = sorted({k for r in rows for k in r["findings"]})
    volumes = sorted({k for r in rows for k in r["volumes_ml"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["case", "status", "seconds", "views", "plausible"]
        + [f"p_{k}" for k in findings]
        + [f"ml_{k}" for k in volumes]
        + ["warnings", "reason"]
    )
    for r in rows:
        writer.writerow(
            [
                r["case"],
                r["status"],
                r["seconds"],
                " ".join(r["views"]),
                "" if r["plausible"] is None else str(r["plausible"]).lower(),
            ]
            + [r["findings"].get(k, "") for k in findings]
            + [r["volumes_ml"].get(k, "") for k in volumes]
            + [" | ".join(r["warnings"]), r["reason"]]
        )
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def format_summary(rows: list[dict]) -> str:
    """The table printed at the end of a run, failures with their reasons below it."""
    lines = [f"{'case':28} {'status':8} {'time':>7}  {'views':22} top finding"]
    for r in rows:
        top = max(r["findings"].items(), key=lambda kv: kv[1]) if r["findings"] else None
        lines.append(
            f"{r['case'][:28]:28} {r['status']:8} {r['seconds']:6.1f}s  {' '.join(r['views'])[:22]:22} "
            + (f"{top[0]} {top[1]:.2f}" if top else "-")
            + (f"  ({len(r['warnings'])} warning{'s' * (len(r['warnings']) != 1)})" if r["warnings"] else "")
        )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    lines.append(
        f"{len(rows)} cases: {counts['done']} done, {counts['skipped']} already done (skipped), "
        f"{counts['failed']} failed"
    )
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"failed: {r['case']}: {r['reason']}")
    return "\n".join(lines)
