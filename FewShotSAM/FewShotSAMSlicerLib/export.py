"""Export a segmentation as a Slicer .seg.nrrd and as a plain labelmap .nrrd on the source volume's full grid.

Both files use the voxel grid of the reference (source) volume, not cropped to the segments, so that other tools
can overlay them on the image voxel by voxel. Segment i of the exported list gets label value i (1-based) in both
files; where segments overlap, the later one wins (as in Slicer's own labelmap export).

Writing is atomic (the engine's FewShotSAMLib.atomic_write: a temporary file beside the target, then a rename); an
existing file is never replaced unless ``overwrite=True``.

No ``qt`` import here.
"""

from __future__ import annotations

import os

import numpy as np
import slicer

from FewShotSAMLib.atomic_write import write_atomically

from . import mrml_conversion as mc
from .errors import FewShotSAMSlicerError

SEGMENTATION_SUFFIXES = (".seg.nrrd",)
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".nhdr")


def _suffix(path: str, allowed) -> str:
    lower = path.lower()
    for suffix in sorted(allowed, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    raise FewShotSAMSlicerError(f"{os.path.basename(path)}: use one of these file types: {', '.join(allowed)}.")


def labelArray(segmentationNode, referenceVolumeNode, segmentIds) -> np.ndarray:
    """Integer [k, j, i] array on the reference grid: segment n of segmentIds has value n (1-based)."""
    masks = mc.segmentMasks(segmentationNode, segmentIds, referenceVolumeNode)
    dtype = np.uint8 if len(segmentIds) < 256 else np.uint16
    labels = np.zeros(mc.volumeShape(referenceVolumeNode), dtype=dtype)
    for value, segmentId in enumerate(segmentIds, start=1):
        labels[masks[segmentId]] = value
    return labels


def segmentationNodeFromLabels(labels: np.ndarray, referenceVolumeNode, sourceSegmentation, segmentIds):
    """A standalone segmentation node (in no scene) whose segments share one labelmap layer with these values.

    Segment n (1-based) of segmentIds gets label value n, the source segment's ID, name, colour, tags and
    terminology. The layer has the full extent and geometry of the reference volume.
    """
    node = slicer.vtkMRMLSegmentationNode()
    segmentation = node.GetSegmentation()
    shared = mc.orientedImageFromArray(labels, mc.ijkToRas(referenceVolumeNode))
    for value, segmentId in enumerate(segmentIds, start=1):
        source = sourceSegmentation.GetSegment(segmentId)
        segment = slicer.vtkSegment()
        segment.DeepCopyMetadata(source)
        segment.AddRepresentation(mc.BINARY_LABELMAP, shared)
        segment.SetLabelValue(value)
        segmentation.AddSegment(segment, segmentId)
    node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    return node


def exportSegmentation(segmentationNode, referenceVolumeNode, segmentationPath: str | None = None,
                       labelmapPath: str | None = None, segmentIds=None, overwrite: bool = False) -> list[str]:
    """Write the segments as .seg.nrrd and/or labelmap file(s). Returns the written paths."""
    if segmentationNode is None:
        raise FewShotSAMSlicerError("Select a segmentation to export.")
    mc.checkScalarVolume(referenceVolumeNode, "reference volume")
    if not segmentationPath and not labelmapPath:
        raise FewShotSAMSlicerError("Choose at least one file to export to.")
    ids = list(segmentIds) if segmentIds else mc.segmentIds(segmentationNode)
    if not ids:
        raise FewShotSAMSlicerError(f"The segmentation '{segmentationNode.GetName()}' has no segments to export.")
    missing = [i for i in ids if segmentationNode.GetSegmentation().GetSegment(i) is None]
    if missing:
        raise FewShotSAMSlicerError(f"No segment with ID {', '.join(missing)} in '{segmentationNode.GetName()}'.")
    mc.ensureNoParentTransforms([segmentationNode, referenceVolumeNode], hardenTransforms=False)

    targets = []
    if segmentationPath:
        targets.append((os.path.abspath(segmentationPath), _suffix(segmentationPath, SEGMENTATION_SUFFIXES), "seg"))
    if labelmapPath:
        suffix = _suffix(labelmapPath, LABELMAP_SUFFIXES)
        if labelmapPath.lower().endswith(".seg.nrrd"):
            raise FewShotSAMSlicerError("Give the labelmap file a plain .nrrd (or .nii.gz) name, not .seg.nrrd.")
        targets.append((os.path.abspath(labelmapPath), suffix, "labelmap"))
    for path, _, _ in targets:  # refuse before writing anything
        if os.path.exists(path) and not overwrite:
            raise FewShotSAMSlicerError(f"{path} already exists; choose another name or allow overwriting.")
        if not os.path.isdir(os.path.dirname(path)):
            raise FewShotSAMSlicerError(f"The folder {os.path.dirname(path)} does not exist.")

    labels = labelArray(segmentationNode, referenceVolumeNode, ids)
    written = []
    for path, suffix, kind in targets:
        def writeTo(temporary, kind=kind, path=path):
            if kind == "labelmap":
                mc.writeLabelArray(labels, referenceVolumeNode, str(temporary), compress=True)
                return
            node = segmentationNodeFromLabels(labels, referenceVolumeNode, segmentationNode.GetSegmentation(), ids)
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(temporary))
            storage.SetUseCompression(1)
            storage.SetCropToMinimumExtent(False)
            if not storage.WriteData(node) or not os.path.isfile(temporary):
                raise FewShotSAMSlicerError(f"Could not write {path}.")

        try:
            write_atomically(path, writeTo, overwrite=overwrite, ending=suffix)
        except FileExistsError:
            raise FewShotSAMSlicerError(f"{path} already exists; choose another name or allow overwriting.") from None
        written.append(path)
    return written
