"""Segmentation accuracy metrics for 3D label maps (numpy and scipy only).

Evaluation code, not part of segmenting: the engine's core path (pipeline, propagation) never imports it
(tests/test_public_api.py checks). It lives in the package because the installed ``fewshotsam demo`` command
scores its result against the bundled sample's reference with it; the benchmarks and tests share the same code so
that every Dice the project reports is computed one way.

Conventions
-----------
* Arrays are indexed ``[k, j, i]`` (slowest to fastest), as everywhere in FewShotSAM (see ``volume.py``).
* **Spacing is always given in (i, j, k) order**, the ITK / SimpleITK ``GetSpacing()`` order that
  ``Geometry.spacing`` uses, in millimetres. It is reversed internally to match the array axes, so for a
  CHAOS scan (array shape ``(nk, 256, 256)``) pass ``spacing_ijk=(1.25, 1.25, 7.7)``. The same rule
  (spacing listed fastest array axis first) applies to 2D arrays: ``spacing_ijk=(si, sj)`` for ``[j, i]``.
* ``axis`` is an *array* axis of the ``[k, j, i]`` array: ``axis=0`` is the slice axis (k) of an axial scan.
* Masks may be bool or any numeric dtype; every non-zero voxel counts as inside.

Empty masks (defined explicitly, not left to numerical accidents)
-----------------------------------------------------------------
=========================  ==========  ==========  ===========  ===========
case                        dice        iou         hd95_mm      assd_mm
=========================  ==========  ==========  ===========  ===========
both empty                  1.0         1.0         0.0          0.0
exactly one empty           0.0         0.0         ``inf``      ``inf``
=========================  ==========  ==========  ===========  ===========

Both-empty counts as perfect agreement (the structure is correctly absent). When exactly one mask is empty
there is no surface to measure a distance to, so the distance is ``inf`` (worst possible) rather than ``nan``,
so that averaging with ``np.mean`` cannot silently skip a failed case; use ``np.isfinite`` to filter if wanted.
``dice_inside_reference_extent`` is ``nan`` when the reference is empty (the protocol has no slices then).

Surface distances
-----------------
Surface voxels of a mask are the voxels of the mask that have at least one 6-connected (face) neighbour outside
it, i.e. ``mask & ~binary_erosion(mask, 6-connectivity)``; voxels on the array border count as surface
(outside the array is background). For every surface voxel of one mask the distance to the nearest surface
voxel of the other mask is taken from ``scipy.ndimage.distance_transform_edt`` with ``sampling`` = the voxel
spacing, so distances are Euclidean millimetres between voxel centres. This is the MedPy definition:

* ``hd95_mm`` = 95th percentile (numpy's default linear interpolation) of the *pooled* directed distances
  pred->ref and ref->pred (MedPy ``hd95``). Note that some libraries (e.g. MONAI) instead take the maximum of the
  two directed 95th percentiles; that value is >= this one.
* ``assd_mm`` = mean of the two directed mean surface distances, (mean(pred->ref) + mean(ref->pred)) / 2
  (MedPy ``assd``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "dice",
    "iou",
    "surface_distances_mm",
    "hd95_mm",
    "assd_mm",
    "false_positive_slices",
    "dice_inside_reference_extent",
    "score_labels",
]


def _as_mask(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array != 0


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_mask = _as_mask(pred)
    ref_mask = _as_mask(ref)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from reference shape {ref_mask.shape}")
    return pred_mask, ref_mask


def _sampling_from_ijk(spacing_ijk: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Spacing in (i, j, k) order -> per-array-axis sampling in ([k,] j, i) order."""
    spacing = tuple(float(s) for s in spacing_ijk)
    if len(spacing) != ndim:
        raise ValueError(f"spacing_ijk has {len(spacing)} values for a {ndim}D array")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing[::-1]


def _check_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}D array")
    return axis % ndim


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P&R| / (|P| + |R|); 1.0 when both are empty."""
    pred_mask, ref_mask = _check_pair(pred, ref)
    total = int(pred_mask.sum()) + int(ref_mask.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred_mask, ref_mask).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) = |P&R| / |P|R|; 1.0 when both are empty."""
    pred_mask, ref_mask = _check_pair(pred, ref)
    union = int(np.logical_or(pred_mask, ref_mask).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred_mask, ref_mask).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances_mm(
    pred: np.ndarray, ref: np.ndarray, spacing_ijk: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> ref surface, ref surface -> pred surface).

    Both masks must be non-empty (raises ``ValueError`` otherwise; the public metrics handle empty cases).
    The computation runs on the bounding box of the union of the masks plus one voxel, which gives the same
    distances as the full array (every surface voxel lies inside that box).
    """
    pred_mask, ref_mask = _check_pair(pred, ref)
    sampling = _sampling_from_ijk(spacing_ijk, pred_mask.ndim)
    if not pred_mask.any() or not ref_mask.any():
        raise ValueError("surface distances need two non-empty masks")
    union = pred_mask | ref_mask
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    box = tuple(box)
    # The one-voxel pad is background, and where the box touches the array border the erosion's
    # border_value=0 treats the outside as background, so the surfaces equal those of the full arrays.
    pred_surface = _surface(pred_mask[box])
    ref_surface = _surface(ref_mask[box])
    dist_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)
    dist_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return dist_to_ref[pred_surface], dist_to_pred[ref_surface]


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing_ijk: Sequence[float], percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MedPy definition, pooled directed distances).

    0.0 when both masks are empty, ``inf`` when exactly one is empty. ``percentile=100`` gives the Hausdorff
    distance.
    """
    distances = _surface_distance_pair(pred, ref, spacing_ijk)
    if not isinstance(distances, tuple):
        return distances
    d_pr, d_rp = distances
    return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))


def assd_mm(pred: np.ndarray, ref: np.ndarray, spacing_ijk: Sequence[float]) -> float:
    """Average symmetric surface distance in mm = (mean(pred->ref) + mean(ref->pred)) / 2 (MedPy ``assd``).

    0.0 when both masks are empty, ``inf`` when exactly one is empty.
    """
    distances = _surface_distance_pair(pred, ref, spacing_ijk)
    if not isinstance(distances, tuple):
        return distances
    d_pr, d_rp = distances
    return float((d_pr.mean() + d_rp.mean()) / 2.0)


def _surface_distance_pair(pred, ref, spacing_ijk):
    """Both directed surface distance arrays, or the value a distance metric takes when a mask is empty:
    0.0 when both are, inf when exactly one is."""
    pred_mask, ref_mask = _check_pair(pred, ref)
    _sampling_from_ijk(spacing_ijk, pred_mask.ndim)
    has_pred, has_ref = bool(pred_mask.any()), bool(ref_mask.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return math.inf
    return surface_distances_mm(pred_mask, ref_mask, spacing_ijk)


def _slices_with_structure(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return mask.any(axis=other)


def false_positive_slices(pred: np.ndarray, ref: np.ndarray, axis: int = 0) -> int:
    """Number of slices along array ``axis`` where the prediction has the structure and the reference has none."""
    pred_mask, ref_mask = _check_pair(pred, ref)
    axis = _check_axis(axis, pred_mask.ndim)
    return int(np.count_nonzero(_slices_with_structure(pred_mask, axis) & ~_slices_with_structure(ref_mask, axis)))


def dice_inside_reference_extent(pred: np.ndarray, ref: np.ndarray, axis: int = 0) -> float:
    """Dice computed only on the slices (along array ``axis``) where the reference has the structure.

    This is the evaluation of the published CHAOS few-shot protocol (SSL-ALPNet, Ouyang et al. ECCV 2020, and
    the papers that follow it): query slices are those that contain the organ, so prediction outside the
    organ's slices is not penalised. Pair it with ``false_positive_slices`` to see what it leaves out.
    Slices are the reference's labelled slices themselves (a gap inside the extent is excluded too).
    Returns ``nan`` when the reference is empty (no slices to evaluate).
    """
    pred_mask, ref_mask = _check_pair(pred, ref)
    axis = _check_axis(axis, pred_mask.ndim)
    keep = np.flatnonzero(_slices_with_structure(ref_mask, axis))
    if keep.size == 0:
        return math.nan
    return dice(np.take(pred_mask, keep, axis=axis), np.take(ref_mask, keep, axis=axis))


def score_labels(
    pred_array: np.ndarray,
    ref_array: np.ndarray,
    label_values: Iterable[int],
    spacing_ijk: Sequence[float],
    axis: int = 0,
) -> dict[int, dict[str, float]]:
    """All metrics for each structure of two label maps on the same ``[k, j, i]`` grid.

    ``spacing_ijk``: voxel spacing in mm in **(i, j, k)** order (ITK / ``Geometry.spacing`` order).
    ``axis``: the slice axis as an array axis (0 = k for axial scans).

    Returns ``{label_value: {"dice", "iou", "hd95_mm", "assd_mm", "dice_inside_reference_extent",
    "false_positive_slices", "pred_voxels", "ref_voxels"}}``; empty-structure cases follow the module table.
    """
    pred_array = np.asarray(pred_array)
    ref_array = np.asarray(ref_array)
    if pred_array.shape != ref_array.shape:
        raise ValueError(f"prediction shape {pred_array.shape} differs from reference shape {ref_array.shape}")
    _sampling_from_ijk(spacing_ijk, pred_array.ndim)
    axis = _check_axis(axis, pred_array.ndim)
    results: dict[int, dict[str, float]] = {}
    for value in label_values:
        value = int(value)
        pred = pred_array == value
        ref = ref_array == value
        results[value] = {
            "dice": dice(pred, ref),
            "iou": iou(pred, ref),
            "hd95_mm": hd95_mm(pred, ref, spacing_ijk),
            "assd_mm": assd_mm(pred, ref, spacing_ijk),
            "dice_inside_reference_extent": dice_inside_reference_extent(pred, ref, axis),
            "false_positive_slices": false_positive_slices(pred, ref, axis),
            "pred_voxels": int(pred.sum()),
            "ref_voxels": int(ref.sum()),
        }
    return results
