"""Helpers of the web app's tests (Testing/web): requirements, a cropped CHAOS scan, free ports.

These tests run in the web environment (the 'web' extra: trame-slicer and the slicer-core it is built for, see
scripts/test.sh); a missing requirement is a skip with the reason, or a failure under CI=true.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np

TESTING_DIR = Path(__file__).resolve().parents[1]
if str(TESTING_DIR) not in sys.path:
    sys.path.insert(0, str(TESTING_DIR))

import slicer_extension_support as support  # noqa: E402  (puts FewShotSAM/ on sys.path)

REPO_ROOT = support.REPO_ROOT
LIVER, SPLEEN = 1, 4  # CHAOS label values of the two organs the tests paint


def require_trame_slicer():
    try:
        import trame_slicer  # noqa: F401
    except ImportError as error:
        support.skip_or_fail(f"trame-slicer cannot be imported ({error}); install the web extra: "
                             "pip install -e \".[web]\" (scripts/test.sh does it in .venv-web)")


def chromium_executable() -> str:
    candidates = [os.environ.get("FEWSHOTSAM_CHROMIUM", ""), shutil.which("chromium") or "",
                  shutil.which("chromium-browser") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    support.skip_or_fail("no chromium browser found (apt-get install chromium, or set FEWSHOTSAM_CHROMIUM)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cropped_chaos_scan(folder: Path, slice_count: int = 12) -> tuple[Path, Path, list[int]]:
    """A CHAOS case cut to `slice_count` axial slices around where liver and spleen are both visible.

    Returns (image path, reference labels path, 3 slice indices of the crop that show both organs). The crop keeps
    the scan's spacing and direction; its origin moves with the first kept slice, as SimpleITK slicing does.
    """
    import SimpleITK as sitk

    chaos = support.chaos_dir()
    image = sitk.ReadImage(str(chaos / f"image_{support.CHAOS_CASE}.nii.gz"))
    labels = sitk.ReadImage(str(chaos / f"label_{support.CHAOS_CASE}.nii.gz"))
    reference = sitk.GetArrayFromImage(labels)
    both = support.shared_slices(reference, (LIVER, SPLEEN), axis=0, count=3)
    middle = (both[0] + both[-1]) // 2
    first = max(0, min(middle - slice_count // 2, reference.shape[0] - slice_count))
    last = first + slice_count
    folder.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = folder / "chaos-crop.nii.gz", folder / "chaos-crop-labels.nii.gz"
    sitk.WriteImage(image[:, :, first:last], str(image_path), True)
    sitk.WriteImage(labels[:, :, first:last], str(labels_path), True)
    cropped = reference[first:last]
    painted = support.shared_slices(cropped, (LIVER, SPLEEN), axis=0, count=3)
    return image_path, labels_path, painted


def reference_array(labels_path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))


def reference_spacing_mm(labels_path: Path) -> float:
    """In-plane voxel size (mm) of the axial slices (the i axis)."""
    import SimpleITK as sitk

    return float(sitk.ReadImage(str(labels_path)).GetSpacing()[0])
