"""Which array axis the 2D slices are stacked along, and how to cut a [k, j, i] array into slices and back.

Segment Anything works on 2D images, so a volume is processed as a stack of slices. The stacking axis is chosen from
the patient-space direction matrix (never from a viewer's view name), so that oblique, permuted and flipped volumes
are cut the same way: "axial" slices are always the ones perpendicular to the patient's head-foot axis.

Axis numbers returned and accepted here are ARRAY axes of the [k, j, i] array: 0 = k, 1 = j, 2 = i. The voxel axis
behind array axis a is 2 - a, and its direction is column 2 - a of Geometry.direction.
"""

from __future__ import annotations

import numpy as np

from .errors import FewShotSAMError
from .volume import Geometry

# Unit vectors of the patient axes in LPS coordinates.
LEFT_RIGHT = np.array([1.0, 0.0, 0.0])
ANTERIOR_POSTERIOR = np.array([0.0, 1.0, 0.0])
SUPERIOR_INFERIOR = np.array([0.0, 0.0, 1.0])

# The slice plane is perpendicular to the stacking axis: axial slices are stacked along S-I, coronal along A-P,
# sagittal along L-R.
PLANE_NORMALS = {
    "auto": SUPERIOR_INFERIOR,
    "axial": SUPERIOR_INFERIOR,
    "coronal": ANTERIOR_POSTERIOR,
    "sagittal": LEFT_RIGHT,
}
SLICE_AXIS_CHOICES = tuple(PLANE_NORMALS)


def voxel_axis_to_array_axis(voxel_axis: int) -> int:
    """Voxel axis (0=i, 1=j, 2=k) to the axis of the [k, j, i] array."""
    return 2 - voxel_axis


def array_axis_to_voxel_axis(array_axis: int) -> int:
    """Axis of the [k, j, i] array to the voxel axis (0=i, 1=j, 2=k); the mapping is its own inverse."""
    return 2 - array_axis


def slice_axis(geometry: Geometry, choice: str | int = "auto") -> int:
    """The array axis (0=k, 1=j, 2=i) along which slices are stacked.

    choice: "auto" or "axial" (the voxel axis most aligned with superior-inferior), "coronal" (most aligned with
    anterior-posterior), "sagittal" (most aligned with left-right), or an explicit array axis 0, 1 or 2.
    The sign of the direction does not matter, so flipped axes are handled; on an exact tie (45 degree obliques) the
    slowest array axis wins, because slices along k are contiguous in memory and usually the acquired ones.
    """
    if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        if int(choice) not in (0, 1, 2):
            raise FewShotSAMError(f"slice axis {choice} is not an array axis; use 0, 1 or 2")
        return int(choice)
    normalized_choice = str(choice).strip().lower()
    if normalized_choice not in PLANE_NORMALS:
        raise FewShotSAMError(
            f"unknown slice axis '{choice}'; use one of {', '.join(SLICE_AXIS_CHOICES)} or an array axis 0, 1, 2"
        )
    normal = PLANE_NORMALS[normalized_choice]
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    # |cosine| between each voxel axis (a direction column) and the wanted normal; columns may not be exactly unit.
    column_norms = np.linalg.norm(direction, axis=0)
    alignment = np.abs(normal @ direction) / np.where(column_norms > 0, column_norms, 1.0)
    best_array_axis, best_alignment = 0, -1.0
    for array_axis in (0, 1, 2):  # k first, so that it wins ties
        voxel_axis = array_axis_to_voxel_axis(array_axis)
        if alignment[voxel_axis] > best_alignment + 1e-9:
            best_array_axis, best_alignment = array_axis, alignment[voxel_axis]
    return best_array_axis


def to_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """View of a [k, j, i] array as [n_slices, rows, cols], slices along `axis`; rows/cols keep the array order."""
    return np.moveaxis(array, axis, 0)


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of to_slices: a [n_slices, rows, cols] stack back to the [k, j, i] layout."""
    return np.moveaxis(stack, 0, axis)


def in_plane_array_axes(axis: int) -> tuple[int, int]:
    """The array axes that become the (rows, cols) of each slice, in that order."""
    rows_axis, cols_axis = (a for a in (0, 1, 2) if a != axis)
    return rows_axis, cols_axis


def slice_spacing(geometry: Geometry, axis: int) -> float:
    """Distance in mm between neighbouring slices stacked along array axis `axis`."""
    return float(geometry.spacing[array_axis_to_voxel_axis(axis)])


def in_plane_spacing(geometry: Geometry, axis: int) -> tuple[float, float]:
    """(row_mm, col_mm) pixel size of the slices stacked along array axis `axis`."""
    rows_axis, cols_axis = in_plane_array_axes(axis)
    return (
        float(geometry.spacing[array_axis_to_voxel_axis(rows_axis)]),
        float(geometry.spacing[array_axis_to_voxel_axis(cols_axis)]),
    )
