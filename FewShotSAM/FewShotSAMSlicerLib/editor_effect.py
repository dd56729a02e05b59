"""What the "Few-shot SAM" Segment Editor effect does with the editor and the scene, without Qt.

SegmentEditorFewShotSAMLib/SegmentEditorEffect.py is the Qt shell (widgets, timer, dialogs); everything that
touches the editor's parameters or the segmentation is here, so that it runs in plain Python with the slicer-core
wheel against a stand-in for ``scriptedEffect`` (Testing/test_slicer_effect_contract.py).

How Slicer treats a scripted effect (read in Slicer's sources, tags v5.8.1 and v5.10.0):

- ``qSlicerSegmentEditorScriptedEffect.cxx`` calls the Python methods icon, helpText, clone, activate, deactivate,
  setupOptionsFrame, createCursor, processInteractionEvents, processViewNodeEvents, setMRMLDefaults,
  referenceGeometryChanged, sourceVolumeNodeChanged, masterVolumeNodeChanged, layoutChanged,
  interactionNodeModified, updateGUIFromMRML, updateMRMLFromGUI (and cleanup from 5.10). Defaults are set in
  ``setMRMLDefaults``; nothing calls any other name.
- ``qSlicerSegmentEditorAbstractEffect::parameter`` reads the segment editor node's attribute
  "<effect name>.<parameter>", then "<parameter>"; an unset one logs a qCritical and returns "".
  ``setParameterDefault`` writes only when the parameter is not defined yet.
- ``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` (5.10: vtkSlicerSegmentEditorLogic::
  ModifySegmentByLabelmap) applies the editable area, the intensity mask and "overwrite other segments", and
  expects the labelmap in the editor's reference geometry; AbstractScriptedSegmentEditorAutoCompleteEffect.onApply
  writes its results with ModificationModeSet after ``saveStateForUndo()``, which makes the whole write one undo
  step.

No ``qt`` import here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer

from . import mrml_conversion as mc
from .errors import FewShotSAMSlicerError

EFFECT_NAME = "Few-shot SAM"

# Effect parameters: Slicer stores them as attributes "Few-shot SAM.<name>" of the segment editor node.
MODEL = "Model"
CHECKPOINT = "Checkpoint"
DEVICE = "Device"
ORIENTATION = "Orientation"
SELECTED_ONLY = "SelectedSegmentOnly"
COMPLETE_SLICES = "PaintedSlicesComplete"
PREVIEW_OPACITY = "PreviewOpacity"
DEFAULTS = {
    MODEL: "litemedsam",
    CHECKPOINT: "",
    DEVICE: "auto",
    ORIENTATION: "auto",
    SELECTED_ONLY: "0",
    COMPLETE_SLICES: "0",
    PREVIEW_OPACITY: "0.6",
}
PREVIEW_ROLE = "FewShotSAMPreview"  # node reference of the segment editor node to the preview segmentation


def setMRMLDefaults(scriptedEffect) -> None:
    """Called by Slicer (setMRMLDefaults) for every new segment editor node."""
    for name, value in DEFAULTS.items():
        scriptedEffect.setParameterDefault(name, value)


@dataclass(frozen=True)
class EffectSettings:
    model: str
    checkpoint: str
    device: str
    orientation: str
    selectedOnly: bool
    paintedSlicesComplete: bool
    previewOpacity: float


def settings(scriptedEffect) -> EffectSettings:
    """The effect's parameters; an unset one ("" from Slicer) reads as its default, never as ''."""
    def value(name):
        if scriptedEffect.parameterDefined(name):
            text = scriptedEffect.parameter(name)
            if text != "" or name == CHECKPOINT:
                return text
        return DEFAULTS[name]

    try:
        opacity = min(1.0, max(0.0, float(value(PREVIEW_OPACITY))))
    except ValueError:
        opacity = float(DEFAULTS[PREVIEW_OPACITY])
    return EffectSettings(model=value(MODEL), checkpoint=value(CHECKPOINT), device=value(DEVICE),
                          orientation=value(ORIENTATION), selectedOnly=value(SELECTED_ONLY) not in ("", "0"),
                          paintedSlicesComplete=value(COMPLETE_SLICES) not in ("", "0"), previewOpacity=opacity)


def sourceVolumeNode(parameterSetNode):
    """The editor's source volume (GetSourceVolumeNode from Slicer 5.4, GetMasterVolumeNode before)."""
    getter = getattr(parameterSetNode, "GetSourceVolumeNode", None) or parameterSetNode.GetMasterVolumeNode
    return getter()


def editorInputs(parameterSetNode):
    """(segmentation node, source volume node, segment IDs or None for all painted); raises a readable error.

    Checked before anything else (dependencies, transforms), so the user hears first what is missing in the
    editor itself.
    """
    segmentationNode = parameterSetNode.GetSegmentationNode() if parameterSetNode is not None else None
    if segmentationNode is None:
        raise FewShotSAMSlicerError("Select a segmentation in the Segment Editor first.")
    volumeNode = sourceVolumeNode(parameterSetNode)
    if volumeNode is None:
        raise FewShotSAMSlicerError("Select the source volume in the Segment Editor first.")
    return segmentationNode, volumeNode


def selectedSegmentIds(parameterSetNode, selectedOnly: bool):
    if not selectedOnly:
        return None
    selected = parameterSetNode.GetSelectedSegmentID()
    if not selected:
        raise FewShotSAMSlicerError("Select a segment first (or uncheck 'Only the selected segment').")
    return [selected]


# ----------------------------------------------------------------------------------------------------------------
# Source representation
# ----------------------------------------------------------------------------------------------------------------
def hasClosedSurfaceSource(segmentationNode) -> bool:
    """True when the segmentation's source representation is not a binary labelmap (e.g. closed surface):
    a result written then only lands in a derived labelmap, lost at the next conversion."""
    segmentation = segmentationNode.GetSegmentation()
    return segmentation.GetSourceRepresentationName() != mc.BINARY_LABELMAP


def switchSourceToBinaryLabelmap(segmentationNode) -> None:
    """Make binary labelmap the source representation, as the Segment Editor offers before editing
    (qMRMLSegmentEditorWidget::setSourceRepresentationToBinaryLabelmap)."""
    segmentation = segmentationNode.GetSegmentation()
    if not hasClosedSurfaceSource(segmentationNode):
        return
    if segmentation.GetNumberOfSegments() and not segmentation.CreateRepresentation(mc.BINARY_LABELMAP, True):
        raise FewShotSAMSlicerError(
            f"Could not convert '{segmentationNode.GetName()}' to a binary labelmap; nothing was changed.")
    segmentation.SetSourceRepresentationName(mc.BINARY_LABELMAP)


# ----------------------------------------------------------------------------------------------------------------
# Writing through the editor
# ----------------------------------------------------------------------------------------------------------------
def labelmapOnReference(mask: np.ndarray, gridNode, referenceGeometry=None):
    """The mask as a vtkOrientedImageData on the editor's reference geometry (nearest neighbour when the grids
    differ; they are the same when the work happened on the segmentation's reference geometry)."""
    labelmap = mc.orientedImageFromArray(np.asarray(mask, dtype=np.uint8), mc.ijkToRas(gridNode))
    if referenceGeometry is None or slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, referenceGeometry):
        return labelmap
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, referenceGeometry, resampled, False, False):
        raise FewShotSAMSlicerError("Could not resample the result onto the segmentation's geometry.")
    return resampled


def editorResultWriter(scriptedEffect, modificationModeSet):
    """A logic.ResultWriter that writes each segment through scriptedEffect.modifySegmentByLabelmap (Set mode), so
    the editable area, the intensity mask and "overwrite other segments" apply as for any other effect."""
    def write(segmentationNode, segmentId, mask, gridNode):
        reference = scriptedEffect.referenceGeometryImage()
        labelmap = labelmapOnReference(mask, gridNode, reference)
        scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, labelmap, modificationModeSet)

    return write


# ----------------------------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------------------------
def previewNode(scriptedEffect):
    return scriptedEffect.nodeReference(PREVIEW_ROLE) if hasattr(scriptedEffect, "nodeReference") else None


def createPreviewNode(scriptedEffect, segmentationNode):
    """A new segmentation node that shows the result before Apply (removed by Apply and Cancel)."""
    removePreviewNode(scriptedEffect)
    scene = segmentationNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{segmentationNode.GetName()} preview")
    node.CreateDefaultDisplayNodes()
    scriptedEffect.setNodeReference(PREVIEW_ROLE, node)
    return node


def setPreviewOpacity(segmentationNode, preview, opacity: float) -> None:
    """As AbstractScriptedSegmentEditorAutoCompleteEffect.setPreviewOpacity: the preview shows at `opacity`, the
    segmentation at the rest."""
    if segmentationNode is not None and segmentationNode.GetDisplayNode() is not None:
        segmentationNode.GetDisplayNode().SetOpacity(1.0 - opacity)
    if preview is not None and preview.GetDisplayNode() is not None:
        preview.GetDisplayNode().SetOpacity(opacity)
        preview.GetDisplayNode().SetOpacity3D(opacity)


def removePreviewNode(scriptedEffect, segmentationNode=None) -> None:
    node = previewNode(scriptedEffect)
    if node is not None:
        scriptedEffect.setNodeReference(PREVIEW_ROLE, None)
        if node.GetScene() is not None:
            node.GetScene().RemoveNode(node)
    if segmentationNode is not None and segmentationNode.GetDisplayNode() is not None:
        segmentationNode.GetDisplayNode().SetOpacity(1.0)
