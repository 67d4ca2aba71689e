"""Model bundles: a folder with ``metadata.json`` and weight files, validated on load.

Layout::

    BUNDLE/metadata.json                 format and bundle version, per-view architecture and
                                         spacing, feature timesteps, label catalog, training
                                         data and commands, metrics, sha256 of every weight file
    BUNDLE/weights/backbone_<view>.pt    EMA weights of each view's denoiser (state dict)
    BUNDLE/weights/heads.pt              fusion, segmentation and finding heads (state dict)
    BUNDLE/checkpoints/                  training checkpoints (resume); not needed to predict

Weights are plain tensors loaded with ``torch.load(weights_only=True)``: a bundle cannot run
code on the machine that loads it. Loading checks the format version, every file's sha256
and every tensor's shape, and says which file is wrong and how to fix it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, OrthoKneeError, advised_message
from .io import atomic_path, write_json_atomic
from .labels import DEFAULT_CATALOG, Catalog
from .model.diffusion import ViewModelConfig

__all__ = [
    "FORMAT_VERSION",
    "BundleError",
    "Bundle",
    "create_bundle",
    "derive_bundle",
    "next_version",
    "file_sha256",
    "DEFAULT_FEATURES",
]

FORMAT_VERSION = 1
# span_slices: each backbone window covers the whole slice axis (no seams between slices;
# model/features.py). Bundles made before it lack the key and tile the slices, as they were
# trained; the key is part of the bundle hash, so their feature caches stay valid.
DEFAULT_FEATURES = {
    "timesteps": {"sagittal": [50, 200], "coronal": [100], "axial": [100]},
    "budget_per_block": 16,
    "seed": 0,
    "overlap": 0.1,
    "span_slices": True,
}


class BundleError(OrthoKneeError):
    """A bundle is missing, incomplete, tampered with or of another format."""

    def __init__(self, path, problem: str, advice: str = "") -> None:
        super().__init__(advised_message(path, problem, advice))
        self.path = str(path) if path else None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def create_bundle(
    path: str | os.PathLike, name: str, version: str, catalog: Catalog = DEFAULT_CATALOG, description: str = ""
) -> "Bundle":
    """Start a new (empty) bundle folder, or return the existing one at ``path``."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return Bundle.open(path, verify=False)
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": _now(),
        "description": description,
        "views": {},
        "features": dict(DEFAULT_FEATURES),
        "catalog": catalog.to_json(),
        "heads": None,
        "training": {},
        "metrics": {},
        "intended_use": "Research and demonstration only. Not for clinical use.",
    }
    (path / "weights").mkdir(parents=True, exist_ok=True)
    write_json_atomic(metadata, path / "metadata.json")
    return Bundle(path, metadata)


def derive_bundle(bundle: "Bundle", out: str | os.PathLike, version: str | None = None) -> "Bundle":
    """A copy of ``bundle`` at ``out`` (every backbone and the metadata, no heads), the start of
    a new version: heads trained on its features, or one backbone trained further.

    The copy records its parent (name, version, hash). An ``out`` that already holds trained
    heads is refused rather than overwritten.
    """
    out = Path(out)
    if out.resolve() == bundle.path.resolve():
        raise InputError(
            out, "is the input bundle; the new version needs a folder of its own.", "Give another --out folder."
        )
    if (out / "metadata.json").is_file():
        existing = json.loads((out / "metadata.json").read_text())
        if existing.get("heads"):
            raise InputError(out, "already holds a bundle with trained heads.", "Give a new --out folder or remove it.")
    (out / "weights").mkdir(parents=True, exist_ok=True)
    for plane in bundle.planes:
        rel = bundle.metadata["views"][plane]["weights"]
        if not (out / rel).is_file() or file_sha256(out / rel) != bundle.metadata["views"][plane]["sha256"]:
            with atomic_path(out / rel) as tmp:
                shutil.copyfile(bundle.path / rel, tmp)
    metadata = json.loads(json.dumps(bundle.metadata))
    metadata["version"] = version or next_version(bundle.metadata.get("version", "0.0.0"))
    metadata["parent"] = {
        "name": bundle.metadata.get("name"),
        "version": bundle.metadata.get("version"),
        "hash": bundle.hash,
    }
    metadata["heads"] = None
    metadata["metrics"] = {}
    write_json_atomic(metadata, out / "metadata.json")
    return Bundle.open(out, verify=True)


_SHA256_CHARS = set("0123456789abcdef")


def _check_weight_entry(meta_path: Path, where: str, entry: Any) -> None:
    """A weights entry names a file inside the bundle and its sha256: a path that climbs out of
    the bundle (``../``) or is absolute is refused, so metadata cannot point the loader elsewhere."""
    if not isinstance(entry, dict):
        raise BundleError(meta_path, f"{where} is a {type(entry).__name__}, not an object.", _RESTORE)
    relative = entry.get("weights")
    if not isinstance(relative, str) or not relative:
        raise BundleError(meta_path, f"{where}.weights is {relative!r}, not a file name.", _RESTORE)
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts or (parts and parts[0] != "weights"):
        raise BundleError(
            meta_path,
            f"{where}.weights {relative!r} points outside the bundle's weights/ folder.",
            "Do not use this bundle: its metadata.json was altered. Restore it from its source.",
        )
    digest = entry.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_CHARS:
        raise BundleError(meta_path, f"{where}.sha256 is {digest!r}, not a sha256 hex digest.", _RESTORE)


_RESTORE = "Restore the bundle from its source."


def _check_metadata(meta_path: Path, metadata: Any) -> None:
    """Every value the loader reads has the type it needs; a malformed one is named, not a KeyError later."""
    if not isinstance(metadata, dict):
        raise BundleError(meta_path, f"holds a {type(metadata).__name__}, not an object.", _RESTORE)
    for key in ("name", "version"):
        if not isinstance(metadata.get(key), str):
            raise BundleError(meta_path, f"'{key}' is {metadata.get(key)!r}, not a string.", _RESTORE)
    views = metadata.get("views")
    if not isinstance(views, dict):
        raise BundleError(meta_path, f"'views' is {views!r}, not an object.", _RESTORE)
    for plane, entry in views.items():
        if plane not in ("sagittal", "coronal", "axial"):
            raise BundleError(meta_path, f"'views' names {plane!r}, not sagittal, coronal or axial.", _RESTORE)
        _check_weight_entry(meta_path, f"views.{plane}", entry)
        try:
            config = ViewModelConfig.from_json(entry["model"])
            ok = all(v > 0 for k in ("spacing", "patch", "window", "channels") for v in getattr(config, k))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                meta_path, f"views.{plane}.model is not a valid architecture ({exc}).", _RESTORE
            ) from None
        if not ok:
            raise BundleError(meta_path, f"views.{plane}.model has a size or spacing that is not positive.", _RESTORE)
    features = metadata.get("features")
    try:
        timesteps = features["timesteps"]
        valid = all(isinstance(t, int) and 0 <= t < 1000 for plane in timesteps.values() for t in plane)
        valid = valid and int(features["budget_per_block"]) > 0 and 0 <= float(features["overlap"]) < 1
    except (KeyError, TypeError, ValueError, AttributeError):
        valid = False
    if not valid:
        raise BundleError(
            meta_path, "'features' lacks valid timesteps (0-999), budget_per_block (> 0) or overlap ([0, 1)).", _RESTORE
        )
    heads = metadata.get("heads")
    if heads is not None:
        _check_weight_entry(meta_path, "heads", heads)
        if not isinstance(heads.get("kind"), str):
            raise BundleError(meta_path, f"heads.kind is {heads.get('kind')!r}, not a string.", _RESTORE)
    try:
        Catalog.from_json(metadata["catalog"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(
            meta_path, f"'catalog' is not a valid label catalog ({type(exc).__name__}: {exc}).", _RESTORE
        ) from None


def next_version(version: str) -> str:
    """The next minor version ("0.5.0" -> "0.6.0"); an unparsable one gets ".1" appended."""
    parts = version.split(".")
    try:
        parts[1] = str(int(parts[1]) + 1)
        parts[2:] = ["0"] * len(parts[2:])
    except (IndexError, ValueError):
        return version + ".1"
    return ".".join(parts)


@dataclass
class Bundle:
    path: Path
    metadata: dict[str, Any]

    # ------------------------------------------------------------------ opening and checks
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        path = Path(path)
        meta_path = path / "metadata.json"
        if not path.exists():
            raise BundleError(
                path,
                "no such bundle folder.",
                "Give a bundle folder (the shipped demo bundle is Resources/Models/orthoknee-demo), "
                "or make one with `orthoknee pretrain` and `orthoknee finetune`.",
            )
        if not meta_path.is_file():
            raise BundleError(
                path,
                "is not a model bundle (no metadata.json).",
                "Make one with `orthoknee pretrain` and `orthoknee finetune`.",
            )
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(meta_path, f"is not valid JSON ({exc}).", "Restore the bundle from its source.") from None
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                meta_path,
                f"has bundle format version {version!r}; this OrthoKnee reads version {FORMAT_VERSION}.",
                "Use the OrthoKnee release that made the bundle, or re-export it.",
            )
        _check_metadata(meta_path, metadata)
        bundle = cls(path, metadata)
        if verify:
            bundle.verify()
        return bundle

    def _weight_entries(self) -> list[tuple[str, dict]]:
        entries = [(f"view {p}", v) for p, v in self.metadata.get("views", {}).items()]
        if self.metadata.get("heads"):
            entries.append(("heads", self.metadata["heads"]))
        return entries

    def verify(self) -> None:
        """Every weight file exists and has the sha256 recorded in metadata.json."""
        for what, entry in self._weight_entries():
            f = self.path / entry["weights"]
            if not f.is_file():
                raise BundleError(
                    f,
                    f"is missing ({what} weights listed in metadata.json).",
                    "The bundle is incomplete; copy it again or retrain that part.",
                )
            digest = file_sha256(f)
            if digest != entry["sha256"]:
                raise BundleError(
                    f,
                    f"has sha256 {digest[:12]}... but metadata.json records {entry['sha256'][:12]}...: "
                    "the file was changed or corrupted.",
                    "Restore the bundle from its source.",
                )

    # ------------------------------------------------------------------ contents
    @property
    def catalog(self) -> Catalog:
        return Catalog.from_json(self.metadata["catalog"])

    @property
    def planes(self) -> tuple[str, ...]:
        return tuple(p for p in ("sagittal", "coronal", "axial") if p in self.metadata.get("views", {}))

    @property
    def features(self) -> dict:
        return self.metadata["features"]

    @property
    def span_slices(self) -> bool:
        """Whether each backbone window covers every slice; bundles made before the setting
        existed (the demo bundle 0.4.0) tiled the slices too, and keep doing so."""
        return bool(self.features.get("span_slices", False))

    def view_config(self, plane: str) -> ViewModelConfig:
        if plane not in self.metadata.get("views", {}):
            raise BundleError(self.path, f"has no {plane} backbone.", f"Train it: `orthoknee pretrain --view {plane}`.")
        return ViewModelConfig.from_json(self.metadata["views"][plane]["model"])

    @property
    def hash(self) -> str:
        """Identifies the weights and feature settings (feature caches are keyed by it)."""
        h = hashlib.sha256()
        for what, entry in sorted(self._weight_entries()):
            if what.startswith("view"):
                h.update(f"{what}:{entry['sha256']}".encode())
        h.update(json.dumps(self.features, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def load_state(self, relative: str, what: str) -> dict:
        import torch

        f = self.path / relative
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise BundleError(f, f"is missing ({what}).", "The bundle is incomplete.") from None
        except Exception as exc:  # unpickling refused or corrupt archive
            raise BundleError(
                f,
                f"could not be read as plain weights ({type(exc).__name__}: {exc}).",
                "Only tensor state dicts are accepted; re-export the bundle.",
            ) from None

    def load_into(self, module, relative: str, what: str) -> None:
        """Load a state dict into ``module``, turning shape mismatches into a clear error."""
        state = self.load_state(relative, what)
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            (k, tuple(state[k].shape), tuple(own[k].shape))
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if missing or unexpected or wrong:
            detail = []
            if wrong:
                k, got, want = wrong[0]
                detail.append(f"{len(wrong)} tensors have the wrong shape (e.g. {k}: {got}, expected {want})")
            if missing:
                detail.append(f"{len(missing)} tensors are missing (e.g. {missing[0]})")
            if unexpected:
                detail.append(f"{len(unexpected)} are unexpected (e.g. {unexpected[0]})")
            raise BundleError(
                self.path / relative,
                f"does not fit the architecture in metadata.json ({what}): " + "; ".join(detail) + ".",
                "The weights and metadata.json come from different models.",
            )
        module.load_state_dict(state)

    def load_backbone(self, plane: str, device: str = "cpu"):
        """(unet, scheduler) of one view, weights loaded, in eval mode."""
        from .model.diffusion import build_scheduler, build_unet

        config = self.view_config(plane)
        unet = build_unet(config)
        self.load_into(unet, self.metadata["views"][plane]["weights"], f"{plane} backbone")
        return unet.to(device).eval(), build_scheduler(config)

    # ------------------------------------------------------------------ writing
    def save_weights(self, relative: str, state_dict: dict) -> str:
        import torch

        target = self.path / relative
        with atomic_path(target) as tmp:
            torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
        return file_sha256(target)

    def set_view(self, plane: str, config: ViewModelConfig, state_dict: dict, training: dict) -> None:
        relative = f"weights/backbone_{plane}.pt"
        digest = self.save_weights(relative, state_dict)
        self.metadata["views"][plane] = {
            "model": config.to_json(),
            "weights": relative,
            "sha256": digest,
            "training": training,
        }
        self.save_metadata()

    def save_metadata(self) -> None:
        self.metadata["modified"] = _now()
        write_json_atomic(self.metadata, self.path / "metadata.json")
