"""Reading scans and label maps, and writing segmentations, without losing their patient-space geometry.

Images go through SimpleITK (NRRD, NIfTI, MHA/MHD, DICOM series folders); Slicer segmentations (.seg.nrrd) through
slicerio, so that segment names, colours and label values survive the round trip to 3D Slicer. Every problem with a
user's file is raised as FewShotSAMError naming that file. Writers are atomic: they write a hidden temporary file in
the destination folder and rename it into place, so an interrupted run never leaves a half-written segmentation.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic_write import write_atomically
from .errors import FewShotSAMError
from .volume import Geometry, LabelVolume, Segment, Volume

SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")
VOLUME_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")

# Fixed, clearly distinct colours for label maps that carry no segment colours; chosen by label value, so that a
# value keeps its colour across files.
LABEL_PALETTE = (
    (0.90, 0.10, 0.10),  # red
    (0.10, 0.55, 0.90),  # blue
    (0.20, 0.75, 0.25),  # green
    (0.95, 0.80, 0.10),  # yellow
    (0.60, 0.30, 0.80),  # purple
    (0.95, 0.50, 0.10),  # orange
    (0.10, 0.80, 0.80),  # cyan
    (0.90, 0.40, 0.70),  # pink
    (0.55, 0.35, 0.20),  # brown
    (0.60, 0.85, 0.20),  # lime
    (0.30, 0.30, 0.90),  # indigo
    (0.65, 0.65, 0.65),  # grey
)

DICOM_MODALITY_TAG = "0008|0060"


# --------------------------------------------------------------------------------------------------------------------
# Geometry <-> SimpleITK


def geometry_from_image(image: sitk.Image) -> Geometry:
    """Geometry of a 3D SimpleITK image; shape is the [k, j, i] array shape."""
    size_ijk = image.GetSize()
    return Geometry(
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        # ITK flattens the direction matrix row by row; its columns are the i, j, k axes, as in Geometry.
        direction=np.array(image.GetDirection(), dtype=float).reshape(3, 3),
        shape=tuple(int(v) for v in reversed(size_ijk)),
    )


def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of a [k, j, i] array placed with `geometry`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(v) for v in geometry.spacing])
    image.SetOrigin([float(v) for v in geometry.origin])
    image.SetDirection([float(v) for v in np.asarray(geometry.direction, dtype=float).reshape(9)])
    return image


def geometry_from_ijk_to_lps(ijk_to_lps: np.ndarray, shape: tuple[int, int, int]) -> Geometry:
    """Geometry from a 4x4 voxel-to-LPS matrix (as slicerio returns it) and a [k, j, i] array shape."""
    matrix = np.asarray(ijk_to_lps, dtype=float)
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return Geometry(
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in matrix[:3, 3]),
        direction=axes / spacing,
        shape=tuple(int(v) for v in shape),
    )


def grid_differences(actual: Geometry, expected: Geometry, tolerance: float = 1e-4) -> list[str]:
    """Human-readable list of what differs between two grids ("shape (..) vs (..)", ...); empty when the same.

    Uses the tolerances of Geometry.same_grid, so the two always agree.
    """
    differences = []
    if tuple(actual.shape) != tuple(expected.shape):
        differences.append(f"shape {_fmt(actual.shape)} vs {_fmt(expected.shape)} ([k, j, i])")
    if not np.allclose(actual.spacing, expected.spacing, rtol=tolerance, atol=tolerance):
        differences.append(f"spacing {_fmt(actual.spacing)} vs {_fmt(expected.spacing)} mm")
    if not np.allclose(actual.origin, expected.origin, rtol=tolerance, atol=tolerance * 10):
        differences.append(f"origin {_fmt(actual.origin)} vs {_fmt(expected.origin)} mm")
    if not np.allclose(actual.direction, expected.direction, atol=tolerance):
        differences.append(
            f"direction {_fmt(np.ravel(actual.direction))} vs {_fmt(np.ravel(expected.direction))}"
        )
    return differences


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _grid_of(volume: Volume) -> Geometry:
    # The array is the truth about the shape: a Geometry built by hand may carry the default (0, 0, 0).
    return replace(volume.geometry, shape=tuple(volume.array.shape))


# --------------------------------------------------------------------------------------------------------------------
# Reading images


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D scan: a .nrrd/.nhdr, .nii/.nii.gz or .mha/.mhd file, or a folder holding a DICOM series.

    Spacing, origin and direction are kept exactly as SimpleITK reads them (LPS). In a folder with several DICOM
    series the one with the most files is read.

    modality is decided by this rule, in order:
      1. DICOM Modality tag (0008,0060) when present: "CT" -> "CT", "MR" -> "MR", anything else -> "unknown";
      2. intensities that look like Hounsfield units (min <= -500, max >= 300 and whole-numbered values) -> "CT";
      3. otherwise "unknown": non-CT data cannot be told apart reliably (MR, PET, pre-normalised data), and every
         non-CT modality is normalised the same way (robust percentiles), so guessing "MR" would add nothing.
    """
    path = _existing_path(path, "image")
    if path.is_dir():
        image, dicom_modality = _read_dicom_series(path)
    else:
        image, dicom_modality = _read_image_file(path, "image")
    image = _require_3d_scalar(image, path, "image", is_dicom=dicom_modality is not None)
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise FewShotSAMError(f"image {path} has {bad} NaN or infinite voxels; fix or replace them first")
    return Volume(array=array, geometry=geometry_from_image(image), modality=guess_modality(array, dicom_modality))


def guess_modality(array: np.ndarray, dicom_modality: str | None = None) -> str:
    """"CT", "MR" or "unknown", by the rule documented in read_volume."""
    if dicom_modality:
        tag = dicom_modality.strip().upper()
        return tag if tag in ("CT", "MR") else "unknown"
    return "CT" if looks_like_hounsfield_units(array) else "unknown"


def looks_like_hounsfield_units(array: np.ndarray) -> bool:
    """True when intensities span air to dense tissue (min <= -500, max >= 300) in whole numbers, as CT does."""
    if array.size == 0:
        return False
    if float(array.min()) > -500 or float(array.max()) < 300:
        return False
    if np.issubdtype(array.dtype, np.integer):
        return True
    # Float storage of CT keeps whole HU numbers; interpolated or normalised data does not. A strided sample of about
    # a million voxels decides this without a full-volume temporary.
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    return bool(np.all(np.abs(sample - np.round(sample)) < 1e-3))


def _existing_path(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FewShotSAMError(f"{what} {path} not found")
    return path


def _short_itk_reason(error: Exception) -> str:
    # SimpleITK errors are several lines with source locations; the last non-empty line says what went wrong.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    for marker in ("sitk::ERROR:", "ITK ERROR:"):
        if marker in reason:
            reason = reason.split(marker, 1)[1].strip()
    return reason[:200]


def _read_image_file(path: Path, what: str) -> tuple[sitk.Image, str | None]:
    """Image and its DICOM Modality tag (None when the file is not DICOM or has no such tag)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        modality = reader.GetMetaData(DICOM_MODALITY_TAG) if reader.HasMetaDataKey(DICOM_MODALITY_TAG) else None
        image = reader.Execute()
    except RuntimeError as error:
        raise FewShotSAMError(
            f"cannot read {what} {path}: not a readable NRRD, NIfTI, MHA/MHD or DICOM image "
            f"({_short_itk_reason(error)})"
        ) from None
    return image, modality


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, str | None]:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise FewShotSAMError(f"image folder {folder} holds no DICOM series")
    # Several series in one folder (scouts, reformats): the main scan is nearly always the one with most slices.
    file_lists = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    files = max(file_lists, key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
        _, modality = _read_image_file(Path(files[0]), "DICOM file")
    except (RuntimeError, FewShotSAMError) as error:
        raise FewShotSAMError(f"cannot read the DICOM series in {folder}: {_short_itk_reason(error)}") from None
    return image, (modality or "")  # "" marks DICOM without a Modality tag


def _require_3d_scalar(image: sitk.Image, path: Path, what: str, is_dicom: bool = False) -> sitk.Image:
    """The image as 3D scalar, or a FewShotSAMError saying why it is not one."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise FewShotSAMError(
            f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            f"image); a single-channel scan is needed"
        )
    dimension = image.GetDimension()
    size = image.GetSize()
    if dimension == 4 and size[3] == 1:
        # A trailing time axis of length one (common in NIfTI converters) is still a 3D scan.
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
        dimension, size = 3, image.GetSize()
    if dimension > 3:
        raise FewShotSAMError(
            f"{what} {path} is {dimension}D (size {size}); extract one 3D volume (one time point) first"
        )
    if dimension < 3 or min(size) < 2:
        hint = "; for a DICOM series pass its folder" if is_dicom else ""
        raise FewShotSAMError(f"{what} {path} is a 2D image (size {size}); a 3D scan is needed{hint}")
    return image


# --------------------------------------------------------------------------------------------------------------------
# Reading label maps


def read_labels(
    path: str | os.PathLike, reference: Volume, reference_path: str | os.PathLike | None = None
) -> LabelVolume:
    """Read painted labels for `reference`: a label map file (.nrrd, .nii/.nii.gz, .mha) or a Slicer .seg.nrrd.

    A plain label map must be on the reference's grid; its segments are named "Segment_<value>" with colours from
    LABEL_PALETTE. A .seg.nrrd keeps its segment names, colours and label values; one cropped to a box of the
    reference grid (as Slicer saves them) is placed back on the full grid. Segments stored in overlapping layers are
    merged into one label map when they do not overlap, and refused when they do (a voxel can hold only one label).
    reference_path only makes error messages name the image file.
    The returned LabelVolume always carries the reference's geometry.
    """
    path = _existing_path(path, "labels")
    reference_name = f"image {reference_path}" if reference_path else "the image"
    if path.is_dir():
        raise FewShotSAMError(f"labels {path} is a folder; give a label map or .seg.nrrd file")
    if _has_suffix(path, ".seg.nrrd"):
        array, segments = _read_slicer_segmentation(path, _grid_of(reference), reference_name)
    else:
        image, _ = _read_image_file(path, "labels")
        image = _require_3d_scalar(image, path, "labels")
        differences = grid_differences(geometry_from_image(image), _grid_of(reference))
        if differences:
            raise FewShotSAMError(
                f"labels {path} are not on the grid of {reference_name}: {'; '.join(differences)}"
            )
        array = _as_label_array(sitk.GetArrayFromImage(image), path)
        segments = default_segments(array)
    return LabelVolume(array=array, geometry=_grid_of(reference), segments=segments)


def default_segments(array: np.ndarray) -> list[Segment]:
    """One segment per non-zero value, named "Segment_<value>", coloured from LABEL_PALETTE."""
    return [Segment(f"Segment_{value}", value, palette_color(value)) for value in _label_values(array)]


def palette_color(label_value: int) -> tuple[float, float, float]:
    return LABEL_PALETTE[(int(label_value) - 1) % len(LABEL_PALETTE)]


def _label_values(array: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(array) if v != 0]


def _as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Labels as the smallest unsigned integer type; whole-numbered floats (CHAOS stores float64 labels) are cast."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise FewShotSAMError(f"labels {path} contain NaN or infinite values; labels must be whole numbers")
        fractional = np.abs(array - np.round(array)) > 1e-3
        if np.any(fractional):
            example = float(array[fractional].flat[0])
            raise FewShotSAMError(
                f"labels {path} are not whole numbers (found {example:g}); give a label map, not a probability map"
            )
        array = np.round(array)
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise FewShotSAMError(f"labels {path} have voxel type {array.dtype}; labels must be whole numbers")
    if array.size and array.min() < 0:
        raise FewShotSAMError(f"labels {path} hold negative values ({array.min():g}); labels must be >= 0")
    maximum = int(array.max()) if array.size else 0
    return array.astype(smallest_label_dtype(maximum), copy=False)


def smallest_label_dtype(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise FewShotSAMError(f"label value {max_value} is too large")


def _read_slicer_segmentation(path: Path, reference: Geometry, reference_name: str):
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # slicerio raises IOError, KeyError, ValueError... for damaged headers
        raise FewShotSAMError(f"cannot read Slicer segmentation {path}: {error}") from None
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim not in (3, 4):
        raise FewShotSAMError(f"Slicer segmentation {path} is {voxels.ndim}D; expected 3D or 4D (layers)")
    # slicerio returns voxels indexed [i, j, k] (or [layer, i, j, k]); our arrays are [k, j, i].
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels
    layers = _as_label_array(np.ascontiguousarray(layers.transpose(0, 3, 2, 1)), path)
    array, segments = _merge_layers(layers, segmentation.get("segments", []), path)
    own_geometry = geometry_from_ijk_to_lps(segmentation["ijkToLPS"], array.shape)
    array = _place_on_grid(array, own_geometry, reference, path, reference_name)
    return array, segments


def _merge_layers(layers: np.ndarray, segment_infos: list[dict], path: Path) -> tuple[np.ndarray, list[Segment]]:
    """One label map and its segments from slicerio's layers [layer, k, j, i] and segment dicts."""
    if not segment_infos:
        # A plain labelmap saved as .seg.nrrd without segment metadata.
        if layers.shape[0] > 1:
            raise FewShotSAMError(f"Slicer segmentation {path} has {layers.shape[0]} layers but no segment list")
        return layers[0], default_segments(layers[0])

    def segment_from_info(info: dict, label_value: int) -> Segment:
        name = str(info.get("name") or info.get("id") or f"Segment_{label_value}")
        color = tuple(float(c) for c in info["color"]) if info.get("color") else palette_color(label_value)
        return Segment(name, label_value, color)

    if layers.shape[0] == 1:
        # One layer: the array already is the label map. Values with no segment entry still get a segment.
        array = layers[0]
        segments = [segment_from_info(info, int(info.get("labelValue", 1))) for info in segment_infos]
        listed = {s.label_value for s in segments}
        segments += [s for s in default_segments(array) if s.label_value not in listed]
        return array, segments

    # Several layers: Slicer uses them for segments that overlap. Merge when no voxel is claimed twice.
    values = [int(info.get("labelValue", 1)) for info in segment_infos]
    keep_values = len(set(values)) == len(values)  # otherwise renumber 1..N in segment order
    merged = np.zeros(layers.shape[1:], dtype=smallest_label_dtype(max(max(values), len(values))))
    owner_name = {}
    segments = []
    for index, info in enumerate(segment_infos):
        layer = int(info.get("layer", 0))
        if not 0 <= layer < layers.shape[0]:
            raise FewShotSAMError(f"Slicer segmentation {path}: segment {info.get('name')} names missing layer {layer}")
        new_value = values[index] if keep_values else index + 1
        segment = segment_from_info(info, new_value)
        mask = layers[layer] == values[index]
        clash = merged[mask]
        if np.any(clash):
            other = owner_name[int(clash[clash != 0][0])]
            raise FewShotSAMError(
                f"Slicer segmentation {path}: segments '{other}' and '{segment.name}' overlap in "
                f"{int(np.count_nonzero(clash))} voxels; FewShotSAM needs one label per voxel, so remove the overlap "
                f"in Slicer (Segment Editor, Logical operators) and save again"
            )
        merged[mask] = new_value
        owner_name[new_value] = segment.name
        segments.append(segment)
    return merged, segments


def _place_on_grid(array: np.ndarray, own: Geometry, reference: Geometry, path: Path, reference_name: str):
    """Put a label array that covers an axis-aligned box of the reference grid onto the full reference grid."""
    if own.same_grid(reference):
        return array
    axis_differences = [d for d in grid_differences(own, reference) if d.startswith(("spacing", "direction"))]
    if axis_differences:
        raise FewShotSAMError(
            f"labels {path} are not on the grid of {reference_name}: {'; '.join(axis_differences)}"
        )
    # Voxel offset (i, j, k) of the labels' first voxel in the reference grid; must be whole voxels.
    reference_axes = np.asarray(reference.direction, dtype=float) @ np.diag(reference.spacing)
    offset_ijk = np.linalg.solve(reference_axes, np.subtract(own.origin, reference.origin))
    if not np.allclose(offset_ijk, np.round(offset_ijk), atol=1e-3):
        raise FewShotSAMError(
            f"labels {path} are not on the grid of {reference_name}: origin {_fmt(own.origin)} is shifted by "
            f"{_fmt(offset_ijk)} voxels, not a whole number"
        )
    start = np.round(offset_ijk[::-1]).astype(int)  # [k, j, i]
    stop = start + np.array(array.shape)
    inside_start = np.maximum(start, 0)
    inside_stop = np.minimum(stop, reference.shape)
    if np.any(inside_stop <= inside_start):
        raise FewShotSAMError(f"labels {path} lie entirely outside {reference_name}")
    source = tuple(slice(a - s, b - s) for a, b, s in zip(inside_start, inside_stop, start))
    target = tuple(slice(a, b) for a, b in zip(inside_start, inside_stop))
    if np.count_nonzero(array[source]) != np.count_nonzero(array):
        raise FewShotSAMError(f"labels {path} extend beyond {reference_name} (labelled voxels outside its extent)")
    placed = np.zeros(tuple(reference.shape), dtype=array.dtype)
    placed[target] = array[source]
    return placed


# --------------------------------------------------------------------------------------------------------------------
# Writing


def check_output_path(
    path: str | os.PathLike, overwrite: bool = False, suffixes: tuple[str, ...] = SEGMENTATION_SUFFIXES
) -> Path:
    """Raise FewShotSAMError now if `path` cannot be written later; call before long work starts.

    Checks the file type, that an existing file is only replaced with overwrite=True, and that the folder exists and
    accepts a new file (by creating and removing a probe: permission bits alone say nothing for root or ACLs).
    """
    path = Path(path)
    if _matching_suffix(path, suffixes) is None:
        raise FewShotSAMError(f"cannot write {path}: unknown file type; use a name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise FewShotSAMError(f"cannot write {path}: it is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FewShotSAMError(f"{path} exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise FewShotSAMError(f"cannot write {path}: folder {folder} does not exist")
    probe = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.probe"
    try:
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise FewShotSAMError(f"cannot write {path}: folder {folder} is not writable ({error.strerror})") from None
    return path


def write_segmentation(path: str | os.PathLike, labels: LabelVolume, overwrite: bool = False) -> Path:
    """Write labels by file type: .seg.nrrd (Slicer segmentation with names, colours and label values), or a plain
    label map .nrrd, .nii/.nii.gz, .mha. The geometry is labels.geometry. Atomic; returns the path written."""
    path = check_output_path(path, overwrite, SEGMENTATION_SUFFIXES)
    array = np.asarray(labels.array)
    if array.size and np.issubdtype(array.dtype, np.integer) and array.min() < 0:
        raise FewShotSAMError(f"cannot write {path}: label values must be >= 0")
    array = array.astype(smallest_label_dtype(int(array.max()) if array.size else 0), copy=False)
    geometry = replace(labels.geometry, shape=tuple(array.shape))
    if _has_suffix(path, ".seg.nrrd"):
        segments = _segments_to_write(array, labels.segments, path)
        _atomic_write(path, overwrite, lambda temporary: _write_seg_nrrd(temporary, array, geometry, segments))
    else:
        image = image_from_array(array, geometry)
        _atomic_write(path, overwrite, lambda temporary: sitk.WriteImage(image, str(temporary), True))
    return path


def write_volume(path: str | os.PathLike, volume: Volume, overwrite: bool = False) -> Path:
    """Write an image as .nrrd, .nii/.nii.gz or .mha with its geometry and voxel type. Atomic."""
    path = check_output_path(path, overwrite, VOLUME_SUFFIXES)
    if _has_suffix(path, ".seg.nrrd"):
        raise FewShotSAMError(f"cannot write {path}: .seg.nrrd is for segmentations; use write_segmentation")
    image = image_from_array(volume.array, volume.geometry)
    _atomic_write(path, overwrite, lambda temporary: sitk.WriteImage(image, str(temporary), True))
    return path


def _segments_to_write(array: np.ndarray, segments: list[Segment], path: Path) -> list[Segment]:
    """The segments, plus a default one for any value in the array that has none, so no label is lost."""
    for segment in segments:
        if segment.label_value <= 0:
            raise FewShotSAMError(f"cannot write {path}: segment '{segment.name}' has label value "
                                  f"{segment.label_value}; 0 is background and values must be positive")
    listed = {segment.label_value for segment in segments}
    return list(segments) + [s for s in default_segments(array) if s.label_value not in listed]


def _write_seg_nrrd(temporary: Path, array: np.ndarray, geometry: Geometry, segments: list[Segment]) -> None:
    import slicerio

    segmentation = {
        # slicerio (pynrrd, Fortran order) expects voxels indexed [i, j, k].
        "voxels": array.transpose(2, 1, 0),
        "ijkToLPS": geometry.ijk_to_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [
            {
                "id": f"Segment_{segment.label_value}",
                # A line break would end the NRRD header field.
                "name": " ".join(str(segment.name).splitlines()),
                "color": [float(c) for c in segment.color],
                "labelValue": int(segment.label_value),
                "layer": 0,
            }
            for segment in segments
        ],
    }
    slicerio.write_segmentation(str(temporary), segmentation)


def _atomic_write(path: Path, overwrite: bool, write_to) -> None:
    """write_atomically with a temporary name ending in the real suffix (SimpleITK and pynrrd choose the format by
    file name), and the writers' failures as one-line errors naming the file."""
    try:
        write_atomically(path, write_to, overwrite, _matching_suffix(path, SEGMENTATION_SUFFIXES + VOLUME_SUFFIXES))
    except FileExistsError:  # appeared while we were writing
        raise FewShotSAMError(f"{path} exists; pass --overwrite to replace it") from None
    except (OSError, RuntimeError, ValueError) as error:
        reason = _short_itk_reason(error) if isinstance(error, RuntimeError) else str(error)
        raise FewShotSAMError(f"cannot write {path}: {reason}") from None


def _has_suffix(path: Path, suffix: str) -> bool:
    return path.name.lower().endswith(suffix)


def _matching_suffix(path: Path, suffixes: tuple[str, ...]) -> str | None:
    # Longest first, so that ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
    for suffix in sorted(suffixes, key=len, reverse=True):
        if _has_suffix(path, suffix):
            return suffix
    return None
