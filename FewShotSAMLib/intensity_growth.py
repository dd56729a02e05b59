"""Seeded growth along the image's intensities: each voxel goes to the seed label it reaches most cheaply.

A path between neighbouring voxels (6-neighbourhood) costs the absolute difference of their intensities, so a label
spreads freely through tissue that looks like its seed and stops at edges: the idea of Slicer's "Grow from seeds"
(a grow-cut whose path cost is the summed intensity difference), written as a shortest-path search. The small
structure blend (small_structures.py) averages the grown outline into its result: in place of the painted shape
for a structure painted on one or two slices, beside it for one painted on more.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import dijkstra

# Added to every step, as a fraction of the intensity range, so that through tissue of even intensity the nearer
# seed wins instead of a tie going to whichever label comes first; small enough never to outweigh a real
# intensity difference.
STEP_COST = 1e-6


def grown_labels(image: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The label map ([same shape as image]) where every voxel carries the value of the seed it reaches at the least
    summed intensity difference. seeds: 0 = no seed, any other value = a seed of that label. Voxels that no seed
    reaches (none: the grid is connected) keep 0."""
    if image.shape != seeds.shape:
        raise ValueError(f"image shape {image.shape} differs from seeds shape {seeds.shape}")
    values = [int(value) for value in np.unique(seeds) if value != 0]
    if not values:
        return np.zeros_like(seeds)
    graph = intensity_graph(np.asarray(image, dtype=np.float64))
    flat_seeds = seeds.ravel()
    costs = np.stack([dijkstra(graph, directed=False, indices=np.flatnonzero(flat_seeds == value), min_only=True)
                      for value in values])
    labels = np.asarray(values, dtype=seeds.dtype)[costs.argmin(axis=0)]
    labels[~np.isfinite(costs.min(axis=0))] = 0
    return labels.reshape(seeds.shape)


def intensity_graph(image: np.ndarray) -> sparse.csr_matrix:
    """The 6-neighbourhood grid graph of a 3D image, each edge weighted by its two voxels' intensity difference."""
    index = np.arange(image.size).reshape(image.shape)
    flat = image.ravel()
    floor = STEP_COST * max(float(flat.max() - flat.min()), 1.0)
    sources, targets = [], []
    for axis in range(image.ndim):
        lower = [slice(None)] * image.ndim
        upper = [slice(None)] * image.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        sources.append(index[tuple(lower)].ravel())
        targets.append(index[tuple(upper)].ravel())
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    weights = np.abs(flat[sources] - flat[targets]) + floor
    return sparse.csr_matrix((weights, (sources, targets)), shape=(image.size, image.size))
