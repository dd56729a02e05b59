"""Helpers shared by the Slicer-extension tests (Testing/test_slicer_*.py), outside the Qt GUI.

- puts <repo>/FewShotSAM on sys.path so that ``FewShotSAMSlicerLib`` imports as it does inside Slicer;
- finds the shared data folder (env FEWSHOTSAM_DATA, else <repo>/../shared/data): missing data is a skip with a
  clear reason, or a failure when CI=true;
- builds real MRML scenes with the slicer-core wheel (a CHAOS volume, a segmentation with painted slices).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.shared_data import shared_data_candidates, skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "FewShotSAM"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

CHAOS_CASE = "2"
ORGANS = (  # label value in the CHAOS reference -> segment name and colour
    (1, "liver", (0.86, 0.35, 0.25)),
    (2, "right kidney", (0.19, 0.62, 0.85)),
    (3, "left kidney", (0.31, 0.80, 0.35)),
    (4, "spleen", (0.70, 0.30, 0.80)),
)


def import_slicer():
    try:
        import slicer  # noqa: F401  (the slicer-core wheel: MRML and logic without Qt)

        return slicer
    except ImportError as error:
        skip_or_fail(f"slicer-core cannot be imported ({error}); install it with pip install slicer-core")


def chaos_dir(case: str = CHAOS_CASE) -> Path:
    """The shared CHAOS folder holding image_<case>.nii.gz (skip, or fail under CI, when there is none)."""
    candidates = shared_data_candidates()
    for candidate in candidates:
        if (candidate / "chaos_t2_mri" / f"image_{case}.nii.gz").is_file():
            return candidate / "chaos_t2_mri"
    skip_or_fail(f"CHAOS data (chaos_t2_mri/image_{case}.nii.gz) not found under "
                 f"{', '.join(map(str, candidates))}; set FEWSHOTSAM_DATA to the shared data folder")


def engine_cli_problem(python: str = sys.executable) -> str | None:
    """None if ``python -m FewShotSAMLib propagate --help`` works, else why not."""
    try:
        completed = subprocess.run([python, "-m", "FewShotSAMLib", "propagate", "--help"], capture_output=True,
                                   text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not run the FewShotSAMLib CLI: {error}"
    if completed.returncode != 0:
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        return f"the FewShotSAMLib CLI is not usable: {lines[-1] if lines else completed.returncode}"
    return None


def pid_alive(pid: int) -> bool:
    """Whether the process `pid` still runs (the worker tests check that Cancel and exit leave none behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------
def new_scene():
    slicer = import_slicer()
    from FewShotSAMSlicerLib import mrml_conversion

    mrml_conversion.ensureSegmentationConverterRules()
    return slicer.vtkMRMLScene()


def load_volume(scene, path: Path, name: str, labelmap: bool = False):
    slicer = import_slicer()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"could not read {path}"
    return node


def painted_slice_indices(reference: np.ndarray, value: int, axis: int = 0, count: int = 3) -> list[int]:
    """`count` slices spread over the organ's extent along `axis` (at 1/4, 1/2, 3/4 of it)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero((reference == value).any(axis=other))
    positions = [round((n + 1) * (len(present) - 1) / (count + 1)) for n in range(count)]
    return [int(present[p]) for p in positions]


def shared_slices(reference: np.ndarray, values, axis: int = 0, count: int = 3) -> list[int]:
    """`count` slices spread over the slices where all the given label values are present."""
    other = tuple(a for a in range(3) if a != axis)
    common = set.intersection(*[set(np.flatnonzero((reference == v).any(axis=other)).tolist()) for v in values])
    present = sorted(common)
    positions = [round((n + 1) * (len(present) - 1) / (count + 1)) for n in range(count)]
    return [int(present[p]) for p in positions]


def add_painted_segmentation(scene, volume, reference: np.ndarray, name: str = "FewShotSAM test", axis: int = 0,
                             extra_unpainted: bool = True, slices_for: dict | None = None):
    """Segmentation with the 4 CHAOS organs painted on 3 slices each (copied from the reference labels).

    Each organ is painted with its own label only, on its own slices: slices_for[organ] if given, else 3 slices
    spread over the organ. Returns (segmentation node, {organ name: segment ID}, {organ name: painted slices}).
    """
    from FewShotSAMSlicerLib import mrml_conversion

    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids, painted = {}, {}
    for value, organ, color in ORGANS:
        segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", organ, color)
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        indices = list((slices_for or {}).get(organ) or painted_slice_indices(reference, value, axis))
        mask = np.zeros(reference.shape, dtype=bool)
        for index in indices:
            key = [slice(None)] * 3
            key[axis] = index
            mask[tuple(key)] = reference[tuple(key)] == value
        mrml_conversion.setSegmentMask(segmentation_node, segment_id, mask, volume)
        ids[organ], painted[organ] = segment_id, indices
    if extra_unpainted:
        ids["notes"] = segmentation_node.GetSegmentation().AddEmptySegment("", "notes", (0.9, 0.9, 0.1))
    return segmentation_node, ids, painted


def segment_arrays(segmentation_node, volume) -> dict[str, np.ndarray]:
    from FewShotSAMSlicerLib import mrml_conversion

    return {i: mrml_conversion.segmentMask(segmentation_node, i, volume)
            for i in mrml_conversion.segmentIds(segmentation_node)}


def segment_metadata(segmentation_node) -> list[tuple]:
    segmentation = segmentation_node.GetSegmentation()
    result = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        result.append((segmentation.GetNthSegmentID(index), segment.GetName(),
                       tuple(round(c, 4) for c in segment.GetColor())))
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([
        [c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
        [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
        [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)],
    ])
