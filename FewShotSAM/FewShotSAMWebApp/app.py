"""FewShotSAM in the browser: trame-slicer's viewer and segment editor plus a FewShotSAM panel.

Layout and wiring only; scene work is in session.py and the extension's shared logic (FewShotSAMSlicerLib).
trame-slicer work-arounds are kept in ``_replaceUploadHandler`` and ``_announceVolume`` (both use its
SegmentationAppLogic internals, the only place that does), ``_useFlatBrushInMillimetres`` (its brush size is
relative to the server's off-screen "screen") and ``_fitSliceViewsToTheBrowser`` (its views are fitted before the
browser sizes them).
"""

from __future__ import annotations

import asyncio
import logging

from trame.app import TrameApp
from trame.app.file_upload import ClientFile
from trame.widgets import html
from trame.widgets.vuetify3 import (
    VAlert,
    VBtn,
    VCard,
    VCardText,
    VCardTitle,
    VDivider,
    VFileInput,
    VProgressLinear,
    VTextField,
)
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import SegmentationAppLogic
from trame_slicer.app.ui import SegmentationAppUI
from trame_slicer.core import SlicerApp

from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError
from FewShotSAMSlicerLib.logic import SUCCEEDED

from .session import EXPORTS, WebSession

POLL_SECONDS = 0.25
REFRESH_SECONDS = 1.0
# Paint and Erase brush: a diameter in mm (slider range and start value).
BRUSH_DIAMETER_MM = {"min_value": 2, "max_value": 60, "step": 1, "value": 20}


def sliceRanges(slices: list[int]) -> str:
    """[0, 1, 2, 4, 7, 8] -> "0-2, 4, 7-8" (the page lists propagated slices compactly)."""
    runs, start = [], None
    for index, value in enumerate(slices):
        if start is None:
            start = value
        if index + 1 == len(slices) or slices[index + 1] != value + 1:
            runs.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(runs)


class FewShotSAMWebApp(TrameApp):
    def __init__(self, server=None, scan: str | None = None, workDirectory: str | None = None, device: str = "auto",
                 cacheDirectory: str | None = None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicerApp = SlicerApp()
        self.viewerLogic = SegmentationAppLogic(self.server, self.slicerApp)
        self.viewerUi = SegmentationAppUI(self.server, self.viewerLogic.layout_manager)
        self.viewerLogic.set_ui(self.viewerUi)
        self.session = WebSession(self.slicerApp, workDirectory, device, cacheDirectory)
        self._initialState()
        self._replaceUploadHandler()
        self._useFlatBrushInMillimetres()
        self._buildPanel()
        self.server.state["trame__title"] = "FewShotSAM"
        self.viewerUi.layout.title.set_text("FewShotSAM")
        self.viewerUi.layout.flush_content()
        self._refreshPending = False
        self._observed = []
        self._tasks = set()
        self._fittedViews = {}  # slice view -> its field of view and origin as FewShotSAM last fitted them
        # Every edit made through the segment editor (brush strokes, undo/redo, segments added or removed): the
        # painted-slice list follows within a fraction of a second.
        self.slicerApp.segmentation_editor.segmentation_modified.connect(self._scheduleRefresh)
        if scan:
            self.server.controller.on_server_ready.add(lambda **_: self.openServerPath(scan))
        self.server.controller.on_server_ready.add(self._startPeriodicRefresh)

    # -- state ---------------------------------------------------------------------------------------------------
    def _initialState(self):
        self.state.update({
            "fsam_running": False, "fsam_progress": 0.0, "fsam_stage": "", "fsam_preview": False,
            "fsam_message": "", "fsam_message_type": "info", "fsam_scan_path": "", "fsam_slice": "",
            "fsam_painted": {}, "fsam_propagated": {}, "fsam_voxels": {}, "fsam_axial": None, "fsam_runs": 0,
            "fsam_scan_name": "", "fsam_model": "", "fsam_model_upload": None,
        })
        self.state.change("fsam_model_upload")(self.loadModel)

    def _say(self, message: str, kind: str = "info"):
        with self.state:
            self.state.fsam_message = message
            self.state.fsam_message_type = kind

    def _refreshSceneState(self):
        with self.state:
            try:
                painted, propagated = self.session.paintedAndPropagatedSlices()
                self.state.fsam_painted = painted
                self.state.fsam_propagated = {name: sliceRanges(slices) for name, slices in propagated.items()}
                self.state.fsam_voxels = self.session.segmentVoxelCounts()
            except FewShotSAMSlicerError as error:
                self.state.fsam_painted = {}
                self.state.fsam_propagated = {}
                self.state.fsam_voxels = {}
                logging.info("FewShotSAM: %s", error)
            self.state.fsam_axial = self.session.axialViewGeometry()

    def _scheduleRefresh(self, *_):
        # Segment and slice changes come in bursts (every brush stroke, every scroll step): refresh once after them.
        if self._refreshPending:
            return
        self._refreshPending = True

        async def refreshSoon():
            await asyncio.sleep(0.3)
            self._refreshPending = False
            self._refreshSceneState()

        self._startTask(refreshSoon())

    def _startTask(self, coroutine):
        # The event loop keeps only weak references to tasks: without this one a task can vanish mid-run.
        task = asyncio.get_event_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _startPeriodicRefresh(self, **_):
        # Some edits reach the segmentation without a segment event (trame-slicer applies brush strokes through
        # its own modifier), so the painted-slice list is also refreshed once a second.
        async def refreshForever():
            while True:
                await asyncio.sleep(REFRESH_SECONDS)
                if self.session.volumeNode is not None and not self.state.fsam_running:
                    self._refreshSceneState()

        self._startTask(refreshForever())

    def _observeScene(self):
        for node, tag in self._observed:
            node.RemoveObserver(tag)
        from slicer import vtkSegmentation

        watched = []
        segmentationNode = self.session.segmentationNode
        if segmentationNode is not None:
            watched += [(segmentationNode, event) for event in (vtkSegmentation.SegmentAdded,
                        vtkSegmentation.SegmentRemoved, vtkSegmentation.SegmentModified)]
        view = self.session.axialView()
        if view is not None:
            watched.append((self.slicerApp.scene.GetNodeByID(view.get_view_node_id()), "ModifiedEvent"))
        self._observed = [(node, node.AddObserver(event, self._scheduleRefresh)) for node, event in watched if node]

    def _useFlatBrushInMillimetres(self):
        # FewShotSAM learns from painted slices: trame-slicer's default sphere brush would also paint the slices
        # above and below (7 mm apart in abdominal MRI), so Paint and Erase start with a flat (2D) brush. Its
        # default size is relative to the *screen* height of the server's off-screen render window, which has
        # nothing to do with the browser's view, so the brush diameter is set in mm of the scan instead.
        from trame_server.utils.typed_state import TypedState
        from trame_slicer.app.ui import PaintEffectState
        from trame_slicer.segmentation import BrushDiameterMode

        brush = TypedState(self.state, PaintEffectState)
        brush.data.use_sphere_brush = False
        brush.data.brush_diameter_mode = BrushDiameterMode.Absolute
        for key, value in BRUSH_DIAMETER_MM.items():
            setattr(brush.data.brush_diameter_slider, key, value)
        # trame-slicer copies the effect's own size (6, screen-relative) into the slider when the effect starts, so
        # the effect itself gets the mm brush the first time Paint or Erase starts with a new parameter node.
        self._brushParameterNodes = set()
        self.slicerApp.segmentation_editor.active_effect_name_changed.connect(self._brushEffectInMillimetres)

    def _brushEffectInMillimetres(self, *_):
        from trame_slicer.segmentation import BrushDiameterMode, SegmentationEffectPaintErase

        effect = self.slicerApp.segmentation_editor.active_effect
        node = effect.get_parameter_node() if isinstance(effect, SegmentationEffectPaintErase) else None
        if node is None or node.GetID() in self._brushParameterNodes:
            return
        self._brushParameterNodes.add(node.GetID())
        effect.set_use_sphere_brush(False)
        effect.set_brush_diameter(BRUSH_DIAMETER_MM["value"], BrushDiameterMode.Absolute)

    # -- opening scans -------------------------------------------------------------------------------------------
    def _replaceUploadHandler(self):
        # trame-slicer's upload buttons load whatever arrives; FewShotSAM checks the upload first (zip of a DICOM
        # series, unreadable files) and reports problems in the page.
        signal = self.viewerUi.load_volume_items_buttons.on_load_volume
        signal.disconnect_all()
        signal.connect(self.openUpload)

    def openUpload(self, files: list[dict]):
        try:
            path = self.session.scanFromUpload([(ClientFile(f).name, ClientFile(f).content) for f in files])
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return
        self._open(path)

    def openServerPath(self, path: str | None = None):
        if not isinstance(path, (str, type(None))):  # a click event, not a path
            path = None
        from FewShotSAMSlicerLib.scan_files import scanFromServerPath

        try:
            checked = scanFromServerPath(path if path is not None else self.state.fsam_scan_path)
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return
        self._open(checked)

    def _open(self, path: str):
        try:
            self.session.ensureIdle("open another scan")
            self.slicerApp.scene.Clear()
            self._brushParameterNodes.clear()  # node IDs start again in the cleared scene
            volume = self.session.loadScan(path)
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return
        self._announceVolume(volume)
        self._fitSliceViewsToTheBrowser()
        self._observeScene()
        with self.state:
            self.state.fsam_scan_name = volume.GetName()
            self.state.fsam_preview = False
        self._say(f"Opened {volume.GetName()}. Add a segment per structure, paint each on a few axial slices, then "
                  "press Adapt & Propagate.")
        self._refreshSceneState()

    def _announceVolume(self, volume):
        # As trame-slicer's own loader does: show the volume, then let its panels pick it up (segment editor,
        # volume properties, drawer).
        self.slicerApp.display_manager.show_volume(volume, do_reset_views=True)
        self.viewerLogic._load_files_logic.volume_loaded(volume)

    def _fitSliceViewsToTheBrowser(self):
        # A scan opened before the page has its size is fitted to trame-slicer's 300 x 300 placeholder window; when
        # the browser then sizes the view, Slicer keeps the field of view's height and a narrow view cuts the slice's
        # sides off. So a slice view is fitted again whenever the browser resizes it, unless the user has zoomed or
        # panned it since the last fit.
        for view in self.slicerApp.view_manager.get_slice_views():
            if view not in self._fittedViews:
                view.interactor().AddObserver("WindowResizeEvent", lambda *_, v=view: self._refitUntouched(v))
            self._fittedViews[view] = self._fieldOfView(view)

    @staticmethod
    def _fieldOfView(view):
        node = view.get_view_node()
        return (round(node.GetFieldOfView()[1], 3), tuple(round(v, 3) for v in node.GetXYZOrigin()))

    def _refitUntouched(self, view):
        if self.session.volumeNode is None or self._fittedViews.get(view) != self._fieldOfView(view):
            return
        view.fit_view_to_content()
        self._fittedViews[view] = self._fieldOfView(view)
        self._scheduleRefresh()

    # -- Adapt & Propagate ---------------------------------------------------------------------------------------
    def propagate(self):
        self._startJob(self.session.startPropagation, self._propagated)

    def _onProgress(self, fraction: float, message: str):
        self.state.fsam_progress = round(100 * fraction, 1)
        self.state.fsam_stage = message

    def _startJob(self, start, whenDone):
        try:
            job = start(progressCallback=self._onProgress)
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return
        with self.state:
            self.state.fsam_running = True
            self.state.fsam_preview = False
            self.state.fsam_progress = 0.0
        self._say(job.description or "Adapting and propagating", "info")
        self._startTask(self._follow(job, whenDone))

    async def _follow(self, job, whenDone):
        # The job is polled here, in the server's thread, so the scene is only touched from this thread; the
        # worker runs in its own process and the page stays responsive.
        while True:
            with self.state:
                running = job.poll()
            if not running:
                break
            await asyncio.sleep(POLL_SECONDS)
        self._renderViews()
        if job.status == SUCCEEDED:
            whenDone(job, f" in {job.elapsedSeconds:.0f} s" if job.elapsedSeconds else "")
        else:
            self._say(job.errorMessage, "warning" if job.status == "cancelled" else "error")
        # Finished only once its outcome is on the page: a run counted before its message (a busy server takes
        # seconds to render the views) showed "Propagating ..." beside an enabled button.
        with self.state:
            self.state.fsam_running = False
            self.state.fsam_runs += 1
        self._refreshSceneState()

    def _propagated(self, job, seconds: str):
        with self.state:
            self.state.fsam_preview = self.session.snapshot is not None
        self._say(f"Propagated{seconds}. Accept the result, or Discard it to go back to your painting.", "success")

    # -- adapted models (.fsam) ---------------------------------------------------------------------------------
    def saveModel(self):
        self._startJob(self.session.startSaveModel, self._modelSaved)

    def _modelSaved(self, job, seconds: str):
        self.state.fsam_model = self.session.modelFile()[0]
        self._say(f"Adapted model saved{seconds}: download it (.fsam), or open another scan and press Apply model.",
                  "success")

    def loadModel(self, fsam_model_upload=None, **_):
        if not fsam_model_upload:
            return
        upload = ClientFile(fsam_model_upload[0] if isinstance(fsam_model_upload, list) else fsam_model_upload)
        try:
            self.session.modelFromUpload(upload.name, upload.content or b"")
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return
        self.state.fsam_model = upload.name
        self._say(f"Loaded {upload.name}. Press Apply model to segment the open scan with it.", "success")

    def applyModel(self):
        self._startJob(self.session.startApplyModel, self._modelApplied)

    def _modelApplied(self, job, seconds: str):
        self._observeScene()
        self._say(f"Segmented {self.state.fsam_scan_name} with {self.state.fsam_model}{seconds}, into a new "
                  "segmentation (the one before stays in the scene).", "success")

    def cancel(self):
        self.session.cancel()

    def accept(self):
        self.session.accept()
        self.state.fsam_preview = False
        self._say("Result accepted. Paint more slices where it is wrong and run again (cached embeddings: seconds).")

    def _renderViews(self):
        # A result written by the shared logic does not pass through trame-slicer's editor, which is what schedules
        # the remote views' images: without this the views keep showing the painting alone.
        for view in self.slicerApp.view_manager.get_views():
            view.schedule_render()

    def discard(self):
        self.session.discard()
        self._renderViews()
        self.state.fsam_preview = False
        self._say("Result discarded; the segmentation is as you painted it.")
        self._refreshSceneState()

    def goToSlice(self, text: str | None = None):
        # The typed text comes with the key event: the v-model update may arrive after it.
        text = str(self.state.fsam_slice if text is None else text).strip()
        try:
            self.session.showSlice(int(text))
        except ValueError:
            self._say(f"'{text}' is not a slice number.", "error")
            return
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return
        self._refreshSceneState()

    # -- export --------------------------------------------------------------------------------------------------
    def exportForDownload(self, kind: str):
        try:
            name, content = self.session.exportFile(kind)
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return None
        self._say(f"Exported {name}.", "success")
        return self.server.protocol.addAttachment(content)

    def modelForDownload(self):
        try:
            _, content = self.session.modelFile()
        except FewShotSAMSlicerError as error:
            self._say(str(error), "error")
            return None
        return self.server.protocol.addAttachment(content)

    # -- layout --------------------------------------------------------------------------------------------------
    def _buildPanel(self):
        exportTrigger = self.server.controller.trigger_name(self.exportForDownload)
        modelTrigger = self.server.controller.trigger_name(self.modelForDownload)
        with self.viewerUi.layout.drawer:
            with VCard(classes="ma-2", variant="outlined", id="fsam-panel"):
                VCardTitle("FewShotSAM")
                with VCardText():
                    with html.Div(classes="d-flex align-center"):
                        VTextField(v_model=("fsam_scan_path",), label="Scan on the server", density="compact",
                                   hide_details=True, id="fsam-scan-path",
                                   __events=[("keydown_enter", "keydown.enter")],
                                   keydown_enter=(self.openServerPath, "[$event.target.value]"))
                        VBtn("Open", click=self.openServerPath, size="small", classes="ml-2", id="fsam-open")
                    VDivider(classes="my-2")
                    VBtn("Adapt & Propagate", click=self.propagate, color="primary", block=True,
                         disabled=("fsam_running || !fsam_scan_name",), id="fsam-propagate")
                    with html.Div(v_if=("fsam_running",), classes="mt-2"):
                        VProgressLinear(model_value=("fsam_progress",), height=8, color="primary",
                                        id="fsam-progress")
                        html.Div("{{ fsam_stage }} ({{ Math.round(fsam_progress) }}%)", classes="text-caption")
                        VBtn("Cancel", click=self.cancel, color="error", size="small", block=True, classes="mt-1",
                             id="fsam-cancel")
                    with html.Div(v_if=("fsam_preview",), classes="d-flex mt-2"):
                        VBtn("Accept", click=self.accept, color="success", size="small", classes="mr-2",
                             id="fsam-accept")
                        VBtn("Discard", click=self.discard, size="small", id="fsam-discard")
                    VAlert(v_if=("fsam_message",), text=("fsam_message",), type=("fsam_message_type",),
                           density="compact", classes="mt-2 text-caption", id="fsam-message")
                    VDivider(classes="my-2")
                    html.Div("Painted slices (axial)", classes="text-subtitle-2")
                    with html.Div(v_for=("(slices, name) in fsam_painted",), classes="text-caption"):
                        html.Span("{{ name }}: {{ slices.length ? slices.join(', ') : 'none' }}"
                                  " ({{ fsam_voxels[name] || 0 }} voxels)")
                        html.Span("; propagated: {{ fsam_propagated[name] }}", v_if=("fsam_propagated[name]",),
                                  classes="text-medium-emphasis")
                    with html.Div(classes="d-flex align-center mt-1"):
                        VTextField(v_model=("fsam_slice",), label="Go to slice", density="compact", hide_details=True,
                                   id="fsam-slice", __events=[("keydown_enter", "keydown.enter")],
                                   keydown_enter=(self.goToSlice, "[$event.target.value]"))
                        html.Div("{{ fsam_axial ? `now ${fsam_axial.slice} of 0-${fsam_axial.slices - 1}` : '' }}",
                                 classes="text-caption ml-2")
                    VDivider(classes="my-2")
                    html.Div("Adapted model (.fsam)", classes="text-subtitle-2")
                    with html.Div(classes="d-flex align-center"):
                        VBtn("Save model", click=self.saveModel, size="small", classes="mr-1", variant="tonal",
                             disabled=("fsam_running || !fsam_scan_name",), id="fsam-save-model")
                        VBtn("Apply model", click=self.applyModel, size="small", classes="mr-1", variant="tonal",
                             disabled=("fsam_running || !fsam_scan_name || !fsam_model",), id="fsam-apply-model")
                        VBtn(".fsam", size="small", variant="tonal", disabled=("!fsam_model",),
                             id="fsam-export-fsam", prepend_icon="mdi-download",
                             click=(f"utils.download(fsam_model, trigger('{modelTrigger}'), "
                                    "'application/octet-stream')"))
                    VFileInput(v_model=("fsam_model_upload", None), label="Load a .fsam", accept=".fsam",
                               density="compact", hide_details=True, classes="mt-1", id="fsam-load-model",
                               disabled=("fsam_running",))
                    html.Div("{{ fsam_model ? `Model: ${fsam_model}` : '' }}", classes="text-caption")
                    VDivider(classes="my-2")
                    html.Div("Download", classes="text-subtitle-2")
                    with html.Div(classes="d-flex"):
                        for kind, (mime, _) in EXPORTS.items():
                            VBtn(f".{kind}", size="small", classes="mr-1", variant="tonal",
                                 disabled=("!fsam_scan_name",), id=f"fsam-export-{kind.replace('.', '-')}",
                                 click=(f"utils.download(`${{fsam_scan_name}}-fewshotsam.{kind}`, "
                                        f"trigger('{exportTrigger}', ['{kind}']), '{mime}')"))
        drawer = self.viewerUi.layout.drawer
        drawer.children.insert(0, drawer.children.pop())  # FewShotSAM's panel above the segment editor
        self.server.controller.on_client_connected.add(self._refreshSceneState)


def serve(scan: str | None = None, host: str = "localhost", port: int = 8080, workDirectory: str | None = None,
          device: str = "auto", cacheDirectory: str | None = None, openBrowser: bool = False) -> None:
    app = FewShotSAMWebApp(scan=scan, workDirectory=workDirectory, device=device, cacheDirectory=cacheDirectory)
    app.server.start(host=host, port=port, open_browser=openBrowser)
