"""Shared fixtures: where the real knee MRI samples are, and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """../shared/data beside the repository (as in CI), or $ORTHOKNEE_SHARED_DATA."""
    env = os.environ.get("ORTHOKNEE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = shared_data_dir()
    if not (folder / "dess-pykneer").is_dir():
        pytest.skip(
            f"real knee MRI samples not found at {folder}; put ../shared/data beside the repository "
            "or set ORTHOKNEE_SHARED_DATA"
        )
    return folder


def make_image(
    array_kji: np.ndarray,
    spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


@pytest.fixture
def write_volume(tmp_path):
    """Write a synthetic image to a file under tmp_path and return the path."""

    def _write(name: str, array_kji: np.ndarray, **geometry) -> Path:
        path = tmp_path / name
        sitk.WriteImage(make_image(array_kji, **geometry), str(path))
        return path

    return _write


def tiny_view(plane):
    """A backbone small enough to run in seconds on a CPU."""
    from OrthoKneeLib.model.diffusion import ViewModelConfig

    return ViewModelConfig(
        plane=plane, spacing=(3.0, 3.0, 6.0), patch=(32, 32, 8), window=(64, 64, 16), channels=(8, 16)
    )


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, shared_data):
    """Three synthetic SPL cases, a tiny three-view bundle (random backbones), cached features
    and 25 steps of fine-tuning: the plumbing, not the accuracy, is under test."""
    import torch

    from OrthoKneeLib.bundle import Bundle, create_bundle
    from OrthoKneeLib.model.diffusion import build_unet
    from OrthoKneeLib.synth.dataset import SynthConfig, synthesize
    from OrthoKneeLib.train import FinetuneConfig, cache_case, finetune
    from OrthoKneeLib.volumes import resample_to_spacing

    root = tmp_path_factory.mktemp("pipeline")
    synthesize(
        shared_data / "labels-spl-atlas",
        root / "cases",
        SynthConfig(
            source="spl", n=3, seed=5, prevalence=0.5, val_fraction=0.0, work_spacing=1.5, contact_sheets=False
        ),
    )
    for folder in (root / "cases" / "cases").iterdir():  # coarser series keep the module fast
        for plane in ("sagittal", "coronal", "axial"):
            image = sitk.ReadImage(str(folder / f"{plane}.nrrd"))
            spacing = (1.5, 1.5, image.GetSpacing()[2])
            sitk.WriteImage(resample_to_spacing(image, spacing), str(folder / f"{plane}.nrrd"))
            labels = sitk.ReadImage(str(folder / f"{plane}_labels.nrrd"))
            sitk.WriteImage(resample_to_spacing(labels, spacing, kind="label"), str(folder / f"{plane}_labels.nrrd"))
    bundle = create_bundle(root / "base", name="tiny", version="0.1.0")
    bundle.metadata["features"]["timesteps"] = {"sagittal": [50, 200], "coronal": [100], "axial": [100]}
    bundle.metadata["features"]["budget_per_block"] = 8
    bundle.save_metadata()
    torch.manual_seed(0)
    for plane in ("sagittal", "coronal", "axial"):
        bundle.set_view(plane, tiny_view(plane), build_unet(tiny_view(plane)).state_dict(), {"steps": 0})
    bundle = Bundle.open(root / "base")
    folders = sorted((root / "cases" / "cases").iterdir())
    caches = [cache_case(bundle, f, root / "cache") for f in folders]
    trained = finetune(
        bundle,
        caches[:2],
        root / "trained",
        FinetuneConfig(steps=25, patch_kji=(4, 24, 24)),
        validation_caches=caches[2:],
        device="cpu",
        log=lambda *_: None,
    )
    return {"root": root, "base": bundle, "trained": trained, "folders": folders, "caches": caches}
