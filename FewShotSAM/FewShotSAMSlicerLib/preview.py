"""Show a propagation result as a preview the user accepts or discards.

``SegmentationSnapshot`` keeps a deep copy of a segmentation (every segment's voxels, names, colours and tags,
including the painted-slice record) taken right before a result is written, so "Discard" puts the segmentation
back exactly as painted. No ``qt`` import.
"""

from __future__ import annotations

import slicer


class SegmentationSnapshot:
    def __init__(self, segmentationNode):
        self.segmentationNode = segmentationNode
        self._copy = slicer.vtkSegmentation()
        self._copy.DeepCopy(segmentationNode.GetSegmentation())

    def restore(self) -> None:
        """Put the segmentation back as it was when the snapshot was taken."""
        wasModifying = self.segmentationNode.StartModify()
        try:
            self.segmentationNode.GetSegmentation().DeepCopy(self._copy)
        finally:
            self.segmentationNode.EndModify(wasModifying)
        self.segmentationNode.Modified()
