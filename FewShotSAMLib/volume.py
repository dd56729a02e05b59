"""In-memory volumes with their patient-space geometry.

Arrays are indexed [k, j, i] (slowest to fastest), the order SimpleITK's GetArrayFromImage and Slicer's
arrayFromVolume use. Geometry follows ITK conventions: spacing and origin are given in (i, j, k) order, origin
and direction in LPS patient coordinates, and direction columns are the unit vectors of the i, j, k axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # 3x3, columns = i, j, k axes (LPS)
    shape: tuple[int, int, int] = (0, 0, 0)  # array shape, (k, j, i)

    def same_grid(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        return (
            tuple(self.shape) == tuple(other.shape)
            and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance)
            and np.allclose(self.origin, other.origin, rtol=tolerance, atol=tolerance * 10)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) voxel indices to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction) @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix


@dataclass
class Volume:
    array: np.ndarray  # [k, j, i]
    geometry: Geometry
    modality: str = "unknown"  # "CT", "MR" or "unknown"; chooses the intensity normalisation

    def with_array(self, array: np.ndarray) -> "Volume":
        return replace(self, array=array)


@dataclass(frozen=True)
class Segment:
    name: str
    label_value: int
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)  # RGB in 0..1, as Slicer stores it


@dataclass
class LabelVolume:
    """An integer label map on a volume's grid and the segments its values stand for."""

    array: np.ndarray  # [k, j, i], integer
    geometry: Geometry
    segments: list[Segment]

    def segment_by_value(self, value: int) -> Segment:
        for segment in self.segments:
            if segment.label_value == value:
                return segment
        raise KeyError(value)


class HasSegments:
    """Class bookkeeping for objects holding `segments`: class c + 1 stands for segments[c], class 0 is background."""

    segments: list[Segment]

    @property
    def label_values(self) -> list[int]:
        return [segment.label_value for segment in self.segments]

    @property
    def n_classes(self) -> int:
        return len(self.segments) + 1
