"""OrthoKnee: knee MRI structures and findings in 3D Slicer.

Follows Slicer's scripted-module template: ``OrthoKnee`` (module metadata), ``OrthoKneeWidget``
(loads Resources/UI/OrthoKnee.ui, typed parameter node), ``OrthoKneeLogic`` and
``OrthoKneeTest``. The widget stays thin: scene work is ``OrthoKneeLib.scene``, inference is
``orthoknee predict`` in a child process (``OrthoKneeLib.runner``) so the GUI stays responsive and
Cancel stops it at once; ``OrthoKneeLogic.start`` (a worker thread) serves scripts and the self-test.

Outside Slicer (tests, documentation tools) the Qt/Slicer imports are absent; the module then
imports through the guarded path below and only its pure helpers are usable.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Annotated

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
if str(_REPO) not in sys.path and (_REPO / "OrthoKneeLib").is_dir():
    sys.path.insert(0, str(_REPO))  # the engine ships beside the module in the extension

try:  # inside Slicer
    import qt
    import slicer
    from slicer import vtkMRMLScalarVolumeNode
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    SLICER_GUI = True
except ImportError:  # guarded path: no Slicer application (tests check syntax, helpers and the .ui)
    SLICER_GUI = False

    class _Unavailable:
        """Stand-in base: the classes below can be defined (not used) without Slicer."""

    class ScriptedLoadableModule(_Unavailable): ...

    class ScriptedLoadableModuleLogic(_Unavailable): ...

    class ScriptedLoadableModuleTest(_Unavailable): ...

    class ScriptedLoadableModuleWidget(_Unavailable): ...

    class VTKObservationMixin: ...

    vtkMRMLScalarVolumeNode = object

    def parameterNodeWrapper(cls):  # noqa: D103 - stand-in decorator
        return cls

    def WithinRange(lo, hi):  # noqa: D103,N802 - stand-in
        return None

    def Choice(choices):  # noqa: D103,N802 - stand-in
        return None


DEVICES = ("auto", "cuda", "cpu")


def _pytorch_utils_logic():
    """PyTorchUtils' logic when that extension is installed (it installs a CUDA-matched torch), else None."""
    try:
        import PyTorchUtils

        return PyTorchUtils.PyTorchUtilsLogic()
    except ImportError:
        return None


REQUIREMENTS = _HERE / "Resources" / "requirements.txt"
TERMINOLOGY = _HERE / "Resources" / "Terminology" / "OrthoKnee.term.json"


# ------------------------------------------------------------------------------- pure helpers


def _slicer_python() -> str:
    """The Python that runs the ``orthoknee`` child processes: Slicer's own (PythonSlicer)."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def _launch(args: list[str]):
    """Start a child process in Slicer's Python environment; the child finds the engine beside the module."""
    try:
        return slicer.util.launchConsoleProcess(args, updateEnvironment={"PYTHONPATH": str(_REPO)})
    except TypeError:  # Slicer without updateEnvironment
        return slicer.util.launchConsoleProcess(args)


def _bundle_or_default(path) -> Path | None:
    """The bundle the path selector names, or None (the shipped bundle) when it is empty."""
    return None if path is None or str(path) in ("", ".") else Path(path)


def review_record(prediction_summary: dict, decisions: dict[str, dict]) -> dict:
    """The exported review: each finding's probability, the reader's decision and note."""
    findings = {}
    for key, entry in prediction_summary.get("findings", {}).items():
        d = decisions.get(key, {})
        findings[key] = {
            "name": entry["name"],
            "probability": entry["probability"],
            "decision": d.get("decision"),
            "note": d.get("note", ""),
        }
    return {
        "case": prediction_summary.get("case"),
        "bundle": prediction_summary.get("bundle"),
        "knee_side": prediction_summary.get("knee_side"),
        "findings": findings,
        "warnings": prediction_summary.get("warnings", []),
        "not_for_clinical_use": True,
    }


def review_html(review: dict, key_slices: dict[str, str] | None = None) -> str:
    """A short HTML report: findings table and key-slice images (PNG paths relative to the report)."""
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(f['name'])}</td><td>{f['probability']:.2f}</td><td>{escape(f['decision'] or '-')}</td>"
        f"<td>{escape(f['note'])}</td></tr>"
        for f in review["findings"].values()
    )
    images = "".join(
        f"<figure><img src='{escape(p)}' width='480'><figcaption>{escape(k)}</figcaption></figure>"
        for k, p in (key_slices or {}).items()
    )
    bundle = review.get("bundle") or {}
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>OrthoKnee review: {escape(str(review['case']))}"
        f"</title></head><body><h1>OrthoKnee review: {escape(str(review['case']))}</h1>"
        f"<p>Model {escape(str(bundle.get('name')))} {escape(str(bundle.get('version')))}. "
        "Research demonstration, not for clinical use.</p>"
        f"<table border='1'><tr><th>finding</th><th>probability</th><th>decision</th><th>note</th></tr>{rows}</table>"
        f"{images}</body></html>"
    )


# ------------------------------------------------------------------------------- module


class OrthoKnee(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "OrthoKnee"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["OrthoKnee developers"]
        self.parent.helpText = (
            "Segments 11 knee structures and scores 8 abnormalities (each with a probability overlay) from a "
            "case's sagittal, coronal and axial MRI series, with features of per-view 3D diffusion models "
            "(OrthoDiffusion). Research and demonstration only; not for clinical use."
        )
        self.parent.acknowledgementText = (
            "Method after OrthoDiffusion (arXiv 2602.20752). Built on 3D Slicer, MONAI, PyTorch and SimpleITK. "
            "The demo model was trained on synthetic images rendered from public label maps (OAI ZIB, pymskt, "
            "SPL knee atlas)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)  # Sample Data lists the sample case


def registerSampleData() -> None:
    """The shipped sample case (one real DESS series and two reformats) in the Sample Data module,
    with each file's SHA-256, which Sample Data checks when it copies the files into its cache."""
    import SampleData

    from OrthoKneeLib.resources import sample_data_source

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        **sample_data_source(thumbnail=_HERE / "Resources" / "Icons" / "OrthoKnee.png")
    )


@parameterNodeWrapper
class OrthoKneeParameterNode:
    sagittal: vtkMRMLScalarVolumeNode
    coronal: vtkMRMLScalarVolumeNode
    axial: vtkMRMLScalarVolumeNode
    bundlePath: Path = Path()  # ctkPathLineEdit connects to pathlib types only; "" / "." = the shipped bundle
    device: Annotated[str, Choice(list(DEVICES))] = "auto"  # a QComboBox needs the Choice annotation
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    trainingCases: Path = Path()  # the folder the corrected cases were exported to
    learnNewLabels: bool = False


class OrthoKneeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._result = None
        self._decisions: dict[str, dict] = {}
        self._outputs: list[Path] = []  # output folders of this session's runs, newest last (for Compare)
        self._finetune = None  # the running FinetuneProcess

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OrthoKnee.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = OrthoKneeLogic()
        self.logic.loadTerminology()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.exportReviewButton.connect("clicked(bool)", self.onExportReview)
        self.ui.exportCaseButton.connect("clicked(bool)", self.onExportCase)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneOrCancel)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.findingsTable.connect("cellClicked(int,int)", self.onFindingSelected)
        self.ui.findingsTable.connect("cellChanged(int,int)", self.onFindingEdited)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._result = None  # its nodes go with the scene

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onNodeAdded(self, caller, event) -> None:
        qt.QTimer.singleShot(0, self.fillEmptyViews)  # the node's image arrives after the event

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.fillEmptyViews()

    def fillEmptyViews(self) -> None:
        """Fill empty view selectors from the loaded volumes by plane detection (each stays changeable)."""
        if not self._parameterNode:
            return
        from OrthoKneeLib.scene import assign_views

        found = assign_views(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        for plane, node in found.items():
            if getattr(self._parameterNode, plane) is None:
                setattr(self._parameterNode, plane, node)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk_modified_event(), self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk_modified_event(), self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is not None and self._result is not None:  # threshold and opacity act on the shown result at once
            self.logic.updateDisplay(self._result, p.threshold, p.opacity)
        running = self._job is not None
        has_view = p and (p.sagittal or p.coronal or p.axial)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = bool(has_view) or running
        self.ui.deviceWarningLabel.visible = bool(p) and self.logic.willRunOnCpu(p.device)

    # --------------------------------------------------------------------- running
    def onApplyOrCancel(self) -> None:
        if self._job is not None:
            self._job["stop"]()
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self.logic.ensureDependencies():
            return
        p = self._parameterNode
        try:
            self._job = self.logic.startProcess(
                p.sagittal, p.coronal, p.axial, _bundle_or_default(p.bundlePath), p.device
            )
        except Exception as exc:  # an OrthoKneeError names the file and what to do
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.progressBar.value = 0
        self._timer = qt.QTimer()
        self._timer.timeout.connect(self._poll)
        self._timer.start(200)
        self._checkCanApply()

    def _poll(self) -> None:
        job = self._job
        if job is None:  # the scene closed or the module was left meanwhile
            self._timer.stop()
            return
        done, total, message = job["poll"]()
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = message
        if job["alive"]():
            return
        self._timer.stop()
        self._job = None
        if "runner" in job:
            self.logic.finishProcess(job)
        self._checkCanApply()
        if job.get("error") is not None:
            self.ui.statusLabel.text = str(job["error"])
            if "cancelled" not in str(job["error"]) and "terminated" not in str(job["error"]):
                slicer.util.errorDisplay(str(job["error"]))
            return
        p = self._parameterNode
        reference = job["reference"]
        if p is None or reference is None or reference.GetScene() is None:  # the scene was closed meanwhile
            self.ui.statusLabel.text = "The scene was closed while OrthoKnee ran; the result was not shown."
            return
        self._result = self.logic.showPrediction(
            job["prediction"], reference=reference, threshold=p.threshold, opacity=p.opacity
        )
        self._decisions = {}
        self.logic.showReadingAids(
            self._result, {"sagittal": p.sagittal, "coronal": p.coronal, "axial": p.axial}, p.opacity
        )
        self._fillFindingsTable(job["prediction"])
        if "runner" in job:
            self._outputs.append(job["runner"].out)
        self.ui.statusLabel.text = "; ".join(self._result["warnings"] + job["prediction"].warnings) or "Done."

    def _fillFindingsTable(self, prediction) -> None:
        table = self.ui.findingsTable
        table.blockSignals(True)
        table.setRowCount(0)
        for row, (key, prob) in enumerate(sorted(prediction.finding_probabilities.items(), key=lambda kv: -kv[1])):
            table.insertRow(row)
            name = qt.QTableWidgetItem(prediction.catalog.finding(key).name)
            name.setData(qt.Qt.UserRole, key)
            table.setItem(row, 0, name)
            table.setItem(row, 1, qt.QTableWidgetItem(f"{prob:.2f}"))
            decision = qt.QTableWidgetItem("")
            decision.setToolTip("Type accept or reject")
            table.setItem(row, 2, decision)
            table.setItem(row, 3, qt.QTableWidgetItem(""))
        table.blockSignals(False)

    def onFindingSelected(self, row: int, column: int) -> None:
        key = self.ui.findingsTable.item(row, 0).data(qt.Qt.UserRole)
        if self._result:
            from OrthoKneeLib.scene import show_overlay

            show_overlay(
                slicer.mrmlScene, self._result["reference"], self._result["overlays"][key], self._parameterNode.opacity
            )

    def onFindingEdited(self, row: int, column: int) -> None:
        key = self.ui.findingsTable.item(row, 0).data(qt.Qt.UserRole)
        entry = self._decisions.setdefault(key, {})
        text = self.ui.findingsTable.item(row, column).text().strip()
        if column == 2:
            entry["decision"] = {"accept": "accept", "a": "accept", "reject": "reject", "r": "reject"}.get(text.lower())
        elif column == 3:
            entry["note"] = text
        if self._result is not None:  # kept on the segmentation node: saved with the scene
            from OrthoKneeLib.scene import set_finding_decision

            set_finding_decision(self._result["segmentation"], key, entry.get("decision"), entry.get("note", ""))

    def onOpenSegmentEditor(self) -> None:
        if not self._result:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self._result["segmentation"])
        editor.setSourceVolumeNode(self._result["reference"])

    def onExportReview(self) -> None:
        if not self._result:
            return
        folder = qt.QFileDialog.getExistingDirectory(None, "Export review to")
        if folder:
            paths = self.logic.exportReview(self._result, self._decisions, folder)
            self.ui.statusLabel.text = f"Review written: {paths['json']}, {paths['html']}"

    def onExportCase(self) -> None:
        if not self._result:
            return
        try:  # an answer for a finding the model lacks (the New finding row), checked before any dialog
            extra = self._result["prediction"].catalog.new_finding_answer(
                self.ui.newFindingEdit.text, self.ui.newFindingAnswer.currentText
            )
        except Exception as exc:
            slicer.util.errorDisplay(str(exc))
            return
        folder = qt.QFileDialog.getExistingDirectory(None, "Export training case to")
        if folder:
            p = self._parameterNode
            out = self.logic.exportCase(
                self._result,
                {"sagittal": p.sagittal, "coronal": p.coronal, "axial": p.axial},
                self._decisions,
                folder,
                extra_findings=extra,
            )
            self.ui.statusLabel.text = f"Training case written: {out}"

    def onExportDicomSeg(self) -> None:
        if not self._result:
            return
        files = self.logic.dicomFilesOf(self._result["reference"])
        if not files:
            slicer.util.errorDisplay(
                "The reference series was not loaded from DICOM, so a DICOM SEG has no images to reference. "
                "Load the series through the DICOM module, or export the segmentation as NRRD (Segmentations module)."
            )
            return
        path = qt.QFileDialog.getSaveFileName(None, "Export DICOM SEG", "structures.seg.dcm", "DICOM (*.dcm)")
        if path:
            with slicer.util.tryWithErrorDisplay("The DICOM SEG was not written.", waitCursor=True):
                written = self.logic.exportDicomSeg(self._result, files, path)
                self.ui.statusLabel.text = f"DICOM SEG written: {written}"

    def onCompare(self) -> None:
        if len(self._outputs) < 2:
            self.ui.statusLabel.text = (
                "Compare needs two runs on the same series: choose another model bundle and press Apply, then Compare."
            )
            return
        with slicer.util.tryWithErrorDisplay("The two runs cannot be compared.", waitCursor=True):
            table = self.logic.compareRuns(self._outputs[-2], self._outputs[-1])
            self.ui.statusLabel.text = f"Comparison in the table '{table.GetName()}' (A = previous run, B = this one)."

    def onFinetuneOrCancel(self) -> None:
        if self._finetune is not None:
            self._finetune.cancel(grace_s=5.0)
            self.ui.finetuneStatusLabel.text = "Cancelling..."
            return
        if not self.logic.ensureDependencies():
            return
        p = self._parameterNode
        try:
            self._finetune = self.logic.startFinetune(
                _bundle_or_default(p.bundlePath), p.trainingCases, p.learnNewLabels, p.device
            )
        except Exception as exc:  # an OrthoKneeError says which folder and what to do
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.finetuneButton.text = "Cancel fine-tuning"
        self._finetuneTimer = qt.QTimer()
        self._finetuneTimer.timeout.connect(self._pollFinetune)
        self._finetuneTimer.start(500)

    def _pollFinetune(self) -> None:
        run = self._finetune
        if run is None:
            self._finetuneTimer.stop()
            return
        done, total, message = run.progress()
        self.ui.finetuneProgressBar.maximum = max(total, 1)
        self.ui.finetuneProgressBar.value = done
        self.ui.finetuneStatusLabel.text = message
        if run.running():
            return
        self._finetuneTimer.stop()
        self._finetune = None
        self.ui.finetuneButton.text = "Fine-tune a new version"
        try:
            bundle = run.wait(timeout=30)
        except Exception as exc:  # the child's own last line and the log's path
            self.ui.finetuneStatusLabel.text = str(exc)
            return
        if self._parameterNode is not None:
            self._parameterNode.bundlePath = bundle.path  # the next Apply runs the new version
        self.ui.finetuneStatusLabel.text = self.logic.finetuneSummary(bundle)

    def onClearCache(self) -> None:
        if self._finetune is not None or self._job is not None:
            self.ui.finetuneStatusLabel.text = (
                "Wait for the running job to end (or cancel it) before clearing the cache."
            )
            return
        freed = self.logic.clearCache(keep=self._outputs[-2:])
        self.ui.finetuneStatusLabel.text = f"Cleared OrthoKnee's cache: {freed / 2**20:.0f} MB freed."


def vtk_modified_event():
    import vtk

    return vtk.vtkCommand.ModifiedEvent


class OrthoKneeLogic(ScriptedLoadableModuleLogic):
    """Everything the widget does, callable from Python and from OrthoKneeTest."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._predictor = None
        self._predictor_key = None

    def getParameterNode(self):
        return OrthoKneeParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(ask: bool = True) -> bool:
        """torch and MONAI are imported on first use; if missing, offer to install them (Slicer's pip)."""
        import importlib.util

        if all(importlib.util.find_spec(m) is not None for m in ("torch", "monai")):
            return True
        if ask and not slicer.util.confirmOkCancelDisplay(
            "OrthoKnee needs PyTorch and MONAI (about 1 GB with CUDA support). Install them now?"
        ):
            return False
        from OrthoKneeLib.slicerdeps import missing, read_requirements

        requirements = missing(read_requirements(REQUIREMENTS))
        torch_requirement = next((r for r in requirements if r.startswith("torch")), None)
        if torch_requirement and _pytorch_utils_logic() is not None:
            # PyTorchUtils picks the CUDA build that matches this machine's driver
            _pytorch_utils_logic().installTorch(askConfirmation=False, torchVersionRequirement=torch_requirement[5:])
            requirements.remove(torch_requirement)
        with slicer.util.tryWithErrorDisplay("OrthoKnee could not install its Python dependencies.", waitCursor=True):
            if requirements and hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
                slicer.packaging.pip_ensure(requirements)  # Slicer >= 5.10
            elif requirements:
                slicer.util.pip_install(requirements)
        return not missing(read_requirements(REQUIREMENTS))

    @staticmethod
    def willRunOnCpu(device: str) -> bool:
        try:
            import torch
        except ImportError:
            return device != "cuda"
        return device == "cpu" or (device == "auto" and not torch.cuda.is_available())

    def predictor(self, bundle_path, device: str):
        from OrthoKneeLib.predict import Predictor

        key = (str(bundle_path), device)
        if self._predictor is None or self._predictor_key != key:
            self._predictor = Predictor(bundle_path, device=device)
            self._predictor_key = key
        return self._predictor

    def start(self, sagittal, coronal, axial, bundle_path, device) -> dict:
        """Run the Predictor on a worker thread; the returned job dict is polled by the GUI."""
        from OrthoKneeLib.progress import CancelToken
        from OrthoKneeLib.scene import case_from_nodes

        case = case_from_nodes(sagittal, coronal, axial)  # read on the main thread (MRML is not thread-safe)
        job = {
            "cancel": CancelToken(),
            "progress": (0, 1, "Loading the model..."),
            "prediction": None,
            "error": None,
            "reference": sagittal or coronal or axial,
        }  # the reference as chosen now, not at the end

        def work():  # never touches MRML: the case's images were copied above
            try:
                predictor = self.predictor(bundle_path, device)  # torch import and weights: off the GUI thread
                job["prediction"] = predictor.predict(
                    case, progress=lambda d, t, m="": job.__setitem__("progress", (d, t, m)), cancel=job["cancel"]
                )
            except Exception as exc:  # reported by the GUI thread
                job["error"] = exc

        job["thread"] = threading.Thread(target=work, name="OrthoKnee predict", daemon=True)
        job["thread"].start()
        job["alive"] = job["thread"].is_alive
        job["stop"] = job["cancel"].cancel
        job["poll"] = lambda: job["progress"]
        return job

    def startProcess(self, sagittal, coronal, axial, bundle_path, device) -> dict:
        """Run `orthoknee predict` in a child process (runner.py): Slicer keeps its memory and threads,
        Cancel stops the child at once, and the run leaves a log. The series are written to a
        temporary folder first (on this, the GUI thread: MRML is not thread-safe)."""
        import tempfile

        import SimpleITK as sitk

        from OrthoKneeLib.runner import PredictProcess
        from OrthoKneeLib.scene import image_from_node

        work = Path(tempfile.mkdtemp(prefix="OrthoKnee-", dir=slicer.app.temporaryPath))
        series = {}
        for plane, node in (("sagittal", sagittal), ("coronal", coronal), ("axial", axial)):
            if node is not None:
                series[plane] = work / f"{plane}.nrrd"
                sitk.WriteImage(image_from_node(node), str(series[plane]))

        runner = PredictProcess(
            series, work / "result", bundle=bundle_path, device=device, python=_slicer_python(), launcher=_launch
        ).start()
        job = {
            "runner": runner,
            "reference": sagittal or coronal or axial,
            "error": None,
            "prediction": None,
            "alive": runner.running,
            "stop": lambda: runner.cancel(grace_s=5.0),
            "poll": runner.progress,
        }
        return job

    @staticmethod
    def finishProcess(job: dict) -> None:
        """The child's result (or its error) into the job, once it has ended."""
        try:
            job["prediction"] = job["runner"].wait(timeout=30)
        except Exception as exc:  # an OrthoKneeError with the child's own last line and the log's path
            job["error"] = exc

    def run(self, sagittal, coronal=None, axial=None, bundle_path=None, device="auto", threshold=0.5, opacity=0.6):
        """Blocking run (scripts, the self-test): predict and show."""
        job = self.start(sagittal, coronal, axial, bundle_path, device)
        job["thread"].join()
        if job["error"] is not None:
            raise job["error"]
        return self.showPrediction(job["prediction"], job["reference"], threshold, opacity)

    @staticmethod
    def showReadingAids(result: dict, view_nodes: dict, opacity: float) -> None:
        """Each slice view on the series of its plane, and a table of volumes and cartilage thickness."""
        from OrthoKneeLib.scene import add_measurements_table, show_native_views

        prediction = result["prediction"]
        top = prediction.top_finding()
        show_native_views(slicer.mrmlScene, view_nodes, result["overlays"].get(top) if top else None, opacity)
        result["measurements"] = add_measurements_table(slicer.mrmlScene, prediction)

    @staticmethod
    def loadTerminology() -> bool:
        """The knee structures' terminology (codes, colours) into Slicer's terminology selector."""
        terminologies = getattr(slicer.modules, "terminologies", None)
        if terminologies is None or not TERMINOLOGY.is_file():
            return False
        return bool(terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY)))

    @staticmethod
    def updateDisplay(result: dict, threshold: float, opacity: float) -> None:
        """Live threshold and opacity of a shown result (each overlay's colour table and the slice views)."""
        from OrthoKneeLib.scene import set_overlay_threshold

        set_overlay_threshold(slicer.mrmlScene, result["overlays"].values(), threshold)
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        for composite in composites:
            if composite.GetForegroundVolumeID() in {n.GetID() for n in result["overlays"].values()}:
                composite.SetForegroundOpacity(opacity)

    @staticmethod
    def showPrediction(prediction, reference, threshold=0.5, opacity=0.6) -> dict:
        from OrthoKneeLib.scene import add_prediction

        result = add_prediction(
            slicer.mrmlScene, prediction, reference_node=reference, threshold=threshold, opacity=opacity
        )
        result["prediction"] = prediction
        return result

    @staticmethod
    def exportReview(result: dict, decisions: dict, folder) -> dict:
        from OrthoKneeLib.io import atomic_path, write_json_atomic

        folder = Path(folder)
        review = review_record(result["prediction"].summary(), decisions)
        json_path = write_json_atomic(review, folder / "review.json")
        key_slices = {}
        montage_path = folder / "key_slices.png"
        try:
            from OrthoKneeLib.montage import montage
            from OrthoKneeLib.scene import case_from_nodes

            montage(result["prediction"], case_from_nodes(result["reference"]), montage_path)
            key_slices["reference view, structures and top finding"] = montage_path.name
        except Exception:  # the report is still useful without the picture
            pass
        html_path = folder / "review.html"
        with atomic_path(html_path) as tmp:
            tmp.write_text(review_html(review, key_slices), encoding="utf-8")
        return {"json": json_path, "html": html_path}

    @staticmethod
    def exportCase(result: dict, view_nodes: dict, decisions: dict, folder, extra_findings=None) -> Path:
        """The edited case in the training layout; ``extra_findings`` ({name: 1 / 0}) answers
        findings the model lacks (Catalog.new_finding_answer)."""
        from OrthoKneeLib.scene import export_training_case

        review = review_record(result["prediction"].summary(), decisions)["findings"]
        name = result["prediction"].case_name.replace(" ", "_")
        return export_training_case(
            Path(folder) / name,
            result["segmentation"],
            view_nodes,
            result["prediction"].catalog,
            review=review,
            case_id=name,
            extra_findings=extra_findings,
        )

    @staticmethod
    def dicomFilesOf(volume_node) -> list[str]:
        """The DICOM files a volume node was loaded from (Slicer's DICOM database), or [] if none."""
        uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return []
        files = [database.fileForInstance(uid) for uid in uids]
        return [f for f in files if f]

    @staticmethod
    def exportDicomSeg(result: dict, files: list[str], path) -> Path:
        """The segmentation as it is now (the reader's edits included) as a DICOM SEG on the reference series."""
        import dataclasses

        from OrthoKneeLib.dicomseg import datasets_in_slice_order, write_dicom_seg
        from OrthoKneeLib.scene import image_from_node, segmentation_labelmap

        prediction = result["prediction"]
        reference = result["reference"]
        labelmap = segmentation_labelmap(result["segmentation"], reference, prediction.catalog)
        edited = dataclasses.replace(prediction, labelmap=labelmap)
        return write_dicom_seg(edited, datasets_in_slice_order(files, image_from_node(reference)), path)

    @staticmethod
    def compareRuns(folder_a, folder_b):
        """Two runs' outputs side by side in a table node (compare.compare_predictions), shown in a table view."""
        from OrthoKneeLib.compare import compare_predictions
        from OrthoKneeLib.scene import add_comparison_table

        table = add_comparison_table(slicer.mrmlScene, compare_predictions(Path(folder_a), Path(folder_b)))
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        return table

    @staticmethod
    def startFinetune(bundle_path, cases_folder, new_labels: bool, device: str):
        """`orthoknee finetune` of the current bundle on the exported cases, in a child process (runner.py);
        the new version goes to versions.user_bundles_dir(), never over an existing one."""

        from OrthoKneeLib.errors import InputError
        from OrthoKneeLib.resources import demo_bundle_dir
        from OrthoKneeLib.runner import FinetuneProcess
        from OrthoKneeLib.versions import describe, next_version_folder

        folder = Path(cases_folder) if cases_folder and str(cases_folder) not in ("", ".") else None
        cases = sorted(c for c in folder.iterdir() if (c / "case.json").is_file()) if folder and folder.is_dir() else []
        if not cases:
            raise InputError(
                folder,
                "holds no exported cases (sub-folders with a case.json).",
                "Correct a result, press 'Export as training case' into one folder, and choose that folder here.",
            )
        parent = describe(bundle_path or demo_bundle_dir())
        if parent.problem:
            raise InputError(parent.path, f"cannot be fine-tuned: {parent.problem}.", "Choose another model bundle.")
        out = next_version_folder(parent)

        return FinetuneProcess(
            parent.path, cases, out, new_labels=new_labels, device=device, python=_slicer_python(), launcher=_launch
        ).start()

    @staticmethod
    def finetuneSummary(bundle) -> str:
        """One line on the new version: where it came from and what validation said before and after."""
        training = (bundle.metadata.get("heads") or {}).get("training") or {}
        parent = bundle.metadata.get("parent") or {}
        before = (training.get("validation_before") or {}).get("mean_dice")
        after = [h.get("mean_dice") for h in training.get("validation") or [] if h.get("mean_dice") is not None]
        scores = f"; validation Dice {before:.3f} -> {max(after):.3f}" if before is not None and after else ""
        return (
            f"New version {bundle.metadata.get('version')} (from {parent.get('version', '?')}) at {bundle.path}{scores}. "
            "Press Apply to run it, then 'Compare with the previous run'."
        )

    @staticmethod
    def clearCache(keep: list = ()) -> int:
        """Remove the feature cache and the temporary folders of finished runs (except ``keep``); bytes freed."""
        import shutil

        from OrthoKneeLib.featurecache import default_cache_dir, prune_cache

        freed = sum(e.bytes for e, _ in prune_cache(default_cache_dir(), keep_bundle_hashes=[]))
        kept = {Path(k).parent.resolve() for k in keep}
        for folder in Path(slicer.app.temporaryPath).glob("OrthoKnee-*"):
            if folder.resolve() not in kept:
                freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        return freed


class OrthoKneeTest(ScriptedLoadableModuleTest):
    """Runs the whole flow on the shipped sample case inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_sample_case_end_to_end()

    def test_sample_case_end_to_end(self):
        import tempfile

        from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir
        from OrthoKneeLib.scene import segmentation_edited

        self.delayDisplay("Loading the sample case")
        nodes = {p: slicer.util.loadVolume(str(sample_case_dir() / n)) for p, n in SAMPLE_VIEWS.items()}
        logic = OrthoKneeLogic()
        self.assertTrue(logic.ensureDependencies(ask=False))
        self.delayDisplay("Predicting (about 30 s on a CPU)")
        result = logic.run(nodes["sagittal"], nodes["coronal"], nodes["axial"], device="auto")
        seg = result["segmentation"].GetSegmentation()
        self.assertEqual(seg.GetNumberOfSegments(), 11)
        self.assertEqual(seg.GetSegment("femur").GetName(), "Femur")
        self.assertEqual(len(result["overlays"]), 8)
        self.assertFalse(segmentation_edited(result["segmentation"], nodes["sagittal"]))
        with tempfile.TemporaryDirectory() as folder:
            paths = logic.exportReview(result, {}, folder)
            self.assertTrue(json.loads(Path(paths["json"]).read_text())["not_for_clinical_use"])
            out = logic.exportCase(result, nodes, {}, folder)
            self.assertTrue((out / "case.json").is_file())
        self.delayDisplay("OrthoKnee test passed")
