"""The browser viewer: trame-slicer views of one case and panels that drive a ViewerSession.

Left, the panels: the structures (colour, name, volume, visibility), the findings
(probability, where, map volume, show its overlay, accept / reject), the overlay's opacity
and threshold, paint / erase a structure, Save. Right, Slicer's own sagittal, coronal, axial
and 3D views, rendered on the server and streamed to the page (trame-slicer's remote views).
A case that has not been predicted yet is predicted first, in a worker thread, with its
progress on the page. The Versions panel runs another bundle version on the same case and
compares the two outputs (Dice and volumes per structure, findings that changed; versions.py and
compare.py), and shows either.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

__all__ = ["OrthoKneeViewer"]

LAYOUT = "Quad View"


class OrthoKneeViewer:
    """``OrthoKneeViewer(server, output_folder, predict=None)``: ``predict`` (a callable taking a
    progress callback) runs first when the folder holds no result yet."""

    def __init__(
        self,
        server,
        output_folder: str | Path,
        predict: Callable | None = None,
        versions: list[str | Path] = (),
        device: str = "auto",
    ) -> None:
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.server = server
        self.state, self.ctrl = server.state, server.controller
        self.folder = self.base_folder = Path(output_folder)
        self._predict = predict
        self._version_paths, self._device = list(versions), device
        self.session = None
        server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout(LAYOUT)
        self._init_state()
        self._build_ui()
        self.ctrl.on_server_ready.add(self._start)

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "OrthoKnee"
        s.status = "loading"
        s.progress = 0
        s.message = ""
        s.case_name = ""
        s.bundle = ""
        s.structures = []
        s.findings = []
        s.overlay = None
        s.opacity = 0.6
        s.threshold = 0.5
        s.tool = "none"
        s.paint_structure = "femur"
        s.saved = ""
        s.warnings = []
        s.versions = []  # [{path, label, problem, ...}] (versions.BundleVersion.to_json)
        s.version_path = ""
        s.version_status = ""
        s.compare_rows = []
        s.compare_findings = ""
        s.compare_folder = ""
        s.showing = "A"
        s.change("overlay")(self._on_overlay)
        s.change("opacity")(self._on_opacity)
        s.change("threshold")(self._on_threshold)
        s.change("tool", "paint_structure")(self._on_tool)

    def _publish(self) -> None:
        session = self.session
        with self.state:
            self.state.structures = session.structures()
            self.state.findings = session.findings()
            self.state.case_name = session.prediction.case_name
            bundle = session.prediction.bundle or {}
            self.state.bundle = f"{bundle.get('name', '')} {bundle.get('version', '')}".strip()
            self.state.overlay = session.overlay_key
            self.state.warnings = list(session.prediction.warnings)

    # ------------------------------------------------------------------ start-up
    def _start(self, **_) -> None:
        """trame calls server-ready hooks without awaiting them: the loading runs as a task."""
        asyncio.ensure_future(self._on_ready())

    async def _on_ready(self) -> None:
        from ..results import is_output_folder

        loop = asyncio.get_running_loop()
        if not is_output_folder(self.folder):
            if self._predict is None:
                self._set_status("error", f"{self.folder} holds no OrthoKnee result.")
                return

            def progress(done, total, message=""):
                loop.call_soon_threadsafe(self._set_progress, done, total, message)

            self._set_status("predicting", "predicting the case")
            try:
                await loop.run_in_executor(None, self._predict, progress)
            except Exception as exc:  # shown on the page; the server stays up
                self._set_status("error", f"prediction failed: {exc}")
                return
        self._load_session()

    def _set_progress(self, done: int, total: int, message: str) -> None:
        with self.state:
            self.state.progress = int(100 * done / max(total, 1))
            self.state.message = f"predicting: {message}"

    def _set_status(self, status: str, message: str) -> None:
        with self.state:
            self.state.status = status
            self.state.message = message

    def _load_session(self) -> None:
        from ..versions import list_versions
        from .session import ViewerSession

        self.session = ViewerSession(
            self.slicer_app, self.folder, threshold=self.state.threshold, opacity=self.state.opacity
        )
        self.session.show_background()
        if not self.state.versions:
            current = (self.session.prediction.bundle or {}).get("path")
            choices = [v.to_json() for v in list_versions([*([current] if current else []), *self._version_paths])]
            with self.state:
                self.state.versions = choices
                usable = [v["path"] for v in choices if not v["problem"] and v["path"] != current]
                self.state.version_path = usable[0] if usable else ""
        self._publish()
        self._set_status("ready", "")
        self._render()
        # the views get their size from the page once it has laid them out: fit the slices again then
        asyncio.get_running_loop().call_later(1.5, self.fit_views)

    def fit_views(self) -> None:
        """Slices fitted to their series, the 3D camera to the structures."""
        self.slicer_app.display_manager.reset_views()
        for view in self.slicer_app.view_manager.get_slice_views():
            view.fit_view_to_content()
        self._render()

    # ------------------------------------------------------------------ events
    def _on_overlay(self, overlay, **_) -> None:
        if self.session:
            self.session.show_overlay(overlay or None)
            self._render()

    def _on_opacity(self, opacity, **_) -> None:
        if self.session:
            self.session.set_opacity(float(opacity))
            self._render()

    def _on_threshold(self, threshold, **_) -> None:
        if self.session:
            self.session.set_threshold(float(threshold))
            self._render()

    def _on_tool(self, tool, paint_structure, **_) -> None:
        if not self.session:
            return
        if tool in ("paint", "erase"):
            self.session.start_editing(paint_structure, erase=tool == "erase")
        else:
            self.session.stop_editing()

    def toggle_structure(self, key: str, visible: bool) -> None:
        self.session.set_structure_visible(key, bool(visible))
        self._publish()
        self._render()

    def decide(self, key: str, decision: str) -> None:
        current = self.session.decisions.get(key)
        self.session.decide(key, None if current == decision else decision)  # a second click undoes
        self._publish()

    def save(self) -> None:
        try:
            written = self.session.save()
        except Exception as exc:  # shown on the page
            self.state.saved = f"not saved: {exc}"
            return
        self.state.saved = f"saved {written['segmentation'].name} and {written['review'].name}"

    # ------------------------------------------------------------------ versions
    def run_version(self) -> None:
        asyncio.ensure_future(self._run_version())

    async def _run_version(self) -> None:
        """Predict the case with the picked version (a worker thread), then compare it with the first output."""
        from ..compare import compare_predictions
        from ..versions import describe, run_version

        version = describe(self.state.version_path)
        loop = asyncio.get_running_loop()

        def progress(done, total, message=""):
            loop.call_soon_threadsafe(self._set_version_status, f"running {version.label}: {message}")

        self._set_version_status(f"running {version.label}")
        try:
            out = await loop.run_in_executor(None, run_version, self.base_folder, version, self._device, progress)
            diff = compare_predictions(self.base_folder, out)
        except Exception as exc:  # the refusal's message, on the page
            self._set_version_status(f"not run: {exc}")
            return
        rows = [
            {
                "key": key,
                "name": row["name"],
                "dice": "-" if row["dice"] is None else f"{row['dice']:.3f}",
                "volume_a": f"{row['volume_ml_a']:.1f}",
                "volume_b": f"{row['volume_ml_b']:.1f}",
            }
            for key, row in diff["structures"].items()
        ]
        changed = [f"{k} {v['a']:.2f} → {v['b']:.2f}" for k, v in diff["findings"].items() if v["changed"]]
        only = [
            f"only {side.upper()}: {', '.join(diff[f'only_in_{side}'])}" for side in "ab" if diff[f"only_in_{side}"]
        ]
        with self.state:
            self.state.compare_rows = rows
            self.state.compare_findings = "; ".join(["findings changed: " + (", ".join(changed) or "none"), *only])
            self.state.compare_folder = str(out)
            self.state.version_status = f"B = {version.label} ({out.name})"

    def _set_version_status(self, text: str) -> None:
        with self.state:
            self.state.version_status = text

    def show(self, which: str) -> None:
        """Show output A (the case's first) or B (the compared version's) in the views and panels."""
        folder = self.base_folder if which == "A" else Path(self.state.compare_folder or self.base_folder)
        if folder == self.folder:
            return
        self.folder = folder
        self.slicer_app.scene.Clear(0)  # the views' own nodes (singletons) stay
        self.state.showing = which
        self._load_session()

    def _render(self) -> None:
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    # ------------------------------------------------------------------ page
    def _build_ui(self) -> None:
        from trame.widgets import html
        from trame.widgets import vuetify3 as v
        from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

        with SinglePageWithDrawerLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("OrthoKnee")
            self.ui.drawer.width = 430
            with self.ui.toolbar:
                v.VSpacer()
                html.Span(
                    "{{ case_name }} · {{ bundle }} · research only, not for clinical use",
                    classes="text-caption mr-4",
                    id="case-title",
                )
            with self.ui.drawer:
                with html.Div(classes="pa-2", style="font-size: 13px"):
                    html.Div("{{ message }}", id="status-message", v_if="status !== 'ready'")
                    v.VProgressLinear(model_value=("progress",), v_if="status === 'predicting'", id="progress")
                    with html.Div(v_if="status === 'ready'"):
                        html.Div("Structures", classes="text-subtitle-2 mt-1")
                        with html.Table(id="structures", style="width: 100%"):
                            with html.Tr(
                                v_for="s in structures",
                                key="s.key",
                                id=("'structure-' + s.key",),
                                classes="structure-row",
                            ):
                                with html.Td(style="width: 24px"):
                                    html.Div(
                                        style=(
                                            "{background: s.color, width: '14px', height: '14px', borderRadius: '3px'}",
                                        )
                                    )
                                html.Td("{{ s.name }}", classes="structure-name")
                                html.Td("{{ s.volume_ml }} mL", style="text-align: right")
                                with html.Td(style="width: 30px"):
                                    html.Input(
                                        type="checkbox",
                                        checked=("s.visible",),
                                        id=("'visible-' + s.key",),
                                        change=(self.toggle_structure, "[s.key, $event.target.checked]"),
                                    )
                        html.Div("Findings (probability, where, map above threshold)", classes="text-subtitle-2 mt-3")
                        with html.Table(id="findings", style="width: 100%"):
                            with html.Tr(
                                v_for="f in findings", key="f.key", id=("'finding-' + f.key",), classes="finding-row"
                            ):
                                with html.Td():
                                    html.Input(
                                        type="radio",
                                        name="overlay",
                                        value=("f.key",),
                                        checked=("overlay === f.key",),
                                        id=("'show-' + f.key",),
                                        change="overlay = f.key",
                                    )
                                html.Td("{{ f.name }}", classes="finding-name")
                                html.Td(
                                    "{{ f.probability.toFixed(3) }}",
                                    classes="finding-probability",
                                    style="text-align: right",
                                )
                                html.Td("{{ f.where }}", classes="finding-where text-caption")
                                with html.Td(style="white-space: nowrap"):
                                    for mark, verb, decision in (
                                        ("✓", "accept", "accepted"),
                                        ("✗", "reject", "rejected"),
                                    ):
                                        html.Button(
                                            mark,
                                            id=(f"'{verb}-' + f.key",),
                                            title=verb,
                                            style=(f"{{fontWeight: f.decision === '{decision}' ? 'bold' : 'normal'}}",),
                                            click=(self.decide, f"[f.key, '{decision}']"),
                                        )
                                    html.Span("{{ f.decision }}", classes="finding-decision text-caption")
                        with html.Div(classes="mt-2"):
                            html.Input(
                                type="radio",
                                name="overlay",
                                id="show-none",
                                checked=("!overlay",),
                                change="overlay = null",
                            )
                            html.Span(" no overlay")
                        with html.Div(classes="mt-2"):
                            for name in ("opacity", "threshold"):  # each a 0..1 slider bound to its state
                                html.Span(f" {name} ")
                                html.Input(
                                    type="range",
                                    min=0,
                                    max=1,
                                    step=0.05,
                                    id=name,
                                    value=(name,),
                                    input=f"{name} = Number($event.target.value)",
                                )
                        html.Div("Edit", classes="text-subtitle-2 mt-3")
                        with html.Div():
                            with html.Select(
                                id="paint-structure",
                                value=("paint_structure",),
                                change="paint_structure = $event.target.value",
                            ):
                                html.Option("{{ s.name }}", v_for="s in structures", key="s.key", value=("s.key",))
                            for tool, label in (("none", "navigate"), ("paint", "paint"), ("erase", "erase")):
                                html.Button(
                                    label,
                                    id=f"tool-{tool}",
                                    click=f"tool = '{tool}'",
                                    style=(f"{{fontWeight: tool === '{tool}' ? 'bold' : 'normal'}}",),
                                    classes="ml-1",
                                )
                        with html.Div(classes="mt-3"):
                            html.Button("Fit views", id="fit", click=self.fit_views, classes="mr-2")
                            html.Button("Save", id="save", click=self.save)
                            html.Span("{{ saved }}", id="saved", classes="ml-2 text-caption")
                        html.Div("Versions", classes="text-subtitle-2 mt-3")
                        with html.Div():
                            with html.Select(
                                id="version",
                                value=("version_path",),
                                change="version_path = $event.target.value",
                                style="max-width: 300px",
                            ):
                                html.Option(
                                    "{{ v.label }}",
                                    v_for="v in versions",
                                    key="v.path",
                                    value=("v.path",),
                                    disabled=("!!v.problem",),
                                )
                            html.Button("Run and compare", id="run-version", click=self.run_version, classes="ml-1")
                        html.Div("{{ version_status }}", id="version-status", classes="text-caption")
                        with html.Table(id="compare", v_if="compare_rows.length", style="width: 100%"):
                            with html.Tr():
                                for head in ("structure", "Dice A vs B", "mL A", "mL B"):
                                    html.Th(head, style="text-align: left")
                            with html.Tr(v_for="r in compare_rows", key="r.key", classes="compare-row"):
                                html.Td("{{ r.name }}")
                                html.Td("{{ r.dice }}", classes="compare-dice")
                                html.Td("{{ r.volume_a }}")
                                html.Td("{{ r.volume_b }}")
                        html.Div("{{ compare_findings }}", id="compare-findings", classes="text-caption")
                        with html.Div(v_if="compare_folder"):
                            for which in ("A", "B"):
                                html.Button(
                                    f"show {which}",
                                    id=f"show-{which.lower()}",
                                    click=(self.show, f"['{which}']"),
                                    style=(f"{{fontWeight: showing === '{which}' ? 'bold' : 'normal'}}",),
                                    classes="mr-1",
                                )
                        with html.Div(classes="mt-3 text-caption", id="warnings"):
                            html.Div("⚠ {{ w }}", v_for="w in warnings", key="w")
            with self.ui.content:
                # the views fill what the drawer and the toolbars leave (v-main's own padding keeps them clear)
                with html.Div(style="height: calc(100vh - 88px); width: 100%; display: flex"):
                    self.layout_manager.initialize_layout_grid(self.ui)
