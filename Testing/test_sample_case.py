"""The sample case that ships in the repository: real DESS plus two reformats of it."""

import numpy as np
import pytest

from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir
from OrthoKneeLib.volumes import Case, load_volume, resample_like

MAX_SAMPLE_BYTES = 15_000_000


def test_sample_case_fits_its_size_budget():
    folder = sample_case_dir()
    total = sum((folder / name).stat().st_size for name in SAMPLE_VIEWS.values())
    assert total <= MAX_SAMPLE_BYTES
    assert (folder / "LICENSE-DATA.md").is_file()


def test_sample_case_has_three_views_that_overlap():
    folder = sample_case_dir()
    case = Case.from_volumes([load_volume(folder / name) for name in SAMPLE_VIEWS.values()])
    assert case.planes == ("sagittal", "coronal", "axial")
    assert case.reference.size == (256, 256, 80)
    assert case.views["coronal"].spacing[2] == pytest.approx(3.3)
    assert not case.warnings


def test_reformats_agree_with_the_sagittal_series():
    """Resampled back onto the sagittal grid, each reformat correlates with the original."""
    folder = sample_case_dir()
    sag = load_volume(folder / SAMPLE_VIEWS["sagittal"]).image
    a = np.asarray(__import__("SimpleITK").GetArrayFromImage(sag), dtype=float)
    for plane in ("coronal", "axial"):
        moving = load_volume(folder / SAMPLE_VIEWS[plane]).image
        b = np.asarray(__import__("SimpleITK").GetArrayFromImage(resample_like(moving, sag)), dtype=float)
        inside = b > 0
        r = np.corrcoef(a[inside], b[inside])[0, 1]
        assert r > 0.8, (plane, r)
