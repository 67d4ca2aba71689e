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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "slicer_overlay.png")
    parser.add_argument("--size", type=int, default=720)
    args = parser.parse_args()

    import numpy as np
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
    nodes = {p: volume_node_from_image(app.scene, load_volume(sample_case_dir() / n).image, f"sample {p}")
             for p, n in SAMPLE_VIEWS.items()}
    case = case_from_nodes(**nodes, name="sample")
    prediction = Predictor(args.bundle, device="cpu").predict(case)
    result = add_prediction(app.scene, prediction, reference_node=nodes["sagittal"], threshold=0.3, opacity=0.6,
                            surfaces=False)
    top = prediction.top_finding()
    view.set_background_volume_id(nodes["sagittal"].GetID())
    view.set_foreground_volume_id(result["overlays"][top].GetID())
    view.set_foreground_opacity(0.6)
    window = view.render_window()
    window.SetSize(args.size, args.size)
    view.fit_view_to_content()
    # the slice through the middle of the femur, in RAS (x is the sagittal slice position)
    femur = np.argwhere(prediction.labelmap == prediction.catalog.structure("femur").label)
    if femur.size:
        centre_kji = femur.mean(0)
        ijk_to_ras = vtk.vtkMatrix4x4()
        nodes["sagittal"].GetIJKToRASMatrix(ijk_to_ras)
        ras = ijk_to_ras.MultiplyPoint([*centre_kji[::-1], 1.0])
        view.set_slice_value(ras[0])
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
    print(f"{args.out}: sagittal slice, structures + overlay of {top} (p = {prediction.finding_probabilities[top]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
