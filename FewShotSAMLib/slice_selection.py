"""Protocols that choose which slices a user "paints", given a complete reference segmentation.

They simulate a clinician who labels a few 2D slices fully; the rest of the volume is then filled by an
algorithm (FewShotSAM or a baseline) and compared with the reference.

Evaluation code, not part of segmenting: the engine's core path never imports it (tests/test_public_api.py
checks). It lives in the package because the installed ``fewshotsam demo`` command paints the bundled sample
with it; the benchmarks use the same protocols so that demo and benchmark figures are comparable.

Conventions: arrays are indexed ``[k, j, i]``; ``axis`` is an array axis (0 = k, the slice axis of an axial
scan). Slice indices are array indices along ``axis``.

Exact rounding
--------------
Let ``z_0 < z_1 < ... < z_{n-1}`` be the slices along ``axis`` on which the structure is present (its
*labelled slices*). A fraction ``f`` in ``[0, 1)`` selects ``z_m`` with ``m = floor(f * n)``.

* For a structure without gaps (``z_m = lo + m``) this is ``lo + floor(f * n)``, which is the slice whose
  centre is nearest to the continuous position ``lo - 0.5 + f * n`` with halves rounded **up**; i.e. the
  extent ``[lo - 0.5, hi + 0.5]`` (slice centres at integers) is cut at fraction ``f``.
* ``evenly_spaced_in_extent(mask, axis, k)`` uses ``f_c = (c + 0.5) / k``, c = 0..k-1, the centres of k equal
  chunks of the extent: k=1 -> the middle slice (upper middle when n is even), k=3 -> 1/6, 1/2, 5/6.
* This is exactly the support-slice rule of SSL-ALPNet (Ouyang et al., ECCV 2020:
  ``pcts = [1/(2k) + c*(1 - 1/k)/(k - 1)]``, ``z = zlist[int(pct * len(zlist))]``) used by the CHAOS few-shot
  papers, including its handling of gaps: picking among the labelled slices guarantees that every chosen slice
  contains the structure, even when the structure is interrupted (e.g. CHAOS scan 3, left kidney).
* ``f = 1.0`` is clamped to the last labelled slice ``z_{n-1}``.
* Duplicates (only possible when ``k > n``) are removed, so fewer than k slices may be returned then.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "labelled_slices",
    "fractions_of_extent",
    "evenly_spaced_in_extent",
    "few_shot_slices",
    "few_shot_labels",
]


def _check_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}D array")
    return axis % ndim


def labelled_slices(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sorted indices of the slices along ``axis`` where ``mask`` has any non-zero voxel."""
    mask = np.asarray(mask)
    axis = _check_axis(axis, mask.ndim)
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return np.flatnonzero((mask != 0).any(axis=other))


def fractions_of_extent(ref_mask: np.ndarray, axis: int, fractions: Sequence[float]) -> list[int]:
    """Slices at the given fractions of the structure's extent along ``axis`` (rounding: module docstring).

    Returns sorted, unique slice indices. Raises ``ValueError`` for an empty mask or a fraction outside [0, 1].
    """
    present = labelled_slices(ref_mask, axis)
    if present.size == 0:
        raise ValueError("the reference mask is empty: it has no extent to choose slices from")
    n = present.size
    chosen = set()
    for fraction in fractions:
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
            raise ValueError(f"fractions must lie in [0, 1], got {fraction}")
        chosen.add(int(present[min(int(math.floor(fraction * n)), n - 1)]))
    return sorted(chosen)


def evenly_spaced_in_extent(ref_mask: np.ndarray, axis: int, k: int) -> list[int]:
    """The centre slices of k equal chunks of the structure's extent along ``axis`` (sorted, unique).

    k=1 gives the middle slice, k=3 the slices at 1/6, 1/2 and 5/6 of the extent.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    k = int(k)
    return fractions_of_extent(ref_mask, axis, [(c + 0.5) / k for c in range(k)])


def _label_values(ref_labels: np.ndarray, label_values: Iterable[int] | None) -> list[int]:
    if label_values is None:
        values = np.unique(ref_labels)
        return [int(v) for v in values if v != 0]
    return [int(v) for v in label_values]


def few_shot_slices(
    ref_labels: np.ndarray, axis: int, k: int, label_values: Iterable[int] | None = None
) -> dict[int, list[int]]:
    """``{label_value: evenly_spaced_in_extent(ref_labels == value, axis, k)}`` for each structure.

    ``label_values=None`` means every non-zero value in ``ref_labels``. Structures absent from the reference
    get an empty list (nothing can be painted for them).
    """
    ref_labels = np.asarray(ref_labels)
    result: dict[int, list[int]] = {}
    for value in _label_values(ref_labels, label_values):
        mask = ref_labels == value
        result[value] = evenly_spaced_in_extent(mask, axis, k) if mask.any() else []
    return result


def few_shot_labels(
    ref_labels: np.ndarray, axis: int, k: int, label_values: Iterable[int] | None = None
) -> np.ndarray:
    """The "painted" label map a user would produce with k slices per structure.

    For each structure in ``label_values`` (``None`` = every non-zero value), ``evenly_spaced_in_extent``
    chooses k slices. Every chosen slice (the union over structures) is copied **fully** from the reference:
    all structures of ``label_values`` present on it keep their labels, everything else on it is 0 (so a chosen
    slice also says where each structure is *not*). All other slices are 0. Values of the reference that are not
    in ``label_values`` are dropped (set to 0). Returns an ``int32`` array of the reference's shape;
    non-integer label values raise ``ValueError`` (CHAOS label files are float64 holding integers).
    """
    ref_labels = np.asarray(ref_labels)
    if ref_labels.dtype.kind == "f":
        if not np.all(np.isfinite(ref_labels)) or not np.array_equal(ref_labels, np.round(ref_labels)):
            raise ValueError("label map holds non-integer values")
    axis = _check_axis(axis, ref_labels.ndim)
    values = _label_values(ref_labels, label_values)
    chosen: set[int] = set()
    for slices in few_shot_slices(ref_labels, axis, k, values).values():
        chosen.update(slices)
    painted = np.zeros(ref_labels.shape, dtype=np.int32)
    if not chosen:
        return painted
    index = [slice(None)] * ref_labels.ndim
    index[axis] = sorted(chosen)
    index = tuple(index)
    source = ref_labels[index]
    painted[index] = np.where(np.isin(source, values), source, 0).astype(np.int32)
    return painted


def one_more_slice(painted: np.ndarray, ref_labels: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """The interactive loop's next step: ``painted`` plus the reference's labels on one more slice, the middle of
    the widest gap between painted slices (the one a user would paint next); returns it and that slice's index.
    Only the label values already painted are copied. Needs at least two painted slices."""
    axis = _check_axis(axis, painted.ndim)
    moved = np.moveaxis(painted, axis, 0)
    labelled = np.flatnonzero(moved.reshape(moved.shape[0], -1).any(axis=1))
    if len(labelled) < 2:
        raise ValueError("one_more_slice needs at least two painted slices")
    gap = int(np.argmax(np.diff(labelled)))
    added = int((labelled[gap] + labelled[gap + 1]) // 2)
    if added == labelled[gap]:
        raise ValueError("every slice between the first and last painted ones is painted")
    more = painted.copy()
    target = np.moveaxis(more, axis, 0)
    source = np.moveaxis(ref_labels, axis, 0)[added]
    target[added] = np.where(np.isin(source, np.unique(painted[painted != 0])), source, 0)
    return more, added
