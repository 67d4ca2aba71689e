"""Meniscus sides from the fibula: medial and lateral by anatomy, in physical space."""

import numpy as np
import pytest

from OrthoKneeLib.labels import DEFAULT_CATALOG
from OrthoKneeLib.model.heads import Grid
from OrthoKneeLib.postprocess import assign_meniscus_sides, knee_side, labelmap_from_probabilities

L = {k: DEFAULT_CATALOG.structure(k).label for k in DEFAULT_CATALOG.structure_keys}
N_CLASSES = len(DEFAULT_CATALOG.structures) + 1


def _knee(fibula_at_high_i: bool = True, with_fibula: bool = True) -> np.ndarray:
    """(k, j, i) labels at 1 mm: a tibia across i 20-60, menisci at i 22-34 and 46-58, both
    labelled "lateral" (what the heads did on a right knee), a fibula beyond one end."""
    labels = np.zeros((10, 20, 80), np.uint8)
    labels[:, 10:20, 20:60] = L["tibia"]
    labels[2:8, 7:9, 22:34] = L["lateral_meniscus"]
    labels[2:8, 7:9, 46:58] = L["lateral_meniscus"]
    if with_fibula:
        i0 = 64 if fibula_at_high_i else 8
        labels[:, 14:20, i0 : i0 + 8] = L["fibula"]
    return labels


def _probabilities(labels: np.ndarray) -> np.ndarray:
    p = np.full((N_CLASSES, *labels.shape), 0.02, np.float32)
    p[(labels, *np.indices(labels.shape))] = 0.8
    return p / p.sum(0, keepdims=True)


def _grid(labels: np.ndarray, x_sign: float = 1.0) -> Grid:
    direction = (x_sign, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return Grid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), direction, labels.shape[::-1])


@pytest.mark.parametrize("x_sign, side", [(1.0, "left"), (-1.0, "right")])
def test_the_meniscus_on_the_fibula_side_is_lateral_in_either_knee(x_sign, side):
    labels = _knee(fibula_at_high_i=True)
    grid = _grid(labels, x_sign)  # i runs toward the patient's left (+1) or right (-1)
    probabilities, found = assign_meniscus_sides(_probabilities(labels), grid, DEFAULT_CATALOG)
    assert found.side == side and "fibula" in found.reason
    labelmap = labelmap_from_probabilities(probabilities, DEFAULT_CATALOG)
    near_fibula, far = labelmap[2:8, 7:9, 46:58], labelmap[2:8, 7:9, 22:34]
    assert (near_fibula == L["lateral_meniscus"]).all() and (far == L["medial_meniscus"]).all()
    # nothing else moved, and each voxel's probabilities still sum to one
    other = ~np.isin(labels, [L["lateral_meniscus"]])
    assert np.array_equal(labelmap[other], labels[other])
    assert np.allclose(probabilities.sum(0), 1, atol=1e-5)


def test_the_side_follows_the_fibula_not_the_array_axis():
    labels = _knee(fibula_at_high_i=False)  # fibula beside the low-i end: that meniscus is lateral
    probabilities, found = assign_meniscus_sides(_probabilities(labels), _grid(labels), DEFAULT_CATALOG)
    assert found.side == "right"
    labelmap = probabilities.argmax(0)
    assert (labelmap[2:8, 7:9, 22:34] == L["lateral_meniscus"]).all()
    assert (labelmap[2:8, 7:9, 46:58] == L["medial_meniscus"]).all()


def test_without_a_fibula_the_menisci_are_left_as_labelled():
    labels = _knee(with_fibula=False)
    before = _probabilities(labels)
    after, found = assign_meniscus_sides(before.copy(), _grid(labels), DEFAULT_CATALOG)
    assert found.side is None and "fibula" in found.reason
    assert np.array_equal(after, before)
    assert knee_side(labels, _grid(labels), DEFAULT_CATALOG).side is None


def test_a_single_meniscus_is_not_cut_in_two():
    labels = _knee()
    labels[labels == L["lateral_meniscus"]] = 0
    # only the meniscus beside the fibula was found, reaching a little past the tibia's centre
    # (i = 39.5): two-means alone would split it near its own middle
    labels[2:8, 7:9, 37:65] = L["lateral_meniscus"]
    probabilities, found = assign_meniscus_sides(_probabilities(labels), _grid(labels), DEFAULT_CATALOG)
    labelmap = probabilities.argmax(0)
    assert found.side == "left"
    assert (labelmap[2:8, 7:9, 40:65] == L["lateral_meniscus"]).all()
    assert (labelmap == L["medial_meniscus"]).sum() <= 3 * 6 * 2  # at most the part across the centre


# ------------------------------------------------------------------ the side a DICOM header states


def test_the_header_side_is_checked_against_the_anatomy():
    from OrthoKneeLib.postprocess import KneeSide, with_tagged_side

    anatomy = KneeSide("right", "the fibula lies 24 mm to the patient's right of the tibia", -1)
    assert with_tagged_side(anatomy, None) == anatomy
    agreed = with_tagged_side(anatomy, "right")
    assert agreed.side == "right" and "DICOM Laterality" in agreed.reason and agreed.warning is None
    disagreed = with_tagged_side(anatomy, "left")
    assert disagreed.side == "right" and disagreed.lateral_sign == -1  # the anatomy wins, with a warning
    assert "says left" in disagreed.warning and "right knee" in disagreed.warning
    unknown = KneeSide(None, "no tibia and fibula were found to tell the knee's side")
    taken = with_tagged_side(unknown, "left")
    assert (taken.side, taken.lateral_sign, taken.warning) == ("left", 1, None) and "says left" in taken.reason


def test_without_a_fibula_the_header_side_splits_the_menisci():
    labels = _knee(with_fibula=False)  # menisci at i 22-34 and 46-58, i toward the patient's left
    probabilities, found = assign_meniscus_sides(_probabilities(labels), _grid(labels), DEFAULT_CATALOG, tagged="right")
    assert found.side == "right" and "DICOM" in found.reason
    labelmap = probabilities.argmax(0)  # a right knee: lateral is toward the patient's right (low i)
    assert (labelmap[2:8, 7:9, 22:34] == L["lateral_meniscus"]).all()
    assert (labelmap[2:8, 7:9, 46:58] == L["medial_meniscus"]).all()


def test_a_case_reports_the_side_its_series_state_and_warns_when_they_disagree(write_volume):
    from OrthoKneeLib.volumes import Case, load_volume

    def view(name, direction, side):
        array = np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16)
        volume = load_volume(write_volume(name, array, direction=direction))
        volume.source.laterality = side
        return volume

    sagittal, coronal = (0, 0, 1, 1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, 1, 0, 1, 0)
    agreed = Case(sagittal=view("s.nrrd", sagittal, "left"), coronal=view("c.nrrd", coronal, None))
    assert agreed.laterality == "left" and not agreed.warnings and agreed.describe()["laterality"] == "left"
    mixed = Case(sagittal=view("s2.nrrd", sagittal, "left"), coronal=view("c2.nrrd", coronal, "right"))
    assert mixed.laterality is None
    assert any("disagree on the knee's side" in w and "coronal series says right" in w for w in mixed.warnings)


def _femur_with_cartilage() -> np.ndarray:
    """(k, j, i) labels at 1 x 1 x 3 mm (i, j, k): a femur, a cartilage plate on it, a second
    piece of plate 4 mm off the bone (voxel centres), and an island about 24 mm away."""
    labels = np.zeros((12, 40, 80), np.uint8)
    labels[:, 0:20, 10:50] = L["femur"]
    labels[:4, 20:23, 10:50] = L["femoral_cartilage"]  # on the bone
    labels[6:, 23:26, 10:50] = L["femoral_cartilage"]  # 4 mm off it, in other slices than the first piece
    labels[5:7, 30:33, 70:76] = L["femoral_cartilage"]  # 21 mm beyond the bone's end, 11 mm below it
    return labels


def test_cartilage_off_its_bone_is_removed_and_the_pieces_on_it_are_kept():
    from OrthoKneeLib.postprocess import MAX_CARTILAGE_GAP_MM, drop_detached_cartilage

    labels = _femur_with_cartilage()
    spacing_ijk = (1.0, 1.0, 3.0)
    cleaned = drop_detached_cartilage(labels, spacing_ijk, DEFAULT_CATALOG)
    assert (cleaned[5:7, 30:33, 70:76] == 0).all()  # the island went to background
    assert np.array_equal(cleaned[:, :26, :], labels[:, :26, :])  # the plate's two pieces and the bone stay
    # the gap is measured in mm: the piece 4 mm off goes once the allowed gap is below 4 mm
    tight = drop_detached_cartilage(labels, spacing_ijk, DEFAULT_CATALOG, max_gap_mm=3.5)
    assert (tight[6:, 23:26, 10:50] == 0).all() and (tight[:4, 20:23, 10:50] == L["femoral_cartilage"]).all()
    assert MAX_CARTILAGE_GAP_MM >= 4.0
    # the same rule runs in the labelmap a reader gets, given the spacing
    from_probabilities = labelmap_from_probabilities(_probabilities(labels), DEFAULT_CATALOG, spacing_ijk=spacing_ijk)
    assert np.array_equal(from_probabilities, cleaned)


def test_cartilage_is_kept_when_its_bone_was_not_found():
    from OrthoKneeLib.postprocess import drop_detached_cartilage

    labels = _femur_with_cartilage()
    labels[labels == L["femur"]] = 0
    assert np.array_equal(drop_detached_cartilage(labels, (1.0, 1.0, 3.0), DEFAULT_CATALOG), labels)
