"""What the tuned mask decoder is asked: one query per (slice, structure), a box and the structure's few-shot token.

Tuning and prediction build their queries here, so that both ask the decoder the same way: tuning takes its boxes
from the painted masks (mask_box, jittered by jitter_boxes), prediction from the cells the pixel prompts keep
(cell_boxes); both grow them by the same margin (grow_box) and turn them into tokens with query_tokens. A new prompt
type (points, a coarse mask) belongs here, with its tokens built from decoder.py's prompt-encoder helpers.
"""

from __future__ import annotations

import numpy as np
import torch

from .decoder import box_tokens, positional_tokens
from .models import SamModel

BOX_MARGIN = 0.05  # boxes handed to the decoder are grown by this fraction of their size (and 2 px) each side


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    """Bounding box (x0, y0, x1, y1) of a boolean [H, W] mask, in pixels; exclusive upper corner."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()


def cell_boxes(cells: np.ndarray, cell_size: float) -> np.ndarray:
    """Bounding box (x0, y0, x1, y1) of a boolean [h, w] map of embedding-grid cells, in model-input pixels."""
    rows = np.flatnonzero(cells.any(axis=1))
    cols = np.flatnonzero(cells.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32) * cell_size


def grow_box(box: torch.Tensor, size: int, margin: float = BOX_MARGIN, pixels: float = 2.0) -> torch.Tensor:
    width, height = box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]
    delta = torch.stack([-width * margin - pixels, -height * margin - pixels,
                         width * margin + pixels, height * margin + pixels], dim=-1)
    return (box + delta).clamp(0, size)


def jitter_boxes(boxes: torch.Tensor, size: int, generator: torch.Generator, amount: float = 0.08) -> torch.Tensor:
    """Move each box side by up to `amount` of the box size: at inference the box comes from the coarse pixel
    prompts, not from the truth, so the decoder must learn to outline the structure from an imprecise box."""
    width = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    height = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    scale = torch.stack([width, height, width, height], dim=1)
    noise = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * amount * scale
    return grow_box(boxes + noise, size)


def query_tokens(model: SamModel, boxes: torch.Tensor, structure_tokens: torch.Tensor) -> torch.Tensor:
    """Decoder prompt tokens for B queries: the box's two corner tokens and the structure's few-shot token,
    placed (by adding the prompt encoder's positional encoding) at the box centre. [B, 3, C]."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    structure = structure_tokens + positional_tokens(model, centres)
    return torch.cat([box_tokens(model, boxes), structure[:, None]], dim=1)
