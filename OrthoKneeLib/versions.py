"""Bundle versions side by side: which versions a user can pick, running one on the case at hand.

The annotator's loop makes bundle N+1 from corrections of bundle N; the viewer and the Slicer
module then let the user pick a version, run it on the case they are looking at and compare the
two outputs (compare.compare_predictions). A version that cannot run on the case is refused
before any work, with what differs and what to do: a bundle that does not open (its reason), or
heads that need a series the case lacks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, OrthoKneeError
from .progress import CancelToken, ProgressFn, no_progress

__all__ = [
    "BundleVersion",
    "list_versions",
    "version_output_folder",
    "run_version",
    "user_bundles_dir",
    "next_version_folder",
]


@dataclass
class BundleVersion:
    """One bundle a user may pick: what it is, or why it cannot be used."""

    path: Path
    name: str = ""
    version: str = ""
    hash: str = ""  # backbones and feature settings (feature caches are keyed by it)
    heads_sha256: str = ""  # the heads' weights: what tells two versions of one backbone apart
    views: list[str] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)
    parent: str = ""  # "name version" of the bundle it was fine-tuned from
    problem: str = ""  # why it is refused ("" when usable)

    @property
    def label(self) -> str:
        what = f"{self.name} {self.version}".strip() or self.path.name
        return f"{what} (refused: {self.problem})" if self.problem else what

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "name": self.name,
            "version": self.version,
            "hash": self.hash,
            "heads_sha256": self.heads_sha256,
            "views": self.views,
            "structures": self.structures,
            "parent": self.parent,
            "problem": self.problem,
            "label": self.label,
        }


def describe(path: str | os.PathLike) -> BundleVersion:
    """What ``path`` holds, or the reason it cannot be used (never raises for a bad bundle)."""
    from .bundle import Bundle

    path = Path(path)
    try:
        bundle = Bundle.open(path)
        heads = bundle.metadata.get("heads") or {}
        if heads.get("kind") != "diffusion-heads":
            raise OrthoKneeError(f"{path} has no trained heads: it can be fine-tuned, not run")
    except (OrthoKneeError, OSError, ValueError) as exc:
        return BundleVersion(path=path, problem=str(exc).splitlines()[0])
    parent = bundle.metadata.get("parent") or {}
    return BundleVersion(
        path=path,
        name=str(bundle.metadata.get("name", "")),
        version=str(bundle.metadata.get("version", "")),
        hash=bundle.hash,
        heads_sha256=str(heads.get("sha256", "")),
        views=list((heads.get("config") or {}).get("view_channels") or []),
        structures=[s.key for s in bundle.catalog.structures],
        parent=f"{parent.get('name', '')} {parent.get('version', '')}".strip(),
    )


def list_versions(paths: list[str | os.PathLike] = ()) -> list[BundleVersion]:
    """The shipped bundle and ``paths`` (bundles, or folders of bundles), each once."""
    from .resources import demo_bundle_dir

    found: list[Path] = [demo_bundle_dir()]
    for p in map(Path, paths):
        if (p / "metadata.json").is_file() or not p.is_dir():
            found.append(p)
        else:  # a folder of bundles, e.g. where finetune --out wrote the versions
            found.extend(sorted(q.parent for q in p.glob("*/metadata.json")))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [describe(p) for p in unique]


def _folder_name(text: str) -> str:
    """``text`` as a file name: runs of anything but letters, digits, '.', '_' and '-' become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def user_bundles_dir() -> Path:
    """Where the Slicer module writes the versions an annotator fine-tunes: $ORTHOKNEE_BUNDLES, else
    ~/OrthoKnee/bundles (a folder the user sees, backs up and can point `orthoknee serve --versions` at)."""
    return Path(os.environ.get("ORTHOKNEE_BUNDLES", Path.home() / "OrthoKnee" / "bundles"))


def next_version_folder(parent: BundleVersion, root: str | os.PathLike | None = None) -> Path:
    """A new folder for the version fine-tuned from ``parent``: <name>-<next minor version>, the first
    such name not yet taken (a version is never overwritten)."""
    from .bundle import next_version

    root = Path(root) if root is not None else user_bundles_dir()
    version = next_version(parent.version or "0.0.0")
    while True:
        folder = root / _folder_name(f"{parent.name or 'orthoknee'}-{version}")
        if not folder.exists():
            return folder
        version = next_version(version)


def version_output_folder(output_folder: str | os.PathLike, version: BundleVersion) -> Path:
    """Where ``version``'s prediction of the case in ``output_folder`` goes: a sibling folder named
    after the version, so versions never overwrite each other's outputs (or the user's edits)."""
    output_folder = Path(output_folder)
    tag = _folder_name(f"{version.name}-{version.version}") or version.heads_sha256[:12]
    return output_folder.parent / f"{output_folder.name}--{tag}"


def run_version(
    output_folder: str | os.PathLike,
    version: BundleVersion,
    device: str = "auto",
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Path:
    """Predict the case of ``output_folder`` (its recorded input series) with ``version``; returns the
    new output folder. A folder this version already predicted from the same inputs is reused."""
    from .predict import Predictor
    from .results import is_output_folder, load_prediction
    from .volumes import Case, load_volume

    if version.problem:
        raise InputError(version.path, f"cannot be used: {version.problem}.", "Pick another version.")
    current = load_prediction(output_folder)
    paths = {p: Path(f) for p, f in (current.input_paths or {}).items()}
    gone = [f"{p}: {f}" for p, f in paths.items() if not f.exists()]
    if not paths or gone:
        raise InputError(
            output_folder,
            "does not record where its series are, or they have moved"
            + (f" ({'; '.join(gone)})" if gone else "")
            + ".",
            "Predict the case again from its series, then compare.",
        )
    missing = [v for v in version.views if v not in paths]
    if missing and not any(v in paths for v in version.views):
        raise InputError(
            version.path,
            f"has heads on the {', '.join(version.views)} series; this case has only {', '.join(paths)}.",
            "Pick a version whose heads read the case's series.",
        )
    out = version_output_folder(output_folder, version)
    if is_output_folder(out):
        done = load_prediction(out)
        same_heads = (done.bundle or {}).get("heads_sha256") == version.heads_sha256
        if same_heads and done.input_hashes == current.input_hashes:
            return out
    case = Case(**{p: load_volume(f) for p, f in paths.items()}, name=current.case_name)
    prediction = Predictor(version.path, device=device).predict(case, progress=progress, cancel=cancel)
    prediction.save(out, cancel=cancel)
    return out
