"""Positions relative to the patient's body on each slice, so that they carry over between patients.

An adapter made on one patient's scan and applied to another's meets a body that lies elsewhere in the image and
has another size: the liver at the left third of one image frame is at the left quarter of another. Measured in the
body's own bounding box on that slice, the liver stays at about the same place. The box comes from the slice's own
intensities (an Otsu threshold between air and tissue, then the largest connected region), so it needs no labels
and costs a few milliseconds per slice.

Boxes are given in embedding-grid cell units (x0, y0, x1, y1): cell j spans [j, j + 1) along x, so that a box
maps cell centres (j + 0.5) to body coordinates in -1..1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .preprocess import ResizeInfo

IMAGE_FRAME = "image"  # positions in the padded model-input square (every adapter made before body frames)
BODY_FRAME = "body"  # positions relative to the body's bounding box on each slice
FRAMES = (IMAGE_FRAME, BODY_FRAME)
AUTO_FRAME = "auto"  # an option's value, never an adapter's: AdaptOptions.resolved makes it one of FRAMES
HISTOGRAM_BINS = 256
# A body smaller than this share of the slice is noise or an end slice outside the patient: the box is then the
# whole image, which is what the image frame would use.
MIN_BODY_SHARE = 0.02


def otsu_threshold(values: np.ndarray) -> float:
    """The threshold between two intensity classes with the largest between-class variance (Otsu, 1979)."""
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def body_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), ends exclusive, of the largest region brighter than the slice's Otsu threshold,
    or the whole slice when there is none."""
    rows, cols = image.shape
    whole = (0, 0, rows, cols)
    if image.max() <= image.min():
        return whole
    # Two classes by Otsu on a T2 MRI are bright fluid against the rest: the body's edge lies between air and
    # soft tissue, which Otsu finds again within the darker class.
    upper = otsu_threshold(image)
    darker = image[image <= upper]
    foreground = image > (otsu_threshold(darker) if darker.max() > darker.min() else upper)
    foreground = ndimage.binary_opening(foreground, iterations=2)  # thin air artefacts would join the body
    components, count = ndimage.label(foreground)
    if count == 0:
        return whole
    sizes = np.bincount(components.ravel())[1:]
    if sizes.max() < MIN_BODY_SHARE * image.size:
        return whole
    region = components == int(np.argmax(sizes)) + 1
    present_rows = np.flatnonzero(region.any(axis=1))
    present_cols = np.flatnonzero(region.any(axis=0))
    return int(present_rows[0]), int(present_cols[0]), int(present_rows[-1]) + 1, int(present_cols[-1]) + 1


def body_boxes_on_grid(slices: np.ndarray, resize: ResizeInfo, grid: int) -> torch.Tensor:
    """[n, 4] body boxes (x0, y0, x1, y1) of slices [n, rows, cols] in embedding-grid cell units."""
    rows, cols = resize.original_shape
    resized_rows, resized_cols = resize.resized_shape
    cells_per_row_pixel = resized_rows / rows * grid / resize.target
    cells_per_col_pixel = resized_cols / cols * grid / resize.target
    boxes = []
    for image in slices:
        row0, col0, row1, col1 = body_box(np.asarray(image))
        boxes.append([col0 * cells_per_col_pixel, row0 * cells_per_row_pixel,
                      col1 * cells_per_col_pixel, row1 * cells_per_row_pixel])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def cell_positions(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[n, H, W, 2] body coordinates (x, y) of every cell centre: -1..1 across each slice's box (beyond it outside)."""
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    x = 2 * (xs[None] - x0) / (x1 - x0).clamp(min=1e-3) - 1  # [n, W]
    y = 2 * (ys[None] - y0) / (y1 - y0).clamp(min=1e-3) - 1  # [n, H]
    return torch.stack([x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)], dim=-1)


def to_body_frame(maps: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[n, C, H, W] maps on the embedding grid -> [n, C, size, size] resampled over each slice's body box."""
    height, width = maps.shape[-2:]
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # 0..1 across the box
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    # cell units -> grid_sample's -1..1 over the grid's edges (align_corners=False)
    x = (x0 + centres[None] * (x1 - x0)) / width * 2 - 1  # [n, size]
    y = (y0 + centres[None] * (y1 - y0)) / height * 2 - 1
    sample_at = torch.stack([x[:, None, :].expand(-1, size, -1), y[:, :, None].expand(-1, -1, size)], dim=-1)
    return F.grid_sample(maps.float(), sample_at, mode="bilinear", padding_mode="zeros", align_corners=False)


def from_body_frame(maps: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, F, F] maps over the body box -> [n, C, H, W] on each slice's embedding grid (0 outside the box)."""
    positions = cell_positions(boxes, height, width)  # body -1..1 is grid_sample's -1..1 over the map's edges
    expanded = maps.float()[None].expand(boxes.shape[0], -1, -1, -1)
    return F.grid_sample(expanded, positions, mode="bilinear", padding_mode="zeros", align_corners=False)
