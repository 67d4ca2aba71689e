"""Training cases from real label maps: mappings, round trip, findings, determinism, layout."""

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from OrthoKneeLib.errors import InputError
from OrthoKneeLib.labels import DEFAULT_CATALOG, FINDING_KEYS
from OrthoKneeLib.model.heads import grid_of
from OrthoKneeLib.postprocess import knee_side
from OrthoKneeLib.synth.anatomy import dilate, mirror_left_right, working_grid
from OrthoKneeLib.synth.dataset import SynthConfig, read_case, render_case, split_subjects, synthesize
from OrthoKneeLib.synth.sources import SOURCES, load_source_maps, map_labels

pytestmark = pytest.mark.shared_data
L = {s.key: s.label for s in DEFAULT_CATALOG.structures}
BONES = ("femur", "tibia", "patella")


def _source_dir(shared_data, source):
    return shared_data / SOURCES[source].shared_folder


@pytest.mark.parametrize("source", ["pymskt", "spl", "oai"])
def test_mapping_keeps_voxel_counts_per_structure(shared_data, source):
    smap = load_source_maps(_source_dir(shared_data, source), source)[0]
    values = sitk.GetArrayFromImage(smap.image)
    structures, _, _, lesion = map_labels(SOURCES[source], values)
    spec = SOURCES[source]
    for key in DEFAULT_CATALOG.structure_keys:
        expected = sum(int((values == v).sum()) for v, k in spec.structures.items() if k == key)
        if source == "oai":  # lesion voxels belong to the bone they lie in
            expected += sum(
                int((values == v).sum()) for v, b in {7: "femur", 8: "tibia", 9: "patella"}.items() if b == key
            )
        assert int((structures == L[key]).sum()) == expected, key
    assert set(spec.annotated) == set(spec.structures.values())
    # nothing outside the catalog sneaks into the structure map
    assert set(np.unique(structures)) <= set(range(12))


def test_sources_annotate_different_subsets():
    assert "acl" not in SOURCES["oai"].annotated and "medial_meniscus" not in SOURCES["oai"].annotated
    assert "acl" not in SOURCES["pymskt"].annotated and "fibula" in SOURCES["pymskt"].annotated
    assert len(SOURCES["spl"].annotated) == 11


def test_oai_subjects_are_parsed_from_file_names(shared_data):
    maps = load_source_maps(_source_dir(shared_data, "oai"), "oai")
    subjects = {m.subject for m in maps}
    assert len(maps) == 54 and len(subjects) < len(maps)  # baseline and follow-up share a subject
    assert all(s.startswith("oai-") and len(s) == 11 for s in subjects)


def test_split_is_by_subject_and_deterministic():
    subjects = [f"s{i}" for i in range(20)] * 3
    a = split_subjects(subjects, 0.2, seed=5)
    assert a == split_subjects(subjects, 0.2, seed=5)
    assert sum(v == "validation" for v in a.values()) == 4
    assert split_subjects(["only"], 0.2, seed=1) == {"only": "train"}


def test_dilate_equals_itk_box_dilation():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40, 35)) > 0.995
    ours = dilate(mask, 2)
    itk = sitk.GetArrayFromImage(
        sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), [2, 2, 2], sitk.sitkBox)
    )
    assert np.array_equal(ours, itk.astype(bool))


@pytest.fixture(scope="module")
def spl_case(shared_data):
    """One SPL atlas case with every finding drawn (prevalence 1)."""
    smap = load_source_maps(_source_dir(shared_data, "spl"), "spl")[0]
    config = SynthConfig(source="spl", n=1, seed=2, prevalence=1.0, work_spacing=1.0)
    grid = working_grid(smap.image, config.work_spacing, config.margin_mm)
    return render_case(smap, grid, config, 0), grid, config, smap


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _back_on_reference(view, reference, undo_motion):
    transform = view["motion"].GetInverse() if undo_motion else sitk.Transform()
    back = sitk.Resample(view["labels"], reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    fov = sitk.Resample(view["labels"] * 0 + 1, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(fov).astype(bool)


def test_views_resampled_back_agree_with_reference_labels(spl_case):
    """Thick-slice round trip: each view's labels, with its recorded motion undone, back on the
    reference grid, match the reference bones (Dice >= 0.9), inside the view's field of view."""
    rendered = spl_case[0]
    reference = sitk.GetArrayFromImage(rendered["labels"])
    for plane, view in rendered["views"].items():
        back, fov = _back_on_reference(view, rendered["labels"], undo_motion=True)
        for bone in BONES:
            d = _dice((reference == L[bone]) & fov, (back == L[bone]) & fov)
            assert d >= 0.9, (plane, bone, d)


def test_views_are_misregistered_by_small_motions(spl_case):
    """Without undoing the motion the series disagree a little, as real series do."""
    rendered = spl_case[0]
    reference = sitk.GetArrayFromImage(rendered["labels"])
    for plane, view in rendered["views"].items():
        back, fov = _back_on_reference(view, rendered["labels"], undo_motion=False)
        femur = _dice((reference == L["femur"]) & fov, (back == L["femur"]) & fov)
        undone, fov2 = _back_on_reference(view, rendered["labels"], undo_motion=True)
        femur_undone = _dice((reference == L["femur"]) & fov2, (undone == L["femur"]) & fov2)
        assert 0.85 <= femur <= femur_undone + 1e-9, (plane, femur, femur_undone)


def test_views_have_protocol_geometry(spl_case):
    rendered = spl_case[0]
    for plane, view in rendered["views"].items():
        image = view["image"]
        assert image.GetPixelID() == sitk.sitkInt16
        from OrthoKneeLib.volumes import detect_plane

        assert detect_plane(image) == plane
        params = view["params"]
        assert 2.5 <= params["thickness_mm"] <= 4.0
        assert image.GetSpacing()[2] == pytest.approx(
            params["thickness_mm"] + params["gap_mm"], abs=2e-3
        )  # params are rounded
        assert max(abs(t) for t in params["misregistration"]["translation_mm"]) <= 1.5


def test_a_view_can_be_acquired_again_from_what_case_json_records(spl_case):
    """The partial-volume ceiling acquires the labels exactly as each view was acquired: the motion
    rebuilt from the recorded (rounded) parameters moves points as the original did, to < 0.01 mm."""
    from OrthoKneeLib.synth.acquire import recorded_motion

    rendered = spl_case[0]
    corners = [rendered["labels"].TransformIndexToPhysicalPoint(c) for c in [(0, 0, 0), (40, 60, 30), (80, 10, 70)]]
    for plane, view in rendered["views"].items():
        rebuilt = recorded_motion(rendered["labels"], view["params"])
        for point in corners:
            assert np.allclose(rebuilt.TransformPoint(point), view["motion"].TransformPoint(point), atol=0.01), plane


def test_partial_volume_oracle_draws_bones_almost_exactly_and_thin_plates_less_well(spl_case):
    from OrthoKneeLib.synth.ceiling import oracle_dice, partial_volume_oracle

    rendered = spl_case[0]
    view = rendered["views"]["sagittal"]
    truth = sitk.GetArrayFromImage(view["labels"])
    oracle = partial_volume_oracle(rendered["labels"], view["labels"], "sagittal", view["params"])
    scores = oracle_dice(oracle, truth, [s.label for s in DEFAULT_CATALOG.structures])
    assert all(scores[L[b]] >= 0.95 for b in BONES), scores
    assert scores[L["femoral_cartilage"]] < scores[L["femur"]]  # a 2-mm plate in 3-mm slabs
    # without the view's motion the oracle is misplaced by up to 1.5 mm and scores lower
    still = partial_volume_oracle(
        rendered["labels"], view["labels"], "sagittal", view["params"], motion=sitk.Euler3DTransform()
    )
    assert oracle_dice(still, truth, [L["femoral_cartilage"]])[L["femoral_cartilage"]] < scores[L["femoral_cartilage"]]


def test_all_findings_are_simulated_where_they_belong(spl_case):
    rendered = spl_case[0]
    knee, findings = rendered["knee"], rendered["findings"]
    assert all(findings[k].present for k in FINDING_KEYS), {k: findings[k].present for k in FINDING_KEYS}
    s = knee.spacing
    # meniscal tears lie inside their meniscus
    for side in ("medial", "lateral"):
        mask = findings[f"{side}_meniscal_tear"].mask
        assert mask.any() and knee.mask(f"{side}_meniscus")[mask].all()
    # effusion: fluid in the joint, outside bone, near the femur
    eff = findings["joint_effusion"].mask
    from OrthoKneeLib.synth.anatomy import distance_mm

    d_femur = distance_mm(knee.mask("femur", "femoral_cartilage"), s)
    assert eff.sum() > 100 and not knee.mask("femur", "tibia", "patella", "fibula")[eff].any()
    assert d_femur[eff].max() <= 7.0 + s
    above = np.argwhere(eff)[:, 1]
    assert np.median(above) <= knee.frame["joint"] + 3  # mostly at or above the joint line
    # bone marrow lesion inside a bone; cartilage defect where cartilage was (now removed)
    bml = findings["bone_marrow_lesion"].mask
    assert knee.mask("femur", "tibia", "patella")[bml].all()
    defect = findings["cartilage_lesion"].mask
    assert defect.any() and not knee.mask("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")[defect].any()
    # ACL tear: a gap in the ACL label, filled by fluid
    acl_tear = findings["acl_tear"].mask
    assert acl_tear.any() and (knee.tissue[acl_tear] == 9).all()
    assert _dice(acl_tear, dilate(knee.mask("acl"), 2)) > 0
    # collateral injury surrounds a collateral ligament
    col = findings["collateral_ligament_injury"].mask
    assert (col & dilate(knee.collateral, 1)).any()


def test_same_seed_same_case_other_index_other_case(spl_case):
    rendered, grid, config, smap = spl_case
    again = render_case(smap, grid, config, 0)
    a = sitk.GetArrayFromImage(rendered["views"]["coronal"]["image"])
    b = sitk.GetArrayFromImage(again["views"]["coronal"]["image"])
    assert np.array_equal(a, b)
    other = render_case(smap, grid, config, 1)
    c = sitk.GetArrayFromImage(other["views"]["coronal"]["image"])
    assert a.shape != c.shape or not np.array_equal(a, c)


def _side(labels: sitk.Image) -> str | None:
    return knee_side(sitk.GetArrayFromImage(labels), grid_of(labels), DEFAULT_CATALOG).side


def test_a_mirrored_label_map_is_the_other_knee_in_the_same_box(shared_data):
    smap = load_source_maps(_source_dir(shared_data, "pymskt"), "pymskt")[0]  # a right knee
    mirrored = mirror_left_right(smap.image)
    before, after = (map_labels(smap.source, sitk.GetArrayFromImage(im))[0] for im in (smap.image, mirrored))
    assert np.bincount(before.ravel()).tolist() == np.bincount(after.ravel()).tolist()
    assert knee_side(before, grid_of(smap.image), DEFAULT_CATALOG).side == "right"
    assert knee_side(after, grid_of(mirrored), DEFAULT_CATALOG).side == "left"
    # the labelled anatomy fills the same box, so the working grid does not move
    grids = [working_grid(im, 1.0, 25.0) for im in (smap.image, mirrored)]
    assert grids[0].GetSize() == grids[1].GetSize()
    assert np.allclose(grids[0].GetOrigin(), grids[1].GetOrigin(), atol=1e-6)
    twice = mirror_left_right(mirrored)
    assert np.array_equal(sitk.GetArrayFromImage(twice), sitk.GetArrayFromImage(smap.image))
    assert np.allclose(twice.GetOrigin(), smap.image.GetOrigin(), atol=1e-6)


def test_mirror_fraction_draws_the_other_knee_and_keeps_the_other_cases(spl_case, tmp_path):
    rendered, grid, config, smap = spl_case  # the SPL atlas is a left knee
    mirrored = render_case(smap, grid, replace(config, mirror_fraction=1.0), 0)
    assert (rendered["meta"]["mirrored"], mirrored["meta"]["mirrored"]) == (False, True)
    assert (_side(rendered["labels"]), _side(mirrored["labels"])) == ("left", "right")
    # which cases are mirrored depends on (seed, index) alone, about the share asked for
    half = replace(config, mirror_fraction=0.5)
    flags = [half.mirrored(i) for i in range(200)]
    assert 70 < sum(flags) < 130 and flags == [half.mirrored(i) for i in range(200)]
    # a case left unmirrored is drawn exactly as without mirroring: its own random stream is untouched
    index = flags.index(False)
    plain = rendered if index == 0 else render_case(smap, grid, config, index)
    kept = render_case(smap, grid, half, index)
    for plane in ("sagittal", "coronal"):
        assert np.array_equal(
            sitk.GetArrayFromImage(plain["views"][plane]["image"]),
            sitk.GetArrayFromImage(kept["views"][plane]["image"]),
        ), plane
    with pytest.raises(InputError, match="--mirror-fraction"):
        synthesize(smap.path, tmp_path, replace(config, mirror_fraction=1.5))


def test_a_worker_mirrors_the_source_once_and_renders_the_same_cases(spl_case, shared_data, tmp_path):
    """synthesize keeps the mirrored atlas for the next case; the case must not change by it."""
    _, grid, config, smap = spl_case
    mirrored = replace(config, mirror_fraction=1.0, n=2, contact_sheets=False)
    synthesize(_source_dir(shared_data, "spl"), tmp_path, mirrored, workers=1)
    direct = render_case(smap, grid, mirrored, 1)  # mirrors the atlas itself
    written = sitk.ReadImage(str(tmp_path / "cases" / "spl-2-0001" / "sagittal.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(direct["views"]["sagittal"]["image"]))
    assert json.loads((tmp_path / "cases" / "spl-2-0001" / "case.json").read_text())["mirrored"] is True


def test_oai_real_lesions_become_real_bone_marrow_lesions(shared_data):
    maps = load_source_maps(_source_dir(shared_data, "oai"), "oai")
    with_lesion = next(m for m in maps if (sitk.GetArrayFromImage(m.image) >= 7).sum() > 500)
    config = SynthConfig(source="oai", n=1, seed=0, prevalence=0.0, work_spacing=1.0, deform=False)
    grid = working_grid(with_lesion.image, 1.0, config.margin_mm)
    rendered = render_case(with_lesion, grid, config, 0)
    bml = rendered["findings"]["bone_marrow_lesion"]
    assert bml.present and bml.real
    # OAI labels no menisci: their tears are unknown, not absent
    assert rendered["findings"]["medial_meniscal_tear"].present is None
    # with prevalence 0 nothing else is simulated
    assert not rendered["findings"]["acl_tear"].present


def test_synthesize_writes_the_layout_and_resumes(shared_data, tmp_path, capsys):
    from OrthoKneeLib.cli import main

    out = tmp_path / "cases"
    argv = [
        "synth",
        "--labels",
        str(_source_dir(shared_data, "pymskt")),
        "--source",
        "pymskt",
        "--out",
        str(out),
        "--n",
        "2",
        "--seed",
        "4",
        "--work-spacing",
        "1.2",
    ]
    assert main(argv) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["synthetic"] is True and len(manifest["cases"]) == 2
    case_dir = out / "cases" / "pymskt-4-0000"
    for name in (
        "sagittal.nrrd",
        "coronal.nrrd",
        "axial.nrrd",
        "sagittal_labels.nrrd",
        "labels.nrrd",
        "case.json",
        "contact_sheet.png",
    ):
        assert (case_dir / name).is_file(), name
    case = read_case(case_dir)
    assert case.case.planes == ("sagittal", "coronal", "axial")
    assert set(case.findings) == set(FINDING_KEYS)
    assert "acl" not in case.annotated and "medial_meniscus" in case.annotated
    for key, present in case.findings.items():
        assert (case.finding_mask(key) is not None) == bool(present), key
    # a second run keeps the finished cases
    before = (case_dir / "sagittal.nrrd").stat().st_mtime_ns
    assert main(argv) == 0
    assert (case_dir / "sagittal.nrrd").stat().st_mtime_ns == before
    assert "rendered now: 0" in capsys.readouterr().out


def test_outlines_are_closed():
    from OrthoKneeLib.synth.sheet import outline_slice

    lab = np.zeros((20, 20), np.uint8)
    lab[5:15, 5:15] = 1  # femur
    rgb = outline_slice(np.zeros((20, 20), np.float32), lab)
    colored = (rgb != rgb[0, 0]).any(axis=-1)
    ring = np.zeros_like(colored)
    ring[5:15, 5:15] = True
    ring[6:14, 6:14] = False
    assert np.array_equal(colored, ring)


def _tissue_phantom():
    """A slab of body (muscle, fat, marrow, cartilage, fluid) with air on both sides."""
    from OrthoKneeLib.synth.sources import Tissue

    t = np.zeros((24, 60, 24), np.uint8)
    t[:, 6:54] = Tissue.MUSCLE
    t[:, 6:9] = Tissue.FAT
    t[:, 20:32] = Tissue.MARROW
    t[:, 32:35] = Tissue.CARTILAGE
    t[:, 35:38] = Tissue.FLUID
    return t


def _normalised(image):
    from OrthoKneeLib.volumes import normalize_intensity

    return sitk.GetArrayFromImage(normalize_intensity(sitk.GetImageFromArray(image)))


def test_dess_render_has_the_real_dess_tissue_order():
    """Measured on the real pyKNEEr DESS after normalisation: marrow ~0.06-0.09 and fat ~0.04
    (water excitation), muscle ~0.45; synthetic DESS must keep marrow dark and muscle bright,
    or heads trained on it look for dark-gray bone and miss the real femur."""
    from OrthoKneeLib.synth.render import render_intensity

    t = _tissue_phantom()
    for seed in range(4):
        image, params = render_intensity(t, "dess", np.random.default_rng(seed), spacing=1.0)
        n = _normalised(image)
        marrow, muscle = np.median(n[:, 23:29]), np.median(n[:, 42:50])
        assert marrow < 0.15 and muscle > 0.3 and muscle > 3 * marrow, (seed, marrow, muscle)
        assert params["contrast"] == "dess" and params["coil_gain"] > 0


def test_random_contrast_varies_marrow_but_keeps_fluid_brightest():
    from OrthoKneeLib.synth.render import render_intensity
    from OrthoKneeLib.synth.sources import Tissue

    t = _tissue_phantom()
    means = [render_intensity(t, "random", np.random.default_rng(s), spacing=1.0)[1]["tissue_means"] for s in range(20)]
    marrow = np.array([m["marrow"] for m in means])
    assert marrow.max() - marrow.min() > 0.4  # anatomy, not one intensity, must identify bone
    assert any(m["marrow"] > m["muscle"] for m in means) and any(m["marrow"] < m["muscle"] for m in means)
    for m in means:
        assert m["fluid"] > max(
            m[Tissue.NAMES[k]] for k in (Tissue.FAT, Tissue.MUSCLE, Tissue.MARROW, Tissue.CARTILAGE)
        )


def test_surface_coil_brightens_tissue_near_the_skin():
    from OrthoKneeLib.synth.render import _skin_proximity

    body = _tissue_phantom() > 0
    p = _skin_proximity(body, spacing=1.0)
    assert p[:, 0].max() == 0  # air stays dark
    assert p[12, 7, 12] > 0.5 > p[12, 30, 12]  # 1 mm inside the skin vs 24 mm deep
    assert np.all(np.diff(p[12, 6:30, 12]) <= 1e-6)  # falls off monotonically going inward


def test_mixed_contrast_draws_every_contrast():
    from OrthoKneeLib.synth.render import CONTRAST_MIX, CONTRASTS

    assert set(CONTRAST_MIX) == set(CONTRASTS) and abs(sum(CONTRAST_MIX.values()) - 1) < 1e-9


def test_a_kept_label_is_rendered_as_an_extra_label_and_a_wrong_one_refused(shared_data, tmp_path):
    from OrthoKneeLib.synth.dataset import SynthConfig, read_case, synthesize

    atlas = shared_data / "labels-spl-atlas"
    config = SynthConfig(source="spl", n=1, contact_sheets=False, keep_labels={35: "Patellar ligament"})
    synthesize(atlas, tmp_path / "kept", config)
    case = read_case(next((tmp_path / "kept" / "cases").iterdir()))
    assert case.meta["extra_labels"] == {"20": "Patellar ligament"}
    assert (sitk.GetArrayFromImage(case.labels["sagittal"]) == 20).sum() > 100
    for keep, says in (({240: "Nothing"}, "no spl label map holds"), ({95: "Femur again"}, "already the catalog's")):
        with pytest.raises(InputError, match=says):
            synthesize(atlas, tmp_path / "refused", replace(config, keep_labels=keep))
    assert not (tmp_path / "refused").exists()  # refused before anything is written
