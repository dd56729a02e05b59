"""The few-shot prompts computed from a collection: each structure's token and the class maps on the embedding grid."""

from __future__ import annotations

import numpy as np
import torch

from FewShotSAMLib.fewshot import IGNORE, FewShotCollection
from FewShotSAMLib.prompts import structure_tokens
from FewShotSAMLib.volume import Segment

GRID = 16  # embedding grid cells; the model input is 4 px per cell
SEGMENTS = [Segment("liver", 1), Segment("kidney", 2), Segment("spleen", 4)]


def painted_targets(n_slices: int) -> torch.Tensor:
    """Liver on every slice, kidney on the first only, no spleen; the last 2 rows of cells are padding."""
    targets = torch.zeros((n_slices, GRID * 4, GRID * 4), dtype=torch.uint8)
    targets[:, 8:32, 4:40] = 1
    targets[0, 40:52, 44:60] = 2
    targets[:, (GRID - 2) * 4:] = IGNORE
    return targets


def collection(n_slices: int = 3, seed: int = 0) -> FewShotCollection:
    embeddings = torch.randn(n_slices, 8, GRID, GRID, generator=torch.Generator().manual_seed(seed))
    result = FewShotCollection(list(SEGMENTS))
    result.add(embeddings, painted_targets(n_slices), [(0, z) for z in range(n_slices)], torch.zeros(n_slices, 4))
    return result


def test_a_structure_token_is_the_mean_embedding_of_its_cells_over_every_labelled_slice():
    few = collection()
    tokens = structure_tokens(few)
    assert tokens.shape == (3, 8)
    coarse = few.coarse_targets(GRID).numpy()
    embeddings = few.embeddings.numpy().transpose(0, 2, 3, 1)  # [N, H, W, C]
    for class_index in (1, 2):
        expected = embeddings[coarse == class_index].mean(axis=0)
        np.testing.assert_allclose(tokens[class_index - 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (coarse == 2).sum() == 12  # the kidney's 3 x 4 cells on slice 0 alone
    assert torch.all(tokens[2] == 0)  # never painted: a zero token, not NaN


def test_the_grid_class_maps_follow_the_slices_added_after_they_were_first_asked_for():
    few = collection(n_slices=2)
    assert few.coarse_targets(GRID).shape == (2, GRID, GRID)
    more = collection(n_slices=1, seed=1)
    few.add(more.embeddings, torch.full_like(more.targets, 2), [(1, 0)], torch.zeros(1, 4))  # all kidney
    coarse = few.coarse_targets(GRID)
    assert coarse.shape == (3, GRID, GRID)
    assert torch.all(coarse[2] == 2)
    assert torch.all(coarse[:, GRID - 2:][:2] == IGNORE)  # padding cells of the first slices stay ignored
    assert few.coarse_targets(GRID // 2).shape == (3, GRID // 2, GRID // 2)  # another grid, pooled anew
