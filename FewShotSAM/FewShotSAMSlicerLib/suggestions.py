"""Which slice to paint next, in the scene: the engine's confidence reports as one suggestion per segment.

Each propagate run of the worker ends with a "done" line that carries its confidence report (``fewshotsam
propagate --report``, see FewShotSAMLib/confidence.py): per structure (label value) the slice to paint next along
the engine's slice axis. Here label values become segment IDs again, and each slice gets a point at its centre
(RAS) so that a click can bring every slice view there.

This module imports ``slicer`` only (no ``qt``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import slicer

from . import mrml_conversion as mc


@dataclass(frozen=True)
class SliceSuggestion:
    segmentId: str
    segmentName: str
    axis: int  # array axis of the [k, j, i] working grid along which slices are counted
    sliceIndex: int
    confidence: float  # how sure the run was of the whole segment, 0..1
    rasPoint: tuple[float, float, float]  # the centre of the suggested slice

    @property
    def text(self) -> str:
        return f"{self.segmentName}: paint slice {self.sliceIndex} next (confidence {self.confidence:.2f})"


def suggestionsFromReports(reports: list[dict], segmentIds: list[str], names: dict[str, str], gridNode,
                           axis: int) -> list[SliceSuggestion]:
    """Suggestions from the reports of a job's runs, least confident segment first.

    segmentIds: label value n (1-based) in the worker's label files = segmentIds[n - 1]. A report counted along
    another axis than the painting (which the worker's --axis prevents) is left out with a warning, never shown
    at the wrong place.
    """
    suggestions = []
    for report in reports:
        if not report:
            continue
        if report.get("slice_axis") != axis:
            logging.warning("FewShotSAM: confidence report along axis %s, painting along %s: not shown",
                            report.get("slice_axis"), axis)
            continue
        for structure in report.get("structures", []):
            index, value = structure.get("suggested_slice"), int(structure["label_value"])
            if index is None or not 1 <= value <= len(segmentIds):
                continue
            segmentId = segmentIds[value - 1]
            suggestions.append(SliceSuggestion(segmentId, names.get(segmentId, segmentId), axis, int(index),
                                               float(structure["confidence"]),
                                               sliceCentreRas(gridNode, axis, int(index))))
    return sorted(suggestions, key=lambda s: (s.confidence, s.segmentName))


def sliceCentreRas(gridNode, axis: int, index: int) -> tuple[float, float, float]:
    """RAS of the centre of slice `index` along array axis `axis` of the volume's grid."""
    centreKji = [(size - 1) / 2 for size in mc.volumeShape(gridNode)]
    centreKji[axis] = index
    ijk = np.array([centreKji[2], centreKji[1], centreKji[0], 1.0])
    return tuple(float(v) for v in (mc.ijkToRas(gridNode) @ ijk)[:3])


def jumpToSuggestion(scene, suggestion: SliceSuggestion) -> None:
    """Move every slice view so that it shows the suggested slice's centre (views keep their orientation)."""
    r, a, s = suggestion.rasPoint
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice, -1, None)
