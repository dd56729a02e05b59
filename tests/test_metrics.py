"""Tests for FewShotSAMLib.metrics with answers known analytically or by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from FewShotSAMLib import metrics
from FewShotSAMLib.metrics import (
    assd_mm,
    dice,
    dice_inside_reference_extent,
    false_positive_slices,
    hd95_mm,
    iou,
    score_labels,
    surface_distances_mm,
)

# Anisotropic spacing in (i, j, k) order: 0.5 mm columns, 1 mm rows, 3 mm slices.
SPACING_IJK = (0.5, 1.0, 3.0)


def cube(offset_kji=(0, 0, 0), shape=(12, 12, 12), size=4, start=2) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    k, j, i = (start + o for o in offset_kji)
    mask[k : k + size, j : j + size, i : i + size] = True
    return mask


def brute_force_surface_distances(a: np.ndarray, b: np.ndarray, spacing_ijk) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: surface voxels by explicit 6-neighbour test, distances by all-pairs cdist."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        interior = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~interior) * np.asarray(spacing_ijk[::-1])

    pa, pb = surface_points(a), surface_points(b)
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


def test_offset_cubes_dice_and_iou():
    a = cube()
    b = cube(offset_kji=(0, 0, 1))  # 4x4x4 cubes overlapping in 4x4x3 voxels
    assert dice(a, b) == pytest.approx(2 * 48 / 128)
    assert iou(a, b) == pytest.approx(48 / 80)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert dice(a, cube(offset_kji=(0, 0, 5))) == 0.0


def test_offset_along_slice_axis_uses_slice_spacing():
    # Shift by one voxel along k (3 mm). A->B: the 16 voxels of A's bottom face are 3 mm from B; the 4 voxels of
    # A's top face that lie inside B are 0.5 mm (one i-step) from B's side faces; the other 36 are on B's surface.
    a = cube()
    b = cube(offset_kji=(1, 0, 0))
    d_ab, d_ba = surface_distances_mm(a, b, SPACING_IJK)
    assert sorted(d_ab.tolist()) == [0.0] * 36 + [0.5] * 4 + [3.0] * 16
    assert sorted(d_ba.tolist()) == [0.0] * 36 + [0.5] * 4 + [3.0] * 16
    # Pooled 112 distances: 72 zeros, 8 x 0.5, 32 x 3.0 -> 95th percentile is 3.0 mm.
    assert hd95_mm(a, b, SPACING_IJK) == pytest.approx(3.0)
    assert assd_mm(a, b, SPACING_IJK) == pytest.approx((16 * 3.0 + 4 * 0.5) / 56)
    assert hd95_mm(a, b, SPACING_IJK, percentile=100) == pytest.approx(3.0)


def test_offset_along_i_uses_column_spacing():
    a = cube()
    b = cube(offset_kji=(0, 0, 1))  # one column = 0.5 mm
    assert hd95_mm(a, b, SPACING_IJK) == pytest.approx(0.5)
    assert assd_mm(a, b, SPACING_IJK) == pytest.approx(20 * 0.5 / 56)
    # The same offset with the spacing given in the wrong (k, j, i) order would read 3 mm: the order matters.
    assert hd95_mm(a, b, SPACING_IJK[::-1]) == pytest.approx(3.0)


def test_far_apart_cubes_distance_in_mm():
    # A covers slices 2..5, B slices 12..15 (same rows and columns). Each surface voxel's nearest surface voxel of
    # the other cube is straight along k: faces 7 or 10 slices away, side rings 8/9 slices away (x 3 mm).
    a = cube(shape=(20, 12, 12))
    b = cube(offset_kji=(10, 0, 0), shape=(20, 12, 12))
    d_ab, d_ba = surface_distances_mm(a, b, SPACING_IJK)
    assert sorted(d_ab.tolist()) == [21.0] * 16 + [24.0] * 12 + [27.0] * 12 + [30.0] * 16
    assert hd95_mm(a, b, SPACING_IJK) == pytest.approx(30.0)
    assert assd_mm(a, b, SPACING_IJK) == pytest.approx((16 * 21 + 12 * 24 + 12 * 27 + 16 * 30) / 56)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (7, 9, 11)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[1:6, 2:8, 1:9] = rng.random((5, 6, 8)) > 0.3
    b[0:5, 1:7, 3:11] = rng.random((5, 6, 8)) > 0.3  # touches the array border on purpose
    got_ab, got_ba = surface_distances_mm(a, b, SPACING_IJK)
    want_ab, want_ba = brute_force_surface_distances(a, b, SPACING_IJK)
    np.testing.assert_allclose(np.sort(got_ab), np.sort(want_ab))
    np.testing.assert_allclose(np.sort(got_ba), np.sort(want_ba))
    pooled = np.concatenate([want_ab, want_ba])
    assert hd95_mm(a, b, SPACING_IJK) == pytest.approx(np.percentile(pooled, 95))
    assert assd_mm(a, b, SPACING_IJK) == pytest.approx((want_ab.mean() + want_ba.mean()) / 2)


def test_empty_cases_are_explicit():
    empty = np.zeros((5, 6, 7), bool)
    full = cube(shape=(5, 6, 7), size=2, start=1)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert hd95_mm(empty, empty, SPACING_IJK) == 0.0
    assert assd_mm(empty, empty, SPACING_IJK) == 0.0
    for pred, ref in ((empty, full), (full, empty)):
        assert dice(pred, ref) == 0.0
        assert iou(pred, ref) == 0.0
        assert hd95_mm(pred, ref, SPACING_IJK) == math.inf
        assert assd_mm(pred, ref, SPACING_IJK) == math.inf
    with pytest.raises(ValueError):
        surface_distances_mm(empty, full, SPACING_IJK)


def test_false_positive_slices_counts_slices_without_reference():
    ref = np.zeros((10, 4, 5), bool)
    ref[3:6, 1:3, 1:3] = True
    pred = np.zeros_like(ref)
    pred[[1, 4, 8], 2, 2] = True  # slices 1 and 8 are outside the reference's slices, 4 is inside
    assert false_positive_slices(pred, ref, axis=0) == 2
    assert false_positive_slices(ref, ref, axis=0) == 0
    assert false_positive_slices(pred, np.zeros_like(ref), axis=0) == 3
    # Along j the reference covers rows 1..2; the prediction only uses row 2.
    assert false_positive_slices(pred, ref, axis=1) == 0
    assert false_positive_slices(pred, ref, axis=-3) == 2


def test_dice_inside_reference_extent_ignores_other_slices():
    ref = np.zeros((10, 6, 6), bool)
    ref[3:6, 1:4, 1:4] = True
    pred = ref.copy()
    pred[8, 1:4, 1:4] = True  # a false-positive blob on a slice without reference
    assert dice(pred, ref) < 0.9
    assert dice_inside_reference_extent(pred, ref, axis=0) == 1.0
    # Errors inside the extent still count.
    pred[4, 1:4, 1:4] = False
    assert dice_inside_reference_extent(pred, ref, axis=0) == pytest.approx(2 * 18 / (18 + 27))
    assert math.isnan(dice_inside_reference_extent(pred, np.zeros_like(ref), axis=0))


def test_score_labels_per_structure():
    ref = np.zeros((12, 12, 12), np.int16)
    pred = np.zeros_like(ref)
    ref[cube()] = 1
    pred[cube(offset_kji=(1, 0, 0))] = 1
    ref[9:11, 9:11, 9:11] = 2
    pred[9:11, 9:11, 9:11] = 2
    scores = score_labels(pred.astype(float), ref, [1, 2, 3], SPACING_IJK, axis=0)
    assert set(scores) == {1, 2, 3}
    assert scores[1]["dice"] == pytest.approx(0.75)
    assert scores[1]["hd95_mm"] == pytest.approx(3.0)
    assert scores[1]["false_positive_slices"] == 1
    assert scores[1]["dice_inside_reference_extent"] == pytest.approx(2 * 48 / (48 + 64))
    assert scores[1]["pred_voxels"] == 64 and scores[1]["ref_voxels"] == 64
    assert scores[2]["dice"] == 1.0 and scores[2]["assd_mm"] == 0.0
    assert scores[3]["dice"] == 1.0 and scores[3]["hd95_mm"] == 0.0  # absent from both: agreement
    assert math.isnan(scores[3]["dice_inside_reference_extent"])


def test_argument_checks():
    a = cube()
    with pytest.raises(ValueError):
        dice(a, a[:-1])
    with pytest.raises(ValueError):
        hd95_mm(a, a, (1.0, 1.0))
    with pytest.raises(ValueError):
        assd_mm(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        false_positive_slices(a, a, axis=3)
    with pytest.raises(ValueError):
        score_labels(a, a, [1], (1.0, 1.0, 1.0, 1.0))


def test_metrics_module_imports_no_slicer_or_vtk():
    source = open(metrics.__file__, encoding="utf-8").read()
    for name in ("import slicer", "import vtk", "import qt", "from slicer", "from vtk", "from qt"):
        assert name not in source
