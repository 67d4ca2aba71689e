"""The feature cache's bookkeeping: which entries are stale, what --prune removes, and the
disk-space check that fails before a half-written entry rather than in the middle of one."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from OrthoKneeLib.cli import main
from OrthoKneeLib.errors import OrthoKneeError
from OrthoKneeLib.featurecache import (
    CACHE_LAYOUT,
    INCOMPLETE_GRACE_S,
    QuantizedArray,
    cache_key,
    compact_cache,
    dequantize_channels,
    ensure_free_space,
    load_cached_array,
    prune_cache,
    quantize_channels,
    scan_cache,
)


def _case(root: Path, name: str) -> Path:
    folder = root / "cases" / name
    folder.mkdir(parents=True)
    (folder / "case.json").write_text(json.dumps({"case_id": name}))
    (folder / "sagittal.nrrd").write_bytes(b"0" * 100)
    return folder


def _entry(
    cache: Path, folder: Path, bundle_hash: str, planes=("sagittal", "coronal", "axial"), views=None, size=1000
) -> Path:
    entry = cache / f"{folder.name}-{cache_key(bundle_hash, folder, views)}"
    entry.mkdir(parents=True)
    (entry / "features_sagittal.npy").write_bytes(b"\0" * size)
    (entry / "meta.json").write_text(
        json.dumps(
            {"layout": CACHE_LAYOUT, "case_folder": str(folder), "bundle_hash": bundle_hash, "planes": list(planes)}
        )
    )
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


# ------------------------------------------------------------------------- 8-bit features


def _features(rng, channels=3):
    values = np.stack([rng.normal(0, 1, (4, 6, 5)), np.full((4, 6, 5), 0.25), rng.uniform(-1.4, 0.3, (4, 6, 5))])
    return values[:channels].astype(np.float16)


def test_8_bit_codes_read_back_within_half_a_step_whichever_way_they_are_indexed():
    features = _features(np.random.default_rng(0))
    codes, scale = quantize_channels(features)
    assert codes.dtype == np.uint8 and scale.shape == (3, 2) and codes.max() == 255 and codes.min() == 0
    values = dequantize_channels(codes, scale)
    error = np.abs(values - features.astype(np.float32))
    for c in (0, 2):
        step = np.ptp(features[c].astype(np.float32)) / 255
        assert step / 10 < error[c].max() <= step / 2 + 1e-6
    assert np.all(values[1] == np.float32(0.25))  # a constant channel stays exact
    lazy = QuantizedArray(codes, scale)
    assert lazy.shape == features.shape and len(lazy) == 3
    assert np.array_equal(np.asarray(lazy, np.float32), values)
    for key in (np.s_[:, 1:3, 2:5, :], np.s_[2], np.s_[1:, 0], np.s_[0, :, 3]):
        assert np.array_equal(lazy[key], values[key]), key
    with pytest.raises(TypeError, match="channel index"):
        lazy[[0, 2]]


def _old_entry(cache: Path, folder: Path, features: np.ndarray) -> Path:
    entry = _entry(cache, folder, "bundle1", planes=("sagittal",), views=("sagittal",))
    for name, array in (("features_sagittal", features), ("pooled_features_sagittal", features[:, ::2])):
        np.save(entry / f"{name}.npy", array)  # float16, as entries were written before 8-bit features
    return entry


def test_compact_rewrites_old_float16_features_in_place(tmp_path, capsys):
    features = _features(np.random.default_rng(1))
    features = np.tile(features, (1, 8, 8, 8))  # large enough that the 2 x 4 bytes of scale a channel are small
    entry = _old_entry(tmp_path / "cache", _case(tmp_path, "a"), features)
    before = (entry / "features_sagittal.npy").stat().st_size

    assert main(["cache", "--cache", str(tmp_path / "cache"), "--compact", "--dry-run"]) == 0
    assert "would rewrite the features of 1 entries" in capsys.readouterr().out
    assert np.load(entry / "features_sagittal.npy").dtype == np.float16

    assert main(["cache", "--cache", str(tmp_path / "cache"), "--compact"]) == 0
    assert "rewrote the features of 1 entries" in capsys.readouterr().out
    assert np.load(entry / "features_sagittal.npy").dtype == np.uint8
    assert (entry / "features_sagittal.npy").stat().st_size < 0.52 * before
    assert np.load(entry / "pooled_features_sagittal.npy").dtype == np.float16  # small, read whole: kept
    read = load_cached_array(entry / "features_sagittal.npy")
    assert isinstance(read, QuantizedArray)
    assert np.abs(np.asarray(read) - features.astype(np.float32)).max() <= np.ptp(features.astype(np.float32)) / 255
    assert compact_cache(tmp_path / "cache") == (0, 0, 0)  # nothing left to do


def test_an_interrupted_compaction_leaves_a_readable_entry(tmp_path):
    """The scale is written before the codes: stopped between the two, the float16 array is read
    as it was; codes without their scale are refused with advice, never read as values."""
    features = _features(np.random.default_rng(2))
    entry = _old_entry(tmp_path / "cache", _case(tmp_path, "a"), features)
    np.save(entry / "features_sagittal_scale.npy", quantize_channels(features)[1])
    read = load_cached_array(entry / "features_sagittal.npy")
    assert isinstance(read, np.ndarray) and np.array_equal(read, features)

    (entry / "features_sagittal_scale.npy").unlink()
    np.save(entry / "features_sagittal.npy", quantize_channels(features)[0])
    with pytest.raises(OrthoKneeError, match="without their scale"):
        load_cached_array(entry / "features_sagittal.npy")


def test_compact_and_prune_are_separate_runs(tmp_path, capsys):
    assert main(["cache", "--cache", str(tmp_path), "--compact", "--prune"]) != 0
    assert "two runs" in capsys.readouterr().err
