"""The shipped demo bundle: complete, untampered, and usable on the real sample case."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an engine dependency")

from conftest import REPO  # noqa: E402

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


def test_predicting_with_the_headless_demo_bundle_says_how_to_train_heads():
    from OrthoKneeLib.bundle import BundleError
    from OrthoKneeLib.predict import Predictor

    if Bundle.open(demo_bundle_dir()).metadata.get("heads"):
        pytest.skip("the demo bundle has heads: covered by the end-to-end test")
    with pytest.raises(BundleError, match="orthoknee finetune"):
        Predictor(device="cpu")


def test_demo_backbone_gives_full_size_features_on_the_sample():
    bundle = Bundle.open(demo_bundle_dir())
    config = bundle.view_config("sagittal")
    unet, scheduler = bundle.load_backbone("sagittal")
    view = prepare_view(load_volume(sample_case_dir() / SAMPLE_VIEWS["sagittal"]).image, config)
    extractor = FeatureExtractor(
        unet,
        scheduler,
        timesteps=(50,),
        budget_per_block=bundle.features["budget_per_block"],
        window_ijk=config.window,
        overlap=bundle.features["overlap"],
    )
    features = extractor(view)
    assert features.shape[1:] == view.shape
    assert np.isfinite(features).all() and features.std() > 0


def test_predict_on_the_real_sample_puts_the_bones_where_they_are(tmp_path, capsys):
    """`orthoknee predict` on the shipped real DESS case: all outputs, and anatomy that makes sense.

    The sample has no reference segmentation, so the test checks what any knee must satisfy:
    femur above tibia, patella in front of the femur, plausible volumes, cartilage present.
    """
    import json

    import SimpleITK as sitk

    from OrthoKneeLib.cli import main
    from OrthoKneeLib.segfile import read_seg_nrrd

    if not Bundle.open(demo_bundle_dir()).metadata.get("heads"):
        pytest.skip(
            "the shipped demo bundle has pretrained backbones but no trained heads yet "
            "(issue 6: the best heads so far segment held-out synthetic cases, femur Dice 0.73, but not the "
            "real sample; see the model card)"
        )
    folder = sample_case_dir()
    args = [
        "predict",
        *(str(folder / SAMPLE_VIEWS[p]) for p in ("sagittal", "coronal", "axial")),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--json",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    for name in ("structures.seg.nrrd", "findings.json", "montage.png"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "overlays").glob("*.nrrd"))) == 8
    labels, segments = read_seg_nrrd(tmp_path / "structures.seg.nrrd")
    array = sitk.GetArrayFromImage(labels)
    label_of = {s.key: s.label for s in segments}

    def centre_lps(key):
        idx = np.argwhere(array == label_of[key]).mean(0)[::-1]  # i, j, k
        return np.array(labels.TransformContinuousIndexToPhysicalPoint(idx.tolist()))

    femur, tibia, patella = centre_lps("femur"), centre_lps("tibia"), centre_lps("patella")
    assert femur[2] > tibia[2] + 20  # LPS: +z is superior
    assert patella[1] < femur[1] - 10  # LPS: -y is anterior
    volumes = summary["measurements"]["volume_ml"]
    assert 50 < volumes["femur"] < 600 and 30 < volumes["tibia"] < 500 and 5 < volumes["patella"] < 40
    assert volumes["femoral_cartilage"] > 2
    assert 1.0 < summary["measurements"]["mean_thickness_mm"]["femoral_cartilage"] < 4.0
    assert set(summary["findings"]) == set(Bundle.open(demo_bundle_dir()).catalog.finding_keys)
    # the sample carries no laterality tag; its fibula (posterior, inferior and to the patient's
    # right of the tibia) makes it a right knee, and the lateral meniscus is on that side
    assert summary["knee_side"]["side"] == "right" and "fibula" in summary["knee_side"]["from"]
    medial, lateral = centre_lps("medial_meniscus"), centre_lps("lateral_meniscus")
    assert lateral[0] < tibia[0] < medial[0]  # LPS: -x is the patient's right


def test_a_header_naming_the_other_knee_is_flagged_on_the_real_sample():
    """The sample's anatomy makes it a right knee; a series whose DICOM Laterality said L would be a
    wrong-side mix-up worth a look, and the prediction says so (the anatomy still splits the menisci)."""
    from OrthoKneeLib.predict import Predictor
    from OrthoKneeLib.volumes import Case

    if not Bundle.open(demo_bundle_dir()).metadata.get("heads"):
        pytest.skip("the shipped demo bundle has no trained heads")
    sagittal = load_volume(sample_case_dir() / SAMPLE_VIEWS["sagittal"])
    sagittal.source.laterality = "left"  # as a DICOM header with Laterality L would set it
    prediction = Predictor(device="cpu").predict(Case(sagittal=sagittal))
    assert prediction.knee_side["side"] == "right" and prediction.knee_side["dicom_laterality"] == "left"
    assert any("DICOM Laterality says left" in w and "check which knee" in w for w in prediction.warnings)


def test_the_recipe_lists_the_steps_that_made_the_shipped_bundle():
    """`make_demo_bundle.sh --dry-run` prints the lineage with wall times; the steps metadata.json
    records (each backbone's pretraining, the last heads run) are there with the same command and time."""
    import subprocess

    recipe = REPO / "Resources" / "Models" / "make_demo_bundle.sh"
    done = subprocess.run(["bash", str(recipe), "--dry-run"], capture_output=True, text=True, check=True, cwd=REPO)
    lines = done.stdout.splitlines()
    steps = {}
    for title, command in zip(lines[0::2], lines[1::2]):
        if title.strip()[0].isdigit():
            steps[command.strip()] = title.split()[-2]
    metadata = json.loads((REPO / "Resources" / "Models" / "orthoknee-demo" / "metadata.json").read_text())
    recorded = [(v["training"]["command"], v["training"]["seconds"]) for v in metadata["views"].values()]
    recorded.append((metadata["heads"]["training"]["command"], metadata["heads"]["training"]["seconds"]))
    for command, seconds in recorded:
        assert command in steps, command
        assert float(steps[command]) == pytest.approx(seconds)
    assert lines[-1].startswith("recorded wall time of the timed steps:")


def test_two_echoes_of_one_real_series_get_the_same_bones(shared_data):
    """Label-free consistency on a real scan: echoes 1 and 3 of the MESE series are the same knee in
    the same position with other contrast (TE 6.3 vs 18.9 ms); the shipped model must outline the
    same bones in both: Dice >= 0.90 between the two readings for femur and tibia (0.98 and 0.96
    today). The patella, cut into about six of the series' 4-mm-spaced slices, agrees to 0.80: held
    to >= 0.75 here so that a regression shows; its 0.90 target is not met yet (issue 34)."""
    from OrthoKneeLib.predict import Predictor
    from OrthoKneeLib.volumes import Case

    predictor = Predictor(device="cpu")
    readings = [
        predictor.predict(Case(sagittal=load_volume(shared_data / "mese-pymskt", echo=echo), name=f"echo {echo}"))
        for echo in (1, 3)
    ]
    catalog = readings[0].catalog
    for key, floor in (("femur", 0.90), ("tibia", 0.90), ("patella", 0.75)):
        label = catalog.structure(key).label
        a, b = (r.labelmap == label for r in readings)
        assert a.sum() > 0 and b.sum() > 0, key
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= floor, f"{key}: Dice {dice:.3f} between echoes 1 and 3"
