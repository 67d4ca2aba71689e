"""Findings on their anatomy: a finding's map cannot leave its host, on a built case and on the
shipped real sample (predicted with the shipped bundle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from OrthoKneeLib.gating import HOSTS, case_score_from_map, finding_hosts, gate_maps, host_masks
from OrthoKneeLib.labels import DEFAULT_CATALOG
from OrthoKneeLib.model.heads import Grid

L = {s.key: s.label for s in DEFAULT_CATALOG.structures}
GRID = Grid(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), size=(40, 40, 60))


def _probs(labels: np.ndarray) -> np.ndarray:
    p = np.zeros((len(DEFAULT_CATALOG.structures) + 1, *labels.shape), np.float32)
    for value in range(p.shape[0]):
        p[value] = labels == value
    return p


def _knee() -> np.ndarray:
    a = np.zeros((60, 40, 40), np.uint8)  # k = z (superior), j = y (posterior), i = x
    a[35:55, 10:30, 5:35] = L["femur"]
    a[33:35, 10:30, 5:35] = L["femoral_cartilage"]
    a[10:30, 10:30, 5:35] = L["tibia"]
    a[30:31, 10:30, 5:35] = L["tibial_cartilage"]
    a[31:33, 12:28, 6:12] = L["medial_meniscus"]
    a[31:33, 12:28, 28:34] = L["lateral_meniscus"]
    a[38:50, 2:8, 12:28] = L["patella"]
    a[31:33, 18:20, 19:21] = L["acl"]
    a[31:33, 24:26, 17:19] = L["pcl"]
    return a


def test_a_map_cannot_leave_its_host():
    labels = _knee()
    probs = _probs(labels)
    everywhere = {f.key: np.full(labels.shape, 0.9, np.float32) for f in DEFAULT_CATALOG.findings}
    gated = gate_maps(everywhere, probs, GRID, DEFAULT_CATALOG)
    hosts = host_masks(probs, GRID, DEFAULT_CATALOG)
    for key, structures in HOSTS.items():
        host = np.isin(labels, [L[s] for s in structures if s in L])
        widened = sitk.GetArrayFromImage(  # 2 mm along each axis (a box), as the gating widens
            sitk.BinaryDilate(sitk.GetImageFromArray(host.astype(np.uint8)), [2, 2, 2], sitk.sitkBox)
        )
        assert gated[key].max() == pytest.approx(0.9), key
        assert not (gated[key][widened == 0] > 0).any(), f"{key} left its host"
    bone = np.isin(labels, [L["femur"], L["tibia"], L["patella"]])
    inner_bone = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(bone.astype(np.uint8)), [3, 3, 3])) > 0
    for key in ("joint_effusion", "collateral_ligament_injury"):  # soft-tissue findings stay out of bone
        assert gated[key].max() > 0.5, key
        assert not (gated[key][inner_bone] > 0).any(), key
    assert set(hosts) == {f.key for f in DEFAULT_CATALOG.findings}


def test_the_heads_hosts_are_not_widened_and_follow_the_catalogs_findings():
    """The finding head's attention reads hosts as the segmentation gives them (on its 3-mm
    cells a widening by one cell took in the soft tissue around every bone), one per finding in
    the catalog's order; a finding an annotator added has no known host and is open everywhere."""
    labels = _knee()
    probs = _probs(labels)
    hosts = finding_hosts(probs, GRID, DEFAULT_CATALOG)
    keys = DEFAULT_CATALOG.finding_keys
    assert hosts.shape == (len(keys), *labels.shape)
    for key, structures in HOSTS.items():
        host = np.isin(labels, [L[s] for s in structures if s in L])
        assert np.array_equal(hosts[keys.index(key)] > 0.5, host), key
    grown = DEFAULT_CATALOG.with_findings(["popliteal cyst"])
    extra = finding_hosts(probs, GRID, grown)
    assert extra.shape[0] == len(keys) + 1 and (extra[-1] == 1).all()


def test_the_case_score_is_the_level_over_005_ml():
    m = np.zeros((60, 40, 40), np.float32)
    m.flat[:49] = 0.8  # 49 voxels of 1 mm^3: less than 0.05 mL
    assert case_score_from_map(m, GRID) == 0.0
    m.flat[:50] = 0.8
    assert case_score_from_map(m, GRID) == pytest.approx(0.8)


@pytest.fixture(scope="module")
def sample_output(tmp_path_factory):
    from OrthoKneeLib.cli import main
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    pytest.importorskip("torch", reason="torch is an engine dependency")
    out = tmp_path_factory.mktemp("gating") / "out"
    series = [str(sample_case_dir() / name) for name in SAMPLE_VIEWS.values()]
    assert main(["predict", *series, "--out", str(out), "--device", "cpu", "--no-montage"]) == 0
    return out


def test_on_the_real_sample_each_overlay_lies_on_its_host_and_a_score_without_a_place_is_flagged(sample_output):
    findings = json.loads((sample_output / "findings.json").read_text())["findings"]
    labels_image = sitk.ReadImage(str(sample_output / "structures.seg.nrrd"))
    for key, structures in HOSTS.items():
        host = np.isin(sitk.GetArrayFromImage(labels_image), [L[s] for s in structures])
        host_image = sitk.GetImageFromArray(host.astype(np.uint8))
        host_image.CopyInformation(labels_image)
        radius = [max(1, int(round(2.0 / s))) for s in labels_image.GetSpacing()]
        widened = sitk.BinaryDilate(host_image, radius, sitk.sitkBox)
        overlay = sitk.ReadImage(str(sample_output / "overlays" / f"{key}.nrrd"))
        on_overlay = sitk.GetArrayFromImage(sitk.Resample(widened, overlay, sitk.Transform(), sitk.sitkNearestNeighbor))
        values = sitk.GetArrayFromImage(overlay)
        above = values > 0.5
        if above.any():
            assert on_overlay[above].mean() >= 0.9, f"{key}: {on_overlay[above].mean():.2f} of its map on its host"
    summary = json.loads((sample_output / "findings.json").read_text())
    for key, f in findings.items():
        overlay = sitk.ReadImage(str(sample_output / "overlays" / f"{key}.nrrd"))
        ml = float((sitk.GetArrayFromImage(overlay) > 0.5).sum() * np.prod(overlay.GetSpacing()) / 1000)
        if f["probability"] >= 0.5 and ml < 0.05:  # a score without a place is never shown silently
            assert any(f["name"] in w and "without a place" in w for w in summary["warnings"]), (key, ml)
        assert f["where"]
