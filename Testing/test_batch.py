"""Batch prediction over a folder of cases, in this process and on a real Dask LocalCluster,
and the DICOM Segmentation written for DICOM inputs (read back with highdicom)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from OrthoKneeLib.cli import main
from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir
from OrthoKneeLib.volumes import resample_to_spacing

pytest.importorskip("torch", reason="torch is an engine dependency")

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def cases(tmp_path_factory, shared_data) -> Path:
    """Two good cases (the sample's three series at 1 mm in plane; the real DESS DICOM series at its
    native 512 x 512 x 80),
    one with a corrupt file, one with only the sagittal series."""
    root = tmp_path_factory.mktemp("batch") / "cases"
    sample = sample_case_dir()
    for name in ("a-sample", "c-corrupt", "d-partial"):
        (root / name).mkdir(parents=True)
    for plane, file in SAMPLE_VIEWS.items():
        image = sitk.ReadImage(str(sample / file))
        spacing = (1.0, 1.0, image.GetSpacing()[2])
        sitk.WriteImage(resample_to_spacing(image, spacing), str(root / "a-sample" / f"{plane}.nrrd"))
    shutil.copytree(shared_data / "dess-pykneer", root / "b-dicom")
    shutil.copy(root / "a-sample" / "sagittal.nrrd", root / "d-partial" / "sagittal.nrrd")
    shutil.copy(root / "a-sample" / "sagittal.nrrd", root / "c-corrupt" / "sagittal.nrrd")
    (root / "c-corrupt" / "coronal.nii.gz").write_bytes(b"not an image at all" * 50)
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def first_run(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch-out") / "results"
    code = main(["predict", "--batch", str(cases), "--out", str(out), "--device", "cpu", "--dicom-seg"])
    return code, out


def test_a_batch_finishes_the_good_cases_and_reports_the_bad_one(first_run, cases):
    code, out = first_run
    assert code == 1  # one case failed
    rows = _rows(out)
    assert set(rows) == {"a-sample", "b-dicom", "c-corrupt", "d-partial"}
    assert rows["a-sample"]["status"] == rows["b-dicom"]["status"] == "done"
    assert rows["d-partial"]["status"] == "done" and "no coronal or axial series" in rows["d-partial"]["warnings"]
    assert rows["c-corrupt"]["status"] == "failed"
    assert "coronal.nii.gz" in rows["c-corrupt"]["reason"] and "not a readable image" in rows["c-corrupt"]["reason"]
    assert not (out / "c-corrupt" / "findings.json").exists()
    for case in ("a-sample", "b-dicom", "d-partial"):
        findings = json.loads((out / case / "findings.json").read_text())
        assert len(findings["findings"]) == 8
        assert float(rows[case]["p_joint_effusion"]) == findings["findings"]["joint_effusion"]["probability"]
        assert (out / case / "montage.png").is_file()


def test_a_rerun_skips_what_is_done(first_run, cases, capsys):
    _, out = first_run
    before = {c: (out / c / "findings.json").stat().st_mtime_ns for c in ("a-sample", "b-dicom", "d-partial")}
    code, stdout, _ = _run(["predict", "--batch", cases, "--out", out, "--device", "cpu", "--dicom-seg"], capsys)
    assert code == 1
    rows = _rows(out)
    assert {c: rows[c]["status"] for c in before} == {c: "skipped" for c in before}
    assert {c: (out / c / "findings.json").stat().st_mtime_ns for c in before} == before
    assert "failed: c-corrupt:" in stdout and "3 already done (skipped)" in stdout


def test_a_dask_local_cluster_gives_identical_outputs(first_run, cases, tmp_path, capsys):
    _, out = first_run
    dask_out = tmp_path / "dask"
    code, stdout, _ = _run(["predict", "--batch", cases, "--out", dask_out, "--workers", "2", "--dicom-seg"], capsys)
    assert code == 1
    assert {c: r["status"] for c, r in _rows(dask_out).items()} == {
        "a-sample": "done",
        "b-dicom": "done",
        "c-corrupt": "failed",
        "d-partial": "done",
    }
    for case in ("a-sample", "b-dicom", "d-partial"):
        here = json.loads((out / case / "findings.json").read_text())["findings"]
        there = json.loads((dask_out / case / "findings.json").read_text())["findings"]
        assert {k: v["probability"] for k, v in here.items()} == pytest.approx(
            {k: v["probability"] for k, v in there.items()}, abs=1e-3
        )
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / "structures.seg.nrrd")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(dask_out / case / "structures.seg.nrrd")))
        assert np.mean(a != b) < 1e-4, case  # the same labels (thread counts may move a tie)


def test_the_dicom_seg_reads_back_with_its_segments_and_source(first_run, shared_data, capsys):
    import highdicom as hd
    import pydicom

    _, out = first_run
    path = out / "b-dicom" / "structures.seg.dcm"
    seg = hd.seg.segread(path)
    source = next((shared_data / "dess-pykneer").glob("*.dcm"))
    source_uid = pydicom.dcmread(source, stop_before_pixels=True).SeriesInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [source_uid]
    assert len(seg.SegmentSequence) == 11
    assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (512, 512, 80 * 11)  # the native grid, every slice
    assert {d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator for d in seg.SegmentSequence} == {"SCT"}
    femur = next(d for d in seg.SegmentSequence if d.SegmentLabel == "Femur")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "b-dicom" / "structures.seg.nrrd")))
    mask = seg.get_volume(segment_numbers=[int(femur.SegmentNumber)]).array if hasattr(seg, "get_volume") else None
    if mask is not None:  # the voxels agree with the NRRD segmentation
        assert int(np.asarray(mask).sum()) == int((labels == 1).sum())
    code, stdout, _ = _run(["info", path], capsys)
    assert code == 0 and "11 segments" in stdout and "Femur" in stdout and source_uid in stdout
    assert not (out / "a-sample" / "structures.seg.dcm").exists()  # NRRD inputs: nothing to reference


def test_batch_refuses_options_for_one_case(cases, tmp_path, capsys):
    code, _, err = _run(["predict", "--batch", cases, "--out", tmp_path / "o", "--series", "3"], capsys)
    assert code == 2 and "--series" in err
    code, _, err = _run(["predict", cases / "a-sample", "--out", tmp_path / "o", "--workers", "2"], capsys)
    assert code == 2 and "--batch" in err


def test_a_volume_nodes_dicom_files_are_put_in_slice_order_for_its_seg(first_run, shared_data, tmp_path):
    """The Slicer module's DICOM SEG export: the reference node's instance files come from the DICOM
    database in any order; they are ordered as the volume's slices, and an edited labelmap written
    against them reads back on the same slices."""
    import random

    import highdicom as hd

    from OrthoKneeLib.dicomseg import datasets_in_slice_order, write_dicom_seg
    from OrthoKneeLib.errors import OrthoKneeError
    from OrthoKneeLib.results import load_prediction
    from OrthoKneeLib.volumes import load_volume

    _, out = first_run
    files = sorted((shared_data / "dess-pykneer").glob("*.dcm"))
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    image = load_volume(shared_data / "dess-pykneer").image
    ordered = datasets_in_slice_order(shuffled, image)
    firsts = [image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(image.GetSize()[2])]
    assert np.allclose([[float(v) for v in ds.ImagePositionPatient] for ds in ordered], firsts, atol=1e-3)
    prediction = load_prediction(out / "b-dicom")
    prediction.labelmap = prediction.labelmap.copy()
    prediction.labelmap[40:42] = 0  # the annotator erased two slices
    path = write_dicom_seg(prediction, ordered, tmp_path / "edited.seg.dcm")
    seg = hd.seg.segread(path)
    femur = next(d for d in seg.SegmentSequence if d.SegmentLabel == "Femur")
    if hasattr(seg, "get_volume"):
        mask = np.asarray(seg.get_volume(segment_numbers=[int(femur.SegmentNumber)]).array)
        assert int(mask.sum()) == int((prediction.labelmap == 1).sum())
    with pytest.raises(OrthoKneeError, match="distinct slices"):
        datasets_in_slice_order(shuffled[:-1], image)
