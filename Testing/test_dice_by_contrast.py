"""bench/dice_by_contrast.py: per-contrast Dice from evaluate outputs, old ones completed from case folders."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dice_by_contrast.py"


def _case(folder: Path, case_id: str, contrast: str) -> None:
    folder.mkdir(parents=True)
    (folder / "case.json").write_text(json.dumps({"case_id": case_id, "contrast": {"contrast": contrast}}))


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_old_outputs_take_the_contrast_from_linked_case_folders(tmp_path):
    _case(tmp_path / "renders" / "a", "a", "t2")
    _case(tmp_path / "renders" / "b", "b", "dess")
    (tmp_path / "test" / "cases").mkdir(parents=True)
    for name in ("a", "b"):  # test sets are folders of links to the renders
        (tmp_path / "test" / "cases" / name).symlink_to(tmp_path / "renders" / name)
    rows = [
        {"case_id": "a", "dice": {"femur": 0.5, "tibia": 0.3}},
        {"case_id": "b", "dice": {"femur": 0.9, "tibia": 0.7}},
        {"case_id": "c", "contrast": "t2", "dice": {"femur": 0.7, "tibia": 0.1}},
    ]  # newer output: has it
    scores = tmp_path / "run.eval.json"
    scores.write_text(json.dumps({"per_case": rows}))

    done = _run(scores, "--cases", tmp_path / "test")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| structure | dess (1) | t2 (2) |"
    assert "| femur | 0.900 | 0.600 |" in lines and "| tibia | 0.700 | 0.200 |" in lines
    assert lines[-1] == "| **mean of the 2 above** | 0.800 | 0.400 |"

    missing = _run(scores)  # without the case folders, a and b have no contrast
    assert missing.returncode != 0 and "give their case folders with --cases" in missing.stderr


def test_worst_cases_name_the_cases_that_pull_a_mean_down(tmp_path):
    rows = [{"case_id": f"c{i}", "contrast": "dess", "dice": {"femur": 0.97, "tibia": 0.96}} for i in range(4)]
    rows.append({"case_id": "odd", "contrast": "random", "dice": {"femur": 0.37, "tibia": None}})
    scores = tmp_path / "run.eval.json"
    scores.write_text(json.dumps({"per_case": rows}))
    done = _run(scores, "--worst", "1")
    assert done.returncode == 0, done.stderr
    assert "| femur | odd (random: 0.370) | 0.970 | 0.850 | 0.970 |" in done.stdout.splitlines()
    assert "| tibia | c0 (dess: 0.960) | 0.960 | 0.960 | 0.960 |" in done.stdout.splitlines()
