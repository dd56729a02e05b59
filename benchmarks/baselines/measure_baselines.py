"""Measure Slicer's "Fill between slices" and "Grow from seeds" on the 12 CHAOS T2 MRI scans.

For k in (1, 3, 5) slices per structure, the painted input is ``few_shot_labels(reference, axis=0, k)``: for each of
liver, right kidney, left kidney and spleen, ``evenly_spaced_in_extent`` picks k axial slices, and every picked
slice is copied fully from the reference (all four structures on it). Both baselines get that painted map; Grow
from seeds also gets the image. Scores: 3D Dice over the whole volume (primary) and Dice inside the reference
extent (the published CHAOS few-shot protocol). "painted only" scores the painted slices themselves, with no
completion, as a floor.

Usage::

    python benchmarks/baselines/measure_baselines.py [--data-dir DIR] [--ks 1 3 5] [--json-out FILE] [--check-axes]

Prints a markdown table of mean Dice per organ and overall (mean over the 4 organs of the mean over scans), then
the full results as JSON (per-scan Dice included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.baselines.slicer_baselines import fill_between_slices, grow_from_seeds  # noqa: E402
from benchmarks.shared_data import default_data_dir  # noqa: E402
from FewShotSAMLib.atomic_write import write_text_atomically  # noqa: E402
from FewShotSAMLib.metrics import dice, dice_inside_reference_extent  # noqa: E402
from FewShotSAMLib.slice_selection import few_shot_labels  # noqa: E402

ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
CASES = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22]
SLICE_AXIS = 0  # axial slices: array axis 0 of the SimpleITK [k, j, i] array


def load_case(chaos_dir: Path, case: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(chaos_dir / f"image_{case}.nii.gz"))
    label = sitk.ReadImage(str(chaos_dir / f"label_{case}.nii.gz"))
    image_array = sitk.GetArrayFromImage(image)
    label_array = sitk.GetArrayFromImage(label)
    if image_array.shape != label_array.shape:
        raise ValueError(f"case {case}: image {image_array.shape} and label {label_array.shape} differ")
    reference = np.rint(label_array).astype(np.int32)  # label files are float64 holding 0..4
    return image_array, reference, tuple(float(s) for s in image.GetSpacing())


def run(data_dir: Path, ks: list[int], check_axes: bool) -> dict:
    chaos_dir = data_dir / "chaos_t2_mri"
    methods = ["painted only", "fill between slices", "grow from seeds"]
    per_case: dict[str, dict[str, dict[str, dict[str, float]]]] = {m: {str(k): {} for k in ks} for m in methods}
    per_case_extent: dict[str, dict[str, dict[str, dict[str, float]]]] = {m: {str(k): {} for k in ks} for m in methods}
    timing = {m: 0.0 for m in methods}
    axes_mismatches = []
    for case in CASES:
        image, reference, spacing = load_case(chaos_dir, case)
        for k in ks:
            painted = few_shot_labels(reference, SLICE_AXIS, k, list(ORGANS))
            outputs = {"painted only": painted}
            start = time.perf_counter()
            outputs["fill between slices"] = fill_between_slices(painted, spacing, SLICE_AXIS)
            timing["fill between slices"] += time.perf_counter() - start
            start = time.perf_counter()
            outputs["grow from seeds"] = grow_from_seeds(image, painted, spacing, SLICE_AXIS)
            timing["grow from seeds"] += time.perf_counter() - start
            if check_axes:
                literal = fill_between_slices(painted, spacing, SLICE_AXIS, all_axes=True)
                if not np.array_equal(literal, outputs["fill between slices"]):
                    differing = int((literal != outputs["fill between slices"]).sum())
                    axes_mismatches.append({"case": case, "k": k, "voxels": differing})
            for method, prediction in outputs.items():
                per_case[method][str(k)][str(case)] = {
                    ORGANS[v]: dice(prediction == v, reference == v) for v in ORGANS
                }
                per_case_extent[method][str(k)][str(case)] = {
                    ORGANS[v]: dice_inside_reference_extent(prediction == v, reference == v, SLICE_AXIS) for v in ORGANS
                }
        print(f"case {case} done", file=sys.stderr)

    def summarise(table):
        summary = {}
        for method, by_k in table.items():
            summary[method] = {}
            for k, by_case in by_k.items():
                organ_means = {name: float(np.mean([scores[name] for scores in by_case.values()]))
                               for name in ORGANS.values()}
                organ_means["mean"] = float(np.mean(list(organ_means.values())))
                summary[method][k] = organ_means
        return summary

    result = {
        "dataset": "CHAOS T2-SPIR MRI (12 scans)",
        "protocol": "few_shot_labels(reference, axis=0, k): evenly_spaced_in_extent per organ, "
                    "chosen slices fully painted",
        "ks": ks,
        "mean_dice_3d": summarise(per_case),
        "mean_dice_inside_reference_extent": summarise(per_case_extent),
        "per_case_dice_3d": per_case,
        "seconds_total": timing,
    }
    if check_axes:
        result["all_axes_vs_slice_axis_mismatches"] = axes_mismatches
    return result


def markdown(result: dict, key: str, title: str) -> str:
    names = list(ORGANS.values()) + ["mean"]
    lines = [f"**{title}**", "", "| method | k | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for method, by_k in result[key].items():
        for k, means in by_k.items():
            lines.append(f"| {method} | {k} | " + " | ".join(f"{means[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--check-axes", action="store_true",
                        help="also run Fill between slices with Slicer's literal Axis=-1 and report differences")
    args = parser.parse_args(argv)
    result = run(args.data_dir, args.ks, args.check_axes)
    print(markdown(result, "mean_dice_3d", "Mean 3D Dice (12 CHAOS T2 scans)"))
    print()
    print(markdown(result, "mean_dice_inside_reference_extent",
                   "Mean Dice inside the reference extent (CHAOS protocol)"))
    print()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        write_text_atomically(args.json_out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
