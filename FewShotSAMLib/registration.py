"""Positions of a query scan's cells in the support scan's image frame, through a registration.

The pixel prompts and footprints of an adapter made on one scan hold positions in that scan's model-input square
(the image frame). Another patient lies elsewhere in the image and has another size, so the same position points at
other anatomy. An adapter made with registration asked for (`adapt --register`: the copy is a low-resolution image
of the patient) therefore keeps a small copy of its support image (normalised intensities, a few mm per voxel, with
its geometry); at apply time (`apply --register`) that copy is registered to the query, downsampled the same way
(SimpleITK, Mattes mutual information, multi-resolution), and every query embedding-grid cell is followed through the
transform:
cell centre -> query voxel -> physical point -> support physical point -> support voxel -> the support's normalised
position in its own model-input square. The pixel prompts and the footprints then read those positions (the
"registered" frame) instead of the query's own. The transform also says which support slice each query cell lies
on: the footprints, which say where in the slice plane a structure was painted, are then also weighted by how far
that is from the support slices where it was painted (its extent there), so that a look-alike region in slices
above or below a structure (on CHAOS 5 -> 3, a kidney-like region 10 slices below the kidneys) is not chosen.

A registration that fails or looks implausible (SimpleITK error, metric not better than where it started, a scale
far from 1) gives no positions: apply then uses the image frame, as before, and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .orientation import from_slices, in_plane_array_axes
from .preprocess import ResizeInfo
from .progress import NO_PROGRESS, Progress
from .volume import Geometry

STAGE = "register"
MAX_SIDE = 96  # voxels per side of the copies that are registered: ~4 mm on an abdomen, a few hundred KB
HISTOGRAM_BINS = 32
SAMPLING_SHARE = 0.25  # of the fixed image's voxels, per metric evaluation (random, seeded)
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS = (2.0, 1.0, 0.0)  # voxels of each level
ITERATIONS = 100
# A patient is not half or twice another's size: a registration whose scale goes beyond this converged on something
# else (the table, a fold of the field of view), and its positions would be worse than the image frame's.
MIN_SCALE, MAX_SCALE = 0.67, 1.5
# Share of a structure's painted span it may reach beyond each painted end: 1/4 suits painting at 1/6 and 5/6 of
# a structure (protocol 2), but cut the liver of CHAOS 3 from a model of CHAOS 2 painted at 1/4-3/4 of the slices
# holding both liver and spleen (Dice 0.814 -> 0.765); 1/2 gave 0.878 there and the same development mean (0.836).
THROUGH_PLANE_MARGIN = 0.5


class RegistrationFailed(Exception):
    """The registration gave no usable transform (the message says why)."""


@dataclass
class SupportImage:
    """A small copy of the support scan and what is needed to map physical points to its model-input positions."""

    image: np.ndarray  # [k, j, i] uint8: normalised intensities 0..1 * 255, downsampled to <= MAX_SIDE a side
    spacing: tuple[float, float, float]  # of the small copy, (i, j, k) as ITK
    origin: tuple[float, float, float]
    direction: np.ndarray  # 3x3, shared with the full support
    full_geometry: Geometry  # the support scan's own grid, where its slices were cut and resized
    axis: int  # the support's slice axis (array axis of [k, j, i])
    resize: ResizeInfo  # how the support's slices were resized into the model-input square
    # [S, 2] first and last support slice (along `axis`) on which each structure was painted; -1, -1: never
    painted_extents: torch.Tensor

    def small_image(self) -> sitk.Image:
        return _sitk_image(self.image.astype(np.float32) / 255, self.spacing, self.origin, self.direction)

    def payload(self) -> dict:
        geometry = self.full_geometry
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.image)),
            "spacing": list(self.spacing), "origin": list(self.origin),
            "direction": torch.from_numpy(np.asarray(self.direction, dtype=np.float64)),
            "full_spacing": list(geometry.spacing), "full_origin": list(geometry.origin),
            "full_direction": torch.from_numpy(np.asarray(geometry.direction, dtype=np.float64)),
            "full_shape": list(geometry.shape), "axis": self.axis,
            "original_shape": list(self.resize.original_shape), "resized_shape": list(self.resize.resized_shape),
            "target": self.resize.target, "painted_extents": self.painted_extents,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> "SupportImage":
        """Raises KeyError, TypeError or ValueError on a damaged one."""
        image = payload["image"]
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.dtype != torch.uint8:
            raise ValueError(f"the support image copy of shape {tuple(getattr(image, 'shape', ()))} is not a "
                             f"3D uint8 image")
        geometry = Geometry(_triple(payload["full_spacing"]), _triple(payload["full_origin"]),
                            _matrix(payload["full_direction"]), tuple(int(v) for v in payload["full_shape"]))
        resize = ResizeInfo(tuple(int(v) for v in payload["original_shape"]),
                            tuple(int(v) for v in payload["resized_shape"]), int(payload["target"]))
        axis = int(payload["axis"])
        if axis not in (0, 1, 2):
            raise ValueError(f"the support image's slice axis {axis} is not 0, 1 or 2")
        extents = payload["painted_extents"]
        if not isinstance(extents, torch.Tensor) or extents.ndim != 2 or extents.shape[1] != 2:
            raise ValueError(f"painted extents of shape {tuple(getattr(extents, 'shape', ()))} are not [S, 2]")
        return cls(image.numpy(), _triple(payload["spacing"]), _triple(payload["origin"]),
                   _matrix(payload["direction"]), geometry, axis, resize, extents.float())


def _triple(values) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 values, got {len(values)}")
    return values


def _matrix(values) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"a direction matrix of shape {matrix.shape}")
    return matrix


def _sitk_image(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).ravel()])
    return image


def downsample(normalised: np.ndarray, geometry: Geometry) -> sitk.Image:
    """[k, j, i] normalised intensities -> a SimpleITK image of at most MAX_SIDE voxels a side over the same extent
    (smoothed first, so that it is an average, not a sample, of the voxels it replaces)."""
    image = _sitk_image(normalised, geometry.spacing, geometry.origin, geometry.direction)
    spacing = np.array(image.GetSpacing())
    extent = spacing * np.array(image.GetSize())
    new_spacing = np.maximum(spacing, extent / MAX_SIDE)
    new_size = [int(min(MAX_SIDE, max(1, round(e / s)))) for e, s in zip(extent, new_spacing)]
    if np.any(new_spacing > spacing):
        sigmas = np.where(new_spacing > spacing, new_spacing / 2, 0.01 * spacing)
        image = sitk.SmoothingRecursiveGaussian(image, [float(s) for s in sigmas])
    # Same outer edges: the first voxel's centre moves by half the difference of the spacings.
    direction = np.asarray(geometry.direction, dtype=np.float64)
    origin = np.asarray(geometry.origin) + direction @ ((new_spacing - spacing) / 2)
    return sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, [float(v) for v in origin],
                         [float(v) for v in new_spacing], [float(v) for v in direction.ravel()], 0.0,
                         sitk.sitkFloat32)


def support_image(slices: np.ndarray, geometry: Geometry, axis: int, resize: ResizeInfo,
                  painted: list[list[int]]) -> SupportImage:
    """The small copy an adapter keeps of its support scan; slices: its normalised slices along `axis` (as
    EncodedVolume.slices); painted: for each structure, the slices on which it was painted."""
    small = downsample(from_slices(slices, axis), geometry)
    array = np.clip(np.rint(sitk.GetArrayFromImage(small) * 255), 0, 255).astype(np.uint8)
    extents = torch.tensor([[min(z), max(z)] if z else [-1, -1] for z in painted], dtype=torch.float32)
    return SupportImage(array, tuple(small.GetSpacing()), tuple(small.GetOrigin()),
                        np.asarray(small.GetDirection(), dtype=np.float64).reshape(3, 3), geometry, axis, resize,
                        extents.reshape(-1, 2))


@dataclass
class Registration:
    """query physical point p -> support physical point matrix @ (p - center) + center + translation."""

    matrix: np.ndarray
    center: np.ndarray
    translation: np.ndarray
    metric_start: float  # Mattes mutual information (negative: lower is better) where the optimiser started
    metric_end: float
    seconds: float

    @property
    def scales(self) -> np.ndarray:
        return np.linalg.svd(self.matrix, compute_uv=False)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """[..., 3] LPS points of the query -> the same anatomy's points in the support."""
        return (points - self.center) @ self.matrix.T + self.center + self.translation

    def describe(self) -> str:
        return (f"scales {', '.join(f'{s:.2f}' for s in self.scales)}, shift "
                f"{np.linalg.norm(self.translation):.0f} mm, metric {self.metric_start:.3f} -> {self.metric_end:.3f}, "
                f"{self.seconds:.1f} s")


def _method(seed: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_SHARE, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=ITERATIONS,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS))
    return method


def register(support: SupportImage, query: sitk.Image, seed: int = 0) -> Registration:
    """The similarity transform (rotation, isotropic scale, shift; started from the images' centres of mass) from
    the query's physical space into the support's; raises RegistrationFailed when it is unusable.

    Not a full affine: on CHAOS its extra freedom went into the head-foot axis (scans cover different lengths of the
    body), scaling it by 0.6-0.7, and it took 2-3 times longer (development pairs 5 -> 1, 5 -> 3, 13 -> 5, 2 -> 3)."""
    start = time.perf_counter()
    moving = support.small_image()
    try:
        transform = sitk.CenteredTransformInitializer(query, moving, sitk.Similarity3DTransform(),
                                                      sitk.CenteredTransformInitializerFilter.MOMENTS)
        method = _method(seed)
        method.SetInitialTransform(transform, inPlace=True)
        metric_start = method.MetricEvaluate(query, moving)
        method.Execute(query, moving)
        metric_end = method.MetricEvaluate(query, moving)
    except RuntimeError as error:  # SimpleITK reports every failure as RuntimeError
        raise RegistrationFailed(f"SimpleITK: {' '.join(str(error).split())[-200:]}") from None
    result = Registration(np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3),
                          np.asarray(transform.GetCenter(), dtype=np.float64),
                          np.asarray(transform.GetTranslation(), dtype=np.float64),
                          float(metric_start), float(metric_end), time.perf_counter() - start)
    check_plausible(result)
    return result


def check_plausible(result: Registration) -> None:
    if not np.all(np.isfinite(result.matrix)) or not np.all(np.isfinite(result.translation)):
        raise RegistrationFailed("the transform is not finite")
    if not result.metric_end < result.metric_start:
        raise RegistrationFailed(f"the metric did not improve ({result.metric_start:.3f} -> {result.metric_end:.3f})")
    scales = result.scales
    if scales.min() < MIN_SCALE or scales.max() > MAX_SCALE:
        raise RegistrationFailed(f"implausible scale ({', '.join(f'{s:.2f}' for s in scales)}; "
                                 f"a patient is within {MIN_SCALE}-{MAX_SCALE} times another's size)")


def cell_pixel_coordinates(grid: int, resize: ResizeInfo) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (row, col) slice-pixel coordinates of the embedding-grid cell centres (pixel centres at integers),
    as the longest-side resize (bilinear, align_corners=False) places them."""
    centres = np.arange(grid) + 0.5  # cell units
    pixels_per_cell = resize.target / grid
    rows = centres * pixels_per_cell * resize.original_shape[0] / resize.resized_shape[0] - 0.5
    cols = centres * pixels_per_cell * resize.original_shape[1] / resize.resized_shape[1] - 0.5
    return rows, cols


def image_frame_position(pixels: np.ndarray, original: int, resized: int, target: int, grid: int) -> np.ndarray:
    """Continuous slice-pixel coordinates along one in-plane axis -> the image frame's -1..1 position (cell j at
    -1 + 2 j / (grid - 1), as prompts.embedding_features lays it out)."""
    model_pixels = (pixels + 0.5) * resized / original - 0.5
    cells = (model_pixels + 0.5) / (target / grid) - 0.5
    return -1 + 2 * cells / (grid - 1)


def registered_positions(support: SupportImage, registration: Registration, query_geometry: Geometry, axis: int,
                         resize: ResizeInfo, n_slices: int, grid: int) -> torch.Tensor:
    """[n, grid, grid, 3] where every query cell's centre lies in the support: image-frame position (x, y) and
    support slice (a continuous index along the support's slice axis)."""
    rows, cols = cell_pixel_coordinates(grid, resize)
    index = np.zeros((n_slices, grid, grid, 3))  # [k, j, i] array coordinates
    rows_axis, cols_axis = in_plane_array_axes(axis)
    index[..., axis] = np.arange(n_slices)[:, None, None]
    index[..., rows_axis] = rows[None, :, None]
    index[..., cols_axis] = cols[None, None, :]
    points = index[..., ::-1] @ query_geometry.ijk_to_lps()[:3, :3].T + query_geometry.ijk_to_lps()[:3, 3]
    in_support = registration.map_points(points)
    to_support_index = np.linalg.inv(support.full_geometry.ijk_to_lps())
    support_index = (in_support @ to_support_index[:3, :3].T + to_support_index[:3, 3])[..., ::-1]  # [k, j, i]
    support_rows_axis, support_cols_axis = in_plane_array_axes(support.axis)
    original, resized, target = support.resize.original_shape, support.resize.resized_shape, support.resize.target
    y = image_frame_position(support_index[..., support_rows_axis], original[0], resized[0], target, grid)
    x = image_frame_position(support_index[..., support_cols_axis], original[1], resized[1], target, grid)
    return torch.from_numpy(np.stack([x, y, support_index[..., support.axis]], axis=-1).astype(np.float32))


def through_plane_weights(support_slices: torch.Tensor, extents: torch.Tensor) -> torch.Tensor:
    """[n, H, W] support slices of query cells, [S, 2] painted extents -> [S, n, H, W] weights: 1 within a
    structure's painted slices widened by THROUGH_PLANE_MARGIN of their span on each side (at least one slice),
    falling off as a Gaussian of that width beyond; 1 everywhere for a structure never painted."""
    first, last = extents[:, 0, None, None, None], extents[:, 1, None, None, None]
    margin = ((last - first) * THROUGH_PLANE_MARGIN).clamp(min=1.0)
    beyond = torch.maximum(first - margin - support_slices[None], support_slices[None] - last - margin).clamp(min=0)
    weights = torch.exp(-0.5 * (beyond / margin) ** 2)
    return torch.where(first >= 0, weights, torch.ones_like(weights))


def with_through_plane_prior(probabilities: torch.Tensor, support_slices: torch.Tensor,
                             extents: torch.Tensor) -> torch.Tensor:
    """[b, K, H, W] class probabilities of registered query slices -> the same with each structure's share scaled by
    its through_plane_weights and what it loses given to background: a structure is not where the support scan's
    slices hold none of it (on CHAOS 5 -> 1 the pixel prompts found spleen over 28 slices, the spleen spans 14)."""
    weights = through_plane_weights(support_slices, extents).permute(1, 0, 2, 3)  # [b, S, H, W]
    structures = probabilities[:, 1:] * weights
    background = probabilities[:, :1] + (probabilities[:, 1:] - structures).sum(1, keepdim=True)
    return torch.cat([background, structures], dim=1)


def positions_in_support(support: SupportImage | None, slices: np.ndarray, geometry: Geometry, axis: int,
                         resize: ResizeInfo, grid: int, progress: Progress = NO_PROGRESS,
                         seed: int = 0) -> torch.Tensor | None:
    """Registered positions of a query (its normalised slices along `axis`), or None (image frame) when the adapter
    keeps no support copy or the registration is unusable; progress says which and why."""
    if support is None:
        progress.update(STAGE, 1, 1, "the model keeps no support image (made before registration, or on several "
                                     "scans): positions in the image frame")
        return None
    progress.update(STAGE, 0, 1, "registering the support scan to this scan")
    try:
        registration = register(support, downsample(from_slices(slices, axis), geometry), seed)
    except RegistrationFailed as error:
        progress.update(STAGE, 1, 1, f"registration failed ({error}): positions in the image frame")
        return None
    progress.update(STAGE, 1, 1, f"registered the support scan to this scan ({registration.describe()})")
    return registered_positions(support, registration, geometry, axis, resize, slices.shape[0], grid)
