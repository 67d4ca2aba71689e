"""Offscreen render of a Slicer sagittal slice view with OrthoKnee's results on the sample case.

    python Resources/Screenshots/make_slicer_screenshot.py [--bundle B] [--out PNG]

Real Slicer MRML and displayable managers (slicer-core, hosted by trame-slicer's SlicerApp),
no GUI: the reference (sagittal) series as background, the structures as a segmentation,
the most probable finding's overlay as foreground with OrthoKnee's probability color table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _prediction_from_case(folder: Path):
    """A Prediction built by hand from a synthetic case: its labels and a finding mask as overlay."""
    import numpy as np
    import SimpleITK as sitk

    from OrthoKneeLib.labels import DEFAULT_CATALOG
    from OrthoKneeLib.model.heads import grid_of
    from OrthoKneeLib.predict import Prediction
    from OrthoKneeLib.synth.dataset import read_case

    case = read_case(folder)
    ref = case.case.views["sagittal"].image
    labels = sitk.GetArrayFromImage(case.labels["sagittal"]).astype(np.uint8)
    overlays, probs = {}, {}
    for f in DEFAULT_CATALOG.findings:
        mask = case.finding_mask(f.key)
        overlays[f.key] = (
            sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(mask > 0, sitk.sitkFloat32), ref))
            if mask is not None
            else np.zeros(labels.shape, np.float32)
        )
        probs[f.key] = 0.5 + 0.4 * min(1.0, float(overlays[f.key].sum()) / 20000) if case.findings.get(f.key) else 0.05
    prediction = Prediction(
        case.meta["case_id"],
        "sagittal",
        grid_of(ref),
        labels,
        np.zeros((1, *labels.shape), np.float16),
        probs,
        overlays,
        DEFAULT_CATALOG,
    )
    return prediction, {p: v.image for p, v in case.case.views.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "slicer_overlay.png")
    parser.add_argument("--size", type=int, default=720)
    parser.add_argument(
        "--from-case",
        type=Path,
        help="a synthetic case folder: show its ground-truth labels and "
        "its first finding mask through the same scene code, instead of a model's prediction",
    )
    args = parser.parse_args()

    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from OrthoKneeLib.predict import Predictor
    from OrthoKneeLib.resources import SAMPLE_VIEWS, sample_case_dir
    from OrthoKneeLib.scene import add_prediction, case_from_nodes, volume_node_from_image
    from OrthoKneeLib.volumes import load_volume

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.sagittal_view())
    if args.from_case:
        prediction, images = _prediction_from_case(args.from_case)
        nodes = {p: volume_node_from_image(app.scene, image, f"case {p}") for p, image in images.items()}
    else:
        nodes = {
            p: volume_node_from_image(app.scene, load_volume(sample_case_dir() / n).image, f"sample {p}")
            for p, n in SAMPLE_VIEWS.items()
        }
        case = case_from_nodes(**nodes, name="sample")
        prediction = Predictor(args.bundle, device="cpu").predict(case)
    result = add_prediction(app.scene, prediction, reference_node=nodes["sagittal"], opacity=0.6, surfaces=False)
    top = prediction.top_finding()
    view.set_background_volume_id(nodes["sagittal"].GetID())
    view.set_foreground_volume_id(result["overlays"][top].GetID())
    view.set_foreground_opacity(0.6)
    window = view.render_window()
    window.SetSize(args.size, args.size)
    view.fit_view_to_content()
    # the middle sagittal slice (Slicer's default): moving the slice offscreen left the view blank here
    view.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()  # offscreen (EGL/OSMesa) windows have no front buffer
    grab.SetInputBufferTypeToRGB()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer.SetFileName(str(args.out))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    what = "ground-truth labels and simulated finding mask" if args.from_case else "prediction"
    print(f"{args.out}: sagittal slice, {what}: structures + overlay of {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
