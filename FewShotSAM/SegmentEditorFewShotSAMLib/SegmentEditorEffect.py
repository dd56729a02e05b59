"""Segment Editor effect "Few-shot SAM": fill the painted segments through the volume from a few painted slices.

The effect uses the editor's source volume and segmentation, and the same logic as the FewShotSAM module
(FewShotSAMSlicerLib), with the worker in a separate process. The write-back is one undo step: the editor's undo
state is saved right before the segments are modified, so Ctrl+Z returns to the painted slices.
"""

from __future__ import annotations

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from FewShotSAMSlicerLib import logic as fewShotSAMLogic
from FewShotSAMSlicerLib import parameters
from FewShotSAMSlicerLib.errors import FewShotSAMSlicerError

EFFECT_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
# Effect parameters are stored in the Segment Editor's parameter node, under these names.
MODEL_PARAMETER = "FewShotSAM.Model"
CHECKPOINT_PARAMETER = "FewShotSAM.Checkpoint"
DEVICE_PARAMETER = "FewShotSAM.Device"
ORIENTATION_PARAMETER = "FewShotSAM.Orientation"
SELECTED_ONLY_PARAMETER = "FewShotSAM.SelectedSegmentOnly"
COMPLETE_SLICES_PARAMETER = "FewShotSAM.PaintedSlicesComplete"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Few-shot SAM effect."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Few-shot SAM"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self.job = None
        self.pollTimer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as editorEffects

        clonedEffect = editorEffects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(EFFECT_DIRECTORY, "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Fill segments through the whole volume from a few painted slices.<p>
Paint each structure on a few slices (for example with Paint or Draw), then click <b>Apply</b>. A Segment Anything
model (LiteMedSAM by default) is adapted to your painted slices and the segments are filled slice by slice.
Painted slices are kept exactly as painted. Paint one more slice where the result is wrong and click Apply again;
image embeddings are cached, so the second run is fast. Ctrl+Z undoes the whole result at once.</html>"""

    def setDefaultParameters(self):
        self.scriptedEffect.setParameterDefault(MODEL_PARAMETER, "litemedsam")
        self.scriptedEffect.setParameterDefault(CHECKPOINT_PARAMETER, "")
        self.scriptedEffect.setParameterDefault(DEVICE_PARAMETER, "auto")
        self.scriptedEffect.setParameterDefault(ORIENTATION_PARAMETER, "auto")
        self.scriptedEffect.setParameterDefault(SELECTED_ONLY_PARAMETER, 0)
        self.scriptedEffect.setParameterDefault(COMPLETE_SLICES_PARAMETER, 0)

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
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)

        self.checkpointPathLineEdit = ctk.ctkPathLineEdit()
        self.checkpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.checkpointPathLineEdit.nameFilters = ["Checkpoints (*.pth *.pt)", "All files (*)"]
        self.checkpointPathLineEdit.toolTip = "Weights (.pth) for SAM ViT-B/L/H or MedSAM ViT-B; not needed for LiteMedSAM."
        self.checkpointPathLineEdit.currentPathChanged.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget("Checkpoint:", self.checkpointPathLineEdit)
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceComboBox)
        self.scriptedEffect.addLabeledOptionsWidget("Slice orientation:", self.orientationComboBox)

        self.selectedOnlyCheckBox = qt.QCheckBox("Only the selected segment")
        self.selectedOnlyCheckBox.toolTip = ("Propagate only the selected segment. Otherwise every segment that has "
                                             "painted slices is propagated.")
        self.selectedOnlyCheckBox.toggled.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addOptionsWidget(self.selectedOnlyCheckBox)

        self.completeSlicesCheckBox = qt.QCheckBox("Painted slices show every structure on them (one run, faster)")
        self.completeSlicesCheckBox.toolTip = (
            "Check if, on every slice you painted, you painted all the structures visible on it: all segments are then "
            "propagated in one run, and a structure not painted on a painted slice is learned as absent there. "
            "Unchecked: segments painted on different slices are propagated one after the other.")
        self.completeSlicesCheckBox.toggled.connect(self.updateMRMLFromGUI)
        self.scriptedEffect.addOptionsWidget(self.completeSlicesCheckBox)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = "Fill the painted segments through the volume."
        self.applyButton.clicked.connect(self.onApply)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        self.cancelButton.toolTip = "Stop; the segmentation is left exactly as it was."
        self.cancelButton.clicked.connect(self.onCancel)
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.applyButton)
        buttons.addWidget(self.cancelButton)
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

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor  # this effect does not paint

    def updateGUIFromMRML(self):
        for comboBox, name in ((self.modelComboBox, MODEL_PARAMETER), (self.deviceComboBox, DEVICE_PARAMETER),
                               (self.orientationComboBox, ORIENTATION_PARAMETER)):
            wasBlocked = comboBox.blockSignals(True)
            comboBox.setCurrentIndex(max(0, comboBox.findData(self.scriptedEffect.parameter(name))))
            comboBox.blockSignals(wasBlocked)
        wasBlocked = self.checkpointPathLineEdit.blockSignals(True)
        self.checkpointPathLineEdit.currentPath = self.scriptedEffect.parameter(CHECKPOINT_PARAMETER)
        self.checkpointPathLineEdit.enabled = self.modelComboBox.currentData in parameters.MODELS_NEEDING_CHECKPOINT
        self.checkpointPathLineEdit.blockSignals(wasBlocked)
        wasBlocked = self.selectedOnlyCheckBox.blockSignals(True)
        self.selectedOnlyCheckBox.checked = self.scriptedEffect.integerParameter(SELECTED_ONLY_PARAMETER) != 0
        self.selectedOnlyCheckBox.blockSignals(wasBlocked)
        wasBlocked = self.completeSlicesCheckBox.blockSignals(True)
        self.completeSlicesCheckBox.checked = self.scriptedEffect.integerParameter(COMPLETE_SLICES_PARAMETER) != 0
        self.completeSlicesCheckBox.blockSignals(wasBlocked)
        running = self.job is not None and self.job.isRunning
        self.applyButton.enabled = not running
        self.cancelButton.enabled = running

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter(MODEL_PARAMETER, self.modelComboBox.currentData)
        self.scriptedEffect.setParameter(DEVICE_PARAMETER, self.deviceComboBox.currentData)
        self.scriptedEffect.setParameter(ORIENTATION_PARAMETER, self.orientationComboBox.currentData)
        self.scriptedEffect.setParameter(CHECKPOINT_PARAMETER, self.checkpointPathLineEdit.currentPath)
        self.scriptedEffect.setParameter(SELECTED_ONLY_PARAMETER, 1 if self.selectedOnlyCheckBox.checked else 0)
        self.scriptedEffect.setParameter(COMPLETE_SLICES_PARAMETER, 1 if self.completeSlicesCheckBox.checked else 0)
        self.checkpointPathLineEdit.enabled = self.modelComboBox.currentData in parameters.MODELS_NEEDING_CHECKPOINT

    def _sourceVolumeNode(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        getter = getattr(parameterSetNode, "GetSourceVolumeNode", None) or parameterSetNode.GetMasterVolumeNode
        return getter()

    def onApply(self):
        from FewShotSAM import askToHardenTransforms, ensureDependenciesInteractively

        if self.job is not None and self.job.isRunning:
            return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        sourceVolumeNode = self._sourceVolumeNode()
        segmentIds = None
        if self.scriptedEffect.integerParameter(SELECTED_ONLY_PARAMETER):
            selected = parameterSetNode.GetSelectedSegmentID()
            if not selected:
                slicer.util.errorDisplay("Select a segment first.", windowTitle="Few-shot SAM")
                return
            segmentIds = [selected]
        if not ensureDependenciesInteractively():
            return
        nodes = [sourceVolumeNode, segmentationNode]
        if not askToHardenTransforms(nodes):
            return
        if self.logic is None:
            self.logic = fewShotSAMLogic.FewShotSAMSlicerLogic()
        try:
            self.job = self.logic.startPropagation(
                sourceVolumeNode, segmentationNode, segmentIds=segmentIds,
                model=self.scriptedEffect.parameter(MODEL_PARAMETER),
                checkpoint=self.scriptedEffect.parameter(CHECKPOINT_PARAMETER) or None,
                device=self.scriptedEffect.parameter(DEVICE_PARAMETER),
                orientation=self.scriptedEffect.parameter(ORIENTATION_PARAMETER),
                hardenTransforms=True,  # the user was asked just above
                paintedSlicesComplete=self.scriptedEffect.integerParameter(COMPLETE_SLICES_PARAMETER) != 0,
                progressCallback=self.onProgress, finishedCallback=self.onJobFinished,
                beforeModifyCallback=self.scriptedEffect.saveStateForUndo)
        except FewShotSAMSlicerError as error:
            slicer.util.errorDisplay(str(error), windowTitle="Few-shot SAM")
            return
        if not self.job.isRunning:  # could not even start; onJobFinished has reported it
            return
        self.statusLabel.text = self.job.description + "..."
        self.applyButton.enabled = False
        self.cancelButton.enabled = True
        self.pollTimer.start()

    def onCancel(self):
        if self.job is not None and self.job.isRunning:
            self.statusLabel.text = "Cancelling..."
            self.job.cancel()

    def onPollJob(self):
        if self.job is None or not self.job.poll():
            self.pollTimer.stop()

    def onProgress(self, fraction, message):
        self.progressBar.value = int(round(1000 * fraction))
        self.statusLabel.text = message

    def onJobFinished(self, job):
        self.pollTimer.stop()
        self.applyButton.enabled = True
        self.cancelButton.enabled = False
        if job.status == fewShotSAMLogic.SUCCEEDED:
            self.progressBar.value = 1000
            self.statusLabel.text = f"Propagated {len(job.result['segmentIds'])} segment(s) in {job.elapsedSeconds:.0f} s."
        elif job.status == fewShotSAMLogic.CANCELLED:
            self.progressBar.value = 0
            self.statusLabel.text = "Cancelled; nothing was changed."
        else:
            self.progressBar.value = 0
            self.statusLabel.text = "Failed: " + job.errorMessage
            slicer.util.errorDisplay(job.errorMessage, windowTitle="Few-shot SAM")
