"""Reading the real knee MRI samples in ../shared/data, traps included."""

import glob

import numpy as np
import pytest

from OrthoKneeLib.errors import EchoChoiceRequiredError
from OrthoKneeLib.volumes import list_volumes, load_volume

pytestmark = pytest.mark.shared_data


def test_dess_loads_as_sagittal_512x512x80(shared_data):
    v = load_volume(shared_data / "dess-pykneer")
    assert v.plane == "sagittal"
    assert v.size == (512, 512, 80)
    assert np.allclose(v.spacing, (0.3125, 0.3125, 1.5), atol=1e-4)
    assert v.orientation == "PIR"
    assert v.source.echo_time == pytest.approx(7.48)
    assert v.source.files == 80


def test_mese_is_split_into_8_echoes_of_24_slices(shared_data):
    volumes = list_volumes(shared_data / "mese-pymskt")
    assert len(volumes) == 8
    echo_times = [v.source.echo_time for v in volumes]
    assert echo_times == sorted(echo_times)
    assert echo_times[0] == pytest.approx(6.312) and echo_times[-1] == pytest.approx(50.496)
    for v in volumes:
        assert v.size == (256, 256, 24)
        assert v.plane == "sagittal"
        # The true distance between slice centres along the slice normal is 4.00 mm
        # (SpacingBetweenSlices = 4; the SliceLocation steps of 3.96 mm are only the L-R
        # component of the step on this 8-degree tilted stack). Stacking all echoes would
        # give 192 slices at about 0.48 mm.
        assert v.spacing[2] == pytest.approx(4.0, abs=0.01)
        assert v.spacing[:2] == pytest.approx((0.625, 0.625))


def test_mese_echoes_differ_and_decay(shared_data):
    """Each echo is its own image (T2 decay makes later echoes darker), not a copy."""
    first = load_volume(shared_data / "mese-pymskt", echo=1).array().astype(float)
    last = load_volume(shared_data / "mese-pymskt", echo=8).array().astype(float)
    assert last.mean() < 0.8 * first.mean()


def test_mese_without_echo_choice_lists_the_echoes(shared_data):
    with pytest.raises(EchoChoiceRequiredError) as info:
        load_volume(shared_data / "mese-pymskt")
    assert "mese-pymskt" in str(info.value)
    assert "50.496" in str(info.value)
    assert len(info.value.echoes) == 8


def test_one_dicom_file_stands_for_its_series(shared_data):
    one_file = sorted((shared_data / "dess-pykneer").glob("*.dcm"))[10]
    assert load_volume(one_file).size == (512, 512, 80)


def test_spl_atlas_loads_as_axial(shared_data):
    v = load_volume(shared_data / "labels-spl-atlas" / "seg.nrrd")
    assert v.plane == "axial"
    assert v.size == (512, 512, 119)


def test_label_maps_from_other_sources_are_sagittal(shared_data):
    pymskt = load_volume(shared_data / "labels-pymskt" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd")
    assert pymskt.plane == "sagittal" and pymskt.orientation == "PIR"
    # OAI maps store the slice axis first (160 x 384 x 384, RAS); still sagittal.
    oai = load_volume(sorted(glob.glob(str(shared_data / "labels-oai" / "OAI_AKOA" / "*.nii.gz")))[0])
    assert oai.size == (160, 384, 384)
    assert oai.plane == "sagittal"


def test_the_dicom_laterality_tag_is_read(shared_data, tmp_path):
    import pydicom

    assert load_volume(shared_data / "dess-pykneer").source.laterality is None  # the sample's tag is empty
    for n, path in enumerate(sorted((shared_data / "dess-pykneer").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.Laterality = "L"
        ds.save_as(tmp_path / f"{n:03d}.dcm")
    tagged = load_volume(tmp_path)
    assert tagged.source.laterality == "left" and tagged.describe()["laterality"] == "left"
