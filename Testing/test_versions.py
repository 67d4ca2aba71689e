"""Bundle versions side by side (versions.py): picking a version, running it on a case's output
folder, refusing what cannot run, and comparing by structure key."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch", reason="torch is an engine dependency")

from OrthoKneeLib.compare import compare_predictions  # noqa: E402
from OrthoKneeLib.errors import InputError  # noqa: E402
from OrthoKneeLib.predict import Predictor  # noqa: E402
from OrthoKneeLib.synth.dataset import read_case  # noqa: E402
from OrthoKneeLib.versions import describe, list_versions, run_version, version_output_folder  # noqa: E402


@pytest.fixture(scope="module")
def first_output(pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("versions") / "case-out"
    case = read_case(pipeline["folders"][2]).case
    Predictor(pipeline["trained"], device="cpu").predict(case).save(folder)
    return folder


def test_versions_list_the_shipped_bundle_and_refuse_what_cannot_run(pipeline, tmp_path):
    not_a_bundle = tmp_path / "not-a-bundle"
    not_a_bundle.mkdir()
    (not_a_bundle / "metadata.json").write_text("{")
    versions = list_versions([pipeline["trained"].path, not_a_bundle, pipeline["base"].path])
    by_path = {v.path: v for v in versions}
    assert len(versions) == 4  # the shipped bundle first, then each given one once
    assert by_path[pipeline["trained"].path.resolve()].problem == ""
    assert by_path[pipeline["trained"].path.resolve()].views
    assert by_path[not_a_bundle.resolve()].problem and "refused" in by_path[not_a_bundle.resolve()].label
    assert "no trained heads" in by_path[pipeline["base"].path.resolve()].problem  # backbones only
    with pytest.raises(InputError, match="cannot be used"):
        run_version(tmp_path, by_path[not_a_bundle.resolve()])


def test_a_version_runs_beside_the_first_output_and_is_reused(pipeline, first_output, tmp_path):
    other = tmp_path / "v2"
    shutil.copytree(pipeline["trained"].path, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["version"] = "0.2.0"
    (other / "metadata.json").write_text(json.dumps(meta))
    version = describe(other)
    out = run_version(first_output, version, device="cpu")
    assert out == version_output_folder(first_output, version) and out.name.endswith("--tiny-0.2.0")
    assert out.parent == first_output.parent and (out / "findings.json").is_file()
    stamp = (out / "findings.json").stat().st_mtime_ns
    assert run_version(first_output, version, device="cpu") == out  # same heads, same inputs: reused
    assert (out / "findings.json").stat().st_mtime_ns == stamp
    diff = compare_predictions(first_output, out)
    assert all(row["dice"] in (None, 1.0) for row in diff["structures"].values())  # the same heads
    assert not any(f["changed"] for f in diff["findings"].values())
    assert diff["only_in_a"] == diff["only_in_b"] == []


def test_a_case_whose_series_moved_is_refused(pipeline, first_output, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(first_output, moved)
    findings = json.loads((moved / "findings.json").read_text())
    findings["inputs"] = {p: str(tmp_path / "gone" / f"{p}.nrrd") for p in findings["inputs"]}
    (moved / "findings.json").write_text(json.dumps(findings))
    with pytest.raises(InputError, match="have moved"):
        run_version(moved, describe(pipeline["trained"].path), device="cpu")
