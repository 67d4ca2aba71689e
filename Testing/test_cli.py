"""The `orthoknee` command's stable JSON interfaces and its error handling."""

import io
import json
import shutil
import subprocess
import sys

import pytest

from OrthoKneeLib.cli import main
from OrthoKneeLib.progress import TextProgress
from OrthoKneeLib.resources import SAMPLE_VIEWS


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.shared_data
def test_info_json_lists_eight_mese_echoes(capsys, shared_data):
    code, out, _ = run(capsys, "info", str(shared_data / "mese-pymskt"), "--json")
    assert code == 0
    volumes = json.loads(out)["volumes"]
    assert len(volumes) == 8
    for v in volumes:
        assert set(v) >= {"plane", "size", "spacing", "orientation", "echo_time", "path"}
        assert v["size"][2] == 24 and v["plane"] == "sagittal" and v["orientation"] == "PIR"
    assert len({v["echo_time"] for v in volumes}) == 8


@pytest.mark.shared_data
def test_info_table_for_several_paths(capsys, shared_data):
    code, out, _ = run(capsys, "info", str(shared_data / "dess-pykneer"), str(shared_data / "labels-spl-atlas"))
    assert code == 0
    assert "Sag DESS" in out and "axial" in out and "2 volume(s)" in out


def test_info_reports_a_bad_path_and_fails(capsys, tmp_path):
    code, out, err = run(capsys, "info", str(tmp_path / "missing"), "--json")
    assert code == 2
    data = json.loads(out)
    assert data["volumes"] == []
    assert data["errors"][0]["type"] == "MissingFileError"
    assert "missing" in data["errors"][0]["error"]


def test_catalog_json(capsys):
    code, out, _ = run(capsys, "catalog", "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["structures"]) == 11 and len(data["findings"]) == 8
    for entry in data["structures"] + data["findings"]:
        assert set(entry) >= {"key", "name", "color", "code"}
    femur = data["structures"][0]
    assert femur["key"] == "femur" and femur["code"]["value"] == "71341001"


def test_catalog_table(capsys):
    code, out, _ = run(capsys, "catalog")
    assert code == 0 and "Posterior cruciate ligament" in out and "Joint effusion" in out


def test_demo_predicts_the_shipped_sample_case(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert code == 0
    assert "views sagittal, coronal, axial" in out and "Open the result" in out
    findings = json.loads((tmp_path / "demo" / "findings.json").read_text())
    assert len(findings["findings"]) == 8 and findings["plausibility"]["knee_found"]
    assert (tmp_path / "demo" / "structures.seg.nrrd").is_file() and (tmp_path / "demo" / "montage.png").is_file()


def test_demo_with_an_incomplete_sample_folder_explains(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--sample", str(tmp_path))
    assert code == 2
    assert str(tmp_path) in err and "does not exist" in err


def test_reformat_and_resample_write_readable_volumes(capsys, tmp_path):
    from OrthoKneeLib.resources import sample_case_dir
    from OrthoKneeLib.volumes import load_volume

    src = sample_case_dir() / SAMPLE_VIEWS["sagittal"]
    out = tmp_path / "axial.nii.gz"
    code, printed, _ = run(
        capsys, "reformat", str(src), "--plane", "axial", "--in-plane", "1.0", "--thickness", "4", "--out", str(out)
    )
    assert code == 0 and "axial" in printed
    v = load_volume(out)
    assert v.plane == "axial" and v.spacing[2] == pytest.approx(4.0)
    out2 = tmp_path / "coarse.nrrd"
    code, _, _ = run(capsys, "resample", str(src), "--spacing", "1.25", "1.25", "3", "--out", str(out2))
    assert code == 0
    assert load_volume(out2).size == (128, 128, 40)
    assert not list(tmp_path.glob(".*tmp*")), "temporary files must not be left behind"


def test_console_script_is_installed():
    exe = shutil.which("orthoknee") or str(__import__("pathlib").Path(sys.executable).parent / "orthoknee")
    result = subprocess.run([exe, "catalog", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["findings"]) == 8


class _FakeClock:
    """Seconds that pass only when the test says so: rates and ETAs are exact under any load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_rate_of_a_resumed_job():
    """A run resumed at step 500 reports its own pace, not 10 s spread over 501 steps."""
    stream, clock = io.StringIO(), _FakeClock()
    bar = TextProgress("finetune", stream=stream, unit="step", clock=clock)
    clock.now += 10.0  # the first step after the resume took 10 s
    bar(501, 1000, "loss 1.0")
    assert "501/1000 10.0 s/step ETA 4990 s loss 1.0" in stream.getvalue()
    clock.now += 10.0
    bar(502, 1000)
    assert "502/1000 10.0 s/step ETA 4980 s" in stream.getvalue().splitlines()[-1]


def test_progress_rate_follows_the_recent_items():
    """90 cached cases found at once, then cases that take 5 s each: the ETA is the slow pace."""
    stream, clock = io.StringIO(), _FakeClock()
    bar = TextProgress("features", stream=stream, unit="case", window=20, clock=clock)
    for done in range(1, 91):
        bar(done, 130)
    for done in range(91, 111):
        clock.now += 5.0
        bar(done, 130)
    assert "110/130 5.0 s/case ETA 100 s" in stream.getvalue().splitlines()[-1]
    # a long job averages over a twentieth of it: a 45-s validation pass among 0.8-s steps
    clock = _FakeClock()
    bar = TextProgress("finetune", stream=stream, unit="step", window=20, clock=clock)
    for done in range(1, 511):
        clock.now += 0.8 + (45.0 if done == 501 else 0.0)
        bar(done, 3000)
    assert "510/3000 1.1 s/step" in stream.getvalue().splitlines()[-1]


def test_usage_errors_read_as_sentences(capsys, tmp_path):
    """Errors the CLI raises itself print the problem and the advice, not a tuple of them."""
    code, _, err = run(capsys, "predict", "--out", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("error: no input series were given. Give files or DICOM folders") and "(None" not in err


def test_the_summary_says_where_each_finding_is(tmp_path, capsys):
    """Each finding's line names its place: the map's host structure and size over 0.5, or where a
    faint map peaks (a probability without a place says so)."""
    pytest.importorskip("torch", reason="torch is an engine dependency")
    from OrthoKneeLib.cli import main
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    series = [str(sample_case_dir() / SAMPLE_VIEWS["sagittal"])]
    assert main(["predict", *series, "--out", str(tmp_path / "o"), "--device", "cpu", "--no-montage"]) == 0
    out = capsys.readouterr().out
    findings = json.loads((tmp_path / "o" / "findings.json").read_text())["findings"]
    for entry in findings.values():
        line = next(x for x in out.splitlines() if x.strip().startswith(entry["name"]))
        assert entry["where"] in line
        assert ("mL" in line) == (entry["map_ml"] >= 0.05), line
