"""Shared pytest helpers.

Real scans live outside the repository, in the project's shared data folder (see shared_data_dir). Tests that need
them skip with a clear reason on a machine without that folder, but fail under CI (CI=true), where the data must be
present: a silently skipped real-data test would hide a regression.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package: tests import it from the repository
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.shared_data import DATA_ENV_VAR, shared_data_candidates, skip_or_fail  # noqa: E402


def locate_shared_data_dir() -> Path:
    """The shared data folder; pytest.skip when absent, pytest.fail under CI."""
    candidates = shared_data_candidates()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    reason = (
        f"shared test data not found (looked in {', '.join(str(c) for c in candidates)}); "
        f"set {DATA_ENV_VAR} to the folder holding chaos_t2_mri/, totalsegmentator_ct_mr/, ..."
    )
    skip_or_fail(reason)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Fixture: the shared data folder (see locate_shared_data_dir)."""
    return locate_shared_data_dir()


@pytest.fixture
def shared_data_file(shared_data_dir):
    """Fixture: a function returning an existing file under the shared data folder, with the same skip/fail rule."""

    def locate(relative: str) -> Path:
        path = shared_data_dir / relative
        if not path.exists():
            skip_or_fail(f"shared test data file {path} is missing")
        return path

    return locate


@pytest.fixture(scope="session")
def chaos_scan(shared_data_dir):
    """A function (case number) -> (image path, full reference label path) of a CHAOS T2 scan."""

    def paths(case: int) -> tuple[Path, Path]:
        image = shared_data_dir / "chaos_t2_mri" / f"image_{case}.nii.gz"
        labels = shared_data_dir / "chaos_t2_mri" / f"label_{case}.nii.gz"
        if not (image.exists() and labels.exists()):
            skip_or_fail(f"CHAOS case {case} missing from {shared_data_dir / 'chaos_t2_mri'}")
        return image, labels

    return paths


@pytest.fixture(scope="session")
def chaos_benchmark_paintings(chaos_scan):
    """[(case, k, painted slices [n, rows, cols], in-plane spacing)] of every shared CHAOS scan at k = 1, 3, 5, 10:
    what the accuracy benchmark paints (CHAOS slices along array axis 0), for the steps that must leave CHAOS alone."""
    from benchmarks.accuracy.datasets import CHAOS_CASES, CHAOS_STRUCTURES
    from FewShotSAMLib.orientation import in_plane_spacing, to_slices
    from FewShotSAMLib.slice_selection import few_shot_labels
    from FewShotSAMLib.volume_io import read_labels, read_volume

    paintings = []
    for case in CHAOS_CASES:
        image, labels_path = chaos_scan(case)
        volume = read_volume(image)
        reference = read_labels(labels_path, volume, reference_path=image).array
        for k in (1, 3, 5, 10):
            painted = to_slices(few_shot_labels(reference, 0, k, list(CHAOS_STRUCTURES)), 0)
            paintings.append((case, k, painted, in_plane_spacing(volume.geometry, 0)))
    return paintings


# The first 10 MSD hippocampus scans in sorted order (the benchmark's development scans 001 and 003 among them).
HIPPOCAMPUS_CHECK_SCANS = ("001", "003", "004", "006", "007", "008", "011", "014", "015", "017")


@pytest.fixture(scope="session")
def hippocampus_benchmark_paintings(shared_data_dir):
    """[(scan, k, painted slices [n, rows, cols], in-plane spacing)] of 10 shared hippocampus scans at k = 1, 3, 5:
    what the accuracy benchmark paints, for the steps that must leave the hippocampus alone."""
    from FewShotSAMLib.orientation import in_plane_spacing, slice_axis, to_slices
    from FewShotSAMLib.slice_selection import few_shot_labels
    from FewShotSAMLib.volume_io import read_labels, read_volume

    folder = shared_data_dir / "msd_hippocampus_mri"
    paintings = []
    for number in HIPPOCAMPUS_CHECK_SCANS:
        image, labels_path = (folder / kind / f"hippocampus_{number}.nii.gz" for kind in ("images", "labels"))
        if not (image.exists() and labels_path.exists()):
            skip_or_fail(f"hippocampus scan {number} missing from {folder}")
        volume = read_volume(image)
        reference = read_labels(labels_path, volume, reference_path=image).array
        axis = slice_axis(volume.geometry)
        for k in (1, 3, 5):
            painted = to_slices(few_shot_labels(reference, axis, k, [1, 2]), axis)
            paintings.append((number, k, painted, in_plane_spacing(volume.geometry, axis)))
    return paintings


@pytest.fixture(scope="session")
def compiled_encoder_build(tmp_path_factory):
    """(folder, whether it had to be built): LiteMedSAM's compiled bf16 encoder, built once a session by its first
    use into a folder of its own, for the test of the build and the test of a damaged build (30 s or more a build;
    the session cache holds one only where `auto` picked it)."""
    import torch

    from FewShotSAMLib.models import load_model

    model = load_model("litemedsam", device="cpu")
    folder = tmp_path_factory.mktemp("compiled-encoder")
    had_to_build = model.will_compile_encoder("compiled", folder)
    model.encode(torch.rand(1, 3, 256, 256), "compiled", encoders_folder=folder)
    model.release_encoder_sessions()
    return folder, had_to_build
