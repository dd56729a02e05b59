"""What a 3D Slicer user already has: the Segment Editor's "Fill between slices" and "Grow from seeds".

Both run Slicer's own compiled implementation classes from the ``slicer-core`` wheel (no re-implementation):

* Fill between slices -> ``vtkITKMorphologicalContourInterpolator`` (``slicer.vtkITKMorphologicalContourInterpolator``,
  from Slicer's ``Libs/vtkITK``; wraps ``itk::MorphologicalContourInterpolator``, Zukić et al. 2016).
* Grow from seeds -> ``vtkImageGrowCutSegment`` (``slicer.vtkImageGrowCutSegment``, from
  ``vtkSlicerSegmentationsModuleLogic``; the fast grow-cut of Zhu et al. 2014). Slicer's effect used this class
  for years; the newest Slicer sources switched the effect to ``vtkITK.vtkITKGrowCut``, which this slicer-core
  wheel does not ship, so results may differ somewhat from the very latest Slicer release.

What the Segment Editor effects do, and how it is reproduced here (Slicer sources:
``Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/``
``SegmentEditorFillBetweenSlicesEffect.py``, ``SegmentEditorGrowFromSeedsEffect.py`` and
``AbstractScriptedSegmentEditorAutoCompleteEffect.py``):

1. Both are "auto-complete" effects: they work on the **whole segmentation** (all visible segments at once),
   merged into one label map in which the n-th segment of the segment table has value n+1 (0 = empty). Here the
   painted values, sorted ascending, play the segments in table order; they are remapped to 1..N and back.
2. The merged label map covers the union of the segments' effective extents, grown on every side by
   ``int(max(3, ratio * (max - min)))`` voxels and clipped to the volume (``ratio`` = ``extentGrowthRatio``:
   0.1 for Fill between slices, 0.2 for Grow from seeds without a mask). The filters only see that box;
   outside it the result is 0. Reproduced exactly (``_slicer_extent``).
3. Fill between slices calls the interpolator with its defaults: ``Label=0`` (all labels),
   ``Axis=-1`` (all axes), ``HeuristicAlignment=True``, ``UseDistanceTransform=False``,
   ``UseBallStructuringElement=False``. ``fill_between_slices(..., all_axes=True)`` reproduces that literally;
   the default ``all_axes=False`` restricts the interpolator to the given slice axis, which is what a user
   painting axial slices gets anyway: the filter treats a voxel as part of a painted slice along an axis only
   when both neighbours along that axis are empty and the neighbours along the other axes carry the same label,
   which for isolated axial slices only the axial axis satisfies (``measure_baselines.py --check-axes`` checks
   this on the data). Painted slices are recognised **per label**: a slice painted with the liver is a
   liver slice only; and a label painted on two *adjacent* slices is not recognised as painted there (Slicer's
   help: "always leave at least one empty slice between segmented slices"). Nothing is extrapolated beyond the
   outermost painted slice of each label.
4. Grow from seeds passes the intensity volume (clipped to its box, ratio 0.2), the merged seed map and, since
   masking is "everywhere", no edit mask; ``DistancePenalty`` = Slicer's "Seed locality" default 0. In Slicer the
   user must paint at least two segments, one of them a background segment. ``grow_from_seeds`` gives it what
   fully painted slices say: every painted structure as its own seed, plus one extra background seed made of the
   unpainted voxels of every painted slice (a slice is "painted" when any structure is painted on it); the
   background label is removed from the output. Inside the box the grow-cut competes over a 26-neighbourhood with
   path cost = sum of absolute intensity differences; voxels on the box's outermost layer receive labels but do
   not pass them on (as in Slicer). Slices outside the box stay 0: with a single painted slice the box reaches
   only 3 slices above and below it.

numpy <-> VTK: a ``[k, j, i]`` C-ordered array is exactly VTK's point order (x = i fastest), so the vtkImageData
gets dimensions ``(ni, nj, nk)`` and spacing ``spacing_ijk`` with origin 0 and identity directions (both filters
work in voxel index space; Slicer's IJK axes are the ITK / NIfTI index axes, so a slice along array axis 0 is a
K slice in Slicer). The ITK axis of array axis ``a`` is ``2 - a``.

This module is a benchmark helper and lives outside ``FewShotSAMLib`` (which must not import slicer / vtk).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

try:  # slicer-core 5.x wheel: every wrapped class is re-exported in the "slicer" namespace package
    import slicer  # noqa: F401
    from slicer import vtkImageGrowCutSegment, vtkITKMorphologicalContourInterpolator
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    SLICER_IMPORT_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - exercised only where slicer-core is missing
    SLICER_IMPORT_ERROR = error

__all__ = ["fill_between_slices", "grow_from_seeds", "SLICER_IMPORT_ERROR"]

FILL_BETWEEN_SLICES_EXTENT_GROWTH_RATIO = 0.1  # AbstractScriptedSegmentEditorAutoCompleteEffect default
GROW_FROM_SEEDS_EXTENT_GROWTH_RATIO = 0.2  # SegmentEditorGrowFromSeedsEffect without a mask
MINIMUM_EXTENT_MARGIN = 3


def _require_slicer() -> None:
    if SLICER_IMPORT_ERROR is not None:
        raise ImportError(f"slicer-core is needed for the Slicer baselines: {SLICER_IMPORT_ERROR}")


def _check_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D [k, j, i] array, got shape {array.shape}")
    return array


def _check_spacing(spacing_ijk: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_ijk)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing_ijk must be three positive values in (i, j, k) order, got {spacing_ijk}")
    return spacing  # type: ignore[return-value]


def _to_vtk(array: np.ndarray, spacing_ijk: Sequence[float]) -> "vtkImageData":
    """[k, j, i] numpy array -> vtkImageData with dimensions (ni, nj, nk) and spacing (si, sj, sk)."""
    array = np.ascontiguousarray(array)
    nk, nj, ni = array.shape
    image = vtkImageData()
    image.SetDimensions(ni, nj, nk)
    image.SetSpacing(*spacing_ijk)
    image.SetOrigin(0.0, 0.0, 0.0)
    scalars = numpy_support.numpy_to_vtk(array.ravel(order="C"), deep=True)
    scalars.SetName("scalars")
    image.GetPointData().SetScalars(scalars)
    return image


def _from_vtk(image: "vtkImageData", shape_kji: tuple[int, int, int]) -> np.ndarray:
    ni, nj, nk = image.GetDimensions()
    if (nk, nj, ni) != tuple(shape_kji):
        raise RuntimeError(f"VTK filter returned dimensions {(ni, nj, nk)}, expected {tuple(shape_kji)[::-1]}")
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise RuntimeError("VTK filter returned no scalars")
    return numpy_support.vtk_to_numpy(scalars).reshape(shape_kji).copy()


def _slicer_extent(seed_mask: np.ndarray, ratio: float) -> tuple[slice, slice, slice]:
    """The auto-complete effects' working box: union extent of the seeds grown by max(3, ratio*size) voxels."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(seed_mask.any(axis=other))
        low, high = int(present[0]), int(present[-1])
        margin = int(max(MINIMUM_EXTENT_MARGIN, ratio * (high - low)))
        box.append(slice(max(0, low - margin), min(seed_mask.shape[axis] - 1, high + margin) + 1))
    return tuple(box)  # type: ignore[return-value]


def _merged_labelmap(painted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Painted values -> segment-table values 1..N (uint8, as Slicer's merged label map when N < 256)."""
    values = np.unique(painted)
    values = values[values != 0]
    if np.any(values < 0) or not np.array_equal(values, np.round(values)):
        raise ValueError("painted label values must be positive integers")
    dtype = np.uint8 if values.size < 255 else np.uint16
    merged = np.zeros(painted.shape, dtype=dtype)
    for index, value in enumerate(values):
        merged[painted == value] = index + 1
    return merged, values.astype(np.int64)


def _unmerge(merged: np.ndarray, values: np.ndarray, out_dtype) -> np.ndarray:
    lookup = np.zeros(int(merged.max(initial=0)) + 1, dtype=np.int64)
    count = min(values.size, lookup.size - 1)
    lookup[1 : count + 1] = values[:count]  # labels beyond N (e.g. background seed) map to 0
    return lookup[merged].astype(out_dtype)


_ITK_THREADS_PINNED = False


def _pin_slicer_itk_to_one_thread() -> None:
    """Make slicer-core's ITK run the contour interpolator on the calling thread.

    ``itk::MorphologicalContourInterpolator`` keeps ITK filters in ``thread_local`` variables. When it runs on
    ITK's pool threads, those are destroyed when the pool threads exit at interpreter shutdown, after ITK's
    globals are gone, and the process dies with SIGSEGV (exit code 139) *after* all work is done, which would
    fail pytest and scripts. ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, the first time a filter
    asks for its default thread count; so set it to 1 around one tiny interpolation and restore it, which leaves
    SimpleITK's separate ITK copy (``slicer_itk`` is a renamed namespace) untouched. The interpolation of a CHAOS
    scan takes well under a second single-threaded. This only works if nothing used slicer-core's ITK filters
    earlier in the process; otherwise set the variable before starting Python.
    """
    global _ITK_THREADS_PINNED
    if _ITK_THREADS_PINNED:
        return
    name = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        warm_up = np.zeros((5, 5, 5), dtype=np.uint8)
        warm_up[1, 1:4, 1:4] = 1
        warm_up[3, 1:4, 1:4] = 1
        _run_interpolator(warm_up, (1.0, 1.0, 1.0), -1)
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous
    _ITK_THREADS_PINNED = True


def _interpolate(merged: np.ndarray, spacing_ijk: Sequence[float], itk_axis: int) -> np.ndarray:
    _pin_slicer_itk_to_one_thread()
    return _run_interpolator(merged, spacing_ijk, itk_axis)


def _run_interpolator(merged: np.ndarray, spacing_ijk: Sequence[float], itk_axis: int) -> np.ndarray:
    interpolator = vtkITKMorphologicalContourInterpolator()
    interpolator.SetInputData(_to_vtk(merged, spacing_ijk))
    interpolator.SetAxis(itk_axis)  # -1 (all axes) is the effect's default
    interpolator.Update()
    return _from_vtk(interpolator.GetOutput(), merged.shape)


def fill_between_slices(
    painted: np.ndarray,
    spacing_ijk: Sequence[float],
    axis: int = 0,
    *,
    all_axes: bool = False,
    per_structure: bool = False,
) -> np.ndarray:
    """Slicer's "Fill between slices" on a painted ``[k, j, i]`` label map.

    ``spacing_ijk``: voxel spacing in (i, j, k) order (ITK order). ``axis``: the painted slices' array axis.
    ``all_axes=True`` uses the effect's literal ``Axis=-1``; the default interpolates along ``axis`` only
    (identical for isolated painted slices, see module docstring). ``per_structure=True`` runs the interpolator
    once per label instead of once on the merged map (then where interpolated labels overlap, the lower label
    value wins, as the segment higher in Slicer's table would). Returns a label map with the painted values, same
    shape and dtype as ``painted`` (painted voxels are kept).
    """
    _require_slicer()
    painted = _check_volume(painted, "painted")
    spacing = _check_spacing(spacing_ijk)
    if not -3 <= axis < 3:
        raise ValueError(f"axis {axis} out of range for a 3D array")
    itk_axis = -1 if all_axes else 2 - (axis % 3)
    output = np.zeros_like(painted)
    if not np.any(painted):
        return output
    merged, values = _merged_labelmap(painted)
    box = _slicer_extent(merged != 0, FILL_BETWEEN_SLICES_EXTENT_GROWTH_RATIO)
    merged_box = np.ascontiguousarray(merged[box])
    if per_structure:
        result_box = np.zeros_like(merged_box)
        for index in range(values.size, 0, -1):  # highest label first, so lower labels overwrite
            single = np.where(merged_box == index, index, 0).astype(merged_box.dtype)
            interpolated = _interpolate(single, spacing, itk_axis)
            result_box[interpolated == index] = index
    else:
        result_box = _interpolate(merged_box, spacing, itk_axis)
    output[box] = _unmerge(result_box, values, painted.dtype)
    return output


def grow_from_seeds(
    image: np.ndarray,
    painted: np.ndarray,
    spacing_ijk: Sequence[float],
    axis: int = 0,
    *,
    seed_locality: float = 0.0,
) -> np.ndarray:
    """Slicer's "Grow from seeds" from fully painted slices.

    Seeds: every painted structure (its label), plus a background seed on the unpainted voxels of each slice
    (along array ``axis``) that has any painted voxel. ``image``: the intensity volume on the same ``[k, j, i]``
    grid (its dtype is kept, as Slicer passes the source volume's scalars). ``spacing_ijk`` in (i, j, k) order.
    ``seed_locality``: Slicer's "Seed locality" (``DistancePenalty``), default 0 as in Slicer. Returns a label map
    with the painted values (background 0), same shape and dtype as ``painted``.
    """
    _require_slicer()
    image = _check_volume(image, "image")
    painted = _check_volume(painted, "painted")
    if image.shape != painted.shape:
        raise ValueError(f"image shape {image.shape} differs from painted shape {painted.shape}")
    spacing = _check_spacing(spacing_ijk)
    if not -3 <= axis < 3:
        raise ValueError(f"axis {axis} out of range for a 3D array")
    axis %= 3
    output = np.zeros_like(painted)
    if not np.any(painted):
        return output
    merged, values = _merged_labelmap(painted)
    background = values.size + 1
    other = tuple(a for a in range(3) if a != axis)
    painted_slices = np.flatnonzero((merged != 0).any(axis=other))
    index = [slice(None)] * 3
    index[axis] = painted_slices
    index = tuple(index)
    seeds = merged.astype(np.uint8 if background < 256 else np.uint16)
    seeds[index] = np.where(seeds[index] == 0, background, seeds[index])
    box = _slicer_extent(seeds != 0, GROW_FROM_SEEDS_EXTENT_GROWTH_RATIO)
    seeds_box = np.ascontiguousarray(seeds[box])
    image_box = np.ascontiguousarray(image[box])
    grow_cut = vtkImageGrowCutSegment()
    grow_cut.SetIntensityVolume(_to_vtk(image_box, spacing))
    grow_cut.SetSeedLabelVolume(_to_vtk(seeds_box, spacing))
    grow_cut.SetDistancePenalty(float(seed_locality))
    grow_cut.Update()
    result_box = _from_vtk(grow_cut.GetOutput(), seeds_box.shape)
    output[box] = _unmerge(result_box, values, painted.dtype)  # background seed label -> 0
    return output
