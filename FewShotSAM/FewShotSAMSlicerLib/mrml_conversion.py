"""Moving voxels between MRML nodes, numpy arrays and the files the worker reads and writes.

Conventions (the same as ``slicer.util.arrayFromVolume`` and FewShotSAMLib): arrays are indexed [k, j, i]; array
axis 0 is the volume's K axis. Geometry stays in MRML as the IJK-to-RAS matrix; files are written and read with
Slicer's own storage nodes, which convert RAS (Slicer) to LPS (NRRD / NIfTI headers) and back, so no code here
does that conversion by hand
(except the direction matrix handed to the engine's slice-axis choice, see sliceAxis).

Nothing here adds nodes to the user's scene: temporary volume, labelmap and segmentation nodes are standalone
MRML nodes (not in any scene) that live only for one read or write.

This module imports ``slicer`` and ``vtk`` but never ``qt``, so it runs in plain Python with the slicer-core wheel.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.orientation import slice_axis as engineSliceAxis
from FewShotSAMLib.volume import Geometry

from .errors import FewShotSAMSlicerError

BINARY_LABELMAP = "Binary labelmap"

# RAS (Slicer) to LPS (the engine): the first two patient axes change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------
def ensureSegmentationConverterRules() -> None:
    """Register the labelmap/surface converter rules if nobody did.

    The Slicer application registers them when the Segmentations module starts; plain Python with the slicer-core
    wheel does not, and without them a segmentation cannot even hold an empty binary labelmap.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    for ruleClass in ("vtkBinaryLabelmapToClosedSurfaceConversionRule",
                      "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        rule = getattr(slicer, ruleClass, None)
        if rule is not None:
            factory.RegisterConverterRule(rule())


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------
def matrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def arrayToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def ijkToRas(volumeNode) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix (its own, not including parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrixToArray(matrix)


def volumeShape(volumeNode) -> tuple[int, int, int]:
    """Array shape (k, j, i) of a volume node."""
    imageData = volumeNode.GetImageData()
    if imageData is None:
        return (0, 0, 0)
    dims = imageData.GetDimensions()
    return (dims[2], dims[1], dims[0])


def sliceAxis(ijkToRasMatrix: np.ndarray, orientation: str = "auto") -> int:
    """Array axis (0=k, 1=j, 2=i) along which slices of the given orientation are stacked.

    The engine decides (FewShotSAMLib.orientation.slice_axis, from the direction matrix), so the module and the
    worker always cut the same slices: the voxel axis most aligned with the plane normal, sign ignored.
    """
    directionsLps = RAS_TO_LPS @ np.asarray(ijkToRasMatrix, dtype=float)[:3, :3]
    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=directionsLps)
    try:
        return engineSliceAxis(geometry, orientation)
    except FewShotSAMError as error:
        raise FewShotSAMSlicerError(f"Slice orientation: {error}.") from None


def gridFingerprint(volumeNode) -> str:
    """Short text that changes when the volume's voxel grid (shape or IJK-to-RAS) changes."""
    matrix = np.round(ijkToRas(volumeNode), 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = "x".join(str(n) for n in volumeShape(volumeNode)) + ":" + ",".join(f"{v:.4f}" for v in matrix.ravel())
    return f"{zlib.crc32(text.encode()):08x}"


def sameGrid(nodeA, nodeB, tolerance: float = 1e-3) -> bool:
    return volumeShape(nodeA) == volumeShape(nodeB) and np.allclose(ijkToRas(nodeA), ijkToRas(nodeB), atol=tolerance)


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------
def checkScalarVolume(volumeNode, role: str = "source volume") -> None:
    if volumeNode is None:
        raise FewShotSAMSlicerError(f"Select a {role}.")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise FewShotSAMSlicerError(f"The {role} '{volumeNode.GetName()}' is not a scalar volume.")
    imageData = volumeNode.GetImageData()
    if imageData is None or min(imageData.GetDimensions()) < 1:
        raise FewShotSAMSlicerError(f"The {role} '{volumeNode.GetName()}' has no voxels.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise FewShotSAMSlicerError(
            f"The {role} '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components per voxel "
            "(colour or vector image); FewShotSAM needs a single-component (grey-level) volume.")


def firstScalarVolume(scene):
    """The first grey-level volume of the scene (GetFirstNodeByClass would also return a labelmap)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


def transformedNodes(nodes) -> list:
    return [node for node in nodes if node is not None and node.GetParentTransformNode() is not None]


def ensureNoParentTransforms(nodes, hardenTransforms: bool = False) -> list[str]:
    """Refuse nodes under a transform, or harden the transforms if the user agreed. Returns the hardened names.

    FewShotSAM reads and writes the voxel grids as stored; a parent transform would make the result land somewhere
    other than where the user sees the image, so it is never silently ignored.
    """
    transformed = transformedNodes(nodes)
    if not transformed:
        return []
    if not hardenTransforms:
        described = ", ".join(f"'{n.GetName()}' (under '{n.GetParentTransformNode().GetName()}')" for n in transformed)
        raise FewShotSAMSlicerError(
            f"{described} {'is' if len(transformed) == 1 else 'are'} under a transform. FewShotSAM works on the "
            "voxel grid as stored, so the result would not line up with what you see. Harden the transform "
            "(Data module: right-click the node > Harden transform), or allow FewShotSAM to harden it, then try again.")
    hardened = []
    for node in transformed:
        if not node.HardenTransform():
            raise FewShotSAMSlicerError(f"Could not harden the transform of '{node.GetName()}'.")
        hardened.append(node.GetName())
    return hardened


# ----------------------------------------------------------------------------------------------------------------
# Arrays <-> VTK images
# ----------------------------------------------------------------------------------------------------------------
def arrayFromImageData(imageData) -> np.ndarray:
    """Copy of a single-component vtkImageData as a [k, j, i] array."""
    dims = imageData.GetDimensions()
    scalars = imageData.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()


def volumeArray(volumeNode) -> np.ndarray:
    return arrayFromImageData(volumeNode.GetImageData())


def _vtkArray(array: np.ndarray):
    contiguous = np.ascontiguousarray(array)
    return numpy_support.numpy_to_vtk(contiguous.ravel(), deep=True,
                                      array_type=numpy_support.get_vtk_array_type(contiguous.dtype))


def imageDataFromArray(array: np.ndarray) -> vtk.vtkImageData:
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    imageData.GetPointData().SetScalars(_vtkArray(array))
    return imageData


def orientedImageFromArray(array: np.ndarray, ijkToRasMatrix: np.ndarray):
    """A vtkOrientedImageData with the array's voxels and the given IJK-to-RAS geometry (extent starting at 0)."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetImageToWorldMatrix(arrayToMatrix(ijkToRasMatrix))
    image.GetPointData().SetScalars(_vtkArray(array))
    return image


def referenceGeometryImage(volumeNode):
    """An empty vtkOrientedImageData that has the volume's extent and IJK-to-RAS (a resampling target)."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(volumeNode.GetImageData().GetExtent())
    image.SetImageToWorldMatrix(arrayToMatrix(ijkToRas(volumeNode)))
    return image


def segmentationReferenceGeometry(segmentationNode):
    """The segmentation's reference image geometry (what the Segment Editor edits on) as an empty
    vtkOrientedImageData, or None when the segmentation has none yet."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentationNode.GetSegmentation().GetConversionParameter(name) if segmentationNode is not None else ""
    if not text:
        return None
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False):
        return None
    extent = image.GetExtent()
    return image if extent[0] <= extent[1] and extent[2] <= extent[3] and extent[4] <= extent[5] else None


def _zeroBasedIjkToRas(image) -> np.ndarray:
    """IJK-to-RAS of an oriented image whose extent is moved to start at (0, 0, 0)."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    array = matrixToArray(matrix)
    extent = image.GetExtent()
    array[:3, 3] = (array @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    return array


def workingGrid(volumeNode, segmentationNode):
    """The volume node whose voxel grid FewShotSAM works on: the segmentation's reference geometry.

    That is the grid the Segment Editor paints on. Usually it is the source volume's own grid, and the source
    volume is returned. When the segmentation was made on another grid (oversampled, cropped, or another
    volume), a standalone scalar volume (in no scene) holding the source image resampled (linear) onto the
    reference geometry is returned, so that segments are never resampled to a coarser grid and keep their
    resolution. The caller may tell the user (``grid is not volumeNode``).
    """
    reference = segmentationReferenceGeometry(segmentationNode)
    if reference is None:
        return volumeNode
    ijkToRasMatrix = _zeroBasedIjkToRas(reference)
    extent = reference.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if shape == volumeShape(volumeNode) and np.allclose(ijkToRasMatrix, ijkToRas(volumeNode), atol=1e-4):
        return volumeNode
    source = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volumeNode)
    target = slicer.vtkOrientedImageData()
    target.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    target.SetImageToWorldMatrix(arrayToMatrix(ijkToRasMatrix))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            source, target, resampled, True, False):
        raise FewShotSAMSlicerError(
            f"Could not resample '{volumeNode.GetName()}' onto the geometry of '{segmentationNode.GetName()}'.")
    array = arrayFromImageData(resampled)
    if array.shape != shape:
        raise FewShotSAMSlicerError(
            f"'{volumeNode.GetName()}' did not resample onto the geometry of '{segmentationNode.GetName()}'.")
    grid = slicer.vtkMRMLScalarVolumeNode()
    grid.SetName(f"{volumeNode.GetName()} on the geometry of {segmentationNode.GetName()}")
    grid.SetIJKToRASMatrix(arrayToMatrix(ijkToRasMatrix))
    grid.SetAndObserveImageData(imageDataFromArray(array))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Segments <-> arrays on the reference grid
# ----------------------------------------------------------------------------------------------------------------
def segmentIds(segmentationNode) -> list[str]:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def ensureBinaryLabelmap(segmentationNode) -> None:
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() and not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        if not segmentation.CreateRepresentation(BINARY_LABELMAP):
            raise FewShotSAMSlicerError(
                f"Could not make a binary labelmap of the segmentation '{segmentationNode.GetName()}'.")


def segmentMask(segmentationNode, segmentId: str, referenceVolumeNode) -> np.ndarray:
    """Boolean [k, j, i] mask of one segment on the reference volume's voxel grid (full extent, not cropped)."""
    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    shape = volumeShape(referenceVolumeNode)
    if labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty():
        return np.zeros(shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    # padImage=False: the output keeps the reference extent even where the segment reaches outside the volume.
    ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, referenceGeometryImage(referenceVolumeNode), resampled, False, False)
    if not ok:
        raise FewShotSAMSlicerError(f"Could not resample segment '{segmentId}' to the source volume's grid.")
    mask = arrayFromImageData(resampled) > 0
    if mask.shape != shape:
        raise FewShotSAMSlicerError(f"Segment '{segmentId}' did not resample to the source volume's grid.")
    return mask


def segmentMasks(segmentationNode, ids, referenceVolumeNode) -> dict[str, np.ndarray]:
    ensureBinaryLabelmap(segmentationNode)
    return {segmentId: segmentMask(segmentationNode, segmentId, referenceVolumeNode) for segmentId in ids}


def setSegmentMask(segmentationNode, segmentId: str, mask: np.ndarray, referenceVolumeNode) -> None:
    """Replace a segment's voxels by a boolean mask on the reference grid (shared labelmap layers are handled)."""
    image = orientedImageFromArray(np.asarray(mask, dtype=np.uint8), ijkToRas(referenceVolumeNode))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
        raise FewShotSAMSlicerError(f"Could not write the result into segment '{segmentId}'.")


# ----------------------------------------------------------------------------------------------------------------
# Files (through Slicer's storage nodes: RAS <-> LPS handled by Slicer)
# ----------------------------------------------------------------------------------------------------------------
def _labelmapNode(array: np.ndarray, ijkToRasMatrix: np.ndarray):
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetIJKToRASMatrix(arrayToMatrix(ijkToRasMatrix))
    node.SetAndObserveImageData(imageDataFromArray(array))
    return node


def writeVolume(volumeNode, path: str, compress: bool = False) -> str:
    """Write the volume's voxels and geometry (as stored, without parent transforms) to .nrrd/.nii.gz/.mha."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volumeNode) or not os.path.isfile(path):
        raise FewShotSAMSlicerError(f"Could not write '{volumeNode.GetName()}' to {path}.")
    return str(path)


def writeLabelArray(array: np.ndarray, referenceVolumeNode, path: str, compress: bool = True) -> str:
    """Write an integer [k, j, i] array as a labelmap file with the reference volume's geometry."""
    if tuple(array.shape) != volumeShape(referenceVolumeNode):
        raise FewShotSAMSlicerError("Internal error: the labelmap does not have the source volume's shape.")
    node = _labelmapNode(array, ijkToRas(referenceVolumeNode))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node) or not os.path.isfile(path):
        raise FewShotSAMSlicerError(f"Could not write the labelmap {path}.")
    return str(path)


def readLabelArray(path: str, referenceVolumeNode=None) -> tuple[np.ndarray, np.ndarray]:
    """Read a labelmap file; returns (array [k, j, i], IJK-to-RAS). With a reference, the grids must match."""
    if not os.path.isfile(path):
        raise FewShotSAMSlicerError(f"The worker did not write its result file {path}.")
    node = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise FewShotSAMSlicerError(f"Could not read the labelmap {path}.")
    array = volumeArray(node)
    matrix = ijkToRas(node)
    if referenceVolumeNode is not None:
        if tuple(array.shape) != volumeShape(referenceVolumeNode) or not np.allclose(
                matrix, ijkToRas(referenceVolumeNode), atol=1e-3):
            raise FewShotSAMSlicerError(
                f"The result {os.path.basename(path)} is not on the voxel grid of '{referenceVolumeNode.GetName()}'.")
    return array, matrix
