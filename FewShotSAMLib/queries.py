"""What the tuned mask decoder is asked: one query per (slice, structure), a box and the structure's few-shot token.

Tuning and prediction build their queries here, so that both ask the decoder the same way: both take boxes with
mask_boxes, tuning from the painted masks (then jittered by jitter_boxes), prediction from the embedding-grid cells
the pixel prompts keep (scaled to pixels); both grow them by the same margin (grow_box) and turn them into tokens
with query_tokens. A new prompt type (points, a coarse mask) belongs here, with its tokens built from decoder.py's
prompt-encoder helpers.
"""

from __future__ import annotations

import numpy as np
import torch

from .decoder import box_tokens, positional_tokens
from .models import SamModel

BOX_MARGIN = 0.05  # boxes handed to the decoder are grown by this fraction of their size (and 2 px) each side


def mask_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (x0, y0, x1, y1 in pixels, exclusive upper corner) of boolean [N, H, W] masks, all at once:
    (indices of the non-empty masks, their boxes [n, 4] float32)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # [N, H], [N, W]
    present = np.flatnonzero(rows.any(axis=1))
    rows, cols = rows[present], cols[present]
    ends_row = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    ends_col = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([cols.argmax(axis=1), rows.argmax(axis=1), ends_col, ends_row], axis=1)
    return present, boxes.astype(np.float32)


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
