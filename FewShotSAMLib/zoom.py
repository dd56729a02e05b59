"""A zoomed second look at structures too small for the encoder's grid.

The encoder sees every slice resized to its input square (256 px for LiteMedSAM) and describes it on a grid of
embeddings (64x64): on a 512x512 CT one cell covers 8x8 voxels, and a right adrenal gland 13x27 voxels across spans
2x4 cells, a few numbers to find its outline in. Such a structure is segmented a second time on an in-plane crop of
the scan around it (every slice, the crop square in mm, the structure about `fill` of its side), which the model
sees at its full input size: the same engine (few-shot prompts, decoder tuning, propagation, clean-up) on the
crop's own embeddings, cached like any scan's. Inside the crop its result replaces the whole-slice one.

Only a structure that spans fewer than `max_cells` cells on every painted slice is zoomed, and only when the crop
magnifies it at least `min_zoom` times: every CHAOS organ (32 or more voxels of a 256 px slice, 8 cells) and the
MSD hippocampus crops (a 35x50 slice, already magnified 5x) are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .orientation import from_slices, in_plane_array_axes, to_slices
from .volume import Geometry, LabelVolume, Volume


@dataclass
class ZoomOptions:
    enabled: bool = True
    max_cells: float = 8.0  # zoom a structure spanning fewer embedding cells than this on every painted slice
    fill: float = 0.25  # the structure's share of the crop's side; the rest is the context around it
    min_zoom: float = 2.0  # a crop magnifying less than this is not worth encoding the slices again


@dataclass(frozen=True)
class ZoomBox:
    """A structure's crop: rows and columns of the [n_slices, rows, cols] slices."""

    value: int
    rows: slice
    cols: slice


def longest_side_mm(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """The longest side, in mm, of the box around a 2D mask's voxels (0 for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0.0
    return max((rows[-1] - rows[0] + 1) * spacing[0], (cols[-1] - cols[0] + 1) * spacing[1])


def zoom_boxes(painted_slices: np.ndarray, engine_slices: np.ndarray, values: list[int],
               spacing: tuple[float, float], grid: int, options: ZoomOptions) -> list[ZoomBox]:
    """The crops of the structures `values` worth a zoomed second look, from their painting [n, rows, cols] and the
    whole-slice result [n, rows, cols]; `grid`: the embedding grid's side (cells across the model's input)."""
    if not options.enabled:
        return []
    slice_mm = max(painted_slices.shape[1] * spacing[0], painted_slices.shape[2] * spacing[1])
    boxes = []
    for value in values:
        painted = painted_slices == value
        present = np.flatnonzero(painted.any(axis=(1, 2)))
        if present.size == 0:
            continue
        widest = max(longest_side_mm(painted[z], spacing) for z in present)
        if widest / slice_mm * grid >= options.max_cells:
            continue
        footprint = painted.any(axis=0) | (engine_slices == value).any(axis=0)
        side_mm = longest_side_mm(footprint, spacing) / options.fill
        if slice_mm / side_mm < options.min_zoom:
            continue
        boxes.append(ZoomBox(value, *square_around(footprint, side_mm, spacing)))
    return boxes


def square_around(footprint: np.ndarray, side_mm: float, spacing: tuple[float, float]) -> tuple[slice, slice]:
    """Rows and columns of a side_mm square (in mm) centred on the footprint's box, moved inside the slice."""
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    spans = []
    for indices, size, pixel in ((rows, footprint.shape[0], spacing[0]), (cols, footprint.shape[1], spacing[1])):
        length = min(size, int(np.ceil(side_mm / pixel)))
        start = int(round((indices[0] + indices[-1] + 1) / 2 - length / 2))
        start = min(max(start, 0), size - length)
        spans.append(slice(start, start + length))
    return spans[0], spans[1]


def crop_geometry(geometry: Geometry, axis: int, box: ZoomBox) -> Geometry:
    """The geometry of the in-plane crop `box` of a volume sliced along array axis `axis`: same spacing and
    direction, the origin moved to the crop's first voxel."""
    start = [0, 0, 0]  # [k, j, i]
    shape = list(geometry.shape)
    for array_axis, span in zip(in_plane_array_axes(axis), (box.rows, box.cols)):
        start[array_axis] = span.start
        shape[array_axis] = span.stop - span.start
    first_voxel = geometry.ijk_to_lps() @ np.array([start[2], start[1], start[0], 1.0])
    return replace(geometry, origin=tuple(float(x) for x in first_voxel[:3]), shape=tuple(shape))


def crop(array: np.ndarray, axis: int, box: ZoomBox) -> np.ndarray:
    return from_slices(np.ascontiguousarray(to_slices(array, axis)[:, box.rows, box.cols]), axis)


def crop_pair(volume: Volume, labels: LabelVolume, axis: int, box: ZoomBox) -> tuple[Volume, LabelVolume]:
    """The scan and its painting inside the box, only the boxed structure's painting kept."""
    geometry = crop_geometry(volume.geometry, axis, box)
    painting = crop(labels.array, axis, box)
    painting = np.where(painting == box.value, painting, 0).astype(labels.array.dtype)
    segment = labels.segment_by_value(box.value)
    return (replace(volume, array=crop(volume.array, axis, box), geometry=geometry),
            LabelVolume(painting, geometry, [segment]))


def paste(predicted: np.ndarray, zoomed: np.ndarray, axis: int, box: ZoomBox) -> np.ndarray:
    """The label map [k, j, i] with the boxed structure replaced, inside the box, by the zoomed result; the zoomed
    structure never takes a voxel of another structure."""
    result = np.array(predicted)
    region = to_slices(result, axis)[:, box.rows, box.cols]  # a view: writes land in result
    region[region == box.value] = 0
    region[(to_slices(zoomed, axis) == box.value) & (region == 0)] = box.value
    return result
