"""The annotator's loop on the tiny pipeline: a corrected case (labels redrawn, a finding rejected)
fine-tunes the next bundle version, which predicts that case closer to the correction and records
where it came from; two versions' outputs compare side by side."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch", reason="torch is an engine dependency")

from OrthoKneeLib.cachedcase import cache_case  # noqa: E402
from OrthoKneeLib.cli import main  # noqa: E402
from OrthoKneeLib.errors import InputError  # noqa: E402
from OrthoKneeLib.predict import Predictor  # noqa: E402
from OrthoKneeLib.synth.dataset import read_case  # noqa: E402
from OrthoKneeLib.train import FinetuneConfig, finetune  # noqa: E402


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of voxels with the same label (the tiny model's random backbone gives no structure a
    usable Dice; how much of the case it labels as the annotator did still moves)."""
    return float((a == b).mean())


def test_a_corrected_case_trains_the_next_version(pipeline, tmp_path, capsys):
    base = pipeline["trained"]
    source = pipeline["folders"][0]
    before = Predictor(base, device="cpu", gate=False, postprocess=False).predict(read_case(source).case)
    rejected = max(before.finding_probabilities, key=before.finding_probabilities.get)
    corrected = tmp_path / "corrected" / "cases" / source.name  # the annotator's export: true labels, a rejection
    shutil.copytree(source, corrected)
    meta = json.loads((corrected / "case.json").read_text())
    meta["findings"][rejected] = (
        dict(meta["findings"][rejected], present=0) if isinstance(meta["findings"][rejected], dict) else 0
    )
    (corrected / "findings" / f"{rejected}.nrrd").unlink(missing_ok=True)  # a rejected finding has no lesion
    meta["split"] = "train"
    (corrected / "case.json").write_text(json.dumps(meta))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(corrected / "sagittal_labels.nrrd")))  # the reference grid

    cache = cache_case(base, corrected, tmp_path / "cache")
    config = FinetuneConfig(steps=40, patch_kji=(4, 24, 24), learning_rate=1e-3, validation_cases=0)
    new = finetune(base, [cache], tmp_path / "next", config, device="cpu", log=lambda *_: None)
    after = Predictor(new, device="cpu", gate=False, postprocess=False).predict(read_case(source).case)

    assert _agreement(after.labelmap, truth) > _agreement(before.labelmap, truth) + 0.05
    assert after.finding_probabilities[rejected] < before.finding_probabilities[rejected]
    lineage = new.metadata
    assert lineage["parent"] == {"name": base.metadata["name"], "version": base.metadata["version"], "hash": base.hash}
    training = lineage["heads"]["training"]
    assert training["started_from"]["version"] == base.metadata["version"]
    assert [c["case_id"] for c in training["case_inputs"]] == [meta["case_id"]]
    assert training["case_inputs"][0]["input_sha256"]  # which images the correction was made on

    for bundle, out in ((base, tmp_path / "out-a"), (new, tmp_path / "out-b")):  # two versions side by side
        Predictor(bundle, device="cpu").predict(read_case(source).case).save(out)
    assert main(["diff", str(tmp_path / "out-a"), str(tmp_path / "out-b"), "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert (
        diff["b"]["bundle"]["version"] == new.metadata["version"]
        and diff["findings"][rejected]["b"] < diff["findings"][rejected]["a"]
    )


def test_early_stopping_keeps_the_best_validated_heads(pipeline, tmp_path):
    config = FinetuneConfig(
        steps=12, patch_kji=(4, 24, 24), validate_every=3, validation_cases=1, early_stop_patience=1, learning_rate=0.05
    )
    new = finetune(
        pipeline["trained"],
        pipeline["caches"][:2],
        tmp_path / "es",
        config,
        validation_caches=pipeline["caches"][2:],
        device="cpu",
        log=lambda *_: None,
    )
    training = new.metadata["heads"]["training"]
    history = training["validation"]
    assert training["validation_before"]["mean_dice"] is not None
    best = max([training["validation_before"]["mean_dice"]] + [h["mean_dice"] for h in history])
    kept = training["kept_step"]
    kept_dice = (
        training["validation_before"]["mean_dice"]
        if kept == 0
        else next(h["mean_dice"] for h in history if h["step"] == kept)
    )
    assert kept_dice == pytest.approx(best)
    assert len(history) <= 4


def test_grown_heads_keep_the_old_classes_exactly():
    from OrthoKneeLib.model.heads import HeadsConfig, OrthoKneeHeads, grow_segmentation_classes

    torch.manual_seed(0)
    old = OrthoKneeHeads(HeadsConfig(view_channels={"sagittal": 8}, fused_channels=8, seg_widths=(8, 8, 8))).eval()
    grown = grow_segmentation_classes(old, 2).eval()
    assert grown.config.n_classes == old.config.n_classes + 2
    feats = {"sagittal": torch.randn(1, 8, 4, 16, 16)}
    cover = {"sagittal": torch.ones(1, 1, 4, 16, 16)}
    image = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():
        a = old.segmentation.coarse_logits(feats, cover, image)
        b = grown.segmentation.coarse_logits(feats, cover, image)
        assert torch.allclose(a, b[:, : a.shape[1]], atol=1e-5)
        ref = torch.randn(1, 1, 4, 16, 16)
        ra, rb = old.segmentation.refined_logits(a, ref), grown.segmentation.refined_logits(b, ref)
    assert torch.allclose(ra, rb[:, : ra.shape[1]], atol=1e-5)
    assert (rb[:, ra.shape[1] :] < ra.max(dim=1, keepdim=True).values).all()  # new classes claim nothing yet


def test_an_added_segment_becomes_a_new_class(pipeline, tmp_path):
    base = pipeline["trained"]
    source = pipeline["folders"][1]
    case = tmp_path / "added" / "cases" / source.name
    shutil.copytree(source, case)
    for name in ("labels.nrrd", "sagittal_labels.nrrd", "coronal_labels.nrrd", "axial_labels.nrrd"):
        image = sitk.ReadImage(str(case / name))
        labels = sitk.GetArrayFromImage(image)
        k, j, i = (np.array(labels.shape) * np.array([0.5, 0.3, 0.3])).astype(int)
        labels[k - 2 : k + 2, j - 6 : j + 6, i - 6 : i + 6] = 20  # the annotator's "Baker's cyst"
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(case / name))
    meta = json.loads((case / "case.json").read_text())
    meta["extra_labels"], meta["split"] = {"20": "Baker's cyst"}, "train"
    (case / "case.json").write_text(json.dumps(meta))
    cache = cache_case(base, case, tmp_path / "cache")
    config = FinetuneConfig(steps=10, patch_kji=(4, 24, 24), validation_cases=0, new_labels=True)
    new = finetune(base, [cache], tmp_path / "grown", config, device="cpu", log=lambda *_: None)
    names = [s["name"] for s in new.metadata["catalog"]["structures"]]
    assert names[-1] == "Baker's cyst" and len(names) == 12
    assert new.metadata["heads"]["config"]["n_classes"] == 13
    prediction = Predictor(new, device="cpu").predict(read_case(source).case)
    assert prediction.probabilities.shape[0] == 13 and prediction.catalog.structure("baker_s_cyst").label == 12
    with pytest.raises(Exception, match="no training case has a label"):
        finetune(base, [pipeline["caches"][0]], tmp_path / "none", config, device="cpu", log=lambda *_: None)
    # the same case without --new-labels: its added segment would train as background
    plain = FinetuneConfig(steps=2, patch_kji=(4, 24, 24), validation_cases=0)
    with pytest.raises(InputError, match="Baker's cyst") as refused:
        finetune(base, [cache], tmp_path / "plain", plain, device="cpu", log=lambda *_: None)
    assert "--new-labels" in refused.value.advice
    # a label value nobody named
    meta["extra_labels"] = {}
    (case / "case.json").write_text(json.dumps(meta))
    unnamed = cache_case(base, case, tmp_path / "cache2")
    with pytest.raises(InputError, match="label values 20"):
        finetune(base, [unnamed], tmp_path / "unnamed", plain, device="cpu", log=lambda *_: None)
    # features made by another backbone
    other = tmp_path / "other-cache"
    shutil.copytree(pipeline["caches"][0], other)
    entry = json.loads((other / "meta.json").read_text())
    entry["bundle_hash"] = "0123456789abcdef"
    (other / "meta.json").write_text(json.dumps(entry))
    with pytest.raises(InputError, match="made by the backbone of bundle 0123456789ab") as refused:
        finetune(base, [other], tmp_path / "other", plain, device="cpu", log=lambda *_: None)
    assert "--cases" in refused.value.advice


def test_added_views_leave_the_old_view_alone_and_weigh_each_voxel():
    from OrthoKneeLib.model.heads import HeadsConfig, OrthoKneeHeads, add_views

    torch.manual_seed(0)
    old = OrthoKneeHeads(HeadsConfig(view_channels={"sagittal": 8}, fused_channels=8, seg_widths=(8, 8, 8))).eval()
    grown = add_views(old, {"sagittal": 8, "coronal": 4, "axial": 4}).eval()
    assert grown.config.fusion == "per-voxel" and grown.segmentation.fusion.planes == ("sagittal", "coronal", "axial")
    feats = {"sagittal": torch.randn(1, 8, 4, 16, 16), "coronal": torch.randn(1, 4, 4, 16, 16)}
    cover = {p: torch.ones(1, 1, 4, 16, 16) for p in feats}
    image = torch.randn(1, 1, 4, 16, 16)
    sagittal_only = ({"sagittal": feats["sagittal"]}, {"sagittal": cover["sagittal"]})
    with torch.no_grad():
        a = old.segmentation.coarse_logits(*sagittal_only, image)
        b = grown.segmentation.coarse_logits(*sagittal_only, image)
        assert torch.allclose(a, b, atol=1e-5)  # the sagittal view alone: the old heads exactly
        both = grown.segmentation.coarse_logits(feats, cover, image)
        assert 0 < float((both - a).abs().max()) < float(a.abs().max())  # the new view starts faint
        # a per-voxel score moves the weight where the coronal features say so, nowhere else
        fusion = grown.segmentation.fusion
        fusion.score["coronal"].bias.fill_(0.0)
        fusion.score["coronal"].weight.zero_()
        fusion.score["coronal"].weight[:, 0] = 20.0
        mixed = fusion(feats, cover)
        coronal = fusion.project["coronal"](feats["coronal"])
        sagittal = fusion.project["sagittal"](feats["sagittal"])
    high = feats["coronal"][:, 0:1] > 1.0
    low = feats["coronal"][:, 0:1] < -1.0
    assert torch.allclose(mixed.masked_select(high), coronal.masked_select(high), atol=1e-3)
    assert torch.allclose(mixed.masked_select(low), sagittal.masked_select(low), atol=1e-3)
    # a coronal series alone is read through its own projection
    alone = grown.segmentation.fusion({"coronal": feats["coronal"]}, {"coronal": cover["coronal"]})
    assert torch.allclose(alone, grown.segmentation.fusion.project["coronal"](feats["coronal"]), atol=1e-5)


def test_training_the_fusion_moves_nothing_else(pipeline, tmp_path):
    caches = pipeline["caches"][:2]
    quiet = {"device": "cpu", "log": lambda *_: None}
    one_view = FinetuneConfig(steps=3, patch_kji=(4, 24, 24), validation_cases=0, views=("sagittal",))
    base = finetune(pipeline["base"], caches, tmp_path / "sagittal", one_view, **quiet)
    config = FinetuneConfig(
        steps=4, patch_kji=(4, 24, 24), validation_cases=0, views=("sagittal", "coronal", "axial"), train_heads="fusion"
    )
    new = finetune(base, caches, tmp_path / "three", config, **quiet)
    assert set(new.metadata["heads"]["config"]["view_channels"]) == {"sagittal", "coronal", "axial"}
    before = base.load_state(base.metadata["heads"]["weights"], "heads")
    after = new.load_state(new.metadata["heads"]["weights"], "heads")
    moved = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert moved and all(".fusion." in k for k in moved)


def test_a_new_finding_grows_the_finding_head_and_keeps_the_old_scores(pipeline, tmp_path):
    """A yes / no an annotator recorded for a finding the catalog lacks (case.json's extra_findings)
    becomes a new finding: the finding head grows, the old findings' scores stay as they were until
    training moves them, the catalog lists it, and the Predictor scores it with a map."""
    from OrthoKneeLib.model.heads import HeadsConfig, OrthoKneeHeads, grow_findings

    torch.manual_seed(0)
    config = HeadsConfig(view_channels={"sagittal": 6}, n_findings=3, fused_channels=8)
    old = OrthoKneeHeads(config).eval()
    grown = grow_findings(old, 2).eval()
    feats = {"sagittal": torch.randn(1, 6, 3, 5, 5)}
    cover = {"sagittal": torch.ones(1, 1, 3, 5, 5)}
    image, inside = torch.rand(1, 1, 3, 5, 5), torch.ones(1, 1, 3, 5, 5)
    with torch.no_grad():
        a, _, _ = old.findings(feats, cover, image, inside)
        b, _, _ = grown.findings(feats, cover, image, inside)
    assert b.shape == (1, 5) and torch.allclose(a, b[:, :3], atol=1e-5)
    assert (torch.sigmoid(b[:, 3:]) < 0.05).all()  # the new findings start unlikely

    base = pipeline["trained"]
    cases = []
    for n, source in enumerate(pipeline["folders"][:2]):
        case = tmp_path / "answered" / "cases" / source.name
        shutil.copytree(source, case)
        meta = json.loads((case / "case.json").read_text())
        meta["extra_findings"], meta["split"] = {"Baker's cyst": n % 2}, "train"
        (case / "case.json").write_text(json.dumps(meta))
        cases.append(cache_case(base, case, tmp_path / "cache"))
    plain = FinetuneConfig(steps=2, patch_kji=(4, 24, 24), validation_cases=0)
    with pytest.raises(InputError, match="Baker's cyst") as refused:
        finetune(base, cases, tmp_path / "plain", plain, device="cpu", log=lambda *_: None)
    assert "--new-labels" in refused.value.advice
    config = FinetuneConfig(steps=6, patch_kji=(4, 24, 24), validation_cases=0, new_labels=True)
    new = finetune(base, cases, tmp_path / "grown", config, device="cpu", log=lambda *_: None)
    assert [f["name"] for f in new.metadata["catalog"]["findings"]][-1] == "Baker's cyst"
    assert new.metadata["heads"]["config"]["n_findings"] == len(base.catalog.findings) + 1
    prediction = Predictor(new, device="cpu").predict(read_case(pipeline["folders"][2]).case)
    assert "baker_s_cyst" in prediction.finding_probabilities and "baker_s_cyst" in prediction.overlays
