"""The accuracy benchmark's held-out datasets read what their notes say: the right label files and label tables,
and the slice axis from each scan's direction matrix (the T2 spinal cord scan is stored with permuted axes)."""

from __future__ import annotations

import numpy as np

from benchmarks.accuracy.datasets import (
    DATASET_NOTES,
    DATASET_TITLES,
    DATASETS,
    TOTALSEG_SMALL_WANTED,
    load_scan,
    scan_names,
)
from FewShotSAMLib.orientation import to_slices


def test_every_dataset_has_a_title_and_a_note():
    assert set(DATASET_TITLES) == set(DATASETS) == set(DATASET_NOTES)


def test_spinal_cord_scans_are_sliced_axially_and_hold_their_one_structure_on_every_slice(shared_data_dir):
    names = scan_names("spinal_cord", shared_data_dir, quick=False, hippocampus_count=0)
    assert names == ["t1_t1w", "t2_t2", "t2s_t2s"]
    expected = {"t1_t1w": (0, "spinal cord"), "t2_t2": (1, "spinal cord"), "t2s_t2s": (0, "grey matter")}
    for name in names:
        scan = load_scan("spinal_cord", name, shared_data_dir)
        axis, structure = expected[name]
        assert scan.axis == axis, name
        assert scan.structures == {1: structure}, name
        assert scan.reference.shape == scan.volume.array.shape
        # The note's claim: the structure is on every slice, so propagation along it is tested, not its ends.
        per_slice = to_slices(scan.reference == 1, scan.axis).reshape(scan.reference.shape[scan.axis], -1)
        assert per_slice.any(axis=1).all(), name


def test_the_abdominal_mri_reads_the_mr_label_table(shared_data_dir):
    scan = load_scan("totalseg_mr", "mr_example_sm", shared_data_dir)
    # The MR table numbers some classes differently from the CT's (portal and splenic vein: 25 against 64), so the
    # values must come from the MR table.
    assert sorted(scan.structures.values()) == sorted(TOTALSEG_SMALL_WANTED)
    assert scan.structures[25] == "portal_vein_and_splenic_vein"
    assert scan.axis == 0 and scan.volume.array.shape == (20, 91, 117)
    for value in scan.structures:
        assert np.count_nonzero(scan.reference == value) > 50, scan.structures[value]
