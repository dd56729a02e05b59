"""Few-shot prompts computed from the image embeddings under each structure's mask.

Two kinds, both learned from the labelled slices only:
- Pixel prompts: a small classifier over every embedding-grid cell (its L2-normalised embedding plus its
  position in the slice) that says background or which structure. All structures are classified jointly, so
  they compete (left and right kidney look alike; their position tells them apart) and background is modelled
  explicitly, which is what lets the engine decide where a structure starts and ends.
- Structure tokens: the mask-pooled embedding of each structure (the paper's few-shot embedding), given to the
  mask decoder as a prompt token together with a box from the pixel prompts.
- Footprints: where in the slice plane each structure was painted, blurred. On a scan with no labels of its own,
  the pixel prompts can find a structure in two places of similar size (the liver and a region 10 cm away); the
  footprint tells which of them lies where the structure lay on the labelled slices.

Positions (the classifier's and the footprints') are in one of two frames (body_frame.py): the image frame (the
padded model-input square, every adapter made before body frames) or the body frame (relative to the body's
bounding box on each slice), which carries over between patients who lie at different places and sizes. On a scan
registered to an image-frame adapter's support scan (registration.py), each cell's position is instead where that
cell's anatomy lies in the support's image frame: the "registered" positions, given per slice as [n, H, W, 2].
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .body_frame import BODY_FRAME, FRAMES, IMAGE_FRAME, cell_positions, from_body_frame, to_body_frame
from .fewshot import IGNORE, FewShotCollection
from .progress import NO_PROGRESS, Progress

FEATURE_SCALE = 16.0  # normalised embeddings scaled so that a linear layer can be sharp from the start
POSITION_SCALE = 4.0  # position features matter as much as a few embedding channels, not more
# In the body frame a position means the same place in another patient, so it may weigh more (protocol 2 on the
# development pairs, benchmarks/results/protocol2_body_frame.md).
BODY_POSITION_SCALE = 16.0
# Footprint blur in embedding-grid cells (3/16 of the field of view on the 64-cell grid, ~6 cm on an abdominal MRI):
# patients lie a few centimetres apart between scans, so a sharper footprint would reject a kidney that moved,
# while organs that the pixel prompts confuse lie much further apart (measured across CHAOS scan pairs).
FOOTPRINT_SIGMA = 12.0


def embedding_features(embeddings: torch.Tensor, body_boxes: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C, H, W] embeddings -> [B, H, W, C + 2] per-cell features (normalised embedding, x, y): x, y in -1..1
    across the image (body_boxes None, the image frame) or across each slice's body box ([B, 4], the body frame);
    positions [B, H, W, 2]: the image-frame positions to use instead of each cell's own (registered positions)."""
    batch, _, height, width = embeddings.shape
    cells = F.normalize(embeddings.float().permute(0, 2, 3, 1), dim=-1) * FEATURE_SCALE
    if positions is not None:
        position = positions[..., :2].to(embeddings.device, torch.float32) * POSITION_SCALE
    elif body_boxes is None:
        ys = torch.linspace(-1, 1, height, device=embeddings.device)
        xs = torch.linspace(-1, 1, width, device=embeddings.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        position = torch.stack([grid_x, grid_y], dim=-1).expand(batch, height, width, 2) * POSITION_SCALE
    else:
        position = cell_positions(body_boxes, height, width).to(embeddings.device) * BODY_POSITION_SCALE
    return torch.cat([cells, position], dim=-1)


class PixelClassifier(nn.Module):
    def __init__(self, n_features: int, n_classes: int, hidden: int = 128, frame: str = IMAGE_FRAME):
        super().__init__()
        if frame not in FRAMES:
            raise ValueError(f"unknown position frame {frame!r} (known: {', '.join(FRAMES)})")
        self.frame = frame
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, n_classes))

    def forward(self, embeddings: torch.Tensor, body_boxes: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] embeddings -> class probabilities [B, n_classes, H, W]; body_boxes [B, 4]: the slices'
        body boxes in grid cells, needed in the body frame (ignored in the image frame); positions [B, H, W, 2]:
        registered image-frame positions (image frame only; None: each cell's own)."""
        return self.net(self.features(embeddings, body_boxes, positions)).softmax(-1).permute(0, 3, 1, 2)

    def features(self, embeddings: torch.Tensor, body_boxes: torch.Tensor | None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.frame == IMAGE_FRAME:
            return embedding_features(embeddings, positions=positions)
        if body_boxes is None:
            raise ValueError("a body-frame pixel classifier needs each slice's body box")
        return embedding_features(embeddings, body_boxes)


def train_pixel_classifier(collection: FewShotCollection, steps: int = 200, learning_rate: float = 3e-3,
                           batch_cells: int = 2048, seed: int = 0, progress: Progress = NO_PROGRESS,
                           start: PixelClassifier | None = None, frame: str = IMAGE_FRAME) -> PixelClassifier:
    """A pixel classifier trained on every labelled cell of the collection, with positions in `frame`; start: go
    on training a copy of this one (a warm start, in its own frame) instead of a new one."""
    generator = torch.Generator().manual_seed(seed)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    grid = collection.embeddings.shape[-1]
    targets = collection.coarse_targets(grid).reshape(-1).long()
    if start is None:
        classifier = PixelClassifier(collection.embeddings.shape[1] + 2, collection.n_classes, frame=frame)
    else:
        classifier = copy.deepcopy(start).train().requires_grad_(True)
    features = classifier.features(collection.embeddings, collection.body_boxes, collection.positions)
    features = features.reshape(targets.shape[0], -1)
    keep = targets != IGNORE
    features, targets = features[keep], targets[keep]
    # Rare classes (a small kidney next to a large background) get more weight, dampened by a square root so
    # that background stays well modelled: false positives outside the structures are the error that matters.
    counts = torch.bincount(targets, minlength=collection.n_classes).float().clamp(min=1)
    weights = (counts.sum() / counts).sqrt()
    weights = weights / weights.mean()
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-2)
    for step in range(steps):
        # Random mini-batches of cells: as accurate as full batches here, and several times cheaper.
        pick = torch.randint(targets.shape[0], (min(batch_cells, targets.shape[0]),), generator=generator)
        loss = F.cross_entropy(classifier.net(features[pick]), targets[pick], weight=weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == steps - 1:
            progress.update("prompts", step + 1, steps, "learning few-shot prompts")
    torch.random.set_rng_state(generator_state)
    return classifier.eval().requires_grad_(False)


def structure_tokens(collection: FewShotCollection) -> torch.Tensor:
    """Mask-pooled embedding of each structure over all its labelled slices: [S, C] (zeros if never present)."""
    grid = collection.embeddings.shape[-1]
    coarse = collection.coarse_targets(grid)
    classes = torch.arange(1, collection.n_classes, dtype=coarse.dtype)
    embeddings = collection.embeddings.flatten(2)  # [N, C, H*W]
    weights = (coarse.flatten(1)[:, None] == classes[:, None]).to(embeddings.dtype)  # [N, S, H*W]
    # A product per slice (no masked copy of every embedding per structure), summed over the slices.
    pooled = torch.bmm(weights, embeddings.transpose(1, 2)).sum(dim=0)  # [S, C]
    return pooled / weights.sum(dim=(0, 2)).clamp(min=1)[:, None]


def structure_footprints(collection: FewShotCollection, sigma: float = FOOTPRINT_SIGMA,
                         frame: str = IMAGE_FRAME) -> torch.Tensor:
    """[S, H, W] in 0..1: the share of a structure's labelled slices on which each embedding-grid cell belongs to
    it, blurred by `sigma` cells and scaled to a maximum of 1 (all zeros for a structure never painted). In the
    body frame the cells are those of an H x W grid over each slice's body box (see footprint_weights); with
    registered positions (collection.positions) each cell is moved to the support's image-frame cell it lies on."""
    grid = collection.embeddings.shape[-1]
    coarse = collection.coarse_targets(grid)
    if frame == IMAGE_FRAME and collection.positions is not None:
        coarse = to_registered_cells(coarse, collection.positions)
    if frame == BODY_FRAME:
        one_hot = F.one_hot(torch.where(coarse == IGNORE, 0, coarse).long(), collection.n_classes)
        resampled = to_body_frame(one_hot.permute(0, 3, 1, 2), collection.body_boxes, grid)
        coarse = resampled.argmax(1) * (resampled.amax(1) >= 0.5)
    coarse = coarse.numpy()
    footprints = []
    for class_index in range(1, collection.n_classes):
        cells = coarse == class_index
        present = cells.any(axis=(1, 2))
        share = cells[present].mean(axis=0) if present.any() else np.zeros(coarse.shape[1:])
        blurred = ndimage.gaussian_filter(share.astype(np.float64), sigma)
        footprints.append(blurred / blurred.max() if blurred.max() > 0 else blurred)
    return torch.from_numpy(np.stack(footprints).astype(np.float32))


def to_registered_cells(coarse: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N, H, W] class maps of query slices -> [N, H, W] on the support's image-frame grid: each query cell's class
    written at the support cell nearest its registered position [N, H, W, 2] (cells none lands on: background).
    Gaps where the query is larger than the support vanish in the footprint's blur of FOOTPRINT_SIGMA cells."""
    n, height, width = coarse.shape
    column = torch.round((positions[..., 0] + 1) / 2 * (width - 1)).long()
    row = torch.round((positions[..., 1] + 1) / 2 * (height - 1)).long()
    inside = (column >= 0) & (column < width) & (row >= 0) & (row < height) & (coarse != IGNORE)
    moved = torch.zeros_like(coarse)
    slice_index = torch.arange(n)[:, None, None].expand(n, height, width)
    moved[slice_index[inside], row[inside], column[inside]] = coarse[inside]
    return moved


def footprint_weights(footprints: torch.Tensor, frame: str, body_boxes: torch.Tensor | None,
                      height: int, width: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """[S, H, W] footprints -> [S, 1, H, W] (image frame: the same on every slice) or [S, n, H, W] (body frame:
    each slice's cells looked up in the footprint over its body box; registered positions [n, H, W, 2]: each cell
    looked up at its position in the support's image frame) weights on the embedding grid."""
    if frame == IMAGE_FRAME and positions is not None:
        # Image-frame positions put cell j at -1 + 2 j / (W - 1): grid_sample's align_corners=True convention.
        expanded = footprints.float()[None].expand(positions.shape[0], -1, -1, -1)
        looked_up = F.grid_sample(expanded, positions[..., :2].float(), mode="bilinear", padding_mode="zeros",
                                  align_corners=True)
        return looked_up.permute(1, 0, 2, 3)
    if frame == IMAGE_FRAME:
        return footprints[:, None]
    return from_body_frame(footprints, body_boxes, height, width).permute(1, 0, 2, 3)
