"""Bad and hostile input: no code execution, no silent wrong answer, no traceback.

Each case asserts the exit code, that the message is one line naming what is wrong (no
traceback), and what is left on disk. The code-execution cases plant real pickle payloads:
a payload that ran would create its marker file.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, make_image

from OrthoKneeLib.bundle import Bundle, BundleError
from OrthoKneeLib.cli import main
from OrthoKneeLib.errors import InputError, OrthoKneeError
from OrthoKneeLib.featurecache import load_cached_array
from OrthoKneeLib.io import write_json_atomic
from OrthoKneeLib.outfolder import STAGING_PREFIX, locked_folder, staged_files
from OrthoKneeLib.volumes import Case, Volume, VolumeSource, load_volume

torch = pytest.importorskip("torch", reason="torch is an engine dependency")

DEMO = REPO / "Resources" / "Models" / "orthoknee-demo"
SAMPLE = REPO / "Resources" / "SampleData"
ORTHOKNEE = [sys.executable, "-m", "OrthoKneeLib.cli"]


# ------------------------------------------------------------------------------ helpers


def run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``orthoknee ARGV`` in this process; any other exception fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(err: str, *words: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in err.lower(), (w, err)


def knee_like(shape=(12, 40, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, j, i = np.indices(shape)
    blob = 800 * np.exp(-((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2) / (2 * (shape[1] / 4) ** 2))
    return (blob + 100 + rng.random(shape) * 50).astype(np.float32)


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 3.0)) -> Path:
    image = make_image(array, spacing=spacing)
    sitk.WriteImage(image, str(path))
    return path


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------ code execution


def test_a_planted_pretrain_checkpoint_does_not_run(tmp_path):
    from conftest import tiny_view

    from OrthoKneeLib.model.diffusion import PretrainConfig, pretrain

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "bundle" / "checkpoints" / "backbone_sagittal.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": Payload(marker), "step": 1}, checkpoint)
    with pytest.raises(InputError) as info:
        pretrain(
            tiny_view("sagittal"),
            None,
            checkpoint,
            PretrainConfig(steps=1, batch_size=1),
            device="cpu",
            volumes=[knee_like((16, 40, 40))],
        )
    assert not marker.exists()
    assert str(checkpoint) in str(info.value) and "\n" not in str(info.value)


def test_a_planted_finetune_checkpoint_does_not_run(pipeline, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "heads"
    torch.save({"fingerprint": Payload(marker)}, str(out) + ".checkpoint.pt")
    code, err = run(
        [
            "finetune",
            "--bundle",
            pipeline["base"].path,
            "--cases",
            pipeline["root"] / "cases",
            "--out",
            out,
            "--steps",
            "2",
            "--cache",
            pipeline["root"] / "cache",
            "--validation-cases",
            "0",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and not marker.exists()
    messages = [line for line in err.splitlines() if not line.startswith("features [")]  # progress aside
    assert_one_line("\n".join(messages), "checkpoint.pt", "not a plain", "could run code")


@pytest.mark.parametrize("part", ["heads", "sagittal"])
def test_planted_bundle_weights_do_not_run(tmp_path, part):
    from OrthoKneeLib.bundle import file_sha256

    marker = tmp_path / "pwned"
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    entry = meta["heads"] if part == "heads" else meta["views"][part]
    torch.save({"w": Payload(marker)}, bundle / entry["weights"])
    entry["sha256"] = file_sha256(bundle / entry["weights"])  # the attacker also fixes the checksum
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as info:
        if part == "heads":
            from OrthoKneeLib.predict import Predictor

            Predictor(bundle, device="cpu")  # loads the heads at once
        else:
            Bundle.open(bundle).load_backbone(part)  # what predict does per view
    assert not marker.exists()
    assert "plain weights" in str(info.value)


def test_a_planted_feature_cache_array_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "entry" / "features_sagittal.npy"
    path.parent.mkdir()
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(OrthoKneeError) as info:
        load_cached_array(path)
    assert not marker.exists() and "not a plain array" in str(info.value)


def test_bundle_weights_outside_the_bundle_are_refused(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["heads"]["weights"] = "../../elsewhere/heads.pt"
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as info:
        Bundle.open(bundle)
    assert "outside" in str(info.value)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.update(views=[]), "'views'"),
        (lambda m: m["views"]["sagittal"].update(sha256=42), "sha256"),
        (lambda m: m["features"].update(timesteps={"sagittal": ["fifty"]}), "timesteps"),
        (lambda m: m["views"]["sagittal"]["model"].update(patch=[-64, 64, 16]), "not positive"),
        (lambda m: m.update(catalog={"structures": 3}), "catalog"),
        (lambda m: m.update(version=None), "'version'"),
    ],
)
def test_malformed_metadata_values_are_named(tmp_path, capsys, edit, words):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    edit(meta)
    (bundle / "metadata.json").write_text(json.dumps(meta))
    code, err = run(["predict", SAMPLE / "dess_sagittal.nrrd", "--bundle", bundle, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert_one_line(err, "metadata.json", words)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ------------------------------------------------------------------------------ silent wrong answers


@pytest.mark.parametrize(
    "name, array, words",
    [
        ("nan.nrrd", np.where(knee_like() > 500, np.nan, knee_like()), "NaN"),
        ("inf.nrrd", np.where(knee_like() > 500, np.inf, knee_like()), "infinite"),
        ("constant.nrrd", np.full((12, 40, 40), 7.0, np.float32), "no contrast"),
        ("huge.nrrd", knee_like().astype(np.float64) * 1e297, "single precision"),
        ("noise.nrrd", np.random.default_rng(0).random((12, 40, 40)).astype(np.float32) * 1000, "noise"),
        ("ct.nrrd", np.where(knee_like() > 300, 40.0, -1000.0).astype(np.float32), "Hounsfield"),
        ("tiny.nrrd", np.ones((1, 1, 1), np.float32), "single slice"),
        ("one-slice.nrrd", knee_like((1, 40, 40)), "single slice"),
    ],
)
def test_bad_voxels_given_positionally_are_refused(tmp_path, capsys, name, array, words):
    path = write(tmp_path / name, array)
    code, err = run(["predict", path, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert_one_line(err, name, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--sagittal", None])
def test_noise_is_refused_however_it_is_given(tmp_path, capsys, flag):
    path = write(tmp_path / "noise.nii.gz", np.random.default_rng(1).normal(size=(12, 40, 40)).astype(np.float32))
    argv = ["predict", *([flag] if flag else []), path, "--out", tmp_path / "out"]
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_line(err, "noise.nii.gz", "uncorrelated")


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_a_truncated_nifti_is_refused_not_zero_filled(tmp_path, capsys, name):
    path = write(tmp_path / name, knee_like())
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    cut = raw[: len(raw) * 2 // 3]
    path.write_bytes(gzip.compress(cut) if name.endswith(".gz") else cut)
    code, err = run(["info", path], capsys)
    assert code == 2
    assert_one_line(err, name, "truncated")


def test_a_corrupt_gzip_nifti_is_refused(tmp_path, capsys):
    path = write(tmp_path / "bad.nii.gz", knee_like())
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = os.urandom(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
    code, err = run(["info", path], capsys)
    assert code == 2
    assert_one_line(err, "bad.nii.gz")


def test_a_nifti_with_zero_spacing_is_refused(tmp_path, capsys):
    path = write(tmp_path / "flat.nii", knee_like())
    data = bytearray(path.read_bytes())
    struct.pack_into("<3f", data, 80, 0.0, 0.0, 0.0)  # pixdim[1..3]
    path.write_bytes(bytes(data))
    code, err = run(["predict", path, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert_one_line(err, "flat.nii", "spacing")


def _dicom_copy(shared_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "dicom"
    shutil.copytree(shared_data / "dess-pykneer", folder)
    return folder


@pytest.mark.shared_data
def test_a_dicom_series_with_a_missing_slice_is_refused(shared_data, tmp_path, capsys):
    folder = _dicom_copy(shared_data, tmp_path)
    files = sorted(folder.glob("*.dcm"))
    files[40].unlink()
    code, err = run(["info", folder], capsys)
    assert code == 2
    assert_one_line(err, "not evenly spaced", files[39].name, files[41].name)


@pytest.mark.shared_data
def test_a_dicom_series_with_a_corrupt_slice_names_the_file(shared_data, tmp_path, capsys):
    folder = _dicom_copy(shared_data, tmp_path)
    bad = sorted(folder.glob("*.dcm"))[30]
    bad.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    code, err = run(["predict", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert_one_line(err, "not evenly spaced", bad.name)


@pytest.mark.shared_data
def test_a_4d_series_in_a_folder_does_not_block_choosing_another(shared_data, tmp_path, capsys):
    import pydicom

    folder = _dicom_copy(shared_data, tmp_path)
    sources = sorted(folder.glob("*.dcm"))[:4]
    uid = pydicom.uid.generate_uid()
    for t in range(2):  # the same four positions twice: a 4D series (two time points)
        for n, f in enumerate(sources):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = uid, 99, "perfusion"
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(folder / f"perf-{t}-{n}.dcm")
    dess = load_volume(folder, series=pydicom.dcmread(sources[0]).SeriesDescription)
    assert dess.size[2] == 80
    with pytest.raises(OrthoKneeError) as info:
        load_volume(folder, series="perfusion")
    assert "4D" in str(info.value)


@pytest.mark.shared_data
def test_a_dicom_series_over_the_voxel_limit_is_refused(shared_data, capsys):
    code, err = run(["info", shared_data / "dess-pykneer", "--max-voxels", "1000"], capsys)
    assert code == 2
    assert_one_line(err, "claims 512x512x80", "--max-voxels")


def test_complex_vector_4d_and_array_views_are_refused_through_the_api(tmp_path):
    complex_image = sitk.GetImageFromArray(knee_like().astype(np.complex64))  # identity direction: axial
    with pytest.raises(OrthoKneeError, match="complex"):
        Case(axial=Volume(complex_image, VolumeSource("complex")))
    vector = sitk.GetImageFromArray(np.stack([knee_like()] * 3, axis=-1), isVector=True)
    with pytest.raises(OrthoKneeError, match="components per voxel"):
        Case(axial=Volume(vector, VolumeSource("vector")))
    with pytest.raises(OrthoKneeError, match="not a Volume"):
        Case(sagittal=knee_like())
    with pytest.raises(OrthoKneeError, match="not a SimpleITK image"):
        Case(sagittal=Volume(knee_like(), VolumeSource("array")))
    four_d = sitk.JoinSeries([make_image(knee_like()), make_image(knee_like(seed=1))])
    sitk.WriteImage(four_d, str(tmp_path / "echoes.nrrd"))
    with pytest.raises(OrthoKneeError, match="--echo"):
        load_volume(tmp_path / "echoes.nrrd")


def test_the_4d_advice_names_an_option_predict_has(tmp_path, capsys):
    four_d = sitk.JoinSeries(
        [make_image(knee_like(), spacing=(1, 1, 3)), make_image(knee_like(seed=1), spacing=(1, 1, 3))]
    )
    sitk.WriteImage(four_d, str(tmp_path / "echoes.nrrd"))
    code, err = run(["predict", "--sagittal", tmp_path / "echoes.nrrd", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--echo" in err
    assert_one_line(err, "echoes.nrrd")
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "--echo" in capsys.readouterr().out


# ------------------------------------------------------------------------------ resource exhaustion


def _header_only_nifti(path: Path, dims) -> Path:
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *dims, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 16, 32)  # float32
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    path.write_bytes(bytes(header) + b"\0" * 672)  # 1 KB in all
    return path


def test_a_header_claiming_10_billion_voxels_is_refused_fast_and_small(tmp_path):
    path = _header_only_nifti(tmp_path / "bomb.nii", (2500, 2000, 2000))
    assert path.stat().st_size == 1024
    # VmHWM, the peak RSS of this process image (getrusage's maxrss would carry over pytest's own across exec)
    probe = (
        "import re, sys, time; from OrthoKneeLib.cli import main; t = time.perf_counter(); "
        f"code = main(['info', {str(path)!r}]); seconds = time.perf_counter() - t; "
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print(code, seconds, hwm, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    *message, figures = done.stderr.strip().splitlines()
    code, seconds, rss_kb = figures.split()
    assert int(code) == 2
    assert_one_line("\n".join(message), "bomb.nii", "10,000,000,000 voxels", "--max-voxels")
    assert float(seconds) < 1.0
    assert int(rss_kb) < 500 * 1024


def test_raising_the_limit_still_checks_the_file_holds_the_voxels(tmp_path, capsys):
    path = _header_only_nifti(tmp_path / "bomb.nii", (2000, 2000, 1000))
    code, err = run(["info", path, "--max-voxels", str(10**10)], capsys)
    assert code == 2
    assert_one_line(err, "bomb.nii", "truncated")


# ------------------------------------------------------------------------------ output folders


def _hold_lock(folder: Path) -> subprocess.Popen:
    script = (
        "import sys, time; from OrthoKneeLib.outfolder import locked_folder\n"
        f"with locked_folder({str(folder)!r}):\n    print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_before_any_compute(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "findings.json").write_text("{}")
    holder = _hold_lock(out)
    try:
        t = time.perf_counter()
        code, err = run(["predict", SAMPLE / "dess_sagittal.nrrd", "--out", out], capsys)
        assert time.perf_counter() - t < 5
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert_one_line(err, "another OrthoKnee run")
    assert files_under(out) == {"findings.json"}


def test_an_interrupted_save_leaves_the_earlier_result_whole(tmp_path):
    out = tmp_path / "out"
    with locked_folder(out), staged_files(out) as stage:
        stage.path("structures.seg.nrrd").write_text("old seg")
        stage.path("findings.json").write_text("old findings")
    with pytest.raises(KeyboardInterrupt):
        with locked_folder(out), staged_files(out) as stage:
            stage.path("structures.seg.nrrd").write_text("new seg")
            raise KeyboardInterrupt  # Ctrl-C between the segmentation and findings.json
    assert (out / "structures.seg.nrrd").read_text() == "old seg"
    assert files_under(out) == {"structures.seg.nrrd", "findings.json"}


def test_a_killed_runs_staging_is_cleared_by_the_next(tmp_path):
    out = tmp_path / "out"
    (out / f"{STAGING_PREFIX}dead").mkdir(parents=True)
    (out / f"{STAGING_PREFIX}dead" / "findings.json").write_text("{}")
    with locked_folder(out):
        pass
    assert files_under(out) == set()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "cancelled"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_run_prints_one_line_and_leaves_nothing(tmp_path, sig, code, word):
    out = tmp_path / "out"
    out.mkdir()
    (out / "findings.json").write_text('{"earlier": true}')
    proc = subprocess.Popen(
        ORTHOKNEE + ["predict", str(SAMPLE / "dess_sagittal.nrrd"), "--out", str(out), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (proc.poll() is None and _started(out)):
        time.sleep(0.2)
    time.sleep(1.5)  # inside the model
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    messages = [line for line in err.replace("\r", "\n").splitlines() if not line.startswith("predict [")]
    assert_one_line("\n".join(messages), word, "discarded")  # the progress bar aside
    assert files_under(out) == {"findings.json"}
    assert json.loads((out / "findings.json").read_text()) == {"earlier": True}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed raise, on purpose
def test_a_signal_whose_exception_was_swallowed_still_stops_the_run():
    """A SIGTERM that lands in a weakref callback (the import machinery's module locks have them)
    raises there, Python prints and drops the exception, and the run went on to write its result
    (seen in CI). The handler remembers the signal; the next progress report raises it again."""
    import io
    import weakref

    from OrthoKneeLib.progress import Terminated, TextProgress, forget_interrupts, interrupt_on_signal

    class Held:
        pass

    held = Held()
    ref = weakref.ref(held, lambda _: interrupt_on_signal(signal.SIGTERM, None))
    try:
        del held  # the callback raises Terminated; Python ignores it ("Exception ignored in ...")
        assert ref() is None
        with pytest.raises(Terminated):
            TextProgress("predict", stream=io.StringIO())(1, 4, "heads")
    finally:
        forget_interrupts()
    TextProgress("predict", stream=io.StringIO())(2, 4, "measurements")  # forgotten: no raise


def _started(out: Path) -> bool:
    """The run holds the folder's lock once it is past its checks."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_out_that_is_a_file_is_refused_before_compute(tmp_path, capsys):
    out = tmp_path / "result.txt"
    out.write_text("mine")
    code, err = run(["predict", SAMPLE / "dess_sagittal.nrrd", "--out", out], capsys)
    assert code == 2
    assert_one_line(err, "result.txt", "is a file")
    assert out.read_text() == "mine"


def test_out_that_cannot_be_written_is_refused_before_compute(tmp_path, capsys):
    code, err = run(["predict", SAMPLE / "dess_sagittal.nrrd", "--out", "/proc/orthoknee-out"], capsys)
    assert code == 2
    assert_one_line(err, "/proc/orthoknee-out", "cannot be written")


def test_json_outputs_are_strict(tmp_path):
    path = write_json_atomic(
        {"auc": float("nan"), "p": [float("inf"), 0.5], "n": np.float32("nan")}, tmp_path / "x.json"
    )

    def refuse(constant):
        raise AssertionError(f"non-JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"auc": None, "p": [None, 0.5], "n": None}


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["reformat", "IN", "--plane", "coronal", "--in-plane", "0", "--thickness", "3", "--out", "o.nrrd"],
            "--in-plane",
        ),
        (
            ["reformat", "IN", "--plane", "coronal", "--in-plane", "1", "--thickness", "-3", "--out", "o.nrrd"],
            "--thickness",
        ),
        (["resample", "IN", "--spacing", "nan", "1", "1", "--out", "o.nrrd"], "--spacing"),
        (
            ["synth", "--labels", "L", "--source", "oai", "--out", "O", "--n", "2", "--work-spacing", "0"],
            "--work-spacing",
        ),
        (["synth", "--labels", "L", "--source", "oai", "--out", "O", "--n", "2", "--prevalence", "2"], "--prevalence"),
        (
            ["synth", "--labels", "L", "--source", "oai", "--out", "O", "--n", "2", "--val-fraction", "1.5"],
            "--val-fraction",
        ),
        (["synth", "--labels", "L", "--source", "oai", "--out", "O", "--n", "2", "--workers", "0"], "--workers"),
        (["synth", "--labels", "L", "--source", "oai", "--out", "O", "--n", "0"], "--n"),
        (["pretrain", "--view", "sagittal", "--data", "D", "--out", "B", "--steps", "0"], "--steps"),
        (["pretrain", "--view", "sagittal", "--data", "D", "--out", "B", "--batch", "0"], "--batch"),
        (["pretrain", "--view", "sagittal", "--data", "D", "--out", "B", "--channels", "0"], "--channels"),
        (["pretrain", "--view", "sagittal", "--data", "D", "--out", "B", "--patch", "-64", "64", "16"], "--patch"),
        (["pretrain", "--view", "sagittal", "--data", "D", "--out", "B", "--lr", "inf"], "--lr"),
        (["finetune", "--bundle", "B", "--cases", "C", "--out", "O", "--label-fraction", "2"], "--label-fraction"),
        (["finetune", "--bundle", "B", "--cases", "C", "--out", "O", "--max-cases", "0"], "--max-cases"),
        (["finetune", "--bundle", "B", "--cases", "C", "--out", "O", "--steps", "ten"], "--steps"),
        (["predict", "X", "--out", "O", "--echo", "0"], "--echo"),
        (["predict", "X", "--out", "O", "--max-voxels", "-1"], "--max-voxels"),
    ],
)
def test_arguments_out_of_range_are_one_line_errors(tmp_path, capsys, argv, words):
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_line(err, words, "--help")
    assert files_under(tmp_path) == set()


def test_the_api_refuses_zero_and_nan_spacing():
    from OrthoKneeLib.volumes import reformat, resample_to_spacing

    image = make_image(knee_like())
    for spacing in ((0, 1, 1), (1, -1, 1), (float("nan"), 1, 1)):
        with pytest.raises(InputError, match="positive"):
            resample_to_spacing(image, spacing)
    with pytest.raises(InputError, match="positive"):
        reformat(image, "coronal", 0.0, 3.0)


def test_reformat_to_a_folder_is_refused_before_reading(tmp_path, capsys):
    code, err = run(
        [
            "reformat",
            tmp_path / "missing.nrrd",
            "--plane",
            "coronal",
            "--in-plane",
            "1",
            "--thickness",
            "3",
            "--out",
            tmp_path,
        ],
        capsys,
    )
    assert code == 2
    assert_one_line(err, "is a folder")


def test_a_brain_like_blob_is_not_read_as_a_knee(tmp_path, capsys):
    """Smooth MR-like contrast passes the image checks; the model's own reading then says no knee."""
    k, j, i = np.indices((40, 128, 128)).astype(np.float32)
    r = np.sqrt(((k - 20) / 16) ** 2 + ((j - 64) / 52) ** 2 + ((i - 64) / 46) ** 2)
    brain = np.where(r < 1, 800 + 300 * np.sin(j / 6) * np.cos(i / 7), 0) + np.where((r >= 1) & (r < 1.08), 1500, 0)
    image = make_image(brain.astype(np.float32), spacing=(1.0, 1.0, 3.0), direction=(0, 0, -1, 1, 0, 0, 0, -1, 0))
    sitk.WriteImage(image, str(tmp_path / "brain.nrrd"))
    code = main(
        ["predict", str(tmp_path / "brain.nrrd"), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-montage"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "does not look like a knee" in out
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert not findings["plausibility"]["knee_found"] and not findings["plausibility"]["plausible"]
    assert findings["knee_side"].get("side") is None
