"""The module's state in a parameter node (vtkMRMLScriptedModuleNode), so it is saved and restored with the scene.

One list, PARAMETERS, describes every setting. From it come

- ``FewShotSAMParameters``: a plain typed wrapper around the parameter node that works in every Slicer version and
  in plain Python with the slicer-core wheel (used by the logic tests);
- ``makeParameterNodeWrapperClass(parameterNodeWrapper)``: the same settings as a ``slicer.parameterNodeWrapper``
  class, which the widget uses where the Slicer version has it (5.2 and later).

Both store values the same way as parameterNodeWrapper's serializers (strings as they are, bools as "True"/"False",
numbers with str(), nodes as a node reference whose role is the parameter name plus an empty parameter of that
name), so a scene saved with one reads back with the other.

No ``qt`` import here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import slicer

from FewShotSAMLib import catalog

# (value stored in the node, label shown to the user), all from the engine's catalogue
MODELS = catalog.model_choices()
MODELS_NEEDING_CHECKPOINT = catalog.models_needing_checkpoint()
DEVICES = catalog.DEVICES
ORIENTATIONS = catalog.SLICE_PLANES


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type  # str, bool, int, float, or a vtkMRMLNode subclass
    default: object = None
    choices: tuple = ()

    @property
    def isNode(self) -> bool:
        return isinstance(self.kind, type) and issubclass(self.kind, slicer.vtkMRMLNode)


PARAMETERS = (
    Parameter("sourceVolume", slicer.vtkMRMLScalarVolumeNode),
    Parameter("segmentation", slicer.vtkMRMLSegmentationNode),
    # True: propagate every segment that has painted slices; False: only the segments listed in segmentIds.
    Parameter("allPaintedSegments", bool, True),
    # Segment IDs as a JSON list (used when allPaintedSegments is False); an ID may contain a comma.
    Parameter("segmentIds", str, ""),
    Parameter("model", str, "litemedsam", tuple(value for value, _ in MODELS)),
    Parameter("checkpointPath", str, ""),
    Parameter("device", str, "auto", tuple(value for value, _ in DEVICES)),
    Parameter("orientation", str, "auto", tuple(value for value, _ in ORIENTATIONS)),
    Parameter("hardenTransforms", bool, False),
    # True: each painted slice shows every selected structure visible on it -> one worker run for all segments.
    # False: a segment is known only where it is painted -> segments painted on different slices run separately.
    Parameter("paintedSlicesComplete", bool, False),
    Parameter("targetVolume", slicer.vtkMRMLScalarVolumeNode),
    Parameter("adaptedModelPath", str, ""),
    # Empty = Slicer's cache folder (<cache>/FewShotSAM).
    Parameter("cacheDirectory", str, ""),
)
PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}


def readValue(parameterNode, parameter: Parameter):
    name = parameter.name
    if parameter.isNode:
        return parameterNode.GetNodeReference(name)
    if not parameterNode.GetParameterNames() or name not in parameterNode.GetParameterNames():
        return parameter.default
    text = parameterNode.GetParameter(name)
    if parameter.kind is bool:
        return text == "True"
    if parameter.kind in (int, float):
        try:
            return parameter.kind(text)
        except ValueError:
            return parameter.default
    if parameter.choices and text not in parameter.choices:
        return parameter.default
    return text


def writeValue(parameterNode, parameter: Parameter, value) -> None:
    name = parameter.name
    if parameter.isNode:
        if value is not None and not value.IsA(parameter.kind.__name__):
            raise TypeError(f"{name} must be a {parameter.kind.__name__}, not {value.GetClassName()}")
        parameterNode.SetParameter(name, "")
        parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        return
    if parameter.kind is bool:
        parameterNode.SetParameter(name, "True" if value else "False")
        return
    if parameter.choices and str(value) not in parameter.choices:
        raise ValueError(f"{name} must be one of {', '.join(parameter.choices)}, not '{value}'")
    parameterNode.SetParameter(name, str(value))


def _property(parameter: Parameter):
    return property(lambda self: readValue(self.parameterNode, parameter),
                    lambda self, value: writeValue(self.parameterNode, parameter, value))


class FewShotSAMParameters:
    """Typed access to the module's parameter node, e.g. ``params.model = "sam_vit_b"``."""

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        wasModifying = parameterNode.StartModify()
        try:
            for parameter in PARAMETERS:  # write defaults for what is missing, as parameterNodeWrapper does
                if parameter.isNode:
                    if _isMissing(parameterNode, parameter.name):
                        parameterNode.SetParameter(parameter.name, "")
                elif _isMissing(parameterNode, parameter.name):
                    writeValue(parameterNode, parameter, parameter.default)
        finally:
            parameterNode.EndModify(wasModifying)

    def selectedSegmentIds(self) -> list[str]:
        return decodeSegmentIds(self.segmentIds)

    def segmentIdsToPropagate(self) -> list[str] | None:
        """None = every segment with painted slices; else the chosen segment IDs."""
        return None if self.allPaintedSegments else self.selectedSegmentIds()

    def setSelectedSegmentIds(self, ids) -> None:
        self.segmentIds = encodeSegmentIds(ids)


def encodeSegmentIds(ids) -> str:
    return json.dumps([str(i) for i in (ids or [])]) if ids else ""


def decodeSegmentIds(text: str) -> list[str]:
    """Segment IDs from encodeSegmentIds; a comma-separated list (scenes saved before) is read too."""
    text = (text or "").strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if isinstance(values, list):
            return [str(v) for v in values if str(v)]
    return [s for s in text.split(",") if s]


def _isMissing(parameterNode, name: str) -> bool:
    return name not in (parameterNode.GetParameterNames() or ())


for _parameter in PARAMETERS:
    setattr(FewShotSAMParameters, _parameter.name, _property(_parameter))


def makeParameterNodeWrapperClass(parameterNodeWrapper):
    """The same parameters as a ``@parameterNodeWrapper`` class (Slicer 5.2+), built from PARAMETERS."""
    namespace = {"__annotations__": {}}
    for parameter in PARAMETERS:
        namespace["__annotations__"][parameter.name] = parameter.kind
        if not parameter.isNode:
            namespace[parameter.name] = parameter.default
    namespace["selectedSegmentIds"] = FewShotSAMParameters.selectedSegmentIds
    namespace["setSelectedSegmentIds"] = FewShotSAMParameters.setSelectedSegmentIds
    namespace["segmentIdsToPropagate"] = FewShotSAMParameters.segmentIdsToPropagate
    return parameterNodeWrapper(type("FewShotSAMParameterNode", (), namespace))
