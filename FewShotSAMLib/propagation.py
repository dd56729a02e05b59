"""Predict every slice of a volume from a few-shot adapter, back on the volume's own grid.

1. Pixel prompts classify every embedding-grid cell of every slice (all structures jointly).
2. Each structure keeps the 3D connected components of its cells that touch what was painted (or, on a scan
   with nothing painted, the component most likely to be it: the most probability mass where the structure lay on
   the labelled slices, see most_likely_component): this decides where a structure starts and ends, and removes
   false positives in slices far from it.
3. On each slice, the box around a structure's cells and its few-shot token prompt the tuned mask decoder,
   which draws the outline at full resolution; its probability is averaged with the pixel prompts'.
4. Structures compete per pixel (no overlaps); painted slices keep exactly what was painted; optional 3D
   clean-up keeps the components connected to the painting and fills holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .adapter import FewShotAdapter
from .body_frame import BODY_FRAME
from .confidence import ConfidenceRecorder
from .decoder import decode_in_windows
from .encoding import EncodedVolume
from .fewshot import IGNORE, class_maps, class_maps_to_model_space, pool_class_maps
from .models import SamModel
from .orientation import from_slices, to_slices
from .preprocess import mask_logits_to_stack
from .progress import NO_PROGRESS, Progress
from .prompts import footprint_weights
from .queries import grow_box, mask_boxes, query_tokens
from .registration import through_plane_weights, with_through_plane_prior


@dataclass
class PropagationOptions:
    decoder_weight: float = 0.5  # share of the decoder's probability in the final one; the rest is pixel prompts
    clean_up: bool = True  # 3D: keep components connected to the painting, fill holes in each slice
    slice_range: tuple[int, int] | None = None  # predict only slices first..last (inclusive); others stay empty
    batch_size: int = 16


def coarse_probabilities(adapter: FewShotAdapter, encoded: EncodedVolume, batch_size: int = 16,
                         within: tuple[int, int] | None = None) -> torch.Tensor:
    """[n, K, H, W] class probabilities on the embedding grid for every slice, or only for slices within
    first..last (the others, and slices never encoded, read as background)."""
    probabilities = background_probabilities(adapter, encoded)
    available = encoded.encoded if encoded.encoded is not None else list(range(encoded.n_slices))
    if within is not None:
        available = [z for z in available if within[0] <= z <= within[1]]
    classify_slices(adapter, encoded, available, probabilities, batch_size)
    return probabilities


def background_probabilities(adapter: FewShotAdapter, encoded: EncodedVolume) -> torch.Tensor:
    """[n, K, H, W] class probabilities that say background everywhere (what an unclassified slice reads as)."""
    probabilities = torch.zeros((encoded.n_slices, adapter.n_classes) + tuple(encoded.embeddings.shape[-2:]))
    probabilities[:, 0] = 1
    return probabilities


def classify_slices(adapter: FewShotAdapter, encoded: EncodedVolume, indices: list[int], into: torch.Tensor,
                    batch_size: int = 16) -> None:
    """Write the pixel prompts' class probabilities of the slices `indices` into `into` [n, K, H, W]."""
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            embeddings = encoded.float32_embeddings(batch)
            body_boxes = encoded.body_boxes(batch) if adapter.position_frame == BODY_FRAME else None
            positions = encoded.positions_for(adapter.position_frame, batch)  # None unless registered
            probabilities = adapter.classifier(embeddings, body_boxes, positions)
            if positions is not None and adapter.support_image is not None:
                probabilities = with_through_plane_prior(probabilities, positions[..., 2],
                                                         adapter.support_image.painted_extents)
            into[batch] = probabilities


# Weight of a cell outside every labelled footprint, against 1 at the footprint's centre: a structure found only
# where it was never painted (a scan framed differently) is still found, but loses to one found where it was painted.
FOOTPRINT_FLOOR = 0.1


def structure_cells(probabilities: torch.Tensor, painted_cells: torch.Tensor | None, labelled: list[int],
                    footprints: torch.Tensor | None = None) -> np.ndarray:
    """[n, K, H, W] probabilities -> [n, S, H, W] boolean cells kept for each structure (see module doc, step 2).

    footprints: [S, H, W] or per slice [S, n, H, W] weights (prompts.footprint_weights of the adapter's), used on a
    scan with nothing painted to choose between components."""
    classes = probabilities.argmax(1).numpy()
    n_structures = probabilities.shape[1] - 1
    kept = np.zeros((classes.shape[0], n_structures) + classes.shape[1:], dtype=bool)
    painted = painted_cells.numpy()[labelled] if painted_cells is not None and labelled else None
    for structure in range(n_structures):
        cells = classes == structure + 1
        anchors = np.zeros_like(cells)
        if painted is not None:
            # Labelled slices say exactly where the structure is and is not: that also cuts components that
            # would run through a labelled slice where the structure is absent.
            cells[labelled] = painted == structure + 1
            anchors[labelled] = painted == structure + 1
        components, count = ndimage.label(cells)
        if count == 0:
            continue
        if anchors.any():
            keep = np.unique(components[anchors & (components > 0)])
        else:
            footprint = None if footprints is None else footprints[structure].numpy()
            keep = [most_likely_component(components, probabilities[:, structure + 1].numpy(), footprint)]
        kept[:, structure] = np.isin(components, keep)
    return kept


class Reach:
    """Where the structures may go on beyond the encoded slices, asked again after each block of slices is encoded
    (Engine.encode_reach). Each slice's pixel-prompt probabilities are computed once, when it is first seen
    encoded: the classifier works cell by cell, so they come out bit for bit as coarse_probabilities' batches.

    Why encoding stops when unencoded() is empty: the kept cells are 3D components (6-connected) that touch the
    painting, and a slice never encoded reads as background. A kept component can only cross into a slice through a
    cell next to a kept cell, so once no kept cell lies next to an unencoded slice, encoding more slices adds no cell
    to any kept component, and each encoded slice's cells are classified on their own: structure_cells, and so
    predict_classes, then come out the same as on a full encoding."""

    def __init__(self, adapter: FewShotAdapter, encoded: EncodedVolume, painted_slices: np.ndarray,
                 labelled: list[int], batch_size: int = 16):
        self.adapter, self.labelled, self.batch_size = adapter, labelled, batch_size
        self.painted_cells = painted_cell_map(adapter, encoded, painted_slices, labelled)
        # Footprints depend on the slices' images only (body boxes), not on which slices are encoded yet.
        self.footprints = slice_footprints(adapter, encoded)
        self.probabilities = background_probabilities(adapter, encoded)  # background until encoded
        self.seen: set[int] = set()

    def unencoded(self, encoded: EncodedVolume, window: tuple[int, int]) -> list[tuple[int, int]]:
        """(slice, step) for each slice of window first..last (inclusive) that is not encoded but lies next to an
        encoded one, one step (+1 or -1) away, on which structure_cells keeps cells. Empty: predicting on this
        encoding equals predicting on a full one. window: the slices predict_classes predicts (a warm start's
        region, whose ends are painted slices or the volume's ends; whole volume: 0..n-1)."""
        done = set(range(encoded.n_slices) if encoded.encoded is None else encoded.encoded)
        first, last = window
        self.classify(encoded, sorted(z for z in done - self.seen if first <= z <= last))
        kept = structure_cells(self.within(window), self.painted_cells, self.labelled, self.footprints)
        occupied = kept.any(axis=(1, 2, 3))
        return [(z + step, step) for z in range(first, last + 1) if occupied[z] for step in (-1, 1)
                if first <= z + step <= last and z + step not in done]

    def classify(self, encoded: EncodedVolume, indices: list[int]) -> None:
        classify_slices(self.adapter, encoded, indices, self.probabilities, self.batch_size)
        self.seen.update(indices)

    def within(self, window: tuple[int, int]) -> torch.Tensor:
        """What coarse_probabilities(within=window) gives, from the slices classified so far (once unencoded(window)
        is empty, every encoded slice of the window is among them): predict_classes takes it instead of classifying
        the window's slices again."""
        first, last = window
        probabilities = self.probabilities.clone()
        probabilities[:first], probabilities[last + 1:] = 0, 0
        probabilities[:first, 0], probabilities[last + 1:, 0] = 1, 1
        return probabilities


def most_likely_component(components: np.ndarray, probability: np.ndarray, footprint: np.ndarray | None) -> int:
    """The label of the component with the most probability mass, each cell weighted by the structure's footprint.

    Not the largest component: two candidates of similar size (the liver and a region 10 cm away on a scan of another
    patient) were told apart by a few cells, so the choice flipped with the encoder's precision; their positions
    differ by far more (tests/test_propagation.py)."""
    if footprint is not None and footprint.ndim == 2:  # the same on every slice
        footprint = footprint[None]
    weights = probability if footprint is None else probability * (FOOTPRINT_FLOOR + footprint)
    scores = np.bincount(components.ravel(), weights=weights.ravel(), minlength=int(components.max()) + 1)[1:]
    return int(np.argmax(scores)) + 1


def decoder_probabilities(model: SamModel, adapter: FewShotAdapter, encoded: EncodedVolume, kept: np.ndarray,
                          slices: list[int], batch_size: int,
                          progress: Progress) -> dict[tuple[int, int], torch.Tensor]:
    """Decoder probability [S, S] (model-input pixels) for each (slice, structure) whose cells are not empty."""
    size = encoded.resize.target
    cell_size = size / kept.shape[-1]
    queries = [(z, s) for z in slices for s in range(kept.shape[1]) if kept[z, s].any()]
    if not queries:
        return {}
    device = model.device  # the decoder runs there; what it returns comes back to the CPU
    _, cell_box = mask_boxes(kept[[z for z, _ in queries], [s for _, s in queries]])  # every query's cells non-empty
    boxes = grow_box(torch.from_numpy(cell_box * np.float32(cell_size)), size)
    boxes = boxes.to(device)
    tokens = query_tokens(model, boxes, adapter.tokens[[s for _, s in queries]].to(device))

    def embeddings_of(indices):
        return encoded.float32_embeddings([queries[i][0] for i in indices]).to(device)

    results, done = {}, 0
    with adapter.tuned_decoder(model), torch.inference_mode():
        for indices, logits in decode_in_windows(model, embeddings_of, tokens, boxes, batch_size):
            logits = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            # half the memory: a 300-slice CT holds ~1000
            for index, probability in zip(indices, torch.sigmoid(logits).half().cpu()):
                results[queries[index]] = probability
            done += len(indices)
            progress.update("propagate", done, len(queries), "propagating")
    return results


def propagate_volume(model: SamModel, adapter: FewShotAdapter, encoded: EncodedVolume,
                     painted_labels: np.ndarray | None = None, labelled: list[int] | None = None,
                     options: PropagationOptions | None = None, progress: Progress = NO_PROGRESS,
                     confidence: ConfidenceRecorder | None = None) -> np.ndarray:
    """Segment the whole volume; returns a label array [k, j, i] holding the adapter's label values.

    painted_labels: the scan's own painted label map (same grid), or None for a scan with no labels.
    labelled: slice indices (along encoded.axis) that are fully labelled; painted slices keep their labels.
    confidence: receives both predictions of every (slice, structure), to say where the result is least sure.
    """
    options = options or PropagationOptions()
    labelled = sorted(labelled or [])
    painted_slices = None if painted_labels is None else to_slices(painted_labels, encoded.axis)
    if confidence is not None:
        confidence.begin(encoded.n_slices, adapter.segments, labelled, encoded.axis)
    classes = predict_classes(model, adapter, encoded, painted_slices, labelled, options, progress,
                              confidence=confidence)
    return finish_labels(classes, adapter.label_values, painted_slices, labelled, options, encoded.axis)


def predict_classes(model: SamModel, adapter: FewShotAdapter, encoded: EncodedVolume,
                    painted_slices: np.ndarray | None, labelled: list[int], options: PropagationOptions,
                    progress: Progress = NO_PROGRESS, region: tuple[int, int] | None = None,
                    confidence: ConfidenceRecorder | None = None, reach: Reach | None = None) -> np.ndarray:
    """Class indices [n, rows, cols] along the slice axis (steps 1-3 and the competition of step 4, before the
    clean-up); slices outside options.slice_range, and labelled slices, are 0.

    region: classify and predict only slices first..last (a warm start's re-prediction; see warm_start.py). Its
    ends must be labelled slices or the volume's ends, so that no component of structure_cells crosses them
    except through painted cells.
    confidence: a recorder the caller has begun; it receives both predictions of every predicted (slice, structure).
    reach: the Reach that found the encoded slices of this region (Engine.encode_reach), made with the same adapter,
    painting and labelled slices: its probabilities, painted cells and footprints are used."""
    size = encoded.resize.target
    if reach is not None:
        probabilities = reach.within(region or (0, encoded.n_slices - 1))
        painted_cells, footprints = reach.painted_cells, reach.footprints
    else:
        probabilities = coarse_probabilities(adapter, encoded, options.batch_size, within=region)
        painted_cells = painted_cell_map(adapter, encoded, painted_slices, labelled)
        footprints = slice_footprints(adapter, encoded)
    kept = structure_cells(probabilities, painted_cells, labelled, footprints)
    first, last = options.slice_range or (0, encoded.n_slices - 1)
    if region is not None:
        first, last = max(first, region[0]), min(last, region[1])
    labelled_set = set(labelled)
    to_predict = [z for z in range(max(0, first), min(encoded.n_slices - 1, last) + 1) if z not in labelled_set]
    decoded = decoder_probabilities(model, adapter, encoded, kept, to_predict, options.batch_size, progress)

    rows, cols = encoded.slices.shape[1:]
    result = np.zeros((encoded.n_slices, rows, cols), dtype=np.uint8)  # class indices
    for z in to_predict:
        structures = [s for s in range(kept.shape[1]) if kept[z, s].any()]
        if not structures:
            continue
        coarse = probabilities[z, 1:].clone()
        coarse[~torch.from_numpy(ndimage.binary_dilation(kept[z], structure=np.ones((1, 3, 3))))] = 0
        coarse = F.interpolate(coarse[None], size=size, mode="bilinear", align_corners=False)[0]
        combined = (1 - options.decoder_weight) * coarse
        for s in structures:
            decoder = decoded.pop((z, s)).float()
            combined[s] += options.decoder_weight * decoder
            if confidence is not None:
                confidence.add(z, s, coarse[s], decoder)
        on_slice = mask_logits_to_stack(combined, encoded.resize, (rows, cols))  # [S, rows, cols]
        best, index = on_slice.max(dim=0)
        result[z] = np.where(best.numpy() > 0.5, index.numpy() + 1, 0)
    return result


def slice_footprints(adapter: FewShotAdapter, encoded: EncodedVolume) -> torch.Tensor | None:
    """The adapter's footprints as weights on the embedding grid ([S, 1, H, W], or [S, n, H, W] in the body frame or
    at registered positions), or None when it has none."""
    if adapter.footprints is None:
        return None
    height, width = encoded.embeddings.shape[-2:]
    boxes = encoded.body_boxes(range(encoded.n_slices)) if adapter.position_frame == BODY_FRAME else None
    positions = encoded.positions_for(adapter.position_frame, range(encoded.n_slices))
    weights = footprint_weights(adapter.footprints, adapter.position_frame, boxes, height, width, positions)
    if positions is not None and adapter.support_image is not None:
        weights = weights * through_plane_weights(positions[..., 2], adapter.support_image.painted_extents)
    return weights


def painted_cell_map(adapter: FewShotAdapter, encoded: EncodedVolume, painted_slices: np.ndarray | None,
                     labelled: list[int]) -> torch.Tensor | None:
    """[n, H, W] class of each embedding-grid cell on the labelled slices (0 elsewhere), or None without painting."""
    if painted_slices is None or not labelled:
        return None
    grid = encoded.embeddings.shape[-1]
    classes = class_maps(painted_slices[labelled], adapter.label_values)
    targets = class_maps_to_model_space(classes, adapter.n_classes, encoded.resize)
    painted_cells = torch.zeros((encoded.n_slices, grid, grid), dtype=torch.uint8)
    painted_cells[labelled] = pool_class_maps(targets, adapter.n_classes, grid)
    return painted_cells.where(painted_cells != IGNORE, torch.zeros_like(painted_cells))


def finish_labels(classes: np.ndarray, label_values: list[int], painted_slices: np.ndarray | None,
                  labelled: list[int], options: PropagationOptions, axis: int) -> np.ndarray:
    """Class indices along the slice axis -> the label array [k, j, i]: 3D clean-up (optional), label values, and
    the painted slices exactly as painted."""
    if options.clean_up:
        classes = clean_up(classes, labelled, painted_slices, label_values)
    labels = np.zeros(classes.shape, dtype=label_dtype(label_values, painted_slices))
    for class_index, value in enumerate(label_values, start=1):
        labels[classes == class_index] = value
    if painted_slices is not None and labelled:
        # Painted slices keep exactly what was painted (values the adapter does not know included).
        labels[labelled] = painted_slices[labelled]
    return from_slices(labels, axis)


def label_dtype(label_values: list[int], painted_slices: np.ndarray | None) -> np.dtype:
    """The smallest integer type that holds every output value (a 512x512x300 label map is 79 MB as uint8)."""
    painted = [] if painted_slices is None else [int(painted_slices.min()), int(painted_slices.max())]
    values = list(label_values) + painted
    for dtype in (np.uint8, np.uint16, np.int32):
        if np.iinfo(dtype).min <= min(values, default=0) and max(values, default=0) <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def clean_up(classes: np.ndarray, labelled: list[int], painted_slices: np.ndarray | None,
             label_values: list[int]) -> np.ndarray:
    """Per structure: keep 3D components touching its painted voxels (else the largest), fill 2D holes.

    Each structure is labelled within its own bounding box: a kidney's box is a small part of a CT, and the
    component map of a whole 512x512x300 volume alone would take 300 MB per structure."""
    cleaned = np.zeros_like(classes)
    has_painting = painted_slices is not None and bool(labelled)
    for class_index, value in enumerate(label_values, start=1):
        mask = classes == class_index
        if has_painting:
            mask[labelled] = painted_slices[labelled] == value
        box = bounding_box(mask)
        if box is None:
            continue
        mask = mask[box]
        # The anchors are the painted voxels: the mask itself on the labelled slices (set from the painting above).
        anchors = np.zeros_like(mask)
        if has_painting:
            inside = [z - box[0].start for z in labelled if box[0].start <= z < box[0].stop]
            anchors[inside] = mask[inside]
        components, _ = ndimage.label(mask)
        if anchors.any():
            keep = np.isin(components, np.unique(components[anchors & (components > 0)]))
        else:
            keep = components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)
        del components
        for z in np.flatnonzero(keep.any(axis=(1, 2))):
            keep[z] = ndimage.binary_fill_holes(keep[z])
        region = cleaned[box]
        region[keep & (region == 0)] = class_index
    return cleaned


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (as slices) holding every True voxel of a 3D mask, or None if it is empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)
