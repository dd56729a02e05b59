"""The reformulated mask decoder: SAM's decoder queried with few-shot tokens instead of clicks.

segment-anything's MaskDecoder.predict_masks assumes one image and many prompts (it repeats the image embedding
for each prompt). Here every query pairs its own slice embedding with its own tokens, so a batch can mix slices
and structures; the decoder's own layers are reused unchanged, so its pretrained weights apply.

Windows: a query may run on a square window of the embedding grid around its box instead of the whole grid. The
decoder's cost grows with the number of image tokens (attention, upscaling convolutions, and their gradients when
tuning), and a kidney covers a few percent of a slice, so windows cut tuning and prediction several-fold. Each
window keeps its absolute positional encoding and the upscaling layers only mix neighbouring cells; what changes
is that the tokens' attention no longer sees image content far outside the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import SamModel

WINDOW_MARGIN_CELLS = 4  # grid cells kept around a box on each side (16 px at LiteMedSAM's 256 px input)
WINDOW_STEP_CELLS = 8  # window sides are rounded up to a multiple of this, so queries group into few batches
LOW_RES_PER_CELL = 4  # the decoder's output has 4x the embedding grid's resolution
OUTSIDE_LOGIT = -20.0  # logit of low-resolution pixels outside a query's window (probability ~2e-9)


@dataclass
class Windows:
    """Square windows of the embedding grid, one per query, all of one side so that they batch."""

    rows: list[int]  # top-left cell of each window
    cols: list[int]
    side: int  # cells

    def crop(self, maps: torch.Tensor) -> torch.Tensor:
        """[B or 1, C, H, W] maps on the embedding grid -> [B, C, side, side] (a single map serves every window)."""
        return torch.stack([maps[min(index, maps.shape[0] - 1), :, row:row + self.side, col:col + self.side]
                            for index, (row, col) in enumerate(zip(self.rows, self.cols))])

    def paste(self, logits: torch.Tensor, grid: int) -> torch.Tensor:
        """Window logits [B, s, s] -> full low-resolution logits [B, 4*grid, 4*grid], OUTSIDE_LOGIT elsewhere."""
        full = logits.new_full((logits.shape[0], grid * LOW_RES_PER_CELL, grid * LOW_RES_PER_CELL), OUTSIDE_LOGIT)
        side = self.side * LOW_RES_PER_CELL
        for index, (row, col) in enumerate(zip(self.rows, self.cols)):
            full[index, row * LOW_RES_PER_CELL:row * LOW_RES_PER_CELL + side,
                 col * LOW_RES_PER_CELL:col * LOW_RES_PER_CELL + side] = logits[index]
        return full


def window_sides(boxes: torch.Tensor, input_size: int, grid: int) -> list[int]:
    """Side (cells) of the window each [x0, y0, x1, y1] box needs: the box plus a margin, rounded up."""
    cell = input_size / grid
    extent = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / cell
    sides = torch.ceil((extent + 2 * WINDOW_MARGIN_CELLS + 1) / WINDOW_STEP_CELLS) * WINDOW_STEP_CELLS
    return sides.clamp(max=grid).long().tolist()


def box_windows(boxes: torch.Tensor, side: int, input_size: int, grid: int) -> Windows:
    """Windows of `side` cells centred on each box and moved inside the grid."""
    cell = input_size / grid
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 / cell  # (x, y) in cells
    starts = torch.round(centres - side / 2).clamp(0, grid - side).long()
    return Windows(starts[:, 1].tolist(), starts[:, 0].tolist(), side)


def group_by_window(boxes: torch.Tensor, input_size: int, grid: int,
                    batch_size: int) -> list[tuple[list[int], Windows]]:
    """Split queries into batches of equal window side: [(query indices, their windows)]."""
    sides = window_sides(boxes, input_size, grid)
    groups = []
    for side in sorted(set(sides)):
        members = [index for index, s in enumerate(sides) if s == side]
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            groups.append((chunk, box_windows(boxes[chunk], side, input_size, grid)))
    return groups


def box_tokens(model: SamModel, boxes: torch.Tensor) -> torch.Tensor:
    """Prompt-encoder tokens for [B, 4] boxes (x0, y0, x1, y1 in model-input pixels): [B, 2, C]."""
    return model.prompt_encoder._embed_boxes(boxes)


def point_tokens(model: SamModel, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Prompt-encoder tokens for [B, N, 2] points (x, y in model-input pixels) with labels 1/0: [B, N, C]."""
    return model.prompt_encoder._embed_points(points, labels, pad=False)


def positional_tokens(model: SamModel, points_xy: torch.Tensor) -> torch.Tensor:
    """The prompt encoder's positional encoding of [B, 2] points (model-input pixels), [B, C]."""
    size = model.spec.input_size
    return model.prompt_encoder.pe_layer.forward_with_coords(points_xy[:, None, :] + 0.5, (size, size))[:, 0]


def decode(model: SamModel, embeddings: torch.Tensor, tokens: torch.Tensor, mask_index: int = 0,
           windows: Windows | None = None):
    """Run the mask decoder for B queries.

    embeddings: [B, C, H, W] image embeddings (one per query), tokens: [B, T, C] prompt tokens, windows: run each
    query on its window only (the result is then pasted back into the full frame).
    Returns low-resolution mask logits [B, 4H, 4W] (model-input pixels / (input_size / 4H)) and the decoder's
    quality score [B] for the chosen mask output.
    """
    decoder = model.mask_decoder
    batch, _, grid, _ = embeddings.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    all_tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), tokens], dim=1)
    no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    positions = model.image_pe()
    if windows is not None:
        embeddings, positions = windows.crop(embeddings), windows.crop(positions)
    src = embeddings + no_mask
    pos_src = positions.expand(batch, -1, -1, -1)
    _, channels, height, width = src.shape
    hidden, src = decoder.transformer(src, pos_src, all_tokens)
    iou_token_out = hidden[:, 0, :]
    mask_token_out = hidden[:, 1 + mask_index, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height, width))
    hyper = decoder.output_hypernetworks_mlps[mask_index](mask_token_out)
    b, c, h, w = upscaled.shape
    logits = torch.bmm(hyper.unsqueeze(1), upscaled.reshape(b, c, h * w)).reshape(b, h, w)
    quality = decoder.iou_prediction_head(iou_token_out)[:, mask_index]
    if windows is not None:
        logits = windows.paste(logits, grid)
    return logits, quality


def decode_in_windows(model: SamModel, embeddings_of, tokens: torch.Tensor, boxes: torch.Tensor, batch_size: int):
    """Decode B queries, each on the window around its box, in batches of equal window side.

    embeddings_of(indices) -> [len, C, H, W] embeddings of those queries. Yields (query indices, full-frame
    low-resolution logits [len, 4H, 4W]) batch by batch.
    """
    grid = model.spec.embedding_shape[-1]
    for indices, windows in group_by_window(boxes, model.spec.input_size, grid, batch_size):
        logits, _ = decode(model, embeddings_of(indices), tokens[indices], windows=windows)
        yield indices, logits
