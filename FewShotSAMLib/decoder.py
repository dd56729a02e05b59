"""The reformulated mask decoder: SAM's decoder queried with few-shot tokens instead of clicks.

segment-anything's MaskDecoder.predict_masks assumes one image and many prompts (it repeats the image embedding
for each prompt). Here every query pairs its own slice embedding with its own tokens, so a batch can mix slices
and structures; the decoder's own layers are reused unchanged, so its pretrained weights apply.
"""

from __future__ import annotations

import torch

from .models import SamModel


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


def decode(model: SamModel, embeddings: torch.Tensor, tokens: torch.Tensor, mask_index: int = 0):
    """Run the mask decoder for B queries.

    embeddings: [B, C, H, W] image embeddings (one per query), tokens: [B, T, C] prompt tokens.
    Returns low-resolution mask logits [B, 4H, 4W] (model-input pixels / (input_size / 4H)) and the decoder's
    quality score [B] for the chosen mask output.
    """
    decoder = model.mask_decoder
    batch = embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    all_tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), tokens], dim=1)
    no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    src = embeddings + no_mask
    pos_src = model.image_pe().expand(batch, -1, -1, -1)
    _, channels, height, width = src.shape
    hidden, src = decoder.transformer(src, pos_src, all_tokens)
    iou_token_out = hidden[:, 0, :]
    mask_token_out = hidden[:, 1 + mask_index, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height, width))
    hyper = decoder.output_hypernetworks_mlps[mask_index](mask_token_out)
    b, c, h, w = upscaled.shape
    logits = torch.bmm(hyper.unsqueeze(1), upscaled.reshape(b, c, h * w)).reshape(b, h, w)
    quality = decoder.iou_prediction_head(iou_token_out)[:, mask_index]
    return logits, quality
