"""The feature cache's bookkeeping: which entries are stale, what --prune removes, and the
disk-space check that fails before a half-written entry rather than in the middle of one."""

import json
import os
import time
from pathlib import Path

import pytest

from OrthoKneeLib.cli import main
from OrthoKneeLib.errors import OrthoKneeError
from OrthoKneeLib.featurecache import (
    CACHE_LAYOUT, INCOMPLETE_GRACE_S, cache_key, ensure_free_space, prune_cache, scan_cache,
)


def _case(root: Path, name: str) -> Path:
    folder = root / "cases" / name
    folder.mkdir(parents=True)
    (folder / "case.json").write_text(json.dumps({"case_id": name}))
    (folder / "sagittal.nrrd").write_bytes(b"0" * 100)
    return folder


def _entry(cache: Path, folder: Path, bundle_hash: str, planes=("sagittal", "coronal", "axial"),
           views=None, size=1000) -> Path:
    entry = cache / f"{folder.name}-{cache_key(bundle_hash, folder, views)}"
    entry.mkdir(parents=True)
    (entry / "features_sagittal.npy").write_bytes(b"\0" * size)
    (entry / "meta.json").write_text(json.dumps({"layout": CACHE_LAYOUT, "case_folder": str(folder),
                                                 "bundle_hash": bundle_hash, "planes": list(planes)}))
    return entry


@pytest.fixture
def cache(tmp_path):
    cache = tmp_path / "cache"
    a, b, gone, edited = (_case(tmp_path, n) for n in ("a", "b", "gone", "edited"))
    made = {
        "fresh": _entry(cache, a, "bundle1"),
        "subset": _entry(cache, b, "bundle1", planes=("sagittal",), views=("sagittal",)),
        "other_bundle": _entry(cache, a, "bundle2"),
        "gone": _entry(cache, gone, "bundle1"),
        "edited": _entry(cache, edited, "bundle1"),
    }
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    time.sleep(0.01)
    (edited / "sagittal.nrrd").write_bytes(b"1" * 101)  # an annotator's re-export: new size
    old_partial = cache / "c-00000000000000000000"
    old_partial.mkdir()
    (old_partial / "features_sagittal.npy").write_bytes(b"\0" * 10)
    past = time.time() - INCOMPLETE_GRACE_S - 60
    os.utime(old_partial / "features_sagittal.npy", (past, past))
    being_written = cache / "d-11111111111111111111"
    being_written.mkdir()
    (being_written / "features_sagittal.npy").write_bytes(b"\0" * 10)
    made.update(old_partial=old_partial, being_written=being_written)
    return cache, made


def test_scan_says_which_entries_are_stale_and_why(cache):
    root, made = cache
    stale = {e.path: e.stale for e in scan_cache(root)}
    assert stale[made["fresh"]] is None and stale[made["subset"]] is None and stale[made["other_bundle"]] is None
    assert "is gone" in stale[made["gone"]]
    assert "changed after it was cached" in stale[made["edited"]]
    assert "incomplete" in stale[made["old_partial"]]
    assert stale[made["being_written"]] is None  # young and without meta.json: maybe still being written
    assert scan_cache(root / "missing") == []


def test_prune_removes_stale_entries_and_other_bundles_only_when_asked(cache):
    root, made = cache
    dry = prune_cache(root, dry_run=True)
    assert {e.path for e, _ in dry} == {made["gone"], made["edited"], made["old_partial"]}
    assert all(p.exists() for p in made.values())  # a dry run removes nothing
    prune_cache(root)
    assert not made["gone"].exists() and not made["edited"].exists() and not made["old_partial"].exists()
    assert made["fresh"].exists() and made["other_bundle"].exists() and made["being_written"].exists()
    removed = prune_cache(root, keep_bundle_hashes={"bundle1"})
    assert [(e.path, r) for e, r in removed] == [(made["other_bundle"], "bundle bundle2 is not kept")]
    assert made["fresh"].exists() and made["subset"].exists()


def test_cache_command_lists_and_prunes(cache, capsys):
    root, made = cache
    assert main(["cache", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert "7 entries" in out and "stale: 3 entries" in out and "bundle bundle1" in out and "--prune" in out
    assert main(["cache", "--cache", str(root), "--prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 3 entries" in out and made["gone"].exists()
    assert main(["cache", "--cache", str(root), "--prune"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out and not made["gone"].exists()
    assert main(["cache", "--cache", str(root), "--keep-bundle", str(root)]) == 2  # without --prune: explained
    assert "--prune" in capsys.readouterr().err
    shipped = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "orthoknee-demo"
    assert main(["cache", "--cache", str(root), "--prune", "--keep-bundle", str(shipped)]) == 0
    out = capsys.readouterr().out
    assert "keeping bundle" in out and "orthoknee-demo" in out
    assert "removed 3 entries" in out  # bundle1's two and bundle2's: not the shipped one's
    assert [e.path for e in scan_cache(root)] == [made["being_written"]]


def test_free_space_check_fails_before_writing_with_advice(tmp_path):
    ensure_free_space(tmp_path / "not" / "yet", 1024, "an entry")  # checks the nearest existing folder
    with pytest.raises(OrthoKneeError, match=r"needs about .* MB of disk .* `orthoknee cache --prune`"):
        ensure_free_space(tmp_path, 2**62, "the feature cache entry of case-1")
