"""`orthoknee evaluate --compare`: paired differences between two models' per-case scores."""

import json

import numpy as np
import pytest

from OrthoKneeLib import compare as ct
from OrthoKneeLib.cli import main
from OrthoKneeLib.evaluate import roc_auc


def _eval(dice_femur: list[float], probs: list[float], truth: list[bool]) -> dict:
    rows = [
        {
            "case_id": f"c{i}",
            "dice": {"femur": d, "fibula": None},
            "hd95": {"femur": 2.0 - d, "fibula": None},
            "findings": {"acl_tear": p},
            "finding_truth": {"acl_tear": t},
        }
        for i, (d, p, t) in enumerate(zip(dice_femur, probs, truth))
    ]
    return {"dice": {"femur": float(np.mean(dice_femur)), "fibula": None}, "auc": {"acl_tear": 0.5}, "per_case": rows}


def test_auc_counts_ties_half_and_needs_both_classes():
    truth = np.array([True, True, False, False])
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), truth) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), truth) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), truth) == 0.5
    assert roc_auc(np.array([0.9, 0.8]), np.array([True, True])) is None


def test_paired_dice_and_auc_say_which_model_is_better():
    truth = [True, False] * 5
    a = ct._per_case(_eval([0.80] * 10, [0.5] * 10, truth), "a")
    b = ct._per_case(_eval([0.85 + 0.01 * (i % 2) for i in range(10)], [0.9 if t else 0.1 for t in truth], truth), "b")
    cases = sorted(a)
    rng = np.random.default_rng(0)
    d = ct.paired_metric(a, b, cases, "dice", "femur", rng, 500)
    assert d["n"] == 10 and d["b_better"] == 10 and d["diff"] == pytest.approx(0.055)
    assert 0.05 <= d["lo"] <= d["diff"] <= d["hi"] <= 0.06
    h = ct.paired_metric(a, b, cases, "hd95", "femur", rng, 500, lower_is_better=True)
    assert h["diff"] == pytest.approx(0.055)  # shorter distances for B count as better
    assert ct.paired_metric(a, b, cases, "dice", "fibula", rng, 500) is None  # scored on no case
    r = ct.paired_auc(a, b, cases, "acl_tear", rng, 200)
    assert (r["a"], r["b"], r["positive"]) == (0.5, 1.0, 5) and r["diff"] == 0.5 and r["lo"] <= 0.5 <= r["hi"]


def test_evaluate_compare_prints_the_table_and_explains_a_missing_per_case(tmp_path, capsys):
    truth = [True, False] * 3
    (tmp_path / "a.json").write_text(json.dumps(_eval([0.9] * 6, [0.4] * 6, truth)))
    (tmp_path / "b.json").write_text(json.dumps(_eval([0.7] * 6, [0.6 if t else 0.2 for t in truth], truth)))
    argv = [
        "evaluate",
        "--compare",
        str(tmp_path / "a.json"),
        str(tmp_path / "b.json"),
        "--names",
        "old",
        "new",
        "--bootstrap",
        "100",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "A = old, B = new; 6 cases scored by both" in out
    assert "| femur | 0.900 | 0.700 | -0.200 (-0.200 to -0.200) | 0 of 6 |" in out
    assert "| acl_tear | 0.500 | 1.000 | +0.500" in out
    (tmp_path / "c.json").write_text(json.dumps({"dice": {}}))
    assert main(["evaluate", "--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    assert "--per-case" in capsys.readouterr().err


def test_auc_intervals_and_calibration_say_what_they_should():
    from OrthoKneeLib.evaluate import auc_interval, calibration

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    separable = labels + rng.normal(0, 0.3, 200)
    lo, hi = auc_interval(separable, labels, resamples=500)
    assert 0.9 < lo < hi <= 1.0
    lo, hi = auc_interval(rng.random(200), labels, resamples=500)
    assert lo < 0.5 < hi  # chance: the interval holds 0.5
    assert auc_interval([0.1, 0.9, 0.8], [0, 1, 1]) is None  # one negative: nothing to resample
    p = rng.random(5000)
    calibrated = calibration(list(zip(p, (rng.random(5000) < p).astype(int))))
    assert calibrated["ece"] < 0.03 and sum(b["n"] for b in calibrated["bins"]) == 5000
    overconfident = calibration(list(zip(np.where(p > 0.5, 0.95, 0.05), (rng.random(5000) < p).astype(int))))
    assert overconfident["ece"] > 0.15
