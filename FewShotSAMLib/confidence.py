"""How sure a propagation is of each slice, and which slice the user should paint next.

Two independent predictions draw every structure on every slice: the pixel prompts (a classifier over the
64x64 embedding grid) and the tuned mask decoder (full resolution). Where they disagree, at least one of them is
wrong, and the result (their average) is unsure. Per (slice, structure) the recorder keeps

- the area where the two masks disagree after a small opening (a thin band along a boundary is only the coarse
  grid's blockiness; a blob is a real disagreement about the shape), and
- the area of their union;

the slice's confidence is 1 - disagreement / union (1 where both find nothing). The suggestion for a structure is
the slice whose neighbourhood (NEIGHBOURHOOD slices either side: one painted slice also fixes its neighbours)
holds the most disagreement, at least MIN_GAP slices from every painted slice. Absolute areas rank slices, not
confidences: a tiny cross-section at a structure's end can be very uncertain and still cost little Dice.

Slice indices are along the engine's slice axis (the array axis chosen from the direction matrix), as in
--labelled-slices and --slice-range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .atomic_write import write_text_atomically
from .errors import FewShotSAMError
from .volume_io import SEGMENTATION_SUFFIXES, check_output_path

NEIGHBOURHOOD = 2  # slices either side that painting one slice is expected to improve as well
MIN_GAP = 2  # a suggested slice lies at least this many slices from every painted slice
OPENING = np.ones((5, 5), dtype=bool)  # model-input pixels: removes bands under 5 px (about one grid cell)
LEAST_CONFIDENT = 5  # slices listed per structure in the report


class ConfidenceRecorder:
    """Collects, during propagation, how far the decoder and the pixel prompts disagree on each slice.

    Pass one to Engine.propagate (or propagate_volume), then call report()."""

    def __init__(self):
        self.disagreement = self.union = None
        self.segments, self.painted, self.slice_axis = [], [], 0

    def begin(self, n_slices: int, segments, painted: list[int], slice_axis: int) -> None:
        """Called by propagate_volume: the volume's slices, the adapter's structures (in class order)."""
        self.disagreement = np.zeros((n_slices, len(segments)))
        self.union = np.zeros((n_slices, len(segments)))
        self.segments, self.painted, self.slice_axis = list(segments), sorted(painted), slice_axis

    def carry_over(self, recorded: np.ndarray, redone: list[tuple[int, int]]) -> None:
        """A warm start (warm_start.py) predicts only some slice ranges again: keep the recorded figures of the
        other slices. recorded: the previous run's state() ([2, n_slices, structures]); redone: inclusive ranges."""
        self.disagreement, self.union = (np.array(part, dtype=float) for part in recorded)
        for first, last in redone:
            self.disagreement[first:last + 1] = 0.0
            self.union[first:last + 1] = 0.0

    def state(self) -> np.ndarray:
        """[2, n_slices, structures]: disagreement and union, as a run record keeps them."""
        return np.stack([self.disagreement, self.union])

    def add(self, index: int, structure: int, pixel_prompts: torch.Tensor, decoder: torch.Tensor) -> None:
        """Probabilities [S, S] (model-input pixels) of one structure on one slice from both predictors."""
        prompts_mask = (pixel_prompts > 0.5).numpy()
        decoder_mask = (decoder > 0.5).numpy()
        differ = ndimage.binary_opening(prompts_mask ^ decoder_mask, structure=OPENING)
        self.disagreement[index, structure] = float(differ.sum())
        self.union[index, structure] = float((prompts_mask | decoder_mask).sum())

    def report(self) -> "ConfidenceReport":
        if self.disagreement is None:
            raise RuntimeError("no propagation has filled this recorder yet")
        return build_report(self.disagreement, self.union, self.painted, self.segments, self.slice_axis)


@dataclass
class StructureConfidence:
    label_value: int
    name: str
    confidence: float  # over the whole structure: 1 - disagreement / union, summed over slices
    suggested_slice: int | None  # None: nothing uncertain far enough from the painted slices
    least_confident: list[tuple[int, float]]  # (slice, confidence), least confident first
    slice_confidence: dict[int, float] = field(default_factory=dict)  # every slice where it was predicted

    def as_json(self) -> dict:
        return {"label_value": self.label_value, "name": self.name, "confidence": round(self.confidence, 4),
                "suggested_slice": self.suggested_slice,
                "least_confident": [{"slice": z, "confidence": round(c, 4)} for z, c in self.least_confident],
                "slice_confidence": {str(z): round(c, 4) for z, c in self.slice_confidence.items()}}


@dataclass
class ConfidenceReport:
    slice_axis: int  # array axis of the [k, j, i] volume along which slices are counted
    n_slices: int
    painted_slices: list[int]
    structures: list[StructureConfidence]

    def suggestions(self) -> dict[int, int]:
        """{label value: slice to paint next} for the structures that have a suggestion."""
        return {s.label_value: s.suggested_slice for s in self.structures if s.suggested_slice is not None}

    def as_json(self) -> dict:
        return {"slice_axis": self.slice_axis, "n_slices": self.n_slices, "painted_slices": self.painted_slices,
                "structures": [s.as_json() for s in self.structures]}

    def text(self) -> str:
        """A few lines for the terminal."""
        axis_name = "kji"[self.slice_axis]
        lines = [f"confidence per structure (slices along array axis {self.slice_axis} = {axis_name}, "
                 f"painted: {', '.join(map(str, self.painted_slices)) or 'none'}):"]
        for s in self.structures:
            weakest = ", ".join(f"{z} ({c:.2f})" for z, c in s.least_confident[:3]) or "-"
            advice = (f"paint slice {s.suggested_slice} next" if s.suggested_slice is not None
                      else "no slice stands out")
            lines.append(f"  {s.name} (label {s.label_value}): confidence {s.confidence:.2f}; least sure slices "
                         f"{weakest}; {advice}")
        return "\n".join(lines)


def slice_confidences(disagreement: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Each slice's confidence, 1 - disagreement / union, where its union is not empty; 0 where it is (the structure
    was predicted by neither)."""
    return np.where(union > 0, 1 - disagreement / np.maximum(union, 1), 0.0)


def build_report(disagreement: np.ndarray, union: np.ndarray, painted: list[int], segments,
                 slice_axis: int) -> ConfidenceReport:
    """The report from [n_slices, n_structures] disagreement and union areas; segments in structure order."""
    structures = []
    confidences = slice_confidences(disagreement, union)
    for index, segment in enumerate(segments):
        differ, both = disagreement[:, index], union[:, index]
        per_slice = {int(z): float(confidences[z, index]) for z in np.flatnonzero(both > 0)}
        total = both.sum()
        structures.append(StructureConfidence(
            label_value=segment.label_value, name=segment.name,
            confidence=float(1 - differ.sum() / total) if total else 1.0,
            suggested_slice=suggest_slice(differ, painted),
            least_confident=sorted(per_slice.items(), key=lambda item: (item[1], item[0]))[:LEAST_CONFIDENT],
            slice_confidence=per_slice))
    return ConfidenceReport(slice_axis, disagreement.shape[0], sorted(painted), structures)


def suggest_slice(disagreement: np.ndarray, painted: list[int], neighbourhood: int = NEIGHBOURHOOD,
                  min_gap: int = MIN_GAP) -> int | None:
    """The slice whose neighbourhood holds the most disagreement, at least min_gap slices from every painted slice
    (None when no such slice has any). Ties go to the slice farther from the painting, then the lower index."""
    n_slices = disagreement.shape[0]
    weights = 1 - np.abs(np.arange(-neighbourhood, neighbourhood + 1)) / (neighbourhood + 1)
    gathered = ndimage.convolve1d(disagreement.astype(float), weights, mode="constant")  # any slice count
    distance = np.full(n_slices, n_slices)
    for z in painted:
        distance = np.minimum(distance, np.abs(np.arange(n_slices) - z))
    allowed = (distance >= min_gap) & (gathered > 0)
    if not allowed.any():
        return None
    candidates = np.flatnonzero(allowed)
    best = max(candidates, key=lambda z: (gathered[z], distance[z], -z))
    return int(best)


REPORT_SUFFIX = ".report.json"


def default_report_path(output) -> Path:
    """Where --report writes its JSON when given no path: beside the segmentation, e.g. liver.seg.nrrd ->
    liver.report.json."""
    output = Path(output)
    for ending in sorted(SEGMENTATION_SUFFIXES, key=len, reverse=True):
        if output.name.lower().endswith(ending):
            return output.with_name(output.name[: -len(ending)] + REPORT_SUFFIX)
    return output.with_name(output.name + REPORT_SUFFIX)


def check_report_path(path, overwrite: bool = False) -> Path:
    """Raise now, before any work, if the report cannot be written later (a .json name, no file replaced unasked)."""
    return check_output_path(path, overwrite, suffixes=(".json",))


def write_report(path, report: ConfidenceReport, overwrite: bool = False) -> Path:
    """Write the report as JSON (temp file, then rename); a file that appeared meanwhile is kept unless overwrite."""
    try:
        return write_text_atomically(path, json.dumps(report.as_json(), indent=1) + "\n", overwrite=overwrite)
    except FileExistsError:
        raise FewShotSAMError(f"{path} exists; pass --overwrite to replace it") from None
