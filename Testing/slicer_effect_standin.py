"""A Qt-free stand-in for Slicer's ``qSlicerSegmentEditorScriptedEffect``, for tests with the slicer-core wheel.

slicer-core has MRML and the segment editor's C++ logic but no Qt, so the effect's adaptor object cannot be
created here. This stand-in gives the effect code the same ``scriptedEffect`` API, and behaves as Slicer does:

- parameters live on a real vtkMRMLSegmentEditorNode as attributes "<effect name>.<name>", falling back to the
  common "<name>"; an unset parameter returns "" (and is logged), as
  qSlicerSegmentEditorAbstractEffect::parameter (qSlicerSegmentEditorAbstractEffect.cxx) does;
- setParameterDefault writes only when the parameter is not defined (qSlicerSegmentEditorAbstractEffect::
  setParameterDefault); integerParameter gives 0 for "" (QString::toInt);
- modifySegmentByLabelmap runs Slicer's own implementation, vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap
  (the C++ that qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap calls from Slicer 5.10; Slicer 5.8 has
  the same code inline in qSlicerSegmentEditorAbstractEffect.cxx): editable area, intensity mask, overwrite mode;
- referenceGeometryImage and saveStateForUndo run vtkSlicerSegmentEditorLogic's UpdateReferenceGeometryImage /
  SaveStateForUndo (a real vtkSegmentationHistory), as qMRMLSegmentEditorWidget does for the effect.

``ModificationModeSet`` is vtkSlicerSegmentEditorLogic's value, equal to
qSlicerSegmentEditorAbstractEffect::ModificationModeSet (both enums are Set, Add, Remove, RemoveAll).
"""

from __future__ import annotations

import logging

import slicer


class ScriptedEffectStandIn:
    ModificationModeSet = slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet

    def __init__(self, scene, name: str, segmentationNode=None, sourceVolumeNode=None):
        self.name = name
        self.perSegment = True
        self.requireSegments = False
        self.criticalMessages: list[str] = []
        self.undoStatesSaved = 0
        if not scene.IsNodeClassRegistered("vtkMRMLSegmentEditorNode"):  # the Segmentations module does it in Slicer
            scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
        self.editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.history = slicer.vtkSegmentationHistory()
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.editorNode)
        self.logic.SetSegmentationHistory(self.history)
        if segmentationNode is not None:
            self.editorNode.SetAndObserveSegmentationNode(segmentationNode)
            self.history.SetSegmentation(segmentationNode.GetSegmentation())
        if sourceVolumeNode is not None:
            self.editorNode.SetAndObserveSourceVolumeNode(sourceVolumeNode)

    # -- parameters (qSlicerSegmentEditorAbstractEffect.cxx) -----------------------------------------------------
    def parameterSetNode(self):
        return self.editorNode

    def parameterDefined(self, name: str) -> bool:
        value = self.editorNode.GetAttribute(f"{self.name}.{name}")  # commonParameterDefined: set and not empty
        return value is not None and len(value) > 0

    def parameter(self, name: str) -> str:
        value = self.editorNode.GetAttribute(f"{self.name}.{name}")
        if value is None:
            value = self.editorNode.GetAttribute(name)
        if value is None:
            message = f"Parameter named {name} cannot be found for effect {self.name}"
            self.criticalMessages.append(message)
            logging.error(message)
            return ""
        return value

    def integerParameter(self, name: str) -> int:
        try:
            return int(self.parameter(name))
        except ValueError:
            return 0

    def setParameter(self, name: str, value) -> None:
        self.editorNode.SetAttribute(f"{self.name}.{name}", str(value))

    def setParameterDefault(self, name: str, value) -> None:
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def nodeReference(self, name: str):
        return self.editorNode.GetNodeReference(f"{self.name}.{name}") or self.editorNode.GetNodeReference(name)

    def setNodeReference(self, name: str, node) -> None:
        self.editorNode.SetNodeReferenceID(f"{self.name}.{name}", node.GetID() if node is not None else None)

    # -- editor (vtkSlicerSegmentEditorLogic) ----------------------------------------------------------------------
    def referenceGeometryImage(self):
        return self.logic.GetReferenceGeometryImage() if self.logic.UpdateReferenceGeometryImage() else None

    def saveStateForUndo(self) -> None:
        self.undoStatesSaved += 1
        self.logic.SaveStateForUndo()

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, labelmap, mode, bypassMasking=False) -> None:
        self.logic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode, self.perSegment,
                                           bypassMasking)
