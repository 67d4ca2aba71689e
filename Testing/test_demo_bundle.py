"""The shipped demo bundle: complete, untampered, and usable on the real sample case."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an engine dependency")

from OrthoKneeLib.bundle import Bundle  # noqa: E402
from OrthoKneeLib.model.diffusion import prepare_view  # noqa: E402
from OrthoKneeLib.model.features import FeatureExtractor  # noqa: E402
from OrthoKneeLib.resources import SAMPLE_VIEWS, demo_bundle_dir, sample_case_dir  # noqa: E402
from OrthoKneeLib.volumes import load_volume  # noqa: E402

MAX_BUNDLE_BYTES = 25_000_000


def test_demo_bundle_is_complete_and_small():
    bundle = Bundle.open(demo_bundle_dir())  # verifies every sha256
    assert bundle.planes == ("sagittal", "coronal", "axial")
    assert bundle.catalog.structure_keys[0] == "femur"
    size = sum(f.stat().st_size for f in demo_bundle_dir().rglob("*") if f.is_file())
    assert size <= MAX_BUNDLE_BYTES
    for plane in bundle.planes:
        training = bundle.metadata["views"][plane]["training"]
        assert training["command"].startswith(f"orthoknee pretrain --view {plane}")
        assert training["final_loss"] < 0.5 * training["first_loss"]  # it did learn to denoise


def test_demo_backbone_gives_full_size_features_on_the_sample():
    bundle = Bundle.open(demo_bundle_dir())
    config = bundle.view_config("sagittal")
    unet, scheduler = bundle.load_backbone("sagittal")
    view = prepare_view(load_volume(sample_case_dir() / SAMPLE_VIEWS["sagittal"]).image, config)
    extractor = FeatureExtractor(unet, scheduler, timesteps=(50,), budget_per_block=bundle.features["budget_per_block"],
                                 window_ijk=config.window, overlap=bundle.features["overlap"])
    features = extractor(view)
    assert features.shape[1:] == view.shape
    assert np.isfinite(features).all() and features.std() > 0
