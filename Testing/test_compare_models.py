"""The model card's 10 %-label comparison (bench/compare_models.py) computes what it says."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_models.py"
spec = importlib.util.spec_from_file_location("compare_models", SCRIPT)
compare_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_models)


def _scores(per_case: dict[str, dict[str, float]]) -> dict:
    structures = sorted({s for d in per_case.values() for s in d})
    dice = {
        s: sum(d[s] for d in per_case.values() if s in d) / sum(s in d for d in per_case.values()) for s in structures
    }
    return {
        "dice": dice,
        "hd95": {s: 1.0 for s in structures},
        "auc": {"effusion": 0.5},
        "finding_counts": {"effusion": {"cases": len(per_case), "positive": 1}},
        "mean_dice": sum(dice.values()) / len(dice),
        "cases": len(per_case),
        "per_case": [{"case_id": c, "dice": d} for c, d in per_case.items()],
    }


def _write(folder: Path, heads10: float, baseline10: float) -> None:
    cases = [f"case-{i}" for i in range(6)]
    full = {c: {"femur": 0.8, "tibia": 0.7} for c in cases}
    runs = {
        "heads-100": full,
        "baseline-100": full,
        "heads-10": {c: {"femur": heads10, "tibia": heads10 - 0.1} for c in cases},
        "baseline-10": {c: {"femur": baseline10 + 0.01 * i, "tibia": baseline10 - 0.1} for i, c in enumerate(cases)},
    }
    for name, per_case in runs.items():
        (folder / f"v9-{name}.eval.json").write_text(json.dumps(_scores(per_case)))


def test_paired_loss_sign_and_count(tmp_path):
    _write(tmp_path, heads10=0.7, baseline10=0.3)  # heads lose 0.1, the baseline ~0.4-0.45
    scores = {name: json.loads((tmp_path / f"v9-{name}.eval.json").read_text()) for name, _ in compare_models.RUNS}
    line = compare_models.paired_loss_comparison(scores, resamples=500)
    assert "n = 6" in line and "the heads lose less on 6 of 6 cases" in line
    assert "= +0.3" in line  # mean difference 0.4 - 0.1 minus the 0.005 mean of the baseline's jitter

    _write(tmp_path, heads10=0.2, baseline10=0.7)  # now the heads lose more
    scores = {name: json.loads((tmp_path / f"v9-{name}.eval.json").read_text()) for name, _ in compare_models.RUNS}
    assert "the heads lose less on 0 of 6 cases" in compare_models.paired_loss_comparison(scores, resamples=500)


def test_table_from_the_command_line(tmp_path):
    _write(tmp_path, heads10=0.7, baseline10=0.3)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--prefix", "v9-", "--bootstrap", "200"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "| femur | 0.800 | 0.700 | 0.800 | 0.325 |" in out
        and "| effusion | 0.500 (0.00-1.00) | 0.500 (0.00-1.00) | 6 (1) |" in out
    )
    assert "- heads: mean Dice 0.750 (100 %) -> 0.650 (10 %), lost 0.100 (13 % of" in out


def test_needs_per_case_scores(tmp_path):
    _write(tmp_path, heads10=0.7, baseline10=0.3)
    scores = {name: json.loads((tmp_path / f"v9-{name}.eval.json").read_text()) for name, _ in compare_models.RUNS}
    del scores["heads-10"]["per_case"]
    with pytest.raises(SystemExit, match="--per-case"):
        compare_models.paired_loss_comparison(scores, resamples=10)


def test_auc_interval():
    # Hanley & McNeil at A = 0.5, 10 + 10 cases: SE^2 = (0.25 + 9/12 + 9/12) / 100
    lo, hi = compare_models.auc_interval(0.5, 10, 10)
    assert hi - 0.5 == pytest.approx(1.96 * 0.0175**0.5) and lo == pytest.approx(1 - hi)
    narrow = compare_models.auc_interval(0.5, 100, 100)
    assert narrow[1] - narrow[0] < (hi - lo) / 3  # ten times the cases, about a third of the width
    assert compare_models.auc_interval(0.95, 5, 5)[1] == 1.0
    perfect = compare_models.auc_interval(1.0, 5, 5)
    assert perfect[1] == 1.0 and 0.8 < perfect[0] < 0.95  # not a zero-width interval at the edge
    assert compare_models.auc_interval(0.0, 1, 19) == (0.0, 1.0)  # one positive case says nothing
