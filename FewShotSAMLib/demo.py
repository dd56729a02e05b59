"""`fewshotsam demo`: propagate on the bundled sample scan from a few of its slices, report Dice, draw a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic_write import write_atomically, write_text_atomically
from .errors import FewShotSAMError
from .metrics import dice
from .orientation import array_axis_to_voxel_axis, in_plane_array_axes, slice_axis, to_slices
from .pipeline import EngineOptions, propagate_files
from .progress import NO_PROGRESS, Progress
from .slice_selection import few_shot_labels
from .volume import Geometry, LabelVolume, Segment
from .volume_io import check_output_path, read_labels, read_volume, write_segmentation

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
SAMPLE_IMAGE = SAMPLE_DIR / "chaos_t2_case2_image.nrrd"
SAMPLE_REFERENCE = SAMPLE_DIR / "chaos_t2_case2_reference.nrrd"
SAMPLE_SEGMENTS = [
    Segment("liver", 1, (0.87, 0.51, 0.40)),
    Segment("right kidney", 2, (0.73, 0.40, 0.33)),
    Segment("left kidney", 3, (0.96, 0.78, 0.35)),
    Segment("spleen", 4, (0.62, 0.42, 0.64)),
]


def run_demo(out_dir: Path, slices_per_structure: int = 3, options: EngineOptions | None = None,
             overwrite: bool = False, progress: Progress = NO_PROGRESS) -> list[Path]:
    if slices_per_structure < 1:
        raise FewShotSAMError("--slices-per-structure must be at least 1")
    options = options or EngineOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    painted_path, result_path = out_dir / "painted.seg.nrrd", out_dir / "result.seg.nrrd"
    overview_path, report_path = out_dir / "overview.png", out_dir / "dice.json"
    for path in (painted_path, result_path):
        check_output_path(path, overwrite)
    for path in (overview_path, report_path):  # refused before any work, not after the run
        check_output_path(path, overwrite, (path.suffix,))
    image = read_volume(SAMPLE_IMAGE)
    reference = read_volume(SAMPLE_REFERENCE).array.astype(np.int32)
    axis = slice_axis(image.geometry, options.axis)
    values = [segment.label_value for segment in SAMPLE_SEGMENTS]
    painted = few_shot_labels(reference, axis, slices_per_structure, values)
    write_segmentation(painted_path, LabelVolume(painted, image.geometry, SAMPLE_SEGMENTS), overwrite)

    propagate_files(SAMPLE_IMAGE, painted_path, result_path, options, overwrite, progress)
    predicted = read_labels(result_path, image).array
    scores = {segment.name: round(float(dice(predicted == segment.label_value, reference == segment.label_value)), 4)
              for segment in SAMPLE_SEGMENTS}
    scores["mean"] = round(float(np.mean(list(scores.values()))), 4)
    report = {"sample": SAMPLE_IMAGE.name, "slices_per_structure": slices_per_structure, "dice": scores,
              "painted_slices": sorted(set(np.flatnonzero(to_slices(painted, axis).any(axis=(1, 2))).tolist()))}
    write_text_atomically(report_path, json.dumps(report, indent=2))
    def shown(array):
        return radiological_slices(array, image.geometry, axis)

    overview = draw_overview(shown(image.array), shown(predicted), shown(reference), report["painted_slices"],
                             SAMPLE_SEGMENTS)
    write_atomically(overview_path, overview.save)
    print("Dice against the sample's full reference: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return [result_path, overview_path, report_path]


# Where the screen's right and down point in patient space (LPS), per slice plane, as Slicer shows slices
# (radiological convention): axial and coronal with the patient's right on the screen's left, axial with anterior
# up, coronal and sagittal with superior up, sagittal with anterior on the left.
SCREEN_RIGHT_DOWN_LPS = {
    2: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # slice normal along S-I (axial): right = L, down = P
    1: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # normal along A-P (coronal): right = L, down = I
    0: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # normal along L-R (sagittal): right = P, down = I
}


def radiological_slices(array: np.ndarray, geometry: Geometry, axis: int) -> np.ndarray:
    """A [k, j, i] array as [n, rows, cols] slices along `axis`, turned and flipped for display as Slicer shows
    them; derived from the direction matrix, so any storage order or flipped axis comes out the same way up."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    normal = direction[:, array_axis_to_voxel_axis(axis)]
    right, down = (np.array(v) for v in SCREEN_RIGHT_DOWN_LPS[int(np.argmax(np.abs(normal)))])
    rows_axis, cols_axis = in_plane_array_axes(axis)
    row_vector = direction[:, array_axis_to_voxel_axis(rows_axis)]  # where increasing row index points
    col_vector = direction[:, array_axis_to_voxel_axis(cols_axis)]
    stack = to_slices(array, axis)
    if abs(row_vector @ down) < abs(col_vector @ down):  # the array's rows run across the screen: transpose
        stack = stack.transpose(0, 2, 1)
        row_vector, col_vector = col_vector, row_vector
    if row_vector @ down < 0:
        stack = stack[:, ::-1, :]
    if col_vector @ right < 0:
        stack = stack[:, :, ::-1]
    return stack


def draw_overview(image: np.ndarray, predicted: np.ndarray, reference: np.ndarray, painted: list[int],
                  segments: list[Segment], columns: int = 6, tile: int = 192) -> Image.Image:
    """A grid of slices through the structures: prediction filled in colour, reference outlined in white,
    painted (labelled) slices framed in yellow."""
    present = np.flatnonzero((predicted > 0).any(axis=(1, 2)) | (reference > 0).any(axis=(1, 2)))
    if present.size == 0:
        present = np.arange(image.shape[0])
    chosen = np.unique(np.linspace(present[0], present[-1], min(columns * 2, present.size)).round().astype(int))
    rows = int(np.ceil(len(chosen) / columns))
    canvas = Image.new("RGB", (columns * tile, rows * (tile + 16)), "black")
    low, high = np.percentile(image, [1, 99.5])
    for position, index in enumerate(chosen):
        grey = np.clip((image[index] - low) / max(high - low, 1e-6), 0, 1)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for segment in segments:
            mask = predicted[index] == segment.label_value
            rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(segment.color)
            edge = (reference[index] == segment.label_value) & ~_eroded(reference[index] == segment.label_value)
            rgb[edge] = 1.0
        picture = Image.fromarray((rgb * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
        x, y = (position % columns) * tile, (position // columns) * (tile + 16)
        canvas.paste(picture, (x, y + 16))
        draw = ImageDraw.Draw(canvas)
        label = f"slice {index}" + (" (painted)" if index in painted else "")
        draw.text((x + 4, y + 2), label, fill="yellow" if index in painted else "white")
        if index in painted:
            draw.rectangle([x, y + 16, x + tile - 1, y + 16 + tile - 1], outline="yellow", width=2)
    return canvas


def _eroded(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask)
