"""Turn a volume into cached per-slice image embeddings (the frozen encoder's only job)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .embedding_cache import EmbeddingCache, cache_key
from .models import SamModel, default_low_precision
from .orientation import in_plane_spacing, to_slices
from .preprocess import ResizeInfo, choose_normalisation, apply_normalisation, resize_stack_longest_side
from .progress import NO_PROGRESS, Progress
from .volume import Volume


@dataclass
class EncodedVolume:
    """A volume seen as a stack of model-ready slices along `axis`, with the embeddings of every slice."""

    volume: Volume
    axis: int
    slices: np.ndarray  # normalised intensities [n, rows, cols] in 0..1 (a view along the slice axis)
    embeddings: np.ndarray  # [n, C, H, W] float16 (memory-mapped from the cache)
    resize: ResizeInfo
    pixel_spacing: tuple[float, float]

    @property
    def n_slices(self) -> int:
        return self.slices.shape[0]

    def model_images(self, indices) -> torch.Tensor:
        """[len, 3, S, S] model-input images for some slices (recomputed: cheap next to encoding)."""
        images, _ = resize_stack_longest_side(self.slices[list(indices)], self.resize.target, self.pixel_spacing)
        return images


def encode_volume(model: SamModel, volume: Volume, axis: int, cache: EmbeddingCache, window=None, preset=None,
                  progress: Progress = NO_PROGRESS, batch_size: int = 8, precision: str = "auto") -> EncodedVolume:
    """precision: "auto" (bf16 autocast where the CPU or GPU supports it, else fp32), "fp32" or "bf16"."""
    low_precision = default_low_precision(model.device) if precision == "auto" else precision == "bf16"
    normalisation = choose_normalisation(volume, window=window, preset=preset)
    slices = to_slices(apply_normalisation(volume.array, normalisation), axis)
    pixel_spacing = in_plane_spacing(volume.geometry, axis)
    target = model.spec.input_size
    _, resize = resize_stack_longest_side(slices[:1], target, pixel_spacing)
    # Precision is part of the key: bf16 and fp32 embeddings differ slightly, and a cache hit must be exact.
    preprocessing = f"{normalisation.key()};size={target};{'bf16' if low_precision else 'fp32'}"
    key = cache_key(volume.array, axis, preprocessing, model.weights_id)

    def compute(indices):
        images, _ = resize_stack_longest_side(slices[list(indices)], target, pixel_spacing)
        return model.encode(images, use_bf16=low_precision)

    embeddings = cache.get_or_compute(
        key, slices.shape[0], model.spec.embedding_shape, list(range(slices.shape[0])), compute,
        progress=lambda done, total: progress.update("encode", done, total, f"encoding slice {done}/{total}"),
        cancel=lambda: progress.cancel is not None and progress.cancel(), batch_size=batch_size,
        model_id=model.weights_id,
    )
    return EncodedVolume(volume, axis, slices, embeddings, resize, pixel_spacing)
