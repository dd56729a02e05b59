"""Windowed decoding: a query runs on the embedding window around its box, and lands back in the full frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotSAMLib.decoder import OUTSIDE_LOGIT, box_windows, decode, decode_in_windows, group_by_window, window_sides
from FewShotSAMLib.demo import SAMPLE_IMAGE, SAMPLE_REFERENCE
from FewShotSAMLib.models import load_model
from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side
from FewShotSAMLib.queries import grow_box, mask_boxes, query_tokens
from FewShotSAMLib.volume_io import read_labels, read_volume


@pytest.fixture(scope="module")
def model():
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def kidney_query(model):
    """A real slice of the bundled sample, its embedding and the box of its right kidney (label 2)."""
    volume = read_volume(SAMPLE_IMAGE)
    labels = read_labels(SAMPLE_REFERENCE, volume).array
    index = int(np.argmax((labels == 2).sum(axis=(1, 2))))
    normalised = apply_normalisation(volume.array, choose_normalisation(volume))
    image, _ = resize_stack_longest_side(normalised[index:index + 1], 256, (1.0, 1.0))
    mask, _ = resize_stack_longest_side((labels[index:index + 1] == 2).astype(np.float32), 256, (1.0, 1.0))
    box = grow_box(torch.from_numpy(mask_boxes((mask[0, :1] > 0.5).numpy())[1]), 256)
    return model.encode(image, "fp32"), box, mask[0, 0] > 0.5


def test_mask_boxes_bound_each_non_empty_mask_exactly():
    masks = np.zeros((4, 20, 30), dtype=bool)
    masks[0, 3:7, 5:6] = True
    masks[2, 0, 29] = True
    masks[2, 19, 0] = True  # two far corners: the whole slice
    masks[3, 10:12, 12:20] = True
    present, boxes = mask_boxes(masks)
    assert present.tolist() == [0, 2, 3]  # mask 1 is empty
    assert boxes.tolist() == [[5, 3, 6, 7], [0, 0, 30, 20], [12, 10, 20, 12]]  # x0, y0, x1, y1, upper exclusive


def test_window_sides_cover_the_box_with_a_margin_and_round_up():
    boxes = torch.tensor([[100.0, 100.0, 120.0, 110.0], [0.0, 0.0, 256.0, 256.0]])
    assert window_sides(boxes, 256, 64) == [16, 64]  # 5 cells + 2x4 margin + 1 -> 16; the whole slice -> the grid


def test_windows_stay_inside_the_grid():
    windows = box_windows(torch.tensor([[0.0, 0.0, 10.0, 10.0], [250.0, 240.0, 256.0, 256.0]]), 16, 256, 64)
    assert windows.rows == [0, 48] and windows.cols == [0, 48]


def test_grouping_keeps_every_query_once():
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 200.0, 200.0], [50.0, 50.0, 60.0, 70.0]])
    groups = group_by_window(boxes, 256, 64, batch_size=1)
    assert sorted(index for indices, _ in groups for index in indices) == [0, 1, 2]
    assert all(len(indices) == 1 for indices, _ in groups)


def test_a_full_grid_window_decodes_exactly_like_no_window(model, kidney_query):
    embedding, box, _ = kidney_query
    tokens = query_tokens(model, box, torch.zeros(1, 256))
    full, _ = decode(model, embedding, tokens)
    windowed, _ = decode(model, embedding, tokens, windows=box_windows(box, 64, 256, 64))
    assert torch.allclose(full, windowed, atol=1e-5)


def test_a_kidney_window_outlines_the_kidney_like_the_whole_slice_does(model, kidney_query):
    embedding, box, truth = kidney_query
    tokens = query_tokens(model, box, torch.zeros(1, 256))
    full, _ = decode(model, embedding, tokens)
    (indices, windowed), = list(decode_in_windows(model, lambda i: embedding[i], tokens, box, batch_size=4))
    assert indices == [0] and windowed.shape == full.shape == (1, 256, 256)
    side = window_sides(box, 256, 64)[0]
    assert side < 64, "a kidney should need only part of the slice"
    assert (windowed == OUTSIDE_LOGIT).float().mean() > 0.5  # most of the frame was never decoded
    full_mask, window_mask = full[0] > 0, windowed[0] > 0
    agreement = (full_mask & window_mask).sum() / (full_mask | window_mask).sum()
    assert agreement > 0.9, f"windowed and whole-slice kidney masks overlap by IoU {agreement:.3f} only"
    dice = 2 * (window_mask & truth).sum() / (window_mask.sum() + truth.sum())
    assert dice > 0.8, f"the windowed kidney mask scores Dice {dice:.3f} against the reference"
