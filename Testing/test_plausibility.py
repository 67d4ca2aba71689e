"""Plausibility of a reading: a knee-shaped labelmap passes, deliberately broken ones are named."""

import numpy as np
import pytest
import SimpleITK as sitk

from OrthoKneeLib.labels import DEFAULT_CATALOG
from OrthoKneeLib.plausibility import check_reading, summarize, volume_ranges, warnings_for
from OrthoKneeLib.predict import measure

L = {s.key: s.label for s in DEFAULT_CATALOG.structures}


def knee(broken: str | None = None) -> sitk.Image:
    """1 mm grid, LPS: k (z) points superior, j (y) posterior. Femur on top of the tibia, patella in front."""
    a = np.zeros((90, 80, 80), np.uint8)
    a[50:80, 15:65, 15:65] = L["femur"]
    a[48:50, 15:65, 15:65] = L["femoral_cartilage"]
    a[20:40, 15:65, 15:65] = L["tibia"]
    a[40:41, 15:65, 15:65] = L["tibial_cartilage"]
    a[52:80, 0:10, 25:55] = L["patella"]
    a[52:80, 10:12, 25:55] = L["patellar_cartilage"]
    a[38:52, 40:42, 40:42] = L["acl"]  # from the tibia's top to the femur's bottom
    a[38:52, 50:52, 44:46] = L["pcl"]
    if broken == "upside down":
        a = a[::-1].copy()
    elif broken == "patella in two":
        a[64:66, 0:12, 25:55] = 0
    elif broken == "no tibia":
        a[a == L["tibia"]] = 0
    elif broken == "acl specks":
        a[44:46, 40:42, 40:42] = 0
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((1.0, 1.0, 1.0))
    return image


def read(image):
    checks = check_reading(image, measure(image, DEFAULT_CATALOG)["volume_ml"], DEFAULT_CATALOG)
    return {c.check: c for c in checks}, summarize(checks)


def test_ranges_come_from_the_oai_maps_and_are_widened():
    ranges = volume_ranges()
    assert set(ranges) == {"femur", "femoral_cartilage", "tibia", "tibial_cartilage", "patella", "patellar_cartilage"}
    assert all(0 < low < high for low, high in ranges.values())


def test_a_knee_shaped_reading_passes_every_check():
    checks, summary = read(knee())
    assert summary["plausible"] and summary["knee_found"], [c for c in checks.values() if not c.ok]
    assert warnings_for(summary) == []


@pytest.mark.parametrize(
    "broken, failing, knee_found",
    [
        ("upside down", {"femur above tibia"}, False),
        ("patella in two", {"patella one piece"}, True),
        ("no tibia", {"tibia volume"}, False),
        ("acl specks", {"acl one piece from femur to tibia"}, True),
    ],
)
def test_a_broken_labelmap_is_named(broken, failing, knee_found):
    checks, summary = read(knee(broken))
    assert failing <= {k for k, c in checks.items() if not c.ok}
    assert not summary["plausible"] and summary["knee_found"] == knee_found
    text = " ".join(warnings_for(summary))
    assert all(f in text for f in failing)
    assert ("does not look like a knee" in text) == (not knee_found)
