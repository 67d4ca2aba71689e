"""The feature cache on disk: entry names, what the cache holds, and what can go.

Each (bundle backbone, case, views) gets one folder of float16 arrays, 150-450 MB per case
(``train.cache_case`` writes them). Nothing ever removes an entry on its own: a new bundle
version, re-rendered cases or an annotator's edited labels all make new entries and leave the
old ones behind, so a few months of fine-tuning fill a disk (one development machine reached
73 GB). This module lets a user see that and free it without guessing which folders still
matter: an entry is stale when its case folder is gone or its files changed since it was
cached (its name no longer matches), and unused when it belongs to no bundle the user keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import OrthoKneeError

__all__ = ["CACHE_LAYOUT", "default_cache_dir", "cache_key", "CacheEntry", "scan_cache", "prune_cache", "ensure_free_space"]

CACHE_LAYOUT = 1
CASE_FILES = ("case.json", "sagittal.nrrd", "coronal.nrrd", "axial.nrrd")
INCOMPLETE_GRACE_S = 6 * 3600  # an entry without meta.json this young may still be being written


def default_cache_dir() -> Path:
    """Where the features are cached when no --cache is given: $ORTHOKNEE_CACHE, else the user's cache folder."""
    return Path(os.environ.get("ORTHOKNEE_CACHE", Path.home() / ".cache" / "orthoknee" / "features"))


def cache_key(bundle_hash: str, case_folder: Path, views: Sequence[str] | None = None) -> str:
    """The entry name's suffix: the backbone, the layout, the views and the case files' size and
    modification time, so an edited or re-rendered case is never served stale features."""
    h = hashlib.sha256()
    h.update(bundle_hash.encode())
    h.update(str(CACHE_LAYOUT).encode())
    if views is not None:  # a subset of the views is a different entry (None keeps older keys valid)
        h.update(("views:" + ",".join(sorted(views))).encode())
    for name in CASE_FILES:
        f = Path(case_folder) / name
        if f.is_file():
            st = f.stat()
            h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:20]


@dataclass
class CacheEntry:
    path: Path
    bytes: int
    age_s: float  # since its newest file was written
    meta: dict | None  # None: incomplete (meta.json is written last)
    stale: str | None = None  # why no bundle can use it again, else None

    @property
    def bundle_hash(self) -> str | None:
        return (self.meta or {}).get("bundle_hash")


def _stale_reason(path: Path, meta: dict | None, age_s: float) -> str | None:
    if meta is None:
        return "incomplete (its writer was stopped)" if age_s > INCOMPLETE_GRACE_S else None
    folder, bundle_hash = meta.get("case_folder"), meta.get("bundle_hash")
    if not folder or not bundle_hash:
        return "written by an older OrthoKnee (no case folder or bundle recorded)"
    if meta.get("layout") != CACHE_LAYOUT:
        return f"cache layout {meta.get('layout')}, this OrthoKnee reads layout {CACHE_LAYOUT}"
    if not Path(folder).is_dir():
        return f"its case folder {folder} is gone"
    suffix = path.name.rsplit("-", 1)[-1]
    if suffix not in {cache_key(bundle_hash, Path(folder), views) for views in (None, meta.get("planes") or [])}:
        return f"the files of {folder} changed after it was cached"
    return None


def scan_cache(root: str | os.PathLike) -> list[CacheEntry]:
    """Every entry under ``root`` with its size and, if it is stale, why."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries, now = [], time.time()
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        stats = [f.stat() for f in path.iterdir() if f.is_file()]
        size = sum(st.st_size for st in stats)
        age = now - max((st.st_mtime for st in stats), default=path.stat().st_mtime)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
        entries.append(CacheEntry(path, size, age, meta, _stale_reason(path, meta, age)))
    return entries


def prune_cache(root: str | os.PathLike, keep_bundle_hashes: Iterable[str] | None = None,
                dry_run: bool = False) -> list[tuple[CacheEntry, str]]:
    """Remove the stale entries, and with ``keep_bundle_hashes`` every entry of another bundle.

    Returns (entry, reason) for each entry removed (or that would be, with ``dry_run``). Entries
    still being written (no meta.json yet, recently touched) are left alone.
    """
    keep = set(keep_bundle_hashes) if keep_bundle_hashes is not None else None
    removed = []
    for entry in scan_cache(root):
        reason = entry.stale
        if reason is None and keep is not None and entry.meta is not None and entry.bundle_hash not in keep:
            reason = f"bundle {entry.bundle_hash[:12]} is not kept"
        if reason is None:
            continue
        if not dry_run:
            shutil.rmtree(entry.path, ignore_errors=True)
        removed.append((entry, reason))
    return removed


def ensure_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Fail before writing, with advice, rather than halfway through with numpy's OSError."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 256 * 2**20
    if free < needed_bytes + margin:
        raise OrthoKneeError(
            f"{folder}: {what} needs about {needed_bytes / 2**20:.0f} MB of disk and only "
            f"{free / 2**20:.0f} MB is free. Free some space: `orthoknee cache --prune` removes the entries "
            "no case or bundle can use, `--keep-bundle B` also those of other bundles; or point --cache "
            "(or $ORTHOKNEE_CACHE) at a larger disk.")
