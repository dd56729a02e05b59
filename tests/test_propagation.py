"""Where a structure is on a scan with no labels of its own: the structures' footprints and the component choice.

On CHAOS, adapted on every slice of scan 1 and applied to scan 15, the pixel prompts found the liver in two 3D
components of similar size (2778 and 2580 cells: another region and the liver). The largest one won by 8% with fp32
embeddings (liver Dice 0.002) and lost with bf16 ones (0.49): the result hung on the encoder's precision. Their
centres lie 21 cells apart on the 64-cell grid, the liver's 6 cells from where the liver lay on scan 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from FewShotSAMLib.adapter import AdaptOptions, FewShotAdapter, adapt
from FewShotSAMLib.fewshot import FewShotCollection
from FewShotSAMLib.models import load_model
from FewShotSAMLib.prompts import FOOTPRINT_SIGMA, structure_footprints
from FewShotSAMLib.propagation import most_likely_component, structure_cells
from FewShotSAMLib.volume import Segment

GRID = 64
SEGMENTS = [Segment("liver", 1, (0.9, 0.5, 0.4)), Segment("spleen", 4, (0.6, 0.4, 0.6))]


def box(shape, rows, cols, slices=slice(None)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices, rows, cols] = True
    return mask


def collection_with_liver_at(rows: slice, cols: slice, n_slices: int = 4) -> FewShotCollection:
    """A collection whose slices (model input 256 px, 4 px per grid cell) hold the liver in the given grid cells and
    no spleen anywhere. Embeddings are random: the footprint depends on the targets alone."""
    targets = torch.zeros((n_slices, GRID * 4, GRID * 4), dtype=torch.uint8)
    targets[:, rows.start * 4:rows.stop * 4, cols.start * 4:cols.stop * 4] = 1
    embeddings = torch.randn(n_slices, 8, GRID, GRID, generator=torch.Generator().manual_seed(0))
    return FewShotCollection(list(SEGMENTS), embeddings, targets, [(0, z) for z in range(n_slices)])


def test_footprint_peaks_where_the_structure_was_painted_and_is_empty_for_an_unpainted_one():
    footprints = structure_footprints(collection_with_liver_at(slice(20, 40), slice(5, 25)))
    assert footprints.shape == (2, GRID, GRID)
    liver = footprints[0].numpy()
    assert liver.max() == pytest.approx(1.0)
    peak = np.unravel_index(np.argmax(liver), liver.shape)
    assert 20 <= peak[0] < 40 and 5 <= peak[1] < 25
    # Blurred, not a hard mask: a cell one blur width outside the painted area still counts, a far one hardly.
    assert liver[30, 25 + int(FOOTPRINT_SIGMA)] > 0.1
    assert liver[30, 60] < 0.05
    assert not footprints[1].any()


def test_the_component_where_the_structure_was_painted_wins_over_a_slightly_larger_one_elsewhere():
    shape = (10, GRID, GRID)
    painted_here = box(shape, slice(22, 36), slice(8, 22))  # where the footprint is
    elsewhere = box(shape, slice(40, 55), slice(30, 45))  # larger (15x15 vs 14x14 cells), equally confident
    components, count = ndimage.label(painted_here | elsewhere)
    assert count == 2
    probability = np.where(painted_here | elsewhere, 0.85, 0.0)
    footprint = structure_footprints(collection_with_liver_at(slice(20, 40), slice(5, 25)))[0].numpy()
    chosen = most_likely_component(components, probability, footprint)
    assert (components == chosen).sum() == painted_here.sum()
    # Without a footprint (a model saved before footprints existed), the probability mass decides: the larger one.
    chosen = most_likely_component(components, probability, None)
    assert (components == chosen).sum() == elsewhere.sum()


def test_a_structure_found_only_outside_its_footprint_is_still_found():
    shape = (6, GRID, GRID)
    only = box(shape, slice(45, 60), slice(45, 60), slice(1, 5))
    probabilities = torch.zeros((6, 3, GRID, GRID))
    probabilities[:, 0] = 1
    probabilities[:, 0][torch.from_numpy(only)] = 0.1
    probabilities[:, 1][torch.from_numpy(only)] = 0.9
    footprints = structure_footprints(collection_with_liver_at(slice(5, 15), slice(5, 15)))
    kept = structure_cells(probabilities, None, [], footprints)
    assert np.array_equal(kept[:, 0], only)
    assert not kept[:, 1].any()


def test_footprints_are_saved_with_the_model_and_older_files_load_without_them(tmp_path):
    model = load_model("litemedsam", device="cpu")
    collection = collection_with_liver_at(slice(20, 40), slice(5, 25))
    collection.embeddings = torch.randn(4, 256, GRID, GRID, generator=torch.Generator().manual_seed(1))
    # The image frame: this collection of made-up slices has no images to find a body in.
    adapter = adapt(model, collection, AdaptOptions(prompt_steps=5, decoder_steps=0, position_frame="image"))
    assert adapter.footprints.shape == (2, GRID, GRID)
    loaded = FewShotAdapter.load(adapter.save(tmp_path / "liver.fsam"))
    assert torch.equal(loaded.footprints, adapter.footprints)

    payload = torch.load(tmp_path / "liver.fsam", weights_only=True)
    del payload["footprints"]  # as written by FewShotSAM before footprints existed
    torch.save(payload, tmp_path / "older.fsam")
    older = FewShotAdapter.load(tmp_path / "older.fsam")
    assert older.footprints is None
    assert torch.equal(older.tokens, adapter.tokens)
