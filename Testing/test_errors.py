"""Every bad input gets its own error type and a message naming the file at fault."""

import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image

from OrthoKneeLib.errors import (
    AmbiguousSeriesError,
    DuplicatePlaneError,
    EchoChoiceRequiredError,
    EmptyVolumeError,
    ImageDimensionError,
    InvalidVoxelsError,
    MissingFileError,
    NoOverlapError,
    OrthoKneeError,
    UnreadableFileError,
)
from OrthoKneeLib.volumes import Case, load_volume, plane_direction


def knee_like(shape=(20, 30, 30), seed=0):
    """Smooth anatomy-like contrast (a bright blob) plus a little noise: passes the not-a-knee check."""
    rng = np.random.default_rng(seed)
    _, j, i = np.indices(shape)
    blob = 800 * np.exp(-((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2) / (2 * (shape[1] / 4) ** 2))
    return (blob + 100 + rng.random(shape) * 50).astype(np.int16)


def assert_names(error: pytest.ExceptionInfo, path) -> None:
    assert isinstance(error.value, OrthoKneeError)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(MissingFileError) as info:
        load_volume(path)
    assert_names(info, path)


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nrrd", "broken.mha"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image\x00\x01" * 10)
    with pytest.raises(UnreadableFileError) as info:
        load_volume(path)
    assert_names(info, path)


def test_truncated_file(tmp_path, write_volume):
    path = write_volume("cut.nrrd", knee_like())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError) as info:
        load_volume(path)
    assert_names(info, path)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    with pytest.raises(UnreadableFileError) as info:
        load_volume(tmp_path)
    assert_names(info, tmp_path)


@pytest.mark.shared_data
def test_folder_with_several_series_and_none_chosen(tmp_path, shared_data):
    for src in ("dess-pykneer", "mese-pymskt"):
        for f in (shared_data / src).glob("*.dcm"):
            os.symlink(f, tmp_path / f"{src}-{f.name}")
    with pytest.raises(AmbiguousSeriesError) as info:
        load_volume(tmp_path)
    assert_names(info, tmp_path)
    assert len(info.value.choices) == 2
    assert "Sag DESS" in str(info.value)
    # choosing resolves it: by series number, and a multi-echo series still needs its echo
    assert load_volume(tmp_path, series="5").size == (512, 512, 80)
    with pytest.raises(EchoChoiceRequiredError):
        load_volume(tmp_path, series="8")
    assert load_volume(tmp_path, series="8", echo=2).source.echo_number == 2
    with pytest.raises(AmbiguousSeriesError, match="no series matching"):
        load_volume(tmp_path, series="99")


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(knee_like((1, 30, 30))[0]), str(path))
    with pytest.raises(ImageDimensionError) as info:
        load_volume(path)
    assert_names(info, path)


def test_single_slice_volume(tmp_path, write_volume):
    path = write_volume("one_slice.nii.gz", knee_like((1, 30, 30)))
    with pytest.raises(ImageDimensionError) as info:
        load_volume(path)
    assert_names(info, path)


def test_4d_image_without_echo_choice(tmp_path):
    frames = [make_image(knee_like(seed=s)) for s in range(3)]
    path = tmp_path / "multiecho.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    with pytest.raises(EchoChoiceRequiredError) as info:
        load_volume(path)
    assert_names(info, path)
    assert len(info.value.echoes) == 3
    second = load_volume(path, echo=2)
    assert np.array_equal(second.array(), sitk.GetArrayFromImage(frames[1]))
    with pytest.raises(EchoChoiceRequiredError, match="no echo 7"):
        load_volume(path, echo=7)


def test_nan_voxels(tmp_path, write_volume):
    array = knee_like().astype(np.float32)
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    path = write_volume("nan.nrrd", array)
    with pytest.raises(InvalidVoxelsError) as info:
        load_volume(path)
    assert_names(info, path)
    assert "2 NaN or infinite" in str(info.value)


def test_empty_volume(tmp_path, write_volume):
    path = write_volume("blank.nrrd", np.zeros((20, 30, 30), np.int16))
    with pytest.raises(EmptyVolumeError) as info:
        load_volume(path)
    assert_names(info, path)


def _view(write_volume, name, plane, origin=(0.0, 0.0, 0.0)):
    return load_volume(
        write_volume(name, knee_like(), spacing=(1.0, 1.0, 3.0), origin=origin, direction=plane_direction(plane))
    )


def test_two_views_of_the_same_plane(write_volume):
    first = _view(write_volume, "sag_a.nrrd", "sagittal")
    second = _view(write_volume, "sag_b.nrrd", "sagittal")
    with pytest.raises(DuplicatePlaneError) as info:
        Case.from_volumes([first, second])
    assert_names(info, second.path)
    assert first.path in str(info.value)
    # given explicitly in the wrong role
    with pytest.raises(DuplicatePlaneError) as info:
        Case(sagittal=first, coronal=second)
    assert_names(info, second.path)


def test_views_that_do_not_overlap(write_volume):
    sag = _view(write_volume, "sag.nrrd", "sagittal")
    cor = _view(write_volume, "cor_far.nrrd", "coronal", origin=(500.0, 500.0, 500.0))
    with pytest.raises(NoOverlapError) as info:
        Case(sagittal=sag, coronal=cor)
    assert_names(info, cor.path)
    assert sag.path in str(info.value)
    near = _view(write_volume, "cor_near.nrrd", "coronal", origin=(-5.0, 10.0, 5.0))
    assert Case(sagittal=sag, coronal=near).planes == ("sagittal", "coronal")


def test_every_error_reads_as_one_message():
    """Front ends print str(error): the base takes one message, so the (path, problem, advice)
    triple of InputError given to another class fails at once instead of printing a tuple."""
    from OrthoKneeLib.errors import OrthoKneeError
    from OrthoKneeLib.progress import Cancelled, CancelToken

    with pytest.raises(TypeError, match="positional argument"):
        OrthoKneeError(None, "no input series were given.", "Give files.")
    with pytest.raises(TypeError, match="one message string"):
        OrthoKneeError(None)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled) as caught:
        token.raise_if_cancelled()
    assert str(caught.value) == "cancelled by the user."


def test_the_three_advised_errors_read_alike():
    """InputError, BundleError and DeviceError lay out "where: problem advice" the same way."""
    from OrthoKneeLib.bundle import BundleError
    from OrthoKneeLib.errors import InputError
    from OrthoKneeLib.model.device import DeviceError

    for error_class in (InputError, BundleError):
        assert str(error_class("/b/x", "is broken.", "Fix it.")) == "/b/x: is broken. Fix it."
        assert str(error_class(None, "is broken.")) == "is broken."
        assert error_class("/b/x", "is broken.").path == "/b/x"
    assert str(DeviceError("no GPU.", "Use cpu.")) == "no GPU. Use cpu."


def test_no_array_view_of_a_temporary_image():
    """sitk.GetArrayViewFromImage(f(...)) views an image nobody holds: once it is collected the
    array reads freed memory (it segfaulted the bone post-processing in a CI run). Views are
    taken of named images only; a temporary needs GetArrayFromImage, which copies."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"GetArrayViewFromImage\(\s*[\w.]+\(")
    offenders = [
        f"{path.relative_to(repo)}:{n}"
        for folder in ("OrthoKneeLib", "OrthoKnee", "bench")
        for path in sorted((repo / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
