"""Reading scans and label maps, and writing segmentations, without losing their patient-space geometry.

Images go through SimpleITK (NRRD, NIfTI, MHA/MHD, DICOM series folders); Slicer segmentations (.seg.nrrd) through
slicerio, so that segment names, colours and label values survive the round trip to 3D Slicer. Every problem with a
user's file is raised as FewShotSAMError naming that file. Writers are atomic: they write a hidden temporary file in
the destination folder and rename it into place, so an interrupted run never leaves a half-written segmentation.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
import uuid
import zlib
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
# Structures per label map: class maps are uint8 with 0 for background and 255 for "ignore" (fewshot.IGNORE).
MAX_STRUCTURES = 254


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
    if array.size and array.min() == array.max():
        raise FewShotSAMError(f"image {path} is blank (every voxel is {array.flat[0]:g}): there is nothing to segment")
    return Volume(array=array, geometry=geometry_from_image(image), modality=guess_modality(array, dicom_modality))


def guess_modality(array: np.ndarray, dicom_modality: str | None = None) -> str:
    """"CT", "MR" or "unknown", by the rule documented in read_volume."""
    if dicom_modality:
        tag = dicom_modality.strip().upper()
        return tag if tag in ("CT", "MR") else "unknown"
    return "CT" if looks_like_hounsfield_units(array) else "unknown"


# Share of the voxels that must lie at air (<= -500 HU) and at dense tissue (>= 300 HU) for a scan to count as CT: a
# few stray voxels (one -1000 in an MR scan) must not turn a scan into CT, but any CT of a body has far more air
# (outside the body, lungs, bowel gas) and bone or contrast than this.
MIN_AIR_SHARE = 1e-3
MIN_DENSE_SHARE = 1e-4


def looks_like_hounsfield_units(array: np.ndarray) -> bool:
    """True when a real share of the voxels lies at air and at dense tissue (MIN_AIR_SHARE <= -500 HU,
    MIN_DENSE_SHARE >= 300 HU), in whole numbers, as CT does."""
    if array.size == 0:
        return False
    # A strided sample of about a million voxels decides this without a full-volume temporary.
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    if np.count_nonzero(sample <= -500) < MIN_AIR_SHARE * sample.size:
        return False
    if np.count_nonzero(sample >= 300) < MIN_DENSE_SHARE * sample.size:
        return False
    if np.issubdtype(array.dtype, np.integer):
        return True
    # Float storage of CT keeps whole HU numbers; interpolated or normalised data does not.
    return bool(np.all(np.abs(sample - np.round(sample)) < 1e-3))


def _existing_path(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FewShotSAMError(f"{what} {path} not found")
    return path


@contextlib.contextmanager
def _itk_warnings_silenced(messages: list[str] | None = None):
    """Keep ITK/GDCM WARNING lines, and what MetaIO, NIfTI and GDCM print straight to the C stderr, off the
    terminal: every problem they describe is checked here and reported as one FewShotSAMError (a missing DICOM
    slice, a truncated file), so they would only add noise before it. What was printed is appended to `messages`.
    """
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with _c_stderr_captured(messages if messages is not None else []):
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@contextlib.contextmanager
def _c_stderr_captured(messages: list[str]):
    """Send file descriptor 2 to a temporary file while the block runs (C libraries write there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable descriptor 2 (some embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            messages.extend(line.strip() for line in text.splitlines() if line.strip())


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
    printed: list[str] = []
    try:
        with _itk_warnings_silenced(printed):
            reader.ReadImageInformation()
            modality = reader.GetMetaData(DICOM_MODALITY_TAG) if reader.HasMetaDataKey(DICOM_MODALITY_TAG) else None
            if _matching_suffix(path, (".nii", ".nii.gz")):
                # SimpleITK pads a truncated NIfTI with zeros and reads NaN as 0; the file itself must be checked.
                problem = nifti_problem(path)
                if problem:
                    raise FewShotSAMError(f"cannot read {what} {path}: {problem}")
            image = reader.Execute()
    except (RuntimeError, MemoryError) as error:
        # MetaIO explains a short file only on stderr; its exception then carries a stale errno text.
        reason = "; ".join(printed[-2:])[:200] if printed else _short_itk_reason(error)
        raise FewShotSAMError(
            f"cannot read {what} {path}: not a readable NRRD, NIfTI, MHA/MHD or DICOM image ({reason})"
        ) from None
    return image, modality


# NIfTI-1 and NIfTI-2 header fields: (header size, dim offset and format, datatype offset, bitpix offset,
# vox_offset offset and format).
_NIFTI_LAYOUTS = {348: (40, "8h", 70, 72, 108, "f"), 540: (16, "8q", 12, 14, 168, "q")}
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # DT_FLOAT32, DT_FLOAT64
_CHUNK = 1 << 22


def nifti_problem(path: Path) -> str | None:
    """What is wrong with a single-file NIfTI (.nii or .nii.gz), or None: a gzip stream that is cut short or damaged,
    fewer voxel bytes than the header promises, or NaN/infinite voxels in float data.

    Reads the file once in chunks (no full-size copy). A file whose header this does not recognise is left to the
    image reader to judge, once its gzip stream is known to be whole.
    """
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            chunks = _gunzipped_chunks(raw) if compressed else iter(lambda: raw.read(_CHUNK), b"")
            head = b""
            for chunk in chunks:  # the header may span several chunks of a gzip stream
                head += chunk
                if len(head) >= 544:
                    break
            header = _nifti_header(head)
            scanner = _NonFiniteCounter(*header) if header is not None and header[2] is not None else None
            total = 0
            for chunk in _chain(head, chunks):
                if scanner is not None:
                    scanner.feed(chunk, total)
                total += len(chunk)
    except EOFError:
        return "the file is cut short (its gzip stream ends early); copy or download it again"
    except (OSError, zlib.error) as error:
        return f"its compressed data is damaged ({error}); copy or download it again"
    if header is None:
        return None
    data_start, expected, _ = header
    if total - data_start < expected:
        return (f"the file is cut short: its header promises {expected} bytes of voxels but only "
                f"{max(total - data_start, 0)} are there; copy or download it again")
    if scanner is not None and scanner.count:
        return f"it has {scanner.count} NaN or infinite voxels; fix or replace them first"
    return None


def _chain(first: bytes, rest):
    yield first
    yield from rest


def _gunzipped_chunks(raw):
    """The decompressed bytes of a gzip file (all its members) in chunks; EOFError when the stream stops early.

    zlib checks each member's CRC-32 and length, so damaged data raises zlib.error."""
    decompressor = zlib.decompressobj(wbits=31)
    while True:
        data = raw.read(1 << 16)  # small reads: a run of zeros inflates a thousandfold
        if not data:
            if not decompressor.eof:
                raise EOFError("gzip stream ends early")
            return
        while data:
            yield decompressor.decompress(data)
            if not decompressor.eof:
                break
            data = decompressor.unused_data  # a further gzip member, or padding after the last one
            if not data.strip(b"\x00"):
                break
            decompressor = zlib.decompressobj(wbits=31)


def _nifti_header(head: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(first voxel byte, voxel bytes expected, float dtype or None) from a NIfTI-1/2 header; None if not one."""
    for endian in ("<", ">"):
        if len(head) < 4:
            return None
        size = struct.unpack_from(endian + "i", head, 0)[0]
        if size in _NIFTI_LAYOUTS and len(head) >= size:
            dim_at, dim_format, type_at, bitpix_at, offset_at, offset_format = _NIFTI_LAYOUTS[size]
            dims = struct.unpack_from(endian + dim_format, head, dim_at)
            datatype = struct.unpack_from(endian + "h", head, type_at)[0]
            bitpix = struct.unpack_from(endian + "h", head, bitpix_at)[0]
            vox_offset = int(struct.unpack_from(endian + offset_format, head, offset_at)[0])
            n_dims = int(dims[0])
            if not 1 <= n_dims <= 7 or bitpix <= 0 or any(int(d) < 0 for d in dims[1:n_dims + 1]):
                return None
            n_voxels = 1
            for d in dims[1:n_dims + 1]:
                n_voxels *= int(d)
            float_type = _NIFTI_FLOAT_TYPES.get(datatype)
            return (max(vox_offset, size), n_voxels * bitpix // 8,
                    np.dtype(endian + float_type) if float_type else None)
    return None


class _NonFiniteCounter:
    """Counts NaN and infinite values among the voxel bytes of a file fed to it chunk by chunk."""

    def __init__(self, data_start: int, n_bytes: int, dtype: np.dtype):
        self.data_start, self.data_end, self.dtype = data_start, data_start + n_bytes, dtype
        self.pending = b""
        self.count = 0

    def feed(self, chunk: bytes, position: int) -> None:
        """`chunk` holds the file's bytes from `position` on."""
        first = max(self.data_start - position, 0)
        last = min(self.data_end - position, len(chunk))
        if last <= first:
            return
        data = self.pending + chunk[first:last]
        whole = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data[:whole], dtype=self.dtype)
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.pending = data[whole:]


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, str | None]:
    with _itk_warnings_silenced():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not series_ids:
            raise FewShotSAMError(f"image folder {folder} holds no DICOM series")
        # Several series in one folder (scouts, reformats): the main scan is nearly always the one with most slices.
        file_lists = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    _refuse_unreadable_dicom_files(folder, file_lists)
    files = max(file_lists, key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _itk_warnings_silenced():
            image = reader.Execute()
        _, modality = _read_image_file(Path(files[0]), "DICOM file")
    except (RuntimeError, FewShotSAMError) as error:
        raise FewShotSAMError(f"cannot read the DICOM series in {folder}: {_short_itk_reason(error)}") from None
    _refuse_uneven_slices(folder, files)
    return image, (modality or "")  # "" marks DICOM without a Modality tag


def _refuse_unreadable_dicom_files(folder: Path, file_lists: list[tuple[str, ...]]) -> None:
    """A file that says it is DICOM (the "DICM" mark at byte 128) but is in no series is damaged: reading the
    series without it would silently drop a slice and stretch the spacing, so refuse and name the file."""
    in_a_series = {os.path.normcase(os.path.abspath(name)) for files in file_lists for name in files}
    for candidate in sorted(folder.iterdir()):
        listed = os.path.normcase(os.path.abspath(candidate)) in in_a_series
        if listed or not candidate.is_file() or candidate.name.upper() == "DICOMDIR":
            continue
        try:
            with open(candidate, "rb") as handle:
                marked = handle.read(132)[128:132] == b"DICM"
        except OSError:
            marked = False
        if marked or candidate.suffix.lower() in (".dcm", ".dicom"):
            raise FewShotSAMError(f"cannot read the DICOM series in {folder}: file {candidate.name} is damaged or "
                                  f"not readable DICOM, so a slice would be missing; replace or remove it")


def _refuse_uneven_slices(folder: Path, files: tuple[str, ...]) -> None:
    """Slices must be evenly spaced along their normal: a gap means a missing file and a wrong slice spacing."""
    if len(files) < 3:
        return
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            with _itk_warnings_silenced():
                reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(cosines[:3], cosines[3:6])
        except (RuntimeError, ValueError, IndexError):
            return  # no usable position tags: nothing to check against
        positions.append(float(np.dot(position, normal)))
    steps = np.diff(np.sort(positions))
    typical = float(np.median(steps))
    if typical > 0 and np.max(np.abs(steps - typical)) > 0.1 * typical:
        raise FewShotSAMError(f"cannot read the DICOM series in {folder}: its slices are not evenly spaced (gaps "
                              f"from {steps.min():.3g} to {steps.max():.3g} mm); a slice file is probably missing")


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
    if len(segments) > MAX_STRUCTURES:
        raise FewShotSAMError(f"labels {path} hold {len(segments)} different label values; at most {MAX_STRUCTURES} "
                              f"structures are supported (is this an image rather than a label map?)")
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
        reason = " ".join(str(error).split())[:200] or type(error).__name__  # pynrrd quotes whole header lines
        raise FewShotSAMError(f"cannot read Slicer segmentation {path}: {reason}") from None
    _restore_non_ascii_names(path, segmentation.get("segments", []))
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


def _restore_non_ascii_names(path: Path, segments: list[dict]) -> None:
    """pynrrd decodes headers as ASCII and drops other characters ("Niere ü" -> "Niere "); Slicer writes segment
    names as UTF-8. Take each segment's name from the raw header bytes instead."""
    raw_names = _raw_header_fields(path, "_Name")
    raw_ids = _raw_header_fields(path, "_ID")
    by_id = {raw_ids[key]: name for key, name in raw_names.items() if key in raw_ids}
    for segment in segments:
        if segment.get("id") in by_id:
            segment["name"] = by_id[segment["id"]]


def _raw_header_fields(path: Path, ending: str) -> dict[str, str]:
    """{"SegmentN": value} of the "SegmentN<ending>:=value" lines of a NRRD header, decoded as UTF-8."""
    fields = {}
    try:
        with open(path, "rb") as handle:
            header = handle.read(1 << 20).split(b"\n\n", 1)[0]
    except OSError:
        return fields
    for line in header.splitlines():
        key, separator, value = line.partition(b":=")
        if separator and key.startswith(b"Segment") and key.endswith(ending.encode()):
            fields[key[: -len(ending)].decode("ascii", "replace")] = value.decode("utf-8", "replace").strip()
    return fields


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
    if folder.exists() and not folder.is_dir():
        raise FewShotSAMError(f"cannot write {path}: {folder} is a file, not a folder")
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
                # pynrrd writes ASCII only: a placeholder here, the UTF-8 name (as Slicer writes it) put back below.
                "name": f"@fewshotsam-name-{number}@",
                "color": [float(c) for c in segment.color],
                "labelValue": int(segment.label_value),
                "layer": 0,
            }
            for number, segment in enumerate(segments)
        ],
    }
    slicerio.write_segmentation(str(temporary), segmentation)
    _put_names_in_header(temporary, segments)


def _put_names_in_header(path: Path, segments: list[Segment]) -> None:
    """Replace the name placeholders in the header of a .seg.nrrd just written with the names in UTF-8."""
    content = path.read_bytes()
    header, separator, data = content.partition(b"\n\n")
    for number, segment in enumerate(segments):
        # A line break would end the NRRD header field.
        name = " ".join(str(segment.name).splitlines())
        header = header.replace(f"@fewshotsam-name-{number}@".encode(), name.encode("utf-8"), 1)
    path.write_bytes(header + separator + data)


def _atomic_write(path: Path, overwrite: bool, write_to) -> None:
    """write_atomically with a temporary name ending in the real suffix (SimpleITK and pynrrd choose the format by
    file name), and the writers' failures as one-line errors naming the file."""
    suffix = _matching_suffix(path, SEGMENTATION_SUFFIXES + VOLUME_SUFFIXES) or path.suffix
    try:
        write_atomically(path, lambda temporary: _write_and_verify(write_to, temporary, suffix), overwrite, suffix)
    except FileExistsError:  # appeared while we were writing
        raise FewShotSAMError(f"{path} exists; pass --overwrite to replace it") from None
    except (OSError, RuntimeError, ValueError) as error:
        reason = _short_itk_reason(error) if isinstance(error, RuntimeError) else str(error)
        raise FewShotSAMError(f"cannot write {path}: {reason}") from None


def _write_and_verify(write_to, temporary: Path, suffix: str) -> None:
    with _itk_warnings_silenced():  # the NIfTI writer prints its own ERROR lines; the check below reports them
        write_to(temporary)
    _verify_written(temporary, suffix)


def _verify_written(temporary: Path, suffix: str) -> None:
    """SimpleITK's NIfTI writer reports success when the disk fills up mid-write (the .nrrd and .mha writers raise):
    read the file back through its whole gzip stream and check the voxel bytes are all there."""
    if suffix in (".nii", ".nii.gz"):
        problem = nifti_problem(temporary)
        if problem:
            raise OSError(f"the written file is incomplete (is the disk full?): {problem.split(';')[0]}")


def _has_suffix(path: Path, suffix: str) -> bool:
    return path.name.lower().endswith(suffix)


def _matching_suffix(path: Path, suffixes: tuple[str, ...]) -> str | None:
    # Longest first, so that ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
    for suffix in sorted(suffixes, key=len, reverse=True):
        if _has_suffix(path, suffix):
            return suffix
    return None
