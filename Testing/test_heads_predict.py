"""Fusion, heads, fine-tuning, evaluation and the Predictor, on tiny CPU configurations.

One session-scoped pipeline (conftest.py, shared with the bad-input tests): three synthetic SPL cases rendered from the real atlas, a tiny
three-view bundle (random backbones: the plumbing, not the accuracy, is under test here),
cached features, a short fine-tuning run. The shipped demo bundle's accuracy is measured by
`orthoknee evaluate` and reported in its model card.
"""

import json
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch", reason="torch is an engine dependency")


from OrthoKneeLib.bundle import Bundle, BundleError  # noqa: E402
from OrthoKneeLib.cli import main  # noqa: E402
from OrthoKneeLib.errors import InputError  # noqa: E402
from OrthoKneeLib.evaluate import roc_auc  # noqa: E402
from OrthoKneeLib.labels import DEFAULT_CATALOG  # noqa: E402
from OrthoKneeLib.model.device import DeviceError  # noqa: E402
from OrthoKneeLib.model.heads import (  # noqa: E402
    FindingHead,
    HeadsConfig,
    grid_of,
    marginal_seg_loss,
    resample_to_grid,
)
from OrthoKneeLib.predict import Predictor, window_scale_ladder  # noqa: E402
from OrthoKneeLib.progress import Cancelled, CancelToken  # noqa: E402
from OrthoKneeLib.segfile import read_seg_nrrd  # noqa: E402
from OrthoKneeLib.synth.dataset import read_case  # noqa: E402
from OrthoKneeLib.train import (  # noqa: E402
    CachedCase,
    FinetuneConfig,
    _axis_map,
    _upsample_patch,
    balanced_cell_loss,
    cache_case,
    finetune,
)
from OrthoKneeLib.volumes import Case  # noqa: E402

# ------------------------------------------------------------------------------ geometry


def _oriented(size, spacing, direction, origin):
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def test_fusion_resampling_matches_itk_in_physical_space():
    """A smooth field sampled by torch onto a differently oriented grid equals ITK's resampling."""
    src = _oriented((30, 26, 12), (1.0, 1.2, 3.0), (0, 0, -1, 1, 0, 0, 0, -1, 0), (10.0, -20.0, 30.0))
    dst = _oriented((40, 36, 10), (0.8, 0.8, 4.0), (1, 0, 0, 0, 0, 1, 0, -1, 0), (-25.0, -25.0, 20.0))
    k, j, i = np.meshgrid(*[np.arange(s) for s in src.GetSize()[::-1]], indexing="ij")
    field = np.sin(i / 5.0) + np.cos(j / 7.0) + 0.3 * k
    src_img = sitk.GetImageFromArray(field.astype(np.float32))
    src_img.CopyInformation(src)
    expected = sitk.GetArrayFromImage(sitk.Resample(src_img, dst, sitk.Transform(), sitk.sitkLinear, 0.0))
    got, coverage = resample_to_grid(torch.from_numpy(field.astype(np.float32))[None], grid_of(src), grid_of(dst))
    inside = coverage[0].numpy() > 0.999
    assert inside.mean() > 0.2 and (~inside).any()  # part of dst lies outside src: coverage says so
    assert np.abs(got[0].numpy()[inside] - expected[inside]).max() < 1e-3


def test_training_patches_upsample_exactly_like_whole_volumes(pipeline):
    """What a head sees from a patch during training equals what it sees at prediction time."""
    case = CachedCase(pipeline["caches"][0])
    coarse = torch.randn(3, *case.fusion_grid.size[::-1])
    whole, _ = resample_to_grid(coarse, case.fusion_grid, case.reference_grid)
    from OrthoKneeLib.train import _patch_boxes

    fbox, rbox, coords = _patch_boxes(case, (4, 16, 16), np.random.default_rng(3))
    patch = tuple(s.stop - s.start for s in fbox)
    up = _upsample_patch(coarse[(slice(None), *fbox)][None], coords, patch)[0]
    assert up.shape[1:] == whole[(slice(None), *rbox)].shape[1:]
    assert torch.allclose(up, whole[(slice(None), *rbox)], atol=1e-4)
    scale, _ = _axis_map(case.fusion_grid, case.reference_grid)
    assert np.all(scale < 1.0)  # the reference series is finer than the fusion grid in plane


# ------------------------------------------------------------------------------ losses and heads


def test_segmentation_loss_ignores_structures_a_case_does_not_annotate():
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    labels[..., :2] = 1  # class 1 annotated and present; class 2 not annotated (its voxels read 0)
    good = torch.zeros(1, 3, 2, 4, 4)
    good[:, 1, ..., :2] = 8
    good[:, 0, ..., 2:] = 8
    says_2 = good.clone()
    says_2[:, 2] = 20  # the net also says "class 2" everywhere
    not_annotated = torch.tensor([[True, True, False]])
    annotated = torch.tensor([[True, True, True]])
    ignored = marginal_seg_loss(says_2, labels, not_annotated)
    # class 2 is masked out of this case's softmax: its logits change nothing
    assert abs(float(ignored) - float(marginal_seg_loss(good, labels, not_annotated))) < 1e-4
    assert float(ignored) < 0.01
    # where the case does annotate class 2, claiming it everywhere is wrong and costs
    assert float(marginal_seg_loss(says_2, labels, annotated)) > float(ignored) + 1.0


def test_attention_is_a_distribution_over_covered_cells_and_overlays_are_bounded():
    config = HeadsConfig(view_channels={"sagittal": 6, "axial": 4}, n_findings=3)
    head = FindingHead(config)
    feats = {"sagittal": torch.randn(1, 6, 3, 5, 5), "axial": torch.randn(1, 4, 3, 5, 5)}
    cover = {"sagittal": torch.ones(1, 1, 3, 5, 5), "axial": torch.ones(1, 1, 3, 5, 5)}
    inside = torch.ones(1, 1, 3, 5, 5)
    inside[..., 0, :, :] = 0
    case_logits, logits, attention = head(feats, cover, torch.rand(1, 1, 3, 5, 5), inside)
    assert case_logits.shape == (1, 3)
    assert torch.allclose(attention.flatten(2).sum(-1), torch.ones(1, 3))
    assert float(attention[..., 0, :, :].detach().abs().sum()) == 0.0
    overlay = FindingHead.overlay(logits, attention).detach()
    assert float(overlay.min()) >= 0 and float(overlay.max()) <= 1
    # the case score is made of the cells: it equals the attention-weighted cell logits
    assert torch.allclose(case_logits, (attention * logits).flatten(2).sum(-1).detach())
    # one view alone still works (fusion renormalizes over the views present)
    alone, _, _ = head(
        {"sagittal": feats["sagittal"]}, {"sagittal": cover["sagittal"]}, torch.rand(1, 1, 3, 5, 5), inside
    )
    assert torch.isfinite(alone).all()


def test_host_anatomy_keeps_attention_and_so_the_case_score_on_the_host():
    """With hosts, a finding's attention (hence its case score and its map) lies on its host, so a
    high cell elsewhere, however high, cannot make the score; a finding whose host the
    segmentation found nowhere reads every cell, as heads without hosts do."""

    config = HeadsConfig(view_channels={"sagittal": 6}, n_findings=2, finding_hosts=True)
    head = FindingHead(config)
    feats, cover = {"sagittal": torch.randn(1, 6, 3, 5, 5)}, {"sagittal": torch.ones(1, 1, 3, 5, 5)}
    inside, image = torch.ones(1, 1, 3, 5, 5), torch.rand(1, 1, 3, 5, 5)
    hosts = torch.zeros(1, 2, 3, 5, 5)
    hosts[:, 0, 1, 1:3, 1:3] = 1.0  # finding 0: four cells; finding 1: no host found
    with torch.no_grad():
        free, logits, free_attention = head(feats, cover, image, inside)
        gated, _, attention = head(feats, cover, image, inside, hosts)
    on_host = hosts[:, 0] > 0
    assert float(attention[:, 0][~on_host].sum()) == 0.0
    assert float(free_attention[:, 0][~on_host].sum()) > 0.5  # without hosts it spreads over the knee
    on_host_score = (attention[:, 0][on_host] * logits[:, 0][on_host]).sum() / attention[:, 0][on_host].sum()
    assert float(gated[0, 0]) == pytest.approx(float(on_host_score), abs=0.05 * float(logits.abs().max()))
    # no host anywhere: the same softmax as without hosts (every cell weighed down alike)
    assert torch.allclose(attention[:, 1], free_attention[:, 1], atol=1e-6)
    assert torch.allclose(gated[0, 1], free[0, 1], atol=1e-5)
    overlay = FindingHead.overlay(logits, attention).detach()
    assert bool(on_host.flatten()[overlay[0, 0].flatten().argmax()])  # the map's peak is on the host
    # the map on the case score's scale: a score of p has host cells at p or above, none off the host
    with torch.no_grad():
        head.case_scale.fill_(2.0)
        head.case_bias.fill_(1.5)
        scored, logits, attention = head(feats, cover, image, inside, hosts)
        shown = head.map_cells(logits, attention, hosts)
    assert float(torch.sigmoid(scored[0, 0])) <= float(shown[:, 0][on_host].max()) + 1e-3
    assert float(shown[:, 0][~on_host].max()) == 0.0
    # bundles written before the field: no hosts
    assert (
        HeadsConfig.from_json({k: v for k, v in config.to_json().items() if k != "finding_hosts"}).finding_hosts
        is False
    )


def test_the_case_score_trains_the_attention_and_nothing_under_it():
    config = HeadsConfig(view_channels={"sagittal": 6}, n_findings=3)
    head = FindingHead(config)
    feats, cover = {"sagittal": torch.randn(1, 6, 3, 5, 5)}, {"sagittal": torch.ones(1, 1, 3, 5, 5)}
    case_logits, logits, _ = head(feats, cover, torch.rand(1, 1, 3, 5, 5), torch.ones(1, 1, 3, 5, 5))
    case_logits.sum().backward()
    assert head.attention_w.grad is not None and float(head.attention_w.grad.abs().sum()) > 0
    assert float(head.attention_v.weight.grad.abs().sum()) > 0
    under = [*head.trunk.parameters(), *head.cell_logits.parameters(), *head.fusion.parameters()]
    assert all(p.grad is None for p in under)
    # the cells are trained by their own loss, which does reach the trunk
    logits.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in head.trunk.parameters())


def test_attention_starts_from_the_cell_logits_unless_the_bundle_predates_it():
    config = HeadsConfig(view_channels={"sagittal": 6}, n_findings=2)
    head = FindingHead(config)
    with torch.no_grad():
        head.attention_w.zero_()  # no gate: attention is the softmax of the cells' logits
    feats, cover = {"sagittal": torch.randn(1, 6, 3, 5, 5)}, {"sagittal": torch.ones(1, 1, 3, 5, 5)}
    inside = torch.ones(1, 1, 3, 5, 5)
    _, logits, attention = head(feats, cover, torch.rand(1, 1, 3, 5, 5), inside)
    assert torch.allclose(attention.flatten(2), torch.softmax(logits.detach().flatten(2), dim=-1), atol=1e-6)
    old = HeadsConfig.from_json({k: v for k, v in config.to_json().items() if k != "attention_reads_logits"})
    assert old.attention_reads_logits is False  # heads trained without it keep their behaviour
    head_old = FindingHead(old)
    head_old.load_state_dict(head.state_dict())  # same weights, no new parameters
    _, _, flat = head_old(feats, cover, torch.rand(1, 1, 3, 5, 5), inside)
    assert torch.allclose(flat, torch.full_like(flat, 1 / 75))


def test_the_cell_loss_weighs_a_small_lesion_as_much_as_the_rest_of_the_knee():
    logits = torch.zeros(1, 2, 3, 10, 10)  # finding 0: one lesion cell of 300; finding 1: absent
    masks = torch.zeros_like(logits)
    masks[0, 0, 1, 4, 4] = 1
    inside = torch.ones(1, 1, 3, 10, 10)
    base = balanced_cell_loss(logits, masks, inside)
    assert torch.allclose(base, torch.tensor([[2 * np.log(2), np.log(2)]], dtype=torch.float32), atol=1e-5)
    found = logits.clone()
    found[0, 0, 1, 4, 4] = 10.0  # the one lesion cell right: about half the loss is gone
    assert float(base[0, 0] - balanced_cell_loss(found, masks, inside)[0, 0]) > 0.6
    # cells no view saw count for nothing
    unseen = inside.clone()
    unseen[..., 0, :, :] = 0
    wrong_there = logits.clone()
    wrong_there[..., 0, :, :] = 10.0
    assert torch.allclose(balanced_cell_loss(wrong_there, masks, unseen), balanced_cell_loss(logits, masks, unseen))


def test_hard_negative_cells_make_a_false_alarm_cost():
    """The mean over all other cells hardly feels a few high cells away from any lesion; the
    mean over the K highest of them does, and a lesion's own neighbours are not counted."""
    logits = torch.full((1, 1, 3, 20, 20), -4.0)  # 1200 cells, every one a confident "no"
    masks = torch.zeros_like(logits)
    inside = torch.ones(1, 1, 3, 20, 20)
    alarm = logits.clone()
    alarm[0, 0, 1, 2:4, 2:4] = 4.0  # four false-alarm cells, far from any lesion
    plain = float(balanced_cell_loss(alarm, masks, inside) - balanced_cell_loss(logits, masks, inside))
    hard = float(balanced_cell_loss(alarm, masks, inside, 4) - balanced_cell_loss(logits, masks, inside, 4))
    assert plain < 0.02 and hard > 3.9  # softplus(4) - softplus(-4) = 4.0 per alarm cell, averaged over K = 4
    # the gradient of the hard term lands on the alarm cells
    alarm.requires_grad_(True)
    balanced_cell_loss(alarm, masks, inside, 4).sum().backward()
    grad = alarm.grad[0, 0]
    assert float(grad[1, 2:4, 2:4].min()) > 100 * float(grad[0].max())
    # a high cell next to a lesion is the lesion's blurred edge, not a false alarm
    lesion = masks.clone()
    lesion[0, 0, 1, 10, 10] = 1
    edge = logits.clone()
    edge[0, 0, 1, 10, 11] = 4.0
    assert torch.allclose(
        balanced_cell_loss(edge, lesion, inside, 4) - balanced_cell_loss(edge, lesion, inside),
        balanced_cell_loss(logits, lesion, inside, 4) - balanced_cell_loss(logits, lesion, inside),
    )
    # hard_for: no hard term for a finding the case says nothing about where (accepted, no region)
    two = torch.cat([alarm, alarm], dim=1)
    both = balanced_cell_loss(two, torch.zeros_like(two), inside, 4)
    one = balanced_cell_loss(two, torch.zeros_like(two), inside, 4, hard_for=torch.tensor([[True, False]]))
    assert torch.allclose(one[0, 0], both[0, 0]) and torch.allclose(
        one[0, 1], balanced_cell_loss(alarm, masks, inside)[0, 0]
    )
    # cells no view saw are never hard negatives; with fewer clear cells than K, the mean is over those
    few = torch.zeros_like(inside)
    few[0, 0, 0, 0, :2] = 1
    assert torch.isfinite(balanced_cell_loss(alarm.detach(), masks, few, 32)).all()


def test_false_alarms_on_the_host_cost_as_much_as_a_missed_lesion():
    """With hosts, the host's lesion-free cells have a mean of their own: alarms over a tenth of
    the bone cost a loss of the order of a missed lesion, where the mean over the whole knee
    barely feels them; the same alarms off the host cost what they did."""
    logits = torch.full((1, 1, 3, 20, 20), -4.0)
    masks, inside = torch.zeros_like(logits), torch.ones(1, 1, 3, 20, 20)
    hosts = torch.zeros_like(logits)
    hosts[0, 0, :, :10, :] = 1.0  # half of the cells are bone
    on_host, off_host = logits.clone(), logits.clone()
    on_host[0, 0, :, :2, :] = 4.0  # a fifth of the bone cells lit
    off_host[0, 0, :, 10:12, :] = 4.0  # as many cells lit in soft tissue
    base = balanced_cell_loss(logits, masks, inside, hosts=hosts)
    assert float(balanced_cell_loss(on_host, masks, inside, hosts=hosts) - base) > 0.7
    assert float(balanced_cell_loss(on_host, masks, inside) - balanced_cell_loss(logits, masks, inside)) < 0.45
    off = balanced_cell_loss(off_host, masks, inside, hosts=hosts) - base
    assert torch.allclose(off, balanced_cell_loss(off_host, masks, inside) - balanced_cell_loss(logits, masks, inside))

    # hard negatives are the host's highest cells: lit soft tissue is not among them
    def hard_term(x):
        return balanced_cell_loss(x, masks, inside, 4, hosts=hosts) - balanced_cell_loss(x, masks, inside, hosts=hosts)

    assert torch.allclose(hard_term(off_host), hard_term(logits))
    assert float(hard_term(on_host)) > float(hard_term(logits)) + 3.9  # softplus(4) - softplus(-4)


def test_other_lesion_negatives_make_a_map_pay_for_another_findings_lesion():
    """Finding 0's map firing on finding 1's lesion: nearly free in the mean over all cells,
    the full cost with other_lesions; its own lesion, where the two overlap, is never counted."""
    logits = torch.full((1, 2, 3, 20, 20), -4.0)
    masks = torch.zeros_like(logits)
    masks[0, 1, 1, 2:4, 2:4] = 1  # finding 1's lesion, 4 cells
    masks[0, 0, 1, 15, 15] = 1  # finding 0's own lesion, far away
    inside = torch.ones(1, 1, 3, 20, 20)
    fires = logits.clone()
    fires[0, 0, 1, 2:4, 2:4] = 4.0
    quiet_plain, quiet_other = (
        balanced_cell_loss(logits, masks, inside),
        balanced_cell_loss(logits, masks, inside, 0, True),
    )
    plain = float(balanced_cell_loss(fires, masks, inside)[0, 0] - quiet_plain[0, 0])
    other = float(balanced_cell_loss(fires, masks, inside, 0, True)[0, 0] - quiet_other[0, 0])
    assert plain < 0.02 and other > 3.9
    # finding 1's map pays for its cells on finding 0's one-cell lesion: softplus(-4) there
    assert torch.allclose(quiet_other[0, 1] - quiet_plain[0, 1], torch.nn.functional.softplus(torch.tensor(-4.0)))
    overlap = masks.clone()
    overlap[0, 0, 1, 2:4, 2:4] = 1  # the same cells are finding 0's lesion too: nothing added for it
    assert torch.allclose(
        balanced_cell_loss(fires, overlap, inside, 0, True)[0, 0], balanced_cell_loss(fires, overlap, inside)[0, 0]
    )


# ------------------------------------------------------------------------------ finetune / evaluate


def test_finetune_writes_a_new_bundle_version_with_verified_heads(pipeline):
    trained, base = pipeline["trained"], pipeline["base"]
    reopened = Bundle.open(trained.path)  # verifies every sha256
    heads = reopened.metadata["heads"]
    assert heads["kind"] == "diffusion-heads" and heads["parameters"] > 1000
    assert reopened.metadata["version"] == "0.2.0" and reopened.metadata["parent"]["version"] == "0.1.0"
    assert reopened.hash == base.hash  # same frozen backbone: every cached feature stays valid
    training = heads["training"]
    assert training["final_loss"] < training["first_loss"]
    assert training["validation"] and 0 <= training["validation"][-1]["mean_dice"] <= 1
    with pytest.raises(Exception, match="already holds a bundle with trained heads"):
        finetune(base, pipeline["caches"][:1], trained.path, FinetuneConfig(steps=1), device="cpu")


def test_label_fraction_uses_a_subset_of_cases(pipeline, tmp_path):
    out = finetune(
        pipeline["base"],
        pipeline["caches"],
        tmp_path / "b",
        FinetuneConfig(steps=2, label_fraction=0.34),
        device="cpu",
        log=lambda *_: None,
    )
    assert out.metadata["heads"]["training"]["labelled_cases"] == 1
    assert out.metadata["heads"]["training"]["cases"] == 3


def test_oversampled_cases_take_their_share_of_the_steps():
    """A case matching --oversample GLOB=F is drawn F times as often as the others; without it
    the draws are the uniform ones earlier runs recorded."""
    from OrthoKneeLib.train import case_draw_weights, draw_case

    ids = ["oai-1-0000", "oai-1-0001", "spl-13-0000", "spl-13-0001"]
    assert case_draw_weights(ids, {}) is None
    p = case_draw_weights(ids, {"spl-13-*": 4})
    assert np.allclose(p, [1 / 10, 1 / 10, 4 / 10, 4 / 10])
    assert np.allclose(case_draw_weights(ids, {"spl-*": 2, "*-0001": 3}), np.array([1, 3, 2, 6]) / 12)  # product
    draws = [draw_case(np.random.default_rng([7, step]), len(ids), p) for step in range(4000)]
    assert 0.76 < np.isin(draws, [2, 3]).mean() < 0.84
    assert [draw_case(np.random.default_rng([7, s]), 4, None) for s in range(50)] == [
        int(np.random.default_rng([7, s]).integers(4)) for s in range(50)
    ]
    with pytest.raises(InputError, match="no training case id matches 'pymskt-\\*'"):
        case_draw_weights(ids, {"pymskt-*": 4})
    with pytest.raises(InputError, match="positive"):
        case_draw_weights(ids, {"spl-*": 0})


def test_finetune_records_its_oversampling(pipeline, tmp_path):
    from OrthoKneeLib.train import _replayed_steps

    one = CachedCase(pipeline["caches"][0]).case_id
    messages = []
    out = finetune(
        pipeline["base"],
        pipeline["caches"],
        tmp_path / "b",
        FinetuneConfig(steps=2, patch_kji=(4, 24, 24), validation_cases=0, oversample={one: 8}),
        device="cpu",
        log=messages.append,
    )
    assert out.metadata["heads"]["training"]["config"]["oversample"] == {one: 8}
    assert f"oversampling: {one} 80 % of the steps" in messages  # 8 / (8 + 1 + 1)
    previous = out.metadata["heads"]["training"]
    assert _replayed_steps(previous, FinetuneConfig(steps=2, oversample={one: 8}), 3) == 2
    assert _replayed_steps(previous, FinetuneConfig(steps=2), 3) == 0  # other draws: nothing replayed


def test_finetune_command_refuses_a_malformed_oversample(pipeline, capsys):
    for bad in ["spl-13-*", "spl-13-*=0", "=4", "spl-13-*=many"]:
        code = main(
            [
                "finetune",
                "--bundle",
                str(pipeline["base"].path),
                "--cases",
                str(pipeline["root"] / "cases"),
                "--out",
                "/nonexistent/never-written",
                "--oversample",
                bad,
            ]
        )
        assert code != 0
        assert "is not GLOB=FACTOR with a positive factor" in capsys.readouterr().err


def test_finetune_command_refuses_an_unmatched_oversample_before_caching(pipeline, capsys, tmp_path):
    code = main(
        [
            "finetune",
            "--bundle",
            str(pipeline["base"].path),
            "--cases",
            str(pipeline["root"] / "cases"),
            "--out",
            str(tmp_path / "never-written"),
            "--cache",
            str(tmp_path / "cache"),
            "--oversample",
            "nomatch-*=4",
        ]
    )
    assert code != 0
    assert "no training case id matches 'nomatch-*'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # no backbone pass was spent on it


def _heads_state(bundle):
    return bundle.load_state(bundle.metadata["heads"]["weights"], "heads")


def test_a_stopped_finetune_resumes_to_the_same_heads(pipeline, tmp_path):
    """Long CPU runs are stopped and restarted: the rerun resumes from the checkpoint and ends
    with the weights an uninterrupted run gets."""
    config = FinetuneConfig(steps=6, checkpoint_every=2, patch_kji=(4, 24, 24), validation_cases=0)
    straight = finetune(
        pipeline["base"], pipeline["caches"][:2], tmp_path / "straight", config, device="cpu", log=lambda *_: None
    )
    token = CancelToken()
    with pytest.raises(Cancelled):
        finetune(
            pipeline["base"],
            pipeline["caches"][:2],
            tmp_path / "stopped",
            config,
            device="cpu",
            log=lambda *_: None,
            cancel=token,
            progress=lambda done, total, msg: done == 3 and token.cancel(),
        )
    checkpoint = tmp_path / "stopped.checkpoint.pt"
    assert checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["step"] == 2  # plain data only
    messages = []
    resumed = finetune(
        pipeline["base"], pipeline["caches"][:2], tmp_path / "stopped", config, device="cpu", log=messages.append
    )
    assert any("resuming" in m and "step 2" in m for m in messages)
    assert not checkpoint.exists()  # a finished run leaves only the bundle
    a, b = _heads_state(straight), _heads_state(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_finetune_continues_from_the_bundle_heads_unless_told_otherwise(pipeline, tmp_path):
    """The annotator's loop refines the heads a bundle has; --from-scratch starts over."""
    trained = pipeline["trained"]
    config = FinetuneConfig(steps=1, learning_rate=1e-7, patch_kji=(4, 24, 24), validation_cases=0)
    messages = []
    refined = finetune(trained, pipeline["caches"][:1], tmp_path / "refined", config, device="cpu", log=messages.append)
    assert refined.metadata["heads"]["training"]["started_from"]["sha256"] == trained.metadata["heads"]["sha256"]
    assert any(m.startswith("continuing from") for m in messages)
    assert not any("same patches" in m for m in messages)  # trained on other cases: nothing replayed
    before, after = _heads_state(trained), _heads_state(refined)
    assert all(torch.allclose(before[k], after[k], atol=1e-4) for k in before)
    config.from_scratch = True
    fresh = finetune(trained, pipeline["caches"][:1], tmp_path / "fresh", config, device="cpu", log=lambda *_: None)
    assert fresh.metadata["heads"]["training"]["started_from"] is None
    assert not all(torch.allclose(before[k], v, atol=1e-4) for k, v in _heads_state(fresh).items())


def test_one_head_trains_and_the_other_keeps_its_weights_exactly(pipeline, tmp_path):
    """--train-heads findings (or segmentation): an experiment on one head cannot move the other."""
    trained = pipeline["trained"]
    before = _heads_state(trained)
    for which, moved, kept in (
        ("findings", "findings.", "segmentation."),
        ("segmentation", "segmentation.", "findings."),
    ):
        config = FinetuneConfig(
            steps=3,
            patch_kji=(4, 24, 24),
            validation_cases=0,
            train_heads=which,
            hard_negative_cells=8,
            other_lesion_negatives=True,
        )
        out = finetune(trained, pipeline["caches"][:2], tmp_path / which, config, device="cpu", log=lambda *_: None)
        after = _heads_state(out)
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(kept))
        assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith(moved))
        assert out.metadata["heads"]["training"]["config"]["train_heads"] == which


def test_attention_trains_alone_on_host_anatomy_and_the_bundle_says_so(pipeline, tmp_path):
    """--train-heads attention --finding-hosts: only the attention moves, the heads are written with
    finding_hosts on, and the new bundle predicts with each finding read from its host."""
    trained = pipeline["trained"]
    before = _heads_state(trained)
    config = FinetuneConfig(
        steps=3, patch_kji=(4, 24, 24), validation_cases=0, train_heads="attention", finding_hosts=True
    )
    out = finetune(trained, pipeline["caches"][:2], tmp_path / "hosts", config, device="cpu", log=lambda *_: None)
    after = _heads_state(out)
    attention = [k for k in before if k.startswith("findings.attention")]
    assert attention and not all(torch.equal(before[k], after[k]) for k in attention)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in attention)
    assert out.metadata["heads"]["config"]["finding_hosts"] is True
    prediction = Predictor(out, device="cpu").predict(read_case(pipeline["folders"][0]).case)
    assert all(0.0 <= p <= 1.0 for p in prediction.finding_probabilities.values())


def test_finding_hosts_need_trained_heads(pipeline, tmp_path):
    config = FinetuneConfig(steps=2, patch_kji=(4, 24, 24), validation_cases=0, finding_hosts=True, from_scratch=True)
    with pytest.raises(InputError, match="--finding-hosts"):
        finetune(pipeline["trained"], pipeline["caches"][:1], tmp_path / "x", config, device="cpu", log=lambda *_: None)


def test_one_head_alone_needs_the_other_trained(pipeline, capsys, tmp_path):
    """Refused before any feature is cached: a bundle without heads, --from-scratch, the baseline,
    or a negative hard-negative count."""
    base, trained = str(pipeline["base"].path), str(pipeline["trained"].path)
    cases = str(pipeline["root"] / "cases")
    for bundle, extra, message in (
        (base, [], "has no trained diffusion heads"),
        (trained, ["--from-scratch"], "--from-scratch starts both heads afresh"),
        (trained, ["--model", "baseline"], "the supervised baseline has no separate heads"),
        (trained, ["--train-heads", "both", "--hard-negative-cells", "-1"], "less than 0"),
    ):
        try:
            code = main(
                [
                    "finetune",
                    "--bundle",
                    bundle,
                    "--cases",
                    cases,
                    "--out",
                    str(tmp_path / "never-written"),
                    "--cache",
                    str(tmp_path / "cache"),
                    "--train-heads",
                    "findings",
                    *extra,
                ]
            )
        except SystemExit as exc:  # argparse refuses a negative count itself
            code = exc.code
        assert code != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_a_continuation_says_when_it_replays_the_previous_runs_patches():
    """Each step's patch comes from (seed, step): a continuation with the same seed and cases
    repeats the last run's batches, and the log says so."""
    from OrthoKneeLib.train import _replayed_steps

    previous = {"config": {"seed": 0, "steps": 3000, "model": "heads", "label_fraction": 1.0}, "cases": 52}
    assert _replayed_steps(previous, FinetuneConfig(steps=3000, seed=0), 52) == 3000
    assert _replayed_steps(previous, FinetuneConfig(steps=1000, seed=0), 52) == 1000
    assert _replayed_steps(previous, FinetuneConfig(steps=3000, seed=1), 52) == 0
    assert _replayed_steps(previous, FinetuneConfig(steps=3000, seed=0), 40) == 0
    assert _replayed_steps(previous, FinetuneConfig(steps=3000, seed=0, label_fraction=0.1), 52) == 0
    assert _replayed_steps({}, FinetuneConfig(steps=3000, seed=0), 52) == 0  # from scratch


def test_evaluate_command_prints_dice_hd95_and_auc(pipeline, capsys):
    folder = pipeline["root"] / "cases"
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(pipeline["trained"].path),
                "--cases",
                str(folder),
                "--cache",
                str(pipeline["root"] / "cache"),
                "--json",
                "--per-case",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) >= {"dice", "hd95", "auc", "per_case"}
    assert scores["finding_counts"]
    for key, counts in scores["finding_counts"].items():  # per-case truth adds up to the counts
        truth = [row["finding_truth"][key] for row in scores["per_case"] if key in row["finding_truth"]]
        assert (len(truth), sum(truth)) == (counts["cases"], counts["positive"])
    assert set(scores["dice"]) <= set(pipeline["base"].catalog.structure_keys) and "femur" in scores["dice"]
    assert all(0 <= v <= 1 for v in scores["dice"].values())
    assert all(v >= 0 for v in scores["hd95"].values())
    assert scores["cases"] == 3
    assert scores["warnings"]  # two of these cases trained the heads: the command says so
    # the finding maps scored against the lesion masks, for every finding with a lesion
    with_lesion = {k for k, c in scores["finding_counts"].items() if c["positive"]}
    assert with_lesion and set(scores["cell_auc"]) == set(scores["overlay_auc"])
    assert set(scores["cell_auc"]) <= with_lesion and set(scores["cell_auc"])
    assert all(0 <= v <= 1 for v in [*scores["cell_auc"].values(), *scores["overlay_auc"].values()])
    # how much of each map's cells is lit, per case: no more than the cells the case has
    for row in scores["per_case"]:
        lit = row["cells_over_half_ml"]
        assert set(lit) == set(pipeline["base"].catalog.finding_keys)
        assert all(0 <= v < 10_000 for v in lit.values())
    # how often a positive case's map peaks on its lesion, counted over the positive cases
    for key, peak in scores["peak_in_lesion"].items():
        assert peak["cases"] == scores["finding_counts"][key]["positive"] and 0 <= peak["share"] <= 1
    # each case's render contrast, from its case.json, and Dice per contrast
    contrasts = {f.name: json.loads((f / "case.json").read_text())["contrast"]["contrast"] for f in pipeline["folders"]}
    assert {row["case_id"]: row["contrast"] for row in scores["per_case"]} == contrasts
    assert {c: g["cases"] for c, g in scores["by_contrast"].items()} == {
        c: list(contrasts.values()).count(c) for c in set(contrasts.values())
    }
    assert scores["postprocessing"].startswith("largest connected component of femur")
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(pipeline["trained"].path),
                "--cases",
                str(folder),
                "--no-hd95",
                "--raw",
                "--cache",
                str(pipeline["root"] / "cache"),
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["postprocessing"] == "none"


def test_each_bone_is_kept_in_one_piece_and_cartilage_plates_are_not():
    from OrthoKneeLib.postprocess import labelmap_from_probabilities

    femur, plate = DEFAULT_CATALOG.structure("femur").label, DEFAULT_CATALOG.structure("tibial_cartilage").label
    truth = np.zeros((6, 30, 30), np.uint8)
    truth[1:5, 2:20, 2:20] = femur  # the bone
    truth[2:4, 25:28, 25:28] = femur  # an island in the soft tissue
    truth[5, 22:24, 2:6] = plate  # medial and lateral halves of a plate: two pieces, both kept
    truth[5, 22:24, 10:14] = plate
    probabilities = np.eye(len(DEFAULT_CATALOG.structures) + 1, dtype=np.float32)[truth].transpose(3, 0, 1, 2)
    cleaned = labelmap_from_probabilities(probabilities, DEFAULT_CATALOG)
    assert (cleaned[1:5, 2:20, 2:20] == femur).all() and (cleaned[2:4, 25:28, 25:28] == 0).all()
    assert np.array_equal(cleaned == plate, truth == plate)
    assert np.array_equal(labelmap_from_probabilities(probabilities, DEFAULT_CATALOG, postprocess=False), truth)


def test_dice_by_contrast_groups_the_per_case_rows():
    from OrthoKneeLib.evaluate import dice_by_contrast, format_table

    rows = [
        {"case_id": "a", "contrast": "t2", "dice": {"femur": 0.5, "tibia": 0.25}},
        {"case_id": "b", "contrast": "t2", "dice": {"femur": 0.7}},
        {"case_id": "c", "contrast": "dess", "dice": {"femur": 0.9, "tibia": 0.8}},
        {"case_id": "real", "contrast": None, "dice": {"femur": 0.1}},
    ]  # real cases: no contrast
    groups = dice_by_contrast(rows)
    assert list(groups) == ["dess", "t2"]
    assert groups["t2"]["cases"] == 2 and groups["t2"]["dice"] == pytest.approx({"femur": 0.6, "tibia": 0.25})
    assert groups["t2"]["mean_dice"] == pytest.approx(0.425)
    assert groups["dess"]["dice"] == pytest.approx({"femur": 0.9, "tibia": 0.8})
    assert dice_by_contrast(rows[3:]) == {}
    table = format_table({"dice": {"femur": 0.675}, "hd95": {}, "auc": {}, "by_contrast": groups}, DEFAULT_CATALOG)
    section = table.split("Dice by contrast")[1].splitlines()
    assert "dess (1)" in section[0] and "t2 (2)" in section[0]
    assert section[1].split() == ["femur", "0.900", "0.600"] and section[-1].split() == ["mean", "0.850", "0.425"]


def test_evaluate_reports_progress_case_by_case(pipeline):
    from OrthoKneeLib.evaluate import evaluate_cached
    from OrthoKneeLib.predict import load_heads

    kind, heads = load_heads(pipeline["trained"])
    cases = [CachedCase(c) for c in pipeline["caches"]]
    seen = []
    evaluate_cached(
        kind,
        heads,
        cases,
        pipeline["trained"].catalog,
        with_hd95=False,
        progress=lambda done, total, message: seen.append((done, total, message)),
    )
    assert seen == [(n + 1, len(cases), c.case_id) for n, c in enumerate(cases)]


def test_roc_auc_by_ranks_matches_the_pairwise_definition():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size
    )
    assert roc_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5 and roc_auc([0.2, 0.3], [1, 1]) is None


def test_the_baseline_runs_no_backbone_it_does_not_read(pipeline, tmp_path):
    """The supervised baseline reads the reference image only: evaluating it reuses whatever
    cache entry a case has, and a case without one gets the reference view's entry alone."""
    from OrthoKneeLib.evaluate import evaluate_bundle

    config = FinetuneConfig(steps=2, model="baseline", validation_cases=0)
    baseline = finetune(
        pipeline["base"], pipeline["caches"][:1], tmp_path / "baseline", config, device="cpu", log=lambda *_: None
    )
    shared = pipeline["root"] / "cache"
    entries = set(shared.iterdir())
    scores = evaluate_bundle(baseline, pipeline["folders"], shared, device="cpu", with_hd95=False)
    assert set(shared.iterdir()) == entries and scores["cases"] == 3 and "femur" in scores["dice"]
    fresh = tmp_path / "fresh-cache"
    evaluate_bundle(baseline, pipeline["folders"][:1], fresh, device="cpu", with_hd95=False)
    (entry,) = fresh.iterdir()
    assert json.loads((entry / "meta.json").read_text())["planes"] == ["sagittal"]
    sagittal_only = Case(sagittal=read_case(pipeline["folders"][0]).case.views["sagittal"])
    prediction = Predictor(baseline, device="cpu").predict(sagittal_only)
    assert prediction.labelmap.shape == sitk.GetArrayFromImage(sagittal_only.reference.image).shape
    assert not [w for w in prediction.warnings if "series" in w]  # no view is "missing" to it


def test_a_bundle_without_heads_cannot_predict(pipeline):
    with pytest.raises(BundleError, match="no trained heads"):
        Predictor(pipeline["base"])


# ------------------------------------------------------------------------------ predictor


@pytest.fixture(scope="module")
def predictor(pipeline):
    return Predictor(pipeline["trained"], device="cpu")


@pytest.fixture(scope="module")
def case(pipeline):
    return read_case(pipeline["folders"][2]).case


@pytest.fixture(scope="module")
def prediction(predictor, case):
    return predictor.predict(case)


def test_prediction_is_on_the_reference_grid(predictor, case, prediction):
    ref = case.reference.image
    assert prediction.labelmap.shape == sitk.GetArrayViewFromImage(ref).shape
    image = prediction.labelmap_image()
    assert image.GetOrigin() == ref.GetOrigin() and image.GetDirection() == ref.GetDirection()
    assert np.allclose(prediction.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-2)
    assert set(prediction.finding_probabilities) == set(predictor.bundle.catalog.finding_keys)
    assert all(0 < p < 1 for p in prediction.finding_probabilities.values())
    for overlay in prediction.overlays.values():
        assert overlay.shape == prediction.labelmap.shape and overlay.min() >= 0 and overlay.max() <= 1
    assert set(prediction.measurements["volume_ml"]) == set(predictor.bundle.catalog.structure_keys)
    assert prediction.timings["total"] > 0
    # the tiny test model reads no real knee: only the plausibility checks (and a score without a place on its
    # anatomy) may warn, and the checks must have run
    assert prediction.plausibility["checks"]
    expected = ("this does not look like a knee", "implausible reading", "a score without a place")
    assert all(any(e in w for e in expected) for w in prediction.warnings), prediction.warnings


def test_a_missing_view_still_runs_with_a_warning(predictor, case):
    sagittal_only = Case(sagittal=case.views["sagittal"])
    prediction = predictor.predict(sagittal_only)
    assert prediction.labelmap.shape == sitk.GetArrayViewFromImage(case.reference.image).shape
    assert any("no coronal series" in w for w in prediction.warnings)
    assert any("no axial series" in w for w in prediction.warnings)
    no_sagittal = Case(coronal=case.views["coronal"], axial=case.views["axial"])
    prediction = predictor.predict(no_sagittal)
    assert prediction.reference_plane == "coronal"
    assert prediction.labelmap.shape == sitk.GetArrayViewFromImage(case.views["coronal"].image).shape


def test_heads_that_fuse_one_view_skip_the_other_backbones(pipeline, case, tmp_path):
    """Heads trained on the sagittal features alone: the Predictor runs only that backbone and
    says the other series were not used; a case without a sagittal series is a clear error."""
    single = finetune(
        pipeline["base"],
        pipeline["caches"][:2],
        tmp_path / "sag",
        FinetuneConfig(steps=2, patch_kji=(4, 24, 24), validation_cases=0, views=("sagittal",)),
        device="cpu",
        log=lambda *_: None,
    )
    assert list(single.metadata["heads"]["config"]["view_channels"]) == ["sagittal"]
    predictor = Predictor(single, device="cpu")
    result = predictor.predict(case)
    assert result.views == ["sagittal"]
    assert "features_sagittal" in result.timings and "features_coronal" not in result.timings
    assert any("do not use the coronal view" in w for w in result.warnings)
    without = Case(coronal=case.views["coronal"], axial=case.views["axial"])
    with pytest.raises(BundleError, match="need the sagittal series"):
        predictor.predict(without)


def test_cache_of_a_view_subset_holds_only_those_views_and_matches_the_full_cache(pipeline, tmp_path):
    """Caching only the sagittal features (what one-view heads need) is its own cache entry,
    with the same sagittal features as the full entry; naming every view is the full entry."""
    folder, full = pipeline["folders"][0], CachedCase(pipeline["caches"][0])
    subset = CachedCase(cache_case(pipeline["base"], folder, tmp_path, views=["sagittal"]))
    assert subset.planes == ["sagittal"] and full.planes == ["sagittal", "coronal", "axial"]
    np.testing.assert_array_equal(subset.array("features_sagittal"), full.array("features_sagittal"))
    np.testing.assert_array_equal(subset.array("labels_fusion"), full.array("labels_fusion"))
    every = cache_case(pipeline["base"], folder, pipeline["root"] / "cache", views=["axial", "coronal", "sagittal"])
    assert every == pipeline["caches"][0]


def test_the_cache_holds_8_bit_features_that_read_back_within_half_a_step(pipeline):
    """Each channel's codes span its own range; what training and evaluation read is the
    Predictor's float32 features to within half a step."""
    from OrthoKneeLib.featurecache import QuantizedArray
    from OrthoKneeLib.predict import fusion_inputs

    cached = CachedCase(pipeline["caches"][0])
    assert np.load(cached.folder / "features_sagittal.npy", mmap_mode="r").dtype == np.uint8
    lazy = cached.array("features_sagittal")
    assert isinstance(lazy, QuantizedArray)
    fresh = fusion_inputs(pipeline["base"], read_case(pipeline["folders"][0]).case)
    for plane, values in cached.fusion_inputs().features.items():
        assert values.dtype == np.float32 and values.shape == fresh.features[plane].shape
        step = np.ptp(fresh.features[plane].reshape(len(values), -1), axis=1) / 255
        error = np.abs(values - fresh.features[plane]).reshape(len(values), -1).max(1)
        assert np.all(error <= step / 2 + 1e-5), plane
    assert np.array_equal(lazy[:, 1:3, 4:9, 2:6], np.asarray(lazy)[:, 1:3, 4:9, 2:6])


def test_cancel_from_another_thread_stops_within_a_second(predictor, case):
    token = CancelToken()
    when = {}

    def progress(done, total, message=""):
        if message.startswith("features: coronal") and "cancelled" not in when:
            threading.Timer(0.05, lambda: (when.setdefault("cancelled", time.perf_counter()), token.cancel())).start()

    with pytest.raises(Cancelled):
        predictor.predict(case, progress=progress, cancel=token)
    assert time.perf_counter() - when["cancelled"] < 1.0


def test_cuda_on_a_cuda_less_machine_is_a_clear_error(pipeline):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CUDA-less path cannot be exercised here")
    with pytest.raises(DeviceError, match="no usable CUDA"):
        Predictor(pipeline["trained"], device="cuda")
    assert Predictor(pipeline["trained"], device="auto").device.type == "cpu"  # auto falls back


def _out_of_memory_above(limit: float, calls: list):
    def run(scale):
        calls.append(scale)
        if scale > limit:
            raise torch.OutOfMemoryError(f"simulated: windows at {scale} do not fit")
        return f"features at {scale}"

    return run


def test_out_of_memory_shrinks_the_windows_then_falls_back_to_the_cpu():
    """The CUDA ladder, run on the CPU with a backbone pass that runs out of memory above a
    window scale: it halves down to a quarter, says so, and only then uses the CPU."""
    calls, warnings = [], []
    result, on_cpu = window_scale_ladder(
        _out_of_memory_above(0.5, calls),
        lambda: "cpu features",
        window_voxels=256 * 256 * 16,
        free_bytes=2**40,
        plane="coronal",
        warnings=warnings,
    )
    assert (result, on_cpu, calls) == ("features at 0.5", False, [1.0, 0.5])
    assert warnings == ["coronal: GPU out of memory; retrying with windows scaled by 0.5."]

    calls, warnings = [], []
    result, on_cpu = window_scale_ladder(
        _out_of_memory_above(0.0, calls),
        lambda: "cpu features",
        window_voxels=256 * 256 * 16,
        free_bytes=2**40,
        plane="axial",
        warnings=warnings,
    )
    assert (result, on_cpu, calls) == ("cpu features", True, [1.0, 0.5, 0.25])
    assert "ran on the CPU" in warnings[-1] and len(warnings) == 3


def test_little_free_gpu_memory_starts_with_smaller_windows():
    calls, warnings = [], []
    window_voxels = 256 * 256 * 16  # about 1.26 GB of activations at full scale
    result, on_cpu = window_scale_ladder(
        _out_of_memory_above(1.0, calls),
        lambda: "cpu features",
        window_voxels=window_voxels,
        free_bytes=window_voxels * 1200 // 3,
        plane="sagittal",
        warnings=warnings,
    )
    assert calls == [0.5] and not on_cpu  # 1/4 of the memory at half scale fits in 80 % of a third
    assert "windows scaled by 0.5" in warnings[0]


def test_the_memory_pre_flight_sizes_the_window_the_view_will_get(pipeline):
    """Tiny views use 64 x 64 x 16 windows (i, j, k): clipped to the view in plane, and over all
    40 slices when the bundle's windows span the slices (what the GPU has to hold at once)."""
    from OrthoKneeLib.predict import _window_voxels

    bundle = Bundle.open(pipeline["base"].path)
    assert bundle.features["span_slices"] is True and bundle.span_slices  # the default for new bundles
    assert _window_voxels(bundle, "coronal", (40, 100, 30)) == 30 * 64 * 40
    bundle.metadata["features"].pop("span_slices")  # as bundles made before it
    assert not bundle.span_slices
    assert _window_voxels(bundle, "coronal", (40, 100, 30)) == 30 * 64 * 16


def test_heads_out_of_memory_reruns_them_on_the_cpu(pipeline, case, monkeypatch):
    import OrthoKneeLib.predict as predict_module

    real, calls = predict_module.run_heads, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(kwargs.get("device"))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated: the heads do not fit")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "run_heads", out_of_memory_once)
    result = Predictor(pipeline["trained"], device="cpu").predict(case)
    assert len(calls) == 2 and calls[1] == "cpu"
    assert "GPU out of memory in the heads; they ran on the CPU." in result.warnings
    assert result.labelmap.shape == sitk.GetArrayViewFromImage(case.reference.image).shape


# ------------------------------------------------------------------------------ saving


def test_save_writes_a_slicer_segmentation_overlays_and_findings(predictor, case, prediction, tmp_path):
    written = prediction.save(tmp_path)
    labels, segments = read_seg_nrrd(written["structures"])
    assert np.array_equal(sitk.GetArrayFromImage(labels), prediction.labelmap)
    catalog = predictor.bundle.catalog
    assert [s.name for s in segments] == [s.name for s in catalog.structures]
    assert [s.color for s in segments] == [s.color for s in catalog.structures]
    assert segments[0].terminology == catalog.structures[0].terminology.slicer_string()
    overlay = sitk.ReadImage(str(tmp_path / "overlays" / "joint_effusion.nrrd"))
    assert overlay.GetSize() == labels.GetSize() and overlay.GetOrigin() == labels.GetOrigin()
    assert np.abs(sitk.GetArrayFromImage(overlay) - prediction.overlays["joint_effusion"]).max() <= 5e-4 + 1e-7
    summary = json.loads((tmp_path / "findings.json").read_text())
    assert summary["findings"]["joint_effusion"]["probability"] == pytest.approx(
        prediction.finding_probabilities["joint_effusion"], abs=1e-4
    )
    assert summary["bundle"]["version"] == "0.2.0" and set(summary["input_sha256"]) == set(case.planes)
    assert summary["knee_side"] == prediction.knee_side and summary["knee_side"]["side"] in ("left", "right", None)
    assert summary["knee_side"]["from"]  # how the side was told, or why it could not be
    assert not list(tmp_path.rglob("*.tmp*"))


def test_slicer_reads_the_segmentation_with_names_colors_and_terminology(predictor, case, prediction, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test dependencies")
    path = prediction.save(tmp_path)["structures"]
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    catalog = predictor.bundle.catalog
    assert segmentation.GetNumberOfSegments() == len(catalog.structures)
    for n, structure in enumerate(catalog.structures):
        segment = segmentation.GetSegment(structure.key)
        assert segment.GetName() == structure.name and segment.GetLabelValue() == structure.label
        assert np.allclose(segment.GetColor(), np.array(structure.color) / 255, atol=1e-3)
        assert segment.GetTerminology() == structure.terminology.slicer_string()


def test_a_rerun_never_overwrites_an_edited_segmentation(predictor, case, prediction, tmp_path):
    prediction.save(tmp_path)
    prediction.save(tmp_path)  # untouched: refreshed in place
    assert not (tmp_path / "structures-2.seg.nrrd").exists()
    labels, segments = read_seg_nrrd(tmp_path / "structures.seg.nrrd")
    edited = sitk.GetArrayFromImage(labels)
    edited[edited.shape[0] // 2, :10, :10] = 3  # the user painted something
    from OrthoKneeLib.segfile import Segment, write_seg_nrrd

    out = sitk.GetImageFromArray(edited)
    out.CopyInformation(labels)
    write_seg_nrrd(
        out, [*segments, Segment("my_label", "Annotator's label", 12, (10, 20, 30))], tmp_path / "structures.seg.nrrd"
    )
    before = (tmp_path / "structures.seg.nrrd").read_bytes()
    prediction.save(tmp_path)
    assert (tmp_path / "structures.seg.nrrd").read_bytes() == before
    assert (tmp_path / "structures-2.seg.nrrd").is_file()
    assert any("was edited" in w for w in json.loads((tmp_path / "findings.json").read_text())["warnings"])


def test_an_interrupted_save_leaves_no_half_file(predictor, case, prediction, tmp_path):
    token = CancelToken()
    calls = []
    original = sitk.WriteImage

    def write_then_cancel(*args, **kwargs):  # cancel arrives while the first overlay is written
        calls.append(args[1])
        if "overlays" in str(args[1]) or ".joint_effusion" in str(args[1]):
            token.cancel()
        return original(*args, **kwargs)

    sitk.WriteImage = write_then_cancel
    try:
        with pytest.raises(Cancelled):
            prediction.save(tmp_path, cancel=token)
    finally:
        sitk.WriteImage = original
    assert calls  # the save did start
    assert not list(tmp_path.rglob("*.tmp*"))
    for f in tmp_path.rglob("*.nrrd"):
        sitk.ReadImage(str(f))  # every file that exists is whole
    assert not (tmp_path / "findings.json").exists()  # the summary is written last
