"""What a cohort run reports per scan: each structure's volume, slice count and model confidence, the flags that
say which scans a person should look at first, and the summary CSV."""

from __future__ import annotations

import csv
import io
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic_write import write_text_atomically
from .errors import FewShotSAMError
from .orientation import slice_axis
from .volume import LabelVolume, Segment
from .volume_io import _short_itk_reason, geometry_from_ijk_to_lps, geometry_from_image

# A structure is flagged when its volume is outside [median / VOLUME_RATIO, median * VOLUME_RATIO] of the scans
# that finished (only with at least MIN_SCANS_FOR_MEDIAN of them: a median of two says little), when it is absent,
# or when the pixel prompts' mean probability on its slices is below CONFIDENCE_FLOOR.
VOLUME_RATIO = 2.0
MIN_SCANS_FOR_MEDIAN = 3
CONFIDENCE_FLOOR = 0.6

BASE_COLUMNS = ("path", "output", "status", "error", "seconds")
MEASURES = ("volume_ml", "slices", "confidence", "flag")


@dataclass
class StructureMeasure:
    volume_ml: float
    slices: int
    confidence: float | None = None  # mean over its slices of the pixel prompts' probability (None: not measured)


@dataclass
class CohortSummary:
    """The summary table (one dict per scan, keys `columns`) and where it was written."""

    columns: list[str]
    rows: list[dict]
    csv_path: Path | None = None
    counts: dict = field(default_factory=dict)

    def rows_with(self, status: str) -> list[dict]:
        return [row for row in self.rows if row["status"] == status]

    @property
    def flagged(self) -> list[dict]:
        return [row for row in self.rows if row.get("flags")]


def column_name(segment: Segment, measure: str) -> str:
    return f"{'_'.join(str(segment.name).split())}_{measure}"


def summary_columns(segments: list[Segment]) -> list[str]:
    return list(BASE_COLUMNS) + [column_name(s, m) for s in segments for m in MEASURES] + ["flags"]


def measure_structures(labels: LabelVolume, axis: int, segments: list[Segment],
                       confidences: dict[int, float | None] | None = None) -> dict[int, StructureMeasure]:
    """Volume (mL) and the number of slices along `axis` holding each structure, by label value."""
    voxel_ml = float(np.prod(labels.geometry.spacing)) / 1000.0
    other_axes = tuple(a for a in range(3) if a != axis)
    measures = {}
    for segment in segments:
        mask = labels.array == segment.label_value
        measures[segment.label_value] = StructureMeasure(
            round(int(np.count_nonzero(mask)) * voxel_ml, 3), int(np.count_nonzero(mask.any(axis=other_axes))),
            None if confidences is None else confidences.get(segment.label_value))
    return measures


def read_result(path: str | os.PathLike) -> LabelVolume:
    """A result file written by apply, on its own grid: the measures of a scan skipped because it was done."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".seg.nrrd"):
            import slicerio

            segmentation = slicerio.read_segmentation(str(path))
            voxels = np.asarray(segmentation["voxels"])
            if voxels.ndim != 3:
                raise ValueError(f"{voxels.ndim}D voxels; apply writes one 3D layer")
            array = np.ascontiguousarray(voxels.transpose(2, 1, 0))  # slicerio gives [i, j, k]
            geometry = geometry_from_ijk_to_lps(segmentation["ijkToLPS"], array.shape)
        else:
            image = sitk.ReadImage(str(path))
            array, geometry = sitk.GetArrayFromImage(image), geometry_from_image(image)
    except RuntimeError as error:
        raise FewShotSAMError(f"cannot read the earlier result {path}: {_short_itk_reason(error)}") from None
    except Exception as error:  # slicerio and pynrrd raise many kinds for a damaged file
        raise FewShotSAMError(f"cannot read the earlier result {path}: {error}") from None
    return LabelVolume(array, geometry, [])


def measure_result_file(path: str | os.PathLike, segments: list[Segment], axis_choice: str = "auto"):
    labels = read_result(path)
    return measure_structures(labels, slice_axis(labels.geometry, axis_choice), segments)


def row_for(path, output, status: str, error: str, seconds: float, segments: list[Segment],
            measures: dict[int, StructureMeasure] | None) -> dict:
    row = {"path": str(path), "output": str(output), "status": status, "error": error, "seconds": round(seconds, 2)}
    for segment in segments:
        measure = (measures or {}).get(segment.label_value)
        row[column_name(segment, "volume_ml")] = "" if measure is None else measure.volume_ml
        row[column_name(segment, "slices")] = "" if measure is None else measure.slices
        row[column_name(segment, "confidence")] = "" if measure is None or measure.confidence is None \
            else round(measure.confidence, 3)
        row[column_name(segment, "flag")] = ""
    row["flags"] = ""
    return row


def flag_rows(rows: list[dict], segments: list[Segment]) -> None:
    """Fill each structure's flag, and the row's `flags`, for scans that finished (ok or skipped)."""
    done = [row for row in rows if row["status"] in ("ok", "skipped")]
    for segment in segments:
        volume_key = column_name(segment, "volume_ml")
        present = [row[volume_key] for row in done if row[volume_key] not in ("", 0, 0.0)]
        median = statistics.median(present) if len(present) >= MIN_SCANS_FOR_MEDIAN else None
        for row in done:
            row[column_name(segment, "flag")] = structure_flag(row, segment, median)
    for row in rows:
        reasons = [f"{segment.name}: {row[column_name(segment, 'flag')]}" for segment in segments
                   if row.get(column_name(segment, "flag"))]
        row["flags"] = "; ".join(reasons)


def structure_flag(row: dict, segment: Segment, median: float | None) -> str:
    volume = row[column_name(segment, "volume_ml")]
    confidence = row[column_name(segment, "confidence")]
    reasons = []
    if volume in ("", None):
        return ""
    if volume == 0:
        reasons.append("absent")
    elif median is not None and not median / VOLUME_RATIO <= volume <= median * VOLUME_RATIO:
        reasons.append(f"volume {volume / median:.2f}x the cohort median")
    if confidence not in ("", None) and confidence < CONFIDENCE_FLOOR:
        reasons.append(f"low confidence {confidence:.2f}")
    return ", ".join(reasons)


def write_summary_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    """Atomically: a reader (or a crash) never sees half a summary."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())
    return path


def read_summary_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))
