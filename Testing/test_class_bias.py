"""bench/class_bias.py: Dice against a bias on one structure's log-probability."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from OrthoKneeLib.labels import DEFAULT_CATALOG

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "class_bias.py"
spec = importlib.util.spec_from_file_location("class_bias", SCRIPT)
class_bias = importlib.util.module_from_spec(spec)
spec.loader.exec_module(class_bias)


def _probabilities(shape, label: int, core: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """Background everywhere; the structure sure in ``core``, and at 0.3 against background's 0.6
    in ``rim`` (the argmax leaves the rim out, a bias of log 2 = 0.69 or more takes it in)."""
    n = len(DEFAULT_CATALOG.structures) + 1
    p = np.full((n, *shape), 0.01, np.float32)
    p[0] = 1 - 0.01 * (n - 1)
    p[label][core], p[0][core] = p[0][core], 0.01
    p[label][rim], p[0][rim] = 0.3, 0.6
    return p / p.sum(0, keepdims=True)


def test_a_structure_drawn_too_thin_gains_from_a_positive_bias():
    label = DEFAULT_CATALOG.structure("femoral_cartilage").label
    shape = (4, 10, 10)
    core = np.zeros(shape, bool)
    core[:, 4:6, 2:8] = True
    rim = np.zeros(shape, bool)
    rim[:, 3, 2:8] = rim[:, 6, 2:8] = True
    truth = np.where(core | rim, label, 0).astype(np.uint8)

    rows = class_bias.sweep_case(
        _probabilities(shape, label, core, rim), truth, DEFAULT_CATALOG, {"femoral_cartilage", "femur"}
    )
    assert set(rows) == {"femoral_cartilage", "femur"}  # only what the case annotates
    cartilage = rows["femoral_cartilage"]
    assert cartilage["truth"] == 96
    at = dict(zip(class_bias.BIASES, zip(cartilage["pred"], cartilage["inter"])))
    assert at[0.0] == (48, 48) and at[0.5] == (48, 48)  # the argmax: the core only
    assert at[0.75] == (96, 96) and at[3.0] == (96, 96)  # the rim joins at log(0.6 / 0.3)
    assert rows["femur"]["truth"] == 0

    sweep = {
        "bundle": "test 0",
        "biases": class_bias.BIASES,
        "structures": ["femoral_cartilage", "femur"],
        "rows": [{"case_id": "a", "structures": rows}],
    }
    line = next(row for row in class_bias.summary(sweep).splitlines() if row.startswith("femoral_cartilage"))
    # precision 1, recall 0.5, Dice 0.667 at no bias; the first bias reaching 1.0 is +0.75
    assert line.split()[1:] == ["1", "1.000", "0.500", "0.667", "+0.75", "1.000", "+0.333"]
    assert not any(row.startswith("femur ") for row in class_bias.summary(sweep).splitlines())  # nothing to score


def test_summarizes_a_saved_sweep_and_asks_for_a_bundle_otherwise(tmp_path):
    sweep = {
        "bundle": "test 0",
        "biases": class_bias.BIASES,
        "structures": ["patella"],
        "rows": [{"case_id": "a", "structures": {"patella": {"truth": 10, "pred": [10] * 17, "inter": [5] * 17}}}],
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    done = subprocess.run([sys.executable, str(SCRIPT), "--sweep", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "patella 1 0.500 0.500 0.500 -1.00 0.500 +0.000" in " ".join(done.stdout.split())
    bare = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert bare.returncode != 0 and "give --bundle and --cases, or --sweep" in bare.stderr
