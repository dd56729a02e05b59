"""The few-shot collection: labelled slices, their embeddings, and the structures painted on them.

A labelled slice is taken as fully labelled: every structure absent from it is absent there (a negative). By
default the labelled slices are those with any non-zero label; callers can also declare empty slices as labelled.
Structures are identified by their label value, which is what lets a collection from several scans (or a saved
model applied to a new scan) agree on what "structure 2" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .encoding import EncodedVolume
from .errors import FewShotSAMError
from .orientation import to_slices
from .preprocess import ResizeInfo
from .volume import HasSegments, Segment

IGNORE = 255  # target value for the zero padding the longest-side resize adds: neither structure nor background


@dataclass
class FewShotCollection(HasSegments):
    segments: list[Segment]  # one per structure, in class order (class c + 1 <-> segments[c])
    embeddings: torch.Tensor = None  # [N, C, H, W] float32, the labelled slices
    targets: torch.Tensor = None  # [N, S, S] uint8 class maps at model-input resolution (0 bg, c+1, IGNORE)
    sources: list[tuple[int, int]] = field(default_factory=list)  # (scan number, slice index) per labelled slice
    body_boxes: torch.Tensor = None  # [N, 4] each labelled slice's body box in embedding-grid cells (body_frame.py)
    # [N, H, W, 2] registered image-frame positions of every cell (registration.py): only a second pass on a
    # registered query has them; None: each cell's own position
    positions: torch.Tensor | None = None
    # (targets, grid, coarse_targets' result): a cache, so neither an argument nor part of equality
    _coarse: tuple = field(default=(None, None, None), init=False, repr=False, compare=False)

    def coarse_targets(self, grid: int) -> torch.Tensor:
        """Class maps pooled to the embedding grid [N, grid, grid] (majority by area; IGNORE where mostly padding).
        Kept for the targets they were pooled from: adapting asks three times (classifier, tokens, footprints)."""
        targets, pooled_grid, pooled = self._coarse
        if targets is not self.targets or pooled_grid != grid:
            pooled = pool_class_maps(self.targets, self.n_classes, grid)
            self._coarse = (self.targets, grid, pooled)
        return pooled

    def add(self, embeddings: torch.Tensor, targets: torch.Tensor, sources: list[tuple[int, int]],
            body_boxes: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        if (positions is None) != (self.positions is None) and self.embeddings is not None:
            raise ValueError("slices with registered positions cannot be mixed with slices without")
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions])
        self.embeddings = embeddings if self.embeddings is None else torch.cat([self.embeddings, embeddings])
        self.targets = targets if self.targets is None else torch.cat([self.targets, targets])
        self.sources.extend(sources)
        self.body_boxes = body_boxes if self.body_boxes is None else torch.cat([self.body_boxes, body_boxes])


def labelled_slice_indices(label_slices: np.ndarray, extra_labelled: list[int] | None = None) -> list[int]:
    """Slices with any non-zero label, plus the ones the user declared labelled (fully, so possibly empty)."""
    painted = np.flatnonzero(label_slices.reshape(label_slices.shape[0], -1).any(axis=1)).tolist()
    extra = [] if extra_labelled is None else list(extra_labelled)
    for index in extra:
        if not 0 <= index < label_slices.shape[0]:
            raise FewShotSAMError(f"--labelled-slices: slice {index} is outside 0..{label_slices.shape[0] - 1}")
    return sorted(set(painted) | set(extra))


def class_maps(label_slices: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Label values -> class indices (0 background, c + 1 for label_values[c]); unknown values -> background."""
    classes = np.zeros(label_slices.shape, dtype=np.uint8)
    for index, value in enumerate(label_values):
        classes[label_slices == value] = index + 1
    return classes


def class_maps_to_model_space(classes: np.ndarray, n_classes: int, resize: ResizeInfo) -> torch.Tensor:
    """[m, rows, cols] class maps -> [m, S, S] at model-input resolution, as the image slices were resized."""
    one_hot = F.one_hot(torch.as_tensor(classes, dtype=torch.long), n_classes).permute(0, 3, 1, 2).float()
    rows, cols = resize.resized_shape
    shrinking = rows < classes.shape[1] or cols < classes.shape[2]
    resized = F.interpolate(one_hot, size=(rows, cols), mode="bilinear", align_corners=False, antialias=shrinking)
    result = torch.full((classes.shape[0], resize.target, resize.target), IGNORE, dtype=torch.uint8)
    result[:, :rows, :cols] = resized.argmax(1).to(torch.uint8)
    return result


def pool_class_maps(targets: torch.Tensor, n_classes: int, grid: int) -> torch.Tensor:
    valid = targets != IGNORE
    one_hot = F.one_hot(torch.where(valid, targets, 0).long(), n_classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * valid[:, None]
    pooled = F.adaptive_avg_pool2d(one_hot, grid)
    result = pooled.argmax(1).to(torch.uint8)
    result[pooled.sum(1) < 0.5] = IGNORE
    return result


def collect(encoded: EncodedVolume, labels_array: np.ndarray, segments: list[Segment], scan_number: int = 0,
            collection: FewShotCollection | None = None, extra_labelled: list[int] | None = None) -> FewShotCollection:
    """Add one scan's labelled slices to a collection (a new one if none is given)."""
    collection = collection or FewShotCollection(segments=list(segments))
    label_slices = to_slices(labels_array, encoded.axis)
    indices = labelled_slice_indices(label_slices, extra_labelled)
    if not indices:
        raise FewShotSAMError("no labelled slice: the label map is empty and no slice was declared labelled")
    classes = class_maps(label_slices[indices], collection.label_values)
    targets = class_maps_to_model_space(classes, collection.n_classes, encoded.resize)
    embeddings = encoded.float32_embeddings(indices)
    collection.add(embeddings, targets, [(scan_number, index) for index in indices], encoded.body_boxes(indices))
    return collection
