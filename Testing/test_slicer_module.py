"""The Slicer module against Slicer's real rules, without the Slicer application.

- Every widget the .ui binds to a parameter (SlicerParameterName) has a parameter of a type that
  Slicer's GUI connectors accept for that widget class. The rules below restate those of Slicer's
  `Base/Python/slicer/parameterNodeWrapper/guiConnectors.py` (canRepresent of each connector):
  a QComboBox needs a Choice annotation (or an Enum), a ctkPathLineEdit a pathlib type, a
  ctkSliderWidget a bounded float.
- The requirements file's comments never reach pip.
"""

from __future__ import annotations

import ast
import time
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO

from OrthoKneeLib.slicerdeps import missing, read_requirements, requirement_name

MODULE = REPO / "OrthoKnee" / "OrthoKnee.py"
UI = REPO / "OrthoKnee" / "Resources" / "UI" / "OrthoKnee.ui"
REQUIREMENTS = REPO / "OrthoKnee" / "Resources" / "requirements.txt"

_PATH_TYPES = {"Path", "pathlib.Path", "PurePath", "pathlib.PurePath", "PosixPath", "pathlib.PosixPath"}


def _accepts(widget_class: str, annotation: ast.expr) -> tuple[bool, str]:
    """Whether Slicer's connector for ``widget_class`` can represent the annotated type."""
    base, extras = annotation, []
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Annotated", "typing.Annotated"):
        elements = annotation.slice.elts
        base, extras = elements[0], [ast.unparse(e) for e in elements[1:]]
    base_name = ast.unparse(base)
    has = lambda name: any(e.startswith(name + "(") for e in extras)  # noqa: E731
    if widget_class == "qMRMLNodeComboBox":
        return base_name.startswith("vtkMRML"), "a MRML node type"
    if widget_class == "ctkPathLineEdit":
        return base_name in _PATH_TYPES, "a pathlib type (pathlib.Path)"
    if widget_class == "QComboBox":
        return base_name in ("str", "int", "float", "bool") and has("Choice"), "str/int/float/bool with Choice([...])"
    if widget_class == "ctkSliderWidget":
        bounded = has("WithinRange") or (has("Minimum") and has("Maximum"))
        return base_name == "float" and bounded, "a float with WithinRange (bounded)"
    if widget_class in ("QDoubleSpinBox",):
        return base_name == "float", "float"
    if widget_class in ("QSpinBox", "QSlider"):
        return base_name == "int", "int"
    if widget_class in ("QCheckBox", "QPushButton"):
        return base_name == "bool", "bool"
    if widget_class in ("QLineEdit", "QTextEdit"):
        return base_name == "str", "str"
    return False, f"a type some connector knows (no connector for {widget_class})"


def _parameters() -> dict[str, ast.expr]:
    tree = ast.parse(MODULE.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OrthoKneeParameterNode")
    return {s.target.id: s.annotation for s in node.body if isinstance(s, ast.AnnAssign)}


def _bound_widgets() -> dict[str, str]:
    bound = {}
    for widget in ET.parse(UI).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    return bound


def test_every_bound_widget_has_a_parameter_type_slicer_can_connect():
    parameters, widgets = _parameters(), _bound_widgets()
    assert set(widgets) <= set(parameters), set(widgets) - set(parameters)
    problems = []
    for name, widget_class in widgets.items():
        ok, needs = _accepts(widget_class, parameters[name])
        if not ok:
            problems.append(f"{name}: {widget_class} needs {needs}, the parameter is {ast.unparse(parameters[name])}")
    assert not problems, problems


@pytest.mark.parametrize(
    "widget_class, annotation, ok",
    [
        ("ctkPathLineEdit", "str", False),  # what made the panel raise on first open
        ("QComboBox", "str", False),
        ("QComboBox", "Annotated[str, Choice(['a', 'b'])]", True),
        ("ctkSliderWidget", "float", False),
        ("ctkSliderWidget", "Annotated[float, WithinRange(0.0, 1.0)]", True),
        ("ctkPathLineEdit", "Path", True),
    ],
)
def test_the_rules_refuse_what_slicer_refuses(widget_class, annotation, ok):
    assert _accepts(widget_class, ast.parse(annotation, mode="eval").body)[0] is ok


def test_requirements_comments_never_reach_pip(tmp_path):
    listed = read_requirements(REQUIREMENTS)
    assert listed and all("#" not in r and " " not in r.split(";")[0].strip() for r in listed)
    assert [requirement_name(r) for r in listed][:3] == ["torch", "monai", "einops"]
    assert not any("==" in r for r in listed)  # lower bounds: never replace another extension's CUDA torch
    sample = tmp_path / "requirements.txt"
    sample.write_text("# a comment with words like install now\n\ntorch>=2.1  # trailing words\n  monai>=1.4\n")
    assert read_requirements(sample) == ["torch>=2.1", "monai>=1.4"]
    assert missing(["numpy>=1", "surely-not-installed-package>=1"]) == ["surely-not-installed-package>=1"]


def test_the_shipped_terminology_file_is_the_catalog():
    import json

    from OrthoKneeLib.labels import DEFAULT_CATALOG
    from OrthoKneeLib.terminology import TERMINOLOGY_FILE, slicer_terminology

    shipped = json.loads(TERMINOLOGY_FILE.read_text())
    assert shipped == json.loads(json.dumps(slicer_terminology(DEFAULT_CATALOG)))
    types = {t["CodeMeaning"]: t for c in shipped["SegmentationCodes"]["Category"] for t in c["Type"]}
    assert {"Femur", "Tibia", "Fibula", "Patella", "Cartilage", "Meniscus", "Ligament"} <= set(types)
    assert {m["CodeMeaning"] for m in types["Meniscus"]["Modifier"]} == {"Medial", "Lateral"}
    assert "Terminology/OrthoKnee.term.json" in (REPO / "OrthoKnee" / "CMakeLists.txt").read_text()


def _cmake_entries(variable: str) -> list[str]:
    import re

    text = (REPO / "OrthoKnee" / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({variable}\n(.*?)\n\s*\)", text, flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_install_tree_the_cmake_lists_describe_runs_the_engine(tmp_path):
    """Lay the files out as slicerMacroBuildScriptedModule installs them (each entry relative to the
    scripted-modules folder) and use the engine from there alone: module, engine, catalog, bundle
    (sha256 verified) and sample case are all found."""
    import shutil
    import subprocess
    import sys

    modules = tmp_path / "lib" / "Slicer" / "qt-scripted-modules"
    entries = [e.replace("${MODULE_NAME}", "OrthoKnee") for e in _cmake_entries("MODULE_PYTHON_SCRIPTS")]
    entries += [e.replace("${MODULE_NAME}", "OrthoKnee") for e in _cmake_entries("MODULE_PYTHON_RESOURCES")]
    for entry in entries:
        source = (REPO / "OrthoKnee" / entry).resolve()
        target = (modules / entry).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from OrthoKneeLib.resources import demo_bundle_dir, sample_case_dir; "
        "from OrthoKneeLib.bundle import Bundle; from OrthoKneeLib.labels import DEFAULT_CATALOG; "
        "b = Bundle.open(demo_bundle_dir(), verify=True); s = sample_case_dir(); "
        "import hashlib, urllib.request; from OrthoKneeLib.resources import sample_data_source; "
        "d = sample_data_source(); assert all(hashlib.sha256(urllib.request.urlopen(u).read()).hexdigest() == "
        "c.split(':')[1] for u, c in zip(d['uris'], d['checksums'])), 'sample checksums'; "
        "import OrthoKneeLib; print(OrthoKneeLib.__file__, b.path, s, len(DEFAULT_CATALOG.structures), "
        "len(b.catalog.findings))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(modules.parent)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    engine, bundle, sample, structures, findings = done.stdout.split()
    for path in (engine, bundle, sample):
        assert path.startswith(str(tmp_path)), path  # found in the install tree, not in the repository
    assert (structures, findings) == ("11", "8")
    assert (modules / "OrthoKnee.py").is_file() and (modules / "Resources" / "UI" / "OrthoKnee.ui").is_file()


def test_the_subprocess_runner_predicts_and_cancels(tmp_path):
    """The module's way to run the model: a child `orthoknee predict` with progress, a log and a hard cancel."""
    import time

    from OrthoKneeLib.errors import OrthoKneeError
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir
    from OrthoKneeLib.runner import PredictProcess

    pytest.importorskip("torch", reason="torch is an engine dependency")
    series = {plane: sample_case_dir() / name for plane, name in SAMPLE_VIEWS.items()}
    stopped = PredictProcess(series, tmp_path / "stopped", device="cpu").start()
    deadline = time.time() + 60
    while stopped.progress()[0] < 1 and time.time() < deadline:  # into the model
        time.sleep(0.2)
    assert stopped.progress()[0] >= 1 and stopped.progress()[1] >= 3
    stopped.cancel()
    with pytest.raises(OrthoKneeError, match="terminated"):
        stopped.wait()
    assert not (tmp_path / "stopped").exists()  # nothing half-written
    assert "terminated" in stopped.log_path.read_text()

    run = PredictProcess(series, tmp_path / "done", device="cpu").start()
    prediction = run.wait(timeout=300)
    assert len(prediction.finding_probabilities) == 8 and prediction.labelmap.max() > 0
    assert run.progress()[0] == run.progress()[1]  # the bar reached its end


def test_the_finetune_button_runs_finetune_in_a_child_process(pipeline, tmp_path, monkeypatch):
    """The module's Fine-tune button: `orthoknee finetune` on exported cases in a child, progress from
    its bars, and the new bundle (its parent recorded) back."""
    from OrthoKneeLib.runner import FinetuneProcess

    monkeypatch.setenv("ORTHOKNEE_CACHE", str(tmp_path / "cache"))
    seen = []
    run = FinetuneProcess(
        pipeline["trained"].path, pipeline["folders"][:2], tmp_path / "next", steps=6, device="cpu"
    ).start()
    while run.running():
        seen.append(run.progress())
        time.sleep(0.1)
    new = run.wait(timeout=300)
    assert new.metadata["parent"]["version"] == pipeline["trained"].metadata["version"]
    assert new.metadata["heads"]["training"]["config"]["steps"] == 6
    # gentle and anchored, and a rejected finding's highest cells pushed down (bench/correction.py)
    config = new.metadata["heads"]["training"]["config"]
    assert (config["learning_rate"], config["anchor"], config["hard_negative_cells"]) == (3e-4, 1.0, 32)
    assert run.progress()[:2] == (6, 6) and run.progress()[2].startswith("finetune")
    assert any(p[2].startswith("features") for p in seen) or "features [" in run.log_path.read_text()


def test_the_review_panel_records_a_finding_the_model_lacks_with_the_exported_case():
    """The New finding row exists in the panel, offers exactly the answers the catalog's check
    takes, and the export passes its answer on as the case's extra findings."""
    widgets = {w.get("name"): w for w in ET.parse(UI).iter("widget")}
    assert widgets["newFindingEdit"].get("class") == "QLineEdit"
    answers = [i.find("property/string").text for i in widgets["newFindingAnswer"].findall("item")]
    assert answers == ["present", "absent"]
    from OrthoKneeLib.labels import DEFAULT_CATALOG

    assert [DEFAULT_CATALOG.new_finding_answer("Baker's cyst", a) for a in answers] == [
        {"Baker's cyst": 1},
        {"Baker's cyst": 0},
    ]
    source = MODULE.read_text()
    assert "new_finding_answer(" in source and "extra_findings=extra" in source
    assert "extra_findings=extra_findings" in source  # exportCase hands it to export_training_case
