"""Small structures: the engine's outline averaged with an outline drawn from the painting itself.

A structure a few voxels across (an MSD hippocampus crop: ~15x20 voxels in plane, 1 mm) reaches the image encoder
as a 5x blurred upsampling, and the outline the model draws there is worse than the painted outlines carried over
to the next slices: on such scans Slicer's "Fill between slices" beat the engine at k = 3 and 5, "Grow from seeds"
at k = 1. This module adds that knowledge without giving up the model: on every slice that was not painted, each
small structure's outline is the weighted average of two signed distance maps (positive inside, in mm):

* the engine's result on that slice, and
* for a structure painted on at least `min_painted_slices` slices, the painted shape: between two painted slices
  the linear blend of their distance maps (shape-based interpolation); beyond the outermost painted slice that
  slice's map, narrowing towards the structure's end (painted_shape says how fast);
* for one painted on fewer slices (one or two say little about how the shape changes along the slices), the
  painting grown through the image along its intensities (intensity_growth.py), every other voxel of the painted
  slices seeding the background; for one painted on more, that grown outline joins the average as a third map.

Distances are clipped to `clip` mm, so a slice where either source is empty counts as "far outside" without the
empty source wiping out the other. Structures compete per voxel by the larger average. Large structures (every
CHAOS organ) are left exactly as they were: only structures whose largest painted cross-section spans fewer than
SMALL_STRUCTURE_VOXELS voxels, or that are thinner than THIN_STRUCTURE_VOXELS on every painted slice (a vessel),
are changed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .intensity_growth import grown_labels
from .orientation import from_slices, to_slices

# The longest side, in voxels, of a structure's largest painted cross-section below which it counts as small.
# Hippocampus parts measure 13-27 voxels at their largest; on the benchmark's painted slices every CHAOS organ
# reaches 32 or more (tests/test_small_structures.py checks all 12 scans at k = 1, 3, 5, 10).
SMALL_STRUCTURE_VOXELS = 32
# The widest inscribed circle's diameter, in voxels, below which a structure counts as thin: a vessel or a pancreas
# can run 40-135 voxels across a slice while only 4-13 thick (the TotalSegmentator portal and splenic veins, 3 mm and
# 0.98 mm), and between its painted slices the engine loses it the way it loses a small one. The thinnest CHAOS organ
# measures 26 or more (tests/test_small_structures.py).
THIN_STRUCTURE_VOXELS = 16
BACKGROUND_SEED = -1  # the seed label of a painted slice's other voxels in the intensity growth
# The most voxels the growth searches (its graph takes ~100 bytes a voxel): a hippocampus crop holds 63,000, a
# small CT organ's box a few 100,000; beyond this the structure keeps the engine's outline.
MAX_GROWTH_VOXELS = 4_000_000


@dataclass
class ShapeBlendOptions:
    enabled: bool = True
    # Chosen on the hippocampus development scans (benchmarks/accuracy/datasets.py, DEVELOPMENT_SCANS).
    model_weight: float = 0.3  # share of the engine's distance map between painted slices; the rest is the painting's
    model_weight_beyond: float = 0.3  # the same beyond the outermost painted slices
    taper: float = 1.0  # how fast the painted shape narrows beyond the outermost painted slice (painted_shape)
    clip: float = 4.0  # mm: distance maps are clipped to +-clip
    # A structure painted on fewer slices is not given the painted shape: one or two painted slices say little about
    # how the shape changes along the slices, and carrying them over lost Dice at k = 1 (README, Accuracy).
    min_painted_slices: int = 3
    # The painting grown along the intensities (when the image is given): for a structure painted on fewer slices
    # the second outline, the engine's share of that average being model_weight_grown; for one painted on more, a
    # third, with grown_share of the average. Both chosen on the development scans as above.
    grow: bool = True
    model_weight_grown: float = 0.3
    grown_share: float = 0.3
    # Thin structures (is_thin) join the blend too; False: only the small ones, as before the thin rule.
    thin: bool = True
    # The engine's share for a thin structure (in place of model_weight, model_weight_beyond and model_weight_grown):
    # the model, on a 64x64 grid, barely resolves a structure 4-13 voxels thick, and its outline there only erodes the
    # average. 0 was best on the thin-structure check sets (benchmarks: totalseg_thin, totalseg_mr_thin,
    # totalseg_ct512_thin; 0 / 0.15 / 0.3 / 0.5 compared) and was then measured on the small-organ sets (README).
    # The engine still decides where a thin structure ends (painted_shape, grow_from_painting).
    thin_model_weight: float = 0.0


def is_small(painted_slices: np.ndarray, value: int) -> bool:
    """Whether the structure `value` spans fewer than SMALL_STRUCTURE_VOXELS voxels on every painted slice."""
    mask = painted_slices == value
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    if present.size == 0:
        return False
    for z in present:
        rows = np.flatnonzero(mask[z].any(axis=1))
        cols = np.flatnonzero(mask[z].any(axis=0))
        if max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= SMALL_STRUCTURE_VOXELS:
            return False
    return True


def is_thin(painted_slices: np.ndarray, value: int) -> bool:
    """Whether the structure `value` is under THIN_STRUCTURE_VOXELS thick (the diameter of the widest circle inside
    it) on every painted slice, however long it runs across them."""
    mask = painted_slices == value
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    if present.size == 0:
        return False
    return all(inscribed_diameter(mask[z]) < THIN_STRUCTURE_VOXELS for z in present)


def inscribed_diameter(mask: np.ndarray) -> float:
    """The diameter, in voxels, of the widest circle inside a non-empty 2D mask. The distance transform runs on the
    mask's box plus a 1-voxel background border, which holds a background voxel at least as near to every inside
    voxel as any beyond it: the whole-slice answer, faster (is_thin over the 31 structures of the 512x512 CT painted
    at k = 3: 0.07 s against 0.56 s on the whole slices, 2.6 GHz Xeon)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return 2 * float(ndimage.distance_transform_edt(np.pad(box, 1)).max())


def painted_count(painted_slices: np.ndarray, value: int) -> int:
    return int(np.count_nonzero((painted_slices == value).any(axis=(1, 2))))


def signed_distance(mask: np.ndarray, spacing: tuple[float, float], clip: float) -> np.ndarray:
    """Signed distance (mm, positive inside) of a 2D mask to its outline, clipped to +-clip; -clip if empty."""
    if not mask.any():
        return np.full(mask.shape, -clip, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, clip, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    # Half a voxel either side of the outline, so that re-thresholding a map at 0 gives back its own mask.
    return np.clip(np.where(mask, inside - 0.5 * min(spacing), 0.5 * min(spacing) - outside), -clip, clip).astype(
        np.float32)


def painted_shape(anchors: dict[int, np.ndarray], z: int, engine_present: np.ndarray,
                  taper: float) -> tuple[np.ndarray, bool]:
    """The painted shape's distance map on slice z, from the maps of the slices the structure was painted on, and
    whether z lies between two of them.

    Beyond the outermost painted slice the shape narrows, in equal steps, to nothing just past the last slice of the
    engine's own run of slices in that direction (taper 1; larger: sooner): the engine decides where a structure
    ends, the painting what it looks like on the way there. This adapts to k: one painted slice in the middle of a
    structure tapers slowly, an outermost one of five painted slices quickly."""
    below = [a for a in anchors if a < z]
    above = [a for a in anchors if a > z]
    if below and above:
        lower, upper = max(below), min(above)
        t = (z - lower) / (upper - lower)
        return (1 - t) * anchors[lower] + t * anchors[upper], True
    nearest = max(below) if below else min(above)
    step = 1 if z > nearest else -1
    run = 0  # slices the engine found the structure on, going outwards from the painted slice
    while 0 <= nearest + step * (run + 1) < engine_present.size and engine_present[nearest + step * (run + 1)]:
        run += 1
    if len(anchors) > 1:  # painted slices spread over a structure leave about half a gap beyond the outermost
        gap = (max(anchors) - min(anchors)) / (len(anchors) - 1)
        run = min(run, int(np.ceil(gap / 2)))
    depth = max(float(anchors[nearest].max()), 0.0)
    return anchors[nearest] - taper * depth * abs(z - nearest) / (run + 1), False


def blend_with_painted_shape(labels: np.ndarray, painted: np.ndarray, labelled: list[int], axis: int,
                             label_values: list[int], pixel_spacing: tuple[float, float], options: ShapeBlendOptions,
                             slice_range: tuple[int, int] | None = None,
                             image: np.ndarray | None = None) -> np.ndarray:
    """The engine's label map [k, j, i] with its small structures re-outlined on every unpainted slice (of
    slice_range, first..last inclusive, when given: the engine leaves the others empty, and so does this).

    image: the intensities [k, j, i], for the intensity growth (without it a structure painted on fewer than
    options.min_painted_slices slices keeps the engine's outline, and the others get no grown outline)."""
    if not options.enabled or not labelled:
        return labels
    painted_slices = to_slices(painted, axis)
    compact = [value for value in label_values if is_small(painted_slices, value)]
    thin = [value for value in label_values
            if options.thin and value not in compact and is_thin(painted_slices, value)]
    small = compact + thin
    shaped = [value for value in small if painted_count(painted_slices, value) >= options.min_painted_slices]
    grow = image is not None and options.grow
    few = [value for value in small if value not in shaped] if grow else []
    if not shaped and not few:
        return labels
    engine = to_slices(labels, axis)
    grown = grown_outlines(to_slices(image, axis), painted_slices, labelled, compact, thin, engine, pixel_spacing,
                           options) if grow else {}
    weight = options.thin_model_weight
    thin_options = replace(options, model_weight=weight, model_weight_beyond=weight, model_weight_grown=weight)
    chosen = {value: thin_options if value in thin else options for value in small}
    blends = [StructureBlend(value, engine, painted_slices, labelled, pixel_spacing, chosen[value], grown.get(value))
              for value in shaped]
    blends += [GrownBlend(value, engine, painted_slices, labelled, pixel_spacing, chosen[value], grown[value])
               for value in few if grown.get(value) is not None]
    if not blends:
        return labels
    values = [blend.value for blend in blends]
    result = np.array(engine)
    first, last = slice_range or (0, result.shape[0] - 1)
    labelled_set = set(labelled)
    for z in range(max(0, first), min(result.shape[0] - 1, last) + 1):
        if z in labelled_set:
            continue
        scores = np.full((len(blends),) + result.shape[1:], -np.inf, dtype=np.float32)
        for index, blend in enumerate(blends):
            if blend.changes(z):
                rows, cols = blend.box
                scores[index, rows, cols] = blend.score(engine[z], z)
                result[z][(engine[z] == blend.value) & np.isfinite(scores[index])] = 0  # re-outlined below
        best = scores.max(axis=0)
        winner = np.asarray(values, dtype=result.dtype)[scores.argmax(axis=0)]
        claim = (best > 0) & (result[z] == 0)  # never over a large structure
        result[z][claim] = winner[claim]
    return from_slices(result, axis)


def structure_voxels(values: list[int], engine: np.ndarray, painted_slices: np.ndarray) -> np.ndarray:
    """[n_slices, rows, cols]: where the painting or the engine's result has any of the structures `values`."""
    return np.isin(painted_slices, values) | np.isin(engine, values)


def outline_box(voxels: np.ndarray, pixel_spacing: tuple[float, float], clip: float) -> tuple[slice, slice]:
    """The in-plane box (rows, cols) around structure_voxels, plus the clip distance: beyond it the distance maps
    are -clip anyway, and a 512x512 CT slice would cost 30 times more."""
    footprint = voxels.any(axis=0)
    margin = int(np.ceil(clip / min(pixel_spacing))) + 2
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    return (slice(max(0, rows[0] - margin), rows[-1] + margin + 1),
            slice(max(0, cols[0] - margin), cols[-1] + margin + 1))


def grown_outlines(image_slices: np.ndarray, painted_slices: np.ndarray, labelled: list[int], compact: list[int],
                   thin: list[int], engine: np.ndarray, pixel_spacing: tuple[float, float],
                   options: ShapeBlendOptions) -> dict[int, np.ndarray | None]:
    """Each structure's grown outline (grow_from_painting's map; None where its box is over the limit). The compact
    small structures grow together, competing for the voxels between them (the two hippocampus parts); each thin one
    grows on its own, in its own box: a vessel spans slices and area the compact ones do not, and grown with it a
    gallbladder on a 3 mm CT followed its box into slices beyond the gallbladder's end."""
    groups = ([compact] if compact else []) + [[value] for value in thin]
    grown = {}
    for group in groups:
        outline = grow_from_painting(image_slices, painted_slices, labelled, group, engine, pixel_spacing, options)
        grown.update({value: outline for value in group})
    return grown


def grow_from_painting(image_slices: np.ndarray, painted_slices: np.ndarray, labelled: list[int], values: list[int],
                       engine: np.ndarray, pixel_spacing: tuple[float, float], options: ShapeBlendOptions,
                       max_voxels: int = MAX_GROWTH_VOXELS) -> np.ndarray | None:
    """[n_slices, rows, cols]: the structures `values` grown along the intensities from their painting, inside the
    box around them (0 elsewhere), or None when that box holds more than max_voxels voxels. Every other voxel of a
    labelled slice seeds the background. The box spans the slices where the engine or the painting has them (the
    engine decides where a structure ends: grown further, a gallbladder on a 3 mm CT leaked into the slices beyond
    it) and outline_box in plane."""
    voxels = structure_voxels(values, engine, painted_slices)
    rows, cols = outline_box(voxels, pixel_spacing, options.clip)
    present = np.flatnonzero(voxels.any(axis=(1, 2)))
    first, last = present[0], present[-1]
    box = (slice(first, last + 1), rows, cols)
    box_image = image_slices[box]
    if box_image.size > max_voxels:
        return None
    inside = [z for z in labelled if first <= z <= last]
    seeds = np.zeros(box_image.shape, dtype=np.int64)
    painting = painted_slices[inside][:, rows, cols].astype(np.int64)
    seeds[[z - first for z in inside]] = np.where(np.isin(painting, values), painting, BACKGROUND_SEED)
    box_labels = grown_labels(box_image, seeds)
    grown = np.zeros(painted_slices.shape, dtype=painted_slices.dtype)
    grown[box] = np.where(box_labels == BACKGROUND_SEED, 0, box_labels)
    return grown


class StructureBlend:
    """One small structure's painted shape (and grown outline, when given) and what it needs to re-outline a slice.
    Distance maps are taken on the box around the structure (outline_box)."""

    def __init__(self, value: int, engine: np.ndarray, painted_slices: np.ndarray, labelled: list[int],
                 pixel_spacing: tuple[float, float], options: ShapeBlendOptions, grown: np.ndarray | None = None):
        self.value, self.spacing, self.options, self.grown = value, pixel_spacing, options, grown
        self.box = outline_box(structure_voxels([value], engine, painted_slices), pixel_spacing, options.clip)
        self.anchors = {z: self.distance(painted_slices[z]) for z in labelled if (painted_slices[z] == value).any()}
        self.absent = [z for z in labelled if z not in self.anchors]
        self.engine_present = (engine == value).any(axis=(1, 2))

    def distance(self, slice2d: np.ndarray) -> np.ndarray:
        return signed_distance(slice2d[self.box] == self.value, self.spacing, self.options.clip)

    def changes(self, z: int) -> bool:
        return not _beyond_absent(z, self.anchors, self.absent)

    def score(self, engine_slice: np.ndarray, z: int) -> np.ndarray:
        """The weighted average of the engine's and the painted shape's distance maps on slice z (inside box), and
        of that with the grown outline's."""
        prior, between = painted_shape(self.anchors, z, self.engine_present, self.options.taper)
        weight = self.options.model_weight if between else self.options.model_weight_beyond
        score = weight * self.distance(engine_slice) + (1 - weight) * np.maximum(prior, -self.options.clip)
        if self.grown is None:
            return score
        share = self.options.grown_share
        return (1 - share) * score + share * self.distance(self.grown[z])


class GrownBlend(StructureBlend):
    """A small structure painted on too few slices for a painted shape: its outline grown along the intensities
    (grow_from_painting's map) stands in for it."""

    def score(self, engine_slice: np.ndarray, z: int) -> np.ndarray:
        weight = self.options.model_weight_grown
        return weight * self.distance(engine_slice) + (1 - weight) * self.distance(self.grown[z])


def _beyond_absent(z: int, anchors: Collection[int], absent: list[int]) -> bool:
    """True when a labelled slice without the structure lies between z and every painted slice of it: the user
    said it ends there, so the painted shape must not be carried past it (the engine's result is kept)."""
    if not anchors:
        return True
    return all(any(min(a, z) < b < max(a, z) for b in absent) for a in anchors)
