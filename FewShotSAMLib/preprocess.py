"""Intensity normalisation of whole volumes, and SAM-style resizing of slices to the model's square input and back.

Normalisation is computed once for the whole volume (never per slice), so that a structure has the same brightness on
every slice: the propagation compares slices, and per-slice contrast stretching would make them disagree.

Resizing follows Segment Anything's ResizeLongestSide: scale so that the longest side equals the model's input size,
then pad bottom/right with zeros to a square. The inverse crops the padding and scales back, so model masks land on
the original pixels. Non-square pixels are handled in the same single resize: the scale factors of rows and columns
are chosen so that the resized slice has square pixels (its physical aspect ratio is kept), and the inverse uses the
same shapes, so it is exact in geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FewShotSAMError
from .volume import Volume

# CT windows as (level, width) in Hounsfield units.
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_CT_PRESET = "soft-tissue"

# Robust range for everything that is not CT: these percentiles of the non-background voxels map to 0 and 1.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# Voxels within this fraction of the intensity range above the minimum count as background (the "zero" around MR
# anatomy) and are left out of the percentiles, so that a large empty field of view does not set the range.
BACKGROUND_FRACTION = 1e-3
BACKGROUND_TOP_PERCENTILE = 99.9  # "the top of the intensity range" for that cut-off, robust to stray voxels
# Percentiles on more voxels than this use an evenly strided, deterministic sample: same result every run (needed
# for the embedding cache key), far faster on large volumes, and accurate to well below one grey level.
PERCENTILE_SAMPLE_SIZE = 4_000_000


@dataclass(frozen=True)
class Normalisation:
    """How intensities are mapped to [0, 1]: values `low` -> 0 and `high` -> 1, clipped outside."""

    method: str  # "window" (CT level/width) or "percentile"
    low: float
    high: float
    name: str = ""  # preset name, "custom", or the percentile pair

    def key(self) -> str:
        """Stable text that changes whenever the normalised pixels would; part of the embedding cache key."""
        return f"{self.method}:{self.name}:{self.low:.6g}:{self.high:.6g}"


def choose_normalisation(
    volume: Volume, window: tuple[float, float] | None = None, preset: str | None = None
) -> Normalisation:
    """The normalisation normalize_volume applies.

    window=(level, width) or a preset name from CT_WINDOW_PRESETS is used as given, whatever the modality (the user
    asked for it). Otherwise CT gets the soft-tissue window and every other modality robust percentiles.
    """
    fixed = fixed_window(volume, window, preset)
    if fixed is not None:
        return fixed
    low, high = robust_intensity_range(volume.array)
    return Normalisation("percentile", low, high, f"p{LOW_PERCENTILE:g}-p{HIGH_PERCENTILE:g}")


def fixed_window(volume: Volume, window: tuple[float, float] | None = None,
                 preset: str | None = None) -> Normalisation | None:
    """The window choose_normalisation uses when it needs no statistics of the image (a window, a preset, or CT's
    default), else None; raises on a bad window or preset. Checking the options costs no pass over the voxels."""
    if window is not None and preset is not None:
        raise FewShotSAMError("give either a CT window (level, width) or a preset name, not both")
    if window is not None:
        level, width = (float(v) for v in window)
        if not np.isfinite(level) or not np.isfinite(width) or width <= 0:
            raise FewShotSAMError(f"CT window width must be a positive number (got level {level}, width {width})")
        return Normalisation("window", level - width / 2, level + width / 2, "custom")
    if preset is None and volume.modality == "CT":
        preset = DEFAULT_CT_PRESET
    if preset is None:
        return None
    preset_name = preset.strip().lower().replace("_", "-")
    if preset_name not in CT_WINDOW_PRESETS:
        raise FewShotSAMError(f"unknown CT window preset '{preset}'; use one of {', '.join(CT_WINDOW_PRESETS)}")
    level, width = CT_WINDOW_PRESETS[preset_name]
    return Normalisation("window", level - width / 2, level + width / 2, preset_name)


def robust_intensity_range(array: np.ndarray) -> tuple[float, float]:
    """(LOW_PERCENTILE, HIGH_PERCENTILE) percentiles of the non-background voxels of the whole volume."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0:
        return 0.0, 0.0
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLE_SIZE)].astype(np.float64)
    minimum = float(sample.min())
    # The background cut-off scales with a high percentile, not the maximum: one stray voxel of 1e6 would otherwise
    # put the cut-off above every tissue and normalise the whole scan to zero.
    top = float(np.percentile(sample, BACKGROUND_TOP_PERCENTILE))
    foreground = sample[sample > minimum + BACKGROUND_FRACTION * (top - minimum)]
    if foreground.size == 0:  # constant volume: nothing to stretch
        return minimum, minimum
    low, high = np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return float(low), float(high)


def apply_normalisation(array: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """float32 array in [0, 1]; a zero-width range (constant volume) gives all zeros."""
    span = normalisation.high - normalisation.low
    if span <= 0:
        return np.zeros(np.shape(array), dtype=np.float32)
    # In place on one float32 copy: a 512x512x300 CT is 300 MB per temporary.
    result = np.array(array, dtype=np.float32)
    result -= np.float32(normalisation.low)
    result /= np.float32(span)
    return np.clip(result, 0.0, 1.0, out=result)


def normalize_volume(
    volume: Volume, window: tuple[float, float] | None = None, preset: str | None = None
) -> np.ndarray:
    """The volume's intensities as float32 in [0, 1] ([k, j, i], same shape); see choose_normalisation."""
    return apply_normalisation(volume.array, choose_normalisation(volume, window, preset))


def describe_normalisation(
    volume: Volume, window: tuple[float, float] | None = None, preset: str | None = None
) -> str:
    """Cache-key text for the normalisation normalize_volume would apply to this volume."""
    return choose_normalisation(volume, window, preset).key()


# --------------------------------------------------------------------------------------------------------------------
# Resizing slices to the model input and back


@dataclass(frozen=True)
class ResizeInfo:
    """Shapes needed to undo resize_longest_side."""

    original_shape: tuple[int, int]  # (rows, cols) of the slice
    resized_shape: tuple[int, int]  # (rows, cols) of the image content inside the padded square
    target: int  # side of the padded square


def resized_shape_for(
    original_shape: tuple[int, int], target: int, pixel_spacing: tuple[float, float] | None = None
) -> tuple[int, int]:
    """(rows, cols) that the slice content takes in the target x target square, as SAM computes it.

    With pixel_spacing=(row_mm, col_mm) the slice's physical size replaces its pixel counts, so the result has square
    pixels; for square pixels this is exactly SAM's ResizeLongestSide.get_preprocess_shape.
    """
    rows, cols = int(original_shape[0]), int(original_shape[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"empty slice shape {original_shape}")
    height, width = float(rows), float(cols)
    if pixel_spacing is not None:
        row_mm, col_mm = (float(v) for v in pixel_spacing)
        if row_mm <= 0 or col_mm <= 0:
            raise ValueError(f"pixel spacing must be positive, got {pixel_spacing}")
        if not np.isclose(row_mm, col_mm, rtol=1e-6):
            # Resample to square pixels of the finer spacing, which keeps all detail; the longest-side scale below
            # then applies to that square-pixel image. Both are folded into one resize.
            finest = min(row_mm, col_mm)
            height, width = rows * row_mm / finest, cols * col_mm / finest
    scale = target / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_longest_side(
    slice2d: np.ndarray, target: int, pixel_spacing: tuple[float, float] | None = None
) -> tuple[np.ndarray, ResizeInfo]:
    """A [rows, cols] slice (normalised to [0, 1]) as a target x target x 3 float32 image and how to undo it.

    Bilinear resize so the longest side is `target`, zero padding at the bottom and right, the grey value repeated in
    3 channels. Values stay in [0, 1]: model-specific scaling (SAM's 0-255 pixel mean/std) belongs to the model code.
    """
    slice2d = np.asarray(slice2d)
    if slice2d.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {slice2d.shape}")
    batch, info = resize_stack_longest_side(slice2d[np.newaxis], target, pixel_spacing)
    return np.ascontiguousarray(batch[0].permute(1, 2, 0).cpu().numpy()), info


def resize_stack_longest_side(
    stack: np.ndarray | torch.Tensor,
    target: int,
    pixel_spacing: tuple[float, float] | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, ResizeInfo]:
    """Batched resize_longest_side: [n, rows, cols] slices -> float32 tensor [n, 3, target, target] (channels first,
    as models take batches), on `device` (default: where the input is, CPU for numpy)."""
    if not isinstance(stack, torch.Tensor):
        # One float32 copy; also makes views with negative strides (flipped arrays) acceptable to torch.
        stack = np.ascontiguousarray(stack, dtype=np.float32)
    tensor = torch.as_tensor(stack)
    if tensor.ndim != 3:
        raise ValueError(f"expected a stack [n, rows, cols], got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device=device or tensor.device, dtype=torch.float32)
    original_shape = (int(tensor.shape[1]), int(tensor.shape[2]))
    resized_shape = resized_shape_for(original_shape, target, pixel_spacing)
    images = tensor[:, None]  # [n, 1, rows, cols]
    if resized_shape != original_shape:
        # antialias only matters when shrinking; it keeps thin structures from aliasing as PIL (used by SAM) does.
        shrinking = resized_shape[0] < original_shape[0] or resized_shape[1] < original_shape[1]
        images = F.interpolate(images, size=resized_shape, mode="bilinear", align_corners=False, antialias=shrinking)
    padded = images.new_zeros((images.shape[0], 1, target, target))
    padded[:, :, : resized_shape[0], : resized_shape[1]] = images
    info = ResizeInfo(original_shape=original_shape, resized_shape=resized_shape, target=int(target))
    return padded.expand(-1, 3, -1, -1).contiguous(), info


def mask_logits_to_stack(
    logits: np.ndarray | torch.Tensor, info: ResizeInfo, original_shape: tuple[int, int] | None = None
) -> torch.Tensor:
    """Batched inverse of resize_stack_longest_side for mask logits.

    logits: [n, h, w] or [n, 1, h, w] at the model input size (target x target) or at a lower resolution covering the
    same square (SAM's 256 x 256 for 1024 input). Returns float32 logits [n, rows, cols] on the slices' pixels.
    As SAM's postprocess_masks: upsample to the padded square, crop the padding, resize to the slice (all bilinear,
    on logits, so thresholding at 0 happens after interpolation).
    """
    original_shape = tuple(original_shape or info.original_shape)
    tensor = torch.as_tensor(logits).to(dtype=torch.float32)
    if tensor.ndim == 4:
        if tensor.shape[1] != 1:
            raise ValueError(f"expected one mask per slice, got shape {tuple(tensor.shape)}")
        tensor = tensor[:, 0]
    if tensor.ndim != 3:
        raise ValueError(f"expected logits [n, h, w], got shape {tuple(tensor.shape)}")
    masks = tensor[:, None]
    if tuple(masks.shape[-2:]) != (info.target, info.target):
        masks = F.interpolate(masks, size=(info.target, info.target), mode="bilinear", align_corners=False)
    masks = masks[:, :, : info.resized_shape[0], : info.resized_shape[1]]
    if tuple(masks.shape[-2:]) != original_shape:
        masks = F.interpolate(masks, size=original_shape, mode="bilinear", align_corners=False)
    return masks[:, 0]


def mask_logits_to_slice(
    logits: np.ndarray | torch.Tensor, info: ResizeInfo, original_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Inverse of resize_longest_side for one mask: [h, w] (or [1, h, w]) logits -> float32 [rows, cols] numpy."""
    tensor = torch.as_tensor(logits)
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"expected logits [h, w], got shape {tuple(tensor.shape)}")
    return mask_logits_to_stack(tensor[None], info, original_shape)[0].cpu().numpy()
