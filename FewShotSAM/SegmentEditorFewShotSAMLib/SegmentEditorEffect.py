"""Segment Editor effect "Few-shot SAM": fill the painted segments through the volume from a few painted slices.

Workflow, as Fill between slices and Grow from seeds: **Initialize** runs the model (in a separate process; the GUI
never blocks) and shows the result as a preview; paint one more slice where it is wrong and click **Update** (the
image embeddings are cached, so it takes seconds); **Apply** writes the preview into the segments as one undo step,
through the editor (editable area, intensity mask and "overwrite other segments" apply); **Cancel** stops a run or
drops the preview, leaving the segmentation as it was.

This file is the Qt shell; what touches the editor and the scene is in FewShotSAMSlicerLib/editor_effect.py and
FewShotSAMSlicerLib/logic.py (tested without Qt).
"""

from __future__ import annotations

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from FewShotSAMSlicerLib import editor_effect as ee
from FewShotSAMSlicerLib import logic as fewShotSAMLogic
from FewShotSAMSlicerLib import parameters
from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

EFFECT_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Few-shot SAM effect."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = ee.EFFECT_NAME  # not translated: modules find effects by name
        scriptedEffect.title = _("Few-shot SAM")
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self.job = None
        self.pending = None  # the previewed result (logic.PendingResult) until Apply or Cancel
        self.pollTimer = None
        self.sceneObserverTag = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as editorEffects

        clonedEffect = editorEffects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(EFFECT_DIRECTORY, "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return _("""<html>Fill segments through the whole volume from a few painted slices.<p>
Paint each structure on a few slices (Paint, Draw, ...), then click <b>Initialize</b>: a Segment Anything model
(LiteMedSAM by default) is adapted to your painted slices and the result is shown as a preview. Paint one more
slice where it is wrong and click <b>Update</b> (fast: image embeddings are cached). <b>Apply</b> writes the result
as one undo step, within the editable area; <b>Cancel</b> leaves the segmentation unchanged.</html>""")

    def setMRMLDefaults(self):
        ee.setMRMLDefaults(self.scriptedEffect)

    # -- options frame -------------------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        import ctk

        self.modelComboBox = qt.QComboBox()
        self.deviceComboBox = qt.QComboBox()
        self.orientationComboBox = qt.QComboBox()
        for comboBox, choices in ((self.modelComboBox, parameters.MODELS), (self.deviceComboBox, parameters.DEVICES),
                                  (self.orientationComboBox, parameters.ORIENTATIONS)):
            for value, label in choices:
                comboBox.addItem(label, value)
            comboBox.currentIndexChanged.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget(_("Model:"), self.modelComboBox)

        self.checkpointPathLineEdit = ctk.ctkPathLineEdit()
        self.checkpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.checkpointPathLineEdit.nameFilters = ["Checkpoints (*.pth *.pt)", "All files (*)"]
        self.checkpointPathLineEdit.toolTip = _("Weights (.pth) for SAM ViT-B/L/H or MedSAM ViT-B; not needed for "
                                                "LiteMedSAM.")
        self.checkpointPathLineEdit.currentPathChanged.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget(_("Checkpoint:"), self.checkpointPathLineEdit)
        self.scriptedEffect.addLabeledOptionsWidget(_("Device:"), self.deviceComboBox)
        self.scriptedEffect.addLabeledOptionsWidget(_("Slice orientation:"), self.orientationComboBox)

        self.selectedOnlyCheckBox = qt.QCheckBox(_("Only the selected segment"))
        self.selectedOnlyCheckBox.toolTip = _("Propagate only the selected segment. Otherwise every segment that has "
                                              "painted slices is propagated.")
        self.selectedOnlyCheckBox.toggled.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addOptionsWidget(self.selectedOnlyCheckBox)

        self.completeSlicesCheckBox = qt.QCheckBox(_("Painted slices show every structure on them (one run, faster)"))
        self.completeSlicesCheckBox.toolTip = _(
            "Check if, on every slice you painted, you painted all the structures visible on it: all segments are then "
            "propagated in one run, and a structure not painted on a painted slice is learned as absent there. "
            "Unchecked: segments painted on different slices are propagated one after the other.")
        self.completeSlicesCheckBox.toggled.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addOptionsWidget(self.completeSlicesCheckBox)

        self.previewButton = qt.QPushButton(_("Initialize"))
        self.previewButton.objectName = self.__class__.__name__ + "Preview"
        self.previewButton.toolTip = _("Run the model and show the result as a preview.")
        self.previewButton.clicked.connect(self.onPreview)
        self.scriptedEffect.addOptionsWidget(self.previewButton)

        self.previewOpacitySlider = ctk.ctkSliderWidget()
        self.previewOpacitySlider.toolTip = _("Opacity of the preview.")
        self.previewOpacitySlider.minimum = 0.0
        self.previewOpacitySlider.maximum = 1.0
        self.previewOpacitySlider.singleStep = 0.05
        self.previewOpacitySlider.spinBoxVisible = False
        self.previewOpacitySlider.valueChanged.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget(_("Preview opacity:"), self.previewOpacitySlider)

        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.toolTip = _("Stop the run, or drop the preview; the segmentation is left as it was.")
        self.cancelButton.clicked.connect(self.onCancel)
        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = _("Write the preview into the segments (one undo step).")
        self.applyButton.clicked.connect(self.onApply)
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.cancelButton)
        buttons.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.maximum = 1000
        self.progressBar.textVisible = False
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(100)
        self.pollTimer.timeout.connect(self.onPollJob)
        # Close Scene: stop the worker and forget the preview (its nodes go with the scene).
        self.sceneObserverTag = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

    def cleanup(self):
        """Called by Slicer 5.10+ before the effect is deleted, and by the module's cleanup on exit."""
        if self.job is not None:
            self.job.shutdown()
        if self.pollTimer is not None:
            self.pollTimer.stop()
        if self.sceneObserverTag is not None:
            slicer.mrmlScene.RemoveObserver(self.sceneObserverTag)
            self.sceneObserverTag = None

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor  # this effect does not paint

    # -- GUI <-> parameters --------------------------------------------------------------------------------------
    def updateGUIFromMRML(self):
        current = ee.settings(self.scriptedEffect)
        for comboBox, value in ((self.modelComboBox, current.model), (self.deviceComboBox, current.device),
                                (self.orientationComboBox, current.orientation)):
            wasBlocked = comboBox.blockSignals(True)
            comboBox.setCurrentIndex(max(0, comboBox.findData(value)))
            comboBox.blockSignals(wasBlocked)
        for widget, setter in ((self.checkpointPathLineEdit, lambda: setattr(self.checkpointPathLineEdit,
                                                                              "currentPath", current.checkpoint)),
                               (self.selectedOnlyCheckBox, lambda: setattr(self.selectedOnlyCheckBox, "checked",
                                                                            current.selectedOnly)),
                               (self.completeSlicesCheckBox, lambda: setattr(self.completeSlicesCheckBox, "checked",
                                                                              current.paintedSlicesComplete)),
                               (self.previewOpacitySlider, lambda: setattr(self.previewOpacitySlider, "value",
                                                                            current.previewOpacity))):
            wasBlocked = widget.blockSignals(True)
            setter()
            widget.blockSignals(wasBlocked)
        self.checkpointPathLineEdit.enabled = current.model in parameters.MODELS_NEEDING_CHECKPOINT
        self.updateButtons()

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter(ee.MODEL, self.modelComboBox.currentData)
        self.scriptedEffect.setParameter(ee.DEVICE, self.deviceComboBox.currentData)
        self.scriptedEffect.setParameter(ee.ORIENTATION, self.orientationComboBox.currentData)
        self.scriptedEffect.setParameter(ee.CHECKPOINT, self.checkpointPathLineEdit.currentPath)
        self.scriptedEffect.setParameter(ee.SELECTED_ONLY, 1 if self.selectedOnlyCheckBox.checked else 0)
        self.scriptedEffect.setParameter(ee.COMPLETE_SLICES, 1 if self.completeSlicesCheckBox.checked else 0)
        self.scriptedEffect.setParameter(ee.PREVIEW_OPACITY, f"{self.previewOpacitySlider.value:.2f}")
        self.checkpointPathLineEdit.enabled = self.modelComboBox.currentData in parameters.MODELS_NEEDING_CHECKPOINT
        if self.pending is not None:
            ee.setPreviewOpacity(self.pending.segmentationNode, ee.previewNode(self.scriptedEffect),
                                 self.previewOpacitySlider.value)

    def updateButtons(self):
        running = self.job is not None and self.job.isRunning
        self.previewButton.enabled = not running
        self.previewButton.text = _("Update") if self.pending is not None else _("Initialize")
        self.applyButton.enabled = self.pending is not None and not running
        self.cancelButton.enabled = running or self.pending is not None
        self.previewOpacitySlider.enabled = self.pending is not None

    # -- actions -------------------------------------------------------------------------------------------------
    def onPreview(self):
        from FewShotSAM import askToHardenTransforms, ensureDependenciesInteractively, moduleCacheDirectory

        if self.job is not None and self.job.isRunning:
            return
        current = ee.settings(self.scriptedEffect)
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        try:
            segmentationNode, sourceVolumeNode = ee.editorInputs(parameterSetNode)
            segmentIds = ee.selectedSegmentIds(parameterSetNode, current.selectedOnly)
        except FewShotSAMSlicerError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("Few-shot SAM"))
            return
        if ee.hasClosedSurfaceSource(segmentationNode):
            if not slicer.util.confirmYesNoDisplay(
                    _("'{name}' is stored as closed surfaces; Few-shot SAM writes binary labelmaps. Switch its source "
                      "representation to binary labelmap?").format(name=segmentationNode.GetName()),
                    windowTitle=_("Few-shot SAM")):
                return
            ee.switchSourceToBinaryLabelmap(segmentationNode)
        if not ensureDependenciesInteractively():
            return
        if not askToHardenTransforms([sourceVolumeNode, segmentationNode]):
            return
        if self.logic is None:
            self.logic = fewShotSAMLogic.FewShotSAMSlicerLogic()
        self.logic.cacheDirectory = moduleCacheDirectory()  # the module's cache folder setting
        preview = ee.previewNode(self.scriptedEffect) or ee.createPreviewNode(self.scriptedEffect, segmentationNode)
        try:
            self.job = self.logic.startPropagation(
                sourceVolumeNode, segmentationNode, segmentIds=segmentIds, model=current.model,
                checkpoint=current.checkpoint or None, device=current.device, orientation=current.orientation,
                hardenTransforms=True,  # the user was asked just above
                paintedSlicesComplete=current.paintedSlicesComplete, previewNode=preview,
                progressCallback=self.onProgress, finishedCallback=self.onJobFinished)
        except FewShotSAMSlicerError as error:
            self._dropPreviewIfEmpty()
            slicer.util.errorDisplay(str(error), windowTitle=_("Few-shot SAM"))
            return
        if not self.job.isRunning:  # could not even start; onJobFinished has reported it
            return
        self.statusLabel.text = self.job.description + "..."
        self.updateButtons()
        self.pollTimer.start()

    def onApply(self):
        if self.pending is None or (self.job is not None and self.job.isRunning):
            return
        pending, self.pending = self.pending, None
        writer = ee.editorResultWriter(self.scriptedEffect,
                                       slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        try:
            result = pending.commit(writer, beforeModifyCallback=self.scriptedEffect.saveStateForUndo)
            self.statusLabel.text = _("Applied {count} segment(s).").format(count=len(result["segmentIds"]))
        except FewShotSAMSlicerError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("Few-shot SAM"))
        ee.removePreviewNode(self.scriptedEffect, pending.segmentationNode)
        self.progressBar.value = 0
        self.updateButtons()

    def onCancel(self):
        if self.job is not None and self.job.isRunning:
            self.statusLabel.text = _("Cancelling...")
            self.job.cancel()
            return
        segmentationNode = self.pending.segmentationNode if self.pending is not None else None
        self.pending = None
        ee.removePreviewNode(self.scriptedEffect, segmentationNode)
        self.statusLabel.text = _("Preview dropped; the segmentation was not changed.")
        self.progressBar.value = 0
        self.updateButtons()

    def onSceneStartClose(self, caller=None, event=None):
        if self.job is not None and self.job.isRunning:
            self.job.cancel()
        self.pending = None  # the preview node goes with the scene

    def _dropPreviewIfEmpty(self):
        if self.pending is None:
            ee.removePreviewNode(self.scriptedEffect)

    def onPollJob(self):
        if self.job is None or not self.job.poll():
            self.pollTimer.stop()

    def onProgress(self, fraction, message):
        self.progressBar.value = int(round(1000 * fraction))
        self.statusLabel.text = message

    def onJobFinished(self, job):
        self.pollTimer.stop()
        if job.status == fewShotSAMLogic.SUCCEEDED:
            self.pending = job.result["pending"]
            ee.setPreviewOpacity(self.pending.segmentationNode, job.result["previewNode"],
                                 ee.settings(self.scriptedEffect).previewOpacity)
            self.progressBar.value = 1000
            seconds = f" in {job.elapsedSeconds:.0f} s" if job.elapsedSeconds is not None else ""
            self.statusLabel.text = _("Preview of {count} segment(s){seconds}: Apply, or paint more and Update.")\
                .format(count=len(job.result["segmentIds"]), seconds=seconds)
        elif job.status == fewShotSAMLogic.CANCELLED:
            self._dropPreviewIfEmpty()
            self.progressBar.value = 0
            self.statusLabel.text = _("Cancelled; nothing was changed.")
        else:
            self._dropPreviewIfEmpty()
            self.progressBar.value = 0
            self.statusLabel.text = _("Failed: ") + job.errorMessage
            slicer.util.errorDisplay(job.errorMessage, windowTitle=_("Few-shot SAM"),
                                     **({"detailedText": job.errorDetails} if job.errorDetails else {}))
        self.updateButtons()
