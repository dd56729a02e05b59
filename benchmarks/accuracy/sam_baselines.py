"""Prompted-SAM baselines: the pretrained decoder prompted on every slice where the reference has a structure.

Both are optimistic: they are told, from the reference itself, on which slices each structure is present (its
true extent along the slice axis) and where it lies on each of them.

* "SAM point (centroid)": one positive point at the structure's centroid on that slice (the point may fall outside
  a non-convex structure), plus SAM's padding point (label -1, what ``PromptEncoder.forward`` adds when no box is
  given). A single point is ambiguous, so as SAM's ``multimask_output=True`` the three multimask outputs (1..3) are
  decoded and the one with the highest predicted IoU is kept.
* "SAM box (reference box)": the reference's tight bounding box of the structure on that slice, single-mask output
  (index 0, SAM's ``multimask_output=False``, the MedSAM / LiteMedSAM setting).

Coordinates: slice pixel (row, col) -> model-input pixels by the resize's per-axis scale
(``resized_shape / original_shape``; x = column, y = row). Boxes use pixel edges (x0, y0, x1, y1) with an exclusive
upper corner, as ``FewShotSAMLib.queries.mask_box``; points use the pixel centre ((c + 0.5) * scale - 0.5, since the
prompt encoder adds 0.5). Structures are decoded independently; where their masks overlap, the structure with the
highest logit wins.
"""

from __future__ import annotations

import numpy as np
import torch

from FewShotSAMLib.decoder import box_tokens, decode, point_tokens
from FewShotSAMLib.encoding import EncodedVolume
from FewShotSAMLib.models import SamModel
from FewShotSAMLib.orientation import from_slices, to_slices
from FewShotSAMLib.preprocess import mask_logits_to_stack

POINT = "point"
BOX = "box"


def _queries(reference_slices: np.ndarray, label_values: list[int]) -> list[tuple[int, int]]:
    queries = []
    for z in range(reference_slices.shape[0]):
        present = set(np.unique(reference_slices[z]).tolist())
        queries.extend((z, value) for value in label_values if value in present)
    return queries


def _prompt(mask: np.ndarray, kind: str, scale_rows: float, scale_cols: float) -> np.ndarray:
    if kind == BOX:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        return np.array([cols[0] * scale_cols, rows[0] * scale_rows,
                         (cols[-1] + 1) * scale_cols, (rows[-1] + 1) * scale_rows], dtype=np.float32)
    rows, cols = np.nonzero(mask)
    return np.array([(cols.mean() + 0.5) * scale_cols - 0.5, (rows.mean() + 0.5) * scale_rows - 0.5],
                    dtype=np.float32)


def _decode_batch(model: SamModel, embeddings: torch.Tensor, prompts: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == BOX:
        logits, _ = decode(model, embeddings, box_tokens(model, prompts), mask_index=0)
        return logits
    batch = prompts.shape[0]
    points = torch.cat([prompts[:, None, :], prompts.new_zeros(batch, 1, 2)], dim=1)  # + padding point
    labels = torch.tensor([[1.0, -1.0]], device=prompts.device).expand(batch, -1)
    tokens = point_tokens(model, points, labels)
    candidates = [decode(model, embeddings, tokens, mask_index=index) for index in (1, 2, 3)]
    logits = torch.stack([logits for logits, _ in candidates], dim=1)  # [B, 3, h, w]
    quality = torch.stack([quality for _, quality in candidates], dim=1)  # [B, 3]
    return logits[torch.arange(batch), quality.argmax(dim=1)]


def prompted_sam(model: SamModel, encoded: EncodedVolume, reference: np.ndarray, label_values: list[int],
                 kind: str, batch_size: int = 16) -> np.ndarray:
    """Segment every slice where the reference has a structure, from a prompt derived from the reference.

    reference: the full reference label map [k, j, i] (same grid as the encoded volume). Returns a label map.
    """
    if kind not in (POINT, BOX):
        raise ValueError(f"unknown prompt kind {kind!r}")
    reference_slices = to_slices(np.asarray(reference), encoded.axis)
    rows, cols = reference_slices.shape[1:]
    info = encoded.resize
    scale_rows = info.resized_shape[0] / info.original_shape[0]
    scale_cols = info.resized_shape[1] / info.original_shape[1]
    queries = _queries(reference_slices, label_values)
    best = np.full((reference_slices.shape[0], rows, cols), -np.inf, dtype=np.float32)
    result = np.zeros((reference_slices.shape[0], rows, cols), dtype=np.int32)
    model_device = model.device
    with torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            batch = queries[start:start + batch_size]
            prompts = torch.from_numpy(np.stack([_prompt(reference_slices[z] == value, kind, scale_rows, scale_cols)
                                                 for z, value in batch]))
            embeddings = torch.from_numpy(np.asarray(encoded.embeddings[[z for z, _ in batch]], dtype=np.float32))
            logits = _decode_batch(model, embeddings.to(model_device), prompts.to(model_device), kind)
            on_slices = mask_logits_to_stack(logits.cpu(), info, (rows, cols)).numpy()
            for (z, value), slice_logits in zip(batch, on_slices):
                wins = (slice_logits > 0) & (slice_logits > best[z])
                result[z][wins] = value
                best[z] = np.where(wins, slice_logits, best[z])
    return from_slices(result, encoded.axis)
