"""Per-view diffusion backbones: pretraining, resume, features, bundles (tiny CPU configs)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an engine dependency")

from OrthoKneeLib.bundle import FORMAT_VERSION, Bundle, BundleError, create_bundle  # noqa: E402
from OrthoKneeLib.model.device import DeviceError, select_device  # noqa: E402
from OrthoKneeLib.model.diffusion import (  # noqa: E402
    PretrainConfig,
    ViewModelConfig,
    _collect_volumes,
    build_scheduler,
    build_unet,
    pretrain,
)
from OrthoKneeLib.model.features import FeatureCache, FeatureExtractor, array_hash  # noqa: E402

TINY = ViewModelConfig(plane="sagittal", spacing=(1.25, 1.25, 4.0), patch=(32, 32, 8), channels=(8, 16))


@pytest.fixture(scope="module")
def mese_volumes(shared_data):
    """Real MESE DICOM echoes as the sagittal backbone sees them."""
    arrays, names = _collect_volumes([shared_data / "mese-pymskt"], TINY, reformat_others=False, max_volumes=3)
    assert len(arrays) == 3 and "echo" in names[0]
    return arrays


def test_collect_reformats_other_planes_into_the_view(tmp_path):
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    axial = ViewModelConfig(plane="axial", spacing=(1.25, 1.25, 4.0), patch=(32, 32, 8), channels=(8, 16))
    arrays, names = _collect_volumes([sample_case_dir() / SAMPLE_VIEWS["sagittal"]], axial, True, None)
    assert len(arrays) == 1 and "sagittal->axial" in names[0]
    assert arrays[0].min() >= -1.0 and arrays[0].max() <= 1.0


def test_collect_takes_only_the_view_s_own_series_from_a_folder_of_cases(tmp_path):
    """A split made of links to synth cases (cases/<case>/) is read like a synth output: each
    case's own-view image, never its label maps nor its other planes."""
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    for name in ("case-a", "case-b"):
        case = tmp_path / "split" / "cases" / name
        case.mkdir(parents=True)
        shutil.copy(sample_case_dir() / SAMPLE_VIEWS["sagittal"], case / "sagittal.nrrd")
        shutil.copy(sample_case_dir() / SAMPLE_VIEWS["coronal"], case / "coronal.nrrd")
    arrays, names = _collect_volumes([tmp_path / "split"], TINY, True, None)
    assert len(arrays) == 2 and not any("->" in n for n in names)


@pytest.mark.shared_data
def test_pretraining_loss_decreases_on_real_dicom_patches(tmp_path, mese_volumes):
    config = PretrainConfig(steps=40, batch_size=2, learning_rate=2e-3, checkpoint_every=100, seed=1)
    summary = pretrain(TINY, [], tmp_path / "ckpt.pt", config, device="cpu", volumes=mese_volumes)
    losses = summary["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-10:])


@pytest.mark.shared_data
def test_resume_continues_from_the_same_step(tmp_path, mese_volumes):
    straight = pretrain(
        TINY,
        [],
        tmp_path / "a.pt",
        PretrainConfig(steps=8, checkpoint_every=4, seed=3),
        device="cpu",
        volumes=mese_volumes,
    )
    first = pretrain(
        TINY,
        [],
        tmp_path / "b.pt",
        PretrainConfig(steps=4, checkpoint_every=4, seed=3),
        device="cpu",
        volumes=mese_volumes,
    )
    resumed = pretrain(
        TINY,
        [],
        tmp_path / "b.pt",
        PretrainConfig(steps=8, checkpoint_every=4, seed=3),
        device="cpu",
        volumes=mese_volumes,
    )
    assert first["steps"] == 4 and resumed["steps"] == 8
    assert resumed["losses"][:4] == first["losses"]
    # the resumed run is the uninterrupted run, step for step
    assert np.allclose(resumed["losses"], straight["losses"], rtol=1e-5)


def test_cancel_saves_a_checkpoint_to_resume_from(tmp_path):
    from OrthoKneeLib.progress import Cancelled, CancelToken

    vol = [np.random.default_rng(0).uniform(-1, 1, (10, 40, 40)).astype(np.float32)]
    token = CancelToken()

    def progress(done, total, message=""):
        if done == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        pretrain(
            TINY,
            [],
            tmp_path / "c.pt",
            PretrainConfig(steps=50, checkpoint_every=100),
            device="cpu",
            volumes=vol,
            progress=progress,
            cancel=token,
        )
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert state["step"] == 3


def _extractor(seed=0, window=(32, 32, 8)):
    torch.manual_seed(0)
    unet = build_unet(TINY)
    return FeatureExtractor(
        unet, build_scheduler(TINY), timesteps=(50, 250), budget_per_block=4, window_ijk=window, seed=seed
    )


def test_features_are_deterministic_for_a_fixed_seed():
    view = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32)).astype(np.float32)
    a = _extractor(seed=7)(view)
    b = _extractor(seed=7)(view)
    c = _extractor(seed=8)(view)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape[0] == _extractor().channels == 2 * (4 + 4)


def test_channel_budget_must_divide_block_widths():
    with pytest.raises(ValueError, match="budget_per_block=3"):
        FeatureExtractor(build_unet(TINY), build_scheduler(TINY), budget_per_block=3)


def test_a_view_larger_than_the_patch_gets_full_size_features():
    view = np.random.default_rng(2).uniform(-1, 1, (21, 75, 50)).astype(np.float32)
    extractor = _extractor(window=(32, 32, 8))
    features = extractor(view)
    assert features.shape == (extractor.channels, 21, 75, 50)
    assert np.isfinite(features).all()
    # windows were stitched: features vary across the whole view, none left empty
    assert (np.abs(features).reshape(features.shape[0], -1).max(axis=0) > 0).all()


def test_feature_cache_round_trip(tmp_path):
    cache = FeatureCache(tmp_path, bundle_hash="abc")
    view = np.ones((4, 5, 6), np.float32)
    key = array_hash(view)
    assert cache.get("sagittal", key) is None
    cache.put("sagittal", key, np.full((3, 4, 5, 6), 0.5, np.float32))
    assert np.allclose(cache.get("sagittal", key), 0.5)
    assert FeatureCache(tmp_path, bundle_hash="other").get("sagittal", key) is None


@pytest.fixture
def tiny_bundle(tmp_path):
    bundle = create_bundle(tmp_path / "bundle", name="tiny", version="0.0.1")
    torch.manual_seed(0)
    bundle.set_view("sagittal", TINY, build_unet(TINY).state_dict(), {"steps": 0})
    return bundle.path


def test_bundle_loads_and_verifies(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    assert bundle.planes == ("sagittal",)
    unet, scheduler = bundle.load_backbone("sagittal")
    assert not unet.training
    assert len(bundle.hash) == 16
    with pytest.raises(BundleError, match="no coronal backbone"):
        bundle.load_backbone("coronal")


def test_tampered_weights_are_refused(tiny_bundle):
    weights = tiny_bundle / "weights" / "backbone_sagittal.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        Bundle.open(tiny_bundle)
    assert "backbone_sagittal.pt" in str(info.value) and "sha256" in str(info.value)


def test_wrong_format_version_is_refused(tiny_bundle):
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (tiny_bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format version"):
        Bundle.open(tiny_bundle)


def test_missing_weight_file_is_refused(tiny_bundle):
    (tiny_bundle / "weights" / "backbone_sagittal.pt").unlink()
    with pytest.raises(BundleError) as info:
        Bundle.open(tiny_bundle)
    assert "is missing" in str(info.value)


def test_missing_bundle_says_how_to_make_one(tmp_path):
    with pytest.raises(BundleError, match="orthoknee pretrain"):
        Bundle.open(tmp_path / "nothing")


def test_weights_that_do_not_fit_the_architecture(tiny_bundle):
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    meta["views"]["sagittal"]["model"]["channels"] = [16, 32]
    (tiny_bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="wrong shape"):
        Bundle.open(tiny_bundle).load_backbone("sagittal")


def test_pickled_code_is_not_executed(tiny_bundle, tmp_path):
    """weights_only=True: a weight file carrying arbitrary objects is refused."""

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    weights = tiny_bundle / "weights" / "backbone_sagittal.pt"
    torch.save({"x": Evil()}, weights)
    bundle = Bundle.open(tiny_bundle, verify=False)
    with pytest.raises(BundleError, match="plain weights"):
        bundle.load_backbone("sagittal")
    assert (tmp_path / "victim").exists()


def test_cuda_requested_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU-only behaviour cannot be observed here")
    with pytest.raises(
        DeviceError, match=r"^CUDA was requested but this machine has no usable CUDA GPU .*Use device 'auto'"
    ):
        select_device("cuda")
    with pytest.raises(DeviceError, match=r"^unknown device 'tpu'\. Use 'auto', 'cpu' or 'cuda'\.$"):
        select_device("tpu")
    assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"


def test_pretrain_command_writes_a_bundle(tmp_path, capsys):
    from OrthoKneeLib.cli import main
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir

    out = tmp_path / "b"
    argv = [
        "pretrain",
        "--view",
        "coronal",
        "--data",
        str(sample_case_dir() / SAMPLE_VIEWS["coronal"]),
        "--out",
        str(out),
        "--steps",
        "3",
        "--spacing",
        "2",
        "2",
        "4",
        "--patch",
        "32",
        "32",
        "8",
        "--channels",
        "8",
        "16",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    bundle = Bundle.open(out)
    assert bundle.planes == ("coronal",)
    training = bundle.metadata["views"]["coronal"]["training"]
    assert training["steps"] == 3
    assert training["command"].startswith("orthoknee pretrain --view coronal")
    assert (out / "checkpoints" / "backbone_coronal.pt").is_file()
    assert "coronal backbone, 3 steps" in capsys.readouterr().out


def test_span_slices_runs_each_window_over_every_slice_and_keeps_the_in_plane_windows():
    """span_slices = one window along the slice axis (no seams between slices; the seams
    themselves are measured on the real backbone in docs/experiments.md, "window seams"), while in plane
    the view is still tiled by the configured window."""
    view = np.random.default_rng(2).uniform(-1, 1, (40, 32, 32)).astype(np.float32)
    spanning = _extractor(window=(16, 16, 8))
    spanning.span_slices = True
    whole_axis = spanning(view)
    np.testing.assert_allclose(whole_axis, _extractor(window=(16, 16, 40))(view), atol=1e-5)
    assert not np.allclose(whole_axis, _extractor(window=(16, 16, 8))(view), atol=1e-3)
    assert not np.allclose(whole_axis, _extractor(window=(32, 32, 40))(view), atol=1e-3)


def test_pretrain_init_from_continues_a_bundle_backbone_as_a_new_version(
    tiny_bundle, tmp_path, mese_volumes, shared_data, capsys
):
    """--init-from: the parent's weights are the start (training begins at its loss, not at a
    random net's), the parent stays byte-identical, and the new bundle records where it came from."""
    from OrthoKneeLib.cli import main

    parent = Bundle.open(tiny_bundle)
    trained = pretrain(
        TINY,
        [],
        tmp_path / "p.pt",
        PretrainConfig(steps=30, learning_rate=2e-3, seed=1, ema_decay=0.0),
        device="cpu",
        volumes=mese_volumes,
    )
    parent.set_view("sagittal", TINY, trained["ema"].state_dict(), {"steps": 30, "command": "orthoknee pretrain x"})
    parent_weights = (tiny_bundle / "weights" / "backbone_sagittal.pt").read_bytes()
    fresh = pretrain(TINY, [], tmp_path / "f.pt", PretrainConfig(steps=3, seed=5), device="cpu", volumes=mese_volumes)
    continued = pretrain(
        TINY,
        [],
        tmp_path / "c.pt",
        PretrainConfig(steps=3, seed=5),
        device="cpu",
        volumes=mese_volumes,
        init_state=trained["ema"].state_dict(),
    )
    assert np.mean(continued["losses"]) < np.mean(fresh["losses"])

    out = tmp_path / "continued"
    argv = [
        "pretrain",
        "--view",
        "sagittal",
        "--init-from",
        str(tiny_bundle),
        "--data",
        str(shared_data / "mese-pymskt"),
        "--max-volumes",
        "2",
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    child = Bundle.open(out)
    assert child.metadata["version"] == "0.1.0"  # the parent is 0.0.1: next minor
    assert child.metadata["parent"]["version"] == "0.0.1" and child.metadata["heads"] is None
    assert child.view_config("sagittal") == TINY  # the parent's architecture, not the command's defaults
    started = child.metadata["views"]["sagittal"]["training"]["started_from"]
    assert started["steps"] == 30 and started["command"] == "orthoknee pretrain x"
    assert started["sha256"] == parent.metadata["views"]["sagittal"]["sha256"]
    assert (tiny_bundle / "weights" / "backbone_sagittal.pt").read_bytes() == parent_weights
    assert (out / "weights" / "backbone_sagittal.pt").read_bytes() != parent_weights

    capsys.readouterr()
    assert main(argv[:-4] + ["--out", str(tmp_path / "other"), "--channels", "4", "8"]) != 0
    assert "another architecture than --channels asks for. Leave those options out" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
