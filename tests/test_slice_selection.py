"""Tests for FewShotSAMLib.slice_selection (synthetic extents with known answers, plus real CHAOS labels)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.shared_data import skip_or_fail
from FewShotSAMLib import slice_selection
from FewShotSAMLib.slice_selection import (
    evenly_spaced_in_extent,
    few_shot_labels,
    few_shot_slices,
    fractions_of_extent,
    labelled_slices,
)


def slab(slices, shape=(30, 8, 9), axis=0) -> np.ndarray:
    mask = np.zeros(shape, bool)
    index = [slice(2, 5)] * 3
    index[axis] = list(slices)
    mask[tuple(index)] = True
    return mask


def test_odd_extent_centres_of_chunks():
    mask = slab(range(10, 19))  # 9 slices: 10..18
    assert evenly_spaced_in_extent(mask, 0, 1) == [14]  # exact middle
    # Chunks of 3 slices: 10-12, 13-15, 16-18 -> centres 11, 14, 17 (1/6, 1/2, 5/6 of the extent).
    assert evenly_spaced_in_extent(mask, 0, 3) == [11, 14, 17]
    assert fractions_of_extent(mask, 0, [1 / 6, 1 / 2, 5 / 6]) == [11, 14, 17]
    # 5 chunks of 1.8 slices: centres at 0.9, 2.7, 4.5, 6.3, 8.1 slices into the extent -> floor.
    assert evenly_spaced_in_extent(mask, 0, 5) == [10, 12, 14, 16, 18]


def test_even_extent_rounds_half_up():
    mask = slab(range(10, 20))  # 10 slices: 10..19, middle falls between 14 and 15
    assert evenly_spaced_in_extent(mask, 0, 1) == [15]
    # Continuous centres 10 - 0.5 + (c + 0.5) * 10 / 3 = 11.17, 14.5, 17.83 -> 11, 15 (half up), 18.
    assert evenly_spaced_in_extent(mask, 0, 3) == [11, 15, 18]


def test_matches_lo_plus_floor_formula_for_contiguous_extents():
    for lo in (0, 3):
        for n in range(1, 25):
            mask = slab(range(lo, lo + n), shape=(40, 6, 6))
            for k in (1, 2, 3, 5):
                want = sorted({lo + math.floor((c + 0.5) * n / k) for c in range(k)})
                assert evenly_spaced_in_extent(mask, 0, k) == want
                assert all(lo <= z < lo + n for z in want)


def test_other_axes_and_negative_axis():
    mask = slab(range(1, 8), shape=(6, 7, 12), axis=2)  # structure on i columns 1..7
    assert labelled_slices(mask, 2).tolist() == list(range(1, 8))
    assert evenly_spaced_in_extent(mask, 2, 1) == [4]
    assert evenly_spaced_in_extent(mask, -1, 3) == evenly_spaced_in_extent(mask, 2, 3) == [2, 4, 6]


def test_gaps_pick_only_labelled_slices():
    mask = slab([2, 3, 4, 10, 11])  # interrupted structure, 5 labelled slices
    assert evenly_spaced_in_extent(mask, 0, 1) == [4]  # 3rd labelled slice, not the empty slice 6 or 7
    picks = evenly_spaced_in_extent(mask, 0, 3)
    assert picks == [2, 4, 11]  # list positions floor(5/6)=0, floor(5/2)=2, floor(25/6)=4
    assert all(mask[z].any() for z in picks)


def test_edge_cases():
    mask = slab([5, 6])
    assert evenly_spaced_in_extent(mask, 0, 5) == [5, 6]  # k > n: duplicates removed
    assert fractions_of_extent(mask, 0, [0.0, 1.0]) == [5, 6]  # 1.0 clamps to the last slice
    with pytest.raises(ValueError):
        evenly_spaced_in_extent(np.zeros((4, 4, 4)), 0, 1)
    with pytest.raises(ValueError):
        evenly_spaced_in_extent(mask, 0, 0)
    with pytest.raises(ValueError):
        fractions_of_extent(mask, 0, [1.5])
    with pytest.raises(ValueError):
        evenly_spaced_in_extent(mask, 3, 1)


def test_few_shot_labels_paints_chosen_slices_fully():
    ref = np.zeros((20, 10, 10), np.float64)  # float labels, as in the CHAOS files
    ref[2:9, 1:5, 1:5] = 1  # structure 1 on slices 2..8 -> k=1 picks 5
    ref[5:16, 6:9, 6:9] = 2  # structure 2 on slices 5..15 -> k=1 picks 10
    ref[0:20, 0, 0] = 7  # a value that is not asked for
    assert few_shot_slices(ref, 0, 1, [1, 2]) == {1: [5], 2: [10]}
    painted = few_shot_labels(ref, 0, 1, [1, 2])
    assert painted.dtype == np.int32 and painted.shape == ref.shape
    np.testing.assert_array_equal(painted[5], np.where(ref[5] == 7, 0, ref[5]))  # both structures copied
    assert (painted[5] == 2).any() and (painted[5] == 1).any()
    np.testing.assert_array_equal(painted[10], np.where(ref[10] == 7, 0, ref[10]))
    others = np.delete(painted, [5, 10], axis=0)
    assert not others.any()
    assert not (painted == 7).any()
    # label_values=None means every non-zero value, absent values get no slices.
    assert set(few_shot_slices(ref, 0, 1)) == {1, 2, 7}
    assert few_shot_slices(ref, 0, 1, [1, 3])[3] == []
    with pytest.raises(ValueError):
        few_shot_labels(ref + 0.5, 0, 1, [1])


def test_few_shot_labels_along_j():
    ref = np.zeros((4, 12, 5), np.int16)
    ref[1:3, 2:9, 1:4] = 3  # rows 2..8 -> k=3 picks rows 3, 5, 7
    painted = few_shot_labels(ref, 1, 3, [3])
    assert labelled_slices(painted, 1).tolist() == [3, 5, 7]
    np.testing.assert_array_equal(painted[:, [3, 5, 7], :], ref[:, [3, 5, 7], :])


def test_slice_selection_imports_no_slicer_or_vtk():
    source = open(slice_selection.__file__, encoding="utf-8").read()
    for name in ("import slicer", "import vtk", "import qt", "from slicer", "from vtk", "from qt"):
        assert name not in source


# ---- real data: CHAOS T2 labels -------------------------------------------------------------------------------

CHAOS_ORGANS = (1, 2, 3, 4)  # liver, right kidney, left kidney, spleen


def load_chaos_label(shared_data_dir, case: int) -> np.ndarray:
    sitk = pytest.importorskip("SimpleITK")
    path = shared_data_dir / "chaos_t2_mri" / f"label_{case}.nii.gz"
    if not path.exists():
        skip_or_fail(f"CHAOS label file {path} is missing")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_chaos_k3_picks_inside_extent_at_expected_positions(shared_data_dir):
    ref = load_chaos_label(shared_data_dir, 1)  # 37 x 256 x 256, axial slices along array axis 0
    assert ref.shape == (37, 256, 256)
    picks = few_shot_slices(ref, 0, 3, CHAOS_ORGANS)
    # Extents of scan 1: liver 12..35 (24 slices), right kidney 12..25 (14), left kidney 14..29 (16),
    # spleen 18..31 (14); picks = lo + floor(n/6), lo + floor(n/2), lo + floor(5n/6).
    assert picks == {1: [16, 24, 32], 2: [14, 19, 23], 3: [16, 22, 27], 4: [20, 25, 29]}
    for value, slices in picks.items():
        present = labelled_slices(ref == value, 0)
        lo, hi, n = present[0], present[-1], present.size
        assert all(lo <= z <= hi for z in slices)
        assert slices == [lo + n // 6, lo + n // 2, lo + (5 * n) // 6]
    painted = few_shot_labels(ref, 0, 3, CHAOS_ORGANS)
    chosen = sorted({z for s in picks.values() for z in s})
    assert labelled_slices(painted, 0).tolist() == chosen
    np.testing.assert_array_equal(painted[chosen], ref[chosen].astype(np.int32))


def test_chaos_gap_structure_gets_labelled_slices(shared_data_dir):
    ref = load_chaos_label(shared_data_dir, 3)  # left kidney of scan 3 is interrupted inside its extent
    kidney = ref == 3
    present = labelled_slices(kidney, 0)
    assert present[-1] - present[0] + 1 > present.size  # the gap the test is about
    for k in (1, 3, 5):
        picks = evenly_spaced_in_extent(kidney, 0, k)
        assert len(picks) == k
        assert all(kidney[z].any() for z in picks)
