"""The benchmark's scans: CHAOS T2 MRI, MSD hippocampus MRI, two TotalSegmentator CTs (one at full resolution, scored
on its large organs and on its small ones; one at 3 mm, small organs), TotalSegmentator's abdominal MRI (small
organs) and the Spinal Cord Toolbox's cervical spine MRI (spinal cord, grey matter), read as FewShotSAM volumes.

Every scan is returned as a ``Scan``: the image ``Volume``, the full reference label map restricted to the benchmark's
structures (other label values set to 0), the structures (label value -> name) and the slice axis (an array axis of
the ``[k, j, i]`` array, chosen by ``FewShotSAMLib.orientation.slice_axis`` from the direction matrix; for CHAOS this is
axis 0 and is checked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from FewShotSAMLib.orientation import slice_axis
from FewShotSAMLib.volume import LabelVolume, Segment, Volume
from FewShotSAMLib.volume_io import palette_color, read_labels, read_volume

CHAOS_CASES = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22]
CHAOS_QUICK_CASES = [2, 15]
CHAOS_STRUCTURES = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
HIPPOCAMPUS_STRUCTURES = {1: "anterior hippocampus", 2: "posterior hippocampus"}
# The scans the small-structure settings (FewShotSAMLib/small_structures.py) were chosen on: the first 2
# hippocampus scans in sorted order. Every other scan of a dataset is held out; the report gives both separately.
DEVELOPMENT_SCANS = {
    "hippocampus": ["hippocampus_001", "hippocampus_003"],
}
TOTALSEG_WANTED = ["liver", "spleen", "kidney_right", "kidney_left"]
# Small abdominal structures of the 3 mm TotalSegmentator example CT (each spans 8-54 voxels in plane).
TOTALSEG_SMALL_WANTED = ["gallbladder", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
                         "portal_vein_and_splenic_vein"]
# Small structures of the full-resolution TotalSegmentator CT (512x512, 0.98 mm pixels): each spans 13-135 voxels
# in plane, under 9 of the encoder's 64 embedding cells across a 512 px slice.
TOTALSEG_CT512_SMALL_WANTED = ["pancreas", "adrenal_gland_right", "portal_vein_and_splenic_vein"]
# Thin structures the thin rule (FewShotSAMLib/small_structures.is_thin) was not set on, to check it: tubes and
# bands that run across the slice, under 16 voxels thick where painted (duodenum 7-8, colon 8-16 on the 3 mm scans,
# costal cartilages 4-12); the MRI's duodenum and the 512 CT's colon (25-30 thick) are not thin and stay as they were.
TOTALSEG_THIN_WANTED = ["duodenum", "colon", "costal_cartilages"]
TOTALSEG_MR_THIN_WANTED = ["duodenum", "colon"]  # the MRI's labels have no costal cartilages
TOTALSEG_CT512_THIN_WANTED = ["colon", "costal_cartilages"]  # no duodenum voxels in this CT's 20 slices
# Spinal Cord Toolbox test subject: scan -> (its manual label file, the structure). Left out: mt_mt1, whose cord
# mask was made by a program (sct_propseg) and whose 5 slices k = 5 would all paint.
SPINAL_CORD_SCANS = {
    "t1_t1w": ("t1_t1w_seg-manual", "spinal cord"),
    "t2_t2": ("t2_t2_seg-manual", "spinal cord"),
    "t2s_t2s": ("t2s_t2s_gmseg_manual", "grey matter"),
}
# The TotalSegmentator datasets: name -> (scan, label file, structures scored). The abdominal MRI is scored on the
# CT's small structures: with every painted slice fully labelled, its large organs and vessels would add painted
# slices until k = 3 covered most of its 20.
TOTALSEG_CASES = {
    "totalseg": ("ct_dicom_20slices", "ct_dicom_20slices_seg_total_on_dicom_grid", TOTALSEG_WANTED),
    "totalseg_ct512_small": ("ct_dicom_20slices", "ct_dicom_20slices_seg_total_on_dicom_grid",
                             TOTALSEG_CT512_SMALL_WANTED),
    "totalseg_small": ("ct_example_sm", "ct_example_sm_seg_total", TOTALSEG_SMALL_WANTED),
    "totalseg_mr": ("mr_example_sm", "mr_example_sm_seg_total_mr", TOTALSEG_SMALL_WANTED),
    "totalseg_thin": ("ct_example_sm", "ct_example_sm_seg_total", TOTALSEG_THIN_WANTED),
    "totalseg_mr_thin": ("mr_example_sm", "mr_example_sm_seg_total_mr", TOTALSEG_MR_THIN_WANTED),
    "totalseg_ct512_thin": ("ct_dicom_20slices", "ct_dicom_20slices_seg_total_on_dicom_grid",
                            TOTALSEG_CT512_THIN_WANTED),
}
DATASETS = ("chaos", "hippocampus", "totalseg", "totalseg_ct512_small", "totalseg_small", "totalseg_mr", "spinal_cord",
            "totalseg_thin", "totalseg_mr_thin", "totalseg_ct512_thin")

DATASET_TITLES = {
    "chaos": "CHAOS T2-SPIR MRI (abdomen)",
    "hippocampus": "MSD Task04 hippocampus MRI",
    "totalseg": "TotalSegmentator CT (ct_dicom_20slices)",
    "totalseg_ct512_small": "TotalSegmentator CT at full resolution, small organs (ct_dicom_20slices)",
    "totalseg_small": "TotalSegmentator CT, small organs (ct_example_sm)",
    "totalseg_mr": "TotalSegmentator MRI, abdomen (mr_example_sm)",
    "spinal_cord": "Spinal Cord Toolbox cervical spine MRI (one subject)",
    "totalseg_thin": "TotalSegmentator CT, thin structures (ct_example_sm)",
    "totalseg_mr_thin": "TotalSegmentator MRI, thin structures (mr_example_sm)",
    "totalseg_ct512_thin": "TotalSegmentator CT at full resolution, thin structures (ct_dicom_20slices)",
}
DATASET_NOTES = {
    "chaos": "12 scans, manual labels; 1 liver, 2 right kidney, 3 left kidney, 4 spleen; axial slices (array axis 0).",
    "hippocampus": "manual labels; 1 anterior, 2 posterior hippocampus; volumes cropped around the hippocampus by MSD.",
    "totalseg": ("one CT scan of 20 axial slices (512x512, 2 mm); labels are TotalSegmentator MODEL OUTPUTS resampled "
                 "to the DICOM grid, not manual ground truth; only liver and spleen are present (no kidney voxels), "
                 "and both span all 20 slices, so the structures' ends along the slice axis are not tested."),
    "totalseg_ct512_small": ("the CT above (512x512 pixels of 0.98 mm, 20 slices of 2 mm) scored on its small "
                             "structures: pancreas (4 slices), right adrenal gland (11), portal and splenic vein "
                             "(14); labels are TotalSegmentator MODEL OUTPUTS, not manual ground truth."),
    "totalseg_small": ("one abdominal CT of 30 axial slices (122x101, 3 mm); labels are TotalSegmentator MODEL "
                       "OUTPUTS (its test reference example_seg.nii.gz), not manual ground truth; gallbladder, "
                       "pancreas, right and left adrenal gland, portal and splenic vein, 12-18 slices each."),
    "totalseg_mr": ("one abdominal MRI of 20 axial slices (117x91, 3 mm); labels are TotalSegmentator MODEL OUTPUTS "
                    "(its test reference example_seg_mr.nii.gz), not manual ground truth; the small structures of "
                    "the CT above: gallbladder, pancreas, right and left adrenal gland (7-9 voxels a slice), portal "
                    "and splenic vein, 9-19 slices each."),
    "spinal_cord": ("one subject (Spinal Cord Toolbox test data), manual labels: spinal cord on T1 (77 axial slices "
                    "of 76x42, 1 mm) and T2 (55 axial slices of 52x60, 1 mm, stored with permuted axes), grey "
                    "matter on T2* (9 slices of 54x49, 0.5 mm, 7.5 mm thick); each structure spans every slice, so "
                    "this tests propagation along a thin structure, not its ends. Too few scans for statistics."),
    "totalseg_thin": ("the 3 mm CT above scored on duodenum, colon and costal cartilages: structures that run across "
                      "the slice and are under 16 voxels thick where painted, which the thin rule was not set on; "
                      "labels are TotalSegmentator MODEL OUTPUTS."),
    "totalseg_mr_thin": ("the 3 mm MRI above scored on duodenum (compact: not thin) and colon (thin); labels are "
                         "TotalSegmentator MODEL OUTPUTS."),
    "totalseg_ct512_thin": ("the 512x512 CT above scored on colon (25-30 voxels thick: not thin) and costal "
                            "cartilages (thin); labels are TotalSegmentator MODEL OUTPUTS."),
}


@dataclass
class Scan:
    dataset: str
    name: str
    volume: Volume
    reference: np.ndarray  # [k, j, i] int32, only the benchmark's structures
    structures: dict[int, str]  # label value -> name, in label-value order
    axis: int

    @property
    def spacing_ijk(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.volume.geometry.spacing)

    def segments(self) -> list[Segment]:
        return [Segment(name, value, palette_color(value)) for value, name in self.structures.items()]

    def label_volume(self, array: np.ndarray) -> LabelVolume:
        """A label map on this scan's grid, carrying the structures that occur in it as segments."""
        present = set(np.unique(array).tolist())
        return LabelVolume(np.asarray(array, dtype=np.int32), self.volume.geometry,
                           [segment for segment in self.segments() if segment.label_value in present])


def _restrict(labels: np.ndarray, values) -> np.ndarray:
    labels = np.asarray(labels)
    return np.where(np.isin(labels, list(values)), labels, 0).astype(np.int32)


def _make_scan(dataset: str, name: str, image_path: Path, labels_path: Path, structures: dict[int, str],
               axis_choice: str) -> Scan:
    volume = read_volume(image_path)
    labels = read_labels(labels_path, volume, reference_path=image_path)
    reference = _restrict(labels.array, structures)
    present = {value: label for value, label in structures.items() if np.any(reference == value)}
    return Scan(dataset, name, volume, reference, present, slice_axis(volume.geometry, axis_choice))


def chaos_cases(quick: bool, only: list[str] | None = None) -> list[str]:
    cases = CHAOS_QUICK_CASES if quick else CHAOS_CASES
    names = [str(case) for case in cases]
    return [name for name in names if only is None or name in only]


def hippocampus_cases(data_dir: Path, count: int, only: list[str] | None = None) -> list[str]:
    folder = data_dir / "msd_hippocampus_mri"
    names = sorted(path.name[: -len(".nii.gz")] for path in (folder / "images").glob("hippocampus_*.nii.gz")
                   if (folder / "labels" / path.name).exists())
    names = names[:count]
    return [name for name in names if only is None or name in only]


CHAOS_QUICK_FOLD = ("quick", ["1", "2"], ["13"])


def chaos_training_folds(quick: bool = False) -> list[tuple[str, list[str], list[str]]]:
    """Across-scan folds (name, training scans, test scans) shared by the supervised U-Net and protocol 3: the two
    halves of the CHAOS case list swap roles, so every scan is tested by a model that never saw it."""
    if quick:
        return [CHAOS_QUICK_FOLD]
    cases = [str(case) for case in sorted(CHAOS_CASES)]
    half = len(cases) // 2
    return [("A", cases[:half], cases[half:]), ("B", cases[half:], cases[:half])]


def scan_names(dataset: str, data_dir: Path, quick: bool, hippocampus_count: int,
               only: list[str] | None = None) -> list[str]:
    if dataset == "chaos":
        return chaos_cases(quick, only)
    if dataset == "hippocampus":
        return hippocampus_cases(data_dir, hippocampus_count, only)
    if dataset in TOTALSEG_CASES:
        name = TOTALSEG_CASES[dataset][0]
        return [name] if only is None or name in only else []
    if dataset == "spinal_cord":
        return [name for name in SPINAL_CORD_SCANS if only is None or name in only]
    raise ValueError(f"unknown dataset {dataset!r}; use {', '.join(DATASETS)}")


def load_scan(dataset: str, name: str, data_dir: Path, axis_choice: str = "auto") -> Scan:
    if dataset == "chaos":
        folder = data_dir / "chaos_t2_mri"
        scan = _make_scan(dataset, name, folder / f"image_{name}.nii.gz", folder / f"label_{name}.nii.gz",
                          CHAOS_STRUCTURES, axis_choice)
        if axis_choice == "auto" and scan.axis != 0:
            raise RuntimeError(f"CHAOS scan {name}: slice axis {scan.axis}, expected 0 (axial)")
        return scan
    if dataset == "hippocampus":
        folder = data_dir / "msd_hippocampus_mri"
        return _make_scan(dataset, name, folder / "images" / f"{name}.nii.gz", folder / "labels" / f"{name}.nii.gz",
                          HIPPOCAMPUS_STRUCTURES, axis_choice)
    if dataset in TOTALSEG_CASES:
        folder = data_dir / "totalsegmentator_ct_mr"
        class_map = json.loads((folder / "class_map.json").read_text())
        _, labels_name, wanted = TOTALSEG_CASES[dataset]
        table_name = "total_mr (" if labels_name.endswith("_total_mr") else "total (CT"
        label_map = next(table for key, table in class_map.items() if key.startswith(table_name))
        by_name = {label: int(value) for value, label in label_map.items()}
        structures = dict(sorted({by_name[label]: label for label in wanted}.items()))
        return _make_scan(dataset, name, folder / f"{name}.nii.gz", folder / f"{labels_name}.nii.gz", structures,
                          axis_choice)
    if dataset == "spinal_cord":
        folder = data_dir / "sct_spinal_cord_mri"
        labels_name, structure = SPINAL_CORD_SCANS[name]
        return _make_scan(dataset, name, folder / f"{name}.nii.gz", folder / f"{labels_name}.nii.gz", {1: structure},
                          axis_choice)
    raise ValueError(f"unknown dataset {dataset!r}")


def iterate_scans(dataset: str, names: list[str], data_dir: Path, axis_choice: str = "auto") -> Iterator[Scan]:
    for name in names:
        yield load_scan(dataset, name, data_dir, axis_choice)
