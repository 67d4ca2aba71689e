"""The feature cache on disk: entry names, what the cache holds, and what can go.

Each (bundle backbone, case, views) gets one folder of arrays (``train.cache_case`` writes
them): the full-resolution features as 8-bit codes per channel (``quantize_channels``; 80-230
MB per case), everything else float16 or uint8. Entries written before the 8-bit features
hold them as float16, twice the size; both are read, and ``compact_cache`` converts the old.

Nothing ever removes an entry on its own: a new bundle version, re-rendered cases or an
annotator's edited labels all make new entries and leave the old ones behind, so a few months
of fine-tuning fill a disk (one development machine reached 73 GB). This module lets a user
see that and free it without guessing which folders still matter: an entry is stale when its
case folder is gone or its files changed since it was cached (its name no longer matches),
and unused when it belongs to no bundle the user keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import OrthoKneeError
from .io import atomic_path

__all__ = [
    "CACHE_LAYOUT",
    "default_cache_dir",
    "cache_key",
    "CacheEntry",
    "scan_cache",
    "prune_cache",
    "ensure_free_space",
    "quantize_channels",
    "dequantize_channels",
    "QuantizedArray",
    "load_cached_array",
    "save_npy",
    "save_features",
    "compact_cache",
]

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


def prune_cache(
    root: str | os.PathLike, keep_bundle_hashes: Iterable[str] | None = None, dry_run: bool = False
) -> list[tuple[CacheEntry, str]]:
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
            "(or $ORTHOKNEE_CACHE) at a larger disk."
        )


# ------------------------------------------------------------------------- 8-bit features

SCALE_SUFFIX = "_scale"  # features_<plane>_scale.npy: (C, 2) float32, each channel's (min, step)


def quantize_channels(array: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Codes in 2^bits - 1 even steps over each channel's (axis 0) own [min, max], and the
    (C, 2) float32 (min, step) that reads them back.

    The features are three quarters of a cache entry, and the heads cannot tell 8 bits from 16
    on held-out cases (``bench/feature_bits.py``: Dice within 0.0012 in every case), so the
    cache holds twice the cases on the same disk. Per channel, because channel ranges differ
    by an order of magnitude.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be 1-16, not {bits}")
    levels = 2**bits - 1
    flat = np.asarray(array).reshape(array.shape[0], -1)
    scale = np.zeros((array.shape[0], 2), np.float32)
    codes = np.empty(flat.shape, np.uint8 if bits <= 8 else np.uint16)
    for c in range(flat.shape[0]):  # a channel at a time: no float32 copy of the whole array
        values = flat[c].astype(np.float32)
        lo, hi = float(values.min()), float(values.max())
        step = (hi - lo) / levels if hi > lo else 1.0
        scale[c] = lo, step
        codes[c] = np.rint((values - np.float32(lo)) / np.float32(step))
    return codes.reshape(array.shape), scale


def dequantize_channels(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of ``codes`` (C, ...) given each channel's (min, step) in ``scale`` (C, 2)."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return (scale[:, 0].reshape(shape) + codes.astype(np.float32) * scale[:, 1].reshape(shape)).astype(np.float32)


class QuantizedArray:
    """A cached 8-bit feature array that indexes like the float array it stands for: a read
    dequantizes only what it reads, so a training patch costs a patch, not the whole volume.
    The first index picks channels (an int or a slice)."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray) -> None:
        if scale.shape != (codes.shape[0], 2):
            raise ValueError(f"scale of shape {scale.shape} does not fit {codes.shape[0]} channels")
        self.codes, self.scale = codes, np.asarray(scale, np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        channels = key[0] if key else slice(None)
        if not isinstance(channels, (int, np.integer, slice)):
            raise TypeError(f"the channel index must be an int or a slice, not {type(channels).__name__}")
        codes = np.asarray(self.codes[key])
        if isinstance(channels, slice):
            return dequantize_channels(codes, self.scale[channels])
        return dequantize_channels(codes[None], self.scale[channels][None])[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = dequantize_channels(np.asarray(self.codes), self.scale)
        return values if dtype is None else values.astype(dtype, copy=False)


def load_cached_array(path: Path, mmap: bool = True) -> np.ndarray | QuantizedArray:
    """One array of a cache entry; 8-bit features come back as a QuantizedArray.

    Read with numpy's default ``allow_pickle=False``: an entry holding Python objects (a planted
    pickle) is refused as a damaged entry, never unpickled."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise OrthoKneeError(
            f"{path}: not a plain array of a feature cache entry ({exc}). Delete the entry "
            f"folder {path.parent.name}; it is computed again when needed."
        ) from None
    scale_path = path.with_name(path.stem + SCALE_SUFFIX + ".npy")
    if array.dtype == np.uint8 and path.stem.startswith("features_"):
        if not scale_path.is_file():
            raise OrthoKneeError(
                f"{path.parent}: the cache entry has 8-bit features without their scale "
                f"({scale_path.name}). Remove the entry (`orthoknee cache --prune` removes stale "
                "ones, or delete the folder); it is computed again when needed."
            )
        return QuantizedArray(array, np.load(scale_path))
    return array  # float16 features of older entries; a scale beside them is one a compaction left


def save_npy(path: Path, array: np.ndarray) -> None:
    """One array of a cache entry, written to a temporary name and renamed."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def save_features(folder: Path, name: str, features: np.ndarray) -> None:
    """Write ``name`` as 8-bit codes and its scale: the scale first, so that an interrupted
    write leaves either the old array (which ignores a scale beside it) or both."""
    codes, scale = quantize_channels(features)
    save_npy(folder / f"{name}{SCALE_SUFFIX}.npy", scale)
    save_npy(folder / f"{name}.npy", codes)


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype in an .npy header; None for a file that is not one (left to --prune)."""
    try:
        return np.load(path, mmap_mode="r").dtype
    except (OSError, ValueError):
        return None


def compact_cache(
    root: str | os.PathLike, dry_run: bool = False, progress: Callable[[int, int, str], None] | None = None
) -> tuple[int, int, int]:
    """Rewrite the float16 features of older entries as 8-bit codes, in place.

    Returns (entries converted, bytes before, bytes after) over those entries (with ``dry_run``
    the after is estimated and nothing is written). Entries still being written are skipped.
    """
    todo = []
    for entry in scan_cache(root):
        if entry.meta is None:
            continue
        old = [
            f
            for f in sorted(entry.path.glob("features_*.npy"))
            if not f.stem.endswith(SCALE_SUFFIX) and _npy_dtype(f) == np.float16
        ]
        if old:
            todo.append((entry, old))
    converted, before, after = 0, 0, 0
    for n, (entry, files) in enumerate(todo):
        for f in files:
            size = f.stat().st_size
            before += size
            if dry_run:
                after += size // 2
                continue
            save_features(entry.path, f.stem, np.load(f, mmap_mode="r"))
            after += f.stat().st_size + f.with_name(f.stem + SCALE_SUFFIX + ".npy").stat().st_size
        converted += 1
        if progress:
            progress(n + 1, len(todo), entry.path.name)
    return converted, before, after
