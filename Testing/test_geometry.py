"""One synthetic knee-sized object seen through three differently oriented volumes.

Whatever the orientation, spacing and origin of each view, resampling in physical space
must put the object on the same sagittal voxels, and the LPS->RAS conversion must agree
with Slicer's own reading of the file.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from OrthoKneeLib.volumes import (
    Case,
    Volume,
    VolumeSource,
    detect_plane,
    ijk_to_ras,
    load_volume,
    plane_direction,
    reformat,
    resample_like,
)

CENTRE = np.array([12.0, -30.0, 45.0])  # LPS, mm
BUMP = CENTRE + np.array([14.0, 9.0, -11.0])  # an off-centre sphere makes flips visible


def inside_object(points_lps: np.ndarray) -> np.ndarray:
    d = (points_lps - CENTRE) / np.array([22.0, 16.0, 28.0])
    body = (d**2).sum(axis=-1) <= 1.0
    bump = ((points_lps - BUMP) ** 2).sum(axis=-1) <= 8.0**2
    return body | bump


def render(plane: str, spacing, origin, size, flip_rows: bool = False) -> sitk.Image:
    """Binary mask of the object sampled at the voxel centres of a grid in ``plane``."""
    direction = np.asarray(plane_direction(plane)).reshape(3, 3)
    if flip_rows:  # axial stored LAS (left-handed, as the SPL atlas is) instead of LPS
        direction[:, 1] *= -1
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    points = origin + (ijk * np.asarray(spacing)) @ direction.T
    image = sitk.GetImageFromArray(inside_object(points).astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(direction.ravel()))
    return image


def views():
    sag = render("sagittal", (0.5, 0.5, 2.0), CENTRE + np.array([40.0, -50.0, 55.0]), (200, 230, 40))
    cor = render("coronal", (0.7, 0.7, 3.0), CENTRE + np.array([-45.0, -35.0, 60.0]), (130, 170, 24))
    ax = render("axial", (0.6, 0.6, 2.5), CENTRE + np.array([-40.0, 45.0, -40.0]), (140, 150, 32), flip_rows=True)
    return sag, cor, ax


def as_volume(image, name):
    return Volume(image, VolumeSource(name))


def test_planes_are_detected_from_direction_cosines():
    sag, cor, ax = views()
    assert [detect_plane(i) for i in (sag, cor, ax)] == ["sagittal", "coronal", "axial"]
    for image in (sag, cor, ax):  # each view really shows the object
        assert sitk.GetArrayViewFromImage(image).sum() > 1000


def test_oblique_threshold():
    sag, _, _ = views()
    tilted = sitk.Image(sag)
    for degrees, expected in ((15, "sagittal"), (40, "oblique")):
        t = np.radians(degrees)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        tilted.SetDirection(tuple((rot @ np.asarray(sag.GetDirection()).reshape(3, 3)).ravel()))
        assert detect_plane(tilted) == expected


def _band(mask: sitk.Image, radius_vox) -> np.ndarray:
    """Voxels within ``radius_vox`` (per axis) of the mask's boundary."""
    radius = [int(r) for r in radius_vox]
    dilated = sitk.BinaryDilate(mask, radius)
    eroded = sitk.BinaryErode(mask, radius)
    return sitk.GetArrayFromImage(dilated).astype(bool) & ~sitk.GetArrayFromImage(eroded).astype(bool)


@pytest.mark.parametrize("index", [1, 2], ids=["coronal", "axial"])
def test_views_land_on_the_same_sagittal_voxels(index):
    sag, *others = views()
    moving = others[index - 1]
    on_sag = resample_like(moving, sag, kind="label")
    a = sitk.GetArrayFromImage(sag).astype(bool)
    b = sitk.GetArrayFromImage(on_sag).astype(bool)
    # "Within one voxel": one voxel of the coarser (moving) grid, in sagittal voxels.
    radius = np.ceil(max(moving.GetSpacing()) / np.asarray(sag.GetSpacing()))
    disagree = a ^ b
    assert disagree.sum() > 0  # the grids differ, so some boundary voxels must differ
    assert not (disagree & ~_band(sag, radius)).any()
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.9
    # centroids agree to a fraction of a voxel
    ca = np.argwhere(a).mean(axis=0)[::-1] * sag.GetSpacing()
    cb = np.argwhere(b).mean(axis=0)[::-1] * sag.GetSpacing()
    assert np.linalg.norm(ca - cb) < min(sag.GetSpacing()) * 2


def test_index_axes_alone_would_be_wrong():
    """Guard against a test that passes vacuously: copying arrays by index misplaces the object."""
    sag, cor, _ = views()
    a = sitk.GetArrayFromImage(sag).astype(bool)
    naive = np.zeros_like(a)
    c = sitk.GetArrayFromImage(cor).astype(bool)
    s = tuple(min(x, y) for x, y in zip(a.shape, c.shape))
    naive[: s[0], : s[1], : s[2]] = c[: s[0], : s[1], : s[2]]
    dice = 2 * (a & naive).sum() / (a.sum() + naive.sum())
    assert dice < 0.5


def test_case_resamples_views_onto_the_sagittal_reference():
    sag, cor, ax = views()
    case = Case(as_volume(sag, "sag.nrrd"), as_volume(cor, "cor.nrrd"), as_volume(ax, "ax.nrrd"))
    assert case.reference_plane == "sagittal"
    on_ref = case.on_reference_grid("axial", kind="label")
    assert on_ref.GetSize() == sag.GetSize()
    assert on_ref.GetOrigin() == sag.GetOrigin()


def test_reference_falls_back_when_sagittal_is_missing():
    _, cor, ax = views()
    case = Case(coronal=as_volume(cor, "cor.nrrd"), axial=as_volume(ax, "ax.nrrd"))
    assert case.reference_plane == "coronal"


def test_ras_is_lps_with_x_and_y_flipped():
    sag, _, _ = views()
    mask = sitk.GetArrayFromImage(sag).astype(bool)
    k, j, i = np.argwhere(mask).mean(axis=0)
    lps = np.asarray(sag.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))))
    ras = ijk_to_ras(sag) @ np.array([i, j, k, 1.0])
    assert np.allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-6)


def _ras_of_object_voxels(matrix: np.ndarray, array_kji: np.ndarray) -> np.ndarray:
    kji = np.argwhere(array_kji > 0)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    ras = (ijk1 @ matrix.T)[:, :3]
    return ras[np.lexsort(np.round(ras, 3).T)]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["sagittal", "coronal", "axial"])
def test_ijk_to_ras_agrees_with_slicers_reading_of_the_file(tmp_path, index):
    """Real MRML (slicer-core) reading the file puts every object voxel where we do, in RAS.

    Slicer reads a left-handed file (the LAS axial here) with its slices reversed and the k
    column negated: the same physical mapping with another array layout. So the check is
    physical: the RAS positions of the object's voxels, not the matrices, must agree.
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test dependencies")
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    image = views()[index]
    path = tmp_path / "view.nrrd"
    sitk.WriteImage(image, str(path))
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    slicer_matrix = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    dims = node.GetImageData().GetDimensions()
    slicer_array = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])

    ours = load_volume(path).image
    expected = _ras_of_object_voxels(ijk_to_ras(ours), sitk.GetArrayFromImage(ours))
    seen = _ras_of_object_voxels(slicer_matrix, slicer_array)
    assert expected.shape == seen.shape and len(expected) > 1000
    assert np.allclose(expected, seen, atol=1e-3)


def test_reformat_keeps_the_object_in_place():
    sag, _, _ = views()
    cor = reformat(sitk.Cast(sag, sitk.sitkFloat32) * 100.0, "coronal", in_plane_spacing=0.8, slice_thickness=3.0)
    assert detect_plane(cor) == "coronal"
    assert cor.GetSpacing()[2] == pytest.approx(3.0)
    back = resample_like(cor, sag, kind="linear") > 50
    a = sitk.GetArrayFromImage(sag).astype(bool)
    b = sitk.GetArrayFromImage(back).astype(bool)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.9
    radius = np.ceil(3.0 / np.asarray(sag.GetSpacing()))
    assert not ((a ^ b) & ~_band(sag, radius)).any()


def test_reformat_slab_is_the_mean_over_its_thickness():
    """A thin bright sheet is spread over the slab(s) it falls in, its integral kept."""
    size = (40, 40, 80)
    array = np.zeros(size[::-1], dtype=np.float32)
    array[40, :, :] = 1000.0  # one 0.5 mm axial sheet at z index 40
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 0.5))
    image.SetDirection(plane_direction("axial"))
    slab = sitk.GetArrayFromImage(reformat(image, "axial", 1.0, 4.0, subsamples=40))
    profile = slab[:, 20, 20]
    # integral through the slabs (value x 4 mm) equals the sheet's (1000 x 0.5 mm)
    assert profile.sum() * 4.0 == pytest.approx(1000.0 * 0.5, rel=0.1)
    # a nearest-slice reformat would show the full 1000 or nothing
    assert profile.max() <= 1000.0 * 0.5 / 4.0 * 1.2
